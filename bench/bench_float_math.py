"""Vectorisable float32 exp/sigmoid (``kernels/float_math.py``) against TVM's lowering
(``tirx.exp``/``tirx.sigmoid``: one scalar ``expf`` call per lane): accuracy and SiLU loop time.

Usage: python bench/bench_float_math.py accuracy
       TVM_NUM_THREADS=1 python bench/bench_float_math.py {tvm,float_math} [--repeat 50]
Time each contender in its own process.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm import te, tirx

from bitq_tvm.kernels import float_math
from bitq_tvm.pipeline import resolve_target

N = 1 << 20
SIGMOIDS = {"tvm": tirx.sigmoid, "float_math": float_math.sigmoid}


def _vectorised(fn, n, target):
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: fn(x[i]), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    outer, lanes = sch.split(loop, [None, 8])
    sch.parallel(outer)
    sch.vectorize(lanes)
    return tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=target)


def _run(lib, x):
    out = tvm.runtime.empty(x.shape, "float32")
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy()


def accuracy(target) -> None:
    bits = np.arange(0, 2**31, 211, dtype=np.uint32)
    x = np.concatenate([bits.view(np.float32), -bits.view(np.float32)])
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        x64 = x.astype(np.float64)
        exact_exp = np.exp(x64).astype(np.float32)
        exact_sigmoid = 1.0 / (1.0 + np.exp(-x64))
        formula = np.float32(1) / (np.float32(1) + np.exp(-x64).astype(np.float32))
    got_exp = _run(_vectorised(float_math.exp, x.size, target), x)
    finite = np.isfinite(exact_exp)
    ulp = np.abs(got_exp[finite].view(np.int32).astype(np.int64) - exact_exp[finite].view(np.int32).astype(np.int64))
    print(f"exp on every 211th float32 ({x.size} values): max {ulp.max()} ulp, mean {ulp.mean():.3f} ulp")
    got_sigmoid = _run(_vectorised(float_math.sigmoid, x.size, target), x)
    normal = ~np.isnan(x) & (x > -87)
    for name, value in (("float_math.sigmoid", got_sigmoid), ("1/(1+exp(-x)), correctly rounded exp", formula)):
        relative = np.abs(value[normal] - exact_sigmoid[normal]) / exact_sigmoid[normal]
        print(f"{name}: max relative error {relative.max() / 2.0**-24:.2f} * 2^-24 "
              f"(at x = {x[normal][relative.argmax()]:.4g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("accuracy", *SIGMOIDS))
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    target = resolve_target("host")[1]
    if args.mode == "accuracy":
        accuracy(target)
        return
    fn = SIGMOIDS[args.mode]
    lib = _vectorised(lambda v: v * fn(v), N, target)
    x = tvm.runtime.tensor(np.random.default_rng(0).normal(0, 4, N).astype(np.float32))
    out = tvm.runtime.empty((N,), "float32")
    lib["main"](x, out)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        lib["main"](x, out)
        best = min(best, time.perf_counter() - start)
    print(f"SiLU loop, {N} floats, {args.mode}: best of {args.repeat} {best * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
