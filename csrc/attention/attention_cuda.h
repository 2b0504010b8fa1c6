// Fused causal (grouped-query) attention on CUDA: host launchers over raw device pointers.
//
// Plain C++ (no torch headers) so the kernels build with a bare `nvcc -c`; the torch binding lives in
// attention_cuda_binding.cpp. Layout contract (all tensors contiguous, 16-byte aligned):
//   q, out, grad_out, dq   [batch, heads, seq_len, head_dim]
//   k, v, dk, dv           [batch, kv_heads, seq_len, head_dim]   query head h reads kv head h / (heads / kv_heads)
//   lse, delta             [batch, heads, seq_len] fp32; lse is the natural-log log-sum-exp of each scaled row
// head_dim is 32, 64 or 128; any seq_len >= 1; fp32 or bf16 data with fp32 accumulation.
#pragma once

#include <cuda_runtime.h>

namespace sslscale {
namespace attention {

enum class DType { kFloat32, kBFloat16 };

struct Shape {
  int batch;
  int heads;
  int kv_heads;
  int seq_len;
  int head_dim;
};

// out = causal softmax(q k^T * scale) v and lse per row. Returns the first CUDA error (launch or attribute).
cudaError_t attention_fwd_cuda(const void* q, const void* k, const void* v, void* out, float* lse, Shape shape,
                               float scale, DType dtype, cudaStream_t stream);

// dq, dk, dv of the same attention, with P recomputed from lse. `delta` is caller-provided fp32 workspace of
// lse's shape (it receives rowsum(grad_out * out)). dk/dv are summed over the query heads of each group.
cudaError_t attention_bwd_cuda(const void* grad_out, const void* q, const void* k, const void* v, const void* out,
                               const float* lse, float* delta, void* dq, void* dk, void* dv, Shape shape, float scale,
                               DType dtype, cudaStream_t stream);

}  // namespace attention
}  // namespace sslscale
