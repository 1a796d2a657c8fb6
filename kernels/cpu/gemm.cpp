// Dense and grouped GEMM on the CPU. f32/f64 go to the BLAS chosen at configure time (OpenBLAS's
// cblas, or Eigen when OpenBLAS is absent); bf16/f16 widen to f32, multiply, and round back.
//
// Threading: one pool, OpenMP's. The BLAS itself always runs single-threaded; a GEMM (or every
// group of a grouped GEMM) is cut into tiles along its larger output dimension and the tiles are
// shared out over the OpenMP threads, each thread calling the single-threaded BLAS on its tiles.
// Why not the BLAS's own threads: OpenBLAS's pthread pool and the OpenMP pool of the other CPU
// kernels would take turns on the same cores, each spinning while the other works (the PyTorch
// peer, which mixes the two, runs up to 3.5x slower for it: docs/performance.md); and a grouped GEMM
// is many small GEMMs, which share out better as whole groups than each split over every thread.
// Eigen (the fallback engine) is measured slower than OpenBLAS even when built for the machine.
// Tiles never split the reduction dimension, so every output element is one BLAS dot product over
// the full K wherever it lands: results do not depend on which thread computes a tile, and the
// tiling depends only on the shapes and the thread count.
#include <algorithm>
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

// The BLAS runs on one thread: the parallelism is ours (see the header comment). Called before
// every GEMM (a cheap check), so a program that changed the BLAS's threads in between is set back.
void blas_single_threaded() {
#if MOE_HAVE_OPENBLAS
  if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
#else
  if (Eigen::nbThreads() != 1) Eigen::setNbThreads(1);
#endif
}

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

// One GEMM on f32 or f64 storage with explicit leading dimensions:
// C (M, N) (ldc) = alpha · op(A) · op(B) + beta · C.
template <class T>
struct Task {
  bool ta = false, tb = false;
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  int64_t lda = 0;
  const T* B = nullptr;
  int64_t ldb = 0;
  T* C = nullptr;
  int64_t ldc = 0;
  T alpha = 1, beta = 0;
  double cost() const { return static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(std::max<int64_t>(K, 1)); }
};

template <class T>
void run_task(const Task<T>& t) {
  if (t.M == 0 || t.N == 0) return;
  if (t.K == 0) {  // BLAS may not touch C when K = 0: apply beta ourselves
    for (int64_t i = 0; i < t.M; ++i) {
      T* c = t.C + i * t.ldc;
      for (int64_t j = 0; j < t.N; ++j) c[j] = t.beta == T(0) ? T(0) : t.beta * c[j];
    }
    return;
  }
  blas_gemm(t.ta, t.tb, t.M, t.N, t.K, t.alpha, t.A, t.lda, t.B, t.ldb, t.beta, t.C, t.ldc);
}

// Rows [i0, i0 + m) of C: rows of op(A), all of op(B).
template <class T>
Task<T> rows_of(const Task<T>& t, int64_t i0, int64_t m) {
  Task<T> s = t;
  s.M = m;
  s.A = t.ta ? t.A + i0 : t.A + i0 * t.lda;  // op(A) row i is A row i, or A column i when transposed
  s.C = t.C + i0 * t.ldc;
  return s;
}
// Columns [j0, j0 + n) of C: columns of op(B), all of op(A).
template <class T>
Task<T> cols_of(const Task<T>& t, int64_t j0, int64_t n) {
  Task<T> s = t;
  s.N = n;
  s.B = t.tb ? t.B + j0 * t.ldb : t.B + j0;
  s.C = t.C + j0;
  return s;
}

// Below this many multiply-adds a GEMM is never split (a tile should outweigh its packing and
// the fork); pieces are whole multiples of kAlign rows or columns, at least kMinPiece.
constexpr double kMinSplitCost = double(1 << 22);
constexpr int64_t kAlign = 16;
constexpr int64_t kMinPiece = 64;

// Cuts the tasks into tiles and runs them over the threads. Each task is split along its larger
// output dimension (the smaller operand is then the one every tile re-reads) into about
// cost / target pieces: one GEMM into P equal tiles, several into tiles of about a sixth of a
// thread's share, so that unequal groups still balance; the largest tiles go first.
template <class T>
void run_tasks(const std::vector<Task<T>>& tasks) {
  blas_single_threaded();
  const int P = cpu_num_threads();
  double total = 0.0;
  for (const Task<T>& t : tasks) total += t.cost();
  if (P <= 1 || total < kMinSplitCost) {
    for (const Task<T>& t : tasks) run_task(t);
    return;
  }
  const double target = std::max(kMinSplitCost, total / ((tasks.size() == 1 ? 1.0 : 6.0) * P));
  std::vector<Task<T>> tiles;
  for (const Task<T>& t : tasks) {
    if (t.M == 0 || t.N == 0) continue;
    const bool split_rows = t.M >= t.N;
    const int64_t dim = split_rows ? t.M : t.N;
    int64_t pieces = static_cast<int64_t>(t.cost() / target + 0.5);
    pieces = std::clamp<int64_t>(pieces, 1, std::max<int64_t>(1, dim / kMinPiece));
    int64_t step = (dim + pieces - 1) / pieces;
    step = (step + kAlign - 1) / kAlign * kAlign;
    for (int64_t s = 0; s < dim; s += step) {
      const int64_t n = std::min(step, dim - s);
      tiles.push_back(split_rows ? rows_of(t, s, n) : cols_of(t, s, n));
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Task<T>& a, const Task<T>& b) { return a.cost() > b.cost(); });
  const int64_t n = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(P) if (n > 1)
  for (int64_t i = 0; i < n; ++i) run_task(tiles[static_cast<size_t>(i)]);
}

template <class T>
Task<T> dense_task(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* A, const T* B,
                   double beta, T* C) {
  Task<T> t;
  t.ta = ta, t.tb = tb, t.M = M, t.N = N, t.K = K;
  t.A = A, t.lda = ta ? M : K;
  t.B = B, t.ldb = tb ? K : N;
  t.C = C, t.ldc = N;
  t.alpha = static_cast<T>(alpha), t.beta = static_cast<T>(beta);
  return t;
}

// The tasks of a grouped GEMM over storage type T (f32 or f64).
template <class T>
std::vector<Task<T>> grouped_tasks(const GroupedGemmArgs& a, const T* A, const T* B, T* C) {
  std::vector<Task<T>> tasks;
  tasks.reserve(static_cast<size_t>(a.G));
  const double beta = a.accumulate ? 1.0 : 0.0;
  int64_t row = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t m = a.rows_host[g];
    switch (a.mode) {
      case GroupedGemmMode::fwd:  // (m,K) x (N,K)^T -> (m,N)
        tasks.push_back(dense_task<T>(false, true, m, a.N, a.K, 1.0, A + row * a.K, B + g * a.N * a.K, beta, C + row * a.N));
        break;
      case GroupedGemmMode::dgrad:  // (m,N) x (N,K) -> (m,K)
        tasks.push_back(dense_task<T>(false, false, m, a.K, a.N, 1.0, A + row * a.N, B + g * a.N * a.K, beta, C + row * a.K));
        break;
      case GroupedGemmMode::wgrad:  // (m,N)^T x (m,K) -> (N,K)
        tasks.push_back(dense_task<T>(true, false, a.N, a.K, m, 1.0, A + row * a.N, B + row * a.K, beta, C + g * a.N * a.K));
        break;
    }
    row += m;
  }
  return tasks;
}

// bf16/f16: widen the whole operands to f32 once, run the f32 path, round C back.
template <class T>
std::vector<float> widen(const void* p, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  const T* s = static_cast<const T*>(p);
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = cpu::to_acc(s[i]);
  return v;
}
template <class T>
void narrow_into(const std::vector<float>& v, void* p) {
  T* d = static_cast<T*>(p);
  for (size_t i = 0; i < v.size(); ++i) d[i] = cpu::from_acc<T>(v[i]);
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
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
}

int cpu_num_threads() {
  if (g_threads > 0) return g_threads;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void cpu_gemm(const GemmArgs& a, const ExecCtx&) {
  if (a.M == 0 || a.N == 0) return;
  cpu::dispatch_float(a.dtype, "gemm", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      run_tasks<T>({dense_task<T>(a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, static_cast<const T*>(a.A),
                                  static_cast<const T*>(a.B), a.beta, static_cast<T*>(a.C))});
    } else {
      std::vector<float> A = widen<T>(a.A, a.M * a.K), B = widen<T>(a.B, a.K * a.N);
      std::vector<float> C = a.beta != 0.0 ? widen<T>(a.C, a.M * a.N) : std::vector<float>(static_cast<size_t>(a.M * a.N));
      run_tasks<float>({dense_task<float>(a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, A.data(), B.data(), a.beta,
                                          C.data())});
      narrow_into<T>(C, a.C);
    }
  });
}

void cpu_grouped_gemm(const GroupedGemmArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "grouped_gemm", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      run_tasks<T>(grouped_tasks<T>(a, static_cast<const T*>(a.A), static_cast<const T*>(a.B), static_cast<T*>(a.C)));
    } else {
      // Element counts of A, B, C for the mode (M = Σ rows).
      const int64_t G = a.G, M = a.M, N = a.N, K = a.K;
      int64_t na = 0, nb = 0, nc = 0;
      switch (a.mode) {
        case GroupedGemmMode::fwd: na = M * K, nb = G * N * K, nc = M * N; break;
        case GroupedGemmMode::dgrad: na = M * N, nb = G * N * K, nc = M * K; break;
        case GroupedGemmMode::wgrad: na = M * N, nb = M * K, nc = G * N * K; break;
      }
      std::vector<float> A = widen<T>(a.A, na), B = widen<T>(a.B, nb);
      std::vector<float> C = a.accumulate ? widen<T>(a.C, nc) : std::vector<float>(static_cast<size_t>(nc));
      run_tasks<float>(grouped_tasks<float>(a, A.data(), B.data(), C.data()));
      narrow_into<T>(C, a.C);
    }
  });
}

}  // namespace moe
