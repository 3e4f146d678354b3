"""Cross-compile small TIR kernels per preset, run them under qemu through the C runner, and
compare with NumPy exactly (integer kernels and exact float ops: tolerance 0)."""

import dataclasses

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from bitq_tvm.errors import BitqError
from bitq_tvm.targets import build_runner, cross_compiler, export, get_target, run_kernel_emulated

M, N, K = 8, 32, 64
ELEMENTS = 1024  # float32 intermediate of 4 KiB: above TVM's stack limit, so a workspace


@T.prim_func(s_tir=True)
def matmul_int8(
    A: T.Buffer((M, K), "int8"), B: T.Buffer((K, N), "int8"), C: T.Buffer((M, N), "int32")
):
    for i, k, j in T.grid(M, K, N):
        with T.sblock("matmul"):
            vi, vk, vj = T.axis.remap("SRS", [i, k, j])
            with T.init():
                C[vi, vj] = 0
            C[vi, vj] = C[vi, vj] + T.Cast("int32", A[vi, vk]) * T.Cast("int32", B[vk, vj])


@T.prim_func(s_tir=True)
def add_relu_double(
    A: T.Buffer((ELEMENTS,), "float32"),
    B: T.Buffer((ELEMENTS,), "float32"),
    C: T.Buffer((ELEMENTS,), "float32"),
):
    total = T.alloc_buffer((ELEMENTS,), "float32")
    for i in range(ELEMENTS):
        with T.sblock("add"):
            vi = T.axis.spatial(ELEMENTS, i)
            total[vi] = A[vi] + B[vi]
    for i in range(ELEMENTS):
        with T.sblock("relu_double"):
            vi = T.axis.spatial(ELEMENTS, i)
            C[vi] = T.max(total[vi], T.float32(0)) * T.float32(2)


def scheduled_matmul():
    """Rows in parallel (exercises the runner's parallel launch), columns vectorised."""
    sch = tvm.s_tir.Schedule(matmul_int8)
    block = sch.get_sblock("matmul")
    i, _, j = sch.get_loops(block)
    sch.parallel(i)
    sch.vectorize(j)
    sch.decompose_reduction(block, sch.get_loops(block)[1])
    return sch.mod["main"]


def scheduled_elementwise():
    sch = tvm.s_tir.Schedule(add_relu_double)
    for name in ("add", "relu_double"):
        outer, inner = sch.split(sch.get_loops(sch.get_sblock(name))[0], [None, 16])
        sch.vectorize(inner)
    return sch.mod["main"]


@pytest.fixture(scope="module")
def runner_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runner-cache")


def build_for(prim_func, preset, path):
    return export(tvm.compile(prim_func, preset.tvm_target()), path, preset)


PRESETS = ["host", "cortex-a53", "cortex-a76", "neoverse-n2", "rv64gc", "rv64gcv-vlen128",
           "rv64gcv-vlen256"]
VECTOR_MNEMONIC = {"cortex-a53": "v0.", "cortex-a76": "v0.", "neoverse-n2": "v0.",
                   "rv64gcv-vlen128": "vsetvli", "rv64gcv-vlen256": "vsetvli"}


@pytest.mark.parametrize("name", PRESETS)
def test_int8_matmul_runs_exactly(name, tmp_path, runner_cache):
    preset = get_target(name)
    rng = np.random.default_rng(7)
    a = rng.integers(-128, 128, size=(M, K), dtype=np.int8)
    b = rng.integers(-128, 128, size=(K, N), dtype=np.int8)
    executable = tvm.compile(scheduled_matmul(), preset.tvm_target())
    if name in VECTOR_MNEMONIC:  # the run below must exercise the vector unit, not scalar code
        assert VECTOR_MNEMONIC[name] in executable.mod.inspect_source("asm")
    library = export(executable, tmp_path / "matmul.so", preset)
    (c,) = run_kernel_emulated(library, "main", [a, b], [((M, N), "int32")], preset,
                               cache_dir=runner_cache)
    np.testing.assert_array_equal(c, a.astype(np.int32) @ b.astype(np.int32))


@pytest.mark.parametrize("name", ["cortex-a76", "rv64gc", "rv64gcv-vlen128"])
def test_float_elementwise_with_workspace_runs_exactly(name, tmp_path, runner_cache):
    preset = get_target(name)
    rng = np.random.default_rng(11)
    a, b = (rng.standard_normal(ELEMENTS).astype(np.float32) for _ in range(2))
    library = build_for(scheduled_elementwise(), preset, tmp_path / "elementwise.so")
    with open(library, "rb") as handle:
        assert b"__TVMBackendAllocWorkspace" in handle.read()
    (c,) = run_kernel_emulated(library, "main", [a, b], [((ELEMENTS,), "float32")], preset,
                               cache_dir=runner_cache)
    np.testing.assert_array_equal(c, np.maximum(a + b, np.float32(0)) * np.float32(2))


def test_kernel_argument_errors_are_reported(tmp_path, runner_cache):
    preset = get_target("rv64gc")
    library = build_for(matmul_int8, preset, tmp_path / "matmul.so")
    wrong = np.zeros((M, K + 1), dtype=np.int8)
    with pytest.raises(BitqError, match=r"main.*on rv64gc.*Invalid A.shape\[1\]"):
        run_kernel_emulated(library, "main", [wrong, np.zeros((K, N), np.int8)],
                            [((M, N), "int32")], preset, cache_dir=runner_cache)
    with pytest.raises(BitqError, match="__tvm_ffi_nope"):
        run_kernel_emulated(library, "nope", [], [], preset, cache_dir=runner_cache)


def test_missing_cross_compiler_names_executable_and_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compilers at all
    preset = get_target("cortex-a76")
    with pytest.raises(BitqError, match="aarch64-linux-gnu-g\\+\\+.*g\\+\\+-aarch64-linux-gnu"):
        cross_compiler(preset)
    with pytest.raises(BitqError, match="riscv64-linux-gnu-g\\+\\+.*g\\+\\+-riscv64-linux-gnu"):
        build_runner(get_target("rv64gcv-vlen128"), cache_dir=tmp_path / "fresh-cache")


def test_missing_emulator_names_package(tmp_path, runner_cache):
    preset = dataclasses.replace(get_target("rv64gc"), emulator="qemu-riscv64-absent")
    library = build_for(matmul_int8, get_target("rv64gc"), tmp_path / "matmul.so")
    with pytest.raises(BitqError, match="qemu-riscv64-absent.*qemu-user"):
        run_kernel_emulated(library, "main", [], [], preset, cache_dir=runner_cache)
