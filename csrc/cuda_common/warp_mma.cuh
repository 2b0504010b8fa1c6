// Warp-level tensor-core building blocks for sm_80+ (A100, H100): cp.async staging, ldmatrix, mma.sync m16n8k16.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A 16x16 (row-major), 4 x .b32 of two 16-bit values:  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 8+2t..)  a3 (g+8, 8+2t..)
//   B 16x8  ("col": stored as N x K row-major), 2 x .b32:  b0 (k 2t..2t+1, n g)  b1 (k 8+2t.., n g)
//   C/D 16x8 fp32, 4 floats:                              c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// An fp32 accumulator pair of adjacent 8-column blocks therefore is, after packing to 16-bit pairs, exactly the A
// fragment of a 16-column k-block: the FlashAttention-2 register reuse of P as the next product's left operand.
//
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8i .. 8i+7 give the row addresses of matrix i, and register i of
// lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (with .trans: rows 2(l%4), 2(l%4)+1 of column l/4).
//
// Every row address used with ldmatrix / cp.async must be 16-byte aligned: tiles in shared memory are stored with
// rows padded by 16 bytes, which also spreads the eight rows of an 8x8 matrix over distinct banks.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace sslscale {
namespace mma {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid (the source is then not read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// d += a * b for one m16n8k16 tile, 16-bit inputs (T = __nv_bfloat16 or __half), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<T, __half>::value, "mma_16816 takes bf16 or fp16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one .b32 of two 16-bit values (lo in the low half: the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// The A fragment of k-block kb (16 columns) from fp32 accumulators acc[n][4] of 8-column blocks 2kb and 2kb+1.
template <typename T, int NB>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[NB][4], int kb) {
  a[0] = pack2<T>(acc[2 * kb][0], acc[2 * kb][1]);
  a[1] = pack2<T>(acc[2 * kb][2], acc[2 * kb][3]);
  a[2] = pack2<T>(acc[2 * kb + 1][0], acc[2 * kb + 1][1]);
  a[3] = pack2<T>(acc[2 * kb + 1][2], acc[2 * kb + 1][3]);
}

// Shared-memory addresses each lane gives ldmatrix.x4, for a tile stored row-major with row stride `ld`
// elements (16-bit), top-left element (r0, c0):
//  a_addr: the A fragment of the 16x16 block at (r0, c0)                    -> a0..a3
//  bt_addr: B fragments from an N x K row-major store (B "col"): rows r0..r0+15 are 16 n, columns c0..c0+15 are
//           16 k -> {b0, b1} of n-block r0 and {b0, b1} of n-block r0 + 8
//  b_trans_addr: B fragments from a K x N row-major store, with .trans: rows r0..+15 are 16 k, columns c0..+15 are
//           16 n -> {b0, b1} of n-block c0 and {b0, b1} of n-block c0 + 8
template <typename T>
__device__ __forceinline__ const T* a_addr(const T* tile, int ld, int r0, int c0, int lane) {
  return tile + (r0 + (lane & 15)) * ld + c0 + (lane >> 4) * 8;
}

template <typename T>
__device__ __forceinline__ const T* bt_addr(const T* tile, int ld, int r0, int c0, int lane) {
  const int i = lane >> 3, r = lane & 7;
  return tile + (r0 + (i >> 1) * 8 + r) * ld + c0 + (i & 1) * 8;
}

template <typename T>
__device__ __forceinline__ const T* b_trans_addr(const T* tile, int ld, int r0, int c0, int lane) {
  const int i = lane >> 3, r = lane & 7;
  return tile + (r0 + (i & 1) * 8 + r) * ld + c0 + (i >> 1) * 8;
}

// The A fragment of the 16x16 block at (r0, c0) of A^T stored row-major (rows = A's columns), with .trans.
template <typename T>
__device__ __forceinline__ const T* a_trans_addr(const T* tile, int ld, int r0, int c0, int lane) {
  // a0 = (row g, col 2t) of A = (row 2t, col g) of the store: matrices 0..3 are store blocks (c0, r0), (c0, r0+8),
  // (c0+8, r0), (c0+8, r0+8) in (store row, store col) = (A col, A row).
  const int i = lane >> 3, r = lane & 7;
  return tile + (c0 + (i >> 1) * 8 + r) * ld + r0 + (i & 1) * 8;
}

// Reductions over the four lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace mma
}  // namespace sslscale
