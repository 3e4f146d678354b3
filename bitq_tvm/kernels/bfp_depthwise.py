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
channels (16 per vector). Parallel tasks are a channel group x a band of output rows, shaped for
the least re-dequantization (:func:`_task_shape`); each task dequantizes the input it reads once,
at its start, into cache; per output row, a channel vector's KH*KW weights stay in registers
while 8 unrolled pixels share their input loads.

With an :class:`~bitq_tvm.kernels.bfp_matmul.Epilogue`, the output is quantized in the kernel to
the next layer's format (blocks along channels), exactly as for the integer matmul: per output
row of a task the conv, then per output pixel the epilogue in registers.

Measured on MobileNetV2's depthwise shapes (``bench/bench_depthwise.py``, ``docs/benchmarks.md``;
AMD znver5, AVX-512, 2 threads, one run): with the quantizing epilogue 0.39x-1.11x of the FP32
layer's time; without it 0.26x-2.22x: the per-value activation scales are a scalar stage (a
vectorised ``power_of_two`` does not legalize for RVV), which the large early layers pay.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import te, tirx

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .bfp_conv import ConvGeometry
from .bfp_matmul import TREE_LANES, Epilogue, block_max_tree, has_block, quantized_outputs, vectorize_rfactor
from .contract import DEPTHWISE_CHANNEL_LANES, depthwise_problem, depthwise_weight_blocks, padded
from .float_bits import power_of_two, zero_unless

__all__ = ["bfp_depthwise_func", "pack_depthwise_weights"]

# Channels per vector (at most): one AVX-512 register of float32; LLVM splits it for AVX2, NEON and
# RVV. The contract's DEPTHWISE_CHANNEL_LANES (8) divides every depthwise conv's channels.
_MAX_LANES = 16
# Output pixels of one step of the conv's unrolled inner loop (at most; a divisor of the row)
_PIXELS_PER_STEP = 8
# Parallel tasks: at least this many (a few threads share them evenly), each dequantizing at most
# this many bytes of input (float32; well inside a 1 MB L2)
_MIN_TASKS = 8
_TASK_INPUT_BYTES = 384 * 1024


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
    (rows = output pixels, NHWC). Parallel over tasks of (channel group, band of output rows),
    vectorized over channels, the KH*KW offsets and up to 8 output pixels unrolled.
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
    # Scales as stages of their own, scalar: a vectorized power_of_two (reinterpret of an int32
    # Select) does not legalize for RVV. The activations' are computed per input row inside each
    # task, before its values (_dequantize_per_task).
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
        # clamped indices keep the loads in bounds, the padding is masked to a zero mantissa
        # (zero_unless: an AND, not a Select, which would lose the clamps; if_then_else does not
        # vectorise for RVV, scalable lanes mismatch)
        iy_c = tirx.max(tirx.min(iy, geom.height - 1), 0)
        ix_c = tirx.max(tirx.min(ix, geom.width - 1), 0)
        q = zero_unless(inside, qa[n, iy_c, ix_c, ch])
        return q.astype("float32") * a_scale[n, iy_c, ix_c, ch]

    a_value = te.compute(padded_shape, dequantized, name="a_value")
    r = te.reduce_axis((0, kh * kw), name="r")

    def term(m, ch, offset):
        n, y, x = m // (oh * ow), m // ow % oh, m % ow
        iy = y * geom.strides[0] + offset // kw * geom.dilation[0]
        ix = x * geom.strides[1] + offset % kw * geom.dilation[1]
        return a_value[n, iy, ix, ch] * w_value[offset, ch]

    # one scale per value and per channel: any lane count dividing the channels keeps vectors whole
    lanes = _MAX_LANES if c % _MAX_LANES == 0 else DEPTHWISE_CHANNEL_LANES
    width = padded(c, lanes)
    if epilogue is None and width == c:
        # the conv writes C itself: no float32 intermediate of the whole output
        tensors = [qa, ea, qw, ew, te.compute((rows, c), lambda m, ch: te.sum(term(m, ch, r), axis=r), name="C")]
    else:
        acc = te.compute((rows, width), lambda m, ch: te.sum(term(m, ch, r), axis=r), name="acc")
        if epilogue is not None:
            extra, q_out, e_out = quantized_outputs(acc, rows, c, epilogue)
            tensors = [qa, ea, qw, ew, *extra, q_out, e_out]
        else:
            tensors = [qa, ea, qw, ew, te.compute((rows, c), lambda m, ch: acc[m, ch], name="C")]
    sch = tvm.s_tir.Schedule(te.create_prim_func(tensors).with_attr("global_symbol", "bfp_depthwise"))
    _schedule(sch, geom, lanes, epilogue.out_fmt.block_size if epilogue is not None else None)
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _schedule(sch, geom: ConvGeometry, lanes: int, out_block: int | None) -> None:
    w_value = sch.get_sblock("w_value")  # KH*KW x Cp values: not worth a parallel launch
    sch.vectorize(sch.split(sch.get_loops(w_value)[-1], [None, lanes])[-1])
    if out_block is not None:
        _schedule_fused(sch, geom, lanes, out_block)
        return
    separate_outputs = has_block(sch, "acc")  # (decompose_reduction renames the block)
    conv = sch.get_sblock("acc" if separate_outputs else "C")
    m, ch, _ = sch.get_loops(conv)
    # a ragged acc [.., padded(c, lanes)] is copied to C [.., c] per row: no channel split
    task, row = _tasks(sch, geom, m, ch, lanes, split_channels=not separate_outputs)
    _schedule_row(sch, conv, lanes)
    _dequantize_per_task(sch, task, lanes, geom.padding[1], geom.width)
    if separate_outputs:
        out = sch.get_sblock("C")
        sch.reverse_compute_at(out, row)
        _vectorize_last(sch, out, lanes)


def _tasks(sch, geom: ConvGeometry, pixels, columns, unit: int, split_channels: bool):
    """Split the output (pixel, column) loops of the stage that drives the conv into parallel
    tasks of (a group of channels, a band of output rows); returns (task, row) loops, the row
    loop directly over (pixel in row, column in group).

    The input a task reads is dequantized at its start (:func:`_dequantize_per_task`), so the
    bands should be tall: per output row, each input row was dequantized KH times at stride 1,
    and a whole-input dequantized copy (1.7-2.1 MB on MobileNetV2's early layers) left the caches
    before the conv read it back. Channel groups make up the task count where the rows are few
    (14x14 and 7x7 layers)."""
    rows_per_task, group = _task_shape(geom, int(sch.get(columns).extent), unit, split_channels)
    row, x = sch.split(pixels, [None, geom.out_width])
    loops = []
    if group < int(sch.get(columns).extent):
        channel_group, columns = sch.split(columns, [None, group])
        sch.reorder(channel_group, row, x, columns)
        loops.append(channel_group)
    band, row = sch.split(row, [None, rows_per_task])
    loops.append(band)
    task = sch.fuse(*loops) if len(loops) > 1 else band
    sch.parallel(task)
    return task, row


def _task_shape(geom: ConvGeometry, width: int, unit: int, split_channels: bool) -> tuple[int, int]:
    """(output rows, channels) of one task: the least dequantization work (input rows read per
    output row) over at least _MIN_TASKS tasks (an even count preferred: two cores) whose
    dequantized input fits _TASK_INPUT_BYTES; the smallest tasks when none qualifies."""
    _, left, _, right = geom.padding
    padded_width = geom.width + left + right
    stride, span = geom.strides[0], (geom.kernel[0] - 1) * geom.dilation[0] + 1
    groups = [g for g in range(unit, width + 1, unit) if width % g == 0] if split_channels else [width]
    best, best_key = (1, groups[0]), None
    for rows in (d for d in range(1, geom.out_height + 1) if geom.out_height % d == 0):
        in_rows = (rows - 1) * stride + span
        for group in groups:
            tasks = width // group * geom.batch * geom.out_height // rows
            if tasks < _MIN_TASKS or in_rows * padded_width * group * 4 > _TASK_INPUT_BYTES:
                continue
            key = (in_rows / rows, tasks % 2, -group)
            if best_key is None or key < best_key:
                best, best_key = (rows, group), key
    return best


def _dequantize_per_task(sch, task, lanes: int, left: int, width: int) -> None:
    """The input a task reads dequantized at its start (once the conv is under ``task``), its
    pixel loop partitioned at the left and right padding: inside, the simplifier drops the
    column's bounds test and clamps (with them, 25 instructions per 16-channel vector)."""
    a_value = sch.get_sblock("a_value")
    sch.compute_at(a_value, task)
    # the block scales of an input row before its values, scalar (a vectorised power_of_two does
    # not legalize for RVV): no parallel pass of its own (a launch, and a round trip to memory)
    sch.compute_at(sch.get_sblock("a_scale"), sch.get_loops(a_value)[-3])
    x = sch.get_loops(a_value)[-2]  # over the padded columns the task reads, from 0
    extent = int(sch.get(x).extent)
    inside = min(width, extent - left)
    factors = ([left] if left else []) + ([inside] if left + inside < extent else [])
    blocks = [a_value]
    if factors:
        blocks = [b for part in sch.loop_partition(x, factors) for b in sch.get_child_blocks(part)]
    for block in blocks:
        _vectorize_last(sch, block, lanes)


def _schedule_row(sch, conv, lanes: int) -> None:
    """The conv's loops in one output row task, (pixel, channel, offset) -> (channel vector,
    pixel step, pixel, offset, lane): a channel vector's KH*KW weights stay in registers over the
    row (per pixel, all channels' weights do not fit and were reloaded from the stack), and the
    unrolled pixels of a step are independent FMA chains that share their input loads (at
    stride 1 neighbouring pixels read the same input vectors)."""
    x, ch, r = sch.get_loops(conv)[-3:]
    width = int(sch.get(x).extent)
    step = max(d for d in range(1, _PIXELS_PER_STEP + 1) if width % d == 0)
    x_outer, x_inner = sch.split(x, [None, step])
    c_outer, c_lane = sch.split(ch, [None, lanes])
    sch.reorder(c_outer, x_outer, x_inner, r, c_lane)
    sch.unroll(x_inner)
    sch.unroll(r)
    sch.vectorize(c_lane)  # before decompose_reduction: vectorize needs the block with its init
    init = sch.decompose_reduction(conv, r)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_fused(sch, geom: ConvGeometry, lanes: int, out_block: int) -> None:
    """The conv per output row of a task (its channel group, into a row buffer), then per output
    pixel (and group of output blocks) the epilogue's values, block exponents and mantissas, in
    registers. The epilogue's value ``y`` drives the loops: the conv goes under its row loop by
    compute_at (which also places the clamped column read of padded output columns, a region
    reverse_compute_at cannot invert), the exponents and mantissas after it. Padded output
    columns keep the channels in one group (a group loop would keep the clamp in every
    group's loads)."""
    tree = block_max_tree(sch, min(lanes, TREE_LANES))  # rfactor only applies before the stages are placed
    y = sch.get_sblock("y")
    channels = geom.channels
    i, col = sch.get_loops(y)
    ragged = int(sch.get(col).extent) > channels
    task, row = _tasks(sch, geom, i, col, math.lcm(out_block, lanes), split_channels=not ragged)
    x, col = sch.get_loops(y)[-2:]
    anchor = x
    group = _channel_group(int(sch.get(col).extent), out_block)
    if group < int(sch.get(col).extent):
        anchor, col = sch.split(col, [None, group])
    sch.compute_at(sch.get_sblock("acc"), row)  # the conv's row, then the epilogue per pixel
    depth = next(k for k, loop in enumerate(sch.get_loops(y)) if sch.get(loop).same_as(sch.get(anchor))) + 1
    for stage in [*tree, *(sch.get_sblock(name) for name in ("exponent_field", "E", "Q"))]:
        sch.reverse_compute_at(stage, anchor)
    _vectorize_last(sch, sch.get_sblock("Q"), lanes)
    if ragged and anchor == x:
        # padded output columns read the clamped last channel: in one loop, the min() in the index
        # makes every vector a gather of 16 scalar loads; partitioned, the real columns load
        # contiguously and the padded ones (a loop from c, left to LLVM) store one value
        real = sch.loop_partition(col, [channels])[0]
        _vectorize_last(sch, sch.get_child_blocks(real)[0], lanes)
    else:
        _vectorize_last(sch, y, lanes)
    for stage in tree:
        vectorize_rfactor(sch, stage, depth)
    acc = sch.get_sblock("acc")
    if geom.out_width == 1:
        # compute_at leaves no loop over a row of one pixel; _schedule_row tiles (pixel, channel, offset)
        sch.add_unit_loop(sch.get_loops(acc)[-2])
    _schedule_row(sch, acc, lanes)
    _dequantize_per_task(sch, task, lanes, geom.padding[1], geom.width)


def _channel_group(width: int, out_block: int) -> int:
    """Output columns per step of the fused epilogue: whole output blocks whose float32 values
    (``acc`` and ``y``, one step's worth each) stay under TVM's 1024-byte stack allocation limit;
    above it every step would call TVMBackendAllocWorkspace (measured 2-3x slower at 384-576
    channels)."""
    blocks = width // out_block
    fits = [k for k in range(1, blocks + 1) if blocks % k == 0 and k * out_block * 4 < 1024]
    return max(fits) * out_block if fits else width


def _vectorize_last(sch, block, lanes: int) -> None:
    """The block's innermost loop vectorized by the largest power of two <= lanes dividing it."""
    col = sch.get_loops(block)[-1]
    width = math.gcd(lanes, int(sch.get(col).extent))
    if width > 1:
        sch.vectorize(sch.split(col, [None, width])[-1])
