"""The accuracy term, measured post-training on calibration data (no training).

For every layer l and candidate q the predicted loss is

    loss(l, q) = S_w[l] * P_w[l, q] + S_a[l] * P_a[l, q]

* ``P_w``, ``P_a``: the exact mean squared error the NumPy reference quantizer puts on the layer's
  real weight (whole tensor) and on its real input activations over the calibration set. The
  activations are captured with onnxruntime by exposing every layer input as a graph output.
* ``S_w``, ``S_a``: the network's measured sensitivity, the relative output MSE
  ``sum (y_noisy - y)^2 / sum y^2`` of each output head, averaged over the heads
  (:func:`~bitq_tvm.evaluation.head_rel_mse`; logits before a final Softmax, a final Concat's
  inputs as heads of their own: :func:`~bitq_tvm.frontend.onnx_model.loss_view`), per unit of
  noise power injected at that tensor alone. Noise enters through extra graph inputs (``W + n_w`` in front of the weight,
  ``x + n_a`` in front of the layer's input only), so one onnxruntime session serves every layer.
  The injected noise is either white Gaussian, or (default) the probe format's own quantization
  error: for the activations it is exact, because with noise at layer l alone l's input is the
  clean captured activation.

Losses add over layers (independent small errors add in power), so the predicted loss of a plan,
in relative logit MSE, is the sum of its layers' losses. With labels (of the first head), a
measured curve maps it to the top-1 drop: noise scaled to several levels is injected at every layer at once and the drop in
top-1 accuracy recorded against the measured logit MSE. Where too few samples flip to resolve a
drop, a margin model fitted to the resolved points stands in (a top-1 count saturates at 0 for
small noise, which would make every cheap plan look free); the curve is made monotone and
interpolated linearly (0 at 0). Budgets in top-1 points go through its inverse, which keeps the
optimisation linear.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import BitqError
from ..evaluation import head_rel_mse, top1
from ..formats import BFPFormat, fake_quantize_np
from ..frontend.onnx_model import LAYER_OPS, Layer, OnnxModel, cast_input, input_dtypes, loss_view
from ..frontend.reference import layer_activation_blocks, layer_weight_blocks, weight_from_blocks, window_rows
from ..plan import LayerFormats
from ..support.npz import read_npz
from ..support.progress import Countdown, say

LOGIT_MSE_UNIT = "relative logit MSE"
TOP1_UNIT = "top-1 drop"
NOISE_KINDS = ("quantization", "gaussian")
# Seconds between two progress lines of the noise-power phase (one per layer would flood small models).
NOISE_PROGRESS_SECONDS = 2.0
# Curve levels, as multiples of each tensor's probe noise power, injected at every layer at once.
_CURVE_SCALES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """Calibration samples per model input (leading axis = sample) and optional integer labels."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "calibration data"

    def __post_init__(self):
        for name, x in dict(self.inputs).items():
            dtype = np.asarray(x).dtype
            if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
                raise BitqError(f"{self.source}: array for input '{name}' has dtype {dtype}; calibration data must "
                                "be numeric (the model takes float32)")
        # Float data runs as float32; integer inputs (token ids) keep their integer type.
        inputs = {name: np.ascontiguousarray(x, dtype=np.float32 if np.asarray(x).dtype.kind == "f" else None)
                  for name, x in dict(self.inputs).items()}
        if not inputs:
            raise BitqError(f"{self.source}: no input arrays")
        counts = {name: len(x) for name, x in inputs.items()}
        if len(set(counts.values())) != 1:
            raise BitqError(f"{self.source}: the input arrays hold different sample counts {counts}")
        for name, x in inputs.items():
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                bad = int(np.count_nonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
                raise BitqError(f"{self.source}: input '{name}' holds NaN or Inf in {bad} of {len(x)} samples; "
                                "calibration data must be finite")
        object.__setattr__(self, "inputs", MappingProxyType(inputs))
        if self.labels is not None:
            labels = np.asarray(self.labels).reshape(-1)
            if not np.issubdtype(labels.dtype, np.integer):
                raise BitqError(f"{self.source}: labels must be integers, got dtype {labels.dtype}")
            if len(labels) != self.n_samples:
                raise BitqError(f"{self.source}: {len(labels)} labels for {self.n_samples} samples")
            object.__setattr__(self, "labels", labels)

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, model: OnnxModel) -> list[dict[str, np.ndarray]]:
        """The samples cut into the model's pinned batch size (a ragged tail is dropped)."""
        check_calibration(model, self)
        batch = next(iter(model.input_shapes.values()))[0]
        return [{name: x[start:start + batch] for name, x in self.inputs.items()}
                for start in range(0, self.n_samples - batch + 1, batch)]

    def used_labels(self, model: OnnxModel) -> np.ndarray | None:
        if self.labels is None:
            return None
        batch = next(iter(model.input_shapes.values()))[0]
        return self.labels[: self.n_samples // batch * batch]


MIN_CALIBRATION_SAMPLES = 8  # fewer: sensitivities and the top-1 curve are noise
FEW_CALIBRATION_SAMPLES = 32  # fewer: planned, with a warning that the losses are coarse


def check_labels(calib: Calibration, labels: np.ndarray | None, classes: int) -> None:
    """Raise BitqError if ``labels`` fall outside the first output's ``classes`` classes."""
    if labels is None or not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise BitqError(f"{calib.source}: labels range {low}..{high}, but the model's first output has {classes} "
                        f"classes (0..{classes - 1}); check --labels")


def check_calibration(model: OnnxModel, calib: Calibration) -> None:
    """Raise BitqError naming the input and shapes if ``calib`` does not fit the model's inputs."""
    missing = [name for name in model.input_shapes if name not in calib.inputs]
    if missing:
        raise BitqError(f"{calib.source}: no array for model input '{missing[0]}' (arrays: {sorted(calib.inputs)})")
    for name, shape in model.input_shapes.items():
        x = calib.inputs[name]
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise BitqError(f"{calib.source}: array for input '{name}' has samples of shape {list(x.shape[1:])}, "
                            f"model input '{name}' takes {list(shape)} (batch {shape[0]} x {list(shape[1:])})")
        if len(x) < shape[0]:
            raise BitqError(f"{calib.source}: input '{name}' has {len(x)} samples, fewer than the model's "
                            f"batch size {shape[0]}")


def load_calibration(path, model: OnnxModel, key: str | None = None, labels_key: str | None = None) -> Calibration:
    """Read calibration data from an ``.npz``.

    Each model input takes the array of its own name; a single-input model falls back to ``key``,
    then ``calib``, then ``x``. ``labels_key`` names an integer label array of the same length.
    """
    path = str(path)
    data = read_npz(path, "calibration")
    names = list(model.input_shapes)
    if key is not None and key not in data:
        raise BitqError(f"{path}: no array named '{key}' (arrays: {sorted(data)})")
    inputs, dtypes = {}, input_dtypes(model)
    for name in names:
        fallbacks = [key] if key is not None else [name, "calib", "x"]
        if len(names) > 1:
            fallbacks = [name]
        found = next((k for k in fallbacks if k in data), None)
        if found is None:
            raise BitqError(f"{path}: no array for model input '{name}' (tried {fallbacks}; arrays: {sorted(data)})")
        try:
            inputs[name] = cast_input(name, data[found], dtypes[name])
        except BitqError as err:
            raise BitqError(f"{path}: array '{found}': {err}") from None
    labels = None
    if labels_key is not None:
        if labels_key not in data:
            raise BitqError(f"{path}: no label array '{labels_key}' (arrays: {sorted(data)})")
        labels = data[labels_key]
    calib = Calibration(inputs, labels, source=path)
    check_calibration(model, calib)
    return calib


def noise_power(x: np.ndarray, fmt: BFPFormat | None, axis: int, groups: int = 1) -> float:
    """Mean squared error the reference quantizer puts on ``x`` (0 for ``None`` = fp32)."""
    if fmt is None:
        return 0.0
    x = np.asarray(x, dtype=np.float32)
    error = fake_quantize_np(x, fmt, axis=axis, groups=groups).astype(np.float64) - x
    return float(np.mean(error * error))


def _session(model: OnnxModel, proto: onnx.ModelProto):
    """An onnxruntime CPU session: 2 threads (the machine is shared), the idle pool not spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BitqError(f"{model.path}: onnxruntime cannot run the model for calibration: "
                        f"{str(err).strip().splitlines()[0]}") from None


def _layer_nodes(model: OnnxModel) -> dict[str, int]:
    """Layer name -> index of its node in the graph (nodes are in topological order)."""
    by_weight = {layer.weight: layer.name for layer in model.layers}
    return {by_weight[node.input[1]]: i for i, node in enumerate(model.proto.graph.node)
            if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in by_weight}


def _boundary(model: OnnxModel, start: int) -> list[str]:
    """Tensors computed before node ``start`` (or graph inputs) that nodes from ``start`` on read."""
    graph = model.proto.graph
    constants = {i.name for i in graph.initializer}
    before = {i.name for i in graph.input if i.name not in constants}
    for node in graph.node[:start]:
        if node.op_type != "Constant":
            before.update(node.output)
    needed = []
    for node in graph.node[start:]:
        for name in node.input:
            if name and name in before and name not in needed:
                needed.append(name)
    return needed


def _computed_before(model: OnnxModel, start: int, names) -> list[str]:
    """Those of ``names`` that no node from ``start`` on computes."""
    late = {t for node in model.proto.graph.node[start:] for t in node.output}
    return [name for name in names if name not in late]


class SuffixNoiseGraphs:
    """Noise probes that reuse the FP32 activations: one onnxruntime session per layer group.

    The layers measured are cut into groups of ``group_size`` consecutive layers; group g's
    session runs only the nodes from its first layer on, fed with the FP32 tensors that cross that
    cut (captured once per batch by :meth:`capture`), with noise inputs on its own layers. The
    output equals the whole model's with the same noise (the nodes before the cut see no noise).
    One session is alive at a time.
    """

    def __init__(self, model: OnnxModel, layers, group_size: int = 4):
        self.model = model
        nodes = _layer_nodes(model)
        ordered = sorted(layers, key=lambda name: nodes[name])
        self.groups = [ordered[i:i + group_size] for i in range(0, len(ordered), group_size)]
        self.group_of = {name: g for g, group in enumerate(self.groups) for name in group}
        self.starts = [nodes[group[0]] for group in self.groups]
        self.boundaries = [_boundary(model, start) for start in self.starts]
        self.outputs = [o.name for o in model.proto.graph.output]
        # outputs complete before a group's cut carry no noise of its layers: served from capture
        self.early = [_computed_before(model, start, self.outputs) for start in self.starts]
        self.late = [[o for o in self.outputs if o not in early] for early in self.early]
        self._current = None
        self._values = None

    def capture(self, batches) -> None:
        """Run the FP32 model once per batch and keep every cut's crossing tensors."""
        names = list(dict.fromkeys([n for b in self.boundaries for n in b] + [n for e in self.early for n in e]))
        inputs = set(self.model.input_shapes)
        outputs = [n for n in names if n not in inputs]
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model.proto)
        del proto.graph.output[:]
        proto.graph.output.extend([onnx.ValueInfoProto(name=n) for n in outputs])
        session = _session(self.model, proto)
        self._values = []
        for batch in batches:
            values = dict(zip(outputs, session.run(outputs, dict(batch)))) if outputs else {}
            values.update({n: batch[n] for n in names if n in inputs})
            self._values.append(values)

    def _build(self, g: int):
        graph_src = self.model.proto.graph
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model.proto)
        graph = proto.graph
        start, group = self.starts[g], set(self.groups[g])
        by_weight = {layer.weight: layer for layer in self.model.layers if layer.name in group}
        constants = {i.name for i in graph_src.initializer}
        noise_inputs, new_nodes = {}, [n for n in graph_src.node[:start] if n.op_type == "Constant"]
        for node in graph_src.node[start:]:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            node = copy
            layer = by_weight.get(node.input[1]) if node.op_type in LAYER_OPS and len(node.input) > 1 else None
            if layer is not None:
                for kind, slot, shape in (("w", 1, layer.weight_shape), ("a", 0, layer.input_shape)):
                    noise = f"bitq.noise.{kind}.{layer.name}"
                    new_nodes.append(helper.make_node("Add", [node.input[slot], noise], [noise + ".sum"]))
                    noise_inputs[(kind, layer.name)] = (noise, np.zeros(shape, np.float32))
                    node.input[slot] = noise + ".sum"
            new_nodes.append(node)
        del graph.node[:]
        graph.node.extend(new_nodes)
        kept = [i for i in graph.input if i.name in constants]
        del graph.input[:]
        graph.input.extend(kept)
        sample = self._values[0]
        for name in self.boundaries[g]:
            value = np.asarray(sample[name])
            graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        for noise, zeros in noise_inputs.values():
            graph.input.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT, list(zeros.shape)))
        del graph.output[:]
        graph.output.extend([o for o in graph_src.output if o.name in self.late[g]])
        return _session(self.model, proto), noise_inputs

    def run(self, b_index: int, noise: Mapping) -> tuple[np.ndarray, ...]:
        """The outputs on batch ``b_index`` with ``noise[("w"|"a", layer)]`` (one group's layers)."""
        if self._values is None:
            raise BitqError("SuffixNoiseGraphs.run before capture")
        groups = {self.group_of[name] for _, name in noise}
        if len(groups) != 1:
            raise BitqError("SuffixNoiseGraphs.run: noise must sit on the layers of one group")
        g = groups.pop()
        if self._current is None or self._current[0] != g:
            self._current = (g, *self._build(g))
        _, session, noise_inputs = self._current
        feeds = {name: self._values[b_index][name] for name in self.boundaries[g]}
        for name, zeros in noise_inputs.values():
            feeds[name] = zeros
        for key, value in noise.items():
            feeds[noise_inputs[key][0]] = np.asarray(value, np.float32)
        values = dict(zip(self.late[g], session.run(self.late[g], feeds)))
        return tuple(values[o] if o in values else self._values[b_index][o] for o in self.outputs)


class NoiseGraph:
    """The model in onnxruntime with a noise input in front of every layer's weight and input.

    ``run(batch, noise)`` adds ``noise[("w"|"a", layer)]`` (others zero) and returns the outputs
    (a tuple, graph order); ``capture(batch)`` returns the layers' input activations.
    """

    def __init__(self, model: OnnxModel):
        import onnxruntime as ort

        self.model = model
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        graph = proto.graph
        by_weight = {layer.weight: layer for layer in model.layers}
        self.noise_inputs, self.capture_outputs = {}, {}
        new_nodes = []
        for node in graph.node:
            layer = by_weight.get(node.input[1]) if node.op_type in LAYER_OPS and len(node.input) > 1 else None
            if layer is not None:
                index = len(self.capture_outputs)
                for kind, slot, shape in (("w", 1, layer.weight_shape), ("a", 0, layer.input_shape)):
                    noise = f"bitq.noise.{kind}.{index}"
                    graph.input.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT, list(shape)))
                    new_nodes.append(helper.make_node("Add", [node.input[slot], noise], [noise + ".sum"]))
                    self.noise_inputs[(kind, layer.name)] = (noise, np.zeros(shape, np.float32))
                capture = f"bitq.capture.{index}"
                new_nodes.append(helper.make_node("Identity", [node.input[0]], [capture]))
                graph.output.append(helper.make_tensor_value_info(capture, TensorProto.FLOAT, list(layer.input_shape)))
                self.capture_outputs[layer.name] = capture
                node.input[0], node.input[1] = f"bitq.noise.a.{index}.sum", f"bitq.noise.w.{index}.sum"
            new_nodes.append(node)
        del graph.node[:]
        graph.node.extend(new_nodes)
        self.session = _session(model, proto)
        self.outputs = [o.name for o in model.proto.graph.output]

    def run(self, batch: dict[str, np.ndarray], noise: Mapping | None = None) -> tuple[np.ndarray, ...]:
        feeds = dict(batch)
        for key, (name, zeros) in self.noise_inputs.items():
            feeds[name] = zeros
        for key, value in (noise or {}).items():
            feeds[self.noise_inputs[key][0]] = np.asarray(value, np.float32)
        return tuple(self.session.run(self.outputs, feeds))

    def capture(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.capture_outputs)
        feeds = dict(batch)
        for name, zeros in self.noise_inputs.values():
            feeds[name] = zeros
        outs = self.session.run([self.capture_outputs[n] for n in names], feeds)
        return dict(zip(names, outs))


@dataclasses.dataclass(frozen=True, eq=False)
class AccuracyTerm:
    """Measured noise powers and sensitivities; predicted loss per (layer, candidate).

    ``weight_noise[layer][format name]`` and ``act_noise[...]`` are mean squared errors;
    ``weight_sensitivity[layer]`` and ``act_sensitivity[layer]`` are relative logit MSE per unit
    noise power. ``curve`` (labels only) holds the (relative logit MSE, top-1 drop) points budgets
    use; ``measured_curve`` the raw measured ones (see :func:`_top1_curve`).
    """

    weight_noise: Mapping[str, Mapping[str, float]]
    act_noise: Mapping[str, Mapping[str, float]]
    weight_sensitivity: Mapping[str, float]
    act_sensitivity: Mapping[str, float]
    n_samples: int
    fp32_top1: float | None = None
    curve: tuple[tuple[float, float], ...] = ()
    noise_kind: str = "quantization"
    measured_curve: tuple[tuple[float, float], ...] = ()
    weight_levels: Mapping[str, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
    act_levels: Mapping[str, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
    probe_levels: int = 1

    @property
    def unit(self) -> str:
        return TOP1_UNIT if self.curve else LOGIT_MSE_UNIT

    def layer_loss(self, layer: str, candidate: LayerFormats) -> float:
        """Predicted relative logit MSE of ``layer`` under ``candidate``."""
        if candidate.is_fp32:
            return 0.0
        w_power = self.weight_noise[layer][candidate.weight.name]
        a_power = self.act_noise[layer][candidate.activation.name]
        return (sensitivity_at(self.weight_levels.get(layer), self.weight_sensitivity[layer], w_power) * w_power
                + sensitivity_at(self.act_levels.get(layer), self.act_sensitivity[layer], a_power) * a_power)

    def _curve_arrays(self):
        mse = np.array([0.0] + [p[0] for p in self.curve])
        drop = np.maximum.accumulate(np.array([0.0] + [max(p[1], 0.0) for p in self.curve]))
        return mse, drop

    def to_user_units(self, mse: float) -> float:
        """Relative logit MSE -> the budget unit: top-1 drop (fraction) with labels, else itself."""
        if not self.curve:
            return float(mse)
        xs, ys = self._curve_arrays()
        if mse > xs[-1]:  # beyond the measured range: extend the last secant
            slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-300)
            return float(min(ys[-1] + slope * (mse - xs[-1]), 1.0))
        return float(np.interp(mse, xs, ys))

    def from_user_units(self, budget: float) -> float:
        """The largest relative logit MSE whose predicted loss stays within ``budget``."""
        if not self.curve:
            return float(budget)
        xs, ys = self._curve_arrays()
        if budget >= ys[-1]:
            return float(xs[-1]) if budget == ys[-1] else float(np.inf)
        # first point above the budget; interpolate inside the segment that crosses it
        k = int(np.argmax(ys > budget))
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        return float(x0 + (budget - y0) / (y1 - y0) * (x1 - x0)) if y1 > y0 else float(x0)


def sensitivity_at(levels, flat: float, power: float) -> float:
    """The sensitivity at noise ``power``: ``flat`` with one probe level; with ``levels``, the
    (noise power, sensitivity) points of several, interpolated linearly in (log power, log
    sensitivity) and held at the end points outside their range."""
    if not levels or len(levels) < 2 or power <= 0:
        return flat
    powers, sens = zip(*sorted(levels))
    if min(sens) <= 0 or min(powers) <= 0:
        return float(np.interp(power, powers, sens))
    return float(np.exp(np.interp(np.log(power), np.log(powers), np.log(sens))))


PROBE_LEVELS = (1, 2)


def measure_accuracy_term(model: OnnxModel, calib: Calibration, candidates: Mapping[str, tuple[LayerFormats, ...]],
                          noise: str = "quantization", seed: int = 0, progress=say,
                          budget: float | None = None, group_size: int = 4, probe_levels: int = 1) -> AccuracyTerm:
    """Measure noise powers and sensitivities of every layer on ``calib``.

    Parameters
    ----------
    model : OnnxModel
    calib : Calibration
        Samples (and optional labels, which switch the unit to top-1 drop).
    candidates : mapping
        Layer name -> its candidates (from :meth:`LayerCandidates.resolve`).
    noise : {"quantization", "gaussian"}
        Injected noise: the probe format's own quantization error, or white Gaussian noise of the
        same power.
    seed : int
        Seed of the Gaussian noise.
    progress : callable or None
        Called with one line per layer (with elapsed time and ETA).
    budget : float, optional
        An accuracy-loss budget in the user unit: as soon as the layers measured so far, each at its
        most precise candidate, already exceed it, BitqError says so (before the rest is measured).
    group_size : int
        Layers per onnxruntime session of the sensitivity probes (:class:`SuffixNoiseGraphs`).
    probe_levels : {1, 2}
        1: each tensor's sensitivity is probed at its noisiest candidate format only. 2: also at
        its quietest, and candidates in between are interpolated (:func:`sensitivity_at`). Networks
        amplify 4-bit noise more than 8-bit noise, so one level over-predicts the loss of 8-bit
        formats (2.3x on PicoDet at uniform bfp8); two levels cost twice the probe runs.

    Order: noise powers and probe errors of every layer (NumPy), the top-1 curve (labels), then
    the sensitivities, one suffix session per group of layers, reusing the FP32 activations.
    """
    import time

    if noise not in NOISE_KINDS:
        raise BitqError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if probe_levels not in PROBE_LEVELS:
        raise BitqError(f"probe levels must be one of {PROBE_LEVELS}, got {probe_levels!r}")
    model = loss_view(model)  # logits, not saturating probabilities; heads, not their concatenation
    batches = calib.batches(model)
    labels = calib.used_labels(model)
    used = sum(len(next(iter(b.values()))) for b in batches)
    if used < MIN_CALIBRATION_SAMPLES:
        raise BitqError(f"{calib.source}: {used} calibration samples; the accuracy term needs at least "
                        f"{MIN_CALIBRATION_SAMPLES} (64 or more recommended)")
    heads = [o.name for o in model.proto.graph.output]
    if progress and len(heads) > 1:
        progress(f"loss: relative MSE of each of {len(heads)} output heads, averaged ({', '.join(heads)})")
    if progress and used < FEW_CALIBRATION_SAMPLES:
        progress(f"warning: only {used} calibration samples: sensitivities and predicted losses are coarse "
                 f"(64 or more recommended)")
    started = time.perf_counter()
    graph = NoiseGraph(model)
    rng = np.random.default_rng(seed)
    reference = [graph.run(b) for b in batches]
    if labels is not None:
        first = reference[0][0]
        check_labels(calib, labels, int(np.prod(first.shape[1:])) if first.ndim == 2 else int(first.shape[-1]))
        if progress and len(np.unique(labels)) < 2:
            progress("warning: every calibration label is the same class: the top-1 curve says little")
    captured = [graph.capture(b) for b in batches]
    weights = model.weights()
    w_noise, a_noise, w_sens, a_sens, probes, powers, quiet = {}, {}, {}, {}, {}, {}, {}
    countdown, last_line = Countdown(len(model.layers), started), time.perf_counter()
    for index, layer in enumerate(model.layers):
        if progress and index and time.perf_counter() - last_line > NOISE_PROGRESS_SECONDS:
            last_line = time.perf_counter()  # a line every few seconds: small models print none
            progress(f"noise powers {index}/{len(model.layers)} layers {countdown.suffix(index)}")
        cands = [c for c in candidates[layer.name] if not c.is_fp32]
        w_sens[layer.name] = a_sens[layer.name] = 0.0
        if not cands:  # pinned to fp32: no noise, sensitivity irrelevant
            w_noise[layer.name], a_noise[layer.name] = {}, {}
            continue
        w = weights[layer.weight]
        w_noise[layer.name] = {f.name: noise_power(*layer_weight_blocks(layer, w, f)) for f in {c.weight for c in cands}}
        a_noise[layer.name] = {f.name: _activation_noise_power(layer, [c[layer.name] for c in captured], f)
                               for f in {c.activation for c in cands}}
        w_probe = _probe(w_noise[layer.name])
        a_probe = _probe(a_noise[layer.name])
        w_error = _weight_error(layer, w, w_probe, w_noise[layer.name], noise, rng) if w_probe else None
        a_errors = _activation_errors(layer, captured, a_probe, a_noise[layer.name], noise, rng) if a_probe else None
        probes[layer.name] = (w_error, a_errors)
        powers[layer.name] = (w_noise[layer.name][w_probe.name] if w_probe else 0.0,
                              a_noise[layer.name][a_probe.name] if a_probe else 0.0)
        if probe_levels == 2:
            w_quiet = _probe(w_noise[layer.name], quietest=True)
            a_quiet = _probe(a_noise[layer.name], quietest=True)
            a_quiet_sens = None
            if a_quiet and a_quiet != a_probe:
                # measured now, through the whole model: keeping a second set of activation errors
                # for the suffix sessions would hold every layer's inputs twice more (OOM on PicoDet)
                power = a_noise[layer.name][a_quiet.name]
                errors = _activation_errors(layer, captured, a_quiet, a_noise[layer.name], noise, rng)
                a_quiet_sens = (power, measure_output_mse(graph, batches, reference, ("a", layer.name), errors) / power)
                del errors
            quiet[layer.name] = (
                (w_noise[layer.name][w_quiet.name], _weight_error(layer, w, w_quiet, w_noise[layer.name], noise, rng))
                if w_quiet and w_quiet != w_probe else None, a_quiet_sens)
    del captured
    if progress:
        progress(f"noise powers of {len(probes)} layers in {time.perf_counter() - started:.1f} s")
    curve, measured_curve, fp32_top1 = (), (), None
    if labels is not None:
        fp32_top1 = top1([r[0] for r in reference], labels)
        curve, measured_curve = _top1_curve(graph, batches, reference, labels, probes, fp32_top1)
        if progress:
            progress("top-1 drop vs relative logit MSE, measured: "
                     + ", ".join(f"{m:.2e}->{d * 100:.2f}%" for m, d in measured_curve))
            progress("curve used (margin model where fewer than 3 samples flip): "
                     + ", ".join(f"{m:.2e}->{d * 100:.3f}%" for m, d in curve))
    del graph
    unit_term = AccuracyTerm({}, {}, {}, {}, used, fp32_top1, curve)
    mse_budget = unit_term.from_user_units(budget) if budget is not None else None
    suffix = SuffixNoiseGraphs(model, list(probes), group_size)
    suffix.capture(batches)
    best_so_far, countdown = 0.0, Countdown(len(probes), started)
    w_levels, a_levels = {}, {}

    def measured(key, errors, power, per_batch):
        outputs = [suffix.run(b, {key: errors[b] if per_batch else errors}) for b in range(len(batches))]
        return head_rel_mse(outputs, reference) / power

    for done, name in enumerate(g for group in suffix.groups for g in group):
        w_error, a_errors = probes[name]
        w_power, a_power = powers[name]
        if w_error is not None and w_power > 0:
            w_sens[name] = measured(("w", name), w_error, w_power, False)
        if a_errors is not None and a_power > 0:
            a_sens[name] = measured(("a", name), a_errors, a_power, True)
        w_quiet, a_quiet = quiet.pop(name, (None, None))
        if w_quiet is not None and w_quiet[0] > 0 and w_sens[name] > 0:
            w_levels[name] = ((w_power, w_sens[name]), (w_quiet[0], measured(("w", name), w_quiet[1], w_quiet[0], False)))
        if a_quiet is not None and a_quiet[0] > 0 and a_sens[name] > 0:
            a_levels[name] = ((a_power, a_sens[name]), a_quiet)
        best_so_far += min(_loss(w_levels.get(name), w_sens[name], w_noise[name][c.weight.name])
                           + _loss(a_levels.get(name), a_sens[name], a_noise[name][c.activation.name])
                           if not c.is_fp32 else 0.0 for c in candidates[name])
        if progress:
            progress(f"accuracy term {done + 1}/{len(probes)} {name}: sensitivity weight {w_sens[name]:.3g}, "
                     f"activation {a_sens[name]:.3g} per unit noise power {countdown.suffix(done + 1)}")
        if mse_budget is not None and best_so_far > mse_budget:
            best = unit_term.to_user_units(best_so_far)
            unit = TOP1_UNIT if curve else LOGIT_MSE_UNIT
            raise BitqError(f"--budget {budget * 100:.4g}% ({unit}) is infeasible: the best achievable predicted "
                            f"loss with these candidates is at least {best * 100:.4g}% (relative logit MSE "
                            f"{best_so_far:.3g} from {done + 1} of {len(probes)} layers, each at its most precise "
                            "candidate); raise the budget or add higher-precision candidates")
    return AccuracyTerm(weight_noise=MappingProxyType(w_noise), act_noise=MappingProxyType(a_noise),
                        weight_sensitivity=MappingProxyType(w_sens), act_sensitivity=MappingProxyType(a_sens),
                        n_samples=used, fp32_top1=fp32_top1, curve=curve, noise_kind=noise,
                        measured_curve=measured_curve, weight_levels=MappingProxyType(w_levels),
                        act_levels=MappingProxyType(a_levels), probe_levels=probe_levels)


def _loss(levels, flat: float, power: float) -> float:
    return sensitivity_at(levels, flat, power) * power


def _weight_error(layer: Layer, w: np.ndarray, fmt: BFPFormat, powers: Mapping[str, float], noise, rng):
    """The probe error on ``layer``'s weight ``w`` for format ``fmt`` (its own rounding error, or
    Gaussian of that power), in the weight's own layout."""
    view, blocks_fmt, axis = layer_weight_blocks(layer, w, fmt)
    return weight_from_blocks(layer, _error(view, blocks_fmt, axis, powers[fmt.name], noise, rng), fmt)


def _activation_errors(layer: Layer, captured, fmt: BFPFormat, powers: Mapping[str, float], noise, rng):
    """The probe errors on ``layer``'s captured input activations (one per batch) for ``fmt``."""
    blocks_fmt, axis, groups = layer_activation_blocks(layer, fmt)
    # a window-blocked conv quantizes im2col rows, not its input: Gaussian error of their power
    kind = "gaussian" if layer.is_window_blocked(fmt.block_size) else noise
    return [_error(c[layer.name], blocks_fmt, axis, powers[fmt.name], kind, rng, groups) for c in captured]


def _activation_noise_power(layer: Layer, xs, fmt: BFPFormat) -> float:
    """Mean squared quantization error of ``layer``'s input activations ``xs`` (one per batch) in
    ``fmt``: along its contract blocks, or a window-blocked conv's im2col rows."""
    if fmt is not None and layer.is_window_blocked(fmt.block_size):
        return _batched_noise_power([window_rows(layer, x) for x in xs], fmt, 1, 1)
    return _batched_noise_power(xs, *layer_activation_blocks(layer, fmt))


def _batched_noise_power(xs, fmt, axis, groups) -> float:
    """:func:`noise_power` over the concatenation of ``xs`` (blocks never span samples), without
    materialising the concatenation."""
    total, count = 0.0, 0
    for x in xs:
        total += noise_power(x, fmt, axis, groups) * x.size
        count += x.size
    return total / max(count, 1)


def _probe(powers: Mapping[str, float], quietest: bool = False) -> BFPFormat | None:
    """The probe format: the candidates' noisiest format (``quietest``: their quietest). With one
    level, sensitivity is measured where the loss is large enough to matter for budgets; quieter
    formats' small losses are then over-predicted (see ``probe_levels``)."""
    from ..formats import get_format

    ranked = sorted((p, name) for name, p in powers.items() if p > 0)
    return get_format(ranked[0 if quietest else -1][1]) if ranked else None


def _error(x, fmt, axis, power, noise, rng, groups=1) -> np.ndarray:
    if noise == "gaussian":
        return rng.standard_normal(np.shape(x)).astype(np.float32) * np.float32(np.sqrt(power))
    return (fake_quantize_np(x, fmt, axis=axis, groups=groups) - np.asarray(x, np.float32)).astype(np.float32)


def measure_output_mse(graph: NoiseGraph, batches, reference, key, errors, scale: float = 1.0) -> float:
    """Relative logit MSE with ``scale * errors[b]`` injected at ``key`` for batch b."""
    outputs = [graph.run(b, {key: scale * e}) for b, e in zip(batches, errors)]
    return head_rel_mse(outputs, reference)


def _sensitivity(graph, batches, reference, key, errors, power) -> float:
    if power <= 0:
        return 0.0
    return measure_output_mse(graph, batches, reference, key, errors) / power


def _top1_curve(graph, batches, reference, labels, probes, fp32_top1):
    """Measured (relative logit MSE, top-1 drop) points, and the curve the budgets use.

    A top-1 count saturates: with small noise no calibration sample flips and the measured drop is
    0 (or 1/N by luck), so every cheap plan would look free. The curve therefore takes the
    measured drop only where it is resolved (at least :data:`_RESOLVED_FLIPS` samples flip) and
    elsewhere the margin model (:func:`_margin_model`) fitted to the resolved points: the expected
    top-1 drop when Gaussian noise of that relative MSE meets each sample's logit margin. Model
    points below the first measured level make the curve rise smoothly from 0.
    """
    measured = []
    for scale in _CURVE_SCALES:
        amplitude = np.float32(np.sqrt(scale))
        outputs = []
        for b_index, batch in enumerate(batches):
            noise = {}
            for name, (w_error, a_errors) in probes.items():
                if w_error is not None:
                    noise[("w", name)] = amplitude * w_error
                if a_errors is not None:
                    noise[("a", name)] = amplitude * a_errors[b_index]
            outputs.append(graph.run(batch, noise))
        measured.append((head_rel_mse(outputs, reference), fp32_top1 - top1([o[0] for o in outputs], labels)))
    measured = sorted(measured)
    model = _margin_model(reference, labels, fp32_top1, measured)
    resolved = _RESOLVED_FLIPS / len(labels)
    curve = [(m, d if d >= resolved else model(m)) for m, d in measured]
    first = measured[0][0]
    low = [(first * f, model(first * f)) for f in (0.01, 0.03, 0.1, 0.3) if first > 0]
    return tuple(low + curve), tuple(measured)


_RESOLVED_FLIPS = 3  # a measured top-1 drop counts once this many calibration samples flip


def _margin_model(reference, labels, fp32_top1, measured):
    """``mse -> expected top-1 drop``: each sample keeps its label while the noise on (its label's
    logit - the runner-up's) stays below its FP32 margin; per-logit noise variance = mse x mean
    logit power, scaled by a factor fitted (log-grid least squares) to the resolved measured drops."""
    from scipy.special import ndtr

    logits = np.concatenate([r[0].reshape(r[0].shape[0], -1) for r in reference]).astype(np.float64)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    margin = logits[rows, labels] - others.max(axis=1)
    power = float(np.mean(logits * logits))

    def drop(mse, alpha):
        sigma = alpha * np.sqrt(2.0 * max(mse, 0.0) * power)
        if sigma <= 0:
            return 0.0
        return max(fp32_top1 - float(np.mean(ndtr(margin / sigma))), 0.0)

    resolved = _RESOLVED_FLIPS / len(labels)
    points = [(m, d) for m, d in measured if resolved <= d <= 0.5 * max(fp32_top1, resolved)]
    alpha = 1.0
    if points:
        grid = np.logspace(-2, 2, 161)
        errors = [sum((np.log1p(drop(m, a) / resolved) - np.log1p(d / resolved)) ** 2 for m, d in points)
                  for a in grid]
        alpha = float(grid[int(np.argmin(errors))])
    return lambda mse: drop(mse, alpha)
