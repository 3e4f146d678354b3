"""The float32 bit helpers of the BFP kernels against NumPy, exhaustively over the exponent range."""

import numpy as np
import pytest
import tvm
from tvm import te

from bitq_tvm.kernels.float_bits import divide_by_power_of_two


@pytest.fixture(scope="module")
def divide():
    n = 64
    x = te.placeholder((n,), "float32", name="x")
    k = te.placeholder((n,), "int32", name="k")
    y = te.compute((n,), lambda i: divide_by_power_of_two(x[i], k[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, k, y]), target="llvm")

    def run(xs, ks):
        out = tvm.runtime.tensor(np.zeros(n, np.float32))
        lib(tvm.runtime.tensor(xs), tvm.runtime.tensor(ks), out)
        return out.numpy()

    return n, run


def test_divide_by_power_of_two_rounds_as_the_division(divide):
    """Every k whose 2**k float32 represents (the scales of every format), values from
    subnormals to the largest finite float, both signs and zeros: bit-identical to x / 2**k,
    including the results that round to subnormals and to zero, and those that overflow."""
    n, run = divide
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 1.0, -1.5, np.finfo(np.float32).tiny, 2.0**-149, -(2.0**-149),
                         np.finfo(np.float32).max, 3 * 2.0**-140, 1.0 + 2.0**-23], np.float32)
    for k in range(-149, 128):
        xs = np.ldexp(rng.uniform(1, 2, n), rng.integers(-149, 128, n)).astype(np.float32)
        xs *= rng.choice([-1, 1], n).astype(np.float32)
        xs[: len(specials)] = specials
        ks = np.full(n, k, np.int32)
        with np.errstate(over="ignore"):
            expected = xs / np.ldexp(np.float32(1.0), k).astype(np.float32)
        got = run(xs, ks)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=f"k={k}")
