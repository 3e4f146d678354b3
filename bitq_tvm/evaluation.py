"""Output comparison for ``bitq-tvm eval``: the ONNX Runtime reference and the metrics.

- :func:`onnxruntime_reference` runs the ORIGINAL model file in ONNX Runtime (intra-op spinning
  off: a spinning ORT pool starves TVM's threads on small machines), fed the same zero-padded
  batches as the TVM side.
- :func:`compare` gives, for one output, how close a model's output is to a reference: cosine
  similarity and relative L2 error (over all values), max abs difference, and the argmax agreement
  along the class (last) axis: per sample for ``[N, C]``, per position for ``[N, T, C]``
  (averaged over N and T). Trailing size-1 axes are ignored (``[N, C, 1, 1]`` is ``[N, C]``).
- :func:`top_k` scores an output against integer labels (``[N]`` for ``[N, C]``, ``[N, T]``
  for ``[N, T, C]``); top-5 only where there are at least 5 classes.
"""

from __future__ import annotations

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
        "rel_l2": float(np.linalg.norm(diff) / max(ref_norm, 1e-30)),
        "max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0,
    }
    ref_view, out_view = class_view(reference), class_view(output)
    if ref_view is not None:
        stats["argmax"] = argmax_kind(reference.shape)
        stats["argmax_agreement"] = float((ref_view.argmax(-1) == out_view.argmax(-1)).mean())
    return stats


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
    import os

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
