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
TARGETS = {"avx2": tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), "generic": HOST}


def _run_matmul(M, N, K, fa, fw, variant, epilogue, rng):
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
    fused["bfp_matmul"](*inputs, *([tvm.runtime.tensor(bias, dev)] if epilogue.bias else []), q, e)
    y = c.numpy() + (bias if epilogue.bias else np.float32(0))
    if epilogue.low is not None:
        y = np.maximum(y, np.float32(epilogue.low))
    if epilogue.high is not None:
        y = np.minimum(y, np.float32(epilogue.high))
    return q.numpy(), e.numpy(), quantize_np(y.astype(np.float32), epilogue.out_fmt, axis=-1)


# (M, N, K, weight format, next format, variant): outputs a multiple of the tile (fused per tile)
# and ragged (N = 40, 10: padded channels, fused after the matmul); next block 8 .. 128
CASES = [
    (8, 64, 100, "bfp8_b32", "bfp8_b32", "avx2"),
    (12, 128, 96, "bfp4_b32", "bfp6_b64", "avx2"),
    (4, 256, 64, "bfp8_b16", "bfp8_b128", "avx2"),
    (7, 40, 64, "bfp6_b16", "bfp4_b16", "generic"),
    (3, 10, 48, "bfp8_b8", "bfp8_b8", "avx2"),
    (1, 96, 64, "bfp2_b32", "bfp5_b32", "generic"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}_{c[3]}_{c[4]}_{c[5]}" for c in CASES])
@pytest.mark.parametrize("ops", [dict(bias=True, low=0.0), dict(bias=True, low=0.0, high=6.0), dict()],
                         ids=["bias_relu", "bias_relu6", "quantize_only"])
def test_fused_epilogue_equals_quantized_unfused_output(case, ops):
    M, N, K, fw, fq, variant = case
    fw, fq = get_format(fw), get_format(fq)
    fa = BFPFormat(8, fw.block_size)
    q, e, want = _run_matmul(M, N, K, fa, fw, variant, Epilogue(fq, **ops), np.random.default_rng(N + K))
    np.testing.assert_array_equal(q, want.mantissas.reshape(M, -1))
    np.testing.assert_array_equal(e, want.exponents.reshape(M, -1))
    assert np.count_nonzero(q) > q.size // 4  # a zero kernel would not match a nonzero reference


def test_stochastic_rounding_is_not_fused():
    with pytest.raises(BitqError, match="stochastically"):
        Epilogue(get_format("bfp8_b32_sr1"))


class _Net(nn.Module):
    """conv -> bias -> ReLU -> conv -> ReLU6 -> conv (+ residual) -> flatten -> linear -> ReLU -> linear."""

    def __init__(self):
        self.conv1 = nn.Conv2D(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2D(64, 64, 1)
        self.conv3 = nn.Conv2D(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x):
        h = nn.relu(self.conv1(x))
        h = nn.op.wrap_nested(relax.op.clip(self.conv2(h)._expr, 0.0, 6.0), "relu6")  # MobileNets' ReLU6
        h = nn.relu(self.conv3(h) + h)  # residual: conv2's output has two users
        h = nn.op.reshape(h, [x.shape[0], 64 * 8 * 8])
        return self.fc2(nn.relu(self.fc1(h)))


@pytest.mark.parametrize("batch", [1, 4])
def test_deployed_model_is_bit_equal_with_and_without_fusion(batch):
    mod, named = _Net().export_tvm({"forward": {"x": nn.spec.Tensor([batch, 32, 8, 8], "float32")}})
    rng = np.random.default_rng(batch)
    params = {name: (rng.standard_normal([int(d) for d in p.shape]) * 0.1).astype("float32") for name, p in named}
    x = rng.standard_normal((batch, 32, 8, 8)).astype("float32")
    plan = {name: LayerFormats(get_format("bfp8_b32"), get_format("bfp8_b32"))
            for name in ("conv1", "conv2", "conv3", "fc1", "fc2")}
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
    assert notes["conv2"].startswith("not fused: its output has 2 users")
    assert notes["fc1"] == "fused: bias, relu, quantize to bfp8_b32 for fc2"
    assert notes["fc2"] == "not fused: its output is the model's output"
    kernels = [gv.name_hint for gv in lowered.get_global_vars()]
    assert any(k.endswith("_bias_relu_qa8b32") for k in kernels)
