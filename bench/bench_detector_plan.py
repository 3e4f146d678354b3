"""Planned vs uniform BFP on a real detector, judged by agreement with FP32 boxes, as deployed.

The planner runs without labels (accuracy term: relative output MSE) on calibration inputs made
for the detector (``bitq_tvm.models.detection_data``, seed 0). Besides the uniform allocations it
solves two matched points:

- ``planned at <uniform>'s loss``: least DM cost with predicted loss <= the uniform allocation's
  predicted loss (equal predicted accuracy: does it need fewer bytes?); ``fewest bytes``: the least
  deployed weight bytes with that loss (a bisection over the size budget, each step one MILP);
- ``planned at <uniform>'s bytes``: least predicted loss with deployed weight bytes <= the uniform
  allocation's (equal bytes: does it keep more boxes?).

Every allocation is compiled with ``compile_deployed`` and run on test inputs (seed 1); its boxes
are matched to ONNX Runtime FP32's (``models.detection.detection_agreement``), and its loss is
measured in the planner's unit (``evaluation.head_rel_mse`` over ``loss_view``'s heads). Prints a
markdown table and the command:

    python bench/bench_detector_plan.py --model yolov8n_nudenet --calib 32 --test 32
"""

import argparse
import shlex
import sys
import time

import numpy as np

from bench_detector_agreement import _session


def _fewest_bytes(problem, loss: float):
    """The allocation with the least deployed weight bytes whose predicted loss is <= ``loss``."""
    from bitq_tvm.solver.milp import solve

    lo, hi = problem.smallest_total("size_bytes"), None
    best = None
    for _ in range(40):
        mid = lo * 2 if hi is None else (lo + hi) / 2
        allocation = solve(problem, size_budget=mid)
        if allocation.acc_loss <= loss:
            hi, best = mid, allocation
        else:
            lo = mid
        if hi is not None and hi - lo <= 1e-3 * hi:
            break
    return best
from bitq_tvm.evaluation import head_rel_mse, stored_weight_bytes
from bitq_tvm.support.tables import print_table


def _heads(view, outputs):
    """One sample's model outputs as the accuracy term's heads (``loss_view``): YOLOv8's single
    ``[1, 4 + classes, anchors]`` split back into its Concat's inputs (axis 1)."""
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in view.proto.graph.output]
    if len(shapes) == len(outputs):
        return tuple(outputs)
    (out,) = outputs
    return tuple(np.split(out, np.cumsum([s[1] for s in shapes])[:-1], axis=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n_nudenet")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--uniforms", default="w8a8_b32,w6a8_b32,w4a8_b32",
                        help="uniform allocations to compare (the first and last get matched planned points)")
    parser.add_argument("--probe-levels", type=int, choices=(1, 2), default=1,
                        help="sensitivity probes per tensor (plan_model's probe_levels)")
    parser.add_argument("--loss-fractions", default="",
                        help="more fewest-bytes points at these fractions of the first uniform's predicted loss "
                             "(e.g. 0.5,0.25: where does a planned allocation reach its F1?)")
    args = parser.parse_args(argv)

    from bitq_tvm.deploy import compile_deployed
    from bitq_tvm.frontend.onnx_model import load_onnx, loss_view
    from bitq_tvm.models import corpus
    from bitq_tvm.models.detection import decode, detection_agreement
    from bitq_tvm.models.detection_data import detector_samples
    from bitq_tvm.solver.accuracy import Calibration
    from bitq_tvm.solver.planner import BYTES_PER_MB, Objective, allocation_plan, plan_model, solve_objective

    entry = corpus.get(args.model)
    if entry.detector is None:
        print(f"error: --model: corpus model '{args.model}' is not a detector", file=sys.stderr)
        return 2
    path = str(corpus.fetch(args.model))
    model = load_onnx(path, entry.input_shapes(1))
    calib = detector_samples(args.model, args.calib, seed=0)
    test = detector_samples(args.model, args.test, seed=1)
    hw = test.shape[2:]
    start = time.perf_counter()
    result = plan_model(model, Calibration({entry.input_name: calib}), Objective("lambda", 0.0), progress=None,
                        probe_levels=args.probe_levels)
    plan_seconds = time.perf_counter() - start
    uniforms = dict(result.uniforms)
    labels = [label for label in args.uniforms.split(",") if label in uniforms]
    if not labels:
        print(f"error: --uniforms: none of {args.uniforms} is a candidate (have {', '.join(uniforms)})", file=sys.stderr)
        return 2

    session = _session(path)
    fp32_out = [session.run(None, {entry.input_name: test[i:i + 1]}) for i in range(len(test))]
    fp32 = [d for o in fp32_out for d in decode(entry.detector, o, hw)]
    fp32_bytes = 4 * sum(layer.params for layer in model.layers)
    view = loss_view(model)

    best, cheapest = uniforms[labels[0]], uniforms[labels[-1]]
    points = [(f"uniform {label}", uniforms[label]) for label in labels]
    points.append((f"planned at uniform {labels[0]}'s loss",
                   solve_objective(result.problem, result.accuracy, Objective("budget", result.predicted(best)))))
    points.append((f"planned at uniform {labels[0]}'s loss, fewest bytes", _fewest_bytes(result.problem, best.acc_loss)))
    least_loss = result.problem.smallest_total("acc_loss")
    for fraction in (float(f) for f in args.loss_fractions.split(",") if f):
        if fraction * best.acc_loss < least_loss:
            print(f"--loss-fractions {fraction:g}: below the least achievable predicted loss "
                  f"({least_loss / best.acc_loss:.2f}x uniform {labels[0]}'s); skipped", file=sys.stderr)
            continue
        points.append((f"planned at {fraction:g}x uniform {labels[0]}'s loss, fewest bytes",
                       _fewest_bytes(result.problem, fraction * best.acc_loss)))
    points.append((f"planned at uniform {labels[-1]}'s bytes",
                   solve_objective(result.problem, result.accuracy,
                                   Objective("size_budget", cheapest.size_bytes / BYTES_PER_MB))))
    rows = [("fp32 (ONNX Runtime)", "-", f"{fp32_bytes:,}", "1.000x", f"{sum(len(d) for d in fp32)}",
             "-", "-", "-", "-", "-")]
    for name, allocation in points:
        deployed = compile_deployed(model, allocation_plan(result, allocation), progress=None)
        stored = stored_weight_bytes(deployed.report)
        out = [deployed.run({entry.input_name: test[i:i + 1]}) for i in range(len(test))]
        agreement = detection_agreement(fp32, [d for o in out for d in decode(entry.detector, o, hw)])
        mse = head_rel_mse([_heads(view, o) for o in out], [_heads(view, o) for o in fp32_out])
        rows.append((name, f"{len(deployed.report.integer_layers)}/{len(model.layers)}", f"{stored:,}",
                     f"{stored / fp32_bytes:.3f}x", f"{agreement['candidate']}", f"{agreement['f1']:.1%}",
                     f"{agreement['mean_iou']:.3f}", f"{agreement['score_drift']:.3f}",
                     f"{allocation.acc_loss:.2e}", f"{mse:.2e}"))
        print(f"{name}: done", file=sys.stderr)
    print(f"{args.model}, {args.calib} calibration inputs (seed 0), {args.test} test inputs (seed 1), "
          f"{args.probe_levels} probe level(s); "
          f"accuracy term and plan took {plan_seconds:.1f} s; least achievable predicted loss "
          f"{least_loss:.2e} ({least_loss / best.acc_loss:.2f}x uniform {labels[0]}'s)")
    print()
    print_table(["allocation", "integer layers", "deployed weight bytes", "vs FP32", "boxes", "F1 vs FP32",
                 "mean IoU (matched)", "score drift (matched)", "predicted loss", "measured loss"], rows)
    print()
    print("command: python bench/bench_detector_plan.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
