"""The candidate set: which (weight format, activation format) pairs the optimiser may give a layer.

A candidate is a :class:`~bitq_tvm.plan.LayerFormats` pair: weight mantissa bits, activation
mantissa bits, one block size shared by both (the integer dot product of one block needs the two
operands blocked alike, see the numeric contract) and shared-exponent bits, or FP32. Those rules
are checked here, where candidate sets and pins are built (a plan may say more, e.g. weight-only).
Labels (``w4a8_b32``) are the same across layers, so uniform allocations and ties compare by label.

Users write candidate sets as ``w=4,5,6,8;a=6,8;b=16,32,64;e=8`` and pins as ``NAME=SPEC`` where
NAME is a layer, ``first`` or ``last`` and SPEC is ``fp32``, a format name (both tensors), a
``WEIGHT,ACTIVATION`` pair of format names with equal block size, a label, or a candidate-set
string (that layer then chooses among those candidates only).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from types import MappingProxyType
from typing import Mapping

from ..errors import BitqError
from ..formats import parse_format
from ..formats.bfp import MAX_EXPONENT_BITS, MAX_MANTISSA_BITS, MIN_EXPONENT_BITS, MIN_MANTISSA_BITS
from ..plan import LayerFormats

_LABEL_PATTERN = re.compile(r"w(\d+)a(\d+)_b(\d+)(?:_e(\d+))?")
_SET_KEYS = {"w": "weight_bits", "a": "activation_bits", "b": "block_sizes", "e": "exponent_bits"}
MAX_CANDIDATE_BLOCK = 1024  # beyond this a block spans most reductions: BFP degenerates to per-row


def check_candidate(pair: LayerFormats) -> LayerFormats:
    """``pair`` if the solver may offer it: FP32, or both tensors BFP blocked alike.

    Raises
    ------
    BitqError
        Only one tensor quantized, or the two with different block sizes or exponent bits (the
        integer dot product of one block needs its operands blocked alike).
    """
    if pair.is_fp32:
        return pair
    if pair.weight is None or pair.activation is None:
        raise BitqError("a candidate quantizes both the weight and the activation, or neither (fp32)")
    if pair.weight.block_size != pair.activation.block_size:
        raise BitqError(f"candidate {pair.weight.name},{pair.activation.name}: weight and activation "
                        "must share one block size (one scale per block of the integer dot product)")
    if pair.weight.exponent_bits != pair.activation.exponent_bits:
        raise BitqError(f"candidate {pair.weight.name},{pair.activation.name}: weight and activation "
                        "must share the exponent bits")
    return pair


def _int_tuple(values, option: str, low: int, high: int) -> tuple[int, ...]:
    values = tuple(values)
    if not values:
        raise BitqError(f"candidate set option {option} is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise BitqError(f"candidate set option {option}: {v!r} is not an int in {low}..{high}")
    return tuple(sorted(set(values)))


@dataclasses.dataclass(frozen=True)
class CandidateSet:
    """The grid of candidates: weight bits x activation bits x block sizes x exponent bits.

    The default, 4 weight widths x 2 activation widths x 3 block sizes = 24 candidates, spans
    the useful range (4-bit weights lose accuracy on most layers, 8/8 is MXINT8-like) while
    keeping the accuracy term cheap to measure.
    """

    weight_bits: tuple[int, ...] = (4, 5, 6, 8)
    activation_bits: tuple[int, ...] = (6, 8)
    block_sizes: tuple[int, ...] = (16, 32, 64)
    exponent_bits: tuple[int, ...] = (8,)

    def __post_init__(self):
        object.__setattr__(self, "weight_bits", _int_tuple(self.weight_bits, "w (weight bits)",
                                                          MIN_MANTISSA_BITS, MAX_MANTISSA_BITS))
        object.__setattr__(self, "activation_bits", _int_tuple(self.activation_bits, "a (activation bits)",
                                                              MIN_MANTISSA_BITS, MAX_MANTISSA_BITS))
        object.__setattr__(self, "block_sizes", _int_tuple(self.block_sizes, "b (block sizes)", 1,
                                                          MAX_CANDIDATE_BLOCK))
        object.__setattr__(self, "exponent_bits", _int_tuple(self.exponent_bits, "e (exponent bits)",
                                                            MIN_EXPONENT_BITS, MAX_EXPONENT_BITS))

    @property
    def candidates(self) -> tuple[LayerFormats, ...]:
        """All candidates, most precise first (high bits, small blocks)."""
        return tuple(LayerFormats.bfp(w, a, b, e) for e, w, a, b in itertools.product(
            sorted(self.exponent_bits, reverse=True), sorted(self.weight_bits, reverse=True),
            sorted(self.activation_bits, reverse=True), self.block_sizes))

    @classmethod
    def parse(cls, text: str, where: str = "--candidates") -> "CandidateSet":
        """Parse ``w=4,5,6,8;a=6,8;b=16,32,64;e=8``; keys left out keep their defaults."""
        fields = {}
        for part in filter(None, (p.strip() for p in str(text).split(";"))):
            key, sep, values = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SET_KEYS:
                raise BitqError(f"{where} '{text}': expected KEY=V1,V2,... with KEY in w, a, b, e; got '{part}'")
            try:
                ints = tuple(int(v) for v in values.split(",") if v.strip())
            except ValueError:
                raise BitqError(f"{where} '{text}': '{part}' must list integers") from None
            if not ints:
                raise BitqError(f"{where} '{text}': '{key}=' lists no values, so the candidate set is empty")
            fields[_SET_KEYS[key]] = ints
        if not fields:
            raise BitqError(f"{where} '{text}': the candidate set is empty (expected e.g. w=4,6,8;a=8;b=32)")
        try:
            return cls(**fields)
        except BitqError as err:
            raise BitqError(f"{where} '{text}': {err}") from None


def parse_candidate(spec: str, where: str) -> tuple[LayerFormats, ...]:
    """Candidates of one pin SPEC (see the module docstring)."""
    spec = spec.strip()
    try:
        if "=" in spec:
            return CandidateSet.parse(spec, where).candidates
        match = _LABEL_PATTERN.fullmatch(spec.lower())
        if match:
            w, a, b, e = match.groups()
            return (LayerFormats.bfp(int(w), int(a), int(b), int(e) if e else MAX_EXPONENT_BITS),)
        weight_spec, _, act_spec = spec.partition(",")
        weight = parse_format(weight_spec)
        activation = parse_format(act_spec) if act_spec else weight
        return (check_candidate(LayerFormats(weight, activation)),)
    except BitqError as err:
        if str(err).startswith(where):
            raise
        raise BitqError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class LayerCandidates:
    """The candidate set for every layer of a model: a shared grid plus per-layer pins."""

    default: CandidateSet = CandidateSet()
    pins: Mapping[str, tuple[LayerFormats, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        pins = {}
        for name, cands in dict(self.pins).items():
            cands = tuple(cands)
            if not cands:
                raise BitqError(f"layer '{name}' has an empty candidate set")
            for cand in cands:
                try:
                    check_candidate(cand)
                except BitqError as err:
                    raise BitqError(f"layer '{name}': {err}") from None
            labels = [c.label for c in cands]
            if len(set(labels)) != len(labels):
                raise BitqError(f"layer '{name}': pinned candidates repeat: {labels}")
            pins[name] = cands
        object.__setattr__(self, "pins", MappingProxyType(pins))

    @classmethod
    def from_specs(cls, candidates: str | None = None, pins=()) -> "LayerCandidates":
        """From CLI strings: ``--candidates`` and ``--pin NAME=SPEC`` (repeatable)."""
        default = CandidateSet() if candidates is None else CandidateSet.parse(candidates)
        table = {}
        for pin in pins or ():
            name, sep, spec = pin.partition("=")
            name = name.strip()
            if not sep or not name or not spec.strip():
                raise BitqError(f"--pin '{pin}': expected NAME=SPEC, e.g. conv1=fp32 or last=bfp8_b32")
            table[name] = parse_candidate(spec, f"--pin '{pin}'")
        return cls(default, table)

    def pinned(self, layer_names) -> set[str]:
        """Names of the layers a pin applies to (``first``/``last`` resolved)."""
        names = list(layer_names)
        aliases = {"first": names[0], "last": names[-1]} if names else {}
        return {aliases.get(pin, pin) for pin in self.pins}

    def resolve(self, layer_names) -> dict[str, tuple[LayerFormats, ...]]:
        """Layer name -> its candidates; ``first``/``last`` pins name the first/last layer.

        Raises
        ------
        BitqError
            A pin names no layer of the model, or a layer ends up with no candidates.
        """
        names = list(layer_names)
        aliases = {"first": names[0], "last": names[-1]} if names else {}
        resolved = {name: self.default.candidates for name in names}
        for pin, cands in self.pins.items():
            name = aliases.get(pin, pin)
            if name not in resolved:
                raise BitqError(f"--pin names layer '{pin}', which the model does not have "
                                f"(layers: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
            resolved[name] = cands
        for name, cands in resolved.items():
            if not cands:
                raise BitqError(f"layer '{name}' has an empty candidate set")
        return resolved
