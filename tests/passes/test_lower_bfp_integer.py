"""LowerBFPInteger and its kernels: bit-exact quantizers, packed weights, single-layer numerics.

Numerics contract checked here, per output element of a layer y = sum_k a_k w_k over the BFP
values a, w the plan gives (fake_quantize_np):

    |deployed - simulated| <= (K + nb) * eps32 * sum_k |a_k w_k|

The simulation sums K exact float32 products in some order (error <= (K - 1) eps32/2 sum|a w|);
the integer kernel's block sums are exact and only its float32 sum over nb block terms rounds
(<= nb eps32 sum|a w|, see bfp_matmul_tolerance). Both are within the bound of the exact value.
"""

import dataclasses

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from bitq_tvm.api import compile_model
from bitq_tvm.frontend.relax_import import import_relax
from bitq_tvm.deploy import compile_deployed
from bitq_tvm.passes import module_report
from bitq_tvm.pipeline import bfp_passes
from bitq_tvm.errors import BitqError
from bitq_tvm.formats import PRESETS, BFPFormat, fake_quantize_np, get_format, quantize_np
from bitq_tvm.frontend.onnx_model import normalize
from bitq_tvm.frontend.reference import fake_quantize_weight, layer_block_axes
from bitq_tvm.passes.lower_bfp_integer import LayerDeployment
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.kernels.contract import padded_rows
from bitq_tvm.targets.presets import get_target
from bitq_tvm.plan import Plan
from bitq_tvm.frontend.reference import window_patches_np
from bitq_tvm.kernels.bfp_act_quant import act_quant_shapes, bfp_act_quant_func
from bitq_tvm.kernels.bfp_conv import ConvGeometry, window_act_quant_func
from bitq_tvm.kernels.packing import pack_quantized
from bitq_tvm.targets.presets import get_target

EPS32 = float(np.finfo(np.float32).eps)
HOST = get_target("host")
TARGET = tvm.target.Target(dict(HOST.llvm_target))


def _run_prim(func, *arrays):
    ex = tvm.compile(func.with_attr("global_symbol", "main"), target=TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays]
    ex["main"](*args)
    return [a.numpy() for a in args]


def _spread(rng, shape):
    """Values over about 2**-20 .. 2**20 so that block exponents differ a lot, plus exact zeros."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))
    x[rng.random(shape) < 0.05] = 0
    return x.astype(np.float32)


# ---- activation quantizer -------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis, groups, fmt", [
    ((3, 70), 1, 1, "bfp8_b32"),                 # ragged K
    ((5, 64), 1, 1, "bfp2_b64"),
    ((2, 12, 5, 3), 1, 2, "bfp4_b8"),            # NCHW, groups, ragged segment
    ((2, 5, 4, 3), 1, 1, "bfp6_b16_sr3"),        # stochastic: hash of the NCHW flat index
    ((4, 33), 1, 1, "bfp3_b8_e4"),               # narrow exponent clamps
    ((2, 130), 1, 1, "bfp7_b128"),
])
def test_act_quant_bit_exact(shape, axis, groups, fmt):
    fmt = get_format(fmt)
    x = _spread(np.random.default_rng(0), shape)
    x[0] = 0  # an all-zero row: exponent emin, mantissas 0
    q_shape, e_shape = act_quant_shapes(shape, fmt, axis, groups)
    _, q, e = _run_prim(bfp_act_quant_func(shape, fmt, axis, groups), x,
                        np.zeros(q_shape, np.int8), np.zeros(e_shape, np.int8))
    ref = quantize_np(x, fmt, axis=axis, groups=groups)
    np.testing.assert_array_equal(q, ref.mantissas.reshape(q_shape))
    np.testing.assert_array_equal(e, ref.exponents.reshape(e_shape))


@pytest.mark.parametrize("shape, kernel, strides, padding, rows, fmt", [
    ((1, 3, 9, 11), (3, 3), (2, 2), (1, 1, 1, 1), 32, "bfp8_b32"),   # a stem: K = 27 -> one block of 32
    ((2, 3, 7, 6), (3, 3), (1, 1), (0, 1, 1, 0), 88, "bfp4_b16"),   # batch 2, asymmetric pads, 2 blocks
    ((1, 4, 6, 6), (2, 2), (2, 2), (0, 0, 0, 0), 9, "bfp6_b16_sr3"),  # stochastic: hash of the rows' index
])
def test_window_act_quant_is_the_im2col_rows_quantized(shape, kernel, strides, padding, rows, fmt):
    fmt = get_format(fmt)
    x = _spread(np.random.default_rng(3), shape)
    geom = ConvGeometry(*shape, out_channels=5, kernel=kernel, strides=strides, padding=padding, dilation=(1, 1),
                        groups=1)
    assert rows >= geom.rows
    k = kernel[0] * kernel[1] * shape[1]
    q_shape, e_shape = act_quant_shapes((rows, k), fmt, 1)
    _, q, e = _run_prim(window_act_quant_func(geom, fmt, rows), x, np.zeros(q_shape, np.int8),
                        np.zeros(e_shape, np.int8))
    patches = np.zeros((rows, k), np.float32)  # (kh, kw, c) order, rows past M zero
    patches[:geom.rows] = window_patches_np(x, kernel, strides, padding, (1, 1))
    ref = quantize_np(patches, fmt, axis=1)
    np.testing.assert_array_equal(q, ref.mantissas.reshape(q_shape))
    np.testing.assert_array_equal(e, ref.exponents.reshape(e_shape))


# ---- packed weights -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bfp8_b32", "bfp4_b16", "bfp2_b8", "bfp5_b12"])
def test_packed_weights_are_the_layout_the_kernel_reads(fmt):
    fmt = get_format(fmt)
    w = _spread(np.random.default_rng(1), (21, 50))
    t = quantize_np(w, fmt, axis=1)
    packed = pack_quantized(t.mantissas.reshape(21, -1), t.exponents.reshape(21, -1), fmt, "w")
    assert packed.nibbles == (fmt.mantissa_bits <= 4)
    assert packed.qw.dtype == (np.uint8 if packed.nibbles else np.int8)
    # the layout built by hand: 16 outputs x 4 K values per tile, N padded to 32 with zeros
    q = np.zeros((32, packed.k_padded), np.int8)
    q[:21] = t.mantissas.reshape(21, -1)
    tiles = q.reshape(2, 16, -1, 4).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(packed.tiles(), tiles)
    np.testing.assert_array_equal(packed.mantissas(), q)
    if packed.nibbles:  # byte p of a tile: element p in the low nibble, element p + 32 in the high
        flat = tiles.reshape(*tiles.shape[:2], 64).astype(np.uint8) & 0xF
        np.testing.assert_array_equal(packed.qw, flat[..., :32] | (flat[..., 32:] << 4))
    else:
        np.testing.assert_array_equal(packed.qw, tiles)
    ew = np.full((packed.k_padded // fmt.block_size, 32), fmt.emin, np.int8)
    ew[:, :21] = t.exponents.reshape(21, -1).T
    np.testing.assert_array_equal(packed.ew, ew)


@pytest.mark.parametrize("fmt, limit", [("bfp8_b32", 0.27), ("bfp4_b32", 0.15), ("bfp4_b16", 0.16)])
def test_packed_weight_bytes(fmt, limit):
    # a ResNet-18 layer3 3x3 conv as the matmul sees it: N = 256, K = 9 * 256
    fmt = get_format(fmt)
    n, k = 256, 2304
    t = quantize_np(np.random.default_rng(2).standard_normal((n, k)).astype(np.float32), fmt, axis=1)
    packed = pack_quantized(t.mantissas.reshape(n, -1), t.exponents.reshape(n, -1), fmt, "w")
    mantissa_bytes = n * k // 2 if fmt.mantissa_bits <= 4 else n * k
    assert packed.nbytes == mantissa_bytes + n * k // fmt.block_size
    assert packed.nbytes <= limit * 4 * n * k


def test_pack_rejects_huge_weights():
    fmt = get_format("bfp8_b32")
    with pytest.raises(BitqError, match="'big'"):
        pack_quantized(np.zeros((1, 32), np.int8), np.array([[120]], np.int8), fmt, "big")


def test_padded_rows_and_variants():
    assert [padded_rows(m) for m in (1, 3, 5, 49, 52, 81, 3136)] == [1, 3, 8, 52, 52, 81, 3136]
    # every target deploys with its own integer kernel
    names = ("avx512-vnni", "avx2", "cortex-a53", "cortex-a76", "neoverse-n2", "rv64gcv-vlen128", "rv64gc")
    assert [kernel_variant(get_target(t).tvm_target()) for t in names] == ["vnni", "avx2", "neon", "sdot", "sdot", "rvv", "scalar"]


# ---- single-layer numerics through the whole compiler ------------------------------------------
def _matmul_branches_model(branches, rows=5, k=100, n=24, seed=0):
    """One input X [rows, k]; branch i is MatMul(X, W_i [k, n]) (odd i: Gemm transB) -> output Y_i."""
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])
    nodes, inits, outputs = [], [], []
    for i in range(branches):
        gemm = i % 2 == 1
        w = _spread(rng, (n, k) if gemm else (k, n))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        if gemm:
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [f"y{i}"], name=f"layer{i}", transB=1))
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"layer{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(nodes, "branches", [x], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return normalize(proto, "branches"), {"x": _spread(rng, (rows, k))}


def _bound_matmul(model, layer, lf, x):
    w = model.weights()[layer.weight]
    axis = 1 if layer.trans_b else 0
    a = fake_quantize_np(x, lf.activation, axis=1).astype(np.float64)
    wq = fake_quantize_np(w, lf.weight, axis=axis).astype(np.float64)
    wq = wq.T if layer.trans_b else wq
    k = x.shape[1]
    return (k + lf.activation.num_blocks(k)) * EPS32 * (np.abs(a) @ np.abs(wq))


def _check_deployed_vs_simulated(model, plan, feeds, bound_fn, target=HOST, max_padding_ratio=2.0):
    deployed = compile_deployed(model, plan, target, max_padding_ratio=max_padding_ratio, progress=None)
    simulated = compile_model(model, plan, target, progress=None)
    got, want = deployed.run(feeds), simulated.run(feeds)
    for layer, g, w in zip(model.layers, got, want):
        lf = deployed.formats[layer.name]
        bound = bound_fn(model, layer, lf)
        assert np.all(np.abs(g.astype(np.float64) - w) <= bound), layer.name
    return deployed


MANTISSAS_X_BLOCKS = [BFPFormat(m, b) for m in range(2, 9) for b in (8, 16, 32, 64, 128)]


def test_matmul_every_mantissa_width_and_block_size_host_kernels():
    # 35 (m, B) layers (the named presets among them), stochastic rounding, 5-bit exponents;
    # ragged K = 100, 5 rows (padded to 8 for the kernel); the host's kernels (vnni on an
    # AVX-512 VNNI host, avx2 on one without)
    assert set(PRESETS.values()) <= set(MANTISSAS_X_BLOCKS)
    fmts = MANTISSAS_X_BLOCKS + [get_format("bfp6_b16_sr7"), get_format("bfp5_b32_e5")]
    model, feeds = _matmul_branches_model(len(fmts))
    plan = Plan.from_json({"bitq_plan_version": 1, "layers": {f"layer{i}": f.name for i, f in enumerate(fmts)}})
    deployed = _check_deployed_vs_simulated(model, plan, feeds,
                                            lambda m, layer, lf: _bound_matmul(m, layer, lf, feeds["x"]))
    assert set(deployed.report.integer_layers) == {layer.name for layer in model.layers}
    assert deployed.report.variant == kernel_variant(HOST.tvm_target())


@pytest.mark.parametrize("family", ["avx2", "scalar"])
def test_matmul_avx2_and_generic_variants(family):
    fmts = [BFPFormat(8, 32), BFPFormat(4, 16), BFPFormat(2, 8), BFPFormat(7, 128), BFPFormat(5, 64)]
    model, feeds = _matmul_branches_model(len(fmts), rows=3, k=77, n=20, seed=3)
    plan = Plan.from_json({"bitq_plan_version": 1, "layers": {f"layer{i}": f.name for i, f in enumerate(fmts)}})
    # the kernel variant follows the LLVM target's features: x86-64 baseline has no AVX2
    mcpu = {"avx2": "haswell", "scalar": "x86-64"}[family]
    target = dataclasses.replace(HOST, intrinsic_family=family, llvm_target={**HOST.llvm_target, "mcpu": mcpu})
    deployed = _check_deployed_vs_simulated(model, plan, feeds,
                                            lambda m, layer, lf: _bound_matmul(m, layer, lf, feeds["x"]), target)
    assert deployed.report.variant == {"avx2": "avx2", "scalar": "generic"}[family]
    assert len(deployed.report.integer_layers) == len(fmts)


CONVS = [  # name, out channels, kernel, stride, pad, dilation, group, format
    ("c3x3", 16, 3, 1, 1, 1, 1, "bfp8_b32"),
    ("c3x3s2", 20, 3, 2, 1, 1, 1, "bfp4_b16"),
    ("pointwise", 16, 1, 1, 0, 1, 1, "bfp6_b8"),
    ("pointwise_s2", 12, 1, 2, 0, 1, 1, "bfp3_b16_sr5"),
    ("grouped", 16, 3, 1, 1, 1, 2, "bfp5_b8"),
    ("dilated", 8, 3, 1, 2, 2, 1, "bfp2_b64"),
    ("k5_b128", 8, 5, 1, 2, 1, 1, "bfp7_b128"),
    ("depthwise", 40, 3, 1, 1, 1, 40, "bfp8_b16"),  # the depthwise kernel
    ("depthwise_s2", 40, 5, 2, 2, 1, 40, "bfp4_b8"),
]
# two outputs per channel: no kernel, the float simulation
MULTIPLIER_2 = ("depthwise_x2", 80, 3, 1, 1, 1, 40, "bfp8_b16")


def _conv_model(channels=40, size=9, seed=4):
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
    nodes, inits, outputs = [], [], []
    for name, out, k, s, p, d, g, _ in CONVS + [MULTIPLIER_2]:
        inits.append(numpy_helper.from_array(_spread(rng, (out, channels // g, k, k)), f"{name}.weight"))
        nodes.append(helper.make_node("Conv", ["x", f"{name}.weight"], [f"{name}.out"], name=name, kernel_shape=[k, k],
                                      strides=[s, s], pads=[p] * 4, dilations=[d, d], group=g))
        side = (size + 2 * p - d * (k - 1) - 1) // s + 1
        outputs.append(helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, [1, out, side, side]))
    graph = helper.make_graph(nodes, "convs", [x], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return normalize(proto, "convs"), {"x": _spread(rng, (1, channels, size, size))}


def _conv_abs(x, w, stride, pad, dilation, groups):
    """sum_k |x_k w_k| of an NCHW conv (float64)."""
    x = np.pad(np.abs(x.astype(np.float64)), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, cg, kh, kw = w.shape
    span = dilation * (kh - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (span, span), axis=(2, 3))[:, :, ::stride, ::stride,
                                                                                  ::dilation, ::dilation]
    n, c, oh, ow = win.shape[:4]
    out = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        xs = win[:, g * cg:(g + 1) * cg]
        out[:, g * og:(g + 1) * og] = np.einsum("ncyxij,ocij->noyx", xs, np.abs(w[g * og:(g + 1) * og]))
    return out


def test_convs_every_geometry_and_depthwise():
    model, feeds = _conv_model()
    layers = {name: fmt for name, *_, fmt in CONVS + [MULTIPLIER_2]}
    plan = Plan.from_json({"bitq_plan_version": 1, "layers": layers})
    geometry = {name: (s, p, d, g) for name, _, _, s, p, d, g, _ in CONVS + [MULTIPLIER_2]}

    def bound(m, layer, lf):
        # the blocks of the contract (depthwise: along channels), as simulation and kernels use
        s, p, d, g = geometry[layer.name]
        (a_axis, a_groups), _ = layer_block_axes(layer)
        w = m.weights()[layer.weight]
        a = fake_quantize_np(feeds["x"], lf.activation, axis=a_axis, groups=a_groups)
        wq = fake_quantize_weight(layer, w, lf.weight)
        cg, k = w.shape[1], w.shape[2] * w.shape[3]
        return (cg * k + k * lf.activation.num_blocks(cg)) * EPS32 * _conv_abs(a, wq, s, p, d, g)

    # k5_b128 pads 40 channels to 128 (3.2x): allowed here so that B = 128 convs are exercised
    deployed = _check_deployed_vs_simulated(model, plan, feeds, bound, max_padding_ratio=4.0)
    report = {d.layer: d for d in deployed.report.layers}
    assert all(report[name].mode == "integer" for name, *_ in CONVS)
    assert report["depthwise_x2"].mode == "simulation" and "2 outputs per channel" in report["depthwise_x2"].reason
    # stored as read: int8 mantissas [KH*KW, C] + one exponent per channel
    assert report["depthwise"].stored_bytes == 9 * 40 + 40


# ---- fallbacks ------------------------------------------------------------------------------
def test_unsupported_formats_fall_back_with_reasons():
    model, feeds = _matmul_branches_model(6, rows=2, k=40, n=16, seed=5)
    plan = Plan.from_json({"bitq_plan_version": 1, "layers": {
        "layer0": {"weight": "bfp8_b32", "activation": "fp32"},
        "layer1": "bfp8_b4", "layer2": "bfp8_b6", "layer3": "bfp8_b256",
        "layer4": {"weight": "bfp8_b16", "activation": "bfp8_b32"},
        "layer5": {"weight": "fp32", "activation": "bfp8_b32"}}})
    deployed = compile_deployed(model, plan, progress=None)
    reasons = deployed.report.fallbacks
    assert set(reasons) == {f"layer{i}" for i in range(6)}
    assert "activation is FP32" in reasons["layer0"] and "weight is FP32" in reasons["layer5"]
    for name in ("layer1", "layer2", "layer3"):
        assert "not a multiple of 4 in [8, 128]" in reasons[name]
    assert "block size 16 != activation block size 32" in reasons["layer4"]
    # the fallbacks are the simulation itself
    simulated = compile_model(model, plan, progress=None)
    for g, w in zip(deployed.run(feeds), simulated.run(feeds)):
        np.testing.assert_array_equal(g, w)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in deployed.report.table().splitlines()
            if line.startswith("| ")]
    assert ["layer0", "matmul", "float BFP simulation"] in [r[:3] for r in rows]


def test_layer_deployment_validation():
    with pytest.raises(BitqError, match="reason"):
        LayerDeployment("l", "matmul", "simulation")
    with pytest.raises(BitqError, match="variant"):
        LayerDeployment("l", "matmul", "integer")


# ---- artifact -------------------------------------------------------------------------------
def test_hot_kernels_use_vpdpbusd_and_weights_stay_compact():
    fmts = [get_format("bfp8_b32"), get_format("bfp4_b32")]
    model, _ = _matmul_branches_model(len(fmts), rows=4, k=256, n=64, seed=6)
    plan = Plan.from_json({"bitq_plan_version": 1, "layers": {"layer0": "bfp8_b32", "layer1": "bfp4_b32"}})
    # Compiled (not run) for a VNNI CPU, whatever the host is.
    deployed = compile_deployed(model, plan, "avx512-vnni", progress=None)
    asm = "\n".join(m.inspect_source("asm") for m in deployed.executable.mod.imports)
    assert "vpdpbusd" in asm
    # stored constants: int8 / nibble mantissas + int8 exponents; no float32 scales, no int32 sums
    fp32 = 2 * 256 * 64 * 4
    expected = 256 * 64 + 256 * 64 // 32 + 256 * 64 // 2 + 256 * 64 // 32
    assert deployed.report.artifact_constant_bytes == expected
    assert deployed.report.artifact_constant_bytes <= 0.21 * fp32

    # the same count in the IR before TVM's lowering (what bitq_report() returns was read from it)
    mod, params = import_relax(model)
    bitq = tvm.transform.Sequential(bfp_passes(plan, "avx512-vnni", deploy=True, params=params))
    assert module_report(bitq(mod))["artifact_constant_bytes"] == expected
