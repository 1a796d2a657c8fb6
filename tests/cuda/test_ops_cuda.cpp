// Every op of the CUDA backend against the CPU backend (the reference), in the manner of ggml's
// test-backend-ops: the same seeded inputs go through the Tensor-level ops (src/device/ops.h) with
// tensors on Device::cpu() and on Device::cuda(0), and the outputs are compared with a per-dtype
// tolerance; data movement (permute, chunk_sort, row ids, routing maps, top-k indices, counts,
// capacity) must match bit for bit. Shapes include zero rows, zero-token experts, widths that are
// not a multiple of 8, and one case with byte offsets beyond 2^31 (skipped when the GPU lacks the
// memory). Runs only with a GPU: main() exits 77 otherwise (tests/common/gpu_test_main.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "device/ops_check.h"
#include "kernels/common/rng.h"
#include "moecore/backend.h"

using namespace moe;
using test::all_close;
using test::bit_equal;

namespace {

Device gpu() { return Device::cuda(0); }

// A bit-identical copy of a CPU tensor on `d` (a fresh copy on the CPU too, so in-place ops on one
// backend never touch the other's input).
Tensor put(const Tensor& t, Device d) { return d.is_cpu() ? t.clone() : t.to(d); }

// Tolerances per storage dtype for results that are computed (not moved).
//   f64: both sides compute in f64; differences come from summation order and libm vs CUDA math.
//   f32: a few ulps of f32 (CUDA's expf/erff are within 2 ulps; sums are reordered).
//   bf16 / f16: one ulp of the storage type (the f32 results may round to neighbouring values).
struct Tol {
  double atol, rtol;
};
Tol tol_for(DType dt) {
  switch (dt) {
    case DType::f64: return {1e-12, 1e-10};
    case DType::f32: return {1e-5, 1e-5};
    case DType::bf16: return {1e-2, 1.6e-2};
    case DType::f16: return {2e-3, 2e-3};
    default: return {0.0, 0.0};
  }
}
// GEMMs accumulate K products in a different order on each side (cuBLAS vs OpenBLAS/Eigen).
Tol gemm_tol(DType dt, int64_t K) {
  const double k = std::sqrt(static_cast<double>(std::max<int64_t>(K, 1)));
  switch (dt) {
    case DType::f64: return {1e-12 * k, 1e-11};
    case DType::f32: return {2e-5 * k, 2e-5};
    case DType::bf16: return {2e-2 * k, 1.6e-2};
    case DType::f16: return {4e-3 * k, 2e-3};
    default: return {0.0, 0.0};
  }
}

::testing::AssertionResult close(const Tensor& got, const Tensor& ref, Tol t) {
  return all_close(got, ref, t.atol, t.rtol);
}

const char* score_name(ScoreFunction s) {
  switch (s) {
    case ScoreFunction::softmax: return "softmax";
    case ScoreFunction::sigmoid: return "sigmoid";
    case ScoreFunction::sqrtsoftplus: return "sqrtsoftplus";
  }
  return "?";
}
const char* act_name(Activation a) {
  switch (a) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::relu2: return "relu2";
  }
  return "?";
}

// Router logits (T, E) with exact ties: rows 1 and 2 repeat row 0, and row 3 is all zeros.
Tensor tied_logits(int64_t T, int64_t E, DType dt, uint64_t seed) {
  std::vector<double> v = test::to_f64(test::randn({T, E}, DType::f64, seed));
  for (int64_t t = 1; t < std::min<int64_t>(T, 3); ++t)
    for (int64_t e = 0; e < E; ++e) v[static_cast<size_t>(t * E + e)] = v[static_cast<size_t>(e)];
  if (T > 3)
    for (int64_t e = 0; e < E; ++e) v[static_cast<size_t>(3 * E + e)] = 0.0;
  return test::from_f64(v, {T, E}, dt);
}

// A random routing map (T, E) with about `k` routes per token; expert `empty` routes nothing.
std::vector<uint8_t> random_map(int64_t T, int64_t E, int64_t k, int64_t empty, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<uint8_t> m(static_cast<size_t>(T * E), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = static_cast<int64_t>(gen() % static_cast<uint64_t>(E));
      if (e != empty) m[static_cast<size_t>(t * E + e)] = 1;
    }
  return m;
}

std::vector<int64_t> column_counts(const std::vector<uint8_t>& m, int64_t T, int64_t E) {
  std::vector<int64_t> c(static_cast<size_t>(E), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) c[static_cast<size_t>(e)] += m[static_cast<size_t>(t * E + e)];
  return c;
}

std::vector<int64_t> exclusive_sum(const std::vector<int64_t>& c) {
  std::vector<int64_t> o(c.size(), 0);
  for (size_t i = 1; i < c.size(); ++i) o[i] = o[i - 1] + c[i - 1];
  return o;
}

// The row map of `map` on the CPU (the reference of permute_index).
Tensor cpu_row_id_map(const std::vector<uint8_t>& m, int64_t T, int64_t E) {
  Tensor map = Tensor::from_vector(m, {T, E});
  Tensor rid = Tensor::empty({T, E}, DType::i32);
  ops::permute_index(map, exclusive_sum(column_counts(m, T, E)), rid);
  return rid;
}

// A seeded permute problem on the CPU: about two routes per token with expert 4 routing nothing
// (token 5 routing nothing too when `unrouted_token5` and T > 5), its row map and N routed pairs,
// tokens (T, H), probs (T, E), expert rows (N, H) and row weights (N). Draws its seeds from `seed`.
struct PermuteCase {
  Tensor rid;  // (T, E) i32
  int64_t N = 0;
  DType pdt = DType::f32;
  Tensor in, probs, rows, w;
};
PermuteCase permute_case(int64_t T, int64_t E, int64_t H, DType dt, bool unrouted_token5, uint64_t& seed) {
  std::vector<uint8_t> m = random_map(T, E, 2, 4, ++seed);
  if (unrouted_token5 && T > 5)
    for (int64_t e = 0; e < E; ++e) m[static_cast<size_t>(5 * E + e)] = 0;
  PermuteCase c;
  c.rid = cpu_row_id_map(m, T, E);
  for (uint8_t v : m) c.N += v;
  c.pdt = ops::prob_dtype_for(dt);
  c.in = test::randn({T, H}, dt, ++seed);
  c.probs = test::uniform({T, E}, c.pdt, ++seed, 0.0, 1.0);
  c.rows = test::randn({c.N, H}, dt, ++seed);
  c.w = test::uniform({c.N}, c.pdt, ++seed, 0.1, 2.0);
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(CudaOps, Gemm) {
  struct Shape3 {
    int64_t M, N, K;
  };
  const std::vector<Shape3> shapes = {{1, 1, 1}, {33, 17, 65}, {64, 128, 32}, {0, 5, 3}, {4, 0, 3}, {4, 5, 0}};
  uint64_t seed = 1;
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16})
    for (const Shape3& s : shapes)
      for (int tr = 0; tr < 4; ++tr)
        for (double beta : {0.0, 0.5}) {
          const bool ta = tr & 1, tb = tr & 2;
          SCOPED_TRACE(std::string(dtype_name(dt)) + " M=" + std::to_string(s.M) + " N=" + std::to_string(s.N) +
                       " K=" + std::to_string(s.K) + " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                       " beta=" + std::to_string(beta));
          Tensor A = test::randn(ta ? Shape{s.K, s.M} : Shape{s.M, s.K}, dt, ++seed);
          Tensor B = test::randn(tb ? Shape{s.N, s.K} : Shape{s.K, s.N}, dt, ++seed);
          Tensor C0 = test::randn({s.M, s.N}, dt, ++seed);
          auto run = [&](Device d) {
            Tensor C = put(C0, d);
            ops::gemm(put(A, d), ta, put(B, d), tb, C, 1.5, beta);
            return C;
          };
          EXPECT_TRUE(close(run(gpu()), run(Device::cpu()), gemm_tol(dt, s.K)));
        }
}

TEST(CudaOps, GroupedGemm) {
  const std::vector<std::vector<int64_t>> row_sets = {{3, 0, 5, 1}, {0, 0, 0}, {7}, {0, 9}};
  const int64_t N = 12, K = 5;
  uint64_t seed = 100;
  for (DType dt : {DType::f32, DType::f64, DType::bf16})
    for (const auto& rows : row_sets)
      for (GroupedGemmMode mode : {GroupedGemmMode::fwd, GroupedGemmMode::dgrad, GroupedGemmMode::wgrad})
        for (bool acc : {false, true}) {
          const int64_t G = static_cast<int64_t>(rows.size());
          int64_t M = 0;
          for (int64_t r : rows) M += r;
          SCOPED_TRACE(std::string(dtype_name(dt)) + " G=" + std::to_string(G) + " M=" + std::to_string(M) +
                       " mode=" + std::to_string(static_cast<int>(mode)) + " acc=" + std::to_string(acc));
          Tensor A, B, C0;
          switch (mode) {
            case GroupedGemmMode::fwd:
              A = test::randn({M, K}, dt, ++seed);
              B = test::randn({G, N, K}, dt, ++seed);
              C0 = test::randn({M, N}, dt, ++seed);
              break;
            case GroupedGemmMode::dgrad:
              A = test::randn({M, N}, dt, ++seed);
              B = test::randn({G, N, K}, dt, ++seed);
              C0 = test::randn({M, K}, dt, ++seed);
              break;
            case GroupedGemmMode::wgrad:
              A = test::randn({M, N}, dt, ++seed);
              B = test::randn({M, K}, dt, ++seed);
              C0 = test::randn({G, N, K}, dt, ++seed);
              break;
          }
          auto run = [&](Device d) {
            Tensor C = put(C0, d);
            ops::grouped_gemm(mode, put(A, d), put(B, d), C, rows, acc);
            return C;
          };
          EXPECT_TRUE(close(run(gpu()), run(Device::cpu()), gemm_tol(dt, std::max<int64_t>(M, N))));
        }
}

// ---------------------------------------------------------------------------------------------
namespace {
struct RouterCase {
  int64_t E, k;
  ScoreFunction score;
  bool pre;
  int64_t G, g;
  bool bias;
  double scale;
};
const std::vector<RouterCase>& router_cases() {
  static const std::vector<RouterCase> cases = {
      {8, 2, ScoreFunction::softmax, false, 0, 0, false, 1.0},
      {8, 1, ScoreFunction::softmax, true, 0, 0, false, 1.0},
      {64, 8, ScoreFunction::softmax, true, 0, 0, false, 2.5},
      {64, 6, ScoreFunction::softmax, false, 8, 3, false, 1.0},
      {300, 4, ScoreFunction::sigmoid, false, 0, 0, true, 1.0},
      {300, 4, ScoreFunction::sqrtsoftplus, false, 0, 0, false, 1.5},
      {512, 16, ScoreFunction::sigmoid, false, 16, 4, true, 2.5},
      {64, 1, ScoreFunction::sigmoid, false, 0, 0, false, 1.0},
      {256, 8, ScoreFunction::sqrtsoftplus, false, 8, 4, true, 1.0},
  };
  return cases;
}
std::string router_case_str(const RouterCase& c, DType dt, int64_t T) {
  return std::string(dtype_name(dt)) + " T=" + std::to_string(T) + " E=" + std::to_string(c.E) +
         " k=" + std::to_string(c.k) + " " + score_name(c.score) + (c.pre ? " pre" : "") + " G=" + std::to_string(c.G) +
         " g=" + std::to_string(c.g) + (c.bias ? " bias" : "") + " scale=" + std::to_string(c.scale);
}
ops::TopkSpec spec_of(const RouterCase& c) {
  ops::TopkSpec s;
  s.k = c.k;
  s.score = c.score;
  s.pre_softmax = c.pre;
  s.num_groups = c.G;
  s.group_topk = c.g;
  s.scaling_factor = c.scale;
  return s;
}
}  // namespace

TEST(CudaOps, RouterTopk) {
  uint64_t seed = 200;
  for (DType dt : {DType::f32, DType::f64})
    for (const RouterCase& c : router_cases())
      for (int64_t T : {int64_t{0}, int64_t{37}}) {
        SCOPED_TRACE(router_case_str(c, dt, T));
        Tensor logits = tied_logits(T, c.E, dt, ++seed);
        Tensor bias = test::randn({c.E}, DType::f32, ++seed, 0.1);
        auto run = [&](Device d) {
          Tensor l = put(logits, d), b = put(bias, d);
          Tensor probs = Tensor::empty({T, c.E}, dt, d), map = Tensor::empty({T, c.E}, DType::u8, d);
          Tensor idx = Tensor::empty({T, c.k}, DType::i32, d);
          ops::router_topk(spec_of(c), l, c.bias ? &b : nullptr, probs, map, idx);
          return std::vector<Tensor>{probs, map, idx};
        };
        auto g = run(gpu());
        auto r = run(Device::cpu());
        EXPECT_TRUE(close(g[0], r[0], tol_for(dt))) << "probs";
        EXPECT_TRUE(bit_equal(g[1], r[1])) << "routing map";
        EXPECT_TRUE(bit_equal(g[2], r[2])) << "top-k indices";
      }
}

TEST(CudaOps, RouterTopkBackward) {
  uint64_t seed = 300;
  const int64_t T = 29;
  for (DType dt : {DType::f32, DType::f64})
    for (const RouterCase& c : router_cases())
      for (bool acc : {false, true}) {
        SCOPED_TRACE(router_case_str(c, dt, T) + (acc ? " accumulate" : ""));
        const ops::TopkSpec spec = spec_of(c);
        Tensor logits = test::randn({T, c.E}, dt, ++seed);
        Tensor bias = test::randn({c.E}, DType::f32, ++seed, 0.1);
        // The selection comes from the CPU forward; a few selections are then dropped (as capacity
        // would), which must remove their gradient.
        Tensor probs = Tensor::empty({T, c.E}, dt), map = Tensor::empty({T, c.E}, DType::u8);
        Tensor idx = Tensor::empty({T, c.k}, DType::i32);
        ops::router_topk(spec, logits, c.bias ? &bias : nullptr, probs, map, idx);
        std::vector<uint8_t> m = map.to_vector<uint8_t>();
        std::vector<int32_t> id = idx.to_vector<int32_t>();
        for (int64_t t = 0; t < T; t += 4) m[static_cast<size_t>(t * c.E + id[static_cast<size_t>(t * c.k)])] = 0;
        Tensor dropped = Tensor::from_vector(m, {T, c.E});
        Tensor dprobs = test::randn({T, c.E}, dt, ++seed);
        Tensor dl0 = test::randn({T, c.E}, dt, ++seed);
        auto run = [&](Device d) {
          Tensor dl = put(dl0, d);
          ops::router_topk_bwd(spec, put(logits, d), put(idx, d), put(dropped, d), put(dprobs, d), dl, acc);
          return dl;
        };
        EXPECT_TRUE(close(run(gpu()), run(Device::cpu()), tol_for(dt)));
      }
}

TEST(CudaOps, AuxStatsAndLossBackward) {
  uint64_t seed = 400;
  for (DType dt : {DType::f32, DType::f64})
    for (ScoreFunction score : {ScoreFunction::softmax, ScoreFunction::sigmoid, ScoreFunction::sqrtsoftplus})
      for (int64_t E : {int64_t{16}, int64_t{300}})
        for (int64_t k : {int64_t{1}, int64_t{4}})
          for (int64_t ns : {int64_t{1}, int64_t{4}})
            for (int64_t T : {int64_t{0}, int64_t{8}, int64_t{200}}) {
              SCOPED_TRACE(std::string(dtype_name(dt)) + " " + score_name(score) + " E=" + std::to_string(E) +
                           " k=" + std::to_string(k) + " ns=" + std::to_string(ns) + " T=" + std::to_string(T));
              Tensor logits = tied_logits(T, E, dt, ++seed);
              Tensor weight = test::randn({ns, E}, DType::f64, ++seed);
              Tensor dl0 = test::randn({T, E}, dt, ++seed);
              auto run = [&](Device d) {
                Tensor ps = Tensor::empty({ns, E}, DType::f64, d), cnt = Tensor::empty({ns, E}, DType::i64, d);
                ops::aux_stats(score, k, ns, put(logits, d), ps, cnt);
                Tensor dl = put(dl0, d);
                ops::aux_loss_bwd(score, ns, put(logits, d), put(weight, d), dl);
                return std::vector<Tensor>{ps, cnt, dl};
              };
              auto g = run(gpu());
              auto r = run(Device::cpu());
              // prob_sum: sums of up to 200 p̂ in the router dtype, accumulated in f64 in another order.
              const Tol ps_tol = dt == DType::f64 ? Tol{1e-12, 1e-12} : Tol{1e-5, 1e-6};
              EXPECT_TRUE(close(g[0], r[0], ps_tol)) << "prob_sum";
              EXPECT_TRUE(bit_equal(g[1], r[1])) << "counts";
              EXPECT_TRUE(close(g[2], r[2], tol_for(dt))) << "dlogits";
            }
}

TEST(CudaOps, ZLoss) {
  uint64_t seed = 500;
  for (DType dt : {DType::f32, DType::f64})
    for (int64_t T : {int64_t{0}, int64_t{1}, int64_t{77}, int64_t{3000}})
      for (int64_t E : {int64_t{8}, int64_t{300}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " T=" + std::to_string(T) + " E=" + std::to_string(E));
        Tensor logits = test::randn({T, E}, dt, ++seed, 3.0);
        Tensor dl0 = test::randn({T, E}, dt, ++seed);
        double vg = ops::z_loss_fwd(put(logits, gpu()));
        double vc = ops::z_loss_fwd(logits);
        const double rt = dt == DType::f64 ? 1e-12 : 1e-6;
        EXPECT_NEAR(vg, vc, rt * std::max(1.0, std::abs(vc)));
        // Deterministic: the same bits on a second run.
        EXPECT_EQ(vg, ops::z_loss_fwd(put(logits, gpu())));
        auto run = [&](Device d) {
          Tensor dl = put(dl0, d);
          ops::z_loss_bwd(put(logits, d), 0.37, dl);
          return dl;
        };
        EXPECT_TRUE(close(run(gpu()), run(Device::cpu()), tol_for(dt)));
      }
}

TEST(CudaOps, Capacity) {
  uint64_t seed = 600;
  for (DType dt : {DType::f32, DType::f64})
    for (int64_t T : {int64_t{0}, int64_t{50}, int64_t{700}})
      for (int64_t cap : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{40}, T + 5})
        for (DropPolicy policy : {DropPolicy::probs, DropPolicy::position})
          for (bool pad : {false, true}) {
            const int64_t E = 8, k = 2;
            SCOPED_TRACE(std::string(dtype_name(dt)) + " T=" + std::to_string(T) + " cap=" + std::to_string(cap) +
                         (policy == DropPolicy::probs ? " probs" : " position") + (pad ? " pad" : ""));
            // Probs with exact ties (repeated logit rows) so the tie rule (lower token) is exercised.
            Tensor logits = tied_logits(T, E, dt, ++seed);
            ops::TopkSpec spec;
            spec.k = k;
            Tensor probs = Tensor::empty({T, E}, dt), map = Tensor::empty({T, E}, DType::u8);
            Tensor idx = Tensor::empty({T, k}, DType::i32);
            ops::router_topk(spec, logits, nullptr, probs, map, idx);
            auto run = [&](Device d) {
              Tensor p = put(probs, d), m = put(map, d);
              ops::capacity(cap, policy, pad, p, m);
              return std::vector<Tensor>{p, m};
            };
            auto g = run(gpu());
            auto r = run(Device::cpu());
            EXPECT_TRUE(bit_equal(g[0], r[0])) << "probs";
            EXPECT_TRUE(bit_equal(g[1], r[1])) << "routing map";
          }
}

// ---------------------------------------------------------------------------------------------
TEST(CudaOps, RoutingCountsAndRowIdMap) {
  uint64_t seed = 700;
  for (int64_t T : {int64_t{0}, int64_t{1}, int64_t{33}, int64_t{1000}, int64_t{5000}})
    for (int64_t E : {int64_t{1}, int64_t{5}, int64_t{40}, int64_t{70}}) {
      SCOPED_TRACE("T=" + std::to_string(T) + " E=" + std::to_string(E));
      std::vector<uint8_t> m = random_map(T, E, std::min<int64_t>(E, 3), E > 1 ? 1 : -1, ++seed);
      Tensor map = Tensor::from_vector(m, {T, E});
      Tensor cg = ops::routing_counts(put(map, gpu()));
      Tensor cc = ops::routing_counts(map);
      EXPECT_TRUE(bit_equal(cg, cc)) << "counts";
      const std::vector<int64_t> offsets = exclusive_sum(cc.to_vector<int64_t>());
      Tensor rg = Tensor::empty({T, E}, DType::i32, gpu());
      ops::permute_index(put(map, gpu()), offsets, rg);
      EXPECT_TRUE(bit_equal(rg, cpu_row_id_map(m, T, E))) << "row_id_map";
    }
}

TEST(CudaOps, PermuteUnpermuteAndScatter) {
  uint64_t seed = 800;
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::f16})
    for (int64_t H : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{64}})
      for (int64_t T : {int64_t{0}, int64_t{45}}) {
        const int64_t E = 6;
        SCOPED_TRACE(std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " T=" + std::to_string(T));
        // Expert 4 gets no tokens, token 5 goes nowhere.
        const PermuteCase pc = permute_case(T, E, H, dt, /*unrouted_token5=*/true, seed);
        const Tensor &rid = pc.rid, &in = pc.in, &probs = pc.probs, &rows = pc.rows, &w = pc.w;
        const int64_t N = pc.N;
        const DType pdt = pc.pdt;
        auto run = [&](Device d) {
          Tensor r = put(rid, d);
          Tensor out = Tensor::empty({N, H}, dt, d), out_probs = Tensor::empty({N}, pdt, d);
          Tensor pr = put(probs, d);
          ops::permute(r, put(in, d), out, &pr, &out_probs);
          Tensor back = Tensor::empty({T, H}, dt, d), back_w = Tensor::empty({T, H}, dt, d);
          ops::unpermute(r, put(rows, d), back);
          Tensor wd = put(w, d);
          ops::unpermute(r, put(rows, d), back_w, &wd);
          Tensor pg = Tensor::empty({T, E}, pdt, d);
          ops::scatter_rows_to_map(r, wd, pg);
          return std::vector<Tensor>{out, out_probs, back, back_w, pg};
        };
        auto g = run(gpu());
        auto r = run(Device::cpu());
        EXPECT_TRUE(bit_equal(g[0], r[0])) << "permuted rows";
        EXPECT_TRUE(bit_equal(g[1], r[1])) << "permuted probs";
        // unpermute adds the copies in expert order with IEEE round-to-nearest operations on both
        // sides, so it is expected to be bit-exact; the weighted sum is compared with a tolerance of
        // a few ulps in case a host compiler contracts the CPU's multiply-add into an FMA.
        EXPECT_TRUE(bit_equal(g[2], r[2])) << "unpermute";
        EXPECT_TRUE(close(g[3], r[3], dt == DType::f64 ? Tol{1e-14, 1e-14} : tol_for(dt))) << "weighted unpermute";
        EXPECT_TRUE(bit_equal(g[4], r[4])) << "scatter to map";
      }
  // No token routed anywhere (N = 0): unpermute writes zeros, permute writes nothing.
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(std::string("unrouted ") + dtype_name(dt));
    const int64_t T = 9, E = 4, H = 24;
    Tensor rid = cpu_row_id_map(std::vector<uint8_t>(static_cast<size_t>(T * E), 0), T, E);
    Tensor rows = Tensor::empty({0, H}, dt);
    auto run = [&](Device d) {
      Tensor back = test::randn({T, H}, dt, 3, 1.0, d);  // overwritten with zeros
      ops::unpermute(put(rid, d), put(rows, d), back);
      Tensor out = Tensor::empty({0, H}, dt, d);
      ops::permute(put(rid, d), test::randn({T, H}, dt, 4, 1.0, d), out);
      return back;
    };
    EXPECT_TRUE(bit_equal(run(gpu()), run(Device::cpu())));
    EXPECT_TRUE(bit_equal(run(gpu()), Tensor::zeros({T, H}, dt)));
  }
  // Non-float rows move too (permute is raw data movement).
  std::vector<uint8_t> m = random_map(20, 3, 2, -1, 5);
  Tensor rid = cpu_row_id_map(m, 20, 3);
  int64_t N = 0;
  for (uint8_t v : m) N += v;
  std::vector<int32_t> iv(20 * 3);
  for (size_t i = 0; i < iv.size(); ++i) iv[i] = static_cast<int32_t>(i * 7919);
  Tensor in = Tensor::from_vector(iv, {20, 3});
  Tensor og = Tensor::empty({N, 3}, DType::i32, gpu()), oc = Tensor::empty({N, 3}, DType::i32);
  ops::permute(put(rid, gpu()), put(in, gpu()), og);
  ops::permute(rid, in, oc);
  EXPECT_TRUE(bit_equal(og, oc)) << "i32 rows";
}

// The all-to-all dispatcher's two-buffer forms on the GPU: permute2 writes the bytes of the CPU's
// one-output permute into its two outputs (rows of out2 the map does not name untouched), and
// unpermute2 / scatter_rows_to_map2 over [in; in2] equal the CPU's one-input results on the
// concatenation (the unweighted sum bit for bit, the weighted one within a few ulps as above).
TEST(CudaOps, TwoBufferPermuteAndUnpermute) {
  uint64_t seed = 850;
  for (DType dt : {DType::f32, DType::bf16, DType::f64})
    for (int64_t H : {int64_t{7}, int64_t{64}}) {
      const int64_t T = 45, E = 6, extra = 2;
      const PermuteCase pc = permute_case(T, E, H, dt, /*unrouted_token5=*/false, seed);
      const Tensor &rid = pc.rid, &in = pc.in, &probs = pc.probs, &rows = pc.rows, &w = pc.w;
      const int64_t N = pc.N;
      const DType pdt = pc.pdt;
      // CPU references: the one-buffer ops.
      Tensor ref_out = Tensor::empty({N, H}, dt), ref_p = Tensor::empty({N}, pdt);
      ops::permute(rid, in, ref_out, &probs, &ref_p);
      Tensor ref_back = Tensor::empty({T, H}, dt), ref_back_w = Tensor::empty({T, H}, dt);
      ops::unpermute(rid, rows, ref_back);
      ops::unpermute(rid, rows, ref_back_w, &w);
      Tensor ref_pg = Tensor::empty({T, E}, pdt);
      ops::scatter_rows_to_map(rid, w, ref_pg);
      for (int64_t n1 : {int64_t{0}, N / 3, N}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " split at " + std::to_string(n1));
        Tensor r = put(rid, gpu()), pr = put(probs, gpu());
        Tensor a = Tensor::empty({n1, H}, dt, gpu()), a_p = Tensor::empty({n1}, pdt, gpu());
        Tensor b = test::randn({N - n1 + extra, H}, dt, ++seed, 1.0, gpu());
        Tensor b_p = test::uniform({N - n1 + extra}, pdt, ++seed, 0.0, 1.0, gpu());
        Tensor b_tail = b.narrow(N - n1, extra).to(Device::cpu()), b_p_tail = b_p.narrow(N - n1, extra).to(Device::cpu());
        ops::permute2(r, put(in, gpu()), a, b, N - n1, &pr, &a_p, &b_p);
        EXPECT_TRUE(bit_equal(a, ref_out.narrow(0, n1))) << "permute2 out";
        EXPECT_TRUE(bit_equal(b.narrow(0, N - n1), ref_out.narrow(n1, N - n1))) << "permute2 out2";
        EXPECT_TRUE(bit_equal(a_p, ref_p.narrow(0, n1))) << "permute2 out_probs";
        EXPECT_TRUE(bit_equal(b_p.narrow(0, N - n1), ref_p.narrow(n1, N - n1))) << "permute2 out_probs2";
        EXPECT_TRUE(bit_equal(b.narrow(N - n1, extra), b_tail)) << "permute2: rows the map does not name";
        EXPECT_TRUE(bit_equal(b_p.narrow(N - n1, extra), b_p_tail)) << "permute2: probs the map does not name";
        Tensor ra = put(rows.narrow(0, n1).clone(), gpu()), rb = put(rows.narrow(n1, N - n1).clone(), gpu());
        Tensor wa = put(w.narrow(0, n1).clone(), gpu()), wb = put(w.narrow(n1, N - n1).clone(), gpu());
        Tensor back = Tensor::empty({T, H}, dt, gpu()), back_w = Tensor::empty({T, H}, dt, gpu());
        ops::unpermute2(r, ra, rb, back);
        ops::unpermute2(r, ra, rb, back_w, &wa, &wb);
        EXPECT_TRUE(bit_equal(back, ref_back)) << "unpermute2";
        EXPECT_TRUE(close(back_w, ref_back_w, dt == DType::f64 ? Tol{1e-14, 1e-14} : tol_for(dt)))
            << "weighted unpermute2";
        Tensor pg = Tensor::empty({T, E}, pdt, gpu());
        ops::scatter_rows_to_map2(r, wa, wb, pg);
        EXPECT_TRUE(bit_equal(pg, ref_pg)) << "scatter_rows_to_map2";
      }
    }
}

TEST(CudaOps, ChunkSort) {
  uint64_t seed = 900;
  const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> cases = {
      {{3, 0, 5, 2, 0, 4}, {5, 2, 0, 4, 1, 3}},
      {{0, 0, 0}, {2, 0, 1}},
      {{7}, {0}},
      {{1, 2, 3, 4, 5, 6, 7, 8}, {7, 6, 5, 4, 3, 2, 1, 0}},
  };
  for (DType dt : {DType::f32, DType::bf16, DType::f64})
    for (int64_t H : {int64_t{5}, int64_t{16}})
      for (const auto& sc : cases) {
        const std::vector<int64_t>& splits = sc.first;
        const std::vector<int64_t>& order = sc.second;
        int64_t N = 0;
        for (int64_t s : splits) N += s;
        SCOPED_TRACE(std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " N=" + std::to_string(N));
        const DType pdt = ops::prob_dtype_for(dt);
        Tensor in = test::randn({N, H}, dt, ++seed);
        Tensor probs = test::randn({N}, pdt, ++seed);
        auto run = [&](Device d) {
          Tensor out = Tensor::empty({N, H}, dt, d), out_probs = Tensor::empty({N}, pdt, d);
          Tensor p = put(probs, d);
          ops::chunk_sort(splits, order, put(in, d), out, &p, &out_probs);
          Tensor out2 = Tensor::empty({N, H}, dt, d);
          ops::chunk_sort(splits, order, put(in, d), out2);
          return std::vector<Tensor>{out, out_probs, out2};
        };
        auto g = run(gpu());
        auto r = run(Device::cpu());
        EXPECT_TRUE(bit_equal(g[0], r[0])) << "rows";
        EXPECT_TRUE(bit_equal(g[1], r[1])) << "probs";
        EXPECT_TRUE(bit_equal(g[2], r[2])) << "rows without probs";
      }
}

// Column blocks (the allgather dispatcher's local-expert slice and its scatter back), every element
// size, bit-exact.
TEST(CudaOps, Columns) {
  uint64_t seed = 950;
  for (DType dt : {DType::u8, DType::bf16, DType::f32, DType::f64})
    for (int64_t R : {int64_t{0}, int64_t{1}, int64_t{37}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " R=" + std::to_string(R));
      Tensor in = dt == DType::u8 ? Tensor::from_vector(std::vector<uint8_t>(static_cast<size_t>(R * 9), 1), {R, 9})
                                  : test::randn({R, 9}, dt, ++seed);
      EXPECT_TRUE(bit_equal(ops::gather_columns(put(in, gpu()), 2, 5), ops::gather_columns(in, 2, 5)));
      EXPECT_TRUE(bit_equal(ops::scatter_columns(put(in, gpu()), 3, 16), ops::scatter_columns(in, 3, 16)));
    }
}

// Row offsets beyond 2^31 bytes (and elements): the 64-bit index paths of permute / unpermute, with
// 16-byte words (H·4 divisible by 16) and 4-byte words (H odd). Needs about 7 GiB on the GPU.
TEST(CudaOps, PermuteRowOffsetsBeyond2GiB) {
  for (int64_t H : {int64_t{1} << 20, (int64_t{1} << 20) + 3}) {
    SCOPED_TRACE("H=" + std::to_string(H));
    const int64_t T = 600, E = 2;  // 600 rows of ~4 MiB: the last rows start past 2^31 bytes
    Tensor in, out, back;
    try {
      in = Tensor::empty({T, H}, DType::f32, gpu());
      out = Tensor::empty({T, H}, DType::f32, gpu());
      back = Tensor::empty({T, H}, DType::f32, gpu());
    } catch (const Error& e) {
      if (e.code() == ErrorCode::out_of_memory) GTEST_SKIP() << "not enough GPU memory: " << e.what();
      throw;
    }
    const uint64_t key = rng::make_key(11, 0, 0, 0);
    ops::jitter(key, 0.5, in);  // in[i] = f(key, flat index i)
    // Tokens t < 300 go to expert 1, the rest to expert 0: expert 0's rows (tokens 300..599) come
    // first, so out row 599 holds token 299 and out row 0 holds token 300.
    std::vector<uint8_t> m(static_cast<size_t>(T * E), 0);
    for (int64_t t = 0; t < T; ++t) m[static_cast<size_t>(t * E + (t < 300 ? 1 : 0))] = 1;
    Tensor rid = put(cpu_row_id_map(m, T, E), gpu());
    ops::permute(rid, in, out);
    ops::unpermute(rid, out, back);
    auto expected_row = [&](int64_t token) {
      std::vector<float> v(static_cast<size_t>(H));
      for (int64_t h = 0; h < H; ++h)
        v[static_cast<size_t>(h)] =
            static_cast<float>(0.5 + 1.0 * rng::uniform01(key, static_cast<uint64_t>(token * H + h)));
      return v;
    };
    EXPECT_EQ(out.narrow(599, 1).to_vector<float>(), expected_row(299));
    EXPECT_EQ(out.narrow(0, 1).to_vector<float>(), expected_row(300));
    EXPECT_EQ(out.narrow(300, 1).to_vector<float>(), expected_row(0));
    EXPECT_EQ(back.narrow(599, 1).to_vector<float>(), expected_row(599));  // one copy comes back exactly
    EXPECT_EQ(back.narrow(299, 1).to_vector<float>(), expected_row(299));
  }
}

// ---------------------------------------------------------------------------------------------
TEST(CudaOps, Activations) {
  uint64_t seed = 1000;
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::f16})
    for (Activation act : {Activation::silu, Activation::gelu, Activation::relu2})
      for (bool glu : {false, true})
        for (int scale_kind : {0, 1})  // 0: no row scale, 1: row scale in the prob dtype
          for (int64_t F : {int64_t{1}, int64_t{13}, int64_t{64}})
            for (int64_t rows : {int64_t{0}, int64_t{9}}) {
              SCOPED_TRACE(std::string(dtype_name(dt)) + " " + act_name(act) + (glu ? " glu" : "") +
                           (scale_kind ? " scaled" : "") + " F=" + std::to_string(F) + " rows=" + std::to_string(rows));
              const DType sdt = ops::prob_dtype_for(dt);
              Tensor in = test::randn({rows, glu ? 2 * F : F}, dt, ++seed);
              Tensor scale = test::uniform({rows}, sdt, ++seed, 0.1, 1.0);
              Tensor dout = test::randn({rows, F}, dt, ++seed);
              auto run = [&](Device d) {
                Tensor x = put(in, d), s = put(scale, d), dy = put(dout, d);
                Tensor out = Tensor::empty({rows, F}, dt, d);
                ops::act_fwd(act, glu, x, scale_kind ? &s : nullptr, out);
                Tensor din = Tensor::empty(in.shape(), dt, d), ds = Tensor::empty({rows}, sdt, d);
                ops::act_bwd(act, glu, x, scale_kind ? &s : nullptr, dy, din, &ds);
                return std::vector<Tensor>{out, din, ds};
              };
              auto g = run(gpu());
              auto r = run(Device::cpu());
              EXPECT_TRUE(close(g[0], r[0], tol_for(dt))) << "out";
              EXPECT_TRUE(close(g[1], r[1], tol_for(dt))) << "din";
              // drow_scale sums F terms computed in the compute type.
              const Tol ds_tol = dt == DType::f64 ? Tol{1e-12, 1e-10} : Tol{1e-4, 1e-4};
              EXPECT_TRUE(close(g[2], r[2], ds_tol)) << "drow_scale";
            }
}

TEST(CudaOps, ElementwiseCastScaleRowDot) {
  uint64_t seed = 1100;
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::f16})
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{100003}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(n));
      Tensor x = test::randn({n}, dt, ++seed);
      Tensor y0 = test::randn({n}, dt, ++seed);
      Tensor sg = test::uniform({n}, dt, ++seed, 0.0, 1.0);
      auto run = [&](Device d) {
        Tensor xd = put(x, d);
        Tensor y = put(y0, d);
        ops::axpby(0.75, xd, -1.25, y);
        Tensor y2 = put(y0, d);
        ops::axpby(2.0, xd, 0.0, y2);
        Tensor prod = Tensor::empty({n}, dt, d);
        ops::mul(xd, put(y0, d), prod);
        Tensor sig = Tensor::empty({n}, dt, d), dsig = Tensor::empty({n}, dt, d);
        ops::sigmoid(xd, sig);
        ops::sigmoid_bwd(put(y0, d), put(sg, d), dsig);
        return std::vector<Tensor>{y, y2, prod, sig, dsig};
      };
      auto g = run(gpu());
      auto r = run(Device::cpu());
      // axpby / mul / sigmoid_bwd use the same IEEE operations on both sides (bit-exact expected);
      // the tolerance only covers a host compiler that contracts a·x + b·y into an FMA.
      const Tol tight = dt == DType::f64 ? Tol{1e-15, 1e-15} : tol_for(dt);
      EXPECT_TRUE(close(g[0], r[0], tight)) << "axpby";
      EXPECT_TRUE(close(g[1], r[1], tight)) << "axpby beta=0";
      EXPECT_TRUE(bit_equal(g[2], r[2])) << "mul";
      EXPECT_TRUE(close(g[3], r[3], tol_for(dt))) << "sigmoid";
      EXPECT_TRUE(close(g[4], r[4], tight)) << "sigmoid_bwd";
    }
  // Casts between every pair of float dtypes: correctly rounded on both sides, so bit-exact.
  const std::vector<DType> floats = {DType::f32, DType::f64, DType::bf16, DType::f16};
  for (DType s : floats)
    for (DType t : floats) {
      SCOPED_TRACE(std::string("cast ") + dtype_name(s) + " -> " + dtype_name(t));
      Tensor x = test::randn({1001}, s, ++seed, 10.0);
      EXPECT_TRUE(bit_equal(ops::cast(put(x, gpu()), t), ops::cast(x, t)));
    }
  // scale_rows (overwrite and accumulate) and row_dot, scale / output in f32 and f64.
  for (DType dt : floats)
    for (DType sdt : {DType::f32, DType::f64})
      for (int64_t H : {int64_t{1}, int64_t{13}, int64_t{200}})
        for (int64_t rows : {int64_t{0}, int64_t{17}}) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + " scale " + dtype_name(sdt) + " H=" + std::to_string(H) +
                       " rows=" + std::to_string(rows));
          Tensor in = test::randn({rows, H}, dt, ++seed);
          Tensor b = test::randn({rows, H}, dt, ++seed);
          Tensor sc = test::randn({rows}, sdt, ++seed);
          Tensor o0 = test::randn({rows, H}, dt, ++seed);
          auto run = [&](Device d) {
            Tensor o = Tensor::empty({rows, H}, dt, d), oa = put(o0, d);
            ops::scale_rows(put(in, d), put(sc, d), o, false);
            ops::scale_rows(put(in, d), put(sc, d), oa, true);
            Tensor dot = Tensor::empty({rows}, sdt, d);
            ops::row_dot(put(in, d), put(b, d), dot);
            return std::vector<Tensor>{o, oa, dot};
          };
          auto g = run(gpu());
          auto r = run(Device::cpu());
          const Tol tight = dt == DType::f64 ? Tol{1e-15, 1e-15} : tol_for(dt);
          EXPECT_TRUE(close(g[0], r[0], tight)) << "scale_rows";
          EXPECT_TRUE(close(g[1], r[1], tight)) << "scale_rows accumulate";
          const Tol dot_tol = dt == DType::f64 ? Tol{1e-12, 1e-12} : Tol{1e-4, 1e-5};
          EXPECT_TRUE(close(g[2], r[2], dot_tol)) << "row_dot";
        }
}

TEST(CudaOps, JitterIsBitIdentical) {
  for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::f16})
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{12345}, int64_t{1} << 21})
      for (double eps : {0.0, 1e-2, 0.5}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(n) + " eps=" + std::to_string(eps));
        const uint64_t key = rng::make_key(42, 3, 1, 2);
        Tensor g = Tensor::empty({n}, dt, gpu()), c = Tensor::empty({n}, dt);
        ops::jitter(key, eps, g);
        ops::jitter(key, eps, c);
        EXPECT_TRUE(bit_equal(g, c));
      }
}

TEST(CudaOps, MseAndAdam) {
  uint64_t seed = 1200;
  for (DType dt : {DType::f32, DType::bf16, DType::f64})
    for (int64_t n : {int64_t{0}, int64_t{5}, int64_t{4097}, int64_t{1} << 20}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(n));
      Tensor y = test::randn({n}, dt, ++seed), t = test::randn({n}, dt, ++seed);
      Tensor dyg = Tensor::empty({n}, dt, gpu()), dyc = Tensor::empty({n}, dt);
      const double vg = ops::mse(put(y, gpu()), put(t, gpu()), &dyg, 0.3);
      const double vc = ops::mse(y, t, &dyc, 0.3);
      // Both sum (y − t)² in f64; only the order differs.
      EXPECT_NEAR(vg, vc, 1e-12 * std::max(1.0, std::abs(vc)));
      EXPECT_EQ(vg, ops::mse(put(y, gpu()), put(t, gpu()), nullptr, 0.3));  // deterministic
      EXPECT_TRUE(close(dyg, dyc, dt == DType::f64 ? Tol{1e-15, 1e-15} : tol_for(dt))) << "dy";
    }
  for (int64_t n : {int64_t{0}, int64_t{3}, int64_t{100000}})
    for (double wd : {0.0, 0.1}) {
      SCOPED_TRACE("adam n=" + std::to_string(n) + " wd=" + std::to_string(wd));
      Tensor p0 = test::randn({n}, DType::f32, ++seed), g0 = test::randn({n}, DType::f32, ++seed);
      Tensor m0 = test::randn({n}, DType::f32, ++seed, 0.1);
      Tensor v0 = test::uniform({n}, DType::f32, ++seed, 0.0, 0.5);
      auto run = [&](Device d) {
        Tensor p = put(p0, d), m = put(m0, d), v = put(v0, d);
        for (int64_t step = 1; step <= 3; ++step) ops::adam(p, put(g0, d), m, v, 1e-2, 0.9, 0.999, 1e-8, wd, step);
        return std::vector<Tensor>{p, m, v};
      };
      auto g = run(gpu());
      auto r = run(Device::cpu());
      // The same IEEE operations in the same order on both sides; the tolerance (a couple of f32
      // ulps) only covers a host compiler that contracts multiply-adds.
      for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(close(g[i], r[i], Tol{1e-7, 1e-6})) << "output " << i;
    }
}

TEST(CudaOps, Sgd) {
  uint64_t seed = 1300;
  for (int64_t n : {int64_t{0}, int64_t{3}, int64_t{100000}})
    for (double momentum : {0.0, 0.9})
      for (double wd : {0.0, 0.1}) {
        SCOPED_TRACE("sgd n=" + std::to_string(n) + " momentum=" + std::to_string(momentum) +
                     " wd=" + std::to_string(wd));
        Tensor p0 = test::randn({n}, DType::f32, ++seed), g0 = test::randn({n}, DType::f32, ++seed);
        auto run = [&](Device d) {
          Tensor p = put(p0, d), buf = Tensor::zeros({n}, DType::f32, d);
          for (int step = 1; step <= 3; ++step)
            ops::sgd(p, put(g0, d), momentum != 0.0 ? &buf : nullptr, 1e-2, momentum, wd);
          return std::vector<Tensor>{p, buf};
        };
        auto g = run(gpu());
        auto r = run(Device::cpu());
        // The same IEEE operations in the same order (explicit round-to-nearest on the GPU); the
        // tolerance only covers a host compiler that contracts multiply-adds.
        for (size_t i = 0; i < 2; ++i) EXPECT_TRUE(close(g[i], r[i], Tol{1e-7, 1e-6})) << "output " << i;
      }
}

// Reductions repeat bit for bit on the GPU (fixed partial sums, fixed final order).
TEST(CudaOps, ReductionsAreDeterministic) {
  const int64_t T = 4096, E = 64;
  Tensor logits = test::randn({T, E}, DType::f32, 77, 2.0, gpu());
  Tensor ps1 = Tensor::empty({4, E}, DType::f64, gpu()), c1 = Tensor::empty({4, E}, DType::i64, gpu());
  Tensor ps2 = Tensor::empty({4, E}, DType::f64, gpu()), c2 = Tensor::empty({4, E}, DType::i64, gpu());
  ops::aux_stats(ScoreFunction::softmax, 4, 4, logits, ps1, c1);
  ops::aux_stats(ScoreFunction::softmax, 4, 4, logits, ps2, c2);
  EXPECT_TRUE(bit_equal(ps1, ps2));
  EXPECT_TRUE(bit_equal(c1, c2));
  // Every token counts k times.
  int64_t total = 0;
  for (int64_t c : c1.to_vector<int64_t>()) total += c;
  EXPECT_EQ(total, T * 4);
  EXPECT_EQ(ops::z_loss_fwd(logits), ops::z_loss_fwd(logits));
}
