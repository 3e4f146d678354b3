"""BitQ's claim, measured: optimised per-layer allocation vs uniform BFP.

For each uniform baseline U the planner solves, on the same measured accuracy and DM terms:

* ``plan @ size(U)``: least predicted loss with layer weights no larger than U's (same average
  weight bits);
* ``plan @ loss(U)``: least DM cost with predicted loss no larger than U's (equal accuracy);

and every allocation is compiled with TVM and run on held-out data: measured top-1 (or agreement
with FP32 argmax for the synthetic model), relative logit MSE, and the DM model's DRAM traffic.
Calibration and evaluation data are disjoint.

    python bench/bench_bitq_claim.py [--models digits,resnet18] [--target host]
"""

import argparse
import shlex
import sys

import numpy as np

from bitq_tvm.frontend.onnx_model import load_onnx, normalize
from bitq_tvm.models.zoo import bundled_model_path, bundled_test_data, resnet18, synthetic_inputs
from bitq_tvm.solver.accuracy import Calibration, NoiseGraph
from bitq_tvm.solver.milp import solve
from bitq_tvm.solver.planner import Objective, allocation_plan, plan_model, verify
from bitq_tvm.support.tables import print_table

BASELINES = ("w4a8_b32", "w5a8_b32", "w6a8_b32")


def digits():
    data = bundled_test_data()
    model = load_onnx(bundled_model_path())
    return model, Calibration({"input": data["calib"]}), Calibration({"input": data["x"]}, data["y"])


def resnet(image_size=32, calib_n=32, eval_n=128):
    model = normalize(resnet18(num_classes=100, image_size=image_size), "resnet18")
    calib = Calibration(synthetic_inputs(model.proto, calib_n, seed=1))
    x = synthetic_inputs(model.proto, eval_n, seed=2)
    graph = NoiseGraph(model)
    labels = np.array([graph.run({"input": x["input"][i:i + 1]})[0].argmax() for i in range(eval_n)])
    return model, calib, Calibration(x, labels)


def run(name, model, calib, evaluation, target, rows):
    result = plan_model(model, calib, Objective("lambda", 0.1), target, progress=None)
    uniforms = dict(result.uniforms)
    problem = result.problem
    for base in BASELINES:
        u = uniforms[base]
        variants = [(f"uniform {base}", u),
                    (f"plan @ size({base})", solve(problem, size_budget=u.size_bytes)),
                    (f"plan @ loss({base})", solve(problem, acc_budget=u.acc_loss))]
        for label, alloc in variants:
            check = verify(model, allocation_plan(result, alloc), evaluation, target=target,
                           predicted_mse=alloc.acc_loss, progress=None)
            rows.append((name, label, f"{result.average_weight_bits(alloc):.2f}", f"{alloc.acc_loss:.2e}",
                         f"{check.measured_logit_mse:.2e}", f"{check.top1_plan * 100:.2f}%",
                         f"{check.agreement * 100:.2f}%", f"{result.dram_bytes(alloc):,.0f}",
                         f"{result.dram_bytes(alloc) / result.dram_bytes(u):.2f}"))
        print(f"[bench] {name} {base} done", file=sys.stderr, flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--target", default="host")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        model, calib, evaluation = digits() if name == "digits" else resnet()
        run(name, model, calib, evaluation, args.target, rows)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("top-1: digits against real labels (450 held-out images, FP32 98.44%); resnet18 (random weights, "
          "32x32, 100 classes, synthetic N(0,1) inputs) against FP32 argmax on 128 held-out inputs. "
          "Calibration: digits 64 training images, resnet18 32 other synthetic inputs.")
    print_table(["model", "allocation", "weight bits/param", "pred. logit MSE", "meas. logit MSE", "top-1",
                  "agrees w/ FP32", "DRAM bytes (DM)", "DRAM vs uniform"], rows)


if __name__ == "__main__":
    main()
