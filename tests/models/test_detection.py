"""Detection decoding (YOLOv8, PicoDet GFL), NMS and the agreement metric, on outputs built by hand;
and the FP32 detectors on the inputs made for them (real photographs, rendered pages) find what is there."""

import numpy as np
import onnxruntime as ort
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.models import corpus
from bitq_tvm.models.detection import (Detections, box_iou, decode, decode_picodet, decode_yolov8,
                                       detection_agreement, nms)
from bitq_tvm.models.detection_data import detector_samples, layout_page_samples, photo_samples


def test_box_iou_values():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.6, 0.9, 0.5, 0.3])
    # box 1 suppresses 0 (IoU 0.82) and 3; box 2 overlaps nothing
    assert nms(boxes, scores, 0.45).tolist() == [1, 2]
    assert nms(boxes, scores, 0.96).tolist() == [1, 0, 2, 3]  # box 3 vs 0: IoU 100/105


def _yolo_output(rows, classes=3, anchors=6):
    """[1, 4 + classes, anchors] with ``rows`` = [(anchor, cx, cy, w, h, class, score)], other scores 0.01."""
    out = np.full((1, 4 + classes, anchors), 0.01, np.float32)
    out[0, :4] = 1.0
    for anchor, cx, cy, w, h, klass, score in rows:
        out[0, :4, anchor] = (cx, cy, w, h)
        out[0, 4 + klass, anchor] = score
    return out


def test_decode_yolov8_thresholds_converts_and_suppresses_across_classes():
    out = _yolo_output([(0, 50, 50, 20, 10, 2, 0.9),    # kept
                        (1, 51, 50, 20, 10, 1, 0.8),    # same place, other class: suppressed (class-agnostic NMS)
                        (2, 200, 100, 40, 40, 0, 0.3),  # kept
                        (3, 10, 10, 4, 4, 1, 0.2)])     # below 0.25
    (det,) = decode_yolov8(out)
    np.testing.assert_allclose(det.boxes, [[40, 45, 60, 55], [180, 80, 220, 120]])
    np.testing.assert_allclose(det.scores, [0.9, 0.3], rtol=1e-6)
    assert det.classes.tolist() == [2, 0]
    with pytest.raises(BitqError, match="expected an output"):
        decode_yolov8(out[0])


def test_decode_picodet_gfl_distances_from_anchor_centres():
    hw, strides, classes, bins = (16, 8), (8, 16), 2, 8
    rows0, rows1 = 2 * 1, 1 * 1  # ceil(16/8) x ceil(8/8), ceil(16/16) x ceil(8/16)
    scores = [np.zeros((1, rows0, classes), np.float32), np.zeros((1, rows1, classes), np.float32)]
    dists = [np.zeros((1, rows0, 4 * bins), np.float32), np.zeros((1, rows1, 4 * bins), np.float32)]
    # anchor 1 of stride 8 (centre x 4, y 12), class 1; sides l, t, r, b peaked at bins 1, 2, 3, 0
    scores[0][0, 1, 1] = 0.8
    logits = np.full((4, bins), -50.0, np.float32)
    logits[[0, 1, 2, 3], [1, 2, 3, 0]] = 50.0
    dists[0][0, 1] = logits.ravel()
    # anchor 0 (centre 4, 4) with sides 1, 1, 3, 1 bins is the same box: weaker, suppressed in its class
    scores[0][0, 0, 1] = 0.6
    same = np.full((4, bins), -50.0, np.float32)
    same[[0, 1, 2, 3], [1, 1, 3, 1]] = 50.0
    dists[0][0, 0] = same.ravel()
    # the stride-16 anchor (centre 8, 8), class 0, sides 0, 0, 1, 1 bins: kept (another class)
    scores[1][0, 0, 0] = 0.7
    other = np.full((4, bins), -50.0, np.float32)
    other[[0, 1, 2, 3], [0, 0, 1, 1]] = 50.0
    dists[1][0, 0] = other.ravel()
    (det,) = decode_picodet(scores + dists, hw, strides=strides, score_threshold=0.5)
    np.testing.assert_allclose(det.boxes[0], [4 - 8, 12 - 16, 4 + 24, 12 + 0], atol=1e-4)
    np.testing.assert_allclose(det.boxes[1], [8, 8, 8 + 16, 8 + 16], atol=1e-4)
    assert det.classes.tolist() == [1, 0]
    np.testing.assert_allclose(det.scores, [0.8, 0.7], rtol=1e-6)
    with pytest.raises(BitqError, match="do not match"):
        decode_picodet(scores + dists, (32, 8), strides=strides)
    with pytest.raises(BitqError, match="expected 4 outputs"):
        decode_picodet(scores, hw, strides=strides)


def _dets(boxes, scores, classes):
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int64))


def test_agreement_matches_by_class_and_iou():
    ref = [_dets([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1]), _dets([], [], [])]
    assert detection_agreement(ref, ref)["f1"] == 1.0
    moved = [_dets([[1, 0, 11, 10], [20, 20, 30, 30]], [0.85, 0.6], [0, 2]), _dets([[0, 0, 5, 5]], [0.5], [0])]
    a = detection_agreement(ref, moved)
    # box 0 matches (IoU 9/11), box 1 has another class, the second image's box is extra
    assert (a["reference"], a["candidate"], a["matched"]) == (2, 3, 1)
    assert a["recall"] == 0.5 and a["precision"] == pytest.approx(1 / 3) and a["f1"] == pytest.approx(0.4)
    assert a["mean_iou"] == pytest.approx(9 / 11) and a["score_drift"] == pytest.approx(0.05, abs=1e-6)
    empty = [_dets([], [], [])] * 2
    assert detection_agreement(empty, empty)["f1"] == 1.0
    assert detection_agreement(ref, empty)["recall"] == 0.0
    with pytest.raises(BitqError, match="reference images"):
        detection_agreement(ref, ref[:1])


def test_inputs_are_deterministic_and_shaped():
    a, b = photo_samples(3, seed=4), photo_samples(3, seed=4)
    assert a.shape == (3, 3, 320, 320) and a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0 and not np.array_equal(a, photo_samples(3, seed=5))
    pages = layout_page_samples(2, seed=0)
    assert pages.shape == (2, 3, 800, 608) and np.isfinite(pages).all()
    with pytest.raises(BitqError, match="no detector inputs"):
        detector_samples("pplcnet_orientation", 2)
    with pytest.raises(BitqError, match="n must be >= 1"):
        photo_samples(0)


def _fp32_detections(name, x):
    entry = corpus.get(name)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(corpus.fetch(name)), options, providers=["CPUExecutionProvider"])
    return [d for i in range(len(x)) for d in decode(entry.detector, session.run(None, {entry.input_name: x[i:i + 1]}),
                                                      x.shape[2:])]


def test_yolov8n_finds_the_faces_in_the_photographs():
    detections = _fp32_detections("yolov8n_nudenet", photo_samples(8, seed=0))
    face_female, face_male = 1, 12  # nudenet's label order
    # even inputs are crops of the astronaut portrait, odd ones of the cameraman
    assert sum(face_female in d.classes for d in detections[0::2]) >= 3
    assert sum(face_male in d.classes or face_female in d.classes for d in detections[1::2]) >= 2


def test_layout_detector_finds_text_titles_tables_and_figures():
    detections = _fp32_detections("picodet_layout", layout_page_samples(4, seed=0))
    found = set(np.concatenate([d.classes for d in detections]).tolist())
    # CDLA's label order (the model's metadata): text, title, figure, figure_caption, table, ...
    assert {0, 1, 2, 4} <= found, found
    assert all(len(d) >= 3 for d in detections)


def test_fetch_images_replaces_a_corrupt_copy(tmp_path):
    import shutil

    for name, path in corpus.fetch_images().items():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "camera.png").write_bytes(b"not a png")
    paths = corpus.fetch_images(cache_dir=tmp_path)
    assert paths["camera"] == tmp_path / "camera.png"
    assert corpus._sha256(paths["camera"]) == corpus.IMAGES["camera"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut.png", "camera.png", "page.png"]  # no temp left
    with pytest.raises(BitqError, match="no corpus image 'lena'"):
        corpus.image_path("lena")
