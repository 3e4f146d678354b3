"""Machine descriptions: target presets (x86, ARM, RISC-V), cross toolchains, emulated runs of kernel
libraries, the aarch64 rootfs, and the address of RPC devices. Nothing here compiles or runs models
(that is :mod:`bitq_tvm.api` and :mod:`bitq_tvm.runtime`)."""

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
from bitq_tvm.targets.rpc import RpcAddress, device_address, parse_address

__all__ = [
    "TARGETS",
    "CacheLevel",
    "OutputSpec",
    "RpcAddress",
    "TargetPreset",
    "build_runner",
    "cross_compiler",
    "device_address",
    "export",
    "get_target",
    "host_preset",
    "parse_address",
    "require_tool",
    "run_kernel_emulated",
    "target_names",
]
