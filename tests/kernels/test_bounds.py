"""Every load of the BFP kernels that pad (ragged blocks, image borders, padded rows) stays inside
its buffer, by TVM's own static checker (``s_tir.analysis.OOBChecker``).

A masked-out load still runs: LLVM's select evaluates both operands, so a padding position has to
read an in-bounds element and be masked afterwards (``float_bits.zero_unless``).
"""

import pytest
import tvm
import tvm_ffi
from tvm import te, tirx

from bitq_tvm.formats import get_format
from bitq_tvm.kernels.bfp_act_quant import bfp_act_quant_func
from bitq_tvm.kernels.bfp_conv import ConvGeometry, bfp_im2col_func, window_act_quant_func, window_im2col_func
from bitq_tvm.kernels.bfp_depthwise import bfp_depthwise_func
from bitq_tvm.kernels.bfp_matmul_variants import bfp_matmul_func
from bitq_tvm.kernels.bfp_quant import bfp_fake_quant_func
from bitq_tvm.kernels.contract import depthwise_activation_format
from bitq_tvm.kernels.float_bits import zero_unless

B8, B4, B16 = get_format("bfp8_b32"), get_format("bfp4_b32"), get_format("bfp6_b16_sr3")
STEM = ConvGeometry(1, 3, 20, 18, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1)  # M = 90
STEM_B2 = ConvGeometry(2, 3, 7, 6, 8, (3, 3), (1, 1), (0, 1, 1, 0), (1, 1), 1)  # M = 2 * 42
CONV = ConvGeometry(1, 40, 9, 9, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)  # M = 81
GROUPED = ConvGeometry(2, 24, 6, 6, 24, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 2)
DEPTHWISE = ConvGeometry(1, 24, 15, 15, 24, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 24)

KERNELS = {
    "act_quant_ragged_k": lambda: bfp_act_quant_func((4, 27), B8, 1),
    "act_quant_ragged_blocks": lambda: bfp_act_quant_func((3, 70), B16, 1),
    "act_quant_nchw_groups": lambda: bfp_act_quant_func((2, 12, 5, 3), get_format("bfp4_b8"), 1, 2),
    "fake_quant_ragged": lambda: bfp_fake_quant_func((4, 70), B8, 1),
    "fake_quant_nchw": lambda: bfp_fake_quant_func((2, 40, 3, 3), B16, 1),
    "window_im2col_padded_rows": lambda: window_im2col_func(STEM, 92),
    "window_act_quant_padded_rows": lambda: window_act_quant_func(STEM, B8, 92),
    "window_act_quant_batch2": lambda: window_act_quant_func(STEM_B2, B16, 88),
    "im2col_padded_rows": lambda: bfp_im2col_func(CONV, B8, 0, 84),
    "im2col_group1": lambda: bfp_im2col_func(GROUPED, get_format("bfp8_b16"), 1, 20),
    "depthwise": lambda: bfp_depthwise_func(DEPTHWISE, depthwise_activation_format(B8), B8),
    "matmul_generic_ragged_n": lambda: bfp_matmul_func(52, 18, 96, B8, B8, "generic"),
    "matmul_generic_nibbles": lambda: bfp_matmul_func(52, 18, 96, B8, B4, "generic"),
}


def _check_bounds(func: tirx.PrimFunc) -> None:
    checker = tvm_ffi.get_global_func("s_tir.analysis.OOBChecker")()
    checker(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_loads_stay_in_bounds(name):
    _check_bounds(KERNELS[name]())


def _padded_row(mask):
    """Y [6] = X [4] zero-padded by 2, X read at a clamped index, masked by ``mask``."""
    x = te.placeholder((4,), "float32", name="X")
    y = te.compute((6,), lambda i: mask(i < 4, x[tirx.min(i, 3)]), name="Y")
    return te.create_prim_func([x, y])


def test_checker_catches_a_select_around_a_clamped_load():
    # the simplifier drops the clamp inside Select's true branch: the load reads X[4], X[5]
    with pytest.raises(Exception, match="Out of bounds"):
        _check_bounds(_padded_row(lambda keep, v: tirx.Select(keep, v, tirx.const(0.0, "float32"))))
    _check_bounds(_padded_row(zero_unless))
