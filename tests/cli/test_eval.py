"""``bitq-tvm eval`` on a two-input token model: int64 ids, [N, T, C] outputs, ORT reference, --batch, --save-outputs."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bitq_tvm.api
from bitq_tvm.api import compile_model
from bitq_tvm.cli import main
from bitq_tvm.evaluation import compare, top_k
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.plan import Plan

T, VOCAB, D, C = 6, 11, 32, 7


def token_model(batch="batch", pooled=False) -> onnx.ModelProto:
    """logits[N, T, C] = (embedding[tokens] + features) @ W: an int64 and a float input.

    ``pooled`` adds a second output, the mean over T: pooled[N, C].
    """
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((VOCAB, D)).astype(np.float32)
    w = (rng.standard_normal((D, C)) / np.sqrt(D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], axis=0, name="embed"),
             helper.make_node("Add", ["embedded", "features"], ["summed"], name="add"),
             helper.make_node("MatMul", ["summed", "head.weight"], ["logits"], name="head")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, T, C])]
    if pooled:
        nodes.append(helper.make_node("ReduceMean", ["logits"], ["pooled"], axes=[1], keepdims=0, name="pool"))
        outputs.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [batch, C]))
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [batch, T]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, T, D])],
        outputs,
        initializer=[numpy_helper.from_array(emb, "embedding"), numpy_helper.from_array(w, "head.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


N = 5  # not a multiple of --batch 2: the last chunk is padded


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(1)
    arrays = {"tokens": rng.integers(0, VOCAB, (N, T)), "features": rng.standard_normal((N, T, D)).astype(np.float32),
              "y": rng.integers(0, C, (N, T))}
    paths = {"dynamic": folder / "tokens.onnx", "static": folder / "tokens_b2.onnx", "data": folder / "data.npz",
             "pooled": folder / "pooled.onnx", "folder": folder}
    onnx.save(token_model(batch=2, pooled=True), paths["pooled"])
    onnx.save(token_model(), paths["dynamic"])
    onnx.save(token_model(batch=2), paths["static"])
    np.savez(paths["data"], **arrays)
    return paths, arrays


def _table(out):
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    return {row[0]: row[1] for row in cells[2:]}


def _ort(path, arrays):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"tokens": arrays["tokens"], "features": arrays["features"]})[0]


def test_per_position_agreement_and_top_k_by_hand():
    classes_ref = np.array([[0, 1, 2], [3, 0, 1]])
    classes_out = np.array([[0, 1, 3], [3, 2, 1]])  # 4 of 6 positions agree; sample 0 and 1 each have a miss
    ref, out = np.eye(4)[classes_ref], np.eye(4)[classes_out] * 2.0
    stats = compare(ref, out)
    assert stats["argmax"] == "per position" and stats["argmax_agreement"] == pytest.approx(4 / 6)
    assert stats["cosine"] == pytest.approx(4 / 6)  # <ref, out> = 2*4, |ref| = sqrt 6, |out| = 2 sqrt 6
    assert stats["max_abs_diff"] == 2.0
    assert compare(ref[:, 0], out[:, 0])["argmax"] == "per sample"
    assert top_k(out, classes_ref) == {"top1": pytest.approx(4 / 6)}  # 4 classes: no top-5


def test_eval_two_inputs_int64_tokens_batch_and_saved_outputs(files, capsys):
    paths, arrays = files
    saved = paths["folder"] / "outputs.npz"
    assert main(["eval", str(paths["dynamic"]), "--data", str(paths["data"]), "--format", "bfp4_b16",
                 "--batch", "2", "--save-outputs", str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"reference: ONNX Runtime {ort.__version__} FP32 of tokens.onnx" in out
    assert f"{N} samples in batches of 2" in out
    rows = _table(out)
    with np.load(saved) as npz:
        got = {key: npz[key] for key in npz.files}
    assert sorted(got) == ["bfp/logits", "fp32/logits", "reference/logits"]
    assert all(a.shape == (N, T, C) for a in got.values())
    # The reference is ONNX Runtime on the original file; TVM FP32 matches it, BFP4 visibly does not.
    np.testing.assert_allclose(got["reference/logits"], _ort(paths["dynamic"], arrays), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["fp32/logits"], got["reference/logits"], rtol=1e-4, atol=1e-4)
    assert float(rows["TVM FP32 vs ORT: rel-L2"]) < 1e-5
    assert float(rows["BFP vs ORT: rel-L2"]) > 1e-3
    # Per-position agreement: argmax along C, averaged over N and T (not one argmax per flattened sample).
    by_hand = (got["reference/logits"].argmax(-1) == got["bfp/logits"].argmax(-1)).mean()
    assert float(rows["BFP vs ORT: argmax agreement per position"]) == pytest.approx(by_hand, abs=5e-5)
    assert float(rows["top-1 ORT FP32"]) == pytest.approx((got["reference/logits"].argmax(-1) == arrays["y"]).mean(),
                                                          abs=5e-5)
    assert "top-5 BFP" in rows  # 7 classes
    # The padded last chunk is trimmed: the BFP outputs are the model's on the real samples only.
    model = load_onnx(paths["dynamic"], {"tokens": (1, T), "features": (1, T, D)})
    one = compile_model(model, Plan.uniform("bfp4_b16"), progress=None)
    last = one.run({"tokens": arrays["tokens"][-1:], "features": arrays["features"][-1:]})[0]
    np.testing.assert_allclose(got["bfp/logits"][-1:], last, rtol=1e-5, atol=1e-5)


def test_eval_two_outputs_one_column_each(files, capsys):
    paths, arrays = files
    saved = paths["folder"] / "pooled_outputs.npz"
    assert main(["eval", str(paths["pooled"]), "--data", str(paths["data"]), "--format", "bfp4_b16",
                 "--save-outputs", str(saved)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["metric", "logits", "pooled"]
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    with np.load(saved) as npz:
        got = {key: npz[key] for key in npz.files}
    assert got["bfp/pooled"].shape == (N, C) and got["bfp/logits"].shape == (N, T, C)
    per_sample = (got["reference/pooled"].argmax(-1) == got["bfp/pooled"].argmax(-1)).mean()
    per_position = (got["reference/logits"].argmax(-1) == got["bfp/logits"].argmax(-1)).mean()
    assert cells["BFP vs ORT: argmax agreement per sample"][0] == "-"
    assert float(cells["BFP vs ORT: argmax agreement per sample"][1]) == pytest.approx(per_sample, abs=5e-5)
    assert float(cells["BFP vs ORT: argmax agreement per position"][0]) == pytest.approx(per_position, abs=5e-5)
    assert cells["BFP vs ORT: argmax agreement per position"][1] == "-"
    assert cells["top-1 BFP"][1] == "-"  # labels 'y' belong to the first output
    assert all(float(v) < 1e-5 for v in cells["TVM FP32 vs ORT: rel-L2"])


def test_a_wrong_tvm_fp32_build_shows_against_ort(files, capsys, monkeypatch):
    paths, _ = files
    real = bitq_tvm.api.compile_model

    def broken_fp32(model, plan=None, *args, **kwargs):  # the "FP32" build silently quantizes
        return real(model, plan or Plan.uniform("bfp4_b16"), *args, **kwargs)

    monkeypatch.setattr(bitq_tvm.api, "compile_model", broken_fp32)
    assert main(["eval", str(paths["static"]), "--data", str(paths["data"]), "--format", "bfp8_b32"]) == 0
    rows = _table(capsys.readouterr().out)
    assert float(rows["TVM FP32 vs ORT: rel-L2"]) > 1e-2


def test_input_arrays_keep_the_declared_dtypes(files):
    paths, arrays = files
    model = load_onnx(paths["static"])
    compiled = compile_model(model, None, progress=None)
    feeds = {"tokens": arrays["tokens"][:2].astype(np.int32), "features": arrays["features"][:2].astype(np.float64)}
    tokens, features = compiled.input_arrays(feeds)
    assert tokens.dtype == np.int64 and features.dtype == np.float32
    outs = compiled.run_batched({"tokens": arrays["tokens"], "features": arrays["features"]})
    assert len(outs) == 1 and outs[0].shape == (N, T, C)
    np.testing.assert_allclose(outs[0], _ort(paths["dynamic"], arrays), rtol=1e-4, atol=1e-4)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bitq_tvm.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", ["missing", "sample_shape", "float_tokens", "label_count", "label_range",
                                  "label_shape", "static_batch", "batch_conflict", "save_folder"])
def test_eval_user_errors_are_one_line_and_come_before_compiling(files, case):
    paths, arrays = files
    model, data = paths["dynamic"], paths["folder"] / f"{case}.npz"
    arrays = dict(arrays)
    extra = ["--batch", "2"]
    if case == "missing":
        del arrays["features"]
        expect = f"{data}: no array 'features' for model input 'features'"
    elif case == "sample_shape":
        arrays["features"] = arrays["features"][:, :, :5]
        expect = f"{data}: array 'features' has samples of shape [6, 5], model input 'features' takes [6, 32]"
    elif case == "float_tokens":
        arrays["tokens"] = arrays["tokens"].astype(np.float32)
        expect = f"{data}: array 'tokens' is float32, model input 'tokens' takes int64"
    elif case == "label_count":
        arrays["y"] = arrays["y"][:3]
        expect = f"{data}: 3 labels in 'y' for {N} samples"
    elif case == "label_range":
        arrays["y"] = arrays["y"].copy()
        arrays["y"][2, 1] = C
        expect = f"{data}: labels 'y': label {C} is outside the output's class range 0..{C - 1}"
    elif case == "label_shape":
        arrays["y"] = arrays["y"][:, 0]
        expect = f"{data}: labels 'y': labels of shape [{N}]; the output [2, {T}, {C}] takes labels [N, {T}]"
    elif case == "static_batch":
        model, extra = paths["static"], ["--batch", "3"]
        expect = "--batch 3: input 'tokens' has a static batch of 2"
    elif case == "batch_conflict":
        extra = ["--batch", "2", "--input-shape", f"tokens:4,{T}"]
        expect = f"--batch 2 conflicts with --input-shape tokens:4,{T}"
    elif case == "save_folder":
        extra = ["--batch", "2", "--save-outputs", str(paths["folder"] / "nope" / "out.npz")]
        expect = "does not exist"
    np.savez(data, **arrays)
    result = _run_cli("eval", str(model), "--data", str(data), "--format", "bfp8_b32", *extra)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "compiling" not in result.stderr and "reference" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(errors) == 1 and expect in errors[0], result.stderr


def test_eval_deploy_reports_the_stored_weight_bytes(capsys):
    from bitq_tvm.models import zoo

    assert main(["eval", str(zoo.bundled_model_path()), "--data", str(zoo._bundled_file("digits_test.npz")),
                 "--format", "bfp8_b32", "--deploy", "--limit", "40", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "bfp8_b32 (integer deployment)" in out and "40 samples in batches of 8" in out
    stored = next(line for line in out.splitlines() if line.startswith("integer deployment stores"))
    assert 0.26 < float(stored.split(" = ")[1].split("x")[0]) < 0.31  # conv1 (1 channel) stays FP32
    rows = _table(out)
    assert float(rows["BFP vs ORT: argmax agreement per sample"]) >= 0.95
    assert float(rows["TVM FP32 vs ORT: rel-L2"]) < 1e-5
