"""Run a cross-compiled kernel library under qemu-user through the small C runner (runner.c).

No TVM runtime is needed on the target side: the runner loads the kernel ``.so``, fills the
backend hooks the TVM codegen expects, passes DLTensors and writes the outputs back as raw files.
The runner binary is built once per (preset triple, compiler, runner source) and cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bitq_tvm.support.atomic import atomic_path
from bitq_tvm.support.cache import default_cache_dir
from bitq_tvm.errors import BitqError
from bitq_tvm.targets.cross import require_tool
from bitq_tvm.targets.presets import TargetPreset

RUNNER_SOURCE = Path(__file__).with_name("runner.c")
# Must match the dtype table in runner.c.
RUNNER_DTYPES = frozenset(
    {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64", "bool"}
)
_RUNNER_FLAGS = ("-x", "c", "-std=c11", "-O2", "-D_POSIX_C_SOURCE=200809L", "-rdynamic")
# The runner is tiny; a hung emulated kernel should not hang the caller forever.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class OutputSpec:
    """Shape and dtype of one kernel output (the runner zero-fills it before the call)."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(extent) for extent in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if any(extent < 0 for extent in self.shape):
            raise BitqError(f"output spec: negative extent in shape {self.shape}")
        if self.dtype not in RUNNER_DTYPES:
            raise BitqError(
                f"output spec: dtype {self.dtype} unsupported; use one of "
                f"{', '.join(sorted(RUNNER_DTYPES))}"
            )


def _ffi_include_dirs() -> list[Path]:
    import tvm_ffi

    root = Path(tvm_ffi.__file__).parent
    return [root / "include", root / "3rdparty" / "dlpack" / "include"]


def _runner_compiler(preset: TargetPreset) -> tuple[str, str]:
    """(executable, Debian package) that builds the runner for ``preset``."""
    if preset.cross_compiler is not None:
        return preset.cross_compiler, preset.cross_package
    return "cc", "gcc"


def build_runner(preset: TargetPreset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the runner executable for ``preset``, compiling it on first use.

    The cache key hashes the runner source, the tvm-ffi ABI headers, the compiler and its flags,
    so a new tvm-ffi or an edited runner.c gets a fresh binary.
    """
    executable, package = _runner_compiler(preset)
    compiler = require_tool(executable, package, f"compiler for the {preset.name} kernel runner")
    include_dirs = _ffi_include_dirs()
    digest = hashlib.sha256()
    for part in (RUNNER_SOURCE, include_dirs[0] / "tvm/ffi/c_api.h",
                 include_dirs[1] / "dlpack/dlpack.h"):
        digest.update(part.read_bytes())
    digest.update("\0".join((compiler, *_RUNNER_FLAGS)).encode())
    runner_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    runner_dir = runner_dir / "runners"
    runner = runner_dir / f"runner-{preset.triple}-{digest.hexdigest()[:16]}"
    if runner.exists():
        return runner
    runner_dir.mkdir(parents=True, exist_ok=True)
    # Built under a unique name, then renamed: concurrent test runs may race on the same key.
    with atomic_path(runner) as partial:
        command = [compiler, *_RUNNER_FLAGS, *(f"-I{path}" for path in include_dirs),
                   "-o", partial, str(RUNNER_SOURCE), "-ldl"]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            first_error = (built.stderr.strip().splitlines() or ["no output"])[0]
            raise BitqError(f"building the kernel runner for {preset.name} failed: {first_error}")
    return runner


def _launcher(preset: TargetPreset) -> list[str]:
    """The command prefix that runs a target binary on this machine (empty when native)."""
    if preset.emulator is None:
        return []
    emulator = require_tool(preset.emulator, preset.emulator_package, f"emulator for {preset.name}")
    sysroot = Path("/usr") / preset.triple
    if not sysroot.is_dir():
        raise BitqError(
            f"{sysroot} (the {preset.triple} C library qemu loads) is missing; install the Debian "
            f"package {preset.cross_package}"
        )
    return [emulator, "-L", str(sysroot), *preset.emulator_args]


def run_kernel_emulated(
    lib_path: str | os.PathLike,
    func_name: str,
    inputs: Sequence[np.ndarray],
    output_specs: Sequence[OutputSpec | tuple[Sequence[int], str]],
    preset: TargetPreset,
    cache_dir: str | os.PathLike | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[np.ndarray]:
    """Call ``func_name`` of kernel library ``lib_path`` on ``preset`` (under qemu if emulated).

    Parameters
    ----------
    lib_path
        A library exported for ``preset`` (see :func:`bitq_tvm.targets.cross.export`).
    func_name
        The PrimFunc's global symbol.
    inputs, output_specs
        The function's parameters in order: all inputs first, then the outputs, each output given
        as an :class:`OutputSpec` or a ``(shape, dtype)`` pair.
    preset
        The target; its emulator and cross compiler must be installed.

    Returns
    -------
    list of np.ndarray
        The outputs, in ``output_specs`` order.

    Raises
    ------
    BitqError
        Missing tools (names the Debian package), or a kernel that fails or crashes.
    """
    lib_path = Path(lib_path).resolve()
    if not lib_path.is_file():
        raise BitqError(f"kernel library {lib_path} does not exist")
    specs = [spec if isinstance(spec, OutputSpec) else OutputSpec(*spec) for spec in output_specs]
    arrays = [np.ascontiguousarray(array) for array in inputs]
    for index, array in enumerate(arrays):
        if array.dtype.name not in RUNNER_DTYPES:
            raise BitqError(f"input #{index} of {func_name}: dtype {array.dtype} unsupported")
    command = [*_launcher(preset), str(build_runner(preset, cache_dir)), str(lib_path), func_name]
    with tempfile.TemporaryDirectory(prefix="bitq-run-") as work_dir:
        for index, array in enumerate(arrays):
            path = Path(work_dir) / f"in{index}.bin"
            array.tofile(path)
            command.append(f"in:{array.dtype.name}:{_shape_text(array.shape)}:{path}")
        output_paths = []
        for index, spec in enumerate(specs):
            path = Path(work_dir) / f"out{index}.bin"
            output_paths.append(path)
            command.append(f"out:{spec.dtype}:{_shape_text(spec.shape)}:{path}")
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BitqError(
                f"{func_name} in {lib_path.name} did not finish within {timeout_s:.0f} s "
                f"on {preset.name}"
            ) from None
        if finished.returncode != 0:
            message = " ".join(finished.stderr.split()) or f"exit status {finished.returncode}"
            raise BitqError(f"running {func_name} from {lib_path.name} on {preset.name}: {message}")
        return [
            np.fromfile(path, dtype=spec.dtype).reshape(spec.shape)
            for path, spec in zip(output_paths, specs)
        ]


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(extent) for extent in shape)
