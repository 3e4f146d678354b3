"""The TVM RPC client side of a :class:`~bitq_tvm.runtime.remote.RemoteModel`, in its own process.

Run as ``python -m bitq_tvm.runtime.rpc_worker`` by the parent (never by hand). A TVM RPC call
to a device that stops answering blocks inside TVM's C++ client while holding the GIL, so no
thread of the calling process can take control back; in a child process the parent waits with
a deadline and kills the child's process group instead.

Protocol: length-prefixed pickles. The parent writes requests ``(op, *args)`` to the child's
stdin; the child answers each with ``("ok", value)`` or ``("error", one_line_message)`` on the
file descriptor that was its stdout (fd 1 itself is pointed at stderr, a log file, so nothing
TVM prints can corrupt the channel). EOF on stdin ends the child.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys

_HEADER = struct.Struct("<Q")


def read_message(fd: int):
    """One message from a blocking ``fd``; None at EOF."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    if body is None:
        return None
    return pickle.loads(body)


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def encode(message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies (even while a C++ call holds the GIL)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)) or type(value).__name__ == "Array":
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


class _Worker:
    def __init__(self) -> None:
        self.session = self.module = self.vm = self.device = None

    def connect(self, address, timeout_s):
        from bitq_tvm.runtime.remote import open_session

        self.session = open_session(address, timeout_s)
        self.device = self.session.cpu()

    def upload(self, path, name):
        self.session.upload(path, name)

    def load_module(self, name):
        self.module = self.session.load_module(name)

    def create_vm(self):
        from tvm import relax

        self.vm = relax.VirtualMachine(self.module, self.device)

    def release(self):
        """End the session the orderly way: the C++ session ends with its last remote object."""
        import gc

        if self.vm is not None:
            self.vm.__dict__.clear()  # TVM's VirtualMachine sits in a reference cycle
        self.session = self.module = self.vm = self.device = None
        gc.collect()

    def _call(self, function, *args) -> list:
        self.vm.set_input(function, *args)
        self.vm.invoke_stateful(function)
        return _flatten(self.vm.get_outputs(function))

    def run(self, arrays):
        import tvm

        inputs = [tvm.runtime.tensor(x, device=self.device) for x in arrays]
        outputs = self._call("main", *inputs)
        return [output.numpy() for output in outputs]


def main() -> int:
    _die_with_parent()
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints (TVM's, ours) go to the log, not into the channel
    sys.stdout = sys.stderr
    worker = _Worker()
    _write_all(reply_fd, encode(("ok", "ready")))
    while True:
        request = read_message(0)
        if request is None or request[0] == "close":
            # Release the session (the parent kills this process if the device does not answer),
            # then exit without running the remaining C++ destructors.
            worker.release()
            if request is not None:
                _write_all(reply_fd, encode(("ok", None)))
            os._exit(0)
        op, args = request[0], request[1:]
        try:
            reply = ("ok", getattr(worker, op)(*args))
        except Exception as err:  # noqa: BLE001 - every failure goes back as one line
            from bitq_tvm.errors import BitqError

            reply = ("bitq_error" if isinstance(err, BitqError) else "error", _first_line(err))
        _write_all(reply_fd, encode(reply))


if __name__ == "__main__":
    sys.exit(main())
