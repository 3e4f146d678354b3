"""Integer BFP matmul for x86: ``C = A @ W.T`` with BFP activations and weights.

A [M, K] is quantized per row along K, W [N, K] per row along K, both with the same block size B
(a multiple of 4 in [8, 128]); K is zero-padded to ``Kp = nb * B``. With mantissa widths ma, mw::

    C[i, j] = sum_b 2**(ea[i,b] + ew[j,b] - (ma-2) - (mw-2)) * sum_{k in block b} qa[i,k] * qw[j,k]

Integer part. ``vpdpbusd`` multiplies unsigned by signed bytes, so the kernel offsets activations,
``qa + 128`` (uint8), and adds ``wcorr[j,b] = -128 * sum_{k in b} qw[j,k]`` (precomputed by
:func:`pack_weights`) to each block's int32 sum, which removes the offset exactly. Every
partial sum is bounded by ``255 * 128 * B < 2**22``: the int32 block sums are exact, and the
corrected sum ``s`` (|s| <= 128 * 128 * B <= 2**21) converts to float32 exactly.

Scaling. Each block term is ``(float32(s) * sw[j,b]) * sa[i,b]`` with the exact powers of two
``sw = 2**(ew - (mw-2))`` (float32, from :func:`pack_weights`) and ``sa = 2**(ea - (ma-2))``
(float32, built in the kernel from the exponent bits, subnormal when below 2**-126). The combined
exponent reaches down to -266 with 8-bit exponents, and all-zero blocks sit at ``emin = -127``, so
the far low end occurs in practice. The first product is exact: |s| < 2**22 and any integer
multiple of 2**k (k >= -149) below 2**128 with at most 24 significant bits is a float32. The
second is one IEEE rounding of the exact value. So every block term is the correctly rounded
float32 of ``s * 2**E`` (zero, subnormal, normal or inf alike), exactly the NumPy reference's
term, and only the float32 sum over the nb blocks rounds (:func:`bfp_matmul_tolerance`).
Exactness of the first product needs ``ew - (mw-2) <= 105``: :func:`pack_weights` rejects weight
blocks with max |w| >= 2**(106 + mw - 2) (about 1e32), far beyond any trained network.
Two multiplies by precomputed scales keep the per-block epilogue at five vector instructions
(add, convert, 2 x mul, add), which matters next to the B/4 ``vpdpbusd`` of a block.

Weight layout (``pack_weights``): ``qw [Np/16, Kp/4, 16, 4]`` int8 with N padded to ``Np``, a
multiple of 16, so the 16 outputs x 4 K values of one ``vpdpbusd`` are 64 contiguous bytes;
``sw [nb, Np]`` float32 and ``wcorr [nb, Np]`` int32, transposed so that 16 outputs of one block
load as one vector in the scaling epilogue.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from .float_bits import power_of_two
from .intrin_x86 import BITQ_AVX2_DOT_8x4, BITQ_VNNI_DOT_16x4

__all__ = [
    "VARIANTS",
    "bfp_matmul_name",
    "padded_rows",
    "pack_weights",
    "quantize_activations_np",
    "bfp_matmul_ref",
    "bfp_matmul_tolerance",
    "bfp_matmul_compute",
    "bfp_matmul_func",
    "schedule_bfp_matmul",
]

VARIANTS = ("vnni", "avx2", "generic")
# Output lanes per packed weight tile: one AVX-512 register of int32 accumulators.
LANES = 16
# K values per lane in one vpdpbusd / vpmaddwd pair.
K_QUAD = 4
_ACTIVATION_OFFSET = 128
# float32(s) * 2**k is exact for |s| < 2**22 only while 2**(22 + k) stays below 2**128
_MAX_WEIGHT_SCALE_EXPONENT = 105
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _format_tag(fmt: BFPFormat) -> str:
    tag = f"{fmt.mantissa_bits}b{fmt.block_size}"
    return tag if fmt.exponent_bits == 8 else f"{tag}e{fmt.exponent_bits}"


def bfp_matmul_name(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str) -> str:
    """Deterministic kernel name, also the tuning-database key of the kernel.

    ``K`` is the padded reduction length; e.g. ``bfp_matmul_m196_n256_k2304_a8b32_w8b32_vnni``.
    """
    return f"bfp_matmul_m{M}_n{N}_k{K}_a{_format_tag(fmt_a)}_w{_format_tag(fmt_w)}_{variant}"


def padded_rows(rows: int) -> int:
    """Matmul rows to compute: the matmul's register tile takes 4, 3, 2 or 1 rows dividing M, and
    one-row tiles run at a third of the speed (measured 224 vs 728 GOPS at 49 vs 52 x 512 x 4608),
    so a row count with no divisor among 4, 3, 2 is padded to a multiple of 4."""
    if rows <= 4 or any(rows % r == 0 for r in (4, 3, 2)):
        return rows
    return -(-rows // 4) * 4


def _check_block_size(block_size: int, what: str) -> None:
    if block_size % K_QUAD or not 8 <= block_size <= 128:
        raise BitqError(f"{what}: block size {block_size} must be a multiple of 4 in [8, 128]")


def _check_formats(fmt_a: BFPFormat, fmt_w: BFPFormat) -> int:
    if fmt_a.block_size != fmt_w.block_size:
        raise BitqError(
            f"bfp_matmul: activation format {fmt_a.name} and weight format {fmt_w.name} "
            "must share one block size"
        )
    _check_block_size(fmt_a.block_size, "bfp_matmul")
    return fmt_a.block_size


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_weights(w: np.ndarray, fmt: BFPFormat, name: str = "weight") -> dict[str, np.ndarray]:
    """Quantize weights W [N, K] along K and pack them for :func:`bfp_matmul_func`.

    Returns
    -------
    dict with ``qw`` int8 [Np/16, Kp/4, 16, 4], ``sw`` float32 [nb, Np] (block scales
    2**(e - (m-2))), ``wcorr`` int32 [nb, Np] (-128 x per-block mantissa sum: cancels the
    activation offset); padded outputs have zero mantissas.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise BitqError(f"pack_weights: {name} must be 2-D [N, K], got shape {w.shape}")
    _check_block_size(fmt.block_size, f"pack_weights({name})")
    n, _ = w.shape
    t = quantize_np(w.astype(np.float32), fmt, axis=-1, name=name)
    nb = t.exponents.shape[-1]
    q = t.mantissas.reshape(n, nb * fmt.block_size)
    n_padded = _padded(n, LANES)
    q_padded = np.zeros((n_padded, q.shape[1]), np.int8)
    q_padded[:n] = q
    qw = q_padded.reshape(n_padded // LANES, LANES, -1, K_QUAD).transpose(0, 2, 1, 3)
    weight_exponents = t.exponents.reshape(n, nb).astype(np.int32) - (fmt.mantissa_bits - 2)
    if weight_exponents.max() > _MAX_WEIGHT_SCALE_EXPONENT:
        limit = _MAX_WEIGHT_SCALE_EXPONENT + 1 + fmt.mantissa_bits - 2
        raise BitqError(
            f"pack_weights: {name} has a block with max |w| >= 2**{limit}, "
            "beyond the exact scaling range of the integer kernel"
        )
    sw = np.zeros((nb, n_padded), np.float32)
    sw[:, :n] = np.ldexp(np.float32(1), weight_exponents.T)
    wcorr = np.zeros((nb, n_padded), np.int32)
    block_sums = t.mantissas.reshape(n, nb, fmt.block_size).astype(np.int32).sum(-1)
    wcorr[:, :n] = -_ACTIVATION_OFFSET * block_sums.T
    return {"qw": np.ascontiguousarray(qw), "sw": sw, "wcorr": wcorr}


def quantize_activations_np(
    a: np.ndarray, fmt: BFPFormat, name: str = "activation"
) -> dict[str, np.ndarray]:
    """Quantize activations A [M, K] along K for :func:`bfp_matmul_func`.

    Returns
    -------
    dict with ``qa`` int8 [M, Kp] (mantissas, zero-padded) and ``ea`` int8 [M, nb].
    """
    a = np.asarray(a)
    if a.ndim != 2:
        raise BitqError(f"quantize_activations_np: {name} must be 2-D [M, K], got shape {a.shape}")
    _check_block_size(fmt.block_size, f"quantize_activations_np({name})")
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


def bfp_matmul_compute(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat,
                       signed: bool = False) -> tirx.PrimFunc:
    """Unscheduled PrimFunc ``(qa, ea, qw, sw, wcorr, C)`` of the integer BFP matmul.

    Shapes: qa int8 [M, Kp], ea int8 [M, nb], qw int8 [Np/16, Kp/4, 16, 4], sw float32 [nb, Np],
    wcorr int32 [nb, Np], C float32 [M, N]. Blocks: ``a_u8`` (offset activations; unsigned
    form only), ``a_scale`` (activation block scales), ``block_sum`` (int32 per block), ``acc``
    (scaled sum over blocks), ``C`` (unpadded copy). ``signed``: the s8 x s8 form of ARM and
    RISC-V dot products, which multiplies ``qa`` directly and leaves ``wcorr`` unread.
    """
    block = _check_formats(fmt_a, fmt_w)
    if min(M, N, K) <= 0:
        raise BitqError(f"bfp_matmul: shape M={M}, N={N}, K={K} must be positive")
    k_padded = _padded(K, block)
    nb = k_padded // block
    n_padded = _padded(N, LANES)

    qa = te.placeholder((M, k_padded), "int8", name="qa")
    ea = te.placeholder((M, nb), "int8", name="ea")
    qw = te.placeholder((n_padded // LANES, k_padded // K_QUAD, LANES, K_QUAD), "int8", name="qw")
    sw = te.placeholder((nb, n_padded), "float32", name="sw")
    wcorr = te.placeholder((nb, n_padded), "int32", name="wcorr")

    if signed:
        a_in = qa
    else:
        a_in = te.compute(
            (M, k_padded),
            lambda i, k: (qa[i, k].astype("int32") + _ACTIVATION_OFFSET).astype("uint8"),
            name="a_u8",
        )
    a_scale = te.compute(
        (M, nb),
        lambda i, b: power_of_two(ea[i, b].astype("int32") - (fmt_a.mantissa_bits - 2)),
        name="a_scale",
    )
    rq = te.reduce_axis((0, block // K_QUAD), name="rq")
    rl = te.reduce_axis((0, K_QUAD), name="rl")
    # j last: a tensor intrinsic only matches a region contiguous in the innermost dimension.
    block_sum = te.compute(
        (M, nb, n_padded),
        lambda i, b, j: te.sum(
            a_in[i, b * block + rq * K_QUAD + rl].astype("int32")
            * qw[j // LANES, b * (block // K_QUAD) + rq, j % LANES, rl].astype("int32"),
            axis=[rq, rl],
        ),
        name="block_sum",
    )
    rb = te.reduce_axis((0, nb), name="rb")
    acc = te.compute(
        (M, n_padded),
        lambda i, j: te.sum(
            (block_sum[i, rb, j] if signed else block_sum[i, rb, j] + wcorr[rb, j]).astype("float32")
            * sw[rb, j] * a_scale[i, rb],
            axis=rb,
        ),
        name="acc",
    )
    c = te.compute((M, N), lambda i, j: acc[i, j], name="C")
    return te.create_prim_func([qa, ea, qw, sw, wcorr, c]).with_attr("global_symbol", "bfp_matmul")


def _default_tile(M: int, n_tiles: int) -> tuple[int, int]:
    """(rows, 16-lane column groups) of one register tile; rows divide M, groups divide n_tiles.

    4 x 2: 8 int32 block accumulators + 8 float32 output accumulators + loads fit the 32 zmm
    registers (measured best of 4x1, 4x2, 4x4, 8x1, 2x2, 2x4 at M = 16, 128, 512). A one-row
    tile (GEMV, or M prime) takes 4 column groups instead.
    """
    rows = next(r for r in (4, 3, 2, 1) if M % r == 0)
    max_groups = 4 if rows == 1 else 2
    groups = next(g for g in range(max_groups, 0, -1) if n_tiles % g == 0)
    return rows, groups


def tile_bfp_matmul(sch: Schedule, rows: int, groups: int, order: str):
    """The register tiling every BFP matmul schedule shares (x86, ARM, RISC-V).

    Parallel over tiles of ``rows`` x ``groups`` x 16 outputs, the block loop inside, the int32
    block sums computed per block under it. Returns the ``acc`` and ``block_sum`` blocks,
    ``acc``'s loops (tile, b, rows, groups, lanes) and ``block_sum``'s (rows (empty for a one-row
    tile), columns, K quads, K within a quad).
    """
    acc = sch.get_sblock("acc")
    i, j, b = sch.get_loops(acc)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_group, j_lane = sch.split(j, [None, groups, LANES])
    # Column tiles outermost: one task re-reads a [rows, K] activation panel per column tile
    # (1/(16 * groups) of A per output row), instead of a [16 * groups, K] weight panel per row
    # tile, which is rows / (16 * groups) less traffic when M and N are both large.
    outer = (j_outer, i_outer) if order == "columns_outer" else (i_outer, j_outer)
    sch.reorder(*outer, b, i_inner, j_group, j_lane)
    tile_loop = sch.fuse(*outer)
    sch.parallel(tile_loop)

    block_sum = sch.get_sblock("block_sum")
    sch.compute_at(block_sum, b)
    # Loops compute_at creates below (tile, b); a one-row tile gets no row loop.
    *s_row, s_col, s_quad, s_lane_k = sch.get_loops(block_sum)[2:]
    return acc, block_sum, (tile_loop, b, i_inner, j_group, j_lane), (s_row, s_col, s_quad, s_lane_k)


def schedule_bfp_matmul(sch: Schedule, k_padded: int, rows: int, groups: int, variant: str,
                        order: str = "columns_outer", intrinsic: str | None = None) -> None:
    """Schedule the :func:`bfp_matmul_compute` kernel in ``sch`` with one register tile.

    ``rows`` x ``groups`` x 16 outputs per tile (rows dividing M); ``order`` puts column tiles
    (``"columns_outer"``, the default) or row tiles outermost; ``intrinsic`` overrides the
    variant's tensor intrinsic (the tuning tests plant a wrong one). Tuning searches the tile and
    the order (:mod:`bitq_tvm.tuning.tasks`); :func:`bfp_matmul_func` uses a measured default.
    """
    if intrinsic is None:
        intrinsic = {"vnni": BITQ_VNNI_DOT_16x4, "avx2": BITQ_AVX2_DOT_8x4, "generic": None}[variant]
    acc, block_sum, (tile_loop, b, i_inner, j_group, j_lane), (s_row, s_col, s_quad, s_lane_k) = \
        tile_bfp_matmul(sch, rows, groups, order)
    s_group, s_lane = sch.split(s_col, [groups, LANES])
    for loop in (*s_row, s_group):
        sch.unroll(loop)
    if intrinsic is None:
        # vectorize must precede decompose_reduction (TVM 0.27 rejects it afterwards)
        sch.reorder(s_quad, s_lane_k, *s_row, s_group, s_lane)
        sch.unroll(s_lane_k)
        sch.vectorize(s_lane)
    else:
        sch.reorder(s_quad, *s_row, s_group, s_lane, s_lane_k)
    s_init = sch.decompose_reduction(block_sum, s_quad)
    *init_outer, init_lane = sch.get_loops(s_init)[2:]
    for loop in init_outer:
        sch.unroll(loop)
    sch.vectorize(init_lane)
    if intrinsic == BITQ_AVX2_DOT_8x4:
        sch.tensorize(sch.split(s_lane, [None, LANES // 2])[1], intrinsic)
    elif intrinsic is not None:
        sch.tensorize(s_lane, intrinsic)

    sch.vectorize(j_lane)
    sch.unroll(i_inner)
    sch.unroll(j_group)
    acc_init = sch.decompose_reduction(acc, b)
    sch.vectorize(sch.get_loops(acc_init)[-1])

    out = sch.get_sblock("C")
    sch.reverse_compute_at(out, tile_loop)
    *o_row, o_col = sch.get_loops(out)[1:]
    for loop in o_row:
        sch.unroll(loop)
    sch.vectorize(sch.split(o_col, [None, LANES])[-1])

    a_u8 = sch.get_sblock("a_u8")
    a_row, a_col = sch.get_loops(a_u8)
    sch.parallel(a_row)
    a_vector = next(v for v in (64, 32, 16, 8, 4) if k_padded % v == 0)
    sch.vectorize(sch.split(a_col, [None, a_vector])[-1])


def bfp_matmul_func(
    M: int,
    N: int,
    K: int,
    fmt_a: BFPFormat,
    fmt_w: BFPFormat,
    variant: str = "vnni",
    tile: tuple[int, int] | None = None,
) -> tirx.PrimFunc:
    """Hand-scheduled integer BFP matmul PrimFunc (signature of :func:`bfp_matmul_compute`).

    variant: ``"vnni"`` (AVX-512 VNNI ``vpdpbusd``, needs an ``avx512vnni`` target), ``"avx2"``
    (``vpmaddwd`` on sign-extended int16, needs ``avx2``), ``"generic"`` (plain int32 TIR that
    LLVM vectorises; any target). Parallel over (column tile, row tile); per tile the int32 block
    sums and the float32 outputs stay in registers across the K loop. ``tile`` = (rows, groups of
    16 columns) overrides the default register tile; rows must divide M, 16 * groups divide Np.
    """
    if variant not in VARIANTS:
        raise BitqError(f"bfp_matmul: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    func = bfp_matmul_compute(M, N, K, fmt_a, fmt_w)
    n_tiles = _padded(N, LANES) // LANES
    rows, groups = tile if tile is not None else _default_tile(M, n_tiles)
    if M % rows or n_tiles % groups:
        raise BitqError(
            f"bfp_matmul: tile {(rows, groups)} does not divide M={M} rows "
            f"and {n_tiles} column groups"
        )
    sch = Schedule(func)
    schedule_bfp_matmul(sch, _padded(K, fmt_a.block_size), rows, groups, variant)
    return sch.mod["main"]
