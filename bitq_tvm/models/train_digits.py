"""Train the bundled digits CNN with NumPy alone and export it to ONNX.

The project ships one *trained* model so that accuracy claims (per-layer sensitivity, plan
accuracy loss) are measured on a real task, not on random weights. It is trained here, from
scikit-learn's bundled 8x8 handwritten digits, so nothing is downloaded.

Usage::

    python -m bitq_tvm.models.train_digits [--out DIR] [--seed S] [--epochs E]

Writes ``digits_cnn.onnx`` and ``digits_test.npz`` (``x``, ``y``: held-out test split;
``calib``: training images for calibration) into DIR (default: this package's folder).

Input convention: pixels divided by 16 (sklearn digits are 0..16), float32, NCHW ``[N, 1, 8, 8]``;
no further normalisation. The npz arrays are already scaled.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from bitq_tvm.errors import BitqError

MODEL_FILE = "digits_cnn.onnx"
TEST_DATA_FILE = "digits_test.npz"
DEFAULT_INPUT_SHAPE = (1, 1, 8, 8)
# The split seed is fixed (not --seed) so models trained with different seeds are compared on
# the same held-out images.
SPLIT_SEED = 0
TEST_FRACTION = 0.25
CALIB_SIZE = 64
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the NumPy training run."""

    seed: int = 0
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4

    def __post_init__(self):
        if self.epochs < 1:
            raise BitqError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise BitqError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise BitqError(f"learning rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise BitqError(f"weight decay must be >= 0, got {self.weight_decay}")


def load_split() -> dict[str, np.ndarray]:
    """Scaled digits, stratified into train/test with the fixed split seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / PIXEL_MAX)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# --- NumPy layers --------------------------------------------------------------------------------
# Activations are NCHW like ONNX; convolutions are 3x3, stride 1, padding 1 ("same").


def _im2col3x3(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [N*H*W, C*9], column order (c, ky, kx) to match an OIHW weight reshape."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)


def _col2im3x3(cols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`_im2col3x3`: scatter-add patch gradients back onto the input."""
    n, c, h, w = shape
    patches = cols.reshape(n, h, w, c, 3, 3)
    padded = np.zeros((n, c, h + 2, w + 2), dtype=cols.dtype)
    for ky in range(3):
        for kx in range(3):
            padded[:, :, ky : ky + h, kx : kx + w] += patches[:, :, :, :, ky, kx].transpose(0, 3, 1, 2)
    return padded[:, :, 1:-1, 1:-1]


def _conv_forward(x, weight, bias):
    n, _, h, w = x.shape
    cols = _im2col3x3(x)
    out = cols @ weight.reshape(weight.shape[0], -1).T + bias
    return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2), cols


def _conv_backward(grad_out, cols, weight, input_shape):
    out_channels = weight.shape[0]
    grad_flat = grad_out.transpose(0, 2, 3, 1).reshape(-1, out_channels)
    grad_weight = (grad_flat.T @ cols).reshape(weight.shape)
    grad_bias = grad_flat.sum(axis=0)
    grad_input = _col2im3x3(grad_flat @ weight.reshape(out_channels, -1), input_shape)
    return grad_input, grad_weight, grad_bias


def _maxpool2x2_forward(x):
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    argmax = windows.argmax(axis=-1)
    return np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0], argmax


def _maxpool2x2_backward(grad_out, argmax, input_shape):
    n, c, h, w = input_shape
    grad_windows = np.zeros((n, c, h // 2, w // 2, 4), dtype=grad_out.dtype)
    np.put_along_axis(grad_windows, argmax[..., None], grad_out[..., None], axis=-1)
    return grad_windows.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(input_shape)


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-normal weights (OIHW convs, [out, in] dense like Gemm transB=1), zero biases."""

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1.weight": he((16, 1, 3, 3), 9),
        "conv1.bias": np.zeros(16, np.float32),
        "conv2.weight": he((32, 16, 3, 3), 16 * 9),
        "conv2.bias": np.zeros(32, np.float32),
        "fc1.weight": he((64, 512), 512),
        "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": he((10, 64), 64),
        "fc2.bias": np.zeros(10, np.float32),
    }


def forward(params: dict[str, np.ndarray], x: np.ndarray, keep_cache: bool = False):
    """Logits of the CNN; with ``keep_cache`` also the intermediates :func:`backward` needs."""
    conv1, cols1 = _conv_forward(x, params["conv1.weight"], params["conv1.bias"])
    relu1 = np.maximum(conv1, 0)
    conv2, cols2 = _conv_forward(relu1, params["conv2.weight"], params["conv2.bias"])
    relu2 = np.maximum(conv2, 0)
    pooled, argmax = _maxpool2x2_forward(relu2)
    flat = pooled.reshape(len(x), -1)
    fc1 = flat @ params["fc1.weight"].T + params["fc1.bias"]
    relu3 = np.maximum(fc1, 0)
    logits = relu3 @ params["fc2.weight"].T + params["fc2.bias"]
    if not keep_cache:
        return logits
    cache = dict(x=x, cols1=cols1, relu1=relu1, cols2=cols2, relu2=relu2, argmax=argmax, flat=flat, relu3=relu3)
    return logits, cache


def backward(params, cache, grad_logits) -> dict[str, np.ndarray]:
    """Gradients of the loss w.r.t. every parameter, given d loss / d logits."""
    grads = {
        "fc2.weight": grad_logits.T @ cache["relu3"],
        "fc2.bias": grad_logits.sum(axis=0),
    }
    grad_fc1 = (grad_logits @ params["fc2.weight"]) * (cache["relu3"] > 0)
    grads["fc1.weight"] = grad_fc1.T @ cache["flat"]
    grads["fc1.bias"] = grad_fc1.sum(axis=0)
    relu2 = cache["relu2"]
    grad_pooled = (grad_fc1 @ params["fc1.weight"]).reshape(len(relu2), 32, 4, 4)
    grad_conv2 = _maxpool2x2_backward(grad_pooled, cache["argmax"], relu2.shape) * (relu2 > 0)
    grad_relu1, grads["conv2.weight"], grads["conv2.bias"] = _conv_backward(
        grad_conv2, cache["cols2"], params["conv2.weight"], cache["relu1"].shape
    )
    grad_conv1 = grad_relu1 * (cache["relu1"] > 0)
    _, grads["conv1.weight"], grads["conv1.bias"] = _conv_backward(
        grad_conv1, cache["cols1"], params["conv1.weight"], cache["x"].shape
    )
    return grads


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(-np.log(probs[rows, labels] + 1e-12).mean())
    grad = probs
    grad[rows, labels] -= 1
    return loss, grad / len(labels)


def train(x_train: np.ndarray, y_train: np.ndarray, config: TrainConfig) -> dict[str, np.ndarray]:
    """Mini-batch Adam (decoupled weight decay on weights only) from He-initialised parameters."""
    rng = np.random.default_rng(config.seed)
    params = init_params(rng)
    first_moment = {k: np.zeros_like(v) for k, v in params.items()}
    second_moment = {k: np.zeros_like(v) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for epoch in range(config.epochs):
        # Cosine decay: large steps early, small ones to settle at the end.
        lr = config.learning_rate * 0.5 * (1 + np.cos(np.pi * epoch / config.epochs))
        order = rng.permutation(len(x_train))
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            logits, cache = forward(params, x_train[batch], keep_cache=True)
            loss, grad_logits = softmax_cross_entropy(logits, y_train[batch])
            epoch_loss += loss * len(batch)
            grads = backward(params, cache, grad_logits)
            step += 1
            for name, grad in grads.items():
                first_moment[name] = beta1 * first_moment[name] + (1 - beta1) * grad
                second_moment[name] = beta2 * second_moment[name] + (1 - beta2) * grad * grad
                m_hat = first_moment[name] / (1 - beta1**step)
                v_hat = second_moment[name] / (1 - beta2**step)
                update = m_hat / (np.sqrt(v_hat) + eps)
                if name.endswith(".weight"):
                    update = update + config.weight_decay * params[name]
                params[name] = (params[name] - lr * update).astype(np.float32)
        print(f"epoch {epoch + 1:2d}/{config.epochs}  lr {lr:.2e}  train loss {epoch_loss / len(order):.4f}")
    return params


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())


def export_onnx(params: dict[str, np.ndarray], seed: int) -> onnx.ModelProto:
    """The trained CNN as an opset-17 ONNX model with a symbolic batch dimension ``batch``."""
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1_out"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("Conv", ["relu1_out", "conv2.weight", "conv2.bias"], ["conv2_out"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], name="relu3"),
        helper.make_node("Gemm", ["relu3_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(value, name) for name, value in params.items()],
    )
    model = helper.make_model(
        graph,
        producer_name="bitq-tvm",
        opset_imports=[helper.make_opsetid("", 17)],
        doc_string="8x8 digits CNN trained with NumPy by bitq_tvm.models.train_digits; input = pixels / 16.",
    )
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "bitq.default_input_shape": ",".join(map(str, DEFAULT_INPUT_SHAPE)),
            "bitq.input_scaling": "pixels / 16 (sklearn digits 0..16 -> 0..1), no mean/std normalisation",
            "bitq.train_seed": str(seed),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def onnxruntime_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on one thread (the cross-check of the NumPy forward)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed, epochs=args.epochs)
    if not args.out.is_dir():
        raise BitqError(f"--out {args.out}: not an existing folder")

    data = load_split()
    started = time.perf_counter()
    # One BLAS thread: the matrices are tiny, so threads only add overhead (75 s instead of 2 s on
    # a busy 2-core machine), and a fixed summation order makes the written files byte-reproducible.
    with threadpool_limits(limits=1, user_api="blas"):
        params = train(data["x_train"], data["y_train"], config)
    print(f"trained in {time.perf_counter() - started:.1f} s")

    numpy_logits = forward(params, data["x_test"])
    numpy_accuracy = accuracy(numpy_logits, data["y_test"])
    model = export_onnx(params, config.seed)
    ort_logits = onnxruntime_logits(model, data["x_test"])
    ort_accuracy = accuracy(ort_logits, data["y_test"])
    max_logit_diff = float(np.abs(ort_logits - numpy_logits).max())
    n_params = sum(v.size for v in params.values())
    print(f"parameters: {n_params}")
    print(f"test accuracy (numpy): {numpy_accuracy:.4f} on {len(data['y_test'])} images")
    print(f"test accuracy (onnxruntime): {ort_accuracy:.4f}; max |logit diff| {max_logit_diff:.2e}")
    if ort_accuracy != numpy_accuracy:
        raise RuntimeError("onnxruntime and the NumPy forward disagree on the test accuracy")

    calib_rows = np.random.default_rng(config.seed).choice(len(data["x_train"]), CALIB_SIZE, replace=False)
    onnx.save(model, args.out / MODEL_FILE)
    np.savez_compressed(
        args.out / TEST_DATA_FILE,
        x=data["x_test"],
        y=data["y_test"],
        calib=data["x_train"][np.sort(calib_rows)],
    )
    print(f"wrote {args.out / MODEL_FILE} and {args.out / TEST_DATA_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
