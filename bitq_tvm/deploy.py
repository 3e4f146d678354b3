"""Deployment: compile a plan into integer BFP kernels (the simulation path's real-speed twin).

::

    deployed = compile_deployed(model, Plan.uniform("bfp8_b32"), target="host")
    print(deployed.report.table())           # per layer: integer kernel variant or fallback + reason
    logits = deployed.run({"input": x})[0]   # equals api.compile_model(...).run(...) up to fp32 sums

The compiled module has three Relax functions: ``bitq_packed_weights()`` returns the compact
stored weights (int8 or 4-bit-pair mantissas, int8 exponents), ``bitq_expand_weights(*packed)``
derives the matmul operands from them, and ``main(inputs..., *expanded)``. :class:`DeployedModel`
runs the first two once, at load time, and appends their result to every ``main`` call; a user of
the exported library does the same.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import tvm
from tvm import relax

from .api import CompiledModel, _progress, check_weights, import_relax, resolve_plan
from .errors import BitqError
from .frontend.onnx_model import OnnxModel
from .passes import AnnotateBFPLayers, InsertBFPSimulation
from .kernels.bfp_matmul_variants import kernel_variant
from .kernels.contract import DEFAULT_MAX_PADDING_RATIO
from .passes.lower_bfp_integer import EXPAND_FUNCTION, PACKED_FUNCTION, LayerDeployment, LowerBFPInteger
from .plan import LayerFormats, Plan
from .kernels.cpu import cpu_pipeline
from .targets.presets import TargetPreset, get_target

__all__ = ["DeploymentReport", "DeployedModel", "deploy_passes", "compile_deployed", "relax_constant_bytes"]


@dataclasses.dataclass(frozen=True)
class DeploymentReport:
    """Per-layer deployment decisions and the weight storage they lead to."""

    target: str
    variant: str
    layers: tuple[LayerDeployment, ...]
    artifact_constant_bytes: int

    def __post_init__(self):
        if self.artifact_constant_bytes < 0:
            raise BitqError("DeploymentReport: artifact_constant_bytes must be >= 0")

    @property
    def fp32_weight_bytes(self) -> int:
        return sum(d.fp32_bytes for d in self.layers)

    @property
    def integer_layers(self) -> list[str]:
        return [d.layer for d in self.layers if d.mode == "integer"]

    @property
    def fallbacks(self) -> dict[str, str]:
        """Planned layers left in float simulation -> why."""
        return {d.layer: d.reason for d in self.layers if d.mode == "simulation"}

    def table(self) -> str:
        """The report as a markdown table plus a totals line."""
        rows = ["| layer | op | runs as | weight bytes (FP32 -> stored) | note |", "|---|---|---|---|---|"]
        for d in self.layers:
            runs = {"integer": f"integer BFP ({d.variant})", "simulation": "float BFP simulation",
                    "fp32": "FP32"}[d.mode]
            stored = d.stored_bytes if d.mode == "integer" else d.fp32_bytes
            rows.append(f"| {d.layer} | {d.kind} | {runs} | {d.fp32_bytes:,} -> {stored:,} | {d.reason} |")
        total = self.fp32_weight_bytes
        rows.append("")
        rows.append(f"{len(self.integer_layers)}/{len(self.layers)} layers integer on {self.target} "
                    f"({self.variant}); all constants of the artifact {self.artifact_constant_bytes:,} B vs "
                    f"{total:,} B FP32 layer weights = {self.artifact_constant_bytes / max(total, 1):.3f}x")
        return "\n".join(rows)


class _ExpandedVM:
    """A VirtualMachine whose ``main`` gets the expanded weights appended to its arguments."""

    def __init__(self, vm, weights):
        self._vm = vm
        self._weights = list(weights)

    def __getitem__(self, name):
        if name != "main":
            return self._vm[name]
        main = self._vm["main"]
        return lambda *args: main(*args, *self._weights)


@dataclasses.dataclass
class DeployedModel(CompiledModel):
    """A model compiled to integer BFP kernels; ``run`` works as for :class:`~bitq_tvm.api.CompiledModel`."""

    report: DeploymentReport | None = None

    def _vm(self):
        if not hasattr(self, "_vm_cache"):
            vm = super()._vm()
            expanded = []
            if self.report is not None and self.report.integer_layers:
                expanded = list(vm[EXPAND_FUNCTION](*vm[PACKED_FUNCTION]()))
            self._vm_cache = _ExpandedVM(vm, expanded)
        return self._vm_cache


@tvm.transform.module_pass(opt_level=0, name="SimulateBFPFallbacks")
class _SimulateFallbacks:
    """InsertBFPSimulation on the layers a LowerBFPInteger pass (run before) left in float."""

    def __init__(self, lower: LowerBFPInteger):
        self.lower = lower

    def transform_module(self, mod, ctx):
        return InsertBFPSimulation(self.lower.fallback_formats)(mod)


def deploy_passes(model: OnnxModel, formats: dict[str, LayerFormats], params: dict[str, np.ndarray],
                  variant: str, max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO, kernels=None):
    """The bitq passes of the deployment path (weights bound), and the lowering pass for its report.

    Returns
    -------
    passes : list of Pass
        Annotate, lower to integer kernels, simulate the fallbacks, bind, fold, clean up.
    lower : LowerBFPInteger
        Its ``report`` is filled once the passes ran.
    """
    lower = LowerBFPInteger(formats, params, variant, max_padding_ratio, kernels)
    passes = [
        AnnotateBFPLayers({layer.weight: layer.name for layer in model.layers}),
        lower,
        _SimulateFallbacks(lower),
        relax.transform.BindParams("main", params),
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ]
    return passes, lower


def relax_constant_bytes(mod: tvm.IRModule) -> int:
    """Bytes of all distinct tensor constants in the Relax functions of ``mod``."""
    seen: dict = {}

    def visit(expr):
        if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
            seen[expr.value] = expr.value.numpy().nbytes

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sum(seen.values())


def _tuned_kernels(tuning_db: str, model: OnnxModel, formats, preset) -> dict:
    """Verified tuned kernels of the plan's GEMMs from a tuning work dir, by kernel name."""
    from .tuning.tasks import extract_bfp_tasks
    from .tuning.verify import tuned_prim_funcs

    candidates = {name: [lf] for name, lf in formats.items() if lf.is_bfp_pair}
    return tuned_prim_funcs(tuning_db, extract_bfp_tasks(model, candidates, preset), preset)


def compile_deployed(model: OnnxModel, plan: Plan | None, target: str | TargetPreset = "host",
                     max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO, progress=_progress,
                     tuning_db: str | None = None) -> DeployedModel:
    """Compile ``model`` under ``plan`` to integer BFP kernels for ``target`` (fallbacks reported).

    ``tuning_db``: a ``bitq-tvm tune`` work dir; its verified tuned kernels replace the default
    schedules where they exist.
    """
    preset = get_target(target) if isinstance(target, str) else target
    formats = resolve_plan(model, plan)
    mod, params = import_relax(model)
    check_weights(model, formats, params)
    variant = kernel_variant(preset.tvm_target())
    tvm_target = preset.tvm_target()
    if progress:
        progress(f"deploying {model.name}: {len(model.layers)} layers for {preset.name} ({variant} kernels)")
    start = time.perf_counter()
    kernels = _tuned_kernels(tuning_db, model, formats, preset) if tuning_db else {}
    passes, lower = deploy_passes(model, formats, params, variant, max_padding_ratio, kernels)
    mod = tvm.transform.Sequential(passes, name="bitq_deploy")(mod)
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    report = DeploymentReport(preset.name, variant, tuple(sorted(lower.report.values(), key=lambda d: order[d.layer])),
                              relax_constant_bytes(mod))
    executable = tvm.compile(mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target))
    seconds = time.perf_counter() - start
    if progress:
        progress(f"compiled in {seconds:.1f} s: {len(report.integer_layers)} integer layers, "
                 f"{len(report.fallbacks)} fallbacks")
        if tuning_db:
            progress(f"tuning database {tuning_db}: {len(lower.tuned_used)} tuned kernel(s) used, "
                     f"the other integer kernels use the default schedules")
    return DeployedModel(model, formats, preset, executable, seconds, report)
