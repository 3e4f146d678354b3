"""The integer BFP matmul shared by every target: ``C = A @ W.T`` with BFP activations and weights.

This module holds the compute, the kernel name and the register tiling every schedule shares;
the schedules per ISA are :mod:`.bfp_matmul_x86` and :mod:`.bfp_matmul_arm_riscv`, the entry
point for any variant :mod:`.bfp_matmul_variants`, the NumPy oracle :mod:`.oracle` and the weight
packer :mod:`.packing`; the constants (lanes, K quad, offset, bounds) are in :mod:`.contract`.

A [M, K] is quantized per row along K, W [N, K] per row along K, both with the same block size B
(a multiple of 4 in [8, 128]); K is zero-padded to ``Kp = nb * B``. With mantissa widths ma, mw::

    C[i, j] = sum_b 2**(ea[i,b] + ew[j,b] - (ma-2) - (mw-2)) * sum_{k in block b} qa[i,k] * qw[j,k]

Integer part. x86's ``vpdpbusd`` multiplies unsigned by signed bytes, so the x86 kernel offsets
activations, ``qa + 128`` (uint8), and adds ``wcorr[j,b] = -128 * sum_{k in b} qw[j,k]``
(derived from the packed weights, :mod:`.packing`) to each block's int32 sum, which removes the
offset exactly; ARM's and RISC-V's dot products multiply signed by signed bytes (the ``signed``
form of :func:`bfp_matmul_compute`), which leaves ``wcorr`` unread. Every
partial sum is bounded by ``255 * 128 * B < 2**22``: the int32 block sums are exact, and the
corrected sum ``s`` (|s| <= 128 * 128 * B <= 2**21) converts to float32 exactly.

Scaling. Each block term is ``(float32(s) * sw[j,b]) * sa[i,b]`` with the exact powers of two
``sw = 2**(ew - (mw-2))`` (float32, from the packed weights) and ``sa = 2**(ea - (ma-2))``
(float32, built in the kernel from the exponent bits, subnormal when below 2**-126). The combined
exponent reaches down to -266 with 8-bit exponents, and all-zero blocks sit at ``emin = -127``, so
the far low end occurs in practice. The first product is exact: |s| < 2**22 and any integer
multiple of 2**k (k >= -149) below 2**128 with at most 24 significant bits is a float32. The
second is one IEEE rounding of the exact value. So every block term is the correctly rounded
float32 of ``s * 2**E`` (zero, subnormal, normal or inf alike), exactly the NumPy reference's
term, and only the float32 sum over the nb blocks rounds (:func:`.oracle.bfp_matmul_tolerance`).
Exactness of the first product needs ``ew - (mw-2) <= 105``: the packer rejects weight
blocks with max |w| >= 2**(106 + mw - 2) (about 1e32), far beyond any trained network.
Two multiplies by precomputed scales keep the per-block epilogue at five vector instructions
(add, convert, 2 x mul, add), which matters next to the B/4 ``vpdpbusd`` of a block.

Weight layout (:mod:`.packing`): ``qw [Np/16, Kp/4, 16, 4]`` int8 with N padded to ``Np``, a
multiple of 16, so the 16 outputs x 4 K values of one ``vpdpbusd`` are 64 contiguous bytes;
``sw [nb, Np]`` float32 and ``wcorr [nb, Np]`` int32, transposed so that 16 outputs of one block
load as one vector in the scaling epilogue.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..formats import BFPFormat
from .contract import ACTIVATION_OFFSET, K_QUAD, LANES, check_block_size, padded
from .float_bits import power_of_two

__all__ = [
    "LOOP_ORDERS",
    "bfp_matmul_name",
    "check_formats",
    "bfp_matmul_operands",
    "activation_scales",
    "bfp_matmul_prim_func",
    "bfp_matmul_compute",
    "tile_bfp_matmul",
]

LOOP_ORDERS = ("columns_outer", "rows_outer")


def _format_tag(fmt: BFPFormat) -> str:
    tag = f"{fmt.mantissa_bits}b{fmt.block_size}"
    return tag if fmt.exponent_bits == 8 else f"{tag}e{fmt.exponent_bits}"


def bfp_matmul_name(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str) -> str:
    """Deterministic kernel name, also the tuning-database key of the kernel.

    ``K`` is the padded reduction length; e.g. ``bfp_matmul_m196_n256_k2304_a8b32_w8b32_vnni``.
    """
    return f"bfp_matmul_m{M}_n{N}_k{K}_a{_format_tag(fmt_a)}_w{_format_tag(fmt_w)}_{variant}"


def check_formats(fmt_a: BFPFormat, fmt_w: BFPFormat) -> int:
    """The block size the two formats share; BitqError if they differ or the kernel cannot take it."""
    if fmt_a.block_size != fmt_w.block_size:
        raise BitqError(
            f"bfp_matmul: activation format {fmt_a.name} and weight format {fmt_w.name} "
            "must share one block size"
        )
    check_block_size(fmt_a.block_size, "bfp_matmul")
    return fmt_a.block_size


def bfp_matmul_operands(M: int, N: int, K: int, block: int) -> tuple[te.Tensor, ...]:
    """Placeholders ``(qa, ea, qw, sw, wcorr)`` of every matmul variant (shapes in
    :func:`bfp_matmul_compute`); K pads to whole blocks, N to whole 16-lane tiles."""
    if min(M, N, K) <= 0:
        raise BitqError(f"bfp_matmul: shape M={M}, N={N}, K={K} must be positive")
    k_padded = padded(K, block)
    nb = k_padded // block
    n_padded = padded(N, LANES)
    return (
        te.placeholder((M, k_padded), "int8", name="qa"),
        te.placeholder((M, nb), "int8", name="ea"),
        te.placeholder((n_padded // LANES, k_padded // K_QUAD, LANES, K_QUAD), "int8", name="qw"),
        te.placeholder((nb, n_padded), "float32", name="sw"),
        te.placeholder((nb, n_padded), "int32", name="wcorr"),
    )


def activation_scales(ea: te.Tensor, fmt_a: BFPFormat) -> te.Tensor:
    """``a_scale`` [M, nb]: the exact powers of two 2**(ea - (ma-2)) of the activation blocks."""
    return te.compute(
        ea.shape,
        lambda i, b: power_of_two(ea[i, b].astype("int32") - (fmt_a.mantissa_bits - 2)),
        name="a_scale",
    )


def bfp_matmul_prim_func(tensors) -> tirx.PrimFunc:
    """The PrimFunc of ``(qa, ea, qw, sw, wcorr, C)``, global symbol ``bfp_matmul``."""
    return te.create_prim_func(list(tensors)).with_attr("global_symbol", "bfp_matmul")


def bfp_matmul_compute(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat,
                       signed: bool = False) -> tirx.PrimFunc:
    """Unscheduled PrimFunc ``(qa, ea, qw, sw, wcorr, C)`` of the integer BFP matmul.

    Shapes: qa int8 [M, Kp], ea int8 [M, nb], qw int8 [Np/16, Kp/4, 16, 4], sw float32 [nb, Np],
    wcorr int32 [nb, Np], C float32 [M, N]. Blocks: ``a_u8`` (offset activations; unsigned
    form only), ``a_scale`` (activation block scales), ``block_sum`` (int32 per block), ``acc``
    (scaled sum over blocks), ``C`` (unpadded copy). ``signed``: the s8 x s8 form of ARM and
    RISC-V dot products, which multiplies ``qa`` directly and leaves ``wcorr`` unread.
    """
    block = check_formats(fmt_a, fmt_w)
    qa, ea, qw, sw, wcorr = operands = bfp_matmul_operands(M, N, K, block)
    nb, n_padded = (int(d) for d in sw.shape)
    k_padded = int(qa.shape[1])
    if signed:
        a_in = qa
    else:
        a_in = te.compute(
            (M, k_padded),
            lambda i, k: (qa[i, k].astype("int32") + ACTIVATION_OFFSET).astype("uint8"),
            name="a_u8",
        )
    a_scale = activation_scales(ea, fmt_a)
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
    return bfp_matmul_prim_func([*operands, c])


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
