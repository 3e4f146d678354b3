"""`bitq-tvm plan` end to end on the digits CNN, and its user errors (exit code 2)."""

import json

import numpy as np
import pytest

from bitq_tvm import cli
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.plan import Plan


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    data = root / "digits.npz"
    np.savez(data, **bundled_test_data())
    return str(bundled_model_path()), str(data), root


def test_plan_writes_plan_and_report_that_compile_accepts(files, capsys):
    model, data, root = files
    plan_path, report = root / "plan.json", root / "report"
    assert cli.main(["plan", model, "--calib", data, "--calib-key", "x", "--labels", "y", "--budget", "1%",
                     "--pin", "last=bfp8_b32", "-o", str(plan_path), "--report-dir", str(report)]) == 0
    plan = Plan.load(plan_path)
    assert plan.layers["fc2"].weight.name == "bfp8_b32"
    assert json.loads(plan_path.read_text())["planner"]["predicted_loss"] <= 0.01 + 1e-12
    for name in ("pareto.png", "bitmap.png", "report.md"):
        assert (report / name).stat().st_size > 1000
    assert cli.main(["compile", model, "--plan", str(plan_path), "-o", str(root / "m.so")]) == 0
    assert (root / "m.so").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.00001%"], "infeasible: the best achievable predicted loss"),
    (["--lambda", "1", "--pin", "fc1=w=;b=16"], "empty"),
    (["--lambda", "1", "--calib-key", "y"], "'input' has samples of shape"),
    (["--size-budget", "0.0001"], "smallest achievable layer weight size"),
])
def test_plan_user_errors_exit_2(files, capsys, extra, message):
    model, data, root = files
    out = root / "never.json"
    assert cli.main(["plan", model, "--calib", data, "-o", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_plan_with_two_probe_levels_records_them(files):
    model, data, root = files
    plan_path = root / "two_levels.json"
    assert cli.main(["plan", model, "--calib", data, "--calib-key", "x", "--lambda", "1", "--probe-levels", "2",
                     "-o", str(plan_path)]) == 0
    planner = json.loads(plan_path.read_text())["planner"]
    assert planner["probe_levels"] == 2 and planner["predicted_loss"] > 0
    with pytest.raises(SystemExit) as exit_info:  # argparse: a one-line usage error, exit code 2
        cli.main(["plan", model, "--calib", data, "--lambda", "1", "--probe-levels", "3", "-o", str(plan_path)])
    assert exit_info.value.code == 2
