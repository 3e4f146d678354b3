"""Default (untuned) CPU schedules for the fused PrimFuncs of ONNX CNNs and transformers.

A dlight-style rule set, modelled on ``tvm.s_tir.dlight.cpu``: each rule is a
:class:`tvm.s_tir.dlight.ScheduleRule` whose ``apply`` returns a schedule, or ``None`` when the
PrimFunc is not its kind. :func:`default_cpu_rules` orders them from specific to generic:

1. :class:`RegisterTiledContraction`: conv2d NCHW, matmul, dense, batched matmul (one reduction
   block ``out += data * weight`` where an output axis indexes only the weight). Output channels
   (or matmul columns) are vectorised, output pixels (or matmul rows) unrolled, the accumulator
   tile lives in registers, and fused epilogues are computed per tile.
2. :class:`SpatialInnerReduction`: depthwise/grouped conv2d and pooling (the output's innermost
   axis also walks the data contiguously): reductions hoisted out, that axis vectorised.
3. :class:`OuterAxisReduction`: reductions over an outer axis (softmax over channels): lanes
   along the innermost output axis, the reduction loops outside them.
4. :class:`LastAxisReduction` (TVM's ``dlight.cpu.Reduction``): softmax, layer norm.
5. :class:`ParallelVectorizeFallback`: everything else, block by block.

:func:`cpu_pipeline` is TVM's default CPU Relax pipeline with these rules applied after FuseTIR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from bitq_tvm.errors import BitqError
from bitq_tvm.kernels import float_math

# Both spellings: TVM 0.27 writes "tirx.is_scheduled", our other kernels may carry the old one.
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")

# Longest reduction loop (a pooling or depthwise window side) that SpatialInnerReduction unrolls.
_MAX_UNROLLED_REDUCTION = 7

# A rule that meets a PrimFunc it cannot handle declines instead of failing the build; TVM
# reports schedule failures as ScheduleError or as other RuntimeError/ValueError subclasses.
_SCHEDULE_ERRORS = (s_tir.ScheduleError, RuntimeError, ValueError)


@dataclass(frozen=True)
class CPUScheduleConfig:
    """Tunables of the default CPU schedules, chosen per target by :meth:`for_target`.

    Parameters
    ----------
    vector_lanes : int
        fp32 lanes of one SIMD register (16 for AVX-512, 8 for AVX2, 4 for NEON).
    vectors_per_tile : int
        SIMD registers along the vectorised axis of a contraction's accumulator tile.
    max_tile_rows : int
        Upper bound on the unrolled axis of the accumulator tile.
    max_vector_extent : int
        Longest loop vectorised whole; longer loops are split first.
    num_threads : int
        Cores the parallel loops should feed.
    """

    vector_lanes: int
    vectors_per_tile: int
    max_tile_rows: int
    max_vector_extent: int = 64
    num_threads: int = 1

    def __post_init__(self):
        if self.vector_lanes not in (2, 4, 8, 16, 32):
            raise BitqError(f"CPUScheduleConfig.vector_lanes={self.vector_lanes}: expected 2..32, a power of two")
        if self.vectors_per_tile < 1 or self.max_tile_rows < 1 or self.num_threads < 1:
            raise BitqError("CPUScheduleConfig: vectors_per_tile, max_tile_rows, num_threads must be >= 1")
        if self.max_vector_extent < self.vector_lanes:
            raise BitqError("CPUScheduleConfig.max_vector_extent must be >= vector_lanes")

    @staticmethod
    def for_target(target: Target) -> "CPUScheduleConfig":
        """Pick the tunables for an LLVM target from its SIMD width and core count."""
        lanes = _vector_bits(target) // 32
        # x86 has 32 vector registers with AVX-512, else 16; AArch64 has 32. The accumulator tile
        # leaves room for the weight vectors and one broadcast operand.
        is_x86 = target_has_features("sse2", target)
        registers = 32 if (lanes == 16 or not is_x86) else 16
        vectors = 2
        rows = max(1, min(8, (registers - vectors - 2) // vectors))
        num_cores = target.attrs.get("num-cores")
        threads = int(num_cores) if num_cores else (os.cpu_count() or 1)
        return CPUScheduleConfig(
            vector_lanes=lanes, vectors_per_tile=vectors, max_tile_rows=rows, num_threads=threads
        )


def _vector_bits(target: Target) -> int:
    # llvm_get_vector_width answers for the host on x86 whatever mcpu says: ask for features.
    if target_has_features("sse2", target):
        if target_has_features("avx512f", target):
            return 512
        return 256 if target_has_features("avx", target) else 128
    return min(max(llvm_get_vector_width(target), 128), 512)


def _is_prescheduled(func: tirx.PrimFunc) -> bool:
    return any(bool(func.attrs.get(key, False)) for key in _SCHEDULED_ATTRS) if func.attrs else False


def _const_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _largest_divisor(extent: int, candidates) -> int | None:
    return next((c for c in candidates if c >= 1 and extent % c == 0), None)


def _vars_in(expr_list) -> set:
    found = set()
    for expr in expr_list:
        found |= collect_vars_used_in_prim_expr(expr)
    return found


def _region_vars(region) -> set:
    return _vars_in([r.min for r in region.region])


def _vectorize_inner(sch: s_tir.Schedule, loop, config: CPUScheduleConfig) -> None:
    """Vectorise a loop whole when short, else its largest lane-aligned divisor."""
    extent = _const_extent(sch, loop)
    if extent is None or extent < 2:
        return
    if extent <= config.max_vector_extent:
        sch.vectorize(loop)
        return
    lanes = _largest_divisor(extent, (4 * config.vector_lanes, 2 * config.vector_lanes, config.vector_lanes))
    if lanes is not None:
        sch.vectorize(sch.split(loop, factors=[None, lanes])[1])


def _parallelize_leading(sch: s_tir.Schedule, loops, config: CPUScheduleConfig):
    """Fuse leading loops until they feed every core a few times, mark them parallel.

    Returns the fused loop and the loops left inside it.
    """
    target_extent = 4 * config.num_threads
    count, extent = 0, 1
    while count < len(loops) and extent < target_extent:
        loop_extent = _const_extent(sch, loops[count])
        if loop_extent is None:
            break
        extent *= loop_extent
        count += 1
    if count == 0:
        return None, list(loops)
    fused = sch.fuse(*loops[:count]) if count > 1 else loops[0]
    if extent > 1:
        sch.parallel(fused)
    return fused, list(loops[count:])


def _inline_injective_except(sch: s_tir.Schedule, keep: set) -> None:
    """Inline every injective block that can be, except those named in ``keep``."""
    progress = True
    while progress:
        progress = False
        for block in _root_blocks(sch):
            name = sch.get(block).name_hint
            if name in keep or any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars):
                continue
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(block)
                except _SCHEDULE_ERRORS:
                    continue
                progress = True
                break
            if progress:
                break


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
    except _SCHEDULE_ERRORS:
        return False
    return True


def _root_blocks(sch: s_tir.Schedule):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _upstream_of(sch: s_tir.Schedule, block) -> set:
    """Names of all blocks that (transitively) produce for ``block``."""
    names, frontier = set(), [block]
    while frontier:
        for producer in sch.get_producers(frontier.pop()):
            name = sch.get(producer).name_hint
            if name not in names:
                names.add(name)
                frontier.append(producer)
    return names


def _schedule_spatial_block(sch: s_tir.Schedule, block, config: CPUScheduleConfig) -> None:
    """Parallelise the outer spatial loops of a root-level block and vectorise its inner one."""
    loops = sch.get_loops(block)
    iter_types = [iv.iter_type for iv in sch.get(block).iter_vars]
    if not loops or len(loops) != len(iter_types):
        return
    num_spatial = next((i for i, t in enumerate(iter_types) if t != tirx.IterVar.DataPar), len(loops))
    if num_spatial == 0:
        return
    if num_spatial == len(loops):
        # Injective: keep the innermost loop for SIMD, spread the rest over the cores.
        inner = loops[-1]
        if len(loops) > 1:
            _parallelize_leading(sch, loops[:-1], config)
        _vectorize_inner(sch, inner, config)
    else:
        _parallelize_leading(sch, loops[:num_spatial], config)


def _unscheduled_root(func, target: Target, config: "CPUScheduleConfig | None"):
    """(schedule, config) of an unscheduled LLVM PrimFunc with a root block, else None."""
    if not isinstance(func, tirx.PrimFunc) or _is_prescheduled(func) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    return sch, config or CPUScheduleConfig.for_target(target)


def _single_reduction(func, target: Target, config: "CPUScheduleConfig | None"):
    """(schedule, the one reduction block, config) of an unscheduled LLVM PrimFunc, else None."""
    found = _unscheduled_root(func, target, config)
    if found is None:
        return None
    sch, config = found
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [info for info in infos if not info.is_injective()]
    if len(reductions) != 1:
        return None
    return sch, reductions[0], config


class _ConfiguredRule(dlight.ScheduleRule):
    """A rule holding an optional :class:`CPUScheduleConfig` (None: derived from the target)."""

    def __init__(self, config: CPUScheduleConfig | None = None):
        self.config = config


class _SingleReductionRule(_ConfiguredRule):
    """A rule for an LLVM PrimFunc with one reduction block: ``_match(sch, main)`` returns the
    block's axis roles (or None: not this rule's), ``_schedule(sch, main, *roles, config)`` the
    schedule (or None); a schedule primitive that fails means the rule does not apply."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _single_reduction(func, target, self.config)
        if found is None:
            return None
        sch, main, config = found
        roles = self._match(sch, main)
        if roles is None:
            return None
        try:
            return self._schedule(sch, main, *roles, config)
        except _SCHEDULE_ERRORS:
            return None


class RegisterTiledContraction(_SingleReductionRule):
    """conv2d NCHW, matmul, dense and batched matmul with their fused prologues and epilogues.

    The PrimFunc must hold exactly one reduction block ``out[...] += data[...] * weight[...]``
    where some output axis ``v`` indexes ``weight`` but not ``data`` (output channels of a conv,
    columns of a matmul), with an extent divisible by 2 or more. The tile's unrolled rows come from
    an output axis indexing ``data`` but not ``weight`` (output width of a conv, rows of a matmul;
    none for a GEMV). Grouped convolutions, whose data index depends on the output channel, do
    not match.
    """

    @staticmethod
    def _match(sch: s_tir.Schedule, main: SBlockInfo):
        """Find the vectorised axis, the unrolled axis and which read is the weight."""
        block = sch.get(main.block_rv)
        if len(block.writes) != 1 or len(block.reads) != 2:
            return None
        if any(not isinstance(info.dom, int) for info in main.iters):
            return None
        if block.writes[0].source.dtype not in ("float32", "float16", "float64"):
            return None
        out_indices = [r.min for r in block.writes[0].region]
        spatial = [it for it in main.iters if it.kind == "S"]
        reads = [_region_vars(read) for read in block.reads]
        for weight_index in (1, 0):
            weight_vars, data_vars = reads[weight_index], reads[1 - weight_index]
            vector_iters = [it for it in spatial if it.var in weight_vars and it.var not in data_vars]
            row_iters = [it for it in spatial if it.var in data_vars and it.var not in weight_vars]
            if not vector_iters:
                continue
            # Innermost output axis of each kind: contiguous stores and reuse of the other operand.
            position = {id(it): _output_position(out_indices, it.var) for it in spatial}
            vector_iter = max(vector_iters, key=lambda it: position[id(it)])
            # No row axis (a GEMV, whose unit row axis normalisation dropped): one-row tiles.
            row_iter = max(row_iters, key=lambda it: position[id(it)]) if row_iters else None
            return vector_iter, row_iter, weight_index
        return None

    @staticmethod
    def _schedule(sch, main: SBlockInfo, vector_iter, row_iter, weight_index, config: CPUScheduleConfig):
        block = main.block_rv
        block_name = sch.get(block).name_hint
        weight_buffer = sch.get(block).reads[weight_index].source
        out_indices = [r.min for r in sch.get(block).writes[0].region]

        # Step 1. Prologues that feed the contraction (pad, transposes) stay separate loop nests:
        # inlining a pad would put a bounds check in the innermost loop. Everything else is inlined
        # into the single epilogue.
        fused = _fuse_around(sch, block_name, config)
        if fused is None:
            return None
        block, epilogues = fused

        # Step 2. Tile sizes: the vector axis takes whole SIMD registers, the row axis the largest
        # divisor that keeps the accumulator tile within the register budget.
        lanes = config.vector_lanes
        vector_tile = _largest_divisor(
            vector_iter.dom,
            [lanes * k for k in range(config.vectors_per_tile, 0, -1)] + [lanes // 2, lanes // 4, 2],
        )
        if vector_tile is None or vector_tile < 2:
            return None

        # Step 3. Loop order: outer spatial axes, vector blocks, other spatial axes, row blocks,
        # reductions, then the register tile (rows unrolled, vector lanes innermost).
        loops = {id(it): it.loop_rv for it in main.iters}
        vector_outer, vector_inner = sch.split(loops[id(vector_iter)], factors=[None, vector_tile])
        row_outer, row_inner = [], []
        if row_iter is not None:
            row_tile = _largest_divisor(row_iter.dom, range(config.max_tile_rows, 0, -1))
            row_outer, row_inner = sch.split(loops[id(row_iter)], factors=[None, row_tile])
            row_outer, row_inner = [row_outer], [row_inner]
        vector_position = _output_position(out_indices, vector_iter.var)
        others = [it for it in main.iters if it.kind == "S" and it is not vector_iter and it is not row_iter]
        before = [loops[id(it)] for it in others if _output_position(out_indices, it.var) < vector_position]
        after = [loops[id(it)] for it in others if _output_position(out_indices, it.var) >= vector_position]
        reduction_loops = [loops[id(it)] for it in main.iters if it.kind == "R"]
        sch.reorder(*before, vector_outer, *after, *row_outer, *reduction_loops, *row_inner, vector_inner)

        # Step 4. Parallelise over output tiles; each core owns whole vector blocks when possible.
        parallel_loop, inner_spatial = _parallelize_leading(sch, [*before, vector_outer, *after, *row_outer], config)
        tile_loop = inner_spatial[-1] if inner_spatial else parallel_loop

        # Step 5. The weight panel of one vector block is packed so that the vector lanes are
        # contiguous (a conv weight is [F, C, KH, KW]: lanes of F are C*KH*KW apart).
        if not _is_lane_contiguous(weight_buffer, sch.get(block).reads[weight_index], vector_iter.var):
            pack_axis = _buffer_axis_of(sch.get(block).reads[weight_index], vector_iter.var)
            if pack_axis is None:
                return None
            packed = sch.cache_read(block, weight_index, "global")
            ndim = len(weight_buffer.shape)
            sch.transform_layout(
                packed,
                ("write", 0),
                lambda *idx: [idx[pack_axis] // vector_tile]
                + [idx[i] for i in range(ndim) if i != pack_axis]
                + [idx[pack_axis] % vector_tile],
            )
            # A packed weight that is a function parameter is marked as layout-rewrite preprocessing:
            # cpu_pipeline splits it into its own PrimFunc, which FoldConstant runs at compile time.
            if any(weight_buffer.same_as(b) for b in sch.mod["main"].params):
                sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
            _schedule_spatial_block(sch, packed, config)

        # Step 6. The accumulator tile goes to a local buffer, written back (through the epilogue)
        # right after the reduction of that tile.
        if epilogues:
            sch.set_scope(block, 0, "local")
            writeback = epilogues[0]
        else:
            writeback = sch.cache_write(block, 0, "local")
        # The accumulator's vector axis goes innermost (a conv output is [N, F, H, W]) so that a
        # tile row is one contiguous register's worth and LLVM keeps the tile in registers.
        ndim = len(out_indices)
        if vector_position != ndim - 1:
            sch.transform_layout(
                block,
                ("write", 0),
                lambda *idx: [idx[i] for i in range(ndim) if i != vector_position] + [idx[vector_position]],
            )
        sch.reverse_compute_at(writeback, tile_loop, preserve_unit_loops=True)
        _vectorize_last(sch, writeback, config)

        # Step 7. SIMD lanes and unrolled rows, then split the init out of the reduction.
        sch.vectorize(vector_inner)
        for loop in row_inner:
            sch.unroll(loop)
        sch.decompose_reduction(block, reduction_loops[0])

        return sch


def _fuse_around(sch: s_tir.Schedule, block_name: str, config: CPUScheduleConfig):
    """Inline everything but the main block's prologues (scheduled as parallel nests of their
    own) and at most one epilogue; returns (main block, tile-fusable epilogues), or None when
    more than one epilogue is left."""
    prologues = _upstream_of(sch, sch.get_sblock(block_name))
    _inline_injective_except(sch, prologues | {block_name})
    block = sch.get_sblock(block_name)
    epilogues = [b for b in _root_blocks(sch) if sch.get(b).name_hint not in prologues | {block_name}]
    if len(epilogues) > 1:
        return None
    epilogues = _tile_fusable(sch, block, epilogues, config)
    for name in prologues:
        _schedule_spatial_block(sch, sch.get_sblock(name), config)
    return block, epilogues


def _iteration_count(block) -> int | None:
    count = 1
    for iv in block.iter_vars:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        count *= int(iv.dom.extent)
    return count


def _tile_fusable(sch: s_tir.Schedule, block, epilogues, config: CPUScheduleConfig) -> list:
    """The epilogues that may be computed tile by tile inside the contraction's loops.

    ``reverse_compute_at`` runs only the epilogue iterations that read a computed tile, so an
    epilogue with more iterations than the contraction has outputs (a fused ``pad``: its border
    reads nothing) would leave those elements unwritten (uninitialised memory, seen as wrong and
    call-to-call different outputs). Such an epilogue stays a loop nest of its own, scheduled as a
    spatial block after the contraction.
    """
    if not epilogues:
        return epilogues
    produced = 1
    for extent in sch.get(block).writes[0].source.shape:
        if not isinstance(extent, tirx.IntImm):
            return []
        produced *= int(extent)
    count = _iteration_count(sch.get(epilogues[0]))
    if count is not None and count <= produced:
        return epilogues
    _schedule_spatial_block(sch, epilogues[0], config)
    return []


def _output_position(out_indices, var) -> int:
    for position, index in enumerate(out_indices):
        if var in _vars_in([index]):
            return position
    return -1


def _buffer_axis_of(region, var) -> int | None:
    for axis, rng in enumerate(region.region):
        if rng.min.same_as(var):
            return axis
    return None


def _is_lane_contiguous(buffer, region, var) -> bool:
    return _buffer_axis_of(region, var) == len(buffer.shape) - 1


def _vectorize_last(sch: s_tir.Schedule, block, config: CPUScheduleConfig) -> None:
    loops = sch.get_loops(block)
    if loops:
        _vectorize_inner(sch, loops[-1], config)


class SpatialInnerReduction(_SingleReductionRule):
    """Depthwise/grouped conv2d and pooling: reductions hoisted over a vectorised output row.

    Applies to one reduction block whose innermost output axis also indexes the innermost axis of
    every input it reads (``pad[n, c, y*s + ry, x*s + rx]``), so vector lanes along that axis load
    neighbouring (or evenly strided) elements. The row accumulates in a local buffer.
    """

    @staticmethod
    def _match(sch: s_tir.Schedule, main: SBlockInfo):
        """The row axis: the innermost output axis, if every input walks along it or ignores it."""
        stmt = sch.get(main.block_rv)
        if len(stmt.writes) != 1 or not stmt.reads or any(not isinstance(it.dom, int) for it in main.iters):
            return None
        out_last = stmt.writes[0].region[-1].min
        inner = next((it for it in main.iters if it.kind == "S" and out_last.same_as(it.var)), None)
        # Each input either walks along the row in its innermost axis or is constant along it.
        if inner is None or any(
            inner.var in _region_vars(r) and inner.var not in _vars_in([r.region[-1].min]) for r in stmt.reads
        ):
            return None
        return (inner,)

    @staticmethod
    def _schedule(sch, main: SBlockInfo, inner, config: CPUScheduleConfig):
        block = main.block_rv
        block_name = sch.get(block).name_hint

        # Step 1. Inline the epilogue chain; prologues (pads) stay parallel loop nests of their own.
        fused = _fuse_around(sch, block_name, config)
        if fused is None:
            return None
        block, epilogues = fused

        # Step 2. Order: outer spatial axes, reductions, then the vectorised row.
        loops = {id(it): it.loop_rv for it in main.iters}
        outer = [loops[id(it)] for it in main.iters if it.kind == "S" and it is not inner]
        reduction_loops = [loops[id(it)] for it in main.iters if it.kind == "R"]
        row = loops[id(inner)]
        if inner.dom > config.max_vector_extent:
            row_tile = _largest_divisor(inner.dom, (4 * config.vector_lanes, 2 * config.vector_lanes, config.vector_lanes))
            if row_tile is None:
                row_tile = _largest_divisor(inner.dom, range(config.max_vector_extent, 0, -1))
            row_outer, row = sch.split(row, factors=[None, row_tile])
            outer.append(row_outer)
        sch.reorder(*outer, *reduction_loops, row)

        # Step 3. Parallel outer axes; the row accumulator is local to one iteration.
        parallel_loop, inner_spatial = _parallelize_leading(sch, outer, config)
        tile_loop = inner_spatial[-1] if inner_spatial else parallel_loop
        if tile_loop is None:
            return None
        if epilogues:
            sch.set_scope(block, 0, "local")
            writeback = epilogues[0]
        else:
            writeback = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(writeback, tile_loop, preserve_unit_loops=True)
        _vectorize_last(sch, writeback, config)

        # Step 4. Vector lanes along the row; short reductions (3x3 windows) unrolled so that the
        # row accumulator stays in registers across them.
        if inner.dom >= 2:
            sch.vectorize(row)
        for loop, it in zip(reduction_loops, [it for it in main.iters if it.kind == "R"]):
            if it.dom <= _MAX_UNROLLED_REDUCTION:
                sch.unroll(loop)
        sch.decompose_reduction(block, reduction_loops[0])
        return sch


class _UnscheduledRootRule(_ConfiguredRule):
    """A rule for an unscheduled LLVM PrimFunc with a root block: ``_schedule_root(sch, config)``
    returns the schedule or None (not this rule's)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        found = _unscheduled_root(func, target, self.config)
        if found is None:
            return None
        return self._schedule_root(*found)


class ParallelVectorizeFallback(_UnscheduledRootRule):
    """Any other PrimFunc: inline injective chains, then per root block parallel + vectorise."""

    def _schedule_root(self, sch: s_tir.Schedule, config: CPUScheduleConfig) -> s_tir.Schedule | None:
        # Step 1. Fewer, fatter loop nests: inline every injective block that allows it, keeping
        # the outputs.
        untouched = sch.copy()
        try:
            _inline_injective_except(sch, set())
        except _SCHEDULE_ERRORS:
            sch = untouched
        # Step 2. Each remaining nest independently; a nest that resists keeps its serial loops.
        for block in _root_blocks(sch):
            name = sch.get(block).name_hint
            snapshot = sch.copy()
            try:
                _schedule_spatial_block(sch, sch.get_sblock(name), config)
            except _SCHEDULE_ERRORS:
                sch = snapshot
        return sch


def _outer_axis_reduction_inner(block) -> int | None:
    """Position of a reduction block's innermost spatial iterator when it walks the innermost
    axis of the output and of every input (the reduced axis is an outer one), else None."""
    kinds = [iv.iter_type for iv in block.iter_vars]
    spatial = next((i for i, kind in enumerate(kinds) if kind != tirx.IterVar.DataPar), len(kinds))
    if spatial == 0 or spatial == len(kinds) or any(kind != tirx.IterVar.CommReduce for kind in kinds[spatial:]):
        return None
    inner = block.iter_vars[spatial - 1].var
    if len(block.writes) != 1 or not block.writes[0].region[-1].min.same_as(inner):
        return None
    for read in block.reads:
        if inner in _region_vars(read) and not read.region[-1].min.same_as(inner):
            return None
    return spatial - 1


class OuterAxisReduction(_UnscheduledRootRule):
    """Reductions over an outer axis (softmax over channels, as YOLOv8's box head does over its
    16 distance bins): the reduction loops move outside a vectorised run of the innermost output
    axis, so the lanes load neighbouring elements instead of striding along the reduced axis.

    Applies to an LLVM PrimFunc whose every reduction block reduces over axes that are not the
    innermost one of any buffer it touches (see :func:`_outer_axis_reduction_inner`); a
    last-axis reduction is :class:`LastAxisReduction`'s.
    """

    def _schedule_root(self, sch: s_tir.Schedule, config: CPUScheduleConfig) -> s_tir.Schedule | None:
        blocks = [sch.get(b) for b in _root_blocks(sch)]
        reductions = [b for b in blocks if any(iv.iter_type != tirx.IterVar.DataPar for iv in b.iter_vars)]
        if not reductions or any(_outer_axis_reduction_inner(b) is None for b in reductions):
            return None
        try:
            _inline_injective_except(sch, set())
            for block in _root_blocks(sch):
                stmt = sch.get(block)
                inner = _outer_axis_reduction_inner(stmt)
                if inner is None:
                    _schedule_spatial_block(sch, block, config)
                    continue
                loops = sch.get_loops(block)
                if len(loops) != len(stmt.iter_vars):
                    return None
                extent = _const_extent(sch, loops[inner])
                lanes = config.vector_lanes
                # Lane multiples first; else the longest run LLVM still spreads over whole and
                # partial registers (YOLOv8's 2100 anchors per distance: 60).
                tile = None if extent is None else _largest_divisor(
                    extent, (4 * lanes, 2 * lanes, lanes, *range(config.max_vector_extent, lanes, -1))
                )
                if tile is None:
                    return None
                row_outer, row = sch.split(loops[inner], factors=[None, tile])
                outer = [*loops[:inner], row_outer]
                reduction_loops = list(loops[inner + 1:])
                sch.reorder(*outer, *reduction_loops, row)
                _parallelize_leading(sch, outer, config)
                sch.vectorize(row)
                init = sch.decompose_reduction(block, reduction_loops[0])
                _vectorize_last(sch, init, config)
        except _SCHEDULE_ERRORS:
            return None
        return sch


class LastAxisReduction(dlight.cpu.Reduction):
    """TVM's CPU reduction rule (softmax, layer norm), also honouring the older ``tir.is_scheduled``."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or _is_prescheduled(func):
            return None
        return super().apply(func, target, tunable)


def default_cpu_rules(target: Target, config: CPUScheduleConfig | None = None) -> list[dlight.ScheduleRule]:
    """The default CPU schedule rules, most specific first.

    Parameters
    ----------
    target : Target
        An LLVM target; its SIMD width and core count pick the tunables.
    config : CPUScheduleConfig, optional
        Overrides the per-target tunables.

    Returns
    -------
    list of ScheduleRule
        Rules for ``tvm.s_tir.dlight.ApplyDefaultSchedule``.
    """
    if target.kind.name != "llvm":
        raise BitqError(f"default_cpu_rules: target kind '{target.kind.name}' is not llvm")
    config = config or CPUScheduleConfig.for_target(target)
    return [
        RegisterTiledContraction(config),
        SpatialInnerReduction(config),
        OuterAxisReduction(config),
        LastAxisReduction(),
        ParallelVectorizeFallback(config),
    ]


def cpu_pipeline(target: Target, extra_passes_before=()) -> tvm.transform.Pass:
    """TVM's default CPU Relax pipeline with the default schedules applied after FuseTIR.

    Parameters
    ----------
    target : Target
        The LLVM target to compile for.
    extra_passes_before : sequence of Pass
        Passes run first, before library dispatch and legalisation (e.g. BFP rewrites).

    Returns
    -------
    tvm.transform.Pass
        A pass for ``tvm.compile(mod, target, relax_pipeline=...)``.
    """
    rules = default_cpu_rules(target)

    @tvm.transform.module_pass(opt_level=0, name="BitqCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            passes = [
                *extra_passes_before,
                *cpu_generic.library_dispatch_passes(target),
                # float32 exp/sigmoid/softmax as vectorisable arithmetic, not scalar expf calls
                relax.transform.LegalizeOps(customize_legalize_map=float_math.legalize_map()),
                *cpu_generic.legalize_passes(target),
                dlight.ApplyDefaultSchedule(*rules),
                # Weight packing blocks become PrimFuncs of their own, folded on constant weights.
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                relax.transform.DeadCodeElimination(),
                *cpu_generic.dataflow_lower_passes(target),
                *cpu_generic.finalize_passes(target),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
