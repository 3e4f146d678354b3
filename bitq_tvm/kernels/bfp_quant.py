"""TensorIR kernel for BFP fake quantization (quantize then dequantize) of one tensor.

The kernel reproduces :func:`bitq_tvm.formats.fake_quantize_np` bit for bit: every step is the same
float32 IEEE operation, the shared exponent is read from the float32 exponent field (exact, no
``log2``), the scale is built from its bit pattern, and stochastic rounding uses the same
counter-based integer hash. It serves activations at run time (Relax ``call_tir``) and weights at
compile time (``FoldConstant`` evaluates the same ``call_tir`` on constants).

NaN/Inf inputs are not detected here (a run-time kernel cannot raise); the NumPy reference rejects
them for weights. In an activation, a block holding one gets e = emax: its finite elements mostly
flush to zero and the NaN/Inf elements come out unspecified.

Rounding uses ``llvm.nearbyint``, one instruction on x86 with SSE4.1 (so give the target an
``mcpu``; the bare x86-64 baseline calls libm per element, about 3x slower) and on AArch64.
"""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx

from ..errors import BitqError
from ..formats import BFPFormat
from .contract import check_block_layout
from .float_bits import (divide_by_power_of_two, exponent_field, power_of_two, round_mantissa, shared_exponent,
                         zero_unless)

__all__ = ["bfp_fake_quant_name", "bfp_fake_quant_func"]

# Most elements of the last dim handled per parallel task when the blocks are strided (axis not
# last): enough for several AVX-512 vectors, small enough that the task's exponents stay in L1.
_MAX_CHUNK = 256


def bfp_fake_quant_name(fmt: BFPFormat, axis: int, groups: int) -> str:
    """Deterministic PrimFunc name for a (format, axis, groups) fake-quant kernel.

    Examples
    --------
    >>> bfp_fake_quant_name(PRESETS["bfp8_b32"], 1, 1)
    'bfp_fq_bfp8_b32_a1_g1'
    """
    axis_tag = f"m{-axis}" if axis < 0 else str(axis)
    return f"bfp_fq_{fmt.name}_a{axis_tag}_g{groups}"


def _validate(shape: tuple[int, ...], axis: int, groups: int, dtype: str) -> int:
    """Check the arguments; return ``axis`` made non-negative."""
    if dtype != "float32":
        raise BitqError(f"bfp_fake_quant_func: dtype {dtype!r} is not supported (only float32)")
    return check_block_layout(shape, axis, groups, "bfp_fake_quant_func")


def _block_extent(shape: tuple[int, ...], fmt: BFPFormat, axis: int, groups: int) -> int:
    # a block longer than its segment is the whole segment plus zero padding, which never raises
    # the block maximum: iterate over the segment only
    return min(fmt.block_size, shape[axis] // groups)


def _build(shape: tuple[int, ...], fmt: BFPFormat, axis: int, groups: int) -> tirx.PrimFunc:
    block = _block_extent(shape, fmt, axis, groups)
    segment = shape[axis] // groups
    num_blocks = -(-segment // block)
    before, after = shape[:axis], shape[axis + 1 :]
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]

    x = te.placeholder(shape, "float32", name="X")
    within = te.reduce_axis((0, block), name="j")

    def biased_exponent(*index):
        # max |x| has the largest exponent field; padding contributes 0 (the field of zero), and a
        # subnormal or zero maximum gives field 0 -> e = -127, which the clamp maps to emin like
        # the exact floor(log2) would.
        g, b = index[axis], index[axis + 1]
        pos = b * block + within
        ragged = segment % block != 0
        # a padding position reads the segment's last element (in bounds) and is masked out
        channel = g * segment + (tirx.min(pos, segment - 1) if ragged else pos)
        field = exponent_field(x[index[:axis] + (channel,) + index[axis + 2 :]])
        if ragged:
            field = zero_unless(pos < segment, field)
        return te.max(field, axis=within)

    block_field = te.compute(
        before + (groups, num_blocks) + after, biased_exponent, name="exponent_field"
    )

    def fake_quant(*index):
        c = index[axis]
        block_index = (c // segment, c % segment // block)
        field = block_field[index[:axis] + block_index + index[axis + 1 :]]
        shift = shared_exponent(field, fmt) - fmt.scale_shift
        scale = power_of_two(shift)
        flat_index = sum(i * s for i, s in zip(index, strides))
        q = round_mantissa(divide_by_power_of_two(x[index], shift), fmt, flat_index)
        # through int32 like the reference's integer mantissa, so -0.0 comes back as +0.0
        return tirx.Cast("float32", tirx.Cast("int32", q)) * scale

    y = te.compute(shape, fake_quant, name="Y")
    return te.create_prim_func([x, y])


def _split_last_dim(sch: tvm.s_tir.Schedule, loop, last: int):
    """Split the last-dim loop into (tasks, chunk) with chunk the largest divisor <= _MAX_CHUNK."""
    chunk = max(d for d in range(1, min(last, _MAX_CHUNK) + 1) if last % d == 0)
    return sch.split(loop, factors=[None, chunk])


def _schedule(func: tirx.PrimFunc, shape: tuple[int, ...], fmt: BFPFormat, axis: int, groups: int):
    """Parallel over blocks (and chunks of the last dim), vectorised over contiguous elements.

    Strided blocks (axis not last): two parallel stages, block exponents then the element-wise
    fake quant, both vectorised over a chunk of the last dim. Contiguous blocks (axis last): one
    parallel loop over blocks, each computing its exponent then its elements (2.5x faster than
    two stages on a 256x1024 matrix). Ragged contiguous blocks keep two stages: with a ragged
    block the exponent index of an element is not affine in the loop variables, so ``compute_at``
    cannot derive the region it needs.
    """
    block = _block_extent(shape, fmt, axis, groups)
    segment = shape[axis] // groups
    strided = axis < len(shape) - 1
    sch = tvm.s_tir.Schedule(func)
    exp_block = sch.get_sblock("exponent_field")
    y_block = sch.get_sblock("Y")

    loops = sch.get_loops(y_block)
    group_loop, segment_loop = sch.split(loops[axis], factors=[groups, segment])
    block_loop, element_loop = sch.split(segment_loop, factors=[None, block])
    if strided:
        task_loop, vector_loop = _split_last_dim(sch, loops[-1], shape[-1])
        task_loops = [*loops[:axis], group_loop, block_loop, element_loop, *loops[axis + 1 : -1]]
        sch.parallel(sch.fuse(*task_loops, task_loop))
        sch.vectorize(vector_loop)

        *spatial, reduce_loop = sch.get_loops(exp_block)
        # reduction outside the chunk: contiguous loads, and LLVM vectorizes the max over the
        # chunk (the schedule cannot mark a loop under a reduction loop as vectorized)
        task_loop, chunk_loop = _split_last_dim(sch, spatial[-1], shape[-1])
        sch.reorder(task_loop, reduce_loop, chunk_loop)
        sch.parallel(sch.fuse(*spatial[:-1], task_loop))
        init = sch.decompose_reduction(exp_block, reduce_loop)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch.mod["main"]

    task_loop = sch.fuse(*loops[:axis], group_loop, block_loop)
    sch.parallel(task_loop)
    if segment % block == 0:
        sch.compute_at(exp_block, task_loop)
        sch.vectorize(element_loop)
    else:
        # a ragged block has a predicate the vectorizer would scalarize anyway: no vectorize
        sch.parallel(sch.fuse(*sch.get_loops(exp_block)[:-1]))
    return sch.mod["main"]


def bfp_fake_quant_func(
    shape: tuple[int, ...], fmt: BFPFormat, axis: int, groups: int = 1, dtype: str = "float32"
) -> tirx.PrimFunc:
    """Scheduled CPU PrimFunc ``(X, Y)`` computing ``Y = fake_quantize(X)`` in format ``fmt``.

    Parameters
    ----------
    shape : static shape of X and Y.
    fmt : BFP format; blocks run along ``axis``, which ``groups`` splits into equal segments.
    axis, groups : as in :func:`bitq_tvm.formats.fake_quantize_np`.
    dtype : only ``"float32"``.

    Returns
    -------
    PrimFunc with attr ``tirx.is_scheduled`` (dlight leaves it alone) and no ``global_symbol``
    (the Relax BlockBuilder names it).

    Raises
    ------
    BitqError
        If dtype is not float32, the shape is empty or non-positive, ``axis`` is out of range,
        ``groups`` does not divide the axis, or the tensor has 2**31 or more elements.
    """
    shape = tuple(int(d) for d in shape)  # accepts IntImm / numpy ints from callers
    axis = _validate(shape, axis, groups, dtype)
    func = _schedule(_build(shape, fmt, axis, groups), shape, fmt, axis, groups)
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
