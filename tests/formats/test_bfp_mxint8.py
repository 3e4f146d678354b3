"""bfp8_b32 is OCP Microscaling MXINT8: check it against the OCP MX v1.0 definition.

MXINT8: blocks of k = 32 elements share an E8M0 scale X (a biased exponent byte, bias 127,
0xFF = NaN, so X in 2**-127 .. 2**127); each element P is an INT8 two's-complement number with
an implicit scale 2**-6 (range -2 .. 1.984375). Value = X * P. Conversion from float: X =
2**(floor(log2(max |V|)) - emax_elem), with emax_elem = 0 for INT8 (largest element 1.98..),
then P = V / X quantized to INT8 (round half to even, saturating).
"""

import math

import numpy as np
import pytest

from bitq_tvm.formats import PRESETS, dequantize_np, quantize_np

MXINT8 = PRESETS["bfp8_b32"]
BLOCK = 32
E8M0_BIAS = 127
INT8_EMAX = 0  # floor(log2(1.984375))
INT8_FRACTION_BITS = 6


def ocp_mxint8_encode(row: np.ndarray):
    """Independent per-block MXINT8 encoder for one row: (scale bytes, int8 elements)."""
    row = [float(value) for value in row]
    row += [0.0] * (-len(row) % BLOCK)
    scale_bytes, elements = [], []
    for start in range(0, len(row), BLOCK):
        block = row[start : start + BLOCK]
        largest = max(abs(value) for value in block)
        # an all-zero block may use any scale; take the smallest, byte 0
        shared = math.floor(math.log2(largest)) - INT8_EMAX if largest > 0 else -E8M0_BIAS
        shared = min(max(shared, -E8M0_BIAS), E8M0_BIAS)
        scale_bytes.append(shared + E8M0_BIAS)
        for value in block:
            element = round(value / 2.0**shared * 2**INT8_FRACTION_BITS)  # half to even
            elements.append(min(max(element, -128), 127))
    return scale_bytes, elements


def ocp_mxint8_decode(scale_bytes, elements):
    values = []
    for index, element in enumerate(elements):
        scale_byte = scale_bytes[index // BLOCK]
        assert scale_byte != 0xFF  # NaN scale
        values.append(2.0 ** (scale_byte - E8M0_BIAS) * element * 2.0**-INT8_FRACTION_BITS)
    return values


def test_bfp8_b32_parameters_are_mxint8():
    assert (MXINT8.mantissa_bits, MXINT8.block_size, MXINT8.exponent_bits) == (8, 32, 8)
    assert (MXINT8.emin, MXINT8.emax) == (-127, 127)  # E8M0 without the NaN code
    assert (MXINT8.qmin, MXINT8.qmax) == (-128, 127)  # INT8
    assert MXINT8.scale_shift == INT8_FRACTION_BITS  # s = 2**e * 2**-6


def _test_rows():
    rng = np.random.default_rng(11)
    normal = rng.standard_normal((4, 80))
    wide = rng.standard_normal((4, 80)) * 2.0 ** rng.integers(-140, 126, size=(4, 1))
    ties = rng.integers(-256, 256, size=(2, 80)) / 2.0**7  # v = k / 2: half-way cases
    rows = np.concatenate([normal, wide, ties]).astype(np.float32)
    rows[0, 32:64] = 0.0  # an all-zero block
    rows[1, 5] = -1.9999 * 2.0**10  # rounds to -128 * 2**(10 - 6): the INT8 minimum
    rows[2, :] = np.float32(2.0**-149) * np.arange(80)  # subnormals only
    rows[3, 0] = np.float32(2.0**127)  # the largest E8M0 scale
    return rows


def test_encoding_matches_independent_ocp_encoder_bit_for_bit():
    rows = _test_rows()
    t = quantize_np(rows, MXINT8, axis=-1, name="mx")
    assert t.mantissas.shape == (len(rows), 1, 3, BLOCK)  # 80 = 32 + 32 + 16 (ragged)
    for row, mantissas, exponents in zip(rows, t.mantissas, t.exponents):
        scale_bytes = (exponents.ravel().astype(np.int64) + E8M0_BIAS).tolist()
        expected_bytes, expected_elements = ocp_mxint8_encode(row)
        assert scale_bytes == expected_bytes
        assert mantissas.ravel().tolist() == expected_elements
    # the INT8 minimum is produced and no scale byte is the NaN code
    assert t.mantissas[1, 0, 0, 5] == -128
    assert (t.exponents.astype(np.int64) + E8M0_BIAS).max() <= 254


def test_decoding_our_encoding_per_ocp_rule_gives_our_values():
    rows = _test_rows()
    t = quantize_np(rows, MXINT8)
    ours = dequantize_np(t)
    for index, row in enumerate(rows):
        scale_bytes = (t.exponents[index].ravel().astype(np.int64) + E8M0_BIAS).tolist()
        elements = t.mantissas[index].ravel().tolist()
        decoded = ocp_mxint8_decode(scale_bytes, elements)[: len(row)]
        assert ours[index].tolist() == decoded
        # and the independent encoder/decoder pair gives the same values
        assert ocp_mxint8_decode(*ocp_mxint8_encode(row))[: len(row)] == decoded


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100])
def test_mxint8_random_lengths(length):
    row = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    t = quantize_np(row, MXINT8)
    expected_bytes, expected_elements = ocp_mxint8_encode(row)
    assert (t.exponents.ravel().astype(np.int64) + E8M0_BIAS).tolist() == expected_bytes
    assert t.mantissas.ravel().tolist() == expected_elements
