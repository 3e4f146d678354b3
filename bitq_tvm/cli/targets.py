"""``bitq-tvm targets``: the target presets."""

from __future__ import annotations

from ..support.tables import print_table


def add_command(subparsers) -> None:
    p = subparsers.add_parser("targets", help="list the target presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..targets.presets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        caches = ", ".join(f"{c.name} {c.size_bytes // 1024} KiB" for c in t.caches)
        rows.append((name, t.intrinsic_family, t.vector_bits, t.cross_compiler or "-", t.emulator or "native", caches))
    print_table(["target", "int8 intrinsics", "vector bits", "cross compiler", "runs with", "caches"], rows)
    return 0
