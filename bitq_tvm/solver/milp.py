"""Exact allocation by mixed-integer linear programming (SciPy's HiGHS).

Binary ``y[l, q]`` picks candidate q for layer l; ``sum_q y[l, q] = 1`` per layer; tied layers
satisfy ``y[l, q] == y[l', q']`` for equal labels (labels not shared by the whole tie component
are fixed to 0). Before HiGHS runs, exact Lagrangian reduced-cost fixing drops the candidates
that provably cannot be optimal, which keeps 100+ layers x dozens of candidates well under a
second. The performance term enters BitQ's weighted score normalised by
``problem.perf_ref`` (total perf with every layer at its most expensive candidate, BitQ's DM_max),
so ``lam`` is unit-free: ``score = sum acc_loss + lam * sum perf / perf_ref``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix

from ..errors import BitqError
from .problem import Allocation, AllocationProblem

# HiGHS stops at a 1e-4 relative / 1e-6 absolute gap and accepts 1e-6 / 1e-7 violations by
# default; losses of 1e-5 make that inexact. All but mip_rel_gap go to HiGHS verbatim.
_HIGHS_OPTIONS = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "mip_feasibility_tolerance": 1e-9,
                  "primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-10}
_BUDGET_WORDS = {
    "acc_loss": ("accuracy-loss budget", "predicted loss"),
    "perf": ("performance budget", "total performance cost"),
    "size_bytes": ("size budget", "total size in bytes"),
}


def solve(problem: AllocationProblem, *, lam: float | None = None,
          acc_budget: float | None = None, perf_budget: float | None = None,
          size_budget: float | None = None) -> Allocation:
    """Optimal allocation for one objective.

    The objective is BitQ's weighted score ``sum acc + lam * sum perf / perf_ref`` if ``lam`` is
    given, else total perf if ``acc_budget`` is given, else total accuracy loss. Every budget
    given is a constraint ``sum metric <= budget``.

    Parameters
    ----------
    problem : AllocationProblem
    lam : float, optional
        Weight (>= 0, unit-free) of the normalised performance term.
    acc_budget, perf_budget, size_budget : float, optional
        Upper bounds on the summed accuracy loss, perf and size.

    Returns
    -------
    Allocation

    Raises
    ------
    BitqError
        No objective given, or a budget below the smallest achievable total (the message states
        that total), or budgets that cannot hold together.
    """
    budgets = {metric: budget for metric, budget in (
        ("acc_loss", acc_budget), ("perf", perf_budget), ("size_bytes", size_budget))
        if budget is not None}
    if lam is None and not budgets:
        raise BitqError("solve needs lam or a budget (acc_budget, perf_budget or size_budget)")
    if lam is not None and (not np.isfinite(lam) or lam < 0):
        raise BitqError(f"lam must be finite and >= 0, got {lam}")
    for metric, budget in budgets.items():
        word, total_word = _BUDGET_WORDS[metric]
        if not np.isfinite(budget):
            raise BitqError(f"{word} must be finite, got {budget}")
        smallest = problem.smallest_total(metric)
        if budget < smallest:
            raise BitqError(f"{word} {budget:.6g} is infeasible: the smallest achievable "
                            f"{total_word} is {smallest:.6g}")

    acc = np.concatenate(problem.acc_loss)
    perf = np.concatenate(problem.perf) / problem.perf_ref
    if lam is not None:
        objective = acc + lam * perf
    elif "acc_loss" in budgets:
        objective = perf
    else:
        objective = acc
    return _solve_milp(problem, objective, budgets)


@contextlib.contextmanager
def _stdout_silenced():
    """HiGHS 1.12 prints debug lines from C++ straight to file descriptor 1 on some budgeted
    solves, whatever its log options say; they would land in the middle of our tables."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _solve_milp(problem, objective, budgets) -> Allocation:
    sizes = [len(c) for c in problem.candidates]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_vars = int(offsets[-1])
    n_layers = len(sizes)
    choices = _Choices.build(problem, offsets)
    # Variables of labels a tie component does not share, or that provably cannot be optimal,
    # are fixed at 0; HiGHS' presolve then drops them.
    upper = np.zeros(n_vars)
    useful = np.ones(choices.count, dtype=bool)
    if len(budgets) <= 1:
        constraint, budget = next(((np.concatenate(getattr(problem, m)), b)
                                   for m, b in budgets.items()), (np.zeros(n_vars), 0.0))
        useful = _lagrangian_useful(choices, objective, constraint, budget)
    upper[choices.members[useful].indices] = 1.0

    rows, cols, vals = [np.repeat(np.arange(n_layers), sizes)], [np.arange(n_vars)], [
        np.ones(n_vars)]
    lower_rhs, upper_rhs = [np.ones(n_layers)], [np.ones(n_layers)]
    n_rows = n_layers
    for component in problem.tie_components():
        anchor = component[0]
        pairs = [(offsets[anchor] + problem.candidates[anchor].index(label),
                  offsets[layer] + problem.candidates[layer].index(label))
                 for layer in component[1:] for label in problem.shared_labels(component)]
        first, second = np.array(pairs).T
        tie_rows = n_rows + np.arange(len(pairs))
        rows += [tie_rows, tie_rows]
        cols += [first, second]
        vals += [np.ones(len(pairs)), -np.ones(len(pairs))]
        lower_rhs.append(np.zeros(len(pairs)))
        upper_rhs.append(np.zeros(len(pairs)))
        n_rows += len(pairs)
    for metric, budget in budgets.items():
        coefficients = np.concatenate(getattr(problem, metric))
        scale = max(float(np.abs(coefficients).max()), abs(budget), 1e-300)  # relative tolerances
        rows.append(np.full(n_vars, n_rows))
        cols.append(np.arange(n_vars))
        vals.append(coefficients / scale)
        lower_rhs.append([-np.inf])
        upper_rhs.append([budget / scale])
        n_rows += 1

    matrix = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(n_rows, n_vars)).tocsr()
    constraint = LinearConstraint(matrix, np.concatenate(lower_rhs), np.concatenate(upper_rhs))
    # HiGHS' tolerances are absolute: scale the objective to O(1) coefficients.
    objective = objective / max(float(np.abs(objective).max()), 1e-300)
    with warnings.catch_warnings(), _stdout_silenced():
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        result = milp(objective, integrality=np.ones(n_vars), bounds=Bounds(0.0, upper),
                      constraints=constraint, options=dict(_HIGHS_OPTIONS))
    if result.status == 2:
        described = ", ".join(f"{_BUDGET_WORDS[m][0]} {b:.6g}" for m, b in budgets.items())
        raise BitqError(f"budgets cannot all hold together: {described}")
    if result.status != 0 or result.x is None:
        raise RuntimeError(f"HiGHS failed on the allocation MILP: {result.message}")
    picks = [int(np.argmax(result.x[offsets[l]:offsets[l + 1]])) for l in range(n_layers)]
    return problem.allocation(picks)


@dataclass(frozen=True)
class _Choices:
    """The real decisions: per tie component (or untied layer), one shared label.

    ``members`` (choices x variables, 0/1) maps a choice to the variables it sets; ``group`` and
    ``slot`` place each choice in a padded (groups x max labels) matrix.
    """

    members: csr_matrix
    group: np.ndarray
    slot: np.ndarray
    n_groups: int
    n_slots: int

    @property
    def count(self) -> int:
        return self.members.shape[0]

    @classmethod
    def build(cls, problem: AllocationProblem, offsets) -> "_Choices":
        tied = problem.tie_components()
        in_ties = {layer for component in tied for layer in component}
        groups = tied + [[layer] for layer in range(len(problem.layer_names))
                         if layer not in in_ties]
        rows, cols, group_of, slot_of = [], [], [], []
        for g, layers in enumerate(groups):
            for k, label in enumerate(problem.shared_labels(layers)):
                for layer in layers:
                    rows.append(len(group_of))
                    cols.append(offsets[layer] + problem.candidates[layer].index(label))
                group_of.append(g)
                slot_of.append(k)
        members = csr_matrix((np.ones(len(rows)), (rows, cols)),
                             shape=(len(group_of), int(offsets[-1])))
        group, slot = np.array(group_of), np.array(slot_of)
        return cls(members, group, slot, len(groups), int(slot.max()) + 1)

    def padded(self, per_variable: np.ndarray, fill: float) -> np.ndarray:
        """(groups x slots) matrix of each choice's summed ``per_variable`` value."""
        matrix = np.full((self.n_groups, self.n_slots), fill)
        matrix[self.group, self.slot] = self.members @ per_variable
        return matrix


def _lagrangian_useful(choices: _Choices, objective, constraint, budget) -> np.ndarray:
    """Choices that can still be in an optimal allocation under ``constraint . y <= budget``.

    For any multiplier mu >= 0, ``L(mu) = sum_g min_k (f + mu c)[g, k] - mu * budget`` bounds the
    optimum from below, and fixing choice (g, k) raises that bound by its reduced cost
    ``(f + mu c)[g, k] - min_k (f + mu c)[g, k]``. A choice whose raised bound exceeds the value of
    a known feasible allocation cannot be optimal (exact reduced-cost fixing). mu is found by
    bisection on the subgradient; the feasible allocation is the Lagrangian minimiser at the
    feasible end. With no budget (mu = 0) only each group's best choices remain.
    """
    scale = max(float(np.abs(constraint).max()), abs(budget), 1e-300)
    f = choices.padded(objective, np.inf)
    c = choices.padded(constraint / scale, 0.0)
    bound = budget / scale
    rows = np.arange(choices.n_groups)

    def lagrangian(mu):
        scores = f + mu * c
        best = scores.argmin(axis=1)
        best_scores = scores[rows, best]
        return scores, best_scores, c[rows, best].sum(), f[rows, best].sum()

    multipliers = [0.0]
    if lagrangian(0.0)[2] > bound:
        low, high = 0.0, 1.0
        for _ in range(200):
            if lagrangian(high)[2] <= bound:
                break
            low, high = high, high * 2.0
        else:  # budget at the smallest total up to rounding: no certified feasible point
            return np.ones(choices.count, dtype=bool)
        for _ in range(60):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if lagrangian(middle)[2] > bound else (low, middle)
        multipliers = [low, high]
    feasible_value = _greedy_improve(f, c, bound, lagrangian(multipliers[-1])[0].argmin(axis=1))
    useful = np.ones_like(f, dtype=bool)
    for mu in multipliers:
        scores, best_scores, _, _ = lagrangian(mu)
        lower_bound = best_scores.sum() - mu * bound
        raised = lower_bound + scores - best_scores[:, None]
        useful &= raised <= feasible_value + 1e-9 * max(abs(feasible_value), abs(lower_bound),
                                                        1e-12)
    return useful[choices.group, choices.slot]


def _greedy_improve(f, c, bound, picks) -> float:
    """Objective of a feasible allocation reached from feasible ``picks`` by repeatedly taking the
    single-group switch that lowers the objective most while the budget still holds."""
    rows = np.arange(len(picks))
    picks = picks.copy()
    while True:
        slack = bound - c[rows, picks].sum()
        gain = f[rows, picks][:, None] - f
        gain[c - c[rows, picks][:, None] > slack] = 0.0
        group, slot = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[group, slot] <= 0.0:
            return float(f[rows, picks].sum())
        picks[group] = slot


def _exchange_rates(problem: AllocationProblem) -> np.ndarray:
    """Values of lam at which some layer (or tie component) may switch candidates.

    Without budgets the weighted score separates over tie components, so its optimum changes only
    where, for some component, two candidates' scores cross: lam = d(acc) / d(perf / perf_ref).
    """
    tied = problem.tie_components()
    groups = tied + [[i] for i in range(len(problem.layer_names))
                     if not any(i in c for c in tied)]
    rates = []
    for group in groups:
        labels = problem.shared_labels(group)
        acc = np.array([sum(problem.acc_loss[i][problem.candidates[i].index(label)]
                            for i in group) for label in labels])
        perf = np.array([sum(problem.perf[i][problem.candidates[i].index(label)]
                             for i in group) for label in labels]) / problem.perf_ref
        d_acc = acc[None, :] - acc[:, None]
        d_perf = perf[:, None] - perf[None, :]
        trade = (d_acc > 0) & (d_perf > 0)  # cheaper j costs accuracy over i
        rates.append((d_acc[trade] / d_perf[trade]))
    return np.concatenate(rates)


def default_lambdas(problem: AllocationProblem, n_lambdas: int = 20) -> np.ndarray:
    """Log-spaced lam values from below the smallest to above the largest exchange rate, so the
    sweep reaches both the most accurate and the cheapest allocation."""
    rates = _exchange_rates(problem)
    if rates.size == 0:
        return np.array([1.0])  # one allocation is best at every lam
    return np.geomspace(rates.min() / 2, rates.max() * 2, n_lambdas)


def pareto_front(problem: AllocationProblem, lambdas=None, n_lambdas: int = 20) -> list[Allocation]:
    """Non-dominated (accuracy loss, perf) allocations found by sweeping ``lam``.

    Parameters
    ----------
    problem : AllocationProblem
    lambdas : sequence of float, optional
        Weights to solve for; default :func:`default_lambdas` (``n_lambdas`` log-spaced values).

    Returns
    -------
    list of Allocation
        Distinct allocations, none dominated by another, by increasing accuracy loss (so
        decreasing perf). A weighted sweep finds the convex-hull part of the front; budgets
        (:func:`solve`) reach the points between.
    """
    lambdas = default_lambdas(problem, n_lambdas) if lambdas is None else np.asarray(lambdas)
    found = {}
    for lam in lambdas:
        allocation = solve(problem, lam=float(lam))
        found.setdefault(allocation.choices, allocation)
    front, best_perf = [], np.inf
    for allocation in sorted(found.values(), key=lambda a: (a.acc_loss, a.perf)):
        if allocation.perf < best_perf:
            front.append(allocation)
            best_perf = allocation.perf
    return front


def uniform_allocations(problem: AllocationProblem) -> list[Allocation]:
    """For each candidate label every layer has, the allocation using it everywhere (the
    equal-bitwidth baselines BitQ compares against), in the first layer's label order."""
    labels = problem.shared_labels(list(range(len(problem.layer_names))))
    return [problem.allocation([c.index(label) for c in problem.candidates]) for label in labels]
