// The dense GEMM in f64, the reference of the CPU GEMM tests.
#pragma once
#include <vector>

#include "common/test_util.h"

namespace moe::test {

// C (M, N) = alpha · op(A) · op(B) + beta · C0 in f64 from the tensors' (stored) values.
inline std::vector<double> gemm_ref(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C0, double alpha,
                                    double beta) {
  std::vector<double> a = to_f64(A), b = to_f64(B), c = to_f64(C0);
  const int64_t M = C0.size(0), N = C0.size(1), K = ta ? A.size(0) : A.size(1);
  const int64_t lda = A.size(1), ldb = B.size(1);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k)
        s += (ta ? a[static_cast<size_t>(k * lda + i)] : a[static_cast<size_t>(i * lda + k)]) *
             (tb ? b[static_cast<size_t>(j * ldb + k)] : b[static_cast<size_t>(k * ldb + j)]);
      double& cv = c[static_cast<size_t>(i * N + j)];
      cv = alpha * s + beta * cv;
    }
  return c;
}

}  // namespace moe::test
