"""im2col of BFP-quantized NHWC activations: conv2d as the integer BFP matmul.

The activation quantizer (:mod:`bitq_tvm.kernels.bfp_act_quant`) turns an NCHW input into
NHWC mantissas ``Q [N, H, W, G * Cg_p]`` and exponents ``E [N, H, W, G * nbg]`` with blocks along
the input channels of each group, each group's channels zero-padded to ``Cg_p = nbg * B``. Those
are exactly the simulation's blocks (per pixel, per group, along C). For one group ``g`` this
kernel gathers the rows of the matmul ``A [N*OH*OW, KH*KW*Cg_p]`` with K ordered (kh, kw, c),
and their exponents ``EA [N*OH*OW, KH*KW*nbg]``: since ``Cg_p`` is a multiple of B, no block
crosses a kernel offset, and a row of A holds the same blocks the simulation quantized (each
activation is quantized once, then copied KH*KW times as bytes, not re-quantized). Pixels in the
zero padding get mantissas 0 (an all-zero block: its term is 0 whatever its exponent).

Weights ``W [O, C/G, KH, KW]`` quantized along axis 1 give mantissas ``[O, KH, KW, nbg, B]``,
the same K order, so ``conv = A @ Wg.T`` per group (:meth:`ConvGeometry.gemm`), computed by
:func:`~bitq_tvm.kernels.bfp_matmul_variants.bfp_matmul_func`.

A window-blocked conv (a stem, :func:`~bitq_tvm.kernels.contract.is_window_blocked`) is quantized
after im2col, not before: :func:`window_im2col_func` gathers the float32 rows ``[M, KH*KW*C]``
(same (kh, kw, c) order), which the activation quantizer then blocks like a matmul's K; the
deployment runs both as one kernel (:func:`window_act_quant_func`).
"""

from __future__ import annotations

import dataclasses
import functools

import tvm
from tvm import te, tirx

from ..errors import BitqError
from ..formats import BFPFormat
from .bfp_act_quant import act_quant_stages, schedule_act_quant
from .contract import GemmGeometry, conv_channels_padded, gemm_geometry
from .float_bits import zero_unless

__all__ = ["ConvGeometry", "bfp_im2col_func", "window_act_quant_func", "window_act_quant_name", "window_im2col_func",
           "window_im2col_name"]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static shape of one NCHW/OIHW conv2d (padding is top, left, bottom, right)."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    def __post_init__(self):
        if self.channels % self.groups or self.out_channels % self.groups:
            raise BitqError(f"conv2d: groups={self.groups} must divide channels {self.channels} "
                            f"and output channels {self.out_channels}")
        if min(self.out_height, self.out_width) <= 0:
            raise BitqError(f"conv2d: output size {self.out_height}x{self.out_width} is empty")

    @property
    def out_height(self) -> int:
        return (self.height + self.padding[0] + self.padding[2]
                - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.strides[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.padding[1] + self.padding[3]
                - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.strides[1] + 1

    @property
    def rows(self) -> int:
        """Rows M of the matmul: output pixels of the whole batch."""
        return self.batch * self.out_height * self.out_width

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the NHWC mantissas already are the matmul's A."""
        return (self.kernel == (1, 1) and self.strides == (1, 1) and not any(self.padding)
                and self.groups == 1)

    def group_channels_padded(self, fmt: BFPFormat) -> int:
        return conv_channels_padded(self.channels // self.groups, fmt)

    def gemm(self, block_size: int) -> GemmGeometry:
        """The per-group GEMM after im2col (:func:`~bitq_tvm.kernels.contract.gemm_geometry`)."""
        return gemm_geometry("conv2d", (self.batch, self.channels, self.height, self.width),
                             (self.out_channels, self.channels // self.groups, *self.kernel),
                             (self.batch, self.out_channels, self.out_height, self.out_width), block_size, self.groups)


def _window_source(geom: ConvGeometry, rows: int, m, offset):
    """(n, iy, ix, inside) of kernel ``offset`` (kh * KW + kw) in output row ``m``'s window:
    clamped input indices (the masked-out load stays in bounds) and whether the pixel is real;
    mask with :func:`~bitq_tvm.kernels.float_bits.zero_unless`, not a Select around the load."""
    oh, ow = geom.out_height, geom.out_width
    kw = geom.kernel[1]
    n, y, x = m // (oh * ow), m // ow % oh, m % ow
    iy = y * geom.strides[0] + offset // kw * geom.dilation[0] - geom.padding[0]
    ix = x * geom.strides[1] + offset % kw * geom.dilation[1] - geom.padding[1]
    inside = tirx.all(iy >= 0, iy < geom.height, ix >= 0, ix < geom.width)
    if rows > geom.rows:  # padding rows past M read the last image
        inside = tirx.all(inside, m < geom.rows)
        n = tirx.min(n, geom.batch - 1)
    iy_c = tirx.max(tirx.min(iy, geom.height - 1), 0)
    ix_c = tirx.max(tirx.min(ix, geom.width - 1), 0)
    return n, iy_c, ix_c, inside


def window_im2col_func(geom: ConvGeometry, rows: int | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X, P)``: the float32 im2col rows of a one-group conv's NCHW input.

    ``X [N, C, H, W] -> P [rows, KH*KW*C]`` in (kh, kw, c) order, zeros outside the image and
    in rows past M = N*OH*OW (``rows`` >= M, default M). The simulation fake-quantizes the rows
    and the deployment quantizes them for the integer matmul (a window-blocked conv).
    """
    rows = geom.rows if rows is None else rows
    x, p = _window_rows(geom, rows)
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, p]))
    sch.parallel(sch.get_loops(sch.get_sblock("P"))[0])
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _window_rows(geom: ConvGeometry, rows: int) -> tuple[te.Tensor, te.Tensor]:
    """(X placeholder, P stage) of :func:`window_im2col_func`."""
    if geom.groups != 1:
        raise BitqError(f"window im2col: {geom.groups} groups (window blocks take one)")
    if rows < geom.rows:
        raise BitqError(f"window im2col: rows={rows} < {geom.rows} output pixels")
    c = geom.channels
    x = te.placeholder((geom.batch, c, geom.height, geom.width), "float32", name="X")

    def gather(m, k):
        n, iy, ix, inside = _window_source(geom, rows, m, k // c)
        return zero_unless(inside, x[n, k % c, iy, ix])

    return x, te.compute((rows, geom.kernel[0] * geom.kernel[1] * c), gather, name="P")


def window_act_quant_func(geom: ConvGeometry, fmt: BFPFormat, rows: int | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(X, Q, E)``: :func:`window_im2col_func`'s rows BFP-quantized in the
    same kernel, ``Q [rows, nbg*B]``/``E [rows, nbg]`` as :func:`~bitq_tvm.kernels.bfp_act_quant.
    bfp_act_quant_func` of those rows along axis 1 gives, bit for bit (the same stages with the
    gather inlined), without the float32 rows going through memory.
    """
    x, p = _window_rows(geom, geom.rows if rows is None else rows)
    func = te.create_prim_func([x, *act_quant_stages(p, fmt, axis=1)])
    func = schedule_act_quant(func, fmt, strided=False, inline=("P",))
    return func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def window_act_quant_name(geom: ConvGeometry, fmt: BFPFormat, rows: int) -> str:
    """Kernel name of :func:`window_act_quant_func` (a quantizer's ``bfp_aq`` prefix)."""
    return f"bfp_aq_{fmt.name}_{window_im2col_name(geom, rows).removeprefix('bfp_')}"


def window_im2col_name(geom: ConvGeometry, rows: int) -> str:
    """Kernel name of :func:`window_im2col_func` (shapes spelled out: deterministic, never shared
    by two geometries)."""
    return (f"bfp_window_im2col_{geom.batch}x{geom.channels}x{geom.height}x{geom.width}_k{geom.kernel[0]}x"
            f"{geom.kernel[1]}_s{geom.strides[0]}x{geom.strides[1]}_p{'x'.join(map(str, geom.padding))}"
            f"_d{geom.dilation[0]}x{geom.dilation[1]}_r{rows}")


def bfp_im2col_func(geom: ConvGeometry, fmt: BFPFormat, group: int, rows: int | None = None) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(Q, E, A, EA)``: im2col of one group's quantized activations.

    Shapes: Q int8 [N, H, W, G*Cg_p], E int8 [N, H, W, G*nbg] -> A int8 [rows, KH*KW*Cg_p],
    EA int8 [rows, KH*KW*nbg]; ``rows`` >= M = N*OH*OW (default M), rows past M are zero (the
    matmul's register tile wants a row count with a divisor of 4). Parallel over output pixels,
    each kernel offset's Cg_p bytes copied as one vector.
    """
    if not 0 <= group < geom.groups:
        raise BitqError(f"bfp_im2col_func: group {group} is not in 0..{geom.groups - 1}")
    rows = geom.rows if rows is None else rows
    if rows < geom.rows:
        raise BitqError(f"bfp_im2col_func: rows={rows} < {geom.rows} output pixels")
    block = fmt.block_size
    cg_p = geom.group_channels_padded(fmt)
    nbg = cg_p // block
    kh, kw = geom.kernel
    q = te.placeholder((geom.batch, geom.height, geom.width, geom.groups * cg_p), "int8", name="Q")
    e = te.placeholder((geom.batch, geom.height, geom.width, geom.groups * nbg), "int8", name="E")

    source = functools.partial(_window_source, geom, rows)

    def gather_mantissa(m, k):
        n, iy, ix, inside = source(m, k // cg_p)
        return zero_unless(inside, q[n, iy, ix, group * cg_p + k % cg_p])

    def gather_exponent(m, k):  # emin outside the image
        n, iy, ix, inside = source(m, k // nbg)
        above_emin = e[n, iy, ix, group * nbg + k % nbg].astype("int32") - fmt.emin
        return (zero_unless(inside, above_emin) + fmt.emin).astype("int8")

    a = te.compute((rows, kh * kw * cg_p), gather_mantissa, name="A")
    ea = te.compute((rows, kh * kw * nbg), gather_exponent, name="EA")
    sch = tvm.s_tir.Schedule(te.create_prim_func([q, e, a, ea]))
    m_loop, k_loop = sch.get_loops(sch.get_sblock("A"))
    sch.parallel(m_loop)
    _, channel = sch.split(k_loop, factors=[None, cg_p])
    sch.vectorize(channel)
    sch.parallel(sch.get_loops(sch.get_sblock("EA"))[0])
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
