// The CPU backend's performance paths (docs/performance.md), which the rest of the suite, run on one
// thread with small shapes, would not reach:
//   - GEMM tiling over several threads (split along M or N, every transpose, alpha/beta, f32 and
//     f64; grouped GEMM in all three modes with a zero-row group and accumulate) against plain
//     f64 loops, and the same bits when run twice;
//   - the vectorised f32 silu: in-place backward (din = in, which the experts' backward relies on)
//     bit for bit against out of place, row tails, NaN and extreme inputs;
//   - the vectorised unpermute sum: the same bits as adding the copies in expert order;
//   - the block cache of the CPU allocator: counters keep counting live bytes, a freed large block
//     is reused for a request of the same size class.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "common/gemm_ref.h"
#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"
#include "moecore/backend.h"

using namespace moe;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::gemm_ref;
using moe::test::randn;
using moe::test::to_f64;

namespace {

template <class F>
void with_threads(int n, F&& f) {
  cpu_set_num_threads(n);
  f();
  cpu_set_num_threads(1);
}

}  // namespace

TEST(GemmTiling, DenseMatchesF64ReferenceForEveryTransposeOnThreeThreads) {
  // (520, 300, 64) splits along M, (200, 700, 64) along N: both are past the tiling threshold.
  struct Dims {
    int64_t M, N, K;
  };
  for (Dims d : {Dims{520, 300, 64}, Dims{200, 700, 64}}) {
    for (DType dt : {DType::f32, DType::f64}) {
      for (int t = 0; t < 4; ++t) {
        const bool ta = t & 1, tb = t & 2;
        Tensor A = ta ? randn({d.K, d.M}, dt, 1) : randn({d.M, d.K}, dt, 1);
        Tensor B = tb ? randn({d.N, d.K}, dt, 2) : randn({d.K, d.N}, dt, 2);
        Tensor C0 = randn({d.M, d.N}, dt, 3);
        Tensor C = C0.clone();
        with_threads(3, [&] { ops::gemm(A, ta, B, tb, C, 1.5, 0.5); });
        // f32: K = 64 products of N(0,1) values, each rounded once, summed in f32.
        const double tol = dt == DType::f32 ? 2e-4 : 1e-12;
        EXPECT_TRUE(all_close(to_f64(C), gemm_ref(A, ta, B, tb, C0, 1.5, 0.5), tol, tol))
            << "M " << d.M << " N " << d.N << " ta " << ta << " tb " << tb << " " << dtype_name(dt);
        Tensor C2 = C0.clone();
        with_threads(3, [&] { ops::gemm(A, ta, B, tb, C2, 1.5, 0.5); });
        EXPECT_TRUE(bit_equal(C, C2)) << "the same call twice on three threads";
      }
    }
  }
}

TEST(GemmTiling, GroupedGemmAllModesWithAZeroRowGroupOnThreeThreads) {
  const std::vector<int64_t> rows = {0, 700, 5, 300};
  const int64_t G = 4, M = 1005, N = 160, K = 96;
  Tensor W = randn({G, N, K}, DType::f32, 10);  // (G, N, K)
  Tensor x = randn({M, K}, DType::f32, 11), dy = randn({M, N}, DType::f32, 12);
  // Group g's rows [r0, r0 + m) of a row-major (M, cols) tensor, and g's slice of W.
  auto rows_of = [&](const Tensor& t, int64_t g) {
    int64_t r0 = 0;
    for (int64_t i = 0; i < g; ++i) r0 += rows[static_cast<size_t>(i)];
    return t.narrow(r0, rows[static_cast<size_t>(g)]);
  };
  auto w_of = [&](int64_t g) { return W.narrow(g, 1).view({N, K}); };

  Tensor h = Tensor::empty({M, N}, DType::f32), dx = Tensor::empty({M, K}, DType::f32);
  Tensor dW0 = randn({G, N, K}, DType::f32, 13), dW = dW0.clone(), dW_fresh = randn({G, N, K}, DType::f32, 14);
  with_threads(3, [&] {
    ops::grouped_gemm(GroupedGemmMode::fwd, x, W, h, rows);
    ops::grouped_gemm(GroupedGemmMode::dgrad, dy, W, dx, rows);
    ops::grouped_gemm(GroupedGemmMode::wgrad, dy, x, dW, rows, /*accumulate=*/true);
    ops::grouped_gemm(GroupedGemmMode::wgrad, dy, x, dW_fresh, rows, /*accumulate=*/false);
  });
  for (int64_t g = 0; g < G; ++g) {
    const int64_t m = rows[static_cast<size_t>(g)];
    if (m > 0) {
      Tensor hg = rows_of(h, g), dxg = rows_of(dx, g);
      EXPECT_TRUE(all_close(to_f64(hg), gemm_ref(rows_of(x, g), false, w_of(g), true, Tensor::zeros({m, N}, DType::f32), 1, 0),
                            2e-4, 2e-4))
          << "fwd group " << g;
      EXPECT_TRUE(all_close(to_f64(dxg),
                            gemm_ref(rows_of(dy, g), false, w_of(g), false, Tensor::zeros({m, K}, DType::f32), 1, 0),
                            3e-4, 3e-4))
          << "dgrad group " << g;
    }
    // wgrad: dW_g (+)= dy_gᵀ x_g; a zero-row group keeps dW_g (accumulate) or is zeroed.
    Tensor C0 = dW0.narrow(g, 1).view({N, K});
    const std::vector<double> acc = m > 0 ? gemm_ref(rows_of(dy, g), true, rows_of(x, g), false, C0, 1, 1) : to_f64(C0);
    EXPECT_TRUE(all_close(to_f64(dW.narrow(g, 1)), acc, 1e-3, 1e-3)) << "wgrad accumulate group " << g;
    const std::vector<double> fresh = m > 0 ? gemm_ref(rows_of(dy, g), true, rows_of(x, g), false,
                                                       Tensor::zeros({N, K}, DType::f32), 1, 0)
                                            : std::vector<double>(static_cast<size_t>(N * K), 0.0);
    EXPECT_TRUE(all_close(to_f64(dW_fresh.narrow(g, 1)), fresh, 1e-3, 1e-3)) << "wgrad group " << g;
  }
}

TEST(SiluFastPath, InPlaceBackwardIsBitExactAndTailsAreRight) {
  const int64_t rows = 7, F = 37;  // 37 = two full 16-lane blocks and a tail of 5
  for (bool glu : {true, false}) {
    const int64_t W = glu ? 2 * F : F;
    Tensor in = randn({rows, W}, DType::f32, 20, 3.0);
    Tensor s = moe::test::uniform({rows}, DType::f32, 21, 0.1, 1.0);
    Tensor dout = randn({rows, F}, DType::f32, 22);
    Tensor din = Tensor::empty({rows, W}, DType::f32), ds = Tensor::empty({rows}, DType::f32);
    ops::act_bwd(Activation::silu, glu, in, &s, dout, din, &ds);
    Tensor inplace = in.clone(), ds2 = Tensor::empty({rows}, DType::f32);
    ops::act_bwd(Activation::silu, glu, inplace, &s, dout, inplace, &ds2);
    EXPECT_TRUE(bit_equal(din, inplace)) << "glu " << glu;
    EXPECT_TRUE(bit_equal(ds, ds2)) << "glu " << glu;
    // Against f64 (the tail lanes included).
    Tensor din64 = Tensor::empty({rows, W}, DType::f64), ds64 = Tensor::empty({rows}, DType::f64);
    Tensor s64 = ops::cast(s, DType::f64);
    ops::act_bwd(Activation::silu, glu, ops::cast(in, DType::f64), &s64, ops::cast(dout, DType::f64), din64, &ds64);
    EXPECT_TRUE(all_close(to_f64(din), to_f64(din64), 1e-5, 1e-5)) << "glu " << glu;
    EXPECT_TRUE(all_close(to_f64(ds), to_f64(ds64), 1e-4, 1e-5)) << "glu " << glu;
  }
}

TEST(SiluFastPath, NanPropagatesAndExtremesStayFinite) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Tensor in = Tensor::from_vector<float>({nan, 200.0f, -200.0f, 88.0f, -88.0f, 0.0f}, {1, 6});
  Tensor out = Tensor::empty({1, 6}, DType::f32);
  ops::act_fwd(Activation::silu, false, in, nullptr, out);
  std::vector<float> o = out.to_vector<float>();
  EXPECT_TRUE(std::isnan(o[0]));
  EXPECT_FLOAT_EQ(o[1], 200.0f);        // σ(200) = 1
  EXPECT_NEAR(o[2], 0.0f, 1e-30f);      // −200·σ(−200) underflows to ~0
  EXPECT_FLOAT_EQ(o[3], 88.0f);
  EXPECT_NEAR(o[4], 0.0f, 1e-30f);
  EXPECT_EQ(o[5], 0.0f);
  Tensor din = Tensor::empty({1, 6}, DType::f32), dout = Tensor::from_vector<float>({1, 1, 1, 1, 1, 1}, {1, 6});
  ops::act_bwd(Activation::silu, false, in, nullptr, dout, din, nullptr);
  std::vector<float> d = din.to_vector<float>();
  EXPECT_TRUE(std::isnan(d[0]));
  EXPECT_FLOAT_EQ(d[1], 1.0f);  // silu'(x) → 1 for large x, → 0 for very negative x
  EXPECT_NEAR(d[2], 0.0f, 1e-30f);
  EXPECT_FLOAT_EQ(d[5], 0.5f);
}

TEST(UnpermuteFastPath, SumsTheCopiesInExpertOrderBitForBit) {
  // 5 tokens, 4 experts, H = 37 (a tail after two 16-lane blocks); token 3 has 3 copies, token 4 none.
  const int64_t T = 5, E = 4, H = 37;
  const std::vector<std::vector<int>> routed = {{0, 1}, {1, 3}, {2}, {0, 2, 3}, {}};
  std::vector<int32_t> rid(static_cast<size_t>(T * E), -1);
  std::vector<int64_t> counts(E, 0);
  for (const auto& r : routed)
    for (int e : r) ++counts[static_cast<size_t>(e)];
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[static_cast<size_t>(e)] = next[static_cast<size_t>(e - 1)] + counts[static_cast<size_t>(e - 1)];
  for (int64_t t = 0; t < T; ++t)
    for (int e : routed[static_cast<size_t>(t)]) rid[static_cast<size_t>(t * E + e)] = static_cast<int32_t>(next[static_cast<size_t>(e)]++);
  const int64_t N = 8;
  Tensor map = Tensor::from_vector(rid, {T, E});
  Tensor y = randn({N, H}, DType::f32, 30, 1e3);  // large values: any reordering would show in the bits
  Tensor out = Tensor::empty({T, H}, DType::f32);
  ops::unpermute(map, y, out);
  std::vector<float> yv = y.to_vector<float>(), ov = out.to_vector<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float s = 0.0f;
      bool first = true;
      for (int64_t e = 0; e < E; ++e) {
        int32_t r = rid[static_cast<size_t>(t * E + e)];
        if (r < 0) continue;
        s = first ? yv[static_cast<size_t>(r * H + h)] : s + yv[static_cast<size_t>(r * H + h)];
        first = false;
      }
      EXPECT_EQ(ov[static_cast<size_t>(t * H + h)], s) << "token " << t << " column " << h;
    }
}

TEST(CpuAllocatorCache, CountsLiveBytesAndReusesLargeBlocks) {
  Backend& b = get_backend(Device::cpu());
  const int64_t base = b.memory_stats().current_bytes;
  const int64_t bytes = (int64_t{3} << 20) + 100;  // past the cache's 1 MiB threshold
  {
    Tensor t = Tensor::empty({bytes}, DType::u8);
    EXPECT_EQ(b.memory_stats().current_bytes, base + bytes);
  }
  EXPECT_EQ(b.memory_stats().current_bytes, base);
  const MemoryStats after_free = b.memory_stats();
  EXPECT_GE(after_free.cached_bytes, bytes) << "the freed block is kept";
  {
    // A slightly smaller request falls in the same size class and takes the cached block.
    Tensor t = Tensor::empty({bytes - 50}, DType::u8);
    EXPECT_EQ(b.memory_stats().current_bytes, base + bytes - 50);
    EXPECT_LT(b.memory_stats().cached_bytes, after_free.cached_bytes);
    t.zero_();
  }
  EXPECT_EQ(b.memory_stats().current_bytes, base);
  // Small blocks are not cached.
  const int64_t cached = b.memory_stats().cached_bytes;
  { Tensor small = Tensor::empty({1024}, DType::f32); }
  EXPECT_EQ(b.memory_stats().cached_bytes, cached);
}

// axpby and the f32 <-> bf16 casts run on vectors in thread blocks: whole vectors, tails and
// several blocks against the scalar rule (casts bit for bit, float_to_bf16 on every element with
// ties, NaN and infinities among them), axpby against f64, beta = 0 not reading y, and the same
// bits on 1 and 3 threads.
TEST(ElementwiseFastPath, CastsAreTheScalarRuleAndAxpbyMatchesF64) {
  for (int64_t n : {int64_t{5}, int64_t{16}, int64_t{37}, int64_t{70000 + 3}}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    std::vector<float> v;
    for (double e : to_f64(randn({n}, DType::f32, 60 + n, 3.0))) v.push_back(static_cast<float>(e));
    v[0] = std::numeric_limits<float>::quiet_NaN();
    if (n > 1) v[1] = -std::numeric_limits<float>::infinity();
    if (n > 2) v[2] = 1.0f + 1.0f / 256.0f;  // a tie: rounds to even (1.0)
    if (n > 3) v[3] = 1.0f + 3.0f / 256.0f;  // a tie: rounds to even (1.015625)
    Tensor f = Tensor::from_vector(v, {n});
    Tensor b = ops::cast(f, DType::bf16);
    const bf16* bp = b.data_as<bf16>();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bp[i].bits, float_to_bf16(v[static_cast<size_t>(i)]).bits) << i;
    Tensor back = ops::cast(b, DType::f32);
    for (int64_t i = 0; i < n; ++i) {
      const float want = bf16_to_float(bp[i]), got = back.data_as<float>()[i];
      ASSERT_EQ(std::memcmp(&want, &got, 4), 0) << i;
    }
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(dtype_name(dt));
      Tensor x = randn({n}, dt, 70 + n), y0 = randn({n}, dt, 80 + n);
      std::vector<Tensor> ys;
      for (int t : {1, 3}) {
        with_threads(t, [&] {
          ys.push_back(y0.clone());
          ops::axpby(0.75, x, -1.5, ys.back());
        });
      }
      EXPECT_TRUE(bit_equal(ys[0], ys[1]));
      std::vector<double> xv = to_f64(x), yv = to_f64(y0), want(static_cast<size_t>(n));
      for (size_t i = 0; i < want.size(); ++i) want[i] = 0.75 * xv[i] - 1.5 * yv[i];
      const double tol = dt == DType::f32 ? 1e-5 : 8e-3;  // bf16: one rounding of y (2^-9 relative)
      EXPECT_TRUE(all_close(to_f64(ys[0]), want, tol, tol));
      Tensor ynan = Tensor::from_vector(std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN()), {n});
      Tensor yz = ops::cast(ynan, dt);
      ops::axpby(2.0, x, 0.0, yz);  // beta = 0: y is overwritten, its NaNs never read
      std::vector<double> zv = to_f64(yz);
      for (size_t i = 0; i < zv.size(); ++i) ASSERT_EQ(zv[i], 2.0 * xv[i]) << i;
    }
  }
}
