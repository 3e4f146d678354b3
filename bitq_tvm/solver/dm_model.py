"""Analytical performance term: BitQ's data-movement (DM) expression, generalised.

A conv layer is the loop nest <B, M, N, Ky, Kx, Oh, Ow> (a dense/matmul layer is a 1x1 conv whose
rows are the output pixels). For every cache level we pick the tile sizes (and the loop order of
the tiles) whose footprint fits the level and whose traffic into the level is smallest; footprints
and traffic scale with the bits per element of each operand, so lower bitwidths fit bigger tiles
and move fewer bytes. Weights and inputs are stored at their BFP bits per element
(mantissa + shared exponent / block size); outputs are fp32 accumulators.

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

Cost units follow BitQ (DRAM 640 vs on-chip 5 per access) but are expressed **per byte**: every byte
filled into or written back from a level pays that level's ``cost_per_byte``, and bytes crossing
between DRAM and the outermost level additionally pay ``dram_cost_per_byte``. Only ratios matter to
the optimiser, which normalises the performance term.
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
    into the outermost level and ``onchip_bytes`` the traffic into all the others.
    """

    dram_bytes: float
    onchip_bytes: float
    energy: float
    compute_cycles: float
    scale_ops: float
    total: float
    level_bytes: tuple[float, ...] = ()


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
