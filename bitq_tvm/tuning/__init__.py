"""Autotuning: MetaSchedule sessions over a model's BFP kernels, their database, and the latency table.

- :mod:`.tasks`: one task per distinct (GEMM shape, BFP format pair, target) + the FP32 work;
- :mod:`.session`: budgeted, resumable tuning into a work dir (JSON database + manifest);
- :mod:`.verify`: tuned kernels are checked against the NumPy reference before they are trusted;
- :mod:`.latency`: measured latencies + an XGBoost regressor -> the optimiser's performance term;
- :mod:`.remote`: measuring on devices of a TVM RPC tracker.

The ``bitq-tvm tune`` command is :mod:`bitq_tvm.cli.tune`.

Names are imported lazily (``from bitq_tvm.tuning import tune``), so ``bitq-tvm --help`` does not
load TVM.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BfpTask": "tasks", "Fp32Task": "tasks", "TaskSet": "tasks", "extract_tasks": "tasks",
    "extract_bfp_tasks": "tasks", "extract_fp32_tasks": "tasks",
    "TuningOptions": "session", "TuningSummary": "session", "tune": "session", "split_trials": "session",
    "open_work_dir": "session", "repair_database": "session",
    "verify_tasks": "verify", "trusted_records": "verify", "tuned_prim_funcs": "verify",
    "LatencyTable": "latency", "latency_table": "latency", "latency_table_from_work_dir": "latency",
    "measured_task_seconds": "latency",
    "check_tracker": "remote", "remote_builder_runner": "remote",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
