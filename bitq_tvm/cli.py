"""The ``bitq-tvm`` command: inspect, plan, tune, compile, eval, demo, zoo, targets, emulator.

User errors (:class:`~bitq_tvm.errors.BitqError`) print one line ``bitq-tvm: error: ...`` and
exit with status 2; nothing is written half-way (outputs are written to a temporary file and
renamed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .errors import BitqError
from .formats import PRESETS
from .outputs import check_output_dir, check_output_path  # noqa: F401 - used by cli_plan too

EXIT_USER_ERROR = 2


def _print_table(headers, rows, out=None) -> None:
    """A GitHub-flavoured markdown table: readable in a terminal and pasteable into docs."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |", file=out)
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin an input's shape (repeat per input; NAME: may be left out for a single input)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--format", metavar="FORMAT",
                   help=f"one BFP format for every layer: {', '.join(PRESETS)}, any bfp{{m}}_b{{B}}[_e{{E}}] or fp32")
    g.add_argument("--plan", metavar="PLAN.json", help="per-layer formats (a plan file from `bitq-tvm plan`)")
    p.add_argument("--target", default="host", help="target preset (see `bitq-tvm targets`); default: host")


def _require_layers(model, args) -> None:
    """A command that quantizes needs at least one BFP layer, else its result means nothing."""
    from .frontend.onnx_model import LAYER_OPS

    if model.layers:
        return
    wants_bfp = getattr(args, "command", None) in ("plan", "eval") or getattr(args, "plan", None) is not None \
        or getattr(args, "format", None) is not None or getattr(args, "deploy", False)
    if not wants_bfp:
        return
    skipped = [f"{n.op_type} '{n.name or n.output[0]}'" for n in model.proto.graph.node if n.op_type in LAYER_OPS]
    why = (f"; skipped: {', '.join(skipped[:4])} (BFP takes Conv 2-D and MatMul/Gemm with a constant 2-D weight)"
           if skipped else "")
    raise BitqError(f"{model.path}: no layer BFP can quantize{why}")


def _load_model(args):
    from .frontend.onnx_model import load_onnx, parse_input_shapes

    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    _require_layers(model, args)
    return model


def _load_plan(args):
    from .plan import Plan

    if getattr(args, "plan", None) is not None:
        return Plan.load(args.plan)
    if getattr(args, "format", None) is not None:
        if not args.format.strip():
            raise BitqError("--format '': empty; give a format such as bfp8_b32, or fp32")
        return Plan.uniform(args.format)
    return None


def weight_bytes(model, formats) -> tuple[int, int]:
    """(FP32 bytes, bytes under ``formats``) of the model's layer weights.

    BFP bytes count m bits per element plus E bits per block, bit-packed; the zero padding of
    ragged blocks is not stored (kernels re-create it), so a 3-channel conv is not charged for 32.
    """
    fp32 = quant = 0
    for layer in model.layers:
        fp32 += 4 * layer.params
        fmt = formats[layer.name].weight if layer.name in formats else None
        if fmt is None:
            quant += 4 * layer.params
        else:
            blocks = layer.params // layer.reduction * fmt.num_blocks(layer.reduction)
            quant += -(-(layer.params * fmt.mantissa_bits + blocks * fmt.exponent_bits) // 8)
    return fp32, quant


def cmd_inspect(args) -> int:
    model = _load_model(args)
    print(f"{model.path}: inputs {', '.join(f'{k} {list(v)}' for k, v in model.input_shapes.items())}")
    rows = [(layer.name, layer.onnx_op + (f" g={layer.groups}" if layer.groups > 1 else ""), list(layer.weight_shape),
             list(layer.input_shape), list(layer.output_shape), layer.reduction, f"{layer.macs:,}", f"{layer.params:,}")
            for layer in model.layers]
    _print_table(["layer", "op", "weight", "input", "output", "K", "MACs", "params"], rows)
    print(f"{len(model.layers)} layers, {sum(l.macs for l in model.layers):,} MACs, "
          f"{sum(l.params for l in model.layers):,} weight parameters")
    return 0


def cmd_compile(args) -> int:
    from .api import compile_model

    from .solver.cli_plan import plan_for_compile

    out = args.output or os.path.splitext(os.path.basename(args.model))[0] + ".so"
    check_output_path(out, "-o")
    model = _load_model(args)
    plan_given = _load_plan(args)  # a bad --plan/--format fails before the planner runs
    planned = plan_for_compile(args)
    if args.tuning_db and not (args.deploy or planned):
        raise BitqError("--tuning-db feeds the planner (--budget/--lambda/--size-budget) and the integer kernels "
                        "(--deploy); give one of them")
    plan = planned or plan_given
    if args.deploy:
        from .deploy import cmd_compile_deploy

        return cmd_compile_deploy(args, model, plan)
    compiled = compile_model(model, plan, args.target)
    compiled.export_library(out)
    fp32, quant = weight_bytes(model, compiled.formats)
    sizes = (f"; packed BFP weights would take {quant:,} B vs {fp32:,} B FP32 = {quant / fp32:.3f}x" if fp32
             else "; the model has no BFP layers: FP32 throughout")
    print(f"wrote {out} (target {compiled.target.name}; BFP simulation: weights quantized at compile time and "
          f"stored dequantized, activations quantized at run time{sizes})")
    return 0


def _load_data(path, model):
    if not os.path.isfile(path):
        raise BitqError(f"{path}: no such data file")
    try:
        data = dict(np.load(path))
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad files
        raise BitqError(f"{path}: not a readable .npz file ({err})") from None
    names = list(model.input_shapes)
    if len(names) == 1 and names[0] not in data:
        if "x" not in data:
            raise BitqError(f"{path}: no array named '{names[0]}' or 'x' for the model's input")
        data[names[0]] = data["x"]
    for name in names:
        if name not in data:
            raise BitqError(f"{path}: no array for model input '{name}' (arrays: {sorted(data)})")
        if tuple(data[name].shape[1:]) != tuple(model.input_shapes[name][1:]):
            raise BitqError(f"{path}: array '{name}' has samples of shape {list(data[name].shape[1:])}, "
                            f"model input '{name}' takes {list(model.input_shapes[name][1:])}")
    return data


def evaluate(model, plan, data, target="host", limit=None, progress=True, deploy=False, remote=None) -> dict:
    """FP32 vs BFP outputs of ``model`` on ``data`` (top-1 when labels ``y`` are present).

    ``deploy`` evaluates the integer BFP deployment instead of the simulation; ``remote`` maps a
    compiled model to a runner on a device (``--rpc``/``--tracker``), or None to run on the host.
    """
    from .api import _progress, compile_model

    if len(model.input_shapes) != 1:
        raise BitqError(f"{model.path}: eval supports single-input models (this one has {list(model.input_shapes)})")
    name = next(iter(model.input_shapes))
    x = data[name][:limit]
    results = {}
    report = _progress if progress else None
    for label, p in (("fp32", None), ("bfp", plan)):
        if label == "bfp" and deploy:
            from .deploy import compile_deployed

            compiled = compile_deployed(model, p, target, progress=report)
        else:
            compiled = compile_model(model, p, target, progress=report)
        device = remote(compiled) if remote else None
        try:
            start = time.perf_counter()
            results[label] = (device or compiled).run_batched(name, x).astype(np.float64)
            results[label + "_seconds"] = time.perf_counter() - start
        finally:
            if device is not None:
                device.close()  # TVM's RPC server serves one session at a time
        results[label + "_formats"] = compiled.formats
    ref, out = results["fp32"], results["bfp"]
    flat_ref, flat_out = ref.reshape(len(x), -1), out.reshape(len(x), -1)
    stats = {
        "samples": len(x),
        "argmax_agreement": float((flat_ref.argmax(1) == flat_out.argmax(1)).mean()),
        "rel_l2_error": float(np.linalg.norm(flat_out - flat_ref) / max(np.linalg.norm(flat_ref), 1e-30)),
        "max_abs_diff": float(np.abs(flat_out - flat_ref).max()),
        "fp32_seconds": results["fp32_seconds"], "bfp_seconds": results["bfp_seconds"],
    }
    if "y" in data:
        y = np.asarray(data["y"][:limit]).reshape(-1)
        stats["fp32_top1"] = float((flat_ref.argmax(1) == y).mean())
        stats["bfp_top1"] = float((flat_out.argmax(1) == y).mean())
    stats["weight_bytes"] = weight_bytes(model, results["bfp_formats"])
    return stats


def cmd_eval(args) -> int:
    model = _load_model(args)
    plan = _load_plan(args)
    if plan is None:
        raise BitqError("eval: give --format or --plan (the BFP side of the comparison)")
    from .targets.cli_remote import remote_runner

    stats = evaluate(model, plan, _load_data(args.data, model), args.target, args.limit, deploy=args.deploy,
                     remote=lambda compiled: remote_runner(args, compiled))
    fp32, quant = stats["weight_bytes"]
    rows = [("samples", stats["samples"])]
    if "fp32_top1" in stats:
        rows += [("top-1 FP32", f"{stats['fp32_top1']:.4f}"), ("top-1 BFP", f"{stats['bfp_top1']:.4f}")]
    rows += [("argmax agreement with FP32", f"{stats['argmax_agreement']:.4f}"),
             ("output relative L2 error", f"{stats['rel_l2_error']:.3e}"),
             ("output max |BFP - FP32|", f"{stats['max_abs_diff']:.3e}"),
             ("layer weight bytes BFP / FP32", f"{quant:,} / {fp32:,} = {quant / fp32:.3f}x")]
    _print_table(["metric", args.plan or args.format], rows)
    return 0


def cmd_demo(args) -> int:
    from .api import compile_model
    from .models.zoo import bundled_model_path, bundled_test_data
    from .frontend.onnx_model import load_onnx
    from .plan import Plan

    path = bundled_model_path()
    model = load_onnx(path)
    data = bundled_test_data()
    x, y = data["x"], data["y"]
    print(f"bundled model: {path.name}, a CNN trained on scikit-learn's handwritten digits "
          f"({len(model.layers)} layers, {sum(l.params for l in model.layers):,} weights); "
          f"held-out test split: {len(x)} images", flush=True)
    rows = []
    ref_logits = None
    for spec in ("fp32", "bfp8_b32", "bfp6_b16", "bfp4_b16"):
        plan = Plan.uniform(spec)
        compiled = compile_model(model, plan, args.target, progress=None)
        start = time.perf_counter()
        logits = compiled.run_batched("input", x)
        per_image_ms = (time.perf_counter() - start) * 1e3 / len(x)
        if ref_logits is None:
            ref_logits = logits
        fp32, quant = weight_bytes(model, compiled.formats)
        rows.append((spec, f"{(logits.argmax(1) == y).mean() * 100:.2f}%",
                     f"{(logits.argmax(1) == ref_logits.argmax(1)).mean() * 100:.2f}%",
                     f"{quant:,}", f"{quant / fp32:.3f}x", f"{compiled.compile_seconds:.1f}", f"{per_image_ms:.3f}"))
    print(f"TVM {compiled.target.name} target ({compiled.target.llvm_target.get('mcpu', '')}); "
          "uniform BFP on every layer's weights and input activations (simulated)")
    _print_table(["format", "top-1", "agrees w/ FP32", "weight bytes", "vs FP32", "compile s", "ms/image"], rows)
    return 0


def cmd_targets(args) -> int:
    from .targets.presets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        caches = ", ".join(f"{c.name} {c.size_bytes // 1024} KiB" for c in t.caches)
        rows.append((name, t.intrinsic_family, t.vector_bits, t.cross_compiler or "-", t.emulator or "native", caches))
    _print_table(["target", "int8 intrinsics", "vector bits", "cross compiler", "runs with", "caches"], rows)
    return 0


ZOO_MODELS = ("resnet18", "mobilenet_v2", "transformer_encoder")


def cmd_zoo(args) -> int:
    from .models import zoo

    kwargs = {"seed": args.seed}
    if args.name != "transformer_encoder":
        kwargs["image_size"] = args.image_size
    proto = getattr(zoo, args.name)(**kwargs)
    if args.dynamic_batch:
        proto = zoo.with_dynamic_batch(proto)
    out = args.output or f"{args.name}.onnx"
    check_output_path(out, "-o")
    if args.data:
        check_output_path(args.data, "--data")
    tmp = f"{out}.tmp{os.getpid()}"
    import onnx

    onnx.save(proto, tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({args.name}, random He-initialised weights, seed {args.seed})")
    if args.data:
        feeds = zoo.synthetic_inputs(proto, args.samples, seed=args.seed + 1)
        np.savez(args.data, **feeds)
        print(f"wrote {args.data} ({args.samples} synthetic samples of {', '.join(feeds)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .solver.cli_plan import add_compile_budget_args, add_plan_command
    from .targets.cli_remote import add_emulator_command, add_remote_args
    from .tuning.cli_tune import add_tune_command

    parser = argparse.ArgumentParser(prog="bitq-tvm", description="Block-floating-point DNN inference with TVM (BitQ).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's layers, shapes, MACs and parameters")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="compile a model with BFP formats into a shared library")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("-o", "--output", help="output library (default: MODEL.so)")
    p.add_argument("--deploy", action="store_true", help="integer BFP kernels with packed weights (layers without "
                   "a kernel stay float simulation, and are reported)")
    p.add_argument("--report", action="store_true", help="with --deploy: print the per-layer deployment report")
    add_compile_budget_args(p)
    p.set_defaults(func=cmd_compile)

    add_plan_command(sub)

    p = sub.add_parser("eval", help="compare BFP against FP32 on data (top-1 when labels are given)")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--data", required=True, help=".npz with the input array (by input name or 'x') and optional labels 'y'")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--deploy", action="store_true", help="evaluate the integer BFP deployment (default: simulation)")
    add_remote_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the bundled digits CNN: FP32 vs uniform BFP8/6/4 accuracy and weight size")
    p.add_argument("--target", default="host", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("zoo", help="write a model of the built-in zoo as ONNX (random weights), with synthetic data")
    p.add_argument("name", choices=ZOO_MODELS)
    p.add_argument("-o", "--output", help="output .onnx (default: NAME.onnx)")
    p.add_argument("--image-size", type=int, default=224, help="CNN input resolution (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    p.add_argument("--data", metavar="DATA.npz", help="also write synthetic inputs for eval/calibration")
    p.add_argument("--samples", type=int, default=8, help="samples in --data (default 8)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("targets", help="list the target presets")
    p.set_defaults(func=cmd_targets)

    add_emulator_command(sub)
    add_tune_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BitqError as err:
        print(f"bitq-tvm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bitq-tvm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
