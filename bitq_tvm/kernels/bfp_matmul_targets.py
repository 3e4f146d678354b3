"""Integer BFP matmul for ARM and RISC-V, and one entry point for every target preset.

Same math, operands and PrimFunc signature as the x86 kernel (:mod:`.bfp_matmul`: read its
docstring for the exactness argument): ``(qa, ea, qw, sw, wcorr, C)`` with qa int8 [M, Kp], ea
int8 [M, nb], qw int8 [Np/16, Kp/4, 16, 4], sw float32 [nb, Np], wcorr int32 [nb, Np], C
float32 [M, N], all from :func:`.bfp_matmul.pack_weights` / :func:`.quantize_activations_np`, so
the deployment pass packs weights one way for every target. ARM's dot products and RVV's
``vwmul`` multiply signed by signed bytes: mantissas enter as they are, and ``wcorr`` (the x86
kernel's correction for its +128 activation offset) is accepted but not read. Block sums are
exact int32 (|s| <= 128 * 128 * B <= 2**21), so each block term ``(float32(s) * sw) * sa`` is the
correctly rounded float32 of its exact value, as on x86, and :func:`.bfp_matmul_tolerance`
bounds the error of every variant.

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
from ..targets.presets import TargetPreset
from .float_bits import power_of_two
from .bfp_matmul import VARIANTS as X86_VARIANTS
from .bfp_matmul import (K_QUAD, LANES, _check_formats, _padded, bfp_matmul_compute, bfp_matmul_func,
                         tile_bfp_matmul)
from .intrin_arm import BITQ_NEON_DOT_4x4, BITQ_SDOT_4x4, BITQ_SMMLA_2x2x8
from .intrin_riscv import BITQ_RVV_DOT_16x4

__all__ = [
    "VARIANTS",
    "ALL_VARIANTS",
    "default_variant",
    "bfp_matmul_signed_compute",
    "LANE_MAJOR_VARIANTS",
    "LOOP_ORDERS",
    "schedule_bfp_matmul_target",
    "bfp_matmul_target_func",
    "bfp_matmul_for_target",
]

VARIANTS = ("sdot", "i8mm", "neon", "rvv", "scalar")
ALL_VARIANTS = X86_VARIANTS + VARIANTS
# The target intrinsic each variant needs (TargetPreset.require_intrinsic names); the x86 kernel's
# variants are dispatched to bfp_matmul_func so one entry point serves every preset.
_REQUIRED_INTRINSIC = {
    "sdot": "sdot", "i8mm": "i8mm", "neon": "neon", "rvv": "rvv", "scalar": "scalar",
    "vnni": "vnni", "avx2": "avx2", "generic": "scalar",
}
# Preferred first. i8mm is correct (tested) but not the default: its speed over sdot is unmeasured
# on hardware here, and it repacks the weights on every call.
_PREFERENCE = ("vnni", "avx2", "sdot", "neon", "rvv", "scalar")
# sdot/neon tile: 4 outputs; smmla tile: 2 rows x 2 outputs x 8 K.
_DOT_LANES = 4
_MMLA_ROWS = 2
_MMLA_COLS = 2
_MMLA_DEPTH = 8


def _is_x86(preset: TargetPreset) -> bool:
    return preset.triple.startswith(("x86_64", "i686"))


def default_variant(preset: TargetPreset) -> str:
    """The variant :func:`bfp_matmul_for_target` uses for ``preset`` when none is asked for."""
    if _is_x86(preset) and preset.intrinsic_family == "scalar":
        return "generic"
    return next(v for v in _PREFERENCE if preset.has_intrinsic(_REQUIRED_INTRINSIC[v]))


def bfp_matmul_signed_compute(
    M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat
) -> tirx.PrimFunc:
    """Unscheduled signed-int8 PrimFunc ``(qa, ea, qw, sw, wcorr, C)`` (``wcorr`` unread).

    Blocks: ``a_scale`` (activation block scales), ``block_sum`` [M, nb, Np] (int32 per block),
    ``acc`` (scaled sum over blocks), ``C`` (unpadded copy).
    """
    return bfp_matmul_compute(M, N, K, fmt_a, fmt_w, signed=True)


def _mmla_compute(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat) -> tirx.PrimFunc:
    """PrimFunc ``(qa, ea, qw, sw, wcorr, C)`` in the 2x2-interleaved order ``smmla`` works in.

    ``a_tiles`` [Mp/2, Kp/8, 2, 8] and ``w_tiles`` [Np/2, Kp/8, 2, 8] are the 2x8 row-major
    operand tiles; ``block_sum`` and ``acc`` are [.., Mp/2, .., Np/2, 2, 2] so one ``smmla``
    result (rows i, i+1 x outputs j, j+1) is 4 contiguous int32; ``sw_tiles`` and ``sa_tiles``
    spread the scales to that order so the epilogue runs on whole 4-lane vectors.
    """
    block, k_padded, nb, n_padded = _shapes(M, N, K, fmt_a, fmt_w)
    if block % _MMLA_DEPTH:
        raise BitqError(
            f"bfp_matmul i8mm: block size {block} must be a multiple of {_MMLA_DEPTH}; "
            "use variant sdot"
        )
    qa, ea, qw, sw, wcorr = _placeholders(M, k_padded, nb, n_padded)
    a_scale = _activation_scales(ea, fmt_a, M, nb)
    m_pairs = _padded(M, _MMLA_ROWS) // _MMLA_ROWS
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
        return qw[j // LANES, k // K_QUAD, j % LANES, k % K_QUAD]

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
    return _prim_func([qa, ea, qw, sw, wcorr, c])


def _shapes(M, N, K, fmt_a, fmt_w):
    block = _check_formats(fmt_a, fmt_w)
    if min(M, N, K) <= 0:
        raise BitqError(f"bfp_matmul: shape M={M}, N={N}, K={K} must be positive")
    k_padded = _padded(K, block)
    return block, k_padded, k_padded // block, _padded(N, LANES)


def _placeholders(M, k_padded, nb, n_padded):
    return (
        te.placeholder((M, k_padded), "int8", name="qa"),
        te.placeholder((M, nb), "int8", name="ea"),
        te.placeholder((n_padded // LANES, k_padded // K_QUAD, LANES, K_QUAD), "int8", name="qw"),
        te.placeholder((nb, n_padded), "float32", name="sw"),
        te.placeholder((nb, n_padded), "int32", name="wcorr"),
    )


def _activation_scales(ea, fmt_a, M, nb):
    return te.compute(
        (M, nb),
        lambda i, b: power_of_two(ea[i, b].astype("int32") - (fmt_a.mantissa_bits - 2)),
        name="a_scale",
    )


def _prim_func(tensors):
    return te.create_prim_func(tensors).with_attr("global_symbol", "bfp_matmul")


def _row_tile(M: int) -> int:
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
LOOP_ORDERS = ("columns_outer", "rows_outer")


def schedule_bfp_matmul_target(
    sch: Schedule, variant: str, rows: int, groups: int = 1, order: str = "columns_outer"
) -> None:
    """Schedule :func:`bfp_matmul_signed_compute` in ``sch``: the x86 kernel's loop structure.

    Parallel over (column tile, row tile) (``order="columns_outer"``) or (row tile, column tile)
    (``"rows_outer"``); a tile is ``rows`` x ``groups`` x 16 outputs whose int32 block sums and
    float32 outputs stay in registers across the K loop; the block sum of one K quad is
    tensorized per 4 lanes (sdot, neon) or 16 lanes (rvv). ``rows`` must divide M and ``groups``
    the number of 16-column tiles. Tuning searches rows, groups and order
    (:mod:`bitq_tvm.tuning.tasks`); :func:`bfp_matmul_target_func` uses ``rows`` =
    :func:`_row_tile`, one group, columns outermost.
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
        tile_bfp_matmul(sch, rows, groups, order)
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

    out = sch.get_sblock("C")
    sch.reverse_compute_at(out, tile_loop)
    *o_row, o_col = sch.get_loops(out)[1:]
    for loop in o_row:
        sch.unroll(loop)
    if vectorize:
        sch.vectorize(sch.split(o_col, [None, LANES])[-1])


def _schedule_mmla(func: tirx.PrimFunc, M: int) -> tirx.PrimFunc:
    """Schedule of :func:`_mmla_compute`: tiles of 2 row pairs x 4 output pairs (4 x 8 outputs:
    8 int32 + 8 float32 accumulators), ``smmla`` per 2x2x8, 4-lane vector epilogue."""
    m_pairs = _padded(M, _MMLA_ROWS) // _MMLA_ROWS
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

    for name in ("a_tiles", "w_tiles", "sa_tiles", "sw_tiles"):
        stage = sch.get_sblock(name)
        loops = sch.get_loops(stage)
        sch.parallel(loops[0])
        sch.vectorize(sch.fuse(*loops[-2:]))
    return sch.mod["main"]


def bfp_matmul_target_func(
    M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str
) -> tirx.PrimFunc:
    """Hand-scheduled PrimFunc of any variant in ``ALL_VARIANTS`` (x86 ones delegate to
    :func:`.bfp_matmul.bfp_matmul_func`): a drop-in for ``bfp_matmul_func`` with the same
    arguments. No target check: compile it for a target that has the variant's instructions,
    or use :func:`bfp_matmul_for_target`, which checks.
    """
    if variant in X86_VARIANTS:
        return bfp_matmul_func(M, N, K, fmt_a, fmt_w, variant)
    if variant not in VARIANTS:
        raise BitqError(
            f"bfp_matmul: variant {variant!r} is not one of {', '.join(ALL_VARIANTS)}"
        )
    if variant == "i8mm":
        return _schedule_mmla(_mmla_compute(M, N, K, fmt_a, fmt_w), M)
    sch = Schedule(bfp_matmul_signed_compute(M, N, K, fmt_a, fmt_w))
    schedule_bfp_matmul_target(sch, variant, _row_tile(M))
    return sch.mod["main"]


def bfp_matmul_for_target(
    M: int,
    N: int,
    K: int,
    fmt_a: BFPFormat,
    fmt_w: BFPFormat,
    preset: TargetPreset,
    variant: str | None = None,
) -> tuple[tirx.PrimFunc, str]:
    """The integer BFP matmul PrimFunc for ``preset`` (x86, ARM or RISC-V), and its variant.

    Parameters
    ----------
    M, N, K, fmt_a, fmt_w
        As :func:`bitq_tvm.kernels.bfp_matmul.bfp_matmul_func`; the PrimFunc has the same
        signature ``(qa, ea, qw, sw, wcorr, C)`` and global symbol ``bfp_matmul``.
    preset
        The target; compile the PrimFunc with ``preset.tvm_target()``.
    variant
        One of ``VARIANTS`` (ARM, RISC-V, any) or, for x86 presets, of the x86 kernel's
        ``vnni``, ``avx2``, ``generic``; None picks :func:`default_variant`.

    Raises
    ------
    BitqError
        A variant the preset lacks (e.g. ``i8mm`` on cortex-a53), or bad formats or shapes.
    """
    if variant is None:
        variant = default_variant(preset)
    allowed = X86_VARIANTS + ("scalar",) if _is_x86(preset) else VARIANTS
    if variant not in allowed:
        raise BitqError(
            f"bfp_matmul: variant {variant!r} is not available for target {preset.name!r}; "
            f"choose one of {', '.join(allowed)}"
        )
    preset.require_intrinsic(_REQUIRED_INTRINSIC[variant])
    return bfp_matmul_target_func(M, N, K, fmt_a, fmt_w, variant), variant
