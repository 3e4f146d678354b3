"""The per-layer multiple-choice allocation problem the optimiser solves, and its answer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BitqError

METRICS = ("acc_loss", "perf", "size_bytes")


def _frozen_array(values, what: str) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise BitqError(f"{what} must be a sequence of numbers ({exc})") from None
    if not np.all(np.isfinite(array)):
        raise BitqError(f"{what} contains NaN or Inf: {array.tolist()}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Per layer, candidate labels and their predicted accuracy loss, performance cost and size.

    Parameters
    ----------
    layer_names : sequence of str
        Unique layer names.
    candidates : sequence of sequences of str
        Per layer, its candidate labels (e.g. format names), unique within the layer.
    acc_loss, perf : sequences of arrays
        ``acc_loss[l][q]`` and ``perf[l][q]`` (e.g. latency or traffic; >= 0) of candidate q.
    size_bytes : sequences of arrays, optional
        ``size_bytes[l][q]`` (>= 0); needed only for size budgets.
    ties : sequence of sequences of str
        Groups of layers that must pick the same candidate label (e.g. tensors sharing a format).

    Arrays are stored read-only; problems compare by identity.
    """

    layer_names: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]
    acc_loss: tuple[np.ndarray, ...]
    perf: tuple[np.ndarray, ...]
    size_bytes: tuple[np.ndarray, ...] | None = None
    ties: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        names = tuple(str(name) for name in self.layer_names)
        if not names:
            raise BitqError("AllocationProblem needs at least one layer")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise BitqError(f"AllocationProblem layer names are not unique: {duplicates}")
        object.__setattr__(self, "layer_names", names)

        candidates = tuple(tuple(str(c) for c in labels) for labels in self.candidates)
        if len(candidates) != len(names):
            raise BitqError(f"AllocationProblem has {len(names)} layers but candidate lists for "
                            f"{len(candidates)}")
        for name, labels in zip(names, candidates):
            if not labels:
                raise BitqError(f"layer {name!r} has no candidates")
            if len(set(labels)) != len(labels):
                raise BitqError(f"layer {name!r} has repeated candidate labels: {list(labels)}")
        object.__setattr__(self, "candidates", candidates)

        for metric in METRICS:
            table = getattr(self, metric)
            if table is None and metric == "size_bytes":
                continue
            if table is None or len(table) != len(names):
                raise BitqError(f"AllocationProblem.{metric} must have one array per layer "
                                f"({len(names)})")
            arrays = tuple(_frozen_array(values, f"{metric} of layer {name!r}")
                           for name, values in zip(names, table))
            for name, labels, array in zip(names, candidates, arrays):
                if len(array) != len(labels):
                    raise BitqError(f"{metric} of layer {name!r} has {len(array)} values for "
                                    f"{len(labels)} candidates")
                if metric != "acc_loss" and np.any(array < 0):
                    raise BitqError(f"{metric} of layer {name!r} must be >= 0, got "
                                    f"{array.tolist()}")
            object.__setattr__(self, metric, arrays)
        if self.perf_ref <= 0:
            raise BitqError("AllocationProblem.perf is zero for every candidate: nothing to trade")

        ties = tuple(tuple(str(n) for n in group) for group in self.ties)
        for group in ties:
            unknown = [n for n in group if n not in names]
            if unknown:
                raise BitqError(f"tie group {list(group)} names unknown layers {unknown}")
        object.__setattr__(self, "ties", ties)
        for component in self.tie_components():
            if not self.shared_labels(component):
                raise BitqError(f"tied layers {[names[i] for i in component]} share no "
                                f"candidate label")

    @property
    def perf_ref(self) -> float:
        """Normaliser of the performance term: the total perf if every layer took its most
        expensive candidate (BitQ's DM_max), so ``sum perf / perf_ref`` lies in [0, 1]."""
        return float(sum(values.max() for values in self.perf))

    def tie_components(self) -> list[list[int]]:
        """Layer indices that must agree, merged transitively over tie groups (size >= 2)."""
        parent = list(range(len(self.layer_names)))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        index = {name: i for i, name in enumerate(self.layer_names)}
        for group in self.ties:
            for name in group[1:]:
                parent[root(index[name])] = root(index[group[0]])
        components: dict[int, list[int]] = {}
        for i in range(len(parent)):
            components.setdefault(root(i), []).append(i)
        return [c for c in components.values() if len(c) > 1]

    def shared_labels(self, layers: list[int]) -> list[str]:
        """Candidate labels every given layer has, in the first layer's order."""
        common = set.intersection(*(set(self.candidates[i]) for i in layers))
        return [label for label in self.candidates[layers[0]] if label in common]

    def smallest_total(self, metric: str) -> float:
        """Smallest achievable sum of ``metric`` over all layers, honouring ties."""
        table = self._table(metric)
        total, tied = 0.0, set()
        for component in self.tie_components():
            tied.update(component)
            total += min(sum(table[i][self.candidates[i].index(label)] for i in component)
                         for label in self.shared_labels(component))
        return total + sum(float(table[i].min()) for i in range(len(table)) if i not in tied)

    def allocation(self, choices) -> "Allocation":
        """The :class:`Allocation` picking candidate index ``choices[l]`` for layer l."""
        choices = tuple(int(q) for q in choices)
        if len(choices) != len(self.layer_names):
            raise BitqError(f"an allocation needs {len(self.layer_names)} choices, got "
                            f"{len(choices)}")
        totals = {metric: (None if getattr(self, metric) is None else float(
            sum(values[q] for values, q in zip(getattr(self, metric), choices))))
            for metric in METRICS}
        return Allocation(layer_names=self.layer_names,
                          labels=tuple(c[q] for c, q in zip(self.candidates, choices)),
                          choices=choices, **totals)

    def _table(self, metric: str) -> tuple[np.ndarray, ...]:
        if metric not in METRICS:
            raise BitqError(f"unknown metric {metric!r}; expected one of {METRICS}")
        table = getattr(self, metric)
        if table is None:
            raise BitqError(f"AllocationProblem.{metric} is not given")
        return table


@dataclass(frozen=True)
class Allocation:
    """One candidate per layer, with the problem's totals for it."""

    layer_names: tuple[str, ...]
    labels: tuple[str, ...]
    choices: tuple[int, ...]
    acc_loss: float
    perf: float
    size_bytes: float | None

    def __post_init__(self):
        if not len(self.layer_names) == len(self.labels) == len(self.choices):
            raise BitqError("Allocation needs one label and one choice per layer")

    def as_dict(self) -> dict[str, str]:
        """Layer name -> chosen candidate label."""
        return dict(zip(self.layer_names, self.labels))
