"""Tuning through a TVM RPC tracker: clear errors without a tracker, and a real run with one.

The tracker and a host-native RPC server run on 127.0.0.1 only, in their own process groups,
and are killed at the end.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bitq_tvm.errors import BitqError
from bitq_tvm.formats import BFPFormat
from bitq_tvm.targets import host_preset
from bitq_tvm.targets.rpc import RpcAddress, parse_address
from bitq_tvm.tuning.remote import check_tracker, remote_builder_runner
from bitq_tvm.tuning.session import TuningOptions, shutdown_workers, tune
from bitq_tvm.kernels.bfp_matmul_variants import kernel_variant
from bitq_tvm.tuning.tasks import BfpTask

LOOPBACK = "127.0.0.1"
CHECK_TIMEOUT_S = 2.0
# error within the check timeout, plus slack for a loaded machine
ERROR_DEADLINE_S = 3 * CHECK_TIMEOUT_S
SERVER_START_DEADLINE_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def test_unreachable_tracker_is_a_quick_clear_error():
    start = time.monotonic()
    with pytest.raises(BitqError, match="tracker unreachable"):
        check_tracker(RpcAddress(LOOPBACK, _free_port(), "k", tracker=True), CHECK_TIMEOUT_S)
    assert time.monotonic() - start < ERROR_DEADLINE_S


def test_silent_tracker_times_out_instead_of_hanging():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        start = time.monotonic()
        with pytest.raises(BitqError, match="unreachable within"):
            check_tracker(RpcAddress(LOOPBACK, listener.getsockname()[1], "k", tracker=True), CHECK_TIMEOUT_S)
        assert time.monotonic() - start < ERROR_DEADLINE_S


def test_tracker_option_parsing():
    assert parse_address("127.0.0.1:9190", "rk", tracker=True) == RpcAddress(LOOPBACK, 9190, "rk", tracker=True)
    assert parse_address("127.0.0.1:9190", "rk", tracker=True).option == "--tracker 127.0.0.1:9190 --key rk"
    with pytest.raises(BitqError, match="--tracker '127.0.0.1': expected HOST:PORT"):
        parse_address("127.0.0.1", "rk", tracker=True)
    with pytest.raises(BitqError, match="--tracker needs --key"):
        check_tracker(parse_address("127.0.0.1:9190", None, tracker=True), CHECK_TIMEOUT_S)
    with pytest.raises(BitqError, match="--tracker 127.0.0.1:0: port must be in 1..65535"):
        RpcAddress(LOOPBACK, 0, "rk", tracker=True)


def _start(args):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_tuning_on_a_tracker_device(tmp_path):
    tracker_port, server_port = _free_port(), _free_port()
    processes = [_start(["tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", str(tracker_port),
                         "--port-end", str(tracker_port + 1), "--silent"])]
    address = RpcAddress(LOOPBACK, tracker_port, "bitq-test", tracker=True)
    runner = None
    try:
        deadline = time.monotonic() + SERVER_START_DEADLINE_S
        while True:  # the tracker comes up first: then it answers, but knows no device yet
            try:
                check_tracker(address, CHECK_TIMEOUT_S)
            except BitqError as err:
                assert time.monotonic() < deadline, f"tracker/server did not come up: {err}"
                if "no device registered" in str(err) and len(processes) == 1:
                    processes.append(_start(["tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(server_port),
                                             "--port-end", str(server_port + 1), "--tracker",
                                             f"{LOOPBACK}:{tracker_port}", "--key", address.key]))
                time.sleep(0.5)
                continue
            break
        with pytest.raises(BitqError, match="no device registered under key 'other'"):
            check_tracker(RpcAddress(LOOPBACK, tracker_port, "other", tracker=True), CHECK_TIMEOUT_S)
        builder, runner = remote_builder_runner(address, host_preset())
        fmt = BFPFormat(8, 32)
        task = BfpTask(16, 32, 64, fmt, fmt, kernel_variant(host_preset().tvm_target()))
        summary = tune([task], host_preset(), str(tmp_path / "db"), 2,
                       TuningOptions(min_trials_per_task=2, trials_per_iteration=2, population_size=16),
                       builder=builder, runner=runner, progress=None)
        (result,) = summary.results
        assert result.trials == 2 and result.failed == 0
        assert 0 < result.best_seconds < 1e-2
    finally:
        if runner is not None:
            shutdown_workers(runner)
        for proc in processes:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
