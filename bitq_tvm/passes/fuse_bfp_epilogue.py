"""FuseBFPEpilogue: between two integer BFP layers, the tensor travels as BFP, not as float32.

Where it sits: right after :class:`~bitq_tvm.passes.LowerBFPInteger` (deployment only), before
:class:`~bitq_tvm.passes.InsertBFPSimulation`. LowerBFPInteger leaves, between an integer layer
and the next one, the float32 matmul output, the layout ops back to the model's layout (for a
conv: reshape to NHWC, transpose to NCHW), the layer's bias add and activation (ReLU, clip), and
the next layer's activation quantizer, which reads that float tensor (strided, for NCHW) and
writes int8 mantissas and exponents. This pass replaces the chain by one kernel: the matmul with
a fused epilogue (:class:`~bitq_tvm.kernels.bfp_matmul.Epilogue`: bias, clip, quantization to the
next layer's activation format, blocks along the output channels), whose output is already in
the layout the next kernel reads (rows x channels = NHWC for a conv). A depthwise conv's kernel
(:mod:`~bitq_tvm.kernels.bfp_depthwise`, same output rows x channels) takes the same epilogue,
and its input quantizer (an exponent per value: blocks of one along the channels) is one a
producer's epilogue can write. The
float32 chain is left dead for ``DeadCodeElimination``.

The numbers do not change: the fused epilogue performs the same float32 operations in the same
order (``C + bias``, max/min, the quantizer's steps), so the tests compare fused and unfused
deployments bit for bit.

Matched: the elementwise expression between the next layer's activation quantizer and the
latest integer matmul it depends on, through layout ops that keep rows x channels (dropping
padded rows, reshape keeping channels last, NHWC -> NCHW transpose) and elementwise ops
(:data:`~bitq_tvm.kernels.bfp_matmul.EPILOGUE_OPS`: add/subtract/multiply/divide/maximum/minimum,
relu, clip, sigmoid, tanh, erf) whose other operands are scalars, per-channel constants (a
bias) or whole tensors of the same shape (a residual, read in its own layout); every value of
the expression derived from the matmul must be used only inside it. HardSwish, SiLU, GELU and
residual adds are such expressions. Anything else (a pooling, a value with users outside, grouped
convs, stochastic rounding, tuned kernels) stays unfused, and the layer's ``bitq.deployment``
record says why in its ``epilogue`` field.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor

from ..errors import BitqError
from ..formats import Rounding, get_format
from ..kernels.bfp_conv import ConvGeometry
from ..kernels.bfp_depthwise import bfp_depthwise_func
from ..kernels.bfp_matmul import Epilogue, TunedConfig
from ..kernels.bfp_matmul_variants import bfp_matmul_func
from .annotate_layers import annotated_layers, is_tensor_constant
from .lower_bfp_integer import DEPLOYMENT_ATTR, KERNEL_ATTR, deployment_attr, opaque, plain_attr

__all__ = ["FuseBFPEpilogue"]

# Kernels whose float32 [rows, n] output an epilogue can take over (their bitq.kernel "kind").
_PRODUCERS = ("matmul", "depthwise")
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


class _Fusion:
    """The epilogue expression between an integer matmul and the next layer's quantizer."""

    def __init__(self, matmul_call, kernel: dict):
        self.matmul_call = matmul_call
        self.kernel = kernel
        self.vars: list = []  # vars of the expression derived from the matmul
        self.biases: list[np.ndarray] = []
        self.tensors: list = []  # (relax var, (shape, channel axis))
        self.expr = None
        self.layout = None  # (shape, channel axis) at the quantizer's input


class _NotFusible(Exception):
    pass


def _op_name(value) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


_UNARY = ("relu", "clip", "sigmoid", "tanh", "erf")
_SUPPORTED = _LAYOUT_OPS + tuple(f"relax.{op}" for op in ("add", "subtract", "multiply", "divide", "maximum",
                                                           "minimum", "clip", "sigmoid", "tanh", "erf")) \
    + ("relax.nn.relu",)


def _matmul_dependencies(mod, bindings):
    """``deps(var)``: the integer matmul outputs ``var`` is computed from through supported ops only."""
    memo: dict = {}

    def deps(v) -> frozenset:
        if not isinstance(v, relax.Var) or v not in bindings:
            return frozenset()
        if v in memo:
            return memo[v]
        value = bindings[v]
        if isinstance(value, relax.Var):
            result = deps(value)
        elif (kernel := _kernel(mod, value)) is not None:
            result = frozenset([v]) if kernel["kind"] in _PRODUCERS else frozenset()
        elif _op_name(value) in _SUPPORTED:
            result = frozenset().union(*(deps(a) for a in value.args if isinstance(a, relax.Var)))
        else:
            result = frozenset()
        memo[v] = result
        return result

    return deps


def _build_fusion(mod, start, bindings, uses, deps, order) -> _Fusion:
    """The :class:`_Fusion` ending at the quantizer input ``start``; raises _NotFusible(reason)."""
    sources = deps(start)
    if not sources:
        raise _NotFusible("its input does not come from an integer matmul")
    matmul_var = max(sources, key=order.get)  # the latest producer; others are external tensors
    fusion = _Fusion(bindings[matmul_var], _kernel(mod, bindings[matmul_var]))
    refs: dict = {}
    memo: dict = {}
    n = int(fusion.kernel["n"])

    def leaf(arg, shape, channel_axis):
        """An operand not derived from the matmul: a scalar, a per-channel constant or a tensor."""
        value = _constant(arg, bindings)
        if value is not None:
            if value.size == 1:
                return ("const", float(value.reshape(-1)[0]))
            expected = [1] * len(shape)
            expected[channel_axis] = n
            aligned = [1] * (len(shape) - value.ndim) + list(value.shape)
            if value.size == n and aligned == expected:
                fusion.biases.append(value.reshape(-1).astype(np.float32))
                return ("bias", len(fusion.biases) - 1)
            raise _NotFusible("a constant operand that is not one value per output channel")
        if isinstance(arg, relax.Var) and _shape(arg) == shape and arg.ty.dtype == "float32":
            fusion.tensors.append((arg, (tuple(shape), channel_axis)))
            return ("tensor", len(fusion.tensors) - 1)
        raise _NotFusible("an operand that broadcasts or is not float32")

    def visit(v):
        """(expression, (shape, channel axis)) of var ``v``, derived from the matmul."""
        refs[v] = refs.get(v, 0) + 1
        if v in memo:
            return memo[v]
        if v.same_as(matmul_var):
            result = (("x",), ([int(fusion.kernel["rows"]), n], 1))
        elif isinstance(bindings[v], relax.Var):
            result = visit(bindings[v])
        else:
            value = bindings[v]
            name = _op_name(value)
            shape = _shape(v)
            if name in _LAYOUT_OPS:
                expr, (in_shape, axis) = visit(value.args[0])
                if name == "relax.strided_slice":
                    axes, begin = [int(a) for a in value.args[1]], [int(b) for b in value.args[2]]
                    if len(in_shape) != 2 or axes != [0] or begin != [0] or shape[1:] != in_shape[1:]:
                        raise _NotFusible("its output is sliced other than dropping padded rows")
                elif name == "relax.reshape":
                    if axis != len(in_shape) - 1 or shape[-1] != in_shape[axis]:
                        raise _NotFusible("a reshape between the layers moves the channels")
                    axis = len(shape) - 1
                else:
                    axes = [int(a) for a in value.attrs.axes]
                    if len(in_shape) != 4 or axes != [0, 3, 1, 2] or axis != 3:
                        raise _NotFusible(f"a transpose {axes} between the layers")
                    axis = 1
                result = (expr, (shape, axis))
            else:
                op = name.removeprefix("relax.").removeprefix("nn.")
                operands = list(value.args[:1 if op in _UNARY else 2])
                derived = [isinstance(a, relax.Var) and matmul_var in deps(a) for a in operands]
                visited = [visit(a) if d else None for a, d in zip(operands, derived)]
                layouts = [r[1] for r in visited if r is not None]
                if any(layout[0] != shape for layout in layouts):
                    raise _NotFusible(f"{op} broadcasts the layer's output")
                channel_axis = layouts[0][1]
                children = [r[0] if r is not None else leaf(a, shape, channel_axis)
                            for r, a in zip(visited, operands)]
                if op == "clip":
                    low, high = (float(a.value) for a in value.args[1:3])
                    expr = ("clip", children[0], low, high)
                else:
                    expr = (op, *children)
                result = (expr, (shape, channel_axis))
        memo[v] = result
        fusion.vars.append(v)
        return result

    fusion.expr, fusion.layout = visit(start)
    for v, count in refs.items():
        if uses.get(v, 0) != count:
            raise _NotFusible(f"a value between the layers has {uses.get(v, 0)} users, {count} of them "
                              "in the epilogue (e.g. a residual branch)")
    return fusion


def _check_consumer(fusion: _Fusion, aq: dict):
    shape, channel_axis = fusion.layout
    if [int(d) for d in aq["shape"]] != shape or int(aq["axis"]) != channel_axis:
        raise _NotFusible("the next layer quantizes along another axis")
    if int(aq["groups"]) != 1:
        raise _NotFusible("the next layer is a grouped conv (per-group blocks)")
    if get_format(str(aq["fmt"])).rounding != Rounding.NEAREST:
        raise _NotFusible("the next layer's activations round stochastically")
    if int(fusion.kernel.get("tuned", 0)) and "schedule" not in fusion.kernel:
        raise _NotFusible("its kernel is a tuned one whose record has no design-space point to rebuild it with")
    if str(fusion.kernel.get("variant", "")) == "i8mm":
        raise _NotFusible("the i8mm kernel has no fused epilogue")


def _describe(fusion: _Fusion, fmt: str) -> str:
    """``"bias, relu, quantize to bfp8_b32"``: the distinct ops in evaluation order."""
    words = []
    for op, operands in _ops_of(fusion.expr, set()):
        words.append("bias" if op == "add" and any(o[0] == "bias" for o in operands) else op)
    if fusion.tensors:
        words.append(f"{len(fusion.tensors)} residual tensor" + ("s" if len(fusion.tensors) > 1 else ""))
    return ", ".join(words + [f"quantize to {fmt}"])


def _ops_of(expr, seen: set) -> list:
    """(op, operands) of each distinct node of ``expr`` in post-order (a shared subtree once)."""
    if expr[0] in ("x", "const", "bias", "tensor") or expr in seen:
        return []
    seen.add(expr)
    children = expr[1:2] if expr[0] in _UNARY else expr[1:]
    return [item for c in children for item in _ops_of(c, seen)] + [(expr[0], children)]


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
        epilogue = Epilogue(fmt_q, chain.expr, tuple(layout for _, layout in chain.tensors))
        rows_padded, n = int(k["rows"]), int(k["n"])
        fmt_a, fmt_w = get_format(str(k["fmt_a"])), get_format(str(k["fmt_w"]))
        if k["kind"] == "depthwise":
            geom = ConvGeometry(**{key: tuple(v) if isinstance(v, list) else v for key, v in k["geometry"].items()})
            func = bfp_depthwise_func(geom, fmt_a, fmt_w, epilogue=epilogue)
        else:
            tuned = None
            if "schedule" in k:  # a tuned kernel: its record's decisions on the fused compute
                c = k["schedule"]
                tuned = TunedConfig(int(c["rows"]), int(c["groups"]), str(c["order"]),
                                    None if c["task_rows"] is None else int(c["task_rows"]), int(c["unroll"]))
            func = bfp_matmul_func(rows_padded, n, int(k["k"]), fmt_a, fmt_w, str(k["variant"]), epilogue=epilogue,
                                   tuned=tuned)
        name = f"{k['name']}_{epilogue.tag}"
        # a fused kind is no producer of a further fusion; reports still find the layer's kernel
        record = {**k, "kind": f"{k['kind']}_fused", "name": name}
        func = opaque(func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
                      .with_attr(KERNEL_ATTR, record))
        gv = self.builder_.add_func(func, name)
        width = -(-n // fmt_q.block_size) * fmt_q.block_size
        args = [self.visit_expr(a) for a in chain.matmul_call.args[1].fields] + \
            [relax.const(b) for b in chain.biases] + [self.visit_expr(var) for var, _ in chain.tensors]
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


def _layer_after(matmul_var, bindings, users, layer_vars: dict) -> str | None:
    """The layer whose output is ``matmul_var`` or an alias/layout op of it."""
    var = matmul_var
    for _ in range(8):
        if var.name in layer_vars:
            return layer_vars[var.name]
        following = [u for u in users.get(var, []) if u is not None and
                     (isinstance(bindings[u], relax.Var) or _op_name(bindings[u]) in _LAYOUT_OPS)]
        if len(following) != 1:
            return None
        var = following[0]
    return None


def _layer_of(chain_vars, layer_vars: dict) -> str | None:
    for var in chain_vars:
        if var.name in layer_vars:
            return layer_vars[var.name]
    return None


@tvm.transform.module_pass(opt_level=0, name="FuseBFPEpilogue")
class FuseBFPEpilogue:
    """Fuse bias, activation and the next layer's activation quantization into integer matmuls
    and depthwise kernels.

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
            deps = _matmul_dependencies(mod, bindings)
            order = {v: i for i, v in enumerate(bindings)}
            for var, value in bindings.items():
                aq = _kernel(mod, value)
                if aq is None or aq["kind"] != "act_quant":
                    continue
                next_layer = _consumer_layer(var, bindings, layer_vars)
                start = value.args[1].fields[0]
                try:
                    fusion = _build_fusion(mod, start, bindings, uses, deps, order)
                except _NotFusible as why:
                    sources = deps(start)
                    if sources:
                        layer = _layer_after(max(sources, key=order.get), bindings, users, layer_vars)
                        if layer in integer:
                            notes.setdefault(layer, f"not fused: {why}")
                    continue
                layer = _layer_of(fusion.vars, layer_vars)
                if layer is None or layer not in integer:
                    continue
                try:
                    _check_consumer(fusion, aq)
                except _NotFusible as why:
                    notes[layer] = f"not fused: {why}"
                    continue
                fuser.plans[var] = (fusion, aq)
                notes[layer] = f"fused: {_describe(fusion, aq['fmt'])} for {next_layer}"
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
