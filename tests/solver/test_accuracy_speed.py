"""Faster accuracy term (issue 14, item 3): suffix sessions reuse the FP32 activations and give the
same outputs as the whole noisy model; an infeasible budget stops the measurement early; progress
lines carry an ETA."""

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat, fake_quantize_np
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.frontend.reference import layer_block_axes
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data, resnet18, synthetic_inputs
from bitq_tvm.solver.accuracy import Calibration, NoiseGraph, SuffixNoiseGraphs, measure_accuracy_term
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates


def _close(actual, expected, scale=1e-5):
    # same nodes and noise, but onnxruntime fuses the two graphs differently (float32 sums in another
    # order); a missing input (e.g. a skip tensor) would be off by O(1)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.abs(a - e).max() <= scale * np.abs(e).max(), np.abs(a - e).max()


@pytest.fixture(scope="module")
def digits():
    data = bundled_test_data()
    return load_onnx(bundled_model_path()), Calibration({"input": data["calib"]})


@pytest.mark.parametrize("group_size", [1, 3])
def test_suffix_sessions_equal_the_whole_noisy_model(digits, group_size):
    model, calib = digits
    batches = calib.batches(model)[:4]
    whole = NoiseGraph(model)
    suffix = SuffixNoiseGraphs(model, [l.name for l in model.layers], group_size)
    suffix.capture(batches)
    assert len(suffix.groups) == -(-len(model.layers) // group_size)
    rng = np.random.default_rng(1)
    weights = model.weights()
    for layer in model.layers:
        for b, batch in enumerate(batches):
            act = whole.capture(batch)[layer.name]
            (axis, groups), _ = layer_block_axes(layer)
            a_err = fake_quantize_np(act, BFPFormat(4, 16), axis=axis, groups=groups) - act
            w_err = rng.standard_normal(weights[layer.weight].shape).astype(np.float32) * 0.01
            for key, err in ((("a", layer.name), a_err), (("w", layer.name), w_err)):
                expected = whole.run(batch, {key: err})
                _close(suffix.run(b, {key: err}), expected)


def test_suffix_cut_carries_skip_connections(tmp_path):
    # resnet18 has residual adds: a cut inside a block must also feed the skip tensor
    import onnx

    path = tmp_path / "r18.onnx"
    onnx.save(resnet18(num_classes=10, image_size=32), path)
    model = load_onnx(str(path))
    x = synthetic_inputs(onnx.load(path), 2, seed=0)
    batches = [{k: v[i:i + 1] for k, v in x.items()} for i in range(2)]
    whole = NoiseGraph(model)
    suffix = SuffixNoiseGraphs(model, [l.name for l in model.layers], 1)
    suffix.capture(batches)
    assert max(len(b) for b in suffix.boundaries) >= 2  # some cut crosses a skip connection
    rng = np.random.default_rng(0)
    for layer in model.layers[::3]:
        err = rng.standard_normal(layer.input_shape).astype(np.float32) * 0.05
        for b, batch in enumerate(batches):
            # 20 random-weight layers deep: reassociation differences grow to ~1e-5 of the output
            _close(suffix.run(b, {("a", layer.name): err}), whole.run(batch, {("a", layer.name): err}), 1e-4)


def test_infeasible_budget_stops_early_with_eta(digits):
    model, calib = digits
    table = LayerCandidates(CandidateSet((4,), (4,), (64,))).resolve([l.name for l in model.layers])
    lines = []
    with pytest.raises(BitqError, match=r"infeasible: the best achievable predicted loss.*at least.*from 1 of 4 layers"):
        measure_accuracy_term(model, calib, table, progress=lines.append, budget=1e-9)
    measured = [line for line in lines if line.startswith("accuracy term")]
    assert len(measured) == 1 and "ETA" in measured[0]


def test_noise_power_phase_reports_progress_with_eta(digits, monkeypatch):
    """The noise-power phase (minutes on a large model before the fix of its depthwise blocks)
    prints a line per layer with an ETA once it runs longer than the throttle."""
    import bitq_tvm.solver.accuracy as accuracy

    model, calib = digits
    table = LayerCandidates(CandidateSet((4, 8), (8,), (16,))).resolve([l.name for l in model.layers])
    monkeypatch.setattr(accuracy, "NOISE_PROGRESS_SECONDS", 0.0)
    lines = []
    measure_accuracy_term(model, calib, table, progress=lines.append)
    noise = [line for line in lines if line.startswith("noise powers ") and "/" in line.split()[2]]
    assert [line.split()[2] for line in noise] == [f"{i}/{len(model.layers)}" for i in range(1, len(model.layers))]
    assert all("ETA" in line for line in noise)
