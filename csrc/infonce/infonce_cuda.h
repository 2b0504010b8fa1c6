// Fused InfoNCE on CUDA: host launchers for the kernels in infonce_cuda.cu (plain C++, no torch).
//
// Contract (the same as every other backend, see csrc/register.cpp): rows [m, d] already carry 1/temperature,
// cols [n, d], both row-major in one dtype; pos and self_idx [m] int64 (self_idx -1: nothing excluded); grad_loss
// and lse [m] fp32.
//   lse_i  = logsumexp_{j != self_idx[i]} rows_i . cols_j          loss_i = lse_i - rows_i . cols_{pos[i]}
//   d_rows_i = sum_j g_i (p_ij - t_ij) cols_j                       d_cols_j = sum_i g_i (p_ij - t_ij) rows_i
// Layout requirements of these launchers (the binding pads / copies to meet them): rows and cols contiguous with a
// 16-byte-aligned data pointer and a row length d_pad * sizeof(T) that is a multiple of 16 (d_pad >= d; features
// d .. d_pad - 1 are zeros). All accumulation is fp32.
//
// Work decomposition (`Plan`): a block owns 64 rows (forward, d_rows) or 64 columns (d_cols) and one split of the
// other side's 64-wide tiles; the split count makes a launch cover every SM at least `kWaves` times at the kernels'
// intended occupancy. Splits write partials that the caller combines in a fixed order (deterministic):
//   forward: part_lse[split][m], part_pos[split][m]   -> lse = logsumexp over splits, loss = lse - sum(part_pos)
//   d_rows:  part[split][m][d_pad] fp32               -> d_rows = sum over splits (direct into out when 1 split)
//   d_cols:  part[split][n][d_pad] fp32               -> d_cols = sum over splits (likewise)
// With d_pad <= 128 the (64 x d) gradient accumulator stays in registers; wider features accumulate 64-feature
// blocks into the (zero-initialised) fp32 partial in place. Every score tile is computed once per kernel.

#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace sslscale {
namespace infonce_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kTile = 64;   // rows / columns per block and per streamed tile
constexpr int kWaves = 2;   // launches cover every SM at least this many times
constexpr int kRegisterD = 128;  // d_pad up to this keeps the gradient accumulator in registers

// Element alignment the launchers need: d_pad is a multiple of this.
int feature_multiple(DType dtype);

struct Split {
  int own_tiles;       // grid x
  int splits;          // grid y
  int tiles_per_split; // of the other side
};

struct Plan {
  Split forward, d_rows, d_cols;
  int blocks_per_sm;  // the occupancy the split counts assume (checked by `sslscale bench gpu-static`)
  bool register_acc;  // d_pad <= kRegisterD
};

Plan plan(int64_t m, int64_t n, int64_t d_pad, DType dtype, int sm_count);

// Forward partials (see above); `p` must come from plan() for the same problem.
cudaError_t launch_forward(DType dtype, const Plan& p, const void* rows, const void* cols, const int64_t* pos,
                           const int64_t* self_idx, float* part_lse, float* part_pos, int64_t m, int64_t n,
                           int64_t d_pad, cudaStream_t stream);

// d_rows (out_rows) and d_cols (out_cols). An output is written in T directly when its plan has one split and the
// accumulator is in registers (`direct`), else it receives fp32 partials [splits][size][d_pad], which must be
// zero-initialised when !register_acc. g_scale multiplies g (p - t) before its 16-bit rounding (fp16: 1 / max|g|,
// keeping small gradients out of fp16's subnormal range); the results are divided by it again.
bool direct_output(const Plan& p, bool cols_side);
cudaError_t launch_backward(DType dtype, const Plan& p, const float* grad_loss, float g_scale, const void* rows,
                            const void* cols, const int64_t* pos, const int64_t* self_idx, const float* lse,
                            void* out_rows, void* out_cols, int64_t m, int64_t n, int64_t d_pad,
                            cudaStream_t stream);

// What the launchers would launch (host only): for the static report.
struct LaunchInfo {
  const char* kernel;
  int dtype_bits;
  int threads;
  size_t smem_bytes;
  int grid_x, grid_y;
};
int describe(const Plan& p, DType dtype, LaunchInfo* out, int capacity);

}  // namespace infonce_cuda
}  // namespace sslscale
