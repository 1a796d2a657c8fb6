// Dense and grouped GEMM on the CPU. f32/f64 go to the BLAS chosen at configure time (OpenBLAS's
// cblas, or Eigen when OpenBLAS is absent); bf16/f16 widen to f32, multiply, and round back.
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"

#if MOE_HAVE_OPENBLAS
#include <cblas.h>
#else
#include <Eigen/Core>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe {

namespace {

int g_threads = 0;

#if MOE_HAVE_OPENBLAS
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}
#else
template <class T>
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Mat, 0, Stride> c(C, M, N, Stride(ldc));
  Eigen::Map<const Mat, 0, Stride> a(A, ta ? K : M, ta ? M : K, Stride(lda));
  Eigen::Map<const Mat, 0, Stride> b(B, tb ? N : K, tb ? K : N, Stride(ldb));
  if (beta == T(0)) c.setZero(); else if (beta != T(1)) c *= beta;
  if (ta && tb) c.noalias() += alpha * a.transpose() * b.transpose();
  else if (ta) c.noalias() += alpha * a.transpose() * b;
  else if (tb) c.noalias() += alpha * a * b.transpose();
  else c.noalias() += alpha * a * b;
}
#endif

// One GEMM over any float storage: C (M,N) = alpha op(A) op(B) + beta C.
template <class T>
void gemm_typed(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const void* A,
                const void* B, double beta, void* C) {
  if (M == 0 || N == 0) return;
  int64_t lda = ta ? M : K, ldb = tb ? K : N;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (K == 0) {  // BLAS may not touch C when K = 0: apply beta ourselves
      T* c = static_cast<T*>(C);
      for (int64_t i = 0; i < M * N; ++i) c[i] = beta == 0.0 ? T(0) : static_cast<T>(beta * c[i]);
      return;
    }
    blas_gemm(ta, tb, M, N, K, static_cast<T>(alpha), static_cast<const T*>(A), lda,
              static_cast<const T*>(B), ldb, static_cast<T>(beta), static_cast<T*>(C), N);
  } else {
    std::vector<float> a(static_cast<size_t>(M * K)), b(static_cast<size_t>(K * N)), c(static_cast<size_t>(M * N));
    const T* pa = static_cast<const T*>(A);
    const T* pb = static_cast<const T*>(B);
    T* pc = static_cast<T*>(C);
    for (size_t i = 0; i < a.size(); ++i) a[i] = cpu::to_acc(pa[i]);
    for (size_t i = 0; i < b.size(); ++i) b[i] = cpu::to_acc(pb[i]);
    if (beta != 0.0)
      for (size_t i = 0; i < c.size(); ++i) c[i] = cpu::to_acc(pc[i]);
    gemm_typed<float>(ta, tb, M, N, K, alpha, a.data(), b.data(), beta, c.data());
    for (size_t i = 0; i < c.size(); ++i) pc[i] = cpu::from_acc<T>(c[i]);
  }
}

}  // namespace

const char* cpu_blas_name() {
#if MOE_HAVE_OPENBLAS
  return "OpenBLAS";
#else
  return "Eigen";
#endif
}

void cpu_set_num_threads(int n) {
  g_threads = n;
#if MOE_HAVE_OPENBLAS
  openblas_set_num_threads(n);
#else
  Eigen::setNbThreads(n);
#endif
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
}

int cpu_num_threads() {
  if (g_threads > 0) return g_threads;
#if MOE_HAVE_OPENBLAS
  return openblas_get_num_threads();
#elif defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void cpu_gemm(const GemmArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "gemm", [&](auto tag) {
    using T = decltype(tag);
    gemm_typed<T>(a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, a.A, a.B, a.beta, a.C);
  });
}

void cpu_grouped_gemm(const GroupedGemmArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "grouped_gemm", [&](auto tag) {
    using T = decltype(tag);
    const T* A = static_cast<const T*>(a.A);
    const T* B = static_cast<const T*>(a.B);
    T* C = static_cast<T*>(a.C);
    int64_t row = 0;
    double beta = a.accumulate ? 1.0 : 0.0;
    for (int64_t g = 0; g < a.G; ++g) {
      int64_t m = a.rows_host[g];
      switch (a.mode) {
        case GroupedGemmMode::fwd:  // (m,K) x (N,K)^T -> (m,N)
          gemm_typed<T>(false, true, m, a.N, a.K, 1.0, A + row * a.K, B + g * a.N * a.K, beta, C + row * a.N);
          break;
        case GroupedGemmMode::dgrad:  // (m,N) x (N,K) -> (m,K)
          gemm_typed<T>(false, false, m, a.K, a.N, 1.0, A + row * a.N, B + g * a.N * a.K, beta, C + row * a.K);
          break;
        case GroupedGemmMode::wgrad:  // (m,N)^T x (m,K) -> (N,K)
          gemm_typed<T>(true, false, a.N, a.K, m, 1.0, A + row * a.N, B + row * a.K, beta, C + g * a.N * a.K);
          break;
      }
      row += m;
    }
  });
}

}  // namespace moe
