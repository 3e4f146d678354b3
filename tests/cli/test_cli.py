"""The ``bitq-tvm`` command: happy paths in-process, user errors as a real subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

from bitq_tvm.cli import main
from bitq_tvm.models import zoo

BUNDLED = str(zoo.bundled_model_path())


def run_cli(*args, cwd=None):
    """Run the installed command in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "bitq_tvm.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _table(out):
    """First two columns of the markdown table in ``out``, as a dict."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    return {row[0]: row[1] for row in cells[2:]}


def test_inspect(capsys):
    assert main(["inspect", BUNDLED]) == 0
    out = capsys.readouterr().out
    assert "| conv1 " in out and "| fc2 " in out
    assert "4 layers, 337,536 MACs, 38,160 weight parameters" in out


def test_compile_writes_a_loadable_library(tmp_path, capsys):
    out = tmp_path / "digits.so"
    assert main(["compile", BUNDLED, "--format", "bfp8_b32", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    x = zoo.bundled_test_data()["x"][:1]
    logits = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    assert [p.name for p in tmp_path.iterdir()] == ["digits.so"]  # no temporary left behind


def test_compile_with_plan_file(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"bitq_plan_version": 1, "default": "bfp6_b16", "layers": {"conv1": "fp32"}}))
    assert main(["compile", BUNDLED, "--plan", str(plan), "-o", str(tmp_path / "m.so")]) == 0
    assert (tmp_path / "m.so").stat().st_size > 0


def test_eval_reports_top1_and_agreement(tmp_path, capsys):
    data = zoo.bundled_test_data()
    assert main(["eval", BUNDLED, "--data", str(zoo._bundled_file("digits_test.npz")), "--format", "bfp4_b16"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert f"{len(data['y'])} samples in batches of 1" in out
    ref, tvm32, bfp = (float(rows[f"top-1 {who}"]) for who in ("ORT FP32", "TVM FP32", "BFP"))
    assert ref >= 0.95 and tvm32 == ref and abs(ref - bfp) <= 0.05
    assert float(rows["top-5 BFP"]) >= bfp  # 10 classes: top-5 is shown
    assert 0.9 <= float(rows["BFP vs ORT: argmax agreement per sample"]) <= 1.0
    assert float(rows["TVM FP32 vs ORT: rel-L2"]) < 1e-5
    assert 0.9 < float(rows["BFP vs ORT: cosine"]) < 1.0
    # Without labels: agreement only.
    np.savez(tmp_path / "nolabels.npz", input=data["x"][:20])
    assert main(["eval", BUNDLED, "--data", str(tmp_path / "nolabels.npz"), "--format", "bfp8_b32"]) == 0
    out = capsys.readouterr().out
    assert "top-1" not in out and "BFP vs ORT: argmax agreement per sample" in out


def test_demo(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| bfp") or line.startswith("| fp32")]
    assert [(row[0], row[1].split(" (")[0]) for row in table] == [
        ("fp32", "TVM FP32"), ("bfp8_b32", "BFP simulation"), ("bfp6_b16", "BFP simulation"),
        ("bfp4_b16", "BFP simulation"), ("bfp8_b32", "integer BFP"), ("bfp4_b16", "integer BFP")]
    ratios = [float(row[5].rstrip("x")) for row in table]
    assert ratios[0] == 1.0 and ratios[1] < 0.27 and ratios[3] < 0.15
    # The deployed rows store what they claim (conv1 stays FP32) and classify like the simulation.
    assert 0.27 < ratios[4] < 0.31 and ratios[3] < ratios[5] < 0.16
    top1 = [float(row[2].rstrip("%")) for row in table]
    assert top1[4] >= 97.0 and top1[5] >= 97.0
    assert all(float(row[7]) > 0 for row in table)  # ms/image measured on every row
    assert "bfp8_b32 integer: layer 'conv1' stays float BFP simulation" in out


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("resnet18", ["--image-size", "64"]), ("transformer_encoder", [])])
def test_zoo_models_through_the_cli(tmp_path, capsys, name, extra):
    # The same commands on an ImageNet-class CNN and a transformer encoder exported to ONNX.
    onnx_path, data = tmp_path / f"{name}.onnx", tmp_path / "data.npz"
    assert main(["zoo", name, "-o", str(onnx_path), "--data", str(data), "--samples", "2", *extra]) == 0
    assert main(["inspect", str(onnx_path)]) == 0
    assert main(["eval", str(onnx_path), "--data", str(data), "--format", "bfp8_b32"]) == 0
    rows = _table(capsys.readouterr().out)
    assert float(rows["BFP vs ORT: rel-L2"]) < 0.2 and float(rows["TVM FP32 vs ORT: rel-L2"]) < 1e-4
    assert main(["compile", str(onnx_path), "--format", "bfp8_b32", "-o", str(tmp_path / "m.so")]) == 0


def test_targets(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("host", "cortex-a76", "rv64gcv-vlen128"):
        assert f"| {name} " in out


def _nan_model(path):
    model = onnx.load(BUNDLED)
    for init in model.graph.initializer:
        if init.name.startswith("conv2") and len(init.dims) == 4:
            w = onnx.numpy_helper.to_array(init).copy()
            w.flat[5] = np.inf
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
            onnx.save(model, path)
            return init.name
    raise AssertionError("no conv2 weight")


@pytest.mark.parametrize("case", ["missing", "malformed", "format", "plan_layer", "dynamic", "nan", "shape"])
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case):
    out = tmp_path / "out.so"
    args = ["compile", BUNDLED, "--format", "bfp8_b32", "-o", str(out)]
    expect = None
    if case == "missing":
        args[1], expect = str(tmp_path / "nope.onnx"), "nope.onnx: no such file"
    elif case == "malformed":
        (tmp_path / "bad.onnx").write_bytes(b"this is not protobuf")
        args[1], expect = str(tmp_path / "bad.onnx"), "bad.onnx: not"
    elif case == "format":
        args[3], expect = "bfp3_b7x", "unknown BFP format 'bfp3_b7x'; presets: bfp8_b32"
    elif case == "plan_layer":
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"bitq_plan_version": 1, "layers": {"conv9": "bfp8_b32"}}))
        args[2:4], expect = ["--plan", str(plan)], "layer 'conv9' does not exist in the model"
    elif case == "dynamic":
        path = tmp_path / "dyn.onnx"
        onnx.save(zoo.with_dynamic_batch(zoo.resnet18(image_size=32, num_classes=10)), path)
        args[1], expect = str(path), "input 'input' has dynamic shape [batch,3,32,32] (rank 4); pin it with --input-shape input:BATCH,3,32,32"
    elif case == "nan":
        path = tmp_path / "nan.onnx"
        tensor = _nan_model(path)
        args[1], expect = str(path), f"weight tensor '{tensor}' of layer 'conv2' contains 1 NaN/Inf"
    elif case == "shape":
        args += ["--input-shape", "input:1,1,8"]
        expect = "does not fit the model's input shape"
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(error_lines) == 1 and expect in error_lines[0], result.stderr
    assert not out.exists()


def _matmul_3d_weight_model(path):
    """A MatMul whose constant weight is 3-D: no layer BFP can quantize."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 8, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm3d")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], initializer=[weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("case", ["shape_too_big", "shape_overflows_int64", "matmul_3d_compile", "matmul_3d_eval",
                                  "binary_plan", "plan_version_true", "empty_format", "empty_plan", "string_calib",
                                  "compile_missing_dir", "compile_into_a_file", "plan_missing_dir", "zoo_missing_dir",
                                  "zoo_data_missing_dir"])
def test_more_user_errors_are_one_line_exit_2_before_the_work(tmp_path, case):
    out = tmp_path / "out.so"
    args = ["compile", BUNDLED, "--format", "bfp8_b32", "-o", str(out)]
    written = out
    if case == "shape_too_big":
        args = ["inspect", BUNDLED, "--input-shape", "input:99999999999999999999,1,8,8"]
        expect = "--input-shape 'input:99999999999999999999,1,8,8': 6,399,999,999,999,999,999,936 elements; at most"
    elif case == "shape_overflows_int64":  # MACs = 2**50 * 16 * 64 * 9 > 2**63
        args = ["inspect", BUNDLED, "--input-shape", "input:1125899906842624,1,8,8"]
        expect = "elements; at most 2,147,483,647 per input"
    elif case.startswith("matmul_3d"):
        model = tmp_path / "mm3d.onnx"
        _matmul_3d_weight_model(model)
        args[1] = str(model)
        if case == "matmul_3d_eval":
            np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 8), np.float32))
            args = ["eval", str(model), "--data", str(tmp_path / "d.npz"), "--format", "bfp8_b32"]
        expect = "mm3d.onnx: no layer BFP can quantize; skipped: MatMul 'mm3d'"
    elif case == "binary_plan":
        (tmp_path / "plan.json").write_bytes(b"\xff\xfe\x00\x01 binary")
        args[2:4], expect = ["--plan", str(tmp_path / "plan.json")], "plan.json: not a plan file (not UTF-8 text)"
    elif case == "plan_version_true":
        (tmp_path / "plan.json").write_text('{"bitq_plan_version": true, "default": "bfp8_b32"}')
        args[2:4], expect = ["--plan", str(tmp_path / "plan.json")], "unsupported plan version True"
    elif case == "empty_format":
        args[3], expect = "", "--format '': empty"
    elif case == "empty_plan":
        args[2:4], expect = ["--plan", ""], ": no such plan file"
    elif case == "string_calib":
        np.savez(tmp_path / "c.npz", x=np.full((8, 1, 8, 8), "a"))
        args = ["plan", BUNDLED, "--calib", str(tmp_path / "c.npz"), "--budget", "1%", "-o", str(tmp_path / "p.json")]
        expect, written = "c.npz: array 'x': input 'input' takes float32 values, got <U1 data", \
            tmp_path / "p.json"
    elif case == "compile_missing_dir":
        written = tmp_path / "nope" / "m.so"
        args[5], expect = str(written), f"-o {written}: directory {tmp_path / 'nope'} does not exist"
    elif case == "compile_into_a_file":
        (tmp_path / "file").write_text("")
        written = tmp_path / "file" / "m.so"
        args[5], expect = str(written), "does not exist"
    elif case == "plan_missing_dir":
        written = tmp_path / "nope" / "p.json"
        args = ["plan", BUNDLED, "--calib", str(zoo._bundled_file("digits_test.npz")), "--budget", "1%",
                "-o", str(written)]
        expect = "does not exist"
    elif case == "zoo_missing_dir":
        written = tmp_path / "nope" / "r.onnx"
        args, expect = ["zoo", "resnet18", "-o", str(written)], "does not exist"
    elif case == "zoo_data_missing_dir":
        written = tmp_path / "r.onnx"
        args = ["zoo", "resnet18", "-o", str(written), "--data", str(tmp_path / "nope" / "d.npz")]
        expect = "--data"
    result = subprocess.run([sys.executable, "-m", "bitq_tvm.cli", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(error_lines) == 1 and expect in error_lines[0], result.stderr
    assert not written.exists()
    assert "[bitq-tvm] compiling" not in result.stderr  # refused before the work


@pytest.mark.parametrize("command", ["compile", "plan", "tune", "zoo"])
def test_read_only_output_folders_are_refused_before_the_work(tmp_path, monkeypatch, capsys, command):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: make the folder refuse new files as a read-only mount does
        import tempfile

        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(read_only):
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr("bitq_tvm.support.paths.tempfile.mkstemp", mkstemp)
    target = read_only / "out"
    argv = {"compile": ["compile", BUNDLED, "--format", "bfp8_b32", "-o", str(target)],
            "plan": ["plan", BUNDLED, "--calib", str(zoo._bundled_file("digits_test.npz")), "--budget", "1%",
                     "-o", str(target)],
            "tune": ["tune", BUNDLED, "--trials", "4", "--work-dir", str(target)],
            "zoo": ["zoo", "resnet18", "-o", str(target)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    option = "--work-dir" if command == "tune" else "-o"
    assert f"bitq-tvm: error: {option} {target}: cannot write in {read_only} (Permission denied)" in err
    assert "[bitq-tvm] compiling" not in err and not target.exists()
