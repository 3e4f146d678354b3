"""The BitQ planner: measured accuracy term + DM performance term -> exact allocation -> Plan.

Objectives (exactly one):

* ``lam`` (``--lambda L``): BitQ's weighted score ``sum loss + L * sum perf / perf_ref``;
* ``budget`` (``--budget 0.5%``): least total perf with predicted loss <= budget. The budget's unit
  is the top-1 drop as a fraction (``0.5%`` = half a top-1 point) when the calibration data has
  labels, else the relative logit MSE ``sum (y_q - y)^2 / sum y^2`` (``0.5%`` = 0.005);
* ``size_budget`` (``--size-budget MB``): least predicted loss with layer weights <= MB * 10^6
  bytes, as the deployed artifact stores them (:mod:`.deployment`: packed mantissas, int8
  exponents, padding; float fallbacks at FP32).

The MILP's accuracy term is always the additive relative logit MSE; a top-1 budget goes through
the measured curve (:mod:`.accuracy`). :func:`verify` compiles the plan with TVM and measures its
true loss on data, for the predicted-vs-measured (additivity) check.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from ..errors import BitqError
from ..frontend.onnx_model import Layer, OnnxModel, loss_view
from ..plan import LayerFormats, Plan
from ..support.progress import say
from ..targets.presets import TargetPreset, get_target
from ..evaluation import argmax_agreement, head_rel_mse, top1
from .accuracy import Calibration, AccuracyTerm, NoiseGraph, measure_accuracy_term
from .candidates import LayerCandidates
from .milp import pareto_front, solve
from .performance import Measured, PerformanceTerm, performance_term
from .problem import Allocation, AllocationProblem

OBJECTIVES = ("lambda", "budget", "size_budget")
BYTES_PER_MB = 1_000_000


def parse_budget(text: str, option: str = "--budget") -> float:
    """``0.5%`` -> 0.005; a plain number is taken as a fraction."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BitqError(f"{option} '{text}': expected a number or a percentage like 0.5%") from None
    if not np.isfinite(value) or value < 0:
        raise BitqError(f"{option} '{text}': must be finite and >= 0")
    return value


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the planner optimises: ``kind`` in lambda, budget, size_budget and its value.

    ``budget`` is in the accuracy term's user unit (see the module docstring); ``size_budget`` in MB.
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise BitqError(f"objective must be one of {OBJECTIVES}, got {self.kind!r}")
        if not np.isfinite(self.value) or self.value < 0:
            raise BitqError(f"{self.kind} must be finite and >= 0, got {self.value}")

    def describe(self, unit: str = "") -> str:
        if self.kind == "lambda":
            return f"min loss + {self.value:g} x perf/perf_ref"
        if self.kind == "budget":
            return f"min perf s.t. predicted loss <= {_show_loss(self.value, unit)}"
        return f"min loss s.t. weights <= {self.value:g} MB"


def _show_loss(value: float, unit: str) -> str:
    return f"{value * 100:.3g}% {unit}" if unit else f"{value:.4g}"


def weight_size_bytes(layer: Layer, candidate: LayerFormats, deployed: bool = True) -> int:
    """Bytes of the layer's weight under ``candidate``: as deployed (the integer kernel's packed
    storage, padding and exponents included; float fallbacks at FP32), or, with ``deployed=False``,
    bit-packed m bits per element plus E bits per block (ragged-block padding not stored)."""
    if deployed:
        from .deployment import deployed_cost

        return deployed_cost(layer, candidate).weight_bytes
    return layer.bitpacked_weight_bytes(candidate.weight)


@dataclasses.dataclass(frozen=True, eq=False)
class PlanResult:
    """Everything the planner measured and decided; ``plan`` is the hand-off to the compiler."""

    model: OnnxModel
    target: str
    candidates: Mapping[str, tuple[LayerFormats, ...]]
    accuracy: AccuracyTerm
    performance: PerformanceTerm
    problem: AllocationProblem
    objective: Objective
    allocation: Allocation
    front: tuple[Allocation, ...]
    uniforms: tuple[tuple[str, Allocation], ...]
    plan: Plan

    def candidate(self, layer: str, label: str) -> LayerFormats:
        return next(c for c in self.candidates[layer] if c.label == label)

    def average_weight_bits(self, allocation: Allocation) -> float:
        """Stored weight bits per parameter (mantissas + shared exponents) of ``allocation``."""
        params = sum(layer.params for layer in self.model.layers)
        return 8.0 * allocation.size_bytes / params

    def dram_bytes(self, allocation: Allocation) -> float:
        """Predicted DRAM traffic (DM model) of ``allocation``."""
        return sum(self.performance.model_costs[name][label].dram_bytes
                   for name, label in allocation.as_dict().items())

    def predicted(self, allocation: Allocation) -> float:
        """Predicted loss of ``allocation`` in the user unit."""
        return self.accuracy.to_user_units(allocation.acc_loss)


def build_problem(model: OnnxModel, candidates: Mapping[str, tuple[LayerFormats, ...]], accuracy: AccuracyTerm,
                  performance: PerformanceTerm, ties=(), deployed: bool = True) -> AllocationProblem:
    """The allocation problem: per layer and candidate, predicted loss, performance cost and weight bytes."""
    names = [layer.name for layer in model.layers]
    return AllocationProblem(
        layer_names=names,
        candidates=[[c.label for c in candidates[n]] for n in names],
        acc_loss=[[accuracy.layer_loss(n, c) for c in candidates[n]] for n in names],
        perf=[[performance.cost[n][c.label] for c in candidates[n]] for n in names],
        size_bytes=[[weight_size_bytes(layer, c, deployed) for c in candidates[layer.name]] for layer in model.layers],
        ties=tuple(tuple(group) for group in ties))


def uniform_points(problem: AllocationProblem, labels) -> list[tuple[str, Allocation]]:
    """Per label, the allocation using it on every layer that has it (the equal-bitwidth baselines);
    layers without it (pinned) take their lowest-loss candidate."""
    points = []
    for label in labels:
        if not any(label in c for c in problem.candidates):
            continue
        picks = [c.index(label) if label in c else int(np.argmin(loss))
                 for c, loss in zip(problem.candidates, problem.acc_loss)]
        points.append((label, problem.allocation(picks)))
    return points


def solve_objective(problem: AllocationProblem, accuracy: AccuracyTerm, objective: Objective) -> Allocation:
    """Solve ``problem`` for ``objective`` (budgets converted to the MILP's units)."""
    if objective.kind == "lambda":
        return solve(problem, lam=objective.value)
    if objective.kind == "size_budget":
        smallest = problem.smallest_total("size_bytes")
        if objective.value * BYTES_PER_MB < smallest:
            raise BitqError(f"--size-budget {objective.value:g} MB is infeasible: the smallest achievable layer "
                            f"weight size with these candidates is {smallest / BYTES_PER_MB:.6g} MB")
        return solve(problem, size_budget=objective.value * BYTES_PER_MB)
    mse_budget = accuracy.from_user_units(objective.value)
    smallest = problem.smallest_total("acc_loss")
    if mse_budget < smallest:
        best = accuracy.to_user_units(smallest)
        raise BitqError(f"--budget {objective.value * 100:.4g}% ({accuracy.unit}) is infeasible: the best achievable "
                        f"predicted loss with these candidates is {best * 100:.4g}% (relative logit MSE "
                        f"{smallest:.3g}); raise the budget or add higher-precision candidates")
    return solve(problem, acc_budget=min(mse_budget, 1e300))


def plan_model(model: OnnxModel, calib: Calibration, objective: Objective, target: str | TargetPreset = "host",
               candidates: LayerCandidates | None = None, ties=(), measured: Measured | None = None,
               noise: str = "quantization", progress=say, deployed: bool = True,
               estimated: Mapping[tuple[str, str], float] | None = None, probe_levels: int = 1) -> PlanResult:
    """Measure the accuracy and performance terms and solve for ``objective``.

    Parameters
    ----------
    model : OnnxModel
    calib : Calibration
        Calibration samples; labels switch the budget unit to the top-1 drop.
    objective : Objective
    target : str or TargetPreset
        Target preset whose memory hierarchy and compute feed the DM model.
    candidates : LayerCandidates, optional
        Candidate grid and pins (default: :class:`CandidateSet` defaults, no pins).
    ties : sequence of sequences of str
        Groups of layers that must take the same candidate.
    measured : mapping or callable, optional
        Measured latencies overriding the DM model (see :func:`performance_term`).
    estimated : mapping, optional
        llvm-mca latency estimates (:func:`.mca_cost.candidate_estimates`), used where nothing
        is measured and labelled as estimates.
    noise : {"quantization", "gaussian"}
        Noise injected to measure sensitivities.
    probe_levels : {1, 2}
        Sensitivity probes per tensor: at the noisiest candidate, or also at the quietest
        (:func:`.accuracy.measure_accuracy_term`).
    deployed : bool
        Price candidates as ``compile --deploy`` runs them (:mod:`.deployment`, default): layers
        take only candidates that become integer kernels (FP32 if none does, e.g. 3-channel stems;
        pinned layers keep their pins at their fallback cost), weight bytes and traffic are the
        deployed ones. ``False``: BitQ's nominal m + E/B bits for every candidate.

    Returns
    -------
    PlanResult
    """
    preset = get_target(target) if isinstance(target, str) else target
    candidates = candidates or LayerCandidates()
    names = [layer.name for layer in model.layers]
    table = candidates.resolve(names)
    if deployed:
        from .deployment import deployable_candidates

        table, notes = deployable_candidates(model, table, candidates.pinned(names))
        if progress:
            for name, note in notes.items():
                progress(f"{name}: {note}")
        if isinstance(measured, Mapping):  # latencies of candidates deployment dropped do not apply
            kept = {(name, c.label) for name, cands in table.items() for c in cands}
            measured = {key: value for key, value in measured.items() if key in kept}
        if estimated:
            kept = {(name, c.label) for name, cands in table.items() for c in cands}
            estimated = {key: value for key, value in estimated.items() if key in kept}
    accuracy = measure_accuracy_term(model, calib, table, noise=noise, progress=progress,
                                     budget=objective.value if objective.kind == "budget" else None,
                                     probe_levels=probe_levels)
    performance = performance_term(model, preset, table, measured, deployed=deployed, estimated=estimated)
    if deployed:
        table = _drop_dominated(model, table, accuracy, performance, ties, candidates.pinned(names))
    problem = build_problem(model, table, accuracy, performance, ties, deployed=deployed)
    allocation = solve_objective(problem, accuracy, objective)
    front = tuple(pareto_front(problem))
    labels = dict.fromkeys(c.label for n in problem.layer_names for c in table[n])
    uniforms = tuple(uniform_points(problem, labels))
    result = PlanResult(model, preset.name, table, accuracy, performance, problem, objective, allocation, front,
                        uniforms, Plan())
    plan = allocation_plan(result, allocation)
    if progress:
        progress(f"plan: {objective.describe(accuracy.unit)}: predicted loss "
                 f"{_show_loss(result.predicted(allocation), accuracy.unit if accuracy.curve else '')}, "
                 f"{result.average_weight_bits(allocation):.2f} weight bits/param, perf {allocation.perf:.4g} "
                 f"{performance.unit}")
    return dataclasses.replace(result, plan=plan)


def _drop_dominated(model, table, accuracy, performance, ties, pinned):
    """Drop candidates that deploy at exactly the cost of another one with less predicted loss
    (e.g. 6-bit activations: the kernel reads int8 mantissas either way). Tied and pinned layers
    keep theirs (ties compare labels across layers)."""
    tied = {name for group in ties for name in group}
    out = {}
    for layer in model.layers:
        cands = table[layer.name]
        if layer.name in tied or layer.name in pinned or len(cands) == 1:
            out[layer.name] = cands
            continue
        best = {}
        for c in cands:
            key = (performance.cost[layer.name][c.label], weight_size_bytes(layer, c))
            loss = accuracy.layer_loss(layer.name, c)
            if key not in best or loss < best[key][0]:
                best[key] = (loss, c)
        keep = {c.label for _, c in best.values()}
        out[layer.name] = tuple(c for c in cands if c.label in keep)
    return out


def allocation_plan(result: PlanResult, allocation: Allocation) -> Plan:
    """The Plan of ``allocation``: per layer its formats and, as info, predicted loss, traffic, cost, size."""
    layers = {}
    for index, (name, label) in enumerate(allocation.as_dict().items()):
        candidate = result.candidate(name, label)
        cost = result.performance.model_costs[name][label]
        q = allocation.choices[index]
        info = {"candidate": label,
                "predicted_loss": float(result.problem.acc_loss[index][q]),
                "dram_bytes": cost.dram_bytes, "onchip_bytes": cost.onchip_bytes, "dm_cost": cost.total,
                "perf": float(result.problem.perf[index][q]),
                "weight_bytes": int(result.problem.size_bytes[index][q])}
        if (name, label) in result.performance.measured:
            info["latency_s"] = result.performance.measured[(name, label)]
        info["perf_source"] = result.performance.source(name, label)
        layers[name] = LayerFormats(candidate.weight, candidate.activation, info)
    acc = result.accuracy
    meta = {"planner": {
        "model": result.model.path, "target": result.target,
        "objective": {"kind": result.objective.kind, "value": result.objective.value},
        "loss_unit": acc.unit, "predicted_loss": result.predicted(allocation),
        "predicted_logit_mse": allocation.acc_loss, "perf": allocation.perf, "perf_unit": result.performance.unit,
        "dram_bytes": result.dram_bytes(allocation), "weight_bytes": allocation.size_bytes,
        "average_weight_bits": result.average_weight_bits(allocation),
        "calibration_samples": acc.n_samples, "noise": acc.noise_kind, "probe_levels": acc.probe_levels}}
    return Plan(layers=layers, meta=meta)


@dataclasses.dataclass(frozen=True)
class Verification:
    """Predicted vs measured loss of one plan (measured: TVM BFP simulation vs FP32 on the data)."""

    predicted_logit_mse: float
    measured_logit_mse: float
    predicted: float
    measured: float
    unit: str
    samples: int
    top1_fp32: float | None = None
    top1_plan: float | None = None
    agreement: float = 1.0

    @property
    def ratio(self) -> float:
        """measured / predicted relative logit MSE (1 = perfectly additive prediction)."""
        return self.measured_logit_mse / max(self.predicted_logit_mse, 1e-300)


def verify(model: OnnxModel, plan: Plan, calib: Calibration, accuracy: AccuracyTerm | None = None,
           target: str = "host", predicted_mse: float | None = None, progress=say) -> Verification:
    """Compile ``plan`` with TVM, run it on ``calib`` and compare with the FP32 model.

    ``predicted_mse`` defaults to the sum of the plan's per-layer ``predicted_loss`` infos.
    """
    from ..api import compile_model

    model = loss_view(model)  # measured in the unit (and on the heads) the accuracy term predicts in
    batches = calib.batches(model)
    labels = calib.used_labels(model)
    graph = NoiseGraph(model)
    reference = [graph.run(b) for b in batches]
    del graph
    compiled = compile_model(model, plan, target, progress=progress)
    outputs = [tuple(compiled.run(b)) for b in batches]
    measured = head_rel_mse(outputs, reference)
    if predicted_mse is None:
        predicted_mse = sum(float(lf.info.get("predicted_loss", 0.0)) for lf in plan.layers.values())
    outputs, reference = [o[0] for o in outputs], [r[0] for r in reference]  # labels and argmax: the first head
    agreement = argmax_agreement(outputs, reference)
    samples = sum(len(r) for r in reference)
    if labels is not None:
        top1_fp32, top1_plan = top1(reference, labels), top1(outputs, labels)
        predicted = accuracy.to_user_units(predicted_mse) if accuracy is not None else float("nan")
        return Verification(predicted_mse, measured, predicted, top1_fp32 - top1_plan,
                            "top-1 drop", samples, top1_fp32, top1_plan, agreement)
    return Verification(predicted_mse, measured, predicted_mse, measured, "relative logit MSE", samples,
                        agreement=agreement)
