"""Vectorisable float32 exp/sigmoid: accuracy over the float32 range, no scalar calls, the pipeline uses them."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx
from tvm.script import relax as R

from bitq_tvm.kernels import float_math
from bitq_tvm.kernels.cpu import cpu_pipeline

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
SMALLEST_NORMAL = np.float32(2.0**-126)


def _vectorised(fn, n):
    """A compiled ``out[i] = fn(x[i])`` over n float32 values, 8 lanes per iteration."""
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: fn(x[i]), name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    _, lanes = sch.split(loop, [None, 8])
    sch.vectorize(lanes)
    return tvm.compile(sch.mod, target=HOST)


def _run(lib, x):
    out = tvm.runtime.empty(x.shape, "float32")
    lib(tvm.runtime.tensor(x), out)
    return out.numpy()


_SCALAR_EXP_CALL = re.compile(r"call\w*\s+\S*expf")


def _assembly(executable):
    """The LLVM-generated assembly of an executable's kernels."""
    pending, text = [executable.mod], []
    while pending:
        module = pending.pop()
        if module.kind == "llvm":
            text.append(module.inspect_source("asm"))
        pending.extend(module.imports)
    return "\n".join(text)


def _ulp_distance(a, b):
    """|a - b| in float32 steps (both finite, same sign or zero)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def _float32_sample(stride):
    """Every ``stride``-th float32 bit pattern, both signs, plus the special values."""
    bits = np.arange(0, 2**31, stride, dtype=np.uint32)
    positive = bits.view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.72283, 88.72284, -103.97, -103.98,
                        -87.33654, 1e-30, -1e-30], np.float32)
    return np.concatenate([positive, -positive, special])


def _exact(fn, x):
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return fn(x.astype(np.float64)).astype(np.float32)


def test_exp_is_within_one_ulp_over_the_float32_range():
    x = _float32_sample(211)
    got = _run(_vectorised(float_math.exp, x.size), x)
    want = _exact(np.exp, x)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isinf(got), np.isinf(want)), x[np.isinf(got) != np.isinf(want)][:5]
    finite = np.isfinite(want)
    assert np.array_equal(got[finite] == 0, want[finite] == 0), x[finite][(got[finite] == 0) != (want[finite] == 0)][:5]
    distance = _ulp_distance(got[finite], want[finite])
    # subnormal steps are absolute (2**-149), normal ones relative: both at most one
    assert distance.max() <= 1, x[finite][distance.argmax()]
    assert (want[finite] < SMALLEST_NORMAL).any() and (want[finite] > 1e30).any()  # both ends sampled


def test_sigmoid_relative_error_is_within_3_times_2_to_the_minus_24():
    x = _float32_sample(409)
    got = _run(_vectorised(float_math.sigmoid, x.size), x)
    assert np.array_equal(np.isnan(got), np.isnan(x))
    with np.errstate(over="ignore", invalid="ignore"):
        exact = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
        # what TVM's lowering 1 / (1 + exp(-x)) computes with glibc's expf: 0 once exp(-x)
        # overflows (x below about -88.7)
        formula = np.float32(1) / (np.float32(1) + _exact(np.exp, -x))
    normal = ~np.isnan(x) & (x > -87)
    relative = np.abs(got[normal] - exact[normal]) / exact[normal]
    # the float32 formula with a correctly rounded exp is itself ~2.4 * 2**-24 off at worst
    # (x = -16.6, where 1 + exp(-x) rounds; bench/bench_float_math.py accuracy prints both)
    assert relative.max() <= 3 * 2.0**-24, x[normal][relative.argmax()]
    tail = ~np.isnan(x) & (x <= -87)
    assert np.abs(got[tail] - formula[tail]).max() <= 2 * 2.0**-149


@pytest.mark.parametrize("fn", [float_math.exp, float_math.sigmoid], ids=["exp", "sigmoid"])
def test_vectorised_loop_calls_no_scalar_exp(fn):
    assert not _SCALAR_EXP_CALL.search(_assembly(_vectorised(fn, 1024)))
    # the same loop with TVM's lowering calls expf once per lane: the check can fail
    assert _SCALAR_EXP_CALL.search(_assembly(_vectorised(tirx.exp, 1024)))


@tvm.script.ir_module
class _Activations:
    @R.function
    def main(x: R.Tensor((2, 16, 4, 35), "float32")):
        with R.dataflow():
            silu = R.multiply(x, R.sigmoid(x))
            soft = R.nn.softmax(x, axis=1)
            grown = R.exp(R.multiply(x, R.const(0.1, "float32")))
            out = R.add(R.add(silu, soft), grown)
            R.output(out)
        return out


def _compiled(mod):
    return tvm.compile(mod, target=HOST, relax_pipeline=cpu_pipeline(HOST))


def test_pipeline_legalises_float32_exp_sigmoid_softmax_with_the_vector_exp():
    x = np.random.default_rng(0).normal(0, 3, (2, 16, 4, 35)).astype(np.float32)
    lib = _compiled(_Activations)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    x64 = x.astype(np.float64)
    shifted = np.exp(x64 - x64.max(axis=1, keepdims=True))
    want = x64 / (1 + np.exp(-x64)) + shifted / shifted.sum(axis=1, keepdims=True) + np.exp(0.1 * x64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not _SCALAR_EXP_CALL.search(_assembly(lib))


def test_other_dtypes_keep_tvm_legalisation():
    @tvm.script.ir_module
    class Half:
        @R.function
        def main(x: R.Tensor((4, 8), "float16")):
            with R.dataflow():
                out = R.exp(x)
                R.output(out)
            return out

    legalized = relax.transform.LegalizeOps(customize_legalize_map=float_math.legalize_map())(Half)
    reference = relax.transform.LegalizeOps()(Half)
    tvm.ir.assert_structural_equal(legalized, reference)
