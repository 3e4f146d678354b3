"""Allocation MILP: exact against brute force for every objective, ties, errors, Pareto sweep."""

import itertools

import numpy as np
import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.solver.milp import default_lambdas, pareto_front, solve, uniform_allocations
from bitq_tvm.solver.problem import AllocationProblem

REL = 1e-9  # HiGHS runs with zero gaps and 1e-9 feasibility tolerances on O(1)-scaled rows


def _random_problem(seed, n_layers=4, max_candidates=4, with_ties=True):
    rng = np.random.default_rng(seed)
    pool = ["bfp8_b32", "bfp6_b32", "bfp6_b16", "bfp4_b32", "bfp4_b16", "bfp3_b16"]
    candidates, acc, perf, size = [], [], [], []
    for _ in range(n_layers):
        labels = list(rng.choice(pool, size=rng.integers(2, max_candidates + 1), replace=False))
        candidates.append(labels)
        acc.append(rng.uniform(-1e-4, 3e-3, len(labels)))  # noise can help a little
        perf.append(rng.uniform(1e4, 1e6, len(labels)))
        size.append(rng.uniform(1e3, 1e5, len(labels)))
    ties = []
    if with_ties:
        first, second = rng.choice(n_layers, size=2, replace=False)
        if set(candidates[first]) & set(candidates[second]):
            ties.append([f"layer{first}", f"layer{second}"])
    return AllocationProblem([f"layer{i}" for i in range(n_layers)], candidates, acc, perf, size,
                             ties)


def _all_allocations(problem):
    """Every tie-respecting allocation as (choices, acc, perf, size) arrays."""
    index = {name: i for i, name in enumerate(problem.layer_names)}
    rows = []
    for choices in itertools.product(*(range(len(c)) for c in problem.candidates)):
        labels = [c[q] for c, q in zip(problem.candidates, choices)]
        if all(len({labels[index[n]] for n in group}) == 1 for group in problem.ties):
            rows.append(choices)
    rows = np.array(rows)
    totals = [sum(np.asarray(table[l])[rows[:, l]] for l in range(len(problem.layer_names)))
              for table in (problem.acc_loss, problem.perf, problem.size_bytes)]
    return rows, *totals


def _budgets_between_achievable_totals(totals, rng, count=3):
    """Budgets halfway between distinct achievable totals: never on a feasibility boundary."""
    values = np.unique(totals)
    picks = rng.choice(len(values) - 1, size=min(count, len(values) - 1), replace=False)
    return [(values[i] + values[i + 1]) / 2 for i in picks]


@pytest.mark.parametrize("seed", range(25))
def test_every_objective_matches_brute_force(seed):
    problem = _random_problem(seed)
    _, acc, perf, size = _all_allocations(problem)
    rng = np.random.default_rng(1000 + seed)
    for lam in (0.0, 1e-3, 0.2, 5.0):
        score = acc + lam * perf / problem.perf_ref
        got = solve(problem, lam=lam)
        assert got.acc_loss + lam * got.perf / problem.perf_ref == pytest.approx(
            score.min(), rel=REL, abs=1e-15)
    for budget in _budgets_between_achievable_totals(acc, rng):
        got = solve(problem, acc_budget=budget)
        assert got.acc_loss <= budget
        assert got.perf == pytest.approx(perf[acc <= budget].min(), rel=REL)
    for budget in _budgets_between_achievable_totals(perf, rng):
        got = solve(problem, perf_budget=budget)
        assert got.perf <= budget
        assert got.acc_loss == pytest.approx(acc[perf <= budget].min(), rel=REL, abs=1e-15)
    for budget in _budgets_between_achievable_totals(size, rng):
        got = solve(problem, size_budget=budget)
        assert got.size_bytes <= budget
        assert got.acc_loss == pytest.approx(acc[size <= budget].min(), rel=REL, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_combined_budgets_match_brute_force(seed):
    problem = _random_problem(seed, n_layers=5)
    _, acc, perf, size = _all_allocations(problem)
    rng = np.random.default_rng(seed)
    size_budget = _budgets_between_achievable_totals(size, rng, count=1)[0]
    fits = size <= size_budget
    acc_budget = _budgets_between_achievable_totals(acc[fits], rng, count=1)[0] if len(
        np.unique(acc[fits])) > 1 else acc[fits].max() + 1.0
    got = solve(problem, acc_budget=acc_budget, size_budget=size_budget)
    assert got.perf == pytest.approx(perf[fits & (acc <= acc_budget)].min(), rel=REL)
    lam = 0.3
    got = solve(problem, lam=lam, size_budget=size_budget)
    score = acc + lam * perf / problem.perf_ref
    assert got.acc_loss + lam * got.perf / problem.perf_ref == pytest.approx(
        score[fits].min(), rel=REL, abs=1e-15)


def test_many_layers_match_brute_force():
    """10 layers x 4 candidates (about a million allocations): the reduced-cost fixing that
    shrinks the MILP must never drop the optimum."""
    rng = np.random.default_rng(7)
    n_layers, labels = 10, ["a", "b", "c", "d"]
    bits = np.array([8.0, 6.0, 4.0, 3.0])
    acc = [np.exp(-bits) * rng.uniform(0.2, 2.0) + rng.uniform(0, 1e-4, 4) for _ in range(n_layers)]
    perf = [bits * rng.uniform(1.0, 10.0) + rng.uniform(0, 0.5, 4) for _ in range(n_layers)]
    problem = AllocationProblem([f"l{i}" for i in range(n_layers)], [labels] * n_layers, acc, perf)
    grids = np.meshgrid(*([np.arange(4)] * n_layers), indexing="ij")
    total_acc = sum(acc[l][grids[l]] for l in range(n_layers)).ravel()
    total_perf = sum(perf[l][grids[l]] for l in range(n_layers)).ravel()
    for budget in _budgets_between_achievable_totals(total_acc, rng, count=4):
        assert solve(problem, acc_budget=budget).perf == pytest.approx(
            total_perf[total_acc <= budget].min(), rel=REL)
    for budget in _budgets_between_achievable_totals(total_perf, rng, count=4):
        assert solve(problem, perf_budget=budget).acc_loss == pytest.approx(
            total_acc[total_perf <= budget].min(), rel=REL)


def test_large_weighted_problem_equals_per_layer_minimum():
    """Without budgets or ties the score separates: each layer's best candidate is optimal."""
    rng = np.random.default_rng(3)
    n_layers, n_candidates = 200, 50
    acc = rng.uniform(0, 1e-3, (n_layers, n_candidates))
    perf = rng.uniform(1e3, 1e6, (n_layers, n_candidates))
    problem = AllocationProblem([f"l{i}" for i in range(n_layers)],
                                [[f"c{q}" for q in range(n_candidates)]] * n_layers, acc, perf)
    lam = 0.05
    score = acc + lam * perf / problem.perf_ref
    got = solve(problem, lam=lam)
    assert got.choices == tuple(score.argmin(axis=1))


def test_ties_force_equal_labels():
    problem = AllocationProblem(
        ["a", "b", "c"], [["x", "y"], ["y", "x", "z"], ["x", "y"]],
        acc_loss=[[0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0]],  # a wants x, b wants y, c wants y
        perf=[[1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0]],
        ties=[["a", "b"], ["b", "c"]])
    got = solve(problem, lam=0.0)
    assert len(set(got.labels)) == 1
    assert got.acc_loss == 1.0  # x: 0 + 1 + 1, y: 1 + 0 + 0
    assert got.as_dict() == {"a": "y", "b": "y", "c": "y"}


def test_infeasible_budgets_state_the_best_achievable_value():
    problem = AllocationProblem(["conv1", "conv2"], [["p", "q"], ["p", "q"]],
                                acc_loss=[[0.0123, 0.02], [0.0, 0.5]],
                                perf=[[4.0, 1.0], [3.0, 2.0]], size_bytes=[[10, 5], [7, 6]])
    with pytest.raises(BitqError, match=r"^accuracy-loss budget 0\.001 is infeasible: the "
                                        r"smallest achievable predicted loss is 0\.0123$"):
        solve(problem, acc_budget=0.001)
    with pytest.raises(BitqError, match=r"performance budget 2 is infeasible: .* is 3$"):
        solve(problem, perf_budget=2.0)
    with pytest.raises(BitqError, match=r"size budget 10 is infeasible: .* is 11$"):
        solve(problem, size_budget=10)
    exact = solve(problem, acc_budget=0.0123)  # a budget at the smallest total is feasible
    assert exact.acc_loss == pytest.approx(0.0123, rel=1e-12)
    assert exact.perf == 7.0
    # each budget alone is achievable, together they are not
    with pytest.raises(BitqError, match="budgets cannot all hold together"):
        solve(problem, acc_budget=0.0123, size_budget=11)
    with pytest.raises(BitqError, match="solve needs lam or a budget"):
        solve(problem)


def test_problem_validation_names_the_culprit():
    def make(**changes):
        fields = dict(layer_names=["conv1", "fc"], candidates=[["a", "b"], ["a"]],
                      acc_loss=[[0.1, 0.2], [0.3]], perf=[[1.0, 2.0], [3.0]])
        fields.update(changes)
        return AllocationProblem(**fields)

    make()
    with pytest.raises(BitqError, match="layer 'fc' has no candidates"):
        make(candidates=[["a", "b"], []], acc_loss=[[0.1, 0.2], []], perf=[[1.0, 2.0], []])
    with pytest.raises(BitqError, match="acc_loss of layer 'fc' has 2 values for 1 candidates"):
        make(acc_loss=[[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(BitqError, match="perf of layer 'conv1' contains NaN"):
        make(perf=[[np.nan, 2.0], [3.0]])
    with pytest.raises(BitqError, match="perf of layer 'fc' must be >= 0"):
        make(perf=[[1.0, 2.0], [-3.0]])
    with pytest.raises(BitqError, match=r"names unknown layers \['conv9'\]"):
        make(ties=[["conv1", "conv9"]])
    with pytest.raises(BitqError, match="share no candidate label"):
        make(candidates=[["a", "b"], ["c"]], ties=[["conv1", "fc"]])
    with pytest.raises(BitqError, match="size_bytes is not given"):
        solve(make(), size_budget=1.0)


def test_lambda_sweep_is_monotone():
    problem = _random_problem(11, n_layers=8, max_candidates=5)
    previous = None
    for lam in np.geomspace(1e-4, 1e2, 40):
        got = solve(problem, lam=lam)
        if previous is not None:
            assert got.perf <= previous.perf * (1 + REL)
            assert got.acc_loss >= previous.acc_loss - REL * abs(previous.acc_loss) - 1e-15
        previous = got


@pytest.mark.parametrize("seed", range(4))
def test_pareto_front_is_non_dominated_and_reaches_both_ends(seed):
    problem = _random_problem(seed, n_layers=5, max_candidates=4)
    _, acc, perf, _ = _all_allocations(problem)
    front = pareto_front(problem)
    assert len({a.choices for a in front}) == len(front)
    for point in front:  # no allocation at all beats a front point in both terms
        better = (acc <= point.acc_loss) & (perf <= point.perf) & (
            (acc < point.acc_loss) | (perf < point.perf))
        assert not better.any()
    assert [a.acc_loss for a in front] == sorted(a.acc_loss for a in front)
    assert front[0].acc_loss == pytest.approx(acc.min(), rel=REL, abs=1e-15)
    assert front[-1].perf == pytest.approx(perf.min(), rel=REL)
    assert len(default_lambdas(problem, 7)) == 7


def test_uniform_allocations_use_each_shared_label_everywhere():
    problem = AllocationProblem(["a", "b"], [["x", "y", "z"], ["z", "x"]],
                                acc_loss=[[0.1, 0.2, 0.3], [0.4, 0.5]],
                                perf=[[1.0, 2.0, 3.0], [4.0, 5.0]])
    uniform = uniform_allocations(problem)
    assert [u.labels for u in uniform] == [("x", "x"), ("z", "z")]
    assert uniform[0].acc_loss == pytest.approx(0.1 + 0.5, rel=1e-15)
    assert uniform[1].perf == 3.0 + 4.0
    assert uniform[0].size_bytes is None
