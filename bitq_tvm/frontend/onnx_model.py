"""Load an ONNX model, pin its shapes and find the layers BFP can quantize.

This is the first step of the data flow (model -> layers -> ...). It turns whatever an exporter
wrote into one normal form that the Relax importer and the NumPy reference both read:

- input shapes pinned (``--input-shape``, else the model's static shapes, else the
  ``bitq.default_input_shape`` metadata our bundled models carry) and shape subgraphs folded;
- BatchNormalization after a Conv folded into the Conv's weight and bias, so that the weight BFP
  quantizes is the weight that is deployed;
- layer weights (Conv/MatMul/Gemm weights) held as initializers and every other constant as a
  ``Constant`` node: the Relax importer then turns exactly the layer weights into named function
  parameters (``keep_params_in_input=True``) and everything else (reshape shapes, biases) into
  Relax constants.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import BitqError
from ..kernels.contract import is_depthwise, is_window_blocked

#: ONNX ops whose constant second input is a weight BFP quantizes.
LAYER_OPS = ("Conv", "MatMul", "Gemm")
#: ONNX ops that look like layers but have no BFP lowering; a plan naming one is an error.
UNSUPPORTED_LAYER_OPS = ("ConvTranspose", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
DEFAULT_SHAPE_KEY = "bitq.default_input_shape"
# Shape subgraphs are folded; anything bigger is data, not shape arithmetic.
_FOLD_MAX_ELEMENTS = 4096


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantizable layer: an ONNX Conv (2-D), MatMul or Gemm node with a constant weight.

    The BFP block axis is the reduction axis of the op: input channels (within a group) for a
    conv, K for a matmul; a depthwise conv's activation blocks hold one value and each channel's
    weight window is one block (:mod:`bitq_tvm.kernels.contract`). ``weight_axis`` and
    ``act_axis`` index the tensors as Relax sees them:
    conv weights OIHW (axis 1), conv activations NCHW (axis 1, split into ``groups``), matmul
    weights [K, N] after the importer's transpose of Gemm's [N, K] (axis 0), activations (-1).
    """

    name: str
    onnx_op: str
    weight: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    groups: int = 1
    trans_b: bool = False
    # a conv's strides, pads (top, left, bottom, right; auto_pad resolved) and dilations
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @property
    def kind(self) -> str:
        return "conv2d" if self.onnx_op == "Conv" else "matmul"

    @property
    def reduction(self) -> int:
        """Length of the reduction (block) axis: in-group channels or K."""
        if self.kind == "conv2d":
            return self.weight_shape[1]
        return self.weight_shape[1] if self.trans_b else self.weight_shape[0]

    @property
    def is_depthwise(self) -> bool:
        return self.kind == "conv2d" and is_depthwise(self.weight_shape, self.groups)

    def is_window_blocked(self, block_size: int) -> bool:
        """Blocks along each output pixel's whole window at ``block_size`` (a stem:
        :func:`~bitq_tvm.kernels.contract.is_window_blocked`)."""
        return self.kind == "conv2d" and is_window_blocked(self.weight_shape, self.groups, block_size)

    @property
    def macs(self) -> int:
        if self.kind == "conv2d":
            o, i, kh, kw = self.weight_shape
            return int(np.prod(self.output_shape)) * i * kh * kw
        return int(np.prod(self.output_shape)) * self.reduction

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))

    def bitpacked_weight_bytes(self, fmt) -> int:
        """Bytes of the weight in BFP ``fmt`` (None: FP32), bit-packed: m bits per element plus E
        bits per block. The zero padding of ragged blocks is not stored (kernels re-create it), so
        a 3-channel conv is not charged for 32."""
        if fmt is None:
            return 4 * self.params
        if self.is_depthwise:  # one block per channel's window (kernels.contract.depthwise_weight_blocks)
            blocks = int(self.weight_shape[0])
        elif self.is_window_blocked(fmt.block_size):  # blocks along each output channel's window
            blocks = int(self.weight_shape[0]) * fmt.num_blocks(self.params // int(self.weight_shape[0]))
        else:
            blocks = self.params // self.reduction * fmt.num_blocks(self.reduction)
        return -(-(self.params * fmt.mantissa_bits + blocks * fmt.exponent_bits) // 8)


@dataclasses.dataclass(frozen=True)
class FP32Node:
    """A conv/matmul-like node that is not a BFP layer: it runs in FP32, for ``reason``."""

    name: str
    onnx_op: str
    reason: str


@dataclasses.dataclass
class OnnxModel:
    """A normalised ONNX model with pinned input shapes, its layer table and the FP32 leftovers."""

    path: str
    proto: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]
    layers: tuple[Layer, ...]
    fp32_nodes: tuple[FP32Node, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise BitqError(f"{self.path}: no layer named '{name}'")

    def weights(self) -> dict[str, np.ndarray]:
        """The layer weights (initializers), by initializer name."""
        return {t.name: numpy_helper.to_array(t) for t in self.proto.graph.initializer}

    def require_layers(self) -> None:
        """Raise BitqError if the model has no layer BFP can quantize (naming the skipped nodes and why)."""
        if self.layers:
            return
        skipped = [f"{n.onnx_op} '{n.name}' ({n.reason})" for n in self.fp32_nodes]
        why = f"; skipped: {', '.join(skipped[:4])}" if skipped else ""
        raise BitqError(f"{self.path}: no layer BFP can quantize{why}")


#: Most elements an input may have: int32 range, so that shapes, MAC counts (int64) and TVM's
#: index arithmetic cannot overflow (2**31 float32 values are already 8 GiB).
MAX_INPUT_ELEMENTS = 2**31 - 1


def input_dtypes(model: "OnnxModel") -> dict[str, np.dtype]:
    """Each model input's declared ONNX element type as a NumPy dtype (int64 for token ids, ...)."""
    declared = {i.name: i.type.tensor_type.elem_type for i in model.proto.graph.input}
    dtypes = {}
    for name in model.input_shapes:
        try:
            dtypes[name] = np.dtype(helper.tensor_dtype_to_np_dtype(declared[name]))
        except (KeyError, TypeError, ValueError):
            raise BitqError(f"{model.path}: input '{name}' has no NumPy element type "
                            f"(ONNX type {declared.get(name)})") from None
    return dtypes


def cast_input(name: str, x, dtype: np.dtype) -> np.ndarray:
    """``x`` as a contiguous ``dtype`` array; non-integer data for an integer/bool input is an error."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf" or (dtype.kind in "biu" and x.dtype.kind not in "biu"):
        raise BitqError(f"input '{name}' takes {dtype} values, got {x.dtype} data")
    return np.ascontiguousarray(x, dtype=dtype)


def parse_input_shapes(specs) -> dict[str, tuple[int, ...]]:
    """Parse ``name:1,3,224,224`` (or ``1,3,224,224`` for a single-input model) options.

    Raises
    ------
    BitqError
        Non-integer or non-positive dims, or more than :data:`MAX_INPUT_ELEMENTS` elements.
    """
    shapes = {}
    for spec in specs or ():
        name, _, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise BitqError(f"--input-shape '{spec}': expected NAME:D0,D1,... with integer dims") from None
        if not shape or any(d <= 0 for d in shape):
            raise BitqError(f"--input-shape '{spec}': dims must be positive integers")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise BitqError(f"--input-shape '{spec}': {math.prod(shape):,} elements; at most "
                            f"{MAX_INPUT_ELEMENTS:,} per input")
        shapes[name] = shape
    return shapes


def pin_batch(path, shapes: dict[str, tuple[int, ...]], batch: int | None) -> dict[str, tuple[int, ...]]:
    """``shapes`` (from :func:`parse_input_shapes`) plus ``batch`` on dim 0 of every input of the
    model file ``path`` whose dim 0 is symbolic (``--batch N``); ``batch`` None: ``shapes`` as is.

    Raises
    ------
    BitqError
        ``batch`` <= 0, an input whose static batch differs, a conflicting ``--input-shape``, or
        an input with dynamic dims besides the batch (and no default shape to fill them).
    """
    if batch is None:
        return shapes
    if batch <= 0:
        raise BitqError(f"--batch {batch}: must be > 0")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_onnx reports unreadable files with its own message
        return shapes
    shapes = dict(shapes)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if "" in shapes and len(inputs) == 1:
        shapes[inputs[0].name] = shapes.pop("")
    default = next((p.value for p in proto.metadata_props if p.key == DEFAULT_SHAPE_KEY), None)
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if not dims:
            continue
        static = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        if static[0] is not None:
            if static[0] != batch:
                raise BitqError(f"{path}: --batch {batch}: input '{inp.name}' has a static batch of {static[0]}")
            continue
        if inp.name in shapes:
            if shapes[inp.name][0] != batch:
                raise BitqError(f"--batch {batch} conflicts with --input-shape "
                                f"{inp.name}:{','.join(map(str, shapes[inp.name]))}")
            continue
        rest = static[1:]
        if None in rest and default is not None and len(inputs) == 1:
            rest = [int(d) for d in default.split(",")][1:]
        if None in rest:
            raise BitqError(f"{path}: input '{inp.name}' has dynamic dims besides the batch; pin them with "
                            f"--input-shape {inp.name}:{batch}," + ",".join(str(d or 1) for d in rest))
        shapes[inp.name] = (batch, *rest)
    return shapes


def load_onnx(path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> OnnxModel:
    """Load, check and normalise an ONNX model.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file.
    input_shapes : dict, optional
        Shapes for the graph inputs (key ``""`` means the only input); required for inputs with
        symbolic dimensions unless the model carries ``bitq.default_input_shape`` metadata.

    Returns
    -------
    OnnxModel
    """
    path = str(path)
    if not os.path.isfile(path):
        raise BitqError(f"{path}: no such file")
    try:
        proto = onnx.load(path)
    except Exception as err:  # protobuf raises its own DecodeError, others raise OSError
        raise BitqError(f"{path}: not a readable ONNX model ({type(err).__name__}: {_first_line(err)})") from None
    if not proto.graph.node:
        raise BitqError(f"{path}: not an ONNX model (the graph has no nodes)")
    return normalize(proto, path, input_shapes)


def normalize(proto: onnx.ModelProto, path: str, input_shapes=None) -> OnnxModel:
    """Normalise an in-memory ``ModelProto`` (see the module docstring); ``path`` names it in errors."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise BitqError(f"{path}: invalid ONNX model: {_first_line(err)}") from None
    _check_importable(proto, path)
    proto = _copy(proto)
    graph = proto.graph
    _initializers_to_constants(graph)
    shapes = _pin_input_shapes(proto, path, dict(input_shapes or {}))
    _fold_shape_subgraphs(graph)
    _fold_batchnorm(graph)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as err:  # noqa: BLE001 - onnx raises several unrelated types here
        raise BitqError(f"{path}: ONNX shape inference failed: {_first_line(err)}") from None
    layers, fp32_nodes = _find_layers(proto, path)
    layers = _layer_weights_to_initializers(proto.graph, layers)
    return OnnxModel(path=path, proto=proto, input_shapes=shapes, layers=tuple(layers), fp32_nodes=tuple(fp32_nodes))


def loss_view(model: OnnxModel) -> OnnxModel:
    """``model`` with the outputs the accuracy term compares: logits and heads, not their wrappers.

    The accuracy term compares outputs by relative MSE, each output (head) normalised on its own
    and the heads averaged (:func:`~bitq_tvm.evaluation.head_rel_mse`). Two wrappers defeat that:

    * A final Softmax over the last axis: probabilities saturate (a confident class sits near 1
      whatever its logit margin), so a loss measured on them neither adds over layers nor grows
      with the noise as the top-1 drop does. The output is read before it; top-1 is the same.
    * A final Concat along a non-batch axis (YOLOv8's ``[N, 4 + classes, anchors]``: box
      coordinates in pixels beside scores in 0..1): one relative MSE over the concatenation is
      the box pixels' alone, blind to noise on the scores. Each Concat input becomes an output.

    Outputs read by other nodes, or whose inner tensor has no inferred shape, stay as they are;
    a model with neither wrapper comes back unchanged (the same object).
    """
    graph = model.proto.graph
    shapes = {vi.name: vi for vi in (*graph.value_info, *graph.output)}
    producers = {o: node for node in graph.node for o in node.output}
    read = {name for node in graph.node for name in node.input}
    opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    outputs, dropped = {}, set()  # output name -> its ValueInfo; indices of the wrapper nodes
    node_index = {id(node): i for i, node in enumerate(graph.node)}
    for out in graph.output:
        producer = producers.get(out.name)
        rank = len(out.type.tensor_type.shape.dim)
        inner = []
        if producer is not None and out.name not in read and rank:
            axis = _attrs(producer).get("axis", -1 if opset >= 13 else 1)
            if producer.op_type == "Softmax" and axis % rank == rank - 1:
                inner = [producer.input[0]]
            elif producer.op_type == "Concat" and axis % rank != 0:
                inner = list(dict.fromkeys(producer.input))
        if inner and all(name in shapes and name in producers for name in inner):
            outputs.update((name, shapes[name]) for name in inner)
            dropped.add(node_index[id(producer)])
        else:
            outputs[out.name] = out
    if not dropped:
        return model
    proto = _copy(model.proto)
    kept = [node for i, node in enumerate(proto.graph.node) if i not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    del proto.graph.output[:]
    proto.graph.output.extend(outputs.values())  # extend copies: the original graph is untouched
    return dataclasses.replace(model, proto=proto)


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _copy(proto):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _graph_inputs(graph):
    init_names = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in init_names]


def _initializers_to_constants(graph):
    """Every initializer becomes a Constant node; layer weights go back to initializers later."""
    init_names = {t.name for t in graph.initializer}
    # Old exporters (IR < 4) also list initializers as graph inputs.
    keep_inputs = [i for i in graph.input if i.name not in init_names]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const:{t.name}") for t in graph.initializer]
    del graph.initializer[:]
    nodes = consts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _constant_values(graph) -> dict[str, np.ndarray]:
    values = {}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = _constant_node_value(node)
    return values


def _constant_node_value(node) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_int"):
        return np.array(helper.get_attribute_value(attr), dtype=np.float32 if attr.name == "value_float" else np.int64)
    if attr.name in ("value_floats", "value_ints"):
        return np.array(helper.get_attribute_value(attr), dtype=np.float32 if attr.name == "value_floats" else np.int64)
    raise BitqError(f"Constant node '{node.name or node.output[0]}': unsupported attribute '{attr.name}'")


def _pin_input_shapes(proto, path, requested):
    graph = proto.graph
    inputs = _graph_inputs(graph)
    default = next((p.value for p in proto.metadata_props if p.key == DEFAULT_SHAPE_KEY), None)
    if "" in requested:
        if len(inputs) != 1:
            raise BitqError(f"{path}: --input-shape without a name, but the model has inputs "
                            f"{[i.name for i in inputs]}; use NAME:D0,D1,...")
        requested[inputs[0].name] = requested.pop("")
    unknown = set(requested) - {i.name for i in inputs}
    if unknown:
        raise BitqError(f"{path}: --input-shape names unknown input(s) {sorted(unknown)}; "
                        f"the inputs are {[i.name for i in inputs]}")
    shapes = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        model_shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        if inp.name in requested:
            shape = requested[inp.name]
            if len(shape) != len(model_shape) or any(m is not None and m != s for m, s in zip(model_shape, shape)):
                raise BitqError(f"{path}: --input-shape {inp.name}:{','.join(map(str, shape))} does not fit "
                                f"the model's input shape {_show_shape(dims)}")
        elif None not in model_shape:
            shape = tuple(model_shape)
        elif default is not None and len(inputs) == 1:
            shape = tuple(int(d) for d in default.split(","))
        else:
            raise BitqError(f"{path}: input '{inp.name}' has dynamic shape {_show_shape(dims)} (rank {len(dims)}); "
                            f"pin it with --input-shape {inp.name}:{_shape_hint(dims)}")
        shapes[inp.name] = tuple(shape)
        for d, s in zip(dims, shape):
            d.Clear()
            d.dim_value = s
    # Value infos from the exporter may carry the old symbolic dims; shape inference redoes them.
    del graph.value_info[:]
    # Declared output dims are the exporter's guess: names, -1 (PaddlePaddle) or plain wrong (ONNX
    # Runtime merges them leniently); shape inference derives them from the pinned inputs instead.
    for out in graph.output:
        for d in out.type.tensor_type.shape.dim:
            d.Clear()
    return shapes


def _show_shape(dims) -> str:
    return "[" + ",".join(d.dim_param if d.HasField("dim_param") else
                          (str(d.dim_value) if d.dim_value > 0 else "?") for d in dims) + "]"


def _shape_hint(dims) -> str:
    """``D0,3,224,224``-style template: the static dims as they are, each dynamic one named."""
    hint = []
    for axis, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            hint.append(str(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param.isidentifier():
            hint.append(d.dim_param.upper())
        else:
            hint.append(f"D{axis}")
    return ",".join(hint)


def _fold_shape_subgraphs(graph):
    """Evaluate small constant subgraphs (Shape -> Gather -> Concat -> Reshape chains).

    With the input shapes pinned these are constants; the Relax importer wants them folded.
    """
    from onnx.reference import ReferenceEvaluator

    static_shapes = {}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                static_shapes[vi.name] = tuple(d.dim_value for d in dims)
            elif vi.type.tensor_type.HasField("shape") and not dims:
                static_shapes[vi.name] = ()
    except Exception:  # noqa: BLE001 - best effort: constant-only nodes still fold without shapes
        static_shapes = {}
    values = _constant_values(graph)
    new_nodes = []
    for node in graph.node:
        folded = None
        if node.op_type == "Shape" and node.input[0] in static_shapes:
            shape = np.array(static_shapes[node.input[0]], dtype=np.int64)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            folded = [shape[start:end]]
        elif (node.op_type not in ("Constant",) and not node.op_type.startswith("Random")
              and node.domain in ("", "ai.onnx") and node.input
              and all(i == "" or (i in values and values[i].size <= _FOLD_MAX_ELEMENTS) for i in node.input)
              and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            try:
                sub = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
                                        initializer=[numpy_helper.from_array(values[i], i) for i in node.input if i])
                folded = ReferenceEvaluator(helper.make_model(sub, opset_imports=[helper.make_opsetid("", 17)])).run(None, {})
            except Exception:  # noqa: BLE001 - leave the node to the importer
                folded = None
        if folded is None:
            new_nodes.append(node)
            continue
        for name, value in zip(node.output, folded):
            value = np.asarray(value)
            values[name] = value
            new_nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name),
                                              name=f"folded:{name}"))
    del graph.node[:]
    graph.node.extend(_drop_dead(new_nodes, graph))


def _drop_dead(nodes, graph):
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs read outer-scope names
                for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    for n in g.node:
                        live.update(n.input)
    return list(reversed(kept))


def _fold_batchnorm(graph):
    """Fold inference BatchNormalization into the Conv that feeds it (and only it)."""
    values = _constant_values(graph)
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    removed, replaced = set(), {}
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or len(consumers.get(conv.output[0], [])) != 1
                or conv.output[0] in graph_outputs or conv.input[1] not in values
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in values)
                or not all(i in values for i in bn.input[1:5])):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (values[i].astype(np.float64) for i in bn.input[1:5])
        w = values[conv.input[1]].astype(np.float64)
        b = values[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
        factor = gamma / np.sqrt(var + eps)
        w_name, b_name = conv.input[1] + ":bn", (conv.name or conv.output[0]) + ".bias:bn"
        replaced[w_name] = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        replaced[b_name] = ((b - mean) * factor + beta).astype(np.float32)
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
    if not removed:
        return
    new_nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k), name=f"const:{k}")
                 for k, v in replaced.items()]
    new_nodes += [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(_drop_dead(new_nodes, graph))


def _shape_of(vi_map, name):
    vi = vi_map.get(name)
    if vi is None:
        return None
    dims = vi.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _check_importable(proto, path) -> None:
    """Ops TVM's ONNX importer has no converter for, named by node before any long work."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    # By op type alone, as the importer dispatches (its map also holds com.microsoft contrib ops).
    for node in proto.graph.node:
        if node.op_type not in known:
            domain = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
            raise BitqError(f"{path}: node '{node.name or node.output[0]}' is an ONNX {node.op_type}{domain}, "
                            "which TVM's ONNX importer cannot convert")


def _not_a_layer(node, values) -> str | None:
    """Why a conv/matmul-like node is not a BFP layer, or None when it is one."""
    if node.op_type in UNSUPPORTED_LAYER_OPS:
        return f"no BFP lowering for {node.op_type}"
    if len(node.input) < 2 or node.input[1] not in values:
        if node.op_type == "MatMul":
            return "activation x activation MatMul (both operands computed at run time, e.g. attention)"
        return "weight computed at run time, not a constant"
    weight = values[node.input[1]]
    if node.op_type == "Conv" and weight.ndim != 4:
        return f"{weight.ndim - 2}-D convolution (only 2-D convs are BFP layers)"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return f"MatMul with a rank-{weight.ndim} weight (only 2-D weights are BFP layers)"
    if node.op_type == "Gemm" and (_attrs(node).get("transA", 0) or weight.ndim != 2):
        return "Gemm with transA=1" if _attrs(node).get("transA", 0) else f"Gemm with a rank-{weight.ndim} weight"
    if weight.size == 0:
        return "empty weight"
    return None


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _find_layers(proto, path) -> tuple[list[Layer], list[FP32Node]]:
    graph = proto.graph
    values = _constant_values(graph)
    vi_map = {vi.name: vi for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    producers = {o: n for n in graph.node for o in n.output}
    layers, fp32_nodes, seen = [], [], {}
    for index, node in enumerate(graph.node):
        if node.op_type not in LAYER_OPS + UNSUPPORTED_LAYER_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            name = f"{name}_{index}"
        seen[name] = True
        reason = _not_a_layer(node, values)
        if reason is not None:
            fp32_nodes.append(FP32Node(name, node.op_type, reason))
            continue
        weight = values[node.input[1]]
        attrs = _attrs(node)
        in_shape, out_shape = _shape_of(vi_map, node.input[0]), _shape_of(vi_map, node.output[0])
        if in_shape is None or out_shape is None:
            tensor = node.input[0] if in_shape is None else node.output[0]
            source = producers.get(tensor)
            origin = f", produced by {source.op_type} '{source.name or source.output[0]}'" if source else ""
            raise BitqError(f"{path}: node '{name}' ({node.op_type}): ONNX shape inference left the shape of "
                            f"'{tensor}' unknown{origin}, even with the inputs pinned to "
                            f"{_pinned(graph)}")
        window = _conv_window(name, attrs, weight.shape, in_shape, out_shape) if node.op_type == "Conv" else {}
        layers.append(Layer(name=name, onnx_op=node.op_type, weight=node.input[1],
                            weight_shape=tuple(weight.shape), input_shape=in_shape, output_shape=out_shape,
                            groups=int(attrs.get("group", 1)), trans_b=bool(attrs.get("transB", 0)), **window))
    return layers, fp32_nodes


def _conv_window(name: str, attrs: dict, weight_shape, in_shape, out_shape) -> dict:
    """strides, pads (top, left, bottom, right, ``auto_pad`` resolved) and dilations of a 2-D Conv."""
    if len(weight_shape) != 4:
        return {}
    strides = tuple(int(v) for v in attrs.get("strides", (1, 1)))
    dilations = tuple(int(v) for v in attrs.get("dilations", (1, 1)))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for axis in range(2):
            extent = dilations[axis] * (int(weight_shape[2 + axis]) - 1) + 1
            total = max(0, (int(out_shape[2 + axis]) - 1) * strides[axis] + extent - int(in_shape[2 + axis]))
            small, large = total // 2, total - total // 2
            pads[axis], pads[2 + axis] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad == "NOTSET":
        pads = [int(v) for v in attrs.get("pads", (0, 0, 0, 0))]
    else:
        raise BitqError(f"Conv node '{name}': auto_pad {auto_pad!r} is not an ONNX value")
    # ONNX orders pads (y_begin, x_begin, y_end, x_end): the same as (top, left, bottom, right)
    return {"strides": strides, "pads": tuple(pads), "dilations": dilations}


def _pinned(graph) -> str:
    return ", ".join(f"{i.name}:{','.join(str(d.dim_value) for d in i.type.tensor_type.shape.dim)}"
                     for i in _graph_inputs(graph))


def _relax_param_name(name: str, taken: set) -> str:
    """The name TVM's ONNX importer gives a kept parameter (it drops torch's ``onnx::`` prefix).

    Layer weights are renamed to it in the normal form, so that a layer's ``weight`` is both its
    initializer here and its Relax parameter after import; a name the prefix-less form would
    collide with gets a numbered suffix first.
    """
    base = name.removeprefix("onnx::")
    if base == name:
        return name
    candidate, n = base, 1
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    return candidate


def _layer_weights_to_initializers(graph, layers):
    weight_names = {layer.weight for layer in layers}
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    rename = {}
    for name in sorted(weight_names):
        new = _relax_param_name(name, taken)
        if new != name:
            rename[name] = new
            taken.add(new)
    nodes, inits = [], []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in weight_names:
            name = rename.get(node.output[0], node.output[0])
            inits.append(numpy_helper.from_array(_constant_node_value(node), name))
            continue
        for i, inp in enumerate(node.input):
            if inp in rename:
                node.input[i] = rename[inp]
        nodes.append(node)
    for vi in graph.value_info:
        if vi.name in rename:
            vi.name = rename[vi.name]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    return [dataclasses.replace(layer, weight=rename.get(layer.weight, layer.weight)) for layer in layers]
