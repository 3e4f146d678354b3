"""``bitq-tvm zoo``: write a model of the built-in zoo as ONNX (random weights), with synthetic data."""

from __future__ import annotations

from ..support.atomic import atomic_path
from ..support.npz import write_npz
from ..support.paths import check_output_path

#: The zoo models the command offers (functions of :mod:`bitq_tvm.models.zoo`).
ZOO_MODELS = ("resnet18", "mobilenet_v2", "transformer_encoder")


def add_command(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="write a model of the built-in zoo as ONNX (random weights), with synthetic data")
    p.add_argument("name", choices=ZOO_MODELS)
    p.add_argument("-o", "--output", help="output .onnx (default: NAME.onnx)")
    p.add_argument("--image-size", type=int, default=224, help="CNN input resolution (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    p.add_argument("--data", metavar="DATA.npz", help="also write synthetic inputs for eval/calibration")
    p.add_argument("--samples", type=int, default=8, help="samples in --data (default 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    import onnx

    from ..models import zoo

    kwargs = {"seed": args.seed}
    if args.name != "transformer_encoder":
        kwargs["image_size"] = args.image_size
    proto = getattr(zoo, args.name)(**kwargs)
    if args.dynamic_batch:
        proto = zoo.with_dynamic_batch(proto)
    out = args.output or f"{args.name}.onnx"
    check_output_path(out, "-o")
    if args.data:
        check_output_path(args.data, "--data")
    with atomic_path(out) as tmp:
        onnx.save(proto, tmp)
    print(f"wrote {out} ({args.name}, random He-initialised weights, seed {args.seed})")
    if args.data:
        feeds = zoo.synthetic_inputs(proto, args.samples, seed=args.seed + 1)
        write_npz(args.data, feeds)
        print(f"wrote {args.data} ({args.samples} synthetic samples of {', '.join(feeds)})")
    return 0
