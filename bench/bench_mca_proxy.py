"""ARM/RISC-V proxy table: llvm-mca cycle estimates of FP32 vs BFP8 vs BFP4 deployments per model.

Usage::

    python bench/bench_mca_proxy.py [--models resnet18,mobilenet_v2,pplcnet_orientation]
        [--targets cortex-a53,cortex-a55,cortex-a76,neoverse-n2,rv64gcv-vlen128,rv64gcv-vlen256,rv64gc]
        [--formats bfp8_b32,bfp4_b32] [--host-check]

Every number printed is an **llvm-mca estimate** (:mod:`bitq_tvm.solver.mca_cost`), not a
measurement: one core, all loads hitting L1 in the compute term, a DRAM roofline term of the
kernels' argument bytes. ``--host-check`` compiles the model for the ``avx512-vnni`` preset
(znver4), estimates it the same way, runs it on this machine under the Relax VM profiler and
prints the Spearman rank correlation of estimated vs measured per-kernel time (kernels with a MAC
loop, all formats pooled).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx

from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import corpus, zoo
from bitq_tvm.plan import Plan
from bitq_tvm.solver.mca_cost import estimate_model
from bitq_tvm.targets.presets import get_target

TARGETS = "cortex-a53,cortex-a55,cortex-a76,neoverse-n2,rv64gcv-vlen128,rv64gcv-vlen256,rv64gc"
GOAL_BFP8_RATIO = 0.4


def _model(name: str, workdir: str):
    if name in corpus.CORPUS:
        entry = corpus.get(name)
        return load_onnx(str(corpus.fetch(name)), entry.input_shapes(1))
    builders = {"resnet18": lambda: zoo.resnet18(image_size=224), "mobilenet_v2": lambda: zoo.mobilenet_v2(image_size=224)}
    if name not in builders:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(builders)}, {', '.join(corpus.CORPUS)}")
    path = os.path.join(workdir, f"{name}.onnx")
    onnx.save(builders[name](), path)
    return load_onnx(path)


def _kernel_times(vm, feed, repeat: int) -> dict[str, float]:
    """Kernel symbol -> median over ``repeat`` inferences of its summed wall time per inference (VM instrument)."""
    import tvm

    runs, start, current = [], {}, {}

    def instrument(func, symbol, before, ret, *args):
        now = time.perf_counter()
        if before:
            start[symbol] = now
        else:
            current[symbol] = current.get(symbol, 0.0) + now - start[symbol]
        return 0

    vm["main"](*feed)  # warm-up
    vm.set_instrument(tvm.runtime.convert(instrument))
    for _ in range(repeat):
        current.clear()
        vm["main"](*feed)
        runs.append(dict(current))
    return {name: float(np.median([r.get(name, 0.0) for r in runs])) for name in runs[0]}


def _host_check(model, formats, repeat: int = 20) -> None:
    """Spearman of znver4 estimates vs this machine's profiled per-kernel times."""
    import tvm
    from scipy.stats import spearmanr
    from tvm import relax

    from bitq_tvm.deploy import compile_deployed

    preset = get_target("avx512-vnni")
    est, meas = [], []
    for spec in (None, *formats):
        plan = Plan.uniform(spec) if spec else None
        estimate = estimate_model(model, plan, preset).by_name()
        deployed = compile_deployed(model, plan, preset, progress=None)
        vm = relax.VirtualMachine(deployed.executable, tvm.cpu())
        feed = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal(s).astype(np.float32))
                for s in model.input_shapes.values()]
        times = _kernel_times(vm, feed, repeat)
        for name, k in estimate.items():
            if k.compute_cycles is not None and name in times:
                est.append(k.total_cycles)
                meas.append(times[name])
    rho = spearmanr(est, meas).statistic
    print(f"\nhost check ({tvm.target.codegen.llvm_get_system_cpu()}, wall time per kernel through a VM instrument, "
          f"median of {repeat} runs, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}) "
          f"vs llvm-mca -mcpu=znver4 estimates: Spearman {rho:.3f} over {len(est)} kernels "
          f"(FP32 + {', '.join(formats)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--targets", default=TARGETS)
    parser.add_argument("--formats", default="bfp8_b32,bfp4_b32")
    parser.add_argument("--host-check", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    print(f"command: python bench/bench_mca_proxy.py {' '.join(argv)}".rstrip())
    print("all cycles are llvm-mca estimates (model, not measurement): Mcycles per inference, one core\n")
    head = ["model", "target (mcpu)", "FP32"] + [f"{f}" for f in formats] + [f"{f}/FP32" for f in formats] \
        + [f"{f} mem" for f in ["FP32", *formats]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            model = _model(name, workdir)
            for target in args.targets.split(","):
                preset = get_target(target)
                runs = [estimate_model(model, Plan.uniform(f) if f else None, preset) for f in (None, *formats)]
                fp32 = runs[0].total_cycles
                row = [name, f"{target} ({runs[0].mcpu})", f"{fp32 / 1e6:.1f}"]
                row += [f"{r.total_cycles / 1e6:.1f}" for r in runs[1:]]
                row += [f"{r.total_cycles / fp32:.2f}" for r in runs[1:]]
                row += [f"{r.memory_cycles / 1e6:.2f}" for r in runs]
                print("| " + " | ".join(row) + " |", flush=True)
            if args.host_check:
                _host_check(model, formats)
    print(f"\ngoal: BFP8 <= {GOAL_BFP8_RATIO}x FP32 (the bfp8 column's ratio); 'mem' = the DRAM roofline term alone")


if __name__ == "__main__":
    main()
