"""TensorIR kernel: float32 activations -> BFP int8 mantissas + int8 block exponents.

The run-time half of the integer BFP deployment (:mod:`bitq_tvm.passes.lower_bfp_integer`).
Blocks run along ``axis`` of X (K of a matmul, input channels of an NCHW conv), split into
``groups`` equal segments that no block crosses; each segment is zero-padded to ``nbg * B``. The
outputs move ``axis`` last, in the layout :func:`~bitq_tvm.kernels.bfp_matmul.bfp_matmul_func`
reads (signed int8 mantissas: that kernel adds the +128 offset itself)::

    Q [outer..., groups * nbg * B]  int8   mantissas, padding 0
    E [outer..., groups * nbg]      int8   shared exponents e (all-zero block: emin)

where ``outer`` is X's shape without ``axis`` (for NCHW: N, H, W, i.e. NHWC mantissas).
Every step is the float32 operation of :func:`bitq_tvm.formats.quantize_np`, as in the
fake-quant kernel :mod:`bitq_tvm.kernels.bfp_quant` (exponent from the float32 exponent field,
scale from its bit pattern, ``llvm.nearbyint``, the same stochastic-rounding hash by flat index
of X), so mantissas and exponents are bit-exact with the reference.
"""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx

from ..formats import BFPFormat
from .contract import check_block_layout
from .float_bits import (divide_by_power_of_two, exponent_field, power_of_two, round_mantissa, shared_exponent,
                         zero_unless)

__all__ = ["act_quant_shapes", "act_quant_stages", "bfp_act_quant_func", "schedule_act_quant"]


def act_quant_shapes(shape, fmt: BFPFormat, axis: int, groups: int = 1):
    """Shapes ``(Q shape, E shape)`` of :func:`bfp_act_quant_func` for X of ``shape``."""
    shape = tuple(int(d) for d in shape)
    axis %= len(shape)
    outer = shape[:axis] + shape[axis + 1:]
    nbg = -(-(shape[axis] // groups) // fmt.block_size)
    return outer + (groups * nbg * fmt.block_size,), outer + (groups * nbg,)


def act_quant_stages(x: te.Tensor, fmt: BFPFormat, axis: int, groups: int = 1) -> tuple[te.Tensor, te.Tensor]:
    """The TE stages ``(Q, E)`` quantizing tensor ``x`` (a placeholder, or a computed tensor that
    :func:`schedule_act_quant` is then given to inline) along ``axis`` (see module doc)."""
    shape = tuple(int(d) for d in x.shape)
    block = fmt.block_size
    segment = shape[axis] // groups
    nbg = -(-segment // block)
    ragged = segment % block != 0
    outer = shape[:axis] + shape[axis + 1:]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]

    def source(outer_index, block_index, within):
        """(X element, in-segment flag) for position ``within`` of flattened block ``block_index``."""
        g, b = block_index // nbg, block_index % nbg
        pos = b * block + within
        # a padding position reads the segment's last element (in bounds) and is masked out
        channel = g * segment + (tirx.min(pos, segment - 1) if ragged else pos)
        index = tuple(outer_index[:axis]) + (channel,) + tuple(outer_index[axis:])
        return index, (pos < segment) if ragged else None

    within_r = te.reduce_axis((0, block), name="j")

    def max_exponent_field(*idx):
        index, valid = source(idx[:-1], idx[-1], within_r)
        field = exponent_field(x[index])
        if valid is not None:
            field = zero_unless(valid, field)  # padding is zero, whose field is 0
        return te.max(field, axis=within_r)

    field = te.compute(outer + (groups * nbg,), max_exponent_field, name="exponent_field")

    e_out = te.compute(outer + (groups * nbg,),
                       lambda *idx: shared_exponent(field[idx], fmt).astype("int8"), name="E")

    def mantissa(*idx):
        c = idx[-1]
        blk, within = c // block, c % block
        index, valid = source(idx[:-1], blk, within)
        shift = e_out[idx[:-1] + (blk,)].astype("int32") - fmt.scale_shift
        flat_index = sum(i * s for i, s in zip(index, strides))
        q = tirx.Cast("int8", round_mantissa(divide_by_power_of_two(x[index], shift), fmt, flat_index))
        return q if valid is None else zero_unless(valid, q)

    q_out = te.compute(outer + (groups * nbg * block,), mantissa, name="Q")
    return q_out, e_out


def schedule_act_quant(func: tirx.PrimFunc, fmt: BFPFormat, strided: bool,
                       inline: tuple[str, ...] = ()) -> tirx.PrimFunc:
    """Two parallel passes: block exponents (E, an output, cannot nest under Q), then mantissas.
    The blocks named in ``inline`` (stages computing the quantizer's input) are inlined first.

    Contiguous blocks (``axis`` last): both passes parallel over (rows, blocks), a block's B
    mantissas vectorised. Strided blocks (NCHW activations, C-strided elements per block): both
    passes parallel over the outer rows but the innermost (N*H for NCHW), each task walking one
    image row's pixels and blocks, so the rows' C x W floats it gathers from stay in L1 (measured
    70 vs 98 us on 64x56x56). The kernel transposes to NHWC while it quantizes: no separate layout
    pass runs.
    """
    sch = tvm.s_tir.Schedule(func)
    for name in inline:
        sch.compute_inline(sch.get_sblock(name))
    e_block = sch.get_sblock("E")
    e_loops = sch.get_loops(e_block)
    q_block = sch.get_sblock("Q")
    *rows, channel = sch.get_loops(q_block)
    blk, within = sch.split(channel, factors=[None, fmt.block_size])
    if strided and len(rows) > 1:
        sch.parallel(sch.fuse(*e_loops[:-2]) if len(e_loops) > 3 else e_loops[0])
        sch.compute_at(sch.get_sblock("exponent_field"), e_loops[-1])
        sch.parallel(sch.fuse(*rows[:-1]) if len(rows) > 2 else rows[0])
    else:
        e_task = sch.fuse(*e_loops)
        sch.parallel(e_task)
        sch.compute_at(sch.get_sblock("exponent_field"), e_task)
        sch.parallel(sch.fuse(*rows, blk))
    sch.vectorize(within)
    return sch.mod["main"]


def bfp_act_quant_func(shape, fmt: BFPFormat, axis: int, groups: int = 1) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X, Q, E)``: BFP-quantize float32 X along ``axis`` (see module doc).

    Parameters
    ----------
    shape : static shape of X.
    fmt : BFP format (any block size, mantissa width, rounding).
    axis : the reduction axis of the consuming op; ``groups`` equal segments of it.

    Returns
    -------
    PrimFunc marked ``tirx.is_scheduled`` with no ``global_symbol`` (the BlockBuilder names it).
    """
    shape = tuple(int(d) for d in shape)
    axis = check_block_layout(shape, axis, groups, "bfp_act_quant_func")
    x = te.placeholder(shape, "float32", name="X")
    func = te.create_prim_func([x, *act_quant_stages(x, fmt, axis, groups)])
    func = schedule_act_quant(func, fmt, strided=axis < len(shape) - 1)
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
