"""llvm-mca estimates: the asm parser on real TVM output, the runner, and the per-kernel model."""

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.plan import Plan
from bitq_tvm.targets import mca
from bitq_tvm.targets.presets import get_target

needs_mca = pytest.mark.skipif(shutil.which(mca.MCA_EXECUTABLE) is None, reason="llvm-mca-22 not installed")

# The sdot GEMM of a BFP8 ResNet-18 layer as TVM 0.27 emits it for cortex-a76 (abridged): the
# k-quad loop .LBB108_4 (8 trips) inside the per-block loop .LBB108_3 (block rescale).
ASM = """\
\t.type\tbfp_matmul_m196_n256_k2304_a8b32_w8b32_sdot_compute_,@function
bfp_matmul_m196_n256_k2304_a8b32_w8b32_sdot_compute_:
\tret
\t.type\t.L__tvm_parallel_lambda.193,@function
.L__tvm_parallel_lambda.193:
.LBB108_3:
\tmovi\tv26.2d, #0000000000000000
\tmov\tx20, x5
\tmov\tw22, #8
\t.p2align\t5, , 16
.LBB108_4:
\tadd\tx23, x20, #2304
\tldp\tq27, q29, [x21, #-32]
\tld1r\t{ v28.4s }, [x20], #4
\tldp\tq30, q31, [x21], #64
\tsdot\tv23.4s, v27.16b, v28.16b
\tsdot\tv24.4s, v29.16b, v28.16b
\tsdot\tv25.4s, v30.16b, v28.16b
\tsdot\tv26.4s, v31.16b, v28.16b
\tsubs\tx22, x22, #1
\tb.ne\t.LBB108_4
\tscvtf\tv26.4s, v26.4s
\tfmla\tv16.4s, v26.4s, v30.s[0]          // a comment
\tadd\tx2, x2, #1
\tcmp\tx2, #72
\tb.ne\t.LBB108_3
\tret
\t.type\t__tvm_ffi_other,@function
__tvm_ffi_other:
\tret
"""


def test_asm_kernels_loops_lanes_and_trip_count():
    kernels = mca.split_kernels(ASM)
    assert list(kernels) == ["bfp_matmul_m196_n256_k2304_a8b32_w8b32_sdot"]
    lines = kernels["bfp_matmul_m196_n256_k2304_a8b32_w8b32_sdot"]
    assert "fmla\tv16.4s, v26.4s, v30.s[0]" in "\n".join(lines) and "comment" not in "\n".join(lines)
    loops = mca.find_loops(lines)
    assert sorted(lp.label for lp in loops) == [".LBB108_3", ".LBB108_4"]
    (inner,) = mca.innermost(loops)
    assert inner.label == ".LBB108_4" and mca.parent(inner, loops).label == ".LBB108_3"
    assert mca.trip_count(lines, inner) == 8
    assert sum(mca.mac_lanes(line.strip(), 128, None) for line in lines[inner.start:inner.end + 1]) == 64
    assert "sdot" not in mca.loop_body(lines, mca.parent(inner, loops), skip=inner)


def test_mac_lanes_of_other_isas():
    assert mca.mac_lanes("vpdpbusd\t%zmm1, %zmm2, %zmm3", 512, None) == 64
    assert mca.mac_lanes("vfmadd231ps\t%ymm1, %ymm2, %ymm3", 256, None) == 8
    assert mca.mac_lanes("smmla\tv0.4s, v1.16b, v2.16b", 128, None) == 32
    assert mca.mac_lanes("vwmulsu.vv\tv8, v9, v10", 128, 16) == 16
    assert mca.rvv_vl("\tvsetvli\ta0, zero, e8, m1, ta, ma", 128) == 16
    assert mca.rvv_vl("\tvsetivli\tzero, 4, e32, m2, ta, ma", 128) == 4
    assert mca.mac_lanes("ldr\tq0, [x1]", 128, None) == 0


def test_parser_rejects_other_text_and_unknown_target():
    with pytest.raises(BitqError, match="Total Cycles"):
        mca.parse_mca_output("Iterations: 10\nInstructions: 20\n")
    with pytest.raises(BitqError, match="no llvm-mca scheduling model for target 'host'"):
        mca.mca_cpu(get_target("host"))


def test_missing_llvm_mca_is_one_line_error(monkeypatch):
    monkeypatch.setattr(mca.shutil, "which", lambda name: None)
    with pytest.raises(BitqError, match="llvm-mca-22 not found"):
        mca.mca_executable()


@needs_mca
def test_real_llvm_mca_output_parses():
    lines = mca.split_kernels(ASM)["bfp_matmul_m196_n256_k2304_a8b32_w8b32_sdot"]
    inner = mca.innermost(mca.find_loops(lines))[0]
    a76 = mca.run_mca(mca.loop_body(lines, inner), "aarch64", "cortex-a76", "+neon,+dotprod")
    a53 = mca.run_mca(mca.loop_body(lines, inner), "aarch64", "cortex-a53", "+neon,+dotprod")
    assert a76.instructions == 10
    assert 2 < a76.cycles_per_iteration < 40 and a76.block_rthroughput <= a76.cycles_per_iteration + 1e-9
    assert a53.cycles_per_iteration > a76.cycles_per_iteration  # in-order, one NEON pipe


def _gemm_model(tmp_path, k: int, n: int = 64, rows: int = 16):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], [weight])
    path = tmp_path / f"gemm_k{k}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return load_onnx(str(path))


@needs_mca
def test_estimate_grows_with_k_and_bfp4_moves_fewer_bytes(tmp_path):
    from bitq_tvm.solver.mca_cost import estimate_model, layer_estimates

    preset = get_target("cortex-a76")
    small, big = _gemm_model(tmp_path, 256), _gemm_model(tmp_path, 512)

    def matmul(model, spec):
        estimate = estimate_model(model, Plan.uniform(spec), preset)
        (kernel,) = [k for k in estimate.kernels if k.name.startswith("bfp_matmul")]
        return estimate, kernel

    est8, k8 = matmul(small, "bfp8_b32")
    _, k8_big = matmul(big, "bfp8_b32")
    _, k4 = matmul(small, "bfp4_b32")
    assert k8.compute_cycles is not None and k8.hot_loop_macs > 0
    assert 1.6 < k8_big.compute_cycles / k8.compute_cycles < 2.4
    assert k4.memory_cycles < k8.memory_cycles
    formats = Plan.uniform("bfp8_b32").default
    assert layer_estimates(small, formats, est8) == {"fc": k8.cycles}


def _pointwise_depthwise_model(tmp_path):
    """pw (1x1 conv, ReLU, its epilogue fuses the depthwise input's quantization) -> dw 3x3."""
    rng = np.random.default_rng(1)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
            for n, s in (("w_pw", (32, 16, 1, 1)), ("w_dw", (32, 1, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w_pw"], ["a"], name="pw"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w_dw"], ["y"], name="dw", group=32, pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], init)
    path = tmp_path / "pw_dw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return load_onnx(str(path))


@needs_mca
def test_fused_and_depthwise_kernels_are_found_by_their_records(tmp_path):
    """Layers find their kernels through the kernels' ``bitq.kernel`` records: the pointwise
    conv's fused kernel (its name carries the epilogue) and the depthwise conv's kernel."""
    from bitq_tvm.kernels.contract import kernel_geometry, kernel_key
    from bitq_tvm.solver.mca_cost import estimate_model, layer_estimates

    model = _pointwise_depthwise_model(tmp_path)
    estimate = estimate_model(model, Plan.uniform("bfp8_b32"), get_target("cortex-a76"))
    formats = Plan.uniform("bfp8_b32").default
    found = layer_estimates(model, formats, estimate)
    assert set(found) == {"pw", "dw"}
    by_key = {k.key: k for k in estimate.kernels if k.key is not None}
    for layer in model.layers:
        geometry = kernel_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, 32,
                                   layer.groups)
        kernel = by_key[kernel_key(geometry, "bfp8_b32", "bfp8_b32")]
        assert found[layer.name] == kernel.cycles and kernel.compute_cycles
    assert any(k.name.startswith("bfp_matmul") and k.key and k.name != "bfp_matmul" and "_qa8b1" in k.name
               for k in estimate.kernels)
