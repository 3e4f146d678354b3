"""NumPy oracle of the BFP kernels: activation quantizer, exact references and tolerances.

Every matmul variant (:mod:`.bfp_matmul_variants`) is checked against :func:`bfp_matmul_ref`
within :func:`bfp_matmul_tolerance`: tests, benches and the verification of tuned kernels
(:mod:`bitq_tvm.tuning.verify`). Weights come from the one packer (:mod:`.packing`). The
depthwise kernel (:mod:`.bfp_depthwise`) is checked against :func:`bfp_depthwise_ref` within
:func:`bfp_depthwise_tolerance`.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .contract import check_block_size

__all__ = ["quantize_activations_np", "bfp_matmul_ref", "bfp_matmul_tolerance", "bfp_depthwise_ref",
           "bfp_depthwise_tolerance"]

_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def quantize_activations_np(
    a: np.ndarray, fmt: BFPFormat, name: str = "activation"
) -> dict[str, np.ndarray]:
    """Quantize activations A [M, K] along K for the matmul kernel.

    Returns
    -------
    dict with ``qa`` int8 [M, Kp] (mantissas, zero-padded) and ``ea`` int8 [M, nb].
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise BitqError(f"quantize_activations_np: {name} must be 2-D [M, K], got shape {a.shape}")
    check_block_size(fmt.block_size, f"quantize_activations_np({name})")
    t = quantize_np(a.astype(np.float32), fmt, axis=-1, name=name)
    m = a.shape[0]
    nb = t.exponents.shape[-1]
    return {
        "qa": np.ascontiguousarray(t.mantissas.reshape(m, nb * fmt.block_size)),
        "ea": np.ascontiguousarray(t.exponents.reshape(m, nb)),
    }


def _block_terms(qa, ea, qw, ew, block_size: int, ma: int, mw: int) -> np.ndarray:
    """Exact block terms [M, N, nb] as float64 (int64 block sums times exact powers of two)."""
    m, kp = qa.shape
    n = qw.shape[0]
    nb = kp // block_size
    sums = np.einsum(
        "mbk,nbk->mnb",
        qa.reshape(m, nb, block_size).astype(np.int64),
        qw.reshape(n, nb, block_size).astype(np.int64),
    )
    exponent = ea.astype(np.int64)[:, None, :] + ew.astype(np.int64)[None, :, :]
    exponent -= (ma - 2) + (mw - 2)
    return np.ldexp(sums.astype(np.float64), exponent)


def bfp_matmul_ref(qa, ea, qw, ew, block_size: int, ma: int, mw: int) -> np.ndarray:
    """NumPy reference of the integer BFP matmul, float32 [M, N].

    ``qa`` int8 [M, Kp], ``ea`` [M, nb], ``qw`` int8 [N, Kp] (unpacked), ``ew`` [N, nb]. Each
    block term is the correctly rounded float32 of its exact value (as in the kernel); the terms
    are then summed in float64 and rounded once.
    """
    with np.errstate(over="ignore"):  # a term beyond float32 range is inf, as in the kernel
        terms = _block_terms(qa, ea, qw, ew, block_size, ma, mw).astype(np.float32)
    return terms.astype(np.float64).sum(-1).astype(np.float32)


def bfp_matmul_tolerance(qa, ea, qw, ew, block_size: int, ma: int, mw: int) -> np.ndarray:
    """Bound on |kernel - exact| per output: ``nb * eps32 * sum_b |term_b|`` (float64 [M, N]).

    Block terms are exact in the kernel, so only its float32 sum over nb blocks rounds; any
    summation order of nb float32 terms stays within (nb - 1) * eps32/2 * sum |term|, and one
    more rounding of the result within eps32/2 * |sum|.
    """
    terms = _block_terms(qa, ea, qw, ew, block_size, ma, mw)
    return terms.shape[-1] * _FLOAT32_EPS * np.abs(terms).sum(-1)


def _dequantized(q: np.ndarray, e: np.ndarray, m: int) -> np.ndarray:
    """Exact float64 values of mantissas ``q [..., Cp]`` with exponents ``e [..., Cp/B]`` (blocks of B
    channels; a depthwise weight's ``e [Cp]`` is one per channel)."""
    block = q.shape[-1] // e.shape[-1]
    return np.ldexp(q.astype(np.float64), np.repeat(e.astype(np.int64) - (m - 2), block, axis=-1))


def bfp_depthwise_ref(qa, ea, qw, ew, geom, ma: int, mw: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact output of the depthwise kernel and the sum of its terms' magnitudes, float64 [rows, C].

    ``qa`` int8 [N, H, W, Cp], ``ea`` [N, H, W, Cp/B], ``qw`` int8 [KH*KW, Cp], ``ew`` [Cp]
    (blocks along channels), ``geom`` a :class:`~.bfp_conv.ConvGeometry` of a depthwise conv: the
    float convolution of the dequantized operands.
    """
    a, w = _dequantized(qa, ea, ma), _dequantized(qw, ew, mw)
    kh, kw = geom.kernel
    top, left, bottom, right = geom.padding
    a = np.pad(a, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = geom.out_height, geom.out_width
    (sy, sx), (dy, dx) = geom.strides, geom.dilation
    out = np.zeros((geom.batch, oh, ow, a.shape[-1]))
    magnitude = np.zeros_like(out)
    for o in range(kh * kw):
        y0, x0 = o // kw * dy, o % kw * dx
        terms = a[:, y0:y0 + sy * (oh - 1) + 1:sy, x0:x0 + sx * (ow - 1) + 1:sx] * w[o]
        out += terms
        magnitude += np.abs(terms)
    c = geom.channels
    return out.reshape(-1, out.shape[-1])[:, :c], magnitude.reshape(-1, magnitude.shape[-1])[:, :c]


def bfp_depthwise_tolerance(magnitude: np.ndarray, offsets: int) -> np.ndarray:
    """Bound on |kernel - exact| per output: every term is exact in float32 (a product of two
    8-bit mantissas times a power of two), only the sum of ``offsets`` terms rounds."""
    return offsets * _FLOAT32_EPS * magnitude
