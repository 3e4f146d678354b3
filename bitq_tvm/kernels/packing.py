"""The one packer of BFP weights for the integer matmul, and the run-time kernel that expands them.

Stored artifact (relax constants, per layer): ``qw`` mantissas in the matmul's tile layout
(``[Np/16, Kp/4, 16, 4]`` int8: the 16 outputs x 4 K values of one ``vpdpbusd`` are 64
contiguous bytes) or, when
m <= 4, two mantissas per byte (``[Np/16, Kp/4, 16, 2]`` uint8: low nibble = even K, high nibble
= odd K, two's complement), plus one int8 exponent per block, ``ew [nb, Np]``. That is
``B * m/8 + 1`` bytes per block: 33/128 = 0.258x FP32 at bfp8_b32, 17/128 = 0.133x at bfp4_b32
(before N/K padding).

The matmul kernel wants ``sw [nb, Np]`` float32 scales and ``wcorr [nb, Np]`` int32 offset
corrections (8 bytes per block: storing them would make bfp8_b32 0.32x FP32), and unpacked int8
mantissas. :func:`bfp_weight_expand_func` derives them at run time, one pass over the stored bytes
per inference: the price of the compact artifact, measured in ``bench/bench_end_to_end.py``.
Its ``call_tir`` has a tuple output, which TVM 0.27's ``FoldConstant`` does not fold (it folds
single-output calls only), so the expansion is not undone at compile time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import te, tirx

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .contract import (ACTIVATION_OFFSET, K_QUAD, LANES, MAX_WEIGHT_SCALE_EXPONENT, NIBBLE_MAX_MANTISSA_BITS,
                       block_size_problem, check_block_size, padded)
from .float_bits import power_of_two

__all__ = ["PackedWeights", "pack_quantized", "pack_weights", "bfp_weight_expand_func"]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeights:
    """Stored BFP weights of one [N, K] matmul operand (see module docstring for the layout).

    Attributes
    ----------
    qw : int8 [Np/16, Kp/4, 16, 4], or uint8 [Np/16, Kp/4, 16, 2] nibble pairs when m <= 4.
    ew : int8 [nb, Np] block exponents (padded outputs: emin, with zero mantissas).
    fmt : the weight format.
    n : unpadded output count N.
    """

    qw: np.ndarray
    ew: np.ndarray
    fmt: BFPFormat
    n: int

    def __post_init__(self):
        tiles, quads, lanes, width = self.qw.shape
        expected_width = 2 if self.nibbles else K_QUAD
        if lanes != LANES or width != expected_width or self.ew.shape != (quads * K_QUAD // self.fmt.block_size,
                                                                            tiles * LANES):
            raise BitqError(f"PackedWeights: qw {self.qw.shape} and ew {self.ew.shape} do not fit "
                            f"format {self.fmt.name}")

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

    def mantissas(self) -> np.ndarray:
        """Unpacked int8 mantissas [Np, Kp] (for tests and the NumPy reference)."""
        q = self.qw
        if self.nibbles:
            q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(*q.shape[:-1], K_QUAD).astype(np.int16)
            q = ((q ^ 8) - 8).astype(np.int8)
        return q.transpose(0, 2, 1, 3).reshape(self.n_padded, self.k_padded)

    def expanded(self) -> dict[str, np.ndarray]:
        """NumPy twin of :func:`bfp_weight_expand_func`: the matmul's weight operands ``qw`` int8
        [Np/16, Kp/4, 16, 4], ``sw`` float32 [nb, Np] (block scales 2**(e - (m-2))), ``wcorr``
        int32 [nb, Np] (-128 x per-block mantissa sum: cancels the x86 activation offset)."""
        q = self.mantissas()
        block_sums = q.reshape(self.n_padded, -1, self.fmt.block_size).astype(np.int32).sum(-1)
        return {
            "qw": q.reshape(-1, LANES, self.k_padded // K_QUAD, K_QUAD).transpose(0, 2, 1, 3).copy(),
            "sw": np.ldexp(np.float32(1), self.ew.astype(np.int32) - self.fmt.scale_shift).astype(np.float32),
            "wcorr": (-ACTIVATION_OFFSET * block_sums.T).astype(np.int32),
        }


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
        nib = tiles.astype(np.uint8) & 0xF
        tiles = nib[..., 0::2] | (nib[..., 1::2] << 4)
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


def bfp_weight_expand_func(packed: PackedWeights) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(qw_stored, ew, [qw], sw, wcorr)`` deriving the matmul's weight operands.

    ``qw`` (int8 tiles) is an output only for nibble-packed weights; 8-bit mantissas are read
    by the matmul from the stored constant directly.
    """
    fmt = packed.fmt
    tiles, quads = packed.qw.shape[:2]
    nb, n_padded = packed.ew.shape
    stored = te.placeholder(packed.qw.shape, str(packed.qw.dtype), name="qw_stored")
    ew = te.placeholder(packed.ew.shape, "int8", name="ew")

    if packed.nibbles:
        def unpack(t, kq, lane, i):
            byte = stored[t, kq, lane, i // 2].astype("int32")
            nibble = tirx.Select(i % 2 == 0, byte & 0xF, byte >> 4)
            return ((nibble ^ 8) - 8).astype("int8")  # sign-extend 4-bit two's complement
        qw = te.compute((tiles, quads, LANES, K_QUAD), unpack, name="qw")
    else:
        qw = stored
    rq = te.reduce_axis((0, fmt.block_size // K_QUAD), name="rq")
    rl = te.reduce_axis((0, K_QUAD), name="rl")
    wcorr = te.compute(
        (nb, n_padded),
        lambda b, j: te.sum(qw[j // LANES, b * (fmt.block_size // K_QUAD) + rq, j % LANES, rl].astype("int32")
                            * -ACTIVATION_OFFSET, axis=[rq, rl]),
        name="wcorr")
    sw = te.compute((nb, n_padded), lambda b, j: power_of_two(ew[b, j].astype("int32") - fmt.scale_shift),
                    name="sw")
    outputs = ([qw] if packed.nibbles else []) + [sw, wcorr]
    sch = tvm.s_tir.Schedule(te.create_prim_func([stored, ew, *outputs]))

    if packed.nibbles:
        q_block = sch.get_sblock("qw")
        t, kq, lane, i = sch.get_loops(q_block)
        sch.parallel(sch.fuse(t, kq))
        sch.vectorize(sch.fuse(lane, i))
    sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("sw"))))
    sum_block = sch.get_sblock("wcorr")
    b, j, rq_loop, rl_loop = sch.get_loops(sum_block)
    j_tile, j_lane = sch.split(j, factors=[None, LANES])
    sch.reorder(b, j_tile, rq_loop, rl_loop, j_lane)
    task = sch.fuse(b, j_tile)
    sch.parallel(task)
    init = sch.decompose_reduction(sum_block, rq_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
