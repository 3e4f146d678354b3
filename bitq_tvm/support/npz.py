"""NumPy ``.npz`` files of the CLI and the planner: read with one-line errors, written atomically."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BitqError
from .atomic import atomic_path


def read_npz(path: str | os.PathLike, what: str = "data") -> dict[str, np.ndarray]:
    """All arrays of the ``.npz`` at ``path``; a missing or unreadable file is a BitqError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BitqError(f"{path}: no such {what} file")
    try:
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad files
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitqError(f"{path}: not a readable .npz file ({detail})") from None


def write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` to ``path`` atomically (the name is kept: no ``.npz`` appended)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
