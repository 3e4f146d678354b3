"""LowerBFPInteger: run planned layers as integer BFP kernels (the deployment path).

Where it sits: after :class:`~bitq_tvm.passes.AnnotateBFPLayers` and the binding of the weights
(it packs them from the bound constants), before :class:`~bitq_tvm.passes.InsertBFPSimulation`,
which then simulates only the layers this pass left in float. Its decisions travel in the IR: the
function's ``bitq.deployment`` attribute holds, per annotated layer, kind, mode, variant, reason,
FP32 and stored bytes, plus the tuned kernels used (:func:`deployment_layers` reads it).
Each planned ``matmul``/``conv2d`` whose formats the integer kernel supports becomes:

1. ``call_tir`` of the activation quantizer (:mod:`~bitq_tvm.kernels.bfp_act_quant`): float
   input -> int8 mantissas + int8 exponents, blocks along K (matmul) or input channels per group
   (conv, written NHWC);
2. convs only: ``call_tir`` of one im2col per group (:mod:`~bitq_tvm.kernels.bfp_conv`),
   skipped for pointwise convs;
3. ``call_tir`` of the integer BFP matmul (:mod:`~bitq_tvm.kernels.bfp_matmul`, variant
   vnni/avx2/generic from the target's intrinsic family) against the weight packed at compile
   time in NumPy from the bound constant (quantized in its stored layout, like the simulation);
4. float reshapes (and a transpose back to NCHW for convs) that TVM legalizes and fuses with the
   layer's epilogue (bias add, ReLU, residual add): those are not part of the integer kernel,
   whose scaled float32 output they read once.

A window-blocked conv (a stem, :func:`~bitq_tvm.kernels.contract.is_window_blocked`) swaps steps
1 and 2 and runs them as one kernel (:func:`~bitq_tvm.kernels.bfp_conv.window_act_quant_func`):
the float32 im2col rows, quantized along each row, then steps 3 and 4 against the weight's
``[O, KH*KW*C]`` view, packed like a matmul's.

A depthwise conv (:func:`~bitq_tvm.kernels.contract.is_depthwise`) is step 1 with an exponent
per value (:func:`~bitq_tvm.kernels.contract.depthwise_activation_format`, NHWC), then
``call_tir`` of the depthwise kernel (:mod:`~bitq_tvm.kernels.bfp_depthwise`, on the quantized
input directly, no im2col) against its weight, one exponent per channel, then step 4.

Weight storage: mantissas (two per byte when m <= 4) and int8 exponents
(:mod:`~bitq_tvm.kernels.packing`) are Relax constants of ``main``, passed as they are to the
matmul, which unpacks nibbles and builds block scales in registers: the artifact's weight bytes
are the bytes resident at run time, and ``main`` takes only the model's inputs.

Layers the kernel cannot run stay float with a reason (in ``bitq.deployment``), never
silently: weights that are not bound constants, weight-only or activation-only plans, different
weight/activation block sizes, block sizes that are not a multiple of 4 in [8, 128], convs whose
padded K would be more than ``max_padding_ratio`` times the real one, depthwise convs with
several outputs per channel or channels in no whole vectors, non-NCHW layouts, non-2-D weights
(the contract's :func:`~bitq_tvm.kernels.contract.integer_support`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax import PyExprMutator, expr_functor

from ..errors import BitqError
from ..formats import BFPFormat, quantize_np
from ..plan import LayerFormats
from ..kernels.bfp_act_quant import act_quant_shapes, bfp_act_quant_func
from ..kernels.bfp_conv import ConvGeometry, bfp_im2col_func, window_act_quant_func, window_act_quant_name
from ..kernels.bfp_depthwise import bfp_depthwise_func, pack_depthwise_weights
from ..kernels.bfp_matmul import bfp_matmul_name
from ..kernels.bfp_matmul_variants import VARIANTS, bfp_matmul_func
from ..kernels.contract import (DEFAULT_MAX_PADDING_RATIO, KERNEL_ATTR, depthwise_activation_format, format_problem, gemm_geometry,
                                integer_support, is_depthwise, is_window_blocked)
from ..kernels.packing import PackedWeights, pack_quantized, pack_weights
from ..frontend import LAYER_NAMES_ATTR
from ..frontend.reference import window_weight_rows
from ..support.attrs import plain_attr
from .annotate_layers import annotated_layers, is_tensor_constant, layer_weight, permute_axes, resolve_formats

__all__ = ["DEPLOYMENT_ATTR", "KERNEL_ATTR", "LayerDeployment", "LowerBFPInteger", "deployment_layers",
           "deployment_modes", "opaque", "plain_attr"]

DEPLOYMENT_ATTR = "bitq.deployment"
# On a tuned kernel handed in by the pipeline: its record's decisions (TunedConfig fields).
TUNED_CONFIG_ATTR = "bitq.tuned_config"

_OPAQUE = 8  # relax OpPatternKind.kOpaque


@dataclasses.dataclass(frozen=True)
class LayerDeployment:
    """How one layer runs in the deployed model.

    ``mode`` is ``"integer"`` (BFP kernel ``variant``), ``"simulation"`` (float fake-quant
    fallback, ``reason`` says why) or ``"fp32"`` (not planned). Byte counts are the layer weight's
    storage: FP32 and, for integer layers, the packed constants. ``epilogue`` (integer layers,
    set by :class:`~bitq_tvm.passes.FuseBFPEpilogue`): what the kernel's epilogue fuses, or why not.
    """

    layer: str
    kind: str
    mode: str
    variant: str | None = None
    reason: str = ""
    fp32_bytes: int = 0
    stored_bytes: int = 0
    epilogue: str = ""

    def __post_init__(self):
        if self.mode not in ("integer", "simulation", "fp32"):
            raise BitqError(f"LayerDeployment({self.layer}): mode {self.mode!r} is not integer/simulation/fp32")
        if (self.mode == "integer") != (self.variant is not None):
            raise BitqError(f"LayerDeployment({self.layer}): a variant goes with mode 'integer' only")
        if self.mode == "simulation" and not self.reason:
            raise BitqError(f"LayerDeployment({self.layer}): a fallback needs a reason")

    def to_attr(self) -> dict:
        """The record as IR attribute (and JSON) values."""
        return {**dataclasses.asdict(self), "variant": self.variant or ""}

    @classmethod
    def from_attr(cls, record) -> "LayerDeployment":
        record = plain_attr(record)
        return cls(**{**record, "variant": record["variant"] or None})


def deployment_attr(func: relax.Function) -> dict | None:
    """The ``bitq.deployment`` attribute of ``func`` as plain Python (None if absent)."""
    if func.attrs is None or DEPLOYMENT_ATTR not in func.attrs:
        return None
    return plain_attr(func.attrs[DEPLOYMENT_ATTR])


def deployment_layers(record: dict) -> list[LayerDeployment]:
    """The per-layer decisions of a ``bitq.deployment`` record, in program order."""
    return [LayerDeployment.from_attr(r) for r in record["layers"]]


def deployment_modes(func: relax.Function) -> dict[str, str]:
    """Layer -> ``integer``/``simulation``/``fp32`` from ``func``'s ``bitq.deployment``."""
    record = deployment_attr(func)
    return {} if record is None else {d.layer: d.mode for d in deployment_layers(record)}


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def conv_geometry(call: relax.Call) -> ConvGeometry:
    """The :class:`~bitq_tvm.kernels.bfp_conv.ConvGeometry` of an NCHW/OIHW ``relax.nn.conv2d`` call."""
    attrs = call.attrs
    n, c, h, w = _shape(call.args[0])
    o, _, kh, kw = _shape(call.args[1])
    return ConvGeometry(n, c, h, w, o, (kh, kw), tuple(int(s) for s in attrs.strides),
                        tuple(int(p) for p in attrs.padding), tuple(int(d) for d in attrs.dilation),
                        int(attrs.groups))


@expr_functor.mutator
class _Lowerer(PyExprMutator):
    def __init__(self, mod: IRModule, variant: str, max_padding_ratio: float, kernels):
        super().__init__(mod)
        self.formats: dict = {}
        self.variant = variant
        self.max_padding_ratio = max_padding_ratio
        self.kernels = kernels
        self.tuned_used: set[str] = set()
        self.var_to_layer: dict[str, str] = {}
        self.report: dict[str, LayerDeployment] = {}  # of the function being lowered
        self.weight_names: dict[str, str] = {}  # layer -> weight name for messages (producer's hint)
        self.weight_name = ""
        self._act_cache: dict = {}

    # ---- helpers ---------------------------------------------------------------------------
    def _emit(self, value, name: str):
        return self.builder_.emit(value, name)

    def _call_tir(self, func, name: str, args, out_shapes_dtypes):
        gv = self.builder_.add_func(opaque(func), name)
        out = [relax.TensorType(list(s), d) for s, d in out_shapes_dtypes]
        return self._emit(relax.call_tir(gv, args, out if len(out) > 1 else out[0]), name)

    def _mantissas_exponents(self, quantized: relax.Expr, name: str):
        """The (Q, E) outputs of a quantizer's call_tir, bound as ``<name>_qa``/``<name>_ea``."""
        return (self._emit(relax.TupleGetItem(quantized, 0), f"{name}_qa"),
                self._emit(relax.TupleGetItem(quantized, 1), f"{name}_ea"))

    def _quantize_activation(self, x: relax.Expr, fmt: BFPFormat, axis: int, groups: int, name: str):
        # q/k/v projections read one input: quantize it once
        key = (x, fmt, axis, groups)
        if key not in self._act_cache:
            shape = _shape(x)
            q_shape, e_shape = act_quant_shapes(shape, fmt, axis, groups)
            tag = f"bfp_aq_{fmt.name}_a{axis % len(shape)}_g{groups}_{'x'.join(map(str, shape))}"
            func = bfp_act_quant_func(shape, fmt, axis, groups).with_attr(
                KERNEL_ATTR, {"kind": "act_quant", "shape": shape, "fmt": fmt.name, "axis": axis % len(shape),
                              "groups": groups})
            both = self._call_tir(func, tag, [x],
                                  [(q_shape, "int8"), (e_shape, "int8")])
            self._act_cache[key] = self._mantissas_exponents(both, name)
        return self._act_cache[key]

    def _matmul(self, qa, ea, packed: PackedWeights, rows: int, k: int, fmt_a, name: str):
        tag = bfp_matmul_name(rows, packed.n, k, fmt_a, packed.fmt, self.variant)
        func = self.kernels(rows, packed.n, k, fmt_a, packed.fmt, self.variant) if callable(self.kernels) \
            else self.kernels.get(tag)
        tuned = func is not None
        if func is None:
            func = bfp_matmul_func(rows, packed.n, k, fmt_a, packed.fmt, self.variant)
        else:
            self.tuned_used.add(tag)
        info = {"kind": "matmul", "name": tag, "rows": rows, "n": packed.n, "k": k, "fmt_a": fmt_a.name,
                "fmt_w": packed.fmt.name, "variant": self.variant, "tuned": int(tuned)}
        if tuned and func.attrs is not None and TUNED_CONFIG_ATTR in func.attrs:
            info["schedule"] = func.attrs[TUNED_CONFIG_ATTR]  # FuseBFPEpilogue rebuilds with it
            func = func.without_attr(TUNED_CONFIG_ATTR)
        func = func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True).with_attr(KERNEL_ATTR, info)
        weights = [relax.const(packed.qw), relax.const(packed.ew)]  # the stored format, read as is
        return self._call_tir(func, tag, [qa, ea, *weights], [((rows, packed.n), "float32")])

    # ---- layers ----------------------------------------------------------------------------
    def _lower_matmul(self, call: relax.Call, original: relax.Call, lf: LayerFormats, name: str):
        x = call.args[0]
        x_shape, w_shape = _shape(x), _shape(call.args[1])
        if len(w_shape) != 2 or len(x_shape) < 2:
            return None, f"matmul of a {len(x_shape)}-D input by a {len(w_shape)}-D weight (kernel: 2-D weights)"
        const, permute = layer_weight(self, original.args[1])
        if const is None or not is_tensor_constant(const):
            return None, _NOT_CONSTANT
        stored = const.value.numpy()
        k_axis = permute_axes(permute)[0] if permute is not None else 0  # the stored tensor's K axis
        try:
            packed = pack_weights(stored, lf.weight, self.weight_name, k_axis)
        except BitqError as err:
            return None, str(err)
        k, n = w_shape
        geometry = gemm_geometry("matmul", x_shape, w_shape, x_shape[:-1] + [n], lf.weight.block_size)
        rows, rows_p = geometry.rows, geometry.rows_padded
        flat = x if len(x_shape) == 2 else self._emit(relax.op.reshape(x, [rows, k]), f"{name}_rows")
        if rows_p != rows:
            flat = self._emit(relax.op.nn.pad(flat, [0, rows_p - rows, 0, 0]), f"{name}_padded")
        qa, ea = self._quantize_activation(flat, lf.activation, 1, 1, name)
        # the padded K: the kernel's name and record say what it computes, as tuning keys it
        out = self._matmul(qa, ea, packed, rows_p, geometry.k_padded, lf.activation, name)
        if rows_p != rows:
            out = self._emit(relax.op.strided_slice(out, [0], [0], [rows]), f"{name}_unpadded")
        if len(x_shape) != 2:
            out = relax.op.reshape(out, x_shape[:-1] + [n])
        return (out, packed.nbytes), None

    def _lower_conv(self, call: relax.Call, original: relax.Call, lf: LayerFormats, name: str):
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
            return None, f"conv2d layout {attrs.data_layout}/{attrs.kernel_layout} (kernel: NCHW/OIHW)"
        const, permute = layer_weight(self, original.args[1])
        if const is None or not is_tensor_constant(const) or permute is not None:
            return None, _NOT_CONSTANT
        n, c, h, w = _shape(call.args[0])
        o, cg, kh, kw = _shape(call.args[1])
        pad = [int(p) for p in attrs.padding]
        geom = conv_geometry(call)
        reason = integer_support("conv2d", (o, cg, kh, kw), geom.groups, lf.weight, lf.activation,
                                 self.max_padding_ratio)
        if reason is not None:
            return None, reason
        if is_depthwise((o, cg, kh, kw), geom.groups):
            return self._lower_depthwise(call, const.value.numpy(), geom, lf, name)
        if is_window_blocked((o, cg, kh, kw), geom.groups, lf.weight.block_size):
            return self._lower_window_conv(call, const.value.numpy(), geom, lf, name)
        geometry = geom.gemm(lf.weight.block_size)
        cg_p = geometry.group_channels_padded
        stored = const.value.numpy()
        try:
            t = quantize_np(stored, lf.weight, axis=1, name=self.weight_name)
        except BitqError as err:
            return None, str(err)
        mantissas = t.mantissas.reshape(o, kh * kw * cg_p)
        exponents = t.exponents.reshape(o, -1)
        og = o // geom.groups
        try:
            packs = [pack_quantized(mantissas[g * og:(g + 1) * og], exponents[g * og:(g + 1) * og],
                                    lf.weight, self.weight_name) for g in range(geom.groups)]
        except BitqError as err:
            return None, str(err)

        qa, ea = self._quantize_activation(call.args[0], lf.activation, 1, geom.groups, name)
        k = geometry.k_padded
        rows = geometry.rows_padded
        outs = []
        for g, packed in enumerate(packs):
            if geom.is_pointwise and rows == geom.rows:
                a = self._emit(relax.op.reshape(qa, [rows, k]), f"{name}_a")
                e = self._emit(relax.op.reshape(ea, [rows, k // lf.activation.block_size]), f"{name}_e")
            else:
                tag = (f"bfp_im2col_{lf.activation.name}_{n}x{c}x{h}x{w}_k{kh}x{kw}_s{geom.strides[0]}x"
                       f"{geom.strides[1]}_p{'x'.join(map(str, pad))}_d{geom.dilation[0]}x{geom.dilation[1]}"
                       f"_g{g}of{geom.groups}_r{rows}")
                both = self._call_tir(bfp_im2col_func(geom, lf.activation, g, rows), tag, [qa, ea],
                                      [((rows, k), "int8"), ((rows, k // lf.activation.block_size), "int8")])
                a = self._emit(relax.TupleGetItem(both, 0), f"{name}_a")
                e = self._emit(relax.TupleGetItem(both, 1), f"{name}_e")
            outs.append(self._matmul(a, e, packed, rows, k, lf.activation, f"{name}_g{g}"))
        out = outs[0] if len(outs) == 1 else self._emit(relax.op.concat(outs, axis=1), f"{name}_cat")
        if rows != geom.rows:
            out = self._emit(relax.op.strided_slice(out, [0], [0], [geom.rows]), f"{name}_unpadded")
        out = self._emit(relax.op.reshape(out, [n, geom.out_height, geom.out_width, o]), f"{name}_nhwc")
        return (relax.op.permute_dims(out, [0, 3, 1, 2]), sum(p.nbytes for p in packs)), None

    def _lower_window_conv(self, call: relax.Call, stored: np.ndarray, geom: ConvGeometry, lf: LayerFormats,
                           name: str):
        try:  # blocks along each output channel's window, formed on the [O, KH*KW*C] view
            packed = pack_weights(window_weight_rows(stored), lf.weight, self.weight_name)
        except BitqError as err:
            return None, str(err)
        geometry = geom.gemm(lf.weight.block_size)
        rows = geometry.rows_padded
        fmt_a = lf.activation
        q_shape, e_shape = act_quant_shapes((rows, geometry.k), fmt_a, 1)
        both = self._call_tir(window_act_quant_func(geom, fmt_a, rows), window_act_quant_name(geom, fmt_a, rows),
                              [call.args[0]], [(q_shape, "int8"), (e_shape, "int8")])
        qa, ea = self._mantissas_exponents(both, name)
        out = self._matmul(qa, ea, packed, rows, geometry.k_padded, lf.activation, name)
        if rows != geom.rows:
            out = self._emit(relax.op.strided_slice(out, [0], [0], [geom.rows]), f"{name}_unpadded")
        out = self._emit(relax.op.reshape(out, [geom.batch, geom.out_height, geom.out_width, geom.out_channels]),
                         f"{name}_nhwc")
        return (relax.op.permute_dims(out, [0, 3, 1, 2]), packed.nbytes), None

    def _lower_depthwise(self, call: relax.Call, stored: np.ndarray, geom: ConvGeometry, lf: LayerFormats,
                         name: str):
        try:
            qw, ew = pack_depthwise_weights(stored, lf.weight, self.weight_name)
        except BitqError as err:
            return None, str(err)
        # an exponent per value (the contract's depthwise_activation_format), NHWC
        qa, ea = self._quantize_activation(call.args[0], depthwise_activation_format(lf.activation), 1, 1, name)
        c = geom.channels
        tag = (f"bfp_depthwise_{lf.activation.name}_{lf.weight.name}_{geom.batch}x{c}x{geom.height}x{geom.width}"
               f"_k{geom.kernel[0]}x{geom.kernel[1]}_s{geom.strides[0]}x{geom.strides[1]}"
               f"_p{'x'.join(map(str, geom.padding))}_d{geom.dilation[0]}x{geom.dilation[1]}")
        func = bfp_depthwise_func(geom, lf.activation, lf.weight).with_attr(
            KERNEL_ATTR, {"kind": "depthwise", "name": tag, "rows": geom.rows, "n": c,
                          "geometry": dataclasses.asdict(geom), "fmt_a": lf.activation.name,
                          "fmt_w": lf.weight.name})
        out = self._call_tir(func, tag, [qa, ea, relax.const(qw), relax.const(ew)],
                             [((geom.rows, c), "float32")])
        out = self._emit(relax.op.reshape(out, [geom.batch, geom.out_height, geom.out_width, c]), f"{name}_nhwc")
        return (relax.op.permute_dims(out, [0, 3, 1, 2]), qw.nbytes + ew.nbytes), None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        layer = self.var_to_layer.get(binding.var.name)
        value = binding.value
        if layer is None or not isinstance(value, relax.Call):
            super().visit_var_binding_(binding)
            return
        lf = self.formats.get(layer)
        self.weight_name = self.weight_names.get(layer, layer)
        kind = "conv2d" if value.op.name == "relax.nn.conv2d" else "matmul"
        fp32_bytes = int(np.prod(_shape(value.args[1]))) * 4
        if lf is None or lf.is_fp32:
            self.report[layer] = LayerDeployment(layer, kind, "fp32", fp32_bytes=fp32_bytes)
            super().visit_var_binding_(binding)
            return
        reason = format_problem(lf.weight, lf.activation)
        result = None
        if reason is None:
            call = self.visit_expr(value)
            lower = self._lower_conv if kind == "conv2d" else self._lower_matmul
            result, reason = lower(call, value, lf, binding.var.name)
        if result is None:
            self.report[layer] = LayerDeployment(layer, kind, "simulation", reason=reason, fp32_bytes=fp32_bytes)
            super().visit_var_binding_(binding)
            return
        out, stored_bytes = result
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(out, binding.var.name)
        else:
            new_var = self.builder_.emit_output(out, binding.var.name)
        self.set_var_remap(binding.var, new_var)
        self.report[layer] = LayerDeployment(layer, kind, "integer", self.variant, fp32_bytes=fp32_bytes,
                                             stored_bytes=stored_bytes)


_NOT_CONSTANT = "weight is not a bound constant (bind the weight parameters before this pass)"


def opaque(func):
    """Mark a hand-scheduled kernel opaque: FuseOps would merge it with neighbouring ops into a new
    PrimFunc that loses the schedule (and breaks FuseTIR on the matmul's buffers)."""
    return func.with_attr("op_pattern", _OPAQUE)


@tvm.transform.module_pass(opt_level=0, name="LowerBFPInteger")
class LowerBFPInteger:
    """Replace planned layers by integer BFP kernels; report and skip what cannot be lowered.

    Parameters
    ----------
    formats : Plan or dict
        A :class:`~bitq_tvm.plan.Plan`, or layer name -> :class:`~bitq_tvm.plan.LayerFormats`
        (then every planned layer must be annotated). Weights are packed from bound constants.
    variant : str
        Matmul kernel variant (:func:`~bitq_tvm.kernels.bfp_matmul_variants.kernel_variant` of the target).
    max_padding_ratio : float
        Largest padded/real in-group channel ratio a conv may have and still be lowered.
    kernels : dict or callable, optional
        Tuned kernels: by name (:func:`~bitq_tvm.kernels.bfp_matmul.bfp_matmul_name`, the tuning
        database key), or ``kernels(rows, n, k, fmt_a, fmt_w, variant) -> PrimFunc | None``;
        kernels it has not use the default schedule. ``bitq.deployment`` lists the ones used.

    The function with the annotated layers gets the ``bitq.deployment`` attribute: every
    annotated layer's :class:`LayerDeployment` (program order), the variant and the tuned kernels.
    """

    def __init__(self, formats, variant: str, max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO, kernels=None):
        if variant not in VARIANTS:
            raise BitqError(f"LowerBFPInteger: variant {variant!r} is not one of {', '.join(VARIANTS)}")
        if max_padding_ratio < 1:
            raise BitqError(f"LowerBFPInteger: max_padding_ratio {max_padding_ratio} must be >= 1")
        self.formats = formats
        self.variant = variant
        self.max_padding_ratio = float(max_padding_ratio)
        self.kernels = kernels if callable(kernels) else dict(kernels or {})

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        lowerer = _Lowerer(mod, self.variant, self.max_padding_ratio, self.kernels)
        main_gv = None
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not annotated_layers(func):
                continue
            if main_gv is not None:
                raise BitqError("LowerBFPInteger: more than one Relax function has annotated layers")
            main_gv = gv
            layers = annotated_layers(func)
            lowerer.formats = resolve_formats(self.formats, layers)
            lowerer.var_to_layer = {var: layer for layer, var in layers.items()}
            hint = func.attrs[LAYER_NAMES_ATTR] if LAYER_NAMES_ATTR in func.attrs else {}
            lowerer.weight_names = {str(layer): str(weight) for weight, layer in hint.items()}
            new_func = lowerer.visit_expr(func)
            record = {"variant": self.variant, "layers": [d.to_attr() for d in lowerer.report.values()],
                      "tuned_kernels": sorted(lowerer.tuned_used)}
            lowerer.builder_.update_func(gv, new_func.with_attr(DEPLOYMENT_ATTR, record))
        if main_gv is None and not isinstance(self.formats, dict):
            resolve_formats(self.formats, [])  # a plan naming layers of a module without any
        planned = self.formats if isinstance(self.formats, dict) else lowerer.formats
        missing = [name for name, lf in planned.items() if not lf.is_fp32 and name not in lowerer.report]
        if missing:
            raise BitqError(f"LowerBFPInteger: planned layer(s) {missing} are not annotated in the module "
                            "(run AnnotateBFPLayers first)")
        return lowerer.builder_.get()

