"""Print bitq_tvm's package-level import graph and every cycle or backward import in it.

A *unit* is a top-level package or module of ``bitq_tvm`` (``targets``, ``plan``, ``api``...).
Every import counts, also the ones inside functions (a lazy import is still a dependency). The
layering (:data:`LAYERS`) is the data-flow order: a unit imports only units of earlier rows.

    python tools/import_graph.py          # graph + violations; exit status 1 if there are any
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "bitq_tvm"
# The data-flow order, earliest first; units of one row may import each other's (no cycle, though).
# runtime sits before api/deploy: CompiledModel and DeployedModel derive from its Runner base,
# and it needs nothing of the compiler but the names of the deployed model's functions.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "support"),
    ("formats",),
    ("targets",),
    ("kernels",),
    ("frontend",),
    ("plan",),
    ("tuning",),
    ("passes",),
    ("runtime",),
    ("pipeline",),
    ("api", "deploy"),
    ("evaluation",),
    ("solver",),
    ("models",),
    ("__init__",),  # the package root: the public facade (bitq_tvm.pipeline, BitqError)
    ("cli",),
)
# Units that may sit early in the flow but import only these (the model makers feed everything).
ONLY_IMPORTS = {"models": {"__init__", "errors", "support", "formats", "frontend"}}


def _unit(module: str) -> str:
    """``bitq_tvm.targets.rpc`` -> ``targets``; ``bitq_tvm`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _imports(path: Path, module: str, is_package: bool, modules) -> set[str]:
    """The bitq_tvm modules ``path`` imports (anywhere in the file) among ``modules``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from . import errors`` depends on the submodule, ``from .plan import Plan`` on plan
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    return {name for name in found if name in modules and name != module}


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the bitq_tvm modules it imports, for every ``.py`` file under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = _module_name(path, root.parent)
        modules[name] = (path, is_package)
    return {name: _imports(path, name, is_package, modules) for name, (path, is_package) in modules.items()}


def unit_graph(modules: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """Unit -> imported unit -> the importing modules (edges inside one unit left out)."""
    units: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, imported in modules.items():
        source = _unit(module)
        units[source]  # a unit that imports nothing is still a node
        for target in imported:
            if _unit(target) != source:
                units[source][_unit(target)].append(module)
    return {u: {t: sorted(set(ms)) for t, ms in sorted(edges.items())} for u, edges in sorted(units.items())}


def cycles(units: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected groups of more than one unit (each holds at least one cycle)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in units.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(units):
        if node not in index:
            visit(node)
    return groups


def violations(units: dict[str, dict[str, list[str]]], layers=LAYERS, only_imports=ONLY_IMPORTS) -> list[str]:
    """One line per cycle, backward import (a unit importing a later row's) or unknown unit."""
    row = {unit: number for number, names in enumerate(layers) for unit in names}
    found = [f"cycle: {' <-> '.join(group)}" for group in cycles(units)]
    for source, edges in units.items():
        if source not in row:
            found.append(f"unit '{source}' is in no layer of the order")
            continue
        for target, modules in edges.items():
            allowed = only_imports.get(source)
            if allowed is not None and target not in allowed:
                found.append(f"'{source}' may import only {sorted(allowed)}, imports '{target}' ({', '.join(modules)})")
            elif target in row and row[target] > row[source]:
                found.append(f"backward import: '{source}' (row {row[source] + 1}) imports '{target}' "
                             f"(row {row[target] + 1}) in {', '.join(modules)}")
    return found


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / PACKAGE
    units = unit_graph(module_graph(root))
    print("import graph (unit -> units it imports):")
    for unit, edges in units.items():
        print(f"  {unit:<11} -> {', '.join(edges) or '-'}")
    found = violations(units)
    print(f"\n{len(found)} violation(s)" + (":" if found else ""))
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
