"""The depthwise BFP kernel against the exact float convolution of its dequantized operands, and
its fused epilogue against the NumPy reference quantizer."""

import numpy as np
import pytest
import tvm

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import get_format, quantize_np
from bitq_tvm.kernels.bfp_conv import ConvGeometry
from bitq_tvm.kernels.bfp_depthwise import bfp_depthwise_func, pack_depthwise_weights
from bitq_tvm.kernels.bfp_matmul import Epilogue
from bitq_tvm.kernels.contract import depthwise_activation_format
from bitq_tvm.kernels.oracle import bfp_depthwise_ref, bfp_depthwise_tolerance
from bitq_tvm.targets import export, get_target, run_kernel_emulated

HOST = get_target("host").tvm_target()  # the vector width users get (AVX-512 or AVX2 here)


def _operands(geom, fmt_a, fmt_w, rng):
    x = rng.standard_normal((geom.batch, geom.height, geom.width, geom.channels)).astype(np.float32)
    x *= np.exp2(rng.integers(-6, 6, geom.channels)).astype(np.float32)  # channels of different ranges
    t = quantize_np(x, depthwise_activation_format(fmt_a), axis=-1)  # an exponent per value
    qa = t.mantissas.reshape(x.shape)
    ea = t.exponents.reshape(x.shape)
    w = rng.standard_normal((geom.channels, 1, *geom.kernel)).astype(np.float32)
    qw, ew = pack_depthwise_weights(w, fmt_w)
    return qa, ea, qw, ew


def _run(func, args, out_shapes):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    dev = tvm.cpu()
    nd_args = [tvm.runtime.tensor(a, dev) for a in args]
    outs = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in out_shapes]
    lib["main"](*nd_args, *outs)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("batch,channels,size,kernel,stride,pad,fmt_a,fmt_w", [
    (1, 32, 9, 3, 1, 1, "bfp8_b32", "bfp8_b32"),
    (4, 48, 8, 3, 2, 1, "bfp6_b16", "bfp4_b16"),   # batch 4, stride 2, different mantissa widths
    (1, 40, 7, 5, 1, 2, "bfp8_b32", "bfp8_b32"),   # 40 channels, 5x5
    (2, 24, 6, 3, 1, 0, "bfp2_b8", "bfp8_b8"),
])
def test_depthwise_matches_exact_conv(batch, channels, size, kernel, stride, pad, fmt_a, fmt_w):
    fa, fw = get_format(fmt_a), get_format(fmt_w)
    geom = ConvGeometry(batch, channels, size, size, channels, (kernel, kernel), (stride, stride), (pad,) * 4,
                        (1, 1), channels)
    qa, ea, qw, ew = _operands(geom, fa, fw, np.random.default_rng(channels + size))
    (out,) = _run(bfp_depthwise_func(geom, fa, fw), [qa, ea, qw, ew], [((geom.rows, channels), "float32")])
    exact, magnitude = bfp_depthwise_ref(qa, ea, qw, ew, geom, fa.mantissa_bits, fw.mantissa_bits)
    error = np.abs(out.astype(np.float64) - exact)
    assert (error <= bfp_depthwise_tolerance(magnitude, kernel * kernel)).all(), error.max()
    assert np.abs(exact).max() > 0


@pytest.mark.parametrize("fmt_name", ["bfp8_b32", "bfp4_b8"])
def test_packed_weights_have_one_exponent_per_channel(fmt_name):
    """Each channel's window is one block: a channel 2**-12 times smaller than its neighbours keeps
    its own m-bit precision (blocks across channels would flush it to zero)."""
    fmt = get_format(fmt_name)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 1, 3, 3)).astype(np.float32)
    w[1] *= np.float32(2.0 ** -12)
    qw, ew = pack_depthwise_weights(w, fmt)
    assert qw.shape == (9, 12) and ew.shape == (12,)
    values = np.ldexp(qw.astype(np.float64), ew.astype(np.int64) - fmt.scale_shift).T.reshape(w.shape)
    step = np.exp2(ew.astype(np.float64) - fmt.scale_shift).reshape(12, 1, 1, 1)
    # within one step of the channel's own scale (half a step, or one where the block max saturates)
    assert (np.abs(values - w) <= step).all()
    assert np.abs(values[1]).max() > 0.5 * np.abs(w[1]).max()


def test_channels_that_are_no_multiple_of_the_block():
    fmt = get_format("bfp8_b32")  # 48 channels: one and a half blocks of the layer's format
    geom = ConvGeometry(1, 48, 8, 8, 48, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 48)
    qa, ea, qw, ew = _operands(geom, fmt, fmt, np.random.default_rng(3))
    assert qa.shape[-1] == ea.shape[-1] == 48 and qw.shape == (9, 48)
    (out,) = _run(bfp_depthwise_func(geom, fmt, fmt), [qa, ea, qw, ew], [((geom.rows, 48), "float32")])
    exact, magnitude = bfp_depthwise_ref(qa, ea, qw, ew, geom, 8, 8)
    assert (np.abs(out - exact) <= bfp_depthwise_tolerance(magnitude, 9)).all()


@pytest.mark.parametrize("channels", [64, 40])  # 40: the next format pads to 48 (masked columns)
def test_fused_epilogue_quantizes_like_the_reference(channels):
    """bias + ReLU6 + quantization to the next layer's format in the kernel == the reference
    quantizer applied to the unfused kernel's float output (same float32 ops)."""
    fmt, out_fmt = get_format("bfp8_b32"), get_format("bfp4_b16")
    geom = ConvGeometry(1, channels, 10, 10, channels, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), channels)
    rng = np.random.default_rng(5)
    qa, ea, qw, ew = _operands(geom, fmt, fmt, rng)
    bias = rng.standard_normal(channels).astype(np.float32)
    (plain,) = _run(bfp_depthwise_func(geom, fmt, fmt), [qa, ea, qw, ew], [((geom.rows, channels), "float32")])
    epilogue = Epilogue(out_fmt, ("clip", ("add", ("x",), ("bias", 0)), 0.0, 6.0))
    width = -(-channels // 16) * 16
    q, e = _run(bfp_depthwise_func(geom, fmt, fmt, epilogue), [qa, ea, qw, ew, bias],
                [((geom.rows, width), "int8"), ((geom.rows, width // 16), "int8")])
    expected = quantize_np(np.clip(plain + bias, 0.0, 6.0).astype(np.float32), out_fmt, axis=-1)
    np.testing.assert_array_equal(e, expected.exponents.reshape(geom.rows, -1))
    np.testing.assert_array_equal(q, expected.mantissas.reshape(geom.rows, -1))


@pytest.mark.parametrize("batch,channels,size,stride,out_name", [
    (2, 64, 9, 2, "bfp4_b16"),    # tasks of row bands x channel groups, two images
    (1, 144, 12, 1, "bfp8_b32"),  # padded output columns (144 -> 160) with many channel vectors
    (1, 96, 1, 1, "bfp8_b32"),    # a one-pixel output row (MobileNetV2 at 32x32): no pixel loop
    (2, 96, 2, 2, "bfp8_b32"),    # the same at stride 2, two images
    (1, 64, 9, 1, "bfp8_b1"),     # into another depthwise conv: an exponent per value
])
def test_fused_epilogue_other_task_shapes(batch, channels, size, stride, out_name):
    fmt, out_fmt = get_format("bfp8_b32"), get_format(out_name)
    geom = ConvGeometry(batch, channels, size, size, channels, (3, 3), (stride, stride), (1, 1, 1, 1), (1, 1),
                        channels)
    rng = np.random.default_rng(7)
    qa, ea, qw, ew = _operands(geom, fmt, fmt, rng)
    bias = rng.standard_normal(channels).astype(np.float32)
    (plain,) = _run(bfp_depthwise_func(geom, fmt, fmt), [qa, ea, qw, ew], [((geom.rows, channels), "float32")])
    exact, magnitude = bfp_depthwise_ref(qa, ea, qw, ew, geom, 8, 8)
    assert (np.abs(plain - exact) <= bfp_depthwise_tolerance(magnitude, 9)).all()
    epilogue = Epilogue(out_fmt, ("clip", ("add", ("x",), ("bias", 0)), 0.0, 6.0))
    block = out_fmt.block_size
    width = -(-channels // block) * block
    q, e = _run(bfp_depthwise_func(geom, fmt, fmt, epilogue), [qa, ea, qw, ew, bias],
                [((geom.rows, width), "int8"), ((geom.rows, width // block), "int8")])
    expected = quantize_np(np.clip(plain + bias, 0.0, 6.0).astype(np.float32), out_fmt, axis=-1)
    np.testing.assert_array_equal(e, expected.exponents.reshape(geom.rows, -1))
    np.testing.assert_array_equal(q, expected.mantissas.reshape(geom.rows, -1))


def test_rejects_what_is_not_depthwise():
    fmt = get_format("bfp8_b32")
    grouped = ConvGeometry(1, 32, 8, 8, 32, (3, 3), (1, 1), (1,) * 4, (1, 1), 8)
    with pytest.raises(BitqError, match="depthwise"):
        bfp_depthwise_func(grouped, fmt, fmt)
    with pytest.raises(BitqError, match="2 outputs per channel"):
        bfp_depthwise_func(ConvGeometry(1, 32, 8, 8, 64, (3, 3), (1, 1), (1,) * 4, (1, 1), 32), fmt, fmt)
    with pytest.raises(BitqError, match="multiples of 8"):
        bfp_depthwise_func(ConvGeometry(1, 12, 8, 8, 12, (3, 3), (1, 1), (1,) * 4, (1, 1), 12), fmt, fmt)
    with pytest.raises(BitqError, match=r"\[C, 1, KH, KW\]"):
        pack_depthwise_weights(np.zeros((32, 2, 3, 3), np.float32), fmt)


@pytest.mark.parametrize("preset_name,fused", [("cortex-a76", False), ("cortex-a76", True),
                                                ("rv64gcv-vlen128", False)])
def test_depthwise_on_emulated_arm_and_riscv(preset_name, fused, tmp_path):
    """Cross-compiled for the preset and run under qemu-user (the RVV case without the quantizing
    epilogue: qemu-riscv64 7.2 aborts on RVV round-to-nearest, see docs/tvm-0.27-notes.md).
    Fused: bit-equal to the reference quantizer of the same ISA's unfused output."""
    preset = get_target(preset_name)
    fmt = get_format("bfp8_b16")
    geom = ConvGeometry(1, 40, 7, 7, 40, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 40)
    rng = np.random.default_rng(11)
    qa, ea, qw, ew = _operands(geom, fmt, fmt, rng)
    bias = rng.standard_normal(40).astype(np.float32)

    def emulated(epilogue, args, outs, name):
        func = bfp_depthwise_func(geom, fmt, fmt, epilogue).with_attr("global_symbol", "bfp_depthwise")
        library = export(tvm.compile(func, preset.tvm_target()), tmp_path / f"{name}.so", preset)
        return run_kernel_emulated(library, "bfp_depthwise", args, outs, preset, cache_dir=tmp_path)

    (out,) = emulated(None, [qa, ea, qw, ew], [((geom.rows, 40), "float32")], "plain")
    exact, magnitude = bfp_depthwise_ref(qa, ea, qw, ew, geom, 8, 8)
    assert (np.abs(out - exact) <= bfp_depthwise_tolerance(magnitude, 9)).all()
    if fused:
        epilogue = Epilogue(fmt, ("relu", ("add", ("x",), ("bias", 0))))
        q, e = emulated(epilogue, [qa, ea, qw, ew, bias], [((geom.rows, 48), "int8"), ((geom.rows, 3), "int8")],
                        "fused")
        expected = quantize_np(np.maximum(out + bias, 0.0).astype(np.float32), fmt, axis=-1)
        np.testing.assert_array_equal(q, expected.mantissas.reshape(geom.rows, -1))
        np.testing.assert_array_equal(e, expected.exponents.reshape(geom.rows, -1))


@pytest.mark.parametrize("preset_name", ["rv64gcv-vlen128", "rv64gcv-vlen256", "cortex-a76"])
@pytest.mark.parametrize("channels,size", [(64, 4), (96, 1)])
def test_fused_depthwise_builds_for_every_vector_isa(preset_name, channels, size):
    """16-channel vectors with the quantizing epilogue, and a one-pixel output row, build for each
    ISA (RVV lost the block-maximum tree's buffer at 16 lanes; MobileNetV2 did not deploy there).
    Build only: qemu-riscv64 7.2 aborts on RVV round-to-nearest (the emulated test above runs ARM)."""
    fmt = get_format("bfp8_b32")
    geom = ConvGeometry(1, channels, size, size, channels, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), channels)
    epilogue = Epilogue(fmt, ("clip", ("add", ("x",), ("bias", 0)), 0.0, 6.0))
    func = bfp_depthwise_func(geom, fmt, fmt, epilogue).with_attr("global_symbol", "bfp_depthwise")
    assert tvm.compile(func, get_target(preset_name).tvm_target()) is not None
