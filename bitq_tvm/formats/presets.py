"""Named BFP formats and the one entry point that turns a user's spec into a format."""

from __future__ import annotations

import dataclasses

from ..errors import BitqError
from .bfp import FORMAT_NAME_PATTERN, BFPFormat, parse_format_name

FLOAT_SPEC = "fp32"  # a layer given this spec stays in float32


def _registry(*formats: BFPFormat) -> dict[str, BFPFormat]:
    return {fmt.name: fmt for fmt in formats}


PRESETS: dict[str, BFPFormat] = _registry(
    BFPFormat(mantissa_bits=8, block_size=32),  # bfp8_b32 is exactly OCP MXINT8
    BFPFormat(mantissa_bits=8, block_size=16),
    BFPFormat(mantissa_bits=6, block_size=16),
    BFPFormat(mantissa_bits=6, block_size=32),
    BFPFormat(mantissa_bits=4, block_size=16),
    BFPFormat(mantissa_bits=4, block_size=32),
)


def get_format(name: str) -> BFPFormat:
    """Return the format called ``name``: a preset or any ``bfp{m}_b{B}[_e{E}][_sr{seed}]`` name.

    Raises
    ------
    BitqError
        If ``name`` is neither; the message lists the preset names.
    """
    if not isinstance(name, str):
        raise BitqError(f"BFP format name must be a string, got {name!r}")
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    if FORMAT_NAME_PATTERN.fullmatch(key) is None:
        raise BitqError(
            f"unknown BFP format {name!r}; presets: {', '.join(PRESETS)} "
            f"(or any bfp{{m}}_b{{B}}[_e{{E}}][_sr{{seed}}] with m 2..8, E 2..8)"
        )
    return parse_format_name(key)


def parse_format(spec: str | dict | BFPFormat | None) -> BFPFormat | None:
    """Turn a user's format spec into a :class:`BFPFormat`, or None for "leave in float32".

    ``spec`` is a BFPFormat, a name accepted by :func:`get_format`, ``"fp32"`` or None (float32),
    or a dict of BFPFormat fields (``{"mantissa_bits": 6, "block_size": 32}``) or ``{"name": ...}``.
    """
    if spec is None or isinstance(spec, BFPFormat):
        return spec
    if isinstance(spec, str):
        if spec.strip().lower() == FLOAT_SPEC:
            return None
        return get_format(spec)
    if isinstance(spec, dict):
        if set(spec) == {"name"}:
            return parse_format(spec["name"])
        fields = {field.name for field in dataclasses.fields(BFPFormat)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise BitqError(
                f"BFP format spec {spec!r} has unknown keys {unknown}; valid keys: {sorted(fields)}"
            )
        try:
            return BFPFormat(**spec)
        except TypeError as err:  # missing required field
            raise BitqError(f"BFP format spec {spec!r}: {err}") from None
    raise BitqError(f"BFP format spec must be a name, dict or None, got {spec!r}")


__all__ = ["FLOAT_SPEC", "PRESETS", "get_format", "parse_format"]
