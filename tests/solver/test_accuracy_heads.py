"""The accuracy term sees every output head: all graph outputs, a final Concat split into its inputs,
each head normalised on its own (YOLOv8's box pixels beside its 0..1 scores; PicoDet's 8 outputs)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitq_tvm.evaluation import head_rel_mse, rel_mse
from bitq_tvm.frontend.onnx_model import loss_view, normalize
from bitq_tvm.solver.accuracy import Calibration, NoiseGraph, SuffixNoiseGraphs, measure_accuracy_term
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates


def _detector(pixels=300.0):
    """x -> trunk -> ReLU -> (box head * pixels, sigmoid(score head)) -> Concat: a detector in miniature."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
             for name, shape in (("w_trunk", (32, 32)), ("w_box", (32, 4)), ("w_score", (32, 8)))]
    inits.append(numpy_helper.from_array(np.float32(pixels), "pixels"))
    nodes = [helper.make_node("MatMul", ["x", "w_trunk"], ["t"], name="trunk"),
             helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("MatMul", ["r", "w_box"], ["b"], name="box"),
             helper.make_node("Mul", ["b", "pixels"], ["boxes"]),
             helper.make_node("MatMul", ["r", "w_score"], ["s"], name="score"),
             helper.make_node("Sigmoid", ["s"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])], initializer=inits)
    return normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "det")


def _calibration(n=32):
    return Calibration({"x": np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)})


def test_head_rel_mse_normalises_each_head_on_its_own():
    rng = np.random.default_rng(0)
    ref = [(rng.standard_normal((2, 4)) * 300, rng.random((2, 8))) for _ in range(3)]
    out = [(b + rng.standard_normal(b.shape), s + 0.01 * rng.standard_normal(s.shape)) for b, s in ref]
    per_head = [rel_mse([o[h] for o in out], [r[h] for r in ref]) for h in (0, 1)]
    assert head_rel_mse(out, ref) == pytest.approx(np.mean(per_head))
    # scaling one head (pixels -> normalised coordinates) leaves its share unchanged
    scaled = lambda batches: [(b / 300, s) for b, s in batches]  # noqa: E731
    assert head_rel_mse(scaled(out), scaled(ref)) == pytest.approx(head_rel_mse(out, ref))
    # a bare array per batch is one head: rel_mse itself
    assert head_rel_mse([o[0] for o in out], [r[0] for r in ref]) == rel_mse([o[0] for o in out], [r[0] for r in ref])


def test_score_layer_weighs_as_much_as_box_layer():
    # Before: one relative MSE over the concatenation; the box pixels (x300) carried ~all of its power,
    # so the score layer's sensitivity came out ~1e-5 of the box layer's and 4-bit scores looked free.
    model = _detector()
    table = LayerCandidates(CandidateSet((4, 8), (8,), (32,))).resolve([l.name for l in model.layers])
    term = measure_accuracy_term(model, _calibration(), table, progress=None)
    box, score = (next(l.name for l in model.layers if key in l.name) for key in ("box", "score"))
    ratio = term.weight_sensitivity[score] / term.weight_sensitivity[box]
    # the sigmoid's slope (<= 1/4) damps the score head's noise: ~0.08 here, not ~1e-6
    assert 0.01 < ratio < 1, ratio
    # and it does not depend on the box head's unit
    rescaled = measure_accuracy_term(_detector(pixels=1.0), _calibration(), table, progress=None)
    assert rescaled.weight_sensitivity[score] / rescaled.weight_sensitivity[box] == pytest.approx(ratio, rel=1e-3)


def test_suffix_sessions_serve_outputs_complete_before_the_cut():
    model = loss_view(_detector())
    assert [o.name for o in model.proto.graph.output] == ["boxes", "scores"]
    calib = _calibration(8)
    batches = calib.batches(model)
    whole = NoiseGraph(model)
    suffix = SuffixNoiseGraphs(model, [l.name for l in model.layers], group_size=1)
    suffix.capture(batches)
    assert suffix.early[suffix.group_of[next(l.name for l in model.layers if "score" in l.name)]] == ["boxes"]
    rng = np.random.default_rng(2)
    for layer in model.layers:
        err = rng.standard_normal(layer.weight_shape).astype(np.float32) * 0.05
        for b, batch in enumerate(batches):
            got, want = suffix.run(b, {("w", layer.name): err}), whole.run(batch, {("w", layer.name): err})
            assert len(got) == 2
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_verify_measures_the_heads_the_plan_was_predicted_on():
    # plan --verify compiles the plan with TVM and measures the same head-averaged loss: within 2x
    from bitq_tvm.solver.planner import Objective, plan_model, verify

    model = _detector()
    grid = LayerCandidates(CandidateSet((4, 8), (8,), (32,)))
    result = plan_model(model, _calibration(64), Objective("budget", 0.01), candidates=grid, progress=None)
    assert len({str(lf) for lf in result.plan.layers.values()}) == 2  # the budget binds: 4 bits on some layers only
    check = verify(model, result.plan, _calibration(64), result.accuracy, progress=None)
    assert check.measured_logit_mse > 0 and 0.5 <= check.ratio <= 2.0, check
