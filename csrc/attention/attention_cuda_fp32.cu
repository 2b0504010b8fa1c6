// Causal (grouped-query) attention for fp32 data on CUDA cores: exact fp32 products, FlashAttention-2 scheme.
//
// The reference-accuracy path (bf16 goes to the tensor-core kernels of attention_cuda.cu). Each kernel keeps one
// "resident" tile of BR = 32 rows in shared memory (queries for the forward and dQ, keys/values for dK/dV) and
// streams tiles of BS = 32 rows of the other side past it; each warp owns 16 resident rows. Products are warp-level
// 16 x N GEMMs into an fp32 scratch, followed by an element phase in which lane l handles row l/2, columns
// (l%2) + 2j, so the two lanes of a row reduce with one shuffle. Running accumulators stay in registers.
//
// Forward: online softmax in base 2 (log2 e folded into the scale); keeps only out and lse.
// Backward: dK/dV per (key tile, batch, kv head), looping over the group's query heads and the query tiles at/after
// the diagonal (written once, no atomics); dQ per (query tile, batch, head): deterministic.
// Tiles wholly above the diagonal are never visited (loop bounds); only tiles straddling it are masked.
// Rows past seq_len are zero-filled on load; in the backward their lse is +inf, so their probabilities are 0.

#include "attention_cuda_common.cuh"

#include <cstddef>
#include <cstdint>

namespace sslscale {
namespace attention {
namespace {

using namespace detail;

constexpr int kBR = 32;  // resident rows per block (2 warps)
constexpr int kBS = 32;  // streamed rows per step

template <int D>
struct Layout {
  static constexpr int kWarps = kBR / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLdT = D + 4;                       // tile rows (floats): 16-byte aligned, bank-shifted
  static constexpr int kLdP = kBS + 4;                     // P / dS rows
  static constexpr int kLdF = (D > kBS ? D : kBS) + 4;     // GEMM result rows
  static constexpr size_t kTileR = align128(sizeof(float) * kBR * kLdT);
  static constexpr size_t kTileS = align128(sizeof(float) * kBS * kLdT);
  static constexpr size_t kScratch = align128(sizeof(float) * 16 * kLdF);
  static constexpr size_t kPBuf = align128(sizeof(float) * 16 * kLdP);
  static constexpr size_t kStats = align128(sizeof(float) * kBS);
  static constexpr size_t kFwdBytes = kTileR + 2 * kTileS + kWarps * (kScratch + kPBuf);
  static constexpr size_t kDqBytes = 2 * kTileR + 2 * kTileS + kWarps * (kScratch + kPBuf);
  static constexpr size_t kDkvBytes = 2 * kTileR + 2 * kTileS + 2 * kStats + kWarps * (kScratch + 2 * kPBuf);
};

// Rows [row0, row0 + ROWS) of one head (row stride st floats) into shared memory (leading dimension LD) with
// 16-byte vectors; rows past seq_len become zeros. Whole block participates.
template <int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ src, long long st, int row0,
                                          int seq_len) {
  constexpr int kChunks = D / 4;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += blockDim.x) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * 4;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < seq_len) val = *reinterpret_cast<const float4*>(src + (row0 + r) * st + c);
    *reinterpret_cast<float4*>(dst + r * LD + c) = val;
  }
}

// One warp: C[16 x N] (ldc) = A[16 x K] (row-major, lda) * B, where B is K x N row-major (B_TRANS false,
// B[k * ldb + n]) or given as its N x K transpose (B_TRANS true, B[n * ldb + k]).
template <int N, int K, bool B_TRANS>
__device__ __forceinline__ void warp_gemm(float* C, int ldc, const float* A, int lda, const float* B, int ldb) {
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

// One warp writes its 16 rows (in `f`, ld LDF) to rows [row0, row0 + 16) of one head (row stride st).
template <int D, int LDF>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, long long st, const float* f, int row0,
                                           int seq_len, int lane) {
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = idx / D;
    const int c = idx % D;
    if (row0 + r < seq_len) dst[(row0 + r) * st + c] = f[r * LDF + c];
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

template <int D>
__global__ void __launch_bounds__(Layout<D>::kThreads)
    fwd_simt_kernel(Operand q, Operand k, Operand v, Operand out, float* __restrict__ lse, int heads, int group,
                    int seq_len, float qk2) {
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* q_s = reinterpret_cast<float*>(smem);
  float* k_s = reinterpret_cast<float*>(smem + L::kTileR);
  float* v_s = reinterpret_cast<float*>(smem + L::kTileR + L::kTileS);
  unsigned char* mine = smem + L::kTileR + 2 * L::kTileS + warp * (L::kScratch + L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  float* p_s = reinterpret_cast<float*>(mine + L::kScratch);

  const TileOf at = tile_of(cdiv(seq_len, kBR), true);  // longest rows first
  const int m0 = at.tile * kBR;
  const int b = static_cast<int>(at.head / heads), h = static_cast<int>(at.head % heads);
  const float* q_h = head_ptr<const float>(q, b, h);
  const float* k_h = head_ptr<const float>(k, b, h / group);
  const float* v_h = head_ptr<const float>(v, b, h / group);
  load_tile<D, kBR, L::kLdT>(q_s, q_h, q.st, m0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int row = m0 + warp * 16 + r;
  const float* q_w = q_s + warp * 16 * L::kLdT;
  float m_i = -INFINITY, l_i = 0.0f;
  float o[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o[j] = 0.0f;

  const int end = min(m0 + kBR, seq_len);
  for (int n0 = 0; n0 < end; n0 += kBS) {
    const bool masked = n0 >= m0;  // the tiles straddling the diagonal
    __syncthreads();               // everyone is done with the previous K/V tile
    load_tile<D, kBS, L::kLdT>(k_s, k_h, k.st, n0, seq_len);
    load_tile<D, kBS, L::kLdT>(v_s, v_h, v.st, n0, seq_len);
    __syncthreads();

    warp_gemm<kBS, D, true>(f_s, L::kLdF, q_w, L::kLdT, k_s, L::kLdT);  // S = Q K^T
    __syncwarp();
    float s[kBS / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBS / 2; ++j) {
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
    for (int j = 0; j < kBS / 2; ++j) {
      const float p = exp2f(s[j] - m_use);
      sum += p;
      p_s[r * L::kLdP + c0 + 2 * j] = p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
#pragma unroll
    for (int j = 0; j < D / 2; ++j) o[j] *= alpha;
    __syncwarp();

    warp_gemm<D, kBS, false>(f_s, L::kLdF, p_s, L::kLdP, v_s, L::kLdT);  // P V
    __syncwarp();
    accumulate<D, L::kLdF>(o, f_s, r, c0);
    __syncwarp();
  }

  park<D, L::kLdF>(f_s, o, l_i > 0.0f ? 1.0f / l_i : 0.0f, r, c0);
  if (c0 == 0 && row < seq_len) lse[at.head * seq_len + row] = (m_i + log2f(l_i)) * kLn2;
  __syncwarp();
  store_rows<D, L::kLdF>(head_ptr<float>(out, b, h), out.st, f_s, m0 + warp * 16, seq_len, lane);
}

template <int D>
__global__ void __launch_bounds__(Layout<D>::kThreads)
    dq_simt_kernel(Operand q, Operand k, Operand v, Operand grad_out, const float* __restrict__ lse,
                   const float* __restrict__ delta, Operand dq, int heads, int group, int seq_len, float qk2,
                   float scale) {
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* q_s = reinterpret_cast<float*>(smem);
  float* do_s = reinterpret_cast<float*>(smem + L::kTileR);
  float* k_s = reinterpret_cast<float*>(smem + 2 * L::kTileR);
  float* v_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + L::kTileS);
  unsigned char* mine = smem + 2 * L::kTileR + 2 * L::kTileS + warp * (L::kScratch + L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  float* ds_s = reinterpret_cast<float*>(mine + L::kScratch);

  const TileOf at = tile_of(cdiv(seq_len, kBR), true);
  const int m0 = at.tile * kBR;
  const int b = static_cast<int>(at.head / heads), h = static_cast<int>(at.head % heads);
  const float* k_h = head_ptr<const float>(k, b, h / group);
  const float* v_h = head_ptr<const float>(v, b, h / group);
  load_tile<D, kBR, L::kLdT>(q_s, head_ptr<const float>(q, b, h), q.st, m0, seq_len);
  load_tile<D, kBR, L::kLdT>(do_s, head_ptr<const float>(grad_out, b, h), grad_out.st, m0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int row = m0 + warp * 16 + r;
  const bool valid = row < seq_len;
  const float lse2 = valid ? lse[at.head * seq_len + row] * kLog2e : INFINITY;
  const float dlt = valid ? delta[at.head * seq_len + row] : 0.0f;
  const float* q_w = q_s + warp * 16 * L::kLdT;
  const float* do_w = do_s + warp * 16 * L::kLdT;
  float acc[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) acc[j] = 0.0f;

  const int end = min(m0 + kBR, seq_len);
  for (int n0 = 0; n0 < end; n0 += kBS) {
    const bool masked = n0 >= m0;
    __syncthreads();
    load_tile<D, kBS, L::kLdT>(k_s, k_h, k.st, n0, seq_len);
    load_tile<D, kBS, L::kLdT>(v_s, v_h, v.st, n0, seq_len);
    __syncthreads();

    warp_gemm<kBS, D, true>(f_s, L::kLdF, q_w, L::kLdT, k_s, L::kLdT);  // S = Q K^T
    __syncwarp();
    float p[kBS / 2];
#pragma unroll
    for (int j = 0; j < kBS / 2; ++j) {
      const int col = c0 + 2 * j;
      float x = f_s[r * L::kLdF + col] * qk2 - lse2;
      if (masked && n0 + col > row) x = -INFINITY;
      p[j] = exp2f(x);
    }
    __syncwarp();

    warp_gemm<kBS, D, true>(f_s, L::kLdF, do_w, L::kLdT, v_s, L::kLdT);  // dP = dO V^T
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kBS / 2; ++j) {
      const int col = c0 + 2 * j;
      ds_s[r * L::kLdP + col] = p[j] * (f_s[r * L::kLdF + col] - dlt);
    }
    __syncwarp();

    warp_gemm<D, kBS, false>(f_s, L::kLdF, ds_s, L::kLdP, k_s, L::kLdT);  // dS K
    __syncwarp();
    accumulate<D, L::kLdF>(acc, f_s, r, c0);
    __syncwarp();
  }

  park<D, L::kLdF>(f_s, acc, scale, r, c0);
  __syncwarp();
  store_rows<D, L::kLdF>(head_ptr<float>(dq, b, h), dq.st, f_s, m0 + warp * 16, seq_len, lane);
}

template <int D>
__global__ void __launch_bounds__(Layout<D>::kThreads)
    dkdv_simt_kernel(Operand q, Operand k, Operand v, Operand grad_out, const float* __restrict__ lse,
                     const float* __restrict__ delta, Operand dk, Operand dv, int heads, int kv_heads, int seq_len,
                     float qk2, float scale) {
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* k_s = reinterpret_cast<float*>(smem);
  float* v_s = reinterpret_cast<float*>(smem + L::kTileR);
  float* q_s = reinterpret_cast<float*>(smem + 2 * L::kTileR);
  float* do_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + L::kTileS);
  float* lse_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + 2 * L::kTileS);
  float* dlt_s = reinterpret_cast<float*>(smem + 2 * L::kTileR + 2 * L::kTileS + L::kStats);
  unsigned char* mine = smem + 2 * L::kTileR + 2 * L::kTileS + 2 * L::kStats + warp * (L::kScratch + 2 * L::kPBuf);
  float* f_s = reinterpret_cast<float*>(mine);
  float* p_s = reinterpret_cast<float*>(mine + L::kScratch);
  float* ds_s = reinterpret_cast<float*>(mine + L::kScratch + L::kPBuf);

  const TileOf at = tile_of(cdiv(seq_len, kBR), false);  // key tile 0 sees the most queries: launched first
  const int n0 = at.tile * kBR;
  const int b = static_cast<int>(at.head / kv_heads), hk = static_cast<int>(at.head % kv_heads);
  const int group = heads / kv_heads;
  load_tile<D, kBR, L::kLdT>(k_s, head_ptr<const float>(k, b, hk), k.st, n0, seq_len);
  load_tile<D, kBR, L::kLdT>(v_s, head_ptr<const float>(v, b, hk), v.st, n0, seq_len);

  const int r = lane >> 1, c0 = lane & 1;
  const int key = n0 + warp * 16 + r;
  const float* k_w = k_s + warp * 16 * L::kLdT;
  const float* v_w = v_s + warp * 16 * L::kLdT;
  float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
  for (int j = 0; j < D / 2; ++j) dk_acc[j] = dv_acc[j] = 0.0f;

  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    const long long bh = static_cast<long long>(b) * heads + h;
    const float* q_h = head_ptr<const float>(q, b, h);
    const float* do_h = head_ptr<const float>(grad_out, b, h);
    const float* lse_h = lse + bh * seq_len;
    const float* delta_h = delta + bh * seq_len;
    for (int m0 = n0; m0 < seq_len; m0 += kBS) {  // query tiles from the diagonal on
      const bool masked = m0 < n0 + kBR;
      __syncthreads();
      load_tile<D, kBS, L::kLdT>(q_s, q_h, q.st, m0, seq_len);
      load_tile<D, kBS, L::kLdT>(do_s, do_h, grad_out.st, m0, seq_len);
      for (int i = threadIdx.x; i < kBS; i += blockDim.x) {
        const bool ok = m0 + i < seq_len;
        lse_s[i] = ok ? lse_h[m0 + i] * kLog2e : INFINITY;
        dlt_s[i] = ok ? delta_h[m0 + i] : 0.0f;
      }
      __syncthreads();

      warp_gemm<kBS, D, true>(f_s, L::kLdF, k_w, L::kLdT, q_s, L::kLdT);  // S^T = K Q^T
      __syncwarp();
      float p[kBS / 2];
#pragma unroll
      for (int j = 0; j < kBS / 2; ++j) {
        const int col = c0 + 2 * j;
        float x = f_s[r * L::kLdF + col] * qk2 - lse_s[col];
        if (masked && m0 + col < key) x = -INFINITY;
        p[j] = exp2f(x);
        p_s[r * L::kLdP + col] = p[j];
      }
      __syncwarp();

      warp_gemm<kBS, D, true>(f_s, L::kLdF, v_w, L::kLdT, do_s, L::kLdT);  // dP^T = V dO^T
      __syncwarp();
#pragma unroll
      for (int j = 0; j < kBS / 2; ++j) {
        const int col = c0 + 2 * j;
        ds_s[r * L::kLdP + col] = p[j] * (f_s[r * L::kLdF + col] - dlt_s[col]);
      }
      __syncwarp();

      warp_gemm<D, kBS, false>(f_s, L::kLdF, p_s, L::kLdP, do_s, L::kLdT);  // P^T dO
      __syncwarp();
      accumulate<D, L::kLdF>(dv_acc, f_s, r, c0);
      __syncwarp();
      warp_gemm<D, kBS, false>(f_s, L::kLdF, ds_s, L::kLdP, q_s, L::kLdT);  // dS^T Q
      __syncwarp();
      accumulate<D, L::kLdF>(dk_acc, f_s, r, c0);
      __syncwarp();
    }
  }

  park<D, L::kLdF>(f_s, dk_acc, scale, r, c0);
  __syncwarp();
  store_rows<D, L::kLdF>(head_ptr<float>(dk, b, hk), dk.st, f_s, n0 + warp * 16, seq_len, lane);
  __syncwarp();
  park<D, L::kLdF>(f_s, dv_acc, 1.0f, r, c0);
  __syncwarp();
  store_rows<D, L::kLdF>(head_ptr<float>(dv, b, hk), dv.st, f_s, n0 + warp * 16, seq_len, lane);
}

long long blocks(int tiles, int batch, int heads) { return static_cast<long long>(tiles) * batch * heads; }

template <int D>
cudaError_t fwd_d(const Operand& q, const Operand& k, const Operand& v, const Operand& out, float* lse,
                  const Shape& s, float scale, cudaStream_t stream) {
  using L = Layout<D>;
  if (cudaError_t err = allow_smem(fwd_simt_kernel<D>, L::kFwdBytes); err != cudaSuccess) return err;
  fwd_simt_kernel<D><<<blocks(cdiv(s.seq_len, kBR), s.batch, s.heads), L::kThreads, L::kFwdBytes, stream>>>(
      q, k, v, out, lse, s.heads, s.heads / s.kv_heads, s.seq_len, scale * kLog2e);
  return cudaGetLastError();
}

template <int D>
cudaError_t bwd_d(const Operand& grad_out, const Operand& q, const Operand& k, const Operand& v, const Operand& out,
                  const float* lse, float* delta, const Operand& dq, const Operand& dk, const Operand& dv,
                  const Shape& s, float scale, cudaStream_t stream) {
  using L = Layout<D>;
  if (cudaError_t err = launch_delta<float, D>(out, grad_out, delta, s, stream); err != cudaSuccess) return err;
  if (cudaError_t err = allow_smem(dkdv_simt_kernel<D>, L::kDkvBytes); err != cudaSuccess) return err;
  dkdv_simt_kernel<D><<<blocks(cdiv(s.seq_len, kBR), s.batch, s.kv_heads), L::kThreads, L::kDkvBytes, stream>>>(
      q, k, v, grad_out, lse, delta, dk, dv, s.heads, s.kv_heads, s.seq_len, scale * kLog2e, scale);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (cudaError_t err = allow_smem(dq_simt_kernel<D>, L::kDqBytes); err != cudaSuccess) return err;
  dq_simt_kernel<D><<<blocks(cdiv(s.seq_len, kBR), s.batch, s.heads), L::kThreads, L::kDqBytes, stream>>>(
      q, k, v, grad_out, lse, delta, dq, s.heads, s.heads / s.kv_heads, s.seq_len, scale * kLog2e, scale);
  return cudaGetLastError();
}

template <int D>
int describe_d(const Shape& s, LaunchInfo* out, int capacity) {
  using L = Layout<D>;
  const LaunchInfo all[] = {
      {"fwd_simt_kernel", 32, D, kBR, kBS, L::kThreads, L::kFwdBytes, blocks(cdiv(s.seq_len, kBR), s.batch, s.heads)},
      {"dkdv_simt_kernel", 32, D, kBR, kBS, L::kThreads, L::kDkvBytes,
       blocks(cdiv(s.seq_len, kBR), s.batch, s.kv_heads)},
      {"dq_simt_kernel", 32, D, kBR, kBS, L::kThreads, L::kDqBytes, blocks(cdiv(s.seq_len, kBR), s.batch, s.heads)},
  };
  int n = 0;
  for (const LaunchInfo& info : all)
    if (n < capacity) out[n++] = info;
  return n;
}

}  // namespace

cudaError_t attention_fwd_fp32(const Operand& q, const Operand& k, const Operand& v, const Operand& out, float* lse,
                               const Shape& s, float scale, cudaStream_t stream) {
  switch (s.head_dim) {
    case 32: return fwd_d<32>(q, k, v, out, lse, s, scale, stream);
    case 64: return fwd_d<64>(q, k, v, out, lse, s, scale, stream);
    case 128: return fwd_d<128>(q, k, v, out, lse, s, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_bwd_fp32(const Operand& grad_out, const Operand& q, const Operand& k, const Operand& v,
                               const Operand& out, const float* lse, float* delta, const Operand& dq,
                               const Operand& dk, const Operand& dv, const Shape& s, float scale,
                               cudaStream_t stream) {
  switch (s.head_dim) {
    case 32: return bwd_d<32>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, s, scale, stream);
    case 64: return bwd_d<64>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, s, scale, stream);
    case 128: return bwd_d<128>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, s, scale, stream);
  }
  return cudaErrorInvalidValue;
}

int attention_describe_fp32(const Shape& s, LaunchInfo* out, int capacity) {
  switch (s.head_dim) {
    case 32: return describe_d<32>(s, out, capacity);
    case 64: return describe_d<64>(s, out, capacity);
    case 128: return describe_d<128>(s, out, capacity);
  }
  return 0;
}

}  // namespace attention
}  // namespace sslscale
