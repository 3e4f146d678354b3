"""Tuned vs default (hand) schedule of the integer BFP matmul, and tuning time per task.

    python bench/bench_tuning.py --trials 16 --shapes 128x1024x1024 256x1024x1024

A second table checks the latency model on real timings: every distinct BFP GEMM of ResNet-18
(32x32 input) x the candidate formats is timed with its default kernel; half the tasks are given
to :func:`~bitq_tvm.tuning.latency.latency_table` as "measured" (half the shapes, or a random half
of the tasks), and its regressor's predictions for the rest, and the analytic DM model, are compared
with their timings.

Each shape is tuned with MetaSchedule (XGBoost cost model, our kernel's search space) into a fresh
work dir, its best record is verified against the NumPy reference, and then the tuned and the
hand-scheduled (``bfp_matmul_func``) kernels are timed the same way, in this process, one after
the other (the machine is shared and noisy: compare the ratio, not the absolute times).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import tvm

from bitq_tvm.formats import parse_format
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func, kernel_variant
from bitq_tvm.support.tables import print_table
from bitq_tvm.targets import host_preset
from bitq_tvm.tuning.session import TuningOptions, tune
from bitq_tvm.tuning.tasks import BfpTask
from bitq_tvm.tuning.verify import KERNEL_INPUTS, random_bfp_inputs, schedule_from_record, verify_tasks

REPEATS = 20


def _time(executable, symbol: str, task: BfpTask) -> float:
    """Median seconds of one call (time_evaluator, 20 repeats of >= 50 ms)."""
    data = random_bfp_inputs(task)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(data[n], dev) for n in KERNEL_INPUTS]
    args.append(tvm.runtime.tensor(np.zeros((task.m, task.n), np.float32), dev))
    timer = executable.mod.time_evaluator(symbol, dev, number=1, repeat=REPEATS, min_repeat_ms=50)
    return float(np.median(timer(*args).results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16, help="trials per shape (default 16)")
    parser.add_argument("--shapes", nargs="*", default=["128x1024x1024", "256x1024x1024"], metavar="MxNxK")
    parser.add_argument("--format", default="bfp8_b32")
    parser.add_argument("--latency-candidates", default="w=4,8;a=8;b=16,32,64", metavar="SET",
                        help="candidate set of the latency-model check ('' skips it)")
    args = parser.parse_args(argv)

    preset = host_preset()
    target = preset.tvm_target()
    fmt = parse_format(args.format)
    rows = []
    for shape in args.shapes:
        m, n, k = (int(v) for v in shape.split("x"))
        task = BfpTask(m, n, k, fmt, fmt, kernel_variant(preset.tvm_target()))
        work = tempfile.mkdtemp(prefix="bitq_bench_tune_")
        started = time.perf_counter()
        summary = tune([task], preset, work, args.trials, TuningOptions(min_trials_per_task=args.trials))
        tuning_s = time.perf_counter() - started
        trusted, verdicts = verify_tasks(work, [task], preset)[task.name]
        rejected = sum(not v.ok for v in verdicts)
        default = tvm.compile(bfp_matmul_func(m, n, k, fmt, fmt, task.variant), target=target)
        default_s = _time(default, "bfp_matmul", task)
        if trusted is None:
            tuned_s = float("nan")
        else:
            tuned = tvm.compile(schedule_from_record(task, trusted).mod, target=target)
            tuned_s = _time(tuned, task.name, task)
        result = summary.results[0]
        gops = 2 * m * n * k / 1e9
        rows.append((f"{m}x{n}x{k}", args.format, result.trials, result.failed, rejected, f"{tuning_s:.0f}",
                     f"{default_s * 1e3:.3f} ({gops / default_s:.0f})", f"{tuned_s * 1e3:.3f} ({gops / tuned_s:.0f})",
                     f"{default_s / tuned_s:.2f}x"))
    print(f"\ncommand: python bench/bench_tuning.py --trials {args.trials} --shapes {' '.join(args.shapes)} "
          f"--format {args.format} --latency-candidates '{args.latency_candidates}'")
    print(f"target: {preset.name} ({dict(preset.llvm_target)}); times: median of {REPEATS} time_evaluator "
          "repeats, ms (GOPS)\n")
    headers = ["M x N x K", "format", "trials", "failed", "rejected by verify", "tuning s",
               "default (hand) ms", "tuned ms", "speedup"]
    print_table(headers, rows)
    if args.latency_candidates:
        latency_check(args.latency_candidates, preset)
    return 0


def latency_check(candidate_set: str, preset) -> None:
    """Regressor (fitted on part of the tasks) and DM model vs timings of ResNet-18's BFP GEMMs."""
    from scipy.stats import spearmanr

    from bitq_tvm.frontend.onnx_model import normalize
    from bitq_tvm.models import zoo
    from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
    from bitq_tvm.solver.performance import performance_term
    from bitq_tvm.tuning.latency import latency_table
    from bitq_tvm.tuning.tasks import extract_bfp_tasks

    model = normalize(zoo.resnet18(image_size=32), "resnet18_32")
    candidates = LayerCandidates(CandidateSet.parse(candidate_set)).resolve([l.name for l in model.layers])
    tasks = extract_bfp_tasks(model, candidates, preset)
    timed = {}
    for task in tasks:
        kernel = tvm.compile(bfp_matmul_func(task.m, task.n, task.k, task.fmt_a, task.fmt_w, task.variant),
                             target=preset.tvm_target())
        timed[task.name] = _time(kernel, "bfp_matmul", task)
    dm = performance_term(model, preset, candidates).model_costs
    dm_per_task = {t.name: dm[t.users[0][0]][t.users[0][1]].total / model.layer(t.users[0][0]).groups
                   for t in tasks}  # per call, like the timings
    shapes = sorted({(t.m, t.n, t.k) for t in tasks})
    splits = {
        # formats of one shape run at nearly one speed (int8 storage): holding out whole shapes
        # is the hard case; a random half mixes both
        "half the shapes held out": {t.name for t in tasks if (t.m, t.n, t.k) in set(shapes[::2])},
        "random half of the tasks held out": set(np.random.default_rng(0).permutation(sorted(timed))[::2]),
    }
    print(f"\nlatency model on ResNet-18 (32x32), candidates {candidate_set!r}: {len(tasks)} BFP GEMM tasks "
          f"({len(shapes)} shapes) timed with the default kernel; per split, the regressor is fitted on the "
          "given tasks and checked on the held-out ones\n")
    split_rows = []
    for split, given_names in splits.items():
        table = latency_table(model, candidates, preset, {n: timed[n] for n in given_names})
        by_task = {e.task: e.seconds / model.layer(layer).groups for (layer, _), e in table.entries.items()}
        held_out = sorted(set(timed) - given_names)
        predicted = np.array([by_task[n] for n in held_out])
        truth = np.array([timed[n] for n in held_out])
        dm_cost = np.array([dm_per_task[n] for n in held_out])
        scale = float(dm_cost @ truth / (dm_cost @ dm_cost))
        split_rows.append((split, f"{len(given_names)} / {len(held_out)}", f"{spearmanr(predicted, truth).statistic:.3f}",
                           f"{np.median(np.abs(predicted / truth - 1)) * 100:.1f}%",
                           f"{spearmanr(dm_cost, truth).statistic:.3f}",
                           f"{np.median(np.abs(dm_cost * scale / truth - 1)) * 100:.1f}%"))
    print_table(["split", "fitted / held out", "regressor Spearman", "regressor median rel. error",
                 "DM model Spearman", "DM median rel. error"], split_rows)
    print("\nlatency_table's own report, all tasks measured (cross-validated by shape):\n")
    print(latency_table(model, candidates, preset, timed, model_costs=dm).report.markdown())

if __name__ == "__main__":
    sys.exit(main())
