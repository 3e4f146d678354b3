"""Target presets (x86, ARM, RISC-V), cross compilation, and emulated runs of kernel libraries."""

from bitq_tvm.targets.cross import cross_compiler, export, require_tool
from bitq_tvm.targets.emulation import OutputSpec, build_runner, run_kernel_emulated
from bitq_tvm.targets.presets import (
    TARGETS,
    CacheLevel,
    TargetPreset,
    get_target,
    host_preset,
    target_names,
)

__all__ = [
    "TARGETS",
    "CacheLevel",
    "OutputSpec",
    "TargetPreset",
    "build_runner",
    "cross_compiler",
    "export",
    "get_target",
    "host_preset",
    "require_tool",
    "run_kernel_emulated",
    "target_names",
]
