"""Depthwise conv2d on BFP operands: mantissas and exponents in, the conv's float32 (or the next
layer's BFP) out.

Numeric form (the contract's: :mod:`.contract` ``depthwise_activation_format`` and
``depthwise_weight_blocks``; ``docs/design.md`` "Depthwise convs"): a depthwise conv has one input
channel per group, so a block along the reduction would hold one value. In NHWC:

- activations ``qa [N, H, W, C]``, ``ea [N, H, W, C]``: an m-bit mantissa and an exponent per
  value (blocks of one: what a producing layer's fused epilogue writes at B = 1, and what the
  quantizer gives along axis 1 of NCHW). Blocks of B channels of a pixel flush the small
  channels: the layout detector's output drifted 0.78 (relative) from FP32, against 0.14;
- weights ``qw [KH*KW, C]``, ``ew [C]``: each channel's KH*KW window is one block, one exponent
  per channel (:func:`pack_depthwise_weights`). Blocks of B channels at each kernel offset lose
  the small channels of a folded BatchNorm: the orientation classifier's top-1 fell to 84.4% at
  bfp8 (99.2% per channel), though their SQNR looked better.

Every term ``(qa * 2**(ea-(ma-2))) * (qw * 2**(ew-(mw-2)))`` is exact in float32 (two exact
dequantized values with 8-bit mantissas: a 16-bit product times a power of two), so the kernel
equals a float convolution of the dequantized operands up to the float32 sum over the KH*KW
offsets (:func:`.oracle.bfp_depthwise_tolerance`). The products run in float32 FMA lanes over the
channels, the input rows of each output row dequantized once per task. Reading 1 byte (+ 1/B
exponent byte) per activation instead of 4 does not make it faster than the FP32 layer at stride 1
yet (``bench/bench_depthwise.py``, ``docs/benchmarks.md``).

With an :class:`~bitq_tvm.kernels.bfp_matmul.Epilogue`, the output is quantized in the kernel to
the next layer's format (blocks along channels), exactly as for the integer matmul.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .bfp_conv import ConvGeometry
from .bfp_matmul import Epilogue, has_block, has_padded_outputs, quantized_outputs
from .contract import DEPTHWISE_CHANNEL_LANES as _CHANNEL_LANES
from .contract import depthwise_problem, depthwise_weight_blocks
from .float_bits import power_of_two

__all__ = ["bfp_depthwise_func", "pack_depthwise_weights"]


def _check(geom: ConvGeometry) -> None:
    if geom.groups != geom.channels:
        raise BitqError(f"bfp_depthwise: a depthwise conv has groups = channels, got groups={geom.groups}, "
                        f"channels={geom.channels}")
    problem = depthwise_problem((geom.out_channels, 1, *geom.kernel), geom.groups)
    if problem is not None:
        raise BitqError(f"bfp_depthwise: {problem}")


def pack_depthwise_weights(weight: np.ndarray, fmt: BFPFormat, name: str | None = None):
    """``(qw [KH*KW, C] int8, ew [C] int8)`` of a depthwise weight ``[C, 1, KH, KW]``: one block
    per channel's window (the NumPy reference quantizer on the contract's ``[C, KH*KW]`` view),
    channels last."""
    if weight.ndim != 4 or weight.shape[1] != 1:
        raise BitqError(f"pack_depthwise_weights: weight {name or ''} of shape {weight.shape} is not [C, 1, KH, KW]")
    view, window = depthwise_weight_blocks(weight.shape, fmt)
    t = quantize_np(weight.reshape(view), window, axis=1, name=name)  # mantissas [C, 1, KH*KW]
    c, offsets = view
    return (np.ascontiguousarray(t.mantissas.reshape(c, offsets).T),
            np.ascontiguousarray(t.exponents.reshape(c)))


def bfp_depthwise_func(geom: ConvGeometry, fmt_a: BFPFormat, fmt_w: BFPFormat,
                       epilogue: Epilogue | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(qa, ea, qw, ew, C)`` (or ``(qa, ea, qw, ew, biases..., tensors..., Q,
    E)`` with an ``epilogue``) of a depthwise conv on BFP operands.

    ``fmt_a``, ``fmt_w``: the layer's planned formats (their m; the blocks are the contract's).
    Shapes: qa, ea int8 [N, H, W, C], qw int8 [KH*KW, C], ew int8 [C]; C float32 [N*OH*OW, C]
    (rows = output pixels, NHWC).
    Parallel over output rows (n, oy), vectorized over channels, the KH*KW offsets unrolled.
    """
    _check(geom)
    c = geom.channels
    kh, kw = geom.kernel
    oh, ow = geom.out_height, geom.out_width
    rows = geom.rows
    qa = te.placeholder((geom.batch, geom.height, geom.width, c), "int8", name="qa")
    ea = te.placeholder((geom.batch, geom.height, geom.width, c), "int8", name="ea")
    qw = te.placeholder((kh * kw, c), "int8", name="qw")
    ew = te.placeholder((c,), "int8", name="ew")
    # Scales as stages of their own (one pass over the exponents): a vectorized power_of_two (reinterpret of an int32 Select) does not legalize for RVV.
    a_scale = te.compute(ea.shape, lambda n, y, x, b: power_of_two(ea[n, y, x, b].astype("int32") - fmt_a.scale_shift),
                         name="a_scale")
    # a weight block is a channel's window: its scale exponent is e - (m - 2) as for any block
    w_scale = te.compute(ew.shape, lambda ch: power_of_two(ew[ch].astype("int32") - fmt_w.scale_shift),
                         name="w_scale")
    w_value = te.compute((kh * kw, c), lambda o, ch: qw[o, ch].astype("float32") * w_scale[ch],
                         name="w_value")
    top, left, bottom, right = geom.padding
    padded_shape = (geom.batch, geom.height + top + bottom, geom.width + left + right, c)

    def dequantized(n, y, x, ch):
        iy, ix = y - top, x - left
        inside = tirx.all(iy >= 0, iy < geom.height, ix >= 0, ix < geom.width)
        # clamped indices keep the masked-out load in bounds; the padding is a zero mantissa
        iy_c = tirx.max(tirx.min(iy, geom.height - 1), 0)
        ix_c = tirx.max(tirx.min(ix, geom.width - 1), 0)
        q = tirx.Select(inside, qa[n, iy_c, ix_c, ch], tirx.const(0, "int8"))
        return q.astype("float32") * a_scale[n, iy_c, ix_c, ch]

    # The input rows one output row reads, dequantized once per task (not once per kernel offset)
    a_value = te.compute(padded_shape, dequantized, name="a_value")
    r = te.reduce_axis((0, kh * kw), name="r")

    def term(m, ch, offset):
        n, y, x = m // (oh * ow), m // ow % oh, m % ow
        iy = y * geom.strides[0] + offset // kw * geom.dilation[0]
        ix = x * geom.strides[1] + offset % kw * geom.dilation[1]
        return a_value[n, iy, ix, ch] * w_value[offset, ch]

    acc = te.compute((rows, c), lambda m, ch: te.sum(term(m, ch, r), axis=r), name="acc")
    if epilogue is not None:
        extra, q_out, e_out = quantized_outputs(acc, rows, c, epilogue)
        tensors = [qa, ea, qw, ew, *extra, q_out, e_out]
    else:
        tensors = [qa, ea, qw, ew, te.compute((rows, c), lambda m, ch: acc[m, ch], name="C")]
    sch = tvm.s_tir.Schedule(te.create_prim_func(tensors).with_attr("global_symbol", "bfp_depthwise"))
    _schedule(sch, ow)
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _schedule(sch, out_width: int) -> None:
    sch.parallel(sch.get_loops(sch.get_sblock("a_scale"))[0])
    w_value = sch.get_sblock("w_value")
    sch.vectorize(sch.split(sch.get_loops(w_value)[-1], [None, _CHANNEL_LANES])[-1])
    acc = sch.get_sblock("acc")
    m, ch, r = sch.get_loops(acc)
    row, x = sch.split(m, [None, out_width])  # one task per output row: ow pixels x all channels
    c_outer, c_lane = sch.split(ch, [None, _CHANNEL_LANES])
    sch.reorder(row, x, c_outer, r, c_lane)
    sch.parallel(row)
    sch.unroll(r)
    sch.vectorize(c_lane)  # before decompose_reduction: vectorize needs the block with its init
    init = sch.decompose_reduction(acc, r)
    sch.vectorize(sch.get_loops(init)[-1])
    a_value = sch.get_sblock("a_value")
    sch.compute_at(a_value, row)
    sch.vectorize(sch.split(sch.get_loops(a_value)[-1], [None, _CHANNEL_LANES])[-1])
    _schedule_outputs(sch, row)


def _schedule_outputs(sch, row) -> None:
    """Output stages (the copy, or a fused epilogue's) per output row, under the conv's row task:
    the row's float32 outputs are still in cache when they are scaled and quantized."""
    names = ("y", "exponent_field", "E", "Q") if has_block(sch, "Q") else ("C",)
    # padded output columns (a masked Q) read a clamped column: not a region reverse_compute_at
    # can place, so those stages run as parallel passes after the conv
    in_row = not has_padded_outputs(sch)
    for name in names:
        stage = sch.get_sblock(name)
        if in_row:
            sch.reverse_compute_at(stage, row)
        else:
            sch.parallel(sch.get_loops(stage)[0])
        if name in ("y", "Q", "C"):
            col = sch.get_loops(stage)[-1]
            if int(sch.get(col).extent) % _CHANNEL_LANES == 0:
                sch.vectorize(sch.split(col, [None, _CHANNEL_LANES])[-1])
