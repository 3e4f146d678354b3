"""ARM and RISC-V schedules of the integer BFP matmul (:mod:`.bfp_matmul`), and a scalar one.

Same math, operands and PrimFunc signature as every variant (read :mod:`.bfp_matmul` for the
exactness argument): ``(qa, ea, qw, ew, C)`` with qa int8 [M, Kp], ea int8 [M, nb], qw the
stored mantissa tiles (int8 [Np/16, Kp/4, 16, 4], or uint8 [Np/16, Kp/4, 32] nibble pairs when
m <= 4), ew int8 [nb, Np], C float32 [M, N], from the one packer (:mod:`.packing`), so the
deployment packs weights one way for every target. ARM's dot products and RVV's ``vwmul``
multiply signed by signed bytes: mantissas enter as they are (nibbles sign-extended in registers).
Block sums are exact int32 (|s| <= 128 * 128 * B <= 2**21), so each block term ``(float32(s) *
sw) * sa`` is the correctly rounded float32 of its exact value, as on x86, and
:func:`.oracle.bfp_matmul_tolerance` bounds the error of every variant.

Variants (``VARIANTS``):

- ``sdot``: ``+dotprod``; one ``sdot`` per 4 outputs x 4 K values, straight from the packed
  weight tile (4 lanes x 4 K = 16 contiguous bytes).
- ``i8mm``: ``+i8mm``; ``smmla`` on 2 rows x 2 outputs x 8 K. It needs 2x8 row-major tiles, which
  the shared weight layout does not have: the kernel repacks A and W into ``[., Kp/8, 2, 8]``
  and keeps block sums and outputs in the 2x2-interleaved order, so it needs a block size that is
  a multiple of 8. The per-call weight repack costs one pass over W (matters for small M).
- ``neon``: plain NEON (Cortex-A53): ``smull`` + ``saddlp`` + ``addp`` per 4 outputs x 4 K.
- ``rvv``: RISC-V V 1.0 (any VLEN >= 128; LLVM sizes LMUL from the target), with this package's
  intrinsic (:mod:`.intrin_riscv`, which explains why not TVM's) over 16 output lanes.
- ``scalar``: plain int32 loops that the schedule does not vectorise (rv64gc, or any target).
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..formats import BFPFormat
from .bfp_matmul import (LOOP_ORDERS, activation_scales, bfp_matmul_compute, bfp_matmul_operands,
                         bfp_matmul_prim_func, check_formats, schedule_outputs, stored_mantissa, tile_bfp_matmul,
                         weight_scales, Epilogue)
from .contract import K_QUAD, LANES, padded
from .intrin_arm import BITQ_NEON_DOT_4x4, BITQ_SDOT_4x4, BITQ_SMMLA_2x2x8
from .intrin_riscv import BITQ_RVV_DOT_16x4

__all__ = [
    "VARIANTS",
    "LANE_MAJOR_VARIANTS",
    "row_tile",
    "schedule_bfp_matmul_arm_riscv",
    "bfp_matmul_arm_riscv_func",
]

VARIANTS = ("sdot", "i8mm", "neon", "rvv", "scalar")
# sdot/neon tile: 4 outputs; smmla tile: 2 rows x 2 outputs x 8 K.
_DOT_LANES = 4
_MMLA_ROWS = 2
_MMLA_COLS = 2
_MMLA_DEPTH = 8


def _mmla_compute(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat) -> tirx.PrimFunc:
    """PrimFunc ``(qa, ea, qw, ew, C)`` in the 2x2-interleaved order ``smmla`` works in.

    ``a_tiles`` [Mp/2, Kp/8, 2, 8] and ``w_tiles`` [Np/2, Kp/8, 2, 8] are the 2x8 row-major
    operand tiles; ``block_sum`` and ``acc`` are [.., Mp/2, .., Np/2, 2, 2] so one ``smmla``
    result (rows i, i+1 x outputs j, j+1) is 4 contiguous int32; ``sw_tiles`` and ``sa_tiles``
    spread the scales to that order so the epilogue runs on whole 4-lane vectors.
    """
    block = check_formats(fmt_a, fmt_w)
    if block % _MMLA_DEPTH:
        raise BitqError(
            f"bfp_matmul i8mm: block size {block} must be a multiple of {_MMLA_DEPTH}; "
            "use variant sdot"
        )
    qa, ea, qw, ew = operands = bfp_matmul_operands(M, N, K, fmt_w)
    nb, n_padded = (int(d) for d in ew.shape)
    k_padded = int(qa.shape[1])
    a_scale = activation_scales(ea, fmt_a)
    sw = weight_scales(ew, fmt_w)
    m_pairs = padded(M, _MMLA_ROWS) // _MMLA_ROWS
    depth_tiles = k_padded // _MMLA_DEPTH
    a_tiles = te.compute(
        (m_pairs, depth_tiles, _MMLA_ROWS, _MMLA_DEPTH),
        lambda io, kt, ii, kk: tirx.if_then_else(
            io * _MMLA_ROWS + ii < M,
            qa[tirx.min(io * _MMLA_ROWS + ii, M - 1), kt * _MMLA_DEPTH + kk],
            tirx.const(0, "int8"),
        ),
        name="a_tiles",
    )

    def packed_weight(j, k):
        return stored_mantissa(qw, j // LANES, k // K_QUAD, j % LANES, k % K_QUAD)

    w_tiles = te.compute(
        (n_padded // _MMLA_COLS, depth_tiles, _MMLA_COLS, _MMLA_DEPTH),
        lambda jo, kt, jj, kk: packed_weight(jo * _MMLA_COLS + jj, kt * _MMLA_DEPTH + kk),
        name="w_tiles",
    )
    sa_tiles = te.compute(
        (m_pairs, nb, _MMLA_ROWS, _MMLA_COLS),
        lambda io, b, ii, jj: a_scale[tirx.min(io * _MMLA_ROWS + ii, M - 1), b],
        name="sa_tiles",
    )
    sw_tiles = te.compute(
        (nb, n_padded // _MMLA_COLS, _MMLA_ROWS, _MMLA_COLS),
        lambda b, jo, ii, jj: sw[b, jo * _MMLA_COLS + jj],
        name="sw_tiles",
    )
    rt = te.reduce_axis((0, block // _MMLA_DEPTH), name="rt")
    rk = te.reduce_axis((0, _MMLA_DEPTH), name="rk")
    block_sum = te.compute(
        (m_pairs, nb, n_padded // _MMLA_COLS, _MMLA_ROWS, _MMLA_COLS),
        lambda io, b, jo, ii, jj: te.sum(
            a_tiles[io, b * (block // _MMLA_DEPTH) + rt, ii, rk].astype("int32")
            * w_tiles[jo, b * (block // _MMLA_DEPTH) + rt, jj, rk].astype("int32"),
            axis=[rt, rk],
        ),
        name="block_sum",
    )
    rb = te.reduce_axis((0, nb), name="rb")
    acc = te.compute(
        (m_pairs, n_padded // _MMLA_COLS, _MMLA_ROWS, _MMLA_COLS),
        lambda io, jo, ii, jj: te.sum(
            block_sum[io, rb, jo, ii, jj].astype("float32")
            * sw_tiles[rb, jo, ii, jj]
            * sa_tiles[io, rb, ii, jj],
            axis=rb,
        ),
        name="acc",
    )
    c = te.compute(
        (M, N),
        lambda i, j: acc[i // _MMLA_ROWS, j // _MMLA_COLS, i % _MMLA_ROWS, j % _MMLA_COLS],
        name="C",
    )
    return bfp_matmul_prim_func([*operands, c])


def row_tile(M: int) -> int:
    """Rows per register tile: 2 x 16 outputs keep 8 int32 + 8 float32 vectors of 128 bits
    live, well inside 32 registers (4 rows would need all 32 before operands)."""
    return 2 if M % 2 == 0 else 1


# The tensor intrinsic of each lane-major variant and how many output lanes one call covers.
_LANE_INTRINSICS = {
    "sdot": (BITQ_SDOT_4x4, _DOT_LANES),
    "neon": (BITQ_NEON_DOT_4x4, _DOT_LANES),
    "rvv": (BITQ_RVV_DOT_16x4, LANES),
    "scalar": (None, None),
}
LANE_MAJOR_VARIANTS = tuple(_LANE_INTRINSICS)


def schedule_bfp_matmul_arm_riscv(
    sch: Schedule, variant: str, rows: int, groups: int = 1, order: str = "columns_outer"
) -> None:
    """Schedule the signed :func:`.bfp_matmul.bfp_matmul_compute` in ``sch``: the x86 kernel's loop structure.

    Parallel over (column tile, row tile) (``order="columns_outer"``) or (row tile, column tile)
    (``"rows_outer"``); a tile is ``rows`` x ``groups`` x 16 outputs whose int32 block sums and
    float32 outputs stay in registers across the K loop; the block sum of one K quad is
    tensorized per 4 lanes (sdot, neon) or 16 lanes (rvv). ``rows`` must divide M and ``groups``
    the number of 16-column tiles. Tuning searches rows, groups and order
    (:mod:`bitq_tvm.tuning.tasks`); :func:`bfp_matmul_arm_riscv_func` uses ``rows`` =
    :func:`row_tile`, one group, columns outermost.
    """
    if variant not in _LANE_INTRINSICS:
        raise BitqError(
            f"bfp_matmul: variant {variant!r} has no lane-major schedule; "
            f"choose one of {', '.join(LANE_MAJOR_VARIANTS)}"
        )
    if order not in LOOP_ORDERS:
        raise BitqError(f"bfp_matmul: loop order {order!r} is not one of {', '.join(LOOP_ORDERS)}")
    intrinsic, intrinsic_lanes = _LANE_INTRINSICS[variant]
    vectorize = variant != "scalar"

    acc, block_sum, (tile_loop, b, i_inner, j_group, j_lane), (s_row, s_col, s_quad, s_lane_k) = \
        tile_bfp_matmul(sch, rows, groups, order, vectorize)
    for loop in s_row:
        sch.unroll(loop)
    if intrinsic is None:
        sch.reorder(s_quad, s_lane_k, *s_row, s_col)
        sch.unroll(s_lane_k)
    else:
        sch.reorder(s_quad, *s_row, s_col, s_lane_k)
    s_init = sch.decompose_reduction(block_sum, s_quad)
    if vectorize:
        sch.vectorize(sch.get_loops(s_init)[-1])
    if intrinsic is not None:
        s_calls, s_lanes = sch.split(s_col, [None, intrinsic_lanes])
        sch.unroll(s_calls)
        sch.tensorize(s_lanes, intrinsic)

    if vectorize:
        sch.vectorize(j_lane)
    sch.unroll(i_inner)
    sch.unroll(j_group)
    acc_init = sch.decompose_reduction(acc, b)
    if vectorize:
        sch.vectorize(sch.get_loops(acc_init)[-1])

    schedule_outputs(sch, tile_loop, groups, vectorize)


def _schedule_mmla(func: tirx.PrimFunc, M: int) -> tirx.PrimFunc:
    """Schedule of :func:`_mmla_compute`: tiles of 2 row pairs x 4 output pairs (4 x 8 outputs:
    8 int32 + 8 float32 accumulators), ``smmla`` per 2x2x8, 4-lane vector epilogue."""
    m_pairs = padded(M, _MMLA_ROWS) // _MMLA_ROWS
    pair_rows = 2 if m_pairs % 2 == 0 else 1
    pair_cols = 4  # Np/2 is a multiple of 8
    sch = Schedule(func)

    acc = sch.get_sblock("acc")
    io, jo, ii, jj, b = sch.get_loops(acc)
    io_outer, io_inner = sch.split(io, [None, pair_rows])
    jo_outer, jo_inner = sch.split(jo, [None, pair_cols])
    sch.reorder(jo_outer, io_outer, b, io_inner, jo_inner, ii, jj)
    task = sch.fuse(jo_outer, io_outer)
    sch.parallel(task)

    block_sum = sch.get_sblock("block_sum")
    sch.compute_at(block_sum, b)
    # compute_at drops unit loops: one row pair per tile, one 8-deep step per block (B = 8)
    loops = sch.get_loops(block_sum)[2:]
    s_io = [loops.pop(0)] if pair_rows > 1 else []
    s_jo, s_ii, s_jj, *s_depth, s_k = loops
    sch.reorder(*s_depth, *s_io, s_jo, s_ii, s_jj, s_k)
    for loop in (*s_io, s_jo):
        sch.unroll(loop)
    s_init = sch.decompose_reduction(block_sum, (s_depth or s_io or [s_jo])[0])
    sch.vectorize(sch.fuse(*sch.get_loops(s_init)[-2:]))
    sch.tensorize(s_ii, BITQ_SMMLA_2x2x8)

    sch.vectorize(sch.fuse(ii, jj))
    sch.unroll(io_inner)
    sch.unroll(jo_inner)
    acc_init = sch.decompose_reduction(acc, b)
    sch.vectorize(sch.fuse(*sch.get_loops(acc_init)[-2:]))

    sch.compute_inline(sch.get_sblock("w_scale"))
    for name in ("a_tiles", "w_tiles", "sa_tiles", "sw_tiles"):
        stage = sch.get_sblock(name)
        loops = sch.get_loops(stage)
        sch.parallel(loops[0])
        sch.vectorize(sch.fuse(*loops[-2:]))
    return sch.mod["main"]


def bfp_matmul_arm_riscv_func(
    M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str,
    tile: tuple[int, int] | None = None, epilogue: Epilogue | None = None,
) -> tirx.PrimFunc:
    """Hand-scheduled PrimFunc of a variant in ``VARIANTS``. ``tile`` = (rows, groups of 16
    columns) overrides the lane-major variants' default register tile (i8mm has its own);
    ``epilogue`` fuses bias, clip and the next layer's activation quantization (not i8mm). No
    target check: :func:`.bfp_matmul_variants.bfp_matmul_for_target` checks.
    """
    if variant not in VARIANTS:
        raise BitqError(f"bfp_matmul: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if variant == "i8mm":
        if tile is not None:
            raise BitqError("bfp_matmul i8mm: the smmla kernel takes no register tile")
        if epilogue is not None:
            raise BitqError("bfp_matmul i8mm: the smmla kernel has no fused epilogue; use variant sdot")
        return _schedule_mmla(_mmla_compute(M, N, K, fmt_a, fmt_w), M)
    n_tiles = padded(N, LANES) // LANES
    groups = 1
    if epilogue is not None and epilogue.out_fmt.block_size > LANES and n_tiles % (epilogue.out_fmt.block_size // LANES) == 0:
        groups = epilogue.out_fmt.block_size // LANES  # a fused quantization block in one tile
    rows, groups = tile if tile is not None else (row_tile(M) if groups <= 2 else 1, groups)
    sch = Schedule(bfp_matmul_compute(M, N, K, fmt_a, fmt_w, epilogue=epilogue))
    schedule_bfp_matmul_arm_riscv(sch, variant, rows, groups)
    return sch.mod["main"]
