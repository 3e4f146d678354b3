"""Static inner-loop density and qemu run time of the ARM/RISC-V BFP matmul kernels (markdown).

Usage: python bench/bench_bfp_matmul_emulated.py [--shape 128 512 1024] [--block 32]

qemu-user translates every guest instruction; its wall time says nothing reliable about a real
core (it has no model of issue width, latency or caches, and vector instructions cost what their
translation costs on the host). It is printed only as a sanity check that a kernel is not
pathological. The column that does carry over is static: in the innermost loop (the basic block
that holds the multiply instruction and branches to itself), useful int8 MACs per instruction,
counting 16 per ``sdot``, 32 per ``smmla``, 8 per ``smull`` and 16 per ``vwmul.vx`` (one 16-lane
column). Real speed also depends on each instruction's throughput on the core (the neoverse-n2
preset assumes smmla and sdot issue at the same rate, so smmla doubles the peak) and on memory:
measure on a board (``bitq-tvm tune --rpc ...``) before trusting any ranking.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm

from bitq_tvm.formats import BFPFormat
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_for_target
from bitq_tvm.kernels.oracle import quantize_activations_np
from bitq_tvm.kernels.packing import pack_weights
from bitq_tvm.targets import export, get_target, run_kernel_emulated

CASES = [
    ("cortex-a53", "neon"),
    ("cortex-a76", "sdot"),
    ("neoverse-n2", "sdot"),
    ("neoverse-n2", "i8mm"),
    ("rv64gcv-vlen128", "rvv"),
    ("rv64gcv-vlen256", "rvv"),
    ("rv64gc", "scalar"),
]
MACS_PER_INSTRUCTION = {"sdot": 16, "smmla": 32, "smull": 8, "vwmul.vx": 16}
KEY_INSTRUCTION = {"neon": "smull", "sdot": "sdot", "i8mm": "smmla", "rvv": "vwmul.vx"}


def hot_block_density(asm: str, key: str) -> tuple[int, float]:
    """(instructions, MACs per instruction) of the innermost loop that holds ``key``: the basic
    block that branches back to its own label (the K-quad loop), with the most ``key``."""
    loops, label, body = [], None, []
    for line in asm.splitlines():
        match = re.match(r"^([.$\w]+):", line)
        if match:
            label, body = match.group(1), []
        elif label is not None and line.startswith("\t") and not line.startswith("\t."):
            body.append(line.split()[0])
            if re.search(re.escape(label) + r"(?!\w)", line):  # the branch back closes the loop
                loops.append(body)
                label = None
    best = max(loops, key=lambda mnemonics: mnemonics.count(key))
    return len(best), best.count(key) * MACS_PER_INSTRUCTION[key] / len(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(128, 512, 1024), metavar=("M", "N", "K")
    )
    parser.add_argument("--block", type=int, default=32)
    args = parser.parse_args()
    M, N, K = args.shape
    fmt = BFPFormat(mantissa_bits=8, block_size=args.block)
    rng = np.random.default_rng(0)
    acts = quantize_activations_np(rng.standard_normal((M, K)).astype(np.float32), fmt)
    packed = pack_weights(rng.standard_normal((N, K)).astype(np.float32), fmt)
    inputs = [acts["qa"], acts["ea"], packed.qw, packed.ew]

    print(f"BFP8 B={args.block}, M={M} N={N} K={K}; qemu time is NOT hardware time\n")
    print("| target | variant | inner loop instrs | MACs/instr | qemu wall s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work_dir:
        for name, variant in CASES:
            preset = get_target(name)
            func, _ = bfp_matmul_for_target(M, N, K, fmt, fmt, preset.tvm_target(), variant)
            executable = tvm.compile(func, preset.tvm_target())
            key = KEY_INSTRUCTION.get(variant)
            if key is None:
                density = ("-", "-")
            else:
                count, macs = hot_block_density(executable.mod.inspect_source("asm"), key)
                density = (str(count), f"{macs:.1f}")
            library = export(executable, Path(work_dir) / f"{name}-{variant}.so", preset)
            start = time.perf_counter()
            run_kernel_emulated(library, "bfp_matmul", inputs, [((M, N), "float32")], preset)
            elapsed = time.perf_counter() - start
            print(f"| {name} | {variant} | {density[0]} | {density[1]} | {elapsed:.2f} |")


if __name__ == "__main__":
    main()
