// Fused causal (grouped-query) attention, FlashAttention-2 style, on raw device pointers.
//
// Every kernel keeps one "resident" tile of BR rows in shared memory (queries for the forward and dQ, keys/values
// for dK/dV) and streams tiles of BS rows of the other side past it. Each warp owns 16 resident rows. Products are
// warp-level 16 x N GEMMs into an fp32 scratch (bf16: WMMA tensor cores; fp32: exact CUDA-core FMAs), followed by
// an element phase in which lane l handles row l/2, columns (l%2) + 2j, so the two lanes of a row reduce with one
// shuffle. Running accumulators (O, dQ, dK, dV) stay in registers with that same ownership.
//
// Forward: online softmax in base 2 (log2 e folded into the scale); keeps only out and lse.
// Backward: delta = rowsum(dO * O); dK/dV per (batch, kv head, key tile), looping over the group's query heads and
// the query tiles at/after the diagonal (written once, no atomics); dQ per (batch, head, query tile).
// Tiles wholly above the diagonal are never visited (loop bounds); only tiles straddling it are masked.
// Rows past seq_len are zero-filled on load; in the backward their lse is +inf, so their probabilities are 0.

#include "attention_cuda.h"

#include <cuda_bf16.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace sslscale {
namespace attention {
namespace {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16(x); }

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory geometry shared by host (launch size) and device (carving). Row pads keep every row 16-byte
// aligned (vector copies, WMMA's ldm rules) and shift consecutive rows across banks.
template <typename T, int D, int BR, int BS>
struct Layout {
  static_assert(D % 32 == 0 && BR % 16 == 0 && BS % 16 == 0 && BR % BS == 0, "unsupported tile shape");
  static constexpr int kWarps = BR / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLdT = D + kPad;                   // Q/K/V/dO tile rows (T)
  static constexpr int kLdP = BS + kPad;                  // P / dS rows (T), a GEMM's A operand
  static constexpr int kLdF = (D > BS ? D : BS) + 4;      // fp32 GEMM result rows
  static constexpr size_t kTileR = align128(sizeof(T) * BR * kLdT);
  static constexpr size_t kTileS = align128(sizeof(T) * BS * kLdT);
  static constexpr size_t kScratch = align128(sizeof(float) * 16 * kLdF);
  static constexpr size_t kPBuf = align128(sizeof(T) * 16 * kLdP);
  static constexpr size_t kStats = align128(sizeof(float) * BS);
  // forward: Q | K V | per warp (scratch, P)
  static constexpr size_t kFwdBytes = kTileR + 2 * kTileS + kWarps * (kScratch + kPBuf);
  // dQ: Q dO | K V | per warp (scratch, dS)
  static constexpr size_t kDqBytes = 2 * kTileR + 2 * kTileS + kWarps * (kScratch + kPBuf);
  // dK/dV: K V | Q dO | lse delta | per warp (scratch, P, dS)
  static constexpr size_t kDkvBytes = 2 * kTileR + 2 * kTileS + 2 * kStats + kWarps * (kScratch + 2 * kPBuf);
};

// Tile shapes per element type and head_dim: bf16 keeps a 64-row resident tile (4 warps) and shortens the
// streamed tile at head_dim 128 to stay near 100 KB of shared memory; fp32 (CUDA cores) uses 32 x 32.
template <typename T, int D>
struct Tiles {
  static constexpr bool kBf16 = std::is_same<T, bf16>::value;
  static constexpr int kBR = kBf16 ? 64 : 32;
  static constexpr int kBS = kBf16 ? (D == 128 ? 32 : 64) : 32;
};

// Copy rows [row0, row0 + ROWS) of a (seq_len, D) matrix into shared memory (leading dimension LD) with 16-byte
// vectors; rows past seq_len become zeros. Whole block participates.
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int row0, int seq_len) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunks = D / kVec;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += blockDim.x) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + r < seq_len) val = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(row0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
  }
}

// One warp: C[16 x N] (fp32, ldc) = A[16 x K] (row-major, lda) * B, where B is K x N row-major (B_TRANS false,
// B[k * ldb + n]) or given as its N x K transpose (B_TRANS true, B[n * ldb + k]).
template <int N, int K, bool B_TRANS, typename T>
__device__ __forceinline__ void warp_gemm(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
  if constexpr (std::is_same<T, bf16>::value) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[K / 16];
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) wmma::load_matrix_sync(a[kk], A + kk * 16, lda);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.0f);
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        if constexpr (B_TRANS) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
          wmma::load_matrix_sync(b, B + j * 16 * ldb + kk * 16, ldb);
          wmma::mma_sync(c, a[kk], b, c);
        } else {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(b, B + kk * 16 * ldb + j * 16, ldb);
          wmma::mma_sync(c, a[kk], b, c);
        }
      }
      wmma::store_matrix_sync(C + j * 16, c, ldc, wmma::mem_row_major);
    }
  } else {
    const int lane = threadIdx.x & 31;
    for (int idx = lane; idx < 16 * N; idx += 32) {
      const int i = idx / N;
      const int j = idx % N;
      float acc = 0.0f;
#pragma unroll 8
      for (int kk = 0; kk < K; ++kk) acc += A[i * lda + kk] * (B_TRANS ? B[j * ldb + kk] : B[kk * ldb + j]);
      C[i * ldc + j] = acc;
    }
  }
}

// One warp writes its 16 rows (fp32 in `f`, ld LDF) as T to rows [row0, row0 + 16) of a (seq_len, D) matrix.
template <typename T, int D, int LDF>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float* f, int row0, int seq_len, int lane) {
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = idx / D;
    const int c = idx % D;
    if (row0 + r < seq_len) dst[static_cast<size_t>(row0 + r) * D + c] = from_float<T>(f[r * LDF + c]);
  }
}

// Park a lane's accumulator (its row, columns (lane%2) + 2j) in the warp's scratch, times `mult`.
template <int D, int LDF>
__device__ __forceinline__ void park(float* f, const float* acc, float mult, int r, int c0) {
#pragma unroll
  for (int j = 0; j < D / 2; ++j) f[r * LDF + c0 + 2 * j] = acc[j] * mult;
}

template <int D, int LDF>
__device__ __forceinline__ void accumulate(float* acc, const float* f, int r, int c0) {
#pragma unroll
  for (int j = 0; j < D / 2; ++j) acc[j] += f[r * LDF + c0 + 2 * j];
}

__device__ __forceinline__ int kv_head_of(int bh, int heads, int group) {
  return (bh / heads) * (heads / group) + (bh % heads) / group;
}

template <typename T, int D, int BR, int BS>
__global__ void __launch_bounds__(Layout<T, D, BR, BS>::kThreads)
    fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
               float* __restrict__ lse, int heads, int group, int seq_len, float qk2) {
  using L = Layout<T, D, BR, BS>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = reinterpret_cast<T*>(smem + L::kTileR);
  T* v_s = reinterpret_cast<T*>(smem + L::kTileR + L::kTileS);
  unsigned char* mine = smem + L::kTileR + 2 * L::kTileS + warp * (L::kScratch + L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  T* p_s = reinterpret_cast<T*>(mine + L::kScratch);

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest rows first
  const int bh = blockIdx.y;
  const size_t q_off = static_cast<size_t>(bh) * seq_len * D;
  const size_t kv_off = static_cast<size_t>(kv_head_of(bh, heads, group)) * seq_len * D;
  load_tile<T, D, BR, L::kLdT>(q_s, q + q_off, m0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int row = m0 + warp * 16 + r;
  const T* q_w = q_s + warp * 16 * L::kLdT;
  float m_i = -INFINITY, l_i = 0.0f;
  float o[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o[j] = 0.0f;

  const int end = min(m0 + BR, seq_len);
  for (int n0 = 0; n0 < end; n0 += BS) {
    const bool masked = n0 >= m0;  // the tiles straddling the diagonal
    __syncthreads();               // everyone is done with the previous K/V tile
    load_tile<T, D, BS, L::kLdT>(k_s, k + kv_off, n0, seq_len);
    load_tile<T, D, BS, L::kLdT>(v_s, v + kv_off, n0, seq_len);
    __syncthreads();

    warp_gemm<BS, D, true>(f_s, L::kLdF, q_w, L::kLdT, k_s, L::kLdT);  // S = Q K^T
    __syncwarp();
    float s[BS / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BS / 2; ++j) {
      const int col = c0 + 2 * j;
      float x = f_s[r * L::kLdF + col] * qk2;
      if (masked && n0 + col > row) x = -INFINITY;
      s[j] = x;
      mx = fmaxf(mx, x);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet stays at zero
    const float alpha = exp2f(m_i - m_use);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < BS / 2; ++j) {
      const float p = exp2f(s[j] - m_use);
      sum += p;
      p_s[r * L::kLdP + c0 + 2 * j] = from_float<T>(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
#pragma unroll
    for (int j = 0; j < D / 2; ++j) o[j] *= alpha;
    __syncwarp();

    warp_gemm<D, BS, false>(f_s, L::kLdF, p_s, L::kLdP, v_s, L::kLdT);  // P V
    __syncwarp();
    accumulate<D, L::kLdF>(o, f_s, r, c0);
    __syncwarp();
  }

  park<D, L::kLdF>(f_s, o, l_i > 0.0f ? 1.0f / l_i : 0.0f, r, c0);
  if (c0 == 0 && row < seq_len) lse[static_cast<size_t>(bh) * seq_len + row] = (m_i + log2f(l_i)) * kLn2;
  __syncwarp();
  store_rows<T, D, L::kLdF>(out + q_off, f_s, m0 + warp * 16, seq_len, lane);
}

// delta = rowsum(dO * O), one warp per row.
template <typename T, int D>
__global__ void delta_kernel(const T* __restrict__ out, const T* __restrict__ grad_out, float* __restrict__ delta,
                             long long rows) {
  const long long row = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float s = 0.0f;
#pragma unroll
  for (int c = lane; c < D; c += 32) s += to_float(out[row * D + c]) * to_float(grad_out[row * D + c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) delta[row] = s;
}

template <typename T, int D, int BR, int BS>
__global__ void __launch_bounds__(Layout<T, D, BR, BS>::kThreads)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const T* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
              T* __restrict__ dq, int heads, int group, int seq_len, float qk2, float scale) {
  using L = Layout<T, D, BR, BS>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = reinterpret_cast<T*>(smem + L::kTileR);
  T* k_s = reinterpret_cast<T*>(smem + 2 * L::kTileR);
  T* v_s = reinterpret_cast<T*>(smem + 2 * L::kTileR + L::kTileS);
  unsigned char* mine = smem + 2 * L::kTileR + 2 * L::kTileS + warp * (L::kScratch + L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  T* ds_s = reinterpret_cast<T*>(mine + L::kScratch);

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BR;
  const int bh = blockIdx.y;
  const size_t q_off = static_cast<size_t>(bh) * seq_len * D;
  const size_t kv_off = static_cast<size_t>(kv_head_of(bh, heads, group)) * seq_len * D;
  load_tile<T, D, BR, L::kLdT>(q_s, q + q_off, m0, seq_len);
  load_tile<T, D, BR, L::kLdT>(do_s, grad_out + q_off, m0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int row = m0 + warp * 16 + r;
  const bool valid = row < seq_len;
  const float lse2 = valid ? lse[static_cast<size_t>(bh) * seq_len + row] * kLog2e : INFINITY;
  const float dlt = valid ? delta[static_cast<size_t>(bh) * seq_len + row] : 0.0f;
  const T* q_w = q_s + warp * 16 * L::kLdT;
  const T* do_w = do_s + warp * 16 * L::kLdT;
  float acc[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) acc[j] = 0.0f;

  const int end = min(m0 + BR, seq_len);
  for (int n0 = 0; n0 < end; n0 += BS) {
    const bool masked = n0 >= m0;
    __syncthreads();
    load_tile<T, D, BS, L::kLdT>(k_s, k + kv_off, n0, seq_len);
    load_tile<T, D, BS, L::kLdT>(v_s, v + kv_off, n0, seq_len);
    __syncthreads();

    warp_gemm<BS, D, true>(f_s, L::kLdF, q_w, L::kLdT, k_s, L::kLdT);  // S = Q K^T
    __syncwarp();
    float p[BS / 2];
#pragma unroll
    for (int j = 0; j < BS / 2; ++j) {
      const int col = c0 + 2 * j;
      float x = f_s[r * L::kLdF + col] * qk2 - lse2;
      if (masked && n0 + col > row) x = -INFINITY;
      p[j] = exp2f(x);
    }
    __syncwarp();

    warp_gemm<BS, D, true>(f_s, L::kLdF, do_w, L::kLdT, v_s, L::kLdT);  // dP = dO V^T
    __syncwarp();
#pragma unroll
    for (int j = 0; j < BS / 2; ++j) {
      const int col = c0 + 2 * j;
      ds_s[r * L::kLdP + col] = from_float<T>(p[j] * (f_s[r * L::kLdF + col] - dlt));
    }
    __syncwarp();

    warp_gemm<D, BS, false>(f_s, L::kLdF, ds_s, L::kLdP, k_s, L::kLdT);  // dS K
    __syncwarp();
    accumulate<D, L::kLdF>(acc, f_s, r, c0);
    __syncwarp();
  }

  park<D, L::kLdF>(f_s, acc, scale, r, c0);
  __syncwarp();
  store_rows<T, D, L::kLdF>(dq + q_off, f_s, m0 + warp * 16, seq_len, lane);
}

template <typename T, int D, int BR, int BS>
__global__ void __launch_bounds__(Layout<T, D, BR, BS>::kThreads)
    dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
                T* __restrict__ dk, T* __restrict__ dv, int group, int seq_len, float qk2, float scale) {
  using L = Layout<T, D, BR, BS>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = reinterpret_cast<T*>(smem + L::kTileR);
  T* q_s = reinterpret_cast<T*>(smem + 2 * L::kTileR);
  T* do_s = reinterpret_cast<T*>(smem + 2 * L::kTileR + L::kTileS);
  float* lse_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + 2 * L::kTileS);
  float* dlt_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + 2 * L::kTileS + L::kStats);
  unsigned char* mine = smem + 2 * L::kTileR + 2 * L::kTileS + 2 * L::kStats + warp * (L::kScratch + 2 * L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  T* p_s = reinterpret_cast<T*>(mine + L::kScratch);
  T* ds_s = reinterpret_cast<T*>(mine + L::kScratch + L::kPBuf);

  const int n0 = blockIdx.x * BR;  // key tile 0 sees the most queries: launched first
  const int bkv = blockIdx.y;      // batch * kv_heads + kv head
  const size_t kv_off = static_cast<size_t>(bkv) * seq_len * D;
  load_tile<T, D, BR, L::kLdT>(k_s, k + kv_off, n0, seq_len);
  load_tile<T, D, BR, L::kLdT>(v_s, v + kv_off, n0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int key = n0 + warp * 16 + r;
  const T* k_w = k_s + warp * 16 * L::kLdT;
  const T* v_w = v_s + warp * 16 * L::kLdT;
  float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) dk_acc[j] = dv_acc[j] = 0.0f;

  for (int g = 0; g < group; ++g) {
    const size_t bh = static_cast<size_t>(bkv) * group + g;  // == b * heads + kv_head * group + g
    const T* q_h = q + bh * seq_len * D;
    const T* do_h = grad_out + bh * seq_len * D;
    const float* lse_h = lse + bh * seq_len;
    const float* delta_h = delta + bh * seq_len;
    for (int m0 = n0; m0 < seq_len; m0 += BS) {  // query tiles from the diagonal on
      const bool masked = m0 < n0 + BR;
      __syncthreads();
      load_tile<T, D, BS, L::kLdT>(q_s, q_h, m0, seq_len);
      load_tile<T, D, BS, L::kLdT>(do_s, do_h, m0, seq_len);
      for (int i = threadIdx.x; i < BS; i += blockDim.x) {
        const bool ok = m0 + i < seq_len;
        lse_s[i] = ok ? lse_h[m0 + i] * kLog2e : INFINITY;
        dlt_s[i] = ok ? delta_h[m0 + i] : 0.0f;
      }
      __syncthreads();

      warp_gemm<BS, D, true>(f_s, L::kLdF, k_w, L::kLdT, q_s, L::kLdT);  // S^T = K Q^T
      __syncwarp();
      float p[BS / 2];
#pragma unroll
      for (int j = 0; j < BS / 2; ++j) {
        const int col = c0 + 2 * j;
        float x = f_s[r * L::kLdF + col] * qk2 - lse_s[col];
        if (masked && m0 + col < key) x = -INFINITY;
        p[j] = exp2f(x);
        p_s[r * L::kLdP + col] = from_float<T>(p[j]);
      }
      __syncwarp();

      warp_gemm<BS, D, true>(f_s, L::kLdF, v_w, L::kLdT, do_s, L::kLdT);  // dP^T = V dO^T
      __syncwarp();
#pragma unroll
      for (int j = 0; j < BS / 2; ++j) {
        const int col = c0 + 2 * j;
        ds_s[r * L::kLdP + col] = from_float<T>(p[j] * (f_s[r * L::kLdF + col] - dlt_s[col]));
      }
      __syncwarp();

      warp_gemm<D, BS, false>(f_s, L::kLdF, p_s, L::kLdP, do_s, L::kLdT);  // P^T dO
      __syncwarp();
      accumulate<D, L::kLdF>(dv_acc, f_s, r, c0);
      __syncwarp();
      warp_gemm<D, BS, false>(f_s, L::kLdF, ds_s, L::kLdP, q_s, L::kLdT);  // dS^T Q
      __syncwarp();
      accumulate<D, L::kLdF>(dk_acc, f_s, r, c0);
      __syncwarp();
    }
  }

  park<D, L::kLdF>(f_s, dk_acc, scale, r, c0);
  __syncwarp();
  store_rows<T, D, L::kLdF>(dk + kv_off, f_s, n0 + warp * 16, seq_len, lane);
  __syncwarp();
  park<D, L::kLdF>(f_s, dv_acc, 1.0f, r, c0);
  __syncwarp();
  store_rows<T, D, L::kLdF>(dv + kv_off, f_s, n0 + warp * 16, seq_len, lane);
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

int cdiv(int a, int b) { return (a + b - 1) / b; }

template <typename T, int D>
cudaError_t launch_fwd(const void* q, const void* k, const void* v, void* out, float* lse, const Shape& s,
                       float scale, cudaStream_t stream) {
  constexpr int BR = Tiles<T, D>::kBR, BS = Tiles<T, D>::kBS;
  using L = Layout<T, D, BR, BS>;
  auto kernel = fwd_kernel<T, D, BR, BS>;
  if (cudaError_t err = allow_smem(kernel, L::kFwdBytes); err != cudaSuccess) return err;
  const dim3 grid(cdiv(s.seq_len, BR), s.batch * s.heads);
  kernel<<<grid, L::kThreads, L::kFwdBytes, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), lse,
      s.heads, s.heads / s.kv_heads, s.seq_len, scale * kLog2e);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, float* delta, void* dq, void* dk, void* dv, const Shape& s, float scale,
                       cudaStream_t stream) {
  constexpr int BR = Tiles<T, D>::kBR, BS = Tiles<T, D>::kBS;
  using L = Layout<T, D, BR, BS>;
  const long long rows = static_cast<long long>(s.batch) * s.heads * s.seq_len;
  constexpr int kDeltaRowsPerBlock = 8;
  delta_kernel<T, D><<<static_cast<unsigned>((rows + kDeltaRowsPerBlock - 1) / kDeltaRowsPerBlock),
                       kDeltaRowsPerBlock * 32, 0, stream>>>(static_cast<const T*>(out),
                                                             static_cast<const T*>(grad_out), delta, rows);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  const int group = s.heads / s.kv_heads;
  auto dkdv = dkdv_kernel<T, D, BR, BS>;
  if (cudaError_t err = allow_smem(dkdv, L::kDkvBytes); err != cudaSuccess) return err;
  dkdv<<<dim3(cdiv(s.seq_len, BR), s.batch * s.kv_heads), L::kThreads, L::kDkvBytes, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(grad_out),
      lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), group, s.seq_len, scale * kLog2e, scale);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  auto dqk = dq_kernel<T, D, BR, BS>;
  if (cudaError_t err = allow_smem(dqk, L::kDqBytes); err != cudaSuccess) return err;
  dqk<<<dim3(cdiv(s.seq_len, BR), s.batch * s.heads), L::kThreads, L::kDqBytes, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(grad_out),
      lse, delta, static_cast<T*>(dq), s.heads, group, s.seq_len, scale * kLog2e, scale);
  return cudaGetLastError();
}

// Calls f.template operator()<T, D>() for the runtime dtype and head_dim.
template <typename F>
cudaError_t dispatch(DType dtype, int head_dim, F&& f) {
  if (dtype == DType::kBFloat16) {
    switch (head_dim) {
      case 32: return f.template operator()<bf16, 32>();
      case 64: return f.template operator()<bf16, 64>();
      case 128: return f.template operator()<bf16, 128>();
    }
  } else {
    switch (head_dim) {
      case 32: return f.template operator()<float, 32>();
      case 64: return f.template operator()<float, 64>();
      case 128: return f.template operator()<float, 128>();
    }
  }
  return cudaErrorInvalidValue;
}

// The launches as functors over <T, D>, for `dispatch`.
struct FwdLaunch {
  const void *q, *k, *v;
  void* out;
  float* lse;
  Shape s;
  float scale;
  cudaStream_t stream;
  template <typename T, int D>
  cudaError_t operator()() const {
    return launch_fwd<T, D>(q, k, v, out, lse, s, scale, stream);
  }
};

struct BwdLaunch {
  const void *grad_out, *q, *k, *v, *out;
  const float* lse;
  float* delta;
  void *dq, *dk, *dv;
  Shape s;
  float scale;
  cudaStream_t stream;
  template <typename T, int D>
  cudaError_t operator()() const {
    return launch_bwd<T, D>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, s, scale, stream);
  }
};

}  // namespace

cudaError_t attention_fwd_cuda(const void* q, const void* k, const void* v, void* out, float* lse, Shape shape,
                               float scale, DType dtype, cudaStream_t stream) {
  return dispatch(dtype, shape.head_dim, FwdLaunch{q, k, v, out, lse, shape, scale, stream});
}

cudaError_t attention_bwd_cuda(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, float* delta, void* dq, void* dk, void* dv, Shape shape, float scale,
                               DType dtype, cudaStream_t stream) {
  return dispatch(dtype, shape.head_dim,
                  BwdLaunch{grad_out, q, k, v, out, lse, delta, dq, dk, dv, shape, scale, stream});
}

}  // namespace attention
}  // namespace sslscale
