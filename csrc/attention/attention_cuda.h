// Fused causal (grouped-query) attention on CUDA: host launchers over raw device pointers.
//
// Plain C++ (no torch headers) so the kernels build with a bare `nvcc -c`; the torch binding lives in
// attention_cuda_binding.cpp. Layout contract:
//   q, out, grad_out, dq   [batch, heads, seq_len, head_dim]      each addressed by its own batch / head / row
//   k, v, dk, dv           [batch, kv_heads, seq_len, head_dim]   strides (`Operand`); the feature stride is 1
//   lse, delta             [batch, heads, seq_len] fp32, contiguous; lse is the natural-log LSE of each scaled row
// Query head h reads kv head h / (heads / kv_heads). head_dim is 32, 64 or 128; any seq_len >= 1.
// Alignment: every operand's data pointer and its strides (in bytes) must be multiples of 16 (16-byte copies);
// `operand_aligned` says whether an operand qualifies (the binding copies the ones that do not).
//
// Kernels (see attention_cuda.cu for bf16, attention_cuda_fp32.cu for fp32):
//   bf16: FlashAttention-2 on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async double buffering, register
//         accumulators). Forward: one block per (query tile, batch, head). Backward: one block per (key tile, batch,
//         kv head) computing S, dP, dV, dK and dQ from one pass (5 products); dQ is added into an fp32 workspace
//         with atomics (not bit-reproducible run to run) and scaled/cast by a small finishing kernel.
//   fp32: the same algorithm on CUDA cores (exact fp32 products), dQ in its own kernel (deterministic).
// Grids are one-dimensional (tiles x batch x heads): no 65535 limit on batch x heads.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

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

// One (B, H, T, D) operand: element (b, h, t, d) is at data[b * sb + h * sh + t * st + d].
struct Operand {
  void* data;
  long long sb, sh, st;
};

bool operand_aligned(const Operand& x, DType dtype);

// Bytes of fp32 workspace attention_bwd_cuda needs (the bf16 path's dQ accumulator; 0 for fp32).
size_t attention_bwd_workspace_bytes(const Shape& shape, DType dtype);

// out = causal softmax(q k^T * scale) v and lse per row. Returns the first CUDA error (launch or attribute).
cudaError_t attention_fwd_cuda(Operand q, Operand k, Operand v, Operand out, float* lse, Shape shape, float scale,
                               DType dtype, cudaStream_t stream);

// dq, dk, dv of the same attention, with P recomputed from lse. `delta` is caller-provided fp32 workspace of lse's
// shape (it receives rowsum(grad_out * out)); `workspace` holds attention_bwd_workspace_bytes (may be null when
// that is 0). dk/dv are summed over the query heads of each group.
cudaError_t attention_bwd_cuda(Operand grad_out, Operand q, Operand k, Operand v, Operand out, const float* lse,
                               float* delta, void* workspace, Operand dq, Operand dk, Operand dv, Shape shape,
                               float scale, DType dtype, cudaStream_t stream);

// What the launchers above would launch for `shape` (host only, no device needed): for the static report.
struct LaunchInfo {
  const char* kernel;  // the kernel template's name
  int dtype_bits;      // 16 (bf16) or 32
  int head_dim, block_rows, block_cols, threads;
  size_t smem_bytes;   // dynamic shared memory
  long long blocks;    // one-dimensional grid
};
int attention_describe(const Shape& shape, DType dtype, LaunchInfo* out, int capacity);

}  // namespace attention
}  // namespace sslscale
