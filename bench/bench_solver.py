"""Time the BitQ optimiser core: the DM model over a network's candidates and the allocation MILP.

Prints markdown tables and the command that produced them:

    python bench/bench_solver.py --layers 200 --candidates 50 --seed 0
"""

import argparse
import shlex
import sys
import time

import numpy as np

from bitq_tvm.solver.dm_model import CacheLevel, ConvShape, MemoryHierarchy, layer_costs
from bitq_tvm.solver.milp import pareto_front, solve
from bitq_tvm.solver.problem import AllocationProblem

HIERARCHY = MemoryHierarchy((CacheLevel("L1", 64 * 1024), CacheLevel("L2", 512 * 1024),
                             CacheLevel("L3", 2 * 1024 * 1024)))


def _candidates(count):
    """(label, mantissa bits, block size, exponent bits), most to least precise."""
    specs = [(m, b, e) for e in (8, 5) for m in range(8, 1, -1) for b in (8, 16, 32, 64)]
    return [(f"bfp{m}_b{b}_e{e}", m, b, e) for m, b, e in specs[:count]]


def _resnet_like_shapes(count, rng):
    shapes = []
    for _ in range(count):
        channels = int(rng.choice([64, 128, 256, 512]))
        size = {64: 56, 128: 28, 256: 14, 512: 7}[channels]
        kernel = int(rng.choice([1, 3]))
        shapes.append(ConvShape(1, channels * int(rng.choice([1, 4])) if kernel == 1 else channels,
                                channels, kernel, kernel, size, size))
    return shapes


def _timed(function, repeats):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def _dm_problem(layers, candidates, rng, repeats):
    """Perf from the DM model; accuracy loss = sensitivity x BFP noise power ~ 4^-m (1 + 8/B)."""
    specs = _candidates(candidates)
    bits = np.array([m + e / b for _, m, b, e in specs])
    blocks = [b for _, _, b, _ in specs]
    shapes = _resnet_like_shapes(layers, rng)

    def model_all():
        return [[c.total for c in layer_costs(s, bits, bits, blocks, HIERARCHY)] for s in shapes]

    cold_seconds, _ = _timed(model_all, 1)  # first call also builds each shape's tile grids
    seconds, perf = _timed(model_all, repeats)
    noise = np.array([4.0 ** -m * (1 + 8 / b) * (1 + 4 * (e < 8)) for _, m, b, e in specs])
    acc = [rng.lognormal(-2, 1) * noise * rng.uniform(0.9, 1.1, len(specs)) for _ in shapes]
    size = [bits / 8 * s.out_channels * s.in_channels * s.kernel_h * s.kernel_w for s in shapes]
    labels = [label for label, *_ in specs]
    problem = AllocationProblem([f"layer{i}" for i in range(layers)], [labels] * layers, acc,
                                perf, size)
    return problem, cold_seconds, seconds


def _uniform_random_problem(layers, candidates, rng):
    labels = [f"c{q}" for q in range(candidates)]
    return AllocationProblem([f"layer{i}" for i in range(layers)], [labels] * layers,
                             rng.uniform(0, 1e-3, (layers, candidates)),
                             rng.uniform(1e3, 1e6, (layers, candidates)),
                             rng.uniform(1e3, 1e5, (layers, candidates)))


def _objectives(problem):
    """Budgets halfway between the cheapest and the all-best-accuracy allocation."""
    most_accurate = solve(problem, lam=0.0)
    lo_acc, lo_perf = problem.smallest_total("acc_loss"), problem.smallest_total("perf")
    lo_size = problem.smallest_total("size_bytes")
    return [
        ("weighted, lam=0.2", dict(lam=0.2)),
        ("min perf s.t. acc budget", dict(acc_budget=2 * lo_acc)),
        ("min acc s.t. perf budget", dict(perf_budget=(lo_perf + most_accurate.perf) / 2)),
        ("min acc s.t. size budget", dict(size_budget=(lo_size + most_accurate.size_bytes) / 2)),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--pareto-points", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    command = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    print("$ python " + " ".join(shlex.quote(a) for a in command))
    print()
    dm_problem, cold, warm = _dm_problem(args.layers, args.candidates, rng, args.repeats)
    print(f"DM model, {args.layers} layers x {args.candidates} candidates, "
          f"{len(HIERARCHY.levels)} cache levels: {cold:.3f} s first call, {warm:.3f} s after "
          f"(best of {args.repeats})")
    print()
    print("| problem | objective | time (s) | sum acc_loss | sum perf |")
    print("|---|---|---:|---:|---:|")
    for name, problem in (("DM-model perf", dm_problem),
                          ("uniform random", _uniform_random_problem(args.layers,
                                                                     args.candidates, rng))):
        for objective, kwargs in _objectives(problem):
            seconds, got = _timed(lambda: solve(problem, **kwargs), args.repeats)
            print(f"| {name} | {objective} | {seconds:.3f} | {got.acc_loss:.4g} | "
                  f"{got.perf:.4g} |")
        seconds, front = _timed(lambda: pareto_front(problem, n_lambdas=args.pareto_points),
                                args.repeats)
        print(f"| {name} | Pareto sweep, {args.pareto_points} lambdas -> {len(front)} points "
              f"| {seconds:.3f} | {front[0].acc_loss:.4g}..{front[-1].acc_loss:.4g} | "
              f"{front[-1].perf:.4g}..{front[0].perf:.4g} |")


if __name__ == "__main__":
    main()
