"""Arguments, loaders and messages the ``bitq-tvm`` commands share.

- ``add_*_args`` add an option group to a command's parser: the model (``model``,
  ``--input-shape``), its formats (``--format``/``--plan``, ``--target``), the planner's objective
  and calibration, a remote device (``--rpc``/``--tracker``/``--key``/``--rpc-timeout``);
- :func:`load_model`, :func:`load_plan` and :func:`remote_runner` turn parsed options into library
  objects; :func:`say` prints a ``[bitq-tvm] ...`` progress line.
"""

from __future__ import annotations

import argparse
import os

from ..errors import BitqError
from ..formats import PRESETS

#: Exit status of a user error (BitqError): one line ``bitq-tvm: error: ...`` on stderr.
EXIT_USER_ERROR = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``model`` and ``--input-shape``."""
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin an input's shape (repeat per input; NAME: may be left out for a single input)")


def add_target_arg(p: argparse.ArgumentParser, help: str = "target preset (see `bitq-tvm targets`); default: host"):
    p.add_argument("--target", default="host", help=help)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """``--format`` or ``--plan``, and ``--target``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--format", metavar="FORMAT",
                   help=f"one BFP format for every layer: {', '.join(PRESETS)}, any bfp{{m}}_b{{B}}[_e{{E}}] or fp32")
    g.add_argument("--plan", metavar="PLAN.json", help="per-layer formats (a plan file from `bitq-tvm plan`)")
    add_target_arg(p)


def add_planning_args(p: argparse.ArgumentParser, objective_required: bool) -> None:
    """The planner's calibration data, objective, candidates, pins, ties and tuning database."""
    p.add_argument("--calib", metavar="DATA.npz", help="calibration data: an array per model input "
                   "(single input: its name, else 'calib', else 'x')")
    p.add_argument("--calib-key", metavar="KEY", help="array of --calib to use for a single-input model")
    p.add_argument("--labels", metavar="KEY", help="integer label array in --calib: the budget unit becomes the "
                   "top-1 drop (fraction) instead of the relative logit MSE")
    g = p.add_mutually_exclusive_group(required=objective_required)
    g.add_argument("--budget", metavar="LOSS", help="least perf with predicted loss <= LOSS (e.g. 0.5%%: top-1 "
                   "points with --labels, else relative logit MSE)")
    g.add_argument("--lambda", dest="lam", type=float, metavar="L",
                   help="BitQ's weighted objective: loss + L * perf / perf_max")
    g.add_argument("--size-budget", type=float, metavar="MB", help="least loss with layer weights <= MB * 10^6 bytes")
    p.add_argument("--candidates", metavar="SPEC", help="candidate grid, e.g. 'w=4,5,6,8;a=6,8;b=16,32,64;e=8' "
                   "(default); keys left out keep their defaults")
    p.add_argument("--pin", action="append", metavar="NAME=SPEC", help="fix a layer ('first'/'last' allowed): "
                   "fp32, a format, WEIGHT,ACT formats, a label like w8a8_b32, or a candidate grid")
    p.add_argument("--tie", action="append", metavar="A,B,...", help="layers that must take the same candidate")
    p.add_argument("--probe-levels", type=int, choices=(1, 2), default=1,
                   help="sensitivity probes per tensor: 1 at its noisiest candidate (default), 2 also at its "
                   "quietest, interpolated between (one level over-predicts 8-bit losses; two take twice as long)")
    p.add_argument("--tuning-db", metavar="DIR", help="a `bitq-tvm tune` work dir: measured (and regressed) kernel "
                   "latencies replace the data-movement model in the performance term; compile --deploy also "
                   "uses its verified tuned kernels")


def add_remote_args(parser: argparse.ArgumentParser) -> None:
    """The options that run a command's compiled model on a remote device."""
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


def wants_bfp(args) -> bool:
    """Whether the command quantizes (so a model without BFP layers makes its result meaningless)."""
    return getattr(args, "command", None) in ("plan", "eval") or getattr(args, "plan", None) is not None \
        or getattr(args, "format", None) is not None or getattr(args, "deploy", False)


def load_model(args, input_shapes=None):
    """The model of ``args.model`` (shapes: ``--input-shape``, or ``input_shapes``); refused early
    when the command quantizes and the model has no BFP layer."""
    from ..frontend.onnx_model import load_onnx, parse_input_shapes

    model = load_onnx(args.model, parse_input_shapes(args.input_shape) if input_shapes is None else input_shapes)
    if wants_bfp(args):
        model.require_layers()
    return model


def load_plan(args):
    """The :class:`~bitq_tvm.plan.Plan` of ``--plan`` or ``--format``, or None when neither is given."""
    from ..plan import Plan

    if getattr(args, "plan", None) is not None:
        return Plan.load(args.plan)
    if getattr(args, "format", None) is not None:
        if not args.format.strip():
            raise BitqError("--format '': empty; give a format such as bfp8_b32, or fp32")
        return Plan.uniform(args.format)
    return None


def default_library(args) -> str:
    """``-o``, else MODEL.so in the working directory."""
    return args.output or os.path.splitext(os.path.basename(args.model))[0] + ".so"


def remote_runner(args: argparse.Namespace, compiled):
    """A :class:`~bitq_tvm.runtime.remote.RemoteModel` of ``compiled`` when ``--rpc``/``--tracker`` is given, else None.

    The model is exported for its target (cross compiled), uploaded and loaded by a worker
    process that holds the RPC session; the result has ``run``/``run_batched`` like the compiled
    model itself, and every remote step is bounded by ``--rpc-timeout``.
    """
    from ..runtime.remote import RemoteModel
    from ..targets.rpc import device_address

    if not getattr(args, "rpc", None) and not getattr(args, "tracker", None):
        if getattr(args, "key", None):
            raise BitqError("--key is only meaningful with --tracker HOST:PORT (or --rpc)")
        return None
    if args.rpc_timeout <= 0:
        raise BitqError(f"--rpc-timeout {args.rpc_timeout:g}: must be > 0 seconds")
    device = device_address(args.rpc, args.tracker, args.key)
    return RemoteModel(device, compiled, call_timeout_s=args.rpc_timeout, connect_timeout_s=args.rpc_timeout)
