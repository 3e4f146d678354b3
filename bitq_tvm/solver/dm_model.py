"""Analytical performance term: BitQ's data-movement (DM) expression, as the deployed kernels run it.

Two models share one :class:`MemoryHierarchy` and one :class:`LayerCost`:

**The kernel model** (:func:`kernel_layer_costs`) prices a layer that deployment lowers to integer
kernels (:func:`bitq_tvm.kernels.contract.integer_support` returns None). Every byte it counts is a
byte the kernels move, taken from the contract (:func:`~bitq_tvm.kernels.contract.gemm_geometry`,
:func:`~bitq_tvm.kernels.contract.packed_nbytes`, :func:`~bitq_tvm.kernels.contract.padded_rows`),
never re-derived here. The layer is a chain of stages (:class:`StageCost`):

* ``act_quant``: reads the float32 input once, writes int8 mantissas (1 byte each whatever the
  activation's m; NHWC for a conv, each group's channels padded to whole blocks) + one int8
  exponent per block (a matmul whose rows :func:`padded_rows` pads first copies its float32 rows;
  a window-blocked conv, :func:`~bitq_tvm.kernels.contract.is_window_blocked`, first writes its
  float32 im2col rows ``rows_padded x k`` and quantizes those: no int8 ``im2col`` stage);
* ``im2col`` (convs that are not pointwise, or whose rows are padded): reads the quantized input,
  writes ``rows_padded x k_padded`` int8 + ``rows_padded x blocks`` exponents per group;
* ``matmul`` per group: the packed weight (``packed_nbytes``: N padded to 16 lanes, K to whole
  blocks, one byte per mantissa for m > 4, two per byte for m <= 4, one int8 exponent per block),
  the quantized A, the float32 output ``[rows_padded, N]`` written once;
* ``epilogue`` (convs): the transpose/bias/ReLU pass back to NCHW, float32 read + write.

A depthwise conv (:func:`~bitq_tvm.kernels.contract.is_depthwise`) runs the depthwise kernel
instead of im2col + matmul (``depthwise`` stage, :func:`depthwise_stage`): its quantizer writes
an int8 mantissa and exponent per value (NHWC), the kernel reads them once, the int8 weights
``[KH*KW, C]`` + per-channel exponents cold, writes float32 ``[rows, C]``; compute: each input
value dequantized once and KH*KW float32 FMAs per output.

Cache-level tiling (BitQ's per-level structure, specialised to the kernel's loop order,
:func:`bitq_tvm.kernels.bfp_matmul.tile_bfp_matmul`, columns outer): the register tile is
``r`` rows x ``16 g`` outputs (the x86 default tile). For one column tile, every row tile reads
the same ``[16 g, k_padded]`` weight panel and its own ``[r, k_padded]`` rows of A, so per level:
weights enter once if the panel (+ one row tile of A) fits, else once per row tile; A enters once
if all of A (+ one panel) fits, else once per column tile. Tensors produced by the stage before
(the layer input, A) are read from the smallest level that holds them (no traffic into levels
they fit); written tensors cross every level they do not fit; weights are cold (they come from
DRAM through every level, once per inference).

**The generic loop-nest model** (:func:`layer_costs`) prices layers that run in float32 (FP32
candidates, and candidates deployment runs as float simulation) and BitQ's nominal
bits-per-element ablation:

A conv layer is the loop nest <B, M, N, Ky, Kx, Oh, Ow> (a dense/matmul layer is a 1x1 conv whose
rows are the output pixels). For every cache level we pick the tile sizes (and the loop order of
the tiles) whose footprint fits the level and whose traffic into the level is smallest; footprints
and traffic scale with the bits per element of each operand, so lower bitwidths fit bigger tiles
and move fewer bytes. Outputs are fp32 accumulators.

Traffic model (one resident tile per operand, reloaded whenever its tile indices change):

* Only the innermost loops matter. Each loop dim is irrelevant to exactly one operand (B, Oh, Ow
  to weights; M to inputs; N, Ky, Kx to outputs), so the best orders keep one operand stationary
  by putting all of its irrelevant loops innermost: weight-, input- or output-stationary. With
  ``c_d`` tiles along dim d, the other operands move ``c`` times their size, where ``c`` is the
  product of their irrelevant dims' tile counts; partial output sums are written ``c`` times and
  read back ``c - 1`` times.
* Input tiles carry the convolution halo: an (oh, ky) tile reads ``(oh-1)*stride + (ky-1)*dil + 1``
  rows, so tiling the spatial dims costs re-reads of overlapping rows.
* Groups share no data, so a grouped conv costs ``groups`` times its per-group nest.
* Each level is tiled independently against the level (or DRAM) outside it, as in BitQ's
  per-level solve. Padding rows are counted as input traffic.

Costs. Every byte filled into or written back from a level pays that level's ``cost_per_byte``,
and bytes crossing between DRAM and the outermost level additionally pay ``dram_cost_per_byte``
(``energy``); compute adds ``cycle_cost`` per cycle. With BitQ's constants (DRAM 640 vs on-chip 5
per byte) this is BitQ's energy-like DM cost; :func:`bitq_tvm.solver.performance.memory_hierarchy`
instead gives cycles per byte (the performance term is a time estimate: the constants rank
candidates as their latency does, see ``docs/design.md``). Compute cycles of the kernel model
are the padded MACs at the target's int8 rate plus the kernels' vector work counted per stage
(per-block scaling epilogue, weight-scale build, nibble unpack, activation sums, quantizer,
copies) at :attr:`KernelRates.vector_ops_per_cycle`. Only ratios matter to the optimiser, which
normalises the performance term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import BitqError

BITQ_DRAM_COST_PER_BYTE = 640.0
BITQ_ONCHIP_COST_PER_BYTE = 5.0
OUTPUT_BITS = 32.0  # outputs are fp32 accumulators

DATAFLOWS = ("output-stationary", "weight-stationary", "input-stationary")
LOOP_DIMS = ("b", "m", "n", "ky", "kx", "oh", "ow")


@dataclass(frozen=True)
class ConvShape:
    """A conv layer's loop-nest extents (NCHW semantics).

    ``in_channels`` is per group; ``out_channels`` is the total over all groups. ``stride`` and
    ``dilation`` are ``(h, w)`` pairs.
    """

    batch: int
    out_channels: int
    in_channels: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self):
        for field in ("batch", "out_channels", "in_channels", "kernel_h", "kernel_w", "out_h",
                      "out_w", "groups"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise BitqError(f"ConvShape.{field} must be a positive integer, got {value!r}")
            object.__setattr__(self, field, int(value))
        for field in ("stride", "dilation"):
            pair = tuple(getattr(self, field))
            if len(pair) != 2 or any(not isinstance(v, (int, np.integer)) or v < 1 for v in pair):
                raise BitqError(f"ConvShape.{field} must be two positive integers, got {pair!r}")
            object.__setattr__(self, field, tuple(int(v) for v in pair))
        if self.out_channels % self.groups:
            raise BitqError(f"ConvShape.out_channels={self.out_channels} is not divisible by "
                            f"groups={self.groups}")

    @classmethod
    def dense(cls, rows: int, in_features: int, out_features: int) -> "ConvShape":
        """A matmul ``(rows x in_features) @ (in_features x out_features)`` as a 1x1 conv."""
        return cls(batch=1, out_channels=out_features, in_channels=in_features, kernel_h=1,
                   kernel_w=1, out_h=rows, out_w=1)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the whole layer."""
        return (self.batch * self.out_channels * self.out_h * self.out_w * self.in_channels
                * self.kernel_h * self.kernel_w)

    @property
    def in_h(self) -> int:
        """Padded input height read by the layer."""
        return (self.out_h - 1) * self.stride[0] + (self.kernel_h - 1) * self.dilation[0] + 1

    @property
    def in_w(self) -> int:
        """Padded input width read by the layer."""
        return (self.out_w - 1) * self.stride[1] + (self.kernel_w - 1) * self.dilation[1] + 1


@dataclass(frozen=True)
class CacheLevel:
    """One on-chip memory level: capacity and energy-like cost per byte filled or written back."""

    name: str
    size_bytes: int
    cost_per_byte: float = BITQ_ONCHIP_COST_PER_BYTE

    def __post_init__(self):
        if not self.name:
            raise BitqError("CacheLevel.name must be non-empty")
        if self.size_bytes <= 0:
            raise BitqError(f"cache level {self.name!r}: size_bytes must be positive, "
                            f"got {self.size_bytes}")
        if not math.isfinite(self.cost_per_byte) or self.cost_per_byte < 0:
            raise BitqError(f"cache level {self.name!r}: cost_per_byte must be finite and >= 0, "
                            f"got {self.cost_per_byte}")


@dataclass(frozen=True)
class MemoryHierarchy:
    """Cache levels ordered innermost (smallest) first, backed by DRAM."""

    levels: tuple[CacheLevel, ...]
    dram_cost_per_byte: float = BITQ_DRAM_COST_PER_BYTE

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(self.levels))
        if not self.levels:
            raise BitqError("MemoryHierarchy needs at least one cache level")
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise BitqError(f"MemoryHierarchy level names must be unique, got {names}")
        sizes = [level.size_bytes for level in self.levels]
        if any(inner >= outer for inner, outer in zip(sizes, sizes[1:])):
            raise BitqError(f"MemoryHierarchy levels must grow strictly outward, got sizes {sizes}")
        if not math.isfinite(self.dram_cost_per_byte) or self.dram_cost_per_byte < 0:
            raise BitqError(f"MemoryHierarchy.dram_cost_per_byte must be finite and >= 0, "
                            f"got {self.dram_cost_per_byte}")


@dataclass(frozen=True)
class LayerCost:
    """Predicted cost of one layer under one (weight bits, activation bits, block size) choice.

    ``level_bytes[i]`` is the traffic into ``hierarchy.levels[i]``; ``dram_bytes`` is the traffic
    into the outermost level and ``onchip_bytes`` the traffic into all the others. The kernel
    model also gives its ``stages`` and ``operand_bytes`` (tensor -> bytes of one pass over it:
    ``weights`` is what deployment stores, ``qa``, ``im2col``, ``output``, ...).
    """

    dram_bytes: float
    onchip_bytes: float
    energy: float
    compute_cycles: float
    scale_ops: float
    total: float
    level_bytes: tuple[float, ...] = ()
    stages: tuple["StageCost", ...] = ()
    operand_bytes: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Tiling:
    """The best tiling of a layer for one capacity: tile size per loop dim (within one group),
    dataflow, the tiles' footprint and the traffic of the whole layer (all groups), in bytes."""

    tiles: tuple[tuple[str, int], ...]
    dataflow: str
    footprint_bytes: float
    traffic_bytes: float

    def __post_init__(self):
        if self.dataflow not in DATAFLOWS:
            raise BitqError(f"Tiling.dataflow must be one of {DATAFLOWS}, got {self.dataflow!r}")


def bits_per_element(fmt) -> float:
    """Storage bits per element of a BFP format (``m + E / B``); ``None`` (fp32) gives 32."""
    if fmt is None:
        return 32.0
    return fmt.mantissa_bits + fmt.exponent_bits / fmt.block_size


def tile_choices(extent: int, max_choices: int) -> np.ndarray:
    """Divisors of ``extent``, thinned to about ``max_choices`` spread-out ones (1, extent kept)."""
    divisors = [d for d in range(1, extent + 1) if extent % d == 0]
    if len(divisors) > max_choices:
        keep = np.unique(np.round(np.linspace(0, len(divisors) - 1, max_choices)).astype(int))
        divisors = [divisors[i] for i in keep]
    return np.asarray(divisors, dtype=np.int64)


@dataclass(frozen=True)
class _DataflowGrid:
    """One dataflow's enumerated tilings; the remaining ("free") dim is solved per capacity.

    In elements, footprint = free tile * unit + fixed and traffic = base + count * per_count, with
    count = free_extent / free tile; coefficient arrays are (G, 3) for (weights, inputs, outputs)
    and become bytes when multiplied by each operand's bytes per element.
    """

    dataflow: str
    enumerated: dict  # dim -> (G,) tile sizes of the enumerated dims
    free_dim: str
    free_extent: int
    count_by_fit: np.ndarray  # [x + 1] -> tile count of the largest divisor <= x (inf for x < 1)
    unit: np.ndarray
    fixed: np.ndarray
    base: np.ndarray
    per_count: np.ndarray


def _halo_cover(out: int, kernel: int, out_tile, kernel_tile, stride: int, dilation: int):
    """Sum over all (out tile, kernel tile) pairs of the input rows each pair reads."""
    out_tiles = out // out_tile
    kernel_tiles = kernel // kernel_tile
    return (kernel_tiles * (out - out_tiles) * stride + out_tiles * (kernel - kernel_tiles)
            * dilation + out_tiles * kernel_tiles)


def _count_by_fit(extent: int) -> np.ndarray:
    largest_divisor = np.zeros(extent + 2)
    for divisor in tile_choices(extent, extent):
        largest_divisor[divisor + 1:] = divisor
    with np.errstate(divide="ignore"):
        return extent / largest_divisor


@lru_cache(maxsize=4096)
def _dataflow_grids(shape: ConvShape, max_choices: int) -> tuple[_DataflowGrid, ...]:
    extents = dict(b=shape.batch, m=shape.out_channels // shape.groups, n=shape.in_channels,
                   ky=shape.kernel_h, kx=shape.kernel_w, oh=shape.out_h, ow=shape.out_w)
    (sh, sw), (dh, dw) = shape.stride, shape.dilation
    weights_total = extents["m"] * extents["n"] * extents["ky"] * extents["kx"]
    outputs_total = extents["b"] * extents["m"] * extents["oh"] * extents["ow"]

    grids = []
    # Each dataflow fixes the dim that does not change its traffic at tile 1 (footprint only grows
    # with it) and solves the dim whose traffic falls monotonically with its tile (largest fit).
    for dataflow, enum_dims, one_dim, free_dim in (
        ("output-stationary", ("b", "oh", "ow", "ky", "kx"), "n", "m"),
        ("weight-stationary", ("m", "oh", "ow", "ky", "kx"), "b", "n"),
        ("input-stationary", ("b", "oh", "ow", "ky", "kx"), "m", "n"),
    ):
        axes = np.meshgrid(*(tile_choices(extents[d], max_choices) for d in enum_dims),
                           indexing="ij")
        t = dict(zip(enum_dims, axes))
        t[one_dim] = np.ones_like(axes[0])
        count = {d: extents[d] // t[d] for d in t}
        in_rows = (t["oh"] - 1) * sh + (t["ky"] - 1) * dh + 1
        in_cols = (t["ow"] - 1) * sw + (t["kx"] - 1) * dw + 1
        inputs_cover = (extents["b"] * extents["n"]
                        * _halo_cover(extents["oh"], extents["ky"], t["oh"], t["ky"], sh, dh)
                        * _halo_cover(extents["ow"], extents["kx"], t["ow"], t["kx"], sw, dw))
        weight_reloads = count["b"] * count["oh"] * count["ow"]
        kernel_tiles = count["ky"] * count["kx"]
        kernel_elems = t["ky"] * t["kx"]
        zero = np.zeros(axes[0].shape)
        if dataflow == "output-stationary":  # free m: weights and outputs grow with it
            unit = (kernel_elems * t["n"], zero, t["b"] * t["oh"] * t["ow"])
            fixed = (zero, t["b"] * t["n"] * in_rows * in_cols, zero)
            base = (weights_total * weight_reloads, zero, zero + outputs_total)
            per_count = (zero, inputs_cover, zero)
        elif dataflow == "weight-stationary":  # free n: weights and inputs grow with it
            unit = (t["m"] * kernel_elems, t["b"] * in_rows * in_cols, zero)
            fixed = (zero, zero, t["b"] * t["m"] * t["oh"] * t["ow"])
            base = (zero + weights_total, inputs_cover * count["m"], zero - outputs_total)
            per_count = (zero, zero, 2.0 * outputs_total * kernel_tiles)
        else:  # input-stationary, free n
            unit = (t["m"] * kernel_elems, t["b"] * in_rows * in_cols, zero)
            fixed = (zero, zero, t["b"] * t["m"] * t["oh"] * t["ow"])
            base = (weights_total * weight_reloads, inputs_cover, zero - outputs_total)
            per_count = (zero, zero, 2.0 * outputs_total * kernel_tiles)
        coef = np.stack(np.broadcast_arrays(*unit, *fixed, *base, *per_count), axis=-1)
        coef = coef.astype(np.float64)
        keep = ~_dominated_by_smaller_neighbour(coef).ravel()
        coef = coef.reshape(-1, 12)[keep]
        grids.append(_DataflowGrid(
            dataflow=dataflow, enumerated={d: v.ravel()[keep] for d, v in t.items()},
            free_dim=free_dim, free_extent=extents[free_dim],
            count_by_fit=_count_by_fit(extents[free_dim]),
            unit=coef[:, 0:3], fixed=coef[:, 3:6], base=coef[:, 6:9], per_count=coef[:, 9:12]))
    return tuple(grids)


def _dominated_by_smaller_neighbour(coef: np.ndarray) -> np.ndarray:
    """Grid points whose next-smaller tile along some dim has no larger coefficient anywhere.

    Smaller-or-equal footprint and traffic coefficients win for every capacity and bit width, so
    dropping these points is exact (dominance chains end at a kept point: the index sum drops).
    """
    dominated = np.zeros(coef.shape[:-1], dtype=bool)
    for axis in range(coef.ndim - 1):
        larger = [slice(None)] * coef.ndim
        smaller = [slice(None)] * coef.ndim
        larger[axis], smaller[axis] = slice(1, None), slice(None, -1)
        dominated[tuple(larger[:-1])] |= np.all(coef[tuple(smaller)] <= coef[tuple(larger)],
                                                axis=-1)
    return dominated


def _bits_matrix(w_bits, a_bits) -> np.ndarray:
    w = np.atleast_1d(np.asarray(w_bits, dtype=np.float64))
    a = np.atleast_1d(np.asarray(a_bits, dtype=np.float64))
    if w.shape != a.shape or w.ndim != 1:
        raise BitqError(f"w_bits and a_bits must be scalars or equal-length 1-D sequences, got "
                        f"shapes {w.shape} and {a.shape}")
    for label, values in (("w_bits", w), ("a_bits", a)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise BitqError(f"{label} must be finite and positive, got {values.tolist()}")
    return np.stack([w, a, np.full_like(w, OUTPUT_BITS)]) / 8.0  # (3, K) bytes per element


def _best_per_capacity(shape, bytes_per_elem, capacities, max_choices, with_winner=False):
    """Smallest traffic (bytes, all groups) per capacity x candidate, optionally where it was found.

    Returns (traffic (L, K), winner (L, K, 3): dataflow index, grid row, free tile) with winner
    None unless ``with_winner``.
    """
    if max_choices < 2:
        raise BitqError(f"max_choices must be >= 2, got {max_choices}")
    n_levels, n_cands = len(capacities), bytes_per_elem.shape[1]
    best = np.full((n_levels, n_cands), np.inf)
    winner = np.full((n_levels, n_cands, 3), -1, dtype=np.int64) if with_winner else None
    columns = np.arange(n_cands)
    for flow_index, grid in enumerate(_dataflow_grids(shape, max_choices)):
        unit = grid.unit @ bytes_per_elem  # (G, K) bytes per unit of the free tile
        fixed = grid.fixed @ bytes_per_elem
        base = grid.base @ bytes_per_elem
        per_count = grid.per_count @ bytes_per_elem  # > 0: the free tile always pays off
        for level, capacity in enumerate(capacities):
            largest_fit = np.clip((capacity - fixed) / unit, -1.0, grid.free_extent)
            # Integer table lookup instead of a search: tile count of the largest fitting divisor,
            # inf where not even a 1-wide tile fits.
            counts = grid.count_by_fit[np.floor(largest_fit).astype(np.int64) + 1]
            traffic = base + counts * per_count
            level_best = traffic.min(axis=0)
            better = level_best < best[level]
            best[level] = np.where(better, level_best, best[level])
            if with_winner and better.any():
                row = np.argmin(traffic, axis=0)
                free_tile = np.rint(grid.free_extent / counts[row, columns])
                winner[level, better] = np.stack(
                    [np.full(n_cands, flow_index), row, free_tile], axis=1)[better]
    if np.any(np.isinf(best)):
        level, cand = np.argwhere(np.isinf(best))[0]
        raise BitqError(f"capacity {capacities[level]} bytes cannot hold even a 1-element tile of "
                        f"layer {shape} at w_bits={bytes_per_elem[0, cand] * 8:g}, "
                        f"a_bits={bytes_per_elem[1, cand] * 8:g}")
    return best * shape.groups, winner


def best_tiling(shape: ConvShape, w_bits: float, a_bits: float, capacity_bytes: float, *,
                max_choices: int = 12) -> Tiling:
    """The tiling of ``shape`` that fits ``capacity_bytes`` with the least traffic into it.

    Parameters
    ----------
    shape : ConvShape
    w_bits, a_bits : float
        Storage bits per weight / input activation element.
    capacity_bytes : float
        Capacity of the level being filled.
    max_choices : int
        Tile sizes tried per enumerated dim (divisors, thinned log-spaced when more).
    """
    bytes_per_elem = _bits_matrix(w_bits, a_bits)
    traffic, winner = _best_per_capacity(shape, bytes_per_elem, [capacity_bytes], max_choices,
                                         with_winner=True)
    flow_index, row, free_tile = (int(v) for v in winner[0, 0])
    grid = _dataflow_grids(shape, max_choices)[flow_index]
    tiles = {d: int(v[row]) for d, v in grid.enumerated.items()}
    tiles[grid.free_dim] = free_tile
    footprint = float((grid.unit[row] * free_tile + grid.fixed[row]) @ bytes_per_elem[:, 0])
    return Tiling(tiles=tuple((d, tiles[d]) for d in LOOP_DIMS), dataflow=grid.dataflow,
                  footprint_bytes=footprint, traffic_bytes=float(traffic[0, 0]))


def layer_costs(shape: ConvShape, w_bits, a_bits, block_sizes, hierarchy: MemoryHierarchy, *,
                macs_per_cycle: float = 16.0, scale_ops_per_cycle: float = 4.0,
                cycle_cost: float = BITQ_ONCHIP_COST_PER_BYTE,
                max_choices: int = 12) -> list[LayerCost]:
    """Vectorised :func:`layer_cost` over K candidates of one layer (equal-length sequences).

    ``block_sizes`` entries may be ``None`` (no per-block scaling, e.g. fp32).
    """
    bytes_per_elem = _bits_matrix(w_bits, a_bits)
    n_cands = bytes_per_elem.shape[1]
    blocks = list(block_sizes) if np.ndim(block_sizes) else [block_sizes] * n_cands
    if len(blocks) != n_cands:
        raise BitqError(f"block_sizes has {len(blocks)} entries for {n_cands} candidates")
    if any(b is not None and (int(b) != b or b < 1) for b in blocks):
        raise BitqError(f"block sizes must be positive integers or None, got {blocks}")
    for label, value in (("macs_per_cycle", macs_per_cycle),
                         ("scale_ops_per_cycle", scale_ops_per_cycle)):
        if not math.isfinite(value) or value <= 0:
            raise BitqError(f"{label} must be finite and positive, got {value}")

    capacities = [level.size_bytes for level in hierarchy.levels]
    level_bytes, _ = _best_per_capacity(shape, bytes_per_elem, capacities, max_choices)
    level_costs = np.array([level.cost_per_byte for level in hierarchy.levels])
    dram = level_bytes[-1]
    onchip = level_bytes[:-1].sum(axis=0)
    energy = dram * hierarchy.dram_cost_per_byte + level_costs @ level_bytes
    compute_cycles = shape.macs / macs_per_cycle
    # One fp32 multiply-add per block of the reduction per output; blocks run along the input
    # channels for each kernel offset, the last one zero-padded.
    outputs = shape.batch * shape.out_channels * shape.out_h * shape.out_w
    costs = []
    for k, block in enumerate(blocks):
        scale_ops = 0.0 if block is None else float(
            outputs * shape.kernel_h * shape.kernel_w * -(-shape.in_channels // int(block)))
        total = energy[k] + cycle_cost * (compute_cycles + scale_ops / scale_ops_per_cycle)
        costs.append(LayerCost(dram_bytes=float(dram[k]), onchip_bytes=float(onchip[k]),
                               energy=float(energy[k]), compute_cycles=float(compute_cycles),
                               scale_ops=scale_ops, total=float(total),
                               level_bytes=tuple(float(v) for v in level_bytes[:, k])))
    return costs


def layer_cost(shape: ConvShape, w_bits: float, a_bits: float, block_size: int | None,
               hierarchy: MemoryHierarchy, **options) -> LayerCost:
    """Predicted data movement, compute and scaling cost of one layer.

    Parameters
    ----------
    shape : ConvShape
    w_bits, a_bits : float
        Storage bits per weight / input-activation element, e.g. ``bits_per_element(fmt)``.
    block_size : int or None
        BFP block size along the reduction (None: no per-block scaling).
    hierarchy : MemoryHierarchy
    **options
        ``macs_per_cycle`` (integer MACs per cycle, default 16), ``scale_ops_per_cycle`` (fp32
        multiply-adds per cycle, default 4), ``cycle_cost`` (cost units per cycle, default 5: one
        on-chip byte), ``max_choices`` (tile sizes tried per dim, default 12).

    Returns
    -------
    LayerCost
        ``total = energy + cycle_cost * (compute_cycles + scale_ops / scale_ops_per_cycle)``.
    """
    return layer_costs(shape, [w_bits], [a_bits], [block_size], hierarchy, **options)[0]


def layer_cost_for_formats(shape: ConvShape, weight_format, activation_format,
                           hierarchy: MemoryHierarchy, **options) -> LayerCost:
    """:func:`layer_cost` for BFP formats (``None`` = fp32); the finer block size sets scaling."""
    blocks = [f.block_size for f in (weight_format, activation_format) if f is not None]
    return layer_cost(shape, bits_per_element(weight_format), bits_per_element(activation_format),
                      min(blocks) if blocks else None, hierarchy, **options)


# ---- the kernel model: what the deployed integer kernels move --------------------------------

# Vector instructions per vector of the stage's lanes (counted from the kernels' schedules):
# per-block epilogue of the matmul per fp32 vector of outputs and row (add, convert, 2 mul, add:
# :mod:`bitq_tvm.kernels.bfp_matmul`); block scales built per fp32 vector (load, shift, add, cast);
# nibble unpack per vector of unpacked bytes (load, and/shift select, xor, sub, store); the VNNI
# offset alone (load, xor, store); activation block sums per int8 vector (load, widen, add); the
# activation quantizer per fp32 vector (two passes: max|x|, then exponent, scale, round, clamp,
# narrow, store); byte/float copies (load, store) and the conv epilogue (load, bias, max, store).
EPILOGUE_OPS = 5.0
W_SCALE_OPS = 4.0
UNPACK_OPS = 5.0
OFFSET_OPS = 3.0
A_SUM_OPS = 3.0
QUANT_OPS = 10.0
COPY_OPS = 2.0
CONV_EPILOGUE_OPS = 4.0
DEQUANT_OPS = 2.0  # int8 -> float32 convert, times the block scale
FP32_BYTES = 4


@dataclass(frozen=True)
class KernelRates:
    """Throughputs of one core: int8 MACs of the kernel's dot intrinsic, vector width, vector
    instructions issued per cycle, whether the matmul offsets weights to uint8 (VNNI), whether
    its dot product reads nibble pairs directly (AVX2: no unpack stage), and whose default
    register tile it runs (``"x86"``: :mod:`~bitq_tvm.kernels.bfp_matmul_x86`,
    ``"lane_major"``: :mod:`~bitq_tvm.kernels.bfp_matmul_arm_riscv`)."""

    int8_macs_per_cycle: float
    vector_bytes: int
    vector_ops_per_cycle: float = 2.0
    unsigned_weights: bool = False
    register_tile: str = "x86"
    nibbles_in_registers: bool = False

    def __post_init__(self):
        for field in ("int8_macs_per_cycle", "vector_bytes", "vector_ops_per_cycle"):
            value = getattr(self, field)
            if not math.isfinite(value) or value <= 0:
                raise BitqError(f"KernelRates.{field} must be finite and positive, got {value}")
        if self.register_tile not in ("x86", "lane_major"):
            raise BitqError(f"KernelRates.register_tile must be 'x86' or 'lane_major', got {self.register_tile!r}")

    def tile(self, rows: int, column_groups: int) -> tuple[int, int]:
        """(rows, 16-lane column groups) of the kernel's default register tile."""
        if self.register_tile == "x86":
            from ..kernels.bfp_matmul_x86 import default_tile

            return default_tile(rows, column_groups)
        from ..kernels.bfp_matmul_arm_riscv import row_tile

        return row_tile(rows), 1

    @property
    def fp32_lanes(self) -> int:
        return max(1, self.vector_bytes // FP32_BYTES)


@dataclass(frozen=True)
class StageCost:
    """One kernel of a lowered layer: traffic into each level (bytes), compute cycles, total."""

    name: str
    level_bytes: tuple[float, ...]
    compute_cycles: float
    total: float


class _Traffic:
    """Per-level traffic of one stage under the locality rules of the module docstring."""

    def __init__(self, capacities):
        self.capacities = np.asarray(capacities, dtype=np.float64)
        self.bytes = np.zeros(len(capacities))

    def cold(self, nbytes: float, passes: float = 1.0):
        """Read from DRAM through every level (weights)."""
        self.bytes += nbytes * passes

    def produced(self, nbytes: float, passes: float = 1.0, resident: float | None = None):
        """Read a tensor made by the stage before (or written: it leaves the levels it does not
        fit); ``resident`` bytes (default ``nbytes``) must fit a level for it to stay there."""
        need = nbytes if resident is None else resident
        self.bytes += np.where(need > self.capacities, nbytes * passes, 0.0)


def _stage(name, traffic, compute_cycles, hierarchy, cycle_cost):
    costs = np.array([level.cost_per_byte for level in hierarchy.levels])
    memory = float(costs @ traffic.bytes + traffic.bytes[-1] * hierarchy.dram_cost_per_byte)
    return StageCost(name, tuple(float(v) for v in traffic.bytes), float(compute_cycles),
                     memory + cycle_cost * float(compute_cycles))


def matmul_stage(geometry, fmt_w, hierarchy: MemoryHierarchy, rates: KernelRates,
                 cycle_cost: float = 1.0) -> StageCost:
    """One call of the integer matmul of ``geometry`` (one group) in weight format ``fmt_w``.

    Bytes: the packed weight (:func:`~bitq_tvm.kernels.contract.packed_nbytes`), qa
    ``[rows_padded, k_padded]`` + ea ``[rows_padded, blocks]`` int8, the float32 output
    ``[rows_padded, n]``; re-reads per level by the columns-outer register tiling (module
    docstring). Compute: padded MACs at the int8 rate, the per-block epilogue, the block scales
    and the unpacked weights built per task of row tiles (nibbles when m <= 4; the +128 offset
    with VNNI, :func:`~bitq_tvm.kernels.bfp_matmul.row_tiles_per_task`),
    VNNI's activation block sums.
    """
    from ..kernels.bfp_matmul import row_tiles_per_task
    from ..kernels.contract import LANES, NIBBLE_MAX_MANTISSA_BITS, packed_nbytes, padded

    rows, kp, nb = geometry.rows_padded, geometry.k_padded, geometry.blocks
    n_padded = padded(geometry.n, LANES)
    tile_rows, tile_groups = rates.tile(rows, n_padded // LANES)
    row_tiles, col_tiles = rows // tile_rows, n_padded // (LANES * tile_groups)
    weights = float(packed_nbytes(geometry.n, kp, fmt_w))
    panel = weights / col_tiles
    a_bytes = float(rows * (kp + nb))
    a_rows = a_bytes / row_tiles
    traffic = _Traffic([level.size_bytes for level in hierarchy.levels])
    traffic.cold(weights)
    traffic.produced(weights, row_tiles - 1, resident=panel + a_rows)
    traffic.produced(a_bytes)
    traffic.produced(a_bytes, col_tiles - 1, resident=a_bytes + panel)
    traffic.produced(float(rows * geometry.n * FP32_BYTES))

    lanes = rates.fp32_lanes
    ops = EPILOGUE_OPS * rows * nb * n_padded / lanes
    ops += W_SCALE_OPS * row_tiles * nb * n_padded / lanes
    # unpacked weight panels are built once per task (a chunk of row tiles), not per row tile
    tasks_per_column = row_tiles // row_tiles_per_task(row_tiles, tile_rows)
    if fmt_w.mantissa_bits <= NIBBLE_MAX_MANTISSA_BITS and not rates.nibbles_in_registers:
        ops += UNPACK_OPS * tasks_per_column * n_padded * kp / rates.vector_bytes
    elif rates.unsigned_weights:
        ops += OFFSET_OPS * tasks_per_column * n_padded * kp / rates.vector_bytes
    if rates.unsigned_weights:
        ops += A_SUM_OPS * rows * kp / rates.vector_bytes
    cycles = rows * n_padded * kp / rates.int8_macs_per_cycle + ops / rates.vector_ops_per_cycle
    return _stage("matmul", traffic, cycles, hierarchy, cycle_cost)


def depthwise_stage(geometry, input_shape, hierarchy: MemoryHierarchy, rates: KernelRates,
                    cycle_cost: float = 1.0) -> StageCost:
    """The depthwise kernel of ``geometry`` (:class:`~bitq_tvm.kernels.contract.DepthwiseGeometry`)
    on an NCHW ``input_shape`` (module docstring)."""
    from ..kernels.contract import integer_weight_bytes

    values = float(input_shape[0]) * float(input_shape[2]) * float(input_shape[3]) * geometry.channels
    traffic = _Traffic([level.size_bytes for level in hierarchy.levels])
    traffic.produced(2 * values)  # int8 mantissa + int8 exponent per value
    traffic.cold(float(integer_weight_bytes(geometry, None)))
    traffic.produced(float(geometry.rows * geometry.channels * FP32_BYTES))
    ops = DEQUANT_OPS * values + geometry.rows * geometry.channels * geometry.kernel_offsets
    return _stage("depthwise", traffic, ops / rates.fp32_lanes / rates.vector_ops_per_cycle, hierarchy, cycle_cost)


def kernel_layer_costs(kind: str, input_shape, weight_shape, output_shape, groups: int, formats,
                       hierarchy: MemoryHierarchy, rates: KernelRates,
                       cycle_cost: float = 1.0) -> list[LayerCost]:
    """:class:`LayerCost` of a layer lowered to integer kernels, per (weight, activation) format pair.

    ``kind`` is ``"conv2d"`` (NCHW input, OIHW weight) or ``"matmul"``; every pair in
    ``formats`` must be one deployment runs as integer kernels (the caller asks
    :func:`~bitq_tvm.kernels.contract.integer_support`). ``total`` is the sum of the stages'
    totals (module docstring); ``scale_ops`` counts the matmul's per-block scalings (a depthwise
    conv's: one per product).
    """
    from ..kernels.contract import DepthwiseGeometry, integer_weight_bytes, is_window_blocked, kernel_geometry

    capacities = [level.size_bytes for level in hierarchy.levels]
    in_elems = float(math.prod(int(d) for d in input_shape))
    out_elems = float(math.prod(int(d) for d in output_shape))
    lanes = rates.fp32_lanes
    costs = []
    for fmt_w, fmt_a in formats:
        if fmt_w is None or fmt_a is None or fmt_w.block_size != fmt_a.block_size:
            raise BitqError(f"kernel_layer_costs: formats {fmt_w}, {fmt_a} do not run as integer kernels")
        g = kernel_geometry(kind, input_shape, weight_shape, output_shape, fmt_a.block_size, groups)
        depthwise = isinstance(g, DepthwiseGeometry)
        window = kind == "conv2d" and is_window_blocked(weight_shape, groups, fmt_a.block_size)
        stages, operands = [], {}
        # activation quantizer (+ the float32 row padding of a matmul, the float32 im2col of a
        # window-blocked conv, which the quantizer then reads)
        t = _Traffic(capacities)
        t.produced(in_elems * FP32_BYTES)
        quant_in = in_elems
        if kind == "matmul" and g.rows_padded != g.rows:
            quant_in = in_elems * g.rows_padded / g.rows
            t.produced(2 * quant_in * FP32_BYTES, resident=quant_in * FP32_BYTES)
        if window:
            quant_in = float(g.rows_padded * g.k)
            t.produced(quant_in * FP32_BYTES)
        if depthwise:
            pixels = float(input_shape[0]) * float(input_shape[2]) * float(input_shape[3])
            q_elems = q_exps = pixels * g.channels
        elif kind == "conv2d" and not window:
            pixels = float(input_shape[0]) * float(input_shape[2]) * float(input_shape[3])
            q_elems = pixels * g.groups * g.group_channels_padded
            q_exps = pixels * g.groups * (g.group_channels_padded // g.block_size)
        else:
            q_elems = float(g.rows_padded * g.k_padded)
            q_exps = float(g.rows_padded * g.blocks)
        q_bytes = q_elems + q_exps
        t.produced(q_bytes)
        operands["activation_fp32"] = in_elems * FP32_BYTES
        operands["qa"] = q_bytes
        stages.append(_stage("act_quant", t, QUANT_OPS * quant_in / lanes / rates.vector_ops_per_cycle,
                             hierarchy, cycle_cost))
        if depthwise:
            stages.append(depthwise_stage(g, input_shape, hierarchy, rates, cycle_cost))
            operands["output"] = float(g.rows * g.channels * FP32_BYTES)
            scale_ops = float(g.rows * g.channels * g.kernel_offsets)
        else:
            pointwise = (kind == "matmul" or window or (tuple(weight_shape[2:]) == (1, 1) and g.groups == 1
                                              and tuple(input_shape[2:]) == tuple(output_shape[2:])
                                              and g.rows_padded == g.rows))
            a_bytes = float(g.rows_padded * (g.k_padded + g.blocks))
            if not pointwise:
                t = _Traffic(capacities)
                t.produced(q_bytes)
                t.produced(a_bytes * g.groups, resident=a_bytes)
                operands["im2col"] = a_bytes * g.groups
                stages.append(_stage("im2col", t, COPY_OPS * g.groups * a_bytes / rates.vector_bytes
                                     / rates.vector_ops_per_cycle, hierarchy, cycle_cost))
            mm = matmul_stage(g, fmt_w, hierarchy, rates, cycle_cost)
            stages.append(StageCost("matmul", tuple(v * g.groups for v in mm.level_bytes),
                                    mm.compute_cycles * g.groups, mm.total * g.groups))
            operands["output"] = float(g.groups * g.rows_padded * g.n * FP32_BYTES)
            scale_ops = float(g.groups * g.rows_padded * g.n * g.blocks)
        operands["weights"] = float(integer_weight_bytes(g, fmt_w))
        if kind == "conv2d":
            t = _Traffic(capacities)
            t.produced(operands["output"])
            t.produced(out_elems * FP32_BYTES)
            stages.append(_stage("epilogue", t, CONV_EPILOGUE_OPS * out_elems / lanes
                                 / rates.vector_ops_per_cycle, hierarchy, cycle_cost))
        level = np.sum([s.level_bytes for s in stages], axis=0)
        compute = sum(s.compute_cycles for s in stages)
        total = sum(s.total for s in stages)
        energy = total - cycle_cost * compute
        costs.append(LayerCost(dram_bytes=float(level[-1]), onchip_bytes=float(level[:-1].sum()),
                               energy=float(energy), compute_cycles=float(compute),
                               scale_ops=scale_ops, total=float(total),
                               level_bytes=tuple(float(v) for v in level), stages=tuple(stages),
                               operand_bytes=tuple(operands.items())))
    return costs


def fake_quant_stage(input_elements: int, hierarchy: MemoryHierarchy, rates: KernelRates,
                     cycle_cost: float = 1.0) -> StageCost:
    """The float simulation's run-time fake-quant of a layer's input (weights fold at compile
    time): float32 read + write, the quantizer's and dequantizer's vector work."""
    t = _Traffic([level.size_bytes for level in hierarchy.levels])
    t.produced(2.0 * input_elements * FP32_BYTES, resident=input_elements * FP32_BYTES)
    cycles = (QUANT_OPS + COPY_OPS) * input_elements / rates.fp32_lanes / rates.vector_ops_per_cycle
    return _stage("fake_quant", t, cycles, hierarchy, cycle_cost)
