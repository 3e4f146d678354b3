"""The NumPy reference simulation of a whole model under a plan.

The oracle for the TVM simulation: the normalised ONNX model runs in ONNX's own reference
evaluator (NumPy), with each planned layer's weight replaced by
:func:`~bitq_tvm.formats.fake_quantize_np` of it and a ``bitq.BFPFakeQuant`` node, computed by the
same NumPy function, in front of its input activation. Blocks follow the reduction axes of
:func:`bitq_tvm.kernels.contract.block_axes`, as in :mod:`bitq_tvm.passes.insert_bfp_simulation`.
A window-blocked conv (:func:`bitq_tvm.kernels.contract.is_window_blocked`, a stem) quantizes
the im2col rows of its input, which no tensor of the graph holds: its Conv node becomes a
``bitq.BFPWindowConv`` (im2col, fake quantization of the rows, matmul by the weight's window view).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ..formats import fake_quantize_np, parse_format
from ..kernels.contract import WINDOW_WEIGHT_AXES, block_axes, depthwise_activation_format, depthwise_weight_blocks
from .onnx_model import LAYER_OPS, Layer, OnnxModel

_DOMAIN = "bitq"


class BFPFakeQuant(OpRun):
    """``bitq.BFPFakeQuant(x; format, axis, groups)`` for the ONNX reference evaluator."""

    op_domain = _DOMAIN

    def _run(self, x, format=None, axis=None, groups=None):  # noqa: A002 - ONNX attribute names
        fmt = parse_format(format.decode() if isinstance(format, bytes) else format)
        return (fake_quantize_np(x, fmt, axis=axis, groups=groups),)


def window_rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The im2col rows of a conv layer's input ``x`` (:func:`window_patches_np`)."""
    return window_patches_np(x, layer.weight_shape[2:], layer.strides, layer.pads, layer.dilations)


def window_patches_np(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """im2col of an NCHW ``x``: ``[N*OH*OW, KH*KW*C]``, each row one output pixel's window in
    (kh, kw, c) order, zero where the window leaves the image (``pads``: top, left, bottom, right)."""
    n, c, h, w = x.shape
    (kh, kw), (sy, sx), (dy, dx) = kernel, strides, dilations
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dy * (kh - 1) - 1) // sy + 1
    ow = (w + pads[1] + pads[3] - dx * (kw - 1) - 1) // sx + 1
    rows = np.empty((n, oh, ow, kh, kw, c), x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dy:i * dy + sy * (oh - 1) + 1:sy, j * dx:j * dx + sx * (ow - 1) + 1:sx]
            rows[:, :, :, i, j, :] = window.transpose(0, 2, 3, 1)
    return rows.reshape(n * oh * ow, kh * kw * c)


def window_weight_rows(w: np.ndarray) -> np.ndarray:
    """A window-blocked conv's OIHW weight as ``[O, KH*KW*C]`` (:data:`WINDOW_WEIGHT_AXES`)."""
    return w.transpose(WINDOW_WEIGHT_AXES).reshape(w.shape[0], -1)


class BFPWindowConv(OpRun):
    """``bitq.BFPWindowConv(x, w[, b]; format, strides, pads, dilations)``: a conv whose input is
    quantized along the im2col rows (a window-blocked conv; ``w`` is already quantized)."""

    op_domain = _DOMAIN

    def _run(self, x, w, b=None, format=None, strides=None, pads=None, dilations=None):  # noqa: A002
        fmt = parse_format(format.decode() if isinstance(format, bytes) else format)
        rows = window_patches_np(x, w.shape[2:], strides, pads, dilations)
        rows = fake_quantize_np(rows, fmt, axis=1)
        out = rows @ window_weight_rows(w).T
        n, o = x.shape[0], w.shape[0]
        oh = (x.shape[2] + pads[0] + pads[2] - dilations[0] * (w.shape[2] - 1) - 1) // strides[0] + 1
        out = out.reshape(n, oh, -1, o).transpose(0, 3, 1, 2)
        if b is not None:
            out = out + b.reshape(1, o, 1, 1)
        return (np.ascontiguousarray(out, dtype=x.dtype),)


def layer_block_axes(layer: Layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((activation axis, groups), (weight axis, groups)) of the layer's ONNX tensors
    (:func:`~bitq_tvm.kernels.contract.block_axes`; Gemm's transB weight is a stored [N, K])."""
    return block_axes(layer.kind, len(layer.input_shape), len(layer.weight_shape), layer.groups, layer.trans_b)


def layer_weight_blocks(layer: Layer, w: np.ndarray, fmt):
    """``(tensor, format, axis)`` to quantize ``layer``'s weight ``w`` with: ``w`` along its block
    axis, a depthwise weight's ``[C, KH*KW]`` view with one block per channel
    (:func:`~bitq_tvm.kernels.contract.depthwise_weight_blocks`), or a window-blocked conv's
    ``[O, KH*KW*C]`` rows (:func:`window_weight_rows`); :func:`weight_from_blocks` undoes the view."""
    if layer.is_window_blocked(fmt.block_size):
        return window_weight_rows(w), fmt, 1
    if layer.is_depthwise:
        view, window = depthwise_weight_blocks(layer.weight_shape, fmt)
        return w.reshape(view), window, 1
    _, (w_axis, _) = layer_block_axes(layer)
    return w, fmt, w_axis


def layer_activation_blocks(layer: Layer, fmt):
    """``(format, axis, groups)`` to quantize ``layer``'s input with. A depthwise conv's blocks hold
    one value (:func:`~bitq_tvm.kernels.contract.depthwise_activation_format`): the same numbers as
    ``fmt`` in groups of one channel, without padding every value to a block of B (32x the work
    and memory: 127 s of the orientation classifier's 139 s plan)."""
    (axis, groups), _ = layer_block_axes(layer)
    if layer.is_depthwise:
        return depthwise_activation_format(fmt), axis, 1
    return fmt, axis, groups


def weight_from_blocks(layer: Layer, view: np.ndarray, fmt) -> np.ndarray:
    """A tensor shaped like :func:`layer_weight_blocks`' view back in the weight's own layout."""
    if layer.is_window_blocked(fmt.block_size):
        o, c, kh, kw = layer.weight_shape
        return np.ascontiguousarray(view.reshape(o, kh, kw, c).transpose(0, 3, 1, 2))
    return view.reshape(layer.weight_shape)


def fake_quantize_weight(layer: Layer, w: np.ndarray, fmt) -> np.ndarray:
    """``layer``'s weight ``w`` through the NumPy reference quantizer in ``fmt`` (its contract blocks)."""
    x, f, axis = layer_weight_blocks(layer, w, fmt)
    return weight_from_blocks(layer, fake_quantize_np(x, f, axis=axis, name=layer.weight), fmt)


def reference_model(model: OnnxModel, formats: dict) -> onnx.ModelProto:
    """The ONNX model with the plan's fake quantization applied (weights) or inserted (activations)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    by_weight = {layer.weight: layer for layer in model.layers}
    inits = []
    for init in graph.initializer:
        layer = by_weight.get(init.name)
        lf = formats.get(layer.name) if layer is not None else None
        if lf is not None and lf.weight is not None:
            init = numpy_helper.from_array(fake_quantize_weight(layer, numpy_helper.to_array(init), lf.weight),
                                           init.name)
        inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = []
    for node in graph.node:
        layer = by_weight.get(node.input[1]) if node.op_type in LAYER_OPS and len(node.input) > 1 else None
        lf = formats.get(layer.name) if layer is not None else None
        if lf is not None and lf.activation is not None and layer.is_window_blocked(lf.activation.block_size):
            nodes.append(helper.make_node("BFPWindowConv", list(node.input), list(node.output), name=node.name,
                                          domain=_DOMAIN, format=lf.activation.name, strides=list(layer.strides),
                                          pads=list(layer.pads), dilations=list(layer.dilations)))
            continue
        if lf is not None and lf.activation is not None:
            (axis, groups), _ = layer_block_axes(layer)
            q_name = f"{node.input[0]}:bfp:{layer.name}"
            nodes.append(helper.make_node("BFPFakeQuant", [node.input[0]], [q_name], domain=_DOMAIN,
                                          format=lf.activation.name, axis=axis, groups=groups))
            node.input[0] = q_name
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    proto.opset_import.append(helper.make_opsetid(_DOMAIN, 1))
    return proto


def run_reference(model: OnnxModel, formats: dict, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the NumPy reference simulation of ``model`` under ``formats`` (layer -> LayerFormats)."""
    evaluator = ReferenceEvaluator(reference_model(model, formats), new_ops=[BFPFakeQuant, BFPWindowConv])
    return [np.asarray(o) for o in evaluator.run(None, inputs)]
