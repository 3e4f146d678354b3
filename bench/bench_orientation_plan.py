"""Planned vs uniform BFP on a real task: pplcnet_orientation on rendered, rotated text pages.

Calibration and test pages come from :func:`bitq_tvm.models.orientation_data.orientation_samples`
(different seeds). The planner runs with labels (budget in top-1 points); every allocation is
compiled with ``compile_deployed`` (integer kernels on this host, fallbacks as reported) and run on
the test pages. Prints a markdown table and the command:

    python bench/bench_orientation_plan.py --calib 64 --test 128 --budgets 0.005,0.01,0.02

The accuracy term is measured once; each further budget re-solves the same problem. Output MSEs
compare logits (the model's Softmax input, as the accuracy term does).
"""

import argparse
import shlex
import sys
import time

import numpy as np

from bitq_tvm.evaluation import rel_mse, stored_weight_bytes
from bitq_tvm.support.tables import print_table


def _outputs(compiled, x):
    return np.concatenate([compiled.run({"x": x[i:i + 1]})[0] for i in range(len(x))])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--budgets", default="0.005,0.01,0.02", help="top-1 drop budgets (fractions), comma separated")
    parser.add_argument("--uniforms", default="w8a8_b32,w4a8_b32,w4a8_b16")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from bitq_tvm.deploy import compile_deployed
    from bitq_tvm.frontend.onnx_model import load_onnx, loss_view
    from bitq_tvm.models.corpus import fetch
    from bitq_tvm.models.orientation_data import orientation_samples
    from bitq_tvm.solver.accuracy import Calibration
    from bitq_tvm.solver.planner import Objective, allocation_plan, plan_model, solve_objective

    path = str(fetch("pplcnet_orientation"))
    model = loss_view(load_onnx(path, {"x": (1, 3, 224, 224)}))
    budgets = sorted(float(b) for b in args.budgets.split(","))
    xc, yc = orientation_samples(args.calib, seed=0)
    xt, yt = orientation_samples(args.test, seed=1)
    start = time.perf_counter()
    result = plan_model(model, Calibration({"x": xc}, yc), Objective("budget", budgets[0]), progress=None)
    plan_seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fp32_out = np.concatenate([session.run(None, {"x": xt[i:i + 1]})[0] for i in range(len(xt))])
    fp32_pred = fp32_out.argmax(1)
    fp32_top1 = float((fp32_pred == yt).mean())
    fp32_bytes = 4 * sum(layer.params for layer in model.layers)

    rows = [("fp32 (ONNX Runtime)", "-", "-", f"{fp32_bytes:,}", "1.000x", f"{fp32_top1:.2%}", "-", "-", "-", "-", "-")]
    points = [(f"planned (budget {budgets[0]:.2%})", result.allocation)]
    points += [(f"planned (budget {b:.2%})", solve_objective(result.problem, result.accuracy, Objective("budget", b)))
               for b in budgets[1:]]
    uniforms = dict(result.uniforms)
    points += [(f"uniform {label}", uniforms[label]) for label in args.uniforms.split(",") if label in uniforms]
    for name, allocation in points:
        plan = allocation_plan(result, allocation)
        deployed = compile_deployed(model, plan, progress=None)
        stored = stored_weight_bytes(deployed.report)
        out = _outputs(deployed, xt)
        predicted = out.argmax(1)
        top1 = float((predicted == yt).mean())
        rows.append((name, f"{len(deployed.report.integer_layers)}/{len(model.layers)}",
                     f"{allocation.size_bytes:,.0f}", f"{stored:,}",
                     f"{stored / fp32_bytes:.3f}x", f"{top1:.2%}", f"{(predicted == fp32_pred).mean():.2%}",
                     f"{result.predicted(allocation):.2%}", f"{fp32_top1 - top1:.2%}",
                     f"{allocation.acc_loss:.2e}", f"{rel_mse([out], [fp32_out]):.2e}"))
        print(f"{name}: done", file=sys.stderr)
    curve = ", ".join(f"{m:.2e}->{d:.2%}" for m, d in result.accuracy.measured_curve)
    print(f"measured calibration curve (relative logit MSE -> top-1 drop): {curve}")
    print(f"pplcnet_orientation, {args.calib} calibration pages (seed 0), {args.test} test pages (seed 1); "
          f"accuracy term and plan took {plan_seconds:.1f} s")
    print()
    print_table(["allocation", "integer layers", "predicted weight bytes", "deployed weight bytes", "vs FP32",
                 "top-1 (test)", "agrees w/ FP32", "predicted top-1 drop", "measured top-1 drop",
                 "predicted rel. logit MSE", "measured rel. logit MSE"], rows)
    print()
    print("command: python bench/bench_orientation_plan.py " + shlex.join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
