"""Depthwise conv on BFP operands vs TVM FP32, on MobileNetV2's depthwise shapes (batch 1).

Usage::

    TVM_NUM_THREADS=2 python bench/bench_depthwise.py [--repeat 200]
    python bench/bench_depthwise.py --weight-blocks
    TVM_NUM_THREADS=2 python bench/bench_depthwise.py --tree-lanes [--repeat 300]

``--weight-blocks`` prints instead the SQNR of the corpus models' real depthwise weights at
bfp8 for the block layouts considered (one exponent per weight, blocks along channels at each
kernel offset, blocks along the KH*KW window of each channel): the measurement behind the
depthwise block layout in ``docs/design.md``.

``--tree-lanes`` times the fused kernel with its exponent-maximum tree starting at 16 lanes
(before RVV needed 8) against 8, alternating in one process: the x86 cost of one kernel for all
targets.

Contenders, each the one kernel of a layer (no quantizer: in a deployed chain the producing
layer's fused epilogue writes the BFP input):

- ``TVM FP32``: the layer as the FP32 deployment compiles it (one depthwise Conv ONNX model,
  ``compile_model`` with no plan, our CPU schedules), called through the Relax VM on a device
  tensor (the VM allocates its output);
- ``BFP dw``: :func:`bitq_tvm.kernels.bfp_depthwise.bfp_depthwise_func` (int8 NHWC mantissas +
  exponents in, float32 out), and ``+ epilogue``: with bias, ReLU6 and quantization to bfp8_b32
  fused (int8 out).

Both are TVM on the same threads, so they share one process; timings are medians of
``--repeat`` calls, the contenders alternating call by call; ratios are from the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

# MobileNetV2 (224x224) depthwise convs: channels, input size, stride.
SHAPES = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2), (384, 14, 1),
          (576, 14, 1), (576, 14, 2), (960, 7, 1)]


def _median_ms(fns, repeat: int) -> list[float]:
    """Median ms of each of ``fns``, called in turn (alternating, so drift hits all alike)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]


def _fp32_layer(channels: int, size: int, stride: int, workdir: str):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bitq_tvm.api import compile_model
    from bitq_tvm.frontend.onnx_model import load_onnx

    rng = np.random.default_rng(channels)
    w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=channels, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                            strides=[stride, stride])
    out = -(-size // stride)
    graph = helper.make_graph([node], "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])],
                              [numpy_helper.from_array(w, "w")])
    path = f"{workdir}/dw_{channels}_{size}_{stride}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    import tvm
    from tvm import relax

    compiled = compile_model(load_onnx(path), None, "host", progress=None)
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    x = tvm.runtime.tensor(rng.standard_normal((1, channels, size, size)).astype(np.float32), tvm.cpu())
    main = vm["main"]
    return lambda: main(x), w  # input already on the device: no NumPy conversion in the timing


def _bfp_layer(channels: int, size: int, stride: int, w: np.ndarray, fused: bool):
    import tvm

    from bitq_tvm.formats import get_format, quantize_np
    from bitq_tvm.kernels.bfp_conv import ConvGeometry
    from bitq_tvm.kernels.contract import depthwise_activation_format, padded
    from bitq_tvm.kernels.bfp_depthwise import bfp_depthwise_func, pack_depthwise_weights
    from bitq_tvm.kernels.bfp_matmul import Epilogue
    from bitq_tvm.targets.presets import get_target

    fmt = get_format("bfp8_b32")
    geom = ConvGeometry(1, channels, size, size, channels, (3, 3), (stride, stride), (1, 1, 1, 1), (1, 1), channels)
    epilogue = Epilogue(fmt, ("clip", ("add", ("x",), ("bias", 0)), 0.0, 6.0)) if fused else None
    func = bfp_depthwise_func(geom, fmt, fmt, epilogue)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=get_target("host").tvm_target())
    rng = np.random.default_rng(channels)
    # the contract's depthwise input: an exponent per value
    t = quantize_np(rng.standard_normal((1, size, size, channels)).astype(np.float32),
                    depthwise_activation_format(fmt), axis=-1)
    qw, ew = pack_depthwise_weights(w, fmt)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (t.mantissas.reshape(1, size, size, -1),
                                                  t.exponents.reshape(1, size, size, -1), qw, ew)]
    width = padded(channels, fmt.block_size)
    if fused:
        args.append(tvm.runtime.tensor(rng.standard_normal(channels).astype(np.float32), dev))
        outs = [tvm.runtime.tensor(np.zeros((geom.rows, width), np.int8), dev),
                tvm.runtime.tensor(np.zeros((geom.rows, width // fmt.block_size), np.int8), dev)]
    else:
        outs = [tvm.runtime.tensor(np.zeros((geom.rows, channels), np.float32), dev)]
    main = lib["main"]
    return lambda: main(*args, *outs)


def _depthwise_weights(name: str) -> list[np.ndarray]:
    """The [C, 1, KH, KW] weights of a corpus model's depthwise convs (initializers or Constant nodes)."""
    import onnx
    from onnx import numpy_helper

    from bitq_tvm.models import corpus

    proto = onnx.load(corpus.fetch(name))
    tensors = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    tensors.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    weights = [tensors.get(n.input[1]) for n in proto.graph.node if n.op_type == "Conv"]
    return [w for w in weights if w is not None and w.ndim == 4 and w.shape[1] == 1 and w.shape[0] > 1]


def weight_blocks() -> None:
    from bitq_tvm.formats import get_format
    from bitq_tvm.formats.reference import fake_quantize_np

    layouts = {
        # axis 1 of [C, 1, KH, KW] has length 1: one exponent per weight, whatever B
        "per weight": lambda w: fake_quantize_np(w, get_format("bfp8_b32"), axis=1),
        "channels B=32": lambda w: fake_quantize_np(w, get_format("bfp8_b32"), axis=0),
        "channels B=8": lambda w: fake_quantize_np(w, get_format("bfp8_b8"), axis=0),
        "window B=32": lambda w: fake_quantize_np(w.reshape(len(w), -1), get_format("bfp8_b32"), axis=1),
        "window B=8": lambda w: fake_quantize_np(w.reshape(len(w), -1), get_format("bfp8_b8"), axis=1),
    }
    print("SQNR dB of bfp8 depthwise weights, min / median over layers")
    print("| model | layers | " + " | ".join(layouts) + " |")
    print("|---|---:|" + "---|" * len(layouts))
    for name in ("pplcnet_orientation", "picodet_layout"):
        weights = _depthwise_weights(name)
        cells = []
        for quantize in layouts.values():
            sqnr = [10 * np.log10((w.astype(np.float64) ** 2).sum()
                                  / ((w - quantize(w).reshape(w.shape)).astype(np.float64) ** 2).sum())
                    for w in weights]
            cells.append(f"{min(sqnr):.1f} / {np.median(sqnr):.1f}")
        print(f"| {name} | {len(weights)} | " + " | ".join(cells) + " |")


def tree_lanes(repeat: int) -> None:
    import bitq_tvm.kernels.bfp_depthwise as depthwise

    print("| layer (C, HxW, stride) | tree from 16 lanes ms | tree from 8 lanes ms | 8 / 16 |")
    print("|---|---|---|---|")
    ratios, default = [], depthwise.TREE_LANES
    try:
        for channels, size, stride in SHAPES:
            w = np.random.default_rng(channels).standard_normal((channels, 1, 3, 3)).astype(np.float32)
            calls = []
            for lanes in (16, 8):
                depthwise.TREE_LANES = lanes
                calls.append(_bfp_layer(channels, size, stride, w, fused=True))
            t16, t8 = _median_ms(calls, repeat)
            ratios.append(t8 / t16)
            print(f"| {channels}, {size}x{size}, s{stride} | {t16:.4f} | {t8:.4f} | {t8 / t16:.2f}x |", flush=True)
    finally:
        depthwise.TREE_LANES = default
    print(f"\ngeometric mean (8 / 16): {float(np.exp(np.mean(np.log(ratios)))):.3f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--weight-blocks", action="store_true", help="SQNR of block layouts on real weights")
    parser.add_argument("--tree-lanes", action="store_true", help="fused kernel: max tree from 16 vs 8 lanes")
    args = parser.parse_args(argv)
    if args.tree_lanes:
        tree_lanes(args.repeat)
        return 0
    if args.weight_blocks:
        weight_blocks()
        return 0
    print("| layer (C, HxW, stride) | TVM FP32 ms | BFP dw ms | + epilogue ms | BFP dw / FP32 | + epilogue / FP32 |")
    print("|---|---|---|---|---|---|")
    ratios = []
    with tempfile.TemporaryDirectory() as workdir:
        for channels, size, stride in SHAPES:
            fp32, w = _fp32_layer(channels, size, stride, workdir)
            plain = _bfp_layer(channels, size, stride, w, fused=False)
            fused = _bfp_layer(channels, size, stride, w, fused=True)
            t_fp32, t_plain, t_fused = _median_ms([fp32, plain, fused], args.repeat)
            ratios.append(t_fused / t_fp32)
            print(f"| {channels}, {size}x{size}, s{stride} | {t_fp32:.3f} | {t_plain:.3f} | {t_fused:.3f} | "
                  f"{t_plain / t_fp32:.2f}x | {t_fused / t_fp32:.2f}x |", flush=True)
    print(f"\ngeometric mean (+ epilogue / FP32): {float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
