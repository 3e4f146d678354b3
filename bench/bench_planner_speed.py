"""Time `plan_model` (accuracy term + performance term + MILP) on real and zoo models.

Prints a markdown table and the command that produced it:

    python bench/bench_planner_speed.py --models pplcnet_orientation,mobilenet_v2,resnet18 --samples 64

Zoo models are built at ``--zoo-size`` pixels (random He weights, synthetic inputs); the corpus
model runs at its 224x224 input with uniform random images in [-1, 1] (the planner's speed does not
depend on the pixel values). Unlabelled calibration, BitQ's weighted objective (``--lambda``,
default 1), so that every layer is measured (a budget can stop early as infeasible).
"""

import argparse
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import onnx

from bitq_tvm.support.tables import print_table


def _model(name, size, samples, tmp):
    from bitq_tvm.frontend.onnx_model import load_onnx
    from bitq_tvm.models import zoo

    if name in ("resnet18", "mobilenet_v2"):
        proto = getattr(zoo, name)(num_classes=100, image_size=size)
        path = os.path.join(tmp, f"{name}.onnx")
        onnx.save(proto, path)
        x = zoo.synthetic_inputs(proto, samples, seed=0)
        return load_onnx(path), x, f"{size}x{size}"
    from bitq_tvm.models.corpus import fetch

    path = str(fetch(name))
    shape = (1, 3, 224, 224)
    x = {"x": np.random.default_rng(0).uniform(-1, 1, (samples, *shape[1:])).astype(np.float32)}
    return load_onnx(path, {"x": shape}), x, "224x224"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="pplcnet_orientation,mobilenet_v2,resnet18")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--zoo-size", type=int, default=64)
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0)
    args = parser.parse_args(argv)

    from bitq_tvm.solver.accuracy import Calibration
    from bitq_tvm.solver.planner import Objective, plan_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, x, size = _model(name, args.zoo_size, args.samples, tmp)
            calib = Calibration(x)
            lines = []
            start = time.perf_counter()
            result = plan_model(model, calib, Objective("lambda", args.lam), progress=lines.append)
            seconds = time.perf_counter() - start
            measured = sum(1 for n in result.candidates.values() if any(not c.is_fp32 for c in n))
            rows.append((name, size, len(model.layers), measured, args.samples, f"{seconds:.1f}",
                         f"{result.allocation.size_bytes:,.0f}"))
            print(f"{name}: {seconds:.1f} s", file=sys.stderr)
    print_table(["model", "input", "layers", "layers measured (BFP candidates)", "samples", "plan time (s)",
                 "planned weight bytes"], rows)
    print()
    print("command: python bench/bench_planner_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
