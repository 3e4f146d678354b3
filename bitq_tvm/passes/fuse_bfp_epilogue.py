"""FuseBFPEpilogue: between two integer BFP layers, the tensor travels as BFP, not as float32.

Where it sits: right after :class:`~bitq_tvm.passes.LowerBFPInteger` (deployment only), before
:class:`~bitq_tvm.passes.InsertBFPSimulation`. LowerBFPInteger leaves, between an integer layer
and the next one, the float32 matmul output, the layout ops back to the model's layout (for a
conv: reshape to NHWC, transpose to NCHW), the layer's bias add and activation (ReLU, clip), and
the next layer's activation quantizer, which reads that float tensor (strided, for NCHW) and
writes int8 mantissas and exponents. This pass replaces the chain by one kernel: the matmul with
a fused epilogue (:class:`~bitq_tvm.kernels.bfp_matmul.Epilogue`: bias, clip, quantization to the
next layer's activation format, blocks along the output channels), whose output is already in
the layout the next kernel reads (rows x channels = NHWC for a conv). The float32 chain is left
dead for ``DeadCodeElimination``.

The numbers do not change: the fused epilogue performs the same float32 operations in the same
order (``C + bias``, max/min, the quantizer's steps), so the tests compare fused and unfused
deployments bit for bit.

Matched chain, from the next layer's activation quantizer back to an integer matmul (every
intermediate used once): ``call_tir(matmul) -> [strided_slice of padded rows] -> [reshape to
NHWC -> permute_dims to NCHW | reshape keeping channels last] -> [add(bias constant)] ->
[relu | clip] * -> [reshape keeping channels last] -> call_tir(act_quant, channel axis, 1 group)``.
Anything else (a pooling, a residual add, a layer with several users, grouped convs, stochastic
rounding, tuned kernels) stays unfused, and the layer's ``bitq.deployment`` record says why in
its ``epilogue`` field.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor

from ..errors import BitqError
from ..formats import Rounding, get_format
from ..kernels.bfp_matmul import Epilogue
from ..kernels.bfp_matmul_variants import bfp_matmul_func
from .annotate_layers import annotated_layers, is_tensor_constant
from .lower_bfp_integer import DEPLOYMENT_ATTR, KERNEL_ATTR, deployment_attr, opaque, plain_attr

__all__ = ["FuseBFPEpilogue"]

_LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.strided_slice")
_ELEMENTWISE_OPS = ("relax.add", "relax.nn.relu", "relax.clip")


def _kernel(mod: IRModule, call) -> dict | None:
    """The ``bitq.kernel`` record of a ``call_tir``'s PrimFunc (None for any other call)."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.call_tir"):
        return None
    func = mod[call.args[0]]
    if func.attrs is None or KERNEL_ATTR not in func.attrs:
        return None
    return plain_attr(func.attrs[KERNEL_ATTR])


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _constant(expr, bindings) -> np.ndarray | None:
    """The value of a constant, or of a var bound to ``reshape(constant)`` (the importer's bias)."""
    if isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    if is_tensor_constant(expr):
        return expr.value.numpy()
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.reshape") \
            and is_tensor_constant(expr.args[0]):
        return expr.args[0].value.numpy().reshape(_shape(expr))
    return None


class _Chain:
    """The ops between an integer matmul and the next layer's activation quantizer."""

    def __init__(self, matmul_call, kernel: dict, vars_: list):
        self.matmul_call = matmul_call
        self.kernel = kernel
        self.vars = vars_  # every var of the chain, matmul output first
        self.bias: np.ndarray | None = None
        self.low: float | None = None
        self.high: float | None = None
        self.ops: list[str] = []


def _walk_back(mod, start, bindings, uses):
    """(chain, None) from the activation quantizer's input back to an integer matmul, or
    (None, reason). ``start`` is the quantizer's input var."""
    cur, trail = start, []
    while True:
        if not isinstance(cur, relax.Var) or cur not in bindings:
            return None, "the next layer's input is not computed in this function"
        if uses.get(cur, 0) != 1:
            return None, f"its output has {uses.get(cur, 0)} users (e.g. a residual branch)"
        trail.append(cur)
        value = bindings[cur]
        if isinstance(value, relax.Var):
            cur = value
            continue
        if not isinstance(value, relax.Call):
            return None, "its output goes through a tuple"
        kernel = _kernel(mod, value)
        if kernel is not None:
            if kernel["kind"] != "matmul":
                return None, f"its output comes from a {kernel['kind']} kernel"
            return _Chain(value, kernel, trail[::-1]), None
        name = value.op.name if isinstance(value.op, tvm.ir.Op) else str(value.op)
        if name not in _LAYOUT_OPS + _ELEMENTWISE_OPS:
            return None, f"its output feeds {name.removeprefix('relax.')}"
        cur = value.args[0]


def _check_chain(chain: _Chain, bindings, aq: dict):
    """Fill in the chain's bias and clip bounds; None if the chain is the fusible form, else why."""
    rows_padded, n = int(chain.kernel["rows"]), int(chain.kernel["n"])
    shape, channel_axis, stage = [rows_padded, n], 1, "layout"
    for var in chain.vars[1:]:
        value = bindings[var]
        if isinstance(value, relax.Var):
            continue
        name = value.op.name
        new_shape = _shape(var)
        if name == "relax.strided_slice":
            if stage != "layout" or new_shape[1:] != shape[1:] or len(shape) != 2 or new_shape[0] > shape[0]:
                return "its output is sliced other than dropping padded rows"
        elif name == "relax.reshape":
            if new_shape[-1] != shape[channel_axis] or channel_axis != len(shape) - 1 \
                    or int(np.prod(new_shape)) != int(np.prod(shape)):
                return "a reshape between the layers moves the channels"
            channel_axis = len(new_shape) - 1
        elif name == "relax.permute_dims":
            axes = [int(a) for a in value.attrs.axes]
            if len(shape) != 4 or axes != [0, 3, 1, 2] or channel_axis != 3:
                return f"a transpose {axes} between the layers"
            channel_axis = 1
        elif name == "relax.add":
            if stage != "layout" or chain.bias is not None:
                return "an add after the activation (e.g. a residual add)"
            previous = chain.vars[chain.vars.index(var) - 1]
            other = value.args[1] if value.args[0].same_as(previous) else value.args[0]
            bias = _constant(other, bindings)
            if bias is None:
                return "its output is added to another tensor (a residual add)"
            full = np.broadcast_to(bias, new_shape) if bias.ndim <= len(new_shape) else None
            expected = [1] * len(new_shape)
            expected[channel_axis] = n
            vector = bias.reshape(-1) if list(np.broadcast_shapes(bias.shape, tuple(expected))) == expected \
                and bias.size == n else None
            if full is None or vector is None:
                return "its bias is not one value per output channel"
            chain.bias, stage = vector.astype(np.float32), "bias"
            chain.ops.append("bias")
        elif name == "relax.nn.relu":
            chain.low = 0.0 if chain.low is None else max(chain.low, 0.0)
            stage = "clip"
            chain.ops.append("relu")
        elif name == "relax.clip":
            low, high = (float(a.value) for a in value.args[1:3])
            chain.low = low if chain.low is None else max(chain.low, low)
            chain.high = high if chain.high is None else min(chain.high, high)
            stage = "clip"
            chain.ops.append(f"clip({low:g}, {high:g})")
        if name in ("relax.add", "relax.nn.relu", "relax.clip") and new_shape != shape:
            return "an elementwise op broadcasts the tensor"
        shape = new_shape
    if [int(d) for d in aq["shape"]] != shape or int(aq["axis"]) != channel_axis:
        return "the next layer quantizes along another axis"
    if int(aq["groups"]) != 1:
        return "the next layer is a grouped conv (per-group blocks)"
    if get_format(str(aq["fmt"])).rounding != Rounding.NEAREST:
        return "the next layer's activations round stochastically"
    return None


@expr_functor.mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.plans: dict = {}  # act_quant binding var -> (chain, act_quant kernel record)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        planned = self.plans.get(binding.var)
        if planned is None:
            super().visit_var_binding_(binding)
            return
        chain, aq = planned
        k = chain.kernel
        fmt_q = get_format(str(aq["fmt"]))
        epilogue = Epilogue(fmt_q, bias=chain.bias is not None, low=chain.low, high=chain.high)
        rows_padded, n = int(k["rows"]), int(k["n"])
        func = bfp_matmul_func(rows_padded, n, int(k["k"]), get_format(str(k["fmt_a"])), get_format(str(k["fmt_w"])),
                               str(k["variant"]), epilogue=epilogue)
        func = opaque(func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True))
        name = f"{k['name']}_{epilogue.tag}"
        gv = self.builder_.add_func(func, name)
        width = -(-n // fmt_q.block_size) * fmt_q.block_size
        args = [self.visit_expr(a) for a in chain.matmul_call.args[1].fields] + \
            ([relax.const(chain.bias)] if chain.bias is not None else [])
        both = self.builder_.emit(relax.call_tir(gv, args, [relax.TensorType([rows_padded, width], "int8"),
                                                             relax.TensorType([rows_padded, width // fmt_q.block_size],
                                                                              "int8")]), name)
        q_shape, e_shape = ([int(d) for d in t.shape] for t in binding.var.ty.fields)
        outs = []
        for index, target_shape in enumerate((q_shape, e_shape)):
            out = self.builder_.emit(relax.TupleGetItem(both, index))
            rows = int(np.prod(target_shape[:-1]))
            if rows != rows_padded:
                out = self.builder_.emit(relax.op.strided_slice(out, [0], [0], [rows]))
            if _shape(out) != target_shape:
                out = self.builder_.emit(relax.op.reshape(out, target_shape))
            outs.append(out)
        new_var = self.builder_.emit(relax.Tuple(outs), binding.var.name)
        self.set_var_remap(binding.var, new_var)


def _collect(func: relax.Function):
    """(var -> bound value, var -> number of uses, var -> binding vars using it) over the
    function's bindings and result (used by the result: a user ``None``)."""
    bindings, uses, users = {}, {}, {}
    user = [None]

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1
            users.setdefault(expr, []).append(user[0])
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                count(a)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                count(f)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
                user[0] = b.var
                count(b.value)
    user[0] = None
    count(func.body.body)
    return bindings, uses, users


def _walk_forward(var, bindings, users) -> str:
    """Why the output ``var`` of an integer layer reaches no next layer's quantizer."""
    while True:
        used_by = users.get(var, [])
        if len(used_by) != 1:
            return f"its output has {len(used_by)} users (e.g. a residual branch)" if used_by else "its output is unused"
        (user,) = used_by
        if user is None:
            return "its output is the model's output"
        value = bindings[user]
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            if name not in _LAYOUT_OPS + _ELEMENTWISE_OPS:
                return f"its output feeds {name.removeprefix('relax.')}"
        elif not isinstance(value, relax.Var):
            return "its output feeds a kernel that is not a BFP layer's quantizer"
        var = user


def _consumer_layer(aq_var, bindings, layer_vars: dict) -> str:
    """The layer whose activations ``aq_var`` (an act_quant result) are: LowerBFPInteger names
    their mantissas ``<layer var>_qa``."""
    for var, value in bindings.items():
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(aq_var) and value.index == 0:
            name = var.name.removesuffix("_qa")
            return layer_vars.get(name, name)
    return "the next layer"


def _layer_of(chain_vars, layer_vars: dict) -> str | None:
    for var in chain_vars:
        if var.name in layer_vars:
            return layer_vars[var.name]
    return None


@tvm.transform.module_pass(opt_level=0, name="FuseBFPEpilogue")
class FuseBFPEpilogue:
    """Fuse bias, activation and the next layer's activation quantization into integer matmuls.

    Reads and updates ``bitq.deployment``: each integer layer's ``epilogue`` says what was fused
    into its kernel (``"bias, relu -> bfp8_b32 of fc2"``) or why not (``"not fused: its output
    feeds max_pool2d"``).
    """

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        fuser = _Fuser(mod)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or deployment_attr(func) is None:
                continue
            record = deployment_attr(func)
            bindings, uses, users = _collect(func)
            layer_vars = {str(var): str(layer) for layer, var in annotated_layers(func).items()}
            integer = {r["layer"] for r in record["layers"] if r["mode"] == "integer"}
            notes: dict[str, str] = {}
            for var, value in bindings.items():
                aq = _kernel(mod, value)
                if aq is None or aq["kind"] != "act_quant":
                    continue
                next_layer = _consumer_layer(var, bindings, layer_vars)
                chain, reason = _walk_back(mod, value.args[1].fields[0], bindings, uses)
                if chain is not None:
                    reason = _check_chain(chain, bindings, aq)
                    if reason is None and int(chain.kernel.get("tuned", 0)):
                        reason = "its kernel is a tuned one (tuning databases hold unfused kernels)"
                    if reason is None and str(chain.kernel["variant"]) == "i8mm":
                        reason = "the i8mm kernel has no fused epilogue"
                layer = _layer_of(chain.vars, layer_vars) if chain is not None else None
                if layer is None or layer not in integer:
                    continue
                if reason is None:
                    fuser.plans[var] = (chain, aq)
                    ops = ", ".join(chain.ops + [f"quantize to {aq['fmt']}"])
                    notes[layer] = f"fused: {ops} for {next_layer}"
                else:
                    notes[layer] = f"not fused: {reason}"
            var_of = {layer: var for var, layer in layer_vars.items()}
            by_name = {v.name: v for v in bindings}
            for layer in integer - set(notes):
                var = by_name.get(var_of.get(layer, ""))
                why = _walk_forward(var, bindings, users) if var is not None else "its output is not found"
                notes[layer] = f"not fused: {why}"
            layers = [{**r, "epilogue": notes.get(r["layer"], r.get("epilogue", ""))} for r in record["layers"]]
            updates[gv] = {**record, "layers": layers}
        if not updates:
            return mod
        for gv, func in mod.functions_items():
            if gv in updates:
                new_func = fuser.visit_expr(func) if fuser.plans else func
                fuser.builder_.update_func(gv, new_func.with_attr(DEPLOYMENT_ATTR, updates[gv]))
        return fuser.builder_.get()
