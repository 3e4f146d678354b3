"""The kernel contract: block-size rule, GEMM geometry, block axes, stored bytes, variant choice."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat
from bitq_tvm.kernels.bfp_conv import ConvGeometry
from bitq_tvm.kernels.bfp_matmul_variants import available_variants, kernel_variant
from bitq_tvm.kernels.bfp_depthwise import pack_depthwise_weights
from bitq_tvm.kernels.contract import (DepthwiseGeometry, block_axes, block_size_problem, check_block_layout,
                                       depthwise_activation_format, depthwise_weight_blocks, format_problem, gemm_geometry, integer_support,
                                       integer_weight_bytes, is_depthwise, is_window_blocked, kernel_geometry)
from bitq_tvm.kernels.packing import pack_weights


def test_block_size_rule():
    assert [b for b in range(1, 140) if block_size_problem(b) is None] == list(range(8, 129, 4))
    assert "(kernel constraint)" in format_problem(BFPFormat(8, 6), BFPFormat(8, 6))
    assert "one block size" in format_problem(BFPFormat(8, 16), BFPFormat(8, 32))
    assert "activation is FP32" in format_problem(BFPFormat(8, 16), None)
    assert format_problem(BFPFormat(4, 16), BFPFormat(8, 16)) is None


def test_integer_support_from_shapes():
    fmt = BFPFormat(8, 16)
    assert integer_support("conv2d", (32, 1, 3, 3), 32, fmt, fmt) is None  # the depthwise kernel
    assert "2 outputs per channel" in integer_support("conv2d", (64, 1, 3, 3), 32, fmt, fmt)
    assert "multiples of 8" in integer_support("conv2d", (12, 1, 3, 3), 12, fmt, fmt)
    assert integer_support("conv2d", (8, 1, 3, 3), 8, BFPFormat(8, 32), BFPFormat(8, 32)) is None  # no padding
    # a 3-channel stem blocks along its 27-value window (32 at B = 16), not 3 channels padded to 16
    assert integer_support("conv2d", (8, 3, 3, 3), 1, fmt, fmt) is None
    # one channel, 3x3 at B = 32: 9 values padded to 32 is still too much padding
    b32 = BFPFormat(8, 32)
    assert "9 values per window" in integer_support("conv2d", (8, 1, 3, 3), 1, b32, b32)
    # 1x1 or grouped convs keep channel blocks, and say so when they pad too much
    assert "3 input channels per group padded to 16" in integer_support("conv2d", (8, 3, 1, 1), 1, fmt, fmt)
    assert "3 input channels per group padded to 16" in integer_support("conv2d", (8, 3, 3, 3), 2, fmt, fmt)
    assert integer_support("conv2d", (8, 16, 3, 3), 1, fmt, fmt) is None
    assert "3-D weight" in integer_support("matmul", (2, 16, 8), 1, fmt, fmt)


def test_gemm_geometry_of_a_conv_and_a_matmul():
    # grouped 3x3 conv, 2 groups of 12 channels, 5x7 output: 35 rows padded to 36
    g = gemm_geometry("conv2d", (1, 24, 10, 14), (20, 12, 3, 3), (1, 20, 5, 7), 8, groups=2)
    assert (g.rows, g.rows_padded, g.n, g.k, g.k_padded, g.groups) == (35, 36, 10, 108, 144, 2)
    assert (g.group_channels_padded, g.kernel_offsets, g.blocks) == (16, 9, 18)
    geom = ConvGeometry(1, 24, 10, 14, 20, (3, 3), (2, 2), (1, 1, 0, 0), (1, 1), 2)
    assert (geom.out_height, geom.out_width) == (5, 7)
    assert geom.gemm(8) == g
    m = gemm_geometry("matmul", (3, 7, 77), (20, 77), (3, 7, 20), 32)
    assert (m.rows, m.rows_padded, m.n, m.k, m.k_padded, m.groups, m.blocks) == (21, 21, 20, 77, 96, 1, 3)
    with pytest.raises(BitqError, match="'pool'"):
        gemm_geometry("pool", (1,), (1,), (1,), 8)
    with pytest.raises(BitqError, match="depthwise"):
        gemm_geometry("conv2d", (1, 24, 10, 14), (24, 1, 3, 3), (1, 24, 10, 14), 8, groups=24)


def test_window_blocked_rule_and_geometry():
    # the rule: one group, a window larger than 1x1, channels padded to B more than twice the real ones
    assert is_window_blocked((32, 3, 3, 3), 1, 32) and is_window_blocked((16, 1, 5, 5), 1, 8)
    assert not is_window_blocked((32, 3, 1, 1), 1, 32)  # 1x1: the window is the channels
    assert not is_window_blocked((32, 16, 3, 3), 1, 32)  # 16 padded to 32: exactly twice
    assert is_window_blocked((32, 12, 3, 3), 1, 32) and not is_window_blocked((32, 12, 3, 3), 1, 16)
    assert not is_window_blocked((32, 3, 3, 3), 3, 32) and not is_window_blocked((32, 1, 3, 3), 32, 32)
    # MobileNetV2's stem: 112x112 outputs, K = 27 -> 32, one block per row, packed like a matmul
    g = gemm_geometry("conv2d", (1, 3, 224, 224), (32, 3, 3, 3), (1, 32, 112, 112), 32)
    assert (g.rows, g.n, g.k, g.k_padded, g.groups, g.group_channels_padded, g.blocks) == (
        12544, 32, 27, 32, 1, 32, 1)
    assert g.kernel_offsets == 1
    fmt = BFPFormat(4, 32)
    w = np.random.default_rng(0).standard_normal((32, 27)).astype(np.float32)
    assert integer_weight_bytes(g, fmt) == pack_weights(w, fmt).nbytes


def test_depthwise_geometry_and_stored_bytes():
    assert is_depthwise((24, 1, 3, 3), 24) and is_depthwise((48, 1, 5, 5), 24)
    assert not is_depthwise((24, 1, 1, 1), 1) and not is_depthwise((24, 2, 3, 3), 12)
    g = kernel_geometry("conv2d", (2, 40, 10, 14), (40, 1, 3, 3), (2, 40, 5, 7), 16, groups=40)
    assert g == DepthwiseGeometry(rows=70, channels=40, kernel_offsets=9)
    w = np.random.default_rng(0).standard_normal((40, 1, 3, 3)).astype(np.float32)
    for fmt in (BFPFormat(8, 16), BFPFormat(4, 16)):  # int8 mantissas whatever m
        qw, ew = pack_depthwise_weights(w, fmt)
        assert integer_weight_bytes(g, fmt) == qw.nbytes + ew.nbytes == 9 * 40 + 40  # + one exponent per channel


@pytest.mark.parametrize("fmt", [BFPFormat(8, 32), BFPFormat(4, 16), BFPFormat(3, 8)])
def test_integer_weight_bytes_is_what_the_packer_stores(fmt):
    w = np.random.default_rng(0).standard_normal((20, 77)).astype(np.float32)
    geometry = gemm_geometry("matmul", (5, 77), (77, 20), (5, 20), fmt.block_size)
    assert integer_weight_bytes(geometry, fmt) == pack_weights(w, fmt).nbytes
    assert pack_weights(w.T, fmt, k_axis=0).nbytes == pack_weights(w, fmt).nbytes


def test_block_axes():
    assert block_axes("conv2d", 4, 4, groups=3) == ((1, 3), (1, 1))
    # depthwise: one value per activation block (a group of one channel, i.e. the format at B = 1);
    # the weight's [C, KH*KW] view along axis 1, one block per channel's window
    assert block_axes("conv2d", 4, 4, groups=32) == ((1, 32), (1, 1))
    assert depthwise_activation_format(BFPFormat(6, 16)) == BFPFormat(6, 1)
    view, window = depthwise_weight_blocks((32, 1, 5, 5), BFPFormat(6, 16))
    assert view == (32, 25) and window == BFPFormat(6, 25)
    assert block_axes("matmul", 3, 2) == ((2, 1), (0, 1))  # MatMul [K, N]
    assert block_axes("matmul", 2, 2, weight_transposed=True) == ((1, 1), (1, 1))  # Gemm transB [N, K]
    assert check_block_layout((2, 6), -1, 2, "k") == 1
    with pytest.raises(BitqError, match=r"k: groups=4 does not divide axis 1 \(length 6\)"):
        check_block_layout((2, 6), 1, 4, "k")


@pytest.mark.parametrize("target, variant", [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}, "vnni"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, "avx2"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, "generic"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}, "neon"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}, "sdot"),
    ({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": ["+64bit", "+m", "+v"]}, "rvv"),
    ({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mattr": ["+64bit", "+m"]}, "scalar"),
])
def test_kernel_variant_from_target_features(target, variant):
    target = tvm.target.Target(target)
    assert kernel_variant(target) == variant
    assert variant in available_variants(target) and "scalar" in available_variants(target)
