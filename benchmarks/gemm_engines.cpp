// moe_gemm_engines — the measurement behind the CPU GEMM engine choice (docs/performance.md): GEMMs
// on the experts' shapes (forward, dgrad, wgrad of one expert) in f32 and bf16, by
//   openblas-1     OpenBLAS's SGEMM on one thread (what libmoecore's openblas engine runs per tile)
//   openblas-P     OpenBLAS's SGEMM on its own P threads, as installed
//   onednn-P       oneDNN's matmul on its own P threads, as installed (f32; bf16 in bf16)
//   ours:<engine>  ops::gemm with the engine forced (onednn, openblas, eigen: every engine in the
//                  build): tiles over the library's P OpenMP threads, the engine single-threaded on
//                  each; bf16 on openblas/eigen widens to f32
// GFLOP/s, median of --reps calls after one warm-up call; the engine the library picks by itself
// is named in the header (build_info), with the CPU model.
//
//   moe_gemm_engines [--threads P] [--reps R] [--smoke]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

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
    bool ta, tb;
    int64_t M, N, K;
  };
  // C (M, N) = op(A) · op(B): fwd A (M, K) · W (N, K)ᵀ; dgrad dY (M, N') · W (N', K); wgrad dYᵀ · X.
  std::vector<S> shapes = {{"mixtral fc1 fwd", false, true, 512, 5632, 1024},
                           {"mixtral fc2 fwd", false, true, 512, 1024, 2816},
                           {"mixtral fc1 dgrad", false, false, 512, 1024, 5632},
                           {"mixtral fc1 wgrad", true, false, 5632, 1024, 512},
                           {"deepseek fc1 fwd", false, true, 192, 1024, 1024},
                           {"deepseek fc1 wgrad", true, false, 1024, 1024, 192},
                           {"small fc1 fwd", false, true, 512, 1024, 256}};
  if (smoke) shapes = {{"tiny", false, true, 16, 32, 8}};
  const std::vector<std::string> engines = cpu_gemm_engines_built();
  std::printf("moe_gemm_engines  %s; threads %d\ncpu: %s\n", build_info().c_str(), threads,
              bench::cpu_model_name().c_str());
  for (DType dt : {DType::f32, DType::bf16}) {
    std::printf("\n%s, GFLOP/s\n%-20s %6s %6s %6s %11s %11s %10s", dtype_name(dt), "shape", "M", "N", "K", "openblas-1",
                "openblas-P", "onednn-P");
    for (const std::string& e : engines) std::printf(" %14s", ("ours:" + e).c_str());
    std::printf("\n");
    for (const S& s : shapes) {
      Tensor A = bench::randn(s.ta ? Shape{s.K, s.M} : Shape{s.M, s.K}, 1);
      Tensor B = bench::randn(s.tb ? Shape{s.N, s.K} : Shape{s.K, s.N}, 2);
      Tensor C = Tensor::empty({s.M, s.N}, DType::f32);
      double ob1 = 0, obp = 0;
#if MOE_BENCH_HAVE_OPENBLAS
      if (dt == DType::f32) {
        const int before = openblas_get_num_threads();
        auto blas = [&] {
          cblas_sgemm(CblasRowMajor, s.ta ? CblasTrans : CblasNoTrans, s.tb ? CblasTrans : CblasNoTrans,
                      static_cast<blasint>(s.M), static_cast<blasint>(s.N), static_cast<blasint>(s.K), 1.0f,
                      A.data_as<float>(), static_cast<blasint>(s.ta ? s.M : s.K), B.data_as<float>(),
                      static_cast<blasint>(s.tb ? s.K : s.N), 0.0f, C.data_as<float>(), static_cast<blasint>(s.N));
        };
        openblas_set_num_threads(1);
        ob1 = gflops_of(s.M, s.N, s.K, reps, blas);
        openblas_set_num_threads(threads);
        obp = gflops_of(s.M, s.N, s.K, reps, blas);
        openblas_set_num_threads(before);
      }
#endif
      const double dnp = bench::dense_onednn_gflops(dt, s.M, s.N, s.K, reps, s.ta, s.tb);
      std::printf("%-20s %6lld %6lld %6lld %11.1f %11.1f %10.1f", s.what, static_cast<long long>(s.M),
                  static_cast<long long>(s.N), static_cast<long long>(s.K), ob1, obp, dnp);
      if (dt == DType::bf16) A = ops::cast(A, dt), B = ops::cast(B, dt), C = Tensor::empty({s.M, s.N}, dt);
      for (const std::string& e : engines) {
        cpu_gemm_set_engine(e);
        std::printf(" %14.1f", gflops_of(s.M, s.N, s.K, reps, [&] { ops::gemm(A, s.ta, B, s.tb, C); }));
      }
      cpu_gemm_set_engine("");
      std::printf("\n");
    }
  }
  return 0;
}
