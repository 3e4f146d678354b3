"""The labelled accuracy term discriminates between budgets, and degenerate calibration is refused
(issue 14, item 2)."""

import numpy as np
import pytest

from bitq_tvm import cli
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.solver.accuracy import Calibration, measure_accuracy_term
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
from bitq_tvm.solver.planner import Objective, plan_model

GRID = LayerCandidates(CandidateSet((4, 6, 8), (6, 8), (16, 64)))


@pytest.fixture(scope="module")
def digits():
    data = bundled_test_data()
    return load_onnx(bundled_model_path()), Calibration({"input": data["x"]}, data["y"])


def test_three_budgets_give_three_plans(digits):
    # Before: the top-1 count saturated at 0 for small noise, so 0.5% and 2% both gave every layer
    # the cheapest grid point. Now the curve is resolved near 0 and the plans follow the budget.
    model, calib = digits
    results = [plan_model(model, calib, Objective("budget", b), candidates=GRID, progress=None)
               for b in (0.0005, 0.002, 0.005)]
    plans = [tuple(r.allocation.as_dict().items()) for r in results]
    assert len(set(plans)) == 3, plans
    perfs = [r.allocation.perf for r in results]
    assert perfs[0] > perfs[1] > perfs[2]
    for budget, r in zip((0.0005, 0.002, 0.005), results):
        assert 0 < r.predicted(r.allocation) <= budget + 1e-12


def test_curve_is_monotone_and_positive_below_the_first_flip(digits):
    model, calib = digits
    table = GRID.resolve([l.name for l in model.layers])
    term = measure_accuracy_term(model, calib, table, progress=None)
    drops = [d for _, d in term.curve]
    assert all(d > 0 for d in drops[2:]), term.curve  # no plateau of zeros
    assert term.to_user_units(term.curve[0][0] * 0.5) > 0
    xs = np.logspace(-6, 0, 40)
    ys = [term.to_user_units(x) for x in xs]
    assert all(b >= a for a, b in zip(ys, ys[1:]))
    assert len(term.measured_curve) == 8


@pytest.mark.parametrize("make, message", [
    (lambda x, y: Calibration({"input": x[:5]}, y[:5]), "5 calibration samples; the accuracy term needs at least 8"),
    (lambda x, y: Calibration({"input": x[:64]}, y[:64] + 10), "labels range 10..19, but the model's first output "
                                                              "has 10 classes"),
    (lambda x, y: Calibration({"input": x[:64]}, -y[:64] - 1), "labels range"),
])
def test_degenerate_calibration_is_refused(digits, make, message):
    model, calib = digits
    x, y = calib.inputs["input"], calib.labels
    with pytest.raises(BitqError, match=message):
        plan_model(model, make(x, y), Objective("budget", 0.01), candidates=GRID, progress=None)


def test_nan_inputs_are_refused():
    x = np.zeros((16, 1, 8, 8), np.float32)
    x[3, 0, 1, 1] = np.nan
    with pytest.raises(BitqError, match="NaN or Inf in 1 of 16 samples"):
        Calibration({"input": x})


def test_cli_refuses_degenerate_calibration_with_exit_2(tmp_path, capsys):
    data = bundled_test_data()
    x = data["x"][:32].copy()
    x[0, 0, 0, 0] = np.inf
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=data["y"][:32])
    out = tmp_path / "plan.json"
    assert cli.main(["plan", str(bundled_model_path()), "--calib", str(path), "--labels", "y", "--budget", "1%",
                     "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    few = tmp_path / "few.npz"
    np.savez(few, x=data["x"][:12], y=data["y"][:12])
    assert cli.main(["plan", str(bundled_model_path()), "--calib", str(few), "--labels", "y", "--lambda", "1",
                     "--candidates", "w=8;a=8;b=16", "-o", str(out)]) == 0
    assert "warning: only 12 calibration samples" in capsys.readouterr().err
