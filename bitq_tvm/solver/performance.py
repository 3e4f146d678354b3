"""The performance term: per layer and candidate, the DM model's cost, or a measured latency.

How each candidate is priced (:func:`performance_term`, ``deployed=True``): as deployment runs it,
by the rule deployment applies (:func:`bitq_tvm.kernels.contract.integer_support`):

* integer kernels: :func:`~bitq_tvm.solver.dm_model.kernel_layer_costs`, the bytes the kernels
  move (activation quantizer, im2col, the matmul on the stored weights, the conv epilogue) and
  their compute;
* float simulation (padding ratio, block sizes the kernel cannot take, ...): the FP32
  layer (:func:`~bitq_tvm.solver.dm_model.layer_costs` at 32 bits, float32 MACs) plus the
  run-time fake-quant of its input (:func:`~bitq_tvm.solver.dm_model.fake_quant_stage`);
* FP32 candidates: the FP32 layer.

``deployed=False`` is BitQ's nominal model: the generic loop nest at ``m + E / B`` bits.

Cost mapping from a :class:`~bitq_tvm.targets.presets.TargetPreset` (:func:`memory_hierarchy`,
:func:`kernel_rates`), in cycles of one core:

* levels: the preset's caches, L1 first, at their full size (one core runs a layer; a shared L3 is
  all its own); a level no larger than the one inside it adds no capacity and is dropped;
* cost per byte filled into a level: the preset's ``relative_cost`` of the level it comes from,
  read as cycles per 64-byte line (L1 1 : L2 3 : L3 10); the outermost level is filled from DRAM
  at ``dram_bandwidth_gbps`` and a nominal 3 GHz clock;
* compute: ``int8_macs_per_cycle`` for the integer MACs, two vector instructions per cycle for the
  kernels' other vector work, ``vector_bits / 16`` float32 MACs per cycle (two FMA pipes).

``total`` (estimated cycles) is the performance cost the optimiser trades. Measured latencies
(seconds, e.g. from tuning) override it where given: the model's costs are then converted to
seconds by the least-squares factor fitted on the measured points, so measured and modelled
candidates share one unit.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from onnx import helper

from ..errors import BitqError
from ..frontend.onnx_model import Layer, OnnxModel
from ..plan import LayerFormats
from ..targets.presets import TargetPreset
from .dm_model import (CacheLevel, ConvShape, KernelRates, LayerCost, MemoryHierarchy, StageCost,
                       bits_per_element, fake_quant_stage, kernel_layer_costs, layer_costs)

MODEL_UNIT = "DM cycles"
LINE_BYTES = 64
NOMINAL_CLOCK_GHZ = 3.0
VECTOR_OPS_PER_CYCLE = 2.0
SECONDS_UNIT = "seconds"
Measured = Mapping[tuple[str, str], float] | Callable[[str, str], float | None]


def memory_hierarchy(preset: TargetPreset) -> MemoryHierarchy:
    """The DM model's hierarchy for ``preset`` (see the module docstring for the mapping)."""
    caches = []
    for cache in preset.caches:
        if not caches or cache.size_bytes > caches[-1].size_bytes:
            caches.append(cache)
    levels = [CacheLevel(inner.name, inner.size_bytes, outer.relative_cost / LINE_BYTES)
              for inner, outer in zip(caches, caches[1:])]
    levels.append(CacheLevel(caches[-1].name, caches[-1].size_bytes, 0.0))  # filled from DRAM
    return MemoryHierarchy(tuple(levels), dram_cost_per_byte=NOMINAL_CLOCK_GHZ / preset.dram_bandwidth_gbps)


def kernel_rates(preset: TargetPreset) -> KernelRates:
    """The kernel model's throughputs for ``preset`` (module docstring)."""
    from ..kernels.bfp_matmul_variants import kernel_variant
    from ..kernels.bfp_matmul_x86 import NIBBLE_REGISTER_VARIANTS

    return KernelRates(float(preset.int8_macs_per_cycle), preset.vector_bits // 8, VECTOR_OPS_PER_CYCLE,
                       unsigned_weights=preset.has_intrinsic("vnni"),
                       register_tile="x86" if preset.triple.startswith("x86_64") else "lane_major",
                       nibbles_in_registers=kernel_variant(preset.tvm_target()) in NIBBLE_REGISTER_VARIANTS)


def fp32_macs_per_cycle(preset: TargetPreset) -> float:
    """Float32 MACs per cycle: two FMA pipes of ``vector_bits / 32`` lanes."""
    return preset.vector_bits / 16


def deployed_layer_costs(layer: Layer, shape: ConvShape, candidates, preset: TargetPreset,
                         hierarchy: MemoryHierarchy | None = None) -> list[LayerCost]:
    """Per candidate of ``layer``, its cost as deployed (module docstring)."""
    from .deployment import deployed_cost

    hierarchy = memory_hierarchy(preset) if hierarchy is None else hierarchy
    rates = kernel_rates(preset)
    modes = [deployed_cost(layer, c).mode for c in candidates]
    out: list[LayerCost | None] = [None] * len(candidates)
    integer = [i for i, mode in enumerate(modes) if mode == "integer"]
    if integer:
        pairs = [(candidates[i].weight, candidates[i].activation) for i in integer]
        for i, cost in zip(integer, kernel_layer_costs(layer.kind, layer.input_shape, layer.weight_shape,
                                                       layer.output_shape, layer.groups, pairs, hierarchy, rates)):
            out[i] = cost
    if len(integer) < len(candidates):
        fp32 = layer_costs(shape, [32.0], [32.0], [None], hierarchy, macs_per_cycle=fp32_macs_per_cycle(preset),
                           cycle_cost=1.0)[0]
        fp32_stage = StageCost("fp32", fp32.level_bytes, fp32.compute_cycles, fp32.total)
        fake = fake_quant_stage(int(np.prod(layer.input_shape)), hierarchy, rates)
        simulated = dataclasses.replace(
            fp32, dram_bytes=fp32.dram_bytes + fake.level_bytes[-1],
            onchip_bytes=fp32.onchip_bytes + sum(fake.level_bytes[:-1]),
            energy=fp32.energy + fake.total - fake.compute_cycles,
            compute_cycles=fp32.compute_cycles + fake.compute_cycles, total=fp32.total + fake.total,
            level_bytes=tuple(a + b for a, b in zip(fp32.level_bytes, fake.level_bytes)),
            stages=(fp32_stage, fake))
        fp32 = dataclasses.replace(fp32, stages=(fp32_stage,))
        for i, mode in enumerate(modes):
            if mode != "integer":
                out[i] = simulated if mode == "simulation" else fp32
    return out


def conv_shape(model: OnnxModel, layer: Layer) -> ConvShape:
    """The DM loop nest of ``layer``: conv attributes from its ONNX node, a matmul as a 1x1 conv."""
    if layer.kind == "matmul":
        rows = int(np.prod(layer.input_shape[:-1]))
        return ConvShape.dense(rows, layer.reduction, int(layer.output_shape[-1]))
    node = next(n for n in model.proto.graph.node if n.op_type == "Conv" and n.input[1] == layer.weight)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out_c, in_c, kh, kw = layer.weight_shape
    return ConvShape(batch=layer.output_shape[0], out_channels=out_c, in_channels=in_c, kernel_h=kh, kernel_w=kw,
                     out_h=layer.output_shape[2], out_w=layer.output_shape[3],
                     stride=tuple(attrs.get("strides", (1, 1))), dilation=tuple(attrs.get("dilations", (1, 1))),
                     groups=layer.groups)


@dataclasses.dataclass(frozen=True, eq=False)
class PerformanceTerm:
    """Per (layer, candidate label): the DM model's :class:`LayerCost` and the cost the optimiser uses.

    ``cost[layer][label]`` is in ``unit``: DM cycles, or seconds when measured latencies were
    given (measured values verbatim, the rest the model scaled by ``seconds_per_unit``).
    """

    model_costs: Mapping[str, Mapping[str, LayerCost]]
    cost: Mapping[str, Mapping[str, float]]
    measured: Mapping[tuple[str, str], float]
    unit: str = MODEL_UNIT
    seconds_per_unit: float | None = None
    estimated: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def source(self, layer: str, label: str) -> str:
        """Where ``cost[layer][label]`` comes from: ``measured``, ``llvm-mca estimate`` or ``DM model``."""
        if (layer, label) in self.measured:
            return "measured"
        return "llvm-mca estimate" if (layer, label) in self.estimated else "DM model"


def performance_term(model: OnnxModel, preset: TargetPreset, candidates: Mapping[str, tuple[LayerFormats, ...]],
                     measured: Measured | None = None, deployed: bool = True,
                     estimated: Mapping[tuple[str, str], float] | None = None) -> PerformanceTerm:
    """DM costs of every layer's candidates on ``preset``, overridden by ``measured`` latencies.

    Parameters
    ----------
    model : OnnxModel
    preset : TargetPreset
    candidates : mapping
        Layer name -> its candidates.
    measured : mapping or callable, optional
        ``{(layer, label): seconds}`` or ``f(layer, label) -> seconds or None``.
    deployed : bool
        Price candidates as deployment runs them (module docstring: the kernels' bytes, float
        fallbacks at FP32 + fake-quant), else BitQ's nominal ``m + E / B`` loop nest.
    estimated : mapping, optional
        ``{(layer, label): seconds}`` of a static model (llvm-mca, :mod:`.mca_cost`): used like
        measured latencies where no measurement exists, but labelled ``llvm-mca estimate``.
    """
    hierarchy = memory_hierarchy(preset)
    model_costs = {}
    for layer in model.layers:
        cands = tuple(candidates[layer.name])
        if deployed:
            costs = deployed_layer_costs(layer, conv_shape(model, layer), cands, preset, hierarchy)
        else:
            w_bits, a_bits = [bits_per_element(c.weight) for c in cands], [bits_per_element(c.activation) for c in cands]
            blocks = [c.block_size for c in cands]
            costs = layer_costs(conv_shape(model, layer), w_bits, a_bits, blocks, hierarchy,
                                macs_per_cycle=float(preset.int8_macs_per_cycle), cycle_cost=1.0)
        model_costs[layer.name] = MappingProxyType({c.label: cost for c, cost in zip(cands, costs)})
    found = {}
    for layer in model.layers:
        for c in candidates[layer.name]:
            seconds = (measured.get((layer.name, c.label)) if isinstance(measured, Mapping)
                       else measured(layer.name, c.label) if measured is not None else None)
            if seconds is not None:
                if not np.isfinite(seconds) or seconds <= 0:
                    raise BitqError(f"measured latency of layer '{layer.name}' candidate {c.label} must be a "
                                    f"positive number of seconds, got {seconds!r}")
                found[(layer.name, c.label)] = float(seconds)
    if isinstance(measured, Mapping):
        unknown = [k for k in measured if k not in found]
        if unknown:
            raise BitqError(f"measured latency for {unknown[0]} names no (layer, candidate) of the problem")
    estimates = {key: float(v) for key, v in (estimated or {}).items() if key not in found}
    known = {(layer.name, c.label) for layer in model.layers for c in candidates[layer.name]}
    if set(estimates) - known:
        raise BitqError(f"llvm-mca estimate for {sorted(set(estimates) - known)[0]} names no (layer, candidate)")
    if not found and not estimates:
        cost = {name: {label: c.total for label, c in table.items()} for name, table in model_costs.items()}
        return PerformanceTerm(MappingProxyType(model_costs), MappingProxyType(cost), MappingProxyType({}))
    given = {**estimates, **found}  # a measurement wins over an estimate
    model_values = np.array([model_costs[name][label].total for name, label in given])
    seconds = np.array(list(given.values()))
    scale = float(model_values @ seconds / (model_values @ model_values))  # least squares through 0
    cost = {name: {label: given.get((name, label), c.total * scale) for label, c in table.items()}
            for name, table in model_costs.items()}
    return PerformanceTerm(MappingProxyType(model_costs), MappingProxyType(cost), MappingProxyType(found),
                           SECONDS_UNIT, scale, MappingProxyType(estimates))
