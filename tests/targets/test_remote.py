"""Compiled models on a remote device through TVM RPC, proven on an emulated aarch64 device.

The device is TVM's own RPC server running on the real aarch64 TVM runtime (PyPI wheels) inside
Debian's arm64 python under qemu-aarch64 (``bitq_tvm.targets.rootfs``, built once and cached).

Tolerance for "device output == x86 simulation": |device - host| <= 1e-4 * max|host| and equal
top-1. Both sides run the same Relax graph and TIR kernels, but LLVM may fuse multiply-adds (FMA)
and vectorise reductions differently per ISA, so float32 sums may differ in their last bits: for
a dot product of length K the rounding difference is about sqrt(K) * 2^-24 relative (K <= 4608
in ResNet-18: ~4e-6), far below 1e-4. A real numeric difference (a BFP mantissa rounded the
other way, a wrong kernel) moves an output by at least one bfp8 mantissa step (2^-7 of a block's
scale, ~8e-3), so the bound separates summation order from wrong results. Measured: the outputs
were bit-identical on both models.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
import time

import numpy as np
import onnx
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import zoo
from bitq_tvm.plan import Plan
from bitq_tvm.targets import export, get_target
from bitq_tvm.cli import emulator as emulator_command
from bitq_tvm.cli.args import add_remote_args, remote_runner
from bitq_tvm.runtime.remote import RemoteModel, connect, free_port, start_rpc_server, start_tracker
from bitq_tvm.targets.rootfs import ensure_aarch64_rootfs, is_ready, rootfs_size_bytes

TARGET = "cortex-a76"
PLAN = "bfp8_b32"
RELATIVE_TOLERANCE = 1e-4  # of max|host output|; see the module docstring
EM_AARCH64 = 183  # ELF e_machine
UNREACHABLE_LIMIT_S = 5.0


def assert_matches_host(device: np.ndarray, host: np.ndarray) -> None:
    assert device.shape == host.shape
    assert np.abs(device - host).max() <= RELATIVE_TOLERANCE * np.abs(host).max()
    np.testing.assert_array_equal(device.reshape(len(device), -1).argmax(1), host.reshape(len(host), -1).argmax(1))


@pytest.fixture(scope="module")
def rootfs():
    """The cached aarch64 rootfs (built here on a fresh machine: ~20 s, ~450 MB)."""
    return ensure_aarch64_rootfs()


@pytest.fixture(scope="module")
def digits():
    model = load_onnx(zoo.bundled_model_path())
    data = zoo.bundled_test_data()
    host = compile_model(model, Plan.uniform(PLAN), "host", progress=None)
    device = compile_model(model, Plan.uniform(PLAN), TARGET, progress=None)
    return model, data, host, device


@pytest.fixture(scope="module")
def server(rootfs):
    with start_rpc_server(get_target(TARGET), rootfs_dir=rootfs) as started:
        yield started


@pytest.fixture(scope="module")
def tracked_server(rootfs):
    """A tracker on 127.0.0.1 with one emulated cortex-a76 registered under key 'bitq-a76'."""
    with start_tracker() as tracker:
        with start_rpc_server(get_target(TARGET), tracker=tracker.address, key="bitq-a76",
                              rootfs_dir=rootfs) as started:
            yield tracker, started


# --- cross compilation (no emulator needed) ---

def test_cross_compiled_digits_model_is_an_aarch64_library(digits, tmp_path):
    _, _, _, device = digits
    path = tmp_path / "digits.so"
    device.export_library(str(path))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2  # 64-bit
    e_type, e_machine = struct.unpack("<HH", header[16:20])
    assert e_type == 3  # ET_DYN: a shared library
    assert e_machine == EM_AARCH64


def test_missing_cross_compiler_names_the_package(digits, tmp_path, monkeypatch):
    _, _, _, device = digits
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler anywhere
    with pytest.raises(BitqError, match=r"aarch64-linux-gnu-g\+\+ not found.*g\+\+-aarch64-linux-gnu"):
        export(device.executable, tmp_path / "digits.so", device.target)
    assert not (tmp_path / "digits.so").exists()


def test_rootfs_setup_without_qemu_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None if name == "qemu-aarch64" else f"/usr/bin/{name}")
    with pytest.raises(BitqError, match="qemu-aarch64 not found.*qemu-user"):
        ensure_aarch64_rootfs(tmp_path / "rootfs")
    assert not (tmp_path / "rootfs").exists()


def test_riscv_has_no_rpc_server_and_says_what_to_use_instead():
    with pytest.raises(BitqError, match="no TVM runtime exists for riscv64.*run_kernel_emulated"):
        start_rpc_server(get_target("rv64gcv-vlen128"))


# --- addresses and unreachable endpoints ---

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of --rpc"),
    ({"rpc": "127.0.0.1:1", "tracker": "127.0.0.1:2", "key": "k"}, "exactly one of --rpc"),
    ({"rpc": "localhost"}, "--rpc 'localhost': expected HOST:PORT"),
    ({"tracker": "127.0.0.1:9190"}, "--tracker needs --key"),
    ({"rpc": "127.0.0.1:70000"}, "port must be in 1..65535"),
])
def test_bad_addresses_are_clear_errors(kwargs, message):
    with pytest.raises(BitqError, match=message):
        connect(timeout_s=1.0, **kwargs)


@pytest.fixture
def silent_listener():
    """A port that accepts connections but never answers (a hung device)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.mark.parametrize("option", ["rpc", "tracker"])
@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_unreachable_endpoint_fails_within_the_timeout(option, endpoint, silent_listener):
    address = silent_listener if endpoint == "silent" else f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(BitqError, match=f"--{option} {address}: .*(unreachable|refused|timed out)"):
        connect(**{option: address}, key="bitq-a76", timeout_s=2.0)
    assert time.monotonic() - start < UNREACHABLE_LIMIT_S


# --- the emulated aarch64 device ---

@pytest.mark.slow
def test_rootfs_is_cached(rootfs):
    start = time.perf_counter()
    assert ensure_aarch64_rootfs(rootfs) == rootfs
    assert time.perf_counter() - start < 1.0
    assert is_ready(rootfs)
    assert (rootfs / "root/usr/bin/python3.11").is_file()
    assert 100 * 2**20 < rootfs_size_bytes(rootfs) < 1024 * 2**20


@pytest.mark.slow
def test_emulated_device_runs_digits_like_the_host(server, digits):
    _, data, host, device = digits
    with RemoteModel(server.address, device) as remote:
        on_device = remote.run_batched("input", data["x"])
    on_host = host.run_batched("input", data["x"])
    assert_matches_host(on_device, on_host)
    assert (on_device.argmax(1) == data["y"]).mean() > 0.9  # the trained model, not noise


@pytest.mark.slow
def test_tracker_hands_out_the_emulated_device(tracked_server, digits):
    tracker, _ = tracked_server
    _, data, host, device = digits
    images = data["x"][:64]
    with RemoteModel(tracker.address.with_key("bitq-a76"), device, connect_timeout_s=30.0) as remote:
        assert_matches_host(remote.run_batched("input", images), host.run_batched("input", images))


@pytest.mark.slow
def test_tracker_without_the_key_lists_the_registered_ones(tracked_server):
    tracker, _ = tracked_server
    with pytest.raises(BitqError, match="no device registered under key 'rk3399'.*bitq-a76"):
        connect(tracker=tracker.address, key="rk3399", timeout_s=2.0)


@pytest.mark.slow
def test_busy_server_times_out_instead_of_hanging(server, digits):
    """TVM's server handles one session at a time: a second client waits, but not forever."""
    session = connect(rpc=server.address)  # held open: the server is busy
    start = time.monotonic()
    with pytest.raises(BitqError, match=f"--rpc {server.address}: .*(unreachable|timed out|no session)"):
        connect(rpc=server.address, timeout_s=1.5)
    assert time.monotonic() - start < UNREACHABLE_LIMIT_S
    del session


@pytest.mark.slow
def test_resnet18_on_the_emulated_device_matches_the_host(server, tmp_path):
    path = tmp_path / "resnet18.onnx"
    proto = zoo.resnet18(image_size=32, num_classes=10)
    onnx.save(proto, path)
    model = load_onnx(path)
    name = next(iter(model.input_shapes))
    images = zoo.synthetic_inputs(proto, 2, seed=0)[name]
    host = compile_model(model, Plan.uniform(PLAN), "host", progress=None)
    device = compile_model(model, Plan.uniform(PLAN), TARGET, progress=None)
    with RemoteModel(server.address, device) as remote:
        assert_matches_host(remote.run_batched(name, images), host.run_batched(name, images))


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["digits", "resnet18"])
def test_integer_deployment_on_the_emulated_device_matches_the_host_simulation(server, digits, tmp_path, model_name):
    """The integer BFP kernels (sdot on cortex-a76) give the x86 simulation's numbers."""
    from bitq_tvm.deploy import compile_deployed

    if model_name == "digits":
        model, data, host, _ = digits
        name, inputs = "input", data["x"][:64]
    else:
        path = tmp_path / "resnet18.onnx"
        proto = zoo.resnet18(image_size=32, num_classes=10)
        onnx.save(proto, path)
        model = load_onnx(path)
        name = next(iter(model.input_shapes))
        inputs = zoo.synthetic_inputs(proto, 2, seed=0)[name]
        host = compile_model(model, Plan.uniform(PLAN), "host", progress=None)
    deployed = compile_deployed(model, Plan.uniform(PLAN), TARGET, progress=None)
    assert deployed.report.variant == "sdot" and deployed.report.integer_layers
    with RemoteModel(server.address, deployed) as remote:
        assert_matches_host(remote.run_batched(name, inputs), host.run_batched(name, inputs))


# --- command-line pieces ---

def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitq-tvm eval")
    add_remote_args(parser)
    return parser


def test_remote_args_parse_and_host_runs_stay_local(digits):
    parser = _eval_parser()
    assert remote_runner(parser.parse_args([]), digits[2]) is None
    with pytest.raises(SystemExit):  # --rpc and --tracker exclude each other
        parser.parse_args(["--rpc", "a:1", "--tracker", "b:2"])
    with pytest.raises(BitqError, match="--key is only meaningful"):
        remote_runner(parser.parse_args(["--key", "k"]), digits[2])
    with pytest.raises(BitqError, match="--rpc-timeout 0: must be > 0"):
        remote_runner(parser.parse_args(["--rpc", "127.0.0.1:9", "--rpc-timeout", "0"]), digits[2])


@pytest.mark.slow
def test_eval_hook_runs_on_the_rpc_device(server, digits):
    _, data, host, device = digits
    args = _eval_parser().parse_args(["--rpc", str(server.address), "--rpc-timeout", "20"])
    images = data["x"][:32]
    with remote_runner(args, device) as runner:
        assert_matches_host(runner.run_batched("input", images), host.run_batched("input", images))


def test_emulator_command_rejects_non_aarch64_targets():
    parser = argparse.ArgumentParser(prog="bitq-tvm")
    emulator_command.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["emulator", "setup", "--target", "rv64gcv-vlen256"])
    with pytest.raises(BitqError, match="only aarch64 targets can be emulated"):
        args.func(args)


@pytest.mark.slow
def test_emulator_setup_command_reports_the_cached_rootfs(rootfs, capsys):
    parser = argparse.ArgumentParser(prog="bitq-tvm")
    emulator_command.add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["emulator", "setup", "--cache-dir", str(rootfs)])
    assert args.func(args) == 0
    assert f"aarch64 rootfs for {TARGET}: {rootfs}" in capsys.readouterr().out


@pytest.mark.slow
def test_emulator_serve_command_serves_until_interrupted(rootfs, digits, monkeypatch):
    """``emulator serve`` in a thread; Ctrl-C is simulated by making its wait loop raise it."""
    parser = argparse.ArgumentParser(prog="bitq-tvm")
    emulator_command.add_command(parser.add_subparsers(dest="command"))
    port = free_port()
    args = parser.parse_args(["emulator", "serve", "--cache-dir", str(rootfs), "--port", str(port)])
    stop = threading.Event()

    def pause_or_interrupt(seconds):
        if stop.is_set():
            raise KeyboardInterrupt
        time.sleep(seconds)

    monkeypatch.setattr("bitq_tvm.cli.emulator._pause", pause_or_interrupt)
    result = {}
    serving = threading.Thread(target=lambda: result.setdefault("status", args.func(args)))
    serving.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the server to come up under qemu
            try:
                session = connect(rpc=f"127.0.0.1:{port}", timeout_s=2.0)
                del session  # up: release the probe session for the model's worker
                break
            except BitqError:
                assert time.monotonic() < deadline and serving.is_alive()
                time.sleep(0.5)
        _, data, host, device = digits
        images = data["x"][:8]
        with RemoteModel(f"127.0.0.1:{port}", device) as remote:
            assert_matches_host(remote.run_batched("input", images), host.run_batched("input", images))
    finally:
        stop.set()
        serving.join(30)
    assert result == {"status": 0}
    with pytest.raises(BitqError, match="unreachable"):  # stopped: the port is closed again
        connect(rpc=f"127.0.0.1:{port}", timeout_s=1.0)


# --- riscv64: no TVM runtime wheel, so the digits model's matmuls run through the C runner ---

RISCV_CASES = [("rv64gcv-vlen128", "rvv"), ("rv64gc", "scalar")]


def _digits_matmul_operands(image: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (A [M, K], W [N, K]) of the digits model's four layers on one real test image.

    The layer inputs come from ONNX Runtime (FP32); convolutions are written as im2col matmuls
    (3x3, pad 1, stride 1: M = 64 output pixels, K = C * 9), which is how the integer kernels see them.
    """
    import onnxruntime
    from onnx import helper, numpy_helper

    proto = onnx.load(zoo.bundled_model_path())
    weights = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    inputs_of = {"conv1": "input", "conv2": "relu1_out", "fc1": "flat_out", "fc2": "relu3_out"}
    proto.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in list(inputs_of.values())[1:])
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, {"input": image})))
    values["input"] = image
    operands = {}
    for layer, tensor in inputs_of.items():
        w = weights[f"{layer}.weight"]
        a = values[tensor]
        if layer.startswith("conv"):
            padded = np.pad(a[0], ((0, 0), (1, 1), (1, 1)))
            a = np.stack([padded[:, y:y + 3, x:x + 3].reshape(-1) for y in range(8) for x in range(8)])
        operands[layer] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(w.reshape(len(w), -1), np.float32))
    return operands


@pytest.mark.slow
@pytest.mark.parametrize(("name", "variant"), RISCV_CASES)
def test_riscv_digits_matmul_layers_match_the_x86_simulation(name, variant, tmp_path):
    """Every layer of the digits model under bfp8_b32, on the emulated RISC-V CPU, against
    (a) the exact integer reference within its derived bound and (b) the x86 simulation of the
    plan, fake_quant(A) @ fake_quant(W).T, within that bound plus float64 rounding
    (tolerances as in tests/kernels/test_bfp_matmul_arm_riscv.py)."""
    import tvm

    from bitq_tvm.formats import BFPFormat, fake_quantize_np, quantize_np
    from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_for_target
    from bitq_tvm.kernels.oracle import bfp_matmul_ref, bfp_matmul_tolerance, quantize_activations_np
    from bitq_tvm.kernels.packing import pack_weights
    from bitq_tvm.targets import run_kernel_emulated

    preset = get_target(name)
    fmt = BFPFormat(mantissa_bits=8, block_size=32)
    image = zoo.bundled_test_data()["x"][:1].astype(np.float32)
    for layer, (a, w) in _digits_matmul_operands(image).items():
        (M, K), N = a.shape, len(w)
        func, _ = bfp_matmul_for_target(M, N, K, fmt, fmt, preset.tvm_target(), variant)
        library = export(tvm.compile(func, preset.tvm_target()), tmp_path / f"{layer}.so", preset)
        acts, packed = quantize_activations_np(a, fmt), pack_weights(w, fmt)
        (got,) = run_kernel_emulated(library, "bfp_matmul", [acts["qa"], acts["ea"], packed.qw, packed.ew],
                                     [((M, N), "float32")], preset)
        wt = quantize_np(w, fmt, axis=-1)
        args = (acts["qa"], acts["ea"], wt.mantissas.reshape(N, -1), wt.exponents.reshape(N, -1), 32, 8, 8)
        bound = bfp_matmul_tolerance(*args)
        assert np.all(np.abs(got - bfp_matmul_ref(*args)) <= bound), layer
        fa, fw = fake_quantize_np(a, fmt).astype(np.float64), fake_quantize_np(w, fmt).astype(np.float64)
        simulation_bound = bound + K * np.finfo(np.float64).eps * (np.abs(fa) @ np.abs(fw).T)
        assert np.all(np.abs(got - fa @ fw.T) <= simulation_bound), layer
        assert np.count_nonzero(got) > got.size // 4, layer  # real activations: relu zeros, not all


def test_remote_model_takes_the_device_address_not_a_session(digits):
    with pytest.raises(BitqError, match="RemoteModel takes the device's address.*not object"):
        RemoteModel(object(), digits[3])
