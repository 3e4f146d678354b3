"""Whole models through TVM: the BFP simulation equals the NumPy reference simulation of the plan.

The reference (:mod:`bitq_tvm.frontend.reference`) runs the same normalised ONNX graph in ONNX's
NumPy evaluator with :func:`~bitq_tvm.formats.fake_quantize_np` on the planned weights and inputs.
The two differ only in float32 summation order inside convs/matmuls (TVM's schedules vs NumPy);
the BFP quantizers themselves are bit-exact. Tolerance: |TVM - reference| <= 1e-4 * max|reference|,
which also covers the rare activation element whose reordered sum lands on the other side of a
rounding boundary of the next layer's quantizer.
"""

import numpy as np
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.formats import PRESETS
from bitq_tvm.frontend.onnx_model import load_onnx, normalize
from bitq_tvm.frontend.reference import run_reference
from bitq_tvm.models import zoo
from bitq_tvm.plan import Plan

REL_TOL = 1e-4


def _assert_matches_reference(model, plan, feeds):
    compiled = compile_model(model, plan, progress=None)
    got = compiled.run(feeds)[0]
    want = run_reference(model, compiled.formats, feeds)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
    return got, want


@pytest.fixture(scope="module")
def digits():
    data = zoo.bundled_test_data()
    # Batch 50: activation blocks run along channels, so results do not depend on the batch size.
    return load_onnx(zoo.bundled_model_path(), {"input": (50, 1, 8, 8)}), data


@pytest.mark.parametrize("spec", ["fp32", *PRESETS])
def test_digits_every_preset_matches_reference(digits, spec):
    model, data = digits
    _assert_matches_reference(model, Plan.uniform(spec), {"input": data["x"][:50]})


def test_digits_accuracy_under_bfp(digits):
    model, data = digits
    accuracy = {}
    for spec in ("fp32", "bfp8_b32", "bfp4_b16"):
        logits = compile_model(model, Plan.uniform(spec), progress=None).run_batched("input", data["x"])
        accuracy[spec] = (logits.argmax(1) == data["y"]).mean()
    assert accuracy["fp32"] >= 0.95
    # MXINT8-class BFP keeps accuracy within one point; 4-bit mantissas within five.
    assert accuracy["bfp8_b32"] >= accuracy["fp32"] - 0.01
    assert accuracy["bfp4_b16"] >= accuracy["fp32"] - 0.05


def test_mixed_plan_matches_reference(digits):
    model, data = digits
    plan = Plan.from_json({"bitq_plan_version": 1, "default": "bfp6_b16", "layers": {
        "conv1": "fp32", "conv2": {"weight": "bfp4_b32", "activation": "bfp8_b16"},
        "fc2": {"weight": "bfp5_b8_sr3", "activation": "fp32"}}})
    _assert_matches_reference(model, plan, {"input": data["x"][:50]})


@pytest.mark.slow
def test_resnet18_bfp8(tmp_path):
    proto = zoo.resnet18(image_size=64, num_classes=100)
    model = normalize(proto, "resnet18")
    feeds = zoo.synthetic_inputs(model.proto, 1, seed=0)
    got, want = _assert_matches_reference(model, Plan.uniform("bfp8_b32"), feeds)
    fp32 = run_reference(model, {}, feeds)[0]
    # BFP8 moves the logits a little, not a lot: it is a simulation of a real format, not a no-op.
    rel = np.abs(want - fp32).max() / np.abs(fp32).max()
    assert 1e-4 < rel < 0.3


@pytest.mark.slow
def test_mobilenet_v2_depthwise_bfp6():
    model = normalize(zoo.mobilenet_v2(image_size=64, num_classes=100, width=0.5), "mobilenet_v2")
    assert any(layer.groups > 1 for layer in model.layers)
    _assert_matches_reference(model, Plan.uniform("bfp6_b16"), zoo.synthetic_inputs(model.proto, 1, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["bfp8_b32", "bfp4_b16"])
def test_transformer_encoder(spec):
    proto = zoo.transformer_encoder(seq_len=16, hidden=64, layers=2, heads=2, ffn=128)
    model = normalize(zoo.with_weights_in_constant_nodes(proto), "encoder")
    assert sum(layer.kind == "matmul" for layer in model.layers) == 2 * 6 + 2
    _assert_matches_reference(model, Plan.uniform(spec), zoo.synthetic_inputs(model.proto, 1, seed=0))
