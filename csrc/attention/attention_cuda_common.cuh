// Pieces shared by the bf16 (tensor-core) and fp32 (CUDA-core) attention kernels: operand addressing, the
// one-dimensional grid decomposition, the delta = rowsum(dO * O) kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_cuda.h"

namespace sslscale {
namespace attention {
namespace detail {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

// Row 0 of head (b, h) of an operand, typed.
template <typename T>
__device__ __forceinline__ T* head_ptr(const Operand& x, int b, int h) {
  return static_cast<T*>(x.data) + b * x.sb + h * x.sh;
}

// A block's place in a one-dimensional grid of n_tiles tiles per head: heads are consecutive runs of blocks.
struct TileOf {
  int tile;
  long long head;  // batch * heads + head (or batch * kv_heads + kv head)
};

__device__ __forceinline__ TileOf tile_of(int n_tiles, bool longest_first) {
  const long long pid = blockIdx.x;
  const int i = static_cast<int>(pid % n_tiles);
  return {longest_first ? n_tiles - 1 - i : i, pid / n_tiles};
}

// delta[b, h, t] = sum_d dO[b, h, t, d] * O[b, h, t, d], one warp per row.
template <typename T, int D>
__global__ void delta_kernel(Operand out, Operand grad_out, float* __restrict__ delta, int heads, int seq_len,
                             long long rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const long long bh = row / seq_len;
  const int t = static_cast<int>(row % seq_len);
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const T* o = head_ptr<const T>(out, b, h) + t * out.st;
  const T* g = head_ptr<const T>(grad_out, b, h) + t * grad_out.st;
  float s = 0.0f;
#pragma unroll
  for (int c = lane; c < D; c += 32) s += to_float(o[c]) * to_float(g[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) delta[row] = s;
}

constexpr int kDeltaRowsPerBlock = 8;

template <typename T, int D>
cudaError_t launch_delta(const Operand& out, const Operand& grad_out, float* delta, const Shape& s,
                         cudaStream_t stream) {
  const long long rows = static_cast<long long>(s.batch) * s.heads * s.seq_len;
  const long long blocks = (rows + kDeltaRowsPerBlock - 1) / kDeltaRowsPerBlock;
  delta_kernel<T, D><<<static_cast<unsigned>(blocks), kDeltaRowsPerBlock * 32, 0, stream>>>(out, grad_out, delta,
                                                                                              s.heads, s.seq_len, rows);
  return cudaGetLastError();
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace detail

// Defined in attention_cuda_fp32.cu: the CUDA-core path for fp32 data.
cudaError_t attention_fwd_fp32(const Operand& q, const Operand& k, const Operand& v, const Operand& out, float* lse,
                               const Shape& s, float scale, cudaStream_t stream);
cudaError_t attention_bwd_fp32(const Operand& grad_out, const Operand& q, const Operand& k, const Operand& v,
                               const Operand& out, const float* lse, float* delta, const Operand& dq,
                               const Operand& dk, const Operand& dv, const Shape& s, float scale,
                               cudaStream_t stream);
int attention_describe_fp32(const Shape& s, LaunchInfo* out, int capacity);

}  // namespace attention
}  // namespace sslscale
