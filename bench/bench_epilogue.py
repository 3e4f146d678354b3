"""What a fused epilogue costs on top of its integer BFP GEMM: MobileNetV2's pointwise convs.

Usage::

    TVM_NUM_THREADS=2 python bench/bench_epilogue.py [--repeat 30] [--format bfp8_b32]

For each shape (M x N x K of a MobileNetV2 1x1 conv at 224x224, batch 1) and next-layer block B'
(1: the input of a depthwise conv, one exponent per value; 32: the input of a pointwise conv):

- ``GEMM``: :func:`bitq_tvm.kernels.bfp_matmul_variants.bfp_matmul_func` with no epilogue
  (float32 out, what the unfused deployment writes);
- ``+ epilogue``: bias, ReLU6 and the quantization to B' fused (int8 mantissas + exponents out).

Both are one TVM kernel on the same threads in one process, alternating call by call (median of
``--repeat`` rounds of ``time_evaluator``); ratios are from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import tvm

from bitq_tvm.formats import get_format
from bitq_tvm.kernels.bfp_matmul import Epilogue
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func, kernel_variant
from bitq_tvm.targets import host_preset

# (M, N, K) of MobileNetV2's pointwise convs at 224x224 that feed a depthwise conv (expansions)
# and projections that feed a pointwise conv, K padded to the block. N = 16, 24, 144 are ragged at
# B' = 32 (the last output block zero-padded): 12544x16x32 and 3136x24x160 are the fused kernels
# MobileNetV2 spends the most epilogue time in.
SHAPES = ((12544, 96, 32), (3136, 144, 32), (784, 192, 32), (196, 384, 64), (12544, 16, 32), (3136, 24, 160))


def _args(func, dev, rng):
    out = []
    for param in func.params:  # TVM 0.27: a PrimFunc's params are its buffers
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        value = rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(0, 4, shape)
        out.append(tvm.runtime.tensor(value.astype(dtype), dev))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--format", default="bfp8_b32")
    args = parser.parse_args(argv)
    fmt = get_format(args.format)
    target = host_preset().tvm_target()
    variant = kernel_variant(target)
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    print(f"command: TVM_NUM_THREADS=2 python bench/bench_epilogue.py --repeat {args.repeat} --format {args.format}")
    print(f"target: {target}, variant {variant}; ms = median of {args.repeat} rounds, alternating\n")
    print("| M x N x K | next block B' | GEMM ms | + epilogue ms | epilogue / GEMM |")
    print("|---|---|---|---|---|")
    for m, n, k in SHAPES:
        for out_block in (1, fmt.block_size):
            epilogue = Epilogue.clipped(dataclasses.replace(fmt, block_size=out_block), bias=True, low=0.0, high=6.0)
            timers = []
            for epi in (None, epilogue):
                func = bfp_matmul_func(m, n, k, fmt, fmt, variant, epilogue=epi)
                lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
                call = lib.mod.time_evaluator("main", dev, number=10, repeat=1, min_repeat_ms=10)
                timers.append((call, _args(func, dev, rng)))
            samples = [[], []]
            for _ in range(args.repeat):
                for i, (call, call_args) in enumerate(timers):
                    samples[i].append(call(*call_args).mean * 1e3)
            plain, fused = (float(np.median(s)) for s in samples)
            print(f"| {m}x{n}x{k} | {out_block} | {plain:.4f} | {fused:.4f} | {fused / plain:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
