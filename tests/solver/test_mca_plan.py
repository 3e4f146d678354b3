"""The planner's performance term labels its sources: measured, llvm-mca estimate, DM model."""

import shutil

import numpy as np
import pytest

from bitq_tvm import cli
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.solver.candidates import LayerCandidates
from bitq_tvm.solver.performance import performance_term
from bitq_tvm.targets import mca
from bitq_tvm.targets.presets import get_target

CANDIDATES = "w=4,8;a=8;b=16"


def test_estimates_override_the_dm_model_but_not_measurements():
    model = load_onnx(str(bundled_model_path()), {"input": (1, 1, 8, 8)})
    table = LayerCandidates.from_specs(CANDIDATES, None).resolve([l.name for l in model.layers])
    first, second = model.layers[0].name, model.layers[1].name
    label = table[first][0].label
    term = performance_term(model, get_target("cortex-a76"), table, measured={(first, label): 2e-6},
                            estimated={(first, label): 9e-6, (second, label): 3e-6})
    assert term.cost[first][label] == 2e-6 and term.source(first, label) == "measured"
    assert term.cost[second][label] == 3e-6 and term.source(second, label) == "llvm-mca estimate"
    other = table[second][-1].label
    assert other != label and term.source(second, other) == "DM model"
    with pytest.raises(BitqError, match="names no"):
        performance_term(model, get_target("cortex-a76"), table, estimated={("nope", label): 1e-6})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_mca")
    data = root / "digits.npz"
    np.savez(data, **bundled_test_data())
    return str(bundled_model_path()), str(data), root


@pytest.mark.skipif(shutil.which(mca.MCA_EXECUTABLE) is None, reason="llvm-mca-22 not installed")
def test_plan_cortex_a76_labels_llvm_mca_estimates(files, capsys):
    model, data, root = files
    assert cli.main(["plan", model, "--calib", data, "--calib-key", "x", "--target", "cortex-a76", "--mca",
                     "--candidates", CANDIDATES, "--lambda", "1", "-o", str(root / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "perf source" in out and "llvm-mca estimate" in out
    summary = next(line for line in out.splitlines() if line.startswith("performance term over all candidates"))
    assert "0 measured" in summary and "0 llvm-mca estimate" not in summary


def test_plan_without_llvm_mca_exits_2(files, capsys, monkeypatch):
    model, data, root = files
    monkeypatch.setattr(mca.shutil, "which", lambda name: None)
    assert cli.main(["plan", model, "--calib", data, "--calib-key", "x", "--target", "cortex-a76", "--mca",
                     "--candidates", CANDIDATES, "--lambda", "1", "-o", str(root / "never.json")]) == 2
    assert "llvm-mca-22 not found" in capsys.readouterr().err
