"""Evaluation: a model's BFP and TVM FP32 outputs against a reference, and the metrics for it.

- :func:`evaluate` (``bitq-tvm eval``) compiles the FP32 and the BFP model (simulation or integer
  deployment, on the host or a remote device) and compares both with ONNX Runtime running the
  model file; :func:`load_eval_data` reads and checks its ``.npz`` data before anything compiles.
- :func:`onnxruntime_reference` runs the ORIGINAL model file in ONNX Runtime (intra-op spinning
  off: a spinning ORT pool starves TVM's threads on small machines), fed the same zero-padded
  batches as the TVM side.
- :func:`compare` gives, for one output, how close a model's output is to a reference: cosine
  similarity and relative L2 error (over all values), max abs difference, and the argmax agreement
  along the class (last) axis: per sample for ``[N, C]``, per position for ``[N, T, C]``
  (averaged over N and T). Trailing size-1 axes are ignored (``[N, C, 1, 1]`` is ``[N, C]``).
- :func:`top_k` scores an output against integer labels (``[N]`` for ``[N, C]``, ``[N, T]``
  for ``[N, T, C]``); top-5 only where there are at least 5 classes.
- :func:`head_rel_mse`, :func:`top1` and :func:`argmax_agreement` are the planner's metrics (its
  loss unit: :func:`rel_mse` of each output head, averaged over heads; over batches, each sample's
  output flattened); :func:`compare`'s rel-L2 is the root of :func:`rel_mse`.
- :func:`weight_bytes` and :func:`stored_weight_bytes`: the layer weight bytes a set of formats
  or an integer deployment stores.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .errors import BitqError
from .runtime.runner import chunks, stack_outputs


def class_view(output: np.ndarray) -> np.ndarray | None:
    """``output`` as ``[N, C]`` or ``[N, T, C]`` (trailing size-1 axes dropped), or None if it is neither."""
    shape = list(output.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    if len(shape) not in (2, 3) or shape[-1] < 2:
        return None
    return output.reshape(shape)


def argmax_kind(output_shape) -> str | None:
    """"per sample" ([N, C]), "per position" ([N, T, C]) or None (no class axis)."""
    view = class_view(np.empty(output_shape, np.float32))
    return None if view is None else ("per sample" if view.ndim == 2 else "per position")


def compare(reference: np.ndarray, output: np.ndarray) -> dict:
    """Closeness of ``output`` to ``reference`` (same shape; leading axis = sample)."""
    if reference.shape != output.shape:
        raise BitqError(f"output shape {list(output.shape)} differs from the reference's {list(reference.shape)}")
    ref, out = reference.astype(np.float64).ravel(), output.astype(np.float64).ravel()
    ref_norm, out_norm = np.linalg.norm(ref), np.linalg.norm(out)
    diff = out - ref
    stats = {
        "cosine": float(np.dot(ref, out) / (ref_norm * out_norm)) if ref_norm and out_norm else float(ref_norm == out_norm),
        "rel_l2": float(np.sqrt(rel_mse([out], [ref]))),  # the float64 copies: no float32 rounding
        "max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0,
    }
    ref_view, out_view = class_view(reference), class_view(output)
    if ref_view is not None:
        stats["argmax"] = argmax_kind(reference.shape)
        stats["argmax_agreement"] = float((ref_view.argmax(-1) == out_view.argmax(-1)).mean())
    return stats


def rel_mse(outputs, reference) -> float:
    """Relative MSE ``sum((o - r)^2) / sum(r^2)`` over all values of batches ``outputs`` vs ``reference``."""
    diff = np.concatenate([np.ravel(o) - np.ravel(r) for o, r in zip(outputs, reference)]).astype(np.float64)
    ref = np.concatenate([np.ravel(r) for r in reference]).astype(np.float64)
    return float(np.dot(diff, diff) / max(np.dot(ref, ref), 1e-300))


def head_rel_mse(outputs, reference) -> float:
    """The planner's loss: :func:`rel_mse` of each output head on its own, averaged over the heads.

    ``outputs`` and ``reference`` hold one entry per batch, each a sequence of head arrays (a bare
    array is one head). Each head is normalised by its own power, so a head of small values (scores
    in 0..1) counts as much as one of large values (box pixels) beside it; with one head this is
    :func:`rel_mse`.
    """
    outputs = [(o,) if isinstance(o, np.ndarray) else tuple(o) for o in outputs]
    reference = [(r,) if isinstance(r, np.ndarray) else tuple(r) for r in reference]
    heads = len(reference[0])
    return float(np.mean([rel_mse([o[h] for o in outputs], [r[h] for r in reference]) for h in range(heads)]))


def _flat_argmax(outputs) -> np.ndarray:
    """Per sample the argmax of its flattened output, over batches ``outputs``."""
    return np.concatenate([o.reshape(o.shape[0], -1) for o in outputs]).argmax(1)


def top1(outputs, labels) -> float:
    """Top-1 of batches ``outputs`` against ``labels`` (one per sample; each sample's output flattened)."""
    return float((_flat_argmax(outputs) == labels).mean())


def argmax_agreement(outputs, reference) -> float:
    """Fraction of samples whose flattened-output argmax agrees between batches ``outputs`` and ``reference``."""
    return float((_flat_argmax(outputs) == _flat_argmax(reference)).mean())


def check_labels(labels: np.ndarray, output_shape, where: str) -> None:
    """Raise BitqError unless ``labels`` fit an output of ``output_shape`` (batch axis excluded from the check)."""
    kind = argmax_kind(output_shape)
    if kind is None:
        raise BitqError(f"{where}: labels given, but the output of shape {list(output_shape)} has no class axis "
                        "([N, C] or [N, T, C])")
    classes = class_view(np.empty(output_shape, np.float32)).shape
    if tuple(labels.shape[1:]) != tuple(classes[1:-1]):
        want = "[N]" if kind == "per sample" else f"[N, {classes[1]}]"
        raise BitqError(f"{where}: labels of shape {list(labels.shape)}; the output {list(output_shape)} takes "
                        f"labels {want}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes[-1]):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise BitqError(f"{where}: label {int(bad)} is outside the output's class range 0..{classes[-1] - 1}")


def top_k(output: np.ndarray, labels: np.ndarray) -> dict:
    """``{"top1": ..., "top5": ...}`` of ``output`` against ``labels`` (top5 only with >= 5 classes)."""
    view = class_view(output)
    stats = {"top1": float((view.argmax(-1) == labels).mean())}
    if view.shape[-1] >= 5:
        top5 = np.argpartition(-view, 4, axis=-1)[..., :5]
        stats["top5"] = float((top5 == labels[..., None]).any(-1).mean())
    return stats


def onnxruntime_reference(path: str, feeds: dict[str, np.ndarray], batch: int):
    """Run the model file at ``path`` in ONNX Runtime (FP32, spinning off) on ``feeds`` in chunks of ``batch``.

    Returns
    -------
    label : str
        ``"ONNX Runtime <version> FP32 of <file>"``.
    names : list of str
        The output names, in graph order.
    outputs : list of ndarray
        Each output stacked over the samples.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BitqError(f"{path}: ONNX Runtime cannot load the model for the FP32 reference: "
                        f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None
    names = [o.name for o in session.get_outputs()]
    per_chunk = []
    for chunk, valid in chunks(feeds, batch):
        try:
            per_chunk.append((session.run(names, chunk), valid))
        except Exception as err:  # noqa: BLE001
            raise BitqError(f"{path}: ONNX Runtime failed on the FP32 reference: "
                            f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None
    return f"ONNX Runtime {ort.__version__} FP32 of {os.path.basename(path)}", names, stack_outputs(per_chunk, batch)


def weight_bytes(model, formats) -> tuple[int, int]:
    """(FP32 bytes, bit-packed bytes under ``formats``) of the model's layer weights.

    ``formats`` maps layer names to :class:`~bitq_tvm.plan.LayerFormats`; a layer not in it, or
    with no weight format, counts at FP32 (see :meth:`~bitq_tvm.frontend.onnx_model.Layer.bitpacked_weight_bytes`).
    """
    fp32 = quant = 0
    for layer in model.layers:
        fp32 += 4 * layer.params
        quant += layer.bitpacked_weight_bytes(formats[layer.name].weight if layer.name in formats else None)
    return fp32, quant


def stored_weight_bytes(report) -> int:
    """Layer weight bytes an integer deployment (its :class:`~bitq_tvm.deploy.DeploymentReport`) stores:
    packed for integer layers, FP32 for the others."""
    return sum(d.stored_bytes if d.mode == "integer" else d.fp32_bytes for d in report.layers)


def load_eval_data(path, model) -> dict[str, np.ndarray]:
    """The eval arrays of ``path`` (.npz): one per model input (by name; ``x`` for a single input), labels ``y``.

    Everything a user can get wrong is checked here, before anything is compiled: missing arrays,
    sample shapes and dtypes, sample counts, and the labels' count, shape and class range.
    """
    from .frontend.onnx_model import input_dtypes
    from .support.npz import read_npz

    data = read_npz(path, "data")
    names = list(model.input_shapes)
    arrays = {}
    dtypes = input_dtypes(model)
    for name in names:
        key = name if name in data else ("x" if len(names) == 1 and "x" in data else None)
        if key is None:
            also = " or 'x'" if len(names) == 1 else ""
            raise BitqError(f"{path}: no array '{name}'{also} for model input '{name}' (arrays: {sorted(data)})")
        x, want = data[key], model.input_shapes[name]
        if x.ndim == 0 or tuple(x.shape[1:]) != tuple(want[1:]):
            raise BitqError(f"{path}: array '{key}' has samples of shape {list(x.shape[1:])}, "
                            f"model input '{name}' takes {list(want[1:])} (shape {list(want)})")
        if x.dtype.kind not in "biuf" or (dtypes[name].kind in "biu" and x.dtype.kind not in "biu"):
            raise BitqError(f"{path}: array '{key}' is {x.dtype}, model input '{name}' takes {dtypes[name]}")
        arrays[name] = x
    counts = {name: len(x) for name, x in arrays.items()}
    if len(set(counts.values())) != 1:
        raise BitqError(f"{path}: the input arrays hold different sample counts {counts}")
    samples = next(iter(counts.values()))
    if samples == 0:
        raise BitqError(f"{path}: the input arrays hold no samples")
    if "y" in data:
        y = data["y"]
        if y.dtype.kind not in "iu":
            raise BitqError(f"{path}: labels 'y' must be integers, got {y.dtype}")
        if y.ndim == 0 or len(y) != samples:
            raise BitqError(f"{path}: {y.size if y.ndim == 0 else len(y)} labels in 'y' for {samples} samples")
        shape = _declared_output_shape(model)
        if shape is not None:
            check_labels(y, shape, f"{path}: labels 'y'")
        arrays["y"] = y
    return arrays


def _declared_output_shape(model):
    """The first output's shape from the normalised model's shape inference, or None if not static."""
    dims = model.proto.graph.output[0].type.tensor_type.shape.dim
    if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def evaluate(model, plan, data, target="host", limit=None, progress=True, deploy=False, remote=None,
             save_outputs=None) -> dict:
    """BFP and TVM FP32 outputs of ``model`` on ``data`` vs ONNX Runtime FP32 running the model file.

    ``data`` maps every model input name to its samples (leading axis) and optionally ``y`` to
    integer labels of the first output (see :func:`load_eval_data`). ``deploy`` evaluates the
    integer BFP deployment instead of the simulation; ``remote`` maps a compiled model to a runner
    on a device (``--rpc``/``--tracker``), or None to run on the host. ``save_outputs``: an .npz to
    write the outputs to, keys ``reference/NAME``, ``fp32/NAME``, ``bfp/NAME``.

    Returns a dict: per output name under ``outputs`` the :func:`compare` stats of ``tvm_fp32``
    and ``bfp`` against the reference and, with labels, ``top`` (top-1/5 of ``reference``,
    ``tvm_fp32``, ``bfp``); the first output's figures also at the top level:
    ``argmax_agreement``, ``rel_l2_error``, ``max_abs_diff`` (BFP vs the reference), ``fp32_top1``
    (the ONNX Runtime reference), ``tvm_fp32_top1``, ``bfp_top1``; and ``samples``, ``batch``,
    ``reference`` (its label), ``*_seconds``, ``weight_bytes`` (FP32, bit-packed BFP) and with
    ``deploy`` ``stored_weight_bytes``.
    """
    from .api import CompiledModel, compile_model
    from .support.progress import say
    from .frontend.onnx_model import cast_input, input_dtypes
    from .support.npz import write_npz
    from .support.paths import check_output_path

    if limit is not None and limit <= 0:
        raise BitqError(f"--limit {limit}: must be > 0")
    if save_outputs:
        check_output_path(save_outputs, "--save-outputs")
    names = list(model.input_shapes)
    if len(names) == 1 and names[0] not in data and "x" in data:
        data = {**data, names[0]: data["x"]}
    missing = [n for n in names if n not in data]
    if missing:
        raise BitqError(f"no data for model input(s) {missing}")
    dtypes = input_dtypes(model)  # ONNX Runtime takes exactly the declared types
    feeds = {n: cast_input(n, np.asarray(data[n])[:limit], dtypes[n]) for n in names}
    batches = {model.input_shapes[n][0] for n in names}
    if len(batches) != 1:
        raise BitqError(f"{model.path}: the inputs have different batch sizes "
                        f"{ {n: model.input_shapes[n][0] for n in names} }; eval runs one batch size")
    batch = batches.pop()
    labels = np.asarray(data["y"])[:limit] if "y" in data else None
    report = say if progress else None

    if report:
        report(f"FP32 reference: ONNX Runtime on {model.path}")
    start = time.perf_counter()
    reference_label, output_names, reference = onnxruntime_reference(model.path, feeds, batch)
    results = {"reference": reference, "reference_seconds": time.perf_counter() - start}
    if labels is not None:
        if len(labels) != len(reference[0]):
            raise BitqError(f"labels 'y': {len(labels)} labels for {len(reference[0])} samples")
        check_labels(labels, reference[0].shape, "labels 'y'")
    for label, p in (("fp32", None), ("bfp", plan)):
        if label == "bfp" and deploy:
            from .deploy import compile_deployed

            compiled = compile_deployed(model, p, target, progress=report)
        else:
            compiled = compile_model(model, p, target, progress=report)
        device = remote(compiled) if remote else None
        try:
            start = time.perf_counter()
            # run_batched only needs ``model`` and ``run``: the same chunks on a remote device.
            outs = CompiledModel.run_batched(device or compiled, feeds)
            results[label + "_seconds"] = time.perf_counter() - start
        finally:
            if device is not None:
                device.close()  # TVM's RPC server serves one session at a time
        if len(outs) != len(output_names):
            raise BitqError(f"{model.path}: the TVM build has {len(outs)} outputs, ONNX Runtime {len(output_names)}")
        results[label] = outs
        results[label + "_formats"] = compiled.formats
        if label == "bfp" and getattr(compiled, "report", None) is not None:
            results["stored_weight_bytes"] = stored_weight_bytes(compiled.report)

    per_output = {}
    for i, name in enumerate(output_names):
        ref = reference[i]
        entry = {"tvm_fp32": compare(ref, results["fp32"][i]), "bfp": compare(ref, results["bfp"][i])}
        if labels is not None and i == 0:
            entry["top"] = {k: top_k(outs[i], labels) for k, outs in
                            (("reference", reference), ("tvm_fp32", results["fp32"]), ("bfp", results["bfp"]))}
        per_output[name] = entry
    first = per_output[output_names[0]]
    stats = {
        "samples": len(reference[0]), "batch": batch, "reference": reference_label, "output_names": output_names,
        "outputs": per_output,
        "argmax_agreement": first["bfp"].get("argmax_agreement", float("nan")),
        "rel_l2_error": first["bfp"]["rel_l2"], "max_abs_diff": first["bfp"]["max_abs_diff"],
        "reference_seconds": results["reference_seconds"],
        "fp32_seconds": results["fp32_seconds"], "bfp_seconds": results["bfp_seconds"],
    }
    if "top" in first:
        stats["fp32_top1"] = first["top"]["reference"]["top1"]
        stats["tvm_fp32_top1"] = first["top"]["tvm_fp32"]["top1"]
        stats["bfp_top1"] = first["top"]["bfp"]["top1"]
    stats["weight_bytes"] = weight_bytes(model, results["bfp_formats"])
    if "stored_weight_bytes" in results:
        stats["stored_weight_bytes"] = results["stored_weight_bytes"]
    if save_outputs:
        arrays = {f"{kind}/{name}": results[kind][i] for kind in ("reference", "fp32", "bfp")
                  for i, name in enumerate(output_names)}
        write_npz(save_outputs, arrays)
    return stats
