// Prints, as JSON lines, what the CUDA launchers would launch for given shapes: kernel, threads, dynamic shared
// memory, grid. Host code only (the launchers' planning functions): runs on a machine without a GPU. Built and run by
// `sslscale bench gpu-static` together with the kernels (nvcc ... csrc/tools/launch_report.cpp csrc/*/*.cu).
//
//   launch_report attention B H HKV T D {bf16|fp32}
//   launch_report infonce M N D {bf16|fp16|fp32} SMS

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "attention/attention_cuda.h"
#include "infonce/infonce_cuda.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: launch_report attention B H HKV T D {bf16|fp32}\n"
               "       launch_report infonce M N D {bf16|fp16|fp32} SMS\n");
  return 2;
}

int attention(char** argv) {
  namespace a = sslscale::attention;
  const a::Shape s{std::atoi(argv[0]), std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]),
                   std::atoi(argv[4])};
  const a::DType dtype = std::strcmp(argv[5], "fp32") == 0 ? a::DType::kFloat32 : a::DType::kBFloat16;
  a::LaunchInfo info[8];
  const int n = a::attention_describe(s, dtype, info, 8);
  for (int i = 0; i < n; ++i)
    std::printf(
        "{\"kernel\": \"%s\", \"dtype_bits\": %d, \"head_dim\": %d, \"block_rows\": %d, \"block_cols\": %d, "
        "\"threads\": %d, \"smem_bytes\": %zu, \"grid\": [%lld, 1]}\n",
        info[i].kernel, info[i].dtype_bits, info[i].head_dim, info[i].block_rows, info[i].block_cols,
        info[i].threads, info[i].smem_bytes, info[i].blocks);
  return n > 0 ? 0 : 1;
}

int infonce(char** argv) {
  namespace c = sslscale::infonce_cuda;
  const long long m = std::atoll(argv[0]), n = std::atoll(argv[1]), d = std::atoll(argv[2]);
  const c::DType dtype = std::strcmp(argv[3], "fp32") == 0   ? c::DType::kFloat32
                         : std::strcmp(argv[3], "fp16") == 0 ? c::DType::kFloat16
                                                             : c::DType::kBFloat16;
  const int mult = c::feature_multiple(dtype);
  const long long d_pad = (d + mult - 1) / mult * mult;
  const c::Plan p = c::plan(m, n, d_pad, dtype, std::atoi(argv[4]));
  c::LaunchInfo info[4];
  const int k = c::describe(p, dtype, info, 4);
  for (int i = 0; i < k; ++i)
    std::printf(
        "{\"kernel\": \"%s\", \"dtype_bits\": %d, \"threads\": %d, \"smem_bytes\": %zu, \"grid\": [%d, %d], "
        "\"blocks_per_sm_assumed\": %d, \"register_acc\": %s}\n",
        info[i].kernel, info[i].dtype_bits, info[i].threads, info[i].smem_bytes, info[i].grid_x, info[i].grid_y,
        p.blocks_per_sm, p.register_acc ? "true" : "false");
  return k > 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 8 && std::strcmp(argv[1], "attention") == 0) return attention(argv + 2);
  if (argc == 7 && std::strcmp(argv[1], "infonce") == 0) return infonce(argv + 2);
  return usage();
}
