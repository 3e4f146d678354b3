"""The integer BFP kernel contract: every fact the kernels, passes, tuning and solver share, once.

- Tiles: 16 output lanes (``LANES``) x 4 K values (``K_QUAD``) per packed weight tile, one
  ``vpdpbusd``'s worth; N pads to whole lane groups.
- Numbers: the VNNI kernel offsets weights by ``WEIGHT_OFFSET`` (+128, uint8 for ``vpdpbusd``,
  in registers) and corrects the block sums with ``-128 * sum(qa)`` of the activation block;
  every other kernel multiplies signed by signed; a weight block's scale exponent
  ``e - (m - 2)`` must stay <= ``MAX_WEIGHT_SCALE_EXPONENT`` (105) for the scaling to be exact
  (:mod:`.bfp_matmul` derives both bounds).
- Block sizes: a multiple of ``K_QUAD`` in [``MIN_BLOCK``, ``MAX_BLOCK``], one shared by weight
  and activation (:func:`format_problem`).
- Which layers run as integer kernels (:func:`integer_support`), what they store
  (:func:`integer_weight_bytes`) and their GEMM after im2col (:func:`gemm_geometry`), or for a
  depthwise conv (:func:`is_depthwise`) the channel-blocked kernel's geometry
  (:func:`depthwise_geometry`).
- Where BFP blocks run in a layer's tensors (:func:`block_axes`), shared by the simulation, the
  NumPy reference and the planner: along the reduction; a depthwise conv's reduction has one
  channel, so its activations get one exponent per value (:func:`depthwise_activation_format`)
  and each channel's weight window is one block (:func:`depthwise_weight_blocks`); a conv with
  so few input channels that channel blocks would be mostly padding (a 3-channel stem,
  :func:`is_window_blocked`) blocks along each output pixel's whole window instead.

Everything here works on plain shapes, attributes and formats (no TVM, no ONNX), so the planner
can ask before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from ..errors import BitqError
from ..formats import BFPFormat

__all__ = [
    "KERNEL_ATTR",
    "kernel_key",
    "record_key",
    "LANES",
    "K_QUAD",
    "WEIGHT_OFFSET",
    "MAX_WEIGHT_SCALE_EXPONENT",
    "MIN_BLOCK",
    "MAX_BLOCK",
    "NIBBLE_MAX_MANTISSA_BITS",
    "DEFAULT_MAX_PADDING_RATIO",
    "padded",
    "padded_rows",
    "block_size_problem",
    "check_block_size",
    "format_problem",
    "conv_channels_padded",
    "conv_problem",
    "DEPTHWISE_CHANNEL_LANES",
    "is_depthwise",
    "is_window_blocked",
    "WINDOW_WEIGHT_AXES",
    "depthwise_problem",
    "integer_support",
    "packed_nbytes",
    "GemmGeometry",
    "gemm_geometry",
    "DepthwiseGeometry",
    "depthwise_geometry",
    "kernel_geometry",
    "integer_weight_bytes",
    "block_axes",
    "depthwise_weight_blocks",
    "depthwise_activation_format",
    "check_block_layout",
]

# Output lanes per packed weight tile: one AVX-512 register of int32 accumulators.
LANES = 16
# K values per lane in one vpdpbusd / vpmaddwd pair.
K_QUAD = 4
# vpdpbusd multiplies unsigned by signed bytes: the VNNI kernel's weights enter as qw + 128.
WEIGHT_OFFSET = 128
# float32(s) * 2**k is exact for |s| < 2**22 only while 2**(22 + k) stays below 2**128
MAX_WEIGHT_SCALE_EXPONENT = 105
MIN_BLOCK, MAX_BLOCK = 8, 128
# Mantissas of at most this many bits are stored two per byte.
NIBBLE_MAX_MANTISSA_BITS = 4
# Channels per vector of the depthwise kernel (8 float32 lanes on AVX2, two NEON registers): a
# depthwise conv's channel count must be a multiple.
DEPTHWISE_CHANNEL_LANES = 8
# Largest padded/real reduction ratio a conv may have and still run as an integer kernel.
DEFAULT_MAX_PADDING_RATIO = 2.0
# A conv whose channels padded to whole blocks exceed this many times the real ones blocks
# along its whole window instead (:func:`is_window_blocked`). A numeric rule, not a knob.
WINDOW_BLOCK_PADDING = 2.0


def padded(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def padded_rows(rows: int) -> int:
    """Matmul rows to compute: the matmul's register tile takes 4, 3, 2 or 1 rows dividing M, and
    one-row tiles run at a third of the speed (measured 224 vs 728 GOPS at 49 vs 52 x 512 x 4608),
    so a row count with no divisor among 4, 3, 2 is padded to a multiple of 4."""
    if rows <= 4 or any(rows % r == 0 for r in (4, 3, 2)):
        return rows
    return padded(rows, 4)


def block_size_problem(block_size: int) -> str | None:
    """Why the integer kernel cannot take ``block_size`` (None: it can)."""
    if block_size % K_QUAD or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        return f"block size {block_size} must be a multiple of {K_QUAD} in [{MIN_BLOCK}, {MAX_BLOCK}]"
    return None


def check_block_size(block_size: int, what: str) -> None:
    """Raise BitqError (prefixed ``what``) unless the integer kernel takes ``block_size``."""
    problem = block_size_problem(block_size)
    if problem is not None:
        raise BitqError(f"{what}: {problem}")


def format_problem(weight: BFPFormat | None, activation: BFPFormat | None) -> str | None:
    """Why the integer kernel cannot run a layer in these formats (None: it can, shape permitting)."""
    if weight is None or activation is None:
        missing = "activation" if activation is None else "weight"
        return f"{missing} is FP32 in the plan: the integer kernel needs both operands in BFP"
    if weight.block_size != activation.block_size:
        return (f"weight block size {weight.block_size} != activation block size "
                f"{activation.block_size}: one integer dot product per block needs one block size")
    block = weight.block_size
    if block_size_problem(block) is not None:
        return f"block size {block} is not a multiple of {K_QUAD} in [{MIN_BLOCK}, {MAX_BLOCK}] (kernel constraint)"
    return None


def conv_channels_padded(group_channels: int, fmt: BFPFormat) -> int:
    """In-group input channels after zero-padding to whole blocks (the conv kernel's K per offset)."""
    return padded(group_channels, fmt.block_size)


def is_window_blocked(weight_shape: Sequence[int], groups: int, block_size: int) -> bool:
    """A conv whose BFP blocks run along each output pixel's whole window, not along channels.

    That is a conv with one group, a window larger than 1x1 and so few input channels C that
    blocks of B along them would be more than half padding (``pad(C, B) > 2 C``: a 3-channel stem
    pads to 32, 10.7x the work). Its reduction is then the im2col row, K = KH*KW*C in (kh, kw, c)
    order, blocked like a matmul's K (one exponent per B values of a pixel's window, the last
    block zero-padded; 27 -> 32 for an RGB 3x3 stem), and so is its weight (each output channel's
    ``[KH, KW, C]`` window, flattened the same way). Each input value is quantized once per window
    it falls in. The rule depends on shapes and B only: the simulation, the NumPy reference and the
    kernels apply it alike.
    """
    if len(weight_shape) != 4 or groups != 1:
        return False
    _, channels, kh, kw = (int(d) for d in weight_shape)
    return kh * kw > 1 and padded(channels, block_size) > WINDOW_BLOCK_PADDING * channels


# A window-blocked conv's OIHW weight as ``[O, KH*KW*C]``: transposed by these axes to
# ``[O, KH, KW, C]``, then flattened (the im2col row's (kh, kw, c) order).
WINDOW_WEIGHT_AXES = (0, 2, 3, 1)


def conv_problem(weight_shape: Sequence[int], groups: int, fmt: BFPFormat,
                 max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> str | None:
    """Why the im2col + GEMM kernel does not run a (non-depthwise: :func:`integer_support` sends
    those to :func:`depthwise_problem`) conv with OIHW ``weight_shape`` and ``groups`` in ``fmt``
    (None: it does): its padded reduction may be at most ``max_padding_ratio`` times the real one."""
    _, group_channels, kh, kw = (int(d) for d in weight_shape)
    if is_window_blocked(weight_shape, groups, fmt.block_size):
        k = kh * kw * group_channels
        k_p = padded(k, fmt.block_size)
        if k_p > max_padding_ratio * k:
            return (f"{k} values per window (blocked along the window: {group_channels} input channels) "
                    f"padded to {k_p} (block {fmt.block_size}): the integer kernel would do {k_p / k:.1f}x the work")
        return None
    cg_p = conv_channels_padded(group_channels, fmt)
    if cg_p > max_padding_ratio * group_channels:
        return (f"{group_channels} input channels per group padded to {cg_p} (block {fmt.block_size}): "
                f"the integer kernel would do {cg_p / group_channels:.1f}x the work")
    return None


def is_depthwise(weight_shape: Sequence[int], groups: int) -> bool:
    """A conv with one input channel per group (OIHW weight ``[O, 1, KH, KW]``, groups > 1): its
    activations get an exponent per value and its weights one per channel
    (:func:`depthwise_activation_format`, :func:`depthwise_weight_blocks`)."""
    return groups > 1 and len(weight_shape) == 4 and int(weight_shape[1]) == 1


def depthwise_problem(weight_shape: Sequence[int], groups: int) -> str | None:
    """Why the depthwise kernel (:mod:`~bitq_tvm.kernels.bfp_depthwise`) does not run this
    depthwise conv (None: it does): one output per channel, channels in whole vectors."""
    channels = int(weight_shape[0])
    if channels != groups:
        return (f"depthwise conv with {channels // groups} outputs per channel "
                "(the depthwise kernel computes one output per channel)")
    if channels % DEPTHWISE_CHANNEL_LANES:
        return (f"depthwise conv with {channels} channels (the depthwise kernel takes multiples of "
                f"{DEPTHWISE_CHANNEL_LANES})")
    return None


def integer_support(kind: str, weight_shape, groups: int, weight: BFPFormat | None, activation: BFPFormat | None,
                    max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO) -> str | None:
    """Whether a layer runs as an integer kernel, from shapes alone (the deployment pass's rule;
    the planner uses it to price candidates as deployed).

    ``kind`` is ``"conv2d"`` (weight OIHW) or ``"matmul"`` (2-D weight). Returns None when the
    layer becomes an integer kernel, else the reason it stays float simulation.
    """
    reason = format_problem(weight, activation)
    if reason is not None:
        return reason
    if kind == "matmul":
        return None if len(weight_shape) == 2 else (
            f"matmul by a {len(weight_shape)}-D weight (kernel: 2-D weights)")
    if is_depthwise(weight_shape, groups):
        return depthwise_problem(weight_shape, groups)
    return conv_problem(weight_shape, groups, weight, max_padding_ratio)


def packed_nbytes(n: int, k_padded: int, fmt: BFPFormat) -> int:
    """Bytes the packer (:func:`~bitq_tvm.kernels.packing.pack_quantized`) stores for an
    [n, k_padded] weight in ``fmt``: outputs padded to 16 lanes, mantissas one per byte (two per
    byte when m <= 4), one int8 exponent per block."""
    if k_padded % fmt.block_size:
        raise BitqError(f"packed_nbytes: K {k_padded} is not a multiple of the block size {fmt.block_size}")
    n_padded = padded(n, LANES)
    mantissa_bytes = n_padded * k_padded // (2 if fmt.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS else 1)
    return mantissa_bytes + n_padded * (k_padded // fmt.block_size)


@dataclasses.dataclass(frozen=True)
class GemmGeometry:
    """One layer's integer GEMM after im2col: ``groups`` calls of ``C[M, N] = A[M, K] @ W[N, K].T``.

    ``rows`` is M (output pixels of the batch, or the flattened input rows), ``rows_padded`` the
    rows the kernel computes (:func:`padded_rows`); ``n`` outputs per group; ``k`` the real
    reduction per group (``KH * KW * C/G``, or in features) and ``k_padded`` the kernel's
    (``KH * KW * pad(C/G, B)``: each kernel offset pads its channels to whole blocks, or
    ``pad(K, B)`` for a matmul and a window-blocked conv, :func:`is_window_blocked`);
    ``group_channels_padded`` is ``pad(C/G, B)`` for a channel-blocked conv, else ``k_padded``;
    ``block_size`` is B.
    """

    rows: int
    rows_padded: int
    n: int
    k: int
    k_padded: int
    groups: int
    group_channels_padded: int
    block_size: int

    @property
    def kernel_offsets(self) -> int:
        """KH * KW for a conv, 1 for a matmul."""
        return self.k_padded // self.group_channels_padded

    @property
    def blocks(self) -> int:
        """Blocks per row of A (nb)."""
        return self.k_padded // self.block_size


def gemm_geometry(kind: str, input_shape: Sequence[int], weight_shape: Sequence[int], output_shape: Sequence[int],
                  block_size: int, groups: int = 1) -> GemmGeometry:
    """The GEMM the integer kernel runs for a layer (the one geometry deployment and tuning use).

    Parameters
    ----------
    kind
        ``"conv2d"`` (input NCHW, weight OIHW, output NCHW) or ``"matmul"`` (input ``[..., K]``,
        output ``[..., N]``, weight in either stored orientation).
    input_shape, weight_shape, output_shape
        Static shapes of the layer's input, weight and output.
    block_size
        The (shared) BFP block size along the reduction.
    groups
        Conv groups (1 for a matmul).
    """
    if kind == "conv2d":
        if is_depthwise(weight_shape, groups):
            raise BitqError("gemm_geometry: a depthwise conv runs as the depthwise kernel, not a GEMM "
                            "(depthwise_geometry)")
        o, cg, kh, kw = (int(d) for d in weight_shape)
        rows = int(output_shape[0]) * int(output_shape[2]) * int(output_shape[3])
        if is_window_blocked(weight_shape, groups, block_size):  # the im2col row is one reduction
            k_p = padded(kh * kw * cg, block_size)
            return GemmGeometry(rows, padded_rows(rows), o, kh * kw * cg, k_p, 1, k_p, block_size)
        cg_p = padded(cg, block_size)
        return GemmGeometry(rows, padded_rows(rows), o // groups, kh * kw * cg, kh * kw * cg_p, groups, cg_p,
                            block_size)
    if kind != "matmul":
        raise BitqError(f"gemm_geometry: layer kind {kind!r} is not conv2d or matmul")
    n, k = int(output_shape[-1]), int(input_shape[-1])
    rows = math.prod(int(d) for d in input_shape[:-1])
    k_p = padded(k, block_size)
    return GemmGeometry(rows, padded_rows(rows), n, k, k_p, 1, k_p, block_size)


@dataclasses.dataclass(frozen=True)
class DepthwiseGeometry:
    """One depthwise conv as the depthwise kernel runs it (NHWC, one output per channel).

    ``rows`` output pixels of the batch, each computing ``channels`` outputs from
    ``kernel_offsets`` (KH * KW) products. The kernel reads activation mantissas and exponents
    ``[N, H, W, C]`` each (:func:`depthwise_activation_format`) and the stored weight: mantissas
    ``[KH*KW, C]`` and one exponent per channel ``[C]`` (:func:`depthwise_weight_blocks`).
    """

    rows: int
    channels: int
    kernel_offsets: int


def depthwise_geometry(input_shape: Sequence[int], weight_shape: Sequence[int],
                       output_shape: Sequence[int]) -> DepthwiseGeometry:
    """The depthwise kernel's geometry of a depthwise conv (input NCHW, weight ``[C, 1, KH, KW]``)."""
    channels, _, kh, kw = (int(d) for d in weight_shape)
    rows = int(output_shape[0]) * int(output_shape[2]) * int(output_shape[3])
    return DepthwiseGeometry(rows, channels, kh * kw)


def kernel_geometry(kind: str, input_shape: Sequence[int], weight_shape: Sequence[int],
                    output_shape: Sequence[int], block_size: int,
                    groups: int = 1) -> GemmGeometry | DepthwiseGeometry:
    """What the integer kernel of a layer runs: its GEMM, or for a depthwise conv the depthwise
    kernel's geometry."""
    if kind == "conv2d" and is_depthwise(weight_shape, groups):
        return depthwise_geometry(input_shape, weight_shape, output_shape)
    return gemm_geometry(kind, input_shape, weight_shape, output_shape, block_size, groups)


# On every integer kernel the deployment emits (fused ones too): a record of what it computes
# (``kind``, ``rows``, ``n``, ``k`` or ``geometry``, ``fmt_a``, ``fmt_w``, ...). Passes and reports read
# kernels through it, never by parsing kernel names.
KERNEL_ATTR = "bitq.kernel"


def kernel_key(geometry: GemmGeometry | DepthwiseGeometry, fmt_a: str, fmt_w: str) -> tuple:
    """What one call of a layer's integer kernel computes, as a key that :func:`record_key` of the
    kernel's ``bitq.kernel`` record equals (fused epilogue or not; ``fmt_*`` are format names)."""
    if isinstance(geometry, DepthwiseGeometry):
        return ("depthwise", geometry.rows, geometry.channels, geometry.kernel_offsets, fmt_a, fmt_w)
    return ("matmul", geometry.rows_padded, geometry.n, geometry.k_padded, fmt_a, fmt_w)


def record_key(record) -> tuple | None:
    """:func:`kernel_key` of a kernel's ``bitq.kernel`` record (plain dict), None for kernels that
    are not a layer's matmul or depthwise conv (activation quantizers)."""
    kind = str(record["kind"]).removesuffix("_fused")
    fmt_a, fmt_w = str(record.get("fmt_a", "")), str(record.get("fmt_w", ""))
    if kind == "matmul":
        return ("matmul", int(record["rows"]), int(record["n"]), int(record["k"]), fmt_a, fmt_w)
    if kind == "depthwise":
        kh, kw = (int(d) for d in record["geometry"]["kernel"])
        return ("depthwise", int(record["rows"]), int(record["n"]), kh * kw, fmt_a, fmt_w)
    return None


def integer_weight_bytes(geometry: GemmGeometry | DepthwiseGeometry, fmt: BFPFormat) -> int:
    """Bytes the deployment stores for a layer it lowers: one packed [N, Kp] weight per group, or
    a depthwise conv's int8 mantissas ``[KH*KW, C]`` and one int8 exponent per channel ``[C]``
    (one byte per mantissa whatever m: a depthwise weight is ~1% of a network's bytes)."""
    if isinstance(geometry, DepthwiseGeometry):
        return (geometry.kernel_offsets + 1) * geometry.channels
    return geometry.groups * packed_nbytes(geometry.n, geometry.k_padded, fmt)


def block_axes(kind: str, act_ndim: int, weight_ndim: int, groups: int = 1,
               weight_transposed: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """((activation axis, groups), (weight axis, groups)) along which a layer's BFP blocks run.

    Blocks run along the reduction: input channels of each group of an NCHW/OIHW conv (axis 1 of
    both), K of a matmul: the last activation axis, and axis -2 of a ``[..., K, N]`` weight or
    -1 of a stored ``[N, K]`` one (``weight_transposed``, e.g. Gemm with transB). A depthwise conv
    (:func:`is_depthwise`) reduces over one channel per group: its activation blocks hold one
    value (a group of one channel, the same numbers as :func:`depthwise_activation_format`); its
    weight axis is axis 1 of the ``[C, KH*KW]`` view of :func:`depthwise_weight_blocks` (one block
    per channel), which callers must apply. A window-blocked conv (:func:`is_window_blocked`) has
    no such axis: its blocks run along the im2col rows of the input and the
    :data:`WINDOW_WEIGHT_AXES` view of the weight, which callers build.
    """
    if kind == "conv2d":
        return ((1, groups), (1, 1))
    if kind != "matmul":
        raise BitqError(f"block_axes: layer kind {kind!r} is not conv2d or matmul")
    return (act_ndim - 1, 1), (weight_ndim - 1 if weight_transposed else weight_ndim - 2, 1)


def depthwise_weight_blocks(weight_shape: Sequence[int], fmt: BFPFormat) -> tuple[tuple[int, int], BFPFormat]:
    """How a depthwise weight ``[C, 1, KH, KW]`` is quantized: as its ``[C, KH*KW]`` view along
    axis 1 in ``fmt`` with blocks of KH*KW, one exponent per channel (``fmt``'s block size is the
    activation's).

    Why not blocks of B channels at each kernel offset: folded BatchNorm scales a depthwise
    channel's weights by its own factor (a layer's channel ranges span 28x-290x in PP-LCNet,
    ``bench/bench_depthwise_blocks.py`` prints them), so a shared exponent flushes small
    channels. Measured on the orientation
    classifier (128 rendered pages, the other layers bfp8_b32): top-1 99.2% with one exponent
    per channel at m = 8 and 4, 84.4% (m = 8) and 40.6% (m = 4) with blocks of 32 channels.
    """
    channels, _, kh, kw = (int(d) for d in weight_shape)
    return (channels, kh * kw), dataclasses.replace(fmt, block_size=kh * kw)


def depthwise_activation_format(fmt: BFPFormat) -> BFPFormat:
    """The activation format a depthwise kernel reads for a layer planned at ``fmt``: ``fmt``'s m
    and E with blocks of one value (an exponent per value: 2 bytes per activation at m <= 8).

    Why not blocks along the channels of a pixel (1 + E/B bytes): channels of one pixel span
    decades after a HardSwish, and a shared exponent flushes the small ones. Measured on the
    layout detector (simulation, Gaussian input, relative max output drift vs FP32 at bfp8_b32):
    blocks of 32 channels 0.78, of 8 channels 0.43, 32 pixels along a row of one channel 0.15,
    FP32 depthwise activations 0.14. Blocks along rows are the compact choice a later kernel can
    take (the producer's epilogue would then block along its output rows).
    """
    return dataclasses.replace(fmt, block_size=1)


def check_block_layout(shape: Sequence[int], axis: int, groups: int, what: str) -> int:
    """Check a tensor the quantizer kernels block along ``axis`` in ``groups``; return ``axis``
    made non-negative. Shapes must be positive and below 2**31 elements (TIR's int32 indices)."""
    if not shape or any(d <= 0 for d in shape):
        raise BitqError(f"{what}: shape {shape} must be non-empty and positive")
    if not -len(shape) <= axis < len(shape):
        raise BitqError(f"{what}: axis {axis} is out of range for shape {shape}")
    axis %= len(shape)
    if groups <= 0 or shape[axis] % groups:
        raise BitqError(f"{what}: groups={groups} does not divide axis {axis} (length {shape[axis]}) of shape {shape}")
    if math.prod(shape) >= 2**31:
        raise BitqError(f"{what}: shape {shape} has 2**31 or more elements")
    return axis
