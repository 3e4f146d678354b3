"""Tuning for ARM and RISC-V: the kernel measured is the kernel deployed, on an emulated device.

Every target's tasks name the variant deployment compiles (``kernel_variant``) and tune its own
unscheduled compute; every point of the ARM/RISC-V search space computes right numbers under
qemu-user; and a real session tunes through a tracker on an emulated cortex-a76 (TVM's RPC server
on the aarch64 TVM runtime under qemu-aarch64, as in tests/targets/test_remote.py), all on
127.0.0.1, stopped in the fixture teardown.

Numbers are checked against ``bfp_matmul_ref`` within ``bfp_matmul_tolerance`` (its docstring
derives it: block sums are exact int32, only the float32 sum over the nb block terms rounds).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import types

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm.s_tir import Schedule

from bitq_tvm.cli import main as cli_main
from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.kernels.bfp_matmul import bfp_matmul_compute, bfp_matmul_name
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.kernels.contract import padded_rows
from bitq_tvm.kernels.oracle import bfp_matmul_ref, bfp_matmul_tolerance
from bitq_tvm.solver.candidates import LayerCandidates
from bitq_tvm.targets import export, get_target, run_kernel_emulated
from bitq_tvm.targets.presets import target_names
from bitq_tvm.runtime.remote import connect, start_rpc_server, start_tracker
from bitq_tvm.targets.rootfs import ensure_aarch64_rootfs
from bitq_tvm.tuning.remote import answering_session
from bitq_tvm.tuning.session import FAILED_RUN_SECS, default_seconds, open_database, record_seconds, records_by_task
from bitq_tvm.tuning.tasks import BfpTask, extract_bfp_tasks, schedule_bfp_matmul, space_configs
from bitq_tvm.kernels.bfp_matmul_x86 import UNSIGNED_WEIGHT_VARIANTS
from bitq_tvm.tuning.verify import KERNEL_INPUTS, random_bfp_inputs, schedule_from_record, tuned_prim_funcs, verify_tasks

FMT = BFPFormat(8, 32)
ROWS, IN_FEATURES, OUT_FEATURES = 16, 64, 32
CANDIDATES = "w=8;a=8;b=32"
DEVICE = "cortex-a76"
KEY = "bitq-tune-a76"
TRIALS = 3
# What deployment (LowerBFPInteger) names this model's one GEMM on cortex-a76.
DEPLOYED_NAME = "bfp_matmul_m16_n32_k64_a8b32_w8b32_sdot"


def _matmul_model(path) -> str:
    """One MatMul x [16, 64] @ W [64, 32]: a single 16 x 32 x 64 GEMM."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, IN_FEATURES])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, OUT_FEATURES])
    w = numpy_helper.from_array(rng.standard_normal((IN_FEATURES, OUT_FEATURES)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "fc", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _reference(task: BfpTask, data: dict):
    args = (data["qa"], data["ea"], data["qw_rows"], data["ew_rows"], task.fmt_a.block_size,
            task.fmt_a.mantissa_bits, task.fmt_w.mantissa_bits)
    return bfp_matmul_ref(*args), bfp_matmul_tolerance(*args)


def test_every_target_tunes_the_kernel_it_deploys(tmp_path):
    model = load_onnx(_matmul_model(tmp_path / "fc.onnx"))
    candidates = LayerCandidates.from_specs(CANDIDATES, None).resolve([l.name for l in model.layers])
    for preset in map(get_target, target_names()):
        variant = kernel_variant(preset.tvm_target())
        (task,) = extract_bfp_tasks(model, candidates, preset)
        assert task.name == bfp_matmul_name(padded_rows(ROWS), OUT_FEATURES, IN_FEATURES, FMT, FMT, variant)
        compute = bfp_matmul_compute(task.m, task.n, task.k, FMT, FMT,
                                     unsigned_weights=variant in UNSIGNED_WEIGHT_VARIANTS)
        assert tvm_ffi.structural_equal(task.prim_func().without_attr("global_symbol"),
                                        compute.without_attr("global_symbol")), preset.name
    assert kernel_variant(get_target(DEVICE).tvm_target()) == "sdot"  # DEPLOYED_NAME below


SPACE_CASES = [("cortex-a76", "sdot"), ("cortex-a53", "neon"), ("rv64gcv-vlen128", "rvv"), ("rv64gc", "scalar")]


@pytest.mark.parametrize(("target", "variant"), SPACE_CASES, ids=[v for _, v in SPACE_CASES])
def test_every_search_space_point_computes_right_numbers_emulated(target, variant, tmp_path):
    preset = get_target(target)
    task = BfpTask(ROWS, OUT_FEATURES, IN_FEATURES, FMT, FMT, variant)
    points = space_configs(task)
    # rows 1, 2, 4 x groups 1, 2 within the 128-bit register budget, both orders where they differ
    assert {(1, 2, "columns_outer"), (2, 2, "columns_outer"), (4, 1, "rows_outer")} <= set(points)
    assert len(points) == 8 and all(rows * groups <= 4 for rows, groups, _ in points)
    data = random_bfp_inputs(task)
    ref, bound = _reference(task, data)
    funcs = {}  # one library holding every point: one compile and link
    for index, point in enumerate(points):
        sch = Schedule(tvm.IRModule({"main": task.prim_func()}))
        schedule_bfp_matmul(sch, task, *point)
        funcs[f"point{index}"] = sch.mod["main"].with_attr("global_symbol", f"point{index}")
    library = export(tvm.compile(tvm.IRModule(funcs), preset.tvm_target()), tmp_path / "space.so", preset)
    for name, point in zip(funcs, points):
        (got,) = run_kernel_emulated(library, name, [data[k] for k in KERNEL_INPUTS],
                                     [((task.m, task.n), "float32")], preset, cache_dir=tmp_path)
        assert np.all(np.abs(got - ref) <= bound), (variant, point)
        assert np.count_nonzero(got) > got.size // 2  # a zero kernel would pass a zero reference


class _FakeSession:
    """An RPC session whose server answers, or hangs like a forked server process under qemu."""

    def __init__(self, answers: bool):
        self.answers = answers
        self.release = threading.Event()

    def cpu(self, index):
        if not self.answers:
            self.release.wait()
        return types.SimpleNamespace(exist=True)


PROBE_S = 0.2


def test_a_session_that_never_answers_is_asked_for_again():
    hung, good = _FakeSession(False), _FakeSession(True)
    requested = iter([hung, good])
    start = time.monotonic()
    try:
        assert answering_session(lambda: next(requested), PROBE_S, 3) is good
        assert time.monotonic() - start >= PROBE_S  # waited for the hung one first
        with pytest.raises(BitqError, match="no session answered within 0.2 s in 2 attempt"):
            answering_session(lambda: hung, PROBE_S, 2)
    finally:
        hung.release.set()


@pytest.fixture(scope="module")
def emulated_device():
    """A tracker on 127.0.0.1 with one emulated cortex-a76 registered under KEY."""
    with start_tracker() as tracker:
        server = start_rpc_server(get_target(DEVICE), tracker=tracker.address, key=KEY,
                                  rootfs_dir=ensure_aarch64_rootfs())
        try:
            with server:
                yield tracker, server
        finally:
            # stop() ends once the server exits, but a session child hung under qemu ignores
            # SIGTERM and would outlive it in the server's process group
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_tune_on_emulated_cortex_a76_through_a_tracker(emulated_device, tmp_path):
    tracker, _ = emulated_device
    model_path = _matmul_model(tmp_path / "fc.onnx")
    work_dir = str(tmp_path / "db")
    assert cli_main(["tune", model_path, "--target", DEVICE, "--trials", str(TRIALS), "--work-dir", work_dir,
                     "--candidates", CANDIDATES, "--no-fp32", "--min-trials-per-task", str(TRIALS),
                     "--tracker", str(tracker.address), "--key", KEY]) == 0

    preset = get_target(DEVICE)
    model = load_onnx(model_path)
    candidates = LayerCandidates.from_specs(CANDIDATES, None).resolve([l.name for l in model.layers])
    (task,) = extract_bfp_tasks(model, candidates, preset)
    assert task.name == DEPLOYED_NAME
    records = records_by_task(open_database(work_dir), [task])[task.name]
    seconds = [record_seconds(r) for r in records]
    assert len(records) == TRIALS
    # measured on the device: every trial built, ran and was timed
    assert all(math.isfinite(s) and 0 < s < FAILED_RUN_SECS for s in seconds), seconds
    best = records[int(np.argmin(seconds))]
    assert str(best.workload.mod["main"].attrs["global_symbol"]) == DEPLOYED_NAME

    # the best schedule, replayed as deployment would, computes right numbers on the device
    executable = tvm.compile(schedule_from_record(task, best).mod, preset.tvm_target())
    library = export(executable, tmp_path / "best.so", preset)
    data = random_bfp_inputs(task)
    ref, bound = _reference(task, data)
    session = connect(tracker=tracker.address, key=KEY)
    session.upload(library, "best.so")
    device = session.cpu()
    args = [tvm.runtime.tensor(data[k], device) for k in KERNEL_INPUTS]
    out = tvm.runtime.tensor(np.full((task.m, task.n), np.nan, np.float32), device)
    session.load_module("best.so")[task.name](*args, out)
    got = out.numpy()
    del args, out, device, session  # the server serves one session at a time
    assert np.all(np.abs(got - ref) <= bound)
    assert np.count_nonzero(got) > got.size // 2

    # verification (what compile --deploy --tuning-db trusts) runs the kernel under qemu
    trusted, verdicts = verify_tasks(work_dir, [task], preset)[task.name]
    assert trusted is not None and verdicts[-1].ok and verdicts[-1].worst <= 1.0
    # the session measured the default schedule through the tracker too; a record is deployed
    # only where it beats it (which one wins under qemu is timing)
    default = default_seconds(work_dir)[task.name]
    assert 0 < default < FAILED_RUN_SECS
    used = record_seconds(trusted) < default
    assert set(tuned_prim_funcs(work_dir, [task], preset)) == ({DEPLOYED_NAME} if used else set())
