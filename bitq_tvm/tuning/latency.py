"""Measured latency -> the optimiser's performance term.

Per BFP task, the best measured ``run_secs`` in the work dir's database (failed trials, 1e10, are
ignored; with ``verified=True`` only records that passed :mod:`~bitq_tvm.tuning.verify`). A layer
candidate's latency is its task's time x the layer's calls (conv groups). Candidates whose task
was not measured are predicted by an XGBoost regressor fitted on the measured ones; measured
values always win. :attr:`LatencyTable.seconds` is the ``measured`` argument of
:func:`bitq_tvm.solver.performance.performance_term`.

The regressor predicts log(seconds per MAC) from shape/format/target features and multiplies by
the MACs: trees cannot extrapolate, and most of a GEMM's time scales with its MACs, so the
learned part is the (bounded) efficiency, not the (unbounded) size.

How far to trust each source is reported (:class:`LatencyReport`): Spearman rank correlation and
median relative error against the measured points, of the regressor (cross-validated: each point
predicted by a model that saw no task of its GEMM shape) and of the analytic DM model (its costs
scaled to seconds by the least-squares factor, as the performance term does).
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from ..errors import BitqError
from ..frontend.onnx_model import OnnxModel
from ..kernels.contract import LANES, padded
from ..plan import LayerFormats
from ..targets.presets import TargetPreset
from ..support.tables import format_table
from .session import FAILED_RUN_SECS, default_seconds, open_database, record_seconds, records_by_task
from .tasks import BfpTask, extract_bfp_tasks

__all__ = ["FEATURE_NAMES", "LatencyEntry", "LatencyReport", "LatencyTable", "task_features",
           "fit_regressor", "measured_task_seconds", "latency_table", "latency_table_from_work_dir"]

FEATURE_NAMES = ("log2_m", "log2_n", "log2_k", "log2_macs", "block_size", "blocks", "act_bits", "weight_bits",
                 "log2_weight_bytes", "log2_act_bytes", "n_lane_waste", "vector_bits", "target_macs_per_cycle")
# Fewer points than this give no regressor (and no rank correlation worth reporting).
MIN_POINTS_TO_FIT = 3


def _call_macs(task: BfpTask) -> int:
    return task.m * task.n * task.k


def task_features(task: BfpTask, preset: TargetPreset) -> list[float]:
    """Features of one GEMM (shape, formats, target), in :data:`FEATURE_NAMES` order."""
    m, n, k, block = task.m, task.n, task.k, task.fmt_a.block_size
    n_padded = padded(n, LANES)
    return [math.log2(m), math.log2(n), math.log2(k), math.log2(_call_macs(task)), block, k // block,
            task.fmt_a.mantissa_bits, task.fmt_w.mantissa_bits,
            math.log2(n * k * task.fmt_w.mantissa_bits / 8), math.log2(m * k * task.fmt_a.mantissa_bits / 8),
            (n_padded - n) / n_padded, preset.vector_bits, preset.int8_macs_per_cycle]


def fit_regressor(features: np.ndarray, seconds: np.ndarray, macs: np.ndarray, seed: int = 0):
    """XGBoost on log(seconds / MAC); returns ``predict(features, macs) -> seconds``."""
    import xgboost

    model = xgboost.XGBRegressor(n_estimators=200, max_depth=3, learning_rate=0.1, min_child_weight=1.0,
                                 subsample=1.0, random_state=seed, n_jobs=1)
    model.fit(np.asarray(features, float), np.log(np.asarray(seconds) / np.asarray(macs)))

    def predict(x: np.ndarray, x_macs: np.ndarray) -> np.ndarray:
        return np.exp(model.predict(np.asarray(x, float))) * np.asarray(x_macs, float)

    return predict


@dataclasses.dataclass(frozen=True)
class LatencyEntry:
    """Latency of one (layer, candidate): ``source`` is ``measured`` or ``predicted``."""

    seconds: float
    source: str
    task: str

    def __post_init__(self):
        if self.source not in ("measured", "predicted"):
            raise BitqError(f"latency entry source must be measured or predicted, got {self.source!r}")
        if not self.seconds > 0:
            raise BitqError(f"latency entry for task {self.task}: seconds must be positive, got {self.seconds}")


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    """Agreement of the regressor and of the DM model with the measured task latencies."""

    measured_points: int
    predicted_points: int
    regressor_spearman: float | None
    regressor_median_rel_error: float | None
    dm_spearman: float | None
    dm_median_rel_error: float | None

    def markdown(self) -> str:
        def fmt(value, pct=False):
            return "n/a" if value is None else (f"{value * 100:.1f}%" if pct else f"{value:.3f}")

        rows = [("XGBoost regressor (cross-validated by shape)", fmt(self.regressor_spearman),
                 fmt(self.regressor_median_rel_error, True)),
                ("analytic DM model (scaled to seconds)", fmt(self.dm_spearman), fmt(self.dm_median_rel_error, True))]
        return (format_table(["source", "Spearman vs measured", "median relative error"], rows)
                + f"\n\n{self.measured_points} measured task(s); "
                f"{self.predicted_points} (layer, candidate) latencies predicted")


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """(layer, candidate label) -> :class:`LatencyEntry`, and the report on its sources."""

    entries: Mapping[tuple[str, str], LatencyEntry]
    report: LatencyReport

    @property
    def seconds(self) -> Mapping[tuple[str, str], float]:
        """``{(layer, label): seconds}``: the ``measured`` argument of ``performance_term``."""
        return MappingProxyType({key: e.seconds for key, e in self.entries.items()})


def measured_task_seconds(work_dir: str, tasks: Sequence[BfpTask], preset: TargetPreset,
                          verified: bool = True) -> dict[str, float]:
    """Task name -> best measured seconds (failed trials ignored; verified records only if asked).

    With ``verified``: the kernel deployment runs, i.e. the trusted tuned record, or the default
    schedule's measurement where that beat every record (:func:`.verify.trusted_records`).
    """
    if verified and (preset.is_native or preset.emulator is not None):
        from .verify import trusted_records

        trusted = {name: record_seconds(r) for name, r in trusted_records(work_dir, tasks, preset).items()}
        defaults = default_seconds(work_dir)
        return {**{t.name: defaults[t.name] for t in tasks if t.name in defaults}, **trusted}
    found = records_by_task(open_database(work_dir), tasks)
    best = {}
    for name, records in found.items():
        good = [s for s in map(record_seconds, records) if s < FAILED_RUN_SECS]
        if good:
            best[name] = min(good)
    return best


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < MIN_POINTS_TO_FIT or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _median_rel_error(predicted, measured) -> float:
    return float(np.median(np.abs(np.asarray(predicted) / np.asarray(measured) - 1)))


def _cross_validated(features, seconds, macs, shapes, seed) -> np.ndarray | None:
    """Each point predicted by a regressor that saw no task of its GEMM shape (group k-fold, k <= 5).

    Grouping by shape matters: formats of one shape run at nearly one speed (int8 storage), so a
    fold holding out a task but fitting its same-shape twin would flatter the regressor. None with
    fewer than two shapes.
    """
    from sklearn.model_selection import GroupKFold

    groups = np.unique(shapes, axis=0, return_inverse=True)[1].reshape(-1)
    if groups.max() < 1:
        return None
    predicted = np.empty(len(seconds))
    for train, test in GroupKFold(n_splits=min(5, groups.max() + 1)).split(features, groups=groups):
        predict = fit_regressor(features[train], seconds[train], macs[train], seed)
        predicted[test] = predict(features[test], macs[test])
    return predicted


def latency_table(model: OnnxModel, candidates: Mapping[str, Sequence[LayerFormats]], preset: TargetPreset,
                  task_seconds: Mapping[str, float], seed: int = 0,
                  model_costs: Mapping[str, Mapping[str, object]] | None = None) -> LatencyTable:
    """Latencies of every (layer, BFP candidate) of ``model`` from measured task times.

    Parameters
    ----------
    task_seconds : mapping
        Task name -> measured seconds (:func:`measured_task_seconds`); names of tasks the model
        does not have are an error (a database from another model or candidate set is fine: pass
        only what matches).
    model_costs : mapping, optional
        Layer -> label -> cost (with ``.total``) of an analytic model, e.g.
        ``bitq_tvm.solver.performance_term(...).model_costs`` (the DM model): the report then
        says how well it ranks the measured tasks. Passed in, so tuning does not depend on the
        solver that reads its records.
    """
    tasks = {t.name: t for t in extract_bfp_tasks(model, candidates, preset)}
    unknown = sorted(set(task_seconds) - set(tasks))
    if unknown:
        raise BitqError(f"measured latency for task {unknown[0]}, which model {model.name} does not have")
    names = sorted(task_seconds)
    features = np.array([task_features(tasks[n], preset) for n in names], float).reshape(len(names), -1)
    seconds = np.array([task_seconds[n] for n in names], float)
    macs = np.array([_call_macs(tasks[n]) for n in names], float)
    predict = fit_regressor(features, seconds, macs, seed) if len(names) >= MIN_POINTS_TO_FIT else None

    layer_calls = {layer.name: layer.groups for layer in model.layers}
    entries = {}
    for name, task in tasks.items():
        if name in task_seconds:
            per_call, source = task_seconds[name], "measured"
        elif predict is not None:
            per_call = float(predict(np.array([task_features(task, preset)]), np.array([_call_macs(task)]))[0])
            source = "predicted"
        else:
            continue
        for layer, label in task.users:
            entries[(layer, label)] = LatencyEntry(per_call * layer_calls[layer], source, name)

    regressor_spearman = regressor_error = dm_spearman = dm_error = None
    if len(names) >= MIN_POINTS_TO_FIT:
        shapes = np.array([(tasks[n].m, tasks[n].n, tasks[n].k) for n in names])
        cv = _cross_validated(features, seconds, macs, shapes, seed)
        if cv is not None:
            regressor_spearman, regressor_error = _spearman(cv, seconds), _median_rel_error(cv, seconds)
        if model_costs is not None:
            dm_cost = np.array([model_costs[tasks[n].users[0][0]][tasks[n].users[0][1]].total
                                / layer_calls[tasks[n].users[0][0]] for n in names])  # per call, like the measured times
            scale = float(dm_cost @ seconds / (dm_cost @ dm_cost))
            dm_spearman, dm_error = _spearman(dm_cost, seconds), _median_rel_error(dm_cost * scale, seconds)
    predicted = sum(e.source == "predicted" for e in entries.values())
    report = LatencyReport(len(names), predicted, regressor_spearman, regressor_error, dm_spearman, dm_error)
    return LatencyTable(MappingProxyType(entries), report)


def latency_table_from_work_dir(work_dir: str, model: OnnxModel, candidates: Mapping[str, Sequence[LayerFormats]],
                                preset: TargetPreset, verified: bool = True,
                                model_costs: Mapping[str, Mapping[str, object]] | None = None) -> LatencyTable:
    """:func:`latency_table` of the tasks ``model`` x ``candidates`` measured in ``work_dir``.

    For ``bitq-tvm plan --tuning-db DB``: pass ``table.seconds`` as ``measured`` to
    :func:`bitq_tvm.solver.performance.performance_term`.
    """
    from .session import open_work_dir

    open_work_dir(work_dir, preset, create=False)
    tasks = extract_bfp_tasks(model, candidates, preset)
    return latency_table(model, candidates, preset, measured_task_seconds(work_dir, tasks, preset, verified),
                         model_costs=model_costs)
