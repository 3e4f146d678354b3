"""The one packer of BFP weights for the integer matmul: the stored format is the format the kernels read.

Stored (relax constants of ``main``, per layer): ``qw`` mantissas in the matmul's tile layout and
``ew`` one int8 exponent per block, ``[nb, Np]`` (16 outputs of one block load as one vector in
the scaling epilogue). That is ``B * m/8 + 1`` bytes per block: 33/128 = 0.258x FP32 at
bfp8_b32, 17/128 = 0.133x at bfp4_b32 (before N/K padding). Nothing else: the kernels build each
block's scale from its exponent and unpack 4-bit mantissas in registers
(:mod:`.bfp_matmul`), so the bytes resident at run time are the stored bytes.

``qw`` tiles: one tile is the 16 outputs x 4 K values (64 mantissas) of one ``vpdpbusd``,
element ``e = lane * 4 + k``:

- m > 4: int8 ``[Np/16, Kp/4, 16, 4]``, two's complement, 64 contiguous bytes per tile;
- m <= 4: uint8 ``[Np/16, Kp/4, 32]``, two per byte: byte ``p`` holds element ``p`` in its low
  nibble and element ``p + 32`` in its high nibble (4-bit two's complement). A tile unpacks with
  one mask and one shift of the same 32 bytes (lanes 0-7 and lanes 8-15), no byte shuffles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .contract import (K_QUAD, LANES, MAX_WEIGHT_SCALE_EXPONENT, NIBBLE_MAX_MANTISSA_BITS, block_size_problem,
                       check_block_size, padded)

__all__ = ["NIBBLE_TILE_BYTES", "PackedWeights", "pack_quantized", "pack_weights"]

# Bytes of one nibble-packed 16 x 4 tile.
NIBBLE_TILE_BYTES = LANES * K_QUAD // 2


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeights:
    """Stored BFP weights of one [N, K] matmul operand (see module docstring for the layout).

    Attributes
    ----------
    qw : int8 [Np/16, Kp/4, 16, 4], or uint8 [Np/16, Kp/4, 32] nibble pairs when m <= 4.
    ew : int8 [nb, Np] block exponents (padded outputs: emin, with zero mantissas).
    fmt : the weight format.
    n : unpadded output count N.
    """

    qw: np.ndarray
    ew: np.ndarray
    fmt: BFPFormat
    n: int

    def __post_init__(self):
        tiles, quads, *tile = self.qw.shape
        expected = [NIBBLE_TILE_BYTES] if self.nibbles else [LANES, K_QUAD]
        dtype = np.uint8 if self.nibbles else np.int8
        if tile != expected or self.qw.dtype != dtype or self.ew.dtype != np.int8 or \
                self.ew.shape != (quads * K_QUAD // self.fmt.block_size, tiles * LANES):
            raise BitqError(f"PackedWeights: qw {self.qw.shape} {self.qw.dtype} and ew {self.ew.shape} "
                            f"{self.ew.dtype} do not fit format {self.fmt.name}")

    @property
    def nibbles(self) -> bool:
        return self.fmt.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS

    @property
    def n_padded(self) -> int:
        return self.qw.shape[0] * LANES

    @property
    def k_padded(self) -> int:
        return self.qw.shape[1] * K_QUAD

    @property
    def nbytes(self) -> int:
        """Bytes stored in the artifact for this weight (equals :func:`.contract.packed_nbytes`)."""
        return self.qw.nbytes + self.ew.nbytes

    def tiles(self) -> np.ndarray:
        """Unpacked int8 mantissa tiles [Np/16, Kp/4, 16, 4] (what the kernel unpacks in registers)."""
        q = self.qw
        if self.nibbles:
            nib = np.concatenate([q & 0xF, q >> 4], axis=-1).astype(np.int16)
            q = ((nib ^ 8) - 8).astype(np.int8).reshape(*q.shape[:2], LANES, K_QUAD)
        return q

    def mantissas(self) -> np.ndarray:
        """Unpacked int8 mantissas [Np, Kp] (for tests and the NumPy reference)."""
        return self.tiles().transpose(0, 2, 1, 3).reshape(self.n_padded, self.k_padded)


def pack_quantized(mantissas: np.ndarray, exponents: np.ndarray, fmt: BFPFormat, name: str) -> PackedWeights:
    """Pack quantized weights: ``mantissas`` int8 [N, Kp] (blocks along K), ``exponents`` [N, nb].

    Raises
    ------
    BitqError
        If a weight block is too large for the kernel's exact scaling (max |w| >= 2**(106 + m - 2)).
    """
    n, k_padded = mantissas.shape
    if k_padded % fmt.block_size or block_size_problem(fmt.block_size) or exponents.shape != (n, k_padded // fmt.block_size):
        raise BitqError(f"pack_quantized({name}): mantissas {mantissas.shape} and exponents {exponents.shape} "
                        f"do not form blocks of {fmt.block_size}")
    if int(exponents.max()) - fmt.scale_shift > MAX_WEIGHT_SCALE_EXPONENT:
        limit = MAX_WEIGHT_SCALE_EXPONENT + 1 + fmt.scale_shift
        raise BitqError(f"weight '{name}' has a block with max |w| >= 2**{limit}, "
                        "beyond the exact scaling range of the integer kernel")
    n_padded = padded(n, LANES)
    q = np.zeros((n_padded, k_padded), np.int8)
    q[:n] = mantissas
    tiles = q.reshape(n_padded // LANES, LANES, k_padded // K_QUAD, K_QUAD).transpose(0, 2, 1, 3)
    if fmt.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS:
        nib = tiles.reshape(*tiles.shape[:2], 2, NIBBLE_TILE_BYTES).astype(np.uint8) & 0xF
        tiles = nib[:, :, 0] | (nib[:, :, 1] << 4)
    ew = np.full((k_padded // fmt.block_size, n_padded), fmt.emin, np.int8)
    ew[:, :n] = exponents.T
    return PackedWeights(np.ascontiguousarray(tiles), ew, fmt, n)


def pack_weights(w: np.ndarray, fmt: BFPFormat, name: str = "weight", k_axis: int = -1) -> PackedWeights:
    """Quantize a 2-D weight along its K axis ``k_axis`` (blocks formed on the tensor as given,
    as the simulation forms them) and pack it as :func:`pack_quantized` does: W [N, K] by
    default, ``k_axis=0`` for a stored [K, N]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise BitqError(f"pack_weights: {name} must be 2-D, got shape {w.shape}")
    check_block_size(fmt.block_size, f"pack_weights({name})")
    t = quantize_np(w.astype(np.float32), fmt, axis=k_axis, name=name)
    n = w.shape[1 - k_axis % 2]
    return pack_quantized(t.mantissas.reshape(n, -1), t.exponents.reshape(n, -1), fmt, name)
