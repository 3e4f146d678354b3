"""RISC-V Vector (RVV 1.0) int8 tensor intrinsic for the BFP matmul (TVM 0.27, LLVM 22).

Why not TVM's own: ``tvm.s_tir.tensor_intrin.riscv_cpu`` builds its pointers from offset 0 of the
matched buffers (``tvm_access_ptr(A.data, 0, ...)``, ``B.data, i * n_elems``), ignoring
``elem_offset`` and the row stride of B, so any tensorized call that is not at the very start of
packed operands reads the wrong bytes: the wrong numbers seen under qemu were the intrinsic's, not
the emulator's (qemu runs this intrinsic's vlse8/vwmul/vwadd exactly; see the tests). It also
reduces each output lane with ``vwredsum``, which wastes most of a vector on BFP blocks of 8 or
16 elements.

This intrinsic instead vectorises over 16 output lanes, matching one packed weight tile
``B[16, 4]`` (16 outputs x 4 consecutive K values, 64 contiguous bytes, the layout of
:func:`bitq_tvm.kernels.bfp_matmul.pack_weights`), for one activation quad ``A[0:4]``::

    C[j] += sum_k int32(A[k]) * int32(B[j, k])

Per K value: one weight byte per lane, 4 bytes apart (``llvm.experimental.vp.strided.load``, which
the RISC-V back end selects as ``vlse8.v``), times the activation scalar in int16 (exact: |p| <=
2**14; selected as ``vwmul.vx``), widened into the int32 sum (``vwadd.wv``/``vwadd.vv``). The
body uses fixed-length vectors on purpose: an earlier version called the ``llvm.riscv.*``
intrinsics on scalable types, whose non-poison passthru operands forced tail-undisturbed policy and
a register copy per operation (590 instructions in the inner loop of a 2 x 16 tile against 29
now), and whose accumulators went through memory. LLVM picks LMUL from the target's VLEN (``+v``
means at least 128; ``+zvl256b`` 256), so one intrinsic serves every VLEN.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .contract import K_QUAD, LANES

__all__ = ["BITQ_RVV_DOT_16x4"]

BITQ_RVV_DOT_16x4 = "bitq_rvv_dot_16x4_i8i8i32"


@T.prim_func(s_tir=True)
def _rvv_dot_16x4_desc(
    A: T.Buffer((K_QUAD,), "int8", offset_factor=1),
    B: T.Buffer((LANES, K_QUAD), "int8", offset_factor=1),
    C: T.Buffer((LANES,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:K_QUAD], B[0:LANES, 0:K_QUAD])
        T.writes(C[0:LANES])
        for j in T.serial(0, LANES):
            for k in T.serial(0, K_QUAD):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    C[vj] = C[vj] + T.cast(A[vk], "int32") * T.cast(B[vj, vk], "int32")


def _column_product(A, B, k):
    """int32 products of weight column k (16 lanes, 4 bytes apart) with activation A[k]."""
    return T.Cast(
        "int32x16",
        T.Cast(
            "int16x16",
            T.call_llvm_pure_intrin(
                "int8x16",
                "llvm.experimental.vp.strided.load",
                T.tvm_access_ptr(
                    T.type_annotation("int8"), B.data, B.elem_offset + k,
                    LANES * K_QUAD - k, 1,
                ),
                T.int64(K_QUAD),
                T.broadcast(T.bool(True), LANES),
                T.int32(LANES),
            ),
        )
        * T.broadcast(T.Cast("int16", A[k]), LANES),
    )


@T.prim_func(s_tir=True)
def _rvv_dot_16x4_impl(
    A: T.Buffer((K_QUAD,), "int8", offset_factor=1),
    B: T.Buffer((LANES, K_QUAD), "int8", offset_factor=1),
    C: T.Buffer((LANES,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:K_QUAD], B[0:LANES, 0:K_QUAD])
        T.writes(C[0:LANES])
        C[T.ramp(T.int32(0), 1, LANES)] = (
            C.vload([0], dtype="int32x16")
            + _column_product(A, B, 0)
            + _column_product(A, B, 1)
            + _column_product(A, B, 2)
            + _column_product(A, B, 3)
        )


TensorIntrin.register(BITQ_RVV_DOT_16x4, _rvv_dot_16x4_desc, _rvv_dot_16x4_impl, override=True)
