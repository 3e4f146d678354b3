"""NumPy oracle of the integer BFP matmul: activation quantizer, exact reference and tolerance.

Every matmul variant (:mod:`.bfp_matmul_variants`) is checked against :func:`bfp_matmul_ref`
within :func:`bfp_matmul_tolerance`: tests, benches and the verification of tuned kernels
(:mod:`bitq_tvm.tuning.verify`). Weights come from the one packer (:mod:`.packing`).
"""

from __future__ import annotations

import numpy as np

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .contract import check_block_size

__all__ = ["quantize_activations_np", "bfp_matmul_ref", "bfp_matmul_tolerance"]

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
