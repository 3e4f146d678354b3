"""Checks that an output can be written, made before the work that produces it.

A command that would compile for minutes and then fail to write its result (a missing or
read-only folder) fails at once instead, with a :class:`~bitq_tvm.errors.BitqError` naming the
option and the path.
"""

from __future__ import annotations

import os
import tempfile

from ..errors import BitqError


def check_output_path(path: str, option: str) -> None:
    """BitqError unless a file can be created at ``path``; called before the work that produces it.

    The folder must exist and accept a new file (a probe file is created and removed, which also
    catches read-only mounts, where permission bits say nothing).
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BitqError(f"{option} {path}: is a directory, expected a file name")
    if not os.path.isdir(folder):
        raise BitqError(f"{option} {path}: directory {folder} does not exist")
    _probe(folder, path, option)


def check_output_dir(path: str, option: str) -> None:
    """BitqError unless ``path`` is a folder accepting new files, or can be created as one.

    A missing folder is created later with its parents, so its nearest existing ancestor is probed.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise BitqError(f"{option} {path}: {existing} exists and is not a directory")
    _probe(existing, path, option)


def _probe(folder: str, path: str, option: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".bitq-probe-", dir=folder)
    except OSError as err:
        raise BitqError(f"{option} {path}: cannot write in {folder} ({err.strerror})") from None
    os.close(fd)
    os.remove(probe)
