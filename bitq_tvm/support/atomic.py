"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every output bitq-tvm writes (plans, tuning files, reports, calibration archives, exported
libraries, fetched models) goes through :func:`atomic_path`: it is written under a temporary name
beside the destination, then renamed onto it (``os.replace`` is atomic within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``path``, renamed onto it when the block ends without an error.

    The temporary file is removed when the block raises. ``suffix`` ends the temporary name for
    writers that choose the format by extension (``.so`` for a shared library).
    """
    path = os.fspath(path)
    # the process id keeps concurrent writers of one destination apart
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes | list[bytes]) -> None:
    """Write ``data`` (bytes, or a list of lines) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.writelines([data] if isinstance(data, bytes) else data)


def write_json(path: str | os.PathLike, data: Any, indent: int = 1, newline: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``newline``: end the file with one)."""
    write_text(path, json.dumps(data, indent=indent) + ("\n" if newline else ""))
