// CUDA implementations of torch.ops.sslscale.infonce_fwd / infonce_bwd: validate, pad, plan the split, launch on
// the current stream, combine the splits' partials (fixed order: deterministic). The kernels themselves live in
// infonce_cuda.cu (no torch there); this file is built only with a CUDA torch (see setup.py).

#include <cmath>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "infonce_cuda.h"

namespace {

using sslscale::infonce_cuda::DType;

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "infonce (CUDA): rows and cols have dtype ", t.scalar_type(),
                  "; expected float32, bfloat16 or float16");
  }
}

void check_on(const at::Tensor& t, const char* name, const at::Tensor& rows) {
  TORCH_CHECK(t.is_cuda(), "infonce (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == rows.device(), "infonce (CUDA): ", name, " is on ", t.device(), " but rows is on ",
              rows.device());
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t m) {
  TORCH_CHECK(t.scalar_type() == dtype, "infonce (CUDA): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == m, "infonce (CUDA): ", name, " must have shape (", m, ",), got ",
              t.sizes());
}

void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos, const at::Tensor& self_idx) {
  check_on(rows, "rows", rows);
  check_on(cols, "cols", rows);
  check_on(pos, "pos", rows);
  check_on(self_idx, "self_idx", rows);
  TORCH_CHECK(rows.dim() == 2, "infonce (CUDA): rows must be 2-D (m, d), got shape ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2, "infonce (CUDA): cols must be 2-D (n, d), got shape ", cols.sizes());
  TORCH_CHECK(rows.size(1) == cols.size(1), "infonce (CUDA): rows ", rows.sizes(), " and cols ", cols.sizes(),
              " must have the same feature dimension d");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "infonce (CUDA): rows (", rows.scalar_type(),
              ") and cols (", cols.scalar_type(), ") must have the same dtype");
  kernel_dtype(rows);
  check_vector(pos, "pos", at::kLong, rows.size(0));
  check_vector(self_idx, "self_idx", at::kLong, rows.size(0));
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "sslscale::", op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

int sm_count(const at::Tensor& t) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.device().index()) != cudaSuccess) sms = 1;
  return sms;
}

// rows / cols as the kernels read them: contiguous, 16-byte aligned, features padded with zeros to a multiple of
// 16 bytes (a copy only when the input is not like that already, e.g. an odd d).
at::Tensor padded(const at::Tensor& t, int64_t d_pad) {
  at::Tensor c = t.contiguous();
  if (d_pad != c.size(1)) return at::constant_pad_nd(c, {0, d_pad - c.size(1)});
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) return c.clone();
  return c;
}

int64_t padded_d(const at::Tensor& rows) {
  const int64_t mult = sslscale::infonce_cuda::feature_multiple(kernel_dtype(rows));
  return (rows.size(1) + mult - 1) / mult * mult;
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd_cuda(const at::Tensor& rows_in, const at::Tensor& cols_in,
                                                    const at::Tensor& pos_in, const at::Tensor& self_in) {
  check_inputs(rows_in, cols_in, pos_in, self_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const int64_t m = rows_in.size(0), n = cols_in.size(0), d_pad = padded_d(rows_in);
  const at::Tensor rows = padded(rows_in, d_pad), cols = padded(cols_in, d_pad);
  const at::Tensor pos = pos_in.contiguous(), self_idx = self_in.contiguous();
  const auto plan = sslscale::infonce_cuda::plan(m, n, d_pad, kernel_dtype(rows), sm_count(rows));
  const auto f32 = rows.options().dtype(at::kFloat);
  at::Tensor part_lse = at::empty({plan.forward.splits, m}, f32);
  at::Tensor part_pos = at::empty({plan.forward.splits, m}, f32);
  check_launch(sslscale::infonce_cuda::launch_forward(
                   kernel_dtype(rows), plan, rows.const_data_ptr(), cols.const_data_ptr(),
                   pos.const_data_ptr<int64_t>(), self_idx.const_data_ptr<int64_t>(),
                   part_lse.mutable_data_ptr<float>(), part_pos.mutable_data_ptr<float>(), m, n, d_pad,
                   c10::cuda::getCurrentCUDAStream().stream()),
               "infonce_fwd");
  // The splits' partial log-sum-exps and positive logits, combined in a fixed order.
  at::Tensor lse = plan.forward.splits == 1 ? part_lse[0] : at::logsumexp(part_lse, {0});
  at::Tensor positive = plan.forward.splits == 1 ? part_pos[0] : part_pos.sum(0);
  return {lse - positive, lse};
}

std::tuple<at::Tensor, at::Tensor> infonce_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& rows_in,
                                                    const at::Tensor& cols_in, const at::Tensor& pos_in,
                                                    const at::Tensor& self_in, const at::Tensor& lse_in) {
  check_inputs(rows_in, cols_in, pos_in, self_in);
  check_on(grad_in, "grad_loss", rows_in);
  check_on(lse_in, "lse", rows_in);
  check_vector(grad_in, "grad_loss", at::kFloat, rows_in.size(0));
  check_vector(lse_in, "lse", at::kFloat, rows_in.size(0));
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const int64_t m = rows_in.size(0), n = cols_in.size(0), d = rows_in.size(1), d_pad = padded_d(rows_in);
  if (m == 0 || n == 0) return {at::zeros_like(rows_in), at::zeros_like(cols_in)};
  const at::Tensor rows = padded(rows_in, d_pad), cols = padded(cols_in, d_pad);
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor pos = pos_in.contiguous(), self_idx = self_in.contiguous();
  const DType dtype = kernel_dtype(rows);
  const auto plan = sslscale::infonce_cuda::plan(m, n, d_pad, dtype, sm_count(rows));
  // fp16 rounds g (p - t) to fp16 for the tensor cores: scale it so the largest |g| is 1, clear of subnormals.
  float g_scale = 1.f;
  if (dtype == DType::kFloat16) {
    const float g_max = grad.abs().max().item<float>();
    if (g_max > 0.f && std::isfinite(g_max)) g_scale = 1.f / g_max;
  }
  auto output = [&](bool cols_side, const at::Tensor& like) {
    const auto& split = cols_side ? plan.d_cols : plan.d_rows;
    if (sslscale::infonce_cuda::direct_output(plan, cols_side)) return at::empty({like.size(0), d_pad}, like.options());
    const auto f32 = like.options().dtype(at::kFloat);
    return plan.register_acc ? at::empty({split.splits, like.size(0), d_pad}, f32)
                             : at::zeros({split.splits, like.size(0), d_pad}, f32);
  };
  at::Tensor out_rows = output(false, rows), out_cols = output(true, cols);
  check_launch(sslscale::infonce_cuda::launch_backward(
                   dtype, plan, grad.const_data_ptr<float>(), g_scale, rows.const_data_ptr(), cols.const_data_ptr(),
                   pos.const_data_ptr<int64_t>(), self_idx.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                   out_rows.mutable_data_ptr(), out_cols.mutable_data_ptr(), m, n, d_pad,
                   c10::cuda::getCurrentCUDAStream().stream()),
               "infonce_bwd");
  // Partials of the splits summed in a fixed order; padded features dropped.
  auto finish = [&](const at::Tensor& out, const at::Tensor& like) {
    at::Tensor full = out.dim() == 2 ? out : (out.size(0) == 1 ? out[0] : out.sum(0)).to(like.scalar_type());
    return d_pad == d ? full : full.narrow(1, 0, d).contiguous();
  };
  return {finish(out_rows, rows_in), finish(out_cols, cols_in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslscale, CUDA, m) {
  m.impl("infonce_fwd", &infonce_fwd_cuda);
  m.impl("infonce_bwd", &infonce_bwd_cuda);
}
