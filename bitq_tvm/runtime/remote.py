"""Run compiled models on a device through TVM RPC: ``--rpc host:port`` or ``--tracker host:port --key K``.

The device side is TVM's own ``python -m tvm.exec.rpc_server``: on a real board, or here on the
host, natively or under ``qemu-aarch64`` with the rootfs of :mod:`bitq_tvm.targets.rootfs`; addresses
are :class:`~bitq_tvm.targets.rpc.RpcAddress`::

    with start_rpc_server(get_target("cortex-a76")) as server:
        with RemoteModel(server.address, compiled) as remote:
            logits = remote.run_batched("input", x)

Every network step is bounded: an unreachable server or tracker is a :class:`BitqError` within
the timeout, never a hang (TVM's own clients retry a refused connection for a minute), and so is
a device that freezes mid-session (upload, ``load_module`` and each run have a deadline).
:class:`RemoteModel` keeps its RPC client in a worker process for that: a TVM client call
blocked on a frozen device holds the GIL, so only a process the caller can kill is bounded.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitq_tvm.errors import BitqError
from bitq_tvm.runtime.runner import Runner
from bitq_tvm.targets.presets import TargetPreset
from bitq_tvm.targets.rpc import RpcAddress, device_address, parse_address

__all__ = ["RpcProcess", "RemoteModel", "connect", "free_port", "open_session", "start_rpc_server", "start_tracker"]

LOOPBACK = "127.0.0.1"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Bound on each remote step after the session starts (upload, load_module, one run): generous,
# because an emulated device runs a model under qemu.
DEFAULT_CALL_TIMEOUT_S = 300.0
# A worker process imports TVM (a few seconds; more on a loaded machine) before it answers.
WORKER_START_TIMEOUT_S = 120.0
# Extra time the parent gives the worker's own (bounded) connection attempt before killing it.
_CONNECT_MARGIN_S = 10.0
# How long close() lets the worker release its session before killing it.
_CLOSE_GRACE_S = 10.0
# Workers not yet ended: killed at exit, so no worker outlives the process that started it.
_LIVE_WORKERS: "weakref.WeakSet" = weakref.WeakSet()
# An emulated server imports TVM under qemu (about 5 s) before it binds its port.
DEFAULT_READY_TIMEOUT_S = 120.0
_STOP_GRACE_S = 5.0
# A key no server is started with: the server answers it with "mismatch" and keeps listening,
# which proves a live TVM RPC server without starting a session (a bare TCP connect that closes
# early kills TVM's listen loop).
_PROBE_KEY = "client:__bitq_probe__"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file joined on one line (for one-line error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


class RpcProcess:
    """A started ``tvm.exec.rpc_server`` or ``rpc_tracker`` process (its own process group).

    Use as a context manager, or call :meth:`stop`: it ends the whole group (under qemu the
    server has worker and session children).
    """

    def __init__(self, kind: str, process: subprocess.Popen, address: RpcAddress, log_path: Path,
                 key: str = "") -> None:
        self.kind = kind
        self.process = process
        self.address = address
        self.log_path = log_path
        self.key = key

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the process's output (for error messages)."""
        return _log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Terminate the process group, then kill what is left of it.

        Session children of the server share its group and may outlive the leader (a child hung
        under qemu-user ignores SIGTERM), so the group is always SIGKILLed at the end.
        """
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(_STOP_GRACE_S)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "RpcProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _server_launcher(preset: TargetPreset, rootfs_dir: str | os.PathLike | None) -> tuple[list[str], dict]:
    """(python command, extra environment) that runs a TVM python for ``preset`` on this host."""
    if preset.emulator is None:
        return [sys.executable], {}
    if preset.triple != "aarch64-linux-gnu":
        raise BitqError(
            f"target '{preset.name}': no TVM runtime exists for {preset.triple} (PyPI has no wheel), so no "
            "emulated RPC server; check its kernels with bitq_tvm.targets.run_kernel_emulated instead"
        )
    from bitq_tvm.targets.cross import require_tool
    from bitq_tvm.targets.rootfs import ensure_aarch64_rootfs, rootfs_python

    require_tool(preset.emulator, preset.emulator_package, f"emulator for {preset.name}")
    rootfs = ensure_aarch64_rootfs(rootfs_dir)
    env = {}
    args = list(preset.emulator_args)
    if "-cpu" in args:  # qemu-user reads QEMU_CPU, and child pythons inherit it
        env["QEMU_CPU"] = args[args.index("-cpu") + 1]
    return [str(rootfs_python(rootfs))], env


def _launch(kind: str, command: list[str], env_extra: dict, address: RpcAddress, key: str) -> RpcProcess:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(env_extra)
    log_dir = Path(tempfile.mkdtemp(prefix=f"bitq-{kind}-"))
    log_path = log_dir / f"{kind}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=log_dir, env=env, start_new_session=True)
    return RpcProcess(kind, process, address, log_path, key)


def _wait_until(process: RpcProcess, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.process.poll() is not None:
            process.stop()
            raise BitqError(f"{what} exited with status {process.process.returncode}: {process.log_tail()}")
        if time.monotonic() > deadline:
            process.stop()
            raise BitqError(f"{what} not ready within {timeout_s:.0f} s: {process.log_tail()}")
        time.sleep(0.2)


def _bound(process: RpcProcess) -> bool:
    try:
        return f"bind to {process.address}" in process.log_path.read_text(errors="replace")
    except OSError:
        return False


def start_tracker(host: str = LOOPBACK, port: int | None = None,
                  ready_timeout_s: float = 30.0) -> RpcProcess:
    """Start ``python -m tvm.exec.rpc_tracker`` on ``host:port`` (a free port if None)."""
    address = RpcAddress(host, port or free_port(host), tracker=True)
    command = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
               "--port", str(address.port), "--port-end", str(address.port + 1)]
    tracker = _launch("tracker", command, {}, address, "")
    _wait_until(tracker, lambda: _bound(tracker), ready_timeout_s, f"RPC tracker on {address}")
    return tracker


def start_rpc_server(preset: TargetPreset, host: str = LOOPBACK, port: int | None = None,
                     tracker: str | RpcAddress | None = None, key: str = "",
                     rootfs_dir: str | os.PathLike | None = None,
                     ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> RpcProcess:
    """Start a TVM RPC server that runs code for ``preset`` and wait until it accepts sessions.

    Native presets run the host's python; aarch64 presets run the rootfs' arm64 python under
    ``qemu-aarch64`` (building the rootfs on first use, see
    :func:`bitq_tvm.targets.rootfs.ensure_aarch64_rootfs`) with the preset's qemu CPU model.

    Parameters
    ----------
    preset
        The device to serve.
    host, port
        Where to listen; ``port=None`` picks a free one.
    tracker, key
        Register with this tracker (``host:port``) under ``key``; returns once the tracker lists it.

    Raises
    ------
    BitqError
        No TVM runtime for the preset's architecture (riscv64), missing tools, or a server that
        exits or does not come up within ``ready_timeout_s`` (its last output in the message).
    """
    launcher, env = _server_launcher(preset, rootfs_dir)
    address = RpcAddress(host, port or free_port(host))
    command = [*launcher, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(address.port),
               "--port-end", str(address.port + 1)]
    tracker_address = None
    if tracker is not None:
        if not key:
            raise BitqError("--tracker needs --key K: the key to register the server under")
        tracker_address = parse_address(tracker, key, tracker=True)
        command += ["--tracker", str(tracker_address), "--key", key]
    elif key:
        command += ["--key", key]
    what = f"RPC server for {preset.name} on {address}"
    server = _launch("rpc-server", command, env, address, key)
    _wait_until(server, lambda: _bound(server), ready_timeout_s, what)
    if tracker_address is not None:
        _wait_until(server, lambda: _registered(tracker_address), ready_timeout_s,
                    f"{what} (registration under key '{key}' with tracker {tracker_address})")
    return server


def _registered(tracker: RpcAddress) -> bool:
    from bitq_tvm.tuning.remote import check_tracker

    try:
        check_tracker(tracker, timeout_s=2.0)
    except BitqError:
        return False
    return True


def _probe_server(address: RpcAddress, timeout_s: float) -> None:
    """BitqError unless a TVM RPC server answers at ``address`` within ``timeout_s``."""
    from tvm.rpc import base

    where = address.flag + f" {address}"
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            key = _PROBE_KEY.encode()
            sock.sendall(struct.pack("<i", base.RPC_MAGIC) + struct.pack("<i", len(key)) + key)
            reply = sock.recv(4)
    except OSError as err:
        raise BitqError(f"{where}: RPC server unreachable within {timeout_s:g} s ({err})") from None
    if len(reply) != 4 or struct.unpack("<i", reply)[0] not in (base.RPC_CODE_MISMATCH, base.RPC_CODE_SUCCESS):
        raise BitqError(f"{where}: the server there is not a TVM RPC server")


def _within(timeout_s: float, what: str, function: Callable[[], Any], waiting_for: str = "no session") -> Any:
    """``function()``, or BitqError after ``timeout_s`` (TVM's RPC calls block in C++, unbounded)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = function()
        except Exception as err:  # noqa: BLE001 - re-raised below as a user-facing error
            result["error"] = err

    worker = threading.Thread(target=target, name=f"bitq-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():  # left behind as a daemon: it ends with its socket or with the process
        raise BitqError(f"{what}: {waiting_for} within {timeout_s:g} s (--rpc-timeout)")
    if "error" in result:
        first_line = (str(result["error"]).strip().splitlines() or [type(result["error"]).__name__])[0]
        raise BitqError(f"{what}: {first_line}")
    return result["value"]


def connect(rpc: str | RpcAddress | None = None, tracker: str | RpcAddress | None = None,
            key: str | None = None, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            session_timeout_s: float = 0):
    """Open a TVM RPC session with a server (``rpc``) or with a device of ``key`` from a ``tracker``.

    Parameters
    ----------
    rpc, tracker
        ``host:port``; give exactly one.
    key
        With ``tracker``: the device key (required). With ``rpc``: the server's key, if it has one.
    timeout_s
        Bound on reaching the server/tracker and getting a session.
    session_timeout_s
        Passed to the server: it ends the session after this many seconds (0: never).

    Returns
    -------
    tvm.rpc.RPCSession

    Raises
    ------
    BitqError
        Both or neither address given, nothing answering within ``timeout_s``, no device under
        ``key`` (lists the registered keys), or a refused session.
    """
    return open_session(device_address(rpc, tracker, key), timeout_s, session_timeout_s)


def open_session(address: RpcAddress, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, session_timeout_s: float = 0):
    """:func:`connect` to the device at ``address`` (a server, or a tracker's device of ``address.key``)."""
    from tvm import rpc as tvm_rpc

    if not address.tracker:
        _probe_server(address, timeout_s)
        return _within(timeout_s, address.option, lambda: tvm_rpc.connect(
            address.host, address.port, key=address.key, session_timeout=session_timeout_s))
    from bitq_tvm.tuning.remote import check_tracker

    check_tracker(address.require_key(), timeout_s)

    def request():
        client = tvm_rpc.connect_tracker(address.host, address.port)
        return client.request(address.key, priority=1, session_timeout=session_timeout_s, max_retry=1)

    return _within(timeout_s, address.option, request)


def _as_device(where) -> RpcAddress:
    if isinstance(where, (str, RpcAddress)):
        return parse_address(where)
    raise BitqError(f"RemoteModel takes the device's address (HOST:PORT or an RpcAddress), not "
                    f"{type(where).__name__}: the RPC session lives in a worker process")


class _Worker:
    """The child process that holds the TVM RPC client (:mod:`bitq_tvm.runtime.rpc_worker`).

    The child leads its own process group; every request waits for its reply with a deadline,
    and a missed deadline kills the whole group (a TVM client call blocked on a frozen device
    holds the child's GIL, so nothing short of a kill takes it back).
    """

    def __init__(self, start_timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="bitq-rpc-worker-"))
        self.log_path = self.log_dir / "worker.log"
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding bitq_tvm/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "bitq_tvm.runtime.rpc_worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            cwd=self.log_dir, env=env, start_new_session=True)
        _LIVE_WORKERS.add(self)
        os.set_blocking(self.process.stdin.fileno(), False)
        self._buffer = b""
        self.request(None, start_timeout_s, "starting the RPC worker process", "the start", option="")

    @property
    def alive(self) -> bool:
        return self.process is not None

    def log_tail(self, lines: int = 3) -> str:
        return _log_tail(self.log_path, lines)

    def request(self, message, timeout_s: float, what: str, step: str, option: str = "--rpc-timeout") -> Any:
        """Send ``message`` (None: only read) and return the reply's value within ``timeout_s``.

        ``option``: the setting that bounds the step, named in the timeout's message.
        """
        from bitq_tvm.runtime.rpc_worker import encode

        if self.process is None:
            raise BitqError(f"{what}: the RPC session is closed (an earlier step timed out or failed)")
        deadline = time.monotonic() + timeout_s
        try:
            if message is not None:
                self._send(encode(message), deadline)
            reply = self._receive(deadline)
        except TimeoutError:
            self.kill()
            bound = f" ({option})" if option else ""
            raise BitqError(f"{what}: {step} got no reply within {timeout_s:g} s{bound}") from None
        except (EOFError, OSError):
            status = self.process.poll()
            tail = self.log_tail()
            self.kill()
            raise BitqError(f"{what}: the RPC worker process exited (status {status})"
                            + (f": {tail}" if tail else "")) from None
        kind, value = reply
        if kind == "ok":
            return value
        if kind == "bitq_error":
            raise BitqError(value)
        raise BitqError(f"{what}: {step} failed: {value}")

    def _send(self, data: bytes, deadline: float) -> None:
        fd, view = self.process.stdin.fileno(), memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            _, writable, _ = select.select([], [fd], [], remaining)
            if writable:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    pass

    def _read_exact(self, size: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, max(size - len(self._buffer), 1 << 16))
                if not chunk:
                    raise EOFError
                self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _receive(self, deadline: float):
        import pickle

        from bitq_tvm.runtime.rpc_worker import _HEADER

        (size,) = _HEADER.unpack(self._read_exact(_HEADER.size, deadline))
        return pickle.loads(self._read_exact(size, deadline))

    def close(self, grace_s: float) -> None:
        """Ask the child to release its session and exit; kill its group after ``grace_s`` anyway."""
        if self.process is None:
            return
        try:
            self.request(("close",), grace_s, "closing the RPC session", "the close", option="")
            self.process.wait(grace_s)
        except (BitqError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child's process group and reap the child (idempotent)."""
        process, self.process = self.process, None
        if process is None:
            return
        _LIVE_WORKERS.discard(self)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _kill_live_workers() -> None:
    for worker in list(_LIVE_WORKERS):
        worker.kill()


atexit.register(_kill_live_workers)


class RemoteModel(Runner):
    """A compiled model loaded on a remote device: ``run``/``run_batched`` like ``CompiledModel``.

    Works for any compiled Relax model with ``executable``, ``target``, ``model`` (simulation or
    integer deployment): the library is exported for ``compiled.target`` (cross compiled with
    the preset's compiler) here, then a worker process (:mod:`bitq_tvm.runtime.rpc_worker`)
    opens the RPC session to ``device``, uploads the library, loads it with ``load_module`` and
    runs it with a Relax VirtualMachine on the remote CPU. Inputs and outputs cross as arrays.

    Parameters
    ----------
    device
        ``"host:port"`` of an RPC server, or an :class:`~bitq_tvm.targets.rpc.RpcAddress` (a
        server, or a tracker and the device ``key``).
    compiled
        The compiled model.
    call_timeout_s
        Bound on each remote step after the session starts: the upload, ``load_module``, each run.
        A step that gets no reply in time kills the worker (its whole process group) and is a
        one-line :class:`BitqError` naming the step; the model is closed after that.
    connect_timeout_s
        Bound on reaching the server or tracker and getting a session (see :func:`connect`).

    Use as a context manager or call :meth:`close`: TVM's server serves one session at a time.
    The worker dies with the thread that created the model (Linux ``PR_SET_PDEATHSIG``), so
    create a model in a thread that outlives its use.
    """

    LIBRARY_NAME = "bitq_model.so"

    def __init__(self, device, compiled, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        from bitq_tvm.targets.cross import export

        self._worker = None
        self.where = _as_device(device)
        self.model = compiled.model
        self.target = compiled.target
        self.call_timeout_s = call_timeout_s
        self._worker = _Worker()
        try:
            # The child bounds the connection itself (clear messages); this is the backstop.
            self._worker.request(("connect", self.where, connect_timeout_s), 2 * connect_timeout_s + _CONNECT_MARGIN_S,
                                 self.where.option, "the session request")
            what = f"loading {self.LIBRARY_NAME} ({compiled.target.name}) on the remote device"
            with tempfile.TemporaryDirectory(prefix="bitq-remote-") as folder:
                library = Path(folder) / self.LIBRARY_NAME
                export(compiled.executable, library, compiled.target)
                self._step(what, "upload", ("upload", str(library), self.LIBRARY_NAME))
            self._step(what, "load_module", ("load_module", self.LIBRARY_NAME))
            self._step(what, "VM creation", ("create_vm",))
        except BaseException:
            self.close()
            raise

    def _step(self, what: str, step: str, message: tuple) -> Any:
        if self._worker is None:
            raise BitqError(f"{what}: the remote model is closed")
        return self._worker.request(message, self.call_timeout_s, what, step)

    def close(self) -> None:
        """Release the session and end the worker process (killed if the device does not answer)."""
        worker, self._worker = getattr(self, "_worker", None), None
        if worker is not None:
            worker.close(min(self.call_timeout_s, _CLOSE_GRACE_S))

    def __del__(self) -> None:
        try:
            self.close()  # so a dropped RemoteModel frees the server and its worker
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self, inputs) -> list[np.ndarray]:
        """Run once; ``inputs`` is a dict by input name or a list in input order."""
        return self._step(f"running 'main' on the remote device ({self.target.name})", "the run",
                          ("run", self.input_arrays(inputs)))
