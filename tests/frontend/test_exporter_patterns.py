"""What exporters write, one small onnx.helper model per pattern, at batch 1 and batch 4.

Each pattern is one the corpus's real models (or models users brought) contain: torch's
``onnx::`` initializer names, TF-style explicit asymmetric ``Pad`` before convs, PaddlePaddle's
shape subgraphs and ``-1`` dims, the Clip/HardSwish/HardSigmoid/SiLU activation forms, and a
two-input transformer with int64 token ids and activation x activation attention MatMuls.

For each: FP32 equals ONNX Runtime on the original model within ``FP32_REL_TOL * max|ORT|``,
two calls are bit-identical, and the BFP simulation equals the NumPy reference simulation.
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitq_tvm.api import compile_model
from bitq_tvm.cli import main
from bitq_tvm.frontend.onnx_model import normalize
from bitq_tvm.frontend.reference import run_reference
from bitq_tvm.plan import Plan

FP32_REL_TOL = 1e-4
SIM_REL_TOL = 1e-4
BATCHES = (1, 4)


def _model(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "pattern", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w(rng, name, shape, scale=1.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _image_input(name="x", channels=3, size=16, batch="batch"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, channels, size, size])


def torch_names():
    """Weights called ``onnx::Conv_909`` (torch's BN-folded export); a tensor already called ``Conv_909``."""
    rng = np.random.default_rng(1)
    inits = [_w(rng, "onnx::Conv_909", (16, 3, 3, 3), 0.3), _w(rng, "onnx::Conv_910", (32, 16, 1, 1), 0.2),
             _w(rng, "onnx::MatMul_671", (32, 10), 0.2), numpy_helper.from_array(np.zeros(16, np.float32), "b0")]
    nodes = [helper.make_node("Conv", ["x", "onnx::Conv_909", "b0"], ["c0"], pads=[1, 1, 1, 1], name="/conv0/Conv"),
             helper.make_node("Relu", ["c0"], ["Conv_909"], name="/act0/Relu"),
             helper.make_node("Conv", ["Conv_909", "onnx::Conv_910"], ["c1"], name="/conv1/Conv"),
             helper.make_node("GlobalAveragePool", ["c1"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "onnx::MatMul_671"], ["y"], name="/fc/MatMul")]
    return _model(nodes, inits, [_image_input()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])])


def tf_same_pad():
    """Explicit asymmetric Pad (TF 'SAME' at stride 2) before a conv and before a depthwise conv."""
    rng = np.random.default_rng(2)
    pads_br = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads_br")
    pads_all = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_all")
    inits = [pads_br, pads_all, _w(rng, "stem", (16, 3, 3, 3), 0.3), _w(rng, "dw", (16, 1, 3, 3), 0.3),
             _w(rng, "pw", (32, 16, 1, 1), 0.2)]
    nodes = [helper.make_node("Pad", ["x", "pads_br"], ["p0"], mode="constant", name="pad0"),
             helper.make_node("Conv", ["p0", "stem"], ["c0"], strides=[2, 2], name="stem_conv"),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Pad", ["r0", "pads_all"], ["p1"], mode="constant", name="pad1"),
             helper.make_node("Conv", ["p1", "dw"], ["c1"], group=16, name="dw_conv"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Pad", ["r1", "pads_br"], ["p2"], mode="constant", name="pad2"),
             helper.make_node("Conv", ["p2", "pw"], ["y"], name="pw_conv")]
    return _model(nodes, inits, [_image_input(size=15)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32, 8, 8])])


def paddle_shape_subgraph():
    """PaddlePaddle's Reshape(shape = Concat(Cast(Constant int32), ...)) and ``-1`` declared dims."""
    rng = np.random.default_rng(3)

    def int32_constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int32), name))

    inits = [_w(rng, "conv2d_0.w_0", (8, 3, 3, 3), 0.3), _w(rng, "fc_0.w_0", (8 * 8 * 8, 6), 0.05)]
    nodes = [helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2], name="p2o.Conv.0"),
             int32_constant("s0", [0]), int32_constant("s1", [-1]),
             helper.make_node("Cast", ["s0"], ["s0l"], to=TensorProto.INT64),
             helper.make_node("Cast", ["s1"], ["s1l"], to=TensorProto.INT64),
             helper.make_node("Concat", ["s0l", "s1l"], ["shape"], axis=0),
             helper.make_node("Reshape", ["c", "shape"], ["flat"], name="p2o.Reshape.0"),
             helper.make_node("MatMul", ["flat", "fc_0.w_0"], ["y"], name="p2o.MatMul.0")]
    return _model(nodes, inits, [_image_input(batch=-1)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 6])],
                  opset=13)


def activation_forms():
    """HardSwish op, x * HardSigmoid(x), Paddle's x * Clip(x + 3, 0, 6) / 6, SiLU as x * Sigmoid(x)."""
    rng = np.random.default_rng(4)
    scalars = {"three": 3.0, "zero": 0.0, "six": 6.0}
    inits = [_w(rng, f"w{i}", (16, 3 if i == 0 else 16, 3, 3), 0.3) for i in range(4)]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("HardSwish", ["c0"], ["a0"]),
             helper.make_node("Conv", ["a0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("HardSigmoid", ["c1"], ["g1"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["c1", "g1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["c2", "three"], ["t2"]),
             helper.make_node("Clip", ["t2", "zero", "six"], ["k2"]),
             helper.make_node("Div", ["k2", "six"], ["d2"]),
             helper.make_node("Mul", ["c2", "d2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
             helper.make_node("Sigmoid", ["c3"], ["s3"]),
             helper.make_node("Mul", ["c3", "s3"], ["y"])]
    return _model(nodes, inits, [_image_input(size=8)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])])


def token_transformer(seq=8, hidden=32, vocab=50):
    """Two int64 inputs (token ids, token types), one attention block: the exporter's BERT shape."""
    rng = np.random.default_rng(5)
    inits = [_w(rng, "word_embeddings", (vocab, hidden), 0.5), _w(rng, "type_embeddings", (2, hidden), 0.5),
             *[_w(rng, f"{n}.weight", (hidden, hidden), hidden ** -0.5) for n in ("q", "k", "v", "out")],
             numpy_helper.from_array(np.array(hidden ** -0.5, np.float32), "scale")]
    nodes = [helper.make_node("Gather", ["word_embeddings", "input_ids"], ["we"]),
             helper.make_node("Gather", ["type_embeddings", "token_type_ids"], ["te"]),
             helper.make_node("Add", ["we", "te"], ["h"]),
             *[helper.make_node("MatMul", ["h", f"{n}.weight"], [n], name=f"/attn/{n}/MatMul") for n in ("q", "k", "v")],
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="/attn/qk/MatMul"),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="/attn/av/MatMul"),
             helper.make_node("MatMul", ["ctx", "out.weight"], ["y"], name="/attn/out/MatMul")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", seq]) for n in ("input_ids", "token_type_ids")]
    return _model(nodes, inits, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, hidden])])


def _feeds(proto, shapes, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.INT64:
            high = 2 if "type" in inp.name else 50
            feeds[inp.name] = rng.integers(0, high, size=shapes[inp.name], dtype=np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shapes[inp.name]).astype(np.float32)
    return feeds


def _shapes(proto, batch):
    shapes = {}
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = (batch, *(d.dim_value for d in dims[1:]))
    return shapes


def _assert_close(got, want, rel_tol, what):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, what
        assert np.abs(g - w).max() <= rel_tol * np.abs(w).max(), f"{what}: {np.abs(g - w).max()} vs max {np.abs(w).max()}"


PATTERNS = {f.__name__: f for f in (torch_names, tf_same_pad, paddle_shape_subgraph, activation_forms, token_transformer)}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_matches_onnxruntime_and_reference(pattern, batch):
    proto = PATTERNS[pattern]()
    shapes = _shapes(proto, batch)
    model = normalize(proto, f"{pattern}.onnx", shapes)
    feeds = _feeds(proto, shapes, seed=batch)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    fp32 = compile_model(model, None, progress=None)
    first, second = fp32.run(feeds), fp32.run(feeds)
    assert all(np.array_equal(a, b) for a, b in zip(first, second)), "two calls differ"
    _assert_close(first, want, FP32_REL_TOL, f"{pattern} FP32 vs ONNX Runtime")

    simulated = compile_model(model, Plan.uniform("bfp6_b16"), progress=None)
    assert simulated.formats and all(not lf.is_fp32 for lf in simulated.formats.values())
    _assert_close(simulated.run(feeds), run_reference(model, simulated.formats, feeds), SIM_REL_TOL,
                  f"{pattern} BFP simulation vs NumPy reference")


def test_torch_names_keep_their_layers():
    model = normalize(torch_names(), "torch.onnx", {"x": (1, 3, 16, 16)})
    assert [layer.name for layer in model.layers] == ["/conv0/Conv", "/conv1/Conv", "/fc/MatMul"]
    # Renamed to what TVM's importer calls the parameter; the tensor already called Conv_909 keeps its name.
    weights = [layer.weight for layer in model.layers]
    assert weights == ["Conv_909_1", "Conv_910", "MatMul_671"]
    assert set(weights) <= {t.name for t in model.proto.graph.initializer}


def test_attention_matmuls_are_listed_as_fp32(capsys, tmp_path):
    proto = token_transformer()
    model = normalize(proto, "tokens.onnx", _shapes(proto, 1))
    assert [layer.name for layer in model.layers] == [f"/attn/{n}/MatMul" for n in ("q", "k", "v", "out")]
    assert {n.name: n.reason.split(" (")[0] for n in model.fp32_nodes} == {
        "/attn/qk/MatMul": "activation x activation MatMul", "/attn/av/MatMul": "activation x activation MatMul"}
    path = tmp_path / "tokens.onnx"
    path.write_bytes(proto.SerializeToString())
    assert main(["inspect", str(path), "--input-shape", "input_ids:1,8", "--input-shape", "token_type_ids:1,8"]) == 0
    out = capsys.readouterr().out
    assert "2 conv/matmul node(s) are not BFP layers and stay FP32" in out
    assert "| /attn/qk/MatMul | MatMul | activation x activation MatMul" in out


def test_dynamic_input_hint_says_what_is_known(tmp_path, capsys):
    path = tmp_path / "paddle.onnx"
    path.write_bytes(paddle_shape_subgraph().SerializeToString())
    assert main(["inspect", str(path)]) == 2
    assert "input 'x' has dynamic shape [?,3,16,16] (rank 4); pin it with --input-shape x:D0,3,16,16" in capsys.readouterr().err


def test_op_the_importer_lacks_is_named_before_any_work(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("FancyOp", ["r"], ["y"], name="my_fancy", domain="acme")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "fancy.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                             helper.make_opsetid("acme", 1)]).SerializeToString())
    assert main(["compile", str(path), "--format", "bfp8_b32", "-o", str(tmp_path / "fancy.so")]) == 2
    assert capsys.readouterr().err.strip() == (f"bitq-tvm: error: {path}: node 'my_fancy' is an ONNX FancyOp "
                                               "(domain 'acme'), which TVM's ONNX importer cannot convert")
    assert not (tmp_path / "fancy.so").exists()


def test_plan_calibrates_a_model_with_int64_token_inputs(tmp_path):
    """Calibration feeds token ids as the int64 the model declares (not as float32)."""
    path, calib, out = tmp_path / "tokens.onnx", tmp_path / "tokens.npz", tmp_path / "plan.json"
    path.write_bytes(token_transformer().SerializeToString())
    rng = np.random.default_rng(0)
    np.savez(calib, input_ids=rng.integers(0, 50, (8, 8)), token_type_ids=rng.integers(0, 2, (8, 8)))
    assert main(["plan", str(path), "--input-shape", "input_ids:4,8", "--input-shape", "token_type_ids:4,8",
                 "--calib", str(calib), "--budget", "1%", "-o", str(out)]) == 0
    plan = Plan.load(str(out))
    assert set(plan.layers) == {f"/attn/{n}/MatMul" for n in ("q", "k", "v", "out")}
    np.savez(calib, input_ids=rng.standard_normal((8, 8)), token_type_ids=rng.integers(0, 2, (8, 8)))
    assert main(["plan", str(path), "--input-shape", "input_ids:4,8", "--input-shape", "token_type_ids:4,8",
                 "--calib", str(calib), "--budget", "1%", "-o", str(out) + ".2"]) == 2
