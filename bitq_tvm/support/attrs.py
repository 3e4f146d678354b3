"""IR attributes as plain Python: how passes and reports read the records kernels carry."""

from __future__ import annotations

import tvm

__all__ = ["plain_attr"]


def plain_attr(value):
    """An IR attribute value (Map, Array, String, IntImm) as plain Python."""
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return value.value
    if hasattr(value, "items"):
        return {str(k): plain_attr(v) for k, v in value.items()}
    return [plain_attr(v) for v in value]
