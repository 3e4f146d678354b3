"""load_library: an exported deployment runs as loaded by TVM, with the data blob's pages released."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from bitq_tvm.deploy import compile_deployed
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.plan import Plan
from bitq_tvm.runtime.library import load_library, release_library_blob


def _gemm_model(path, n=1024):
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise of mapped pages is Linux's")
def test_loaded_library_releases_its_blob_and_computes_the_same(tmp_path):
    model = load_onnx(_gemm_model(str(tmp_path / "fc.onnx")))
    deployed = compile_deployed(model, Plan.uniform("bfp8_b32"), progress=None)
    library = str(tmp_path / "fc.so")
    deployed.export_library(library)
    x = np.random.default_rng(1).standard_normal((1, 1024)).astype(np.float32)
    want = deployed.run({"x": x})[0]

    plain = relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    vm = relax.VirtualMachine(load_library(library), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(plain["main"](tvm.runtime.tensor(x)).numpy(), want)
    # the blob holds at least the packed weights; its pages can be released again (idempotent)
    assert release_library_blob(library) >= 0.9 * deployed.report.artifact_constant_bytes
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), want)
    assert release_library_blob(str(tmp_path / "fc.onnx")) == 0  # not a loaded library: nothing done
