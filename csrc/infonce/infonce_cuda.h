// Fused InfoNCE on CUDA: host launchers for the kernels in infonce_cuda.cu (plain C++, no torch).
//
// Contract (the same as every other backend, see csrc/register.cpp): rows [m, d] already carry 1/temperature,
// cols [n, d], both row-major and contiguous in one dtype; pos and self_idx [m] int64 (self_idx -1: nothing
// excluded); grad_loss and lse [m] fp32.
//   lse_i  = logsumexp_{j != self_idx[i]} rows_i . cols_j          loss_i = lse_i - rows_i . cols_{pos[i]}
//   d_rows_i = sum_j g_i (p_ij - t_ij) cols_j                       d_cols_j = sum_i g_i (p_ij - t_ij) rows_i
// All accumulation is fp32; d_rows / d_cols are written in the input dtype. Every pointer is a device pointer
// and the work is queued on `stream`; the return value is the launch status (cudaGetLastError after launch).

#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sslscale {
namespace infonce_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// loss[m], lse[m]: streams 64-column tiles with an online log-sum-exp; never materialises m x n.
cudaError_t launch_forward(DType dtype, const void* rows, const void* cols, const int64_t* pos,
                           const int64_t* self_idx, float* loss, float* lse, int64_t m, int64_t n, int64_t d,
                           cudaStream_t stream);

// d_rows[m, d], d_cols[n, d]: two kernels, each recomputing its score tiles from lse; no atomics, deterministic.
cudaError_t launch_backward(DType dtype, const float* grad_loss, const void* rows, const void* cols,
                            const int64_t* pos, const int64_t* self_idx, const float* lse, void* d_rows,
                            void* d_cols, int64_t m, int64_t n, int64_t d, cudaStream_t stream);

}  // namespace infonce_cuda
}  // namespace sslscale
