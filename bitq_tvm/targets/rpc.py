"""Where a TVM RPC device is reached: one address type for RPC servers and trackers.

A device is an RPC server (``--rpc HOST:PORT``, optionally with the key it was started with) or
whatever device a tracker hands out for a key (``--tracker HOST:PORT --key K``). Talking to
them (sessions, probes, remote runs) is :mod:`bitq_tvm.runtime.remote`; tuning on tracker devices
is :mod:`bitq_tvm.tuning.remote`.
"""

from __future__ import annotations

import dataclasses

from bitq_tvm.errors import BitqError

__all__ = ["RpcAddress", "device_address", "parse_address"]


@dataclasses.dataclass(frozen=True)
class RpcAddress:
    """A ``host:port`` endpoint: an RPC server, or (``tracker=True``) a tracker and the device ``key``.

    A tracker address without a key names the tracker itself (where servers register); asking it
    for a device needs the key (checked where a device is requested).
    """

    host: str
    port: int
    key: str = ""
    tracker: bool = False

    def __post_init__(self) -> None:
        if not self.host:
            raise BitqError(f"{self.flag}: the host is empty (expected HOST:PORT)")
        if not 0 < self.port < 65536:
            raise BitqError(f"{self.flag} {self.host}:{self.port}: port must be in 1..65535")

    @property
    def flag(self) -> str:
        """The command-line option that gives such an address (``--rpc`` or ``--tracker``)."""
        return "--tracker" if self.tracker else "--rpc"

    @property
    def option(self) -> str:
        """The address as command-line options: ``--rpc H:P`` or ``--tracker H:P --key K``."""
        return f"--tracker {self} --key {self.key}" if self.tracker else f"{self.flag} {self}"

    def with_key(self, key: str) -> "RpcAddress":
        """The same endpoint with device key ``key``."""
        return dataclasses.replace(self, key=key)

    def require_key(self) -> "RpcAddress":
        """This address; BitqError for a tracker without the key of the devices to request."""
        if self.tracker and not self.key:
            raise BitqError("--tracker needs --key K: the key the devices registered with")
        return self

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(spec: str | RpcAddress, key: str | None = None, tracker: bool = False) -> RpcAddress:
    """``"host:port"`` (and a device key) -> :class:`RpcAddress`; errors name ``--rpc``/``--tracker``.

    An :class:`RpcAddress` is returned as is, with ``key`` if given (and as a tracker's if ``tracker``).
    """
    if isinstance(spec, RpcAddress):
        return dataclasses.replace(spec, key=key or spec.key, tracker=spec.tracker or tracker)
    option = "--tracker" if tracker else "--rpc"
    host, sep, port = str(spec).rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BitqError(f"{option} '{spec}': expected HOST:PORT, e.g. 127.0.0.1:{9190 if tracker else 9090}")
    return RpcAddress(host, int(port), key or "", tracker)


def device_address(rpc: str | RpcAddress | None = None, tracker: str | RpcAddress | None = None,
                   key: str | None = None) -> RpcAddress:
    """The device of ``--rpc HOST:PORT`` or of ``--tracker HOST:PORT --key K`` (exactly one)."""
    if (rpc is None) == (tracker is None):
        raise BitqError("give exactly one of --rpc HOST:PORT or --tracker HOST:PORT")
    if rpc is not None:
        return parse_address(rpc, key)
    return parse_address(tracker, key, tracker=True).require_key()
