"""Performance term vs measured integer matmul kernels (issue 12, item 3).

    TVM_NUM_THREADS=2 python bench/bench_performance_term.py            # default, about 6-8 min
    TVM_NUM_THREADS=2 python bench/bench_performance_term.py --quick    # about 1 min

For the GEMMs of ResNet-18 and MobileNetV2 (zoo, 224x224) and the zoo transformer encoder, x the
formats m in {2, 4, 6, 8} x block in {16, 32, 64} that deployment runs as integer kernels
(:func:`bitq_tvm.kernels.contract.integer_support`; activation and weight in the same format),
the deployed matmul kernel (:func:`~bitq_tvm.kernels.bfp_matmul_variants.bfp_matmul_func`, AVX2
variant, compiled for ``znver3``) is timed on packed weights and quantized activations (median of
``--repeat`` time_evaluator repeats of >= 20 ms). Shapes are subsampled per model
(``--shapes-per-model``, spread over the model's MAC range, seeded).

Against the timings (per kernel call), Spearman rank correlation of:

* the old DM model: the generic tiled loop nest at the deployed bits per element with BitQ's
  energy constants (5 per on-chip byte x relative cost, 640 per DRAM byte, 5 per cycle), i.e.
  ``performance_term`` before issue 12 (reconstructed here);
* the new DM model: the kernel model's ``matmul`` stage
  (:func:`bitq_tvm.solver.dm_model.matmul_stage`), and its whole layer (quantizer, im2col, matmul,
  epilogue) per call, for information (the timings are of the matmul alone);
* the XGBoost latency regressor of :mod:`bitq_tvm.tuning.latency`, fitted on the timings of the
  other two models' tasks (shapes held out by model).

Each is reported per held-out model, pooled over all tasks, and as the mean within-shape Spearman
(how well it orders the formats of one GEMM shape). ``--save FILE`` keeps the timings (JSON),
``--load FILE`` recomputes the table from them without timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

MODELS = ("resnet18", "mobilenet_v2", "transformer")
MANTISSAS = (2, 4, 6, 8)
BLOCKS = (16, 32, 64)
TARGET = {"kind": "llvm", "mcpu": "znver3"}
VARIANT = "avx2"


def _models(image_size: int):
    from bitq_tvm.frontend.onnx_model import normalize
    from bitq_tvm.models import zoo

    return {"resnet18": normalize(zoo.resnet18(image_size=image_size), "resnet18"),
            "mobilenet_v2": normalize(zoo.mobilenet_v2(image_size=image_size), "mobilenet_v2"),
            "transformer": normalize(zoo.transformer_encoder(), "transformer")}


def collect_tasks(models, shapes_per_model: int, formats_per_shape: int, seed: int):
    """(model, layer, fmt, geometry) per distinct (M, N, Kp, format) of each model, subsampled."""
    from bitq_tvm.formats import BFPFormat
    from bitq_tvm.kernels.contract import gemm_geometry, integer_support

    rng = np.random.default_rng(seed)
    tasks = []
    for model_name, model in models.items():
        by_shape = {}
        for layer in model.layers:
            if layer.is_depthwise:  # the depthwise kernel, not a GEMM of this table
                continue
            for m in MANTISSAS:
                for block in BLOCKS:
                    fmt = BFPFormat(m, block)
                    if integer_support(layer.kind, layer.weight_shape, layer.groups, fmt, fmt) is not None:
                        continue
                    g = gemm_geometry(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape,
                                      block, layer.groups)
                    shape = (layer.kind, g.rows, g.n, g.k, g.groups, tuple(layer.weight_shape[2:]))
                    by_shape.setdefault(shape, {}).setdefault((m, block), (layer, fmt, g))
        shapes = sorted(by_shape, key=lambda s: s[1] * s[2] * s[3])
        if len(shapes) > shapes_per_model:  # spread over the MAC range
            keep = np.unique(np.round(np.linspace(0, len(shapes) - 1, shapes_per_model)).astype(int))
            shapes = [shapes[i] for i in keep]
        for shape in shapes:
            entries = sorted(by_shape[shape].values(), key=lambda e: (e[1].mantissa_bits, e[1].block_size))
            if len(entries) > formats_per_shape:
                entries = [entries[i] for i in sorted(rng.choice(len(entries), formats_per_shape, replace=False))]
            tasks.extend((model_name, *e) for e in entries)
    return tasks


def time_kernel(M: int, N: int, K: int, fmt, repeat: int) -> float:
    """Median seconds of one call of the deployed matmul kernel."""
    import tvm

    from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
    from bitq_tvm.kernels.oracle import quantize_activations_np
    from bitq_tvm.kernels.packing import pack_weights

    ex = tvm.compile(bfp_matmul_func(M, N, K, fmt, fmt, VARIANT), target=tvm.target.Target(TARGET))
    rng = np.random.default_rng(0)
    packed = pack_weights(rng.standard_normal((N, K)).astype(np.float32), fmt, "w")
    act = quantize_activations_np(rng.standard_normal((M, K)).astype(np.float32), fmt)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev) for x in (act["qa"], act["ea"], packed.qw, packed.ew)]
    args.append(tvm.runtime.tensor(np.zeros((M, N), np.float32), dev))
    timer = ex.mod.time_evaluator("bfp_matmul", dev, number=1, repeat=repeat, min_repeat_ms=20)
    return float(np.median(timer(*args).results))


def old_dm_cost(model, layer, fmt, preset) -> float:
    """performance_term's cost before issue 12, per call: generic loop nest, deployed bits, BitQ units."""
    from bitq_tvm.plan import LayerFormats
    from bitq_tvm.solver.deployment import deployed_cost
    from bitq_tvm.solver.dm_model import BITQ_ONCHIP_COST_PER_BYTE as ONCHIP, CacheLevel, MemoryHierarchy, layer_costs
    from bitq_tvm.solver.performance import conv_shape

    levels = []
    for cache in preset.caches:
        if not levels or cache.size_bytes > levels[-1].size_bytes:
            levels.append(CacheLevel(cache.name, cache.size_bytes, ONCHIP * cache.relative_cost))
    hierarchy = MemoryHierarchy(tuple(levels), dram_cost_per_byte=ONCHIP * preset.dram_cost)
    d = deployed_cost(layer, LayerFormats(fmt, fmt))
    cost = layer_costs(conv_shape(model, layer), [d.weight_bits], [d.activation_bits], [fmt.block_size], hierarchy,
                       macs_per_cycle=float(preset.int8_macs_per_cycle))[0]
    return cost.total / layer.groups


def new_dm_costs(layer, fmt, geometry, preset) -> tuple[float, float]:
    """(matmul stage of one call, whole layer per call) of the kernel model."""
    from bitq_tvm.solver.dm_model import kernel_layer_costs, matmul_stage
    from bitq_tvm.solver.performance import kernel_rates, memory_hierarchy

    hierarchy, rates = memory_hierarchy(preset), kernel_rates(preset)
    mm = matmul_stage(geometry, fmt, hierarchy, rates).total
    whole = kernel_layer_costs(layer.kind, layer.input_shape, layer.weight_shape, layer.output_shape, layer.groups,
                               [(fmt, fmt)], hierarchy, rates)[0].total / geometry.groups
    return mm, whole


def regressor_predictions(rows, preset, seed: int = 0) -> np.ndarray:
    """Per row, the XGBoost regressor's seconds, fitted on the other models' rows."""
    from bitq_tvm.formats import BFPFormat
    from bitq_tvm.tuning.latency import fit_regressor, task_features
    from bitq_tvm.tuning.tasks import BfpTask

    feats, macs = [], []
    for r in rows:
        fmt = BFPFormat(r["m"], r["block"])
        task = BfpTask(r["M"], r["N"], r["K"], fmt, fmt, VARIANT)
        feats.append(task_features(task, preset))
        macs.append(r["M"] * r["N"] * r["K"])
    feats, macs = np.array(feats), np.array(macs, float)
    seconds = np.array([r["seconds"] for r in rows])
    models = np.array([r["model"] for r in rows])
    out = np.full(len(rows), np.nan)
    for held in sorted(set(models)):
        train, test = models != held, models == held
        if train.sum() < 3:
            continue
        predict = fit_regressor(feats[train], seconds[train], macs[train], seed)
        out[test] = predict(feats[test], macs[test])
    return out


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def _within_shape(rows, key) -> float:
    values = []
    for shape in sorted({r["shape"] for r in rows}):
        sub = [r for r in rows if r["shape"] == shape]
        if len(sub) >= 3:
            rho = _spearman([r[key] for r in sub], [r["seconds"] for r in sub])
            if np.isfinite(rho):
                values.append(rho)
    return float(np.mean(values)) if values else float("nan")


def report(rows, preset) -> None:
    from bitq_tvm.support.tables import print_table

    regressor = regressor_predictions(rows, preset)
    for r, p in zip(rows, regressor):
        r["regressor"] = float(p)
    sources = [("old DM (generic nest, BitQ units)", "old_dm"), ("new DM (kernel model, matmul stage)", "new_dm"),
               ("new DM (whole layer, for information)", "new_dm_layer"),
               ("XGBoost regressor (trained on the other two models)", "regressor")]
    groups = [(name, [r for r in rows if r["model"] == name]) for name in MODELS]
    groups = [(name, sub) for name, sub in groups if sub]
    headers = ["source"] + [f"{name} ({len(sub)} kernels, {len({r['shape'] for r in sub})} shapes)"
                            for name, sub in groups] + ["pooled", "mean within-shape"]
    table = []
    for label, key in sources:
        cells = [f"{_spearman([r[key] for r in sub], [r['seconds'] for r in sub]):.3f}" for _, sub in groups]
        cells.append(f"{_spearman([r[key] for r in rows], [r['seconds'] for r in rows]):.3f}")
        cells.append(f"{_within_shape(rows, key):.3f}")
        table.append((label, *cells))
    print(f"\nSpearman rank correlation vs measured matmul latency ({len(rows)} kernels, "
          f"target {TARGET}, variant {VARIANT}):\n")
    print_table(headers, table)
    # how the formats of one shape compare, measured and modelled (relative to m=8, b=32)
    ratios = {}
    for r in rows:
        ref = next((x for x in rows if x["shape"] == r["shape"] and x["m"] == 8 and x["block"] == 32), None)
        if ref is not None:
            ratios.setdefault((r["m"], r["block"]), []).append(
                (r["seconds"] / ref["seconds"], r["new_dm"] / ref["new_dm"], r["old_dm"] / ref["old_dm"]))
    print("\nper format, median over shapes of time relative to m=8 b=32 (measured / new DM / old DM):\n")
    print_table(["format", "shapes", "measured", "new DM", "old DM"],
                [(f"m={m} b={b}", len(v), *(f"{np.median([x[i] for x in v]):.2f}" for i in range(3)))
                 for (m, b), v in sorted(ratios.items())])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 shapes x 4 formats per model")
    parser.add_argument("--shapes-per-model", type=int, default=12)
    parser.add_argument("--formats-per-shape", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="FILE")
    parser.add_argument("--load", metavar="FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes_per_model, args.formats_per_shape, args.repeat = 4, 4, 3

    from bitq_tvm.targets import host_preset

    preset = host_preset()
    if args.load:
        with open(args.load) as f:
            rows = json.load(f)
        for r in rows:
            r["shape"] = tuple(r["shape"])
    else:
        models = _models(args.image_size)
        tasks = collect_tasks(models, args.shapes_per_model, args.formats_per_shape, args.seed)
        print(f"{len(tasks)} kernels to time", flush=True)
        rows, started = [], time.perf_counter()
        for i, (model_name, layer, fmt, g) in enumerate(tasks):
            seconds = time_kernel(g.rows_padded, g.n, g.k_padded, fmt, args.repeat)
            new_mm, new_layer = new_dm_costs(layer, fmt, g, preset)
            rows.append(dict(model=model_name, layer=layer.name, shape=(g.rows_padded, g.n, g.k_padded),
                             M=g.rows_padded, N=g.n, K=g.k_padded, m=fmt.mantissa_bits, block=fmt.block_size,
                             seconds=seconds, old_dm=old_dm_cost(models[model_name], layer, fmt, preset),
                             new_dm=new_mm, new_dm_layer=new_layer))
            if (i + 1) % 20 == 0:
                print(f"  {i + 1}/{len(tasks)} timed, {time.perf_counter() - started:.0f} s", flush=True)
        if args.save:
            with open(args.save, "w") as f:
                json.dump(rows, f, indent=1)
    cmd = "python bench/bench_performance_term.py" + (" --quick" if args.quick else
                                                      f" --shapes-per-model {args.shapes_per_model}"
                                                      f" --formats-per-shape {args.formats_per_shape}")
    print(f"\ncommand: TVM_NUM_THREADS=2 {cmd} (image size {args.image_size}, repeat {args.repeat})")
    report(rows, preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
