"""The Python API for ONNX models: compile one under a BFP plan, run and evaluate it.

The ``bitq-tvm`` command is a thin layer over these functions::

    model = load_onnx("model.onnx", {"input": (1, 3, 224, 224)})
    compiled = compile_model(model, Plan.uniform("bfp8_b32"), target="host")
    logits = compiled.run({"input": x})[0]

:func:`compile_model` imports the model and makes the one ``tvm.compile(mod, target,
relax_pipeline=bitq_tvm.pipeline(...))`` call, which works on any Relax module.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tvm
from tvm import relax

from .errors import BitqError
from .frontend.onnx_model import OnnxModel
from .frontend.relax_import import import_relax
from .pipeline import pipeline
from .plan import LayerFormats, Plan
from .runtime.runner import Runner
from .support.progress import say
from .targets.presets import TargetPreset, get_target


def check_weights(model: OnnxModel, formats: dict[str, LayerFormats], params: dict[str, np.ndarray]) -> None:
    """Quantized layers' weights must be finite: BFP has no NaN/Inf encoding."""
    for layer in model.layers:
        lf = formats.get(layer.name)
        if lf is None or lf.weight is None:
            continue
        w = params[layer.weight]
        if not np.isfinite(w).all():
            bad = int(np.size(w) - np.isfinite(w).sum())
            raise BitqError(f"{model.path}: weight tensor '{layer.weight}' of layer '{layer.name}' contains "
                            f"{bad} NaN/Inf value(s); BFP cannot encode them")


def resolve_plan(model: OnnxModel, plan: Plan | None) -> dict[str, LayerFormats]:
    """Layer -> formats for this model, with clear errors for names the model does not have."""
    plan = plan or Plan()
    unsupported = {n.name: f"{n.onnx_op} node ({n.reason})" for n in model.fp32_nodes}
    return plan.resolve(model.layers, where=f"plan for {model.path}", unsupported=unsupported)


@dataclasses.dataclass
class CompiledModel(Runner):
    """A model compiled by TVM under a plan, runnable on the host (or exportable for its target)."""

    model: OnnxModel
    formats: dict[str, LayerFormats]
    target: TargetPreset
    executable: relax.VMExecutable
    compile_seconds: float

    def _vm(self):
        if not hasattr(self, "_vm_cache"):
            if self.target.emulator is not None or self.target.cross_compiler is not None:
                raise BitqError(f"model compiled for target '{self.target.name}' cannot run on this host; "
                                "export it with --output and run it on the device")
            self._vm_cache = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm_cache

    def run(self, inputs) -> list[np.ndarray]:
        """Run once; ``inputs`` is a dict by input name or a list in input order."""
        out = self._vm()["main"](*(tvm.runtime.tensor(x) for x in self.input_arrays(inputs)))
        outs = list(out) if isinstance(out, (tvm.ir.Array, list, tuple)) else [out]
        return [o.numpy() for o in outs]

    def export_library(self, path: str) -> None:
        """Write the compiled model as a shared library (atomically)."""
        from .support.atomic import atomic_path
        from .targets.cross import export

        with atomic_path(path, ".so") as tmp:
            export(self.executable, tmp, self.target)


def compile_model(model: OnnxModel, plan: Plan | None = None, target: str | TargetPreset = "host",
                  progress=say) -> CompiledModel:
    """Compile ``model`` under ``plan`` (``None``: FP32) for ``target``: :func:`bitq_tvm.pipeline` simulation."""
    preset = get_target(target) if isinstance(target, str) else target
    formats = resolve_plan(model, plan)
    mod, params = import_relax(model)
    check_weights(model, formats, params)
    tvm_target = preset.tvm_target()
    quantized = sum(not lf.is_fp32 for lf in formats.values())
    if progress:
        progress(f"compiling {model.name}: {len(model.layers)} layers ({quantized} BFP) for {preset.name}")
    start = time.perf_counter()
    # the resolved formats, not the plan: a planned layer the passes do not find is an error
    executable = tvm.compile(mod, target=tvm_target, relax_pipeline=pipeline(formats, preset, params=params))
    seconds = time.perf_counter() - start
    if progress:
        progress(f"compiled in {seconds:.1f} s")
    return CompiledModel(model, formats, preset, executable, seconds)
