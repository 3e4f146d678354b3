"""The accuracy term, measured post-training on calibration data (no training).

For every layer l and candidate q the predicted loss is

    loss(l, q) = S_w[l] * P_w[l, q] + S_a[l] * P_a[l, q]

* ``P_w``, ``P_a``: the exact mean squared error the NumPy reference quantizer puts on the layer's
  real weight (whole tensor) and on its real input activations over the calibration set. The
  activations are captured with onnxruntime by exposing every layer input as a graph output.
* ``S_w``, ``S_a``: the network's measured sensitivity, the relative logit MSE
  ``sum (y_noisy - y)^2 / sum y^2`` of the first graph output per unit of noise power injected at
  that tensor alone. Noise enters through extra graph inputs (``W + n_w`` in front of the weight,
  ``x + n_a`` in front of the layer's input only), so one onnxruntime session serves every layer.
  The injected noise is either white Gaussian, or (default) the probe format's own quantization
  error: for the activations it is exact, because with noise at layer l alone l's input is the
  clean captured activation.

Losses add over layers (independent small errors add in power), so the predicted loss of a plan,
in relative logit MSE, is the sum of its layers' losses. With labels, a measured curve maps it to
the top-1 drop: noise scaled to several levels is injected at every layer at once and the drop in
top-1 accuracy recorded against the measured logit MSE. Where too few samples flip to resolve a
drop, a margin model fitted to the resolved points stands in (a top-1 count saturates at 0 for
small noise, which would make every cheap plan look free); the curve is made monotone and
interpolated linearly (0 at 0). Budgets in top-1 points go through its inverse, which keeps the
optimisation linear.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from types import MappingProxyType
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import BitqError
from ..formats import BFPFormat, fake_quantize_np
from ..frontend.onnx_model import LAYER_OPS, Layer, OnnxModel, cast_input, input_dtypes
from ..frontend.reference import act_block_axis, weight_block_axis
from .candidates import Candidate

LOGIT_MSE_UNIT = "relative logit MSE"
TOP1_UNIT = "top-1 drop"
NOISE_KINDS = ("quantization", "gaussian")
# Curve levels, as multiples of each tensor's probe noise power, injected at every layer at once.
_CURVE_SCALES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _progress(message: str) -> None:
    print(f"[bitq-tvm] {message}", file=sys.stderr, flush=True)


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
    if not os.path.isfile(path):
        raise BitqError(f"{path}: no such calibration file")
    try:
        with np.load(path) as archive:
            data = {k: archive[k] for k in archive.files}
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad files
        raise BitqError(f"{path}: not a readable .npz file ({type(err).__name__})") from None
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


class NoiseGraph:
    """The model in onnxruntime with a noise input in front of every layer's weight and input.

    ``run(batch, noise)`` adds ``noise[("w"|"a", layer)]`` (others zero) and returns the first
    output; ``capture(batch)`` returns the layers' input activations.
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2  # the machine is shared; more threads only contend
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BitqError(f"{model.path}: onnxruntime cannot run the model for calibration: "
                            f"{str(err).strip().splitlines()[0]}") from None
        self.output = model.proto.graph.output[0].name

    def run(self, batch: dict[str, np.ndarray], noise: Mapping | None = None) -> np.ndarray:
        feeds = dict(batch)
        for key, (name, zeros) in self.noise_inputs.items():
            feeds[name] = zeros
        for key, value in (noise or {}).items():
            feeds[self.noise_inputs[key][0]] = np.asarray(value, np.float32)
        return self.session.run([self.output], feeds)[0]

    def capture(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.capture_outputs)
        feeds = dict(batch)
        for name, zeros in self.noise_inputs.values():
            feeds[name] = zeros
        outs = self.session.run([self.capture_outputs[n] for n in names], feeds)
        return dict(zip(names, outs))


def _rel_mse(outputs, reference) -> float:
    diff = np.concatenate([np.ravel(o) - np.ravel(r) for o, r in zip(outputs, reference)]).astype(np.float64)
    ref = np.concatenate([np.ravel(r) for r in reference]).astype(np.float64)
    return float(np.dot(diff, diff) / max(np.dot(ref, ref), 1e-300))


def _top1(outputs, labels) -> float:
    logits = np.concatenate([o.reshape(o.shape[0], -1) for o in outputs])
    return float((logits.argmax(1) == labels).mean())


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

    @property
    def unit(self) -> str:
        return TOP1_UNIT if self.curve else LOGIT_MSE_UNIT

    def layer_loss(self, layer: str, candidate: Candidate) -> float:
        """Predicted relative logit MSE of ``layer`` under ``candidate``."""
        if candidate.is_fp32:
            return 0.0
        return (self.weight_sensitivity[layer] * self.weight_noise[layer][candidate.weight.name]
                + self.act_sensitivity[layer] * self.act_noise[layer][candidate.activation.name])

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


def measure_accuracy_term(model: OnnxModel, calib: Calibration, candidates: Mapping[str, tuple[Candidate, ...]],
                          noise: str = "quantization", seed: int = 0, progress=_progress) -> AccuracyTerm:
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
        Called with one line per layer.
    """
    if noise not in NOISE_KINDS:
        raise BitqError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    batches = calib.batches(model)
    labels = calib.used_labels(model)
    used = sum(len(next(iter(b.values()))) for b in batches)
    if used < MIN_CALIBRATION_SAMPLES:
        raise BitqError(f"{calib.source}: {used} calibration samples; the accuracy term needs at least "
                        f"{MIN_CALIBRATION_SAMPLES} (64 or more recommended)")
    if progress and used < FEW_CALIBRATION_SAMPLES:
        progress(f"warning: only {used} calibration samples: sensitivities and predicted losses are coarse "
                 f"(64 or more recommended)")
    graph = NoiseGraph(model)
    rng = np.random.default_rng(seed)
    reference = [graph.run(b) for b in batches]
    if labels is not None:
        check_labels(calib, labels, int(np.prod(reference[0].shape[1:])) if reference[0].ndim == 2
                     else int(reference[0].shape[-1]))
        if progress and len(np.unique(labels)) < 2:
            progress("warning: every calibration label is the same class: the top-1 curve says little")
    captured = [graph.capture(b) for b in batches]
    weights = model.weights()
    w_noise, a_noise, w_sens, a_sens, probes = {}, {}, {}, {}, {}
    for index, layer in enumerate(model.layers):
        cands = [c for c in candidates[layer.name] if not c.is_fp32]
        if not cands:  # pinned to fp32: no noise, sensitivity irrelevant
            w_noise[layer.name], a_noise[layer.name] = {}, {}
            w_sens[layer.name] = a_sens[layer.name] = 0.0
            continue
        w = weights[layer.weight]
        acts = np.concatenate([c[layer.name] for c in captured])
        axis, groups = act_block_axis(layer)
        w_axis = weight_block_axis(layer)
        w_noise[layer.name] = {f.name: noise_power(w, f, w_axis) for f in {c.weight for c in cands}}
        a_noise[layer.name] = {f.name: noise_power(acts, f, axis, groups) for f in {c.activation for c in cands}}
        w_probe = _probe(w_noise[layer.name])
        a_probe = _probe(a_noise[layer.name])
        w_error = _error(w, w_probe, w_axis, w_noise[layer.name][w_probe.name], noise, rng) if w_probe else None
        a_errors = [_error(c[layer.name], a_probe, axis, a_noise[layer.name][a_probe.name], noise, rng, groups)
                    for c in captured] if a_probe else None
        probes[layer.name] = (w_error, a_errors)
        w_sens[layer.name] = _sensitivity(graph, batches, reference, ("w", layer.name), [w_error] * len(batches),
                                          w_noise[layer.name][w_probe.name]) if w_probe else 0.0
        a_sens[layer.name] = _sensitivity(graph, batches, reference, ("a", layer.name), a_errors,
                                          a_noise[layer.name][a_probe.name]) if a_probe else 0.0
        if progress:
            progress(f"accuracy term {index + 1}/{len(model.layers)} {layer.name}: sensitivity weight "
                     f"{w_sens[layer.name]:.3g}, activation {a_sens[layer.name]:.3g} per unit noise power")
    curve, measured_curve, fp32_top1 = (), (), None
    if labels is not None:
        fp32_top1 = _top1(reference, labels)
        curve, measured_curve = _top1_curve(graph, batches, reference, labels, probes, fp32_top1)
        if progress:
            progress("top-1 drop vs relative logit MSE, measured: "
                     + ", ".join(f"{m:.2e}->{d * 100:.2f}%" for m, d in measured_curve))
            progress("curve used (margin model where fewer than 3 samples flip): "
                     + ", ".join(f"{m:.2e}->{d * 100:.3f}%" for m, d in curve))
    return AccuracyTerm(weight_noise=MappingProxyType(w_noise), act_noise=MappingProxyType(a_noise),
                        weight_sensitivity=MappingProxyType(w_sens), act_sensitivity=MappingProxyType(a_sens),
                        n_samples=sum(len(next(iter(b.values()))) for b in batches), fp32_top1=fp32_top1,
                        curve=curve, noise_kind=noise, measured_curve=measured_curve)


def _probe(powers: Mapping[str, float]) -> BFPFormat | None:
    """The probe format: the candidates' noisiest format. Sensitivity is measured where the loss is
    large enough to matter for budgets; quieter formats' small losses are then slightly off."""
    from ..formats import get_format

    ranked = sorted((p, name) for name, p in powers.items() if p > 0)
    return get_format(ranked[-1][1]) if ranked else None


def _error(x, fmt, axis, power, noise, rng, groups=1) -> np.ndarray:
    if noise == "gaussian":
        return rng.standard_normal(np.shape(x)).astype(np.float32) * np.float32(np.sqrt(power))
    return (fake_quantize_np(x, fmt, axis=axis, groups=groups) - np.asarray(x, np.float32)).astype(np.float32)


def measure_output_mse(graph: NoiseGraph, batches, reference, key, errors, scale: float = 1.0) -> float:
    """Relative logit MSE with ``scale * errors[b]`` injected at ``key`` for batch b."""
    outputs = [graph.run(b, {key: scale * e}) for b, e in zip(batches, errors)]
    return _rel_mse(outputs, reference)


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
        measured.append((_rel_mse(outputs, reference), fp32_top1 - _top1(outputs, labels)))
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

    logits = np.concatenate([r.reshape(r.shape[0], -1) for r in reference]).astype(np.float64)
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
