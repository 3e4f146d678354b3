"""``bitq-tvm emulator setup|serve``: an emulated aarch64 device (qemu-aarch64 + TVM runtime).

``setup`` builds (or finds) the cached aarch64 rootfs; ``serve`` runs an emulated aarch64 TVM RPC
server until Ctrl-C, optionally registered with a tracker.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import BitqError
from ..support.progress import say


def _say(message: str) -> None:
    say(message, file=sys.stdout)  # the emulator's progress is the command's output


DEFAULT_EMULATED_TARGET = "cortex-a76"
# How `emulator serve` waits between checks of its server; tests replace it to simulate Ctrl-C.
_pause = time.sleep


def add_command(subparsers) -> None:
    emulator = subparsers.add_parser("emulator", help="an emulated aarch64 device (qemu-aarch64 + TVM runtime)")
    actions = emulator.add_subparsers(dest="emulator_command", required=True)

    setup = actions.add_parser("setup", help="download and unpack the aarch64 rootfs (cached; about 450 MB)")
    _add_common(setup)
    setup.set_defaults(func=run_setup)

    serve = actions.add_parser("serve", help="run an emulated aarch64 TVM RPC server until Ctrl-C")
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on (default 9090)")
    serve.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    serve.add_argument("--key", metavar="K", help="device key to register under (with --tracker)")
    serve.set_defaults(func=run_serve)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_EMULATED_TARGET,
                        help=f"aarch64 target preset to emulate (default {DEFAULT_EMULATED_TARGET})")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="where the rootfs lives (default ~/.cache/bitq-tvm/aarch64-rootfs)")


def _emulated_preset(name: str):
    from ..targets.presets import get_target

    preset = get_target(name)
    if preset.triple != "aarch64-linux-gnu":
        raise BitqError(
            f"--target {name}: only aarch64 targets can be emulated with a TVM runtime (there is no "
            f"TVM runtime for {preset.triple}); its kernels run under qemu with the C runner instead"
        )
    return preset


def run_setup(args: argparse.Namespace) -> int:
    """``bitq-tvm emulator setup``: build (or find) the cached aarch64 rootfs and describe it."""
    from ..targets.rootfs import ensure_aarch64_rootfs, rootfs_size_bytes

    preset = _emulated_preset(args.target)
    start = time.perf_counter()
    rootfs = ensure_aarch64_rootfs(args.cache_dir, progress=_say)
    print(f"aarch64 rootfs for {preset.name}: {rootfs} ({rootfs_size_bytes(rootfs) / 2**20:.0f} MiB, "
          f"ready in {time.perf_counter() - start:.1f} s)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``bitq-tvm emulator serve``: an emulated aarch64 RPC server, until Ctrl-C."""
    from ..runtime.remote import start_rpc_server
    from ..targets.rootfs import ensure_aarch64_rootfs

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
