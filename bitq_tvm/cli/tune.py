"""``bitq-tvm tune``: tune a model's BFP kernels (and its FP32 work) into a resumable work dir."""

from __future__ import annotations

import os
import sys

from ..errors import BitqError
from ..support.tables import print_table
from ..support.progress import say_tune
from .args import add_model_args, add_target_arg, load_model


def add_command(subparsers) -> None:
    p = subparsers.add_parser("tune", help="autotune the model's BFP kernels with MetaSchedule (resumable)")
    add_model_args(p)
    add_target_arg(p)
    p.add_argument("--trials", type=int, required=True,
                   help="total trials, split over tasks by MAC share; 0 = keep the default schedules")
    p.add_argument("--work-dir", required=True, metavar="DB",
                   help="tuning database dir; an interrupted run resumes from it")
    p.add_argument("--candidates", metavar="SET", help="candidate set, e.g. 'w=4,6,8;a=8;b=16,32' (default grid)")
    p.add_argument("--pin", action="append", metavar="NAME=SPEC", help="restrict a layer's candidates (repeatable)")
    p.add_argument("--no-fp32", action="store_true", help="tune only the BFP kernels, not the FP32 work")
    p.add_argument("--min-trials-per-task", type=int, default=4, help="floor of the per-task split (default 4)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="measure on devices of this TVM RPC tracker")
    p.add_argument("--key", help="device key registered with --tracker")
    p.add_argument("--repair", action="store_true", help="drop broken lines of the work dir's database (and the "
                   "records they invalidate) instead of refusing it")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..targets.presets import get_target
    from ..tuning.session import open_work_dir, work_dir_lock

    if args.key and not args.tracker:
        raise BitqError("--key is only used with --tracker HOST:PORT")
    preset = get_target(args.target)
    if not preset.is_native and not args.tracker and args.trials:
        # every trial would fail to run on this host, after minutes of building
        how = (f"start an emulated device with `bitq-tvm emulator serve --target {preset.name} --tracker HOST:PORT "
               "--key K` and pass that tracker" if preset.emulator and preset.triple == "aarch64-linux-gnu"
               else "register the board with a TVM RPC tracker")
        raise BitqError(f"--target {preset.name}: its kernels cannot run on this host, so tuning needs a device: "
                        f"give --tracker HOST:PORT --key K ({how})")
    open_work_dir(args.work_dir, preset)  # a wrong work dir fails before the slow steps
    with work_dir_lock(args.work_dir, say_tune):  # and so does a second tuner on it
        return _tune(args, preset)


def _tune(args, preset) -> int:
    from ..solver.candidates import LayerCandidates
    from ..targets.rpc import parse_address
    from ..tuning.latency import latency_table, measured_task_seconds
    from ..tuning.remote import remote_builder_runner
    from ..tuning.session import TuningOptions, repair_database, shutdown_workers, tune
    from ..tuning.tasks import extract_tasks
    from ..tuning.verify import trusted_records, verify_tasks

    for message in repair_database(args.work_dir, drop_bad_lines=args.repair):  # a broken database fails now
        say_tune(f"repaired {message}")
    model = load_model(args)
    candidates = LayerCandidates.from_specs(args.candidates, args.pin).resolve([l.name for l in model.layers])
    tasks = extract_tasks(model, candidates, preset, include_fp32=not args.no_fp32)
    print(f"{model.name}: {len(tasks.bfp)} BFP GEMM task(s) from {len(model.layers)} layers x candidates, "
          f"{len(tasks.fp32)} FP32 task(s); target {preset.name}", file=sys.stderr)
    builder = runner = None
    if args.tracker:
        builder, runner = remote_builder_runner(parse_address(args.tracker, args.key, tracker=True).require_key(), preset)
    options = TuningOptions(min_trials_per_task=args.min_trials_per_task)
    try:
        summary = tune(tasks.all, preset, args.work_dir, args.trials, options, builder, runner, repair=args.repair)
    finally:
        if runner is not None:
            shutdown_workers(runner)
    rows = [(r.name, f"{tasks.by_name()[r.name].macs:,}", r.trials, r.failed,
             "-" if r.best_seconds is None else f"{r.best_seconds * 1e6:.2f}",
             "-" if r.default_seconds is None else f"{r.default_seconds * 1e6:.2f}", r.source) for r in summary.results]
    print_table(["task", "MACs", "trials", "failed", "best us", "default us", "schedule"], rows)
    kept = sum(1 for r in summary.results if r.best_seconds is not None and r.source == "default")
    if kept:
        print(f"{kept} task(s) keep the default schedule: no record beat it as measured "
              "(compile --tuning-db uses a record only where it is faster)")
    if summary.all_failed:
        raise BitqError(f"all {summary.new_trials} trial(s) of this run failed to build or run on {preset.name}; "
                        f"nothing was tuned (causes: {os.path.join(args.work_dir, 'logs', 'meta_schedule.log')})")
    if args.trials and (preset.is_native or preset.emulator is not None):
        # verified records (verdicts are cached in the work dir: the calls below reuse them)
        verified = {name for name, (record, _) in verify_tasks(args.work_dir, tasks.bfp, preset).items()
                    if record is not None}
        used = trusted_records(args.work_dir, tasks.bfp, preset)
        rejected = sum(1 for r in summary.results if r.best_seconds is not None and r.name.startswith("bfp_")
                       and r.name not in verified)
        print(f"\n{len(used)} BFP task(s) deploy a verified tuned kernel"
              + (f"; {len(verified) - len(used)} keep the faster default" if len(verified) > len(used) else "")
              + (f"; {rejected} task(s) had only records with wrong numbers (excluded)" if rejected else ""))
        # measured latencies of the kernels deployment runs (tuned, or the default where it won)
        seconds = measured_task_seconds(args.work_dir, tasks.bfp, preset, verified=True)
        if seconds:
            from ..solver.performance import performance_term

            dm = performance_term(model, preset, candidates).model_costs
            print("\n" + latency_table(model, candidates, preset, seconds, model_costs=dm).report.markdown())
    return 0
