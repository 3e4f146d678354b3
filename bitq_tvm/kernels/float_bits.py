"""TIR building blocks of the BFP numeric contract, shared by every BFP kernel.

Each is the float32/uint32 operation the NumPy reference (:mod:`bitq_tvm.formats.reference`)
performs, so kernels built from them agree with it bit for bit: the shared exponent is read from
the float32 exponent field (no ``log2``), powers of two are built from their bit patterns
(subnormals included), and stochastic rounding uses the same counter-based hash.
"""

from __future__ import annotations

from tvm import tirx

from ..formats import BFPFormat, Rounding

FLOAT32_EXPONENT_BIAS = 127
FLOAT32_MANTISSA_BITS = 23
_MIN_NORMAL_EXPONENT = -126
# 2**k for k < -126 is the subnormal with only bit (k + 149) set
_SUBNORMAL_SHIFT = 149
_GOLDEN_RATIO_32 = 0x9E3779B9
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B


def exponent_field(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """The biased exponent field of float32 ``x`` (0 for zero and subnormals) as int32.

    The block maximum of the fields is the field of max |x|: the shared exponent without ``log2``.
    """
    return (tirx.reinterpret("int32", x) >> FLOAT32_MANTISSA_BITS) & 0xFF


def shared_exponent(field: tirx.PrimExpr, fmt: BFPFormat) -> tirx.PrimExpr:
    """floor(log2(max |x|)) clamped to [emin, emax], from the block's largest exponent field.

    A zero or subnormal maximum has field 0, i.e. -127, which the clamp maps to emin exactly as
    the exact floor(log2) would (emin >= -127 for every E <= 8).
    """
    return tirx.max(tirx.min(field - FLOAT32_EXPONENT_BIAS, fmt.emax), fmt.emin)


def power_of_two(k: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 2**k from its bit pattern, exact for k in [-149, 127], subnormals included."""
    normal = (k + FLOAT32_EXPONENT_BIAS) << FLOAT32_MANTISSA_BITS
    # the clamp keeps the shift amount of the unselected branch in range
    subnormal = tirx.const(1, "int32") << tirx.max(k + _SUBNORMAL_SHIFT, tirx.const(0, "int32"))
    return tirx.reinterpret("float32", tirx.Select(k >= _MIN_NORMAL_EXPONENT, normal, subnormal))


def divide_by_power_of_two(x: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``x / 2**k``, bit for bit as that division, for k in [-254, 149].

    A multiplication by the exact reciprocal ``2**-k`` (a division costs ~5x a multiplication
    and does not pipeline): both round the same exact quotient, so the results are identical.
    Where ``2**-k`` is above float32's range (k < -127) it is applied as ``2**127 * 2**(-k-127)``:
    the first product is exact unless it overflows, and then the quotient overflows too (inf
    either way); the second rounds the exact quotient.
    """
    inverse = -k
    # 2**max(-k - 127, 0) is a normal number: its bit pattern needs no subnormal branch (whose
    # shift the simplifier would fold out of range when it proves the exponent >= 0)
    above = tirx.max(inverse - 127, tirx.const(0, "int32"))
    rest = tirx.reinterpret("float32", (above + FLOAT32_EXPONENT_BIAS) << FLOAT32_MANTISSA_BITS)
    return x * power_of_two(tirx.min(inverse, tirx.const(127, "int32"))) * rest


def zero_unless(keep: tirx.PrimExpr, value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` where ``keep`` holds, else 0 (+0.0 for float32), as an AND of its bits.

    For padding read through clamped indices. ``Select(keep, x[clamped], 0)`` is not safe: inside
    the true branch the simplifier may assume ``keep`` and drop the clamps, and LLVM's select
    evaluates both branches, so the load runs out of bounds (seen in the im2col and ragged
    quantizer kernels, caught by TVM's ``OOBChecker``). Here the load sits outside any branch.
    """
    if hasattr(value, "asobject"):  # a te tensor element
        value = value.asobject()
    dtype = str(value.ty)
    if dtype == "float32":
        bits = tirx.reinterpret("int32", value)
        return tirx.reinterpret("float32", tirx.bitwise_and(bits, tirx.Select(keep, tirx.const(-1, "int32"),
                                                                             tirx.const(0, "int32"))))
    mask = tirx.Select(keep, tirx.const(-1, dtype), tirx.const(0, dtype))
    return tirx.bitwise_and(value, mask)


def _u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value % 2**32, "uint32")


def stochastic_uniform(flat_index: tirx.PrimExpr, seed: int) -> tirx.PrimExpr:
    """u in [0, 1) from the counter-based hash of the formats contract, in uint32 arithmetic."""
    h = tirx.Cast("uint32", flat_index) ^ _u32(seed * _GOLDEN_RATIO_32)
    h = h ^ (h >> _u32(16))
    h = h * _u32(_HASH_MUL_1)
    h = h ^ (h >> _u32(15))
    h = h * _u32(_HASH_MUL_2)
    h = h ^ (h >> _u32(16))
    return tirx.Cast("float32", h >> _u32(8)) * tirx.const(2.0**-24, "float32")


def round_mantissa(v: tirx.PrimExpr, fmt: BFPFormat, flat_index: tirx.PrimExpr | None) -> tirx.PrimExpr:
    """The mantissa of ``v = x / s`` as a float32 integer in [qmin, qmax] (``fmt``'s rounding).

    ``flat_index`` is the C-order index of the element in the unpadded tensor (stochastic only).
    """
    if fmt.rounding == Rounding.STOCHASTIC:
        q = tirx.floor(v + stochastic_uniform(flat_index, fmt.seed))
    else:
        q = tirx.nearbyint(v)  # llvm.nearbyint: half to even in the default rounding mode
    return tirx.max(tirx.min(q, float(fmt.qmax)), float(fmt.qmin))
