// Fused InfoNCE kernels on CUDA (raw pointers, no torch headers: compiles with plain `nvcc -c`).
//
// One kernel template covers the three passes. A block of 4 warps owns 64 "own" rows (forward and d_rows: rows;
// d_cols: columns) and streams the 64-wide tiles of its split of the "other" side (columns; for d_cols: rows).
// Each warp owns 16 own rows. Operands are staged in 128-byte feature chunks (64 bf16/fp16 or 32 fp32 features)
// through a two-stage cp.async pipeline (16-byte copies, zero-filled past the end); per other tile the block
//   1. computes the 64 x 64 score tile over all of d (own . other^T; for d_cols that is S^T),
//   2. forward: updates the running max / sum / positive logit of its rows (online log-sum-exp);
//      backward: turns the tile into g (p - t) in registers and multiplies it with every feature chunk of the other
//      tile (64 x d), accumulating into registers (d_pad <= 128) or into the block's own fp32 partial rows.
// 16-bit inputs run both products on the tensor cores (mma.sync m16n8k16, ldmatrix, fp32 accumulation; g (p - t)
// goes from the score accumulators straight into A fragments); fp32 inputs run the same schedule on CUDA cores with
// the same fragment ownership (exact fp32 products; g (p - t) passes through a per-warp shared-memory strip).

#include "infonce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common/warp_mma.cuh"

namespace sslscale {
namespace infonce_cuda {
namespace {

namespace wm = ::sslscale::mma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kDsLd = kTile + 4;  // fp32 g (p - t) strip rows (CUDA-core path)

enum Mode : int { kForward = 0, kRows = 1, kCols = 2 };

template <typename T>
struct Elt {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int KC = 128 / static_cast<int>(sizeof(T));       // features per staged chunk
  static constexpr int LD = KC + 16 / static_cast<int>(sizeof(T));   // padded shared row
  static constexpr int kStage = kTile * LD;                          // elements per staged 64-row chunk
  static constexpr size_t kStats = 2 * kTile * (2 * sizeof(long long) + 2 * sizeof(float));
  static constexpr size_t kDs = kTensorCores ? 0 : sizeof(float) * kWarps * 16 * kDsLd;
  static constexpr size_t kSmem = sizeof(T) * 4 * kStage + kStats + kDs;  // own[2] | other[2] | stats | ds
  static constexpr int kRegChunks = kRegisterD / KC;
};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

struct Args {
  const void* own;
  const void* other;
  const int64_t* pos;
  const int64_t* self_idx;
  const float* lse;
  const float* grad;
  float* part_lse;
  float* part_pos;
  void* out;
  long long own_size, other_size, d;  // d: the padded feature count d_pad
  int tiles_per_split;
  float g_scale;
  bool direct;
};

// Rows [row0, row0 + 64) x features [f0, f0 + KC) of a (size, d) row-major matrix into a staged chunk;
// rows at or past `end` and features past d are zero-filled (d is a multiple of 16 bytes' worth of elements).
template <typename T>
__device__ __forceinline__ void stage_chunk(T* dst, const T* src, long long row0, long long end, long long d,
                                            long long f0) {
  using E = Elt<T>;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kPerRow = E::KC / kVec;
#pragma unroll
  for (int i = threadIdx.x; i < kTile * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    const long long row = row0 + r, f = f0 + c;
    const bool ok = row < end && f < d;
    wm::cp_async_16(dst + r * E::LD + c, ok ? src + row * d + f : src, ok);
  }
}

template <typename T, int MODE, bool REG>
__global__ void __launch_bounds__(kThreads) infonce_kernel(Args a) {
  using E = Elt<T>;
  constexpr int KC = E::KC, LD = E::LD;
  constexpr bool kBackward = MODE != kForward;
  extern __shared__ __align__(128) unsigned char smem[];
  T* own_s = reinterpret_cast<T*>(smem);                 // two stages
  T* oth_s = own_s + 2 * E::kStage;                      // two stages
  long long* st_pos = reinterpret_cast<long long*>(oth_s + 2 * E::kStage);  // [2][64] other-row stats (d_cols)
  long long* st_self = st_pos + 2 * kTile;
  float* st_lse = reinterpret_cast<float*>(st_self + 2 * kTile);
  float* st_g = st_lse + 2 * kTile;
  float* ds_strip = st_g + 2 * kTile;  // CUDA-core path: per warp 16 x kDsLd
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  const T* own = static_cast<const T*>(a.own);
  const T* other = static_cast<const T*>(a.other);
  const long long own0 = static_cast<long long>(blockIdx.x) * kTile;
  const int split = blockIdx.y;
  const long long lo = static_cast<long long>(split) * a.tiles_per_split * kTile;
  const long long hi = min(a.other_size, lo + static_cast<long long>(a.tiles_per_split) * kTile);
  const int n_tiles = hi > lo ? static_cast<int>((hi - lo + kTile - 1) / kTile) : 0;
  const int nk = static_cast<int>((a.d + KC - 1) / KC);
  const int per_tile = kBackward ? 2 * nk : nk;
  const int items = n_tiles * per_tile;

  // This lane's own rows: r0 and r0 + 8 (global own indices).
  const long long r0 = own0 + warp * 16 + g;
  long long my_pos[2] = {-1, -1}, my_self[2] = {-1, -1};
  float my_lse[2] = {0.f, 0.f}, my_g[2] = {0.f, 0.f};
  if (MODE != kCols) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long row = r0 + 8 * r;
      if (row < a.own_size) {
        my_pos[r] = a.pos[row];
        my_self[r] = a.self_idx[row];
        if (kBackward) {
          my_lse[r] = a.lse[row];
          my_g[r] = a.grad[row];
        }
      }
    }
  }

  auto issue = [&](int item, int stage) {
    const int ti = item / per_tile, c = item % per_tile;
    const long long tile0 = lo + static_cast<long long>(ti) * kTile;
    if (c < nk) {
      stage_chunk<T>(own_s + stage * E::kStage, own, own0, a.own_size, a.d, static_cast<long long>(c) * KC);
      stage_chunk<T>(oth_s + stage * E::kStage, other, tile0, hi, a.d, static_cast<long long>(c) * KC);
      if (MODE == kCols && c == 0) {  // the other tile's row statistics, in the tile's own buffer
        const int sb = (ti & 1) * kTile;
        for (int i = threadIdx.x; i < kTile; i += kThreads) {
          const long long row = tile0 + i;
          const bool ok = row < hi;
          st_pos[sb + i] = ok ? a.pos[row] : -1;
          st_self[sb + i] = ok ? a.self_idx[row] : -1;
          st_lse[sb + i] = ok ? a.lse[row] : 0.f;
          st_g[sb + i] = ok ? a.grad[row] : 0.f;
        }
      }
    } else {
      stage_chunk<T>(oth_s + stage * E::kStage, other, tile0, hi, a.d, static_cast<long long>(c - nk) * KC);
    }
  };

  float s[kTile / 8][4];  // the warp's 16 x 64 score tile; in the backward then g (p - t)
  float acc[REG ? kRegisterD / 8 : 1][4];
#pragma unroll
  for (int nb = 0; nb < (REG ? kRegisterD / 8 : 1); ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
  float run_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, run_sum[2] = {0.f, 0.f}, positive[2] = {0.f, 0.f};
  float* my_ds = ds_strip + warp * 16 * kDsLd;

  if (items > 0) issue(0, 0);
  wm::cp_async_commit();
  for (int item = 0; item < items; ++item) {
    const int stage = item & 1;
    if (item + 1 < items) issue(item + 1, stage ^ 1);
    wm::cp_async_commit();
    wm::cp_async_wait<1>();
    __syncthreads();
    const int ti = item / per_tile, c = item % per_tile;
    const long long tile0 = lo + static_cast<long long>(ti) * kTile;
    const T* os = own_s + stage * E::kStage;
    const T* xs = oth_s + stage * E::kStage;

    if (c < nk) {  // score chunk: s += own[:, chunk] . other[:, chunk]^T
      if (c == 0) {
#pragma unroll
        for (int nb = 0; nb < kTile / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
      }
      if constexpr (E::kTensorCores) {
#pragma unroll
        for (int kb = 0; kb < KC / 16; ++kb) {
          uint32_t af[4];
          wm::ldmatrix_x4(af, wm::a_addr(os, LD, warp * 16, kb * 16, lane));
#pragma unroll
          for (int nb2 = 0; nb2 < kTile / 16; ++nb2) {
            uint32_t bf[4];
            wm::ldmatrix_x4(bf, wm::bt_addr(xs, LD, nb2 * 16, kb * 16, lane));
            wm::mma_16816<T>(s[2 * nb2], af, bf[0], bf[1]);
            wm::mma_16816<T>(s[2 * nb2 + 1], af, bf[2], bf[3]);
          }
        }
      } else {
        const float* ar = reinterpret_cast<const float*>(os) + (warp * 16 + g) * LD;
        const float* xr = reinterpret_cast<const float*>(xs) + 2 * t * LD;
#pragma unroll 4
        for (int k = 0; k < KC; ++k) {
          const float a0 = ar[k], a1 = ar[8 * LD + k];
#pragma unroll
          for (int nb = 0; nb < kTile / 8; ++nb) {
            const float b0 = xr[nb * 8 * LD + k], b1 = xr[(nb * 8 + 1) * LD + k];
            s[nb][0] = fmaf(a0, b0, s[nb][0]);
            s[nb][1] = fmaf(a0, b1, s[nb][1]);
            s[nb][2] = fmaf(a1, b0, s[nb][2]);
            s[nb][3] = fmaf(a1, b1, s[nb][3]);
          }
        }
      }

      if (c == nk - 1) {  // the score tile is complete
        if constexpr (MODE == kForward) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float tile_max = -CUDART_INF_F;
#pragma unroll
            for (int nb = 0; nb < kTile / 8; ++nb) {
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const long long col = tile0 + nb * 8 + 2 * t + e;
                float x = s[nb][2 * r + e];
                if (col < hi && col == my_pos[r]) positive[r] += x;
                if (col >= hi || col == my_self[r]) x = -CUDART_INF_F;
                s[nb][2 * r + e] = x;
                tile_max = fmaxf(tile_max, x);
              }
            }
            const float new_max = fmaxf(run_max[r], wm::quad_max(tile_max));
            // nothing kept in this row yet: shift by 0 (every exp below is exp(-inf) = 0, never NaN)
            const float shift = new_max == -CUDART_INF_F ? 0.f : new_max;
            float sum = 0.f;
#pragma unroll
            for (int nb = 0; nb < kTile / 8; ++nb) sum += __expf(s[nb][2 * r] - shift) + __expf(s[nb][2 * r + 1] - shift);
            run_sum[r] = run_sum[r] * __expf(run_max[r] - shift) + sum;  // this lane's partial sum
            run_max[r] = new_max;
          }
        } else {
          const int sb = (ti & 1) * kTile;
#pragma unroll
          for (int nb = 0; nb < kTile / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e >> 1;
              const int i = nb * 8 + 2 * t + (e & 1);  // column of the tile
              float p, target, gi;
              if constexpr (MODE == kRows) {
                const long long col = tile0 + i;
                const bool keep = col < hi && col != my_self[r];
                p = keep ? __expf(s[nb][e] - my_lse[r]) : 0.f;
                target = (col < hi && col == my_pos[r]) ? 1.f : 0.f;
                gi = my_g[r];
              } else {  // S^T: this lane's own index is a column of the logits, i an (other-side) row
                const long long col = r0 + 8 * r;
                const bool keep = col < a.own_size && col != st_self[sb + i];
                p = keep ? __expf(s[nb][e] - st_lse[sb + i]) : 0.f;
                target = (col == st_pos[sb + i]) ? 1.f : 0.f;
                gi = st_g[sb + i];
              }
              s[nb][e] = gi * (p - target) * a.g_scale;
            }
          }
          if constexpr (!E::kTensorCores) {
#pragma unroll
            for (int nb = 0; nb < kTile / 8; ++nb) {
              my_ds[g * kDsLd + nb * 8 + 2 * t] = s[nb][0];
              my_ds[g * kDsLd + nb * 8 + 2 * t + 1] = s[nb][1];
              my_ds[(g + 8) * kDsLd + nb * 8 + 2 * t] = s[nb][2];
              my_ds[(g + 8) * kDsLd + nb * 8 + 2 * t + 1] = s[nb][3];
            }
            __syncwarp();
          }
        }
      }
    } else if constexpr (kBackward) {  // product chunk: acc[:, chunk] += g (p - t) . other[:, chunk]
      const int fc = c - nk;
      float part[KC / 8][4];
      float* ws = static_cast<float*>(a.out) + (static_cast<long long>(split) * a.own_size) * a.d;
      if constexpr (REG) {
#pragma unroll
        for (int nb = 0; nb < KC / 8; ++nb) part[nb][0] = part[nb][1] = part[nb][2] = part[nb][3] = 0.f;
      } else {
#pragma unroll
        for (int nb = 0; nb < KC / 8; ++nb) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const long long row = r0 + 8 * r;
            const long long f = static_cast<long long>(fc) * KC + nb * 8 + 2 * t;
            float2 v = make_float2(0.f, 0.f);
            if (row < a.own_size && f < a.d) v = *reinterpret_cast<const float2*>(ws + row * a.d + f);
            part[nb][2 * r] = v.x;
            part[nb][2 * r + 1] = v.y;
          }
        }
      }
      if constexpr (E::kTensorCores) {
#pragma unroll
        for (int kb = 0; kb < kTile / 16; ++kb) {
          uint32_t pa[4];
          wm::acc_to_a<T, kTile / 8>(pa, s, kb);
#pragma unroll
          for (int nb2 = 0; nb2 < KC / 16; ++nb2) {
            uint32_t bf[4];
            wm::ldmatrix_x4_trans(bf, wm::b_trans_addr(xs, LD, kb * 16, nb2 * 16, lane));
            wm::mma_16816<T>(part[2 * nb2], pa, bf[0], bf[1]);
            wm::mma_16816<T>(part[2 * nb2 + 1], pa, bf[2], bf[3]);
          }
        }
      } else {
        const float* xf = reinterpret_cast<const float*>(xs) + 2 * t;
#pragma unroll 4
        for (int j = 0; j < kTile; ++j) {
          const float d0 = my_ds[g * kDsLd + j], d1 = my_ds[(g + 8) * kDsLd + j];
#pragma unroll
          for (int nb = 0; nb < KC / 8; ++nb) {
            const float b0 = xf[j * LD + nb * 8], b1 = xf[j * LD + nb * 8 + 1];
            part[nb][0] = fmaf(d0, b0, part[nb][0]);
            part[nb][1] = fmaf(d0, b1, part[nb][1]);
            part[nb][2] = fmaf(d1, b0, part[nb][2]);
            part[nb][3] = fmaf(d1, b1, part[nb][3]);
          }
        }
      }
      if constexpr (REG) {
#pragma unroll
        for (int cc = 0; cc < E::kRegChunks; ++cc) {
          if (cc == fc) {
#pragma unroll
            for (int nb = 0; nb < KC / 8; ++nb)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[cc * (KC / 8) + nb][e] += part[nb][e];
          }
        }
      } else {
#pragma unroll
        for (int nb = 0; nb < KC / 8; ++nb) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const long long row = r0 + 8 * r;
            const long long f = static_cast<long long>(fc) * KC + nb * 8 + 2 * t;
            if (row < a.own_size && f < a.d)
              *reinterpret_cast<float2*>(ws + row * a.d + f) = make_float2(part[nb][2 * r], part[nb][2 * r + 1]);
          }
        }
      }
    }
    __syncthreads();  // this stage (and the tile's statistics) may be refilled from here on
  }

  if constexpr (MODE == kForward) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = wm::quad_sum(run_sum[r]);
      const float pos_logit = wm::quad_sum(positive[r]);
      const long long row = r0 + 8 * r;
      if (t == 0 && row < a.own_size) {
        const long long at = static_cast<long long>(split) * a.own_size + row;
        a.part_lse[at] = sum > 0.f ? run_max[r] + logf(sum) : -CUDART_INF_F;
        a.part_pos[at] = pos_logit;
      }
    }
  } else if constexpr (REG) {
    const float unscale = 1.f / a.g_scale;
#pragma unroll
    for (int nb = 0; nb < kRegisterD / 8; ++nb) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const long long row = r0 + 8 * r;
        const long long f = nb * 8 + 2 * t;
        if (row >= a.own_size || f >= a.d) continue;
        const float x = acc[nb][2 * r] * unscale, y = acc[nb][2 * r + 1] * unscale;
        if (a.direct) {
          T* out = static_cast<T*>(a.out) + row * a.d + f;
          out[0] = from_float<T>(x);
          out[1] = from_float<T>(y);
        } else {
          float* out = static_cast<float*>(a.out) + (static_cast<long long>(split) * a.own_size + row) * a.d + f;
          *reinterpret_cast<float2*>(out) = make_float2(x, y);
        }
      }
    }
  }
}

// The workspace path accumulates scaled partials in place: this undoes g_scale once they are complete.
template <typename T>
__global__ void unscale_kernel(float* __restrict__ part, long long count, float unscale) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) part[i] *= unscale;
}

int blocks_per_sm(DType) { return 4; }  // the forward's occupancy (the highest of the three kernels): see gpu-static

Split split_for(int64_t own, int64_t other, int sms, int per_sm) {
  const int own_tiles = static_cast<int>((own + kTile - 1) / kTile);
  const int other_tiles = static_cast<int>((other + kTile - 1) / kTile);
  if (own_tiles == 0 || other_tiles == 0) return {own_tiles, 1, std::max(other_tiles, 1)};
  const long long target = static_cast<long long>(kWaves) * std::max(sms, 1) * std::max(per_sm, 1);
  const int wanted =
      static_cast<int>(std::min<long long>(other_tiles, std::max<long long>(1, (target + own_tiles - 1) / own_tiles)));
  const int per = other_tiles / wanted;  // rounding down keeps at least `wanted` splits
  return {own_tiles, (other_tiles + per - 1) / per, per};
}

template <typename T, int MODE, bool REG>
cudaError_t launch(const Split& sp, const Args& a, cudaStream_t stream) {
  if (sp.own_tiles == 0) return cudaSuccess;
  auto kernel = infonce_kernel<T, MODE, REG>;
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(Elt<T>::kSmem));
      err != cudaSuccess)
    return err;
  kernel<<<dim3(sp.own_tiles, sp.splits), kThreads, Elt<T>::kSmem, stream>>>(a);
  return cudaGetLastError();
}

Args args_for(const void* own, const void* other, const int64_t* pos, const int64_t* self_idx, long long own_size,
              long long other_size, long long d, int tiles_per_split) {
  Args a{};
  a.own = own;
  a.other = other;
  a.pos = pos;
  a.self_idx = self_idx;
  a.own_size = own_size;
  a.other_size = other_size;
  a.d = d;
  a.tiles_per_split = tiles_per_split;
  a.g_scale = 1.f;
  return a;
}

template <typename T>
cudaError_t forward_typed(const Plan& p, const void* rows, const void* cols, const int64_t* pos,
                          const int64_t* self_idx, float* part_lse, float* part_pos, int64_t m, int64_t n, int64_t d,
                          cudaStream_t stream) {
  Args a = args_for(rows, cols, pos, self_idx, m, n, d, p.forward.tiles_per_split);
  a.part_lse = part_lse;
  a.part_pos = part_pos;
  return launch<T, kForward, false>(p.forward, a, stream);
}

template <typename T>
cudaError_t backward_typed(const Plan& p, const float* grad, float g_scale, const void* rows, const void* cols,
                           const int64_t* pos, const int64_t* self_idx, const float* lse, void* out_rows,
                           void* out_cols, int64_t m, int64_t n, int64_t d, cudaStream_t stream) {
  for (int side = 0; side < 2; ++side) {
    const bool cols_side = side == 1;
    const Split& sp = cols_side ? p.d_cols : p.d_rows;
    Args a = cols_side ? args_for(cols, rows, pos, self_idx, n, m, d, sp.tiles_per_split)
                       : args_for(rows, cols, pos, self_idx, m, n, d, sp.tiles_per_split);
    a.lse = lse;
    a.grad = grad;
    a.g_scale = g_scale;
    a.out = cols_side ? out_cols : out_rows;
    a.direct = direct_output(p, cols_side);
    cudaError_t err;
    if (p.register_acc) {
      err = cols_side ? launch<T, kCols, true>(sp, a, stream) : launch<T, kRows, true>(sp, a, stream);
    } else {
      err = cols_side ? launch<T, kCols, false>(sp, a, stream) : launch<T, kRows, false>(sp, a, stream);
      if (err == cudaSuccess && g_scale != 1.f) {  // the in-place partials still carry the g_scale factor
        const long long count = static_cast<long long>(sp.splits) * (cols_side ? n : m) * d;
        unscale_kernel<T><<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
            static_cast<float*>(a.out), count, 1.f / g_scale);
        err = cudaGetLastError();
      }
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
int describe_typed(const Plan& p, LaunchInfo* out, int capacity) {
  const int bits = 8 * static_cast<int>(sizeof(T));
  const char* rows_name = p.register_acc ? "infonce_kernel<rows, registers>" : "infonce_kernel<rows, workspace>";
  const char* cols_name = p.register_acc ? "infonce_kernel<cols, registers>" : "infonce_kernel<cols, workspace>";
  const LaunchInfo all[] = {
      {"infonce_kernel<forward>", bits, kThreads, Elt<T>::kSmem, p.forward.own_tiles, p.forward.splits},
      {rows_name, bits, kThreads, Elt<T>::kSmem, p.d_rows.own_tiles, p.d_rows.splits},
      {cols_name, bits, kThreads, Elt<T>::kSmem, p.d_cols.own_tiles, p.d_cols.splits},
  };
  int k = 0;
  for (const LaunchInfo& info : all)
    if (k < capacity) out[k++] = info;
  return k;
}

}  // namespace

int feature_multiple(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

Plan plan(int64_t m, int64_t n, int64_t d_pad, DType dtype, int sm_count) {
  const int per_sm = blocks_per_sm(dtype);
  return Plan{split_for(m, n, sm_count, per_sm), split_for(m, n, sm_count, per_sm),
              split_for(n, m, sm_count, per_sm), per_sm, d_pad <= kRegisterD};
}

bool direct_output(const Plan& p, bool cols_side) {
  return p.register_acc && (cols_side ? p.d_cols.splits : p.d_rows.splits) == 1;
}

cudaError_t launch_forward(DType dtype, const Plan& p, const void* rows, const void* cols, const int64_t* pos,
                           const int64_t* self_idx, float* part_lse, float* part_pos, int64_t m, int64_t n,
                           int64_t d_pad, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(p, rows, cols, pos, self_idx, part_lse, part_pos, m, n, d_pad, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(p, rows, cols, pos, self_idx, part_lse, part_pos, m, n, d_pad, stream);
    case DType::kFloat16:
      return forward_typed<__half>(p, rows, cols, pos, self_idx, part_lse, part_pos, m, n, d_pad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, const Plan& p, const float* grad_loss, float g_scale, const void* rows,
                            const void* cols, const int64_t* pos, const int64_t* self_idx, const float* lse,
                            void* out_rows, void* out_cols, int64_t m, int64_t n, int64_t d_pad,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(p, grad_loss, g_scale, rows, cols, pos, self_idx, lse, out_rows, out_cols, m, n,
                                   d_pad, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, grad_loss, g_scale, rows, cols, pos, self_idx, lse, out_rows,
                                           out_cols, m, n, d_pad, stream);
    case DType::kFloat16:
      return backward_typed<__half>(p, grad_loss, g_scale, rows, cols, pos, self_idx, lse, out_rows, out_cols, m, n,
                                    d_pad, stream);
  }
  return cudaErrorInvalidValue;
}

int describe(const Plan& p, DType dtype, LaunchInfo* out, int capacity) {
  switch (dtype) {
    case DType::kFloat32: return describe_typed<float>(p, out, capacity);
    case DType::kBFloat16: return describe_typed<__nv_bfloat16>(p, out, capacity);
    case DType::kFloat16: return describe_typed<__half>(p, out, capacity);
  }
  return 0;
}

}  // namespace infonce_cuda
}  // namespace sslscale
