"""Cross compilation: turn a TVM-compiled kernel into a shared library for a preset's CPU."""

from __future__ import annotations

import os
import shutil
from typing import Callable

from bitq_tvm.errors import BitqError
from bitq_tvm.targets.presets import TargetPreset


def require_tool(executable: str, debian_package: str, purpose: str) -> str:
    """Absolute path of ``executable`` on PATH, else BitqError naming the package to install."""
    path = shutil.which(executable)
    if path is None:
        raise BitqError(
            f"{executable} not found on PATH ({purpose}); install the Debian package "
            f"{debian_package} (apt-get install -y {debian_package}, or run .ci/install-cross.sh)"
        )
    return path


def cross_compiler(preset: TargetPreset) -> Callable | None:
    """The ``fcompile`` that ``export_library`` needs to link a shared library for ``preset``.

    Returns None for a native preset (TVM's default host compiler is right there).

    Raises
    ------
    BitqError
        If the preset's cross compiler is not on PATH (names the executable and Debian package).
    """
    import tvm.support.cc

    if preset.cross_compiler is None:
        return None
    require_tool(preset.cross_compiler, preset.cross_package, f"cross compiler for {preset.name}")
    return tvm.support.cc.cross_compiler(preset.cross_compiler)


def export(executable_or_module, path: str | os.PathLike, preset: TargetPreset) -> str:
    """Link a compiled kernel (``tvm.compile`` result or runtime Module) to ``path`` for ``preset``.

    Returns the path written, as a string.
    """
    if not hasattr(executable_or_module, "export_library"):
        raise BitqError(
            f"cannot export {type(executable_or_module).__name__} to {path}: expected the result "
            "of tvm.compile or a tvm.runtime.Module"
        )
    fcompile = cross_compiler(preset)
    path = os.fspath(path)
    if fcompile is None:
        executable_or_module.export_library(path)
    else:
        executable_or_module.export_library(path, fcompile=fcompile)
    return path
