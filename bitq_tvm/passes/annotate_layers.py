"""AnnotateBFPLayers: give every quantizable Relax op the name of its ONNX layer.

Where it sits: first of the bitq passes, right after ONNX import with the layer weights kept as
function parameters (see :mod:`bitq_tvm.frontend.onnx_model`) and before the parameters are bound.
Each ``R.nn.conv2d`` / ``R.matmul`` whose weight is (a ``permute_dims`` of) a layer-weight
parameter gets its result variable renamed after the layer, and the function records the mapping
in the ``bitq.layers`` attribute (layer name -> Relax variable name). Later passes and people
reading the printed IR find layers by those names.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor

LAYERS_ATTR = "bitq.layers"
_LAYER_OPS = ("relax.nn.conv2d", "relax.matmul")


def relax_var_name(layer_name: str) -> str:
    """A valid Relax identifier for an ONNX node name (``layer1.0/conv`` -> ``layer1_0_conv``)."""
    name = re.sub(r"\W", "_", layer_name)
    return name if re.match(r"[A-Za-z_]", name) else f"l_{name}"


def weight_param(mutator: PyExprMutator, expr: relax.Expr) -> relax.Var | None:
    """The function parameter a layer weight comes from, looking through ``permute_dims``."""
    while isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is None:
            return expr
        if isinstance(bound, relax.Call) and bound.op.same_as(tvm.ir.Op.get("relax.permute_dims")):
            expr = bound.args[0]
        else:
            return None
    return None


@expr_functor.mutator
class _LayerNamer(PyExprMutator):
    def __init__(self, mod: IRModule, weight_to_layer: dict[str, str]):
        super().__init__(mod)
        self.weight_to_layer = weight_to_layer
        self.found: dict[str, str] = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        layer = None
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name in _LAYER_OPS:
            param = weight_param(self, value.args[1])
            if param is not None:
                layer = self.weight_to_layer.get(param.name)
        if layer is None or layer in self.found:
            super().visit_var_binding_(binding)
            return
        new_value = self.visit_expr(value)
        name = relax_var_name(layer)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(new_value, name)
        else:
            new_var = self.builder_.emit_output(new_value, name)
        self.set_var_remap(binding.var, new_var)
        self.found[layer] = new_var.name


@tvm.transform.module_pass(opt_level=0, name="AnnotateBFPLayers")
class AnnotateBFPLayers:
    """Name each layer's conv2d/matmul after its ONNX node and record ``bitq.layers``.

    Parameters
    ----------
    weight_to_layer : dict
        Weight parameter name -> ONNX layer name (from the frontend's layer table).
    """

    def __init__(self, weight_to_layer: dict[str, str]):
        self.weight_to_layer = dict(weight_to_layer)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        namer = _LayerNamer(mod, self.weight_to_layer)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                namer.found = {}
                func = namer.visit_expr(func)
                if namer.found:
                    func = func.with_attr(LAYERS_ATTR, dict(namer.found))
                namer.builder_.update_func(gv, func)
        return namer.builder_.get()


def annotated_layers(func: relax.Function) -> dict[str, str]:
    """Layer name -> Relax variable name recorded by :class:`AnnotateBFPLayers`."""
    attrs = func.attrs
    if attrs is None or LAYERS_ATTR not in attrs:
        return {}
    return {str(k): str(v) for k, v in attrs[LAYERS_ATTR].items()}
