"""The ``bitq-tvm plan`` subcommand and the planning half of ``bitq-tvm compile --budget``.

    bitq-tvm plan model.onnx --target T --calib data.npz (--budget 0.5% | --lambda L | --size-budget MB)
        [--candidates w=4,5,6,8;a=6,8;b=16,32,64] [--pin conv1=fp32] [--tie a,b] [--input-shape ...]
        [--calib-key KEY] [--labels y] [--verify] -o plan.json [--report-dir DIR]
"""

from __future__ import annotations

import argparse
import sys

from ..errors import BitqError


def _add_planning_args(p: argparse.ArgumentParser, objective_required: bool) -> None:
    p.add_argument("--calib", metavar="DATA.npz", help="calibration data: an array per model input "
                   "(single input: its name, else 'calib', else 'x')")
    p.add_argument("--calib-key", metavar="KEY", help="array of --calib to use for a single-input model")
    p.add_argument("--labels", metavar="KEY", help="integer label array in --calib: the budget unit becomes the "
                   "top-1 drop (fraction) instead of the relative logit MSE")
    g = p.add_mutually_exclusive_group(required=objective_required)
    g.add_argument("--budget", metavar="LOSS", help="least perf with predicted loss <= LOSS (e.g. 0.5%%: top-1 "
                   "points with --labels, else relative logit MSE)")
    g.add_argument("--lambda", dest="lam", type=float, metavar="L",
                   help="BitQ's weighted objective: loss + L * perf / perf_max")
    g.add_argument("--size-budget", type=float, metavar="MB", help="least loss with layer weights <= MB * 10^6 bytes")
    p.add_argument("--candidates", metavar="SPEC", help="candidate grid, e.g. 'w=4,5,6,8;a=6,8;b=16,32,64;e=8' "
                   "(default); keys left out keep their defaults")
    p.add_argument("--pin", action="append", metavar="NAME=SPEC", help="fix a layer ('first'/'last' allowed): "
                   "fp32, a format, WEIGHT,ACT formats, a label like w8a8_b32, or a candidate grid")
    p.add_argument("--tie", action="append", metavar="A,B,...", help="layers that must take the same candidate")
    p.add_argument("--tuning-db", metavar="DIR", help="a `bitq-tvm tune` work dir: measured (and regressed) kernel "
                   "latencies replace the data-movement model in the performance term; compile --deploy also "
                   "uses its verified tuned kernels")


def add_plan_command(subparsers) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``bitq-tvm`` subparsers (sets ``func``)."""
    from ..cli import _add_model_args

    p = subparsers.add_parser("plan", help="choose per-layer BFP formats (BitQ): accuracy vs data movement")
    _add_model_args(p)
    p.add_argument("--target", default="host", help="target preset for the DM model (default: host)")
    _add_planning_args(p, objective_required=True)
    p.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="plan file to write")
    p.add_argument("--report-dir", metavar="DIR", help="write pareto.png, bitmap.png and report.md here")
    p.add_argument("--verify", action="store_true", help="compile the plan with TVM and measure its true loss "
                   "on the calibration data (predicted vs measured)")
    p.set_defaults(func=cmd_plan)
    return p


def add_compile_budget_args(p: argparse.ArgumentParser) -> None:
    """The planning options of ``bitq-tvm compile`` (plan + compile in one go)."""
    _add_planning_args(p, objective_required=False)


def _objective(args):
    from .planner import Objective, parse_budget

    if args.budget is not None:
        return Objective("budget", parse_budget(args.budget))
    if args.lam is not None:
        return Objective("lambda", args.lam)
    if args.size_budget is not None:
        return Objective("size_budget", args.size_budget)
    return None


def _ties(args) -> list[tuple[str, ...]]:
    ties = []
    for spec in args.tie or ():
        names = tuple(n.strip() for n in spec.split(",") if n.strip())
        if len(names) < 2:
            raise BitqError(f"--tie '{spec}': name at least two layers, comma-separated")
        ties.append(names)
    return ties


def run_planner(args, model):
    """Plan ``model`` from parsed CLI ``args``; returns the :class:`PlanResult`."""
    from .accuracy import load_calibration
    from .candidates import LayerCandidates
    from .planner import plan_model

    objective = _objective(args)
    if objective is None:
        raise BitqError("give one of --budget, --lambda or --size-budget")
    if not args.calib:
        raise BitqError("planning needs calibration data: --calib DATA.npz")
    calib = load_calibration(args.calib, model, args.calib_key, args.labels)
    candidates = LayerCandidates.from_specs(args.candidates, args.pin)
    measured = None
    if args.tuning_db:
        from ..targets.presets import get_target
        from ..tuning.latency import latency_table_from_work_dir

        from .performance import performance_term

        table_candidates, preset = candidates.resolve([l.name for l in model.layers]), get_target(args.target)
        table = latency_table_from_work_dir(args.tuning_db, model, table_candidates, preset,
                                            model_costs=performance_term(model, preset, table_candidates).model_costs)
        print(table.report.markdown(), file=sys.stderr)
        measured = table.seconds
    return plan_model(model, calib, objective, args.target, candidates, _ties(args), measured=measured), calib


def plan_for_compile(args):
    """``compile --budget/--lambda/--size-budget``: the Plan to compile (None if no objective given)."""
    from ..cli import _load_model

    if _objective(args) is None:
        return None
    if getattr(args, "plan", None) or getattr(args, "format", None):
        raise BitqError("--budget/--lambda/--size-budget plan the formats; do not combine them with --plan or --format")
    return run_planner(args, _load_model(args))[0].plan


def cmd_plan(args) -> int:
    from ..cli import _load_model, _print_table, check_output_dir, check_output_path
    from .planner import verify
    from .report import write_report

    check_output_path(args.output, "-o")
    if args.report_dir:
        check_output_dir(args.report_dir, "--report-dir")
    model = _load_model(args)
    result, calib = run_planner(args, model)
    result.plan.save(args.output)
    checks = None
    if args.verify:
        checks = {"plan": verify(model, result.plan, calib, result.accuracy, args.target)}
    written = write_report(result, args.report_dir, checks) if args.report_dir else []
    meta = result.plan.meta["planner"]
    unit = result.accuracy.unit
    loss = f"{meta['predicted_loss'] * 100:.3g}%" if result.accuracy.curve else f"{meta['predicted_loss']:.3e}"
    rows = [(name, lf.info["candidate"], f"{lf.info['predicted_loss']:.3e}", f"{lf.info['dram_bytes']:,.0f}",
             f"{lf.info['weight_bytes']:,}") for name, lf in result.plan.layers.items()]
    _print_table(["layer", "candidate", "pred. logit MSE", "DRAM bytes", "weight bytes"], rows)
    print(f"wrote {args.output}: predicted {unit} {loss}, {meta['average_weight_bits']:.2f} weight bits/param, "
          f"DRAM {meta['dram_bytes']:,.0f} B, perf {meta['perf']:.4g} {meta['perf_unit']}")
    if checks:
        v = checks["plan"]
        print(f"verify: relative logit MSE predicted {v.predicted_logit_mse:.3e}, measured {v.measured_logit_mse:.3e} "
              f"(ratio {v.ratio:.2f})" + (f"; top-1 {v.top1_fp32:.4f} -> {v.top1_plan:.4f}" if v.top1_fp32 is not None
                                          else ""))
    if written:
        print(f"report: {', '.join(written)}", file=sys.stdout)
    return 0
