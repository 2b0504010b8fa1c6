// CUDA implementations of torch.ops.sslscale.infonce_fwd / infonce_bwd: validate, allocate, launch on the
// current stream. The kernels themselves live in infonce_cuda.cu (no torch there); this file is built only
// with a CUDA torch (see setup.py).

#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

std::tuple<at::Tensor, at::Tensor> infonce_fwd_cuda(const at::Tensor& rows_in, const at::Tensor& cols_in,
                                                    const at::Tensor& pos_in, const at::Tensor& self_in) {
  check_inputs(rows_in, cols_in, pos_in, self_in);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor cols = cols_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const at::Tensor self_idx = self_in.contiguous();
  const int64_t m = rows.size(0);
  at::Tensor loss = at::empty({m}, rows.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({m}, rows.options().dtype(at::kFloat));
  check_launch(sslscale::infonce_cuda::launch_forward(
                   kernel_dtype(rows), rows.const_data_ptr(), cols.const_data_ptr(), pos.const_data_ptr<int64_t>(),
                   self_idx.const_data_ptr<int64_t>(), loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                   m, cols.size(0), rows.size(1), c10::cuda::getCurrentCUDAStream().stream()),
               "infonce_fwd");
  return {loss, lse};
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
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor cols = cols_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const at::Tensor self_idx = self_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor d_rows = at::empty_like(rows);
  at::Tensor d_cols = at::empty_like(cols);
  check_launch(sslscale::infonce_cuda::launch_backward(
                   kernel_dtype(rows), grad.const_data_ptr<float>(), rows.const_data_ptr(), cols.const_data_ptr(),
                   pos.const_data_ptr<int64_t>(), self_idx.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                   d_rows.mutable_data_ptr(), d_cols.mutable_data_ptr(), rows.size(0), cols.size(0), rows.size(1),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "infonce_bwd");
  return {d_rows, d_cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslscale, CUDA, m) {
  m.impl("infonce_fwd", &infonce_fwd_cuda);
  m.impl("infonce_bwd", &infonce_bwd_cuda);
}
