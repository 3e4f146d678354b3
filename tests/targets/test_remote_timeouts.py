"""A device that freezes mid-session: every remote step after the session starts is bounded.

The device is a native TVM RPC server on 127.0.0.1 behind a proxy (also on 127.0.0.1) that
forwards traffic until it is told to freeze, then holds its connections open without reading or
answering: what a board that hangs looks like from the host. Only loopback addresses are used.

Known gap (not tested here because it still hangs): a device that freezes during a *run*. TVM
frees remote objects in C++ destructors that wait for the device while holding the GIL, so the
deadline thread cannot take control back; bounding that needs the RPC client in a child process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from bitq_tvm.api import compile_model
from bitq_tvm.errors import BitqError
from bitq_tvm.frontend.onnx_model import load_onnx
from bitq_tvm.models import zoo
from bitq_tvm.targets import host_preset
from bitq_tvm.targets.remote import RemoteModel, connect, start_rpc_server

CALL_TIMEOUT_S = 3.0
# Far above any step's real duration here, far below "forever": the test's own bound, not a
# latency assertion (a loaded machine only makes it slower to *reach* the timeout).
SUBPROCESS_LIMIT_S = 900


class FreezingProxy:
    """TCP proxy 127.0.0.1:port -> upstream that stops forwarding once ``freeze`` is set.

    ``freeze_after_bytes``: also freeze a connection by itself once the client sent that many
    bytes (for a subprocess whose session the test cannot reach: the upload of a library is the
    first large message).
    """

    def __init__(self, upstream: tuple[str, int], freeze_after_bytes: int | None = None) -> None:
        self.upstream = upstream
        self.freeze_after_bytes = freeze_after_bytes
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
            sent = [0]
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
                if self.freeze_after_bytes is not None and count[0] > self.freeze_after_bytes:
                    self.freeze.set()
                    continue  # this chunk never reaches the device
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


@pytest.fixture
def proxy(server):
    p = FreezingProxy((server.address.host, server.address.port))
    yield p
    p.close()


def test_upload_to_a_frozen_device_times_out(proxy, compiled):
    session = connect(rpc=proxy.address, timeout_s=30)
    proxy.freeze.set()
    with pytest.raises(BitqError, match=r"upload got no reply within 3 s"):
        RemoteModel(session, compiled, call_timeout_s=CALL_TIMEOUT_S)


def test_cli_eval_on_a_device_that_freezes_mid_session_exits_2(server, tmp_path):
    # 64 KiB: past the handshake and session setup, inside the upload of the first library
    proxy = FreezingProxy((server.address.host, server.address.port), freeze_after_bytes=64 * 1024)
    try:
        data = str(zoo._bundled_file("digits_test.npz"))
        result = subprocess.run([sys.executable, "-m", "bitq_tvm.cli", "eval", str(zoo.bundled_model_path()),
                                 "--data", data, "--format", "bfp8_b32", "--limit", "4", "--rpc", proxy.address,
                                 "--rpc-timeout", "5"], capture_output=True, text=True, timeout=SUBPROCESS_LIMIT_S)
    finally:
        proxy.close()
    assert proxy.freeze.is_set()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitq-tvm: error:")]
    assert len(errors) == 1 and "upload got no reply within 5 s" in errors[0], result.stderr
