"""Check tuned kernels for numbers before they are trusted.

MetaSchedule measures speed only, and tensorize accepts a region an intrinsic does not really
match (see the TVM notes), so a fast record can compute the wrong thing. Each task's records are
tried fastest first: the schedule is rebuilt from the record's trace, run on random BFP data
(wide per-row ranges, an all-zero block, a zero weight row), and compared with
:func:`~bitq_tvm.kernels.oracle.bfp_matmul_ref` within
:func:`~bitq_tvm.kernels.oracle.bfp_matmul_tolerance`, with the weights packed by the deployment's
packer (:func:`~bitq_tvm.kernels.packing.pack_weights`). The first record that passes is the
task's trusted schedule; failing ones are reported and excluded. Verdicts are cached in the work
dir (``bitq_verified.json``), keyed by task and trace, so nothing is rebuilt twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Callable, Sequence

import numpy as np
import tvm
from tvm.s_tir import Schedule

from ..errors import BitqError
from ..kernels.oracle import bfp_matmul_ref, bfp_matmul_tolerance, quantize_activations_np
from ..kernels.packing import pack_weights
from ..support.atomic import write_json
from ..targets.presets import TargetPreset
from .session import FAILED_RUN_SECS, default_seconds, open_database, record_seconds, records_by_task
from .tasks import BfpTask, register_metaschedule_intrinsics

__all__ = ["VERIFIED_FILE", "KERNEL_INPUTS", "Verdict", "random_bfp_inputs", "check_kernel", "kernel_runner", "schedule_from_record",
           "verify_tasks", "trusted_records", "tuned_prim_funcs"]

VERIFIED_FILE = "bitq_verified.json"
# The matmul kernel's inputs, in order (its output C follows).
KERNEL_INPUTS = ("qa", "ea", "qw", "ew")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Result of checking one record: ``worst`` is max |kernel - ref| / tolerance (<= 1 passes)."""

    task: str
    seconds: float
    ok: bool
    worst: float
    message: str = ""


def random_bfp_inputs(task: BfpTask, seed: int = 0) -> dict[str, np.ndarray]:
    """Random kernel arguments ``KERNEL_INPUTS`` for ``task`` and the reference's unpacked
    operands (``qw_rows`` [N, Kp], ``ew_rows`` [N, nb])."""
    rng = np.random.default_rng(seed)
    m, n, k, block = task.m, task.n, task.k, task.fmt_a.block_size
    a = rng.standard_normal((m, k)).astype(np.float32) * np.exp2(rng.integers(-20, 20, (m, 1))).astype(np.float32)
    a[:, rng.integers(0, k // block) * block:][:, :block] = 0.0  # a ReLU-like all-zero block
    w = (rng.standard_normal((n, k)) * np.exp2(rng.integers(-12, 4, (n, 1)))).astype(np.float32)
    w[rng.integers(0, n)] = 0.0
    acts = quantize_activations_np(a, task.fmt_a)
    packed = pack_weights(w, task.fmt_w)
    return {"qa": acts["qa"], "ea": acts["ea"], "qw": packed.qw, "ew": packed.ew,
            "qw_rows": packed.mantissas()[:n], "ew_rows": packed.ew[:, :n].T}


def check_kernel(task: BfpTask, run: Callable, seed: int = 0) -> float:
    """Run the kernel on random BFP data and compare with the integer reference.

    ``run(qa, ea, qw, ew)`` (NumPy arrays) returns the kernel's C (see :func:`kernel_runner`).

    Returns
    -------
    float
        max |C - bfp_matmul_ref| / bfp_matmul_tolerance over the outputs (inf for NaN or a
        nonzero error where the tolerance is 0); the kernel is right when it is <= 1.
    """
    data = random_bfp_inputs(task, seed)
    got = np.asarray(run(*(data[name] for name in KERNEL_INPUTS))).astype(np.float64)
    ref_args = (data["qa"], data["ea"], data["qw_rows"], data["ew_rows"], task.fmt_a.block_size,
                task.fmt_a.mantissa_bits, task.fmt_w.mantissa_bits)
    error = np.abs(got - bfp_matmul_ref(*ref_args).astype(np.float64))
    bound = bfp_matmul_tolerance(*ref_args)
    if not np.all(np.isfinite(error)):
        return float("inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0, 0.0, error / bound)
    return float(ratio.max())


def schedule_from_record(task: BfpTask, record) -> Schedule:
    """Replay ``record``'s trace on the task's kernel."""
    register_metaschedule_intrinsics()
    sch = Schedule(tvm.IRModule({"main": task.prim_func()}))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def kernel_runner(task: BfpTask, executable, preset: TargetPreset, scratch_dir: str) -> Callable:
    """``run(*inputs) -> C`` for a compiled task kernel: here, or for an emulated target through
    the qemu kernel runner (the library is cross-exported into ``scratch_dir``)."""
    if preset.is_native:
        def run(*arrays):
            dev = tvm.cpu()
            out = tvm.runtime.tensor(np.full((task.m, task.n), np.nan, np.float32), dev)
            executable.mod[task.name](*(tvm.runtime.tensor(a, dev) for a in arrays), out)
            return out.numpy()
        return run
    from ..targets.cross import export
    from ..targets.emulation import run_kernel_emulated

    lib = export(executable, os.path.join(scratch_dir, f"{task.name}.so"), preset)
    return lambda *arrays: run_kernel_emulated(lib, task.name, arrays, [((task.m, task.n), "float32")], preset)[0]


def _verify_record(task: BfpTask, record, preset: TargetPreset, seed: int) -> Verdict:
    seconds = record_seconds(record)
    try:
        executable = tvm.compile(schedule_from_record(task, record).mod, target=preset.tvm_target())
        with tempfile.TemporaryDirectory(prefix="bitq-verify-") as scratch:
            worst = check_kernel(task, kernel_runner(task, executable, preset, scratch), seed)
    except Exception as err:  # noqa: BLE001 - a record that does not rebuild is simply not trusted
        return Verdict(task.name, seconds, False, float("inf"), f"does not rebuild: {str(err).splitlines()[0]}")
    message = "" if worst <= 1.0 else f"wrong numbers: error {worst:.3g} x the tolerance"
    return Verdict(task.name, seconds, worst <= 1.0, worst, message)


def _record_id(record) -> str:
    return f"{record_seconds(record)!r}:{hashlib.sha1(str(record.trace).encode()).hexdigest()[:16]}"


def verify_tasks(work_dir: str, tasks: Sequence[BfpTask], preset: TargetPreset, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, tuple[object, list[Verdict]]]:
    """For each task: (its fastest record that computes right numbers or None, verdicts checked).

    Records are checked fastest first and only until one passes. Targets that run neither here
    nor under an emulator (no ``emulator``) raise BitqError: verify them on the device.
    """
    if not preset.is_native and preset.emulator is None:
        raise BitqError(f"verification runs kernels on this host or under qemu; target '{preset.name}' does neither")
    database = open_database(work_dir)
    cache_path = os.path.join(work_dir, VERIFIED_FILE)
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    say = progress or (lambda message: None)
    found = records_by_task(database, tasks)
    outcome = {}
    for task in tasks:
        verdicts, trusted = [], None
        measured = sorted((r for r in found[task.name] if record_seconds(r) < FAILED_RUN_SECS), key=record_seconds)
        for record in measured:
            key = f"{task.name}|{_record_id(record)}"
            if key in cache:
                verdict = Verdict(**cache[key])
            else:
                verdict = _verify_record(task, record, preset, seed)
                cache[key] = dataclasses.asdict(verdict)
            verdicts.append(verdict)
            if verdict.ok:
                trusted = record
                break
            say(f"{task.name}: record of {verdict.seconds * 1e6:.1f} us rejected ({verdict.message})")
        outcome[task.name] = (trusted, verdicts)
    write_json(cache_path, cache)
    return outcome


def trusted_records(work_dir: str, tasks: Sequence[BfpTask], preset: TargetPreset) -> dict[str, object]:
    """Task name -> its fastest verified record, when it beats the task's default schedule as the
    session measured it (:func:`~.session.default_seconds`; work dirs without that measurement keep
    the record). Tasks left out compile with the default schedule: a database never slows one down
    as measured."""
    defaults = default_seconds(work_dir)
    return {name: record for name, (record, _) in verify_tasks(work_dir, tasks, preset).items()
            if record is not None and record_seconds(record) < defaults.get(name, FAILED_RUN_SECS)}


def tuned_prim_funcs(work_dir: str, tasks: Sequence[BfpTask], preset: TargetPreset) -> dict[str, object]:
    """Task name -> its verified tuned PrimFunc, for compiling with a tuning database.

    Tasks without a verified record are left out: compile them with the default schedules.
    """
    from .session import open_work_dir

    open_work_dir(work_dir, preset, create=False)
    return {name: schedule_from_record(task, record).mod["main"]
            for task in tasks for name, record in trusted_records(work_dir, [task], preset).items()}
