"""The planner prices candidates as `compile --deploy` runs them (issue 14, item 1)."""

import pytest

from bitq_tvm.formats import BFPFormat
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data
from bitq_tvm.kernels.contract import gemm_geometry, integer_weight_bytes, packed_nbytes
from bitq_tvm.kernels.packing import pack_quantized
from bitq_tvm.formats import quantize_np
from bitq_tvm.solver.accuracy import Calibration
from bitq_tvm.plan import LayerFormats
from bitq_tvm.solver.candidates import CandidateSet, LayerCandidates
from bitq_tvm.solver.deployment import deployable_candidates, deployed_cost
from bitq_tvm.solver.planner import Objective, plan_model

GRID = LayerCandidates(CandidateSet((4, 6, 8), (6, 8), (16, 64)))


@pytest.fixture(scope="module")
def digits():
    data = bundled_test_data()
    return load_onnx(bundled_model_path()), Calibration({"input": data["x"][:128]}, data["y"][:128])


@pytest.mark.parametrize("m, block, n, k", [(4, 16, 10, 70), (6, 32, 33, 64), (8, 64, 16, 200)])
def test_packed_nbytes_is_what_pack_quantized_stores(m, block, n, k):
    import numpy as np

    fmt = BFPFormat(m, block)
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    t = quantize_np(w, fmt, axis=1)
    packed = pack_quantized(t.mantissas.reshape(n, -1), t.exponents.reshape(n, -1), fmt, "w")
    assert packed.nbytes == packed_nbytes(n, packed.k_padded, fmt)
    geometry = gemm_geometry("matmul", (3, k), (k, n), (3, n), block)
    assert integer_weight_bytes(geometry, fmt) == packed.nbytes


def test_candidates_follow_the_deployment_rule(digits):
    model, _ = digits
    table = GRID.resolve([l.name for l in model.layers])
    restricted, notes = deployable_candidates(model, table)
    # conv1 has one input channel: it blocks along its 3x3 windows, 9 values padded to 16 (not to
    # 64: 7.1x the work), so it deploys at block 16 only, and the dropped candidates say why
    assert {c.block_size for c in restricted["conv1"]} == {16} and "9 values per window" in notes["conv1"]
    # conv2 (16 input channels, 3x3) deploys at block 16 along channels and at block 64 along its
    # 144-value windows (192 padded, not 9 x 64 = 576 along channels)
    assert {c.block_size for c in restricted["conv2"]} == {16, 64}
    conv2 = model.layers[1]
    assert conv2.is_window_blocked(64) and not conv2.is_window_blocked(16)
    assert deployed_cost(conv2, LayerFormats.bfp(8, 8, 64)).weight_bytes == 32 * 192 + 32 * 3
    conv1 = model.layers[0]
    fallback = deployed_cost(conv1, LayerFormats.bfp(8, 8, 64))
    assert fallback.mode == "simulation" and fallback.weight_bytes == 4 * conv1.params
    integer = deployed_cost(conv1, LayerFormats.bfp(8, 8, 16))  # 16 lanes x 16 K values + 16 exponents
    assert integer.mode == "integer" and integer.weight_bytes == 16 * 16 + 16
    # pinned layers keep their pin, priced at their fallback cost
    kept, _ = deployable_candidates(model, table, pinned={"conv1"})
    assert kept["conv1"] == table["conv1"]


def test_planned_bytes_equal_deployed_artifact_bytes(digits):
    from bitq_tvm.deploy import compile_deployed

    model, calib = digits
    result = plan_model(model, calib, Objective("budget", 0.01), candidates=GRID, progress=None)
    deployed = compile_deployed(model, result.plan, progress=None)
    report = deployed.report
    stored = sum(d.stored_bytes if d.mode == "integer" else d.fp32_bytes for d in report.layers)
    planned = result.plan.meta["planner"]["weight_bytes"]
    assert abs(planned - stored) <= 0.02 * stored, (planned, stored, report.table())
    assert not report.fallbacks, report.fallbacks  # every planned BFP layer became an integer kernel
    for d in report.layers:
        assert result.plan.layers[d.layer].info["weight_bytes"] == (
            d.stored_bytes if d.mode == "integer" else d.fp32_bytes), d


def test_measured_latencies_of_dropped_candidates_are_ignored(digits):
    # a tuning database measures what the user's grid asked for; conv1's block-64 kernels never deploy
    model, calib = digits
    label = GRID.default.candidates[0].label
    dropped = next(c.label for c in GRID.default.candidates if c.block_size == 64)
    measured = {("conv1", dropped): 1e-4, ("fc1", label): 1e-3}
    result = plan_model(model, calib, Objective("lambda", 1.0), candidates=GRID, measured=measured, progress=None)
    assert result.performance.measured == {("fc1", label): 1e-3}
