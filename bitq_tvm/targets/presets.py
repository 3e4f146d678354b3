"""Target presets: what the compiler and the performance model need to know about one CPU.

A :class:`TargetPreset` ties together the LLVM target TVM compiles for, the integer intrinsic
family the BFP kernels tensorize with, a rough compute peak and memory hierarchy for the
data-movement (DM) model, and how to build and run code for it (cross compiler, emulator).

Numbers are deliberately rough: they rank candidates in the DM model, they are not a simulator.
Cache sizes come from the vendors' public technical reference manuals or datasheets of one
representative board per preset (named in each preset's description); int8 MACs per cycle per
core are the vendor/instruction-table peak of the preset's intrinsic (one instruction's MACs x its
issue rate), rounded.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from bitq_tvm.errors import BitqError

# Each family lists the intrinsics it provides: a newer extension implies the older ones.
INTRINSICS_BY_FAMILY: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "vnni": frozenset({"vnni", "avx2", "scalar"}),
        "avx2": frozenset({"avx2", "scalar"}),
        "neon": frozenset({"neon", "scalar"}),
        "sdot": frozenset({"sdot", "neon", "scalar"}),
        "i8mm": frozenset({"i8mm", "sdot", "neon", "scalar"}),
        "rvv": frozenset({"rvv", "scalar"}),
        "scalar": frozenset({"scalar"}),
    }
)
KNOWN_INTRINSICS: frozenset[str] = frozenset().union(*INTRINSICS_BY_FAMILY.values())

# Relative cost of moving one byte to the core from each level. BitQ's DM model charges 5 per
# on-chip access and 640 per DRAM access (ratio 128); the levels in between are scaled by their
# typical load-to-use latency relative to L1 (about 1 : 3 : 10 cycles-equivalents per line).
L1_COST = 1.0
L2_COST = 3.0
L3_COST = 10.0
DRAM_COST = 128.0

KIB = 1024
MIB = 1024 * 1024
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_RISCV_GC = ("+64bit", "+m", "+a", "+f", "+d", "+c")


@dataclass(frozen=True)
class CacheLevel:
    """One cache level: its size, whether each core has its own, and its per-byte access cost."""

    name: str
    size_bytes: int
    relative_cost: float
    per_core: bool

    def __post_init__(self) -> None:
        if not self.name:
            raise BitqError("cache level: name must not be empty")
        if self.size_bytes <= 0:
            raise BitqError(
                f"cache level {self.name}: size_bytes must be > 0, got {self.size_bytes}"
            )
        if self.relative_cost <= 0:
            raise BitqError(
                f"cache level {self.name}: relative_cost must be > 0, got {self.relative_cost}"
            )


@dataclass(frozen=True)
class TargetPreset:
    """A named CPU target: LLVM target, intrinsic family, DM-model numbers, build and run tools.

    ``cross_compiler``/``cross_package`` are None for the native host. ``emulator`` is None when
    code runs natively, else a qemu-user executable (``qemu-aarch64``/``qemu-riscv64``) run with
    ``emulator_args`` (e.g. ``("-cpu", "rv64,v=true,vlen=128")``).
    """

    name: str
    description: str
    llvm_target: Mapping[str, Any] = field(hash=False)
    triple: str
    intrinsic_family: str
    vector_bits: int
    int8_macs_per_cycle: int
    cores: int
    caches: tuple[CacheLevel, ...]
    dram_bandwidth_gbps: float
    dram_cost: float = DRAM_COST
    cross_compiler: str | None = None
    cross_package: str | None = None
    emulator: str | None = None
    emulator_args: tuple[str, ...] = ()
    emulator_package: str | None = None

    def __post_init__(self) -> None:
        where = f"target preset {self.name!r}"
        if not _NAME_PATTERN.match(self.name):
            raise BitqError(f"{where}: name must be lower-case letters, digits, '.', '_' or '-'")
        if not isinstance(self.llvm_target, Mapping) or self.llvm_target.get("kind") != "llvm":
            raise BitqError(
                f"{where}: llvm_target must be a dict with kind 'llvm' (CLI-style strings are "
                "rejected by TVM 0.27)"
            )
        mtriple = self.llvm_target.get("mtriple")
        if mtriple is not None and mtriple != self.triple:
            raise BitqError(f"{where}: llvm_target mtriple {mtriple!r} != triple {self.triple!r}")
        if self.intrinsic_family not in INTRINSICS_BY_FAMILY:
            raise BitqError(
                f"{where}: unknown intrinsic family {self.intrinsic_family!r}; known: "
                f"{', '.join(sorted(INTRINSICS_BY_FAMILY))}"
            )
        if self.vector_bits <= 0 or self.vector_bits % 8:
            raise BitqError(f"{where}: vector_bits must be a positive multiple of 8")
        if self.int8_macs_per_cycle <= 0 or self.cores <= 0:
            raise BitqError(f"{where}: int8_macs_per_cycle and cores must be > 0")
        if not self.caches:
            raise BitqError(f"{where}: needs at least one cache level")
        sizes = [level.size_bytes for level in self.caches]
        costs = [level.relative_cost for level in self.caches] + [self.dram_cost]
        if sizes != sorted(sizes) or costs != sorted(costs):
            raise BitqError(f"{where}: cache sizes and costs must grow from L1 outwards to DRAM")
        if self.dram_bandwidth_gbps <= 0:
            raise BitqError(f"{where}: dram_bandwidth_gbps must be > 0")
        if (self.cross_compiler is None) != (self.cross_package is None):
            raise BitqError(f"{where}: cross_compiler and cross_package go together")
        if self.emulator is not None and (self.cross_compiler is None or not self.emulator_package):
            raise BitqError(
                f"{where}: an emulated target needs a cross compiler and emulator_package"
            )
        # Freeze the target dict so a preset cannot be edited through it.
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in self.llvm_target.items()}
        object.__setattr__(self, "llvm_target", MappingProxyType(frozen))

    @property
    def intrinsics(self) -> frozenset[str]:
        """Every intrinsic name this target provides (its family and the ones it implies)."""
        return INTRINSICS_BY_FAMILY[self.intrinsic_family]

    def has_intrinsic(self, name: str) -> bool:
        """True if the target provides intrinsic ``name``."""
        return name in self.intrinsics

    def require_intrinsic(self, name: str) -> None:
        """Raise BitqError unless the target provides intrinsic ``name``."""
        if name not in KNOWN_INTRINSICS:
            raise BitqError(
                f"unknown intrinsic {name!r}; known: {', '.join(sorted(KNOWN_INTRINSICS))}"
            )
        if name not in self.intrinsics:
            raise BitqError(
                f"target {self.name!r} ({self.intrinsic_family}) lacks intrinsic {name!r}; it has: "
                f"{', '.join(sorted(self.intrinsics))}"
            )

    def tvm_target(self):
        """The ``tvm.target.Target`` for this preset."""
        import tvm

        return tvm.target.Target(
            {key: list(v) if isinstance(v, tuple) else v for key, v in self.llvm_target.items()}
        )

    @property
    def is_native(self) -> bool:
        """True if code for this target runs directly on this machine."""
        return self.emulator is None and self.cross_compiler is None


def _aarch64(name, description, mcpu, mattr, family, macs, cores, caches, dram_gbps, qemu_cpu):
    return TargetPreset(
        name=name,
        description=description,
        llvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr},
        triple="aarch64-linux-gnu",
        intrinsic_family=family,
        vector_bits=128,
        int8_macs_per_cycle=macs,
        cores=cores,
        caches=caches,
        dram_bandwidth_gbps=dram_gbps,
        cross_compiler="aarch64-linux-gnu-g++",
        cross_package="g++-aarch64-linux-gnu",
        emulator="qemu-aarch64",
        emulator_args=("-cpu", qemu_cpu),
        emulator_package="qemu-user",
    )


def _riscv64(name, description, mattr, family, vlen, macs, cores, caches, dram_gbps, qemu_cpu):
    # No -mcpu: LLVM's named RISC-V cores enable extensions (Zvfh, ...) Debian's qemu 7.2 lacks.
    return TargetPreset(
        name=name,
        description=description,
        llvm_target={"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": list(mattr)},
        triple="riscv64-linux-gnu",
        intrinsic_family=family,
        vector_bits=vlen,
        int8_macs_per_cycle=macs,
        cores=cores,
        caches=caches,
        dram_bandwidth_gbps=dram_gbps,
        cross_compiler="riscv64-linux-gnu-g++",
        cross_package="g++-riscv64-linux-gnu",
        emulator="qemu-riscv64",
        emulator_args=("-cpu", qemu_cpu),
        emulator_package="qemu-user",
    )


def _levels(l1d, l2=None, l2_per_core=True, l3=None):
    levels = [CacheLevel("L1d", l1d, L1_COST, True)]
    if l2 is not None:
        levels.append(CacheLevel("L2", l2, L2_COST, l2_per_core))
    if l3 is not None:
        levels.append(CacheLevel("L3", l3, L3_COST, False))
    return tuple(levels)


_PRESETS = (
    TargetPreset(
        name="avx512-vnni",
        description="AMD Zen 4 (EPYC 9004 / Ryzen 7000): 32 KiB L1d, 1 MiB L2 per core, 32 MiB "
        "L3 per CCD (AMD Zen 4 software optimization guide); vpdpbusd 64 MACs/cycle",
        llvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"},
        triple="x86_64-linux-gnu",
        intrinsic_family="vnni",
        vector_bits=512,
        int8_macs_per_cycle=64,
        cores=8,
        caches=_levels(32 * KIB, 1 * MIB, True, 32 * MIB),
        dram_bandwidth_gbps=60.0,
    ),
    TargetPreset(
        name="avx2",
        description="Intel Skylake client (Core i7-6700): 32 KiB L1d, 256 KiB L2 per core, "
        "8 MiB shared L3 (Intel optimization manual); exact int8 via vpmaddwd, 32 MACs/cycle",
        llvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake"},
        triple="x86_64-linux-gnu",
        intrinsic_family="avx2",
        vector_bits=256,
        int8_macs_per_cycle=32,
        cores=4,
        caches=_levels(32 * KIB, 256 * KIB, True, 8 * MIB),
        dram_bandwidth_gbps=34.0,
    ),
    _aarch64(
        "cortex-a53",
        "Raspberry Pi 3 (BCM2837, 4x Cortex-A53): 32 KiB L1d, 512 KiB shared L2, no L3; NEON "
        "without dotprod (smull/sadalp), about 8 int8 MACs/cycle",
        "cortex-a53", ["+neon"], "neon", 8, 4,
        _levels(32 * KIB, 512 * KIB, False), 4.0, "cortex-a53",
    ),
    _aarch64(
        # Debian's qemu 7.2 has no cortex-a55 model; cortex-a76 runs the same v8.2+dotprod code.
        "cortex-a55",
        "Rockchip RK3568 (4x Cortex-A55): 32 KiB L1d, no private L2, 512 KiB shared L3 "
        "(Rockchip RK3568 datasheet); sdot 16 MACs/cycle",
        "cortex-a55", ["+neon", "+dotprod"], "sdot", 16, 4,
        _levels(32 * KIB, l3=512 * KIB), 6.0, "cortex-a76",
    ),
    _aarch64(
        "cortex-a76",
        "Raspberry Pi 5 (BCM2712, 4x Cortex-A76): 64 KiB L1d, 512 KiB L2 per core, 2 MiB "
        "shared L3 (Raspberry Pi product brief); two sdot pipes, 32 MACs/cycle",
        "cortex-a76", ["+neon", "+dotprod"], "sdot", 32, 4,
        _levels(64 * KIB, 512 * KIB, True, 2 * MIB), 17.0, "cortex-a76",
    ),
    _aarch64(
        # qemu 7.2 has no neoverse-n2 model; "max" implements i8mm and dotprod.
        "neoverse-n2",
        "Arm Neoverse N2 (e.g. Alibaba Yitian 710 / Azure Cobalt 100), an 8-core slice: 64 KiB "
        "L1d, 1 MiB L2 per core, 8 MiB of the shared SLC (Arm N2 TRM); smmla x2 pipes, 64 "
        "MACs/cycle",
        "neoverse-n2", ["+neon", "+dotprod", "+i8mm"], "i8mm", 64, 8,
        _levels(64 * KIB, 1 * MIB, True, 8 * MIB), 40.0, "max",
    ),
    _riscv64(
        "rv64gcv-vlen128",
        "Kendryte K230 (XuanTie C908, RVV 1.0, VLEN 128): 32 KiB L1d, 256 KiB L2 (Canaan K230 "
        "datasheet); vwmacc at 16 int8 MACs/cycle",
        (*_RISCV_GC, "+v"), "rvv", 128, 16, 1,
        _levels(32 * KIB, 256 * KIB, False), 6.0, "rv64,v=true,vlen=128",
    ),
    _riscv64(
        "rv64gcv-vlen256",
        "SpacemiT K1 (8x X60, RVV 1.0, VLEN 256): 32 KiB L1d, 512 KiB L2 per 4-core cluster "
        "(SpacemiT K1 datasheet); vwmacc at 32 int8 MACs/cycle",
        (*_RISCV_GC, "+v", "+zvl256b"), "rvv", 256, 32, 8,
        _levels(32 * KIB, 512 * KIB, False), 10.0, "rv64,v=true,vlen=256",
    ),
    _riscv64(
        "rv64gc",
        "StarFive JH7110 (VisionFive 2, 4x SiFive U74, no vector unit): 32 KiB L1d, 2 MiB "
        "shared L2 (SiFive U74 manual); one scalar multiply per cycle",
        _RISCV_GC, "scalar", 64, 1, 4,
        _levels(32 * KIB, 2 * MIB, False), 4.0, "rv64,v=false",
    ),
)

TARGETS: Mapping[str, TargetPreset] = MappingProxyType({preset.name: preset for preset in _PRESETS})
HOST = "host"


def target_names() -> list[str]:
    """All names :func:`get_target` accepts, ``host`` first."""
    return [HOST, *TARGETS]


def get_target(name: str) -> TargetPreset:
    """The preset called ``name``; ``"host"`` describes this machine.

    Raises
    ------
    BitqError
        If ``name`` is unknown (the message lists the known names).
    """
    if name == HOST:
        return host_preset()
    try:
        return TARGETS[name]
    except KeyError:
        raise BitqError(
            f"unknown target {name!r}; known targets: {', '.join(target_names())}"
        ) from None


def _host_cache_sizes() -> dict[str, int]:
    """Data/unified cache sizes of CPU 0 by level name ("L1d", "L2", "L3"), from Linux sysfs."""
    sizes = {}
    cache_dir = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(cache_dir))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(f"{cache_dir}/{entry}/level") as level_file:
                level = int(level_file.read())
            with open(f"{cache_dir}/{entry}/type") as type_file:
                kind = type_file.read().strip()
            with open(f"{cache_dir}/{entry}/size") as size_file:
                size_text = size_file.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size_text:
            continue
        multiplier = {"K": KIB, "M": MIB}.get(size_text[-1], 1)
        sizes["L1d" if level == 1 else f"L{level}"] = int(size_text.rstrip("KM")) * multiplier
    return sizes


@functools.lru_cache(maxsize=1)
def host_preset() -> TargetPreset:
    """A preset for this machine: LLVM's host CPU name, its int8 family, its cache sizes."""
    from tvm.target import Target
    from tvm.target.codegen import (
        llvm_get_system_cpu,
        llvm_get_system_triple,
        target_has_features,
    )

    cpu = llvm_get_system_cpu()
    llvm_target = {"kind": "llvm", "mcpu": cpu}
    target = Target(llvm_target)
    # Order matters: the first supported family wins.
    probes = (
        ("vnni", ("avx512vnni", "avx512bw"), 512, 64),
        ("avx2", ("avx2",), 256, 32),
        ("i8mm", ("i8mm", "dotprod"), 128, 64),
        ("sdot", ("dotprod",), 128, 32),
        ("neon", ("neon",), 128, 8),
    )
    family, vector_bits, macs = "scalar", 64, 1
    for probe_family, features, probe_bits, probe_macs in probes:
        if target_has_features(list(features), target):
            family, vector_bits, macs = probe_family, probe_bits, probe_macs
            break
    # Unreadable sysfs (containers, non-Linux) falls back to a common desktop configuration.
    # Virtual machines may report the whole socket's L3; it still bounds what one job can use.
    sizes = _host_cache_sizes()
    l1d = sizes.get("L1d", 32 * KIB)
    l2 = max(sizes.get("L2", 512 * KIB), l1d)
    l3 = sizes.get("L3", 0)
    return TargetPreset(
        name=HOST,
        description=f"this machine ({cpu}), detected through LLVM and Linux sysfs",
        llvm_target=llvm_target,
        triple=llvm_get_system_triple(),
        intrinsic_family=family,
        vector_bits=vector_bits,
        int8_macs_per_cycle=macs,
        cores=os.cpu_count() or 1,
        caches=_levels(l1d, l2, True, max(l3, l2) if l3 else None),
        dram_bandwidth_gbps=20.0,
    )
