"""The ``bitq-tvm`` command: inspect, plan, tune, compile, eval, demo, zoo, targets, emulator.

One module per command (``add_command(subparsers)`` registers it, its ``run(args)`` runs it) and
:mod:`.args` for what several share. The package only parses arguments, calls the library and
prints; nothing in the library imports it.

User errors (:class:`~bitq_tvm.errors.BitqError`) print one line ``bitq-tvm: error: ...`` and
exit with status 2; nothing is written half-way (outputs are written to a temporary file and
renamed).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import BitqError
from . import compile as compile_command
from . import corpus, demo, emulator, inspect, plan, targets, tune, zoo
from . import eval as eval_command
from .args import EXIT_USER_ERROR

__all__ = ["build_parser", "main", "EXIT_USER_ERROR"]

# `bitq-tvm --help` lists the commands in this order.
_COMMANDS = (inspect, compile_command, plan, eval_command, demo, zoo, corpus, targets, emulator, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitq-tvm", description="Block-floating-point DNN inference with TVM (BitQ).")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BitqError as err:
        print(f"bitq-tvm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bitq-tvm: interrupted", file=sys.stderr)
        return 130
