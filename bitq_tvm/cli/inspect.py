"""``bitq-tvm inspect``: a model's layers, shapes, MACs and parameters, and the nodes that stay FP32."""

from __future__ import annotations

from ..support.tables import print_table
from .args import add_model_args, load_model


def add_command(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="list a model's layers, shapes, MACs and parameters")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_model(args)
    print(f"{model.path}: inputs {', '.join(f'{k} {list(v)}' for k, v in model.input_shapes.items())}")
    rows = [(layer.name, layer.onnx_op + (f" g={layer.groups}" if layer.groups > 1 else ""), list(layer.weight_shape),
             list(layer.input_shape), list(layer.output_shape), layer.reduction, f"{layer.macs:,}", f"{layer.params:,}")
            for layer in model.layers]
    print_table(["layer", "op", "weight", "input", "output", "K", "MACs", "params"], rows)
    print(f"{len(model.layers)} layers, {sum(l.macs for l in model.layers):,} MACs, "
          f"{sum(l.params for l in model.layers):,} weight parameters")
    if model.fp32_nodes:
        print(f"{len(model.fp32_nodes)} conv/matmul node(s) are not BFP layers and stay FP32:")
        print_table(["node", "op", "why"], [(n.name, n.onnx_op, n.reason) for n in model.fp32_nodes])
    return 0
