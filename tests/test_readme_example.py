"""The README's Python example runs as written on the bundled model, and computes what the API computes."""

import re
from pathlib import Path

import numpy as np

from bitq_tvm.api import compile_model
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import bundled_model_path
from bitq_tvm.plan import Plan

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text().split("### From Python, inside `tvm.compile`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_on_the_bundled_model():
    code = _example()
    assert "relax_pipeline=bitq_tvm.pipeline(" in code
    # the bundled digits CNN takes input [batch, 1, 8, 8]: the same lines with its file and shape
    code = code.replace('"model.onnx"', repr(str(bundled_model_path()))).replace("(1, 3, 224, 224)", "(1, 1, 8, 8)")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the documented example itself
    y = scope["y"].numpy()
    model = load_onnx(bundled_model_path(), {"input": (1, 1, 8, 8)})
    want = compile_model(model, Plan.uniform("bfp8_b32"), progress=None).run({"input": scope["x"]})[0]
    assert y.shape == want.shape == (1, 10)
    # same passes, same plan; the targets differ only in the CPU name: float32 sums may reorder
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()


def test_readme_example_deploys_for_a_plain_target():
    """``deploy=True`` needs only a ``tvm.target.Target``: the kernel variant follows its features."""
    import tvm
    from tvm import relax

    import bitq_tvm
    from bitq_tvm.deploy import DeploymentReport, compile_deployed
    from bitq_tvm.frontend.relax_import import import_relax
    from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant

    model = load_onnx(bundled_model_path(), {"input": (1, 1, 8, 8)})
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8), dtype=np.float32)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "native"})
    mod, params = import_relax(model)
    plan = Plan.uniform("bfp8_b32")
    ex = tvm.compile(mod, target, relax_pipeline=bitq_tvm.pipeline(plan, target, deploy=True, params=params))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    report = DeploymentReport.from_module(vm, "native", [layer.name for layer in model.layers])
    assert report.variant == kernel_variant(target)
    assert report.integer_layers  # the digits CNN's 3x3 and dense layers are integer kernels
    y = vm["main"](tvm.runtime.tensor(x)).numpy()  # a deployed main takes only the model's inputs
    want = compile_deployed(model, plan, "host", progress=None).run({"input": x})[0]
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()
