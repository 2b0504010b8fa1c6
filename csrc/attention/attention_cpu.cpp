// Fused causal (grouped-query) attention on CPU: the flash-attention algorithm with per-tile BLAS GEMMs.
//
// Layout: every (B, H, T, D) operand is addressed through its own batch, head and row strides (the feature stride
// must be 1), so a model's (B, T, H, D).transpose(1, 2) views are read in place, and the outputs (out, dq, dk, dv)
// are allocated with `empty_like` of their input: the same layout when the input is dense, contiguous otherwise.
//
// Forward: one task per (batch, head, query tile). The query tile meets the key/value tiles at or left of the
// diagonal (tiles wholly above it are never visited), keeping a running row max m, row sum l and an unnormalised
// output accumulator: the T x T scores never exist, only one tile of them per task. It stores out and
// lse = m + log(l).
// Backward: one task per (batch, head), which owns dq of its head outright and accumulates dk/dv of its head into
// its own slice of a (B, H, T, D) buffer (summed over each kv group afterwards, in a fixed order), so no two tasks
// ever write the same memory. P is recomputed from lse, delta = rowsum(dO * O).
//
// The tile GEMMs go to the BLAS that libtorch_cpu already carries (`sgemm_`/`dgemm_`); each worker forces it to
// one thread, since the parallelism is ours. Tasks are handed out through an atomic counter (dynamic scheduling:
// `at::parallel_for` splits its range statically, which stalls on a shared machine when one core is busy).
// bf16 tiles are converted to fp32 when loaded; all accumulation is fp32 (fp64 for fp64 inputs).

// at::vec picks its SIMD implementation from CPU_CAPABILITY_* (defined by ATen's own per-ISA builds only); without
// it Vectorized<float> is a scalar loop calling std::exp. Select the AVX2 one when the compiler targets AVX2+FMA
// (-march=native), in its own namespace at::vec::AVX2 so it cannot clash with other files' default build.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL only (weak: absent with another BLAS). The C entry point: lower-case `mkl_set_num_threads_local` is the
// Fortran one (takes int*). Sets the calling thread's BLAS thread count, returns the previous setting.
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace {

constexpr int64_t kFwdBlockQ = 128;  // query rows per forward task
constexpr int64_t kFwdBlockK = 512;  // keys per streamed forward tile (a multiple of kFwdBlockQ)
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 128;
static_assert(kFwdBlockK % kFwdBlockQ == 0, "a key tile must never start right of its query tile's first row");

// Row-major C[m, n] = alpha * op(A)[m, k] @ op(B)[k, n] + beta * C, via the column-major Fortran BLAS
// (the row-major product is the column-major C^T = op(B)^T op(A)^T).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// Keeps BLAS single-threaded on this worker for the guard's lifetime.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }

 private:
  int previous_;
};

// Runs work(task, scratch) for task in [0, n_tasks) on the intra-op threads, each taking the next task when it is
// free; every worker gets its own scratch = make_scratch(), freed when the call returns.
template <typename MakeScratch, typename Work>
void parallel_dynamic(int64_t n_tasks, const MakeScratch& make_scratch, const Work& work) {
  std::atomic<int64_t> next{0};
  const int64_t n_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    SingleThreadedBlas single;
    auto scratch = make_scratch();
    for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) work(task, scratch);
  });
}

// A row-major matrix in memory: rows `ld` elements apart (D contiguous features per row).
template <typename T>
struct Mat {
  T* p;
  int64_t ld;
  T* row(int64_t r) const { return p + r * ld; }
};

// A (B, H, T, D) tensor addressed through its batch, head and row strides (feature stride 1).
template <typename T>
struct Strided {
  T* data;
  int64_t sb, sh, st;
  Mat<T> head(int64_t b, int64_t h) const { return {data + b * sb + h * sh, st}; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Rows [0, n) of `src` as acc_t: the rows in place when no conversion is needed, else converted into buf
// (leading dimension D).
template <typename acc_t, typename scalar_t>
Mat<const acc_t> as_acc(Mat<const scalar_t> src, int64_t n, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    for (int64_t r = 0; r < n; ++r) at::vec::convert(src.row(r), buf + r * D, D);
    return {buf, D};
  }
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec lowest(-std::numeric_limits<T>::infinity());
  Vec acc = lowest;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + i));
  if (i < n) acc = at::vec::maximum(acc, Vec::set(lowest, Vec::loadu(x + i, n - i), n - i));
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, acc);
}

// x[i] = exp(x[i] - shift) for i < n, returning the sum of the new values.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const Vec s(shift);
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(x + i) - s).exp_u20();
    e.store(x + i);
    acc = acc + e;
  }
  if (i < n) {
    const Vec e = Vec::set(Vec(T(0)), (Vec::loadu(x + i, n - i) - s).exp_u20(), n - i);
    e.store(x + i, n - i);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, acc);
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  at::vec::map([factor](at::vec::Vectorized<T> a) { return a * at::vec::Vectorized<T>(factor); }, x, x, n);
}

// Keys a query row t may see inside the key tile [k0, k0 + nk): min(nk, t - k0 + 1), at least 0.
inline int64_t visible_keys(int64_t t, int64_t k0, int64_t nk) {
  return std::clamp<int64_t>(t - k0 + 1, 0, nk);
}

struct Dims {
  int64_t batch, heads, kv_heads, seq, head_dim;
  int64_t group() const { return heads / kv_heads; }
};

template <typename scalar_t, typename acc_t>
void forward_kernel(Strided<const scalar_t> q, Strided<const scalar_t> k, Strided<const scalar_t> v,
                    Strided<scalar_t> out, float* lse, Dims s, acc_t scale) {
  const int64_t T = s.seq, D = s.head_dim;
  const int64_t n_tiles = (T + kFwdBlockQ - 1) / kFwdBlockQ, n_heads = s.batch * s.heads;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  struct Scratch {
    std::vector<acc_t> q, k, v, scores, out, row_max, row_sum;
  };
  const auto make_scratch = [&] {
    constexpr bool convert = !std::is_same_v<acc_t, scalar_t>;
    return Scratch{std::vector<acc_t>(convert ? kFwdBlockQ * D : 0), std::vector<acc_t>(convert ? kFwdBlockK * D : 0),
                   std::vector<acc_t>(convert ? kFwdBlockK * D : 0), std::vector<acc_t>(kFwdBlockQ * kFwdBlockK),
                   std::vector<acc_t>(kFwdBlockQ * D), std::vector<acc_t>(kFwdBlockQ),
                   std::vector<acc_t>(kFwdBlockQ)};
  };
  parallel_dynamic(n_heads * n_tiles, make_scratch, [&](int64_t task, Scratch& buf) {
    // Longest tiles (those nearest the end of the sequence) first, so the last tasks handed out are short.
    const int64_t tile = n_tiles - 1 - task / n_heads, bh = task % n_heads;
    const int64_t b = bh / s.heads, h = bh % s.heads, hk = h / s.group();
    const int64_t q0 = tile * kFwdBlockQ, q1 = std::min(q0 + kFwdBlockQ, T), nq = q1 - q0;
    const Mat<const scalar_t> k_head = k.head(b, hk), v_head = v.head(b, hk), q_head = q.head(b, h);
    const Mat<const acc_t> qt = as_acc(Mat<const scalar_t>{q_head.row(q0), q_head.ld}, nq, D, buf.q.data());
    acc_t* acc = buf.out.data();
    acc_t* m = buf.row_max.data();
    acc_t* l = buf.row_sum.data();
    std::fill(acc, acc + nq * D, acc_t(0));
    std::fill(m, m + nq, neg_inf);
    std::fill(l, l + nq, acc_t(0));

    for (int64_t k0 = 0; k0 < q1; k0 += kFwdBlockK) {  // key tiles wholly above the diagonal: never visited
      const int64_t nk = std::min(k0 + kFwdBlockK, q1) - k0;
      const Mat<const acc_t> kt = as_acc(Mat<const scalar_t>{k_head.row(k0), k_head.ld}, nk, D, buf.k.data());
      const Mat<const acc_t> vt = as_acc(Mat<const scalar_t>{v_head.row(k0), v_head.ld}, nk, D, buf.v.data());
      acc_t* p = buf.scores.data();
      gemm<acc_t>(false, true, nq, nk, D, scale, qt.p, qt.ld, kt.p, kt.ld, acc_t(0), p, nk);
      for (int64_t r = 0; r < nq; ++r) {
        acc_t* row = p + r * nk;
        const int64_t n_vis = visible_keys(q0 + r, k0, nk);
        std::fill(row + n_vis, row + nk, acc_t(0));
        if (n_vis == 0) continue;
        const acc_t m_new = std::max(m[r], row_max(row, n_vis));
        const acc_t rescale = std::exp(m[r] - m_new);  // 0 on the first tile (m = -inf)
        l[r] = l[r] * rescale + exp_shifted_sum(row, n_vis, m_new);
        m[r] = m_new;
        if (rescale != acc_t(1)) scale_row(acc + r * D, D, rescale);
      }
      gemm<acc_t>(false, false, nq, D, nk, acc_t(1), p, nk, vt.p, vt.ld, acc_t(1), acc, D);
    }

    const Mat<scalar_t> out_head = out.head(b, h);
    float* lse_rows = lse + bh * T + q0;
    for (int64_t r = 0; r < nq; ++r) {
      acc_t* row = acc + r * D;
      scale_row(row, D, acc_t(1) / l[r]);
      lse_rows[r] = static_cast<float>(m[r] + std::log(l[r]));
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        std::copy(row, row + D, out_head.row(q0 + r));
      } else {
        at::vec::convert(row, out_head.row(q0 + r), D);
      }
    }
  });
}

// dq, dk, dv: acc_t outputs addressed per query head (dk/dv for every query head, not yet summed over the kv
// group unless the group is 1); every operand is strided.
template <typename scalar_t, typename acc_t>
void backward_kernel(Strided<const scalar_t> grad_out, Strided<const scalar_t> q, Strided<const scalar_t> k,
                     Strided<const scalar_t> v, Strided<const scalar_t> out, const float* lse, Strided<acc_t> dq,
                     Strided<acc_t> dk, Strided<acc_t> dv, Dims s, acc_t scale) {
  const int64_t T = s.seq, D = s.head_dim;

  struct Scratch {
    std::vector<acc_t> q, k, v, grad_out, delta, p, dp;
  };
  const auto make_scratch = [&] {
    const int64_t head = std::is_same_v<acc_t, scalar_t> ? 0 : T * D;  // converted copies of one head
    return Scratch{std::vector<acc_t>(head), std::vector<acc_t>(head), std::vector<acc_t>(head),
                   std::vector<acc_t>(head), std::vector<acc_t>(T), std::vector<acc_t>(kBwdBlockQ * kBwdBlockK),
                   std::vector<acc_t>(kBwdBlockQ * kBwdBlockK)};
  };
  parallel_dynamic(s.batch * s.heads, make_scratch, [&](int64_t bh, Scratch& buf) {
    const int64_t b = bh / s.heads, h = bh % s.heads, hk = h / s.group();
    const Mat<const acc_t> qh = as_acc(q.head(b, h), T, D, buf.q.data());
    const Mat<const acc_t> kh = as_acc(k.head(b, hk), T, D, buf.k.data());
    const Mat<const acc_t> vh = as_acc(v.head(b, hk), T, D, buf.v.data());
    const Mat<const acc_t> doh = as_acc(grad_out.head(b, h), T, D, buf.grad_out.data());
    const Mat<const scalar_t> out_h = out.head(b, h);
    const float* lse_h = lse + bh * T;
    const Mat<acc_t> dq_h = dq.head(b, h), dk_h = dk.head(b, h), dv_h = dv.head(b, h);
    for (int64_t t = 0; t < T; ++t) {
      std::fill(dq_h.row(t), dq_h.row(t) + D, acc_t(0));
      std::fill(dk_h.row(t), dk_h.row(t) + D, acc_t(0));
      std::fill(dv_h.row(t), dv_h.row(t) + D, acc_t(0));
    }

    acc_t* delta = buf.delta.data();  // delta_t = dO_t . O_t = sum_j P_tj dP_tj
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* o_row = out_h.row(t);
      const acc_t* do_row = doh.row(t);
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += do_row[d] * static_cast<acc_t>(o_row[d]);
      delta[t] = dot;
    }

    for (int64_t k0 = 0; k0 < T; k0 += kBwdBlockK) {
      const int64_t nk = std::min(k0 + kBwdBlockK, T) - k0;
      const acc_t* kt = kh.row(k0);
      const acc_t* vt = vh.row(k0);
      acc_t* dkt = dk_h.row(k0);
      acc_t* dvt = dv_h.row(k0);
      // Query tiles whose last row reaches this key tile; the ones before it lie wholly above the diagonal.
      for (int64_t q0 = (k0 / kBwdBlockQ) * kBwdBlockQ; q0 < T; q0 += kBwdBlockQ) {
        const int64_t nq = std::min(q0 + kBwdBlockQ, T) - q0;
        const acc_t* qt = qh.row(q0);
        const acc_t* dot = doh.row(q0);
        acc_t* p = buf.p.data();
        acc_t* dp = buf.dp.data();
        gemm<acc_t>(false, true, nq, nk, D, scale, qt, qh.ld, kt, kh.ld, acc_t(0), p, nk);  // scaled scores
        for (int64_t r = 0; r < nq; ++r) {
          acc_t* row = p + r * nk;
          const int64_t n_vis = visible_keys(q0 + r, k0, nk);
          exp_shifted_sum(row, n_vis, static_cast<acc_t>(lse_h[q0 + r]));  // P = exp(S - lse)
          std::fill(row + n_vis, row + nk, acc_t(0));
        }
        gemm<acc_t>(true, false, nk, D, nq, acc_t(1), p, nk, dot, doh.ld, acc_t(1), dvt, dv_h.ld);  // dV += P^T dO
        gemm<acc_t>(false, true, nq, nk, D, acc_t(1), dot, doh.ld, vt, vh.ld, acc_t(0), dp, nk);   // dP = dO V^T
        for (int64_t r = 0; r < nq; ++r) {  // dS = P * (dP - delta), in place of P
          using Vec = at::vec::Vectorized<acc_t>;
          const Vec dr(delta[q0 + r]);
          at::vec::map2([dr](Vec pv, Vec dpv) { return pv * (dpv - dr); }, p + r * nk, p + r * nk, dp + r * nk,
                        nk);
        }
        gemm<acc_t>(false, false, nq, D, nk, scale, p, nk, kt, kh.ld, acc_t(1), dq_h.row(q0), dq_h.ld);  // dQ += dS K
        gemm<acc_t>(true, false, nk, D, nq, scale, p, nk, qt, qh.ld, acc_t(1), dkt, dk_h.ld);  // dK += dS^T Q
      }
    }
  });
}

const char* const kContract = "q (B, H, T, D), k and v (B, H_kv, T, D)";

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-D (", kContract,
              "), got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention (CPU kernel): q, k, v must be CPU tensors, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble,
              "attention (CPU kernel): dtype ", dtype, " is not supported; expected float32, bfloat16 or float64");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  const Dims s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.batch, "attention: batch differs: q has ", s.batch, ", k/v have ", k.size(0));
  TORCH_CHECK(k.size(2) == s.seq, "attention: sequence length differs: q has T=", s.seq, ", k/v have T=",
              k.size(2));
  TORCH_CHECK(k.size(3) == s.head_dim, "attention: head_dim differs: q has ", s.head_dim, ", k/v have ",
              k.size(3));
  TORCH_CHECK(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128, "attention: head_dim=", s.head_dim,
              " is not supported; expected 32, 64 or 128");
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "attention: heads=", s.heads,
              " must be a multiple of kv_heads=", s.kv_heads, " (grouped-query attention)");
  return s;
}

void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "attention: scale must be finite and > 0, got ", scale);
}

// `t` itself when its features are contiguous (any batch, head and row strides), else a contiguous copy.
at::Tensor rows_strided(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale) {
  const Dims s = check_qkv(q_in, k_in, v_in);
  check_scale(scale);
  const at::Tensor q = rows_strided(q_in), k = rows_strided(k_in), v = rows_strided(v_in);
  at::Tensor out = at::empty_like(q);  // q's layout when q is dense (e.g. a (B, T, H, D) transpose view)
  at::Tensor lse = at::empty({s.batch, s.heads, s.seq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(strided<const scalar_t>(q), strided<const scalar_t>(k),
                                    strided<const scalar_t>(v), strided<scalar_t>(out),
                                    lse.mutable_data_ptr<float>(), s, static_cast<acc_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out_in,
                                                                 const at::Tensor& q_in, const at::Tensor& k_in,
                                                                 const at::Tensor& v_in, const at::Tensor& out_in,
                                                                 const at::Tensor& lse_in, double scale) {
  const Dims s = check_qkv(q_in, k_in, v_in);
  check_scale(scale);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "attention_bwd: grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(),
              " and ", out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "attention_bwd: grad_out and out must have q's dtype ", q_in.scalar_type(), ", got ",
              grad_out_in.scalar_type(), " and ", out_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "attention_bwd: lse must be float32, got ",
              lse_in.scalar_type());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({s.batch, s.heads, s.seq}), "attention_bwd: lse must have shape (",
              s.batch, ", ", s.heads, ", ", s.seq, "), got ", lse_in.sizes());
  TORCH_CHECK(grad_out_in.device().is_cpu() && out_in.device().is_cpu() && lse_in.device().is_cpu(),
              "attention_bwd (CPU kernel): grad_out, out and lse must be CPU tensors");
  const at::Tensor grad_out = rows_strided(grad_out_in), q = rows_strided(q_in), k = rows_strided(k_in),
                   v = rows_strided(v_in), out = rows_strided(out_in), lse = lse_in.contiguous();
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool direct_dq = q.scalar_type() == acc_type;
  const bool direct_dkv = direct_dq && s.group() == 1;
  // Outputs in their input's layout. Without a cast or a group sum the kernel writes them directly; otherwise it
  // writes acc-typed buffers (dk/dv: one per query head) that are cast / summed into them afterwards.
  const auto acc_opts = q.options().dtype(acc_type);
  at::Tensor dq = direct_dq ? at::empty_like(q) : at::empty(q.sizes(), acc_opts);
  at::Tensor dk_heads = direct_dkv ? at::empty_like(k) : at::empty(q.sizes(), acc_opts);
  at::Tensor dv_heads = direct_dkv ? at::empty_like(v) : at::empty(q.sizes(), acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(strided<const scalar_t>(grad_out), strided<const scalar_t>(q),
                                     strided<const scalar_t>(k), strided<const scalar_t>(v),
                                     strided<const scalar_t>(out), lse.const_data_ptr<float>(),
                                     strided<acc_t>(dq), strided<acc_t>(dk_heads), strided<acc_t>(dv_heads), s,
                                     static_cast<acc_t>(scale));
  });
  if (!direct_dq) dq = at::empty_like(q).copy_(dq);
  if (direct_dkv) return {dq, dk_heads, dv_heads};
  auto group_sum = [&](const at::Tensor& per_head, const at::Tensor& like) {
    at::Tensor summed = at::empty_like(like);
    const at::Tensor groups = per_head.view({s.batch, s.kv_heads, s.group(), s.seq, s.head_dim});
    if (direct_dq) return at::sum_out(summed, groups, {2});  // no cast: sum straight into the output's layout
    return summed.copy_(groups.sum(2));
  };
  return {dq, group_sum(dk_heads, k), group_sum(dv_heads, v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sslscale, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
