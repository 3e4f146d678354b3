"""Where deployed time goes: every PrimFunc of a deployed model timed alone, sorted by share.

Usage: python bench/bench_kernel_breakdown.py [--models mobilenet_v2,pplcnet_orientation,picodet_layout]
                                              [--format bfp8_b32] [--repeat 20] [--threads 2] [--top 15]

The model is lowered by the deploy pipeline (:func:`bitq_tvm.pipeline.pipeline`, the passes
``compile --deploy`` runs, before VM code generation); each PrimFunc of the result is built on its
own for the host and timed with ``time_evaluator`` on random arguments of its real buffer shapes
(TVM 0.27 has no VM profiler). Time per inference = median per call x the number of call sites in
the Relax functions. Kinds come from the kernel names: ``bfp_matmul*`` fused or plain integer
GEMM/conv, ``bfp_depthwise*``, ``bfp_*quant*`` leftover quantizers, the rest FP32 (stem conv,
pooling, FC, layout transforms, im2col/padding). The sum is a lower bound on the end-to-end time
(no VM dispatch, warm caches).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np

import tvm
from tvm import relax, tirx

sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
from bench_end_to_end import _model  # noqa: E402

from bitq_tvm.api import resolve_plan  # noqa: E402
from bitq_tvm.frontend.relax_import import import_relax  # noqa: E402
from bitq_tvm.pipeline import pipeline  # noqa: E402
from bitq_tvm.plan import Plan  # noqa: E402
from bitq_tvm.targets.presets import get_target  # noqa: E402


def kind_of(name: str, func: tirx.PrimFunc) -> str:
    """A coarse kind of a deployed PrimFunc, from its name (our kernels) or its blocks (TVM's)."""
    # our kernel names end in the variant (GEMM) or dilation (depthwise) unless an epilogue is fused
    if name.startswith("bfp_matmul"):
        return "BFP GEMM/conv" + ("" if re.search(r"_(vnni|avx2|generic|sdot|neon|rvv|scalar)$", name) else " fused")
    if name.startswith("bfp_depthwise"):
        return "BFP depthwise" + ("" if re.search(r"_d\d+x\d+$", name) else " fused")
    if name.startswith(("bfp_aq", "bfp_fq", "bfp_wq")) or "quant" in name:
        return "BFP quantizer"
    if name.startswith("bfp_im2col"):
        return "BFP im2col"
    if "transpose" in name or "layout" in name or "reshape" in name:
        return "FP32 layout"
    if "conv" in name:
        return "FP32 conv"
    if "pool" in name or "mean" in name:
        return "FP32 pool"
    if "matmul" in name or "dense" in name:
        return "FP32 FC"
    if "pad" in name or "im2col" in name:
        return "FP32 pad/im2col"
    return "FP32 other"


def call_counts(mod: tvm.IRModule) -> dict[str, int]:
    """PrimFunc name -> number of call sites in the module's Relax functions (after VM lowering
    a call prints as ``name(args)``, before it as ``cls.name``)."""
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    text = "\n".join(f.script(show_meta=False) for _gv, f in mod.functions_items() if isinstance(f, relax.Function))
    return {name: len(re.findall(rf"(?<![A-Za-z0-9_]){re.escape(name)}\(", text)) for name in names}


def buffer_params(func: tirx.PrimFunc) -> list[tuple[tuple[int, ...], str]] | None:
    """(shape, dtype) of each buffer parameter of ``func``, or None when one is not static.

    TVM 0.27's Python PrimFunc exposes no buffer map; its TVMScript signature has the buffers.
    """
    header = func.script(show_meta=False).split("@T.prim_func", 1)[1].split("):\n", 1)[0]
    header = re.sub(r"T\.int(?:32|64)\((\d+)\)", r"\1", header)
    found = re.findall(r"T\.Buffer\(\(([^)]*)\),\s*\"(\w+)\"\)", header)
    if len(found) != len(func.params):
        return None
    out = []
    for dims, dtype in found:
        try:
            out.append((tuple(int(d) for d in dims.split(",") if d.strip()), dtype))
        except ValueError:
            return None
    return out


def random_args(func: tirx.PrimFunc, dev, rng):
    """Random tensors of ``func``'s buffer shapes, or None when a shape is not static."""
    params = buffer_params(func)
    if params is None:
        return None
    args = []
    for shape, dtype in params:
        if dtype.startswith("float"):
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            value = rng.integers(0, 2, shape).astype(dtype)
        else:  # mantissas, exponents, indices: small values keep exponents in range
            value = rng.integers(0, 4, shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, dev))
    return args


def breakdown(model, fmt: str, repeat: int):
    """Rows (name, kind, calls, ms per call, ms per inference) of the deployed ``model``, sorted."""
    preset = get_target("host")
    target = preset.tvm_target()
    formats = resolve_plan(model, Plan.uniform(fmt))
    mod, params = import_relax(model)
    with tvm.transform.PassContext(opt_level=3):
        lowered = pipeline(formats, preset, deploy=True, params=params)(mod)
    counts = call_counts(lowered)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        calls = counts.get(name, 0)
        if calls == 0:
            continue
        args = random_args(func, dev, rng)
        if args is None:
            skipped.append(name)
            continue
        lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
        timer = lib.mod.time_evaluator(name, dev, number=5, repeat=repeat, min_repeat_ms=20)
        ms = float(np.median(timer(*args).results)) * 1e3
        rows.append((name, kind_of(name, func), calls, ms, ms * calls))
    rows.sort(key=lambda r: -r[4])
    return rows, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,pplcnet_orientation,picodet_layout")
    parser.add_argument("--format", default="bfp8_b32")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"command: python bench/bench_kernel_breakdown.py {' '.join(argv)}")
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            model = _model(name, workdir)[0]
            rows, skipped = breakdown(model, args.format, args.repeat)
            total = sum(r[4] for r in rows)
            print(f"\n### {name} {args.format} ({len(rows)} PrimFuncs, sum {total:.2f} ms per inference, "
                  f"{args.threads} threads)\n")
            by_kind: dict[str, list] = {}
            for r in rows:
                entry = by_kind.setdefault(r[1], [0, 0, 0.0])
                entry[0] += 1
                entry[1] += r[2]
                entry[2] += r[4]
            print("| kind | PrimFuncs | calls | ms per inference | share |")
            print("|---|---|---|---|---|")
            for kind, (n, calls, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][2]):
                print(f"| {kind} | {n} | {calls} | {ms:.3f} | {ms / total:.1%} |")
            print(f"\ntop {args.top} PrimFuncs:\n")
            print("| PrimFunc | kind | calls | ms per call | ms per inference | share |")
            print("|---|---|---|---|---|---|")
            for fname, kind, calls, ms, total_ms in rows[:args.top]:
                print(f"| {fname} | {kind} | {calls} | {ms:.4f} | {total_ms:.3f} | {total_ms / total:.1%} |")
            if skipped:
                print(f"\nnot timed (dynamic shapes): {', '.join(skipped)}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
