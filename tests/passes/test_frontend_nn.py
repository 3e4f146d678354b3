"""bitq_tvm.pipeline on Relax modules of ``tvm.relax.frontend.nn`` (the MLC-LLM way), not ONNX.

A small CNN (Conv2D, ReLU, Linear) and a transformer block (q/k/v Linear, attention matmuls,
softmax, LayerNorm, MLP) are exported with ``export_tvm``, compiled with ``tvm.compile(...,
relax_pipeline=bitq_tvm.pipeline(Plan.uniform("bfp8_b32"), "host", params=...))`` and checked
against a NumPy reference built from ``fake_quantize_np``: the simulation within a float32 bound,
the integer deployment (the host's kernel variant) within the bound of
tests/test_deploy_end_to_end.py of the simulation.
"""

import json

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import spec

import bitq_tvm
from bitq_tvm.formats import fake_quantize_np, get_format
from bitq_tvm.passes import annotated_layers
from bitq_tvm.pipeline import bfp_passes
from bitq_tvm.plan import Plan
from bitq_tvm.targets.presets import get_target

FMT = get_format("bfp8_b32")
PLAN = Plan.uniform("bfp8_b32")
HOST = get_target("host").tvm_target()
DEPLOY_REL_TOL = 1e-4  # tests/test_deploy_end_to_end.py: deployed vs simulated, through a network
SIM_REL_TOL = 1e-5     # simulation vs its NumPy reference: float32 summation order only


class CNN(nn.Module):
    def __init__(self):
        self.conv1 = nn.Conv2D(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2D(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = nn.relu(self.conv1(x))
        x = nn.relu(self.conv2(x))
        return self.fc(x.reshape(1, 32 * 4 * 4))


class Block(nn.Module):
    def __init__(self, hidden=64, ffn=128):
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.scale = 1.0 / float(np.sqrt(hidden))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        scores = nn.op.matmul(q, nn.op.permute_dims(k, [0, 2, 1])) * self.scale
        attn = nn.op.matmul(nn.op.softmax(scores, axis=-1), v)
        h = self.norm1(x + self.o_proj(attn))
        return self.norm2(h + self.fc2(nn.relu(self.fc1(h))))


def _export(module, shape):
    mod, _ = module.export_tvm(spec={"forward": {"x": spec.Tensor(shape, "float32")}})
    rng = np.random.default_rng(0)
    params = {}
    for p in mod["forward"].params[1:]:
        shape_p = [int(d) for d in p.ty.shape]
        if p.name.startswith("norm"):  # LayerNorm gamma around 1, beta around 0
            base = 1.0 if p.name.endswith("weight") else 0.0
            params[p.name] = (base + 0.1 * rng.standard_normal(shape_p)).astype("float32")
        else:
            params[p.name] = (rng.standard_normal(shape_p) / np.sqrt(np.prod(shape_p[1:]) or 1)).astype("float32")
    return mod, params


def _run(mod, params, x, deploy):
    ex = tvm.compile(mod, HOST, relax_pipeline=bitq_tvm.pipeline(PLAN, "host", deploy=deploy, params=params))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["forward"](tvm.runtime.tensor(x)).numpy(), vm


def _fq_act(x, axis):
    return fake_quantize_np(x, FMT, axis=axis).astype(np.float64)


def _linear(p, name, x):
    """nn.Linear as simulated: activation blocks along K, weight [N, K] blocks along K."""
    w = fake_quantize_np(p[f"{name}.weight"], FMT, axis=1).astype(np.float64)
    return _fq_act(x, -1) @ w.T + p[f"{name}.bias"]


def _conv(p, name, x, stride):
    w = fake_quantize_np(p[f"{name}.weight"], FMT, axis=1).astype(np.float64)
    xq = np.pad(_fq_act(x, 1), ((0, 0), (0, 0), (1, 1), (1, 1)))
    o, c, kh, kw = w.shape
    oh = (x.shape[2] + 2 - kh) // stride + 1
    out = np.zeros((x.shape[0], o, oh, oh))
    for i in range(kh):
        for j in range(kw):
            patch = xq[:, :, i:i + stride * oh:stride, j:j + stride * oh:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + p[f"{name}.bias"][None, :, None, None]


def _window_conv(p, name, x):
    """A 3-channel conv as simulated (the contract's window blocks): each output pixel's 3x3x3
    window, in (kh, kw, c) order, is one row quantized along its 27 values (one 32-block), and so
    is each output channel's weight window; stride 1, padding 1."""
    w = p[f"{name}.weight"]
    o, c, kh, kw = w.shape
    w_rows = fake_quantize_np(w.transpose(0, 2, 3, 1).reshape(o, -1), FMT, axis=1).astype(np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, _, h, wd = x.shape
    rows = np.array([[xp[b, :, y:y + kh, z:z + kw].transpose(1, 2, 0).reshape(-1)
                      for y in range(h) for z in range(wd)] for b in range(n)]).reshape(n * h * wd, -1)
    out = _fq_act(rows, 1) @ w_rows.T
    return out.reshape(n, h, wd, o).transpose(0, 3, 1, 2) + p[f"{name}.bias"][None, :, None, None]


def _cnn_reference(p, x):
    h = np.maximum(_window_conv(p, "conv1", x), 0)
    h = np.maximum(_conv(p, "conv2", h, 2), 0)
    return _linear(p, "fc", h.reshape(1, -1))


def _layer_norm(p, name, x):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _block_reference(p, x):
    q, k, v = (_linear(p, n, x) for n in ("q_proj", "k_proj", "v_proj"))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(x.shape[-1])
    e = np.exp(scores - scores.max(-1, keepdims=True))
    attn = (e / e.sum(-1, keepdims=True)) @ v
    h = _layer_norm(p, "norm1", x + _linear(p, "o_proj", attn))
    return _layer_norm(p, "norm2", h + _linear(p, "fc2", np.maximum(_linear(p, "fc1", h), 0)))


MODELS = {
    "cnn": (CNN, (1, 3, 8, 8), _cnn_reference, {"conv1", "conv2", "fc"}),
    "block": (Block, (1, 16, 64), _block_reference, {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_found_and_named_from_parameters(name):
    make, shape, _, layers = MODELS[name]
    mod, params = _export(make(), shape)
    # the bitq part of the pipeline: layers named after their weights; attention matmuls are not layers
    after = tvm.transform.Sequential(bfp_passes(PLAN, "host", params=params))(mod)
    assert set(annotated_layers(after["forward"])) == layers
    assert not any(p.name.endswith("weight") and not p.name.startswith("norm") for p in after["forward"].params)


@pytest.mark.parametrize("name", list(MODELS))
def test_simulation_and_deployment_match_numpy_reference(name):
    make, shape, reference, layers = MODELS[name]
    mod, params = _export(make(), shape)
    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
    want = reference(params, x.astype(np.float64))

    simulated, _ = _run(mod, params, x, deploy=False)
    assert simulated.shape == want.shape
    assert np.abs(simulated - want).max() <= SIM_REL_TOL * np.abs(want).max()

    deployed, vm = _run(mod, params, x, deploy=True)
    assert np.abs(deployed - simulated).max() <= DEPLOY_REL_TOL * np.abs(simulated).max()
    report = json.loads(str(vm["bitq_report"]()))
    modes = {d["layer"]: d["mode"] for d in report["layers"]}
    # conv1 has 3 input channels: it blocks along its 27-value windows and runs integer too
    assert modes == {layer: "integer" for layer in layers}
