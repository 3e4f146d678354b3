"""A device that freezes mid-session: every remote step after the session starts is bounded.

The device is a native TVM RPC server on 127.0.0.1 behind a proxy (also on 127.0.0.1) that
forwards traffic until it is told to freeze, then holds its connections open without reading or
answering: what a board that hangs looks like from the host. Only loopback addresses are used.

A device that freezes during a *run* is the hard case: the blocked TVM C++ client call holds
the GIL, so no thread of the calling process can take control back. ``RemoteModel`` therefore
keeps its RPC client in a worker process and kills it (its process group) at the deadline. The
proxy recognises the start of a run by the inputs' bytes: the data is filled with a marker
pattern that nothing else on the connection (handshake, library upload, load_module) contains.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import zoo
from bitq_tvm.targets import host_preset
from bitq_tvm.runtime.remote import RemoteModel, start_rpc_server

CALL_TIMEOUT_S = 3.0
# Far above any step's real duration here, far below "forever": the test's own bound, not a
# latency assertion (a loaded machine only makes it slower to *reach* the timeout).
SUBPROCESS_LIMIT_S = 900
# Four float32 values, repeated, fill the run-triggering inputs; the proxy freezes at their bytes.
MARKER_VALUES = np.array([1234.5, -4321.25, 777.125, -0.0078125], np.float32)
MARKER = MARKER_VALUES.tobytes()
WORKER_MODULE = "bitq_tvm.runtime.rpc_worker"
# The run freezes at this client message (a received chunk) after the inputs (the input copy, set_input and invoke
# went through): a freeze there hung the earlier, thread-based deadline of the CLI for good
# (measured: messages 6 and 8 hung it, 1-4 did not), so it tells a bounded run from an unbounded one.
FREEZE_AT_MESSAGE = 6
# Hang guard of the tests whose device freezes during a run (seconds): an implementation that
# does not bound the run ends there, as a failure, instead of hanging the test session.
RUN_HANG_GUARD_S = 300


class FreezingProxy:
    """TCP proxy 127.0.0.1:port -> upstream that stops forwarding once ``freeze`` is set.

    ``freeze_after_bytes``: also freeze a connection by itself once the client sent that many
    bytes (for a subprocess whose session the test cannot reach: the upload of a library is the
    first large message). ``freeze_on`` and ``then_at``: once the client has sent the bytes
    ``freeze_on``, freeze at its ``nth`` later message that holds ``then_at`` (that message
    never reaches the device). With the run's inputs as the marker and ``b"main"``, the inputs reach
    the device and the run's call (``set_input("main", ...)``) freezes.
    """

    def __init__(self, upstream: tuple[str, int], freeze_after_bytes: int | None = None,
                 freeze_on: bytes | None = None, then_at: bytes = b"", nth: int = 1) -> None:
        self.then_at, self.nth, self.matches = then_at, nth, 0
        self.upstream = upstream
        self.freeze_after_bytes = freeze_after_bytes
        self.freeze_on = freeze_on
        self.marker_seen = threading.Event()  # the client sent freeze_on
        self.freeze = threading.Event()
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            server = socket.create_connection(self.upstream, timeout=10)
            self.sockets += [client, server]
            sent = [0, b""]  # bytes sent, the last few bytes (a marker may straddle two chunks)
            for src, dst, count in ((client, server, sent), (server, client, None)):
                threading.Thread(target=self._pump, args=(src, dst, count), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count) -> None:
        src.settimeout(0.2)
        while not self.stop.is_set():
            if self.freeze.is_set():
                self.stop.wait(0.2)  # frozen: hold the connection, read nothing, answer nothing
                continue
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            if count is not None:
                count[0] += len(data)
                seen, count[1] = count[1] + data, data[-64:]
                if self.marker_seen.is_set() and self.then_at in data:
                    self.matches += 1
                if ((self.freeze_after_bytes is not None and count[0] > self.freeze_after_bytes)
                        or self.matches >= self.nth):
                    self.freeze.set()
                    continue  # this chunk never reaches the device
                if self.freeze_on is not None and self.freeze_on in seen:
                    self.marker_seen.set()
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def server():
    with start_rpc_server(host_preset()) as rpc:
        yield rpc


@pytest.fixture(scope="module")
def compiled():
    return compile_model(load_onnx(zoo.bundled_model_path()), None, host_preset(), progress=None)


def marker_inputs(shape) -> np.ndarray:
    return np.resize(MARKER_VALUES, int(np.prod(shape))).reshape(shape)


def _workers_with(mark: str) -> list[int]:
    """PIDs of live RPC worker processes whose environment holds ``BITQ_TEST_MARK=mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if WORKER_MODULE.encode() not in (entry / "cmdline").read_bytes():
                continue
            if f"BITQ_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
                if "Z" not in state.split()[1]:
                    found.append(int(entry.name))
        except (OSError, StopIteration):
            continue
    return found


@pytest.fixture
def marked(monkeypatch):
    """A mark in the environment that every worker started from now on inherits."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv("BITQ_TEST_MARK", mark)
    return mark


def test_upload_to_a_frozen_device_times_out(server, compiled, marked):
    # 64 KiB: past the handshake and session setup, inside the upload of the library
    proxy = FreezingProxy((server.address.host, server.address.port), freeze_after_bytes=64 * 1024)
    try:
        with pytest.raises(BitqError, match=r"upload got no reply within 3 s \(--rpc-timeout\)"):
            RemoteModel(proxy.address, compiled, call_timeout_s=CALL_TIMEOUT_S)
    finally:
        proxy.close()
    assert proxy.freeze.is_set()
    assert _workers_with(marked) == []


@pytest.fixture
def hang_guard():
    """Ends the test process after RUN_HANG_GUARD_S, even while a C++ call holds the GIL (a C thread)."""
    faulthandler.dump_traceback_later(RUN_HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_run_on_a_device_that_freezes_mid_run_times_out_and_kills_the_worker(server, compiled, marked, hang_guard):
    proxy = FreezingProxy((server.address.host, server.address.port), freeze_on=MARKER, nth=FREEZE_AT_MESSAGE)
    try:
        remote = RemoteModel(proxy.address, compiled, call_timeout_s=CALL_TIMEOUT_S)
        shape = compiled.model.input_shapes["input"]
        images = zoo.bundled_test_data()["x"][:shape[0]]
        np.testing.assert_allclose(remote.run([images])[0], compiled.run([images])[0], rtol=1e-5, atol=1e-5)
        (worker,) = _workers_with(marked)
        assert not proxy.freeze.is_set()
        with pytest.raises(BitqError, match=r"^running 'main' on the remote device \(host\): the run got no reply "
                                            r"within 3 s \(--rpc-timeout\)$"):
            remote.run([marker_inputs(shape)])
        assert proxy.freeze.is_set()
        assert _workers_with(marked) == []
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)  # killed and reaped
        with pytest.raises(BitqError, match="closed"):
            remote.run([images])
        remote.close()
    finally:
        proxy.close()


def test_close_ends_the_worker(server, compiled, marked):
    with RemoteModel(server.address, compiled, call_timeout_s=30) as remote:
        assert len(_workers_with(marked)) == 1
    assert _workers_with(marked) == []


def _eval_through(proxy: FreezingProxy, data: str, mark: str,
                  limit_s: float = SUBPROCESS_LIMIT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "BITQ_TEST_MARK": mark}
    return subprocess.run([sys.executable, "-m", "bitq_tvm.cli", "eval", str(zoo.bundled_model_path()),
                           "--data", data, "--format", "bfp8_b32", "--limit", "4", "--rpc", proxy.address,
                           "--rpc-timeout", "5"], capture_output=True, text=True, timeout=limit_s,
                          env=env)


def _single_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_cli_eval_on_a_device_that_freezes_mid_session_exits_2(server, marked):
    # 64 KiB: past the handshake and session setup, inside the upload of the first library
    proxy = FreezingProxy((server.address.host, server.address.port), freeze_after_bytes=64 * 1024)
    try:
        result = _eval_through(proxy, str(zoo._bundled_file("digits_test.npz")), marked)
    finally:
        proxy.close()
    assert proxy.freeze.is_set()
    assert "upload got no reply within 5 s (--rpc-timeout)" in _single_error(result), result.stderr
    assert _workers_with(marked) == []


def test_cli_eval_on_a_device_that_freezes_during_the_run_exits_2(server, marked, tmp_path):
    """Session setup, upload and load_module reach the device; the run's input copy does not."""
    data = tmp_path / "marked.npz"
    np.savez(data, x=marker_inputs((8, 1, 8, 8)))
    proxy = FreezingProxy((server.address.host, server.address.port), freeze_on=MARKER, nth=FREEZE_AT_MESSAGE)
    try:
        result = _eval_through(proxy, str(data), marked, limit_s=RUN_HANG_GUARD_S)
    finally:
        proxy.close()
    assert proxy.freeze.is_set()
    error = _single_error(result)
    assert error == ("bitq-tvm: error: running 'main' on the remote device (host): the run got no reply "
                     "within 5 s (--rpc-timeout)"), result.stderr
    assert _workers_with(marked) == []
