"""Default CPU schedules: numerics against ONNX Runtime, coverage of heavy PrimFuncs, aarch64 build."""

import numpy as np
import onnxruntime as ort
import pytest
import tvm
import tvm.relax.frontend.onnx  # noqa: F401  (registers relax.frontend.onnx)
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight
from tvm.script import tirx as T

from bitq_tvm.errors import BitqError
from bitq_tvm.kernels.cpu import (
    CPUScheduleConfig,
    OuterAxisReduction,
    ParallelVectorizeFallback,
    RegisterTiledContraction,
    SpatialInnerReduction,
    cpu_pipeline,
    default_cpu_rules,
)

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
# fp32 sums of <= 300 products of O(1) values, reordered by the schedules.
RTOL, ATOL = 1e-4, 1e-4


class _Graph:
    """Tiny ONNX graph builder with random weights."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def weight(self, shape, scale=0.2, positive=False):
        value = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            value = np.abs(value) + 0.5
        self.count += 1
        name = f"w{self.count}"
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type, inputs, **attrs):
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv_bn_relu(self, x, cin, cout, k=3, stride=1, group=1, relu="Relu"):
        w = self.weight((cout, cin // group, k, k))
        conv = self.op("Conv", [x, w, self.weight((cout,))], pads=[k // 2] * 4, strides=[stride] * 2, group=group)
        bn = self.op(
            "BatchNormalization",
            [conv, self.weight((cout,), positive=True), self.weight((cout,)), self.weight((cout,)),
             self.weight((cout,), positive=True)],
        )
        if relu == "Clip":
            return self.op("Clip", [bn, self.const(0.0), self.const(6.0)])
        return self.op(relu, [bn])

    def const(self, value):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def model(self, inputs, output, opset=17):
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _cnn_block():
    """conv+bn+relu, residual add, stride-2 conv, depthwise and grouped conv, pooling, Gemm."""
    g = _Graph(0)
    x = "x"
    y = g.conv_bn_relu(x, 16, 16)
    y = g.op("Relu", [g.op("Add", [g.conv_bn_relu(y, 16, 16, relu="Identity"), x])])
    y = g.conv_bn_relu(y, 16, 32, stride=2)
    y = g.conv_bn_relu(y, 32, 32, group=32, relu="Clip")  # depthwise
    y = g.conv_bn_relu(y, 32, 24, k=1)  # pointwise, 24 channels: not a multiple of 16 lanes
    y = g.conv_bn_relu(y, 24, 24, group=2)  # grouped
    y = g.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    y = g.op("Gemm", [y, g.weight((10, 24)), g.weight((10,))], transB=1)
    return g.model({"x": [1, 16, 20, 20]}, y)


def _attention_block(seq=24, dim=32, heads=2):
    """Multi-head self-attention + residual + LayerNorm + GELU MLP, batched matmuls included."""
    g = _Graph(1)
    x, head_dim = "x", dim // heads

    def project(src):
        return g.op("Add", [g.op("MatMul", [src, g.weight((dim, dim))]), g.weight((dim,))])

    def split_heads(t):
        shape = g.op("Constant", [], value=numpy_helper.from_array(np.array([1, seq, heads, head_dim], np.int64)))
        return g.op("Transpose", [g.op("Reshape", [t, shape])], perm=[0, 2, 1, 3])

    q, k, v = (split_heads(project(x)) for _ in range(3))
    scores = g.op("Div", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.const(head_dim**0.5)])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merge = g.op("Constant", [], value=numpy_helper.from_array(np.array([1, seq, dim], np.int64)))
    context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
    h = g.op("LayerNormalization", [g.op("Add", [project(context), x]), g.weight((dim,), positive=True),
                                    g.weight((dim,))], axis=-1)
    hidden = g.op("Gelu", [g.op("Add", [g.op("MatMul", [h, g.weight((dim, 4 * dim))]), g.weight((4 * dim,))])])
    out = g.op("Add", [g.op("MatMul", [hidden, g.weight((4 * dim, dim))]), h])
    return g.model({"x": [1, seq, dim]}, out, opset=20)


def _single_op_model(op_type, weights, inputs, opset=17, **attrs):
    """One ONNX node over graph inputs ``inputs`` (name -> shape) and random ``weights`` (name -> shape)."""
    g = _Graph(2)
    names = list(inputs) + [g.weight(shape) for shape in weights]
    return g.model(inputs, g.op(op_type, names, **attrs), opset=opset)


# Shapes that do not tile evenly: batch 2, dilation, 10 and 3 output channels, prime extents,
# a 1000-way GEMV, weights fed at run time.
_ODD_CASES = {
    "conv_batch2_dilated_strided_f10": ("Conv", [(10, 5, 3, 3)], {"x": [2, 5, 13, 11]},
                                        dict(strides=[2, 2], dilations=[2, 2], pads=[2, 1, 2, 1])),
    "conv_1x1_f3_bias": ("Conv", [(3, 8, 1, 1), (3,)], {"x": [1, 8, 9, 9]}, {}),
    "conv_5x5_f48": ("Conv", [(48, 7, 5, 5)], {"x": [1, 7, 17, 17]}, dict(pads=[2, 2, 2, 2])),
    "conv_group4": ("Conv", [(32, 4, 3, 3)], {"x": [1, 16, 12, 12]}, dict(group=4, pads=[1, 1, 1, 1])),
    "depthwise_stride2": ("Conv", [(8, 1, 3, 3)], {"x": [1, 8, 30, 30]}, dict(group=8, strides=[2, 2], pads=[1] * 4)),
    "gemv_1000": ("Gemm", [(1000, 512), (1000,)], {"x": [1, 512]}, dict(transB=1)),
    "dense_runtime_weight": ("Gemm", [], {"x": [5, 33], "w": [20, 33]}, dict(transB=1)),
    "batched_matmul_prime_n": ("MatMul", [], {"x": [2, 3, 7, 9], "w": [2, 3, 9, 17]}, {}),
    "matmul_broadcast_weight": ("MatMul", [(33, 40)], {"x": [3, 7, 33]}, {}),
    "avg_pool": ("AveragePool", [], {"x": [1, 6, 100, 100]}, dict(kernel_shape=[3, 3], pads=[1] * 4)),
    # YOLOv8's box head: softmax over 16 distance bins, 2100 anchors innermost (no lane multiple).
    "softmax_outer_axis_2100": ("Softmax", [], {"x": [1, 16, 4, 2100]}, dict(axis=1)),
    "softmax_outer_axis_batch2": ("Softmax", [], {"x": [2, 16, 4, 64]}, dict(axis=1)),
}


def _run_both(model, shapes, target=HOST):
    feeds = {name: np.random.default_rng(7).standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    mod = relax.frontend.onnx.from_onnx(model, shape_dict=shapes)
    executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return got, want


def _scheduled_module(model, shapes, target=HOST):
    mod = relax.frontend.onnx.from_onnx(model, shape_dict=shapes)
    with target:
        legalized = tvm.transform.Sequential(cpu_generic.legalize_passes(target))(mod)
        # ApplyDefaultSchedule rewrites its input module in place: schedule a copy.
        scheduled = dlight.ApplyDefaultSchedule(*default_cpu_rules(target))(tvm.IRModule(dict(legalized.functions_items())))
    return legalized, scheduled


def _loop_kinds(func):
    kinds = set()
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: kinds.add(int(loop.kind))), order="post")
    return kinds


def _rule_taking(func, target=HOST):
    return next(type(rule).__name__ for rule in default_cpu_rules(target) if rule.apply(func, target, False))


def test_cnn_block_matches_onnxruntime():
    got, want = _run_both(_cnn_block(), {"x": [1, 16, 20, 20]})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_attention_block_matches_onnxruntime():
    got, want = _run_both(_attention_block(), {"x": [1, 24, 32]})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", sorted(_ODD_CASES))
def test_uneven_shapes_match_onnxruntime(case):
    op_type, weights, inputs, attrs = _ODD_CASES[case]
    got, want = _run_both(_single_op_model(op_type, weights, inputs, **attrs), inputs)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["cnn", "attention"])
def test_every_primfunc_is_scheduled_and_heavy_ones_are_parallel_and_vectorized(case):
    model, shapes = (_cnn_block(), {"x": [1, 16, 20, 20]}) if case == "cnn" else (_attention_block(), {"x": [1, 24, 32]})
    legalized, scheduled = _scheduled_module(model, shapes)
    heavy = 0
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        assert func.attrs["tirx.is_scheduled"], gvar.name_hint
        name = gvar.name_hint
        if "conv2d" in name or "matmul" in name:
            heavy += 1
            kinds = _loop_kinds(func)
            assert int(tirx.ForKind.PARALLEL) in kinds, name
            assert int(tirx.ForKind.VECTORIZED) in kinds, name
    # cnn: 3 dense convs (the two 16->16 ones share a PrimFunc), depthwise, grouped, Gemm;
    # attention: Q/K/V projections (one PrimFunc), 2 batched matmuls, out projection, 2 MLP layers.
    assert heavy >= 6


def test_rules_pick_the_intended_families():
    legalized, _ = _scheduled_module(_cnn_block(), {"x": [1, 16, 20, 20]})
    taken = {gvar.name_hint: _rule_taking(func) for gvar, func in legalized.functions_items()
             if isinstance(func, tirx.PrimFunc)}
    dense_convs = [name for name, rule in taken.items() if rule == "RegisterTiledContraction"]
    spatial = [name for name, rule in taken.items() if rule == "SpatialInnerReduction"]
    # 3 dense conv PrimFuncs (3x3, 3x3 stride 2, 1x1) + the Gemm; depthwise, grouped and max pool.
    assert len(dense_convs) >= 4 and any("matmul" in name for name in dense_convs), taken
    assert any("pool" in name for name in spatial) and len(spatial) >= 3, taken


def test_softmax_over_an_outer_axis_runs_lanes_along_the_inner_axis():
    model = _single_op_model("Softmax", [], {"x": [1, 16, 4, 2100]}, axis=1)
    legalized, scheduled = _scheduled_module(model, {"x": [1, 16, 4, 2100]})
    softmax = [(gvar.name_hint, func) for gvar, func in legalized.functions_items() if "softmax" in gvar.name_hint]
    assert len(softmax) == 1, [gvar.name_hint for gvar, _ in legalized.functions_items()]
    name, func = softmax[0]
    assert _rule_taking(func) == "OuterAxisReduction"
    kinds = _loop_kinds(scheduled[name])
    assert int(tirx.ForKind.PARALLEL) in kinds and int(tirx.ForKind.VECTORIZED) in kinds


def test_outer_axis_reduction_declines_a_last_axis_softmax():
    model = _single_op_model("Softmax", [], {"x": [4, 24, 64]}, axis=-1)
    legalized, _ = _scheduled_module(model, {"x": [4, 24, 64]})
    funcs = [func for gvar, func in legalized.functions_items() if "softmax" in gvar.name_hint]
    assert funcs and OuterAxisReduction().apply(funcs[0], HOST, False) is None
    assert _rule_taking(funcs[0]) == "LastAxisReduction"


def test_constant_weights_are_packed_at_compile_time():
    mod = relax.frontend.onnx.from_onnx(_cnn_block(), shape_dict={"x": [1, 16, 20, 20]})
    names = [gvar.name_hint for gvar, _ in cpu_pipeline(HOST)(mod).functions_items()]
    # Dense convs read pre-packed weights; the packing PrimFuncs were folded away with the constants.
    assert sum(name.endswith("_prepacked") for name in names) >= 3, names
    assert not any(name.endswith("_weight_prepack") for name in names), names


@T.prim_func(s_tir=True)
def _prescheduled_matmul(a: T.Buffer((64, 64), "float32"), b: T.Buffer((64, 64), "float32"),
                         c: T.Buffer((64, 64), "float32")):
    T.func_attr({"tir.is_scheduled": True})
    for i, j, k in T.grid(64, 64, 64):
        with T.sblock("matmul"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float32(0)
            c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]


@T.prim_func(s_tir=True)
def _prescheduled_row_sum_scale(a: T.Buffer((8, 64), "float32"), b: T.Buffer((8, 64), "float32")):
    T.func_attr({"tir.is_scheduled": True})
    total = T.sblock_alloc_buffer((8,), "float32")
    for i, k in T.grid(8, 64):
        with T.sblock("total"):
            vi, vk = T.axis.remap("SR", [i, k])
            with T.init():
                total[vi] = T.float32(0)
            total[vi] = total[vi] + a[vi, vk]
    for i, j in T.grid(8, 64):
        with T.sblock("scale"):
            vi, vj = T.axis.remap("SS", [i, j])
            b[vi, vj] = a[vi, vj] / total[vi]


@pytest.mark.parametrize("func", [_prescheduled_matmul, _prescheduled_row_sum_scale])
def test_prescheduled_primfuncs_are_left_alone(func):
    assert all(rule.apply(func, HOST, False) is None for rule in default_cpu_rules(HOST))
    assert any(rule.apply(func.without_attr("tir.is_scheduled"), HOST, False) for rule in default_cpu_rules(HOST))


def test_matmul_is_taken_by_the_contraction_rule():
    unmarked = _prescheduled_matmul.without_attr("tir.is_scheduled")
    assert RegisterTiledContraction().apply(unmarked, HOST, False) is not None


def test_matmul_kernel_numerics_and_structure():
    sch = RegisterTiledContraction().apply(_prescheduled_matmul.without_attr("tir.is_scheduled"), HOST, False)
    func = sch.mod["main"]
    assert {int(tirx.ForKind.PARALLEL), int(tirx.ForKind.VECTORIZED), int(tirx.ForKind.UNROLLED)} <= _loop_kinds(func)
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=HOST)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    c = tvm.runtime.tensor(np.zeros((64, 64), np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=RTOL, atol=ATOL)


def test_aarch64_build_uses_neon_fma():
    mod = relax.frontend.onnx.from_onnx(_cnn_block(), shape_dict={"x": [1, 16, 20, 20]})
    executable = tvm.compile(mod, target=AARCH64, relax_pipeline=cpu_pipeline(AARCH64))
    asm = "".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "fmla" in asm and ".4s" in asm


def test_config_follows_the_target_and_validates():
    assert CPUScheduleConfig.for_target(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})).vector_lanes == 16
    assert CPUScheduleConfig.for_target(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})).vector_lanes == 8
    assert CPUScheduleConfig.for_target(AARCH64).vector_lanes == 4
    with pytest.raises(BitqError, match="vector_lanes"):
        CPUScheduleConfig(vector_lanes=3, vectors_per_tile=1, max_tile_rows=4)
    with pytest.raises(BitqError, match="cuda"):
        default_cpu_rules(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))


def test_rules_decline_what_is_not_theirs():
    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((8, 64), "float32"), b: T.Buffer((8, 64), "float32")):
        for i, j in T.grid(8, 64):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] + T.float32(1)

    assert RegisterTiledContraction().apply(add_one, HOST, False) is None
    assert SpatialInnerReduction().apply(add_one, HOST, False) is None
    sch = ParallelVectorizeFallback().apply(add_one, HOST, False)
    assert int(tirx.ForKind.VECTORIZED) in _loop_kinds(sch.mod["main"])
