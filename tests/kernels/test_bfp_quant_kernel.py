"""The TIR BFP fake-quant kernel against the NumPy reference, bit for bit.

Each case compiles one kernel (the expensive step) and feeds it one tensor stacking many
properties: every row (all elements sharing the indices off the blocked axis) gets its own kind of
data, so zero blocks, subnormals, huge values, exact powers of two and rounding ties all pass
through every compiled kernel. Tolerance everywhere: none (float32 bit patterns compared).
"""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import PRESETS, BFPFormat, Rounding, fake_quantize_np
from bitq_tvm.kernels.bfp_quant import bfp_fake_quant_func, bfp_fake_quant_name

# The contract maps x near -float32 max to q = qmin, s = 2**(129 - m): q * s = -2**128 = -inf.
# The stress tensor's huge rows hit that on purpose (the kernel must agree); NumPy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")

LLVM = tvm.target.Target({"kind": "llvm"})
ROW_KINDS = 8


def _row(kind: int, length: int, fmt: BFPFormat, rng: np.random.Generator) -> np.ndarray:
    """One row of the stress tensor; `kind` picks which property it exercises."""
    m = fmt.mantissa_bits
    if kind == 0:  # ordinary data of one random magnitude
        return rng.standard_normal(length) * 10.0 ** rng.uniform(-3, 3)
    if kind == 1:  # zero blocks
        return np.zeros(length)
    if kind == 2:  # subnormals, a few tiny normals among them
        row = rng.standard_normal(length) * 2.0**-140
        row[rng.random(length) < 0.2] *= 2.0**20
        return row
    if kind == 3:  # huge values: clamp at emax for small E, exponent field 254 for E = 8
        return rng.uniform(-3.4e38, 3.4e38, length)
    if kind == 4:  # exact powers of two over the whole float32 range, subnormal ones included
        return rng.choice([-1.0, 1.0], length) * 2.0 ** rng.integers(-149, 128, length)
    if kind == 5:  # mixed magnitudes within a block
        return rng.standard_normal(length) * 2.0 ** rng.integers(-30, 30, length)
    # kinds 6, 7: ties, x / s = n + 0.5 for a shared scale; even positions hold the largest
    # mantissas so that every block of 2+ elements has its exponent at e and its ties intact
    e = int(rng.integers(-20, 20)) if kind == 6 else fmt.emin
    scale = 2.0 ** (e - (m - 2))
    low = np.where(np.arange(length) % 2 == 0, 2 ** (m - 2), 0)
    n = rng.integers(low, 2 ** (m - 1))
    return rng.choice([-1.0, 1.0], length) * (n + 0.5) * scale


def _stress_input(shape, axis: int, fmt: BFPFormat, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    moved = shape[:axis] + shape[axis + 1 :] + (shape[axis],)
    rows = np.stack(
        [_row(r % ROW_KINDS, shape[axis], fmt, rng) for r in range(int(np.prod(moved[:-1])))]
    )
    return np.moveaxis(rows.reshape(moved).astype(np.float32), -1, axis)


def _run(func: tirx.PrimFunc, x: np.ndarray) -> np.ndarray:
    executable = tvm.compile(func.with_attr("global_symbol", "main"), target=LLVM)
    y = tvm.runtime.tensor(np.full_like(x, np.nan))
    executable["main"](tvm.runtime.tensor(x), y)
    return y.numpy()


def _check(shape, fmt: BFPFormat, axis: int, groups: int = 1, x: np.ndarray | None = None):
    if x is None:
        x = _stress_input(shape, axis % len(shape), fmt)
    got = _run(bfp_fake_quant_func(shape, fmt, axis, groups), x)
    want = fake_quantize_np(x, fmt, axis=axis, groups=groups)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    return got


CASES = [
    # every preset, strided axis of length 100: ragged for B = 16 and 32
    *[pytest.param((3, 100, 5), fmt, 1, 1, id=f"preset-{name}") for name, fmt in PRESETS.items()],
    # every mantissa width, contiguous axis, ragged (36 = 4 * 8 + 4)
    *[pytest.param((16, 36), BFPFormat(m, 8), -1, 1, id=f"m{m}") for m in range(2, 9)],
    # every block size on the last axis (200: exact for B = 1, 8; ragged for 16..128)
    *[
        pytest.param((8, 200), BFPFormat(5, b), 1, 1, id=f"b{b}-last")
        for b in (1, 8, 16, 32, 64, 128)
    ],
    # axis 0 of a matrix, and a block bigger than the whole axis
    pytest.param((64, 8), BFPFormat(8, 16), 0, 1, id="axis0"),
    pytest.param((40, 8), BFPFormat(8, 64), 0, 1, id="axis0-block-longer-than-axis"),
    # groups: blocks restart at each group boundary; even and ragged segments, strided and last
    pytest.param((2, 48, 4), BFPFormat(6, 8), 1, 3, id="groups3-even"),
    pytest.param((2, 60, 4), BFPFormat(6, 8), 1, 3, id="groups3-ragged"),
    pytest.param((2, 48, 4), BFPFormat(6, 32), 1, 3, id="groups3-block-longer-than-segment"),
    pytest.param((8, 40), BFPFormat(4, 8), -1, 4, id="groups4-last-ragged"),
    pytest.param((12, 9), BFPFormat(8, 2), 0, 4, id="groups4-axis0"),
    # NCHW activation with a last dim that splits into chunks, and a prime one
    pytest.param((2, 40, 3, 300), PRESETS["bfp8_b32"], 1, 1, id="nchw-chunked"),
    pytest.param((1, 24, 5, 7), PRESETS["bfp8_b16"], 1, 1, id="nchw-prime-width"),
    # few exponent bits: clamping at emin and emax
    pytest.param((16, 64), BFPFormat(8, 16, exponent_bits=4), -1, 1, id="e4"),
    pytest.param((16, 40, 2), BFPFormat(4, 16, exponent_bits=2), 1, 1, id="e2"),
    pytest.param((16, 64), BFPFormat(6, 32, exponent_bits=5), 0, 1, id="e5-axis0"),
    # stochastic rounding, two seeds (the largest makes seed * golden ratio wrap around 2**32),
    # contiguous even blocks and strided ragged ones
    pytest.param((16, 96), BFPFormat(4, 32, rounding=Rounding.STOCHASTIC, seed=7), -1, 1, id="sr7"),
    pytest.param(
        (2, 40, 3, 4),
        BFPFormat(6, 16, rounding=Rounding.STOCHASTIC, seed=2**32 - 1),
        1,
        2,
        id="sr-max-seed-groups",
    ),
]


@pytest.mark.parametrize("shape, fmt, axis, groups", CASES)
def test_kernel_matches_reference_bit_for_bit(shape, fmt, axis, groups):
    _check(shape, fmt, axis, groups)


def test_stress_input_holds_every_kind_of_data():
    # guards the cases above against a stress tensor that lost a property
    fmt = BFPFormat(8, 8)
    x = _stress_input((ROW_KINDS, 64), 1, fmt)
    finfo = np.finfo(np.float32)
    assert np.all(x[1] == 0)
    assert np.any((x[2] != 0) & (np.abs(x[2]) < finfo.tiny))
    assert np.abs(x[3]).max() > 2.0**126
    mantissa, _ = np.frexp(x[4])
    assert np.all(np.abs(mantissa) == 0.5)
    for tie_row in (6, 7):
        e = np.frexp(np.abs(x[tie_row]).max())[1] - 1
        scaled = x[tie_row] / 2.0 ** (e - (fmt.mantissa_bits - 2))
        assert np.all(np.abs(scaled) % 1 == 0.5)


def test_nearest_is_half_to_even_and_negative_zero_becomes_zero():
    # Independent of the reference: bfp8 block with max 1.0 -> e = 0, s = 2**-6
    s = 2.0**-6
    x = np.array([[1, 2.5 * s, 3.5 * s, -2.5 * s, 0.5 * s, -0.5 * s, -0.25 * s, 126.5 * s]], "f4")
    got = _check(x.shape, BFPFormat(8, 8), -1, x=x)
    want = np.array([[1.0, 2 * s, 4 * s, -2 * s, 0.0, 0.0, 0.0, 126 * s]], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("exponent_bits", [2, 3, 4, 5, 6, 7, 8])
def test_subnormal_and_tiny_blocks_clamp_to_emin(exponent_bits):
    # blocks whose max is subnormal, the smallest normal, or a tiny normal, for every E
    fmt = BFPFormat(8, 4, exponent_bits=exponent_bits)
    tiny = np.finfo(np.float32).tiny
    x = np.array(
        [[2.0**-149, 0, 0, 0], [-tiny, tiny / 2, 2.0**-140, 0], [3 * 2.0**-130, 0, 0, 0],
         [2.0 ** (fmt.emin - 1), 2.0**fmt.emin, 0, 0]],
        np.float32,
    )
    _check(x.shape, fmt, -1, x=x)


@pytest.mark.parametrize("shape, axis", [((1, 64, 56, 56), 1), ((256, 1024), 1)])
def test_function_is_parallel_vectorized_scheduled_and_unnamed(shape, axis):
    func = bfp_fake_quant_func(shape, PRESETS["bfp8_b32"], axis)
    kinds = []
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda loop: kinds.append(loop.kind))])
    assert tirx.ForKind.PARALLEL in kinds
    assert tirx.ForKind.VECTORIZED in kinds
    assert func.attrs["tirx.is_scheduled"]  # the name TVM 0.27 dlight checks
    assert "global_symbol" not in func.attrs
    assert [tuple(param.ty.shape) for param in func.params] == [shape] * 2


def test_name_is_deterministic():
    fmt = PRESETS["bfp8_b32"]
    assert bfp_fake_quant_name(fmt, 1, 1) == "bfp_fq_bfp8_b32_a1_g1"
    assert bfp_fake_quant_name(fmt, 1, 1) == bfp_fake_quant_name(BFPFormat(8, 32), 1, 1)
    names = {
        bfp_fake_quant_name(f, a, g)
        for f in (fmt, BFPFormat(8, 32, rounding=Rounding.STOCHASTIC, seed=3))
        for a in (0, 1, -1)
        for g in (1, 2)
    }
    assert len(names) == 12


def test_relax_call_tir_and_fold_constant():
    # weights: FoldConstant evaluates the kernel at compile time; activations: call_tir at run time
    fmt = PRESETS["bfp4_b16"]
    weight = _stress_input((8, 48), 1, fmt, seed=1)
    act = _stress_input((4, 48, 3), 1, fmt, seed=2)
    weight_func = bfp_fake_quant_name(fmt, 1, 1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(act.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            fq_w = bb.add_func(bfp_fake_quant_func(weight.shape, fmt, 1), weight_func)
            fq_x = bb.add_func(bfp_fake_quant_func(act.shape, fmt, 1), "fq_act")
            weight_type = relax.TensorType(weight.shape, "float32")
            w = bb.emit(relax.call_tir(fq_w, [relax.const(weight)], weight_type))
            a = bb.emit(relax.call_tir(fq_x, [x], relax.TensorType(act.shape, "float32")))
            out = bb.emit_output(relax.Tuple([a, w]))
        bb.emit_func_output(out)
    mod = relax.transform.FoldConstant()(bb.get())
    called = [
        binding.value.args[0].name_hint
        for binding in mod["main"].body.blocks[0].bindings
        if isinstance(binding.value, relax.Call) and binding.value.op.name == "relax.call_tir"
    ]
    assert called == ["fq_act"]  # the weight's call was evaluated away
    vm = relax.VirtualMachine(tvm.compile(mod, target=LLVM), tvm.cpu())
    got_act, got_weight = (t.numpy() for t in vm["main"](tvm.runtime.tensor(act)))
    for got, source in ((got_act, act), (got_weight, weight)):
        want = fake_quantize_np(source, fmt, axis=1)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    "shape, axis, groups, dtype, culprit",
    [
        ((4, 6), 2, 1, "float32", "axis"),
        ((4, 6), 1, 4, "float32", "groups"),
        ((4, 6), 1, 1, "float16", "dtype"),
        ((4, 0), 1, 1, "float32", "shape"),
    ],
)
def test_bad_arguments_raise_bitq_error(shape, axis, groups, dtype, culprit):
    with pytest.raises(BitqError, match=culprit):
        bfp_fake_quant_func(shape, PRESETS["bfp8_b32"], axis, groups, dtype)
