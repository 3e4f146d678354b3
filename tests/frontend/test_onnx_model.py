"""ONNX loading and normalisation: layer table, pinned shapes, folding, and bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bitq_tvm.api import check_weights, resolve_plan
from bitq_tvm.frontend.relax_import import import_relax
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx, normalize, parse_input_shapes
from bitq_tvm.models import zoo
from bitq_tvm.plan import Plan


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return str(path)


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _tiny(op_nodes, inits, in_shape, out_shape, extra_nodes=()):
    graph = helper.make_graph(list(extra_nodes) + op_nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layer_table_of_resnet18():
    model = normalize(zoo.resnet18(image_size=64), "resnet18")
    names = [layer.name for layer in model.layers]
    assert len(names) == 21  # 20 convs (incl. 3 downsample) + fc
    assert names[0] == "conv1" and names[-1] == "fc"
    conv1 = model.layers[0]
    assert conv1.weight_shape == (64, 3, 7, 7) and conv1.output_shape == (1, 64, 32, 32)
    assert conv1.macs == 64 * 32 * 32 * 3 * 7 * 7 and conv1.params == 64 * 3 * 7 * 7
    fc = model.layers[-1]
    assert fc.kind == "matmul" and fc.reduction == 512 and fc.trans_b
    # BatchNormalization is folded into the convs: the weights BFP sees are the deployed weights
    assert not [n for n in model.proto.graph.node if n.op_type == "BatchNormalization"]


def test_normalisation_preserves_outputs():
    original = zoo.resnet18(image_size=32, num_classes=10)
    feeds = zoo.synthetic_inputs(original, 1, seed=0)
    want = _ort(original, feeds)[0]
    got = _ort(normalize(original, "resnet18").proto, feeds)[0]
    # BN folding reassociates float32 arithmetic: relative 1e-4 of the output range
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_weights_in_constant_nodes_become_the_same_layers():
    base = zoo.transformer_encoder(seq_len=8, hidden=32, layers=1, heads=2, ffn=64)
    a = normalize(base, "a")
    b = normalize(zoo.with_weights_in_constant_nodes(base), "b")
    assert [(l.name, l.weight_shape) for l in a.layers] == [(l.name, l.weight_shape) for l in b.layers]
    assert {k: v.tobytes() for k, v in a.weights().items()} == {k: v.tobytes() for k, v in b.weights().items()}
    _, params = import_relax(b)
    assert set(params) == {layer.weight for layer in b.layers}


def test_dynamic_batch_needs_input_shape(tmp_path):
    path = _save(tmp_path, zoo.with_dynamic_batch(zoo.resnet18(image_size=32, num_classes=10)))
    with pytest.raises(BitqError, match=r"input 'input' has dynamic shape \[batch,3,32,32\] \(rank 4\); pin it with --input-shape input:BATCH,3,32,32"):
        load_onnx(path)
    model = load_onnx(path, parse_input_shapes(["input:2,3,32,32"]))
    assert model.input_shapes == {"input": (2, 3, 32, 32)}
    assert model.layers[-1].output_shape == (2, 10)
    assert load_onnx(path, parse_input_shapes(["2,3,32,32"])).input_shapes == {"input": (2, 3, 32, 32)}


@pytest.mark.parametrize("spec, message", [
    (["input:1,3,32"], "does not fit the model's input shape"),
    (["image:1,3,32,32"], r"unknown input\(s\) \['image'\]"),
    (["input:1,3,x,32"], "expected NAME:D0,D1"),
    (["input:0,3,32,32"], "positive"),
])
def test_bad_input_shapes(tmp_path, spec, message):
    path = _save(tmp_path, zoo.with_dynamic_batch(zoo.resnet18(image_size=32, num_classes=10)))
    with pytest.raises(BitqError, match=message):
        load_onnx(path, parse_input_shapes(spec))


def test_shape_subgraph_is_folded_for_the_importer():
    # Flatten written the way exporters do: Reshape(x, Concat(Shape(x)[0], -1)), batch dynamic.
    w = numpy_helper.from_array(np.ones((5, 48), np.float32), "fc.weight")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.weight"], ["y"], name="fc", transB=1),
    ]
    inits = [w, numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "zero1"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    proto = _tiny(nodes, inits, ["batch", 3, 4, 4], ["batch", 5])
    model = normalize(proto, "flatten", {"x": (2, 3, 4, 4)})
    assert [n.op_type for n in model.proto.graph.node if n.op_type in ("Shape", "Gather", "Concat")] == []
    mod, params = import_relax(model)  # fails on an unfolded Shape chain
    assert list(params) == ["fc.weight"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(BitqError, match="nope.onnx: no such file"):
        load_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(BitqError, match="bad.onnx: not"):
        load_onnx(bad)
    # Structurally broken: a node reads a tensor nobody produces.
    broken = _tiny([helper.make_node("Relu", ["ghost"], ["y"], name="r")], [], [1, 4], [1, 4])
    with pytest.raises(BitqError, match="invalid ONNX model"):
        load_onnx(_save(tmp_path, broken))


def test_unsupported_op_is_named(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    proto = _tiny([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                   helper.make_node("Celu", ["h"], ["y"], name="act")], [w], [1, 4], [1, 4])
    with pytest.raises(BitqError, match="node 'act' is an ONNX Celu, which TVM's ONNX importer cannot convert"):
        load_onnx(_save(tmp_path, proto))


def test_plan_errors_name_layers():
    model = normalize(zoo.resnet18(image_size=32, num_classes=10), "resnet18")
    with pytest.raises(BitqError, match=r"layer 'layer1.0.conv3' does not exist in the model; did you mean 'layer1.0.conv2', 'layer1.0.conv1'"):
        resolve_plan(model, Plan.from_json({"bitq_plan_version": 1, "layers": {"layer1.0.conv3": "bfp8_b32"}}))
    with pytest.raises(BitqError, match="unknown BFP format 'bfp9'; presets: bfp8_b32"):
        Plan.from_json({"bitq_plan_version": 1, "default": "bfp9"})
    with pytest.raises(BitqError, match="unsupported plan version 7"):
        Plan.from_json({"bitq_plan_version": 7})


def test_plan_naming_an_unsupported_layer_op():
    w = numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w")
    proto = _tiny([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up")], [w], [1, 3, 4, 4], [1, 2, 6, 6])
    model = normalize(proto, "up.onnx")
    assert model.layers == ()
    assert [(n.name, n.onnx_op) for n in model.fp32_nodes] == [("up", "ConvTranspose")]
    with pytest.raises(BitqError, match=r"layer 'up' is an ONNX ConvTranspose node \(no BFP lowering for "
                                        r"ConvTranspose\), which stays FP32"):
        resolve_plan(model, Plan.from_json({"bitq_plan_version": 1, "layers": {"up": "bfp8_b32"}}))


def test_nan_weights_are_named():
    model = normalize(zoo.transformer_encoder(seq_len=8, hidden=32, layers=1, heads=2, ffn=64), "enc.onnx")
    mod, params = import_relax(model)
    victim = model.layers[2]
    params[victim.weight] = params[victim.weight].copy()
    params[victim.weight].flat[3] = np.nan
    formats = resolve_plan(model, Plan.uniform("bfp8_b32"))
    with pytest.raises(BitqError, match=f"weight tensor '{victim.weight}' of layer '{victim.name}' contains 1 NaN/Inf"):
        check_weights(model, formats, params)
    check_weights(model, resolve_plan(model, Plan.from_json(
        {"bitq_plan_version": 1, "default": "bfp8_b32", "layers": {victim.name: "fp32"}})), params)


def test_reference_evaluator_agrees_with_onnxruntime_on_fp32():
    # The NumPy reference simulation runs in ONNX's reference evaluator: check it is a faithful FP32 base.
    model = normalize(zoo.mobilenet_v2(image_size=32, num_classes=10, width=0.5), "mnv2")
    feeds = zoo.synthetic_inputs(model.proto, 1, seed=1)
    want = _ort(model.proto, feeds)[0]
    got = ReferenceEvaluator(model.proto).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def _classifier(softmax_axis):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=softmax_axis)]
    return _tiny(nodes, [w], [2, 8], [2, 5])


def test_loss_view_reads_the_first_output_before_a_final_softmax():
    from bitq_tvm.frontend.onnx_model import loss_view

    model = normalize(_classifier(-1), "clf")
    logits = loss_view(model)
    assert [n.op_type for n in logits.proto.graph.node][-1] != "Softmax"
    assert logits.proto.graph.output[0].name == "z" and logits.layers == model.layers
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (z,) = _ort(logits.proto, {"x": x})
    np.testing.assert_allclose(z, x @ numpy_helper.to_array(model.proto.graph.initializer[0]), rtol=1e-5)
    assert [n.op_type for n in model.proto.graph.node][-1] == "Softmax"  # the original is untouched


def test_loss_view_keeps_outputs_that_are_not_a_last_axis_softmax():
    from bitq_tvm.frontend.onnx_model import loss_view

    across_batch = normalize(_classifier(0), "clf0")
    assert loss_view(across_batch) is across_batch
    resnet = normalize(zoo.resnet18(image_size=32), "resnet18")
    assert loss_view(resnet) is resnet


def _detector_head():
    # YOLOv8's output in miniature: box coordinates in pixels beside sigmoid scores, one Concat
    rng = np.random.default_rng(2)
    wb = numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "wb")
    ws = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "ws")
    scale = numpy_helper.from_array(np.float32(300.0), "px")
    nodes = [helper.make_node("MatMul", ["x", "wb"], ["b0"]), helper.make_node("Mul", ["b0", "px"], ["box"]),
             helper.make_node("MatMul", ["x", "ws"], ["s0"]), helper.make_node("Sigmoid", ["s0"], ["score"]),
             helper.make_node("Concat", ["box", "score"], ["y"], axis=1)]
    return _tiny(nodes, [wb, ws, scale], [2, 8], [2, 5])


def test_loss_view_splits_a_final_concat_into_its_heads():
    from bitq_tvm.frontend.onnx_model import loss_view

    model = normalize(_detector_head(), "det")
    heads = loss_view(model)
    assert [o.name for o in heads.proto.graph.output] == ["box", "score"] and heads.layers == model.layers
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    (y,) = _ort(model.proto, {"x": x})
    box, score = _ort(heads.proto, {"x": x})
    np.testing.assert_array_equal(np.concatenate([box, score], axis=1), y)
    assert [o.name for o in model.proto.graph.output] == ["y"]  # the original is untouched


def test_loss_view_keeps_a_concat_along_the_batch_axis():
    from bitq_tvm.frontend.onnx_model import loss_view

    w = numpy_helper.from_array(np.ones((8, 2), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Concat", ["z", "z"], ["y"], axis=0)]
    proto = _tiny(nodes, [w], [2, 8], [4, 2])
    model = normalize(proto, "batch_concat")
    assert loss_view(model) is model
