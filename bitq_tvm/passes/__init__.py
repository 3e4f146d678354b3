"""Relax passes of bitq-tvm, each usable in ``tvm.compile(mod, target, relax_pipeline=...)``.

Order in :func:`bitq_tvm.pipeline`: :class:`AnnotateBFPLayers` (find and name layers) ->
``BindParams`` -> :class:`LowerBFPInteger` and :class:`FuseBFPEpilogue` (deployment only) ->
:class:`InsertBFPSimulation`
(fake quantization; on the deployment path, of the layers left in float) -> ``FoldConstant``
(weights quantized at compile time) -> ``DeadCodeElimination`` -> :class:`EmbedBFPReport`
(deployment only). Passes keep no results: they travel in the IR as function attributes.
"""

from .annotate_layers import AnnotateBFPLayers, annotated_layers, relax_var_name
from .embed_bfp_report import REPORT_FUNCTION, EmbedBFPReport, module_report, relax_constant_bytes
from .fuse_bfp_epilogue import FuseBFPEpilogue
from .insert_bfp_simulation import InsertBFPSimulation
from .lower_bfp_integer import LowerBFPInteger

__all__ = ["AnnotateBFPLayers", "EmbedBFPReport", "FuseBFPEpilogue", "InsertBFPSimulation", "LowerBFPInteger", "REPORT_FUNCTION",
           "annotated_layers", "module_report", "relax_constant_bytes", "relax_var_name"]
