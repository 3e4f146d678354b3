"""BFP number formats: the format spec, named presets and the NumPy reference quantizer."""

from .bfp import BFPFormat, Rounding, parse_format_name
from .presets import FLOAT_SPEC, PRESETS, get_format, parse_format
from .reference import (
    BFPTensor,
    dequantize_np,
    fake_quantize_np,
    quantize_np,
    stochastic_uniform_np,
)

__all__ = [
    "BFPFormat",
    "BFPTensor",
    "FLOAT_SPEC",
    "PRESETS",
    "Rounding",
    "dequantize_np",
    "fake_quantize_np",
    "get_format",
    "parse_format",
    "parse_format_name",
    "quantize_np",
    "stochastic_uniform_np",
]
