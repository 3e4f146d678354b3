"""InsertBFPSimulation: Before/Expected modules, compile-time weight folding, and numerics."""

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import fake_quantize_np, get_format
from bitq_tvm.passes import AnnotateBFPLayers, InsertBFPSimulation
from bitq_tvm.plan import LayerFormats
from bitq_tvm.kernels.bfp_quant import bfp_fake_quant_func

WEIGHTS = {"conv1_weight": "conv1", "fc_weight": "fc"}
B8, B4, B6 = get_format("bfp8_b32"), get_format("bfp4_b16"), get_format("bfp6_b16")
FORMATS = {"conv1": LayerFormats(B8, B4), "fc": LayerFormats(B6, None)}


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 6, 8, 8), "float32"), conv1_weight: R.Tensor((4, 3, 3, 3), "float32"),
             fc_weight: R.Tensor((10, 256), "float32")) -> R.Tensor((1, 10), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.nn.conv2d(x, conv1_weight, padding=[1, 1, 1, 1], groups=2)
            lv1 = R.nn.relu(lv)
            lv2 = R.reshape(lv1, R.shape([1, 256]))
            lv3 = R.permute_dims(fc_weight, axes=[1, 0])
            gv = R.matmul(lv2, lv3)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    # Placeholders, replaced below by the real kernels: the pass must call exactly these.
    @T.prim_func(private=True)
    def bfp_fq_bfp4_b16_a1_g2_1x6x8x8(x: T.Buffer((1, 6, 8, 8), "float32"), y: T.Buffer((1, 6, 8, 8), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def bfp_fq_bfp8_b32_a1_g1_4x3x3x3(x: T.Buffer((4, 3, 3, 3), "float32"), y: T.Buffer((4, 3, 3, 3), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def bfp_fq_bfp6_b16_a1_g1_10x256(x: T.Buffer((10, 256), "float32"), y: T.Buffer((10, 256), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, 6, 8, 8), "float32"), conv1_weight: R.Tensor((4, 3, 3, 3), "float32"),
             fc_weight: R.Tensor((10, 256), "float32")) -> R.Tensor((1, 10), "float32"):
        R.func_attr({"num_input": 1, "bitq.layers": {"conv1": "conv1", "fc": "fc"}})
        cls = Expected
        with R.dataflow():
            xq = R.call_tir(cls.bfp_fq_bfp4_b16_a1_g2_1x6x8x8, (x,), out_ty=R.Tensor((1, 6, 8, 8), "float32"))
            wq = R.call_tir(cls.bfp_fq_bfp8_b32_a1_g1_4x3x3x3, (conv1_weight,), out_ty=R.Tensor((4, 3, 3, 3), "float32"))
            conv1 = R.nn.conv2d(xq, wq, padding=[1, 1, 1, 1], groups=2)
            lv1 = R.nn.relu(conv1)
            lv2 = R.reshape(lv1, R.shape([1, 256]))
            lv3 = R.permute_dims(fc_weight, axes=[1, 0])
            # Gemm weights are quantized as stored ([N, K], blocks along K), then transposed.
            fq = R.call_tir(cls.bfp_fq_bfp6_b16_a1_g1_10x256, (fc_weight,), out_ty=R.Tensor((10, 256), "float32"))
            fq_t = R.permute_dims(fq, axes=[1, 0])
            fc = R.matmul(lv2, fq_t)
            R.output(fc)
        return fc


def _expected():
    mod = Expected.clone() if hasattr(Expected, "clone") else Expected
    kernels = {
        "bfp_fq_bfp4_b16_a1_g2_1x6x8x8": bfp_fake_quant_func((1, 6, 8, 8), B4, 1, 2),
        "bfp_fq_bfp8_b32_a1_g1_4x3x3x3": bfp_fake_quant_func((4, 3, 3, 3), B8, 1, 1),
        "bfp_fq_bfp6_b16_a1_g1_10x256": bfp_fake_quant_func((10, 256), B6, 1, 1),
    }
    funcs = {gv: (kernels.get(gv.name_hint) or func) for gv, func in mod.functions_items()}
    return tvm.IRModule(funcs)


def _simulate(mod, formats=FORMATS):
    return InsertBFPSimulation(formats)(AnnotateBFPLayers(WEIGHTS)(mod))


def test_insert_structure():
    tvm.ir.assert_structural_equal(_simulate(Before), _expected())


def test_fp32_layers_untouched():
    after = _simulate(Before, {"conv1": LayerFormats(), "fc": LayerFormats()})
    tvm.ir.assert_structural_equal(after, AnnotateBFPLayers(WEIGHTS)(Before))


def test_unannotated_planned_layer_is_an_error():
    # Errors raised inside a pass cross TVM's FFI, which re-raises them as RuntimeError.
    with pytest.raises((BitqError, RuntimeError), match="not annotated"):
        InsertBFPSimulation(FORMATS)(Before)


def test_weights_fold_at_compile_time_and_numerics_match_reference():
    rng = np.random.default_rng(0)
    w_conv = rng.standard_normal((4, 3, 3, 3)).astype("float32")
    w_fc = rng.standard_normal((10, 256)).astype("float32")
    x = rng.standard_normal((1, 6, 8, 8)).astype("float32")
    seq = tvm.transform.Sequential([
        AnnotateBFPLayers(WEIGHTS), InsertBFPSimulation(FORMATS),
        relax.transform.BindParams("main", {"conv1_weight": w_conv, "fc_weight": w_fc}),
        relax.transform.FoldConstant(),
    ])
    folded = seq(Before)
    # Only the activation kernel is left to run: both weight kernels ran inside FoldConstant.
    called = [b.value.args[0].name_hint for blk in folded["main"].body.blocks for b in blk.bindings
              if isinstance(b.value, relax.Call) and b.value.op.same_as(tvm.ir.Op.get("relax.call_tir"))]
    assert called == ["bfp_fq_bfp4_b16_a1_g2_1x6x8x8"]

    target = tvm.target.Target({"kind": "llvm"})
    ex = tvm.compile(folded, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    # NumPy reference: same blocks (input channels per group for the conv, K for the matmul).
    xq = fake_quantize_np(x, B4, axis=1, groups=2)
    wq = fake_quantize_np(w_conv, B8, axis=1)
    xp = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((1, 4, 8, 8), np.float64)
    for o in range(4):
        g = o // 2
        for i in range(3):
            for kh in range(3):
                for kw in range(3):
                    conv[0, o] += wq[o, i, kh, kw] * xp[0, g * 3 + i, kh:kh + 8, kw:kw + 8]
    h = np.maximum(conv, 0).reshape(1, 256)
    want = h @ fake_quantize_np(w_fc, B6, axis=1).T.astype(np.float64)
    # float32 accumulation over K=256 terms of magnitude <= max|h|*max|w|: bound eps32 * K * sum|terms|
    bound = np.finfo(np.float32).eps * 256 * (np.abs(h) @ np.abs(fake_quantize_np(w_fc, B6, axis=1)).T)
    assert np.all(np.abs(got - want) <= bound + 1e-6)
