"""Hand-computed examples and error cases for the NumPy reference BFP quantizer.

Every expected mantissa/exponent below was worked out by hand from the contract:
e = floor(log2(max |x| in block)) clamped to [emin, emax], s = 2**(e - (m - 2)),
q = clamp(rint(x / s), -2**(m-1), 2**(m-1) - 1), value = q * s.
"""

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import (
    BFPFormat,
    BFPTensor,
    dequantize_np,
    fake_quantize_np,
    quantize_np,
    stochastic_uniform_np,
)

M4_B4 = BFPFormat(mantissa_bits=4, block_size=4)  # q in [-8, 7], s = 2**(e - 2)


def f32(values):
    return np.array(values, dtype=np.float32)


def test_hand_example_with_ragged_last_block():
    # block 0: max 3.9 -> e = 1, s = 0.5, v = [2, -1, 0.6, 7.8] -> q = [2, -1, 1, 8 -> 7]
    # block 1: [0.1, 0.2, pad, pad]: max 0.2 -> e = -3, s = 2**-5, v = [3.2, 6.4] -> q = [3, 6]
    x = f32([1.0, -0.5, 0.3, 3.9, 0.1, 0.2])
    t = quantize_np(x, M4_B4)
    assert t.mantissas.dtype == np.int8 and t.exponents.dtype == np.int8
    np.testing.assert_array_equal(t.mantissas, [[[2, -1, 1, 7], [3, 6, 0, 0]]])
    np.testing.assert_array_equal(t.exponents, [[1, -3]])
    np.testing.assert_array_equal(t.scales, [[0.5, 2.0**-5]])
    assert (t.axis, t.groups, t.shape) == (0, 1, (6,))
    np.testing.assert_array_equal(dequantize_np(t), f32([1.0, -0.5, 0.5, 3.5, 0.09375, 0.1875]))


def test_round_half_to_even():
    # m = 3: q in [-4, 3], s = 2**(e - 1); max |-2.5| -> e = 1, s = 1; v = [2, 0.5, 1.5, -2.5]
    fmt = BFPFormat(mantissa_bits=3, block_size=4)
    t = quantize_np(f32([2.0, 0.5, 1.5, -2.5]), fmt)
    np.testing.assert_array_equal(t.mantissas, [[[2, 0, 2, -2]]])
    np.testing.assert_array_equal(t.exponents, [[1]])


def test_clamp_is_asymmetric_at_qmin():
    # m = 3, s = 1 for both: -3.75 rounds to -4 = qmin (kept), +3.75 rounds to 4 -> clamped to 3
    fmt = BFPFormat(mantissa_bits=3, block_size=1)
    t = quantize_np(f32([-3.75, 3.75]), fmt)
    np.testing.assert_array_equal(t.mantissas.ravel(), [-4, 3])
    np.testing.assert_array_equal(t.exponents.ravel(), [1, 1])


def test_zero_block_gets_emin_and_zero_mantissas():
    fmt = BFPFormat(mantissa_bits=4, block_size=4, exponent_bits=4)  # emin = -7
    x = f32([0, 0, -0.0, 0, 0, 0, 1.0, 0])
    t = quantize_np(x, fmt)
    np.testing.assert_array_equal(t.exponents, [[-7, 0]])
    np.testing.assert_array_equal(t.mantissas, [[[0, 0, 0, 0], [0, 0, 4, 0]]])
    np.testing.assert_array_equal(dequantize_np(t), x)
    np.testing.assert_array_equal(quantize_np(np.zeros(4, np.float32), M4_B4).exponents, [[-127]])


def test_groups_keep_blocks_inside_each_group():
    # length 6, groups 2 -> segments [4, 0.5, 0.25] and [0.5, 0.5, 8], B = 2, m = 4:
    # g0: [4, 0.5] e=2 s=1 -> [4, 0] (0.5 ties to even); [0.25, pad] e=-2 s=2**-4 -> [4, 0]
    # g1: [0.5, 0.5] e=-1 s=2**-3 -> [4, 4];            [8, pad] e=3 s=2 -> [4, 0]
    fmt = BFPFormat(mantissa_bits=4, block_size=2)
    x = f32([4, 0.5, 0.25, 0.5, 0.5, 8])
    t = quantize_np(x, fmt, groups=2)
    assert t.mantissas.shape == (2, 2, 2)
    np.testing.assert_array_equal(t.mantissas, [[[4, 0], [4, 0]], [[4, 4], [4, 0]]])
    np.testing.assert_array_equal(t.exponents, [[2, -2], [-1, 3]])
    np.testing.assert_array_equal(dequantize_np(t), f32([4, 0, 0.25, 0.5, 0.5, 8]))
    # without groups the blocks [0.25, 0.5] and [0.5, 8] straddle the boundary: different result
    assert not np.array_equal(fake_quantize_np(x, fmt), dequantize_np(t))
    assert fake_quantize_np(x, fmt)[4] == 0.0  # 0.5 next to 8: s = 2, v = 0.25 -> 0


def test_groups_equal_quantizing_each_segment_alone():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 12, 2)).astype(np.float32)
    fmt = BFPFormat(mantissa_bits=5, block_size=3)
    grouped = fake_quantize_np(x, fmt, axis=1, groups=4)
    separately = np.concatenate(
        [fake_quantize_np(x[:, i : i + 3], fmt, axis=1) for i in range(0, 12, 3)], axis=1
    )
    np.testing.assert_array_equal(grouped, separately)


def test_axis_other_than_last():
    # shape (3, 2), blocks down the columns, B = 2, m = 4:
    # column 0 = [1, 2, 3.3]: [1, 2] e=1 s=0.5 -> [2, 4]; [3.3, pad] e=1 s=0.5 -> v=6.6 -> [7, 0]
    # column 1 = [8, -8, 0.5]: [8, -8] e=3 s=2 -> [4, -4]; [0.5, pad] e=-1 s=2**-3 -> [4, 0]
    fmt = BFPFormat(mantissa_bits=4, block_size=2)
    x = f32([[1, 8], [2, -8], [3.3, 0.5]])
    t = quantize_np(x, fmt, axis=0)
    assert t.axis == 0 and t.mantissas.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(t.mantissas, [[[[2, 4], [7, 0]]], [[[4, -4], [4, 0]]]])
    np.testing.assert_array_equal(t.exponents, [[[1, 1]], [[3, -1]]])
    np.testing.assert_array_equal(dequantize_np(t), f32([[1, 8], [2, -8], [3.5, 0.5]]))
    # negative axis means the same axis
    np.testing.assert_array_equal(fake_quantize_np(x, fmt, axis=-2), dequantize_np(t))
    # axis 0 of x is axis 1 of x.T
    np.testing.assert_array_equal(fake_quantize_np(x.T, fmt, axis=1), dequantize_np(t).T)


def test_blocked_layout_of_a_conv_weight():
    # OIHW weight blocked along I (axis 1) with 2 groups: outer = (O, H, W)
    x = np.arange(4 * 6 * 3 * 2, dtype=np.float32).reshape(4, 6, 3, 2)
    t = quantize_np(x, BFPFormat(8, 2), axis=1, groups=2)
    assert t.mantissas.shape == (4, 3, 2, 2, 2, 2)
    assert t.exponents.shape == (4, 3, 2, 2, 2)
    assert dequantize_np(t).shape == x.shape


def test_exponent_underflow_flushes_to_zero_with_small_exponent_range():
    # E = 2: e in [-1, 1]. max 0.02 -> floor(log2) = -6, clamped to -1; s = 2**(-1 - 2) = 0.125
    fmt = BFPFormat(mantissa_bits=4, block_size=2, exponent_bits=2)
    t = quantize_np(f32([0.01, -0.02, 0.1, 0.05]), fmt)
    np.testing.assert_array_equal(t.exponents, [[-1, -1]])
    # v = [0.08, -0.16] -> [0, 0];  v = [0.8, 0.4] -> [1, 0]
    np.testing.assert_array_equal(t.mantissas, [[[0, 0], [1, 0]]])
    np.testing.assert_array_equal(dequantize_np(t), f32([0, 0, 0.125, 0]))


def test_exponent_saturation_clamps_to_qmax_and_qmin():
    # E = 2: max 100 -> floor(log2) = 6, clamped to 1; s = 0.5; v = [200, -200, 6, 2]
    fmt = BFPFormat(mantissa_bits=4, block_size=4, exponent_bits=2)
    t = quantize_np(f32([100, -100, 3, 1]), fmt)
    np.testing.assert_array_equal(t.exponents, [[1]])
    np.testing.assert_array_equal(t.mantissas, [[[7, -8, 6, 2]]])
    np.testing.assert_array_equal(dequantize_np(t), f32([3.5, -4, 3, 1]))


def test_float32_extremes_saturate_without_overflow_warnings():
    big = np.finfo(np.float32).max
    fmt = BFPFormat(mantissa_bits=8, block_size=2, exponent_bits=3)  # emax 3, s = 2**-3
    with np.errstate(all="raise"):
        t = quantize_np(f32([big, -big]), fmt)
    np.testing.assert_array_equal(t.mantissas, [[[127, -128]]])
    # E = 8 covers float32: e = 127, s = 2**121, v = big / 2**121 = 255.99.. -> 256 -> 127
    t8 = quantize_np(f32([big, 2.0**121]), BFPFormat(8, 2))
    np.testing.assert_array_equal(t8.exponents, [[127]])
    np.testing.assert_array_equal(t8.mantissas, [[[127, 1]]])


def test_subnormal_inputs():
    fmt = BFPFormat(mantissa_bits=8, block_size=2)  # emin = -127: s >= 2**-133 (subnormal)
    tiny = 2.0**-149  # smallest float32 subnormal
    # max 2**-140 -> floor(log2) = -140, clamped to -127; s = 2**-133: v = [2**-16, 2**-7] -> 0
    t = quantize_np(f32([tiny, 2.0**-140]), fmt)
    np.testing.assert_array_equal(t.exponents, [[-127]])
    np.testing.assert_array_equal(t.mantissas, [[[0, 0]]])
    # max 2**-130 (subnormal): e = -130 -> -127, v = [8, 3]: exact subnormal outputs
    x = f32([2.0**-130, 3 * 2.0**-133])
    t = quantize_np(x, fmt)
    np.testing.assert_array_equal(t.mantissas, [[[8, 3]]])
    np.testing.assert_array_equal(dequantize_np(t), x)
    # smallest normal 2**-126: e = -126, s = 2**-132, v = 64; 1.5 * 2**-126 -> 96
    t = quantize_np(f32([2.0**-126, 1.5 * 2.0**-126]), fmt)
    np.testing.assert_array_equal(t.exponents, [[-126]])
    np.testing.assert_array_equal(t.mantissas, [[[64, 96]]])


def test_dequantize_returns_contiguous_float32_of_original_shape():
    x = np.random.default_rng(2).standard_normal((5, 7, 3)).astype(np.float32)
    for axis in range(3):
        y = fake_quantize_np(x, BFPFormat(8, 4), axis=axis)
        assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
        np.testing.assert_allclose(y, x, rtol=0, atol=2.0**-6 * np.abs(x).max())


def test_input_dtypes_are_converted_to_float32():
    x64 = np.array([0.1, 0.7, -0.3], dtype=np.float64)
    np.testing.assert_array_equal(
        fake_quantize_np(x64, M4_B4), fake_quantize_np(x64.astype(np.float32), M4_B4)
    )
    np.testing.assert_array_equal(fake_quantize_np([1, 2, 3, 7], M4_B4), f32([1, 2, 3, 7]))


def test_empty_tensor():
    t = quantize_np(np.zeros((0, 5), np.float32), M4_B4)
    assert t.mantissas.shape == (0, 1, 2, 4)
    assert dequantize_np(t).shape == (0, 5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_naming_the_tensor(bad):
    x = f32([1.0, bad, 2.0])
    with pytest.raises(BitqError, match=r"'conv1\.weight'.*NaN or Inf"):
        quantize_np(x, M4_B4, name="conv1.weight")
    with pytest.raises(BitqError, match="NaN or Inf"):
        fake_quantize_np(x, M4_B4)


def test_value_beyond_float32_range_raises():
    with pytest.raises(BitqError, match="'fc.bias'"):
        quantize_np(np.array([1e39]), M4_B4, name="fc.bias")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(axis=2), "axis 2 is out of range for tensor 'w'"),
        (dict(axis=-3), "axis -3"),
        (dict(groups=4), "groups=4 does not divide axis 1 .length 6. of tensor 'w'"),
        (dict(groups=0), "groups must be a positive int for tensor 'w'"),
    ],
)
def test_bad_axis_or_groups_raise(kwargs, fragment):
    with pytest.raises(BitqError, match=fragment):
        quantize_np(np.ones((2, 6), np.float32), M4_B4, name="w", **kwargs)


def test_scalar_and_non_numeric_inputs_raise():
    with pytest.raises(BitqError, match="axis"):
        quantize_np(np.float32(1.0), M4_B4)
    with pytest.raises(BitqError, match="dtype"):
        quantize_np(np.array(["a"]), M4_B4, name="s")


def test_bfp_tensor_checks_its_layout():
    t = quantize_np(np.ones((2, 6), np.float32), M4_B4)
    with pytest.raises(ValueError, match="needs exponents"):
        BFPTensor(t.mantissas[:1], t.exponents, t.fmt, t.axis, t.groups, t.shape)
    with pytest.raises(ValueError, match="int8"):
        BFPTensor(t.mantissas.astype(np.int16), t.exponents, t.fmt, t.axis, t.groups, t.shape)


def _lowbias32_uniform(index, seed):
    """The contract's hash, written with Python integers (independent of the NumPy version)."""
    mask = 0xFFFFFFFF
    h = (index & mask) ^ ((seed * 0x9E3779B9) & mask)
    h ^= h >> 16
    h = (h * 0x7FEB352D) & mask
    h ^= h >> 15
    h = (h * 0x846CA68B) & mask
    h ^= h >> 16
    return (h >> 8) * 2.0**-24


def test_stochastic_uniform_pinned_values():
    # pinned so that TIR kernels can check their hash against the same numbers
    assert stochastic_uniform_np((2,), 0).tolist() == [0.0, 6850960 * 2.0**-24]
    assert stochastic_uniform_np((1,), 1)[0] == 130277 * 2.0**-24
    assert stochastic_uniform_np((12346,), 7)[12345] == 5865864 * 2.0**-24


def test_stochastic_uniform_matches_integer_hash_in_c_order():
    shape = (3, 5, 7)
    for seed in (0, 1, 123456789, 2**32 - 1):
        u = stochastic_uniform_np(shape, seed)
        assert u.dtype == np.float32 and u.shape == shape
        expected = [_lowbias32_uniform(i, seed) for i in range(u.size)]
        assert u.ravel().tolist() == expected


def test_stochastic_uniform_is_uniform():
    n = 1 << 20
    u = stochastic_uniform_np((n,), 42).astype(np.float64)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.all(u * 2**24 == np.floor(u * 2**24))
    # mean within 5 sigma of 1/2 (variance of U[0,1) is 1/12)
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    # 64-bin chi-square: mean df = 63, sd sqrt(2 * 63); allow 5 sd
    counts = np.bincount((u * 64).astype(np.int64), minlength=64)
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 63 + 5 * np.sqrt(2 * 63)


def test_stochastic_hand_example():
    # seed 0: u = [0, 6850960, 13701921, 5501417] * 2**-24 = [0, 0.4083, 0.8167, 0.3279]
    # max 3.75 -> e = 1, s = 0.5, v = [0.3, 0.7, 6, -7.5]
    # v + u = [0.3, 1.108, 6.817, -7.172] -> floor [0, 1, 6, -8]
    fmt = BFPFormat(mantissa_bits=4, block_size=4, rounding="stochastic", seed=0)
    assert (stochastic_uniform_np((4,), 0) * 2**24).tolist() == [0, 6850960, 13701921, 5501417]
    t = quantize_np(f32([0.15, 0.35, 3.0, -3.75]), fmt)
    np.testing.assert_array_equal(t.mantissas, [[[0, 1, 6, -8]]])
    np.testing.assert_array_equal(t.exponents, [[1]])


def test_stochastic_same_seed_same_result_other_seed_differs():
    x = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    fmt7 = BFPFormat(4, 16, rounding="stochastic", seed=7)
    a = fake_quantize_np(x, fmt7)
    np.testing.assert_array_equal(a, fake_quantize_np(x, fmt7))
    b = fake_quantize_np(x, BFPFormat(4, 16, rounding="stochastic", seed=8))
    assert np.mean(a != b) > 0.2  # m = 4 leaves most values between grid points
    nearest = fake_quantize_np(x, BFPFormat(4, 16))
    assert not np.array_equal(a, nearest)
