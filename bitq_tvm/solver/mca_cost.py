"""llvm-mca cycle estimates of a deployed model's kernels: evidence for targets without a board.

Where it sits: after deployment (``deploy.compile_deployed`` builds the model for the preset's
LLVM target, as a deployment would) and before the planner, which may take the per-layer
estimates as its performance term (labelled ``llvm-mca estimate``, never ``measured``).

The model, per kernel call (all of it an **estimate**, one core, no board involved):

* **compute**: the kernel's hot loop is its innermost loop with the most multiply-accumulate
  lanes (``sdot`` 16, ``fmla .4s`` 4, ``vpdpbusd zmm`` 64, RVV ops ``vl``, ...). Its cycles per
  iteration come from ``llvm-mca`` under the preset's ``-mcpu`` model
  (:mod:`bitq_tvm.targets.mca`); its iterations are the kernel's MACs (read from the TIR before
  scheduling, or the integer GEMM's ``m x n x k``) over the MACs of one iteration. When the hot
  loop's trip count is a constant, its enclosing loop's own instructions (the BFP per-block
  rescale, the accumulator set-up) are priced the same way, once per trip of the hot loop.
  Everything else (epilogue stores, outer loop control, kernels with no MAC loop: im2col,
  quantizers, pooling, reshapes) has no compute term.
* **memory** (roofline, labelled): the bytes of the kernel's arguments, each read or written once
  from DRAM at the preset's ``dram_bandwidth_gbps`` and a nominal board clock
  (:data:`~bitq_tvm.targets.mca.CLOCK_GHZ`).
* estimate = max(compute, memory) per call x calls. Assumed: every load hits L1 inside the
  compute term (llvm-mca), no overlap losses, no parallel speed-up, no cache reuse across calls.
"""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType
from typing import Mapping

import numpy as np
import tvm

from ..errors import BitqError
from ..frontend.onnx_model import OnnxModel
from ..kernels.contract import KERNEL_ATTR, kernel_geometry, kernel_key, record_key
from ..plan import LayerFormats, Plan
from ..support.attrs import plain_attr
from ..targets import mca
from ..targets.presets import TargetPreset

ESTIMATE_SOURCE = "llvm-mca estimate"
_CALL = re.compile(r"call_tir\w*\((?:cls\.)?(\w+),")


@dataclasses.dataclass(frozen=True)
class KernelEstimate:
    """Cycle estimate of one kernel (module docstring); cycles are per call unless named total."""

    name: str
    calls: int
    macs: int
    arg_bytes: int
    compute_cycles: float | None
    memory_cycles: float
    hot_loop_cycles: float | None = None
    hot_loop_macs: int = 0
    block_overhead: bool = False
    key: tuple | None = None  # :func:`kernel_key` of an integer BFP kernel, None for the others

    @property
    def cycles(self) -> float:
        return max(self.compute_cycles or 0.0, self.memory_cycles)

    @property
    def total_cycles(self) -> float:
        return self.cycles * self.calls

    @property
    def bound(self) -> str:
        return "memory" if self.memory_cycles >= (self.compute_cycles or 0.0) else "compute"


@dataclasses.dataclass(frozen=True)
class ModelEstimate:
    """Per-kernel estimates of one model deployed under one plan on one preset."""

    preset: str
    mcpu: str
    kernels: tuple[KernelEstimate, ...]

    @property
    def total_cycles(self) -> float:
        return float(sum(k.total_cycles for k in self.kernels))

    @property
    def memory_cycles(self) -> float:
        return float(sum(k.memory_cycles * k.calls for k in self.kernels))

    @property
    def compute_cycles(self) -> float:
        return float(sum((k.compute_cycles or 0.0) * k.calls for k in self.kernels))

    def by_name(self) -> Mapping[str, KernelEstimate]:
        return MappingProxyType({k.name: k for k in self.kernels})


@tvm.instrument.pass_instrument
class _KernelReader:
    """Reads MACs before scheduling, argument bytes and call counts after it (cross builds cannot load)."""

    def __init__(self):
        self.macs: dict[str, int] = {}
        self.keys: dict[str, tuple] = {}
        self.arg_bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def run_before_pass(self, mod, info):
        if info.name == "ApplyDefaultSchedule":
            for gvar, func in mod.functions.items():
                if isinstance(func, tvm.tirx.PrimFunc):
                    name = gvar.name_hint
                    record = None if func.attrs is None or KERNEL_ATTR not in func.attrs else \
                        plain_attr(func.attrs[KERNEL_ATTR])
                    key = record_key(record) if record is not None else None
                    if key is not None:
                        self.keys[name] = key
                    if key is not None and key[0] == "matmul":
                        # already tensorized when we see it: its GEMM is in its record
                        self.macs[name] = key[1] * key[2] * key[3]
                    else:
                        self.macs[name] = tir_macs(func)
        elif info.name == "CallTIRRewrite" and not self.calls:
            self.calls = {}
            for name in _CALL.findall(str(mod["main"])):
                self.calls[name] = self.calls.get(name, 0) + 1
            for gvar, func in mod.functions.items():
                if isinstance(func, tvm.tirx.PrimFunc):
                    self.arg_bytes[gvar.name_hint] = sum(_param_bytes(p) for p in func.params)


def _param_bytes(param) -> int:
    """Bytes of a buffer parameter (TVM 0.27: the parameter is the buffer), 0 for a scalar."""
    try:
        shape = [int(d) for d in param.shape]
    except (AttributeError, TypeError, tvm.error.InternalError):
        return 0
    return int(np.prod(shape)) * tvm.DataType(str(param.dtype)).bits // 8


def tir_macs(func) -> int:
    """Multiply-accumulates of an unscheduled PrimFunc: reduction blocks whose update multiplies."""
    total = 0

    def has_mul(expr) -> bool:  # TVM 0.27 has no TIR post_order_visit in Python
        if isinstance(expr, tvm.tirx.Mul):
            return True
        children = [getattr(expr, a, None) for a in ("a", "b", "value", "condition", "true_value", "false_value")]
        children += list(getattr(expr, "args", None) or ())
        return any(isinstance(c, tvm.ir.expr.Expr) and has_mul(c) for c in children)

    def walk(stmt, trips):
        nonlocal total
        if isinstance(stmt, tvm.tirx.For):
            extent = stmt.extent
            walk(stmt.body, trips * int(extent) if isinstance(extent, tvm.tirx.IntImm) else trips)
        elif isinstance(stmt, tvm.s_tir.SBlockRealize):
            block = stmt.block
            if any(iv.iter_type == 2 for iv in block.iter_vars) and isinstance(block.body, tvm.tirx.BufferStore) \
                    and has_mul(block.body.value):
                total += trips
            walk(block.body, trips)
        elif isinstance(stmt, tvm.tirx.SeqStmt):
            for s in stmt.seq:
                walk(s, trips)
        else:
            for attr in ("body", "then_case", "else_case"):
                child = getattr(stmt, attr, None)
                if isinstance(child, tvm.tirx.stmt.Stmt):
                    walk(child, trips)

    walk(func.body, 1)
    return total


def _compute(lines, preset: TargetPreset, macs: int, triple: str, cpu: str, mattr: str):
    """(compute cycles, hot-loop cycles/iteration, MACs/iteration, block overhead priced) of one kernel."""
    loops = mca.find_loops(lines)
    vl, lanes = None, {}
    for i, line in enumerate(lines):
        vl = mca.rvv_vl(line, preset.vector_bits) or vl
        lanes[i] = mca.mac_lanes(line.strip(), preset.vector_bits, vl)
    best, best_macs = None, 0
    for loop in mca.innermost(loops):
        loop_macs = sum(lanes[i] for i in range(loop.start, loop.end + 1))
        if loop_macs > best_macs:
            best, best_macs = loop, loop_macs
    if best is None or macs <= 0:
        return None, None, 0, False
    per_iteration = mca.run_mca(mca.loop_body(lines, best), triple, cpu, mattr).cycles_per_iteration
    iterations = macs / best_macs
    cycles = iterations * per_iteration
    outer, trips = mca.parent(best, loops), mca.trip_count(lines, best)
    if outer is not None and trips:
        overhead = mca.run_mca(mca.loop_body(lines, outer, skip=best), triple, cpu, mattr).cycles_per_iteration
        cycles += iterations / trips * overhead
    return cycles, per_iteration, best_macs, bool(outer is not None and trips)


def estimate_model(model: OnnxModel, plan: Plan | None, preset: TargetPreset, progress=None) -> ModelEstimate:
    """Compile ``model`` under ``plan`` for ``preset`` (deployed) and estimate every kernel."""
    from ..deploy import compile_deployed

    cpu, mattr = mca.mca_cpu(preset), mca.mca_mattr(preset)
    mca.mca_executable()
    reader = _KernelReader()
    with tvm.transform.PassContext(opt_level=3, instruments=[reader]):
        deployed = compile_deployed(model, plan, preset, progress=progress)
    asm = "\n".join(lib.inspect_source("asm") for lib in deployed.executable.mod.imports)
    return estimate_asm(asm, reader.macs, reader.arg_bytes, reader.calls, preset, cpu, mattr, reader.keys)


def estimate_asm(asm: str, macs: Mapping[str, int], arg_bytes: Mapping[str, int], calls: Mapping[str, int],
                 preset: TargetPreset, cpu: str, mattr: str = "",
                 keys: Mapping[str, tuple] | None = None) -> ModelEstimate:
    """Per-kernel estimates from a module's assembly and the kernels' MACs, argument bytes, calls
    and (integer BFP kernels) :func:`~bitq_tvm.kernels.contract.kernel_key`."""
    keys = keys or {}
    triple = preset.triple.split("-")[0]
    clock = mca.CLOCK_GHZ.get(preset.name, 3.0)
    kernels = []
    for name, lines in sorted(mca.split_kernels(asm).items()):
        if not calls.get(name):
            continue  # folded at compile time (weight packing) or never called
        # SplitLayoutRewritePreproc renames a kernel whose weight layout it folds away
        kernel_macs = macs.get(name, macs.get(name.removesuffix("_prepacked"), 0))
        compute, per_iteration, loop_macs, overhead = _compute(lines, preset, kernel_macs, triple, cpu, mattr)
        memory = arg_bytes.get(name, 0) * clock / preset.dram_bandwidth_gbps
        kernels.append(KernelEstimate(name, calls[name], kernel_macs, arg_bytes.get(name, 0), compute, memory,
                                      per_iteration, loop_macs, overhead, keys.get(name)))
    if not kernels:
        raise BitqError(f"no kernels found in the assembly for {preset.name} (not TVM 0.27 output?)")
    return ModelEstimate(preset.name, cpu, tuple(kernels))


def layer_estimates(model: OnnxModel, formats: LayerFormats, estimate: ModelEstimate) -> dict[str, float]:
    """Layer -> estimated cycles of its integer BFP kernel under ``formats`` (layers whose kernel is found).

    A layer's kernel is the one whose ``bitq.kernel`` record computes the layer's GEMM (or
    depthwise conv) in these formats (:func:`~bitq_tvm.kernels.contract.kernel_key`), with or
    without a fused epilogue; cycles per call x the layer's groups. FP32 layers and fallbacks have
    no integer kernel of their own here and are left to the DM model.
    """
    if formats.weight is None or formats.activation is None:
        return {}
    by_key: dict[tuple, float] = {}
    for k in estimate.kernels:
        if k.key is not None:
            by_key[k.key] = min(k.cycles, by_key.get(k.key, float("inf")))
    out = {}
    a, w = formats.activation, formats.weight
    for layer in model.layers:
        try:
            g = kernel_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape,
                                a.block_size, layer.groups)
        except BitqError:
            continue
        cycles = by_key.get(kernel_key(g, a.name, w.name))
        if cycles is not None:
            out[layer.name] = cycles * getattr(g, "groups", 1)
    return out


def candidate_estimates(model: OnnxModel, candidates: Mapping[str, tuple[LayerFormats, ...]], preset: TargetPreset,
                        progress=None) -> dict[tuple[str, str], float]:
    """``{(layer, label): seconds}`` llvm-mca estimates of every integer BFP candidate, for the planner.

    One deployed compile per distinct candidate format pair (every layer in that pair); cycles
    to seconds at the preset's nominal clock (:data:`~bitq_tvm.targets.mca.CLOCK_GHZ`). Layers
    whose candidate has no integer kernel (FP32, fallbacks) get no entry: the DM model prices them.
    """
    clock_hz = mca.CLOCK_GHZ.get(preset.name, 3.0) * 1e9
    pairs = {c.label: c for cands in candidates.values() for c in cands
             if c.weight is not None and c.activation is not None}
    out = {}
    for label, formats in sorted(pairs.items()):
        if progress:
            progress(f"llvm-mca estimate of {label} on {preset.name} ({mca.mca_cpu(preset)})")
        estimate = estimate_model(model, Plan(default=LayerFormats(formats.weight, formats.activation)), preset)
        for layer, cycles in layer_estimates(model, formats, estimate).items():
            if any(c.label == label for c in candidates.get(layer, ())):
                out[(layer, label)] = cycles / clock_hz
    return out
