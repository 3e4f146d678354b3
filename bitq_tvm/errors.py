"""User-facing errors.

Anything a user can cause (a bad file, an unknown format, an impossible budget) raises
:class:`BitqError` with one line naming the file, node, tensor or option at fault. The CLI prints
that line and exits with status 2, without a traceback; any other exception is a bug.
"""


class BitqError(Exception):
    """An error caused by user input; its message is one line naming the culprit."""
