"""AnnotateBFPLayers: find the quantizable layers of any Relax module and name them.

Where it sits: first of the bitq passes (:func:`bitq_tvm.pipeline`), before the weights are bound,
so parameter names are still there to name layers by. A layer is an ``R.nn.conv2d`` or an
``R.matmul`` (weight possibly through ``R.permute_dims``) whose weight is a constant or a weight
parameter of the function (TVM's DPL pattern :data:`LAYER_PATTERN`). Names come from the
producer's ``bitq.layer_names`` hint (weight parameter -> layer name; the ONNX frontend sets it to
ONNX node names) when there is one; otherwise from the weight parameter (``fc1_weight`` ->
``fc1``), or ``conv2d0``/``matmul1`` for constant weights. Each layer's result variable is renamed
after it and the function records ``bitq.layers`` (layer name -> Relax variable name): later
passes, and people reading the printed IR, find layers by those names.
"""

from __future__ import annotations

import re
from collections import namedtuple

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor
from tvm.relax.dpl import is_const, is_op, is_var, wildcard

from ..frontend import LAYER_NAMES_ATTR

LAYERS_ATTR = "bitq.layers"
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
_WEIGHT = is_const() | is_var()
LAYER_PATTERN = (is_op("relax.nn.conv2d")(wildcard(), _WEIGHT)
                 | is_op("relax.matmul")(wildcard(), _WEIGHT | is_op("relax.permute_dims")(_WEIGHT)))


def relax_var_name(layer_name: str) -> str:
    """A valid Relax identifier for a layer name (``layer1.0/conv`` -> ``layer1_0_conv``)."""
    name = re.sub(r"\W", "_", layer_name)
    return name if re.match(r"[A-Za-z_]", name) else f"l_{name}"


def is_tensor_constant(expr: relax.Expr) -> bool:
    """A bound tensor (TVM 0.27 has no ``constant``: constants are ``GenericConst``)."""
    return isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor)


def layer_weight(mutator: PyExprMutator, expr: relax.Expr):
    """(stored weight, ``permute_dims`` call or None) of a layer op's weight operand.

    The stored weight is the function parameter or ``constant`` the weight comes from, seen
    through one ``permute_dims`` (Gemm/Linear weights are stored [N, K]); None if it is computed.
    """
    permute = None
    while True:
        if is_tensor_constant(expr):
            return expr, permute
        if not isinstance(expr, relax.Var):
            return None, None
        bound = mutator.lookup_binding(expr)
        if bound is None:
            return expr, permute
        if permute is None and isinstance(bound, relax.Call) and bound.op.same_as(_PERMUTE_DIMS):
            permute, expr = bound, bound.args[0]
        elif isinstance(bound, relax.Var) or is_tensor_constant(bound):
            expr = bound
        else:
            return None, None


def permute_axes(permute: relax.Call) -> list[int]:
    """The axes of a ``permute_dims`` call (``None`` in the IR means reversed)."""
    if permute.attrs.axes is not None:
        return [int(a) for a in permute.attrs.axes]
    return list(reversed(range(len(permute.args[0].ty.shape))))


_Named = namedtuple("_Named", "name")


def resolve_formats(formats, layers) -> dict:
    """Layer name -> LayerFormats: ``formats`` is a :class:`~bitq_tvm.plan.Plan` or a dict.

    A Plan is resolved against the module's ``layers`` (names in program order): a plan naming a
    layer the module does not have is an error.
    """
    if isinstance(formats, dict):
        return dict(formats)
    return formats.resolve([_Named(name) for name in layers], where="plan")


def _derived_name(weight: str) -> str:
    return re.sub(r"[._]weight$", "", weight) or weight


@expr_functor.mutator
class _LayerNamer(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.hint: dict[str, str] | None = None
        self.weights: set = set()
        self.var2val: dict = {}
        self.found: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def _layer_name(self, call: relax.Call) -> str | None:
        if not LAYER_PATTERN.match(call, self.var2val):
            return None
        stored, _ = layer_weight(self, call.args[1])
        if stored is not None and is_tensor_constant(stored):
            if self.hint is not None:
                return None  # the producer listed its layers: an unlisted constant is not one
            kind = call.op.name.rsplit(".", 1)[-1]
            index = self.counts.get(kind, 0)
            self.counts[kind] = index + 1
            return f"{kind}{index}"
        if stored is None or not any(stored.same_as(w) for w in self.weights):
            return None
        if self.hint is not None:
            return self.hint.get(stored.name)
        return _derived_name(stored.name)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        layer = self._layer_name(value) if isinstance(value, relax.Call) else None
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


def _weight_params(func: relax.Function, hint) -> list[relax.Var]:
    """Parameters that may be layer weights: the hinted ones, else those after ``num_input``."""
    if hint is not None:
        return [p for p in func.params if p.name in hint]
    attrs = func.attrs
    if attrs is None or "num_input" not in attrs:
        return []  # inputs and weights are not told apart: only constants are weights
    return list(func.params[int(attrs["num_input"]):])


@tvm.transform.module_pass(opt_level=0, name="AnnotateBFPLayers")
class AnnotateBFPLayers:
    """Name each layer's conv2d/matmul and record ``bitq.layers``.

    Parameters
    ----------
    weight_to_layer : dict, optional
        Weight parameter name -> layer name; default: each function's ``bitq.layer_names``
        attribute, else names derived from the weights.
    """

    def __init__(self, weight_to_layer: dict[str, str] | None = None):
        self.weight_to_layer = None if weight_to_layer is None else dict(weight_to_layer)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        namer = _LayerNamer(mod)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            hint = self.weight_to_layer
            if hint is None and func.attrs is not None and LAYER_NAMES_ATTR in func.attrs:
                hint = {str(k): str(v) for k, v in func.attrs[LAYER_NAMES_ATTR].items()}
            namer.hint, namer.found, namer.counts = hint, {}, {}
            namer.weights = set(_weight_params(func, hint))
            namer.var2val = relax.analysis.get_var2val(func)
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
