"""A window-blocked stem's activation side: float32 im2col then the quantizer (two kernels, the
deployment before session 12) against the one fused kernel (``window_act_quant_func``).

Usage: TVM_NUM_THREADS=2 python bench/bench_stem_quant.py {two_kernels,fused} [--shape 1,3,320,320]
       [--format bfp8_b32] [--repeat 20]
Run each contender in its own process; the outputs of both are checked equal by
``tests/passes/test_lower_bfp_integer.py::test_window_act_quant_is_the_im2col_rows_quantized``.
Default geometry: YOLOv8n's stem (3 -> 16 channels, 3x3, stride 2, pad 1) at 320x320.
"""

from __future__ import annotations

import argparse

import numpy as np
import tvm

from bitq_tvm.formats import get_format
from bitq_tvm.kernels.bfp_act_quant import act_quant_shapes, bfp_act_quant_func
from bitq_tvm.kernels.bfp_conv import ConvGeometry, window_act_quant_func, window_im2col_func
from bitq_tvm.kernels.contract import padded_rows
from bitq_tvm.pipeline import resolve_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=("two_kernels", "fused"))
    parser.add_argument("--shape", default="1,3,320,320")
    parser.add_argument("--format", default="bfp8_b32")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    n, c, h, w = (int(v) for v in args.shape.split(","))
    fmt = get_format(args.format)
    geom = ConvGeometry(n, c, h, w, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1)
    rows, k = padded_rows(geom.rows), 9 * c
    target = resolve_target("host")[1]
    dev = tvm.cpu()

    def timed(func, *call_args):
        lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
        return lib.mod.time_evaluator("main", dev, number=20, repeat=args.repeat)(*call_args).min

    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32))
    q_shape, e_shape = act_quant_shapes((rows, k), fmt, 1)
    q, e = tvm.runtime.empty(q_shape, "int8"), tvm.runtime.empty(e_shape, "int8")
    if args.contender == "fused":
        total = timed(window_act_quant_func(geom, fmt, rows), x, q, e)
    else:
        p = tvm.runtime.empty((rows, k), "float32")
        total = timed(window_im2col_func(geom, rows), x, p) + timed(bfp_act_quant_func((rows, k), fmt, 1), p, q, e)
    print(f"{args.contender}: {geom.batch}x{c}x{h}x{w} -> rows {rows} x K {k}, {fmt.name}: {total * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
