"""Integer BFP matmul kernels (VNNI, AVX2, generic) against the NumPy references.

Tolerance (derived in ``bfp_matmul_tolerance``): each block term is an exact int32 sum times an
exact power of two, correctly rounded once to float32 exactly like the reference, so only the
float32 sum over the nb blocks rounds: ``|C - exact| <= nb * eps32 * sum_b |term_b|``. The
simulation ``fake_quant(A) @ fake_quant(W).T`` is evaluated in float64 (float32 products of
dequantized values are exact, and a float32 BLAS sum would add its own K-term rounding); its own
error, at most ``K * eps64 * sum_k |a_k w_k|``, is added to the bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.target.codegen import llvm_get_system_cpu

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat, fake_quantize_np, quantize_np
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
from bitq_tvm.kernels.oracle import bfp_matmul_ref, bfp_matmul_tolerance, quantize_activations_np
from bitq_tvm.kernels.packing import PackedWeights, pack_weights

# vnni needs avx512vnni (Zen 4/5, Ice Lake and later): run only where the host has it; avx2 is
# compiled for a CPU without AVX-512 to show it needs none; generic is compiled for the host.
TARGETS = {
    "vnni": tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}),
    "avx2": tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}),
    "generic": tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()}),
}
# Variants that are executed: vnni only on a host with VNNI.
RUN_VARIANTS = [pytest.param("vnni", marks=pytest.mark.host_cpu("avx512vnni", "avx512bw")), "avx2", "generic"]
MANTISSA_BITS = (2, 4, 6, 8)
BLOCK_SIZES = (8, 16, 32, 64, 128)
ROWS = (1, 7, 64)
FLOAT64_EPS = float(np.finfo(np.float64).eps)


def _compile(M, N, K, fmt_a, fmt_w, variant):
    return tvm.compile(bfp_matmul_func(M, N, K, fmt_a, fmt_w, variant), target=TARGETS[variant])


def _run(executable, qa, ea, packed, M, N):
    dev = tvm.cpu()
    arrays = (qa, ea, packed.qw, packed.ew)
    inputs = [tvm.runtime.tensor(x, dev) for x in arrays]
    out = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32), dev)
    executable.mod["bfp_matmul"](*inputs, out)
    return out.numpy()


def _unpacked(w, fmt):
    t = quantize_np(w, fmt, axis=-1)
    n = w.shape[0]
    return t.mantissas.reshape(n, -1), t.exponents.reshape(n, -1)


def _data(rng, M, N, K, block):
    """Activations with a wide per-row range and zero blocks (ReLU-like); weights with zero rows."""
    row_scales = np.exp2(rng.integers(-20, 20, (M, 1))).astype(np.float32)
    a = rng.standard_normal((M, K)).astype(np.float32) * row_scales
    a[:, rng.integers(0, K) // block * block :][:, :block] = 0.0
    w = rng.standard_normal((N, K)).astype(np.float32) * np.exp2(rng.integers(-12, 4, (N, 1)))
    w = w.astype(np.float32)
    w[rng.integers(0, N)] = 0.0
    return a, w


@pytest.mark.parametrize("variant", RUN_VARIANTS)
@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_matches_references_within_summation_bound(variant, block):
    rng = np.random.default_rng(block)
    for index, m in enumerate(MANTISSA_BITS):
        M = ROWS[(index + block) % len(ROWS)]
        N = 40 + 8 * index  # never a multiple of 32, sometimes not of 16
        K = 3 * block + 4 * index + 1  # ragged: the last block is zero-padded
        fmt_a = BFPFormat(mantissa_bits=m, block_size=block)
        fmt_w = BFPFormat(mantissa_bits=MANTISSA_BITS[-1 - index], block_size=block)
        a, w = _data(rng, M, N, K, block)
        acts = quantize_activations_np(a, fmt_a)
        packed = pack_weights(w, fmt_w)
        qw, ew = _unpacked(w, fmt_w)
        args = (acts["qa"], acts["ea"], qw, ew, block, fmt_a.mantissa_bits, fmt_w.mantissa_bits)

        got = _run(_compile(M, N, K, fmt_a, fmt_w, variant), acts["qa"], acts["ea"], packed, M, N)
        bound = bfp_matmul_tolerance(*args)
        assert np.all(np.abs(got - bfp_matmul_ref(*args)) <= bound), (m, M, N, K)

        fa = fake_quantize_np(a, fmt_a).astype(np.float64)
        fw = fake_quantize_np(w, fmt_w).astype(np.float64)
        simulation = fa @ fw.T
        bound_vs_simulation = bound + K * FLOAT64_EPS * (np.abs(fa) @ np.abs(fw).T)
        assert np.all(np.abs(got - simulation) <= bound_vs_simulation), (m, M, N, K)
        assert np.count_nonzero(got) > got.size // 2  # a zero kernel would pass a zero reference


@pytest.mark.parametrize("variant", RUN_VARIANTS)
def test_block_scale_exact_over_whole_exponent_range(variant):
    """One block per output: C is a single term, so it must equal the reference bit for bit.

    Activation exponents are drawn over all of [-127, 127], weight exponents over [-127, 111]
    (pack_weights' limit for m = 8), so the combined power of two spans 2**-266 .. 2**238: zero,
    subnormal, normal and overflowing (inf) results all occur.
    """
    rng = np.random.default_rng(7)
    M, N, block = 64, 64, 32
    fmt = BFPFormat(mantissa_bits=8, block_size=block)
    qa = rng.integers(-128, 128, (M, block), dtype=np.int8)
    qw = rng.integers(-127, 128, (N, block), dtype=np.int8)
    qw[:, 0] = 127  # so that pack_weights(qw * 2**-6) re-quantizes to exactly qw (exponent 0)
    # a quarter of the rows/columns at each end of the range: this is where a kernel that scaled
    # in another order, or multiplied the two scales first, rounds twice (checked to fail)
    ea = rng.integers(-127, 128, (M, 1), dtype=np.int8)
    ea[::4] = rng.integers(-127, -117, (M // 4, 1))
    ea[1::4] = rng.integers(100, 128, (M // 4, 1))
    ew = rng.integers(-127, 112, (N, 1), dtype=np.int8)
    ew[::4] = rng.integers(-127, -117, (N // 4, 1))
    ew[1::4] = rng.integers(90, 112, (N // 4, 1))
    packed = PackedWeights(np.ascontiguousarray(qw.reshape(N // 16, 16, block // 4, 4).transpose(0, 2, 1, 3)),
                           np.ascontiguousarray(ew.T), fmt, N)
    repacked = pack_weights(np.ldexp(qw.astype(np.float32), -6), fmt)
    assert np.array_equal(packed.qw, repacked.qw)

    got = _run(_compile(M, N, block, fmt, fmt, variant), qa, ea, packed, M, N)
    want = bfp_matmul_ref(qa, ea, qw, ew, block, 8, 8)
    tiny = np.abs(want) < np.finfo(np.float32).tiny
    assert np.isinf(want).any() and (tiny & (want != 0)).any() and (want == 0).any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", ["vnni", "avx2", "generic"])
def test_assembly_uses_the_intended_instructions(variant):
    fmt = BFPFormat(mantissa_bits=8, block_size=32)
    asm = _compile(4, 32, 64, fmt, fmt, variant).mod.inspect_source("asm")
    assert ("vpdpbusd" in asm) == (variant == "vnni")
    if variant == "avx2":
        assert "vpmaddwd" in asm


def test_user_errors_name_the_culprit():
    fmt16 = BFPFormat(mantissa_bits=8, block_size=16)
    fmt32 = BFPFormat(mantissa_bits=8, block_size=32)
    with pytest.raises(BitqError, match="share one block size"):
        bfp_matmul_func(4, 16, 64, fmt16, fmt32, "vnni")
    with pytest.raises(BitqError, match="variant 'sse'"):
        bfp_matmul_func(4, 16, 64, fmt32, fmt32, "sse")
    with pytest.raises(BitqError, match="block size 4 must be a multiple of 4 in"):
        pack_weights(np.ones((16, 8), np.float32), BFPFormat(mantissa_bits=8, block_size=4))
    with pytest.raises(BitqError, match=r"fc2.weight' has a block with max \|w\| >= 2\*\*112"):
        pack_weights(np.full((16, 32), 2.0**112, np.float32), fmt32, name="fc2.weight")
    pack_weights(np.full((16, 32), 2.0**111, np.float32), fmt32)  # the largest accepted
    with pytest.raises(BitqError, match="fc1.weight must be 2-D"):
        pack_weights(np.ones((2, 16, 8), np.float32), fmt16, name="fc1.weight")
