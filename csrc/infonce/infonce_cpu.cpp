// Fused InfoNCE on CPU: per-row log-sum-exp of rows . cols^T without ever holding the m x n logits.
//
// Forward: each worker takes a block of rows, streams column tiles through one small GEMM (MKL sgemm, single
// threaded inside the parallel region) and folds every tile into an online max / sum-of-exp per row. Backward
// recomputes the same tiles from the saved LSE and accumulates d_rows and d_cols in place, scheduled so that no
// two workers ever write the same rows (see backward_grid). Extra memory is O(m + tile) per call, never O(m * n)
// (bf16 adds fp32 accumulators of the outputs' size).
//
// Rows already carry 1/temperature, so logits are unbounded: the online max is what keeps exp() in range.
// bf16 tiles are widened to fp32 before the GEMM; fp64 runs end to end in fp64 (for gradcheck).

#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
// at::vec picks its AVX2 implementation from these; a distinct namespace keeps it apart from generic builds.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
// MKL (LP64) as exported by libtorch_cpu; at::native::cpublas is not exported.
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);
}
// Weak: a torch built without MKL still loads this extension (and falls back to a plain loop GEMM).
#pragma weak sgemm_
#pragma weak dgemm_
#pragma weak MKL_Set_Num_Threads_Local

namespace {

constexpr int64_t kRowBlock = 128;  // rows per work item (at most; fewer when m is small, see row_block)
constexpr int64_t kColBlock = 256;  // columns per tile (and per work item of the d_cols pass)

// Row-major C[M,N] = op(A) op(B) + beta C, with op = transpose when the flag is 'T'. Column-major BLAS sees
// every row-major matrix transposed, so the call swaps the operands.
template <typename acc_t>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t lda, const acc_t* b,
          int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  const acc_t one = 1;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr) return sgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  for (int64_t i = 0; i < m; ++i) {  // no BLAS: correct, not fast
    for (int64_t j = 0; j < n; ++j) {
      acc_t sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        sum += (ta == 'T' ? a[p * lda + i] : a[i * lda + p]) * (tb == 'T' ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = sum + (beta == 0 ? acc_t(0) : beta * c[i * ldc + j]);
    }
  }
}

// Small per-tile GEMMs run inside the parallel region: MKL must not fork its own threads there.
struct MklSingleThread {
  bool mkl = MKL_Set_Num_Threads_Local != nullptr;
  int previous = mkl ? MKL_Set_Num_Threads_Local(1) : 0;
  ~MklSingleThread() {
    if (mkl) MKL_Set_Num_Threads_Local(previous);
  }
};

template <typename acc_t>
struct Workspace {
  std::vector<acc_t> scores, rows, cols;
  explicit Workspace(int64_t d) : scores(kRowBlock * kColBlock), rows(kRowBlock * d), cols(kColBlock * d) {}
};

// Work items handed out dynamically (a shared counter): robust when another process holds a core.
template <typename acc_t, typename F>
void for_each_block(int64_t blocks, int64_t d, const F& body) {
  if (blocks == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), blocks);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    MklSingleThread single;
    Workspace<acc_t> ws(d);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) body(b, ws);
    }
  });
}

// A tile as acc_t: the input itself when it already is, else widened into `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* widen(const scalar_t* src, int64_t count, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buffer, count);
    return buffer;
  }
}

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    if (n >= Vec::size()) {
      Vec v = Vec::loadu(x);
      for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) v = at::vec::maximum(v, Vec::loadu(x + j));
      best = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
    }
  }
  for (; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// sum_j exp(x_j - shift): one exp per logit.
template <typename acc_t>
acc_t sum_exp(const acc_t* x, int64_t n, acc_t shift) {
  acc_t total = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    Vec acc(0.f), s(shift);
    for (; j + Vec::size() <= n; j += Vec::size()) acc = acc + (Vec::loadu(x + j) - s).exp_u20();
    total = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
  }
  for (; j < n; ++j) total += std::exp(x[j] - shift);
  return total;
}

// x_j <- scale * exp(x_j - shift)
template <typename acc_t>
void scaled_exp(acc_t* x, int64_t n, acc_t shift, acc_t scale) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    Vec s(shift), g(scale);
    for (; j + Vec::size() <= n; j += Vec::size()) (g * (Vec::loadu(x + j) - s).exp_u20()).store(x + j);
  }
  for (; j < n; ++j) x[j] = scale * std::exp(x[j] - shift);
}

// Everything one call needs, checked and made contiguous once.
struct Problem {
  at::Tensor rows, cols, pos, self_idx;
  int64_t m, n, d;
};

void check_index(const at::Tensor& idx, const char* name, int64_t m, int64_t n, int64_t lowest) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, "infonce: ", name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == m, "infonce: ", name, " must have shape (", m,
              ",) to match rows, got ", idx.sizes());
  TORCH_CHECK(idx.device().is_cpu(), "infonce: ", name, " must be on the CPU, got ", idx.device());
  const at::Tensor contiguous = idx.contiguous();
  const int64_t* p = contiguous.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(p[i] >= lowest && p[i] < n, "infonce: ", name, "[", i, "] = ", p[i], " is out of range [",
                lowest, ", ", n, ") for ", n, " columns");
  }
}

Problem check_problem(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos,
                      const at::Tensor& self_idx) {
  TORCH_CHECK(rows.dim() == 2, "infonce: rows must be 2-D (m, d), got shape ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2, "infonce: cols must be 2-D (n, d), got shape ", cols.sizes());
  TORCH_CHECK(rows.size(1) == cols.size(1), "infonce: rows and cols must have the same feature dim d, got ",
              rows.size(1), " and ", cols.size(1));
  TORCH_CHECK(rows.size(1) > 0, "infonce: feature dim d must be at least 1, got 0");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "infonce: rows and cols must have the same dtype, got ",
              rows.scalar_type(), " and ", cols.scalar_type());
  const auto dtype = rows.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble,
              "infonce (CPU): dtype ", dtype, " is not supported; expected float32, bfloat16 or float64");
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), "infonce (CPU): rows and cols must be on the CPU");
  const int64_t limit = std::numeric_limits<int>::max();
  TORCH_CHECK(rows.size(0) < limit && cols.size(0) < limit && rows.size(1) < limit,
              "infonce (CPU): sizes must be below 2^31 per dimension, got ", rows.sizes(), " and ", cols.sizes());
  const int64_t m = rows.size(0), n = cols.size(0);
  check_index(pos, "pos", m, n, 0);
  check_index(self_idx, "self_idx", m, n, -1);
  return {rows.contiguous(), cols.contiguous(), pos.contiguous(), self_idx.contiguous(), m, n, rows.size(1)};
}

// The per-row vector `v` (grad_loss or lse) as a contiguous acc_t tensor of length m.
at::Tensor check_row_vector(const at::Tensor& v, const char* name, int64_t m, at::ScalarType acc) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == m, "infonce_bwd: ", name, " must have shape (", m, ",), got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, "infonce_bwd: ", name,
              " must be float32 (or float64), got ", v.scalar_type());
  TORCH_CHECK(v.device().is_cpu(), "infonce_bwd: ", name, " must be on the CPU, got ", v.device());
  return v.to(acc).contiguous();
}

// Rows per work item of the row-parallel loops: kRowBlock, or fewer so that small m still feeds every thread.
int64_t row_block(int64_t m) {
  const int64_t per_worker = (m + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::clamp<int64_t>((per_worker + 15) / 16 * 16, 16, kRowBlock);
}

template <typename scalar_t, typename acc_t>
void forward_impl(const Problem& pb, acc_t* loss, acc_t* lse) {
  const int64_t m = pb.m, n = pb.n, d = pb.d;
  const scalar_t* rows = pb.rows.data_ptr<scalar_t>();
  const scalar_t* cols = pb.cols.data_ptr<scalar_t>();
  const int64_t* pos = pb.pos.data_ptr<int64_t>();
  const int64_t* self_idx = pb.self_idx.data_ptr<int64_t>();
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const int64_t block_rows = row_block(m);
  for_each_block<acc_t>((m + block_rows - 1) / block_rows, d, [&](int64_t block, Workspace<acc_t>& ws) {
    const int64_t i0 = block * block_rows, bm = std::min(block_rows, m - i0);
    const acc_t* r = widen(rows + i0 * d, bm * d, ws.rows.data());
    acc_t run_max[kRowBlock], run_sum[kRowBlock], positive[kRowBlock];
    std::fill_n(run_max, bm, neg_inf);
    std::fill_n(run_sum, bm, acc_t(0));
    std::fill_n(positive, bm, acc_t(0));
    for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
      const int64_t bn = std::min(kColBlock, n - j0);
      const acc_t* c = widen(cols + j0 * d, bn * d, ws.cols.data());
      acc_t* s = ws.scores.data();
      gemm<acc_t>('N', 'T', bm, bn, d, r, d, c, d, acc_t(0), s, bn);
      for (int64_t k = 0; k < bm; ++k) {
        acc_t* srow = s + k * bn;
        const int64_t excluded = self_idx[i0 + k] - j0, target = pos[i0 + k] - j0;
        if (excluded >= 0 && excluded < bn) srow[excluded] = neg_inf;
        if (target >= 0 && target < bn) positive[k] = srow[target];
        const acc_t top = std::max(run_max[k], row_max(srow, bn));
        if (top == neg_inf) continue;  // every column so far excluded
        run_sum[k] = run_sum[k] * std::exp(run_max[k] - top) + sum_exp(srow, bn, top);
        run_max[k] = top;
      }
    }
    for (int64_t k = 0; k < bm; ++k) {
      lse[i0 + k] = run_max[k] + std::log(run_sum[k]);
      loss[i0 + k] = lse[i0 + k] - positive[k];
    }
  });
}

// Turns a score tile (rows i0.., cols j0..) into g_i (p_ij - t_ij) in place.
template <typename acc_t>
void scores_to_grad(acc_t* s, int64_t bm, int64_t bn, int64_t i0, int64_t j0, const acc_t* grad, const acc_t* lse,
                    const int64_t* pos, const int64_t* self_idx) {
  for (int64_t k = 0; k < bm; ++k) {
    acc_t* srow = s + k * bn;
    const int64_t i = i0 + k;
    scaled_exp(srow, bn, lse[i], grad[i]);
    const int64_t excluded = self_idx[i] - j0, target = pos[i] - j0;
    if (excluded >= 0 && excluded < bn) srow[excluded] = 0;
    if (target >= 0 && target < bn) srow[target] -= grad[i];
  }
}

// Backward, one pass: the (row group x column group) grid is swept in `groups` phases; in phase k worker g
// takes cell (g, (g + k) mod groups), so no two cells of a phase share rows or columns and both d_rows and
// d_cols accumulate in place without races. Each score tile is recomputed and exponentiated once.
template <typename scalar_t, typename acc_t>
void backward_grid(const Problem& pb, const acc_t* grad, const acc_t* lse, acc_t* d_rows, acc_t* d_cols,
                   int64_t groups) {
  const int64_t m = pb.m, n = pb.n, d = pb.d;
  const scalar_t* rows = pb.rows.data_ptr<scalar_t>();
  const scalar_t* cols = pb.cols.data_ptr<scalar_t>();
  const int64_t* pos = pb.pos.data_ptr<int64_t>();
  const int64_t* self_idx = pb.self_idx.data_ptr<int64_t>();
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock, col_blocks = (n + kColBlock - 1) / kColBlock;

  for (int64_t phase = 0; phase < groups; ++phase) {
    for_each_block<acc_t>(groups, d, [&](int64_t g, Workspace<acc_t>& ws) {
      const int64_t h = (g + phase) % groups;
      const int64_t rb_end = (g + 1) * row_blocks / groups, cb_end = (h + 1) * col_blocks / groups;
      for (int64_t rb = g * row_blocks / groups; rb < rb_end; ++rb) {
        const int64_t i0 = rb * kRowBlock, bm = std::min(kRowBlock, m - i0);
        const acc_t* r = widen(rows + i0 * d, bm * d, ws.rows.data());
        for (int64_t cb = h * col_blocks / groups; cb < cb_end; ++cb) {
          const int64_t j0 = cb * kColBlock, bn = std::min(kColBlock, n - j0);
          const acc_t* c = widen(cols + j0 * d, bn * d, ws.cols.data());
          acc_t* s = ws.scores.data();
          gemm<acc_t>('N', 'T', bm, bn, d, r, d, c, d, acc_t(0), s, bn);
          scores_to_grad(s, bm, bn, i0, j0, grad, lse, pos, self_idx);
          gemm<acc_t>('N', 'N', bm, d, bn, s, bn, c, d, acc_t(1), d_rows + i0 * d, d);
          gemm<acc_t>('T', 'N', bn, d, bm, s, bn, r, d, acc_t(1), d_cols + j0 * d, d);
        }
      }
    });
  }
}

// Backward, two passes (for grids too small to keep every thread busy): d_rows parallel over row blocks,
// then d_cols parallel over column tiles; each score tile is computed twice.
template <typename scalar_t, typename acc_t>
void backward_two_pass(const Problem& pb, const acc_t* grad, const acc_t* lse, acc_t* d_rows, acc_t* d_cols) {
  const int64_t m = pb.m, n = pb.n, d = pb.d;
  const scalar_t* rows = pb.rows.data_ptr<scalar_t>();
  const scalar_t* cols = pb.cols.data_ptr<scalar_t>();
  const int64_t* pos = pb.pos.data_ptr<int64_t>();
  const int64_t* self_idx = pb.self_idx.data_ptr<int64_t>();

  const int64_t block_rows = row_block(m);
  for_each_block<acc_t>((m + block_rows - 1) / block_rows, d, [&](int64_t block, Workspace<acc_t>& ws) {
    const int64_t i0 = block * block_rows, bm = std::min(block_rows, m - i0);
    const acc_t* r = widen(rows + i0 * d, bm * d, ws.rows.data());
    for (int64_t j0 = 0; j0 < n; j0 += kColBlock) {
      const int64_t bn = std::min(kColBlock, n - j0);
      const acc_t* c = widen(cols + j0 * d, bn * d, ws.cols.data());
      acc_t* s = ws.scores.data();
      gemm<acc_t>('N', 'T', bm, bn, d, r, d, c, d, acc_t(0), s, bn);
      scores_to_grad(s, bm, bn, i0, j0, grad, lse, pos, self_idx);
      gemm<acc_t>('N', 'N', bm, d, bn, s, bn, c, d, acc_t(1), d_rows + i0 * d, d);
    }
  });
  for_each_block<acc_t>((n + kColBlock - 1) / kColBlock, d, [&](int64_t block, Workspace<acc_t>& ws) {
    const int64_t j0 = block * kColBlock, bn = std::min(kColBlock, n - j0);
    const acc_t* c = widen(cols + j0 * d, bn * d, ws.cols.data());
    for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
      const int64_t bm = std::min(kRowBlock, m - i0);
      const acc_t* r = widen(rows + i0 * d, bm * d, ws.rows.data());
      acc_t* s = ws.scores.data();
      gemm<acc_t>('N', 'T', bm, bn, d, r, d, c, d, acc_t(0), s, bn);
      scores_to_grad(s, bm, bn, i0, j0, grad, lse, pos, self_idx);
      gemm<acc_t>('T', 'N', bn, d, bm, s, bn, r, d, acc_t(1), d_cols + j0 * d, d);
    }
  });
}

// Grid groups per side: enough cells per phase for dynamic balancing, or 0 when the grid is too small.
int64_t grid_groups(int64_t m, int64_t n) {
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min({(m + kRowBlock - 1) / kRowBlock, (n + kColBlock - 1) / kColBlock, 4 * threads});
  return groups >= std::max<int64_t>(2, 2 * threads) || (threads == 1 && groups >= 1) ? groups : 0;
}

template <typename scalar_t, typename acc_t>
void backward_impl(const Problem& pb, const acc_t* grad, const acc_t* lse, at::Tensor& d_rows, at::Tensor& d_cols) {
  // fp32/fp64 accumulate in the outputs; bf16 in fp32 buffers narrowed at the end
  at::Tensor rows_acc = std::is_same_v<scalar_t, acc_t> ? d_rows : at::empty(d_rows.sizes(), d_rows.options().dtype(
      c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor cols_acc = std::is_same_v<scalar_t, acc_t> ? d_cols : at::empty(d_cols.sizes(), d_cols.options().dtype(
      c10::CppTypeToScalarType<acc_t>::value));
  rows_acc.zero_();
  cols_acc.zero_();
  if (const int64_t groups = grid_groups(pb.m, pb.n); groups > 0) {
    backward_grid<scalar_t, acc_t>(pb, grad, lse, rows_acc.data_ptr<acc_t>(), cols_acc.data_ptr<acc_t>(), groups);
  } else {
    backward_two_pass<scalar_t, acc_t>(pb, grad, lse, rows_acc.data_ptr<acc_t>(), cols_acc.data_ptr<acc_t>());
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    d_rows.copy_(rows_acc);
    d_cols.copy_(cols_acc);
  }
}

std::tuple<at::Tensor, at::Tensor> infonce_fwd_cpu(const at::Tensor& rows, const at::Tensor& cols,
                                                   const at::Tensor& pos, const at::Tensor& self_idx) {
  const Problem pb = check_problem(rows, cols, pos, self_idx);
  const auto acc_type = pb.rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({pb.m}, pb.rows.options().dtype(acc_type));
  at::Tensor lse = at::empty({pb.m}, pb.rows.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pb.rows.scalar_type(), "infonce_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, acc_t>(pb, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> infonce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& rows,
                                                   const at::Tensor& cols, const at::Tensor& pos,
                                                   const at::Tensor& self_idx, const at::Tensor& lse) {
  const Problem pb = check_problem(rows, cols, pos, self_idx);
  const auto acc_type = pb.rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad = check_row_vector(grad_loss, "grad_loss", pb.m, acc_type);
  const at::Tensor lse_acc = check_row_vector(lse, "lse", pb.m, acc_type);
  at::Tensor d_rows = at::empty_like(pb.rows);
  at::Tensor d_cols = at::empty_like(pb.cols);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, pb.rows.scalar_type(), "infonce_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_impl<scalar_t, acc_t>(pb, grad.data_ptr<acc_t>(), lse_acc.data_ptr<acc_t>(), d_rows, d_cols);
  });
  return {d_rows, d_cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslscale, CPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_cpu);
  m.impl("infonce_bwd", &infonce_bwd_cpu);
}
