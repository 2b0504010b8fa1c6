// The one schema registration of the project's ops: `torch.ops.sslscale.*`.
//
// Each kernel file registers its own implementation for its dispatch key (TORCH_LIBRARY_IMPL in
// `csrc/<op>/<op>_cpu.cpp` and `csrc/<op>/<op>_cuda_binding.cpp`); fake (meta) kernels and autograd
// formulas are registered from Python in `sslscale/ops/_registry.py`.
//
// Contracts (all accumulation in fp32; the CPU kernels also take fp64 for gradcheck):
//   infonce_fwd(rows[m,d], cols[n,d], pos[m] int64, self_idx[m] int64) -> (loss[m], lse[m])  f32 (f64 for f64 in)
//       lse_i  = logsumexp_{j != self_idx[i]} rows_i . cols_j      (self_idx[i] = -1: nothing excluded)
//       loss_i = lse_i - rows_i . cols_{pos[i]}
//   infonce_bwd(grad_loss[m] (lse's dtype), rows, cols, pos, self_idx, lse) -> (d_rows[m,d], d_cols[n,d])
//       with p_ij = exp(rows_i . cols_j - lse_i) (0 at j = self_idx[i]) and t_ij = [j == pos[i]]:
//       d_rows_i = sum_j g_i (p_ij - t_ij) cols_j,   d_cols_j = sum_i g_i (p_ij - t_ij) rows_i
//   attention_fwd(q[B,H,T,D], k[B,Hkv,T,D], v[B,Hkv,T,D], scale) -> (out[B,H,T,D], lse[B,H,T] f32)
//   attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)   causal, grouped-query heads

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

TORCH_LIBRARY(sslscale, m) {
  m.def("infonce_fwd(Tensor rows, Tensor cols, Tensor pos, Tensor self_idx) -> (Tensor, Tensor)");
  m.def(
      "infonce_bwd(Tensor grad_loss, Tensor rows, Tensor cols, Tensor pos, Tensor self_idx, Tensor lse)"
      " -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
}

namespace {

bool with_cuda() {
#ifdef SSLSCALE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sslscale C++/CUDA kernels; the ops live in torch.ops.sslscale";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("with_openmp", &with_openmp, "whether the CPU kernels were compiled with OpenMP");
  m.def("num_threads", &at::get_num_threads, "intra-op threads the CPU kernels use");
}
