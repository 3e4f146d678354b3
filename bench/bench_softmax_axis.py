"""Softmax over an outer axis under the default CPU schedules: time and max error vs NumPy.

Usage: TVM_NUM_THREADS=2 python bench/bench_softmax_axis.py [axis]   (SHAPE=1,16,4,2100 by default)
"""
import sys, numpy as np, tvm
from tvm import relax
from tvm.script import relax as R
from tvm.s_tir import dlight
from bitq_tvm.kernels.cpu import cpu_pipeline, default_cpu_rules
import os; shape = tuple(int(v) for v in os.environ.get("SHAPE","1,16,4,2100").split(","))
axis = int(sys.argv[1]) if len(sys.argv) > 1 else 1
bb = relax.BlockBuilder()
x = relax.Var("x", relax.TensorType(shape, "float32"))
with bb.function("main", [x]):
    with bb.dataflow():
        y = bb.emit_output(relax.op.nn.softmax(x, axis=axis))
    bb.emit_func_output(y)
mod = bb.get()
from bitq_tvm.pipeline import resolve_target; target = resolve_target("host")[1]
ex = tvm.compile(mod, target, relax_pipeline=cpu_pipeline(target))
dev = tvm.cpu()
vm = relax.VirtualMachine(ex, dev)
a = np.random.randn(*shape).astype("float32")
xa = tvm.runtime.tensor(a, dev)
out = vm["main"](xa).numpy()
ref = np.exp(a - a.max(axis=axis, keepdims=True)); ref /= ref.sum(axis=axis, keepdims=True)
print("maxerr", np.abs(out - ref).max())
f = vm.time_evaluator("main", dev, number=20, repeat=5)
print("ms", f(xa).min * 1e3)
