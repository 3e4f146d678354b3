"""NumPy reference BFP quantizer: the oracle every TVM kernel and pass is tested against.

Every step is a float32 IEEE operation (or exact integer/bit arithmetic) so that a TIR kernel can
reproduce the result bit for bit:

1. blocks of B elements along ``axis``, never crossing one of ``groups`` equal segments, the last
   block of a segment zero-padded;
2. e = floor(log2(max |x| in block)) clamped to [emin, emax] (all-zero block: e = emin);
3. s = 2**(e - (m - 2)) in float32; v = float32(x / s);
4. nearest: q = clamp(rint(v), qmin, qmax); stochastic: q = clamp(floor(float32(v + u)), qmin,
   qmax) with u from :func:`stochastic_uniform_np`;
5. value = float32(q * s), exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BitqError
from .bfp import BFPFormat, Rounding

_FLOAT32_EXPONENT_BIAS = 127
_SEED_MULTIPLIER = 0x9E3779B9  # golden-ratio constant: spreads consecutive seeds over uint32
_HASH_MULTIPLIER_1 = np.uint32(0x7FEB352D)  # "lowbias32" integer hash constants (C. Wellons)
_HASH_MULTIPLIER_2 = np.uint32(0x846CA68B)


@dataclasses.dataclass(frozen=True, eq=False)
class BFPTensor:
    """A tensor quantized to BFP, in blocked layout.

    Attributes
    ----------
    mantissas : np.ndarray
        int8, shape ``outer + (groups, nblocks, B)``: the blocked axis moved last, split into
        groups and zero-padded blocks; ``outer`` is the original shape without ``axis``.
    exponents : np.ndarray
        int8, shape ``outer + (groups, nblocks)``: shared exponent e of each block.
    fmt : BFPFormat
    axis : int
        Blocked axis of the original tensor, non-negative.
    groups : int
    shape : tuple of int
        Original (unpadded) shape.
    """

    mantissas: np.ndarray
    exponents: np.ndarray
    fmt: BFPFormat
    axis: int
    groups: int
    shape: tuple[int, ...]

    def __post_init__(self):
        outer = self.shape[: self.axis] + self.shape[self.axis + 1 :]
        nblocks = self.fmt.num_blocks(self.shape[self.axis], self.groups) // self.groups
        expected = outer + (self.groups, nblocks)
        if self.exponents.shape != expected or self.mantissas.shape != expected + (
            self.fmt.block_size,
        ):
            raise ValueError(
                f"BFPTensor of shape {self.shape} ({self.fmt.name}, axis {self.axis}, groups "
                f"{self.groups}) needs exponents {expected} and mantissas "
                f"{expected + (self.fmt.block_size,)}, got {self.exponents.shape} and "
                f"{self.mantissas.shape}"
            )
        if self.mantissas.dtype != np.int8 or self.exponents.dtype != np.int8:
            raise ValueError("BFPTensor mantissas and exponents must be int8")

    @property
    def scales(self) -> np.ndarray:
        """float32 block scales 2**(e - (m - 2)), shape of ``exponents``."""
        return _block_scales(self.exponents, self.fmt)


def stochastic_uniform_np(shape, seed: int) -> np.ndarray:
    """Uniform float32 numbers in [0, 1) for stochastic rounding, one per element of ``shape``.

    Element i (C-order flat index) gets u = (h >> 8) * 2**-24 where h is the lowbias32 hash of
    ``uint32(i) ^ uint32(seed * 0x9E3779B9)``; a TIR kernel computes the same from the index.
    """
    size = int(np.prod(shape, dtype=np.int64))
    # flat indices wrap modulo 2**32, as uint32 arithmetic in a kernel would
    h = np.arange(size, dtype=np.uint32 if size <= 2**32 else np.uint64).astype(
        np.uint32, copy=False
    )
    h ^= np.uint32((seed * _SEED_MULTIPLIER) & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= _HASH_MULTIPLIER_1
    h ^= h >> np.uint32(15)
    h *= _HASH_MULTIPLIER_2
    h ^= h >> np.uint32(16)
    h >>= np.uint32(8)
    u = h.astype(np.float32)
    u *= np.float32(2.0**-24)
    return u.reshape(shape)


def quantize_np(x, fmt: BFPFormat, axis: int = -1, groups: int = 1, name: str | None = None):
    """Quantize ``x`` to BFP with blocks along ``axis``.

    Parameters
    ----------
    x : array_like
        Real values; converted to float32 first.
    fmt : BFPFormat
    axis : int
        Axis the blocks run along (the reduction axis of the consuming op).
    groups : int
        Equal segments of ``axis`` that blocks must not cross (grouped convolutions).
    name : str, optional
        Tensor name used in error messages (e.g. the ONNX initializer).

    Returns
    -------
    BFPTensor

    Raises
    ------
    BitqError
        If ``x`` holds NaN/Inf (or values beyond float32), or ``axis``/``groups`` do not fit it.
    """
    if not isinstance(fmt, BFPFormat):
        raise TypeError(f"fmt must be a BFPFormat, got {fmt!r}")
    label = "<unnamed>" if name is None else name
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise BitqError(f"tensor {label!r} has dtype {x.dtype}; BFP needs real numbers")
    with np.errstate(over="ignore"):  # out-of-range values become Inf, reported just below
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BitqError(
            f"tensor {label!r} contains NaN or Inf (or values beyond the float32 range)"
        )
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not (
        -x.ndim <= axis < x.ndim
    ):
        raise BitqError(f"axis {axis!r} is out of range for tensor {label!r} of shape {x.shape}")
    axis = int(axis) % x.ndim
    length = x.shape[axis]
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise BitqError(f"groups must be a positive int for tensor {label!r}, got {groups!r}")
    if length % groups:
        raise BitqError(
            f"groups={groups} does not divide axis {axis} (length {length}) of tensor {label!r}"
        )
    groups = int(groups)

    blocks = _to_blocks(x, fmt, axis, groups)
    exponents = _block_exponents(blocks, fmt)
    scales = _block_scales(exponents, fmt)
    # x / s overflows only when the exponent saturated at emax; the clamp below gives qmin/qmax
    with np.errstate(over="ignore"):
        v = blocks / scales[..., None]
    if fmt.rounding is Rounding.NEAREST:
        q = np.rint(v, out=v)
    else:
        u = _to_blocks(stochastic_uniform_np(x.shape, fmt.seed), fmt, axis, groups)
        v += u
        q = np.floor(v, out=v)
    np.clip(q, fmt.qmin, fmt.qmax, out=q)
    return BFPTensor(
        mantissas=q.astype(np.int8),
        exponents=exponents,
        fmt=fmt,
        axis=axis,
        groups=groups,
        shape=tuple(x.shape),
    )


def dequantize_np(t: BFPTensor) -> np.ndarray:
    """Return the float32 values q * s of ``t`` in its original shape.

    Exact, with one float32 overflow the contract allows: with E = 8, a block with e = 127 holding
    the mantissa qmin has value -2**128, which becomes -inf (NumPy warns), as in a float32 kernel.
    """
    values = t.mantissas.astype(np.float32)
    values *= t.scales[..., None]
    *outer, groups, nblocks, block = values.shape
    segment = t.shape[t.axis] // groups
    values = values.reshape(*outer, groups, nblocks * block)[..., :segment]
    values = values.reshape(*outer, groups * segment)
    return np.ascontiguousarray(np.moveaxis(values, -1, t.axis))


def fake_quantize_np(
    x, fmt: BFPFormat, axis: int = -1, groups: int = 1, name: str | None = None
) -> np.ndarray:
    """Quantize and dequantize: float32 ``x`` rounded to the BFP grid, same shape as ``x``."""
    return dequantize_np(quantize_np(x, fmt, axis=axis, groups=groups, name=name))


def _to_blocks(x: np.ndarray, fmt: BFPFormat, axis: int, groups: int) -> np.ndarray:
    """Move ``axis`` last and reshape it to (groups, nblocks, B), zero-padding each segment."""
    moved = np.moveaxis(x, axis, -1)
    outer = moved.shape[:-1]
    segment = moved.shape[-1] // groups
    nblocks = -(-segment // fmt.block_size)
    padded_segment = nblocks * fmt.block_size
    segments = moved.reshape(*outer, groups, segment)
    if padded_segment != segment:
        padded = np.zeros((*outer, groups, padded_segment), dtype=x.dtype)
        padded[..., :segment] = segments
        segments = padded
    return segments.reshape(*outer, groups, nblocks, fmt.block_size)


def _block_exponents(blocks: np.ndarray, fmt: BFPFormat) -> np.ndarray:
    """int8 shared exponents: floor(log2(max |x|)) of each block, clamped to [emin, emax].

    Read from the float32 exponent field, as a kernel would. That field equals floor(log2(a))
    for normal a, and reads -127 for zero and subnormals, whose true floor(log2) is <= -127;
    since emin >= -127 the clamped results agree exactly (zero blocks get emin).
    """
    abs_bits = blocks.view(np.uint32) & np.uint32(0x7FFFFFFF)
    # for non-negative finite floats the bit patterns order like the values
    max_bits = abs_bits.max(axis=-1, initial=np.uint32(0))
    biased = (max_bits >> np.uint32(23)).astype(np.int16)
    exponents = biased - np.int16(_FLOAT32_EXPONENT_BIAS)
    return np.clip(exponents, fmt.emin, fmt.emax).astype(np.int8)


def _block_scales(exponents: np.ndarray, fmt: BFPFormat) -> np.ndarray:
    """float32 scales 2**(e - (m - 2)); exact powers of two, subnormal below 2**-126."""
    shifts = exponents.astype(np.int32) - fmt.scale_shift
    return np.ldexp(np.float32(1.0), shifts).astype(np.float32, copy=False)
