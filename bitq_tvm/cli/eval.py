"""``bitq-tvm eval``: BFP and TVM FP32 against ONNX Runtime FP32 on data (top-1/5 with labels)."""

from __future__ import annotations

from ..errors import BitqError
from ..support.tables import print_table
from .args import add_model_args, add_plan_args, add_remote_args, load_model, load_plan, remote_runner


def add_command(subparsers) -> None:
    p = subparsers.add_parser("eval", help="compare BFP and TVM FP32 against ONNX Runtime FP32 on data (top-1/5 with labels)")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("--data", required=True, help=".npz with one array per model input (by input name; 'x' for a "
                   "single input), in the input's dtype (int64 token ids, ...), and optional integer labels 'y' "
                   "of the first output ([N] for [N, C], [N, T] for [N, T, C])")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--batch", type=int, metavar="N", help="compile for batch N (pins dim 0 of inputs whose batch "
                   "is dynamic) and run the data in chunks of N (the last zero-padded)")
    p.add_argument("--save-outputs", metavar="OUT.npz", help="write the outputs (reference/NAME, fp32/NAME, "
                   "bfp/NAME) to an .npz")
    p.add_argument("--deploy", action="store_true", help="evaluate the integer BFP deployment (default: simulation)")
    add_remote_args(p)
    p.set_defaults(func=run)


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def run(args) -> int:
    from ..evaluation import evaluate, load_eval_data
    from ..frontend.onnx_model import parse_input_shapes, pin_batch

    model = load_model(args, pin_batch(args.model, parse_input_shapes(args.input_shape), args.batch))
    plan = load_plan(args)
    if plan is None:
        raise BitqError("eval: give --format or --plan (the BFP side of the comparison)")
    data = load_eval_data(args.data, model)
    stats = evaluate(model, plan, data, args.target, args.limit, deploy=args.deploy,
                     remote=lambda compiled: remote_runner(args, compiled), save_outputs=args.save_outputs)
    names = stats["output_names"]
    outputs = [stats["outputs"][n] for n in names]
    bfp = (args.plan or args.format) + (" (integer deployment)" if args.deploy else " (simulation)")
    print(f"reference: {stats['reference']} (intra-op spinning off)")
    print(f"compared: TVM FP32 build and BFP {bfp} on {args.target}; {stats['samples']} samples "
          f"in batches of {stats['batch']}")
    rows = []
    if "top" in outputs[0]:
        for k, title in (("top1", "top-1"), ("top5", "top-5")):
            if k in outputs[0]["top"]["reference"]:
                for who, label in (("reference", "ORT FP32"), ("tvm_fp32", "TVM FP32"), ("bfp", "BFP")):
                    rows.append([f"{title} {label}", f"{outputs[0]['top'][who][k]:.4f}"] + ["-"] * (len(names) - 1))
    kinds = [k for k in ("per sample", "per position") if any(o["bfp"].get("argmax") == k for o in outputs)]
    for who, group in (("tvm_fp32", "TVM FP32 vs ORT"), ("bfp", "BFP vs ORT")):
        for kind in kinds:
            rows.append([f"{group}: argmax agreement {kind}"] +
                        [_fmt(o[who].get("argmax_agreement") if o[who].get("argmax") == kind else None, ".4f")
                         for o in outputs])
        rows.append([f"{group}: cosine"] + [f"{o[who]['cosine']:.6f}" for o in outputs])
        rows.append([f"{group}: rel-L2"] + [f"{o[who]['rel_l2']:.3e}" for o in outputs])
        rows.append([f"{group}: max abs diff"] + [f"{o[who]['max_abs_diff']:.3e}" for o in outputs])
    print_table(["metric", *names], rows)
    fp32, quant = stats["weight_bytes"]
    print(f"layer weight bytes BFP / FP32: {quant:,} / {fp32:,} = {quant / fp32:.3f}x")
    if "stored_weight_bytes" in stats:
        stored = stats["stored_weight_bytes"]
        print(f"integer deployment stores {stored:,} B of layer weights = {stored / fp32:.3f}x FP32 "
              "(layers left in float simulation at FP32)")
    print(f"run time: ORT {stats['reference_seconds']:.2f} s, TVM FP32 {stats['fp32_seconds']:.2f} s, "
          f"BFP {stats['bfp_seconds']:.2f} s")
    if args.save_outputs:
        print(f"wrote {args.save_outputs} (reference/, fp32/, bfp/ + output name)")
    return 0
