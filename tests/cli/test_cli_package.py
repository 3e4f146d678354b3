"""The CLI package sits at the end of the import graph: the library never imports it."""

import ast
from pathlib import Path

import bitq_tvm

PACKAGE = Path(bitq_tvm.__file__).parent


def _imported_modules(path: Path, package: str):
    """Absolute names of the modules ``path`` (a module of ``package``) imports."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def test_no_library_module_imports_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        if parts[:2] == ("bitq_tvm", "cli"):
            continue
        package = ".".join(relative.parts[:-1])
        for module in _imported_modules(path, package):
            if module == "bitq_tvm.cli" or module.startswith("bitq_tvm.cli."):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders
