"""Tuning sessions: MetaSchedule with the XGBoost cost model over a model's tasks, resumable.

The work dir holds MetaSchedule's JSON database (``database_workload.json``,
``database_tuning_record.json``), a manifest (``bitq_manifest.json``: target, bitq-tvm and TVM
versions; a work dir from another target or version is refused, never mixed), the tasks whose
search space ran out (``bitq_exhausted.json``, so a resume does not search them again), the
default (hand) schedule of every tuned BFP task measured by the same builder and runner
(``bitq_default_seconds.json``: deployment uses a tuned record only when it beats it), and logs.

Resuming: MetaSchedule appends one JSON line per workload and per measured trial. A run killed
while writing leaves at most a partial last line, which :func:`repair_database` truncates before
MetaSchedule reads the files (it would otherwise fail to parse them); a broken line anywhere else
is reported with its line number and only dropped on request (``tune --repair``). Records already
present are kept and count towards each task's trial budget, so a resumed run only runs the
remaining trials. Records reach the file once per MetaSchedule batch, so a task is measured in
several batches: a kill loses the batch in flight, not the whole task.

One tuner per work dir: :func:`work_dir_lock` holds an ``flock`` on ``bitq_tune.lock`` (which
names the holder's pid); the kernel releases it when the holder dies, so a lock left by a killed
run is stale by construction and taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import time
from typing import Callable, Mapping, Sequence

import tvm
import tvm_ffi

from ..support.version import VERSION as BITQ_VERSION
from ..errors import BitqError
from ..support.atomic import write_bytes, write_json
from ..support.progress import say_tune
from ..targets.presets import TargetPreset
from .tasks import BfpTask, Fp32Task, bfp_matmul_space, register_metaschedule_intrinsics, space_size

__all__ = [
    "MANIFEST_FILE",
    "WORKLOAD_FILE",
    "RECORD_FILE",
    "DEFAULTS_FILE",
    "FAILED_RUN_SECS",
    "TuningOptions",
    "TaskResult",
    "TuningSummary",
    "split_trials",
    "open_work_dir",
    "repair_database",
    "work_dir_lock",
    "open_database",
    "workload_key",
    "records_by_task",
    "record_seconds",
    "default_seconds",
    "tune",
    "shutdown_workers",
    "tuning_target",
]

MANIFEST_FILE = "bitq_manifest.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# Tasks whose search space ran out of unmeasured candidates, with their trial count then.
EXHAUSTED_FILE = "bitq_exhausted.json"
# Task -> mean seconds of its default (hand) schedule, measured like its records.
DEFAULTS_FILE = "bitq_default_seconds.json"
LOCK_FILE = "bitq_tune.lock"
# A task is measured in at least this many MetaSchedule batches (when its budget allows), so that a
# kill inside a task loses at most about 1/BATCHES_PER_TASK of its trials.
BATCHES_PER_TASK = 4
MANIFEST_VERSION = 1
# MetaSchedule's run_secs for a candidate that failed to build or run.
FAILED_RUN_SECS = 1e10


@dataclasses.dataclass(frozen=True)
class TuningOptions:
    """Knobs of a session; the defaults suit this kind of machine (2 shared cores).

    ``min_trials_per_task`` is the floor of the MAC-share split; ``trials_per_iteration`` is
    MetaSchedule's batch (records reach the database once per batch, so small batches lose less
    to a kill); ``population_size`` is the evolutionary search's.
    """

    min_trials_per_task: int = 4
    trials_per_iteration: int = 16
    population_size: int = 64
    build_timeout_s: float = 60.0
    run_timeout_s: float = 30.0
    builder_workers: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("min_trials_per_task", "trials_per_iteration", "population_size", "builder_workers"):
            if getattr(self, name) < 1:
                raise BitqError(f"tuning option {name} must be >= 1, got {getattr(self, name)}")
        if self.build_timeout_s <= 0 or self.run_timeout_s <= 0:
            raise BitqError("tuning options build_timeout_s and run_timeout_s must be positive")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Outcome of one task: trials in the database (``before`` this run), the best latency."""

    name: str
    budget: int
    before: int
    trials: int
    failed: int
    best_seconds: float | None
    tuning_seconds: float
    default_seconds: float | None = None

    @property
    def source(self) -> str:
        """``tuned`` when a measured schedule exists and beats the default (hand) schedule measured
        the same way, else ``default``."""
        if self.best_seconds is None:
            return "default"
        if self.default_seconds is not None and self.best_seconds >= self.default_seconds:
            return "default"
        return "tuned"


@dataclasses.dataclass(frozen=True)
class TuningSummary:
    work_dir: str
    target: str
    results: tuple[TaskResult, ...]
    repairs: tuple[str, ...] = ()

    @property
    def total_trials(self) -> int:
        return sum(r.trials for r in self.results)

    @property
    def new_trials(self) -> int:
        """Trials this run measured (the database held the others before)."""
        return sum(r.trials - r.before for r in self.results)

    @property
    def all_failed(self) -> bool:
        """True when trials ran and not one task has a working measured schedule."""
        return self.new_trials > 0 and all(r.best_seconds is None for r in self.results)


def split_trials(tasks: Sequence, total: int, min_per_task: int,
                 caps: Mapping[str, int] | None = None) -> dict[str, int]:
    """Split ``total`` trials over ``tasks`` by MAC share, at least ``min_per_task`` each.

    When ``total`` cannot give every task its minimum, the tasks with the most MACs get it and the
    rest get none (they keep the default schedules). ``caps`` bounds a task's trials (its search
    space size); trials a cap frees are not redistributed. Largest-remainder rounding keeps the
    sum exact and the split deterministic.
    """
    if total < 0:
        raise BitqError(f"--trials must be >= 0, got {total}")
    caps = caps or {}
    by_macs = sorted(tasks, key=lambda t: (-t.macs, t.name))
    budget = {t.name: 0 for t in tasks}
    if total < min_per_task * len(tasks):
        left = total
        for task in by_macs:
            budget[task.name] = min(min_per_task, left)
            left -= budget[task.name]
    else:
        extra = total - min_per_task * len(tasks)
        all_macs = sum(t.macs for t in tasks)
        shares = {t.name: extra * t.macs / all_macs for t in tasks}
        floors = {name: math.floor(s) for name, s in shares.items()}
        left = extra - sum(floors.values())
        for task in sorted(by_macs, key=lambda t: -(shares[t.name] - floors[t.name]))[:left]:
            floors[task.name] += 1
        budget = {name: min_per_task + f for name, f in floors.items()}
    return {name: min(n, caps.get(name, n)) for name, n in budget.items()}


def _manifest(preset: TargetPreset) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "target": preset.name,
        "llvm_target": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.llvm_target.items()},
        "bitq_tvm_version": BITQ_VERSION,
        "tvm_version": tvm.__version__,
    }


def open_work_dir(work_dir: str, preset: TargetPreset, create: bool = True) -> dict:
    """Create ``work_dir`` with a manifest for ``preset``, or check an existing one matches.

    With ``create=False`` (reading a database) the work dir and its manifest must exist.

    Raises
    ------
    BitqError
        The work dir belongs to another target, bitq-tvm or TVM version, has database files but
        no manifest, or its manifest is unreadable.
    """
    from ..support.paths import check_output_dir

    path = os.path.join(work_dir, MANIFEST_FILE)
    if not create and not os.path.exists(path):
        raise BitqError(f"tuning database {work_dir}: no {MANIFEST_FILE} there (not a `bitq-tvm tune` work dir)")
    if create:
        check_output_dir(work_dir, "--work-dir")
        os.makedirs(work_dir, exist_ok=True)
    expected = _manifest(preset)
    if not os.path.exists(path):
        if any(os.path.exists(os.path.join(work_dir, f)) for f in (WORKLOAD_FILE, RECORD_FILE)):
            raise BitqError(f"--work-dir {work_dir}: holds a tuning database without {MANIFEST_FILE}, "
                            "so its target and versions are unknown; use an empty work dir")
        _write_json(path, expected)
        return expected
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise BitqError(f"--work-dir {work_dir}: unreadable {MANIFEST_FILE} ({err})") from None
    for key, what in (("target", "target"), ("llvm_target", "LLVM target"),
                      ("bitq_tvm_version", "bitq-tvm version"), ("tvm_version", "TVM version")):
        if found.get(key) != expected[key]:
            raise BitqError(f"--work-dir {work_dir}: was tuned with {what} {found.get(key)!r}, this run uses "
                            f"{expected[key]!r}; records are never mixed: use another work dir")
    return found


def _truncate_partial_line(path: str) -> str | None:
    """Drop a last line that is unterminated or not JSON (a kill mid-append); say what was done."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return None
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except ValueError:
            keep = last_start
    if keep == len(data):
        return None
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"{os.path.basename(path)}: removed a partial last line ({len(data) - keep} bytes)"


def _bad_lines(path: str, is_record: bool) -> list[tuple[int, str]]:
    """(1-based line number, reason) of the lines of a database file MetaSchedule cannot read."""
    if not os.path.exists(path):
        return []
    bad = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:  # UnicodeDecodeError too
                bad.append((number, f"not valid JSON: {str(err).splitlines()[0]}"))
                continue
            if not isinstance(value, list) or (is_record and (not value or type(value[0]) is not int)):
                bad.append((number, "not a " + ("[workload index, record] array" if is_record else "workload array")))
    return bad


def _rewrite_lines(path: str, lines: list[bytes]) -> None:
    write_bytes(path, lines)


def _drop_lines(work_dir: str, bad_workloads: set[int], bad_records: set[int]) -> str | None:
    """Drop broken lines (1-based numbers) and the records of dropped or missing workloads.

    Workloads are referenced by their 0-based line index, so the records of the workloads after a
    dropped one are renumbered.
    """
    workload_path, record_path = os.path.join(work_dir, WORKLOAD_FILE), os.path.join(work_dir, RECORD_FILE)
    with open(workload_path, "rb") as f:
        workloads = f.read().splitlines(keepends=True)
    new_index, kept_workloads = {}, []
    for index, line in enumerate(workloads):
        if index + 1 not in bad_workloads and line.strip():
            new_index[index] = len(kept_workloads)
            kept_workloads.append(line)
    with open(record_path, "rb") as f:
        records = f.read().splitlines(keepends=True)
    kept_records = []
    for number, line in enumerate(records, 1):
        if number in bad_records or not line.strip():
            continue
        value = json.loads(line)
        if value[0] not in new_index:
            continue
        if new_index[value[0]] != value[0]:
            line = (json.dumps([new_index[value[0]], *value[1:]]) + "\n").encode()
        kept_records.append(line)
    dropped_w, dropped_r = len(workloads) - len(kept_workloads), len(records) - len(kept_records)
    if not dropped_w and not dropped_r:
        return None
    if dropped_w:
        _rewrite_lines(workload_path, kept_workloads)
    _rewrite_lines(record_path, kept_records)
    parts = [f"{WORKLOAD_FILE}: removed {dropped_w} broken line(s)"] if dropped_w else []
    bad_r = len(bad_records)
    if bad_r:
        parts.append(f"{RECORD_FILE}: removed {bad_r} broken line(s)")
    if dropped_r - bad_r:
        parts.append(f"{RECORD_FILE}: removed {dropped_r - bad_r} record(s) of a lost workload line")
    return "; ".join(parts)


def repair_database(work_dir: str, drop_bad_lines: bool = False) -> tuple[str, ...]:
    """Make the JSON database readable after a kill; returns one message per repair made.

    A partial last line (a kill mid-append) is always removed, with the records of a workload
    line lost that way. A broken line elsewhere is not what a kill leaves: it is a
    :class:`BitqError` naming the file and line, unless ``drop_bad_lines`` (``tune --repair``).
    """
    repairs = [_truncate_partial_line(os.path.join(work_dir, name)) for name in (WORKLOAD_FILE, RECORD_FILE)]
    paths = {name: os.path.join(work_dir, name) for name in (WORKLOAD_FILE, RECORD_FILE)}
    bad = {name: _bad_lines(path, name == RECORD_FILE) for name, path in paths.items()}
    if not drop_bad_lines:
        for name, lines in bad.items():
            if lines:
                number, reason = lines[0]
                more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
                raise BitqError(f"tuning database {work_dir}: {name} line {number} is broken ({reason}){more}; "
                                "`bitq-tvm tune ... --repair` drops broken lines and the records they invalidate")
    if all(os.path.exists(path) for path in paths.values()):
        repairs.append(_drop_lines(work_dir, {n for n, _ in bad[WORKLOAD_FILE]}, {n for n, _ in bad[RECORD_FILE]}))
    return tuple(r for r in repairs if r)


def open_database(work_dir: str):
    """The work dir's JSONDatabase, repaired first (see :func:`repair_database`)."""
    from tvm.s_tir import meta_schedule as ms

    repair_database(work_dir)
    return ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")


# Work dirs whose lock this process holds: realpath -> [fd, depth] (the lock is re-entrant here).
_held_locks: dict[str, list[int]] = {}


def _lock_holder(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def work_dir_lock(work_dir: str, progress: Callable[[str], None] | None = None):
    """Hold the tuning lock of ``work_dir`` (one tuner per work dir); re-entrant within a process.

    Raises
    ------
    BitqError
        Another live process holds it (the message names its pid).
    """
    key = os.path.realpath(work_dir)
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    path = os.path.join(work_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise BitqError(f"--work-dir {work_dir}: cannot create {LOCK_FILE} ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise BitqError(f"--work-dir {work_dir}: another `bitq-tvm tune` (pid {holder or '?'}) is tuning it; "
                        "wait for it to finish or use another work dir") from None
    stale = _lock_holder(fd)
    if stale is not None and progress:
        progress(f"{LOCK_FILE}: the previous tuner (pid {stale}) ended without releasing it; taking over")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[key]
        os.ftruncate(fd, 0)  # the file stays: deleting it would let two tuners lock different files
        os.close(fd)


def _task_mod(task) -> tvm.IRModule:
    if isinstance(task, BfpTask):
        return tvm.IRModule({"main": task.prim_func()})
    return task.mod


def workload_key(mod: tvm.IRModule) -> int:
    """The structural hash MetaSchedule keys a workload by."""
    return int(tvm_ffi.structural_hash(mod))


def records_by_task(database, tasks: Sequence) -> dict[str, list]:
    """Task name -> its tuning records (all trials, failed ones included), in database order."""
    keys = {}
    for task in tasks:
        keys.setdefault(workload_key(_task_mod(task)), []).append(task)
    found = {task.name: [] for task in tasks}
    for record in database.get_all_tuning_records():
        mod = record.workload.mod
        for task in keys.get(workload_key(mod), ()):
            if tvm_ffi.structural_equal(mod, _task_mod(task)):
                found[task.name].append(record)
    return found


def record_seconds(record) -> float:
    """Mean measured seconds of a record; FAILED_RUN_SECS when it failed to build or run."""
    secs = [float(s) for s in record.run_secs] if record.run_secs is not None else []
    if not secs or any(s >= FAILED_RUN_SECS for s in secs):
        return FAILED_RUN_SECS
    return sum(secs) / len(secs)


def default_seconds(work_dir: str) -> dict[str, float]:
    """Task name -> measured seconds of its default schedule (:data:`DEFAULTS_FILE`), {} if none."""
    path = os.path.join(work_dir, DEFAULTS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise BitqError(f"{path}: not a table of default schedule seconds ({err}); delete it to re-measure") from None


def measure_default(task: BfpTask, target, builder, runner) -> float | None:
    """Mean seconds of ``task``'s default (hand) schedule, built and run by the session's own
    builder and runner (same evaluator, same device), so its records compare with it; None when
    it fails to build or run there."""
    from tvm.s_tir import meta_schedule as ms

    from ..kernels.bfp_matmul_variants import bfp_matmul_func

    func = bfp_matmul_func(task.m, task.n, task.k, task.fmt_a, task.fmt_w, task.variant)
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", task.name)})
    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg is not None:
        return None
    try:
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device_type=device,
                                                      args_info=ms.arg_info.TensorInfo.from_prim_func(func))])
        result = future.result()
    finally:
        ms.utils.remove_build_dir(built.artifact_path)
    secs = [float(s) for s in result.run_secs or ()]
    if result.error_msg is not None or not secs or any(s >= FAILED_RUN_SECS for s in secs):
        return None
    return sum(secs) / len(secs)


def _quiet_metaschedule_logs(work_dir: str) -> None:
    """MetaSchedule logs to stdout by default: send it to work_dir/logs instead."""
    log_dir = os.path.join(work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    root = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(os.path.join(log_dir, "meta_schedule.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def tuning_target(preset: TargetPreset) -> tvm.target.Target:
    """The preset's target with ``num-cores`` set, which MetaSchedule's default CPU rules need."""
    import psutil

    cores = (psutil.cpu_count(logical=False) or os.cpu_count() or 1) if preset.is_native else preset.cores
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.llvm_target.items()}
    return tvm.target.Target({**config, "num-cores": int(cores)})


def _tune_context(task, target, options: TuningOptions, logger):
    from tvm.s_tir import meta_schedule as ms

    space = bfp_matmul_space(task) if isinstance(task, BfpTask) else "post-order-apply"
    strategy = ms.search_strategy.EvolutionarySearch(population_size=options.population_size,
                                                     init_min_unmeasured=min(50, options.population_size))
    return ms.TuneContext(mod=_task_mod(task), target=target, space_generator=space, search_strategy=strategy,
                          task_name=task.name, rand_state=options.seed, num_threads="physical",
                          logger=logger).clone()


def tune(tasks: Sequence[BfpTask | Fp32Task], preset: TargetPreset, work_dir: str, trials: int,
         options: TuningOptions = TuningOptions(), builder=None, runner=None,
         progress: Callable[[str], None] | None = say_tune, repair: bool = False) -> TuningSummary:
    """Tune ``tasks`` for ``preset`` with ``trials`` trials in total, resuming ``work_dir``.

    Parameters
    ----------
    tasks : sequence of BfpTask / Fp32Task
    trials : int
        Total budget, split by :func:`split_trials`; trials already in the database count.
        Zero runs nothing: every task keeps its default (hand) schedule.
    builder, runner : MetaSchedule Builder / Runner, optional
        Local ones by default; :mod:`bitq_tvm.tuning.remote` makes RPC ones.
    repair : bool
        Drop broken database lines (see :func:`repair_database`) instead of refusing.

    Returns
    -------
    TuningSummary

    Raises
    ------
    BitqError
        Another tuner holds the work dir (:func:`work_dir_lock`), or its database is broken.
    """
    say = progress or (lambda message: None)
    if not tasks:
        raise BitqError("nothing to tune: the model has no tasks for these candidates")
    open_work_dir(work_dir, preset)
    with work_dir_lock(work_dir, say):
        return _tune_locked(tasks, preset, work_dir, trials, options, builder, runner, say, repair)


def _tune_locked(tasks, preset, work_dir, trials, options, builder, runner, say, repair) -> TuningSummary:
    from tvm.s_tir import meta_schedule as ms

    repairs = repair_database(work_dir, drop_bad_lines=repair)
    for message in repairs:
        say(f"repaired {message}")
    caps = {t.name: space_size(t) for t in tasks if isinstance(t, BfpTask)}
    budget = split_trials(tasks, trials, options.min_trials_per_task, caps)
    if trials == 0:
        say(f"0 trials: nothing tuned; all {len(tasks)} tasks use the default (hand) schedules")
        return TuningSummary(work_dir, preset.name, tuple(
            TaskResult(t.name, 0, 0, 0, 0, None, 0.0) for t in tasks), repairs)

    register_metaschedule_intrinsics()
    _quiet_metaschedule_logs(work_dir)
    database = ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")
    before = {name: len(recs) for name, recs in records_by_task(database, tasks).items()}
    if any(before.values()):
        say(f"resuming {work_dir}: {sum(before.values())} trial(s) already recorded are kept")
    target = tuning_target(preset)
    builder = builder or ms.builder.LocalBuilder(max_workers=options.builder_workers,
                                                 timeout_sec=options.build_timeout_s)
    own_runner = runner is None
    runner = runner or ms.runner.LocalRunner(timeout_sec=options.run_timeout_s)
    try:
        results = _tune_each(tasks, budget, before, target, options, builder, runner, database, work_dir, say)
    finally:
        if own_runner:
            shutdown_workers(runner)
    untuned = [r.name for r in results if r.source == "default"]
    if untuned:
        say(f"{len(untuned)} task(s) use the default schedules (no trials or no working candidate)")
    return TuningSummary(work_dir, preset.name, tuple(results), repairs)


def _write_json(path: str, data) -> None:
    write_json(path, data)


def shutdown_workers(runner) -> None:
    """Stop a MetaSchedule runner's worker processes (they would outlive the session otherwise)."""
    pool = getattr(runner, "pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


def _batch_size(remaining: int, options: TuningOptions) -> int:
    """Trials per MetaSchedule batch: records are written per batch, so a task gets several."""
    return max(1, min(options.trials_per_iteration, remaining, max(2, math.ceil(remaining / BATCHES_PER_TASK))))


def _tune_each(tasks, budget, before, target, options, builder, runner, database, work_dir, say) -> list[TaskResult]:
    from tvm.s_tir import meta_schedule as ms

    exhausted_path = os.path.join(work_dir, EXHAUSTED_FILE)
    exhausted = {}
    if os.path.exists(exhausted_path):
        with open(exhausted_path) as f:
            exhausted = json.load(f)
    defaults_path = os.path.join(work_dir, DEFAULTS_FILE)
    defaults = default_seconds(work_dir)
    results = []
    for index, task in enumerate(tasks, 1):
        remaining = max(0, budget[task.name] - before[task.name])
        if remaining and exhausted.get(task.name) == before[task.name]:
            say(f"task {index}/{len(tasks)} {task.name}: search space exhausted at {before[task.name]} trial(s)")
            remaining = 0
        started = time.perf_counter()
        if remaining:
            say(f"task {index}/{len(tasks)} {task.name}: {remaining} trial(s) "
                f"(budget {budget[task.name]}, {before[task.name]} done before)")
            logger = logging.getLogger(f"tvm.s_tir.meta_schedule.bitq.{task.name}")
            ms.tune_tasks(tasks=[_tune_context(task, target, options, logger)], task_weights=[1.0],
                          work_dir=work_dir, max_trials_global=remaining, max_trials_per_task=remaining,
                          num_trials_per_iter=_batch_size(remaining, options), builder=builder,
                          runner=runner, database=database, cost_model=ms.cost_model.XGBModel(num_tuning_cores=1),
                          task_scheduler="round-robin")
        records = records_by_task(database, [task])[task.name]
        if remaining and len(records) < before[task.name] + remaining:
            # MetaSchedule stops early only when the search finds no unmeasured candidate
            exhausted[task.name] = len(records)
            _write_json(exhausted_path, exhausted)
        seconds = [record_seconds(r) for r in records]
        good = [s for s in seconds if s < FAILED_RUN_SECS]
        if remaining and good and isinstance(task, BfpTask) and task.name not in defaults:
            # measured in the session that measured the records: same machine, same conditions
            default = measure_default(task, target, builder, runner)
            if default is not None:
                defaults[task.name] = default
                _write_json(defaults_path, defaults)
        result = TaskResult(task.name, budget[task.name], before[task.name], len(records),
                            len(seconds) - len(good), min(good) if good else None, time.perf_counter() - started,
                            defaults.get(task.name))
        results.append(result)
        best = f"best {result.best_seconds * 1e6:.2f} us" if good else "no working schedule: default kept"
        if good and result.default_seconds is not None:
            best += (f" vs default {result.default_seconds * 1e6:.2f} us"
                     + (": default kept" if result.source == "default" else ""))
        say(f"task {index}/{len(tasks)} {task.name}: {result.trials} trial(s), {result.failed} failed, {best}"
            + (f", {result.tuning_seconds:.1f} s" if remaining else " (budget already met)"))
    return results
