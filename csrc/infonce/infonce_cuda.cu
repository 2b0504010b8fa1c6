// Fused InfoNCE kernels on CUDA (raw pointers, no torch headers: compiles with plain `nvcc -c`).
//
// Layout shared by the three kernels. A block of 256 threads is a 16 x 16 grid (tx fastest) and owns one
// 64-row x 64-column score tile at a time: thread (ty, tx) holds rows ty + 16 i and columns tx + 16 j
// (i, j < 4), so a row's 64 scores live in the 16 lanes of one half-warp and row reductions are four
// xor-shuffles. Score tiles are built from 32-feature slices staged in shared memory: bf16/fp16 inputs on the
// tensor cores (WMMA 16x16x16, fp32 accumulation; each warp owns a 16 x 32 strip, written back to shared memory
// and read in the thread layout above), fp32 inputs with SIMT FMAs (fp32 products, no TF32 rounding).
// -DSSLSCALE_INFONCE_SIMT_ONLY forces the SIMT path for every dtype. The second products of the backward are
// SIMT in fp32 for every dtype.
//
//   forward:  one block per 64 rows, looping over column tiles with a running max / sum per row.
//   d_rows:   one block per (64 rows, 128 output features); per column tile it recomputes the scores, writes
//             g (p - t) to shared memory and multiplies it by the matching slice of cols.
//   d_cols:   the mirror image: one block per (64 columns, 128 output features), looping over row tiles.
// Feature dimensions above 128 therefore recompute the score tiles once per 128-feature output block.

#include "infonce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <mma.h>

#include <type_traits>

#if !defined(SSLSCALE_INFONCE_SIMT_ONLY) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define SSLSCALE_INFONCE_WMMA 1
#endif

namespace sslscale {
namespace infonce_cuda {
namespace {

constexpr int kSide = 16;                // threads per side of the block
constexpr int kThreads = kSide * kSide;  // 256
constexpr int kTile = 64;                // rows and columns of one score tile
constexpr int kPer = kTile / kSide;      // score rows (and columns) per thread: 4
constexpr int kK = 32;                   // features per shared-memory slice of the score product
constexpr int kPad = kTile + 1;          // padded stride of the transposed SIMT operand slices
constexpr int kOut = 128;                // output features per backward block
constexpr int kOutPer = kOut / kSide;    // output features per thread: 8
constexpr int kChunk = 32;               // reduction rows staged at a time in the backward's second product
constexpr int kStage = 2 * kK * kPad;    // floats of the staging buffer (score operands, or a kChunk x kOut slice)
constexpr int kLdh = kK + 8;             // 16-bit row stride of the WMMA operand slices (multiple of 8)
constexpr int kLds = kTile + 4;          // float row stride of the WMMA score tile and of g (p - t) (multiple of 4)
constexpr int kWarps = kThreads / 32;
static_assert(kChunk * kOut <= kStage, "the backward's operand slice must fit the score staging buffer");
static_assert(kTile % kChunk == 0, "the backward's reduction chunks must tile a score tile");
static_assert(2 * kTile * kLdh * 2 <= kStage * 4, "the 16-bit WMMA operand slices must fit the staging buffer");
static_assert(kWarps == 2 * (kTile / 16) && kK % 16 == 0, "WMMA layout: 8 warps, each a 16 x 32 strip of the tile");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Reductions over the 16 lanes that hold one row (xor offsets < 16 stay inside a half-warp).
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int offset = kSide / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int offset = kSide / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// dst[k * kPad + r] = src[first + r, k0 + k] for r < kTile, k < kK; zero past `count` rows or `d` features.
// Consecutive threads read consecutive features (coalesced) and write consecutive banks (kPad = 1 mod 32).
template <typename T>
__device__ __forceinline__ void stage_transposed(const T* __restrict__ src, int64_t first, int64_t count, int64_t d,
                                                 int64_t k0, float* __restrict__ dst) {
  for (int e = threadIdx.x; e < kTile * kK; e += kThreads) {
    const int r = e / kK;
    const int k = e % kK;
    const int64_t gr = first + r;
    const int64_t gk = k0 + k;
    dst[k * kPad + r] = (gr < count && gk < d) ? to_float(src[gr * d + gk]) : 0.f;
  }
}

// dst[c * kOut + o] = src[first + c, out0 + o] for c < kChunk, o < kOut; zero outside [count, d].
template <typename T>
__device__ __forceinline__ void stage_slice(const T* __restrict__ src, int64_t first, int64_t count, int64_t d,
                                            int64_t out0, float* __restrict__ dst) {
  for (int e = threadIdx.x; e < kChunk * kOut; e += kThreads) {
    const int c = e / kOut;
    const int o = e % kOut;
    const int64_t gc = first + c;
    const int64_t go = out0 + o;
    dst[e] = (gc < count && go < d) ? to_float(src[gc * d + go]) : 0.f;
  }
}

// SIMT score tile: s[i][j] = rows[row0 + ty + 16 i] . cols[col0 + tx + 16 j] in fp32 FMAs.
template <typename T>
__device__ __forceinline__ void score_tile_simt(const T* __restrict__ rows, const T* __restrict__ cols, int64_t m,
                                                int64_t n, int64_t d, int64_t row0, int64_t col0,
                                                float* __restrict__ stage, float (&s)[kPer][kPer]) {
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  float* a_s = stage;
  float* b_s = stage + kK * kPad;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) s[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += kK) {
    stage_transposed(rows, row0, m, d, k0, a_s);
    stage_transposed(cols, col0, n, d, k0, b_s);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kK; ++k) {
      float a[kPer], b[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) a[i] = a_s[k * kPad + ty + kSide * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) b[j] = b_s[k * kPad + tx + kSide * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) s[i][j] = fmaf(a[i], b[j], s[i][j]);
    }
    __syncthreads();
  }
}

#ifdef SSLSCALE_INFONCE_WMMA
// dst[r * kLdh + k] = src[first + r, k0 + k] (16-bit, not transposed) for r < kTile, k < kK; zero outside.
template <typename T>
__device__ __forceinline__ void stage_rows_16bit(const T* __restrict__ src, int64_t first, int64_t count, int64_t d,
                                                 int64_t k0, T* __restrict__ dst) {
  for (int e = threadIdx.x; e < kTile * kK; e += kThreads) {
    const int r = e / kK;
    const int k = e % kK;
    const int64_t gr = first + r;
    const int64_t gk = k0 + k;
    dst[r * kLdh + k] = (gr < count && gk < d) ? src[gr * d + gk] : from_float<T>(0.f);
  }
}

// Tensor-core score tile for bf16/fp16: warp w computes rows 16 (w / 2) .. +16, columns 32 (w % 2) .. +32 as two
// 16x16 fp32 accumulators, stores them to `scores` (row-major, stride kLds), and every thread then reads its s.
// Fragment pointers are 32-byte aligned: row offsets are multiples of 16 * kLdh * 2 = 1280 B (operands) and
// 16 * kLds * 4 = 4352 B (scores), column offsets multiples of 32 B.
template <typename T>
__device__ __forceinline__ void score_tile_wmma(const T* __restrict__ rows, const T* __restrict__ cols, int64_t m,
                                                int64_t n, int64_t d, int64_t row0, int64_t col0,
                                                float* __restrict__ stage, float* __restrict__ scores,
                                                float (&s)[kPer][kPer]) {
  namespace wmma = nvcuda::wmma;
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int warp = threadIdx.x / 32;
  const int strip = warp / 2;         // 16-row strip of the tile
  const int first_col = (warp % 2) * 32;
  T* a_h = reinterpret_cast<T*>(stage);
  T* b_h = a_h + kTile * kLdh;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int64_t k0 = 0; k0 < d; k0 += kK) {
    stage_rows_16bit(rows, row0, m, d, k0, a_h);
    stage_rows_16bit(cols, col0, n, d, k0, b_h);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, a_h + strip * 16 * kLdh + kk, kLdh);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        // B = cols^T (k x c): element (k, c) sits at b_h[c * kLdh + k], i.e. column-major with stride kLdh
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, b_h + (first_col + 16 * f) * kLdh + kk, kLdh);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < 2; ++f)
    wmma::store_matrix_sync(scores + strip * 16 * kLds + first_col + 16 * f, acc[f], kLds, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) s[i][j] = scores[(ty + kSide * i) * kLds + tx + kSide * j];
  __syncthreads();  // the caller may overwrite `scores` (the backward reuses it for g (p - t))
}
#endif

// s[i][j] = rows[row0 + ty + 16 i] . cols[col0 + tx + 16 j]; padded rows and columns score 0.
// Every thread of the block must call it (it synchronises); `stage` and `scores` are free again on return.
template <typename T>
__device__ __forceinline__ void score_tile(const T* __restrict__ rows, const T* __restrict__ cols, int64_t m,
                                           int64_t n, int64_t d, int64_t row0, int64_t col0,
                                           float* __restrict__ stage, float* __restrict__ scores,
                                           float (&s)[kPer][kPer]) {
#ifdef SSLSCALE_INFONCE_WMMA
  if constexpr (!std::is_same<T, float>::value) {
    score_tile_wmma(rows, cols, m, n, d, row0, col0, stage, scores, s);
  } else {
    score_tile_simt(rows, cols, m, n, d, row0, col0, stage, s);
  }
#else
  score_tile_simt(rows, cols, m, n, d, row0, col0, stage, s);
#endif
}

// Per-row state the backward needs. Rows past m get g = 0, lse = +inf and no positive: their g(p - t) is 0.
struct RowInfo {
  float g[kPer];
  float lse[kPer];
  int64_t pos[kPer];
  int64_t self[kPer];
};

__device__ __forceinline__ RowInfo load_rows(const float* __restrict__ grad, const float* __restrict__ lse,
                                             const int64_t* __restrict__ pos, const int64_t* __restrict__ self_idx,
                                             int64_t row0, int64_t m) {
  const int ty = threadIdx.x / kSide;
  RowInfo info;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = row0 + ty + kSide * i;
    const bool ok = r < m;
    info.g[i] = ok ? grad[r] : 0.f;
    info.lse[i] = ok ? lse[r] : CUDART_INF_F;
    info.pos[i] = ok ? pos[r] : -1;
    info.self[i] = ok ? self_idx[r] : -1;
  }
  return info;
}

// Writes g_i (p_ij - t_ij) of this thread's scores into ds[row * kLds + col] (tile-local indices).
__device__ __forceinline__ void store_grad_logits(const float (&s)[kPer][kPer], const RowInfo& info, int64_t col0,
                                                  int64_t n, float* __restrict__ ds) {
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t c = col0 + tx + kSide * j;
      const float p = (c < n && c != info.self[i]) ? __expf(s[i][j] - info.lse[i]) : 0.f;
      const float t = (c == info.pos[i]) ? 1.f : 0.f;
      ds[(ty + kSide * i) * kLds + tx + kSide * j] = info.g[i] * (p - t);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ rows, const T* __restrict__ cols, const int64_t* __restrict__ pos,
                   const int64_t* __restrict__ self_idx, float* __restrict__ loss, float* __restrict__ lse,
                   int64_t m, int64_t n, int64_t d) {
  __shared__ __align__(32) float stage[kStage];
  __shared__ __align__(32) float scores[kTile * kLds];  // WMMA score tile (16-bit inputs only)
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;

  int64_t my_pos[kPer], my_self[kPer];
  float run_max[kPer], run_sum[kPer], positive[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = row0 + ty + kSide * i;
    my_pos[i] = r < m ? pos[r] : -1;
    my_self[i] = r < m ? self_idx[r] : -1;
    run_max[i] = -CUDART_INF_F;
    run_sum[i] = 0.f;
    positive[i] = 0.f;
  }

  float s[kPer][kPer];
  for (int64_t col0 = 0; col0 < n; col0 += kTile) {
    score_tile(rows, cols, m, n, d, row0, col0, stage, scores, s);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      float tile_max = -CUDART_INF_F;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t c = col0 + tx + kSide * j;
        if (c == my_pos[i]) positive[i] += s[i][j];
        if (c >= n || c == my_self[i]) s[i][j] = -CUDART_INF_F;
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      const float new_max = fmaxf(run_max[i], row_max(tile_max));
      // nothing kept in this row yet: shift by 0 (every exp below is exp(-inf) = 0 either way, never NaN)
      const float shift = new_max == -CUDART_INF_F ? 0.f : new_max;
      float tile_sum = 0.f;
#pragma unroll
      for (int j = 0; j < kPer; ++j) tile_sum += __expf(s[i][j] - shift);
      run_sum[i] = run_sum[i] * __expf(run_max[i] - shift) + row_sum(tile_sum);
      run_max[i] = new_max;
    }
  }

#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const float pos_logit = row_sum(positive[i]);
    const int64_t r = row0 + ty + kSide * i;
    if (tx == 0 && r < m) {
      const float l = run_max[i] + logf(run_sum[i]);
      lse[r] = l;
      loss[r] = l - pos_logit;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const float* __restrict__ grad, const T* __restrict__ rows, const T* __restrict__ cols,
                     const int64_t* __restrict__ pos, const int64_t* __restrict__ self_idx,
                     const float* __restrict__ lse, T* __restrict__ d_rows, int64_t m, int64_t n, int64_t d) {
  __shared__ __align__(32) float stage[kStage];      // score operands, then kChunk columns x kOut features of cols
  __shared__ __align__(32) float ds[kTile * kLds];   // WMMA scores, then g (p - t) of the tile, [row][col]
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t out0 = static_cast<int64_t>(blockIdx.y) * kOut;
  const RowInfo info = load_rows(grad, lse, pos, self_idx, row0, m);

  float acc[kPer][kOutPer] = {};
  float s[kPer][kPer];
  for (int64_t col0 = 0; col0 < n; col0 += kTile) {
    score_tile(rows, cols, m, n, d, row0, col0, stage, ds, s);
    store_grad_logits(s, info, col0, n, ds);
    for (int c0 = 0; c0 < kTile; c0 += kChunk) {
      stage_slice(cols, col0 + c0, n, d, out0, stage);
      __syncthreads();  // the slice (and, on the first chunk, ds) is complete
#pragma unroll 4
      for (int c = 0; c < kChunk; ++c) {
        float b[kOutPer];
#pragma unroll
        for (int j = 0; j < kOutPer; ++j) b[j] = stage[c * kOut + tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float a = ds[(ty + kSide * i) * kLds + c0 + c];
#pragma unroll
          for (int j = 0; j < kOutPer; ++j) acc[i][j] = fmaf(a, b[j], acc[i][j]);
        }
      }
      __syncthreads();  // everyone is done with the slice (and, on the last chunk, with ds)
    }
  }

#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = row0 + ty + kSide * i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < kOutPer; ++j) {
      const int64_t o = out0 + tx + kSide * j;
      if (o < d) d_rows[r * d + o] = from_float<T>(acc[i][j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_cols_kernel(const float* __restrict__ grad, const T* __restrict__ rows, const T* __restrict__ cols,
                     const int64_t* __restrict__ pos, const int64_t* __restrict__ self_idx,
                     const float* __restrict__ lse, T* __restrict__ d_cols, int64_t m, int64_t n, int64_t d) {
  __shared__ __align__(32) float stage[kStage];      // score operands, then kChunk rows x kOut features of rows
  __shared__ __align__(32) float ds[kTile * kLds];   // WMMA scores, then g (p - t) of the tile, [row][col]
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t out0 = static_cast<int64_t>(blockIdx.y) * kOut;

  // acc[i][j]: column col0 + ty + 16 i, feature out0 + tx + 16 j
  float acc[kPer][kOutPer] = {};
  float s[kPer][kPer];
  for (int64_t row0 = 0; row0 < m; row0 += kTile) {
    const RowInfo info = load_rows(grad, lse, pos, self_idx, row0, m);
    score_tile(rows, cols, m, n, d, row0, col0, stage, ds, s);
    store_grad_logits(s, info, col0, n, ds);
    for (int r0 = 0; r0 < kTile; r0 += kChunk) {
      stage_slice(rows, row0 + r0, m, d, out0, stage);
      __syncthreads();
#pragma unroll 4
      for (int r = 0; r < kChunk; ++r) {
        float b[kOutPer];
#pragma unroll
        for (int j = 0; j < kOutPer; ++j) b[j] = stage[r * kOut + tx + kSide * j];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float a = ds[(r0 + r) * kLds + ty + kSide * i];
#pragma unroll
          for (int j = 0; j < kOutPer; ++j) acc[i][j] = fmaf(a, b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t c = col0 + ty + kSide * i;
    if (c >= n) continue;
#pragma unroll
    for (int j = 0; j < kOutPer; ++j) {
      const int64_t o = out0 + tx + kSide * j;
      if (o < d) d_cols[c * d + o] = from_float<T>(acc[i][j]);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t forward_typed(const void* rows, const void* cols, const int64_t* pos, const int64_t* self_idx,
                          float* loss, float* lse, int64_t m, int64_t n, int64_t d, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(m, kTile)));
  forward_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(rows), static_cast<const T*>(cols), pos,
                                                   self_idx, loss, lse, m, n, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const float* grad, const void* rows, const void* cols, const int64_t* pos,
                           const int64_t* self_idx, const float* lse, void* d_rows, void* d_cols, int64_t m,
                           int64_t n, int64_t d, cudaStream_t stream) {
  if (d == 0) return cudaSuccess;
  const unsigned feature_blocks = static_cast<unsigned>(ceil_div(d, kOut));
  const T* r = static_cast<const T*>(rows);
  const T* c = static_cast<const T*>(cols);
  // m == 0 or n == 0 still launches the other side's kernel: its loop is empty and it writes zeros
  if (m > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(m, kTile)), feature_blocks);
    grad_rows_kernel<T><<<grid, kThreads, 0, stream>>>(grad, r, c, pos, self_idx, lse, static_cast<T*>(d_rows), m,
                                                       n, d);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (n > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(n, kTile)), feature_blocks);
    grad_cols_kernel<T><<<grid, kThreads, 0, stream>>>(grad, r, c, pos, self_idx, lse, static_cast<T*>(d_cols), m,
                                                       n, d);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const void* rows, const void* cols, const int64_t* pos,
                           const int64_t* self_idx, float* loss, float* lse, int64_t m, int64_t n, int64_t d,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(rows, cols, pos, self_idx, loss, lse, m, n, d, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(rows, cols, pos, self_idx, loss, lse, m, n, d, stream);
    case DType::kFloat16:
      return forward_typed<__half>(rows, cols, pos, self_idx, loss, lse, m, n, d, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, const float* grad_loss, const void* rows, const void* cols,
                            const int64_t* pos, const int64_t* self_idx, const float* lse, void* d_rows,
                            void* d_cols, int64_t m, int64_t n, int64_t d, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_loss, rows, cols, pos, self_idx, lse, d_rows, d_cols, m, n, d, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_loss, rows, cols, pos, self_idx, lse, d_rows, d_cols, m, n, d,
                                           stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_loss, rows, cols, pos, self_idx, lse, d_rows, d_cols, m, n, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace infonce_cuda
}  // namespace sslscale
