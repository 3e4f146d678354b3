"""The BFP GEMM search space has sampled decisions, and every sampled candidate is right.

Candidates are drawn the way MetaSchedule's search draws them (design spaces generated under
different random states, then the space's postprocessors), built for the host and checked
against the NumPy oracle by the verify gate's own check.
"""

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms

from bitq_tvm.formats import BFPFormat
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.targets import host_preset
from bitq_tvm.targets.presets import get_target
from bitq_tvm.tuning.session import tuning_target
from bitq_tvm.tuning.tasks import BfpTask, bfp_matmul_space, register_metaschedule_intrinsics, space_configs, space_size
from bitq_tvm.tuning.verify import check_kernel, kernel_runner

FMT8 = BFPFormat(8, 32)
VARIANT = kernel_variant(host_preset().tvm_target())
TASK = BfpTask(16, 32, 64, FMT8, FMT8, VARIANT)
# a design space is built without running code: each x86 variant on its own preset's target
X86_PRESETS = {"vnni": "avx512-vnni", "avx2": "avx2", "generic": "avx2"}


def _spaces(task, seed, preset=None):
    register_metaschedule_intrinsics()
    target = tuning_target(preset or host_preset())
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": task.prim_func()}), target=target,
                         space_generator=bfp_matmul_space(task), rand_state=seed).clone()
    return ctx, ctx.generate_design_space()


def _unpacks_weights(task):
    """True if the kernel unpacks a weight panel per tile (``w_tile``), whose reuse by the
    task's row tiles is what the row-tiles-per-task decision trades."""
    return "w_tile" in task.prim_func().script()


@pytest.mark.parametrize("variant", sorted(X86_PRESETS))
def test_design_spaces_carry_sampled_decisions(variant):
    task = BfpTask(16, 32, 64, FMT8, FMT8, variant)
    _ctx, spaces = _spaces(task, 0, get_target(X86_PRESETS[variant]))
    assert len(spaces) == len(space_configs(task))
    kinds = [[inst.kind.name for inst in sch.trace.insts] for sch in spaces]
    assert all("SampleCategorical" in k for k in kinds)  # the unroll step
    # row tiles per task are sampled on the columns-outer points of a kernel that unpacks its
    # weights (VNNI's +128-offset panel), and only there
    assert any("SamplePerfectTile" in k for k in kinds) == _unpacks_weights(task)
    assert space_size(task) > len(space_configs(task))


@pytest.mark.parametrize("seed", [1, 2])
def test_every_sampled_candidate_builds_and_matches_the_oracle(seed, tmp_path):
    ctx, spaces = _spaces(TASK, seed)
    target = tuning_target(host_preset())
    decisions = set()
    for sch in spaces:
        for postproc in ctx.space_generator.postprocs:
            postproc._initialize_with_tune_context(ctx)
            assert postproc.apply(sch)
        decisions.add(str(sch.trace))
        lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", TASK.name), target=target)
        assert check_kernel(TASK, kernel_runner(TASK, lib, host_preset(), str(tmp_path)), seed) <= 1.0
    assert len(decisions) == len(spaces)


def test_every_row_tiles_decision_replays_on_the_recorded_structure():
    """MetaSchedule mutates decisions and replays the trace: each perfect-tile decision of each
    design space must replay (the loop counts the trace recorded must not change)."""
    from tvm.s_tir import Schedule

    task = BfpTask(16, 32, 64, FMT8, FMT8, "vnni")  # the variant whose spaces sample row tiles
    assert _unpacks_weights(task)
    _ctx, spaces = _spaces(task, 0, get_target("avx512-vnni"))
    replayed = 0
    for sch in spaces:
        trace = sch.trace
        for inst in trace.insts:
            if inst.kind.name != "SamplePerfectTile":
                continue
            extent = 1
            for d in trace.decisions[inst]:
                extent *= int(d)
            for inner in (d for d in range(1, extent + 1) if extent % d == 0):
                fresh = Schedule(tvm.IRModule({"main": task.prim_func()}))
                trace.with_decision(inst, [extent // inner, inner], remove_postproc=True).apply_to_schedule(
                    fresh, remove_postproc=True)
                replayed += 1
    assert replayed > 0
