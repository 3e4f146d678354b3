"""One entry point for the integer BFP matmul on any target: its variants and which one a target runs.

A variant is a schedule of :mod:`.bfp_matmul`'s compute: ``vnni``, ``avx2``, ``generic``
(:mod:`.bfp_matmul_x86`), ``sdot``, ``i8mm``, ``neon``, ``rvv``, ``scalar``
(:mod:`.bfp_matmul_arm_riscv`). Which variants a target can run is read from the
``tvm.target.Target`` alone: its triple (``-mtriple``, else the host's) and the LLVM features
its ``-mcpu``/``-mattr`` give (``tvm.target.codegen.target_has_features``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target
from tvm.target.codegen import llvm_get_system_triple, target_has_features

from ..errors import BitqError
from ..formats import BFPFormat
from .bfp_matmul import Epilogue
from .bfp_matmul_arm_riscv import VARIANTS as ARM_RISCV_VARIANTS
from .bfp_matmul_arm_riscv import bfp_matmul_arm_riscv_func
from .bfp_matmul_x86 import VARIANTS as X86_VARIANTS
from .bfp_matmul_x86 import bfp_matmul_x86_func

__all__ = ["VARIANTS", "target_arch", "available_variants", "kernel_variant", "bfp_matmul_func",
           "bfp_matmul_for_target"]

VARIANTS = X86_VARIANTS + ARM_RISCV_VARIANTS
# Per variant: the architecture it compiles for (None: any) and the LLVM features it needs.
_REQUIREMENTS = {
    "vnni": ("x86", ("avx512vnni", "avx512bw")),
    "avx2": ("x86", ("avx2",)),
    "generic": ("x86", ()),
    "sdot": ("aarch64", ("dotprod",)),
    "i8mm": ("aarch64", ("i8mm",)),
    "neon": ("aarch64", ("neon",)),
    "rvv": ("riscv", ("v",)),
    "scalar": (None, ()),
}
# Preferred first. i8mm is correct (tested) but not the default: its speed over sdot is unmeasured
# on hardware here, and it repacks the weights on every call. On x86, "generic" stands in for
# "scalar" (same plain int32 loops, vectorised by LLVM).
_PREFERENCE = {
    "x86": ("vnni", "avx2", "generic"),
    "aarch64": ("sdot", "neon", "scalar"),
    "riscv": ("rvv", "scalar"),
    None: ("scalar",),
}


def target_arch(target: Target) -> str | None:
    """``"x86"``, ``"aarch64"``, ``"riscv"`` or None (another architecture) of an LLVM target."""
    triple = str(target.attrs.get("mtriple") or llvm_get_system_triple())
    if triple.startswith(("x86_64", "i686", "i386")):
        return "x86"
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    if triple.startswith("riscv"):
        return "riscv"
    return None


def _describe(target: Target) -> str:
    """Short name of an LLVM target for messages: its triple, ``-mcpu`` and ``-mattr``."""
    attrs = target.attrs
    parts = [str(attrs.get("mtriple") or "host")]
    if attrs.get("mcpu"):
        parts.append(f"-mcpu={attrs['mcpu']}")
    if attrs.get("mattr"):
        parts.append(f"-mattr={','.join(str(a) for a in attrs['mattr'])}")
    return " ".join(parts)


def _missing_features(target: Target, variant: str) -> list[str]:
    return [f for f in _REQUIREMENTS[variant][1] if not target_has_features(f, target)]


def available_variants(target: Target) -> tuple[str, ...]:
    """The variants ``target`` can run (its architecture's, whose LLVM features it has)."""
    arch = target_arch(target)
    return tuple(v for v in VARIANTS if _REQUIREMENTS[v][0] in (None, arch) and not _missing_features(target, v))


def kernel_variant(target: Target) -> str:
    """The variant deployment compiles (and tuning tunes) for ``target`` when none is asked for."""
    available = available_variants(target)
    return next(v for v in _PREFERENCE[target_arch(target)] if v in available)


def bfp_matmul_func(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str,
                    tile: tuple[int, int] | None = None, epilogue: Epilogue | None = None,
                    tuned=None) -> tirx.PrimFunc:
    """Hand-scheduled integer BFP matmul PrimFunc ``(qa, ea, qw, ew, C)`` of any variant.

    ``K`` is the real reduction length (padded to whole blocks inside); ``tile`` = (rows, groups
    of 16 columns) overrides the default register tile; ``epilogue`` fuses bias, clip and the next
    layer's activation quantization (:class:`~bitq_tvm.kernels.bfp_matmul.Epilogue`; signature
    ``(qa, ea, qw, ew, [bias,] Q, E)``). No target check: compile it for a target that has the
    variant's instructions, or use :func:`bfp_matmul_for_target`, which checks. ``tuned``: the
    decisions of a verified tuned record (x86 variants; see :func:`.bfp_matmul_x86.bfp_matmul_x86_func`).
    """
    if variant in X86_VARIANTS:
        return bfp_matmul_x86_func(M, N, K, fmt_a, fmt_w, variant, tile, epilogue, tuned)
    if variant not in VARIANTS:
        raise BitqError(f"bfp_matmul: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    return bfp_matmul_arm_riscv_func(M, N, K, fmt_a, fmt_w, variant, tile, epilogue)


def bfp_matmul_for_target(
    M: int,
    N: int,
    K: int,
    fmt_a: BFPFormat,
    fmt_w: BFPFormat,
    target: Target,
    variant: str | None = None,
) -> tuple[tirx.PrimFunc, str]:
    """The integer BFP matmul PrimFunc for ``target`` (x86, ARM or RISC-V), and its variant.

    Parameters
    ----------
    M, N, K, fmt_a, fmt_w
        As :func:`bfp_matmul_func`; the PrimFunc has the signature ``(qa, ea, qw, ew, C)``
        and global symbol ``bfp_matmul``.
    target
        The ``tvm.target.Target`` to compile the PrimFunc for.
    variant
        One of ``VARIANTS`` that ``target`` can run; None picks :func:`kernel_variant`.

    Raises
    ------
    BitqError
        A variant the target lacks (e.g. ``i8mm`` on cortex-a53), or bad formats or shapes.
    """
    if variant is None:
        variant = kernel_variant(target)
    if variant not in VARIANTS:
        raise BitqError(f"bfp_matmul: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    arch, _ = _REQUIREMENTS[variant]
    if arch is not None and arch != target_arch(target):
        raise BitqError(
            f"bfp_matmul: variant {variant!r} is not available for target '{_describe(target)}' "
            f"({target_arch(target) or 'unknown'} architecture); choose one of "
            f"{', '.join(available_variants(target))}"
        )
    missing = _missing_features(target, variant)
    if missing:
        raise BitqError(f"bfp_matmul: target '{_describe(target)}' lacks LLVM feature {', '.join(missing)} "
                        f"of variant {variant!r}; it can run {', '.join(available_variants(target))}")
    return bfp_matmul_func(M, N, K, fmt_a, fmt_w, variant), variant
