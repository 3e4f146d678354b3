"""Command-line pieces for remote devices, wired into :mod:`bitq_tvm.cli`.

- :func:`add_remote_args` adds ``--rpc``/``--tracker``/``--key``/``--rpc-timeout`` to a command;
  :func:`remote_runner` turns them into a :class:`~bitq_tvm.runtime.remote.RemoteModel` (or None
  when the command runs on the host).
- :func:`add_emulator_command` adds ``bitq-tvm emulator setup|serve``: build the cached aarch64
  rootfs, and serve an emulated aarch64 device over TVM RPC (optionally through a tracker).
"""

from __future__ import annotations

import argparse
import time

from bitq_tvm.errors import BitqError

DEFAULT_EMULATED_TARGET = "cortex-a76"
# How `emulator serve` waits between checks of its server; tests replace it to simulate Ctrl-C.
_pause = time.sleep


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    """Add the options that run a command's compiled model on a remote device."""
    group = parser.add_argument_group("remote device (TVM RPC)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--rpc", metavar="HOST:PORT",
                       help="run on the device whose RPC server listens there (python -m tvm.exec.rpc_server)")
    where.add_argument("--tracker", metavar="HOST:PORT",
                       help="run on a device of --key handed out by this RPC tracker")
    group.add_argument("--key", metavar="K", help="device key registered with the tracker")
    group.add_argument("--rpc-timeout", metavar="S", type=float, default=60.0,
                       help="seconds each remote step may take: getting a session, the upload, load_module, "
                       "each run (default 60)")


def remote_runner(args: argparse.Namespace, compiled):
    """A :class:`~bitq_tvm.runtime.remote.RemoteModel` of ``compiled`` when ``--rpc``/``--tracker`` is given, else None.

    The model is exported for its target (cross compiled), uploaded and loaded by a worker
    process that holds the RPC session; the result has ``run``/``run_batched`` like the compiled
    model itself, and every remote step is bounded by ``--rpc-timeout``.
    """
    from bitq_tvm.runtime.remote import RemoteModel
    from bitq_tvm.targets.rpc import device_address

    if not getattr(args, "rpc", None) and not getattr(args, "tracker", None):
        if getattr(args, "key", None):
            raise BitqError("--key is only meaningful with --tracker HOST:PORT (or --rpc)")
        return None
    if args.rpc_timeout <= 0:
        raise BitqError(f"--rpc-timeout {args.rpc_timeout:g}: must be > 0 seconds")
    device = device_address(args.rpc, args.tracker, args.key)
    return RemoteModel(device, compiled, call_timeout_s=args.rpc_timeout, connect_timeout_s=args.rpc_timeout)


def add_emulator_command(subparsers) -> None:
    """Add ``emulator setup`` and ``emulator serve`` to the ``bitq-tvm`` subcommands."""
    emulator = subparsers.add_parser("emulator", help="an emulated aarch64 device (qemu-aarch64 + TVM runtime)")
    actions = emulator.add_subparsers(dest="emulator_command", required=True)

    setup = actions.add_parser("setup", help="download and unpack the aarch64 rootfs (cached; about 450 MB)")
    _add_common(setup)
    setup.set_defaults(func=cmd_emulator_setup)

    serve = actions.add_parser("serve", help="run an emulated aarch64 TVM RPC server until Ctrl-C")
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on (default 9090)")
    serve.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    serve.add_argument("--key", metavar="K", help="device key to register under (with --tracker)")
    serve.set_defaults(func=cmd_emulator_serve)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_EMULATED_TARGET,
                        help=f"aarch64 target preset to emulate (default {DEFAULT_EMULATED_TARGET})")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the rootfs lives (default ~/.cache/bitq-tvm/aarch64-rootfs)")


def _emulated_preset(name: str):
    from bitq_tvm.targets.presets import get_target

    preset = get_target(name)
    if preset.triple != "aarch64-linux-gnu":
        raise BitqError(
            f"--target {name}: only aarch64 targets can be emulated with a TVM runtime (there is no "
            f"TVM runtime for {preset.triple}); its kernels run under qemu with the C runner instead"
        )
    return preset


def cmd_emulator_setup(args: argparse.Namespace) -> int:
    """``bitq-tvm emulator setup``: build (or find) the cached aarch64 rootfs and describe it."""
    from bitq_tvm.targets.rootfs import ensure_aarch64_rootfs, rootfs_size_bytes

    preset = _emulated_preset(args.target)
    start = time.perf_counter()
    rootfs = ensure_aarch64_rootfs(args.cache_dir, progress=_say)
    print(f"aarch64 rootfs for {preset.name}: {rootfs} ({rootfs_size_bytes(rootfs) / 2**20:.0f} MiB, "
          f"ready in {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_emulator_serve(args: argparse.Namespace) -> int:
    """``bitq-tvm emulator serve``: an emulated aarch64 RPC server, until Ctrl-C."""
    from bitq_tvm.runtime.remote import start_rpc_server
    from bitq_tvm.targets.rootfs import ensure_aarch64_rootfs

    preset = _emulated_preset(args.target)
    if args.key and not args.tracker:
        raise BitqError("--key needs --tracker HOST:PORT (the tracker the key is registered with)")
    rootfs = ensure_aarch64_rootfs(args.cache_dir, progress=_say)
    server = start_rpc_server(preset, host=args.host, port=args.port, tracker=args.tracker,
                              key=args.key or "", rootfs_dir=rootfs)
    with server:
        via = f", registered with tracker {args.tracker} under key '{args.key}'" if args.tracker else ""
        print(f"serving {preset.name} (qemu-aarch64) on {server.address}{via}; log: {server.log_path}; "
              "Ctrl-C stops", flush=True)
        try:
            while server.process.poll() is None:
                _pause(0.5)
        except KeyboardInterrupt:
            return 0
        raise BitqError(f"the emulated RPC server exited with status {server.process.returncode}: "
                        f"{server.log_tail()}")


def _say(message: str) -> None:
    print(f"[bitq-tvm] {message}", flush=True)
