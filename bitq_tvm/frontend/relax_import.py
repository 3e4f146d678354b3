"""ONNX -> Relax: the ONNX frontend as one producer of Relax modules for :func:`bitq_tvm.pipeline`.

The imported ``main`` keeps the layer weights as named parameters (bound later with the
pipeline's ``params``) and carries the ``bitq.layer_names`` attribute, weight parameter name ->
ONNX node name, so :class:`~bitq_tvm.passes.AnnotateBFPLayers` names layers as plans do.

One importer quirk is undone here: TVM 0.27 converts ONNX ``Clip`` (ReLU6, the Clip form of
HardSwish) into ``call_tir`` of TE ``maximum``/``minimum`` kernels, opaque to Relax passes, so a
layer's epilogue could not be fused through it. A kernel that is exactly TE's maximum/minimum
(structurally equal to ``topi.maximum`` of the same shapes) with a constant scalar bound becomes
``R.maximum``/``R.minimum`` (same float32 operation, same NaN-free bound).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, topi
from tvm.relax import PyExprMutator, expr_functor

from ..errors import BitqError
from . import LAYER_NAMES_ATTR
from .onnx_model import OnnxModel


def import_relax(model: OnnxModel) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Import a normalised ONNX model into Relax with the layer weights as named parameters.

    Returns
    -------
    mod : IRModule
        ``main`` takes the model inputs, then one parameter per weight; its ``bitq.layer_names``
        attribute maps layer weight parameters to ONNX layer names.
    params : dict
        Weight parameter name -> array, for ``bitq_tvm.pipeline(..., params=params)``.
    """
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
            warnings.simplefilter("ignore")
            mod = from_onnx(model.proto, shape_dict=dict(model.input_shapes), keep_params_in_input=True)
    except Exception as err:  # noqa: BLE001 - the importer raises bare Exceptions for user input
        detail = str(err).strip().splitlines()
        where = out.getvalue().strip().splitlines()[-1:] if out.getvalue().strip() else []
        raise BitqError(f"{model.path}: TVM's ONNX importer cannot convert this model: "
                        f"{(detail or [type(err).__name__])[0]}{' (' + where[0] + ')' if where else ''}") from None
    mod = _clip_as_relax_ops(mod)
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[len(model.input_shapes):]]
    arrays = params.get("main", [])
    mod.update_func(mod.get_global_var("main"),
                    mod["main"].with_attr(LAYER_NAMES_ATTR, {layer.weight: layer.name for layer in model.layers}))
    return mod, {name: np.asarray(a.numpy()) for name, a in zip(names, arrays)}


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_TE_BOUNDS = {"maximum": (topi.maximum, relax.op.maximum), "minimum": (topi.minimum, relax.op.minimum)}


def _scalar_value(expr, lookup) -> np.ndarray | None:
    """The value of a 0-d constant, or of ``where(isnan(c), a, b)`` over constants (the Clip
    converter's bound sanitising), else None."""
    if isinstance(expr, relax.Var):
        expr = lookup(expr)
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.where"):
        cond = expr.args[0]
        if isinstance(cond, relax.Var):
            cond = lookup(cond)
        if isinstance(cond, relax.Call) and cond.op == tvm.ir.Op.get("relax.isnan"):
            values = [_scalar_value(a, lookup) for a in (cond.args[0], *expr.args[1:])]
            if all(v is not None for v in values):
                return np.where(np.isnan(values[0]), values[1], values[2])
    return None


@expr_functor.mutator
class _ClipRewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod

    def _bound_value(self, var):
        value = self.lookup_binding(var)
        return var if value is None else value

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _CALL_TIR or len(call.args[1].fields) != 2:
            return call
        x, bound = call.args[1].fields
        if not isinstance(bound.ty, relax.TensorType) or bound.ty.ndim != 0:
            return call
        value = _scalar_value(bound, self._bound_value)
        if value is None:
            return call
        func = self.mod_[call.args[0]]
        a = te.placeholder(list(x.ty.shape), x.ty.dtype)
        b = te.placeholder([], bound.ty.dtype)
        for te_op, relax_op in _TE_BOUNDS.values():
            expected = te.create_prim_func([a, b, te_op(a, b)]).without_attr("global_symbol")
            if tvm_ffi.structural_equal(func, expected):
                return relax_op(x, relax.const(value, bound.ty.dtype))
        return call


def _clip_as_relax_ops(mod: tvm.IRModule) -> tvm.IRModule:
    """``main`` with TE maximum/minimum by constant scalars as Relax ops (module docstring)."""
    rewriter = _ClipRewriter(mod)
    rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(mod["main"]))
    return relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())
