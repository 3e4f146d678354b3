"""Candidates priced as deployed: the deployment pass's own rule decides how a candidate runs.

For every (layer, candidate) :func:`deployed_cost` asks
:func:`bitq_tvm.kernels.contract.integer_support` (the rule ``LowerBFPInteger`` applies,
not a copy of it) whether the layer becomes an integer kernel, and gives what it really costs:

* integer: the packed weight bytes the pass stores (outputs padded to 16 lanes, K padded to whole
  blocks, 4-bit mantissa pairs or one byte per mantissa, one int8 exponent per block) and the
  activation the kernel reads (int8 mantissas + one int8 exponent per block, channels padded);
* float simulation fallback (padding ratio, block size outside the kernel's range, depthwise convs
  with several outputs per channel):
  the weight is stored as FP32 and both tensors move as FP32, so it costs what an FP32 layer costs.

:func:`deployable_candidates` keeps, per layer, the candidates that deploy as integer kernels; a
layer with none (e.g. a 3-channel stem conv) takes FP32, which costs the same as its fallbacks and
loses nothing. A pinned layer keeps its pin and is priced at its fallback cost.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from ..frontend.onnx_model import Layer, OnnxModel
from ..kernels.contract import (DEFAULT_MAX_PADDING_RATIO, DepthwiseGeometry, integer_support, integer_weight_bytes,
                                kernel_geometry)
from ..plan import FP32, LayerFormats

FP32_BITS = 32.0


@dataclasses.dataclass(frozen=True)
class DeployedCost:
    """How one candidate of one layer is deployed and what it stores and moves."""

    mode: str  # "integer", "simulation" (float fallback) or "fp32"
    reason: str
    weight_bytes: int
    weight_bits: float  # stored bits per real weight element (padding and exponents included)
    activation_bits: float  # bits per real input element the kernel reads

    @property
    def integer(self) -> bool:
        return self.mode == "integer"


def deployed_cost(layer: Layer, candidate: LayerFormats,
                  max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> DeployedCost:
    """The deployed mode, weight bytes and bits per element of ``layer`` under ``candidate``."""
    fp32_bytes = 4 * layer.params
    if candidate.is_fp32:
        return DeployedCost("fp32", "", fp32_bytes, FP32_BITS, FP32_BITS)
    reason = integer_support(layer.kind, layer.weight_shape, layer.groups, candidate.weight, candidate.activation,
                             max_padding_ratio)
    if reason is not None:
        return DeployedCost("simulation", reason, fp32_bytes, FP32_BITS, FP32_BITS)
    fmt = candidate.activation
    geometry = kernel_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, fmt.block_size,
                               layer.groups)
    nbytes = integer_weight_bytes(geometry, candidate.weight)
    if isinstance(geometry, DepthwiseGeometry):  # int8 mantissa + int8 exponent per value
        act_bits = 8.0 + fmt.exponent_bits
    else:  # int8 mantissas and int8 exponents, the reduction (each group's channels) padded to whole blocks
        act_bits = (8.0 + fmt.exponent_bits / fmt.block_size) * geometry.k_padded / geometry.k
    return DeployedCost("integer", "", nbytes, 8.0 * nbytes / layer.params, act_bits)


def deployable_candidates(model: OnnxModel, table: Mapping[str, tuple[LayerFormats, ...]], pinned=(),
                          max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO):
    """Per layer, the candidates deployment runs as integer kernels (see the module docstring).

    Returns
    -------
    table : dict
        Layer name -> candidates.
    notes : dict
        Layer name -> why candidates were dropped (the pass's reason for the first one dropped).
    """
    out, notes = {}, {}
    for layer in model.layers:
        cands = table[layer.name]
        costs = [deployed_cost(layer, c, max_padding_ratio) for c in cands]
        keep = tuple(c for c, cost in zip(cands, costs) if cost.mode != "simulation")
        dropped = [cost.reason for cost in costs if cost.mode == "simulation"]
        if layer.name in pinned or not dropped:
            out[layer.name] = cands
        else:
            out[layer.name] = keep or (FP32,)
            notes[layer.name] = (f"{len(dropped)}/{len(cands)} candidates run as float simulation when deployed "
                                 f"({dropped[0]})" + ("" if keep else ": FP32"))
    return out, notes
