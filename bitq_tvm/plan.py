"""The plan: per-layer BFP formats, the hand-off between the solver and the compiler.

A plan is a plain, versioned JSON file that people can read and edit::

    {
      "bitq_plan_version": 1,
      "default": {"weight": "bfp8_b32", "activation": "bfp8_b32"},
      "layers": {
        "conv1": {"weight": "bfp6_b16", "activation": "bfp8_b16"},
        "fc2": "fp32"
      }
    }

``default`` applies to every layer the ``layers`` table does not name; a layer entry is either a
format for both tensors, ``"fp32"`` (leave the layer alone), or a ``{"weight", "activation"}``
object. Entries may carry more keys (the solver writes predicted loss, traffic, latency); they are
kept as ``info`` and ignored by the compiler.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from types import MappingProxyType
from typing import Any, Mapping

from .errors import BitqError
from .formats import BFPFormat, parse_format
from .formats.bfp import MAX_EXPONENT_BITS
from .support.atomic import write_json

PLAN_VERSION = 1


def _format_name(fmt: BFPFormat | None) -> str:
    return "fp32" if fmt is None else fmt.name


FP32_LABEL = "fp32"


@dataclasses.dataclass(frozen=True)
class LayerFormats:
    """The (weight, activation) format pair of one layer (``None`` = FP32): plan entries and solver candidates.

    Its label, e.g. ``w4a8_b32`` (``_e5`` appended when E != 8, ``fp32`` for a float layer),
    names a pair in the allocation problem, plans and reports. A pair whose tensors do not share
    one block size and exponent width (a plan may quantize only the weight) is labelled
    ``WEIGHT,ACTIVATION`` with its format names. The pair type itself accepts any two formats;
    the solver's candidate sets take only :attr:`is_bfp_pair` pairs (see
    :mod:`bitq_tvm.solver.candidates`).
    """

    weight: BFPFormat | None = None
    activation: BFPFormat | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def bfp(cls, weight_bits: int, activation_bits: int, block_size: int, exponent_bits: int = 8) -> "LayerFormats":
        """Both tensors BFP with one block size and exponent width (a candidate of the solver)."""
        return cls(BFPFormat(weight_bits, block_size, exponent_bits), BFPFormat(activation_bits, block_size, exponent_bits))

    @property
    def is_fp32(self) -> bool:
        return self.weight is None and self.activation is None

    @property
    def is_bfp_pair(self) -> bool:
        """Both tensors BFP, blocked alike (one block size, one exponent width).

        The integer dot product of one block needs its two operands blocked alike (one scale per
        block and operand, see the numeric contract), so only such pairs have integer kernels.
        """
        return (self.weight is not None and self.activation is not None
                and self.weight.block_size == self.activation.block_size
                and self.weight.exponent_bits == self.activation.exponent_bits)

    @property
    def block_size(self) -> int | None:
        """The block size of the weight (else of the activation); None for an FP32 layer."""
        fmt = self.weight or self.activation
        return None if fmt is None else fmt.block_size

    @property
    def label(self) -> str:
        if self.is_fp32:
            return FP32_LABEL
        if not self.is_bfp_pair:
            return f"{_format_name(self.weight)},{_format_name(self.activation)}"
        label = f"w{self.weight.mantissa_bits}a{self.activation.mantissa_bits}_b{self.weight.block_size}"
        if self.weight.exponent_bits != MAX_EXPONENT_BITS:
            label += f"_e{self.weight.exponent_bits}"
        return label

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, spec, where: str) -> "LayerFormats":
        """Parse a plan entry: a format spec for both tensors or a ``{weight, activation}`` dict."""
        try:
            if isinstance(spec, dict) and ("weight" in spec or "activation" in spec):
                info = {k: v for k, v in spec.items() if k not in ("weight", "activation")}
                return cls(parse_format(spec.get("weight", "fp32")), parse_format(spec.get("activation", "fp32")), info)
            fmt = parse_format(spec)
            return cls(fmt, fmt)
        except BitqError as err:
            raise BitqError(f"{where}: {err}") from None

    def to_json(self) -> Any:
        if self.weight == self.activation and not self.info:
            return _format_name(self.weight)
        return {"weight": _format_name(self.weight), "activation": _format_name(self.activation), **self.info}


FP32 = LayerFormats()  # a float layer; the solver's ``fp32`` candidate


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-layer BFP formats, keyed by ONNX layer (node) name."""

    layers: Mapping[str, LayerFormats] = dataclasses.field(default_factory=dict)
    default: LayerFormats = FP32
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    @classmethod
    def uniform(cls, fmt: BFPFormat | str | None, **meta) -> "Plan":
        """Every layer's weight and activation in one format."""
        return cls(default=LayerFormats.parse(fmt, "format"), meta=meta)

    @classmethod
    def from_json(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise BitqError(f"{where}: a plan is a JSON object")
        version = data.get("bitq_plan_version")
        # bool is an int in Python (True == 1): only a JSON integer is a version
        if type(version) is not int or version != PLAN_VERSION:
            raise BitqError(f"{where}: unsupported plan version {version!r} (this bitq-tvm reads version {PLAN_VERSION})")
        layers_json = data.get("layers", {})
        if not isinstance(layers_json, dict):
            raise BitqError(f"{where}: 'layers' must be an object mapping layer name -> format")
        layers = {name: LayerFormats.parse(spec, f"{where}: layer '{name}'") for name, spec in layers_json.items()}
        default = LayerFormats.parse(data.get("default", "fp32"), f"{where}: default")
        meta = {k: v for k, v in data.items() if k not in ("bitq_plan_version", "layers", "default")}
        return cls(layers=layers, default=default, meta=meta)

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan JSON file."""
        path = str(path)
        if not os.path.isfile(path):
            raise BitqError(f"{path}: no such plan file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError:
            raise BitqError(f"{path}: not a plan file (not UTF-8 text)") from None
        except json.JSONDecodeError as err:
            raise BitqError(f"{path}: not valid JSON ({err})") from None
        except OSError as err:
            raise BitqError(f"{path}: cannot read the plan file ({err.strerror})") from None
        return cls.from_json(data, path)

    def to_json(self) -> dict:
        return {"bitq_plan_version": PLAN_VERSION, **self.meta, "default": self.default.to_json(),
                "layers": {name: lf.to_json() for name, lf in self.layers.items()}}

    def save(self, path) -> None:
        """Write the plan as JSON (atomically: a crash leaves the old file or none)."""
        write_json(path, self.to_json(), indent=2, newline=True)

    def resolve(self, layers, where: str = "plan", unsupported: Mapping[str, str] | None = None) -> dict[str, LayerFormats]:
        """The formats of every layer of a model, checking the plan names only layers it has.

        Parameters
        ----------
        layers : sequence of Layer
            The model's layer table.
        unsupported : mapping, optional
            Node name -> description (op and reason) of nodes that look like layers but stay FP32;
            a plan giving one a BFP format gets an error saying why rather than "no such layer".
        """
        names = [layer.name for layer in layers]
        for name, lf in self.layers.items():
            if name in names:
                continue
            if unsupported and name in unsupported and not lf.is_fp32:
                raise BitqError(f"{where}: layer '{name}' is an ONNX {unsupported[name]}, which stays FP32 "
                                "(BFP layers: 2-D Conv, MatMul and Gemm with constant weights)")
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"; the model's layers are {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
            raise BitqError(f"{where}: layer '{name}' does not exist in the model{hint}")
        return {name: self.layers.get(name, self.default) for name in names}
