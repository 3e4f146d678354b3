"""``bitq-tvm plan`` and the planning half of ``bitq-tvm compile --budget/--lambda/--size-budget``.

    bitq-tvm plan model.onnx --target T --calib data.npz (--budget 0.5% | --lambda L | --size-budget MB)
        [--candidates w=4,5,6,8;a=6,8;b=16,32,64] [--pin conv1=fp32] [--tie a,b] [--input-shape ...]
        [--calib-key KEY] [--labels y] [--verify] -o plan.json [--report-dir DIR]
"""

from __future__ import annotations

import sys

from ..errors import BitqError
from ..support.paths import check_output_dir, check_output_path
from ..support.tables import print_table
from .args import add_model_args, add_planning_args, add_target_arg, load_model


def add_command(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose per-layer BFP formats (BitQ): accuracy vs data movement")
    add_model_args(p)
    add_target_arg(p, "target preset for the DM model (default: host)")
    add_planning_args(p, objective_required=True)
    p.add_argument("-o", "--output", required=True, metavar="PLAN.json", help="plan file to write")
    p.add_argument("--report-dir", metavar="DIR", help="write pareto.png, bitmap.png and report.md here")
    p.add_argument("--verify", action="store_true", help="compile the plan with TVM and measure its true loss "
                   "on the calibration data (predicted vs measured)")
    p.add_argument("--mca", action="store_true", help="price integer BFP candidates by llvm-mca estimates of the "
                   "kernels compiled for --target (a static model, labelled as such; needs llvm-mca-22)")
    p.set_defaults(func=run)


def objective(args):
    """The :class:`~bitq_tvm.solver.planner.Objective` of ``--budget``/``--lambda``/``--size-budget``, or None."""
    from ..solver.planner import Objective, parse_budget

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
    """Plan ``model`` from the parsed options; returns the :class:`PlanResult` and the calibration data."""
    from ..solver.accuracy import load_calibration
    from ..solver.candidates import LayerCandidates
    from ..solver.planner import plan_model

    goal = objective(args)
    if goal is None:
        raise BitqError("give one of --budget, --lambda or --size-budget")
    if not args.calib:
        raise BitqError("planning needs calibration data: --calib DATA.npz")
    calib = load_calibration(args.calib, model, args.calib_key, args.labels)
    candidates = LayerCandidates.from_specs(args.candidates, args.pin)
    measured = None
    if args.tuning_db:
        from ..targets.presets import get_target
        from ..tuning.latency import latency_table_from_work_dir

        from ..solver.performance import performance_term

        table_candidates, preset = candidates.resolve([l.name for l in model.layers]), get_target(args.target)
        table = latency_table_from_work_dir(args.tuning_db, model, table_candidates, preset,
                                            model_costs=performance_term(model, preset, table_candidates).model_costs)
        print(table.report.markdown(), file=sys.stderr)
        measured = table.seconds
    estimated = None
    if getattr(args, "mca", False):
        from ..solver.mca_cost import candidate_estimates
        from ..targets.presets import get_target

        estimated = candidate_estimates(model, candidates.resolve([l.name for l in model.layers]),
                                        get_target(args.target), progress=lambda m: print(m, file=sys.stderr))
    return plan_model(model, calib, goal, args.target, candidates, _ties(args), measured=measured,
                      estimated=estimated, probe_levels=args.probe_levels), calib


def plan_for_compile(args, model):
    """``compile --budget/--lambda/--size-budget``: the Plan to compile (None if no objective given)."""
    if objective(args) is None:
        return None
    if getattr(args, "plan", None) or getattr(args, "format", None):
        raise BitqError("--budget/--lambda/--size-budget plan the formats; do not combine them with --plan or --format")
    return run_planner(args, model)[0].plan


def run(args) -> int:
    from ..solver.planner import verify
    from ..solver.report import write_report

    check_output_path(args.output, "-o")
    if args.report_dir:
        check_output_dir(args.report_dir, "--report-dir")
    model = load_model(args)
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
             f"{lf.info['weight_bytes']:,}", lf.info["perf_source"]) for name, lf in result.plan.layers.items()]
    print_table(["layer", "candidate", "pred. logit MSE", "DRAM bytes", "weight bytes", "perf source"], rows)
    perf = result.performance
    sources = [perf.source(n, label) for n, table in perf.cost.items() for label in table]
    print("performance term over all candidates: " + ", ".join(
        f"{sources.count(s)} {s}" for s in ("measured", "llvm-mca estimate", "DM model")) +
        " (llvm-mca estimates and the DM model are models, not measurements)")
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
