"""The performance term: per layer and candidate, the DM model's cost, or a measured latency.

Cost mapping from a :class:`~bitq_tvm.targets.presets.TargetPreset` to the DM model's
:class:`~bitq_tvm.solver.dm_model.MemoryHierarchy`:

* levels: the preset's caches, L1 first, at their full size (one core runs a layer; a shared L3 is
  all its own); a level no larger than the one inside it adds no capacity and is dropped;
* cost per byte: ``5 * relative_cost`` (L1 = BitQ's on-chip 5 per access) and DRAM
  ``5 * dram_cost`` (128 -> BitQ's 640);
* compute: ``int8_macs_per_cycle`` of the preset, each cycle costing one L1 byte (5), plus the
  per-block fp32 scaling (one multiply-add per block per output, 4 per cycle): smaller blocks
  cost more.

``total`` (energy-like units) is the performance cost the optimiser trades. Measured latencies
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
from .dm_model import (BITQ_ONCHIP_COST_PER_BYTE, CacheLevel, ConvShape, LayerCost, MemoryHierarchy,
                       bits_per_element, layer_costs)

MODEL_UNIT = "DM cost units"
SECONDS_UNIT = "seconds"
Measured = Mapping[tuple[str, str], float] | Callable[[str, str], float | None]


def memory_hierarchy(preset: TargetPreset) -> MemoryHierarchy:
    """The DM model's hierarchy for ``preset`` (see the module docstring for the mapping)."""
    levels = []
    for cache in preset.caches:
        if levels and cache.size_bytes <= levels[-1].size_bytes:
            continue
        levels.append(CacheLevel(cache.name, cache.size_bytes, BITQ_ONCHIP_COST_PER_BYTE * cache.relative_cost))
    return MemoryHierarchy(tuple(levels), dram_cost_per_byte=BITQ_ONCHIP_COST_PER_BYTE * preset.dram_cost)


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

    ``cost[layer][label]`` is in ``unit``: DM cost units, or seconds when measured latencies were
    given (measured values verbatim, the rest the model scaled by ``seconds_per_unit``).
    """

    model_costs: Mapping[str, Mapping[str, LayerCost]]
    cost: Mapping[str, Mapping[str, float]]
    measured: Mapping[tuple[str, str], float]
    unit: str = MODEL_UNIT
    seconds_per_unit: float | None = None


def performance_term(model: OnnxModel, preset: TargetPreset, candidates: Mapping[str, tuple[LayerFormats, ...]],
                     measured: Measured | None = None, deployed: bool = True) -> PerformanceTerm:
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
        Bits per element as deployed (:mod:`.deployment`: packed storage, padding, exponents,
        float fallbacks at FP32), else BitQ's nominal ``m + E / B``.
    """
    from .deployment import deployed_cost

    hierarchy = memory_hierarchy(preset)
    model_costs = {}
    for layer in model.layers:
        cands = candidates[layer.name]
        if deployed:
            deploys = [deployed_cost(layer, c) for c in cands]
            w_bits, a_bits = [d.weight_bits for d in deploys], [d.activation_bits for d in deploys]
            blocks = [c.block_size if d.integer else None for c, d in zip(cands, deploys)]
        else:
            w_bits, a_bits = [bits_per_element(c.weight) for c in cands], [bits_per_element(c.activation) for c in cands]
            blocks = [c.block_size for c in cands]
        costs = layer_costs(conv_shape(model, layer), w_bits, a_bits, blocks,
                            hierarchy, macs_per_cycle=float(preset.int8_macs_per_cycle))
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
    if not found:
        cost = {name: {label: c.total for label, c in table.items()} for name, table in model_costs.items()}
        return PerformanceTerm(MappingProxyType(model_costs), MappingProxyType(cost), MappingProxyType({}))
    model_values = np.array([model_costs[name][label].total for name, label in found])
    seconds = np.array(list(found.values()))
    scale = float(model_values @ seconds / (model_values @ model_values))  # least squares through 0
    cost = {name: {label: found.get((name, label), c.total * scale) for label, c in table.items()}
            for name, table in model_costs.items()}
    return PerformanceTerm(MappingProxyType(model_costs), MappingProxyType(cost), MappingProxyType(found),
                           SECONDS_UNIT, scale)
