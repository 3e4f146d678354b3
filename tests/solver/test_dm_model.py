"""DM model: tile search vs an independent brute force, compulsory traffic, monotonicity."""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.solver.dm_model import (
    CacheLevel, ConvShape, MemoryHierarchy, best_tiling, bits_per_element, layer_cost,
    layer_cost_for_formats, layer_costs)

DIMS = ("b", "m", "n", "ky", "kx", "oh", "ow")
# Which loop dims index each operand; every other dim is a reuse opportunity for it.
RELEVANT = {
    "w": np.array([d in ("m", "n", "ky", "kx") for d in DIMS]),
    "i": np.array([d in ("b", "n", "ky", "kx", "oh", "ow") for d in DIMS]),
    "o": np.array([d in ("b", "m", "oh", "ow") for d in DIMS]),
}
ALL_ORDERS = np.array(list(itertools.permutations(range(7))))  # outer -> inner


def _extents(shape):
    return dict(b=shape.batch, m=shape.out_channels // shape.groups, n=shape.in_channels,
                ky=shape.kernel_h, kx=shape.kernel_w, oh=shape.out_h, ow=shape.out_w)


def _divisors(x):
    return [d for d in range(1, x + 1) if x % d == 0]


def _input_span(out_start, out_len, k_start, k_len, stride, dilation):
    """Bounding box of input rows touched by one (output tile, kernel tile) pair."""
    lo = out_start * stride + k_start * dilation
    hi = (out_start + out_len - 1) * stride + (k_start + k_len - 1) * dilation
    return hi - lo + 1


def _input_cover_by_enumeration(extent_out, extent_k, tile_out, tile_k, stride, dilation):
    return sum(_input_span(o, tile_out, k, tile_k, stride, dilation)
               for o in range(0, extent_out, tile_out) for k in range(0, extent_k, tile_k))


def _all_tilings(shape, w_bits, a_bits):
    """Every divisor tiling with its footprint (bytes) and per-operand sweep sizes (bytes)."""
    ext = _extents(shape)
    (sh, sw), (dh, dw) = shape.stride, shape.dilation
    tiles = np.array(list(itertools.product(*(_divisors(ext[d]) for d in DIMS))))
    t = dict(zip(DIMS, tiles.T))
    in_rows = (t["oh"] - 1) * sh + (t["ky"] - 1) * dh + 1
    in_cols = (t["ow"] - 1) * sw + (t["kx"] - 1) * dw + 1
    footprint = (t["m"] * t["n"] * t["ky"] * t["kx"] * w_bits / 8
                 + t["b"] * t["n"] * in_rows * in_cols * a_bits / 8
                 + t["b"] * t["m"] * t["oh"] * t["ow"] * 4)
    cover = np.array([
        _input_cover_by_enumeration(ext["oh"], ext["ky"], toh, tky, sh, dh)
        * _input_cover_by_enumeration(ext["ow"], ext["kx"], tow, tkx, sw, dw)
        for toh, tky, tow, tkx in zip(t["oh"], t["ky"], t["ow"], t["kx"])])
    sweep = {"w": ext["m"] * ext["n"] * ext["ky"] * ext["kx"] * w_bits / 8,
             "i": ext["b"] * ext["n"] * cover * a_bits / 8,
             "o": ext["b"] * ext["m"] * ext["oh"] * ext["ow"] * 4.0}
    counts = np.array([[ext[d] // v for d, v in zip(DIMS, row)] for row in tiles])
    return tiles, footprint, counts, sweep


def _reloads(counts, order, relevant):
    """Sweeps of one operand for a loop order: the operand is reloaded each time its tile
    changes, i.e. once per iteration of every loop outside its innermost non-trivial relevant
    loop (loops of one tile never change anything)."""
    c = counts[:, order]  # (T, 7) outer -> inner
    rel = relevant[order]
    moving = rel[None, :] & (c > 1)
    innermost = np.where(moving.any(axis=1), 6 - np.argmax(moving[:, ::-1], axis=1), -1)
    irrelevant_counts = np.where(rel[None, :], 1, c)
    outside = np.cumprod(np.hstack([np.ones((len(c), 1), dtype=np.int64), irrelevant_counts]),
                         axis=1)
    return outside[np.arange(len(c)), np.maximum(innermost, 0)]


def _traffic_for_order(counts, sweep, order):
    w = _reloads(counts, order, RELEVANT["w"])
    i = _reloads(counts, order, RELEVANT["i"])
    o = _reloads(counts, order, RELEVANT["o"])
    return sweep["w"] * w + sweep["i"] * i + sweep["o"] * (2 * o - 1)  # psum write+read-back


def _brute_force_traffic(shape, w_bits, a_bits):
    """Per divisor tiling, the least traffic over all 5040 loop orders (one group)."""
    tiles, footprint, counts, sweep = _all_tilings(shape, w_bits, a_bits)
    best = np.full(len(tiles), np.inf)
    for order in ALL_ORDERS:
        best = np.minimum(best, _traffic_for_order(counts, sweep, order))
    return tiles, footprint, best


def _simulate(shape, tile, order, w_bits, a_bits):
    """Walk the tile loop nest; count bytes as resident tiles change (psums written back and
    re-read)."""
    ext = _extents(shape)
    (sh, sw), (dh, dw) = shape.stride, shape.dilation
    tile = dict(zip(DIMS, tile))
    starts = {d: range(0, ext[d], tile[d]) for d in DIMS}
    resident = {"w": None, "i": None, "o": None}
    seen_outputs = set()
    moved = 0.0
    out_tile_bytes = tile["b"] * tile["m"] * tile["oh"] * tile["ow"] * 4
    for idx in itertools.product(*(starts[DIMS[k]] for k in order)):
        s = {DIMS[k]: v for k, v in zip(order, idx)}
        keys = {"w": (s["m"], s["n"], s["ky"], s["kx"]),
                "i": (s["b"], s["n"], s["oh"], s["ky"], s["ow"], s["kx"]),
                "o": (s["b"], s["m"], s["oh"], s["ow"])}
        if keys["w"] != resident["w"]:
            moved += tile["m"] * tile["n"] * tile["ky"] * tile["kx"] * w_bits / 8
        if keys["i"] != resident["i"]:
            rows = _input_span(s["oh"], tile["oh"], s["ky"], tile["ky"], sh, dh)
            cols = _input_span(s["ow"], tile["ow"], s["kx"], tile["kx"], sw, dw)
            moved += tile["b"] * tile["n"] * rows * cols * a_bits / 8
        if keys["o"] != resident["o"]:
            if resident["o"] is not None:
                moved += out_tile_bytes  # write back the partial sums
            if keys["o"] in seen_outputs:
                moved += out_tile_bytes  # read them back to keep accumulating
            seen_outputs.add(keys["o"])
        resident = keys
    return moved + out_tile_bytes  # final write-back


SMALL_SHAPES = [
    ConvShape(batch=2, out_channels=4, in_channels=4, kernel_h=3, kernel_w=3, out_h=4, out_w=4),
    ConvShape(batch=1, out_channels=6, in_channels=4, kernel_h=1, kernel_w=1, out_h=4, out_w=4,
              stride=(2, 2)),
    ConvShape(batch=1, out_channels=4, in_channels=2, kernel_h=3, kernel_w=3, out_h=6, out_w=4,
              dilation=(2, 1), groups=2),
    ConvShape.dense(rows=12, in_features=8, out_features=6),
]


@pytest.mark.parametrize("shape_index", [0, 1])
def test_reference_rule_matches_loop_simulation(shape_index):
    shape = SMALL_SHAPES[shape_index]
    tiles, _, counts, sweep = _all_tilings(shape, 4.0, 8.0)
    rng = np.random.default_rng(shape_index)
    for pick in rng.choice(len(tiles), size=12, replace=False):
        order = ALL_ORDERS[rng.integers(len(ALL_ORDERS))]
        one_sweep = {**sweep, "i": sweep["i"][pick:pick + 1]}
        predicted = _traffic_for_order(counts[pick:pick + 1], one_sweep, order)[0]
        assert _simulate(shape, tiles[pick], order, 4.0, 8.0) == pytest.approx(predicted,
                                                                               rel=1e-12)


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("w_bits,a_bits", [(4.0, 8.0), (8.25, 2.5)])
def test_tile_search_matches_brute_force(shape, w_bits, a_bits):
    tiles, footprint, brute = _brute_force_traffic(shape, w_bits, a_bits)
    for capacity in (16, 40, 100, 300, 1000, 10_000):
        expected = shape.groups * brute[footprint <= capacity].min()
        found = best_tiling(shape, w_bits, a_bits, capacity)
        assert found.traffic_bytes == pytest.approx(expected, rel=1e-12), capacity
        # the reported tiles fit and really achieve the reported traffic
        chosen = dict(found.tiles)
        row = np.flatnonzero((tiles == [chosen[d] for d in DIMS]).all(axis=1))[0]
        assert footprint[row] == pytest.approx(found.footprint_bytes, rel=1e-12)
        assert found.footprint_bytes <= capacity
        assert shape.groups * brute[row] == pytest.approx(expected, rel=1e-12)


def test_layer_that_fits_moves_each_operand_from_dram_once():
    shape = ConvShape(batch=1, out_channels=8, in_channels=4, kernel_h=3, kernel_w=3, out_h=6,
                      out_w=6)
    hierarchy = MemoryHierarchy((CacheLevel("L1", 256, 5.0), CacheLevel("L2", 65536, 5.0)),
                                dram_cost_per_byte=640.0)
    # weights 8*4*3*3 = 288 B, input 4*8*8 = 256 B (8-bit), outputs 8*6*6*4 = 1152 B (fp32)
    cost = layer_cost(shape, 8.0, 8.0, 32, hierarchy)
    assert cost.dram_bytes == 1696.0
    assert cost.level_bytes == (cost.onchip_bytes, 1696.0)
    # 256 B cannot keep the whole 256 B input resident next to a weight and an output tile
    assert cost.onchip_bytes > 1696.0
    assert cost.energy == pytest.approx(1696.0 * 640 + 5.0 * (1696.0 + cost.onchip_bytes),
                                        rel=1e-12)
    # 4.25-bit weights: 288 * 4.25 / 8 = 153 B
    assert layer_cost(shape, 4.25, 8.0, 32, hierarchy).dram_bytes == 153.0 + 256.0 + 1152.0


HIERARCHY = MemoryHierarchy((CacheLevel("L1", 32 * 1024), CacheLevel("L2", 256 * 1024),
                             CacheLevel("L3", 2 * 1024 * 1024)))
NET_SHAPES = [
    ConvShape(1, 64, 3, 7, 7, 112, 112, stride=(2, 2)),
    ConvShape(1, 64, 64, 3, 3, 56, 56),
    ConvShape(1, 256, 64, 1, 1, 56, 56),
    ConvShape(1, 512, 512, 3, 3, 7, 7),
    ConvShape(1, 96, 1, 3, 3, 56, 56, groups=96),
    ConvShape.dense(rows=128, in_features=768, out_features=3072),
]


@pytest.mark.parametrize("shape", NET_SHAPES)
def test_fewer_bits_never_move_more_bytes(shape):
    bits = [8.25, 6.25, 5.0, 4.25, 3.125, 2.25]
    for vary in ("w", "a", "both"):
        costs = [layer_cost(shape, b if vary != "a" else 8.0, b if vary != "w" else 8.0, 32,
                            HIERARCHY) for b in bits]
        for wider, narrower in zip(costs, costs[1:]):
            for a, b in zip(wider.level_bytes, narrower.level_bytes):
                assert b <= a * (1 + 1e-12)
            assert narrower.energy < wider.energy  # compulsory traffic shrinks strictly


def test_batched_costs_equal_single_costs():
    shape = NET_SHAPES[1]
    w, a, blocks = [8.25, 4.5, 2.125], [6.25, 8.0, 3.0], [32, 16, None]
    batch = layer_costs(shape, w, a, blocks, HIERARCHY)
    assert batch == [layer_cost(shape, *args, HIERARCHY) for args in zip(w, a, blocks)]


def test_grouped_conv_costs_groups_times_one_group():
    grouped = ConvShape(1, 64, 16, 3, 3, 28, 28, groups=4)
    one_group = ConvShape(1, 16, 16, 3, 3, 28, 28)
    g, o = (layer_cost(s, 4.25, 6.25, 16, HIERARCHY) for s in (grouped, one_group))
    assert g.level_bytes == pytest.approx(tuple(4 * v for v in o.level_bytes), rel=1e-12)
    assert g.compute_cycles == 4 * o.compute_cycles


def test_scale_ops_count_padded_blocks_per_kernel_offset():
    shape = ConvShape(1, 8, 48, 3, 3, 5, 5)
    outputs_times_offsets = 8 * 5 * 5 * 9
    costs = layer_costs(shape, [8.25] * 3, [8.25] * 3, [16, 32, None], HIERARCHY,
                        macs_per_cycle=8.0, scale_ops_per_cycle=2.0, cycle_cost=3.0)
    assert [c.scale_ops for c in costs] == [3 * outputs_times_offsets,
                                            2 * outputs_times_offsets, 0.0]
    assert costs[0].compute_cycles == shape.macs / 8.0
    assert costs[0].total == pytest.approx(
        costs[0].energy + 3.0 * (shape.macs / 8.0 + 3 * outputs_times_offsets / 2.0), rel=1e-12)


@dataclass(frozen=True)
class _Format:  # stand-in with the BFPFormat fields the model reads
    mantissa_bits: int
    block_size: int
    exponent_bits: int = 8


def test_format_helpers():
    assert bits_per_element(_Format(4, 32)) == 4.25
    assert bits_per_element(None) == 32.0
    shape = NET_SHAPES[2]
    via_formats = layer_cost_for_formats(shape, _Format(4, 32), _Format(6, 16), HIERARCHY)
    assert via_formats == layer_cost(shape, 4.25, 6.5, 16, HIERARCHY)
    assert layer_cost_for_formats(shape, None, None, HIERARCHY).scale_ops == 0.0


def test_dense_is_a_one_by_one_conv():
    assert ConvShape.dense(rows=10, in_features=20, out_features=30) == ConvShape(
        batch=1, out_channels=30, in_channels=20, kernel_h=1, kernel_w=1, out_h=10, out_w=1)


def test_user_errors_name_the_culprit():
    with pytest.raises(BitqError, match="cannot hold even a 1-element tile"):
        layer_cost(NET_SHAPES[1], 8.0, 8.0, 32, MemoryHierarchy((CacheLevel("L1", 4),)))
    with pytest.raises(BitqError, match="out_channels=10 is not divisible by groups=4"):
        ConvShape(1, 10, 2, 3, 3, 5, 5, groups=4)
    with pytest.raises(BitqError, match="ConvShape.kernel_h"):
        ConvShape(1, 8, 2, 0, 3, 5, 5)
    with pytest.raises(BitqError, match="grow strictly outward"):
        MemoryHierarchy((CacheLevel("L1", 4096), CacheLevel("L2", 1024)))
    with pytest.raises(BitqError, match="w_bits must be finite and positive"):
        layer_cost(NET_SHAPES[1], 0.0, 8.0, 32, HIERARCHY)


# ---- the kernel model (issue 12): the bytes the deployed kernels move -------------------------

from bitq_tvm.formats import BFPFormat  # noqa: E402
from bitq_tvm.frontend.onnx_model import Layer  # noqa: E402
from bitq_tvm.kernels.bfp_matmul_x86 import default_tile  # noqa: E402
from bitq_tvm.kernels.contract import (  # noqa: E402
    gemm_geometry, integer_support, integer_weight_bytes, packed_nbytes, padded)
from bitq_tvm.plan import FP32, LayerFormats  # noqa: E402
from bitq_tvm.solver.dm_model import (  # noqa: E402
    KernelRates, fake_quant_stage, kernel_layer_costs, matmul_stage)

RATES = KernelRates(int8_macs_per_cycle=32.0, vector_bytes=32)
KERNEL_HIERARCHY = MemoryHierarchy((CacheLevel("L1", 32 * 1024, 3 / 64), CacheLevel("L2", 512 * 1024, 10 / 64),
                                    CacheLevel("L3", 32 * 1024 * 1024, 0.0)), dram_cost_per_byte=0.15)
HUGE = MemoryHierarchy((CacheLevel("L1", 2**40, 1.0),), dram_cost_per_byte=1.0)
CONV3X3 = Layer("conv", "Conv", "w", (128, 64, 3, 3), (1, 64, 28, 28), (1, 128, 28, 28))
CONV16 = Layer("conv16", "Conv", "w", (32, 16, 3, 3), (1, 16, 14, 14), (1, 32, 14, 14))
DENSE = Layer("fc", "MatMul", "w", (768, 3072), (1, 49, 768), (1, 49, 3072))  # 49 rows run as 52


def _costs(layer, fmt_w, fmt_a=None, hierarchy=KERNEL_HIERARCHY):
    return kernel_layer_costs(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, layer.groups,
                              [(fmt_w, fmt_a or fmt_w)], hierarchy, RATES)[0]


def _geometry(layer, block):
    return gemm_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, block, layer.groups)


@pytest.mark.parametrize("layer, m, block", [
    *((layer, m, block) for layer in (CONV3X3, DENSE) for m, block in ((8, 32), (4, 16), (6, 64), (2, 32))),
    (CONV16, 8, 16), (CONV16, 4, 32), (CONV16, 2, 16)])  # 16 channels: block 64 is not an integer kernel
def test_weight_bytes_are_what_deployment_stores(layer, m, block):
    fmt = BFPFormat(m, block)
    assert integer_support(layer.kind, layer.weight_shape, layer.groups, fmt, fmt) is None
    cost = _costs(layer, fmt)
    geometry = _geometry(layer, block)
    assert dict(cost.operand_bytes)["weights"] == integer_weight_bytes(geometry, fmt)
    # with a cache that holds everything, the matmul's only DRAM traffic is the stored weight
    stage = matmul_stage(geometry, fmt, HUGE, RATES)
    assert stage.level_bytes == (packed_nbytes(geometry.n, geometry.k_padded, fmt),)


def test_matmul_traffic_follows_the_columns_outer_tiling():
    fmt = BFPFormat(8, 32)
    g = _geometry(DENSE, 32)  # 49 rows (padded to 52), N 3072, K 768
    assert g.rows_padded == 52
    tiny = MemoryHierarchy((CacheLevel("L1", 1024, 1.0), CacheLevel("L2", 2**40, 1.0)))
    rows, groups = default_tile(g.rows_padded, padded(g.n, 16) // 16)
    row_tiles, col_tiles = g.rows_padded // rows, padded(g.n, 16) // (16 * groups)
    weights = packed_nbytes(g.n, g.k_padded, fmt)
    a = g.rows_padded * (g.k_padded + g.blocks)  # int8 mantissas + int8 exponents
    out = g.rows_padded * g.n * 4  # float32 output written once
    stage = matmul_stage(g, fmt, tiny, RATES)
    # L1 holds neither a weight panel nor A: weights once per row tile, A once per column tile
    assert stage.level_bytes == (row_tiles * weights + col_tiles * a + out, weights)


def test_fewer_mantissa_bits_move_fewer_weight_bytes():
    for layer in (CONV3X3, DENSE):
        b4, b8 = _costs(layer, BFPFormat(4, 32)), _costs(layer, BFPFormat(8, 32))
        assert dict(b4.operand_bytes)["weights"] < dict(b8.operand_bytes)["weights"]
        assert b4.dram_bytes < b8.dram_bytes
        # m=6 stores one byte per mantissa like m=8
        b6 = _costs(layer, BFPFormat(6, 32))
        assert dict(b6.operand_bytes)["weights"] == dict(b8.operand_bytes)["weights"]


def test_activations_move_as_int8_whatever_their_mantissa_bits():
    fmt_w = BFPFormat(8, 32)
    assert _costs(CONV3X3, fmt_w, BFPFormat(4, 32)) == _costs(CONV3X3, fmt_w, BFPFormat(8, 32))
    g = _geometry(CONV3X3, 32)
    operands = dict(_costs(CONV3X3, fmt_w).operand_bytes)
    assert operands["qa"] == 28 * 28 * (64 + 2)  # NHWC int8 + one exponent per block
    assert operands["im2col"] == g.rows_padded * (g.k_padded + g.blocks)
    assert operands["output"] == g.rows_padded * 128 * 4


def test_padding_is_charged():
    # 16 input channels: block 32 pads every kernel offset to 32 channels (allowed: ratio 2)
    b16, b32 = (_costs(CONV16, BFPFormat(8, b)) for b in (16, 32))
    useful = 32 * 16 * 3 * 3
    assert dict(b32.operand_bytes)["weights"] / useful > dict(b16.operand_bytes)["weights"] / useful
    assert dict(b32.operand_bytes)["im2col"] > dict(b16.operand_bytes)["im2col"]
    assert b32.total > b16.total
    # padded rows are computed and written: 49 rows run as 52
    assert dict(_costs(DENSE, BFPFormat(8, 32)).operand_bytes)["output"] == 52 * 3072 * 4


def test_stages_of_each_layer_kind():
    fmt = BFPFormat(8, 32)
    names = lambda layer: [s.name for s in _costs(layer, fmt).stages]  # noqa: E731
    assert names(CONV3X3) == ["act_quant", "im2col", "matmul", "epilogue"]
    pointwise = Layer("pw", "Conv", "w", (64, 32, 1, 1), (1, 32, 14, 14), (1, 64, 14, 14))
    assert names(pointwise) == ["act_quant", "matmul", "epilogue"]
    assert names(DENSE) == ["act_quant", "matmul"]
    cost = _costs(CONV3X3, fmt)
    assert cost.total == pytest.approx(sum(s.total for s in cost.stages), rel=1e-12)
    assert cost.level_bytes == pytest.approx(tuple(np.sum([s.level_bytes for s in cost.stages], axis=0)))
    assert cost.dram_bytes == cost.level_bytes[-1]


def test_smaller_blocks_cost_more_scaling():
    costs = [_costs(CONV3X3, BFPFormat(8, b)) for b in (16, 32, 64)]
    assert costs[0].total > costs[1].total > costs[2].total
    assert [c.scale_ops for c in costs] == [784 * 128 * 9 * 64 // b for b in (16, 32, 64)]


def test_fallback_layers_cost_fp32_plus_simulation():
    from bitq_tvm.solver.performance import deployed_layer_costs, kernel_rates, memory_hierarchy
    from bitq_tvm.targets import get_target

    preset = get_target("avx2")
    # a 3-channel 1x1 conv keeps channel blocks: 3 padded to 16 stays float simulation
    stem = Layer("stem", "Conv", "w", (16, 3, 1, 1), (1, 3, 28, 28), (1, 16, 28, 28))
    shape = ConvShape(1, 16, 3, 1, 1, 28, 28)
    bfp = LayerFormats.bfp(8, 8, 16)
    assert "padded to 16" in integer_support("conv2d", stem.weight_shape, 1, bfp.weight, bfp.activation)
    fp32, simulated = deployed_layer_costs(stem, shape, (FP32, bfp), preset)
    hierarchy = memory_hierarchy(preset)
    fake = fake_quant_stage(3 * 28 * 28, hierarchy, kernel_rates(preset))
    assert simulated.total == pytest.approx(fp32.total + fake.total, rel=1e-12)
    assert simulated.dram_bytes == pytest.approx(fp32.dram_bytes + fake.level_bytes[-1])
    assert [s.name for s in simulated.stages] == ["fp32", "fake_quant"]
    # FP32: the generic nest at 32 bits and float32 MACs, no per-block scaling
    expected = layer_cost(shape, 32.0, 32.0, None, hierarchy, macs_per_cycle=preset.vector_bits / 16, cycle_cost=1.0)
    assert fp32.total == expected.total and fp32.level_bytes == expected.level_bytes
    # a layer the kernel runs is priced by the kernel model
    (int_conv,) = deployed_layer_costs(CONV3X3, ConvShape(1, 128, 64, 3, 3, 28, 28), (bfp,), preset)
    assert int_conv == kernel_layer_costs("conv2d", CONV3X3.input_shape, CONV3X3.weight_shape,
                                          CONV3X3.output_shape, 1, [(bfp.weight, bfp.activation)], hierarchy,
                                          kernel_rates(preset))[0]


def test_depthwise_conv_is_priced_as_the_depthwise_kernel():
    from bitq_tvm.solver.performance import deployed_layer_costs, kernel_rates, memory_hierarchy
    from bitq_tvm.targets import get_target

    preset = get_target("avx2")
    depthwise = Layer("dw", "Conv", "w", (96, 1, 3, 3), (1, 96, 28, 28), (1, 96, 28, 28), groups=96)
    shape = ConvShape(1, 96, 1, 3, 3, 28, 28, groups=96)
    bfp8, bfp4 = LayerFormats.bfp(8, 8, 32), LayerFormats.bfp(4, 4, 64)
    assert integer_support("conv2d", depthwise.weight_shape, 96, bfp8.weight, bfp8.activation) is None
    fp32, cost, cost4 = deployed_layer_costs(depthwise, shape, (FP32, bfp8, bfp4), preset)
    assert [s.name for s in cost.stages] == ["act_quant", "depthwise", "epilogue"]
    operands = dict(cost.operand_bytes)
    assert operands["weights"] == 9 * 96 + 96  # int8 [9, 96] + one exponent per channel
    assert operands["qa"] == 28 * 28 * 96 * 2  # NHWC mantissa + exponent per value, read once (no im2col)
    # the kernel reads int8 whatever m and B: the same cost
    assert cost4.total == cost.total
    hierarchy = memory_hierarchy(preset)
    assert cost == kernel_layer_costs("conv2d", depthwise.input_shape, depthwise.weight_shape, depthwise.output_shape,
                                      96, [(bfp8.weight, bfp8.activation)], hierarchy, kernel_rates(preset))[0]
