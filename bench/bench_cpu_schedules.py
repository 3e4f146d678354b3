"""Latency of ONNX models on this CPU: unscheduled TVM vs bitq_tvm's default schedules vs ONNX Runtime.

All three run in the same process, interleaved round by round so that load from other processes
hits them alike; the table shows the median over rounds (batch 1, FP32).

    python bench/bench_cpu_schedules.py [--models resnet18,mobilenet_v2,transformer_encoder]
                                        [--rounds 5] [--threads N] [--skip-unscheduled]
"""

import argparse
import os
import shlex
import sys
import time

import numpy as np
import onnxruntime as ort
import tvm
import tvm.relax.frontend.onnx  # noqa: F401  (registers relax.frontend.onnx)
from tvm import relax

from bitq_tvm.models import zoo
from bitq_tvm.kernels.cpu import cpu_pipeline


def _compile(model, feeds, target, pipeline):
    mod = relax.frontend.onnx.from_onnx(model, shape_dict={name: value.shape for name, value in feeds.items()})
    start = time.perf_counter()
    executable = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    compile_seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(value) for value in feeds.values()]

    def run():
        out = vm["main"](*args)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    return run, compile_seconds


def _time_once(run, calls):
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def bench_model(name, target, rounds, threads, skip_unscheduled):
    model = getattr(zoo, name)()
    feeds = zoo.synthetic_inputs(model, 1, 0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # ORT's workers otherwise spin after each run and steal the cores from the TVM rounds.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runners = {"onnxruntime": (lambda: session.run(None, feeds)[0], 0.0)}
    runners["tvm+bitq schedules"] = _compile(model, feeds, target, cpu_pipeline(target))
    if not skip_unscheduled:
        runners["tvm unscheduled"] = _compile(model, feeds, target, relax.get_default_pipeline(target))

    reference = runners["onnxruntime"][0]()
    errors = {label: float(np.abs(run() - reference).max()) for label, (run, _) in runners.items()}
    # Calls per round: about 0.2 s of work each, and at least one call.
    calls = {label: max(1, int(0.2 / _time_once(run, 1))) for label, (run, _) in runners.items()}
    samples = {label: [] for label in runners}
    for _ in range(rounds):
        for label, (run, _) in runners.items():
            samples[label].append(_time_once(run, calls[label]))
    return {
        label: (float(np.median(samples[label])) * 1e3, runners[label][1], errors[label]) for label in runners
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="resnet18,mobilenet_v2,transformer_encoder", help="comma-separated bitq_tvm.models.zoo builders"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-unscheduled", action="store_true", help="unscheduled TVM takes seconds per run")
    args = parser.parse_args(argv)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    # TVM's thread pool and ORT get the same core count.
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    print(f"target: {target}, threads: {args.threads}, batch 1, FP32, median of {args.rounds} interleaved rounds")
    print(f"{'model':22s} {'runner':20s} {'latency ms':>11s} {'vs ORT':>7s} {'compile s':>10s} {'max |err|':>10s}")
    for name in args.models.split(","):
        results = bench_model(name, target, args.rounds, args.threads, args.skip_unscheduled)
        ort_ms = results["onnxruntime"][0]
        for label, (latency_ms, compile_s, error) in results.items():
            print(
                f"{name:22s} {label:20s} {latency_ms:11.2f} {latency_ms / ort_ms:6.1f}x "
                f"{compile_s:10.1f} {error:10.2e}"
            )
        if "tvm unscheduled" in results:
            speedup = results["tvm unscheduled"][0] / results["tvm+bitq schedules"][0]
            print(f"{name:22s} schedules vs unscheduled: {speedup:.1f}x faster")


if __name__ == "__main__":
    main()
