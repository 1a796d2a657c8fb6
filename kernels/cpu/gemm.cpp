// Dense and grouped GEMM on the CPU through one of three engines (kernels/cpu/gemm_engine.h),
// chosen once at start-up by the CPU's features (or forced with MOE_CPU_GEMM=onednn|openblas|eigen):
//   onednn    oneDNN's matmul (when the build found libdnnl): JIT kernels picked by ISA (AVX2,
//             AVX-512, AVX512-BF16, AMX-BF16), so a CPU the library does not know by model still
//             gets its fast kernel. f32 and bf16 natively (bf16 inputs, f32 accumulation, C rounded
//             once); the default wherever it is built and the CPU has AVX2 (measured at least as
//             fast as OpenBLAS in f32 and 4x f32 in bf16 with AMX: docs/performance.md).
//   openblas  OpenBLAS's cblas (Debian's 0.3.21 picks its kernel from a table of CPU models and
//             falls back to a generic one on CPUs newer than the table: checked at start-up, with
//             a loud warning naming OPENBLAS_CORETYPE when it runs a generic kernel on an AVX2 CPU).
//   eigen     Eigen 3, always built: the fallback.
// f64 always runs on OpenBLAS (Eigen without it); f16, and bf16 on an engine without native bf16,
// widen to f32, multiply, and round back.
//
// Threading: one pool, OpenMP's. The engine itself always runs single-threaded; a GEMM (or every
// group of a grouped GEMM) is cut into tiles along its larger output dimension and the tiles are
// shared out over the OpenMP threads, each thread calling the single-threaded engine on its tiles.
// Why not the BLAS's own threads: OpenBLAS's pthread pool and the OpenMP pool of the other CPU
// kernels would take turns on the same cores, each spinning while the other works (the PyTorch
// peer, which mixes the two, runs up to 3.5x slower for it: docs/performance.md); and a grouped GEMM
// is many small GEMMs, which share out better as whole groups than each split over every thread.
// Tiles never split the reduction dimension, so every output element is one engine call over the
// full K wherever it lands, and the tiling depends only on the shapes and the thread count. With
// OpenBLAS and Eigen an element's value does not depend on the tile it lands in; oneDNN chooses
// its K blocking per tile shape, so its results are reproducible for a given thread count (same
// call, same bits) but may differ in the last bits between thread counts.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/gemm_engine.h"
#include "moecore/logging.h"

#if MOE_HAVE_OPENBLAS
#include <cblas.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace moe {

namespace {

int g_threads = 0;

// ---- engines -------------------------------------------------------------------------------------
enum class Engine : uint8_t { onednn, openblas, eigen };

const char* engine_name(Engine e) {
  switch (e) {
    case Engine::onednn: return "onednn";
    case Engine::openblas: return "openblas";
    case Engine::eigen: return "eigen";
  }
  return "?";
}

bool engine_built(Engine e) {
  switch (e) {
    case Engine::onednn: return gemm_engine::onednn_built();
    case Engine::openblas: return MOE_HAVE_OPENBLAS != 0;
    case Engine::eigen: return true;
  }
  return false;
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

std::string openblas_core() {
#if MOE_HAVE_OPENBLAS
  const char* c = openblas_get_corename();
  return c ? c : "?";
#else
  return "";
#endif
}

// OpenBLAS's kernel families that use AVX2 or AVX-512; any other core name on a CPU that has AVX2
// is a generic kernel (Prescott, Core2, Nehalem, Sandybridge, ...: SSE or AVX1 only).
bool openblas_core_is_fast(const std::string& core) {
  std::string c = core;
  for (char& ch : c) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* fast : {"haswell", "skylakex", "cooperlake", "sapphirerapids", "zen"})
    if (c == fast) return true;
  return false;
}

// The engine of f32/bf16 GEMMs: MOE_CPU_GEMM when set, else oneDNN where built and the CPU has
// AVX2, else OpenBLAS, else Eigen.
Engine auto_engine() {
  if (gemm_engine::onednn_built() && cpu_has_avx2()) return Engine::onednn;
  if (MOE_HAVE_OPENBLAS) return Engine::openblas;
  return Engine::eigen;
}

Engine parse_engine(const std::string& v, const char* who) {
  Engine e;
  if (v == "onednn" || v == "dnnl") e = Engine::onednn;
  else if (v == "openblas") e = Engine::openblas;
  else if (v == "eigen") e = Engine::eigen;
  else MOE_THROW(ErrorCode::invalid_argument, who, ": expected onednn (or dnnl), openblas or eigen, got '", v, "'");
  std::string built;
  for (const std::string& b : cpu_gemm_engines_built()) built += (built.empty() ? "" : ", ") + b;
  MOE_CHECK(engine_built(e), who, ": engine '", v, "' is not in this build (built: ", built,
            "; oneDNN needs libdnnl-dev, OpenBLAS libopenblas-dev at configure time)");
  return e;
}

Engine& engine_slot() {
  static Engine e = [] {
    const char* env = std::getenv("MOE_CPU_GEMM");
    return env && *env ? parse_engine(env, "MOE_CPU_GEMM") : auto_engine();
  }();
  return e;
}

// f64 has no oneDNN kernel: OpenBLAS where built, else Eigen.
Engine f64_engine() {
  const Engine e = engine_slot();
  if (e == Engine::eigen || !MOE_HAVE_OPENBLAS) return Engine::eigen;
  return Engine::openblas;
}

// True (with the reason and the fix) when engine e runs a generic kernel on a CPU with AVX2/AVX-512.
bool slow_kernel(Engine e, std::string* why) {
  const bool avx2 = cpu_has_avx2(), avx512 = cpu_has_avx512();
  if (!avx2) return false;  // nothing faster than generic to be had
  if (e == Engine::openblas && MOE_HAVE_OPENBLAS) {
    const std::string core = openblas_core();
    if (!openblas_core_is_fast(core)) {
      if (why)
        *why = "CPU GEMM: OpenBLAS runs its generic '" + core + "' kernel on a CPU with " +
               (avx512 ? "AVX-512" : "AVX2") + " (several times slower); set OPENBLAS_CORETYPE=" +
               (avx512 ? "SkylakeX" : "Haswell") + (gemm_engine::onednn_built() ? " or use MOE_CPU_GEMM=onednn" : "") +
               " (engine " + engine_name(e) + ")";
      return true;
    }
  }
  if (e == Engine::eigen) {  // the library is built for the baseline ISA: Eigen gets SSE2 there
    if (why)
      *why = std::string("CPU GEMM: the Eigen fallback runs ") + Eigen::SimdInstructionSetsInUse() + " kernels on a CPU with " +
             (avx512 ? "AVX-512" : "AVX2") + " (several times slower); unset MOE_CPU_GEMM or build with libdnnl-dev / libopenblas-dev";
    return true;
  }
  if (e == Engine::onednn) {
    const std::string isa = gemm_engine::onednn_isa();
    const std::string k = gemm_engine::onednn_kernel(DType::f32, DType::f32);
    const bool isa_ok = avx512 ? isa.rfind("avx512", 0) == 0 : isa.rfind("avx2", 0) == 0 || isa.rfind("avx512", 0) == 0;
    const bool jit = k.find("ref") == std::string::npos && !k.empty();
    if (!isa_ok || !jit) {
      if (why)
        *why = "CPU GEMM: oneDNN dispatches to ISA '" + isa + "' with f32 kernel '" + k + "' on a CPU with " +
               (avx512 ? "AVX-512" : "AVX2") + " (check ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA in the environment)";
      return true;
    }
  }
  return false;
}

// Warns once per engine when a GEMM (f64 included) goes to OpenBLAS running a generic kernel, or
// to the Eigen fallback, on a CPU with AVX2/AVX-512.
void check_slow_kernel(Engine e) {
  static std::once_flag once[3];
  std::call_once(once[static_cast<int>(e)], [e] {
    std::string why;
    if (slow_kernel(e, &why)) log_warn(why);
  });
}

// ---- one tile -----------------------------------------------------------------------------------
// The engines run on one thread: the parallelism is ours (see the header comment). Called before
// every GEMM (a cheap check), so a program that changed the BLAS's threads in between is set back.
void engines_single_threaded() {
#if MOE_HAVE_OPENBLAS
  if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
#endif
  if (Eigen::nbThreads() != 1) Eigen::setNbThreads(1);
}

#if MOE_HAVE_OPENBLAS
void openblas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}
void openblas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                   int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}
#endif

template <class T>
void eigen_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
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

// One GEMM on storage type T (f32, f64, or bf16 on oneDNN) with explicit leading dimensions:
// C (M, N) (ldc) = alpha · op(A) · op(B) + beta · C.
template <class T>
struct Task {
  using S = cpu::acc_t<T>;  // the scalars' type: f32 (f64 for f64)
  bool ta = false, tb = false;
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr;
  int64_t lda = 0;
  const T* B = nullptr;
  int64_t ldb = 0;
  T* C = nullptr;
  int64_t ldc = 0;
  S alpha = 1, beta = 0;
  double cost() const { return static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(std::max<int64_t>(K, 1)); }
};

template <class T>
void run_task(const Task<T>& t, Engine e) {
  using S = typename Task<T>::S;
  if (t.M == 0 || t.N == 0) return;
  if (t.K == 0) {  // an engine may not touch C when K = 0: apply beta ourselves
    for (int64_t i = 0; i < t.M; ++i) {
      T* c = t.C + i * t.ldc;
      for (int64_t j = 0; j < t.N; ++j) c[j] = t.beta == S(0) ? T{} : cpu::from_acc<T>(t.beta * cpu::to_acc(c[j]));
    }
    return;
  }
  if constexpr (std::is_same_v<T, bf16>) {
    gemm_engine::onednn_gemm(DType::bf16, DType::bf16, t.ta, t.tb, t.M, t.N, t.K, t.alpha, t.A, t.lda, t.B, t.ldb,
                          t.beta, t.C, t.ldc);
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (e == Engine::onednn) {
        gemm_engine::onednn_gemm(DType::f32, DType::f32, t.ta, t.tb, t.M, t.N, t.K, t.alpha, t.A, t.lda, t.B, t.ldb,
                              t.beta, t.C, t.ldc);
        return;
      }
    }
#if MOE_HAVE_OPENBLAS
    if (e == Engine::openblas) {
      openblas_gemm(t.ta, t.tb, t.M, t.N, t.K, t.alpha, t.A, t.lda, t.B, t.ldb, t.beta, t.C, t.ldc);
      return;
    }
#endif
    eigen_gemm(t.ta, t.tb, t.M, t.N, t.K, t.alpha, t.A, t.lda, t.B, t.ldb, t.beta, t.C, t.ldc);
  }
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

// Cuts the tasks into tiles and runs them over the threads on engine e. Each task is split along
// its larger output dimension (the smaller operand is then the one every tile re-reads) into about
// cost / target pieces: one GEMM into P equal tiles, several into tiles of about a sixth of a
// thread's share, so that unequal groups still balance; the largest tiles go first.
template <class T>
void run_tasks(const std::vector<Task<T>>& tasks, Engine e) {
  engines_single_threaded();
  if (e != Engine::onednn) check_slow_kernel(e);
  const int P = cpu_num_threads();
  double total = 0.0;
  for (const Task<T>& t : tasks) total += t.cost();
  if (P <= 1 || total < kMinSplitCost) {
    for (const Task<T>& t : tasks) run_task(t, e);
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
  // An error in a tile (oneDNN can throw) is carried out of the parallel region and rethrown.
  std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(P) if (n > 1)
  for (int64_t i = 0; i < n; ++i) {
    try {
      run_task(tiles[static_cast<size_t>(i)], e);
    } catch (...) {
#pragma omp critical(moe_gemm_error)
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

template <class T>
Task<T> dense_task(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* A, const T* B,
                   double beta, T* C) {
  using S = typename Task<T>::S;
  Task<T> t;
  t.ta = ta, t.tb = tb, t.M = M, t.N = N, t.K = K;
  t.A = A, t.lda = ta ? M : K;
  t.B = B, t.ldb = tb ? K : N;
  t.C = C, t.ldc = N;
  t.alpha = static_cast<S>(alpha), t.beta = static_cast<S>(beta);
  return t;
}

// The tasks of a grouped GEMM over storage type T.
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

// bf16/f16 on an engine without them: widen the whole operands to f32 once, run the f32 path,
// round C back.
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

// Where T's GEMMs go: f64 to OpenBLAS/Eigen, bf16 natively only on oneDNN; `native` false means
// widen to f32 and run on the returned engine.
template <class T>
Engine engine_for(bool& native) {
  const Engine e = engine_slot();
  native = true;
  if constexpr (std::is_same_v<T, double>) return f64_engine();
  if constexpr (std::is_same_v<T, bf16>) native = e == Engine::onednn;
  if constexpr (std::is_same_v<T, f16>) native = false;
  return e;
}

}  // namespace

std::vector<std::string> cpu_gemm_engines_built() {
  std::vector<std::string> v;
  for (Engine e : {Engine::onednn, Engine::openblas, Engine::eigen})
    if (engine_built(e)) v.emplace_back(engine_name(e));
  return v;
}

const char* cpu_gemm_engine() { return engine_name(engine_slot()); }

void cpu_gemm_set_engine(const std::string& name) {
  engine_slot() = name.empty() ? auto_engine() : parse_engine(name, "cpu_gemm_set_engine");
}

std::string cpu_gemm_kernel(DType dt) {
  bool native = true;
  Engine e = Engine::eigen;
  switch (dt) {
    case DType::f64: e = engine_for<double>(native); break;
    case DType::bf16: e = engine_for<bf16>(native); break;
    case DType::f16: e = engine_for<f16>(native); break;
    default: e = engine_for<float>(native); break;
  }
  std::string k;
  switch (e) {
    case Engine::onednn: k = gemm_engine::onednn_kernel(native ? dt : DType::f32, native ? dt : DType::f32); break;
    case Engine::openblas: k = openblas_core(); break;
    case Engine::eigen: k = Eigen::SimdInstructionSetsInUse(); break;
  }
  std::string r = engine_name(e);
  r.append("(").append(k).append(native ? ")" : ") via f32");
  return r;
}

std::string cpu_gemm_info() {
  std::string s = cpu_gemm_engine();
  if (engine_slot() == Engine::onednn) s.append("(").append(gemm_engine::onednn_isa()).append(")");
  s.append("; f32 ").append(cpu_gemm_kernel(DType::f32));
  s.append(", bf16 ").append(cpu_gemm_kernel(DType::bf16));
  s.append(", f64 ").append(cpu_gemm_kernel(DType::f64));
  if (std::getenv("MOE_CPU_GEMM")) s += "; forced by MOE_CPU_GEMM";
  std::string why;
  if (cpu_gemm_generic_kernel(&why)) s += "; GENERIC KERNEL";
  return s;
}

bool cpu_gemm_generic_kernel(std::string* why) { return slow_kernel(engine_slot(), why); }

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
    bool native = true;
    const Engine e = engine_for<T>(native);
    if constexpr (!std::is_same_v<T, f16>) {
      if (native) {
        run_tasks<T>({dense_task<T>(a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, static_cast<const T*>(a.A),
                                    static_cast<const T*>(a.B), a.beta, static_cast<T*>(a.C))},
                     e);
        return;
      }
    }
    if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
      std::vector<float> A = widen<T>(a.A, a.M * a.K), B = widen<T>(a.B, a.K * a.N);
      std::vector<float> C = a.beta != 0.0 ? widen<T>(a.C, a.M * a.N) : std::vector<float>(static_cast<size_t>(a.M * a.N));
      run_tasks<float>({dense_task<float>(a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, A.data(), B.data(), a.beta,
                                          C.data())},
                       e);
      narrow_into<T>(C, a.C);
    }
  });
}

void cpu_grouped_gemm(const GroupedGemmArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "grouped_gemm", [&](auto tag) {
    using T = decltype(tag);
    bool native = true;
    const Engine e = engine_for<T>(native);
    if constexpr (!std::is_same_v<T, f16>) {
      if (native) {
        run_tasks<T>(grouped_tasks<T>(a, static_cast<const T*>(a.A), static_cast<const T*>(a.B), static_cast<T*>(a.C)), e);
        return;
      }
    }
    if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
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
      run_tasks<float>(grouped_tasks<float>(a, A.data(), B.data(), C.data()), e);
      narrow_into<T>(C, a.C);
    }
  });
}

}  // namespace moe
