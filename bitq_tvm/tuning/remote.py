"""Tuning on devices registered with TVM's RPC tracker (``--tracker host:port --key K``).

Candidates are built here (cross-compiled with the target preset's compiler when it has one) and
measured on whichever device the tracker hands out for the key: that is how a fleet of boards is
shared between tuning jobs. The tracker is checked before tuning starts, with socket timeouts, so
an unreachable tracker or a key without devices is a clear error within seconds, never a hang
(TVM's own tracker client retries a refused connection for a minute).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import tempfile
import threading
from typing import Callable

from ..errors import BitqError
from ..targets.cross import cross_compiler
from ..targets.presets import TargetPreset
from ..targets.rpc import RpcAddress

__all__ = ["check_tracker", "answering_session", "remote_builder_runner"]

# Seconds one candidate's RPC session (upload, load, allocate, time) may take; the device kills
# a session after it. Sessions took under 1 s here, also under qemu-user (an emulated board).
RUN_TIMEOUT_S = 60.0
# TVM's server forks a process per session; under qemu-user that child can hang before it reads
# a byte (seen on the first session after a server start, 2 of ~6 starts: a lock of qemu's own
# glib held across the fork). Such a session is dropped when a first call gets no answer within
# PROBE_TIMEOUT_S and asked for again; the device takes the next request once its session
# timeout has killed the hung child, so a hang costs about RUN_TIMEOUT_S.
PROBE_TIMEOUT_S = 20.0
SESSION_ATTEMPTS = 3


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the tracker")
        data += chunk
    return data


def check_tracker(address: RpcAddress, timeout_s: float = 5.0) -> dict:
    """Ask the tracker at ``address`` for its summary, within ``timeout_s`` per socket operation.

    Returns
    -------
    dict
        The tracker's summary (``queue_info``, ``server_info``).

    Raises
    ------
    BitqError
        No key given, or the tracker does not answer, is not a TVM tracker, or has no device under the key.
    """
    from tvm.rpc import base

    address.require_key()
    where = f"--tracker {address.host}:{address.port}"
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", _recv_exact(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise BitqError(f"{where}: the server there is not a TVM RPC tracker")
            request = json.dumps([base.TrackerCode.SUMMARY]).encode()
            sock.sendall(struct.pack("<i", len(request)) + request)
            size = struct.unpack("<i", _recv_exact(sock, 4))[0]
            reply = json.loads(_recv_exact(sock, size))
    except (OSError, ConnectionError, ValueError) as err:
        raise BitqError(f"{where}: tracker unreachable within {timeout_s:g} s ({err})") from None
    if reply[0] != base.TrackerCode.SUCCESS:
        raise BitqError(f"{where}: the tracker refused the summary request ({reply})")
    summary = reply[1]
    keys = sorted({info["key"].split(":", 1)[-1] for info in summary.get("server_info", [])})
    if address.key not in keys:
        raise BitqError(f"{where}: no device registered under key '{address.key}' "
                        f"(registered keys: {', '.join(keys) or 'none'})")
    return summary


def answering_session(request: Callable[[], object], probe_timeout_s: float, attempts: int):
    """The first session ``request()`` returns whose server answers a call within ``probe_timeout_s``.

    Raises
    ------
    BitqError
        No session answered in ``attempts`` requests.
    """
    for _ in range(attempts):
        session = request()
        answered = []
        # a hung server never answers: the call runs in a thread left blocked until the device
        # kills the session
        probe = threading.Thread(target=lambda s=session: answered.append(s.cpu(0).exist), daemon=True)
        probe.start()
        probe.join(probe_timeout_s)
        if answered:
            return session
    raise BitqError(f"RPC device: no session answered within {probe_timeout_s:g} s in {attempts} attempt(s)")


def _create_session(rpc_config, session_timeout_s: float):
    """MetaSchedule ``f_create_session``: a tracker session whose server answers, with the
    device's session timeout ``session_timeout_s`` (the runner's own timeout covers retries)."""
    from tvm import rpc

    def request():
        tracker = rpc.connect_tracker(rpc_config.tracker_host, rpc_config.tracker_port)
        return tracker.request(rpc_config.tracker_key, priority=rpc_config.session_priority,
                               session_timeout=session_timeout_s)

    return answering_session(request, PROBE_TIMEOUT_S, SESSION_ATTEMPTS)


def _export_cross(module, compiler_name: str) -> str:
    """MetaSchedule f_export: link a candidate into a shared library for the remote device."""
    import tvm.support.cc

    path = os.path.join(tempfile.mkdtemp(prefix="bitq_remote_"), "candidate.so")
    module.export_library(path, fcompile=tvm.support.cc.cross_compiler(compiler_name))
    return path


def remote_builder_runner(address: RpcAddress, preset: TargetPreset, run_timeout_s: float = RUN_TIMEOUT_S,
                          build_timeout_s: float = 120.0, check_timeout_s: float = 5.0):
    """(builder, runner) for :func:`bitq_tvm.tuning.session.tune` measuring on tracker devices.

    The builder cross-compiles with the preset's compiler (BitqError naming the Debian package
    when it is missing); a native preset uses the host compiler. The runner uploads each
    candidate library to a device of the key and times it there; ``run_timeout_s`` bounds one
    candidate's session, and a session that does not answer is asked for again
    (:func:`answering_session`). The tracker is checked first
    (:func:`check_tracker`).
    """
    from tvm.s_tir import meta_schedule as ms

    check_tracker(address, check_timeout_s)
    f_export = None
    if cross_compiler(preset) is not None:  # raises if the cross compiler is missing
        f_export = functools.partial(_export_cross, compiler_name=preset.cross_compiler)
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=build_timeout_s, f_export=f_export)
    # the runner's timeout bounds a candidate including its session retries
    config = ms.runner.RPCConfig(tracker_host=address.host, tracker_port=address.port, tracker_key=address.key,
                                 session_priority=1,
                                 session_timeout_sec=int(SESSION_ATTEMPTS * (run_timeout_s + PROBE_TIMEOUT_S)))
    runner = ms.runner.RPCRunner(rpc_config=config, max_workers=1,
                                 f_create_session=functools.partial(_create_session, session_timeout_s=run_timeout_s))
    return builder, runner
