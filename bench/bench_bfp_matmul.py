"""Throughput of the integer BFP matmul kernels against FP32 baselines; prints a markdown table.

Usage: python bench/bench_bfp_matmul.py [--repeat 30] [--block 32]

BFP8 (m = 8 for activations and weights) with block size B; for each shape C[M, N] = A[M, K] @
W[N, K].T it times the three x86 kernel variants (``bitq_tvm.kernels.bfp_matmul_x86``), a TVM FP32
kernel with the same kind of simple hand schedule (4 x 32 register tile, weights pre-packed
[N/16, K, 16], parallel over tiles) and NumPy FP32 (OpenBLAS, its own threads). GOPS counts
2*M*N*K useful operations (unpadded N). Each time is the best of ``--repeat`` single calls: the
machine is shared, and a call that loses a core to another process can take 3x longer, so
medians swing from run to run while the minimum is the kernel's own speed. NumPy is timed
first, before TVM's thread pool exists. The peak row is a
register-only loop of 16 independent vpdpbusd chains per thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from bitq_tvm.formats import BFPFormat
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
from bitq_tvm.kernels.contract import LANES
from bitq_tvm.kernels.oracle import quantize_activations_np
from bitq_tvm.kernels.packing import pack_weights

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
AVX2_TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
# Tuned int8 VNNI matmul of docs/tvm-0.27-notes.md (256x1024x1024, MetaSchedule 32 trials)
NOTES_TUNED_INT8_GOPS = 426.0
SHAPES = [
    ("N=K=1024", 1, 1024, 1024),
    ("N=K=1024", 16, 1024, 1024),
    ("N=K=1024", 128, 1024, 1024),
    ("N=K=1024", 512, 1024, 1024),
    ("BERT-base FFN up (seq 128)", 128, 3072, 768),
    ("ResNet-50 fc (batch 1)", 1, 1000, 2048),
    ("ResNet-50 res4 1x1 conv (14x14)", 196, 1024, 256),
]
PEAK_ITERATIONS = 50_000
PEAK_CHAINS = 16


def _fp32_matmul_func(M: int, N: int, K: int) -> tvm.tirx.PrimFunc:
    """C[M, Np] = A @ W.T in float32, W packed [Np/16, K, 16]; 4 x 32 tile like the BFP kernel."""
    n_padded = -(-N // LANES) * LANES
    a = te.placeholder((M, K), "float32", name="a")
    w = te.placeholder((n_padded // LANES, K, LANES), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    c = te.compute(
        (M, n_padded),
        lambda i, j: te.sum(a[i, k] * w[j // LANES, k, j % LANES], axis=k),
        name="C",
    )
    sch = Schedule(te.create_prim_func([a, w, c]).with_attr("global_symbol", "fp32_matmul"))
    block = sch.get_sblock("C")
    write_back = sch.cache_write(block, 0, "global")
    i, j, kk = sch.get_loops(block)
    rows = next(r for r in (4, 2, 1) if M % r == 0)
    groups = 2 if (n_padded // LANES) % 2 == 0 else 1
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_group, j_lane = sch.split(j, [None, groups, LANES])
    sch.reorder(j_outer, i_outer, kk, i_inner, j_group, j_lane)
    task = sch.fuse(j_outer, i_outer)
    sch.parallel(task)
    sch.unroll(i_inner)
    sch.unroll(j_group)
    sch.vectorize(j_lane)
    sch.reverse_compute_at(write_back, task)
    sch.vectorize(sch.split(sch.get_loops(write_back)[-1], [None, LANES])[-1])
    init = sch.decompose_reduction(block, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def _peak_func():
    """16 independent vpdpbusd accumulator chains per thread, registers only."""

    @T.prim_func
    def peak(a: T.Buffer((64,), "int8"), out: T.Buffer((2, PEAK_CHAINS, 16), "int32")):
        T.func_attr({"global_symbol": "peak", "tirx.noalias": True})
        for t in T.parallel(2):
            acc = T.decl_buffer((PEAK_CHAINS, 16), "int32", scope="local")
            for r in T.unroll(PEAK_CHAINS):
                acc[r, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
            for _ in range(PEAK_ITERATIONS):
                for r in T.unroll(PEAK_CHAINS):
                    acc[r, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16",
                        "llvm.x86.avx512.vpdpbusd.512",
                        acc[r, T.ramp(0, 1, 16)],
                        T.reinterpret("int8x64", T.broadcast(T.int32(r + 1), 16)),
                        a[T.ramp(0, 1, 64)],
                    )
            for r in T.unroll(PEAK_CHAINS):
                out[t, r, T.ramp(0, 1, 16)] = acc[r, T.ramp(0, 1, 16)]

    return peak


def _best_seconds(executable, name, args, repeat):
    timer = executable.mod.time_evaluator(name, tvm.cpu(), number=1, repeat=repeat)
    return min(timer(*args).results)


def _bench_shape(M, N, K, fmt, repeat):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    dev = tvm.cpu()
    acts = quantize_activations_np(a, fmt)
    packed = pack_weights(w, fmt)
    arrays = (acts["qa"], acts["ea"], packed.qw, packed.ew)
    bfp_args = [tvm.runtime.tensor(x, dev) for x in arrays]
    bfp_args.append(tvm.runtime.tensor(np.zeros((M, N), np.float32), dev))
    seconds = {}
    for variant, target in (("vnni", TARGET), ("avx2", AVX2_TARGET), ("generic", TARGET)):
        executable = tvm.compile(bfp_matmul_func(M, N, K, fmt, fmt, variant), target=target)
        seconds[variant] = _best_seconds(executable, "bfp_matmul", bfp_args, repeat)

    n_padded = -(-N // LANES) * LANES
    w_padded = np.zeros((n_padded, K), np.float32)
    w_padded[:N] = w
    w_packed = w_padded.reshape(n_padded // LANES, LANES, K).transpose(0, 2, 1)
    arrays = (a, np.ascontiguousarray(w_packed), np.zeros((M, n_padded), np.float32))
    fp32_args = [tvm.runtime.tensor(x, dev) for x in arrays]
    executable = tvm.compile(_fp32_matmul_func(M, N, K), target=TARGET)
    seconds["tvm_fp32"] = _best_seconds(executable, "fp32_matmul", fp32_args, repeat)
    fp32_out = fp32_args[2].numpy()[:, :N]
    np.testing.assert_allclose(fp32_out, a @ w.T, rtol=1e-3, atol=1e-3 * np.sqrt(K))

    return seconds


def _numpy_seconds(M, N, K, repeat):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w_t = np.ascontiguousarray(rng.standard_normal((N, K)).astype(np.float32).T)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        np.matmul(a, w_t)
        best = min(best, time.perf_counter() - start)
    return best


def _peak_gops(repeat):
    dev = tvm.cpu()
    executable = tvm.compile(_peak_func(), target=TARGET)
    arrays = (np.ones(64, np.int8), np.zeros((2, PEAK_CHAINS, 16), np.int32))
    args = [tvm.runtime.tensor(x, dev) for x in arrays]
    seconds = _best_seconds(executable, "peak", args, max(3, repeat // 5))
    return 2 * 2 * PEAK_CHAINS * 64 * PEAK_ITERATIONS / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=30, help="timed single calls per kernel (best is kept)"
    )
    parser.add_argument("--block", type=int, default=32, help="BFP block size B")
    args = parser.parse_args(argv)
    fmt = BFPFormat(mantissa_bits=8, block_size=args.block)
    columns = ["vnni", "avx2", "generic", "tvm_fp32", "numpy_fp32"]

    given = sys.argv[1:] if argv is None else argv
    print(f"command: python bench/bench_bfp_matmul.py {' '.join(given)}".rstrip())
    print(f"format: {fmt.name} (activations and weights); load average at start: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"GOPS = 2*M*N*K / best of {args.repeat} calls; in parentheses: milliseconds\n")
    # Before any TVM kernel runs: TVM's pool threads keep spinning after a parallel call and
    # starve OpenBLAS's threads on 2 cores (measured 30x slowdowns when interleaved).
    numpy_seconds = {shape: _numpy_seconds(*shape[1:], args.repeat) for shape in SHAPES}
    print("| shape | M | N | K | " + " | ".join(columns) + " | vnni / 426 |")
    print("|---|---:|---:|---:|" + "---:|" * len(columns) + "---:|")
    for label, M, N, K in SHAPES:
        seconds = _bench_shape(M, N, K, fmt, args.repeat)
        seconds["numpy_fp32"] = numpy_seconds[(label, M, N, K)]
        ops = 2 * M * N * K
        cells = [f"{ops / seconds[c] / 1e9:.0f} ({seconds[c] * 1e3:.3f})" for c in columns]
        fraction = ops / seconds["vnni"] / 1e9 / NOTES_TUNED_INT8_GOPS
        row = f"| {label} | {M} | {N} | {K} | " + " | ".join(cells) + f" | {fraction:.2f} |"
        print(row, flush=True)
    peak = _peak_gops(args.repeat)
    print(f"\nvpdpbusd register-only peak (2 threads, {PEAK_CHAINS} chains each): {peak:.0f} GOPS")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
