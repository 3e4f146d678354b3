"""AnnotateBFPLayers: Before/Expected modules, plus the names the structural check cannot see."""

import numpy as np
import tvm
import tvm.testing
from tvm.script import ir as I
from tvm.script import relax as R

from bitq_tvm.passes import AnnotateBFPLayers, annotated_layers, relax_var_name

WEIGHTS = {"conv1_weight": "conv1", "fc_weight": "head/fc.0"}


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), conv1_weight: R.Tensor((4, 3, 3, 3), "float32"),
             fc_weight: R.Tensor((10, 256), "float32")) -> R.Tensor((1, 10), "float32"):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            lv = R.nn.conv2d(x, conv1_weight, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(lv)
            lv2 = R.reshape(lv1, R.shape([1, 256]))
            lv3 = R.permute_dims(fc_weight, axes=[1, 0])
            gv = R.matmul(lv2, lv3)
            R.output(gv)
        return gv


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 3, 8, 8), "float32"), conv1_weight: R.Tensor((4, 3, 3, 3), "float32"),
             fc_weight: R.Tensor((10, 256), "float32")) -> R.Tensor((1, 10), "float32"):
        R.func_attr({"num_input": 1, "bitq.layers": {"conv1": "conv1", "head/fc.0": "head_fc_0"}})
        with R.dataflow():
            conv1 = R.nn.conv2d(x, conv1_weight, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(conv1)
            lv2 = R.reshape(lv1, R.shape([1, 256]))
            lv3 = R.permute_dims(fc_weight, axes=[1, 0])
            head_fc_0 = R.matmul(lv2, lv3)
            R.output(head_fc_0)
        return head_fc_0


def _binding_names(func):
    return [b.var.name for block in func.body.blocks for b in block.bindings]


def test_annotate_structure_and_names():
    after = AnnotateBFPLayers(WEIGHTS)(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    assert _binding_names(after["main"]) == ["conv1", "lv1", "lv2", "lv3", "head_fc_0"]
    assert annotated_layers(after["main"]) == {"conv1": "conv1", "head/fc.0": "head_fc_0"}


@I.ir_module
class ActivationMatmul:
    """Attention-style matmul of two activations: not a layer (no weight to quantize)."""

    @R.function
    def main(q: R.Tensor((4, 16), "float32"), k: R.Tensor((16, 4), "float32")) -> R.Tensor((4, 4), "float32"):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            gv = R.matmul(q, k)
            R.output(gv)
        return gv


def test_activation_matmul_is_not_a_layer():
    after = AnnotateBFPLayers({"k": "not_a_weight"})(ActivationMatmul)
    # "k" is a function input here, not a weight the frontend listed: names only what it is told
    assert annotated_layers(after["main"]) == {"not_a_weight": "not_a_weight"}
    after = AnnotateBFPLayers(WEIGHTS)(ActivationMatmul)
    tvm.ir.assert_structural_equal(after, ActivationMatmul)
    assert annotated_layers(after["main"]) == {}


def test_relax_var_name():
    assert relax_var_name("layer1.0/conv-2") == "layer1_0_conv_2"
    assert relax_var_name("0conv") == "l_0conv"


def test_runs_inside_tvm_compile_pipeline():
    # The pass is an ordinary module pass: it composes in a Sequential with TVM's own passes.
    seq = tvm.transform.Sequential([AnnotateBFPLayers(WEIGHTS), tvm.relax.transform.LegalizeOps()])
    out = seq(Before)
    assert annotated_layers(out["main"]) == {"conv1": "conv1", "head/fc.0": "head_fc_0"}


def test_names_without_a_hint():
    # weight parameters after num_input name their layers; bound constants get the op's name
    after = AnnotateBFPLayers()(Before)
    assert annotated_layers(after["main"]) == {"conv1": "conv1", "fc": "fc"}
    bound = tvm.relax.transform.BindParams("main", {
        "conv1_weight": np.zeros((4, 3, 3, 3), "float32"), "fc_weight": np.zeros((10, 256), "float32")})(Before)
    assert annotated_layers(AnnotateBFPLayers()(bound)["main"]) == {"conv2d0": "conv2d0", "matmul0": "matmul0"}
    # a producer's hint is the whole truth: a constant it does not list is not a layer
    hinted = tvm.IRModule({"main": bound["main"].with_attr("bitq.layer_names", {"conv1_weight": "conv1"})})
    assert annotated_layers(AnnotateBFPLayers()(hinted)["main"]) == {}
