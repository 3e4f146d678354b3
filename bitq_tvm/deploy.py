"""Deployment: compile a plan into integer BFP kernels (the simulation path's real-speed twin).

::

    deployed = compile_deployed(model, Plan.uniform("bfp8_b32"), target="host")
    print(deployed.report.table())           # per layer: integer kernel variant or fallback + reason
    logits = deployed.run({"input": x})[0]   # equals api.compile_model(...).run(...) up to fp32 sums

:func:`compile_deployed` imports the model and makes the one ``tvm.compile(mod, target,
relax_pipeline=bitq_tvm.pipeline(..., deploy=True))`` call. The compiled module has two Relax
functions: ``main(inputs...)``, whose constants are the weights in their stored BFP format (int8
or 4-bit-pair mantissas, int8 exponents, read as they are by the integer kernels), and
``bitq_report()``, the deployment report as JSON (:meth:`DeploymentReport.from_module`). A user
of the exported library calls ``main`` like any Relax VM function.
"""

from __future__ import annotations

import dataclasses
import json
import time

import tvm
from tvm import relax

from .api import CompiledModel, check_weights, resolve_plan
from .errors import BitqError
from .frontend.onnx_model import OnnxModel
from .frontend.relax_import import import_relax
from .kernels.bfp_matmul_variants import kernel_variant
from .kernels.contract import DEFAULT_MAX_PADDING_RATIO
from .passes.embed_bfp_report import REPORT_FUNCTION, embedded_report
from .passes.lower_bfp_integer import LayerDeployment, deployment_layers
from .pipeline import pipeline
from .plan import Plan
from .support.progress import say
from .support.tables import format_table
from .targets.presets import TargetPreset, get_target

__all__ = ["DeploymentReport", "DeployedModel", "compile_deployed"]


@dataclasses.dataclass(frozen=True)
class DeploymentReport:
    """Per-layer deployment decisions and the weight storage they lead to."""

    target: str
    variant: str
    layers: tuple[LayerDeployment, ...]
    artifact_constant_bytes: int
    tuned_kernels: tuple[str, ...] = ()

    def __post_init__(self):
        if self.artifact_constant_bytes < 0:
            raise BitqError("DeploymentReport: artifact_constant_bytes must be >= 0")

    @classmethod
    def from_json(cls, data: dict, target: str, layer_order=None) -> "DeploymentReport":
        """The report of a ``bitq_report()`` JSON record; ``layer_order``: layer names to sort by."""
        layers = deployment_layers(data)
        if layer_order is not None:
            order = {name: i for i, name in enumerate(layer_order)}
            layers.sort(key=lambda d: order.get(d.layer, len(order)))
        return cls(target, data["variant"], tuple(layers), int(data["artifact_constant_bytes"]),
                   tuple(data.get("tuned_kernels", ())))

    @classmethod
    def from_module(cls, module, target: str, layer_order=None) -> "DeploymentReport":
        """The report a compiled module carries: ``module`` is a VirtualMachine, an executable or a
        loaded library (``tvm.runtime.load_module``) runnable here."""
        vm = module if isinstance(module, relax.VirtualMachine) else relax.VirtualMachine(module, tvm.cpu())
        return cls.from_json(json.loads(str(vm[REPORT_FUNCTION]())), target, layer_order)

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
        rows = []
        for d in self.layers:
            runs = {"integer": f"integer BFP ({d.variant})", "simulation": "float BFP simulation",
                    "fp32": "FP32"}[d.mode]
            stored = d.stored_bytes if d.mode == "integer" else d.fp32_bytes
            rows.append((d.layer, d.kind, runs, f"{d.fp32_bytes:,} -> {stored:,}", d.reason or d.epilogue))
        total = self.fp32_weight_bytes
        return (format_table(["layer", "op", "runs as", "weight bytes (FP32 -> resident)", "note / epilogue"], rows)
                + "\n\n"
                f"{len(self.integer_layers)}/{len(self.layers)} layers integer on {self.target} "
                f"({self.variant}); all constants of the artifact {self.artifact_constant_bytes:,} B vs "
                f"{total:,} B FP32 layer weights = {self.artifact_constant_bytes / max(total, 1):.3f}x")


@dataclasses.dataclass
class DeployedModel(CompiledModel):
    """A model compiled to integer BFP kernels; ``run`` works as for :class:`~bitq_tvm.api.CompiledModel`."""

    report: DeploymentReport | None = None


@tvm.instrument.pass_instrument
class _ReportReader:
    """Reads the report the pipeline embeds, for an executable this host cannot load (another ISA)."""

    def __init__(self):
        self.data = None

    def run_after_pass(self, mod, info):
        if info.name == "EmbedBFPReport":
            self.data = embedded_report(mod)


def compile_deployed(model: OnnxModel, plan: Plan | None, target: str | TargetPreset = "host",
                     max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO, progress=say,
                     tuning_db: str | None = None, fuse_epilogues: bool = True) -> DeployedModel:
    """Compile ``model`` under ``plan`` to integer BFP kernels for ``target`` (fallbacks reported).

    ``tuning_db``: a ``bitq-tvm tune`` work dir; its verified tuned kernels replace the default
    schedules where they exist. ``fuse_epilogues``: see :func:`bitq_tvm.pipeline`.
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
    # the resolved formats, not the plan: a planned layer the passes do not find is an error
    bitq = pipeline(formats, preset, deploy=True, tuning_db=tuning_db, params=params,
                    max_padding_ratio=max_padding_ratio, fuse_epilogues=fuse_epilogues)
    runnable = preset.emulator is None and preset.cross_compiler is None
    reader = _ReportReader()
    ctx = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(ctx.opt_level, ctx.required_pass, ctx.disabled_pass, config=dict(ctx.config),
                                   instruments=[*ctx.instruments, *([] if runnable else [reader])]):
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=bitq)
    layer_order = [layer.name for layer in model.layers]
    report = DeploymentReport.from_module(executable, preset.name, layer_order) if runnable else \
        DeploymentReport.from_json(reader.data, preset.name, layer_order)
    seconds = time.perf_counter() - start
    if progress:
        progress(f"compiled in {seconds:.1f} s: {len(report.integer_layers)} integer layers, "
                 f"{len(report.fallbacks)} fallbacks")
        if tuning_db:
            progress(f"tuning database {tuning_db}: {len(report.tuned_kernels)} tuned kernel(s) used, "
                     f"the other integer kernels use the default schedules")
    return DeployedModel(model, formats, preset, executable, seconds, report)
