"""``bitq-tvm compile``: a model with BFP formats (given, or planned from a budget) into a shared library.

The default is the BFP simulation (weights quantized at compile time and stored dequantized);
``--deploy`` compiles integer BFP kernels with packed weights, ``--report`` prints its per-layer
deployment report.
"""

from __future__ import annotations

from ..errors import BitqError
from ..support.paths import check_output_path
from .args import add_model_args, add_plan_args, add_planning_args, default_library, load_model, load_plan
from .plan import plan_for_compile


def add_command(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile a model with BFP formats into a shared library")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument("-o", "--output", help="output library (default: MODEL.so)")
    p.add_argument("--deploy", action="store_true", help="integer BFP kernels with packed weights (layers without "
                   "a kernel stay float simulation, and are reported)")
    p.add_argument("--report", action="store_true", help="with --deploy: print the per-layer deployment report")
    add_planning_args(p, objective_required=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import compile_model
    from ..evaluation import weight_bytes

    out = default_library(args)
    check_output_path(out, "-o")
    model = load_model(args)
    plan_given = load_plan(args)  # a bad --plan/--format fails before the planner runs
    planned = plan_for_compile(args, model)
    if args.tuning_db and not (args.deploy or planned):
        raise BitqError("--tuning-db feeds the planner (--budget/--lambda/--size-budget) and the integer kernels "
                        "(--deploy); give one of them")
    plan = planned or plan_given
    if args.deploy:
        return _deploy(args, model, plan)
    compiled = compile_model(model, plan, args.target)
    compiled.export_library(out)
    fp32, quant = weight_bytes(model, compiled.formats)
    sizes = (f"; packed BFP weights would take {quant:,} B vs {fp32:,} B FP32 = {quant / fp32:.3f}x" if fp32
             else "; the model has no BFP layers: FP32 throughout")
    print(f"wrote {out} (target {compiled.target.name}; BFP simulation: weights quantized at compile time and "
          f"stored dequantized, activations quantized at run time{sizes})")
    return 0


def _deploy(args, model, plan) -> int:
    """``compile --deploy [--report]``: write the integer BFP library (and print the report)."""
    from ..deploy import compile_deployed

    if plan is None:
        raise BitqError("compile --deploy needs --format, --plan or a budget (an FP32 model has nothing to deploy as BFP)")
    deployed = compile_deployed(model, plan, args.target, tuning_db=args.tuning_db)
    out = default_library(args)
    deployed.export_library(out)
    report = deployed.report
    if args.report:
        print(report.table())
    for layer, reason in report.fallbacks.items():
        print(f"fallback: layer '{layer}' runs as float BFP simulation: {reason}")
    for node in model.fp32_nodes:
        print(f"fp32: node '{node.name}' ({node.onnx_op}) is not a BFP layer: {node.reason}")
    print(f"wrote {out} (target {deployed.target.name}; integer BFP kernels ({report.variant}) for "
          f"{len(report.integer_layers)}/{len(report.layers)} layers; constants {report.artifact_constant_bytes:,} B "
          f"vs {report.fp32_weight_bytes:,} B FP32 weights, resident as stored when loaded with "
          f"bitq_tvm.runtime.library.load_library; main takes the model's inputs)")
    return 0
