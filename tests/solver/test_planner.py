"""The planner on the bundled digits CNN: every objective, infeasibility, and predicted vs measured."""

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.plan import Plan
from bitq_tvm.solver.accuracy import Calibration
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
from bitq_tvm.solver.performance import memory_hierarchy, performance_term
from bitq_tvm.solver.planner import Objective, parse_budget, plan_model, verify
from bitq_tvm.targets.presets import get_target

# A reduced grid keeps the suite fast; the default 24-candidate grid is exercised by the CLI test.
GRID = LayerCandidates(CandidateSet((4, 6, 8), (6, 8), (16, 64)))


@pytest.fixture(scope="module")
def digits():
    data = bundled_test_data()
    return load_onnx(bundled_model_path()), Calibration({"input": data["x"]}, data["y"])


def test_budget_objective_meets_budget_and_is_cheapest(digits):
    model, calib = digits
    result = plan_model(model, calib, Objective("budget", 0.01), candidates=GRID, progress=None)
    assert result.accuracy.unit == "top-1 drop"
    assert result.predicted(result.allocation) <= 0.01 + 1e-12
    # no uniform allocation within the budget is cheaper than the optimum
    for label, uniform in result.uniforms:
        if result.predicted(uniform) <= 0.01:
            assert result.allocation.perf <= uniform.perf * (1 + 1e-9), label
    plan = Plan.from_json(result.plan.to_json())
    assert set(plan.layers) == {l.name for l in model.layers}
    assert plan.meta["planner"]["loss_unit"] == "top-1 drop"
    assert all("predicted_loss" in lf.info and "dram_bytes" in lf.info for lf in plan.layers.values())


def test_lambda_trades_loss_for_perf(digits):
    model, calib = digits
    low = plan_model(model, calib, Objective("lambda", 1e-4), candidates=GRID, progress=None).allocation
    high = plan_model(model, calib, Objective("lambda", 10.0), candidates=GRID, progress=None).allocation
    assert low.acc_loss < high.acc_loss and low.perf > high.perf


def test_size_budget_and_pins_and_ties(digits):
    model, calib = digits
    grid = LayerCandidates(GRID.default, {"first": GRID.default.candidates[:1]})
    result = plan_model(model, calib, Objective("size_budget", 0.025), candidates=grid, ties=[("fc1", "fc2")],
                        progress=None)
    chosen = result.allocation.as_dict()
    assert result.allocation.size_bytes <= 25_000
    assert chosen["conv1"] == GRID.default.candidates[0].label
    assert chosen["fc1"] == chosen["fc2"]


def test_infeasible_budgets_state_best_value(digits):
    model, calib = digits
    with pytest.raises(BitqError, match=r"--size-budget 0.001 MB is infeasible.*smallest achievable.*0\.0\d+ MB"):
        plan_model(model, calib, Objective("size_budget", 0.001), candidates=GRID, progress=None)
    unlabeled = Calibration({"input": calib.inputs["input"][:64]})
    with pytest.raises(BitqError, match=r"infeasible: the best achievable predicted loss.*relative logit MSE"):
        plan_model(model, unlabeled, Objective("budget", 1e-9), candidates=GRID, progress=None)
    assert parse_budget("0.5%") == pytest.approx(0.005)
    with pytest.raises(BitqError, match="--budget 'half'"):
        parse_budget("half")


def test_measured_latencies_override_the_model(digits):
    model, _ = digits
    table = GRID.resolve([l.name for l in model.layers])
    modelled = performance_term(model, get_target("host"), table)
    label = table["fc1"][0].label
    term = performance_term(model, get_target("host"), table, {("fc1", label): 1e-3})
    assert term.unit == "seconds" and term.cost["fc1"][label] == 1e-3
    other = table["conv2"][0].label
    assert term.cost["conv2"][other] == pytest.approx(modelled.cost["conv2"][other] * term.seconds_per_unit)
    # cycles per byte: L1 filled from L2 at L2's relative cost per 64-byte line, DRAM at its bandwidth (3 GHz)
    preset = get_target("host")
    hierarchy = memory_hierarchy(preset)
    assert hierarchy.levels[0].cost_per_byte == pytest.approx(preset.caches[1].relative_cost / 64)
    assert hierarchy.dram_cost_per_byte == pytest.approx(3.0 / preset.dram_bandwidth_gbps)


def test_predicted_within_2x_of_measured(digits):
    # Additivity check: the plan compiled by TVM, run on the labelled split; its measured relative
    # logit MSE must lie within a factor 2 of the sum of the per-layer predictions.
    model, calib = digits
    result = plan_model(model, calib, Objective("budget", 0.01), candidates=GRID, progress=None)
    check = verify(model, result.plan, calib, result.accuracy, progress=None)
    assert 0.5 <= check.ratio <= 2.0, check
    assert check.top1_fp32 - check.top1_plan <= 0.02
