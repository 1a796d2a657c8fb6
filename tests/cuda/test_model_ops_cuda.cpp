// The transformer's small ops on the CUDA backend against the CPU backend (the reference): the same
// seeded inputs through the Tensor-level ops on Device::cpu() and Device::cuda(0), compared with a
// per-dtype tolerance (data movement — the embedding lookup, qkv split / merge, the row max and
// the target logit — bit for bit), in f32, bf16 and f64, with zero rows, odd widths and rows wider
// than a block. In-place use (norm y = x, dx = dy, rope y = x, dlogits = logits) must give the
// out-of-place bits on the GPU. Runs only with a GPU: main() exits 77 otherwise
// (tests/common/gpu_test_main.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/backend.h"

using namespace moe;
using test::all_close;
using test::bit_equal;

namespace {

Device gpu() { return Device::cuda(0); }

// A bit-identical copy of a CPU tensor on `d` (a fresh copy on the CPU too, so in-place ops on one
// backend never touch the other's input).
Tensor put(const Tensor& t, Device d) { return d.is_cpu() ? t.clone() : t.to(d); }

Tensor ids_on(const std::vector<int64_t>& v, Device d) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}, d);
}

// Tolerances per storage dtype for computed results (as tests/cuda/test_ops_cuda.cpp):
//   f64: summation order and libm vs CUDA math; f32: a few ulps (CUDA's expf / cosf are within 2
//   ulps, sums are reordered); bf16: one ulp of bf16 (the f32 results may round to neighbours).
struct Tol {
  double atol, rtol;
};
Tol tol_for(DType dt) {
  switch (dt) {
    case DType::f64: return {1e-12, 1e-10};
    case DType::f32: return {1e-5, 1e-5};
    case DType::bf16: return {1e-2, 1.6e-2};
    default: return {0.0, 0.0};
  }
}
// Sums over many rows / vocabulary entries: the CPU adds sequentially, the GPU in a tree or in
// chunks, so the f32 difference grows with the term count (about sqrt(n) ulps).
Tol sum_tol(DType dt, int64_t n) {
  const double k = std::sqrt(static_cast<double>(std::max<int64_t>(n, 1)));
  switch (dt) {
    case DType::f64: return {1e-12 * k, 1e-11};
    case DType::f32: return {2e-6 * k, 2e-6 * k};
    case DType::bf16: return {1e-2 * k, 1.6e-2};
    default: return {0.0, 0.0};
  }
}
// Statistics are f32 for bf16 data.
Tol stat_tol(DType dt) { return dt == DType::f64 ? Tol{1e-12, 1e-10} : Tol{1e-5, 1e-5}; }

::testing::AssertionResult close(const Tensor& got, const Tensor& ref, Tol t) {
  return all_close(got, ref, t.atol, t.rtol);
}

const DType kDtypes[] = {DType::f32, DType::bf16, DType::f64};

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(CudaModelOps, NormForwardAndBackward) {
  struct Shape2 {
    int64_t rows, D;
  };
  uint64_t seed = 1;
  for (DType dt : kDtypes)
    for (NormKind kind : {NormKind::rms, NormKind::layer})
      for (bool bias : {false, true}) {
        if (bias && kind == NormKind::rms) continue;
        for (Shape2 s :
             {Shape2{0, 8}, Shape2{7, 1}, Shape2{9, 100}, Shape2{5, 1000}, Shape2{300, 64}, Shape2{37, 4099}}) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + (kind == NormKind::layer ? " layer" : " rms") +
                       (bias ? "+bias" : "") + " rows=" + std::to_string(s.rows) + " D=" + std::to_string(s.D));
          const bool layer = kind == NormKind::layer;
          const DType sd = ops::stat_dtype_for(dt);
          Tensor x = test::randn({s.rows, s.D}, dt, ++seed, 2.0), w = test::uniform({s.D}, dt, ++seed, 0.5, 1.5);
          Tensor b = test::randn({s.D}, dt, ++seed), dy = test::randn({s.rows, s.D}, dt, ++seed);
          Tensor dw0 = test::randn({s.D}, dt, ++seed), db0 = test::randn({s.D}, dt, ++seed);
          auto run = [&](Device d, bool in_place) {
            Tensor xd = put(x, d), wd = put(w, d), bd = put(b, d), dyd = put(dy, d);
            Tensor y = in_place ? put(x, d) : Tensor::empty(x.shape(), dt, d);
            Tensor mean = Tensor::empty({s.rows}, sd, d), rstd = Tensor::empty({s.rows}, sd, d);
            ops::norm_fwd(kind, 1e-5, in_place ? y : xd, wd, bias ? &bd : nullptr, y, layer ? &mean : nullptr, rstd);
            Tensor dx = in_place ? put(dy, d) : Tensor::empty(x.shape(), dt, d);
            Tensor dw = put(dw0, d), db = put(db0, d);
            ops::norm_bwd(kind, xd, wd, layer ? &mean : nullptr, rstd, in_place ? dx : dyd, dx, dw,
                          layer ? &db : nullptr);
            return std::vector<Tensor>{y, mean, rstd, dx, dw, db};
          };
          std::vector<Tensor> g = run(gpu(), false), r = run(Device::cpu(), false), gi = run(gpu(), true);
          EXPECT_TRUE(close(g[0], r[0], tol_for(dt))) << "y";
          if (layer) {
            EXPECT_TRUE(close(g[1], r[1], stat_tol(dt))) << "mean";
          }
          EXPECT_TRUE(close(g[2], r[2], stat_tol(dt))) << "rstd";
          EXPECT_TRUE(close(g[3], r[3], tol_for(dt))) << "dx";
          EXPECT_TRUE(close(g[4], r[4], sum_tol(dt, s.rows))) << "dweight";
          if (layer) {
            EXPECT_TRUE(close(g[5], r[5], sum_tol(dt, s.rows))) << "dbias";
          }
          EXPECT_TRUE(bit_equal(gi[0], g[0])) << "y in place";
          EXPECT_TRUE(bit_equal(gi[3], g[3])) << "dx in place";
          EXPECT_TRUE(bit_equal(gi[4], g[4])) << "dweight repeats";
        }
      }
}

TEST(CudaModelOps, Rope) {
  struct Dims {
    int64_t S, B, heads, hd, rd;
  };
  uint64_t seed = 100;
  for (DType dt : kDtypes)
    for (Dims dm : {Dims{5, 2, 3, 16, 16}, Dims{5, 2, 3, 16, 8}, Dims{4, 1, 2, 10, 6}, Dims{3, 2, 2, 8, 0},
                    Dims{64, 2, 8, 128, 64}, Dims{0, 2, 2, 8, 8}})
      for (bool inverse : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " S=" + std::to_string(dm.S) + " hd=" + std::to_string(dm.hd) +
                     " rd=" + std::to_string(dm.rd) + (inverse ? " inverse" : ""));
        std::vector<int64_t> pos(static_cast<size_t>(dm.S));
        for (int64_t s = 0; s < dm.S; ++s) pos[static_cast<size_t>(s)] = (s * 37) % 4096;  // up to 4095
        Tensor x = test::randn({dm.S, dm.B, dm.heads, dm.hd}, dt, ++seed);
        auto run = [&](Device d, bool in_place) {
          Tensor xd = put(x, d), y = in_place ? xd : Tensor::empty(x.shape(), dt, d);
          ops::rope(ids_on(pos, d), dm.rd, 10000.0, inverse, xd, y);
          return y;
        };
        Tensor g = run(gpu(), false), r = run(Device::cpu(), false);
        EXPECT_TRUE(close(g, r, tol_for(dt)));
        EXPECT_TRUE(bit_equal(run(gpu(), true), g)) << "in place";
        // The dims past rd are copied bit for bit.
        std::vector<double> gv = test::to_f64(g), xv = test::to_f64(x);
        for (int64_t h = 0; h < dm.S * dm.B * dm.heads; ++h)
          for (int64_t d = dm.rd; d < dm.hd; ++d)
            ASSERT_EQ(gv[static_cast<size_t>(h * dm.hd + d)], xv[static_cast<size_t>(h * dm.hd + d)]);
      }
}

TEST(CudaModelOps, Embedding) {
  uint64_t seed = 200;
  const int64_t V = 37, start = 10;
  for (DType dt : kDtypes)
    for (int64_t H : {int64_t{1}, int64_t{24}, int64_t{1025}})
      for (int64_t n : {int64_t{0}, int64_t{5}, int64_t{500}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " H=" + std::to_string(H) + " n=" + std::to_string(n));
        std::mt19937_64 gen(++seed);
        std::vector<int64_t> ids(static_cast<size_t>(n));
        for (auto& id : ids) id = static_cast<int64_t>(gen() % 60);  // [0, 60): about 60% in [10, 47)
        Tensor table = test::randn({V, H}, dt, ++seed), base = test::randn({n, H}, dt, ++seed);
        Tensor dout = test::randn({n, H}, dt, ++seed), dt0 = test::randn({V, H}, dt, ++seed);
        auto run = [&](Device d) {
          Tensor idd = ids_on(ids, d), td = put(table, d);
          Tensor out = Tensor::empty({n, H}, dt, d), acc = put(base, d), dtab = put(dt0, d);
          ops::embedding_fwd(idd, td, start, out, false);
          ops::embedding_fwd(idd, td, start, acc, true);
          ops::embedding_bwd(idd, put(dout, d), start, dtab);
          return std::vector<Tensor>{out, acc, dtab};
        };
        std::vector<Tensor> g = run(gpu()), r = run(Device::cpu());
        EXPECT_TRUE(bit_equal(g[0], r[0])) << "lookup";
        EXPECT_TRUE(bit_equal(g[1], r[1])) << "lookup, accumulated (one add, one rounding)";
        // Each table row sums at most n terms; atomics add them in any order.
        EXPECT_TRUE(close(g[2], r[2], sum_tol(dt, n))) << "scatter-add";
        // Rows no id hits keep their bits.
        std::vector<bool> hit(static_cast<size_t>(V), false);
        for (int64_t id : ids)
          if (id >= start && id < start + V) hit[static_cast<size_t>(id - start)] = true;
        std::vector<double> gv = test::to_f64(g[2]), v0 = test::to_f64(dt0);
        for (int64_t v = 0; v < V; ++v)
          if (!hit[static_cast<size_t>(v)]) {
            for (int64_t h = 0; h < H; ++h)
              ASSERT_EQ(gv[static_cast<size_t>(v * H + h)], v0[static_cast<size_t>(v * H + h)]);
          }
      }
}

TEST(CudaModelOps, CrossEntropy) {
  struct Shape2 {
    int64_t n, V;
  };
  uint64_t seed = 300;
  for (DType dt : kDtypes)
    for (Shape2 s : {Shape2{0, 5}, Shape2{3, 1}, Shape2{17, 1000}, Shape2{4, 50000}})
      for (int64_t start : {int64_t{0}, int64_t{100}}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " n=" + std::to_string(s.n) + " V=" + std::to_string(s.V) +
                     " start=" + std::to_string(start));
        const DType sd = ops::stat_dtype_for(dt);
        std::mt19937_64 gen(++seed);
        std::vector<int64_t> labels(static_cast<size_t>(s.n));
        for (auto& l : labels) l = static_cast<int64_t>(gen() % static_cast<uint64_t>(s.V + 150));  // some outside
        Tensor logits = test::randn({s.n, s.V}, dt, ++seed, 3.0);
        Tensor grad = test::randn({s.n}, sd, ++seed);
        // The stats fed to xent_sum / xent_bwd are the CPU's, so each step is compared on its own.
        Tensor m_ref = Tensor::empty({s.n}, sd), se_ref = Tensor::empty({s.n}, sd), tg_ref = Tensor::empty({s.n}, sd);
        ops::xent_max(logits, m_ref);
        ops::xent_sum(logits, ids_on(labels, Device::cpu()), start, m_ref, se_ref, tg_ref);
        auto run = [&](Device d, bool in_place) {
          Tensor l = put(logits, d), lab = ids_on(labels, d);
          Tensor m = Tensor::empty({s.n}, sd, d), se = Tensor::empty({s.n}, sd, d), tg = Tensor::empty({s.n}, sd, d);
          ops::xent_max(l, m);
          ops::xent_sum(l, lab, start, put(m_ref, d), se, tg);
          Tensor dl = in_place ? l : Tensor::empty(logits.shape(), dt, d);
          ops::xent_bwd(l, lab, start, put(m_ref, d), put(se_ref, d), put(grad, d), dl);
          return std::vector<Tensor>{m, se, tg, dl};
        };
        std::vector<Tensor> g = run(gpu(), false), r = run(Device::cpu(), false), gi = run(gpu(), true);
        EXPECT_TRUE(bit_equal(g[0], r[0])) << "row_max (a max is exact)";
        EXPECT_TRUE(close(g[1], r[1], sum_tol(sd, s.V))) << "sum_exp";
        EXPECT_TRUE(bit_equal(g[2], r[2])) << "target (a copy)";
        EXPECT_TRUE(close(g[3], r[3], tol_for(dt))) << "dlogits";
        EXPECT_TRUE(bit_equal(gi[3], g[3])) << "dlogits in place";
      }
}

TEST(CudaModelOps, QkvSplitMergeBitExact) {
  struct Case {
    int64_t rows, ng, qpg, hd;
  };
  uint64_t seed = 400;
  for (DType dt : kDtypes)
    for (Case c : {Case{0, 2, 2, 4}, Case{3, 2, 3, 4}, Case{5, 1, 1, 5}, Case{33, 8, 4, 128}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " rows=" + std::to_string(c.rows) + " ng=" + std::to_string(c.ng) +
                   " qpg=" + std::to_string(c.qpg) + " hd=" + std::to_string(c.hd));
      Tensor qkv = test::randn({c.rows, c.ng * (c.qpg + 2) * c.hd}, dt, ++seed);
      auto run = [&](Device d) {
        Tensor q = Tensor::empty({c.rows, c.ng * c.qpg, c.hd}, dt, d), k = Tensor::empty({c.rows, c.ng, c.hd}, dt, d),
               v = Tensor::empty({c.rows, c.ng, c.hd}, dt, d), back = Tensor::zeros(qkv.shape(), dt, d);
        ops::qkv_split(put(qkv, d), c.ng, c.qpg, q, k, v);
        ops::qkv_merge(q, k, v, c.ng, c.qpg, back);
        return std::vector<Tensor>{q, k, v, back};
      };
      std::vector<Tensor> g = run(gpu()), r = run(Device::cpu());
      EXPECT_TRUE(bit_equal(g[0], r[0])) << "q";
      EXPECT_TRUE(bit_equal(g[1], r[1])) << "k";
      EXPECT_TRUE(bit_equal(g[2], r[2])) << "v";
      EXPECT_TRUE(bit_equal(g[3], qkv)) << "merge(split(qkv)) == qkv";
    }
}
