"""Reference models built in code: ResNet-18, MobileNetV2, a BERT-style encoder, and the digits CNN.

Nothing is downloaded. The builders write ONNX graphs directly (onnx.helper / numpy_helper), with
deterministic He-initialised weights. Random weights are enough for compiler work (shapes, data
movement, latency, numerics of the BFP kernels); the bundled digits CNN is the trained model for
accuracy measurements.

BatchNormalization running statistics are not random: they are what BN layers learn in training,
the per-channel mean and variance of their input, measured here on a small standard-normal
calibration batch propagated through the network as it is built. That pass runs in float64, so
BLAS-dependent rounding stays far below float32 resolution and the stored stats (hence the model
bytes) do not depend on the machine in practice. Every BN output is then close to zero-mean, unit-variance,
and activations stay in a sane range through ResNet-18's depth, as in a trained network fed
normalised images.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bitq_tvm.errors import BitqError

OPSET = 17
# IR version 8 is the one that introduced opset 17; older readers accept it.
IR_VERSION = 8
BATCH_DIM_NAME = "batch"
BUNDLED_MODEL_FILE = "digits_cnn.onnx"
BUNDLED_TEST_DATA_FILE = "digits_test.npz"
BN_EPSILON = 1e-5


# Input pixels in the BN calibration batch (one 224x224 image's worth; at least two images). Small
# images get more images, so that the last stages (1x1 spatial at image_size 32) still see enough
# samples per channel.
CALIBRATION_PIXELS = 224 * 224


def _conv_nchw(x: np.ndarray, weight: np.ndarray, stride: int, group: int) -> np.ndarray:
    """Reference Conv (plain or depthwise) with padding kernel // 2, like the ONNX node emitted for it."""
    kernel = weight.shape[-1]
    pad = kernel // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))[:, :, ::stride, ::stride]
    n, channels, height, width = windows.shape[:4]
    out_channels = weight.shape[0]
    if group == 1:
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * height * width, -1)
        out = cols @ weight.reshape(out_channels, -1).T
        return out.reshape(n, height, width, out_channels).transpose(0, 3, 1, 2)
    if not group == channels == out_channels:
        raise ValueError(f"only plain (group=1) and depthwise convs are modelled, got group={group}")
    out = np.zeros((n, channels, height, width))
    for i in range(kernel):
        for j in range(kernel):
            out += windows[..., i, j] * weight[:, 0, i, j][:, None, None]
    return out


class _GraphBuilder:
    """Accumulates nodes and initializers; CNN layers also run eagerly on the calibration batch.

    ``values`` maps tensor names to their float64 calibration activations, so a BN layer can take
    its running stats from its real input. Call :meth:`keep_only` between blocks to free memory.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.values: dict[str, np.ndarray] = {}

    def calibration_input(self, name: str, image_shape: tuple[int, int, int]) -> str:
        images = max(2, math.ceil(CALIBRATION_PIXELS / (image_shape[1] * image_shape[2])))
        # A separate stream: the weights must not depend on the calibration batch.
        self.values[name] = np.random.default_rng([self.seed, 1]).standard_normal((images, *image_shape))
        return name

    def keep_only(self, *names: str) -> None:
        self.values = {name: self.values[name] for name in names}

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def add_node(self, op_type: str, name: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    def small_bias(self, size: int) -> np.ndarray:
        return (0.02 * self.rng.standard_normal(size)).astype(np.float32)

    # --- CNN layers ------------------------------------------------------------------------------

    def conv(self, name, x, in_channels, out_channels, kernel, stride=1, group=1) -> str:
        """Bias-free Conv (a BN follows), padding kernel // 2."""
        fan_in = in_channels // group * kernel * kernel
        weight = self.he_normal((out_channels, in_channels // group, kernel, kernel), fan_in)
        output = self.add_node(
            "Conv", name, [x, self.add_initializer(f"{name}.weight", weight)],
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[kernel // 2] * 4, group=group,
        )
        self.values[output] = _conv_nchw(self.values[x], weight.astype(np.float64), stride, group)
        return output

    def batch_norm(self, name, x, channels) -> str:
        """BatchNormalization with running stats measured on its calibration input."""
        measured = self.values[x]
        running_mean = measured.mean(axis=(0, 2, 3))
        running_var = measured.var(axis=(0, 2, 3))
        gamma = self.rng.uniform(0.75, 1.25, channels).astype(np.float32)
        beta = (0.1 * self.rng.standard_normal(channels)).astype(np.float32)
        inputs = [
            x,
            self.add_initializer(f"{name}.weight", gamma),
            self.add_initializer(f"{name}.bias", beta),
            self.add_initializer(f"{name}.running_mean", running_mean.astype(np.float32)),
            self.add_initializer(f"{name}.running_var", running_var.astype(np.float32)),
        ]
        output = self.add_node("BatchNormalization", name, inputs, epsilon=BN_EPSILON)
        scale = gamma / np.sqrt(running_var + BN_EPSILON)
        self.values[output] = (measured - running_mean[:, None, None]) * scale[:, None, None] + beta[:, None, None]
        return output

    def relu(self, name, x) -> str:
        output = self.add_node("Relu", name, [x])
        self.values[output] = np.maximum(self.values[x], 0.0)
        return output

    def relu6(self, name, x) -> str:
        """ReLU6 as Clip(0, 6); min/max are initializers shared by every Clip."""
        if not any(init.name == "relu6.min" for init in self.initializers):
            self.add_initializer("relu6.min", np.array(0.0, np.float32))
            self.add_initializer("relu6.max", np.array(6.0, np.float32))
        output = self.add_node("Clip", name, [x, "relu6.min", "relu6.max"])
        self.values[output] = np.clip(self.values[x], 0.0, 6.0)
        return output

    def add(self, name, a, b) -> str:
        output = self.add_node("Add", name, [a, b])
        self.values[output] = self.values[a] + self.values[b]
        return output

    def max_pool(self, name, x, kernel, stride) -> str:
        pad = kernel // 2
        output = self.add_node(
            "MaxPool", name, [x], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4
        )
        padded = np.pad(self.values[x], ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
        self.values[output] = windows[:, :, ::stride, ::stride].max(axis=(4, 5))
        return output

    def classifier_head(self, x, channels, num_classes, gemm_name) -> str:
        """GlobalAveragePool, Flatten, Gemm to "logits" (not calibrated: no BN follows)."""
        pooled = self.add_node("GlobalAveragePool", "avgpool", [x])
        flat = self.add_node("Flatten", "flatten", [pooled], axis=1)
        self.values.clear()
        return self.gemm(gemm_name, flat, channels, num_classes, output="logits")

    def gemm(self, name, x, in_features, out_features, output=None) -> str:
        """Gemm with a torch-layout [out, in] weight (transB=1)."""
        weight = self.he_normal((out_features, in_features), in_features)
        inputs = [x, self.add_initializer(f"{name}.weight", weight),
                  self.add_initializer(f"{name}.bias", self.small_bias(out_features))]
        return self.add_node("Gemm", name, inputs, output=output, transB=1)

    # --- assembly --------------------------------------------------------------------------------

    def model(self, graph_name, inputs, outputs, doc) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(
            graph, producer_name="bitq-tvm", opset_imports=[helper.make_opsetid("", OPSET)], doc_string=doc
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def _check_positive(option: str, value) -> None:
    if value < 1:
        raise BitqError(f"{option} must be >= 1, got {value}")


def resnet18(num_classes: int = 1000, image_size: int = 224, seed: int = 0, batch: int = 1) -> onnx.ModelProto:
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2]) with random He-initialised weights.

    Node and initializer names follow torchvision's module names ("layer1.0.conv1", "fc.weight").
    Input "input" [batch, 3, image_size, image_size], output "logits" [batch, num_classes].
    """
    for option, value in (("num_classes", num_classes), ("batch", batch)):
        _check_positive(option, value)
    if image_size < 32:
        raise BitqError(f"image_size must be >= 32 (five stride-2 stages), got {image_size}")
    g = _GraphBuilder(seed)
    x = g.calibration_input("input", (3, image_size, image_size))
    x = g.conv("conv1", x, 3, 64, 7, stride=2)
    x = g.relu("relu", g.batch_norm("bn1", x, 64))
    x = g.max_pool("maxpool", x, 3, 2)
    in_channels = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            identity = x
            out = g.conv(f"{prefix}.conv1", x, in_channels, channels, 3, stride=stride)
            out = g.relu(f"{prefix}.relu1", g.batch_norm(f"{prefix}.bn1", out, channels))
            out = g.conv(f"{prefix}.conv2", out, channels, channels, 3)
            out = g.batch_norm(f"{prefix}.bn2", out, channels)
            if stride != 1 or in_channels != channels:
                identity = g.conv(f"{prefix}.downsample.0", x, in_channels, channels, 1, stride=stride)
                identity = g.batch_norm(f"{prefix}.downsample.1", identity, channels)
            x = g.relu(f"{prefix}.relu2", g.add(f"{prefix}.add", out, identity))
            g.keep_only(x)
            in_channels = channels
    g.classifier_head(x, 512, num_classes, "fc")
    return g.model(
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        f"ResNet-18, random He-initialised weights (seed {seed}); built by bitq_tvm.models.zoo",
    )


def _make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of divisor, never more than 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(
    num_classes: int = 1000, image_size: int = 224, width: float = 1.0, seed: int = 0, batch: int = 1
) -> onnx.ModelProto:
    """torchvision's MobileNetV2 (inverted residuals, depthwise convs with group=C, ReLU6 as Clip).

    Node names follow torchvision's modules ("features.2.conv.1.0" is block 2's depthwise conv,
    "classifier.1" the final Gemm); dropout is omitted (inference graph).
    """
    for option, value in (("num_classes", num_classes), ("batch", batch)):
        _check_positive(option, value)
    if image_size < 32:
        raise BitqError(f"image_size must be >= 32 (five stride-2 stages), got {image_size}")
    if not width > 0:
        raise BitqError(f"width must be > 0, got {width}")
    g = _GraphBuilder(seed)

    def conv_bn_relu6(prefix, x, in_channels, out_channels, kernel, stride=1, group=1):
        x = g.conv(f"{prefix}.0", x, in_channels, out_channels, kernel, stride=stride, group=group)
        x = g.batch_norm(f"{prefix}.1", x, out_channels)
        return g.relu6(f"{prefix}.2", x)

    in_channels = _make_divisible(32 * width)
    last_channels = _make_divisible(1280 * max(1.0, width))
    x = g.calibration_input("input", (3, image_size, image_size))
    x = conv_bn_relu6("features.0", x, 3, in_channels, 3, stride=2)
    index = 1
    for expansion, channels, repeats, first_stride in _MOBILENET_V2_SETTINGS:
        out_channels = _make_divisible(channels * width)
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix = f"features.{index}.conv"
            hidden = in_channels * expansion
            out, part = x, 0
            if expansion != 1:
                out = conv_bn_relu6(f"{prefix}.0", out, in_channels, hidden, 1)
                part = 1
            out = conv_bn_relu6(f"{prefix}.{part}", out, hidden, hidden, 3, stride=stride, group=hidden)
            out = g.conv(f"{prefix}.{part + 1}", out, hidden, out_channels, 1)
            out = g.batch_norm(f"{prefix}.{part + 2}", out, out_channels)
            if stride == 1 and in_channels == out_channels:
                out = g.add(f"features.{index}.add", x, out)
            g.keep_only(out)
            x, in_channels, index = out, out_channels, index + 1
    x = conv_bn_relu6(f"features.{index}", x, in_channels, last_channels, 1)
    g.classifier_head(x, last_channels, num_classes, "classifier.1")
    return g.model(
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        f"MobileNetV2 width {width}, random He-initialised weights (seed {seed}); built by bitq_tvm.models.zoo",
    )


def transformer_encoder(
    seq_len: int = 64,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    ffn: int = 1024,
    num_classes: int = 2,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """BERT-style post-LayerNorm encoder over input embeddings, with a first-token classifier.

    Input "embeddings" [batch, seq_len, hidden], output "logits" [batch, num_classes]. Projections
    are MatMul (+ Add bias) with [in, out] initializers named like Hugging Face BERT
    ("encoder.layer.0.attention.self.query.weight"); GELU is the exact Erf form; Reshape shapes use
    0 for "copy this dim", so the graph also runs with a symbolic batch.
    """
    for option, value in (("seq_len", seq_len), ("hidden", hidden), ("layers", layers), ("heads", heads),
                          ("ffn", ffn), ("num_classes", num_classes), ("batch", batch)):
        _check_positive(option, value)
    if hidden % heads:
        raise BitqError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    head_dim = hidden // heads
    g = _GraphBuilder(seed)
    split_heads = g.add_initializer("attention.split_heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = g.add_initializer("attention.merge_heads_shape", np.array([0, 0, hidden], np.int64))
    score_scale = g.add_initializer("attention.score_scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    sqrt2 = g.add_initializer("gelu.sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = g.add_initializer("gelu.one", np.array(1.0, np.float32))
    half = g.add_initializer("gelu.half", np.array(0.5, np.float32))

    def dense(name, x, in_features, out_features):
        weight = g.add_initializer(f"{name}.weight", g.he_normal((in_features, out_features), in_features))
        product = g.add_node("MatMul", name, [x, weight])
        return g.add_node("Add", f"{name}.bias_add", [product, g.add_initializer(f"{name}.bias", g.small_bias(out_features))])

    def layer_norm(name, x):
        # Scale near 1 and shift near 0, as in a trained model, but not exactly (so folding is visible).
        scale = g.add_initializer(f"{name}.weight", g.rng.uniform(0.75, 1.25, hidden).astype(np.float32))
        shift = g.add_initializer(f"{name}.bias", g.small_bias(hidden))
        return g.add_node("LayerNormalization", name, [x, scale, shift], axis=-1, epsilon=1e-12)

    def heads_of(name, x, perm):
        x = g.add_node("Reshape", f"{name}.split_heads", [x, split_heads])
        return g.add_node("Transpose", f"{name}.transpose", [x], perm=perm)

    x = "embeddings"
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}"
        attention = f"{prefix}.attention.self"
        query = heads_of(f"{attention}.query", dense(f"{attention}.query", x, hidden, hidden), [0, 2, 1, 3])
        key_t = heads_of(f"{attention}.key", dense(f"{attention}.key", x, hidden, hidden), [0, 2, 3, 1])
        value = heads_of(f"{attention}.value", dense(f"{attention}.value", x, hidden, hidden), [0, 2, 1, 3])
        scores = g.add_node("MatMul", f"{attention}.scores", [query, key_t])
        scores = g.add_node("Mul", f"{attention}.scale", [scores, score_scale])
        probs = g.add_node("Softmax", f"{attention}.softmax", [scores], axis=-1)
        context = g.add_node("MatMul", f"{attention}.context", [probs, value])
        context = g.add_node("Transpose", f"{attention}.context.transpose", [context], perm=[0, 2, 1, 3])
        context = g.add_node("Reshape", f"{attention}.context.merge_heads", [context, merge_heads])
        attended = dense(f"{prefix}.attention.output.dense", context, hidden, hidden)
        attended = g.add_node("Add", f"{prefix}.attention.output.residual", [attended, x])
        x = layer_norm(f"{prefix}.attention.output.LayerNorm", attended)

        inner = dense(f"{prefix}.intermediate.dense", x, hidden, ffn)
        # GELU(h) = 0.5 * h * (1 + erf(h / sqrt(2))); opset 17 has no Gelu op.
        gelu = g.add_node("Div", f"{prefix}.intermediate.gelu.div", [inner, sqrt2])
        gelu = g.add_node("Erf", f"{prefix}.intermediate.gelu.erf", [gelu])
        gelu = g.add_node("Add", f"{prefix}.intermediate.gelu.add", [gelu, one])
        gelu = g.add_node("Mul", f"{prefix}.intermediate.gelu.mul", [inner, gelu])
        gelu = g.add_node("Mul", f"{prefix}.intermediate.gelu.half", [gelu, half])
        out = dense(f"{prefix}.output.dense", gelu, ffn, hidden)
        out = g.add_node("Add", f"{prefix}.output.residual", [out, x])
        x = layer_norm(f"{prefix}.output.LayerNorm", out)

    first_token = g.add_initializer("pooler.first_token", np.array(0, np.int64))
    pooled = g.add_node("Gather", "pooler.first_token_gather", [x, first_token], axis=1)
    pooled = g.add_node("Tanh", "pooler.activation", [g.gemm("pooler.dense", pooled, hidden, hidden)])
    g.gemm("classifier", pooled, hidden, num_classes, output="logits")
    return g.model(
        "transformer_encoder",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [batch, seq_len, hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        f"BERT-style encoder ({layers} layers, hidden {hidden}, {heads} heads, ffn {ffn}), random "
        f"He-initialised weights (seed {seed}); built by bitq_tvm.models.zoo",
    )


def with_weights_in_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every initializer is produced by a ``Constant`` node instead, as some exporters do."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    initializer_names = {init.name for init in graph.initializer}
    constants = [
        helper.make_node("Constant", [], [init.name], name=f"{init.name}.constant", value=init)
        for init in graph.initializer
    ]
    # Before IR 4 initializers were also listed as graph inputs; a Constant output must not be one.
    inputs = [value for value in graph.input if value.name not in initializer_names]
    nodes = constants + list(graph.node)
    del graph.initializer[:]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(nodes)
    return converted


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (not initializers listed as inputs)."""
    initializer_names = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializer_names]


def with_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs' and outputs' leading dimension is the symbol ``batch``.

    Intermediate ``value_info`` shapes are dropped (they would pin the old batch); the graph itself
    must not hard-code the batch (use 0 or -1 in Reshape shapes), which holds for this module's models.
    """
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for value in list(_graph_inputs(dynamic)) + list(dynamic.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise BitqError(f"with_dynamic_batch: graph input/output '{value.name}' is a scalar, it has no batch dim")
        dims[0].Clear()
        dims[0].dim_param = BATCH_DIM_NAME
    del dynamic.graph.value_info[:]
    return dynamic


def synthetic_inputs(model: onnx.ModelProto, n: int, seed: int) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for every graph input, with the batch (leading) dim set to n."""
    _check_positive("n", n)
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _graph_inputs(model):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT:
            dtype = TensorProto.DataType.Name(tensor_type.elem_type)
            raise BitqError(f"synthetic_inputs: input '{value.name}' is {dtype}, only float32 inputs are supported")
        dims = list(tensor_type.shape.dim)
        if not dims:
            raise BitqError(f"synthetic_inputs: input '{value.name}' is a scalar, it has no batch dim")
        shape = [n]
        for dim in dims[1:]:
            if not dim.HasField("dim_value"):
                raise BitqError(
                    f"synthetic_inputs: input '{value.name}' has a symbolic non-batch dim '{dim.dim_param}'"
                )
            shape.append(dim.dim_value)
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _bundled_file(name: str) -> Path:
    resource = resources.files(__package__).joinpath(name)
    if not resource.is_file():
        raise BitqError(f"bundled file {name} is missing: run `python -m bitq_tvm.models.train_digits`")
    return Path(str(resource))


def bundled_model_path() -> Path:
    """Path of the trained digits CNN (input "input" [batch, 1, 8, 8] = pixels / 16, output "logits")."""
    return _bundled_file(BUNDLED_MODEL_FILE)


def bundled_test_data() -> dict[str, np.ndarray]:
    """The digits CNN's held-out split: ``x`` float32 [N, 1, 8, 8], ``y`` int64 [N], ``calib`` float32 training images."""
    with np.load(_bundled_file(BUNDLED_TEST_DATA_FILE)) as archive:
        return {key: archive[key] for key in archive.files}
