// The CPU GEMM engines (kernels/cpu/gemm.cpp, docs/performance.md):
//   - every engine in the build, forced in turn, against f64 references: dense GEMM (every
//     transpose, alpha/beta) and grouped GEMM (fwd, dgrad, wgrad; accumulate; zero-row groups) in
//     f32, f64 and bf16, on one thread and on three (tiles);
//   - bf16 is computed from the bf16 inputs with f32 accumulation and rounded once: within one
//     bf16 ulp of the f64 product of the same bf16 values;
//   - the same call gives the same bits; the tiles give the same bits on 1 and 3 threads;
//   - the engine chosen on this machine runs no generic kernel on a CPU with AVX-512 (and bf16 runs
//     on AMX / AVX512-BF16 where the CPU has them and oneDNN is built);
//   - oneDNN primitives are cached per shape; a bad engine name is refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "common/gemm_ref.h"
#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/gemm_engine.h"
#include "moecore/backend.h"

using namespace moe;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::gemm_ref;
using moe::test::randn;
using moe::test::to_f64;

namespace {

// Runs f with the engine forced and the thread count set, then restores the automatic choice.
template <class F>
void with_engine(const std::string& engine, int threads, F&& f) {
  cpu_set_num_threads(threads);
  cpu_gemm_set_engine(engine);
  try {
    f();
  } catch (...) {
    cpu_gemm_set_engine("");
    cpu_set_num_threads(1);
    throw;
  }
  cpu_gemm_set_engine("");
  cpu_set_num_threads(1);
}

bool cpu_flag(const std::string& flag) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0) return (line + " ").find(" " + flag + " ") != std::string::npos;
  return false;
}

// The grouped GEMM of kernels/ops.h in f64 (C0: C before the call; accumulate adds into it).
std::vector<double> grouped_ref(GroupedGemmMode mode, const Tensor& A, const Tensor& B, const Tensor& C0,
                                const std::vector<int64_t>& rows, bool accumulate) {
  std::vector<double> a = to_f64(A), b = to_f64(B), c = to_f64(C0);
  if (!accumulate) std::fill(c.begin(), c.end(), 0.0);
  const int64_t G = static_cast<int64_t>(rows.size());
  int64_t row = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t m = rows[static_cast<size_t>(g)];
    if (mode == GroupedGemmMode::wgrad) {
      const int64_t N = A.size(1), K = B.size(1);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t r = row; r < row + m; ++r) s += a[static_cast<size_t>(r * N + n)] * b[static_cast<size_t>(r * K + k)];
          c[static_cast<size_t>((g * N + n) * K + k)] += s;
        }
    } else {
      const int64_t N = B.size(1), K = B.size(2);
      const bool fwd = mode == GroupedGemmMode::fwd;
      const int64_t in = fwd ? K : N, out = fwd ? N : K;
      for (int64_t r = row; r < row + m; ++r)
        for (int64_t o = 0; o < out; ++o) {
          double s = 0;
          for (int64_t i = 0; i < in; ++i)
            s += a[static_cast<size_t>(r * in + i)] *
                 (fwd ? b[static_cast<size_t>((g * N + o) * K + i)] : b[static_cast<size_t>((g * N + i) * K + o)]);
          c[static_cast<size_t>(r * out + o)] += s;
        }
    }
    row += m;
  }
  return c;
}

// Tolerances: f64 to rounding; f32 for K ≤ 200 products of N(0,1) values summed in f32; bf16 from
// the same bf16 inputs, f32 accumulation, one rounding of C: one bf16 ulp (2^-8 relative) of the
// result plus the f32 sum's error.
double atol_of(DType dt) { return dt == DType::f64 ? 1e-11 : dt == DType::f32 ? 3e-4 : 2e-3; }
double rtol_of(DType dt) { return dt == DType::f64 ? 1e-12 : dt == DType::f32 ? 3e-5 : 1.0 / 256; }

}  // namespace

TEST(CpuGemmEngines, DenseEveryEngineDtypeAndTransposeMatchesF64Reference) {
  struct Dims {
    int64_t M, N, K;
  };
  for (const std::string& engine : cpu_gemm_engines_built()) {
    for (int threads : {1, 3}) {
      // (520, 300, 64) splits along M on 3 threads, (200, 700, 64) along N; (3, 5, 7) is one tile.
      for (Dims d : {Dims{520, 300, 64}, Dims{200, 700, 64}, Dims{3, 5, 7}}) {
        for (DType dt : {DType::f32, DType::f64, DType::bf16}) {
          for (int t = 0; t < 4; ++t) {
            const bool ta = t & 1, tb = t & 2;
            Tensor A = ta ? randn({d.K, d.M}, dt, 1) : randn({d.M, d.K}, dt, 1);
            Tensor B = tb ? randn({d.N, d.K}, dt, 2) : randn({d.K, d.N}, dt, 2);
            Tensor C0 = randn({d.M, d.N}, dt, 3);
            Tensor C = C0.clone(), C2 = C0.clone();
            with_engine(engine, threads, [&] {
              ops::gemm(A, ta, B, tb, C, 1.5, 0.5);
              ops::gemm(A, ta, B, tb, C2, 1.5, 0.5);
            });
            const std::string what = engine + " " + dtype_name(dt) + " threads " + std::to_string(threads) + " M " +
                                     std::to_string(d.M) + " N " + std::to_string(d.N) + " ta " +
                                     std::to_string(ta) + " tb " + std::to_string(tb);
            EXPECT_TRUE(all_close(to_f64(C), gemm_ref(A, ta, B, tb, C0, 1.5, 0.5), atol_of(dt), rtol_of(dt))) << what;
            EXPECT_TRUE(bit_equal(C, C2)) << what << ": the same call twice";
          }
        }
      }
    }
  }
}

TEST(CpuGemmEngines, GroupedEveryModeAccumulateAndZeroRowGroupsMatchF64Reference) {
  // 5 groups, two of them empty; N = 96, K = 80: the three-thread runs cut the larger groups.
  const std::vector<int64_t> rows = {70, 0, 130, 1, 0};
  int64_t M = 0;
  for (int64_t r : rows) M += r;
  const int64_t G = static_cast<int64_t>(rows.size()), N = 96, K = 80;
  for (const std::string& engine : cpu_gemm_engines_built()) {
    for (int threads : {1, 3}) {
      for (DType dt : {DType::f32, DType::f64, DType::bf16}) {
        for (GroupedGemmMode mode : {GroupedGemmMode::fwd, GroupedGemmMode::dgrad, GroupedGemmMode::wgrad}) {
          for (bool acc : {false, true}) {
            Tensor A, B, C0;
            switch (mode) {
              case GroupedGemmMode::fwd: A = randn({M, K}, dt, 4), B = randn({G, N, K}, dt, 5), C0 = randn({M, N}, dt, 6); break;
              case GroupedGemmMode::dgrad: A = randn({M, N}, dt, 4), B = randn({G, N, K}, dt, 5), C0 = randn({M, K}, dt, 6); break;
              case GroupedGemmMode::wgrad: A = randn({M, N}, dt, 4), B = randn({M, K}, dt, 5), C0 = randn({G, N, K}, dt, 6); break;
            }
            Tensor C = C0.clone();
            with_engine(engine, threads, [&] { ops::grouped_gemm(mode, A, B, C, rows, acc); });
            EXPECT_TRUE(all_close(to_f64(C), grouped_ref(mode, A, B, C0, rows, acc), atol_of(dt), rtol_of(dt)))
                << engine << " " << dtype_name(dt) << " threads " << threads << " mode " << static_cast<int>(mode)
                << " accumulate " << acc;
            if (mode == GroupedGemmMode::wgrad && acc) {
              // The empty groups' C is left exactly as it was.
              EXPECT_TRUE(bit_equal(C.narrow(1, 1), C0.narrow(1, 1))) << engine << " " << dtype_name(dt);
              EXPECT_TRUE(bit_equal(C.narrow(4, 1), C0.narrow(4, 1))) << engine << " " << dtype_name(dt);
            }
          }
        }
      }
    }
  }
}

TEST(CpuGemmEngines, TiledResultsDoNotDependOnTheThreadCount) {
  // One GEMM cut into row tiles on 3 threads, column tiles, and a grouped GEMM: the same bits as
  // the single-threaded call, on every engine and dtype.
  for (const std::string& engine : cpu_gemm_engines_built()) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor A = randn({520, 192}, dt, 7), B = randn({300, 192}, dt, 8);
      Tensor C1 = Tensor::empty({520, 300}, dt), C3 = Tensor::empty({520, 300}, dt);
      with_engine(engine, 1, [&] { ops::gemm(A, false, B, true, C1); });
      with_engine(engine, 3, [&] { ops::gemm(A, false, B, true, C3); });
      EXPECT_TRUE(bit_equal(C1, C3)) << engine << " " << dtype_name(dt) << " row tiles";
      Tensor D1 = Tensor::empty({300, 520}, dt), D3 = Tensor::empty({300, 520}, dt);
      with_engine(engine, 1, [&] { ops::gemm(B, false, A, true, D1); });
      with_engine(engine, 3, [&] { ops::gemm(B, false, A, true, D3); });
      EXPECT_TRUE(bit_equal(D1, D3)) << engine << " " << dtype_name(dt) << " column tiles";
    }
  }
}

TEST(CpuGemmEngines, ChosenEngineRunsNoGenericKernelOnAnAvx512Cpu) {
  cpu_gemm_set_engine("");
  std::string why;
  const bool generic = cpu_gemm_generic_kernel(&why);
  if (__builtin_cpu_supports("avx512f")) {
    EXPECT_FALSE(generic) << why << " (" << cpu_gemm_info() << ")";
  }
  const std::string f32 = cpu_gemm_kernel(DType::f32);
  for (const char* bad : {"Prescott", "Core2", "Nehalem", "Sandybridge", "ref:", "(ref"}) {
    if (__builtin_cpu_supports("avx512f")) {
      EXPECT_EQ(f32.find(bad), std::string::npos) << f32;
    }
  }
  // Where oneDNN is built and chosen, bf16 runs natively on the CPU's best bf16 unit.
  if (std::string(cpu_gemm_engine()) == "onednn") {
    const std::string bf = cpu_gemm_kernel(DType::bf16);
    EXPECT_EQ(bf.find("via f32"), std::string::npos) << bf;
    if (cpu_flag("amx_bf16")) {
      EXPECT_NE(bf.find("amx"), std::string::npos) << bf;
    } else if (cpu_flag("avx512_bf16")) {
      EXPECT_NE(bf.find("avx512_core_bf16"), std::string::npos) << bf;
    }
  }
  EXPECT_NE(build_info().find("gemm: "), std::string::npos) << build_info();
  EXPECT_NE(build_info().find(cpu_gemm_engine()), std::string::npos) << build_info();
}

TEST(CpuGemmEngines, ForcedEngineIsReportedAndUnknownNamesAreRefused) {
  for (const std::string& engine : cpu_gemm_engines_built()) {
    cpu_gemm_set_engine(engine);
    EXPECT_EQ(std::string(cpu_gemm_engine()), engine);
    EXPECT_EQ(cpu_gemm_kernel(DType::f32).rfind(engine, 0), 0u) << cpu_gemm_kernel(DType::f32);
  }
  cpu_gemm_set_engine("");
  moe::test::expect_error([] { cpu_gemm_set_engine("mkl"); }, "expected onednn (or dnnl), openblas or eigen, got 'mkl'");
  if (!gemm_engine::onednn_built())
    moe::test::expect_error([] { cpu_gemm_set_engine("onednn"); }, "not in this build");
}

TEST(CpuGemmEngines, OnednnPrimitivesAreCachedPerShape) {
  if (!gemm_engine::onednn_built()) GTEST_SKIP() << "built without oneDNN";
  const std::vector<int64_t> rows = {40, 0, 24, 40};
  Tensor A = randn({104, 32}, DType::bf16, 9), B = randn({4, 48, 32}, DType::bf16, 10);
  Tensor C = Tensor::empty({104, 48}, DType::bf16);
  with_engine("onednn", 1, [&] {
    ops::grouped_gemm(GroupedGemmMode::fwd, A, B, C, rows);
    const int64_t after_first = gemm_engine::onednn_primitives_created();
    for (int i = 0; i < 3; ++i) ops::grouped_gemm(GroupedGemmMode::fwd, A, B, C, rows);
    EXPECT_EQ(gemm_engine::onednn_primitives_created(), after_first) << "a repeated grouped GEMM created primitives";
  });
}
