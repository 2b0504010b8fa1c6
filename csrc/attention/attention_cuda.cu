// Fused causal (grouped-query) attention for bf16 on the tensor cores, FlashAttention-2 style.
//
// Building blocks (csrc/cuda_common/warp_mma.cuh): mma.sync m16n8k16 (fp32 accumulation), ldmatrix, cp.async.
// Every tile lives in shared memory with rows padded by 16 bytes (conflict-free ldmatrix); every product's
// accumulator lives in registers, in the mma fragment layout (lane g = lane/4 holds rows g and g+8, lane t =
// lane%4 columns 2t, 2t+1 of each 8-column block).
//
// Forward, one block per (query tile, batch, head), each warp owning 16 query rows: Q is loaded once into
// A fragments; K/V tiles stream through a two-stage cp.async pipeline. S = Q K^T (K as the "col" B operand,
// ldmatrix), online softmax in base 2 on the accumulators (row statistics reduced across the four lanes of a row),
// then O += P V with P repacked from S's accumulators straight into A fragments (no shared-memory round trip) and V
// through ldmatrix.trans. The output goes out through shared memory as 16-byte rows; lse is kept for the backward.
//
// Backward, one block per (key tile, batch, kv head), each warp owning 16 keys, streaming the query tiles at/after
// the diagonal of every query head of the group (two-stage cp.async pipeline for Q and dO): five products per step,
//   S^T = K Q^T,  dP^T = V dO^T,  dV += P^T dO,  dK += dS^T Q   (register accumulators, P^T / dS^T repacked as A)
//   dQ += dS K                                                  (dS^T staged in shared memory, read transposed)
// with dQ added into an fp32 workspace by atomics (one float2 per lane and step on sm_90) and scaled / cast to bf16
// by a finishing kernel. dK and dV are written once per block, no atomics.
//
// Tiles wholly above the diagonal are never visited (loop bounds); only tiles straddling it are masked. Rows past
// seq_len are zero-filled by cp.async; their lse is +inf in the backward, so their probabilities are 0.

#include "attention_cuda_common.cuh"

#include "cuda_common/warp_mma.cuh"

#include <cstddef>
#include <cstdint>

namespace sslscale {
namespace attention {
namespace {

using namespace detail;
namespace wm = ::sslscale::mma;

// Forward tiles: WARPS x 16 query rows against BN-key tiles.
template <int D>
struct FwdCfg {
  static constexpr int kWarps = D == 128 ? 4 : 8;
  static constexpr int BM = 16 * kWarps;
  static constexpr int BN = 64;
  static constexpr int kThreads = 32 * kWarps;
  // two resident blocks per SM where that costs no spills (head_dim 64 would need <= 128 registers: it spills)
  static constexpr int kMinBlocks = D == 64 ? 1 : 2;
  static constexpr int LD = D + 8;  // bf16 elements per shared-memory row (16 bytes of padding)
  static constexpr int kQ = BM * LD, kKV = BN * LD;
  static constexpr size_t kSmem = sizeof(bf16) * (kQ + 4 * kKV);  // Q | K[2] | V[2]
};

// Backward tiles: WARPS x 16 keys per block, BM-query steps; dQ per step split into (16-row, DQC-column) tasks.
template <int D>
struct BwdCfg {
  static constexpr int kWarps = 4;
  static constexpr int BN = 16 * kWarps;  // keys per block
  static constexpr int BM = D == 128 ? 32 : 64;  // queries per step
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int LD = D + 8;
  static constexpr int LDS = BM + 8;  // dS^T rows (keys) of BM queries
  static constexpr int DQC = D < 64 ? D : 64;  // dQ columns per task
  static constexpr int kTasks = (BM / 16) * (D / DQC);
  static constexpr int kKV = BN * LD, kQ = BM * LD;
  // K | V | Q[2] | dO[2] | dS^T | lse[2] | delta[2]
  static constexpr size_t kSmem = sizeof(bf16) * (2 * kKV + 4 * kQ + BN * LDS) + sizeof(float) * 4 * BM;
};

// Rows [row0, row0 + ROWS) of one head (row stride st) into shared memory rows of LD elements, asynchronously
// (16-byte cp.async); rows past seq_len are zero-filled. Whole block participates; the caller commits.
template <int D, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void async_rows(bf16* dst, const bf16* src, long long st, int row0, int seq_len) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const int row = row0 + r;
    const bool ok = row < seq_len;
    wm::cp_async_16(dst + r * LD + c, src + static_cast<long long>(ok ? row : 0) * st + c, ok);
  }
}

// A warp's 16 rows of fp32 accumulators acc[D/8][4] -> bf16 in shared memory (rows r0.., leading dimension LD).
template <int D, int LD>
__device__ __forceinline__ void park_rows(bf16* tile, const float (&acc)[D / 8][4], float mult, int r0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    const int c = nb * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(tile + (r0 + g) * LD + c) = wm::pack2<bf16>(acc[nb][0] * mult, acc[nb][1] * mult);
    *reinterpret_cast<uint32_t*>(tile + (r0 + g + 8) * LD + c) =
        wm::pack2<bf16>(acc[nb][2] * mult, acc[nb][3] * mult);
  }
}

// A warp copies its 16 parked rows to global rows [row0, row0 + 16) (row stride st) as 16-byte vectors.
template <int D, int LD>
__device__ __forceinline__ void store_rows(bf16* dst, long long st, const bf16* tile, int r0, int row0, int seq_len,
                                           int lane) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    if (row0 + r < seq_len)
      *reinterpret_cast<uint4*>(dst + (row0 + r) * st + c) = *reinterpret_cast<const uint4*>(tile + (r0 + r) * LD + c);
  }
}

template <int D>
__global__ void __launch_bounds__(FwdCfg<D>::kThreads, FwdCfg<D>::kMinBlocks)
    fwd_mma_kernel(Operand q, Operand k, Operand v, Operand out, float* __restrict__ lse, int heads, int group,
                   int seq_len, float qk2) {
  using C = FwdCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* q_s = reinterpret_cast<bf16*>(smem);
  bf16* k_s = q_s + C::kQ;        // two stages of BN x LD
  bf16* v_s = k_s + 2 * C::kKV;   // two stages of BN x LD
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  const TileOf at = tile_of(cdiv(seq_len, BM), true);  // each head's longest query tiles first
  const int m0 = at.tile * BM;
  const int b = static_cast<int>(at.head / heads), h = static_cast<int>(at.head % heads);
  const bf16* q_h = head_ptr<const bf16>(q, b, h);
  const bf16* k_h = head_ptr<const bf16>(k, b, h / group);
  const bf16* v_h = head_ptr<const bf16>(v, b, h / group);

  const int n_kv = cdiv(min(m0 + BM, seq_len), BN);  // key tiles at or left of the diagonal
  async_rows<D, BM, LD, C::kThreads>(q_s, q_h, q.st, m0, seq_len);
  async_rows<D, BN, LD, C::kThreads>(k_s, k_h, k.st, 0, seq_len);
  async_rows<D, BN, LD, C::kThreads>(v_s, v_h, v.st, 0, seq_len);
  wm::cp_async_commit();

  const int row0 = m0 + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
  float o[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};  // l_i: this lane's partial row sums
  uint32_t qf[D / 16][4];

  for (int j = 0; j < n_kv; ++j) {
    const int stage = j & 1;
    if (j + 1 < n_kv) {  // prefetch the next K/V tile into the other stage
      async_rows<D, BN, LD, C::kThreads>(k_s + (stage ^ 1) * C::kKV, k_h, k.st, (j + 1) * BN, seq_len);
      async_rows<D, BN, LD, C::kThreads>(v_s + (stage ^ 1) * C::kKV, v_h, v.st, (j + 1) * BN, seq_len);
    }
    wm::cp_async_commit();
    wm::cp_async_wait<1>();  // everything but the newest group: tile j (and Q) have landed
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kb = 0; kb < D / 16; ++kb) wm::ldmatrix_x4(qf[kb], wm::a_addr(q_s, LD, warp * 16, kb * 16, lane));
    }
    const bf16* ks = k_s + stage * C::kKV;
    const bf16* vs = v_s + stage * C::kKV;

    float s[BN / 8][4];
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
#pragma unroll
      for (int kb = 0; kb < D / 16; ++kb) {
        uint32_t bf[4];
        wm::ldmatrix_x4(bf, wm::bt_addr(ks, LD, nb2 * 16, kb * 16, lane));
        wm::mma_16816<bf16>(s[2 * nb2], qf[kb], bf[0], bf[1]);
        wm::mma_16816<bf16>(s[2 * nb2 + 1], qf[kb], bf[2], bf[3]);
      }
    }

    const int n0 = j * BN;
    const bool masked = n0 + BN > m0;  // the tile may hold keys right of some row of this block
    float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + nb * 8 + 2 * t + (e & 1);
        const int row = row0 + (e >> 1) * 8;
        float x = s[nb][e] * qk2;
        if (masked && col > row) x = -INFINITY;
        s[nb][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = wm::quad_max(mx[r]);  // every row sees key 0 in tile 0, so the max is finite from then on
      alpha[r] = exp2f(m_i[r] - mx[r]);
      m_i[r] = mx[r];
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nb][e] - m_i[e >> 1]);
        s[nb][e] = p;
        l_i[e >> 1] += p;
      }
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      o[nb][0] *= alpha[0];
      o[nb][1] *= alpha[0];
      o[nb][2] *= alpha[1];
      o[nb][3] *= alpha[1];
    }
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {  // O += P V
      uint32_t pa[4];
      wm::acc_to_a<bf16, BN / 8>(pa, s, kb);
#pragma unroll
      for (int nb2 = 0; nb2 < D / 16; ++nb2) {
        uint32_t vf[4];
        wm::ldmatrix_x4_trans(vf, wm::b_trans_addr(vs, LD, kb * 16, nb2 * 16, lane));
        wm::mma_16816<bf16>(o[2 * nb2], pa, vf[0], vf[1]);
        wm::mma_16816<bf16>(o[2 * nb2 + 1], pa, vf[2], vf[3]);
      }
    }
    __syncthreads();  // everyone is done with this stage before the next iteration refills it
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = wm::quad_sum(l_i[r]);
    inv[r] = 1.f / l;
    const int row = row0 + r * 8;
    if (t == 0 && row < seq_len) lse[at.head * seq_len + row] = (m_i[r] + log2f(l)) * kLn2;
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    o[nb][0] *= inv[0];
    o[nb][1] *= inv[0];
    o[nb][2] *= inv[1];
    o[nb][3] *= inv[1];
  }
  // Q's shared rows of this warp are free (its fragments are in registers): stage the output there.
  park_rows<D, LD>(q_s, o, 1.f, warp * 16, lane);
  __syncwarp();
  store_rows<D, LD>(head_ptr<bf16>(out, b, h), out.st, q_s, warp * 16, m0 + warp * 16, seq_len, lane);
}

template <int D>
__global__ void __launch_bounds__(BwdCfg<D>::kThreads)
    bwd_mma_kernel(Operand q, Operand k, Operand v, Operand grad_out, const float* __restrict__ lse,
                   const float* __restrict__ delta, float* __restrict__ dq_acc, Operand dk, Operand dv, int heads,
                   int kv_heads, int seq_len, float qk2, float scale) {
  using C = BwdCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, LDS = C::LDS;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* k_s = reinterpret_cast<bf16*>(smem);
  bf16* v_s = k_s + C::kKV;
  bf16* q_s = v_s + C::kKV;        // two stages of BM x LD
  bf16* do_s = q_s + 2 * C::kQ;    // two stages of BM x LD
  bf16* ds_s = do_s + 2 * C::kQ;   // dS^T: BN keys x BM queries
  float* lse_s = reinterpret_cast<float*>(ds_s + BN * LDS);  // two stages of BM (times log2 e; +inf past T)
  float* dlt_s = lse_s + 2 * BM;                              // two stages of BM
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  const TileOf at = tile_of(cdiv(seq_len, BN), false);  // key tile 0 meets the most query tiles: first
  const int n0 = at.tile * BN;
  const int b = static_cast<int>(at.head / kv_heads), hk = static_cast<int>(at.head % kv_heads);
  const int group = heads / kv_heads;
  async_rows<D, BN, LD, C::kThreads>(k_s, head_ptr<const bf16>(k, b, hk), k.st, n0, seq_len);
  async_rows<D, BN, LD, C::kThreads>(v_s, head_ptr<const bf16>(v, b, hk), v.st, n0, seq_len);

  // Steps: every query head of the group x the query tiles from the one holding key n0 to the end.
  const int first_q = (n0 / BM) * BM;
  const int per_head = cdiv(seq_len - first_q, BM);
  const int steps = group * per_head;
  auto issue = [&](int step, int stage) {
    const int h = hk * group + step / per_head;
    const int q0 = first_q + (step % per_head) * BM;
    async_rows<D, BM, LD, C::kThreads>(q_s + stage * C::kQ, head_ptr<const bf16>(q, b, h), q.st, q0, seq_len);
    async_rows<D, BM, LD, C::kThreads>(do_s + stage * C::kQ, head_ptr<const bf16>(grad_out, b, h), grad_out.st,
                                       q0, seq_len);
    const long long stats = (static_cast<long long>(b) * heads + h) * seq_len;
    for (int i = threadIdx.x; i < BM; i += C::kThreads) {
      const bool ok = q0 + i < seq_len;
      lse_s[stage * BM + i] = ok ? lse[stats + q0 + i] * kLog2e : INFINITY;
      dlt_s[stage * BM + i] = ok ? delta[stats + q0 + i] : 0.f;
    }
  };
  issue(0, 0);
  wm::cp_async_commit();

  const int key0 = n0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nb][e] = dv_acc[nb][e] = 0.f;

  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < steps) issue(step + 1, stage ^ 1);
    wm::cp_async_commit();
    wm::cp_async_wait<1>();
    __syncthreads();  // this step's Q / dO / lse / delta (and, on step 0, K / V) are visible to every warp
    const int h = hk * group + step / per_head;
    const int q0 = first_q + (step % per_head) * BM;
    const bf16* qs = q_s + stage * C::kQ;
    const bf16* dos = do_s + stage * C::kQ;
    const float* lse2 = lse_s + stage * BM;
    const float* dlt = dlt_s + stage * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
    float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t kf[4], vf[4];
      wm::ldmatrix_x4(kf, wm::a_addr(k_s, LD, warp * 16, kb * 16, lane));
      wm::ldmatrix_x4(vf, wm::a_addr(v_s, LD, warp * 16, kb * 16, lane));
#pragma unroll
      for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
        uint32_t bq[4], bo[4];
        wm::ldmatrix_x4(bq, wm::bt_addr(qs, LD, nb2 * 16, kb * 16, lane));
        wm::ldmatrix_x4(bo, wm::bt_addr(dos, LD, nb2 * 16, kb * 16, lane));
        wm::mma_16816<bf16>(s[2 * nb2], kf, bq[0], bq[1]);
        wm::mma_16816<bf16>(s[2 * nb2 + 1], kf, bq[2], bq[3]);
        wm::mma_16816<bf16>(dp[2 * nb2], vf, bo[0], bo[1]);
        wm::mma_16816<bf16>(dp[2 * nb2 + 1], vf, bo[2], bo[3]);
      }
    }
    // P^T = exp2(S^T qk2 - lse2), dS^T = P^T (dP^T - delta); both overwrite their accumulators.
    const bool masked = q0 < n0 + BN;
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * t + (e & 1);  // query within the step
        const int key = key0 + (e >> 1) * 8;
        float x = s[nb][e] * qk2 - lse2[col];
        if (masked && q0 + col < key) x = -INFINITY;
        const float p = exp2f(x);
        s[nb][e] = p;
        dp[nb][e] = p * (dp[nb][e] - dlt[col]);
      }
    }
    // dV += P^T dO and dK += dS^T Q (queries are the reduction: dO and Q read transposed).
#pragma unroll
    for (int kb = 0; kb < BM / 16; ++kb) {
      uint32_t pa[4], da[4];
      wm::acc_to_a<bf16, BM / 8>(pa, s, kb);
      wm::acc_to_a<bf16, BM / 8>(da, dp, kb);
#pragma unroll
      for (int nb2 = 0; nb2 < D / 16; ++nb2) {
        uint32_t bo[4], bq[4];
        wm::ldmatrix_x4_trans(bo, wm::b_trans_addr(dos, LD, kb * 16, nb2 * 16, lane));
        wm::ldmatrix_x4_trans(bq, wm::b_trans_addr(qs, LD, kb * 16, nb2 * 16, lane));
        wm::mma_16816<bf16>(dv_acc[2 * nb2], pa, bo[0], bo[1]);
        wm::mma_16816<bf16>(dv_acc[2 * nb2 + 1], pa, bo[2], bo[3]);
        wm::mma_16816<bf16>(dk_acc[2 * nb2], da, bq[0], bq[1]);
        wm::mma_16816<bf16>(dk_acc[2 * nb2 + 1], da, bq[2], bq[3]);
      }
    }
    // dS^T of this warp's keys to shared memory, for dQ = dS K over all BN keys of the block.
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
      const int c = nb * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g) * LDS + c) = wm::pack2<bf16>(dp[nb][0], dp[nb][1]);
      *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g + 8) * LDS + c) = wm::pack2<bf16>(dp[nb][2], dp[nb][3]);
    }
    __syncthreads();
    float* dq_h = dq_acc + (static_cast<long long>(b) * heads + h) * seq_len * D;
    for (int task = warp; task < C::kTasks; task += C::kWarps) {
      const int strip = task / (D / C::DQC), col0 = (task % (D / C::DQC)) * C::DQC;
      float acc[C::DQC / 8][4];
#pragma unroll
      for (int nb = 0; nb < C::DQC / 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < BN / 16; ++kb) {
        uint32_t a[4];
        wm::ldmatrix_x4_trans(a, wm::a_trans_addr(ds_s, LDS, strip * 16, kb * 16, lane));
#pragma unroll
        for (int nb2 = 0; nb2 < C::DQC / 16; ++nb2) {
          uint32_t bk[4];
          wm::ldmatrix_x4_trans(bk, wm::b_trans_addr(k_s, LD, kb * 16, col0 + nb2 * 16, lane));
          wm::mma_16816<bf16>(acc[2 * nb2], a, bk[0], bk[1]);
          wm::mma_16816<bf16>(acc[2 * nb2 + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = q0 + strip * 16 + g + 8 * r;
        if (row >= seq_len) continue;
        float* dst = dq_h + static_cast<long long>(row) * D + col0 + 2 * t;
#pragma unroll
        for (int nb = 0; nb < C::DQC / 8; ++nb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(dst + nb * 8), make_float2(acc[nb][2 * r], acc[nb][2 * r + 1]));
#else
          atomicAdd(dst + nb * 8, acc[nb][2 * r]);
          atomicAdd(dst + nb * 8 + 1, acc[nb][2 * r + 1]);
#endif
        }
      }
    }
    __syncthreads();  // dS^T and this stage's buffers are free again
  }

  // dK (times scale) and dV out through the block's K / V shared rows (each warp its own 16 keys).
  park_rows<D, LD>(k_s, dk_acc, scale, warp * 16, lane);
  park_rows<D, LD>(v_s, dv_acc, 1.f, warp * 16, lane);
  __syncwarp();
  store_rows<D, LD>(head_ptr<bf16>(dk, b, hk), dk.st, k_s, warp * 16, n0 + warp * 16, seq_len, lane);
  store_rows<D, LD>(head_ptr<bf16>(dv, b, hk), dv.st, v_s, warp * 16, n0 + warp * 16, seq_len, lane);
}

// dq[b, h, t, :] = bf16(scale * dq_acc[b, h, t, :]), 8 features per thread.
template <int D>
__global__ void dq_finish_kernel(const float* __restrict__ dq_acc, Operand dq, int heads, int seq_len, float scale,
                                 long long chunks) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= chunks) return;
  const long long row = i / (D / 8);
  const int c = static_cast<int>(i % (D / 8)) * 8;
  const long long bh = row / seq_len;
  const int tt = static_cast<int>(row % seq_len);
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const float4 lo = *reinterpret_cast<const float4*>(dq_acc + row * D + c);
  const float4 hi = *reinterpret_cast<const float4*>(dq_acc + row * D + c + 4);
  uint4 packed;
  packed.x = wm::pack2<bf16>(lo.x * scale, lo.y * scale);
  packed.y = wm::pack2<bf16>(lo.z * scale, lo.w * scale);
  packed.z = wm::pack2<bf16>(hi.x * scale, hi.y * scale);
  packed.w = wm::pack2<bf16>(hi.z * scale, hi.w * scale);
  *reinterpret_cast<uint4*>(head_ptr<bf16>(dq, b, h) + tt * dq.st + c) = packed;
}

constexpr int kFinishThreads = 256;

long long blocks(int tiles, int batch, int heads) { return static_cast<long long>(tiles) * batch * heads; }

long long dq_chunks(const Shape& s) {
  return static_cast<long long>(s.batch) * s.heads * s.seq_len * (s.head_dim / 8);
}

template <int D>
cudaError_t fwd_d(const Operand& q, const Operand& k, const Operand& v, const Operand& out, float* lse,
                  const Shape& s, float scale, cudaStream_t stream) {
  using C = FwdCfg<D>;
  if (cudaError_t err = allow_smem(fwd_mma_kernel<D>, C::kSmem); err != cudaSuccess) return err;
  fwd_mma_kernel<D><<<blocks(cdiv(s.seq_len, C::BM), s.batch, s.heads), C::kThreads, C::kSmem, stream>>>(
      q, k, v, out, lse, s.heads, s.heads / s.kv_heads, s.seq_len, scale * kLog2e);
  return cudaGetLastError();
}

template <int D>
cudaError_t bwd_d(const Operand& grad_out, const Operand& q, const Operand& k, const Operand& v, const Operand& out,
                  const float* lse, float* delta, float* dq_acc, const Operand& dq, const Operand& dk,
                  const Operand& dv, const Shape& s, float scale, cudaStream_t stream) {
  using C = BwdCfg<D>;
  const size_t acc_bytes = sizeof(float) * static_cast<size_t>(dq_chunks(s)) * 8;
  if (cudaError_t err = cudaMemsetAsync(dq_acc, 0, acc_bytes, stream); err != cudaSuccess) return err;
  if (cudaError_t err = launch_delta<bf16, D>(out, grad_out, delta, s, stream); err != cudaSuccess) return err;
  if (cudaError_t err = allow_smem(bwd_mma_kernel<D>, C::kSmem); err != cudaSuccess) return err;
  bwd_mma_kernel<D><<<blocks(cdiv(s.seq_len, C::BN), s.batch, s.kv_heads), C::kThreads, C::kSmem, stream>>>(
      q, k, v, grad_out, lse, delta, dq_acc, dk, dv, s.heads, s.kv_heads, s.seq_len, scale * kLog2e, scale);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const long long chunks = dq_chunks(s);
  dq_finish_kernel<D><<<static_cast<unsigned>((chunks + kFinishThreads - 1) / kFinishThreads), kFinishThreads, 0,
                        stream>>>(dq_acc, dq, s.heads, s.seq_len, scale, chunks);
  return cudaGetLastError();
}

template <int D>
int describe_d(const Shape& s, LaunchInfo* out, int capacity) {
  using F = FwdCfg<D>;
  using B = BwdCfg<D>;
  const long long chunks = dq_chunks(s);
  const LaunchInfo all[] = {
      {"fwd_mma_kernel", 16, D, F::BM, F::BN, F::kThreads, F::kSmem, blocks(cdiv(s.seq_len, F::BM), s.batch, s.heads)},
      {"bwd_mma_kernel", 16, D, B::BN, B::BM, B::kThreads, B::kSmem,
       blocks(cdiv(s.seq_len, B::BN), s.batch, s.kv_heads)},
      {"dq_finish_kernel", 16, D, 1, 8, kFinishThreads, 0, (chunks + kFinishThreads - 1) / kFinishThreads},
  };
  int n = 0;
  for (const LaunchInfo& info : all)
    if (n < capacity) out[n++] = info;
  return n;
}

template <typename F>
auto by_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    default: return f.template operator()<128>();
  }
}

bool head_dim_ok(int d) { return d == 32 || d == 64 || d == 128; }


struct FwdLaunch {
  const Operand &q, &k, &v, &out;
  float* lse;
  const Shape& s;
  float scale;
  cudaStream_t stream;
  template <int D>
  cudaError_t operator()() const {
    return fwd_d<D>(q, k, v, out, lse, s, scale, stream);
  }
};

struct BwdLaunch {
  const Operand &grad_out, &q, &k, &v, &out;
  const float* lse;
  float* delta;
  float* dq_acc;
  const Operand &dq, &dk, &dv;
  const Shape& s;
  float scale;
  cudaStream_t stream;
  template <int D>
  cudaError_t operator()() const {
    return bwd_d<D>(grad_out, q, k, v, out, lse, delta, dq_acc, dq, dk, dv, s, scale, stream);
  }
};

struct Describe {
  const Shape& s;
  LaunchInfo* out;
  int capacity;
  template <int D>
  int operator()() const {
    return describe_d<D>(s, out, capacity);
  }
};

}  // namespace

bool operand_aligned(const Operand& x, DType dtype) {
  const long long elt = dtype == DType::kBFloat16 ? 2 : 4;
  return reinterpret_cast<std::uintptr_t>(x.data) % 16 == 0 && (x.sb * elt) % 16 == 0 && (x.sh * elt) % 16 == 0 &&
         (x.st * elt) % 16 == 0;
}

size_t attention_bwd_workspace_bytes(const Shape& shape, DType dtype) {
  return dtype == DType::kBFloat16 ? sizeof(float) * static_cast<size_t>(dq_chunks(shape)) * 8 : 0;
}

cudaError_t attention_fwd_cuda(Operand q, Operand k, Operand v, Operand out, float* lse, Shape shape, float scale,
                               DType dtype, cudaStream_t stream) {
  if (!head_dim_ok(shape.head_dim)) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat32) return attention_fwd_fp32(q, k, v, out, lse, shape, scale, stream);
  return by_head_dim(shape.head_dim, FwdLaunch{q, k, v, out, lse, shape, scale, stream});
}

cudaError_t attention_bwd_cuda(Operand grad_out, Operand q, Operand k, Operand v, Operand out, const float* lse,
                               float* delta, void* workspace, Operand dq, Operand dk, Operand dv, Shape shape,
                               float scale, DType dtype, cudaStream_t stream) {
  if (!head_dim_ok(shape.head_dim)) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat32)
    return attention_bwd_fp32(grad_out, q, k, v, out, lse, delta, dq, dk, dv, shape, scale, stream);
  if (workspace == nullptr) return cudaErrorInvalidValue;
  return by_head_dim(shape.head_dim, BwdLaunch{grad_out, q, k, v, out, lse, delta, static_cast<float*>(workspace), dq,
                                            dk, dv, shape, scale, stream});
}

int attention_describe(const Shape& shape, DType dtype, LaunchInfo* out, int capacity) {
  if (!head_dim_ok(shape.head_dim)) return 0;
  if (dtype == DType::kFloat32) return attention_describe_fp32(shape, out, capacity);
  return by_head_dim(shape.head_dim, Describe{shape, out, capacity});
}

}  // namespace attention
}  // namespace sslscale
