"""The accuracy term: exact noise powers, linear sensitivities, calibration errors, candidates."""

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.solver.accuracy import (Calibration, NoiseGraph, check_calibration, load_calibration,
                                      measure_accuracy_term, measure_output_mse, noise_power)
from bitq_tvm.plan import FP32, LayerFormats
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates, check_candidate


@pytest.fixture(scope="module")
def digits():
    return load_onnx(bundled_model_path()), bundled_test_data()


def test_noise_power_matches_direct_computation():
    # 3 rows x 5 elements, blocks of 2 along the last axis: the direct BFP rounding by hand.
    x = np.array([[0.3, -1.7, 0.05, 2.9, -0.6], [1.0, 1.0, 0.0, 0.0, 7.5], [-3.2, 0.01, 0.4, 0.4, 0.0]], np.float32)
    fmt = BFPFormat(mantissa_bits=3, block_size=2)
    expected = []
    for row in x:
        for start in range(0, 5, 2):
            block = row[start:start + 2]
            if not np.any(block):
                expected += [0.0] * len(block)
                continue
            scale = 2.0 ** (np.floor(np.log2(np.abs(block).max())) - 1)  # m - 2 = 1
            q = np.clip(np.rint(block / scale), -4, 3) * scale
            expected += list((q - block) ** 2)
    assert noise_power(x, fmt, axis=1) == pytest.approx(np.mean(expected), rel=1e-6)
    assert noise_power(x, None, axis=1) == 0.0


def test_sensitivity_is_linear_in_noise_power(digits):
    # Doubling the injected noise power must double the output MSE to within 15%: the
    # planner's "sensitivity x noise power" rests on this.
    model, data = digits
    calib = Calibration({"input": data["calib"]})
    graph = NoiseGraph(model)
    batches = calib.batches(model)
    reference = [graph.run(b) for b in batches]
    rng = np.random.default_rng(0)
    for kind, layer in (("w", model.layers[2]), ("a", model.layers[1])):
        shape = layer.weight_shape if kind == "w" else layer.input_shape
        errors = [rng.standard_normal(shape).astype(np.float32) * 1e-3 for _ in batches]
        single = measure_output_mse(graph, batches, reference, (kind, layer.name), errors)
        double = measure_output_mse(graph, batches, reference, (kind, layer.name), errors, scale=np.sqrt(2.0))
        assert single > 0
        assert double / single == pytest.approx(2.0, rel=0.15)


def test_accuracy_term_orders_candidates(digits):
    model, data = digits
    table = LayerCandidates(CandidateSet((4, 8), (8,), (32,))).resolve([l.name for l in model.layers])
    term = measure_accuracy_term(model, Calibration({"input": data["calib"]}), table, progress=None)
    for layer in model.layers:
        # 4-bit weights put more noise on every layer than 8-bit (4 fewer bits: ~256x the power)
        w4, w8 = term.weight_noise[layer.name]["bfp4_b32"], term.weight_noise[layer.name]["bfp8_b32"]
        assert w4 > 50 * w8 > 0
        assert term.layer_loss(layer.name, LayerFormats.bfp(4, 8, 32)) > term.layer_loss(layer.name, LayerFormats.bfp(8, 8, 32))
    assert term.unit == "relative logit MSE" and term.to_user_units(0.01) == 0.01


def test_bad_calibration_names_input_and_shapes(digits, tmp_path):
    model, data = digits
    with pytest.raises(BitqError, match=r"input 'input'.*\[1, 8, 9\].*\[1, 1, 8, 8\]"):
        check_calibration(model, Calibration({"input": np.zeros((4, 1, 8, 9), np.float32)}))
    with pytest.raises(BitqError, match="no array for model input 'input'"):
        check_calibration(model, Calibration({"pixels": np.zeros((4, 1, 8, 8), np.float32)}))
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 64), np.float32))
    with pytest.raises(BitqError, match=r"bad.npz.*'input'.*\[64\]"):
        load_calibration(path, model)
    with pytest.raises(BitqError, match="3 labels for 4 samples"):
        Calibration({"input": np.zeros((4, 1, 8, 8))}, labels=np.arange(3))


def test_candidates_are_plan_format_pairs_with_stable_labels():
    # labels appear in plans and reports: they must not change
    assert LayerFormats.bfp(4, 8, 32).label == "w4a8_b32"
    assert LayerFormats.bfp(6, 8, 16, 5).label == "w6a8_b16_e5"
    assert FP32.label == "fp32" and FP32.is_fp32 and FP32.block_size is None
    assert LayerFormats.bfp(4, 8, 32) == LayerFormats(BFPFormat(4, 32), BFPFormat(8, 32))
    weight_only = LayerFormats(BFPFormat(8, 32), None)  # a plan may say this; a candidate set may not
    assert not weight_only.is_fp32 and not weight_only.is_bfp_pair and weight_only.label == "bfp8_b32,fp32"
    assert [c.label for c in LayerCandidates.from_specs(None, ["x=w4a8_b32"]).pins["x"]] == ["w4a8_b32"]


def test_candidate_parsing_and_empty_sets():
    assert len(CandidateSet().candidates) == 24
    assert [c.label for c in CandidateSet.parse("w=4,8;a=8;b=32").candidates] == ["w8a8_b32", "w4a8_b32"]
    pins = LayerCandidates.from_specs(None, ["first=fp32", "fc2=bfp8_b32", "fc1=w=6;a=8;b=16"])
    table = pins.resolve(["conv1", "conv2", "fc1", "fc2"])
    assert [c.label for c in table["conv1"]] == ["fp32"]
    assert [c.label for c in table["fc2"]] == ["w8a8_b32"]
    assert [c.label for c in table["fc1"]] == ["w6a8_b16"]
    with pytest.raises(BitqError, match="layer 'fc1' has an empty candidate set"):
        LayerCandidates(pins={"fc1": ()})
    with pytest.raises(BitqError, match=r"--pin 'fc1=w=;a=8'.*empty"):
        LayerCandidates.from_specs(None, ["fc1=w=;a=8"])
    with pytest.raises(BitqError, match="'nope'"):
        LayerCandidates.from_specs(None, ["nope=fp32"]).resolve(["conv1"])
    with pytest.raises(BitqError, match="block size"):
        check_candidate(LayerFormats(BFPFormat(4, 16), BFPFormat(8, 32)))
    with pytest.raises(BitqError, match="layer 'fc1'.*both the weight and the activation"):
        LayerCandidates(pins={"fc1": (LayerFormats(BFPFormat(4, 16), None),)})
    with pytest.raises(BitqError, match="block size"):
        LayerCandidates.from_specs(None, ["fc1=bfp4_b16,bfp8_b32"])
    with pytest.raises(BitqError, match="w .weight bits.*9"):
        CandidateSet.parse("w=9")


def test_sensitivities_are_measured_on_logits_before_a_final_softmax(digits):
    # The same network with a Softmax appended must get the same sensitivities: probabilities
    # saturate, and a loss measured on them would not add over layers.
    from onnx import helper

    from bitq_tvm.frontend.onnx_model import normalize

    model, data = digits
    proto = type(model.proto)()
    proto.CopyFrom(model.proto)
    logits = proto.graph.output[0].name
    proto.graph.node.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=-1))
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("probabilities", 1, [1, 10]))
    with_softmax = normalize(proto, "digits+softmax")
    table = LayerCandidates(CandidateSet((4,), (8,), (32,))).resolve([l.name for l in model.layers])
    calib = Calibration({"input": data["calib"][:16]})
    plain = measure_accuracy_term(model, calib, table, progress=None)
    softmaxed = measure_accuracy_term(with_softmax, calib, table, progress=None)
    assert [n.op_type for n in model.proto.graph.node][-1] != "Softmax"
    for name in plain.weight_sensitivity:
        assert softmaxed.weight_sensitivity[name] == pytest.approx(plain.weight_sensitivity[name], rel=1e-4)
        assert softmaxed.act_sensitivity[name] == pytest.approx(plain.act_sensitivity[name], rel=1e-4)


def test_depthwise_activation_blocks_equal_groups_of_one_channel_without_padding():
    # The accuracy term quantizes a depthwise input with blocks of one value: the same numbers
    # as blocks within groups of one channel (which pad every value to a block of B).
    from bitq_tvm.frontend.onnx_model import Layer
    from bitq_tvm.frontend.reference import layer_activation_blocks, layer_block_axes
    from bitq_tvm.formats import fake_quantize_np, get_format
    from bitq_tvm.solver.accuracy import sensitivity_at

    layer = Layer("dw", "Conv", "w", (24, 1, 3, 3), (2, 24, 5, 5), (2, 24, 5, 5), groups=24)
    x = (np.random.default_rng(3).standard_normal(layer.input_shape) * np.logspace(-3, 3, 24)[:, None, None]
         ).astype(np.float32)
    fmt = get_format("bfp4_b32")
    (axis, groups), _ = layer_block_axes(layer)
    a_fmt, a_axis, a_groups = layer_activation_blocks(layer, fmt)
    assert a_fmt.block_size == 1 and a_groups == 1
    np.testing.assert_array_equal(fake_quantize_np(x, a_fmt, axis=a_axis, groups=a_groups),
                                  fake_quantize_np(x, fmt, axis=axis, groups=groups))
    assert noise_power(x, a_fmt, a_axis, a_groups) == noise_power(x, fmt, axis, groups) > 0


def test_sensitivity_at_interpolates_in_log_log_and_holds_outside():
    from bitq_tvm.solver.accuracy import sensitivity_at

    levels = ((1e-6, 2.0), (1e-2, 8.0))
    assert sensitivity_at(None, 5.0, 1e-4) == 5.0  # one level: the flat sensitivity
    assert sensitivity_at(levels, 5.0, 1e-4) == pytest.approx(4.0)  # halfway in log power: geometric mean
    assert sensitivity_at(levels, 5.0, 1e-9) == pytest.approx(2.0)
    assert sensitivity_at(levels, 5.0, 1.0) == pytest.approx(8.0)


def test_two_probe_levels_predict_each_end_as_measured(digits):
    # With quantization-noise probes at the noisiest (4-bit) and the quietest (8-bit) weight format,
    # each end's predicted loss is that format's own measured loss at the layer alone; one level
    # extrapolates the 4-bit sensitivity down to 8 bits.
    from bitq_tvm.frontend.reference import layer_block_axes, layer_weight_blocks, weight_from_blocks
    from bitq_tvm.formats import fake_quantize_np, get_format
    from bitq_tvm.solver.accuracy import sensitivity_at

    model, data = digits
    calib = Calibration({"input": data["calib"][:64]})
    table = LayerCandidates(CandidateSet((4, 8), (6, 8), (32,))).resolve([l.name for l in model.layers])
    one = measure_accuracy_term(model, calib, table, progress=None)
    two = measure_accuracy_term(model, calib, table, progress=None, probe_levels=2)
    graph = NoiseGraph(model)
    batches = calib.batches(model)
    reference = [graph.run(b) for b in batches]
    weights = model.weights()
    layer = model.layers[2]
    w = weights[layer.weight]
    for bits in (4, 8):
        fmt = get_format(f"bfp{bits}_b32")
        view, blocks_fmt, axis = layer_weight_blocks(layer, w, fmt)
        error = weight_from_blocks(layer, fake_quantize_np(view, blocks_fmt, axis=axis) - view, fmt)
        direct = measure_output_mse(graph, batches, reference, ("w", layer.name), [error] * len(batches))
        power = two.weight_noise[layer.name][fmt.name]
        predicted = sensitivity_at(two.weight_levels[layer.name], two.weight_sensitivity[layer.name], power) * power
        assert predicted == pytest.approx(direct, rel=1e-3), bits
    noisiest = LayerFormats.bfp(4, 6, 32)  # the first level's own probes: the same loss either way
    assert one.layer_loss(layer.name, noisiest) == pytest.approx(two.layer_loss(layer.name, noisiest), rel=1e-6)
    assert len(two.weight_levels[layer.name]) == 2 and not one.weight_levels
    # activations: the quiet (8-bit) point is that format's own error at the layer's input alone
    (a_axis, a_groups), _ = layer_block_axes(layer)
    errors = [fake_quantize_np(x, get_format("bfp8_b32"), axis=a_axis, groups=a_groups) - x
              for x in (graph.capture(b)[layer.name] for b in batches)]
    direct = measure_output_mse(graph, batches, reference, ("a", layer.name), errors)
    power = two.act_noise[layer.name]["bfp8_b32"]
    assert dict(two.act_levels[layer.name])[power] * power == pytest.approx(direct, rel=1e-3)
    with pytest.raises(BitqError, match="probe levels must be one of"):
        measure_accuracy_term(model, calib, table, progress=None, probe_levels=3)
