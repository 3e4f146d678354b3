"""The project's models: builders, rewrites, synthetic inputs, and the bundled trained digits CNN."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from bitq_tvm.errors import BitqError
from bitq_tvm.models import (
    bundled_model_path,
    bundled_test_data,
    mobilenet_v2,
    resnet18,
    synthetic_inputs,
    transformer_encoder,
    with_dynamic_batch,
    with_weights_in_constant_nodes,
)

# Small but real configurations, to keep the test run short.
SMALL_TRANSFORMER = dict(seq_len=16, hidden=64, layers=2, heads=4, ffn=128, num_classes=3)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def parameter_count(model: onnx.ModelProto) -> int:
    """Trainable parameters, as torch counts them (BN running stats and shape constants excluded)."""
    return sum(
        int(np.prod(init.dims))
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and init.dims and "running_" not in init.name
    )


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    # The builders' calibration matmuls are small; on a shared 2-core machine one thread is faster.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def resnet():
    return resnet18(image_size=64)


@pytest.fixture(scope="module")
def mobilenet():
    return mobilenet_v2(image_size=64)


@pytest.fixture(scope="module")
def transformer():
    return transformer_encoder(**SMALL_TRANSFORMER)


@pytest.fixture(scope="module")
def models(resnet, mobilenet, transformer):
    return {"resnet18": resnet, "mobilenet_v2": mobilenet, "transformer_encoder": transformer}


MODEL_NAMES = ["resnet18", "mobilenet_v2", "transformer_encoder"]
EXPECTED_OUTPUT_SHAPES = {"resnet18": (1, 1000), "mobilenet_v2": (1, 1000), "transformer_encoder": (1, 3)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builders_give_checker_valid_opset17_models_with_finite_sane_outputs(models, name):
    model = models[name]
    onnx.checker.check_model(model, full_check=True)
    assert [(op.domain, op.version) for op in model.opset_import] == [("", 17)]
    (logits,) = run(model, synthetic_inputs(model, 1, seed=0))
    assert logits.shape == EXPECTED_OUTPUT_SHAPES[name]
    assert np.all(np.isfinite(logits))
    # Random weights, but calibrated: logits neither collapse nor blow up (a trained net's are O(1..10)).
    assert 0.05 < logits.std() < 20


def test_parameter_counts_match_torchvision(resnet, mobilenet):
    # torchvision: resnet18() 11,689,512 and mobilenet_v2() 3,504,872 parameters.
    assert parameter_count(resnet) == 11_689_512
    assert parameter_count(mobilenet) == 3_504_872


def test_transformer_parameter_count_matches_its_configuration(transformer):
    hidden, ffn, layers, classes = 64, 128, 2, 3
    per_layer = 4 * (hidden * hidden + hidden) + (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * 2 * hidden
    pooler_and_classifier = hidden * hidden + hidden + hidden * classes + classes
    assert parameter_count(transformer) == layers * per_layer + pooler_and_classifier


def test_every_resnet_batch_norm_output_is_near_unit_variance(resnet):
    bn_outputs = [node.output[0] for node in resnet.graph.node if node.op_type == "BatchNormalization"]
    probe = onnx.ModelProto()
    probe.CopyFrom(resnet)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in bn_outputs)
    # Inputs drawn independently of the builder's calibration batch: the stats must generalise.
    results = run(probe, synthetic_inputs(resnet, 1, seed=7), bn_outputs)
    assert len(results) == 20
    for name, value in zip(bn_outputs, results):
        assert abs(value.mean()) < 0.3, name
        assert 0.6 < value.std() < 1.6, name


def test_resnet_node_names_follow_torchvision(resnet):
    names = {node.name: node.op_type for node in resnet.graph.node}
    assert names["conv1"] == "Conv"
    assert names["layer1.0.conv1"] == "Conv"
    assert names["layer4.1.bn2"] == "BatchNormalization"
    assert names["layer2.0.downsample.0"] == "Conv"
    assert "layer1.0.downsample.0" not in names
    assert names["fc"] == "Gemm"
    assert sum(op == "Conv" for op in names.values()) == 20
    assert sum(op == "Add" for op in names.values()) == 8


def test_mobilenet_uses_depthwise_convs_and_relu6_clips(mobilenet):
    initializers = {init.name: init for init in mobilenet.graph.initializer}
    depthwise = []
    for node in mobilenet.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if group > 1:
            # OIHW weight with one input channel per group: a true depthwise conv.
            assert initializers[node.input[1]].dims[1] == 1
            assert initializers[node.input[1]].dims[0] == group
            depthwise.append(node.name)
    assert len(depthwise) == 17
    assert "features.1.conv.0.0" in depthwise and "features.2.conv.1.0" in depthwise
    clips = [node for node in mobilenet.graph.node if node.op_type == "Clip"]
    assert len(clips) == 35
    assert numpy_helper.to_array(initializers[clips[0].input[2]]) == 6.0
    assert sum(node.op_type == "Add" for node in mobilenet.graph.node) == 10


def test_transformer_uses_erf_gelu_layernorm_and_constant_reshape_shapes(transformer):
    ops = [node.op_type for node in transformer.graph.node]
    assert "Gelu" not in ops
    assert ops.count("Erf") == 2 and ops.count("LayerNormalization") == 4 and ops.count("Softmax") == 2
    initializer_names = {init.name for init in transformer.graph.initializer}
    reshapes = [node for node in transformer.graph.node if node.op_type == "Reshape"]
    assert len(reshapes) == 8
    assert all(node.input[1] in initializer_names for node in reshapes)
    query = next(i for i in transformer.graph.initializer if i.name == "encoder.layer.0.attention.self.query.weight")
    ffn_in = next(i for i in transformer.graph.initializer if i.name == "encoder.layer.1.intermediate.dense.weight")
    assert list(query.dims) == [64, 64] and list(ffn_in.dims) == [64, 128]  # [in, out] for MatMul


def test_builders_are_deterministic_and_seed_dependent(resnet, mobilenet, transformer):
    assert resnet18(image_size=64).SerializeToString() == resnet.SerializeToString()
    assert mobilenet_v2(image_size=64).SerializeToString() == mobilenet.SerializeToString()
    assert transformer_encoder(**SMALL_TRANSFORMER).SerializeToString() == transformer.SerializeToString()
    assert transformer_encoder(**SMALL_TRANSFORMER, seed=1).SerializeToString() != transformer.SerializeToString()


def test_builder_options_change_shapes():
    model = mobilenet_v2(num_classes=7, image_size=32, width=0.5, batch=2)
    (logits,) = run(model, synthetic_inputs(model, 2, seed=0))
    assert logits.shape == (2, 7) and np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: resnet18(image_size=16), "image_size"),
        (lambda: mobilenet_v2(width=0), "width"),
        (lambda: transformer_encoder(hidden=100, heads=3), "divisible"),
        (lambda: transformer_encoder(layers=0), "layers"),
    ],
)
def test_bad_builder_options_raise_bitq_error(build, message):
    with pytest.raises(BitqError, match=message):
        build()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_constant_node_variant_matches_original(models, name):
    model = models[name]
    converted = with_weights_in_constant_nodes(model)
    onnx.checker.check_model(converted, full_check=True)
    assert len(converted.graph.initializer) == 0
    assert sum(node.op_type == "Constant" for node in converted.graph.node) == len(model.graph.initializer)
    feeds = synthetic_inputs(model, 1, seed=3)
    # Same graph, same kernels: equal up to float32 rounding at most.
    np.testing.assert_allclose(run(converted, feeds)[0], run(model, feeds)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamic_batch_variant_matches_original(models, name):
    model = models[name]
    dynamic = with_dynamic_batch(model)
    onnx.checker.check_model(dynamic, full_check=True)
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert dynamic.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    single = synthetic_inputs(model, 1, seed=4)
    np.testing.assert_allclose(run(dynamic, single)[0], run(model, single)[0], rtol=1e-6, atol=1e-6)
    batch = synthetic_inputs(model, 3, seed=5)
    (batched,) = run(dynamic, batch)
    assert batched.shape[0] == 3
    for row in range(3):
        alone = {key: value[row : row + 1] for key, value in batch.items()}
        # Different batch sizes may pick different GEMM blockings: allow float32 reassociation.
        np.testing.assert_allclose(batched[row : row + 1], run(model, alone)[0], rtol=1e-4, atol=1e-4)


def test_dynamic_batch_works_on_the_constant_node_variant(transformer):
    both = with_dynamic_batch(with_weights_in_constant_nodes(transformer))
    feeds = synthetic_inputs(both, 2, seed=0)
    (logits,) = run(both, feeds)
    assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_synthetic_inputs_are_deterministic_float32_with_batch_n(transformer):
    first = synthetic_inputs(transformer, 5, seed=11)
    again = synthetic_inputs(transformer, 5, seed=11)
    other = synthetic_inputs(transformer, 5, seed=12)
    assert list(first) == ["embeddings"]
    assert first["embeddings"].shape == (5, 16, 64) and first["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(first["embeddings"], again["embeddings"])
    assert not np.array_equal(first["embeddings"], other["embeddings"])


def _one_input_model(elem_type, shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "elem_type, shape, message",
    [
        (TensorProto.INT64, [1, 4], "'x' is INT64"),
        (TensorProto.FLOAT, [1, "length"], "symbolic non-batch dim 'length'"),
        (TensorProto.FLOAT, [], "'x' is a scalar"),
    ],
)
def test_synthetic_inputs_rejects_inputs_it_cannot_fill(elem_type, shape, message):
    with pytest.raises(BitqError, match=message):
        synthetic_inputs(_one_input_model(elem_type, shape), 1, seed=0)


def test_dynamic_batch_rejects_scalar_inputs():
    with pytest.raises(BitqError, match="'x' is a scalar"):
        with_dynamic_batch(_one_input_model(TensorProto.FLOAT, []))


def test_bundled_digits_model_reaches_95_percent_under_onnxruntime():
    path = bundled_model_path()
    assert path.is_file() and path.suffix == ".onnx"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    data = bundled_test_data()
    (logits,) = run(model, {"input": data["x"]})
    accuracy = float((logits.argmax(axis=1) == data["y"]).mean())
    assert accuracy >= 0.95


def test_bundled_digits_model_layout_and_metadata():
    model = onnx.load(bundled_model_path())
    layers = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    assert layers == ["conv1", "conv2", "fc1", "fc2"]
    assert parameter_count(model) == 38_282
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input" and dims[0].dim_param == "batch"
    assert [dim.dim_value for dim in dims[1:]] == [1, 8, 8]
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["bitq.default_input_shape"] == "1,1,8,8"


def test_bundled_test_data_is_a_stratified_scaled_split():
    data = bundled_test_data()
    assert set(data) == {"x", "y", "calib"}
    assert data["x"].dtype == np.float32 and data["x"].shape == (450, 1, 8, 8)
    assert data["y"].dtype == np.int64 and data["y"].shape == (450,)
    assert data["calib"].dtype == np.float32 and data["calib"].shape == (64, 1, 8, 8)
    # Pixels / 16: in [0, 1] and actually using the range.
    assert data["x"].min() == 0.0 and data["x"].max() == 1.0
    # Stratified 25% of ~180 images per class: 43 to 46 of each digit.
    counts = np.bincount(data["y"], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46
