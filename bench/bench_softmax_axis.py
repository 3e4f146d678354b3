"""Softmax under the default CPU pipeline: time and max error against NumPy.

Usage: TVM_NUM_THREADS=2 python bench/bench_softmax_axis.py [axis] [--shape 1,16,4,2100]
The default is YOLOv8n's box head: softmax over its 16 distance bins (axis 1).
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm
from tvm import relax

from bitq_tvm.kernels.cpu import cpu_pipeline
from bitq_tvm.pipeline import resolve_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("axis", nargs="?", type=int, default=1)
    parser.add_argument("--shape", default="1,16,4,2100")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.softmax(x, axis=args.axis))
        bb.emit_func_output(y)
    target = resolve_target("host")[1]
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xa = tvm.runtime.tensor(a)
    ref = np.exp(a - a.max(axis=args.axis, keepdims=True))
    ref /= ref.sum(axis=args.axis, keepdims=True)
    err = np.abs(vm["main"](xa).numpy() - ref).max()
    best = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=args.repeat)(xa).min
    print(f"softmax {args.shape} axis {args.axis}: {best * 1e3:.3f} ms, max error {err:.2e}")


if __name__ == "__main__":
    main()
