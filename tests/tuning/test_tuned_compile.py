"""`bitq-tvm tune` then `compile --deploy --tuning-db` and `plan --tuning-db`: the loop closed."""

import json
import os

import numpy as np
import pytest
import tvm
from tvm import relax

from bitq_tvm.api import compile_model
from bitq_tvm.cli import main
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import zoo
from bitq_tvm.plan import Plan
from bitq_tvm.tuning.session import DEFAULTS_FILE


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """A `bitq-tvm tune` work dir of the bundled digits model (one session for the module)."""
    db = str(tmp_path_factory.mktemp("tuned") / "db")
    assert main(["tune", str(zoo.bundled_model_path()), "--trials", "8", "--work-dir", db,
                 "--candidates", "w=8;a=8;b=32", "--no-fp32", "--min-trials-per-task", "2"]) == 0
    # tune measured every tuned task's default schedule; whether a record beats it is timing, so
    # these tests (which need tuned kernels in use) drop the measurement: records are then used
    defaults = os.path.join(db, DEFAULTS_FILE)
    with open(defaults) as f:
        measured = json.load(f)
    assert measured and all(0 < s < 1 for s in measured.values())
    os.remove(defaults)
    return db


def test_tune_then_compile_and_plan_with_the_database(tuned_db, tmp_path, capsys):
    model_path = str(zoo.bundled_model_path())
    db = tuned_db
    capsys.readouterr()
    out = tmp_path / "digits.so"
    assert main(["compile", model_path, "--format", "bfp8_b32", "--deploy", "--tuning-db", db, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    used = int(err.split("tuning database")[1].split(":")[1].split("tuned kernel")[0])
    assert used >= 1
    # the tuned library computes what the simulation computes
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    x = zoo.bundled_test_data()["x"][:1]
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = compile_model(load_onnx(model_path), Plan.uniform("bfp8_b32"), progress=None).run({"input": x})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # measured latencies feed the planner
    np.savez(tmp_path / "calib.npz", x=zoo.bundled_test_data()["calib"])
    assert main(["plan", model_path, "--calib", str(tmp_path / "calib.npz"), "--lambda", "0.2",
                 "--candidates", "w=8;a=8;b=32", "--tuning-db", db, "-o", str(tmp_path / "plan.json")]) == 0
    assert "measured" in capsys.readouterr().err


def test_tuned_kernels_keep_their_fused_epilogues(tuned_db):
    """A tuned record's decisions rebuild the fused kernel: deploy with the database fuses as many
    epilogues as without it, uses tuned kernels, and computes the same numbers."""
    from bitq_tvm.deploy import compile_deployed

    model = load_onnx(str(zoo.bundled_model_path()))
    plan = Plan.uniform("bfp8_b32")
    db = tuned_db
    plain = compile_deployed(model, plan, progress=None)
    tuned = compile_deployed(model, plan, progress=None, tuning_db=db)
    assert tuned.report.tuned_kernels
    fused = [sum(d.epilogue.startswith("fused") for d in r.layers) for r in (plain.report, tuned.report)]
    assert fused[0] >= 1 and fused[1] == fused[0]
    x = zoo.bundled_test_data()["x"][:1]
    got, want = tuned.run({"input": x})[0], plain.run({"input": x})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
