"""LowerBFPInteger: Before/Expected modules (Expected built with a BlockBuilder from the kernels).

The pass is checked in TVM's idiom: an annotated module with its weight bound goes in, and the
module out must be structurally equal to one written out by hand: activation quantizer, integer
matmul reading the packed weights as constants in their stored format (nothing expanded, no new
parameters or functions), ``bitq.deployment`` attribute. The kernels (PrimFuncs) are the library's; their numerics are
tests/passes/test_lower_bfp_integer.py.
"""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import get_format, quantize_np
from bitq_tvm.kernels.bfp_act_quant import act_quant_shapes, bfp_act_quant_func
from bitq_tvm.kernels.bfp_matmul import bfp_matmul_name
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
from bitq_tvm.kernels.packing import pack_quantized
from bitq_tvm.passes import AnnotateBFPLayers, InsertBFPSimulation, LowerBFPInteger
from bitq_tvm.passes.lower_bfp_integer import deployment_modes
from bitq_tvm.plan import LayerFormats

B8 = get_format("bfp8_b32")
VARIANT = "avx2"
W = np.random.default_rng(0).standard_normal((16, 64)).astype("float32")  # Linear weight [N, K]
OPAQUE = 8  # OpPatternKind.kOpaque: FuseOps must not merge the scheduled kernels


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 64), "float32"), fc_weight: R.Tensor((16, 64), "float32")) -> R.Tensor((4, 16), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.permute_dims(fc_weight, axes=[1, 0])
            gv = R.matmul(x, lv)
            R.output(gv)
        return gv


def _lower(formats):
    seq = tvm.transform.Sequential([
        AnnotateBFPLayers(), relax.transform.BindParams("main", {"fc_weight": W}),
        LowerBFPInteger(formats, VARIANT),
    ])
    return seq(Before)


def _expected():
    t = quantize_np(W, B8, axis=1)
    packed = pack_quantized(t.mantissas.reshape(16, -1), t.exponents.reshape(16, -1), B8, "fc_weight")
    q_shape, e_shape = act_quant_shapes([4, 64], B8, 1, 1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 64], "float32"))
    deployment = {"variant": VARIANT, "tuned_kernels": [], "layers": [{
        "layer": "fc", "kind": "matmul", "mode": "integer", "variant": VARIANT, "reason": "",
        "fp32_bytes": W.nbytes, "stored_bytes": packed.nbytes, "epilogue": ""}]}
    attrs = {"num_input": 1, "bitq.layers": {"fc": "fc"}, "bitq.deployment": deployment}
    with bb.function("main", [x], attrs=attrs, private=False):
        with bb.dataflow():
            bb.emit(relax.op.permute_dims(relax.const(W), [1, 0]))  # left for DeadCodeElimination
            aq_name = "bfp_aq_bfp8_b32_a1_g1_4x64"
            aq_kernel = {"kind": "act_quant", "shape": [4, 64], "fmt": "bfp8_b32", "axis": 1, "groups": 1}
            aq = bb.add_func(bfp_act_quant_func([4, 64], B8, 1, 1).with_attr("bitq.kernel", aq_kernel)
                             .with_attr("op_pattern", OPAQUE), aq_name)
            both = bb.emit(relax.call_tir(aq, [x], [relax.TensorType(q_shape, "int8"),
                                                    relax.TensorType(e_shape, "int8")]))
            qa, ea = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
            mm_name = bfp_matmul_name(4, 16, 64, B8, B8, VARIANT)
            mm_func = bfp_matmul_func(4, 16, 64, B8, B8, VARIANT).without_attr("global_symbol")
            mm_kernel = {"kind": "matmul", "name": mm_name, "rows": 4, "n": 16, "k": 64, "fmt_a": "bfp8_b32",
                         "fmt_w": "bfp8_b32", "variant": VARIANT, "tuned": 0}
            mm = bb.add_func(mm_func.with_attr("tirx.is_scheduled", True).with_attr("bitq.kernel", mm_kernel)
                             .with_attr("op_pattern", OPAQUE), mm_name)
            weights = [relax.const(packed.qw), relax.const(packed.ew)]
            out = bb.emit(relax.call_tir(mm, [qa, ea, *weights], relax.TensorType([4, 16], "float32")))
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()


def test_lower_structure():
    tvm.ir.assert_structural_equal(_lower({"fc": LayerFormats(B8, B8)}), _expected())


def test_rerun_is_stable_and_fallbacks_are_recorded_not_kept():
    # weight-only plan: no integer kernel; the decision is in the IR, the module otherwise unchanged
    after = _lower({"fc": LayerFormats(B8, None)})
    assert deployment_modes(after["main"]) == {"fc": "simulation"}
    assert [gv.name_hint for gv in after.get_global_vars()] == ["main"]
    # InsertBFPSimulation reads that attribute and simulates exactly the fallback
    simulated = InsertBFPSimulation({"fc": LayerFormats(B8, None)})(after)
    assert any(gv.name_hint.startswith("bfp_fq_bfp8_b32") for gv in simulated.get_global_vars())
    # the pass object holds no result: a second module gets its own, independent decisions
    lower = LowerBFPInteger({"fc": LayerFormats(B8, B8)}, VARIANT)
    bound = relax.transform.BindParams("main", {"fc_weight": W})(AnnotateBFPLayers()(Before))
    tvm.ir.assert_structural_equal(lower(bound), lower(bound))
    assert not hasattr(lower, "report")


def test_unbound_weight_is_a_reported_fallback():
    after = LowerBFPInteger({"fc": LayerFormats(B8, B8)}, VARIANT)(AnnotateBFPLayers()(Before))
    record = after["main"].attrs["bitq.deployment"]["layers"][0]
    assert record["mode"] == "simulation" and "not a bound constant" in record["reason"]


def test_unknown_variant_is_an_error():
    with pytest.raises(BitqError, match="variant"):
        LowerBFPInteger({}, "sse9")


def test_tuned_kernels_replace_the_default_schedule_and_are_recorded():
    tag = bfp_matmul_name(4, 16, 64, B8, B8, VARIANT)
    asked = []

    def kernels(rows, n, k, fmt_a, fmt_w, variant):
        asked.append((rows, n, k, fmt_a, fmt_w, variant))
        return bfp_matmul_func(rows, n, k, fmt_a, fmt_w, variant).with_attr("tuned", True)

    after = tvm.transform.Sequential([
        AnnotateBFPLayers(), relax.transform.BindParams("main", {"fc_weight": W}),
        LowerBFPInteger({"fc": LayerFormats(B8, B8)}, VARIANT, kernels=kernels),
    ])(Before)
    assert asked == [(4, 16, 64, B8, B8, VARIANT)]
    assert list(after["main"].attrs["bitq.deployment"]["tuned_kernels"]) == [tag]
    assert "tuned" in after[tag].attrs
