// moe_gemm_engines — the measurement behind the CPU GEMM engine choice (docs/performance.md):
// C (M, N) = A (M, K) · B (N, K)ᵀ in fp32 on the experts' shapes, by
//   eigen-native   Eigen 3.4 in this file, compiled with -march=native (AVX-512 where the machine
//                  has it; the library itself is built for the baseline ISA, where Eigen gets SSE2)
//   openblas-1     OpenBLAS on one thread (what libmoecore calls per tile)
//   openblas-P     OpenBLAS on its own P threads (the dense-SGEMM reference of the other benchmarks)
//   libmoecore     ops::gemm: tiles over the library's P OpenMP threads, OpenBLAS on each
// GFLOP/s, median of --reps calls after one warm-up call.
//
//   moe_gemm_engines [--threads P] [--reps R] [--smoke]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "bench_common.h"
#include "device/ops.h"

using namespace moe;

namespace {

template <class F>
double gflops_of(int64_t M, int64_t N, int64_t K, int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r <= reps; ++r) {
    const double t0 = bench::now_s();
    f();
    if (r > 0) t.push_back(bench::now_s() - t0);
  }
  return 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) / bench::median(t) * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 5;
  bool smoke = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--smoke")) smoke = true;
    else {
      std::fprintf(stderr, "moe_gemm_engines: unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (smoke) reps = 1;
  set_num_threads(threads);
  struct S {
    const char* what;
    int64_t M, N, K;
  };
  std::vector<S> shapes = {{"mixtral fc1 fwd, one expert", 512, 5632, 1024},
                           {"mixtral fc2 fwd, one expert", 512, 1024, 2816},
                           {"deepseek fc1 fwd, one expert", 192, 1024, 1024},
                           {"small fc1 fwd, one expert", 512, 1024, 256}};
  if (smoke) shapes = {{"tiny", 16, 32, 8}};
  std::printf("moe_gemm_engines  %s; threads %d; eigen SIMD: %s\n", build_info().c_str(), threads,
              Eigen::SimdInstructionSetsInUse());
  std::printf("%-30s %6s %6s %6s %14s %12s %12s %12s\n", "shape", "M", "N", "K", "eigen-native", "openblas-1",
              "openblas-P", "libmoecore");
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (const S& s : shapes) {
    Tensor A = bench::randn({s.M, s.K}, 1), B = bench::randn({s.N, s.K}, 2), C = Tensor::empty({s.M, s.N}, DType::f32);
    Eigen::Map<const Mat> a(A.data_as<float>(), s.M, s.K), b(B.data_as<float>(), s.N, s.K);
    Eigen::Map<Mat> c(C.data_as<float>(), s.M, s.N);
    Eigen::setNbThreads(1);
    const double eig = gflops_of(s.M, s.N, s.K, reps, [&] { c.noalias() = a * b.transpose(); });
    double ob1 = 0, obp = 0;
#if MOE_BENCH_HAVE_OPENBLAS
    const int before = openblas_get_num_threads();
    auto blas = [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(s.M), static_cast<blasint>(s.N),
                  static_cast<blasint>(s.K), 1.0f, A.data_as<float>(), static_cast<blasint>(s.K), B.data_as<float>(),
                  static_cast<blasint>(s.K), 0.0f, C.data_as<float>(), static_cast<blasint>(s.N));
    };
    openblas_set_num_threads(1);
    ob1 = gflops_of(s.M, s.N, s.K, reps, blas);
    openblas_set_num_threads(threads);
    obp = gflops_of(s.M, s.N, s.K, reps, blas);
    openblas_set_num_threads(before);
#endif
    const double lib = gflops_of(s.M, s.N, s.K, reps, [&] { ops::gemm(A, false, B, true, C); });
    std::printf("%-30s %6lld %6lld %6lld %14.1f %12.1f %12.1f %12.1f\n", s.what, static_cast<long long>(s.M),
                static_cast<long long>(s.N), static_cast<long long>(s.K), eig, ob1, obp, lib);
  }
  return 0;
}
