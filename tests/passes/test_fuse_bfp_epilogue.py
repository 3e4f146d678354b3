"""FuseBFPEpilogue and the fused matmul epilogue: same numbers as the unfused graph, bit for bit.

The fused kernel performs the unfused graph's float32 operations in the same order (``C + bias``,
max/min, then the activation quantizer's steps), so the checks are exact equalities: the fused
kernel's mantissas/exponents against :func:`~bitq_tvm.formats.quantize_np` of the unfused
kernel's epilogue, and whole deployed models with and without the pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.target.codegen import llvm_get_system_cpu

import bitq_tvm
from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat, get_format, quantize_np
from bitq_tvm.kernels.bfp_matmul import Epilogue
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
from bitq_tvm.kernels.oracle import quantize_activations_np
from bitq_tvm.kernels.packing import pack_weights
from bitq_tvm.passes.lower_bfp_integer import deployment_attr
from bitq_tvm.pipeline import bfp_passes
from bitq_tvm.plan import LayerFormats

HOST = tvm.target.Target({"kind": "llvm", "mcpu": llvm_get_system_cpu()})
TARGETS = {"avx2": tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), "generic": HOST,
           "vnni": tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})}


def _run_matmul(M, N, K, fa, fw, variant, epilogue, reference, rng, tensors=()):
    """(Q, E) of the fused kernel and quantize_np(reference(C, bias, *tensors)) of the unfused one."""
    a = rng.standard_normal((M, K)).astype(np.float32) * np.exp2(rng.integers(-8, 8, (M, 1))).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    acts, packed = quantize_activations_np(a, fa), pack_weights(w, fw)
    dev = tvm.cpu()
    inputs = [tvm.runtime.tensor(x, dev) for x in (acts["qa"], acts["ea"], packed.qw, packed.ew)]
    plain = tvm.compile(bfp_matmul_func(M, N, K, fa, fw, variant), target=TARGETS[variant])
    c = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32), dev)
    plain["bfp_matmul"](*inputs, c)
    fused = tvm.compile(bfp_matmul_func(M, N, K, fa, fw, variant, epilogue=epilogue), target=TARGETS[variant])
    block = epilogue.out_fmt.block_size
    width = -(-N // block) * block
    q = tvm.runtime.tensor(np.full((M, width), 99, np.int8), dev)
    e = tvm.runtime.tensor(np.full((M, width // block), 99, np.int8), dev)
    extra = [bias] * epilogue.biases + list(tensors)
    fused["bfp_matmul"](*inputs, *(tvm.runtime.tensor(t, dev) for t in extra), q, e)
    y = reference(c.numpy(), bias, *tensors).astype(np.float32)
    return q.numpy(), e.numpy(), quantize_np(y, epilogue.out_fmt, axis=-1)


# (M, N, K, weight format, next format, variant): outputs a multiple of the tile (fused per tile)
# and ragged (N = 40, 10: padded channels, fused after the matmul); next block 8 .. 128
CASES = [
    (8, 64, 100, "bfp8_b32", "bfp8_b32", "avx2"),
    (12, 128, 96, "bfp4_b32", "bfp6_b64", "avx2"),
    (4, 256, 64, "bfp8_b16", "bfp8_b128", "avx2"),
    (7, 40, 64, "bfp6_b16", "bfp4_b16", "generic"),
    (3, 10, 48, "bfp8_b8", "bfp8_b8", "avx2"),
    (1, 96, 64, "bfp2_b32", "bfp5_b32", "generic"),
    # next block 1 (a depthwise conv's input, an exponent per value): elementwise exponent stages
    (8, 64, 64, "bfp8_b32", "bfp8_b1", "avx2"),
    (7, 40, 64, "bfp8_b16", "bfp4_b1", "generic"),
]


# N = 48 fills its 16-lane tiles but not the next format's 64 padded columns: the padded block
# must not read past the matmul's 48 outputs (it did, on AVX-512, giving garbage exponents)
CASES += [(1, 48, 96, "bfp8_b32", "bfp8_b32", v) for v in ("avx2", "generic")] + [
    pytest.param(c, marks=pytest.mark.host_cpu("avx512vnni"))
    for c in [(1, 48, 96, "bfp8_b32", "bfp8_b32", "vnni"), (8, 64, 100, "bfp4_b32", "bfp8_b32", "vnni"),
              (3, 10, 48, "bfp8_b8", "bfp8_b8", "vnni"), (1, 96, 64, "bfp8_b32", "bfp8_b16", "vnni"),
              (4, 96, 64, "bfp8_b32", "bfp8_b1", "vnni")]]
# MobileNetV2's ragged projections at B' = 32 (N = 16, 24; 144 of an expansion): one pass over the
# rows with the vector tree of block maxima and y's columns partitioned at N (the real part loads
# contiguously, the padding reads the clamped last channel)
CASES += [(8, 16, 64, "bfp8_b32", "bfp8_b32", "avx2"), (12, 24, 160, "bfp8_b32", "bfp8_b32", "generic"),
          (4, 144, 64, "bfp8_b32", "bfp8_b32", "avx2")] + [
    pytest.param(c, marks=pytest.mark.host_cpu("avx512vnni"))
    for c in [(8, 16, 64, "bfp8_b32", "bfp8_b32", "vnni"), (12, 24, 160, "bfp8_b32", "bfp8_b32", "vnni"),
              (4, 144, 64, "bfp8_b32", "bfp8_b32", "vnni"), (4, 40, 64, "bfp8_b32", "bfp8_b32", "vnni")]]


def _case_id(c):
    c = c.values[0] if hasattr(c, "values") else c
    return f"{c[0]}x{c[1]}x{c[2]}_{c[3]}_{c[4]}_{c[5]}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("ops", [dict(bias=True, low=0.0), dict(bias=True, low=0.0, high=6.0), dict()],
                         ids=["bias_relu", "bias_relu6", "quantize_only"])
def test_fused_epilogue_equals_quantized_unfused_output(case, ops):
    M, N, K, fw, fq, variant = case
    fw, fq = get_format(fw), get_format(fq)
    fa = BFPFormat(8, fw.block_size)

    def reference(c, bias):
        y = c + bias if ops.get("bias") else c
        y = np.maximum(y, np.float32(0)) if "low" in ops else y
        return np.minimum(y, np.float32(ops["high"])) if "high" in ops else y

    q, e, want = _run_matmul(M, N, K, fa, fw, variant, Epilogue.clipped(fq, **ops), reference,
                             np.random.default_rng(N + K))
    np.testing.assert_array_equal(q, want.mantissas.reshape(M, -1))
    np.testing.assert_array_equal(e, want.exponents.reshape(M, -1))
    real = q[:, :N]  # (the padded columns are zero: N = 16 pads to 32)
    assert np.count_nonzero(real) > real.size // 4  # a zero kernel would not match a nonzero reference


def test_ragged_epilogue_is_one_vectorized_pass_over_the_rows():
    """Padded outputs (N = 24 at B' = 32): y, the block-maximum tree, E and Q all under one
    parallel row loop after the matmul (one launch, the row in L1), no scalar block maximum."""
    func = bfp_matmul_func(64, 24, 160, BFPFormat(8, 32), get_format("bfp8_b32"), "avx2",
                           epilogue=Epilogue.clipped(get_format("bfp8_b32"), bias=True, low=0.0, high=6.0))
    sch = tvm.s_tir.Schedule(func)
    row = sch.get(sch.get_loops(sch.get_sblock("E"))[0])
    assert row.kind == tvm.tirx.ForKind.PARALLEL and int(row.extent) == 64
    for name in ("exponent_field", "Q"):
        assert sch.get(sch.get_loops(sch.get_sblock(name))[0]).same_as(row), name
    for name in ("y_j0", "y_j1", "y_j2"):  # y's columns partitioned at 16 and N
        sch.get_sblock(name)
    script = func.script()
    assert script.count("T.parallel(") == 2  # the matmul's tiles, the epilogue's rows (was 5 loops)
    assert "exponent_field_rf" in script  # the vector tree, not a scalar loop per block


@pytest.mark.parametrize("variant", ["avx2", "generic"])
def test_fused_residual_and_hardswish_expression(variant):
    """A residual tensor in NCHW (read through the row -> (n, h, w) mapping) and HardSwish
    ``x * (clip(x + 3, 0, 6) / 6)`` (x used twice), as TVM's ONNX importer writes it."""
    n, c, h, w = 2, 64, 3, 4
    M, K = n * h * w, 96
    fq = get_format("bfp8_b32")
    x_plus_bias = ("add", ("x",), ("bias", 0))
    residual = ("add", x_plus_bias, ("tensor", 0))
    hardswish = ("multiply", residual, ("divide", ("clip", ("add", residual, ("const", 3.0)), 0.0, 6.0),
                                        ("const", 6.0)))
    epilogue = Epilogue(fq, hardswish, (((n, c, h, w), 1),))
    rng = np.random.default_rng(5)
    r_nchw = rng.standard_normal((n, c, h, w)).astype(np.float32)

    def reference(out, bias, r):
        rows = r.transpose(0, 2, 3, 1).reshape(M, c)  # the NCHW tensor as matmul rows x channels
        v = out + bias + rows
        return v * (np.minimum(np.maximum(v + np.float32(3), np.float32(0)), np.float32(6)) / np.float32(6))

    fa = BFPFormat(8, 32)
    q, e, want = _run_matmul(M, c, K, fa, get_format("bfp8_b32"), variant, epilogue, reference, rng, [r_nchw])
    np.testing.assert_array_equal(q, want.mantissas.reshape(M, -1))
    np.testing.assert_array_equal(e, want.exponents.reshape(M, -1))
    assert epilogue.ops == ["add", "add", "add", "add", "add", "clip", "divide", "multiply"]


def test_stochastic_rounding_is_not_fused():
    with pytest.raises(BitqError, match="stochastically"):
        Epilogue(get_format("bfp8_b32_sr1"))


class _Net(nn.Module):
    """conv -> bias -> ReLU -> conv -> ReLU6 -> conv (+ residual) -> ReLU -> flatten -> linear ->
    SiLU -> linear -> HardSwish (as TVM's ONNX importer writes it) -> linear."""

    def __init__(self):
        self.conv1 = nn.Conv2D(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2D(64, 64, 1)
        self.conv3 = nn.Conv2D(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 96)
        self.fc2 = nn.Linear(96, 48)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x):
        h = nn.relu(self.conv1(x))
        h = nn.op.wrap_nested(relax.op.clip(self.conv2(h)._expr, 0.0, 6.0), "relu6")  # MobileNets' ReLU6
        h = nn.relu(self.conv3(h) + h)  # residual: conv2's output has two users
        h = nn.op.reshape(h, [x.shape[0], 64 * 8 * 8])
        h = self.fc1(h)
        h = self.fc2(h * nn.op.sigmoid(h))
        h = h * (nn.op.wrap_nested(relax.op.clip((h + 3.0)._expr, 0.0, 6.0), "relu6") / 6.0)
        return self.fc3(h)


@pytest.mark.parametrize("batch", [1, 4])
def test_deployed_model_is_bit_equal_with_and_without_fusion(batch):
    mod, named = _Net().export_tvm({"forward": {"x": nn.spec.Tensor([batch, 32, 8, 8], "float32")}})
    rng = np.random.default_rng(batch)
    params = {name: (rng.standard_normal([int(d) for d in p.shape]) * 0.1).astype("float32") for name, p in named}
    x = rng.standard_normal((batch, 32, 8, 8)).astype("float32")
    plan = {name: LayerFormats(get_format("bfp8_b32"), get_format("bfp8_b32"))
            for name in ("conv1", "conv2", "conv3", "fc1", "fc2", "fc3")}
    outputs, notes = {}, None
    for fuse in (False, True):
        passes = bitq_tvm.pipeline(plan, HOST, deploy=True, params=params, fuse_epilogues=fuse)
        ex = tvm.compile(mod, HOST, relax_pipeline=passes)
        outputs[fuse] = relax.VirtualMachine(ex, tvm.cpu())["forward"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(outputs[True], outputs[False])
    assert np.abs(outputs[True]).max() > 0

    # what was fused, and why the rest was not, is in the IR for the report
    lowered = tvm.transform.Sequential(bfp_passes(plan, HOST, deploy=True, params=params))(mod)
    func = next(f for _, f in lowered.functions_items() if isinstance(f, relax.Function) and deployment_attr(f))
    notes = {r["layer"]: r["epilogue"] for r in deployment_attr(func)["layers"]}
    assert notes["conv1"] == "fused: bias, relu, quantize to bfp8_b32 for conv2"
    assert notes["conv2"].startswith("not fused: ") and "2 users" in notes["conv2"]  # the residual
    assert notes["conv3"] == "not fused: a reshape between the layers moves the channels"  # NCHW flatten
    assert notes["fc1"] == "fused: bias, sigmoid, multiply, quantize to bfp8_b32 for fc2"
    assert notes["fc2"].startswith("fused: bias, add, clip, divide, multiply")
    assert notes["fc3"] == "not fused: its output is the model's output"
    kernels = [gv.name_hint for gv in lowered.get_global_vars()]
    assert any(k.endswith("_add_relu_qa8b32") for k in kernels)


def _inverted_residual_onnx(batch: int):
    """pointwise -> Clip(0, 6) -> depthwise 3x3 -> Clip(0, 6) -> pointwise, as exporters write
    MobileNetV2's blocks (Clip with constant bounds: TVM imports it as TE max/min kernels)."""
    from onnx import TensorProto, helper, numpy_helper

    from bitq_tvm.frontend.onnx_model import normalize

    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("pw1.w", rng.standard_normal((48, 16, 1, 1)) * 0.3), ("pw1.b", rng.standard_normal(48)),
        ("dw.w", rng.standard_normal((48, 1, 3, 3)) * np.exp2(rng.integers(-4, 2, (48, 1, 1, 1)))),
        ("dw.b", rng.standard_normal(48)), ("pw2.w", rng.standard_normal((16, 48, 1, 1)) * 0.2),
        ("lo", np.zeros(())), ("hi", np.full((), 6.0))]]
    nodes = [helper.make_node("Conv", ["x", "pw1.w", "pw1.b"], ["a"], name="pw1", kernel_shape=[1, 1]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["a6"]),
             helper.make_node("Conv", ["a6", "dw.w", "dw.b"], ["d"], name="dw", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], group=48),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             helper.make_node("Conv", ["d6", "pw2.w"], ["y"], name="pw2", kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16, 10, 10])], inits)
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "block")
    return model, {"x": rng.standard_normal((batch, 16, 10, 10)).astype(np.float32)}


@pytest.mark.parametrize("batch", [1, 4])
def test_depthwise_block_fuses_through_clip_and_is_bit_equal(batch):
    from bitq_tvm.api import compile_model
    from bitq_tvm.deploy import compile_deployed
    from bitq_tvm.plan import Plan

    model, feeds = _inverted_residual_onnx(batch)
    plan = Plan.uniform("bfp8_b32")
    fused = compile_deployed(model, plan, progress=None)
    unfused = compile_deployed(model, plan, progress=None, fuse_epilogues=False)
    got = fused.run(feeds)[0]
    np.testing.assert_array_equal(got, unfused.run(feeds)[0])
    # the simulation: the same blocks, sums in another float32 order (tests/test_deploy_end_to_end.py's bound)
    want = compile_model(model, plan, progress=None).run(feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    notes = {d.layer: d.epilogue for d in fused.report.layers}
    assert fused.report.integer_layers == ["pw1", "dw", "pw2"]
    # the depthwise input gets an exponent per value (blocks of one), its output the next 32-blocks
    assert notes["pw1"] == "fused: bias, maximum, minimum, quantize to bfp8_b1 for dw"
    assert notes["dw"] == "fused: bias, maximum, minimum, quantize to bfp8_b32 for pw2"
