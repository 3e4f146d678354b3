"""AArch64 signed int8 dot-product tensor intrinsics for the BFP matmul (TVM 0.27, LLVM 22).

ARM's integer dot products multiply signed by signed bytes, so BFP mantissas go in as they are
(no +128 offset, unlike x86 ``vpdpbusd``). Three intrinsics, all exact in int32:

- ``sdot`` (``+dotprod``) and ``neon`` (plain NEON, no dot product) compute, for one activation
  quad ``A[0:4]`` broadcast to every lane and a weight tile ``B[4, 4]`` (4 output lanes x 4
  consecutive K values, 16 contiguous bytes: a quarter of the x86 packed ``[16, 4]`` tile)::

      C[j] += sum_k int32(A[k]) * int32(B[j, k])

  ``sdot`` is one instruction; ``neon`` is ``smull`` (int8 x int8 -> int16, |p| <= 2**14 fits)
  then ``saddlp`` (pairs -> int32) twice and one ``addp`` that puts the four sums in lane order.
- ``i8mm`` (``smmla``) multiplies a 2x8 activation tile by the transpose of a 2x8 weight tile::

      C[i, j] += sum_k int32(A[i, k]) * int32(B[j, k])     (C 2x2 row-major, 16 bytes each of A, B)

TVM 0.27 ships ``dot_4x4_i8i8s32_sdot``/``_neon`` with the same descriptions (they do compile
with LLVM 22), but their bodies assign intermediate vectors to names, which TVMScript 0.27 turns
into local buffers (a memory round trip that kept accumulators out of registers in the x86
kernel), and it ships no i8mm intrinsic at all. The bodies here are single expressions.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["BITQ_SDOT_4x4", "BITQ_NEON_DOT_4x4", "BITQ_SMMLA_2x2x8"]

BITQ_SDOT_4x4 = "bitq_dot_4x4_i8i8i32_sdot"
BITQ_NEON_DOT_4x4 = "bitq_dot_4x4_i8i8i32_neon"
BITQ_SMMLA_2x2x8 = "bitq_mmla_2x2x8_i8i8i32_smmla"


@T.prim_func(s_tir=True)
def _dot_4x4_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_4x4_sdot(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # The A quad is broadcast as one 32-bit word to all four lanes.
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            B.vload([0, 0], dtype="int8x16"),
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                dtype="int8x16",
            ),
            dtype="int32x4",
        )


@T.prim_func(s_tir=True)
def _dot_4x4_neon(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((4, 4), "int8", offset_factor=1),
    C: T.Buffer((4,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # low half of B = lanes 0, 1; smull + saddlp give [j0 k01, j0 k23, j1 k01, j1 k23], the
        # high half the same for lanes 2, 3; addp sums neighbours: [j0, j1, j2, j3].
        C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                        dtype="int8x8",
                    ),
                    T.vectorlow(B.vload([0, 0], dtype="int8x16"), dtype="int8x8"),
                    dtype="int16x8",
                ),
                dtype="int32x4",
            ),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                        dtype="int8x8",
                    ),
                    T.vectorhigh(B.vload([0, 0], dtype="int8x16"), dtype="int8x8"),
                    dtype="int16x8",
                ),
                dtype="int32x4",
            ),
            dtype="int32x4",
        )


@T.prim_func(s_tir=True)
def _mmla_2x2x8_desc(
    A: T.Buffer((2, 8), "int8", offset_factor=1),
    B: T.Buffer((2, 8), "int8", offset_factor=1),
    C: T.Buffer((2, 2), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        for i, j, k in T.grid(2, 2, 8):
            with T.sblock("update"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk], "int32")


@T.prim_func(s_tir=True)
def _mmla_2x2x8_smmla(
    A: T.Buffer((2, 8), "int8", offset_factor=1),
    B: T.Buffer((2, 8), "int8", offset_factor=1),
    C: T.Buffer((2, 2), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        C[0, T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
            C.vload([0, 0], dtype="int32x4"),
            A.vload([0, 0], dtype="int8x16"),
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


TensorIntrin.register(BITQ_SDOT_4x4, _dot_4x4_desc, _dot_4x4_sdot, override=True)
TensorIntrin.register(BITQ_NEON_DOT_4x4, _dot_4x4_desc, _dot_4x4_neon, override=True)
TensorIntrin.register(BITQ_SMMLA_2x2x8, _mmla_2x2x8_desc, _mmla_2x2x8_smmla, override=True)
