"""``bitq-tvm demo``: the bundled digits CNN, FP32 vs uniform BFP8/6/4 (simulated and integer)."""

from __future__ import annotations

import argparse
import time

from ..support.tables import print_table


def add_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the bundled digits CNN: FP32 vs uniform BFP8/6/4 (simulated and integer) accuracy, size and speed")
    p.add_argument("--target", default="host", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import compile_model
    from ..deploy import compile_deployed
    from ..evaluation import argmax_agreement, stored_weight_bytes, top1, weight_bytes
    from ..frontend.onnx_model import load_onnx
    from ..models.zoo import bundled_model_path, bundled_test_data
    from ..plan import Plan

    path = bundled_model_path()
    model = load_onnx(path)
    data = bundled_test_data()
    x, y = data["x"], data["y"]
    print(f"bundled model: {path.name}, a CNN trained on scikit-learn's handwritten digits "
          f"({len(model.layers)} layers, {sum(l.params for l in model.layers):,} weights); "
          f"held-out test split: {len(x)} images", flush=True)
    rows = []
    ref_logits = None
    fallbacks = []
    runs = [(spec, "simulated") for spec in ("fp32", "bfp8_b32", "bfp6_b16", "bfp4_b16")]
    runs += [(spec, "integer") for spec in ("bfp8_b32", "bfp4_b16")]
    for spec, mode in runs:
        plan = Plan.uniform(spec)
        if mode == "integer":
            compiled = compile_deployed(model, plan, args.target, progress=None)
            report = compiled.report
            fp32, quant = report.fp32_weight_bytes, stored_weight_bytes(report)
            runs_as = f"integer BFP ({report.variant}), {len(report.integer_layers)}/{len(report.layers)} layers"
            fallbacks += [f"{spec} integer: layer '{layer}' stays float BFP simulation ({reason})"
                          for layer, reason in report.fallbacks.items()]
        else:
            compiled = compile_model(model, plan, args.target, progress=None)
            fp32, quant = weight_bytes(model, compiled.formats)
            runs_as = "TVM FP32" if spec == "fp32" else "BFP simulation (float)"
        compiled.run_batched("input", x[:8])  # warm-up: the first calls pay for thread pools and page faults
        start = time.perf_counter()
        logits = compiled.run_batched("input", x)
        per_image_ms = (time.perf_counter() - start) * 1e3 / len(x)
        if ref_logits is None:
            ref_logits = logits
        rows.append((spec, runs_as, f"{top1([logits], y) * 100:.2f}%",
                     f"{argmax_agreement([logits], [ref_logits]) * 100:.2f}%",
                     f"{quant:,}", f"{quant / fp32:.3f}x", f"{compiled.compile_seconds:.1f}", f"{per_image_ms:.3f}"))
    print(f"TVM {compiled.target.name} target ({compiled.target.llvm_target.get('mcpu', '')}); uniform BFP on every "
          "layer's weights and input activations: simulated (float kernels, weights stored dequantized) and "
          "deployed (integer kernels, packed weights as stored)")
    print_table(["format", "runs as", "top-1", "agrees w/ FP32", "weight bytes", "vs FP32", "compile s", "ms/image"],
                rows)
    for line in fallbacks:
        print(line)
    print("weight bytes: simulated rows count the bit-packed BFP size (m bits per element + E per block); "
          "integer rows the bytes the deployed library stores (fallback layers at FP32)")
    return 0
