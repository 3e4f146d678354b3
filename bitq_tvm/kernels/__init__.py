"""TIR kernels of the BFP flow: computes, schedules, intrinsics, oracles and the weight packer.

- :mod:`.contract`: every fact of the integer kernel contract (lanes, K quad, +128 offset,
  exponent bound, block-size rule, which layers run as integer kernels, their GEMM geometry and
  stored bytes, the block axes); plain shapes only.
- :mod:`.bfp_matmul`: the integer matmul's compute, kernel name and shared register tiling;
  :mod:`.bfp_matmul_x86` (vnni, avx2, generic) and :mod:`.bfp_matmul_arm_riscv` (sdot, i8mm,
  neon, rvv, scalar) schedule it; :mod:`.bfp_matmul_variants` is the entry point for any
  variant and picks one from a ``tvm.target.Target``'s features.
- :mod:`.oracle`: NumPy reference and error bound of the matmul; :mod:`.packing`: the one weight
  packer and the run-time expansion kernel.
- :mod:`.bfp_act_quant` (activation quantizer), :mod:`.bfp_conv` (im2col), :mod:`.bfp_quant`
  (fake quantization for the simulation), :mod:`.float_bits` (float bit helpers),
  ``intrin_*`` (tensor intrinsics), :mod:`.cpu` (default CPU schedules of everything else).
"""
