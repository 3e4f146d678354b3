"""InsertBFPSimulation: BFP quantize -> dequantize on each planned layer's weight and input.

Where it sits: after :class:`~bitq_tvm.passes.AnnotateBFPLayers` (it finds layers by the names that
pass recorded) and, on the deployment path, after :class:`~bitq_tvm.passes.LowerBFPInteger`, whose
``bitq.deployment`` attribute says which layers it left in float: only those are simulated there.
Then constants are folded. Each planned layer's ``conv2d``/``matmul`` gets its operands replaced
by ``call_tir`` of the BFP fake-quant kernel (:mod:`bitq_tvm.kernels.bfp_quant`) with blocks along
the op's reduction axis: input channels within a group (per kernel offset) for convs, K for
matmuls; a depthwise conv's input has one value per block and its weight one block per
channel's window (the contract's :func:`~bitq_tvm.kernels.contract.block_axes`,
:func:`~bitq_tvm.kernels.contract.depthwise_weight_blocks`); a window-blocked conv (a stem,
:func:`~bitq_tvm.kernels.contract.is_window_blocked`) becomes im2col
(:func:`~bitq_tvm.kernels.bfp_conv.window_im2col_func`), fake quantization of the rows and a
matmul by the weight's ``[O, KH*KW*C]`` view, quantized along its rows. Once the weights are bound, ``FoldConstant`` runs the weight kernels at compile time, so
only activations are quantized at run time. The output simulates BFP inference in FP32 arithmetic and equals the NumPy reference of
the same plan up to float32 summation order.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor

from ..errors import BitqError
from ..kernels.bfp_quant import bfp_fake_quant_func, bfp_fake_quant_name
from ..kernels.bfp_conv import window_im2col_func, window_im2col_name
from ..kernels.contract import WINDOW_WEIGHT_AXES, block_axes, depthwise_weight_blocks, is_depthwise, is_window_blocked
from .annotate_layers import annotated_layers, layer_weight, permute_axes, resolve_formats
from .lower_bfp_integer import DEPLOYMENT_ATTR, conv_geometry, deployment_modes, opaque


def _is_depthwise(call: relax.Call) -> bool:
    return call.op.name == "relax.nn.conv2d" and is_depthwise([int(d) for d in call.args[1].ty.shape],
                                                               int(call.attrs.groups))


def _is_window_blocked(call: relax.Call, fmt) -> bool:
    return call.op.name == "relax.nn.conv2d" and is_window_blocked([int(d) for d in call.args[1].ty.shape],
                                                                    int(call.attrs.groups), fmt.block_size)


def _block_axes(call: relax.Call) -> tuple[tuple[int, int], tuple[int, int]]:
    """((activation axis, groups), (weight axis, groups)) of a layer op (the kernel contract's rule)."""
    if call.op.name == "relax.nn.conv2d":
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
            raise BitqError(f"conv2d layout {attrs.data_layout}/{attrs.kernel_layout} is not supported (NCHW/OIHW)")
        return block_axes("conv2d", 4, 4, int(attrs.groups))
    return block_axes("matmul", len(call.args[0].ty.shape), len(call.args[1].ty.shape))


@expr_functor.mutator
class _Simulator(PyExprMutator):
    def __init__(self, mod: IRModule, formats: dict):
        super().__init__(mod)
        self.formats = formats
        self.var_to_layer: dict[str, str] = {}
        self.done: set[str] = set()

    def _fake_quant(self, expr: relax.Expr, fmt, axis: int, groups: int, name: str) -> relax.Expr:
        shape = [int(d) for d in expr.ty.shape]
        func = bfp_fake_quant_func(tuple(shape), fmt, axis, groups)
        # Shapes in the name keep it deterministic (a tuning-database key), never deduplicated.
        name = f"{bfp_fake_quant_name(fmt, axis, groups)}_{'x'.join(map(str, shape))}"
        gv = self.builder_.add_func(func, name)
        return self.builder_.emit(relax.call_tir(gv, [expr], relax.TensorType(shape, expr.ty.dtype)), name)

    def _quantize_weight(self, original: relax.Expr, weight: relax.Expr, fmt, axis: int, name: str) -> relax.Expr:
        """Quantize a weight in the layout the model stores it (before the importer's transpose).

        Stochastic rounding draws by element index, so the blocks must be formed on the stored
        tensor for the result to match the NumPy reference of the ONNX initializer.
        """
        stored, permute = layer_weight(self, original)
        if permute is not None:
            axes = permute_axes(permute)
            quantized = self._fake_quant(self.visit_expr(stored), fmt, axes[axis], 1, name)
            return self.builder_.emit(relax.op.permute_dims(quantized, axes), f"{name}_t")
        return self._fake_quant(weight, fmt, axis, 1, name)

    def _quantize_depthwise_weight(self, weight: relax.Expr, fmt, name: str) -> relax.Expr:
        """One block per channel: the ``[C, KH*KW]`` view along axis 1 (the contract's rule)."""
        shape = [int(d) for d in weight.ty.shape]
        view, window = depthwise_weight_blocks(shape, fmt)
        flat = self.builder_.emit(relax.op.reshape(weight, list(view)), f"{name}_view")
        quantized = self._fake_quant(flat, window, 1, 1, name)
        return self.builder_.emit(relax.op.reshape(quantized, shape), f"{name}_w")

    def _quantize_window_weight(self, weight: relax.Expr, fmt, name: str) -> relax.Expr:
        """Blocks along each output channel's window: the ``[O, KH*KW*C]`` view along axis 1,
        back in OIHW (the contract's :data:`~bitq_tvm.kernels.contract.WINDOW_WEIGHT_AXES`)."""
        o, c, kh, kw = (int(d) for d in weight.ty.shape)
        rows = self.builder_.emit(relax.op.reshape(relax.op.permute_dims(weight, list(WINDOW_WEIGHT_AXES)),
                                                   [o, kh * kw * c]), f"{name}_rows")
        quantized = self._fake_quant(rows, fmt, 1, 1, name)
        ohwi = self.builder_.emit(relax.op.reshape(quantized, [o, kh, kw, c]), f"{name}_ohwi")
        return self.builder_.emit(relax.op.permute_dims(ohwi, [0, 3, 1, 2]), f"{name}_w")

    def _window_conv(self, call: relax.Call, x: relax.Expr, weight: relax.Expr, fmt, name: str) -> relax.Expr:
        """The conv with its input quantized along im2col rows: rows @ weight view -> NCHW."""
        geom = conv_geometry(call)
        rows_name = window_im2col_name(geom, geom.rows)
        gv = self.builder_.add_func(opaque(window_im2col_func(geom)), rows_name)  # FuseOps keeps its schedule
        k = geom.kernel[0] * geom.kernel[1] * geom.channels
        rows = self.builder_.emit(relax.call_tir(gv, [x], relax.TensorType([geom.rows, k], "float32")), rows_name)
        rows = self._fake_quant(rows, fmt, 1, 1, f"{name}_act_bfp")
        w_rows = relax.op.reshape(relax.op.permute_dims(weight, list(WINDOW_WEIGHT_AXES)), [geom.out_channels, k])
        out = self.builder_.emit(relax.op.matmul(rows, relax.op.permute_dims(w_rows, [1, 0])), f"{name}_rows")
        out = relax.op.reshape(out, [geom.batch, geom.out_height, geom.out_width, geom.out_channels])
        return relax.op.permute_dims(out, [0, 3, 1, 2])

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        layer = self.var_to_layer.get(binding.var.name)
        lf = self.formats.get(layer) if layer is not None else None
        value = binding.value
        if lf is None or lf.is_fp32 or not isinstance(value, relax.Call):
            super().visit_var_binding_(binding)
            return
        call = self.visit_expr(value)
        try:
            (a_axis, a_groups), (w_axis, w_groups) = _block_axes(call)
        except BitqError as err:
            raise BitqError(f"layer '{layer}': {err}") from None
        args = list(call.args)
        window = lf.activation is not None and _is_window_blocked(call, lf.activation)
        if lf.activation is not None and not window:
            args[0] = self._fake_quant(args[0], lf.activation, a_axis, a_groups, f"{binding.var.name}_act_bfp")
        if lf.weight is not None and _is_depthwise(call):
            args[1] = self._quantize_depthwise_weight(args[1], lf.weight, f"{binding.var.name}_w_bfp")
        elif lf.weight is not None and _is_window_blocked(call, lf.weight):
            args[1] = self._quantize_window_weight(args[1], lf.weight, f"{binding.var.name}_w_bfp")
        elif lf.weight is not None:
            args[1] = self._quantize_weight(value.args[1], args[1], lf.weight, w_axis, f"{binding.var.name}_w_bfp")
        if window:
            new_call = self._window_conv(call, args[0], args[1], lf.activation, binding.var.name)
        else:
            new_call = relax.Call(call.op, args, call.attrs, call.ty_args)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(new_call, binding.var.name)
        else:
            new_var = self.builder_.emit_output(new_call, binding.var.name)
        self.set_var_remap(binding.var, new_var)
        self.done.add(layer)


@tvm.transform.module_pass(opt_level=0, name="InsertBFPSimulation")
class InsertBFPSimulation:
    """Insert BFP fake quantization on planned layers' weights and input activations.

    Parameters
    ----------
    formats : Plan or dict
        A :class:`~bitq_tvm.plan.Plan`, or layer name -> :class:`~bitq_tvm.plan.LayerFormats`.
        Layers absent or FP32 are left alone, and so are layers a ``bitq.deployment`` attribute
        says run as integer kernels; a planned layer missing from the module is an error.
    """

    def __init__(self, formats):
        self.formats = formats

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        sim = _Simulator(mod, {})
        seen = set()
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            layers = annotated_layers(func)
            if not layers:
                continue
            seen.update(layers)
            formats = resolve_formats(self.formats, layers)
            if func.attrs is not None and DEPLOYMENT_ATTR in func.attrs:
                modes = deployment_modes(func)
                formats = {name: lf for name, lf in formats.items() if modes.get(name) == "simulation"}
            sim.formats = formats
            sim.var_to_layer = {var: layer for layer, var in layers.items()}
            sim.builder_.update_func(gv, sim.visit_expr(func))
        if not isinstance(self.formats, dict):
            if not seen:
                resolve_formats(self.formats, [])  # a plan naming layers of a module without any
            return sim.builder_.get()  # a Plan was resolved against each function's layers
        missing = [name for name, lf in self.formats.items() if not lf.is_fp32 and name not in seen]
        if missing:
            raise BitqError(f"InsertBFPSimulation: planned layer(s) {missing} are not annotated in the module "
                            "(run AnnotateBFPLayers first)")
        return sim.builder_.get()
