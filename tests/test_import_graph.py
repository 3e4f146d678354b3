"""The package's import graph: no cycle, no import of a unit later in the data flow (tools/import_graph.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _graph(checker, root):
    return checker.unit_graph(checker.module_graph(root))


def test_package_has_no_cycle_and_no_backward_import(checker):
    units = _graph(checker, ROOT / "bitq_tvm")
    assert {"errors", "support", "targets", "plan", "tuning", "runtime", "solver"} <= set(units)
    assert checker.violations(units) == []


def test_checker_reports_cycles_backward_and_lazy_imports(checker, tmp_path):
    package = tmp_path / "bitq_tvm"
    (package / "targets").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    # a lazy (function-level) import is a dependency too
    (package / "targets" / "__init__.py").write_text("def f():\n    from ..api import compile_model\n")
    (package / "api.py").write_text("from .targets import f\nfrom . import errors\n")
    (package / "models").mkdir()
    (package / "models" / "zoo.py").write_text("import bitq_tvm.targets\n")
    units = _graph(checker, package)
    assert units["api"] == {"errors": ["bitq_tvm.api"], "targets": ["bitq_tvm.api"]}
    found = checker.violations(units)
    assert "cycle: api <-> targets" in found
    assert any(line.startswith("backward import: 'targets' (row 3) imports 'api'") for line in found)
    assert any(line.startswith("'models' may import only") and "'targets'" in line for line in found)
    assert len(found) == 3
