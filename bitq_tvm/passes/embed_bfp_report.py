"""EmbedBFPReport: make the deployment decisions readable from the compiled module.

Where it sits: last of the bitq passes of the deployment path (:func:`bitq_tvm.pipeline`), after
:class:`~bitq_tvm.passes.LowerBFPInteger`, ``FoldConstant`` and ``DeadCodeElimination``, so the
constants counted are the ones the artifact stores. It adds the Relax function
:data:`REPORT_FUNCTION` returning, as a JSON string (``R.str``), the ``bitq.deployment``
attribute plus ``artifact_constant_bytes``. The string survives ``tvm.compile`` and
``export_library``: ``json.loads(vm["bitq_report"]())`` on a loaded library gives it back.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.ir import IRModule

from ..errors import BitqError
from .lower_bfp_integer import deployment_attr

REPORT_FUNCTION = "bitq_report"


def relax_constant_bytes(mod: IRModule) -> int:
    """Bytes of all distinct tensor constants in the Relax functions of ``mod``."""
    seen: dict = {}

    def visit(expr):
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            seen[expr.value] = expr.value.numpy().nbytes

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(seen.values())


def module_report(mod: IRModule) -> dict:
    """The report of a module :class:`~bitq_tvm.passes.LowerBFPInteger` ran on, as plain Python."""
    records = [deployment_attr(f) for _, f in mod.functions_items() if isinstance(f, relax.Function)]
    records = [r for r in records if r is not None]
    if len(records) != 1:
        raise BitqError(f"module has {len(records)} functions with a bitq.deployment attribute (expected 1): "
                        "run LowerBFPInteger first")
    return {**records[0], "artifact_constant_bytes": relax_constant_bytes(mod)}


def embedded_report(mod: IRModule) -> dict:
    """The report :class:`EmbedBFPReport` put into ``mod`` (the JSON of :data:`REPORT_FUNCTION`)."""
    body = mod[REPORT_FUNCTION].body
    return json.loads((body.body if isinstance(body, relax.SeqExpr) else body).value)


@tvm.transform.module_pass(opt_level=0, name="EmbedBFPReport")
class EmbedBFPReport:
    """Add :data:`REPORT_FUNCTION`, returning the deployment report as a JSON string."""

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        # re-run: report the module as it is now
        mod = IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != REPORT_FUNCTION},
                       attrs=mod.attrs, global_infos=mod.global_infos)
        report = json.dumps(module_report(mod), sort_keys=True)
        bb = relax.BlockBuilder(mod)
        with bb.function(REPORT_FUNCTION, [], attrs={"global_symbol": REPORT_FUNCTION}):
            bb.emit_func_output(tvm.ir.StringImm(report))
        return bb.get()
