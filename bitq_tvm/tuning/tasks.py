"""Tuning tasks: one per distinct integer BFP GEMM a model needs, plus its FP32 work.

A BFP layer runs as im2col + :func:`~bitq_tvm.kernels.bfp_matmul.bfp_matmul_compute`, the GEMM
:func:`~bitq_tvm.kernels.contract.gemm_geometry` gives (a conv with output ``[N, C_out, OH, OW]``:
``M = N * OH * OW`` rows, ``C_out / groups`` columns, ``K = KH * KW * pad(C_in / groups, B)``; a
matmul: ``M = rows``, ``N = out features``, ``K = pad(in features, B)``). Layers x candidate formats that give the same
(M, N, K, formats, kernel variant) share one task. The variant is the one deployment runs on the
target (:func:`~bitq_tvm.kernels.bfp_matmul_variants.kernel_variant`: ``vnni``/``avx2``/
``generic`` on x86, ``sdot``/``neon`` on ARM, ``rvv``/``scalar`` on RISC-V), so the kernel
measured is the kernel deployed: ``vnni`` tunes the unsigned-weight compute of
:mod:`~bitq_tvm.kernels.bfp_matmul`, the others the signed one (schedules in
:mod:`~bitq_tvm.kernels.bfp_matmul_x86` and :mod:`~bitq_tvm.kernels.bfp_matmul_arm_riscv`).

Task names are deterministic and double as keys: the task's PrimFunc carries its name as
``global_symbol``, so every workload in a MetaSchedule database names its task, e.g.
``bfp_matmul_m64_n32_k288_a8b32_w8b32_vnni``.

The search space (:func:`bfp_matmul_space`) is our kernel's layout and intrinsic with its
register tile and loop order left open: MetaSchedule's generic x86 rules inline the weight
unpacking into the reduction and then cannot tensorize it, so they never reach ``vpdpbusd`` here,
and they know nothing of our sdot/rvv intrinsics.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from types import MappingProxyType
from typing import Iterable, Mapping

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule, TensorIntrin

from ..errors import BitqError
from ..formats import BFPFormat
from ..frontend.onnx_model import Layer, OnnxModel
from ..plan import LayerFormats
from ..kernels.bfp_matmul import TunedConfig, bfp_matmul_compute, bfp_matmul_name
from ..kernels.bfp_matmul_arm_riscv import LANE_MAJOR_VARIANTS, schedule_bfp_matmul_arm_riscv
from ..kernels.bfp_matmul_variants import kernel_variant
from ..kernels.bfp_matmul_x86 import UNSIGNED_WEIGHT_VARIANTS, reads_nibbles_inline
from ..kernels.bfp_matmul_x86 import VARIANTS as X86_VARIANTS
from ..kernels.bfp_matmul_x86 import schedule_bfp_matmul_x86
from ..kernels.contract import K_QUAD, LANES, MAX_BLOCK, MIN_BLOCK, block_size_problem, gemm_geometry, padded
from ..kernels.intrin_x86 import _dot_16x4_u8i8i32_desc, _dot_16x4_u8i8i32_vnni
from ..targets.presets import TargetPreset

__all__ = [
    "BfpTask",
    "Fp32Task",
    "TaskSet",
    "TUNABLE_VARIANTS",
    "layer_gemm",
    "bfp_matmul_space",
    "space_configs",
    "space_size",
    "tuned_config",
    "TunedConfig",
    "extract_bfp_tasks",
    "extract_fp32_tasks",
    "extract_tasks",
    "register_metaschedule_intrinsics",
]

# MetaSchedule's default x86 rules look the VNNI intrinsic up by this name.
METASCHEDULE_VNNI_NAME = "dot_16x4_vnni"
# Register-tile choices explored, (rows of A, 16-lane column groups, max rows x groups). x86: at
# most 8 zmm accumulator pairs (int32 block sums + float32 outputs) of the 32 registers. ARM/RVV
# (128-bit vectors): one row x group is 4 + 4 accumulator vectors, so 4 already fill all 32 and
# spill; the search measures whether that still pays.
_X86_TILES = ((1, 2, 3, 4, 6, 8), (1, 2, 4), 8)
_LANE_MAJOR_TILES = ((1, 2, 3, 4), (1, 2), 4)
_LOOP_ORDERS = ("columns_outer", "rows_outer")
# Block annotation naming a design space's point (rows x groups : order) in its trace.
POINT_ANNOTATION = "bitq.tile"
# Auto-unroll steps sampled for the loops outside the register tile (0: LLVM decides).
_UNROLL_STEPS = (0, 16, 64, 512)
TUNABLE_VARIANTS = X86_VARIANTS + LANE_MAJOR_VARIANTS


def register_metaschedule_intrinsics() -> None:
    """Point MetaSchedule's ``dot_16x4_vnni`` at our LLVM-22-correct VNNI intrinsic.

    TVM's own version fails LLVM 22 verification; its x86 rules find the intrinsic by name, so
    anything they tensorize (e.g. int8 work outside our kernels) then builds.
    """
    import tvm.s_tir.tensor_intrin  # noqa: F401 - registers TVM's intrinsics first, so ours wins

    TensorIntrin.register(METASCHEDULE_VNNI_NAME, _dot_16x4_u8i8i32_desc, _dot_16x4_u8i8i32_vnni,
                          override=True)


@dataclasses.dataclass(frozen=True)
class BfpTask:
    """One integer BFP GEMM to tune: ``C[m, n] = A[m, k] @ W[n, k].T`` in formats (fmt_a, fmt_w).

    ``k`` is the padded reduction length (a multiple of the block size). ``calls`` is how many
    times one inference runs it (the conv groups), ``users`` the (layer, candidate label) pairs
    it serves.
    """

    m: int
    n: int
    k: int
    fmt_a: BFPFormat
    fmt_w: BFPFormat
    variant: str
    calls: int = 1
    users: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if min(self.m, self.n, self.k, self.calls) <= 0:
            raise BitqError(f"tuning task m={self.m} n={self.n} k={self.k} calls={self.calls}: all must be positive")
        if self.fmt_a.block_size != self.fmt_w.block_size or self.k % self.fmt_a.block_size:
            raise BitqError(f"tuning task {self.name}: k must be whole blocks of one shared block size")
        if self.variant not in TUNABLE_VARIANTS:
            raise BitqError(f"tuning task: variant {self.variant!r} is not one of {', '.join(TUNABLE_VARIANTS)}")

    @property
    def name(self) -> str:
        return bfp_matmul_name(self.m, self.n, self.k, self.fmt_a, self.fmt_w, self.variant)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per inference (all calls)."""
        return self.m * self.n * self.k * self.calls

    def prim_func(self) -> tirx.PrimFunc:
        """The unscheduled kernel of the task's variant, named after the task (its database key)."""
        func = bfp_matmul_compute(self.m, self.n, self.k, self.fmt_a, self.fmt_w,
                                  unsigned_weights=self.variant in UNSIGNED_WEIGHT_VARIANTS,
                                  inline_nibbles=reads_nibbles_inline(self.variant, self.fmt_w))
        return func.with_attr("global_symbol", self.name)


@dataclasses.dataclass(frozen=True)
class Fp32Task:
    """FP32 work of the model (everything TVM extracts from its FP32 Relax module)."""

    name: str
    mod: tvm.IRModule = dataclasses.field(compare=False, repr=False)
    weight: int
    flops: float

    def __post_init__(self):
        if not self.name.startswith("fp32_"):
            raise BitqError(f"FP32 tuning task name {self.name!r} must start with 'fp32_'")
        if self.weight <= 0:
            raise BitqError(f"FP32 tuning task {self.name}: weight must be positive")

    @property
    def macs(self) -> int:
        """Multiply-accumulates per inference (half the FLOPs, times the call count)."""
        return max(1, int(self.flops / 2)) * self.weight


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """A model's tuning tasks for one target, BFP GEMMs first, each list sorted by name."""

    target: str
    bfp: tuple[BfpTask, ...]
    fp32: tuple[Fp32Task, ...] = ()

    def __post_init__(self):
        names = [t.name for t in self.all]
        if len(set(names)) != len(names):
            raise BitqError(f"tuning tasks for target {self.target}: duplicate task names")

    @property
    def all(self) -> tuple:
        return (*self.bfp, *self.fp32)

    def by_name(self) -> Mapping[str, object]:
        return MappingProxyType({t.name: t for t in self.all})


def layer_gemm(layer: Layer, block_size: int) -> tuple[int, int, int, int]:
    """(M, N, K padded per block, calls) of ``layer``'s GEMM after im2col, as the deployment runs it."""
    g = gemm_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, block_size, layer.groups)
    return g.rows_padded, g.n, g.k_padded, g.groups


def extract_bfp_tasks(model: OnnxModel, candidates: Mapping[str, Iterable[LayerFormats]],
                      preset: TargetPreset) -> tuple[BfpTask, ...]:
    """One task per distinct GEMM of ``model``'s layers x their BFP candidates, sorted by name
    (depthwise convs, which run the untuned depthwise kernel, add none).

    Parameters
    ----------
    candidates : mapping
        Layer name -> candidates (e.g. ``LayerCandidates.resolve``); FP32 candidates add none.
    """
    variant = kernel_variant(preset.tvm_target())
    users: dict[tuple, list[tuple[str, str]]] = {}
    for layer in model.layers:
        if layer.is_depthwise:  # the depthwise kernel is no GEMM and has no tuning space
            continue
        for cand in candidates.get(layer.name, ()):
            if cand.is_fp32:
                continue
            block = cand.block_size
            if block_size_problem(block) is not None:
                raise BitqError(f"candidate {cand.label} of layer '{layer.name}': the integer kernel takes "
                                f"block sizes that are multiples of {K_QUAD} in [{MIN_BLOCK}, {MAX_BLOCK}], not {block}")
            m, n, k, calls = layer_gemm(layer, block)
            key = (m, n, k, cand.activation, cand.weight, calls)
            users.setdefault(key, []).append((layer.name, cand.label))
    tasks = [BfpTask(m, n, k, fa, fw, variant, calls, tuple(u)) for (m, n, k, fa, fw, calls), u in users.items()]
    merged: dict[str, BfpTask] = {}
    for task in tasks:  # same GEMM at different call counts: one kernel, MACs added up
        if task.name in merged:
            old = merged[task.name]
            task = dataclasses.replace(old, calls=old.calls + task.calls, users=old.users + task.users)
        merged[task.name] = task
    return tuple(merged[name] for name in sorted(merged))


def extract_fp32_tasks(model: OnnxModel, preset: TargetPreset) -> tuple[Fp32Task, ...]:
    """The FP32 model's TIR tasks (``ms.relax_integration.extract_tasks``), named ``fp32_<task>``."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    from ..frontend.relax_import import import_relax

    mod, params = import_relax(model)
    mod = relax.transform.BindParams("main", params)(mod)
    # The default pipeline's front half: legalized, constant-folded, fused: the kernels compile runs.
    mod = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
    ])(mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extracted = ms.relax_integration.extract_tasks(mod, preset.tvm_target())
    tasks = []
    for task in extracted:
        flops = float(estimate_tir_flops(task.dispatched[0]))
        tasks.append(Fp32Task("fp32_" + task.task_name, task.dispatched[0], int(task.weight), flops))
    return tuple(sorted(tasks, key=lambda t: t.name))


def extract_tasks(model: OnnxModel, candidates: Mapping[str, Iterable[LayerFormats]], preset: TargetPreset,
                  include_fp32: bool = True) -> TaskSet:
    """All tuning tasks of ``model`` on ``preset``: BFP GEMMs of every candidate, then FP32 work."""
    fp32 = extract_fp32_tasks(model, preset) if include_fp32 else ()
    return TaskSet(preset.name, extract_bfp_tasks(model, candidates, preset), fp32)


# --- search space ---------------------------------------------------------------------------------


def space_configs(task: BfpTask) -> tuple[tuple[int, int, str], ...]:
    """(tile rows, 16-lane column groups, loop order) points of the task's search space."""
    tile_rows, tile_groups, max_tile = _X86_TILES if task.variant in X86_VARIANTS else _LANE_MAJOR_TILES
    n_tiles = padded(task.n, LANES) // LANES
    rows = [r for r in tile_rows if task.m % r == 0]
    groups = [g for g in tile_groups if n_tiles % g == 0]
    # with one row tile or one column tile, both orders are the same program: keep one
    return tuple((r, g, order) for r, g, order in itertools.product(rows, groups, _LOOP_ORDERS)
                 if r * g <= max_tile
                 and (order == _LOOP_ORDERS[0] or (task.m > r and n_tiles > g)))


def schedule_bfp_matmul(sch: Schedule, task: BfpTask, rows: int, groups: int, order: str,
                        intrinsic: str | None = None, sampled: bool = False) -> None:
    """Schedule ``task``'s kernel in ``sch`` with one register tile and loop order (see
    :func:`bitq_tvm.kernels.bfp_matmul_x86.schedule_bfp_matmul_x86` for x86 variants,
    :func:`bitq_tvm.kernels.bfp_matmul_arm_riscv.schedule_bfp_matmul_arm_riscv` for the others).
    ``intrinsic`` replaces an x86 variant's tensor intrinsic (tests plant a wrong one);
    ``sampled`` adds the space's sampled decisions (:func:`bfp_matmul_space`)."""
    if task.variant in X86_VARIANTS:
        schedule_bfp_matmul_x86(sch, rows, groups, task.variant, order, intrinsic, sample_task_rows=sampled)
    elif intrinsic is not None:
        raise BitqError(f"tuning task {task.name}: only x86 variants take an intrinsic override")
    else:
        schedule_bfp_matmul_arm_riscv(sch, task.variant, rows, groups, order)


def space_size(task: BfpTask) -> int:
    """An upper bound on the distinct candidates of the task's space: tile points x unroll
    choices x row tiles per task (x86, the choices of ``sample_perfect_tile``)."""
    n = 0
    for rows, _groups, order in space_configs(task):
        row_tiles = task.m // rows
        chunks = (sum(1 for c in range(1, max(1, 64 // rows) + 1) if row_tiles % c == 0)
                  if task.variant in X86_VARIANTS and order == _LOOP_ORDERS[0] and rows > 1 else 1)
        n += chunks * len(_UNROLL_STEPS)
    return n


def bfp_matmul_space(task: BfpTask):
    """MetaSchedule space generator: one design space per point of :func:`space_configs`, each
    with sampled decisions the evolutionary search mutates and the XGBoost model ranks.

    The point (register tile, loop order) fixes the loop structure and the intrinsic, so it is a
    design space of its own; within it, ``sample_categorical`` picks the auto-unroll step of the
    loops outside the register tile (``meta_schedule.unroll_explicit``, applied by the
    ``RewriteParallelVectorizeUnroll`` postprocessor, mutated by ``MutateUnroll``), and on x86
    ``sample_perfect_tile`` the row tiles per parallel task (``MutateTileSize``). Perfect tiles
    and a fixed menu of steps keep every candidate valid; the verify gate still checks each.
    """
    from tvm.s_tir import meta_schedule as ms

    configs = space_configs(task)

    def design_spaces(sch: Schedule) -> list[Schedule]:
        spaces = []
        for rows, groups, order in configs:
            copy = sch.copy()
            schedule_bfp_matmul(copy, task, rows, groups, order, sampled=True)
            root = copy.get_sblock("root")
            step = copy.sample_categorical(list(_UNROLL_STEPS), [1 / len(_UNROLL_STEPS)] * len(_UNROLL_STEPS))
            copy.annotate(root, "meta_schedule.unroll_explicit", step)
            # the point, in the trace: deployment rebuilds the fused kernel with it (tuned_config)
            copy.annotate(root, POINT_ANNOTATION, f"{rows}x{groups}:{order}")
            spaces.append(copy)
        return spaces

    return ms.space_generator.ScheduleFn(
        design_spaces, sch_rules=[], postprocs=[ms.postproc.RewriteParallelVectorizeUnroll()],
        mutator_probs={ms.mutator.MutateUnroll(): 0.5, ms.mutator.MutateTileSize(): 0.5})


def tuned_config(trace) -> TunedConfig | None:
    """The :class:`TunedConfig` of a trace of :func:`bfp_matmul_space`, None for other traces."""
    point, task_rows, unroll = None, None, 0
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "Annotate" and str(inst.attrs[0]) == POINT_ANNOTATION:
            point = str(inst.inputs[1])
        elif kind == "SamplePerfectTile":
            task_rows = int(trace.decisions[inst][-1])
        elif kind == "SampleCategorical":
            unroll = int(inst.attrs[0][int(trace.decisions[inst])])
    if point is None:
        return None
    tile, order = point.strip('"').split(":")
    rows, groups = (int(v) for v in tile.split("x"))
    return TunedConfig(rows, groups, order, task_rows, unroll)
