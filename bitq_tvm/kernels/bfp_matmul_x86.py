"""x86 schedules of the integer BFP matmul (:mod:`.bfp_matmul`): VNNI, AVX2 and generic.

``vnni`` tensorizes the K-quad block sums with ``vpdpbusd`` (:mod:`.intrin_x86`) and runs the
unsigned-weight form of :func:`.bfp_matmul.bfp_matmul_compute` (weights + 128 in registers,
activation-sum correction); ``avx2`` tensorizes them with ``vpmaddwd`` on sign-extended int16 and
``generic`` leaves plain int32 TIR for LLVM to vectorise, both in the signed form.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..formats import BFPFormat
from .bfp_matmul import Epilogue, bfp_matmul_compute, schedule_outputs, tile_bfp_matmul
from .contract import LANES, NIBBLE_MAX_MANTISSA_BITS, padded
from .intrin_x86 import BITQ_AVX2_DOT_8x4, BITQ_AVX2_NIBBLE_DOT_16x4, BITQ_VNNI_DOT_16x4

__all__ = ["VARIANTS", "UNSIGNED_WEIGHT_VARIANTS", "NIBBLE_REGISTER_VARIANTS", "default_tile", "reads_nibbles_inline", "schedule_bfp_matmul_x86", "bfp_matmul_x86_func"]

VARIANTS = ("vnni", "avx2", "generic")
# Variants that run the u8 (weight) x s8 (activation) form of the compute.
UNSIGNED_WEIGHT_VARIANTS = ("vnni",)
# Variants whose dot intrinsic reads nibble-packed weights directly (no unpacked copy).
NIBBLE_REGISTER_VARIANTS = ("avx2",)


def default_tile(M: int, n_tiles: int, epilogue: Epilogue | None = None) -> tuple[int, int]:
    """(rows, 16-lane column groups) of one register tile; rows divide M, groups divide n_tiles.

    4 x 2: 8 int32 block accumulators + 8 float32 output accumulators + loads fit the 32 zmm
    registers (measured best of 4x1, 4x2, 4x4, 8x1, 2x2, 2x4 at M = 16, 128, 512). A one-row
    tile (GEMV, or M prime) takes 4 column groups instead.
    """
    rows = next(r for r in (4, 3, 2, 1) if M % r == 0)
    max_groups = 4 if rows == 1 else 2
    groups = next(g for g in range(max_groups, 0, -1) if n_tiles % g == 0)
    block_groups = epilogue.out_fmt.block_size // LANES if epilogue is not None else 0
    if block_groups > groups and n_tiles % block_groups == 0:
        # a fused quantization block must lie in one tile; fewer rows keep the registers in budget
        groups, rows = block_groups, next(r for r in (2, 1) if M % r == 0 and r * block_groups <= 8)
    return rows, groups


def reads_nibbles_inline(variant: str, fmt_w: BFPFormat) -> bool:
    """Whether the variant's block sums read nibble-packed weights directly (AVX2: its nibble
    intrinsic sign-extends them into vpmaddwd's words in registers, no unpacked copy)."""
    return variant in NIBBLE_REGISTER_VARIANTS and fmt_w.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS


def inline_nibbles(sch: Schedule) -> bool:
    """Whether the scheduled compute reads nibble-packed weights in its block sums."""
    reads = sch.get(sch.get_sblock("block_sum")).reads
    return any(r.source.name == "qw" and len(r.source.shape) == 3 for r in reads)


def schedule_bfp_matmul_x86(sch: Schedule, rows: int, groups: int, variant: str,
                            order: str = "columns_outer", intrinsic: str | None = None,
                            sample_task_rows: bool = False, task_rows: int | None = None) -> None:
    """Schedule the :func:`.bfp_matmul.bfp_matmul_compute` kernel in ``sch`` with one register tile.

    ``rows`` x ``groups`` x 16 outputs per tile (rows dividing M); ``order`` puts column tiles
    (``"columns_outer"``, the default) or row tiles outermost; ``intrinsic`` overrides the
    variant's tensor intrinsic (the tuning tests plant a wrong one). Tuning searches the tile and
    the order (:mod:`bitq_tvm.tuning.tasks`); :func:`bfp_matmul_x86_func` uses a measured default.
    ``sample_task_rows``, ``task_rows``: see :func:`.bfp_matmul.tile_bfp_matmul`.
    """
    if intrinsic is None:
        intrinsic = {"vnni": BITQ_VNNI_DOT_16x4, "avx2": BITQ_AVX2_DOT_8x4, "generic": None}[variant]
        if variant == "avx2" and inline_nibbles(sch):
            intrinsic = BITQ_AVX2_NIBBLE_DOT_16x4
    acc, block_sum, (tile_loop, b, i_inner, j_group, j_lane), (s_row, s_col, s_quad, s_lane_k) = \
        tile_bfp_matmul(sch, rows, groups, order, sample_task_rows=sample_task_rows, task_rows=task_rows)
    s_group, s_lane = sch.split(s_col, [groups, LANES])
    for loop in (*s_row, s_group):
        sch.unroll(loop)
    if intrinsic is None:
        # vectorize must precede decompose_reduction (TVM 0.27 rejects it afterwards)
        sch.reorder(s_quad, s_lane_k, *s_row, s_group, s_lane)
        sch.unroll(s_lane_k)
        sch.vectorize(s_lane)
    else:
        sch.reorder(s_quad, *s_row, s_group, s_lane, s_lane_k)
    above = len(sch.get_loops(block_sum)) - len(s_row) - 4  # loops down to and including b
    s_init = sch.decompose_reduction(block_sum, s_quad)
    *init_outer, init_lane = sch.get_loops(s_init)[above:]
    for loop in init_outer:
        sch.unroll(loop)
    sch.vectorize(init_lane)
    if intrinsic == BITQ_AVX2_DOT_8x4:
        sch.tensorize(sch.split(s_lane, [None, LANES // 2])[1], intrinsic)
    elif intrinsic is not None:
        sch.tensorize(s_lane, intrinsic)

    sch.vectorize(j_lane)
    sch.unroll(i_inner)
    sch.unroll(j_group)
    acc_init = sch.decompose_reduction(acc, b)
    sch.vectorize(sch.get_loops(acc_init)[-1])

    schedule_outputs(sch, tile_loop, groups)


def bfp_matmul_x86_func(
    M: int,
    N: int,
    K: int,
    fmt_a: BFPFormat,
    fmt_w: BFPFormat,
    variant: str = "vnni",
    tile: tuple[int, int] | None = None,
    epilogue: Epilogue | None = None,
    tuned=None,
) -> tirx.PrimFunc:
    """Hand-scheduled integer BFP matmul PrimFunc (signature of :func:`.bfp_matmul.bfp_matmul_compute`).

    variant: ``"vnni"`` (AVX-512 VNNI ``vpdpbusd``, needs an ``avx512vnni`` target), ``"avx2"``
    (``vpmaddwd`` on sign-extended int16, needs ``avx2``), ``"generic"`` (plain int32 TIR that
    LLVM vectorises; any target). Parallel over (column tile, row tile); per tile the int32 block
    sums and the float32 outputs stay in registers across the K loop. ``tile`` = (rows, groups of
    16 columns) overrides the default register tile; rows must divide M, 16 * groups divide Np.
    ``epilogue``: fuse bias, clip and the next layer's activation quantization
    (:class:`.bfp_matmul.Epilogue`); the default tile then widens to whole quantization blocks.
    ``tuned``: a :class:`.bfp_matmul.TunedConfig` (tile, order, row tiles per task,
    unroll step of a verified tuned record), replacing ``tile`` and the default order.
    """
    if variant not in VARIANTS:
        raise BitqError(f"bfp_matmul: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    func = bfp_matmul_compute(M, N, K, fmt_a, fmt_w, unsigned_weights=variant in UNSIGNED_WEIGHT_VARIANTS,
                              epilogue=epilogue, inline_nibbles=reads_nibbles_inline(variant, fmt_w))
    n_tiles = padded(N, LANES) // LANES
    if tuned is not None:
        tile = (tuned.rows, tuned.groups)
    rows, groups = tile if tile is not None else default_tile(M, n_tiles, epilogue)
    if M % rows or n_tiles % groups:
        raise BitqError(
            f"bfp_matmul: tile {(rows, groups)} does not divide M={M} rows "
            f"and {n_tiles} column groups"
        )
    sch = Schedule(func)
    if tuned is None:
        schedule_bfp_matmul_x86(sch, rows, groups, variant)
        return sch.mod["main"]
    schedule_bfp_matmul_x86(sch, rows, groups, variant, tuned.order, task_rows=tuned.task_rows)
    if tuned.unroll:
        # what MetaSchedule's RewriteParallelVectorizeUnroll makes of the sampled step: the
        # outermost loop of each top-level block gets the auto-unroll pragmas
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            if loops:
                sch.annotate(loops[0], "pragma_auto_unroll_max_step", tuned.unroll)
                sch.annotate(loops[0], "pragma_unroll_explicit", 1)
    return sch.mod["main"]
