// CUDA implementations of `sslscale::attention_fwd` / `attention_bwd`: validation, allocation, stream, launch.
// Operands are passed by strides (no copy of (B, T, H, D) views); outputs take the layout of their input.
// Built only with a CUDA torch (setup.py); the kernels themselves live in attention_cuda.cu.

#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "attention_cuda.h"

namespace {

namespace attn = sslscale::attention;

constexpr int64_t kMaxBlocks = 2147483647;  // one-dimensional grids: gridDim.x

attn::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? attn::DType::kBFloat16 : attn::DType::kFloat32;
}

attn::Operand operand_of(const at::Tensor& t) {
  return attn::Operand{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// `t` itself when the kernels can read it in place (feature stride 1, 16-byte aligned data and strides: e.g. a
// (B, T, H, D).transpose(1, 2) view), else a contiguous copy.
at::Tensor readable(const at::Tensor& t) {
  if (t.stride(3) == 1 && attn::operand_aligned(operand_of(t), dtype_of(t))) return t;
  at::Tensor c = t.contiguous();
  if (!attn::operand_aligned(operand_of(c), dtype_of(c))) c = c.clone();  // an unaligned storage offset
  return c;
}

// An output in the layout of `like` (empty_like), or contiguous when that layout would not be aligned.
at::Tensor output_like(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  return attn::operand_aligned(operand_of(out), dtype_of(out)) ? out : at::empty(like.sizes(), like.options());
}

attn::Shape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), op, ": q, k, v must be CUDA tensors, got ", q.device(),
              ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": expected q (B, H, T, D) and k, v (B, Hkv, T, D), got shapes ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              ": dtype must be float32 or bfloat16 on CUDA, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3), hkv = k.size(1);
  TORCH_CHECK(k.size(0) == b, op, ": batch differs: q has ", b, ", k/v have ", k.size(0));
  TORCH_CHECK(k.size(2) == t, op, ": sequence length differs: q has T=", t, ", k/v have T=", k.size(2));
  TORCH_CHECK(k.size(3) == d, op, ": head_dim differs: q has ", d, ", k/v have ", k.size(3));
  TORCH_CHECK(d == 32 || d == 64 || d == 128, op, ": head_dim=", d, " is not supported; expected 32, 64 or 128");
  TORCH_CHECK(hkv > 0 && h % hkv == 0, op, ": heads=", h, " must be a multiple of kv_heads=", hkv);
  TORCH_CHECK(t >= 1, op, ": sequence length T must be at least 1, got ", t);
  TORCH_CHECK(t <= INT32_MAX / 2, op, ": sequence length T=", t, " is too long for 32-bit row indices");
  TORCH_CHECK(b * h * ((t + 15) / 16) <= kMaxBlocks, op, ": batch * heads * T/16 = ", b * h * ((t + 15) / 16),
              " blocks exceed the CUDA grid limit ", kMaxBlocks);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be finite and > 0, got ", scale);
  return attn::Shape{static_cast<int>(b), static_cast<int>(h), static_cast<int>(hkv), static_cast<int>(t),
                     static_cast<int>(d)};
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale) {
  const char* op = "sslscale::attention_fwd (CUDA)";
  const attn::Shape s = check_qkv(op, q_in, k_in, v_in, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  at::Tensor out = output_like(q);
  at::Tensor lse = at::empty({s.batch, s.heads, s.seq_len}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(op, attn::attention_fwd_cuda(operand_of(q), operand_of(k), operand_of(v), operand_of(out),
                                            lse.data_ptr<float>(), s, static_cast<float>(scale), dtype_of(q),
                                            stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                                             const at::Tensor& out_in, const at::Tensor& lse_in,
                                                             double scale) {
  const char* op = "sslscale::attention_bwd (CUDA)";
  const attn::Shape s = check_qkv(op, q_in, k_in, v_in, scale);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q_in.scalar_type(), ", got ", grad_out_in.scalar_type(),
              " and ", out_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.batch && lse_in.size(1) == s.heads &&
                  lse_in.size(2) == s.seq_len,
              op, ": lse must have shape (B, H, T) = (", s.batch, ", ", s.heads, ", ", s.seq_len, "), got ",
              lse_in.sizes());
  TORCH_CHECK(grad_out_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              op, ": grad_out, out and lse must be on q's device ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const at::Tensor grad_out = readable(grad_out_in), out = readable(out_in), lse = lse_in.contiguous();
  at::Tensor delta = at::empty_like(lse);
  at::Tensor dq = output_like(q), dk = output_like(k), dv = output_like(v);
  const size_t ws_bytes = attn::attention_bwd_workspace_bytes(s, dtype_of(q));
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(op, attn::attention_bwd_cuda(operand_of(grad_out), operand_of(q), operand_of(k), operand_of(v),
                                            operand_of(out), lse.data_ptr<float>(), delta.data_ptr<float>(),
                                            ws_bytes ? workspace.data_ptr() : nullptr, operand_of(dq),
                                            operand_of(dk), operand_of(dv), s, static_cast<float>(scale),
                                            dtype_of(q), stream));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslscale, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
