"""Weight-bound batch-1 layers: BFP weights resident in their stored format vs TVM FP32 and ORT.

Usage: python bench/bench_weight_bound.py [--quick] [--repeat 20] [--ms 1,4,16] [--mantissas 2,4,6,8]
                                          [--layers 6] [--threads 2] [--workdir DIR]

Prints three markdown tables and the command that printed them:

1. **Physical limits.** Memory read and copy bandwidth of this machine, measured by TVM-compiled
   PrimFuncs (a parallel, vectorised float32 sum with 8 independent accumulators per thread, and
   a parallel vectorised copy) over 512 MiB arrays (16x the 32 MB L3), 2 threads and 1 thread;
   then a raw read of exactly the stored weight bytes of each BFP model below (the bytes a
   weight-bound model has to stream, repeated call after call as the model is): that is the
   bound the model rows are compared with. Copy counts read + written bytes (STREAM convention;
   with write-allocate the memory moves 1.5x that).
2. **Weight-bound layers.** ONNX models of MatMul nodes with random N(0, 1/K) weights
   (``onnx.helper``), N = K = 4096: a stack of ``--layers`` MatMuls (the 6-layer default stores
   402 MB FP32, 104 MB BFP8, 53 MB BFP4: beyond the 32 MB L3) and a single MatMul (its BFP
   weights fit the L3; its FP32 weights do not), at M = 1, 4, 16 rows. Contenders:
   ``compile_deployed(load_onnx(path), plan, "host")`` with weights bfp{m}_b32 and activations
   bfp8_b32 (integer kernels reading the stored weights), TVM FP32 (``compile_model`` without a
   plan), ONNX Runtime FP32 and ONNX Runtime int8 (``quantize_dynamic``: int8 per-tensor weights,
   uint8 activations quantized at run time, MatMulInteger; the models are MatMul-only, so dynamic
   quantization is ORT's usual choice for them). Each contender runs in its own process (all M
   of one model in that process, one after another), TVM with ``TVM_NUM_THREADS``, ORT with
   ``intra_op_num_threads`` = ``--threads`` and intra-op spinning off. Best and median of
   ``--repeat`` calls after 2 warm-up calls. Effective bandwidth = stored weight bytes / best
   time (BFP: the artifact's constants; FP32: 4 B per weight; ORT int8: 1 B per weight), and
   as % of the measured 2-thread 512 MiB read bandwidth. Every TVM row is checked: relative L2
   error of its output against TVM FP32, and (BFP rows) against the NumPy BFP oracle
   (``formats.reference.fake_quantize_np`` of each layer's activation and weight, float64
   products), which a kernel that skips work cannot match.
3. **Resident memory.** The exported 6-layer ``.so`` loaded in a fresh process
   (``tvm.runtime.load_module`` + ``relax.VirtualMachine``), ``/proc/self/status`` VmRSS,
   RssAnon and RssFile before the load, after it, after creating the VM and after the first
   inference, and VmHWM (peak); the growth is compared with the stored weight bytes.

``--workdir DIR`` keeps the models and libraries there and reuses the ones already built (a
second run then skips the builds); by default everything lives in a temporary directory.
``--quick``: M = 1 only, mantissas 4 and 8, 10 calls (about 2 minutes). The default run takes
about 8 minutes on the 2-core Zen 3 machine, 4-5 of them building (``load_onnx`` of the 403 MB
stack takes 20-30 s per M, the FP32 library's export 10-15 s); with ``--workdir`` a second run
skips the builds (about 3.5 minutes).

A fourth table times the stack at M = 1 with one thread (``TVM_NUM_THREADS=1``, raw read on one
thread): a 2-thread kernel is as slow as its slower thread, so a process busy on the other core
doubles a 2-thread time, while one thread measures the kernel's own rate per core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

N = K = 4096
BLOCK = 32
ACTIVATION = "bfp8_b32"
WEIGHT_SEED = 0
BANDWIDTH_BYTES = 512 << 20
STREAMS = 8
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
ORT_INT8 = "ORT int8 (dynamic)"
MODELS = ("stack", "single")


# ---------------------------------------------------------------- shared helpers


def _weights(layers: int):
    """The weights [K, N] of layer i, N(0, 1/K): activations keep their scale through the stack."""
    for i in range(layers):
        rng = np.random.default_rng(WEIGHT_SEED + i)
        w = rng.standard_normal((K, N), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(K))
        yield w


def _input(m: int) -> np.ndarray:
    return np.random.default_rng(1000 + m).standard_normal((m, K), dtype=np.float32)


def _weight_spec(mantissa: int) -> str:
    return f"bfp{mantissa}_b{BLOCK}"


def _time(fn, repeat: int, min_seconds: float = 0.0) -> tuple[float, float]:
    """(best, median) seconds of at least ``repeat`` calls (more, up to 20x, until ``min_seconds``) after two
    warm-up calls."""
    return _time_interleaved([fn], repeat, min_seconds)[0]


def _time_interleaved(fns, repeat: int, min_seconds: float = 0.0) -> list[tuple[float, float]]:
    """(best, median) seconds of each of ``fns``, called in turn (both see the same moments of a shared
    machine) at least ``repeat`` times and until ``min_seconds`` have passed (at most 20 x ``repeat``),
    after 2 warm-up rounds."""
    for _ in range(2):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    start_all = time.perf_counter()
    while len(times[0]) < repeat or (time.perf_counter() - start_all < min_seconds and len(times[0]) < 20 * repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [(min(ts), float(np.median(ts))) for ts in times]


def _status() -> dict[str, int]:
    """Bytes of the memory fields of /proc/self/status."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def _write_json(path: str, data) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _tvm_target():
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


# ---------------------------------------------------------------- worker: bandwidth


def _read_func(bw_elems: int, bw_chunks: int, bw_streams: int = STREAMS):
    """B[c, s, a, v] = sum of stream s of chunk c of A; chunks in parallel, each thread reading
    ``bw_streams`` interleaved sub-ranges (one stream per thread leaves bandwidth unused here),
    2 accumulators x 8 lanes per stream."""
    from tvm.script import tirx as T

    bw_lanes = 8
    bw_per = bw_elems // bw_chunks
    bw_sub = bw_per // bw_streams
    bw_steps = bw_sub // (bw_lanes * 2)

    @T.prim_func(s_tir=True)
    def read(A: T.Buffer((bw_elems,), "float32"), B: T.Buffer((bw_chunks, bw_streams, 2, bw_lanes), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for p in T.parallel(bw_chunks):
            for s in T.unroll(bw_streams):
                for a in T.unroll(2):
                    for v in T.vectorized(bw_lanes):
                        with T.sblock("init"):
                            vp, vs, va, vv = T.axis.remap("SSSS", [p, s, a, v])
                            B[vp, vs, va, vv] = T.float32(0)
            for i in range(bw_steps):
                for s in T.unroll(bw_streams):
                    for a in T.unroll(2):
                        for v in T.vectorized(bw_lanes):
                            with T.sblock("acc"):
                                vp, vi, vs, va, vv = T.axis.remap("SSSSS", [p, i, s, a, v])
                                B[vp, vs, va, vv] = B[vp, vs, va, vv] + A[
                                    vp * bw_per + vs * bw_sub + vi * (bw_lanes * 2) + va * bw_lanes + vv]

    return read


def _copy_func(bw_elems: int, bw_chunks: int, bw_streams: int = STREAMS):
    from tvm.script import tirx as T

    bw_lanes = 16
    bw_per = bw_elems // bw_chunks
    bw_sub = bw_per // bw_streams
    bw_steps = bw_sub // bw_lanes

    @T.prim_func(s_tir=True)
    def copy(A: T.Buffer((bw_elems,), "float32"), B: T.Buffer((bw_elems,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for p in T.parallel(bw_chunks):
            for i in range(bw_steps):
                for s in T.unroll(bw_streams):
                    for v in T.vectorized(bw_lanes):
                        with T.sblock("copy"):
                            vp, vi, vs, vv = T.axis.remap("SSSS", [p, i, s, v])
                            B[vp * bw_per + vs * bw_sub + vi * bw_lanes + vv] = A[
                                vp * bw_per + vs * bw_sub + vi * bw_lanes + vv]

    return copy


class RawRead:
    """A compiled read of ``nbytes`` (rounded down to whole vectors) with ``chunks`` threads."""

    def __init__(self, nbytes: int, chunks: int, streams: int = STREAMS):
        import tvm

        unit = chunks * streams * 16
        self.elems = max(unit, nbytes // 4 // unit * unit)
        self.nbytes = self.elems * 4
        self.fn = tvm.compile(_read_func(self.elems, chunks, streams), _tvm_target())["main"]
        self.a = tvm.runtime.tensor(np.ones(self.elems, np.float32))
        self.b = tvm.runtime.tensor(np.zeros((chunks, streams, 2, 8), np.float32))

    def __call__(self):
        self.fn(self.a, self.b)

    def check(self):
        total = float(self.b.numpy().sum())
        if total != self.elems:  # every element read once (ones: exact in float32 up to 2^24 per lane)
            raise SystemExit(f"read kernel summed {total}, expected {self.elems}")


def worker_bandwidth(job: dict) -> dict:
    import tvm

    threads, repeat = job["threads"], job["repeat"]
    rows = []

    def read_row(label, nbytes, chunks, streams=STREAMS):
        read = RawRead(nbytes, chunks, streams)
        best, median = _time(read, repeat)
        read.check()
        rows.append({"label": label, "bytes": read.nbytes, "threads": chunks, "best_gbs": read.nbytes / best / 1e9,
                     "median_gbs": read.nbytes / median / 1e9})
        del read

    read_row(f"read, 512 MiB, {STREAMS} streams per thread", BANDWIDTH_BYTES, threads)
    if job.get("only_read"):
        return {"rows": rows}
    unit = threads * STREAMS * 16
    big = BANDWIDTH_BYTES // 4 // unit * unit
    fn = tvm.compile(_copy_func(big, threads), _tvm_target())["main"]
    src = tvm.runtime.tensor(np.arange(big, dtype=np.float32))
    dst = tvm.runtime.tensor(np.zeros(big, np.float32))
    best, median = _time(lambda: fn(src, dst), max(3, repeat // 2))
    if not np.array_equal(dst.numpy()[::4099], np.arange(big, dtype=np.float32)[::4099]):
        raise SystemExit("copy kernel wrote wrong values")
    del src, dst
    rows.append({"label": f"copy, 512 MiB -> 512 MiB, {STREAMS} streams per thread (read + write bytes)",
                 "bytes": 2 * big * 4, "threads": threads,
                 "best_gbs": 2 * big * 4 / best / 1e9, "median_gbs": 2 * big * 4 / median / 1e9})
    read_row("read, 512 MiB, 1 stream per thread", BANDWIDTH_BYTES, threads, 1)
    if threads > 1:
        read_row(f"read, 512 MiB, {STREAMS} streams", BANDWIDTH_BYTES, 1)
    for label, nbytes in job["same_bytes"]:
        read_row(f"read of the {label} stored weight bytes", nbytes, threads)
    return {"rows": rows}


# ---------------------------------------------------------------- worker: build


def _model_path(workdir: str, model: str, layers: int) -> str:
    return os.path.join(workdir, f"{model}{layers if model == 'stack' else 1}.onnx")


def _write_onnx(path: str, layers: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    for i, w in enumerate(_weights(layers)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"fc{i}"))
        prev = out
    graph = helper.make_graph(nodes, "weight_bound", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path + ".tmp")
    os.replace(path + ".tmp", path)


def _plan(mantissa: int):
    from bitq_tvm.formats import parse_format
    from bitq_tvm.plan import LayerFormats, Plan

    return Plan(default=LayerFormats(parse_format(_weight_spec(mantissa)), parse_format(ACTIVATION)))


def worker_build(job: dict) -> dict:
    """The ONNX files, ORT's int8 model and one exported library per (M, contender)."""
    from bitq_tvm.api import compile_model
    from bitq_tvm.deploy import compile_deployed
    from bitq_tvm.frontend.onnx_model import load_onnx

    workdir, model_name, layers = job["workdir"], job["model"], job["layers"]
    path = _model_path(workdir, model_name, layers)
    info = {"onnx": path, "libs": {}}
    start = time.perf_counter()
    if not os.path.exists(path):
        _write_onnx(path, layers)
    int8_path = path.replace(".onnx", ".int8.onnx")
    if not os.path.exists(int8_path):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(path, int8_path + ".tmp.onnx", weight_type=QuantType.QInt8)
        os.replace(int8_path + ".tmp.onnx", int8_path)
    info["int8_onnx"] = int8_path
    info["onnx_seconds"] = time.perf_counter() - start
    for m in job["ms"]:
        wanted = {"fp32": None, **{_weight_spec(w): w for w in job["mantissas"]}}
        libs = {label: os.path.join(workdir, f"{model_name}{layers}_M{m}_{label}.so") for label in wanted}
        meta_path = os.path.join(workdir, f"{model_name}{layers}_M{m}.json")
        meta = _read_json(meta_path) if os.path.exists(meta_path) else {}
        todo = [label for label in wanted if label not in meta or not os.path.exists(libs[label])]
        if todo:
            start = time.perf_counter()
            model = load_onnx(path, {"x": (m, K)})
            load_seconds = time.perf_counter() - start
            for label in todo:
                start = time.perf_counter()
                if wanted[label] is None:
                    compiled = compile_model(model, None, progress=None)
                    entry = {"stored_bytes": 4 * N * K * layers, "note": "FP32 weights"}
                else:
                    compiled = compile_deployed(model, _plan(wanted[label]), "host", progress=None)
                    report = compiled.report
                    entry = {"stored_bytes": report.artifact_constant_bytes,
                             "layer_stored_bytes": sum(d.stored_bytes for d in report.layers),
                             "note": f"{len(report.integer_layers)}/{len(report.layers)} integer ({report.variant})",
                             "integer_layers": len(report.integer_layers)}
                entry["compile_seconds"] = time.perf_counter() - start
                entry["load_onnx_seconds"] = load_seconds
                start = time.perf_counter()
                compiled.export_library(libs[label])
                entry["export_seconds"] = time.perf_counter() - start
                entry["so_bytes"] = os.path.getsize(libs[label])
                del compiled
                meta[label] = entry
                _write_json(meta_path, meta)
            del model
        info["libs"][str(m)] = {label: {**meta[label], "path": libs[label]} for label in wanted}
    return info


# ---------------------------------------------------------------- workers: timing


def worker_tvm(job: dict) -> dict:
    """Each M: the model's main, interleaved call by call with a raw read of its stored weight bytes."""
    import tvm
    from tvm import relax

    out = {}
    for m, lib_path in job["libs"].items():
        lib = tvm.runtime.load_module(lib_path)
        vm = relax.VirtualMachine(lib, tvm.cpu())
        fn = vm["main"]
        x = tvm.runtime.tensor(_input(int(m)))
        read = RawRead(job["bytes"][m], job["threads"])
        (best, median), (read_best, read_median) = _time_interleaved([lambda: fn(x), read], job["repeat"], job["min_seconds"])
        read.check()
        np.save(job["outputs"][m], fn(x).numpy())
        out[m] = {"best": best, "median": median, "read_best": read_best * job["bytes"][m] / read.nbytes,
                  "read_median": read_median * job["bytes"][m] / read.nbytes}
        del fn, vm, lib, read
    return out


def worker_ort(job: dict) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(job["onnx"], options, providers=["CPUExecutionProvider"])
    out = {}
    for m in job["ms"]:
        feed = {"x": _input(int(m))}
        best, median = _time(lambda: session.run(None, feed), job["repeat"], job["min_seconds"])
        np.save(job["outputs"][str(m)], session.run(None, feed)[0])
        out[str(m)] = {"best": best, "median": median}
    return out


def worker_resident(job: dict) -> dict:
    import tvm
    from tvm import relax

    from bitq_tvm.runtime.library import release_library_blob

    x = tvm.runtime.tensor(_input(1))
    steps = [("before load", _status())]
    lib = tvm.runtime.load_module(job["lib"])
    steps.append(("after load_module", _status()))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    steps.append(("after VirtualMachine", _status()))
    vm["main"](x).numpy()
    steps.append(("after 1st inference", _status()))
    for _ in range(5):
        y = vm["main"](x).numpy()
    steps.append(("after 6 inferences", _status()))
    # The weights were copied out of the library's data blob into tensors at load time; the blob's
    # pages of the mapped .so stay resident (RssFile) until bitq_tvm.runtime.library releases them
    # (what load_library does right after loading).
    size = release_library_blob(job["lib"])
    if size <= 0:
        raise SystemExit("releasing the library blob's pages failed")
    steps.append(("after release_library_blob (madvise DONTNEED)", _status()))
    same = np.array_equal(vm["main"](x).numpy(), y)
    steps.append(("after one more inference", _status()))
    return {"steps": steps, "blob_bytes": size, "same_output_after_madvise": bool(same)}


WORKERS = {"bandwidth": worker_bandwidth, "build": worker_build, "tvm": worker_tvm, "ort": worker_ort,
           "resident": worker_resident}


def _run_worker(kind: str, job: dict, workdir: str, threads: int, tag: str):
    job_path = os.path.join(workdir, f"job_{tag}.json")
    out_path = os.path.join(workdir, f"out_{tag}.json")
    _write_json(job_path, job)
    env = dict(os.environ, TVM_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, "--job", job_path,
                           "--out", out_path], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"worker {kind} ({tag}) failed with exit code {proc.returncode}")
    print(f"  [{tag}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    return _read_json(out_path)


# ---------------------------------------------------------------- correctness


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _oracles(layers: int, ms, mantissas) -> dict:
    """(layers, M, mantissa) -> the NumPy BFP oracle's output; mantissa None: float64 FP32 reference."""
    from bitq_tvm.formats import parse_format
    from bitq_tvm.formats.reference import fake_quantize_np

    act = parse_format(ACTIVATION)
    depths = sorted({1, layers})
    hs = {(m, w): _input(m).astype(np.float64) for m in ms for w in (None, *mantissas)}
    out = {}
    for i, weight in enumerate(_weights(layers)):
        quantized = {w: fake_quantize_np(weight, parse_format(_weight_spec(w)), axis=0).astype(np.float64)
                     for w in mantissas}
        quantized[None] = weight.astype(np.float64)
        for (m, w), h in hs.items():
            a = h if w is None else fake_quantize_np(h.astype(np.float32), act, axis=-1).astype(np.float64)
            hs[(m, w)] = a @ quantized[w]
        if i + 1 in depths:
            for (m, w), h in hs.items():
                out[(i + 1, m, w)] = h.astype(np.float32)
    return out


# ---------------------------------------------------------------- tables


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _physical_table(bw: dict) -> str:
    lines = ["| measurement | bytes per call | threads | best GB/s | median GB/s |", "|---|---:|---:|---:|---:|"]
    for row in bw["rows"]:
        lines.append(f"| {row['label']} | {_fmt_bytes(row['bytes'])} | {row['threads']} | {row['best_gbs']:.1f} | "
                     f"{row['median_gbs']:.1f} |")
    return "\n".join(lines)


def _layer_table(rows: list[dict], read_gbs: float) -> str:
    lines = ["| M | contender | stored weight bytes | best ms | median ms | vs bfp8 | vs TVM FP32 | eff. GB/s | "
             "% of read BW | raw read of the same bytes, ms | vs raw read | rel. err vs FP32 | "
             "rel. err vs BFP oracle | note |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        gbs = r["bytes"] / r["best"] / 1e9
        raw = "-" if r.get("read_best") is None else f"{r['read_best'] * 1e3:.2f}"
        vs_raw = "-" if r.get("read_best") is None else f"{r['best'] / r['read_best']:.2f}x"
        lines.append(
            f"| {r['m']} | {r['label']} | {_fmt_bytes(r['bytes'])} | {r['best'] * 1e3:.2f} | {r['median'] * 1e3:.2f} | "
            f"{r['vs_bfp8']} | {r['vs_fp32']} | {gbs:.1f} | {100 * gbs / read_gbs:.0f}% | {raw} | {vs_raw} | "
            f"{r['err_fp32']} | {r['err_oracle']} | {r['note']} |")
    return "\n".join(lines)


def _growth(r: dict, step: str, key: str = "VmRSS") -> int:
    steps = dict((name, status) for name, status in r["steps"])
    return steps[step][key] - steps["before load"][key]


def _resident_table(rows: list[dict]) -> str:
    lines = ["| weights | stored weight bytes | .so file | RSS before load | growth after load_module | after VM | "
             "after 1st inference | of which RssAnon | of which RssFile | peak growth (VmHWM) | "
             "RSS growth / stored | after madvise of the blob pages | / stored |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = dict((name, status) for name, status in r["steps"])["before load"]
        first = _growth(r, "after 1st inference")
        dropped = _growth(r, "after one more inference")
        lines.append(
            f"| {r['label']} | {_fmt_bytes(r['stored'])} | {_fmt_bytes(r['so_bytes'])} | {_fmt_bytes(base['VmRSS'])} | "
            f"{_fmt_bytes(_growth(r, 'after load_module'))} | {_fmt_bytes(_growth(r, 'after VirtualMachine'))} | "
            f"{_fmt_bytes(first)} | {_fmt_bytes(_growth(r, 'after 1st inference', 'RssAnon'))} | "
            f"{_fmt_bytes(_growth(r, 'after 1st inference', 'RssFile'))} | "
            f"{_fmt_bytes(_growth(r, 'after 1st inference', 'VmHWM'))} | {first / r['stored']:.2f}x | "
            f"{_fmt_bytes(dropped)} | {dropped / r['stored']:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M = 1 only, mantissas 4 and 8, 10 calls")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per contender and M (default 20)")
    parser.add_argument("--ms", default=None, help="rows M (default 1,4,16)")
    parser.add_argument("--mantissas", default=None, help="weight mantissa bits (default 2,4,6,8; 8 is required)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="keep calling each (contender, M) until this long has passed, up to 20x --repeat "
                             "(default 1.5; --quick 0.5)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep (and reuse) models and libraries here")
    parser.add_argument("--skip-single", action="store_true", help="the stack only")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _write_json(args.out, WORKERS[args.worker](_read_json(args.job)))
        return 0

    repeat = args.repeat or (10 if args.quick else 20)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.5 if args.quick else 1.5)
    ms = [int(v) for v in (args.ms or ("1" if args.quick else "1,4,16")).split(",")]
    mantissas = [int(v) for v in (args.mantissas or ("4,8" if args.quick else "2,4,6,8")).split(",")]
    if 8 not in mantissas:
        mantissas.append(8)
    mantissas.sort(reverse=True)
    models = ("stack",) if args.skip_single else MODELS
    print(f"command: python bench/bench_weight_bound.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"load average at start: {_loadavg()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        os.makedirs(workdir, exist_ok=True)
        layer_counts = {"stack": args.layers, "single": 1}
        builds = {name: _run_worker("build", {"workdir": workdir, "model": name, "layers": layer_counts[name],
                                              "ms": ms, "mantissas": mantissas}, workdir, args.threads, f"build_{name}")
                  for name in models}

        bw = _run_worker("bandwidth", {"threads": args.threads, "repeat": 10, "same_bytes": []}, workdir,
                         args.threads, "bandwidth")

        timings, outputs = {}, {}
        for name in models:
            libs = builds[name]["libs"]
            for label in [_weight_spec(w) for w in mantissas] + ["fp32"]:
                outs = {str(m): os.path.join(workdir, f"y_{name}_M{m}_{label}.npy") for m in ms}
                timings[(name, label)] = _run_worker(
                    "tvm", {"libs": {str(m): libs[str(m)][label]["path"] for m in ms}, "repeat": repeat,
                            "bytes": {str(m): libs[str(m)][label]["stored_bytes"] for m in ms},
                            "threads": args.threads, "min_seconds": min_seconds, "outputs": outs}, workdir,
                    args.threads, f"time_{name}_{label}")
                outputs[(name, label)] = outs
            for label, path in (("ORT FP32", builds[name]["onnx"]), (ORT_INT8, builds[name]["int8_onnx"])):
                tag = "ort_" + label.split()[1].lower()
                outs = {str(m): os.path.join(workdir, f"y_{name}_M{m}_{tag}.npy") for m in ms}
                timings[(name, label)] = _run_worker(
                    "ort", {"onnx": path, "ms": ms, "threads": args.threads, "repeat": repeat, "min_seconds": min_seconds,
                            "outputs": outs},
                    workdir, args.threads, f"time_{name}_{tag}")
                outputs[(name, label)] = outs

        # one core: the kernel's own throughput vs what one core can read (less exposed to a busy neighbour core)
        one_thread = {}
        for label in [_weight_spec(w) for w in mantissas]:
            lib = builds["stack"]["libs"][str(ms[0])][label]
            one_thread[label] = _run_worker(
                "tvm", {"libs": {str(ms[0]): lib["path"]}, "repeat": repeat, "bytes": {str(ms[0]): lib["stored_bytes"]},
                        "threads": 1, "min_seconds": min_seconds,
                        "outputs": {str(ms[0]): os.path.join(workdir, f"y1_{label}.npy")}},
                workdir, 1, f"time1_stack_{label}")[str(ms[0])]

        resident = []
        for label in [_weight_spec(w) for w in (8, 4, 2) if w in mantissas]:
            lib = builds["stack"]["libs"][str(ms[0])][label]
            r = _run_worker("resident", {"lib": lib["path"]}, workdir, args.threads, f"resident_{label}")
            resident.append({"label": label, "stored": lib["stored_bytes"], "so_bytes": lib["so_bytes"], **r})
        bw_end = _run_worker("bandwidth", {"threads": args.threads, "repeat": 10, "same_bytes": [], "only_read": True},
                             workdir, args.threads, "bandwidth_end")
        load_end = _loadavg()
        read_gbs = max(bw["rows"][0]["best_gbs"], bw_end["rows"][0]["best_gbs"])

        start = time.perf_counter()
        oracles = _oracles(args.layers if "stack" in models else 1, ms, mantissas)
        oracle_seconds = time.perf_counter() - start

        import tvm

        print(f"\nmachine: {os.cpu_count()} cores, LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}; "
              f"{args.threads} threads; N = K = {K}; activations {ACTIVATION}; {repeat} timed calls after 2 warm-up "
              f"calls; load average at the end {load_end}\n")
        print("### Physical limits\n")
        end_row = dict(bw_end["rows"][0], label=bw_end["rows"][0]["label"] + " (again, at the end of the run)")
        print(_physical_table({"rows": bw["rows"] + [end_row]}))
        print(f"\nread bandwidth used below for '% of read BW': {read_gbs:.1f} GB/s (the better 512 MiB read)")
        summary = {}
        for name in models:
            layers = layer_counts[name]
            fp32_bytes = 4 * N * K * layers
            table_rows = []
            for m in ms:
                libs = builds[name]["libs"][str(m)]
                bfp8 = timings[(name, _weight_spec(8))][str(m)]["best"]
                fp32 = timings[(name, "fp32")][str(m)]["best"]
                ref = np.load(outputs[(name, "fp32")][str(m)])
                exact = oracles[(layers, m, None)]
                for label in [_weight_spec(w) for w in mantissas] + ["fp32", "ORT FP32", ORT_INT8]:
                    t = timings[(name, label)][str(m)]
                    y = np.load(outputs[(name, label)][str(m)])
                    if label in libs:
                        nbytes, note = libs[label]["stored_bytes"], libs[label]["note"]
                    else:
                        nbytes, note = (fp32_bytes, "") if label == "ORT FP32" else (fp32_bytes // 4, "int8 weights")
                    err_oracle = "-"
                    if label == "fp32":
                        err_fp32 = f"{_rel(y, exact):.1e} (vs float64)"
                    else:
                        err_fp32 = f"{_rel(y, ref):.1e}"
                        if label.startswith("bfp"):
                            err = _rel(y, oracles[(layers, m, _mantissa(label))])
                            err_oracle = "0 (bit-exact)" if err == 0 else f"{err:.1e}"
                    display = "TVM FP32" if label == "fp32" else (
                        f"BFP w{_mantissa(label)}a8_b{BLOCK}" if label.startswith("bfp") else label)
                    table_rows.append({"m": m, "label": display, "bytes": nbytes, "best": t["best"],
                                       "median": t["median"], "read_best": t.get("read_best"),
                                       "vs_bfp8": f"{t['best'] / bfp8:.2f}x", "vs_fp32": f"{t['best'] / fp32:.3f}x",
                                       "err_fp32": err_fp32, "err_oracle": err_oracle, "note": note})
                    summary[(name, m, label)] = (t["best"], nbytes, t.get("read_best"))
            title = (f"{layers} x MatMul {K}x{N}, one chain" if name == "stack" else f"one MatMul {K}x{N}") + \
                f", {_fmt_bytes(fp32_bytes)} FP32 weights"
            print(f"\n### Weight-bound layers: {title}\n")
            print(_layer_table(table_rows, read_gbs))
        print(f"\n### One thread: the {args.layers}-layer stack, M = {ms[0]}, TVM_NUM_THREADS=1\n")
        lines = ["| weights | stored weight bytes | best ms | median ms | raw read of the same bytes, 1 thread, ms | "
                 "vs raw read | eff. GB/s | weights per ns |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, t in one_thread.items():
            nbytes = builds["stack"]["libs"][str(ms[0])][label]["stored_bytes"]
            lines.append(f"| {label} | {_fmt_bytes(nbytes)} | {t['best'] * 1e3:.2f} | {t['median'] * 1e3:.2f} | "
                         f"{t['read_best'] * 1e3:.2f} | {t['best'] / t['read_best']:.2f}x | "
                         f"{nbytes / t['best'] / 1e9:.1f} | {args.layers * N * K / t['best'] / 1e9:.1f} |")
        print("\n".join(lines))
        print(f"\n### Resident memory: the exported {args.layers}-layer library (M = {ms[0]}) in a fresh process\n")
        print(_resident_table(resident))
        same = all(r["same_output_after_madvise"] for r in resident)
        print(f"\n(madvise: the pages wholly inside the library's data blob `__tvm_ffi__library_bin`; the next "
              f"inference gave {'the same' if same else 'A DIFFERENT'} output)")

        print("\n### Goals (issue 12)\n")
        m0 = ms[0]
        goals = []
        b8 = summary[("stack", m0, _weight_spec(8))]
        if 4 in mantissas:
            b4 = summary[("stack", m0, _weight_spec(4))]
            goals.append(f"bfp4 / bfp8 latency, {args.layers}-layer stack, M = {m0}: {b4[0] / b8[0]:.2f}x (goal <= 0.6x): "
                         f"{'met' if b4[0] / b8[0] <= 0.6 else 'not met'}; a raw read of the same bytes: "
                         f"{b4[2] / b8[2]:.2f}x")
        r = b8[0] / summary[("stack", m0, "fp32")][0]
        goals.append(f"bfp8 / TVM FP32, stack, M = {m0}: {r:.3f}x (goal <= 0.35x): {'met' if r <= 0.35 else 'not met'}"
                     f"; bfp8 / ORT FP32: {b8[0] / summary[('stack', m0, 'ORT FP32')][0]:.3f}x")
        for w in (8, 4):
            if w in mantissas:
                best, nbytes, read_best = summary[("stack", m0, _weight_spec(w))]
                share = nbytes / best / 1e9 / read_gbs
                goals.append(f"effective bandwidth bfp{w}, stack, M = {m0}: {nbytes / best / 1e9:.1f} GB/s = "
                             f"{100 * share:.0f}% of {read_gbs:.1f} GB/s (goal >= 70%): "
                             f"{'met' if share >= 0.7 else 'not met'}; {100 * read_best / best:.0f}% of a raw read of "
                             "the same bytes interleaved with it")
        for r in resident:
            growth = _growth(r, "after 1st inference")
            anon = _growth(r, "after 1st inference", "RssAnon")
            released = _growth(r, "after one more inference")
            goals.append(f"resident {r['label']}, loaded with bitq_tvm.runtime.load_library (blob pages released): "
                         f"{released / r['stored']:.2f}x stored (goal <= 1.1x): "
                         f"{'met' if released <= 1.1 * r['stored'] else 'not met'}; plain tvm.runtime.load_module "
                         f"{growth / r['stored']:.2f}x (RssAnon alone {anon / r['stored']:.2f}x: the rest is the "
                         "library's file pages)")
        print("\n".join(f"- {g}" for g in goals))
        print(f"\n(oracle {oracle_seconds:.0f} s; whole run {time.perf_counter() - started:.0f} s)")
    return 0


def _mantissa(label: str) -> int:
    return int(label[3:label.index("_")])


if __name__ == "__main__":
    raise SystemExit(main())
