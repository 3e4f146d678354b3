"""Real (tiny) tuning runs: kill + resume, verification of tuned kernels, the latency table.

One module-scoped work dir is tuned once (4 trials of a 16x32x64 BFP8 GEMM) by a subprocess that
is SIGKILLed after its first records land, then resumed here; the other tests read it. The
subprocess uses the default batch option: a task is measured in several batches (records land per
batch), so the kill falls inside the task and its first batch survives.

No wall-clock expectation: the wait for the first record is bounded only by KILL_DEADLINE_S, a
bound against a hang far above any loaded machine's duration, not a speed requirement.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from scipy.stats import spearmanr
import tvm
from tvm.s_tir import Schedule, TensorIntrin
from tvm.s_tir import meta_schedule as ms
from tvm.script import tirx as T

from bitq_tvm.formats import BFPFormat
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path
from bitq_tvm.kernels.bfp_matmul_x86 import UNSIGNED_WEIGHT_VARIANTS
from bitq_tvm.kernels.intrin_x86 import dot_desc
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
from bitq_tvm.solver.performance import SECONDS_UNIT, performance_term
from bitq_tvm.targets import host_preset
from bitq_tvm.tuning.latency import latency_table, measured_task_seconds
from bitq_tvm.tuning.session import DEFAULTS_FILE, FAILED_RUN_SECS, RECORD_FILE, TuningOptions, tune
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.tuning.tasks import BfpTask, extract_bfp_tasks, schedule_bfp_matmul
from bitq_tvm.tuning.verify import tuned_prim_funcs, verify_tasks

FMT8 = BFPFormat(8, 32)
HOST_VARIANT = kernel_variant(host_preset().tvm_target())
TASK = BfpTask(16, 32, 64, FMT8, FMT8, HOST_VARIANT)
TRIALS = 4
OPTIONS = TuningOptions(min_trials_per_task=TRIALS, trials_per_iteration=2, population_size=16)
KILL_DEADLINE_S = 1800

_TUNE_SCRIPT = textwrap.dedent("""
    import sys
    from bitq_tvm.formats import BFPFormat
    from bitq_tvm.targets import host_preset
    from bitq_tvm.tuning.session import TuningOptions, tune
    from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
    from bitq_tvm.tuning.tasks import BfpTask
    fmt = BFPFormat(8, 32)
    tune([BfpTask(16, 32, 64, fmt, fmt, kernel_variant(host_preset().tvm_target()))], host_preset(), sys.argv[1], {trials},
         TuningOptions(min_trials_per_task={trials}, population_size=16))
""").format(trials=TRIALS)


def _lines(path):
    """Complete (newline-terminated) lines of ``path``."""
    with open(path, "rb") as f:
        return [line for line in f.read().splitlines(keepends=True) if line.endswith(b"\n")]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A work dir tuned by a killed run, a planted partial line, and a resumed run."""
    work = str(tmp_path_factory.mktemp("tuning") / "db")
    records = os.path.join(work, RECORD_FILE)
    # own session: the kill reaches MetaSchedule's builder/runner worker processes too
    proc = subprocess.Popen([sys.executable, "-c", _TUNE_SCRIPT, work], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_DEADLINE_S
        while not (os.path.exists(records) and _lines(records)):
            assert proc.poll() is None, "the tuning subprocess ended before writing a record"
            assert time.monotonic() < deadline, f"no tuning record within {KILL_DEADLINE_S} s: hung?"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has exited already (the assertion above says why)
            pass
        proc.wait()
    before_kill = _lines(records)
    assert 1 <= len(before_kill) < TRIALS
    with open(records, "ab") as f:  # what a kill in the middle of an append leaves
        f.write(b'[0,[[["GetSBlock",[],["a_u8"')
    summary = tune([TASK], host_preset(), work, TRIALS, OPTIONS, progress=None)
    # the default schedule's measurement decides whether deployment uses a record, by timing; the
    # tests below check records and verification, so they run without it (a work dir without the
    # measurement keeps its records); test_default_schedule_* puts it back in a copy
    defaults_path = os.path.join(work, DEFAULTS_FILE)
    with open(defaults_path) as f:
        defaults = json.load(f)
    os.remove(defaults_path)
    return {"work": work, "before_kill": before_kill, "summary": summary, "defaults": defaults}


def test_killed_run_resumes_keeping_records(tuned):
    summary = tuned["summary"]
    (result,) = summary.results
    assert any("partial last line" in r for r in summary.repairs)
    assert result.before == len(tuned["before_kill"])  # kept and counted towards the budget
    assert result.trials == TRIALS  # only the remaining trials ran
    after = _lines(os.path.join(tuned["work"], RECORD_FILE))
    assert after[:len(tuned["before_kill"])] == tuned["before_kill"]
    assert len(after) == TRIALS
    assert result.best_seconds is not None and 0 < result.best_seconds < 1e-2
    # a finished budget runs nothing more
    again = tune([TASK], host_preset(), tuned["work"], TRIALS, OPTIONS, progress=None)
    assert again.results[0].trials == TRIALS
    assert len(_lines(os.path.join(tuned["work"], RECORD_FILE))) == TRIALS


def test_default_schedule_is_measured_and_wins_where_records_are_slower(tuned, tmp_path):
    """The session measures the task's default (hand) schedule with its own builder and runner;
    deployment (trusted records, tuned kernels, the latency table) uses a record only where it is
    faster than that, so a database never slows a kernel down as measured."""
    (result,) = tuned["summary"].results
    default = tuned["defaults"][TASK.name]
    assert 0 < default < 1e-2 and result.default_seconds == default
    assert result.source == ("tuned" if result.best_seconds < default else "default")
    for factor, used in ((0.5, False), (2.0, True)):
        work = str(tmp_path / f"copy{factor}")
        shutil.copytree(tuned["work"], work)
        with open(os.path.join(work, DEFAULTS_FILE), "w") as f:
            json.dump({TASK.name: result.best_seconds * factor}, f)
        assert (TASK.name in tuned_prim_funcs(work, [TASK], host_preset())) is used
        seconds = measured_task_seconds(work, [TASK], host_preset(), verified=True)[TASK.name]
        assert seconds == pytest.approx(result.best_seconds * (factor if not used else 1.0))


# the host kernel's operand types: uint8 weights on VNNI, int8 on AVX2/generic
_WEIGHT_DTYPE = "uint8" if HOST_VARIANT in UNSIGNED_WEIGHT_VARIANTS else "int8"


@T.prim_func(s_tir=True)
def _wrong_dot_16x4(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), _WEIGHT_DTYPE, offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # planted bug: adds 1 per quad instead of the dot product
        C[T.ramp(T.int32(0), 1, 16)] = C.vload([0], dtype="int32x16") + T.broadcast(T.int32(1), 16)


WRONG_INTRIN = "bitq_test_wrong_dot_16x4"
TensorIntrin.register(WRONG_INTRIN, dot_desc(16, "int8", _WEIGHT_DTYPE), _wrong_dot_16x4, override=True)


def test_verification_rejects_wrong_kernel_and_trusts_tuned_one(tuned):
    work = tuned["work"]
    database = ms.database.JSONDatabase(work_dir=work, module_equality="structural")
    mod = tvm.IRModule({"main": TASK.prim_func()})
    sch = Schedule(mod)
    schedule_bfp_matmul(sch, TASK, 2, 1, "columns_outer", intrinsic=WRONG_INTRIN)
    # the fastest record of all: only verification stands between it and deployment
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(mod), [1e-9], host_preset().tvm_target(),
        ms.arg_info.ArgInfo.from_prim_func(TASK.prim_func())))
    messages = []
    trusted, verdicts = verify_tasks(work, [TASK], host_preset(), progress=messages.append)[TASK.name]
    assert not verdicts[0].ok and verdicts[0].seconds == pytest.approx(1e-9)
    assert "wrong numbers" in verdicts[0].message and verdicts[0].worst > 1
    assert any("rejected" in m for m in messages)
    assert verdicts[-1].ok and verdicts[-1].worst <= 1.0  # the tuned kernel is within the bound
    assert trusted is not None and float(trusted.run_secs[0]) > 1e-9
    # the latency table only counts verified records; raw records include the planted one
    assert measured_task_seconds(work, [TASK], host_preset(), verified=True)[TASK.name] == pytest.approx(
        tuned["summary"].results[0].best_seconds)
    assert measured_task_seconds(work, [TASK], host_preset(), verified=False)[TASK.name] == pytest.approx(1e-9)
    funcs = tuned_prim_funcs(work, [TASK], host_preset())
    assert funcs[TASK.name].attrs["global_symbol"] == TASK.name


def test_latency_table_measured_win_and_regressor_predicts_rest():
    model = load_onnx(bundled_model_path())
    candidates = LayerCandidates(CandidateSet.parse("w=4,5,6,8;a=8;b=16,32")).resolve(
        [layer.name for layer in model.layers])
    preset = host_preset()
    tasks = extract_bfp_tasks(model, candidates, preset)
    rng = np.random.default_rng(0)
    # a plausible machine: 20 GMAC/s plus 2 us call overhead, 10% noise
    truth = {t.name: (2e-6 + t.m * t.n * t.k / 20e9) * rng.uniform(0.95, 1.05) for t in tasks}
    measured = {name: truth[name] for name in sorted(truth)[::2]}  # a handful: every other task
    dm = performance_term(model, preset, candidates).model_costs
    table = latency_table(model, candidates, preset, measured, model_costs=dm)
    assert len(table.entries) == sum(len(c) for c in candidates.values())
    for task in tasks:
        for layer, label in task.users:
            entry = table.entries[(layer, label)]
            if task.name in measured:
                assert entry.source == "measured" and entry.seconds == measured[task.name]
            else:
                assert entry.source == "predicted"
                # the regressor learns time per MAC; within 3x of the truth on this smooth machine
                assert truth[task.name] / 3 < entry.seconds < truth[task.name] * 3
    report = table.report
    assert report.measured_points == len(measured) and report.predicted_points > 0
    # unmeasured formats of measured shapes: the regressor must rank them like the truth
    predicted = sorted({e.task: e.seconds for e in table.entries.values() if e.source == "predicted"}.items())
    assert spearmanr([s for _, s in predicted], [truth[n] for n, _ in predicted]).statistic >= 0.9
    # the report's cross-validation holds out whole shapes (harder): the regressor still ranks the
    # held-out shapes better than chance and lands within 2x of them (0.40 and 0.57 here)
    assert report.regressor_spearman > 0 and report.regressor_median_rel_error < 1
    # the DM line ranks the same measured points by the analytic model's per-call cost
    by_name = {t.name: t for t in tasks}
    names = sorted(measured)
    dm_cost = [dm[by_name[n].users[0][0]][by_name[n].users[0][1]].total / model.layer(by_name[n].users[0][0]).groups
               for n in names]
    assert report.dm_spearman == pytest.approx(spearmanr(dm_cost, [measured[n] for n in names]).statistic)
    assert "Spearman" in report.markdown()
    # without an analytic model to compare with, the report has no DM line
    assert latency_table(model, candidates, preset, measured).report.dm_spearman is None
    term = performance_term(model, preset, candidates, measured=table.seconds)
    assert term.unit == SECONDS_UNIT


def test_failed_trials_are_ignored(tmp_path):
    from bitq_tvm.tuning.session import open_work_dir

    work = str(tmp_path / "db")
    open_work_dir(work, host_preset())
    database = ms.database.JSONDatabase(work_dir=work, module_equality="structural")
    mod = tvm.IRModule({"main": TASK.prim_func()})
    workload = database.commit_workload(mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(TASK.prim_func())
    for rows, secs in ((1, FAILED_RUN_SECS), (2, 5e-6), (4, 7e-6)):
        sch = Schedule(mod)
        schedule_bfp_matmul(sch, TASK, rows, 1, "columns_outer")
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [secs],
                                                               host_preset().tvm_target(), args_info))
    assert measured_task_seconds(work, [TASK], host_preset(), verified=False) == {TASK.name: 5e-6}
