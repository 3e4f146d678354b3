"""The integer BFP matmul shared by every target: ``C = A @ W.T`` with BFP activations and weights.

This module holds the compute, the kernel name and the register tiling every schedule shares;
the schedules per ISA are :mod:`.bfp_matmul_x86` and :mod:`.bfp_matmul_arm_riscv`, the entry
point for any variant :mod:`.bfp_matmul_variants`, the NumPy oracle :mod:`.oracle` and the weight
packer :mod:`.packing`; the constants (lanes, K quad, offset, bounds) are in :mod:`.contract`.

A [M, K] is quantized per row along K, W [N, K] per row along K, both with the same block size B
(a multiple of 4 in [8, 128]); K is zero-padded to ``Kp = nb * B``. With mantissa widths ma, mw::

    C[i, j] = sum_b 2**(ea[i,b] + ew[j,b] - (ma-2) - (mw-2)) * sum_{k in block b} qa[i,k] * qw[j,k]

Integer part. ARM's and RISC-V's dot products, the AVX2 kernel (``vpmaddwd`` on sign-extended
int16) and the plain loops multiply signed by signed bytes: mantissas enter as they are (the
``signed`` form of :func:`bfp_matmul_compute`). x86's ``vpdpbusd`` multiplies unsigned by signed
bytes: the VNNI kernel offsets the *weights*, ``qw + 128`` (uint8; one xor per 64 weights, in
registers), keeps activations signed, and subtracts ``128 * asum[i,b]`` (the activation block's
mantissa sum, ``M x nb`` values per call) from each block sum, which removes the offset exactly and
needs nothing stored per weight. Every partial sum is bounded by ``255 * 128 * B < 2**22``: the
int32 block sums are exact, and the corrected sum ``s`` (|s| <= 128 * 128 * B <= 2**21) converts to
float32 exactly.

Scaling. Each block term is ``(float32(s) * sw[j,b]) * sa[i,b]`` with the exact powers of two
``sw = 2**(ew - (mw-2))`` and ``sa = 2**(ea - (ma-2))``, both built in the kernel from the stored
int8 exponents' bits (subnormal when below 2**-126). The combined
exponent reaches down to -266 with 8-bit exponents, and all-zero blocks sit at ``emin = -127``, so
the far low end occurs in practice. The first product is exact: |s| < 2**22 and any integer
multiple of 2**k (k >= -149) below 2**128 with at most 24 significant bits is a float32. The
second is one IEEE rounding of the exact value. So every block term is the correctly rounded
float32 of ``s * 2**E`` (zero, subnormal, normal or inf alike), exactly the NumPy reference's
term, and only the float32 sum over the nb blocks rounds (:func:`.oracle.bfp_matmul_tolerance`).
Exactness of the first product needs ``ew - (mw-2) <= 105``: the packer rejects weight
blocks with max |w| >= 2**(106 + mw - 2) (about 1e32), far beyond any trained network.
Two multiplies by scales built once per block and tile keep the per-block epilogue at five vector
instructions (add, convert, 2 x mul, add), which matters next to the B/4 ``vpdpbusd`` of a block.

Weights are read in their stored format (:mod:`.packing`): ``qw`` tiles of 16 outputs x 4 K
values (64 int8, or 32 bytes of nibble pairs when m <= 4) and ``ew [nb, Np]`` int8 exponents,
with N padded to ``Np``, a multiple of 16. The kernel unpacks one block of its column tile at a
time into registers/L1 (``w_tile``: sign-extended nibbles, and the VNNI offset) and builds that
block's 16-lane scales (``w_scale``) from ``ew``: no weight operand is expanded in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..formats import BFPFormat, Rounding
from . import float_math
from .contract import K_QUAD, LANES, NIBBLE_MAX_MANTISSA_BITS, WEIGHT_OFFSET, check_block_size, padded
from .float_bits import divide_by_power_of_two, exponent_field, power_of_two, round_mantissa, shared_exponent

__all__ = [
    "TunedConfig",
    "LOOP_ORDERS",
    "EPILOGUE_OPS",
    "Epilogue",
    "schedule_outputs",
    "TREE_LANES",
    "block_max_tree",
    "vectorize_rfactor",
    "quantized_outputs",
    "bfp_matmul_name",
    "check_formats",
    "bfp_matmul_operands",
    "stored_mantissa",
    "weight_scales",
    "activation_scales",
    "bfp_matmul_prim_func",
    "bfp_matmul_compute",
    "has_block",
    "has_padded_outputs",
    "row_tiles_per_task",
    "tile_bfp_matmul",
]

LOOP_ORDERS = ("columns_outer", "rows_outer")
# Widest stage of the block-maximum tree: 16 int32 lanes fail to build for RVV (MakePackedAPI loses
# the rfactor buffer; "int32xvscalex4 vs int32xvscalex16" at 4), 8 build everywhere.
TREE_LANES = 8


@dataclasses.dataclass(frozen=True)
class TunedConfig:
    """The schedule decisions of a tuned record (``bitq_tvm.tuning.tasks.tuned_config``), to
    rebuild the same schedule on another compute of the GEMM (the fused kernel deployment runs): register tile, loop order, row tiles per parallel
    task (None: the default), auto-unroll step."""

    rows: int
    groups: int
    order: str
    task_rows: int | None
    unroll: int


def _format_tag(fmt: BFPFormat) -> str:
    tag = f"{fmt.mantissa_bits}b{fmt.block_size}"
    return tag if fmt.exponent_bits == 8 else f"{tag}e{fmt.exponent_bits}"


def bfp_matmul_name(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat, variant: str) -> str:
    """Deterministic kernel name, also the tuning-database key of the kernel.

    ``K`` is the padded reduction length; e.g. ``bfp_matmul_m196_n256_k2304_a8b32_w8b32_vnni``.
    """
    return f"bfp_matmul_m{M}_n{N}_k{K}_a{_format_tag(fmt_a)}_w{_format_tag(fmt_w)}_{variant}"


def check_formats(fmt_a: BFPFormat, fmt_w: BFPFormat, what: str = "bfp_matmul") -> int:
    """The block size the two formats share; BitqError (prefixed ``what``) if they differ or the
    kernels cannot take it."""
    if fmt_a.block_size != fmt_w.block_size:
        raise BitqError(
            f"{what}: activation format {fmt_a.name} and weight format {fmt_w.name} "
            "must share one block size"
        )
    check_block_size(fmt_a.block_size, what)
    return fmt_a.block_size


def bfp_matmul_operands(M: int, N: int, K: int, fmt_w: BFPFormat) -> tuple[te.Tensor, ...]:
    """Placeholders ``(qa, ea, qw, ew)`` of every matmul variant (shapes in
    :func:`bfp_matmul_compute`); K pads to whole blocks, N to whole 16-lane tiles."""
    if min(M, N, K) <= 0:
        raise BitqError(f"bfp_matmul: shape M={M}, N={N}, K={K} must be positive")
    block = fmt_w.block_size
    k_padded = padded(K, block)
    nb = k_padded // block
    n_padded = padded(N, LANES)
    if fmt_w.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS:
        qw = te.placeholder((n_padded // LANES, k_padded // K_QUAD, LANES * K_QUAD // 2), "uint8", name="qw")
    else:
        qw = te.placeholder((n_padded // LANES, k_padded // K_QUAD, LANES, K_QUAD), "int8", name="qw")
    return (
        te.placeholder((M, k_padded), "int8", name="qa"),
        te.placeholder((M, nb), "int8", name="ea"),
        qw,
        te.placeholder((nb, n_padded), "int8", name="ew"),
    )


def stored_mantissa(qw: te.Tensor, tile, quad, lane, k) -> tirx.PrimExpr:
    """The int8 mantissa of output lane ``lane``, K value ``quad * 4 + k`` of column tile ``tile``,
    read from the stored weights ``qw`` (sign-extending a nibble when they are nibble pairs)."""
    if len(qw.shape) == 4:
        return qw[tile, quad, lane, k]
    half = LANES // 2  # lanes 0-7 in the low nibbles, 8-15 in the high ones
    byte = qw[tile, quad, (lane % half) * K_QUAD + k]
    # one read index (no Select around it) keeps the read region of a tile exact for tensorize
    nibble = (byte >> ((lane // half) * 4).astype("uint8")) & tirx.const(0xF, "uint8")
    # 4-bit two's complement: (n ^ 8) - 8, in byte arithmetic (x86 has no byte shifts)
    return (nibble ^ tirx.const(8, "uint8")).astype("int8") - tirx.const(8, "int8")


def weight_scales(ew: te.Tensor, fmt_w: BFPFormat) -> te.Tensor:
    """``w_scale`` [nb, Np]: the exact powers of two 2**(ew - (mw-2)) of the weight blocks."""
    return te.compute(ew.shape, lambda b, j: power_of_two(ew[b, j].astype("int32") - fmt_w.scale_shift),
                      name="w_scale")


def activation_scales(ea: te.Tensor, fmt_a: BFPFormat) -> te.Tensor:
    """``a_scale`` [M, nb]: the exact powers of two 2**(ea - (ma-2)) of the activation blocks."""
    return te.compute(
        ea.shape,
        lambda i, b: power_of_two(ea[i, b].astype("int32") - (fmt_a.mantissa_bits - 2)),
        name="a_scale",
    )


def bfp_matmul_prim_func(tensors) -> tirx.PrimFunc:
    """The PrimFunc of ``(qa, ea, qw, ew, C)``, global symbol ``bfp_matmul``."""
    return te.create_prim_func(list(tensors)).with_attr("global_symbol", "bfp_matmul")


# Elementwise ops an epilogue can apply, with their arity; each is the float32 operation TVM's
# legalization of the Relax op computes (topi), so the fused kernel computes the same numbers.
EPILOGUE_OPS = {"add": 2, "subtract": 2, "multiply": 2, "divide": 2, "maximum": 2, "minimum": 2,
                "relu": 1, "clip": 1, "sigmoid": 1, "tanh": 1, "erf": 1}


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What a fused matmul does with its float32 outputs before quantizing them for the next layer.

    ``expr`` is an expression tree over the matmul output: leaves ``("x",)`` (the output),
    ``("const", value)``, ``("bias", i)`` (a per-output-channel vector, kernel input) and
    ``("tensor", i)`` (another float32 tensor of the model, e.g. a residual, in the layout
    ``tensor_layouts[i]`` = (shape, channel axis), whose rows unravel the matmul rows in C
    order); nodes ``(op, *children)`` with ``op`` in :data:`EPILOGUE_OPS` (``("clip", child,
    low, high)``). The result is BFP-quantized to ``out_fmt`` with blocks along the outputs (N),
    as the next layer's activation quantizer would (:mod:`.bfp_act_quant`): the kernel returns
    that layer's int8 mantissas ``Q [M, pad(N, B')]`` and exponents ``E [M, pad(N, B') / B']``.

    Every step is the float32 operation the unfused graph performs (TVM's legalization of each
    op, then the quantizer's exponent-field maximum, power-of-two scale and round to nearest
    even), so fusing changes no number. Stochastic rounding (which hashes the NCHW flat index)
    is not fused.
    """

    out_fmt: BFPFormat
    expr: tuple = ("x",)
    tensor_layouts: tuple = ()

    def __post_init__(self):
        if self.out_fmt.rounding != Rounding.NEAREST:
            raise BitqError(f"Epilogue: output format {self.out_fmt.name} rounds stochastically; "
                            "only round-to-nearest is fused")
        _check_expr(self.expr, len(self.tensor_layouts))

    @classmethod
    def clipped(cls, out_fmt: BFPFormat, bias: bool = False, low: float | None = None,
                high: float | None = None) -> "Epilogue":
        """``clip(x + bias, low, high)`` (ReLU: ``low=0``), the common case."""
        expr = ("add", ("x",), ("bias", 0)) if bias else ("x",)
        if low == 0 and high is None:
            expr = ("relu", expr)
        elif low is not None or high is not None:
            expr = ("clip", expr, -np.inf if low is None else float(low), np.inf if high is None else float(high))
        return cls(out_fmt, expr)

    @property
    def biases(self) -> int:
        """Number of per-channel vectors the kernel takes (``("bias", i)`` leaves)."""
        return _count_leaves(self.expr, "bias")

    @property
    def ops(self) -> list[str]:
        """The ops in evaluation order (post-order), e.g. ``["add", "relu"]``."""
        return _post_order(self.expr)

    @property
    def tag(self) -> str:
        """Short name suffix, e.g. ``add_relu_qa8b32``."""
        ops = "_".join(self.ops) or "q"
        if len(ops) > 40:
            ops = "ep" + hashlib.sha1(repr((self.expr, self.tensor_layouts)).encode()).hexdigest()[:10]
        return f"{ops}_qa{_format_tag(self.out_fmt)}"


def _check_expr(expr, tensors: int) -> None:
    if not isinstance(expr, tuple) or not expr:
        raise BitqError(f"Epilogue: {expr!r} is not an expression node")
    head = expr[0]
    if head == "x":
        return
    if head == "const":
        return
    if head in ("bias", "tensor"):
        if head == "tensor" and not 0 <= expr[1] < tensors:
            raise BitqError(f"Epilogue: tensor {expr[1]} has no layout")
        return
    if head not in EPILOGUE_OPS:
        raise BitqError(f"Epilogue: op {head!r} is not one of {', '.join(EPILOGUE_OPS)}")
    for child in expr[1:1 + EPILOGUE_OPS[head]]:
        _check_expr(child, tensors)


def _count_leaves(expr, kind: str) -> int:
    if expr[0] == kind:
        return expr[1] + 1
    if expr[0] in EPILOGUE_OPS:
        return max([0] + [_count_leaves(c, kind) for c in expr[1:1 + EPILOGUE_OPS[expr[0]]]])
    return 0


def _post_order(expr) -> list[str]:
    if expr[0] not in EPILOGUE_OPS:
        return []
    return [op for c in expr[1:1 + EPILOGUE_OPS[expr[0]]] for op in _post_order(c)] + [expr[0]]


def _unravel(row, shape, channel_axis, channel):
    """Index of the element (matmul row ``row``, channel) in a tensor of ``shape`` whose other
    dims, in order, are the rows in C order."""
    outer = [d for a, d in enumerate(shape) if a != channel_axis]
    index, rest = [], row
    for d in reversed(outer):
        index.append(rest % d)
        rest = rest // d
    index = index[::-1]
    index.insert(channel_axis, channel)
    return index


def quantized_outputs(acc: te.Tensor, M: int, N: int, epilogue: Epilogue):
    """Stages ``y``, ``exponent_field``, ``E``, ``Q`` of a fused epilogue; returns
    (extra inputs: biases then tensors, Q, E)."""
    fmt = epilogue.out_fmt
    block = fmt.block_size
    width = padded(N, block)
    biases = [te.placeholder((N,), "float32", name=f"bias{i}") for i in range(epilogue.biases)]
    tensors = [te.placeholder(tuple(shape), "float32", name=f"tensor{i}")
               for i, (shape, _) in enumerate(epilogue.tensor_layouts)]

    def evaluate(expr, i, j):
        head = expr[0]
        if head == "x":
            return acc[i, j]
        if head == "const":
            return tirx.const(float(expr[1]), "float32")
        if head == "bias":
            return biases[expr[1]][j]
        if head == "tensor":
            shape, axis = epilogue.tensor_layouts[expr[1]]
            rows = math.prod(d for a, d in enumerate(shape) if a != axis)
            row = tirx.min(i, rows - 1) if M > rows else i  # padded matmul rows read a real one
            return tensors[expr[1]][tuple(_unravel(row, shape, axis, j))]
        args = [evaluate(c, i, j) for c in expr[1:1 + EPILOGUE_OPS[head]]]
        if head == "add":
            return args[0] + args[1]
        if head == "subtract":
            return args[0] - args[1]
        if head == "multiply":
            return args[0] * args[1]
        if head == "divide":
            return args[0] / args[1]
        if head == "maximum":
            return tirx.max(args[0], args[1])
        if head == "minimum":
            return tirx.min(args[0], args[1])
        if head == "relu":  # topi.nn.relu
            return tirx.max(args[0], tirx.const(0.0, "float32"))
        if head == "clip":  # topi.clip: max(min(x, high), low)
            return tirx.max(tirx.min(args[0], tirx.const(float(expr[3]), "float32")),
                            tirx.const(float(expr[2]), "float32"))
        return {"sigmoid": float_math.sigmoid, "tanh": tirx.tanh, "erf": tirx.erf}[head](args[0])

    # Padded columns (width > N) repeat column N - 1 in y and are masked where they are consumed:
    # a Select(j < N, ...) around the read would let the simplifier drop the min() and read past
    # the end of acc (seen on AVX-512: garbage exponents for the padded block).
    ragged = width > N
    y = te.compute((M, width), lambda i, j: evaluate(epilogue.expr, i, tirx.min(j, N - 1) if ragged else j),
                   name="y")
    r = te.reduce_axis((0, block), name="r")

    def field_of(i, c):  # a padded column counts as the zero the quantizer pads with (field 0)
        field = exponent_field(y[i, c])
        return tirx.Select(c < N, field, tirx.const(0, "int32")) if ragged else field

    if block == 1:  # an exponent per value: elementwise stages, vectorized like y and Q
        field = te.compute((M, width), field_of, name="exponent_field")
    else:
        field = te.compute((M, width // block), lambda i, b: te.max(field_of(i, b * block + r), axis=r),
                           name="exponent_field")
    e_out = te.compute(field.shape, lambda i, b: shared_exponent(field[i, b], fmt).astype("int8"), name="E")

    def mantissa(i, c):
        q = tirx.Cast("int8", round_mantissa(
            divide_by_power_of_two(y[i, c], e_out[i, c // block].astype("int32") - fmt.scale_shift), fmt, None))
        return tirx.Select(c < N, q, tirx.const(0, "int8")) if ragged else q

    q_out = te.compute((M, width), mantissa, name="Q")
    return [*biases, *tensors], q_out, e_out


def bfp_matmul_compute(M: int, N: int, K: int, fmt_a: BFPFormat, fmt_w: BFPFormat,
                       unsigned_weights: bool = False, epilogue: Epilogue | None = None,
                       inline_nibbles: bool = False) -> tirx.PrimFunc:
    """Unscheduled PrimFunc ``(qa, ea, qw, ew, C)`` of the integer BFP matmul, or with an
    ``epilogue`` ``(qa, ea, qw, ew, biases..., tensors..., Q, E)`` (:class:`Epilogue`).

    Shapes: qa int8 [M, Kp], ea int8 [M, nb], qw int8 [Np/16, Kp/4, 16, 4] (uint8 [Np/16, Kp/4,
    32] nibble pairs when mw <= 4, :mod:`.packing`), ew int8 [nb, Np], C float32 [M, N]. Blocks:
    ``w_tile`` (unpacked int8 mantissas, or uint8 ``qw + 128`` with ``unsigned_weights``; absent
    for 8-bit signed weights, read as stored), ``w_scale`` and ``a_scale`` (block scales),
    ``a_sum`` (activation block sums; ``unsigned_weights`` only), ``block_sum`` (int32 per block),
    ``acc`` (scaled sum over blocks), ``C`` (unpadded copy). ``unsigned_weights``: the u8 x s8
    form of ``vpdpbusd`` (VNNI); otherwise s8 x s8. ``inline_nibbles``: nibble-packed weights are
    read by the block sums themselves (for an intrinsic that unpacks in registers), no ``w_tile``.
    """
    block = check_formats(fmt_a, fmt_w)
    qa, ea, qw, ew = operands = bfp_matmul_operands(M, N, K, fmt_w)
    nb, n_padded = (int(d) for d in ew.shape)
    tile_shape = (n_padded // LANES, padded(K, block) // K_QUAD, LANES, K_QUAD)
    if unsigned_weights:
        w_tile = te.compute(
            tile_shape,
            lambda t, q, lane, k: (stored_mantissa(qw, t, q, lane, k) ^ tirx.const(-WEIGHT_OFFSET, "int8")).astype("uint8"),
            name="w_tile")
    elif len(qw.shape) == 3 and not inline_nibbles:
        w_tile = te.compute(tile_shape, lambda t, q, lane, k: stored_mantissa(qw, t, q, lane, k), name="w_tile")
    else:
        w_tile = qw  # 8-bit signed weights are read as stored; inline nibbles are unpacked in the dot

    def weight(j, quad, k):
        if w_tile is qw and len(qw.shape) == 3:
            return stored_mantissa(qw, j // LANES, quad, j % LANES, k)
        return w_tile[j // LANES, quad, j % LANES, k]
    a_scale = activation_scales(ea, fmt_a)
    w_scale = weight_scales(ew, fmt_w)
    rq = te.reduce_axis((0, block // K_QUAD), name="rq")
    rl = te.reduce_axis((0, K_QUAD), name="rl")
    # j last: a tensor intrinsic only matches a region contiguous in the innermost dimension.
    block_sum = te.compute(
        (M, nb, n_padded),
        lambda i, b, j: te.sum(
            qa[i, b * block + rq * K_QUAD + rl].astype("int32")
            * weight(j, b * (block // K_QUAD) + rq, rl).astype("int32"),
            axis=[rq, rl],
        ),
        name="block_sum",
    )
    if unsigned_weights:
        rs = te.reduce_axis((0, block), name="rs")
        a_sum = te.compute((M, nb), lambda i, b: te.sum(qa[i, b * block + rs].astype("int32"), axis=rs),
                           name="a_sum")

        def corrected(i, b, j):
            return block_sum[i, b, j] - a_sum[i, b] * WEIGHT_OFFSET
    else:
        def corrected(i, b, j):
            return block_sum[i, b, j]
    rb = te.reduce_axis((0, nb), name="rb")
    acc = te.compute(
        (M, n_padded),
        lambda i, j: te.sum(corrected(i, rb, j).astype("float32") * w_scale[rb, j] * a_scale[i, rb], axis=rb),
        name="acc",
    )
    if epilogue is not None:
        extra, q_out, e_out = quantized_outputs(acc, M, N, epilogue)
        return bfp_matmul_prim_func([*operands, *extra, q_out, e_out])
    c = te.compute((M, N), lambda i, j: acc[i, j], name="C")
    return bfp_matmul_prim_func([*operands, c])


def schedule_outputs(sch: Schedule, tile_loop, groups: int, vectorize: bool = True) -> None:
    """Schedule the output stages after ``acc``: the copy ``C``, or a fused epilogue's stages.

    Per tile (reverse-computed under ``tile_loop``: the tile's outputs are still in cache) when
    every quantization block lies inside one tile (no padded outputs, B' dividing the tile's
    16 * ``groups`` columns); otherwise (padded outputs: N = 16, 24, 144 at B' = 32) as one
    parallel pass over the rows after the matmul, the exponent fields, E and Q following y's row
    (one launch instead of four, the row in L1), y's columns partitioned at N (one loop with the
    clamped ``min(j, N - 1)`` index made every vector a 16-load gather of acc and bias).
    Vectorized: the values and mantissas; the block maxima of the exponent fields as a tree of
    vector maxima (per tile), or elementwise when B' = 1. A scalar block maximum and per-value
    exponents cost 2.4x and 5x the GEMM itself on MobileNetV2's 1x1 expansions (12544x96x32);
    the padded outputs' former four passes (scalar block maximum, gathered y) 4.8-5.7x the GEMM
    on 3136x144x32 and 12544x16x32, now 1.6-1.8x.
    """
    if not has_block(sch, "Q"):
        out = sch.get_sblock("C")
        sch.reverse_compute_at(out, tile_loop)
        *o_row, o_col = sch.get_loops(out)[1:]
        for loop in o_row:
            sch.unroll(loop)
        if vectorize:
            sch.vectorize(sch.split(o_col, [None, LANES])[-1])
        return
    width = int(sch.get(sch.get_sblock("Q")).iter_vars[1].dom.extent)
    block = width // int(sch.get(sch.get_sblock("E")).iter_vars[1].dom.extent)
    in_tile = not has_padded_outputs(sch) and width % LANES == 0 and (LANES * groups) % block == 0
    tree = block_max_tree(sch, min(block, TREE_LANES)) if block > 1 and vectorize else []
    anchor, padded_values = tile_loop, None
    for name in ("y", "exponent_field", "E", "Q"):
        stage = sch.get_sblock(name)
        if name == "y" and not in_tile:
            # one parallel pass over the rows after the matmul; the later stages follow each row
            anchor, *loops = sch.get_loops(stage)
            sch.parallel(anchor)
        else:
            if name == "exponent_field":
                for partial in tree:
                    sch.reverse_compute_at(partial, anchor)
                    vectorize_rfactor(sch, partial, 1)
            sch.reverse_compute_at(stage, anchor)
            loops = sch.get_loops(stage)[1:]  # the anchor (tile or row loop) is outermost
        if (name in ("y", "Q") or block == 1) and vectorize:
            *rows, col = loops
            for loop in rows:
                sch.unroll(loop)
            if name == "y" and not in_tile and has_padded_outputs(sch):
                padded_values = col  # partitioned last: the later stages follow y's row first
            else:
                _vectorize_columns(sch, col)
    if padded_values is not None:
        _vectorize_padded_values(sch, padded_values, real_outputs(sch))


def _vectorize_columns(sch, col) -> None:
    sch.vectorize(sch.split(col, [None, LANES])[-1] if int(sch.get(col).extent) % LANES == 0 else col)


def _vectorize_padded_values(sch, col, n: int) -> None:
    """``y``'s column loop over a whole padded row, partitioned at the last whole vector of the
    N real columns and at N: in one loop the clamped channel index (``min(j, N - 1)``) makes
    every vector a gather of 16 scalar loads (acc and bias alike); partitioned, the real
    columns load contiguously and the padded ones read one broadcast channel."""
    extent = int(sch.get(col).extent)
    cuts = sorted({c for c in (n // LANES * LANES, n) if 0 < c < extent})
    if not cuts:
        _vectorize_columns(sch, col)
        return
    factors = [b - a for a, b in zip([0] + cuts[:-1], cuts)]
    for part in sch.loop_partition(col, factors):
        for stage in sch.get_child_blocks(part):
            loop = sch.get_loops(stage)[-1]
            if int(sch.get(loop).min) == 0:
                _vectorize_columns(sch, loop)
            elif int(sch.get(loop).extent) <= 4 * LANES:  # split needs a loop from 0: one
                sch.vectorize(loop)  # vector of the extent, which LLVM splits into registers


def real_outputs(sch: Schedule) -> int:
    """N, the real output columns of a fused epilogue with padded outputs (its ``Q``'s mask)."""
    return int(sch.get(sch.get_sblock("Q")).body.value.condition.b)


def block_max_tree(sch, lanes: int) -> list:
    """The block maximum of the exponent fields as vector maxima of halves, lanes -> lanes/2 ->
    ... -> 2 (rfactor stages over contiguous values, returned in order); the final stage takes
    the max of the last two. As one scalar loop per block, LLVM turns it into gathers across the
    blocks (32 vpgatherqd per pixel on AVX-512). Max is exact in any order."""
    field = sch.get_sblock("exponent_field")
    stages = []
    width = lanes
    reduces = any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(field).iter_vars)
    if not reduces or int(sch.get(sch.get_loops(field)[-1]).extent) % width:
        return stages  # an exponent per value (B' = 1) has no maximum to take
    while width > 1:
        ri = sch.split(sch.get_loops(field)[-1], [None, width])[-1]
        stages.append(sch.rfactor(ri, factor_axis=2))  # [pixel, block, lane]: lanes contiguous
        width //= 2
    return stages


def vectorize_rfactor(sch, stage, depth: int) -> None:
    """Loops of a placed rfactor stage below ``depth`` reordered (block, reduction, lane), the
    lane vectorized. reverse_compute_at orders them by the block's iterators, which rfactor
    does not keep in one order."""
    loops = sch.get_loops(stage)[depth:]
    realize = sch.get(loops[-1]).body
    loop_vars = [sch.get(loop).loop_var for loop in loops]
    lane_var = realize.block.writes[0].region[-1].min  # the rfactor lane indexes the last axis
    order = {}
    for loop, var in zip(loops, loop_vars):
        iv = next(iv for iv, value in zip(realize.block.iter_vars, realize.iter_values)
                  if any(v.same_as(var) for v in tirx.analysis.undefined_vars(value)))
        if iv.var.same_as(lane_var):
            order[loop] = 2
        else:
            order[loop] = 1 if iv.iter_type == tirx.IterVar.CommReduce else 0
    ordered = sorted(loops, key=lambda loop: order[loop])
    sch.reorder(*ordered)
    sch.vectorize(ordered[-1])


def has_padded_outputs(sch: Schedule) -> bool:
    """Whether a fused epilogue pads its outputs to whole blocks of the next format (its ``Q``
    masks the padded columns, which read a clamped column: no region to place per tile)."""
    return has_block(sch, "Q") and isinstance(sch.get(sch.get_sblock("Q")).body.value, tirx.Select)


def has_block(sch: Schedule, name: str) -> bool:
    """Whether the scheduled function has a block ``name`` (stages differ between forms)."""
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for an unknown block
        return False
    return True


def row_tiles_per_task(row_tiles: int, rows: int) -> int:
    """Row tiles one parallel task computes for a column tile whose weights need unpacking
    (nibbles, the VNNI offset): the panel is unpacked once per task, for about 64 rows, instead
    of once per row tile, where it would cost as much as the dot products it feeds."""
    return max(c for c in range(1, max(1, 64 // rows) + 1) if row_tiles % c == 0)


def tile_bfp_matmul(sch: Schedule, rows: int, groups: int, order: str, vectorize: bool = True,
                    sample_task_rows: bool = False, task_rows: int | None = None):
    """The register tiling every BFP matmul schedule shares (x86, ARM, RISC-V).

    Parallel over tiles of ``rows`` x ``groups`` x 16 outputs, the block loop inside, the int32
    block sums computed per block under it, and under it too the block's weight stages: the
    unpacked mantissas of the tile's columns (``w_tile``, 64 bytes per 16 x 4, made with whole
    vectors when ``vectorize``) and their scales (``w_scale``). Returns the ``acc`` and
    ``block_sum`` blocks, ``acc``'s loops (tile, b, rows, groups, lanes) and ``block_sum``'s (rows
    (empty for a one-row tile), columns, K quads, K within a quad).

    ``sample_task_rows``: the row tiles per parallel task (unpacked weights, columns outermost)
    become a sampled decision (``sample_perfect_tile``, the tuning space's parallel granularity)
    instead of :func:`row_tiles_per_task`; the split is then always made, so every decision
    replays on the same loop structure. ``task_rows``: a fixed such split (a tuned decision
    replayed on another compute of the same GEMM).
    """
    acc = sch.get_sblock("acc")
    i, j, b = sch.get_loops(acc)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_group, j_lane = sch.split(j, [None, groups, LANES])
    unpacked = has_block(sch, "w_tile")
    chunk = row_tiles_per_task(int(sch.get(i_outer).extent), rows) if unpacked and order == "columns_outer" else 1
    # one-row tiles are not sampled: a task of one row tile (factor 1) would lose the outputs'
    # row loop (reverse_compute_at drops unit loops), so replayed decisions would change the
    # loop structure the trace was recorded on
    if sample_task_rows and unpacked and order == "columns_outer" and rows > 1:
        # the unpacked panel is reused by the task's row tiles: at most ~64 rows keep it in L1
        factors = sch.sample_perfect_tile(i_outer, n=2, max_innermost_factor=max(1, 64 // rows))
        i_outer, i_tile = sch.split(i_outer, factors)
        chunk = 2  # structure of a split, whatever the sampled factor (1 included)
    elif task_rows is not None and unpacked and order == "columns_outer" and rows > 1:
        i_outer, i_tile = sch.split(i_outer, [None, task_rows])
        chunk = 2  # the same structure as the sampled split
    elif chunk > 1:
        i_outer, i_tile = sch.split(i_outer, [None, chunk])
    # Column tiles outermost: one task re-reads a [rows, K] activation panel per column tile
    # (1/(16 * groups) of A per output row), instead of a [16 * groups, K] weight panel per row
    # tile, which is rows / (16 * groups) less traffic when M and N are both large.
    outer = (j_outer, i_outer) if order == "columns_outer" else (i_outer, j_outer)
    sch.reorder(*outer, *([i_tile] if chunk > 1 else []), b, i_inner, j_group, j_lane)
    tile_loop = sch.fuse(*outer)
    sch.parallel(tile_loop)

    block_sum = sch.get_sblock("block_sum")
    sch.compute_at(block_sum, b)
    # Loops compute_at creates below (tile, [row tile of the chunk,] b); a one-row tile gets no row loop.
    *s_row, s_col, s_quad, s_lane_k = sch.get_loops(block_sum)[3 if chunk > 1 else 2:]

    if unpacked:
        w_tile = sch.get_sblock("w_tile")
        sch.compute_at(w_tile, tile_loop if chunk > 1 else b)
        *_, lane, k = sch.get_loops(w_tile)
        tile_elements = sch.fuse(lane, k)
        if vectorize:
            # two 32-byte halves: the low and the high nibbles of the same stored bytes
            half, elements = sch.split(tile_elements, [None, LANES * K_QUAD // 2])
            sch.unroll(half)
            sch.vectorize(elements)
    w_scale = sch.get_sblock("w_scale")
    sch.compute_at(w_scale, b)
    if vectorize:
        sch.vectorize(sch.split(sch.get_loops(w_scale)[-1], [None, LANES])[-1])
    if has_block(sch, "a_sum"):
        sch.parallel(sch.get_loops(sch.get_sblock("a_sum"))[0])
    return acc, block_sum, (tile_loop, b, i_inner, j_group, j_lane), (s_row, s_col, s_quad, s_lane_k)
