"""float32 ``exp`` and ``sigmoid`` as plain TIR arithmetic, so that vectorised loops stay vectorised.

TVM lowers ``tirx.exp`` (and ``tirx.sigmoid``, which legalises to ``1 / (1 + exp(-x))``) to
LLVM's ``llvm.exp.f32``; without a vector math library LLVM splits a vector of them into one
scalar ``expf`` call per lane (16 calls per AVX-512 register, seen in the assembly). In a fused
SiLU epilogue or a softmax that is most of the kernel's time. Here exp is the classic Cody-Waite
range reduction plus a degree-7 polynomial (Cephes ``expf``), built from multiplies, adds,
``floor`` and integer bit operations only, all of which LLVM keeps in vector registers.

Accuracy (``tests/kernels/test_float_math.py`` checks it on every 211th float32): within 1 ulp
of the correctly rounded exp, subnormal results included, and exact where that is special
(``inf`` above ~88.72, 0 below ~-103.97, NaN in -> NaN out). ONNX Runtime's own
``Exp``/``Sigmoid`` are approximations of the same order, and a BFP network's output moves more
from one ulp at its input (``docs/tvm-0.27-notes.md``). ``bench/bench_float_math.py`` prints the
accuracy and the speed against TVM's lowering.

:func:`legalize_map` is the ``LegalizeOps`` customisation that :func:`~bitq_tvm.kernels.cpu.cpu_pipeline`
uses for float32 ``exp``, ``sigmoid`` and ``softmax``; the fused BFP epilogues call
:func:`sigmoid` directly. ``tanh`` and ``erf`` keep TVM's lowering.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from .float_bits import FLOAT32_EXPONENT_BIAS, FLOAT32_MANTISSA_BITS

_LOG2E = 1.4426950408889634
# ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has 9 significant bits, so n * _LN2_HI is exact for |n| < 2**15
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# Cephes expf: exp(r) ~ 1 + r + r**2 * P(r) on |r| <= ln2 / 2
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)
# Beyond these exp is inf / 0 in float32; the clamp keeps n in [-150, 128], whose halves
# (see _times_power_of_two) are normal powers of two.
_X_MAX = 89.0
_X_MIN = -104.0


def _f32(value: float) -> tirx.PrimExpr:
    return tirx.const(value, "float32")


def _power_of_two(k: tirx.PrimExpr) -> tirx.PrimExpr:
    """2**k for int32 k in [-126, 127] from its bit pattern (``float_bits.power_of_two`` without
    its subnormal Select, which does not vectorise inside a larger expression for RVV)."""
    return tirx.reinterpret("float32", (k + FLOAT32_EXPONENT_BIAS) << FLOAT32_MANTISSA_BITS)


def _times_power_of_two(y: tirx.PrimExpr, n: tirx.PrimExpr) -> tirx.PrimExpr:
    """y * 2**n for n in [-150, 128], y in [0.5, 2]: two normal factors, one rounding, so an
    overflow gives inf and an underflow rounds gradually to subnormals and 0 as exp's does."""
    half = n >> 1
    return y * _power_of_two(half) * _power_of_two(n - half)


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``exp(x)`` from vectorisable arithmetic (see the module docstring)."""
    clamped = tirx.max(tirx.min(x, _f32(_X_MAX)), _f32(_X_MIN))
    n = tirx.floor(clamped * _f32(_LOG2E) + _f32(0.5))
    r = (clamped - n * _f32(_LN2_HI)) - n * _f32(_LN2_LO)
    p = _f32(_EXP_POLY[0])
    for coefficient in _EXP_POLY[1:]:
        p = p * r + _f32(coefficient)
    y = (p * (r * r) + r) + _f32(1.0)
    result = _times_power_of_two(y, tirx.Cast("int32", n))
    return tirx.Select(tirx.isnan(x), x, result)  # NaN stays NaN (the clamp would make it finite)


def sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``1 / (1 + exp(-x))``, TVM's own lowering of ``tirx.sigmoid``, with :func:`exp`."""
    return _f32(1.0) / (_f32(1.0) + exp(-x))


def _tvm_legalization(bb, call):
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _elementwise(name: str, scalar):
    def legalize(bb, call):
        data = call.args[0]
        if data.ty.dtype != "float32":
            return _tvm_legalization(bb, call)
        return bb.call_te(lambda t: te.compute(t.shape, lambda *i: scalar(t(*i)), name=name),
                          data, primfunc_name_hint=f"tir_{name}")
    return legalize


def _softmax_te(x: te.Tensor, axis: int) -> te.Tensor:
    """topi.nn.softmax's four stages (same names, so schedules see the same blocks) with :func:`exp`."""
    shape = x.shape
    k_max = te.reduce_axis((0, shape[axis]), name="k")
    k_sum = te.reduce_axis((0, shape[axis]), name="k")

    def with_axis(indices, k):
        return (*indices[:axis], k, *indices[axis:])

    def without_axis(indices):
        return tuple(v for i, v in enumerate(indices) if i != axis)

    reduced = tuple(d for i, d in enumerate(shape) if i != axis)
    max_elem = te.compute(reduced, lambda *i: te.max(x[with_axis(i, k_max)], axis=k_max),
                          name="T_softmax_maxelem")
    exps = te.compute(shape, lambda *i: exp(x[i] - max_elem[without_axis(i)]), name="T_softmax_exp")
    expsum = te.compute(reduced, lambda *i: te.sum(exps[with_axis(i, k_sum)], axis=k_sum),
                        name="T_softmax_expsum")
    return te.compute(shape, lambda *i: exps[i] / expsum[without_axis(i)], name="T_softmax_norm",
                      attrs={"axis": axis})


def _softmax(bb, call):
    data = call.args[0]
    if data.ty.dtype != "float32" or data.ty.ndim < 0:
        return _tvm_legalization(bb, call)
    axis = int(call.attrs.axis)
    return bb.call_te(_softmax_te, data, axis % data.ty.ndim, primfunc_name_hint="softmax")


def legalize_map() -> dict:
    """``LegalizeOps(customize_legalize_map=...)`` entries for float32 exp, sigmoid and softmax.

    Other dtypes (and unknown ranks) get TVM's own legalisation.
    """
    return {"relax.exp": _elementwise("exp", exp),
            "relax.sigmoid": _elementwise("sigmoid", sigmoid),
            "relax.nn.softmax": _softmax}
