"""Whole models deployed as integer BFP kernels equal their BFP simulation (api.compile_model).

Per layer the two differ only in float32 summation order (bound stated and checked per layer in
tests/passes/test_lower_bfp_integer.py). Through a network such a difference can move a value
across a rounding boundary of the next layer's quantizer, one mantissa step, which the following
layers carry on; tolerance: |deployed - simulated| <= 1e-4 * max|simulated| (as between the
simulation and its NumPy reference in tests/test_end_to_end.py).
"""

import numpy as np
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.frontend.relax_import import import_relax
from bitq_tvm.deploy import DeploymentReport, compile_deployed
from bitq_tvm.passes import module_report
from bitq_tvm.passes.lower_bfp_integer import deployment_layers
from bitq_tvm.pipeline import bfp_passes
from bitq_tvm.frontend.onnx_model import load_onnx, normalize
from bitq_tvm.models import zoo
from bitq_tvm.plan import Plan
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.targets.presets import get_target

REL_TOL = 1e-4


def _assert_deployed_matches_simulation(model, plan, feeds):
    deployed = compile_deployed(model, plan, progress=None)
    got = deployed.run(feeds)[0]
    want = compile_model(model, plan, progress=None).run(feeds)[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= REL_TOL * np.abs(want).max()
    return deployed


@pytest.fixture(scope="module")
def digits():
    return load_onnx(zoo.bundled_model_path(), {"input": (50, 1, 8, 8)}), zoo.bundled_test_data()


@pytest.mark.parametrize("spec", ["bfp8_b32", "bfp4_b16", "bfp6_b16"])
def test_digits_deployed_matches_simulation(digits, spec):
    model, data = digits
    deployed = _assert_deployed_matches_simulation(model, Plan.uniform(spec), {"input": data["x"][:50]})
    # conv1 (one input channel, 3x3) blocks along its 9-value windows: padded to B = 16 it runs
    # integer; padded to B = 32 it would be 3.6x the work, so it is simulated, and says so
    if spec.endswith("_b16"):
        assert set(deployed.report.integer_layers) == {"conv1", "conv2", "fc1", "fc2"}
    else:
        assert set(deployed.report.integer_layers) == {"conv2", "fc1", "fc2"}
        assert "9 values per window" in deployed.report.fallbacks["conv1"]


def test_digits_mixed_plan_and_accuracy(digits):
    model, data = digits
    plan = Plan.from_json({"bitq_plan_version": 1, "default": "bfp6_b16", "layers": {
        "conv1": "fp32", "conv2": {"weight": "bfp4_b32", "activation": "bfp8_b32"},
        "fc2": {"weight": "bfp5_b8", "activation": "fp32"}}})
    deployed = _assert_deployed_matches_simulation(model, plan, {"input": data["x"][:50]})
    modes = {d.layer: d.mode for d in deployed.report.layers}
    assert modes == {"conv1": "fp32", "conv2": "integer", "fc1": "integer", "fc2": "simulation"}
    bfp8 = compile_deployed(model, Plan.uniform("bfp8_b32"), progress=None)
    accuracy = (bfp8.run_batched("input", data["x"]).argmax(1) == data["y"]).mean()
    assert accuracy >= 0.94


@pytest.mark.slow
def test_resnet18_bfp8_deployed_and_weight_bytes():
    model = normalize(zoo.resnet18(image_size=64, num_classes=100), "resnet18")
    feeds = zoo.synthetic_inputs(model.proto, 1, seed=0)
    deployed = _assert_deployed_matches_simulation(model, Plan.uniform("bfp8_b32"), feeds)
    report = deployed.report
    # every layer, the 3-channel 7x7 stem too (blocks along its 147-value windows, padded to 160)
    assert len(report.integer_layers) == len(model.layers) and not report.fallbacks
    # every constant of the artifact (packed weights, biases) vs FP32 weights
    assert report.artifact_constant_bytes <= 0.27 * report.fp32_weight_bytes


def test_resnet18_bfp4_weight_bytes():
    model = normalize(zoo.resnet18(image_size=32, num_classes=100), "resnet18")
    mod, params = import_relax(model)
    passes = bfp_passes(Plan.uniform("bfp4_b32"), "avx512-vnni", deploy=True, params=params)
    report = module_report(__import__("tvm").transform.Sequential(passes)(mod))
    fp32 = sum(4 * layer.params for layer in model.layers)
    assert report["artifact_constant_bytes"] <= 0.15 * fp32
    assert sum(d.stored_bytes for d in deployment_layers(report)) <= 0.14 * fp32


@pytest.mark.slow
def test_transformer_encoder_deployed():
    proto = zoo.transformer_encoder(seq_len=16, hidden=64, layers=2, heads=2, ffn=128)
    model = normalize(zoo.with_weights_in_constant_nodes(proto), "encoder")
    feeds = zoo.synthetic_inputs(model.proto, 1, seed=0)
    for spec in ("bfp8_b32", "bfp4_b16"):
        deployed = _assert_deployed_matches_simulation(model, Plan.uniform(spec), feeds)
        assert len(deployed.report.integer_layers) == len(model.layers)


def test_cli_compile_deploy_writes_a_library_that_runs(tmp_path, capsys):
    import tvm
    from tvm import relax

    from bitq_tvm.cli import main

    out = tmp_path / "digits.so"
    assert main(["compile", str(zoo.bundled_model_path()), "--input-shape", "input:1,1,8,8", "--format", "bfp8_b32",
                 "--deploy", "--report", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                             for line in printed.splitlines() if line.startswith("| "))}
    assert rows["fc1"][:2] == ["matmul", f"integer BFP ({kernel_variant(get_target('host').tvm_target())})"]
    assert "fallback: layer 'conv1' runs as float BFP simulation" in printed
    # the exported library runs like any Relax VM module: main(inputs), weights inside, as stored
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    x = zoo.bundled_test_data()["x"][:1]
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    model = load_onnx(zoo.bundled_model_path(), {"input": (1, 1, 8, 8)})
    deployed = compile_deployed(model, Plan.uniform("bfp8_b32"), progress=None)
    np.testing.assert_array_equal(got, deployed.run({"input": x})[0])
    # the report survives export: the library's bitq_report() gives the one compile printed
    layer_order = [layer.name for layer in model.layers]
    assert DeploymentReport.from_module(vm, "host", layer_order) == deployed.report


def test_report_of_a_cross_compiled_deployment(digits):
    """A library for another ISA cannot be loaded here: its report is read where the pipeline embeds it."""
    model, _ = digits
    arm = compile_deployed(model, Plan.uniform("bfp8_b32"), "cortex-a76", progress=None)
    host = compile_deployed(model, Plan.uniform("bfp8_b32"), progress=None)
    assert arm.report.variant == "sdot" and arm.report.target == "cortex-a76"
    assert [(d.layer, d.mode, d.stored_bytes) for d in arm.report.layers] == \
        [(d.layer, d.mode, d.stored_bytes) for d in host.report.layers]
    assert arm.report.integer_layers == ["conv2", "fc1", "fc2"]
