"""Relax passes of bitq-tvm, each usable in ``tvm.compile(mod, target, relax_pipeline=...)``.

Order in the pipeline: :class:`AnnotateBFPLayers` (names) -> :class:`InsertBFPSimulation`
(fake quantization) -> ``BindParams`` + ``FoldConstant`` (weights quantized at compile time).
"""

from .annotate_layers import AnnotateBFPLayers, annotated_layers, relax_var_name
from .insert_bfp_simulation import InsertBFPSimulation

__all__ = ["AnnotateBFPLayers", "InsertBFPSimulation", "annotated_layers", "relax_var_name"]
