"""x86 integer dot-product tensor intrinsics that compile with TVM 0.27's LLVM 22.

TVM's shipped ``dot_16x4_vnni`` passes ``<16 x i32>`` operands to ``llvm.x86.avx512.vpdpbusd.512``,
which LLVM 22 rejects (it now takes ``<16 x i32>, <64 x i8>, <64 x i8>``); its ``dot_16x4_avx512``
sibling goes through ``vpmaddubsw`` and saturates int16 on full-range u8 x s8 data. These are
corrected replacements, registered under our own names so nothing depends on overriding TVM's.

Both intrinsics compute, for one activation quad ``A[0:4]`` (int8, broadcast to every lane) and a
packed weight tile ``B[lanes, 4]`` (4 consecutive K values per output lane)::

    C[j] += sum_k int32(A[k]) * int32(B[j, k])

exactly in int32: VNNI with uint8 weights (``qw + 128``, the unsigned operand of ``vpdpbusd``),
AVX2 with int8 weights (both operands sign-extended to int16). Bodies are single expressions on purpose: in TVM 0.27 TVMScript every ``x = ...``
becomes a local buffer, a memory round trip that keeps accumulators out of registers.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["BITQ_VNNI_DOT_16x4", "BITQ_AVX2_DOT_8x4", "BITQ_AVX2_NIBBLE_DOT_16x4", "dot_desc"]

BITQ_VNNI_DOT_16x4 = "bitq_dot_16x4_vnni"
BITQ_AVX2_DOT_8x4 = "bitq_dot_8x4_avx2"


def dot_desc(lanes: int, a_dtype: str, b_dtype: str):
    """The description of ``C[j] += sum_k int32(A[k]) * int32(B[j, k])`` for ``lanes`` outputs x
    4 K values: what every (dtype family of) x86 dot intrinsic here implements."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


_dot_16x4_i8u8i32_desc = dot_desc(16, "int8", "uint8")
_dot_16x4_u8i8i32_desc = dot_desc(16, "uint8", "int8")  # TVM's convention (MetaSchedule's rules)
_dot_8x4_i8i8i32_desc = dot_desc(8, "int8", "int8")


@T.prim_func(s_tir=True)
def _dot_16x4_i8u8i32_vnni(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "uint8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # vpdpbusd multiplies unsigned bytes of operand 2 (the weight tile) by signed bytes of
        # operand 3 (the A quad, broadcast as one dword to all 16 lanes), sums each group of 4
        # into the int32 lane.
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(B.vload([0, 0], dtype="uint8x64"), dtype="int8x64"),
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 16),
                dtype="int8x64",
            ),
            dtype="int32x16",
        )


# TVM's convention (uint8 data broadcast, int8 weights), for MetaSchedule's own x86 rules.
@T.prim_func(s_tir=True)
def _dot_16x4_u8i8i32_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # vpdpbusd multiplies unsigned bytes of operand 2 by signed bytes of operand 3, sums each
        # group of 4 into the int32 lane: the A quad is broadcast as one dword to all 16 lanes.
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                dtype="int8x64",
            ),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_8x4_i8i8i32_avx2(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # Each int32 lane of B holds the bytes (b0, b1, b2, b3) of one output. Seen as two int16
        # words (b0 | b1 << 8, b2 | b3 << 8), an arithmetic shift right by 8 sign-extends the odd
        # bytes (b1, b3) and a shift left then right by 8 the even bytes (b0, b2); the broadcast
        # A dword is sign-extended the same way into (a0, a2) and (a1, a3). vpmaddwd then forms
        # b0*a0 + b2*a2 and b1*a1 + b3*a3 per lane exactly (|products| <= 2**14): no int16
        # saturation, unlike vpmaddubsw, and the lanes come out in output order.
        C[T.ramp(T.int32(0), 1, 8)] = (
            C.vload([0], dtype="int32x8")
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(
                    T.shift_left(
                        T.reinterpret(B.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
                        T.int16x16(8),
                    ),
                    T.int16x16(8),
                ),
                T.shift_right(
                    T.shift_left(
                        T.reinterpret(
                            T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8),
                            dtype="int16x16",
                        ),
                        T.int16x16(8),
                    ),
                    T.int16x16(8),
                ),
                dtype="int32x8",
            )
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(
                    T.reinterpret(B.vload([0, 0], dtype="int8x32"), dtype="int16x16"),
                    T.int16x16(8),
                ),
                T.shift_right(
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8),
                        dtype="int16x16",
                    ),
                    T.int16x16(8),
                ),
                dtype="int32x8",
            )
        )


TensorIntrin.register(
    BITQ_VNNI_DOT_16x4, _dot_16x4_i8u8i32_desc, _dot_16x4_i8u8i32_vnni, override=True
)
TensorIntrin.register(
    BITQ_AVX2_DOT_8x4, _dot_8x4_i8i8i32_desc, _dot_8x4_i8i8i32_avx2, override=True
)


@T.prim_func(s_tir=True)
def _dot_16x4_i8i4i32_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((32,), "uint8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:32])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", T.Cast(
                        "int8", B[vi % 8 * 4 + vk] >> T.Cast("uint8", vi // 8 * 4) & T.uint8(15) ^ T.uint8(8))
                        - T.int8(8))


@T.prim_func(s_tir=True)
def _dot_16x4_i8i4i32_avx2(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((32,), "uint8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:32])
        T.writes(C[0:16])
        # The 32 stored bytes of a 16 x 4 nibble tile, seen as 16 int16 words: word w holds
        # elements 2w (bits 0-3), 2w + 1 (bits 8-11) of lanes 0-7 and 2w + 32 (bits 4-7), 2w + 33
        # (bits 12-15) of lanes 8-15. Shifting each field to the top and arithmetic-shifting by 12
        # sign-extends it to int16 in place, already in vpmaddwd's even/odd order (as the int8
        # intrinsic's words): no unpacked copy, one load per 64 weights.
        C[T.ramp(T.int32(0), 1, 8)] = (
            C.vload([0], dtype="int32x8")
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(T.shift_left(T.reinterpret(B.vload([0], dtype="uint8x32"), dtype="int16x16"),
                                           T.int16x16(12)), T.int16x16(12)),
                T.shift_right(T.shift_left(T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int16x16"),
                    T.int16x16(8)), T.int16x16(8)),
                dtype="int32x8",
            )
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(T.shift_left(T.reinterpret(B.vload([0], dtype="uint8x32"), dtype="int16x16"),
                                           T.int16x16(4)), T.int16x16(12)),
                T.shift_right(T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int16x16"),
                    T.int16x16(8)),
                dtype="int32x8",
            )
        )
        C[T.ramp(T.int32(8), 1, 8)] = (
            C.vload([8], dtype="int32x8")
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(T.shift_left(T.reinterpret(B.vload([0], dtype="uint8x32"), dtype="int16x16"),
                                           T.int16x16(8)), T.int16x16(12)),
                T.shift_right(T.shift_left(T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int16x16"),
                    T.int16x16(8)), T.int16x16(8)),
                dtype="int32x8",
            )
            + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.shift_right(T.reinterpret(B.vload([0], dtype="uint8x32"), dtype="int16x16"), T.int16x16(12)),
                T.shift_right(T.reinterpret(
                    T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int16x16"),
                    T.int16x16(8)),
                dtype="int32x8",
            )
        )


BITQ_AVX2_NIBBLE_DOT_16x4 = "bitq_dot_16x4_nibble_avx2"
TensorIntrin.register(
    BITQ_AVX2_NIBBLE_DOT_16x4, _dot_16x4_i8i4i32_desc, _dot_16x4_i8i4i32_avx2, override=True
)
