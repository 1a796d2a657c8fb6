// Permutation kernels (docs/moe.md): routing counts, the row map, permute / unpermute, the dprobs
// scatter and the chunk sort, against plain references written here. Data movement is compared
// byte for byte; sums against an f64 reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <set>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

using namespace moe;
using moe::test::expect_error;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::randn;
using moe::test::to_f64;

namespace {

// A routing map with its reference permutation: rows are expert-major, tokens ascending.
struct Routing {
  int64_t T = 0, E = 0;
  std::vector<uint8_t> map;                          // (T, E)
  std::vector<int64_t> counts, offsets;              // (E)
  std::vector<std::pair<int64_t, int64_t>> rows;     // row → (t, e)
  std::vector<int32_t> rid;                          // (T, E) reference row map
  int64_t N() const { return static_cast<int64_t>(rows.size()); }
  Tensor map_tensor() const { return Tensor::from_vector(map, {T, E}); }
};

Routing finish(Routing r) {
  r.counts.assign(static_cast<size_t>(r.E), 0);
  r.rid.assign(static_cast<size_t>(r.T * r.E), -1);
  for (int64_t e = 0; e < r.E; ++e) {
    r.offsets.push_back(r.N());
    for (int64_t t = 0; t < r.T; ++t)
      if (r.map[static_cast<size_t>(t * r.E + e)]) {
        r.rid[static_cast<size_t>(t * r.E + e)] = static_cast<int32_t>(r.N());
        r.rows.push_back({t, e});
        ++r.counts[static_cast<size_t>(e)];
      }
  }
  return r;
}

// Each token picks up to k distinct experts, never `dead`; every `empty_every`-th token picks none.
Routing make_routing(int64_t T, int64_t E, int64_t k, uint64_t seed, int64_t dead = -1, int64_t empty_every = 0,
                     bool exact_k = false) {
  Routing r;
  r.T = T;
  r.E = E;
  r.map.assign(static_cast<size_t>(T * E), 0);
  std::mt19937_64 gen(seed);
  std::vector<int64_t> experts;
  for (int64_t e = 0; e < E; ++e)
    if (e != dead) experts.push_back(e);
  for (int64_t t = 0; t < T; ++t) {
    if (empty_every > 0 && t % empty_every == 0) continue;
    std::shuffle(experts.begin(), experts.end(), gen);
    int64_t kt = exact_k ? k : 1 + static_cast<int64_t>(gen() % static_cast<uint64_t>(k));
    for (int64_t j = 0; j < kt; ++j) r.map[static_cast<size_t>(t * E + experts[static_cast<size_t>(j)])] = 1;
  }
  return finish(r);
}

Tensor row_id_map_of(const Routing& r) {
  Tensor rid = Tensor::empty({r.T, r.E}, DType::i32);
  ops::permute_index(r.map_tensor(), r.offsets, rid);
  return rid;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  std::vector<uint8_t> b(t.nbytes());
  t.copy_to_host(b.data(), b.size());
  return b;
}

// Runs f with `n` CPU threads, then back to one (the test environment's setting).
template <class F>
void with_threads(int n, F&& f) {
  cpu_set_num_threads(n);
  f();
  cpu_set_num_threads(1);
}

}  // namespace

TEST(RoutingCounts, AreColumnSumsOverSeveralBlocks) {
  Routing r = make_routing(9000, 6, 3, 1, /*dead=*/4, /*empty_every=*/7);  // > 2 blocks of 4096 tokens
  std::vector<int64_t> got = ops::routing_counts(r.map_tensor()).to_vector<int64_t>();
  EXPECT_EQ(got, r.counts);
  EXPECT_EQ(got[4], 0);
}

TEST(PermuteIndex, MatchesReferenceRowOrder) {
  for (int64_t T : {1, 37, 9000}) {
    Routing r = make_routing(T, 5, 3, 2 + static_cast<uint64_t>(T), /*dead=*/2, /*empty_every=*/5);
    std::vector<int32_t> got = row_id_map_of(r).to_vector<int32_t>();
    EXPECT_EQ(got, r.rid) << "T=" << T;
  }
}

TEST(PermuteIndex, ThreadCountDoesNotChangeTheMap) {
  Routing r = make_routing(20000, 8, 4, 3, 1, 9);
  Tensor one = row_id_map_of(r), many;
  with_threads(3, [&] { many = row_id_map_of(r); });
  EXPECT_TRUE(bit_equal(one, many));
}

TEST(Permute, RowsAndProbsMoveBitExactForEveryDtype) {
  Routing r = make_routing(41, 6, 3, 4, /*dead=*/3, /*empty_every=*/6);
  const int64_t H = 13;
  Tensor rid = row_id_map_of(r);
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    for (DType pdt : {DType::f32, DType::f64}) {
      Tensor x = randn({r.T, H}, dt, 10);
      if (dt == DType::f32) {  // payloads a value-based copy could lose
        float* p = x.data_as<float>();
        p[0] = -0.0f;
        p[1] = std::nanf("7");
      }
      if (dt == DType::bf16) {  // signalling NaN, -0, a subnormal: moved as bytes, never converted
        bf16* p = x.data_as<bf16>();
        p[0].bits = 0x7f81;
        p[1].bits = 0x8000;
        p[H + 2].bits = 0x0001;
      }
      Tensor probs = randn({r.T, r.E}, pdt, 11);
      Tensor out = Tensor::empty({r.N(), H}, dt), out_probs = Tensor::empty({r.N()}, pdt);
      ops::permute(rid, x, out, &probs, &out_probs);
      std::vector<uint8_t> xb = bytes_of(x), ob = bytes_of(out), pb = bytes_of(probs), opb = bytes_of(out_probs);
      const size_t rb = static_cast<size_t>(H) * dtype_size(dt), ps = dtype_size(pdt);
      for (int64_t row = 0; row < r.N(); ++row) {
        auto [t, e] = r.rows[static_cast<size_t>(row)];
        ASSERT_EQ(0, std::memcmp(ob.data() + row * rb, xb.data() + t * rb, rb))
            << dtype_name(dt) << " row " << row << " (token " << t << ", expert " << e << ")";
        ASSERT_EQ(0, std::memcmp(opb.data() + row * ps, pb.data() + (t * r.E + e) * ps, ps))
            << dtype_name(pdt) << " prob of row " << row;
      }
    }
  }
}

TEST(Unpermute, SumsCopiesAgainstF64Reference) {
  Routing r = make_routing(53, 7, 4, 5, /*dead=*/0, /*empty_every=*/4);
  Tensor rid = row_id_map_of(r);
  struct Case {
    DType dt, wdt;
    double tol;  // f32 accumulation of ≤ 4 terms; bf16 adds one output rounding (2^-8 relative)
  };
  for (int64_t H : {11, 1100}) {  // 1100: more than one accumulator chunk for tokens with > 2 copies
    for (Case c : {Case{DType::f64, DType::f64, 1e-14}, Case{DType::f32, DType::f32, 1e-6},
                   Case{DType::bf16, DType::f32, 4e-3}, Case{DType::f32, DType::f64, 1e-6}}) {
      for (bool weighted : {false, true}) {
        Tensor y = randn({r.N(), H}, c.dt, 20);
        Tensor w = randn({r.N()}, c.wdt, 21);
        std::vector<double> yv = to_f64(y), wv = to_f64(w), ref(static_cast<size_t>(r.T * H), 0.0);
        for (int64_t row = 0; row < r.N(); ++row) {
          int64_t t = r.rows[static_cast<size_t>(row)].first;
          double s = weighted ? wv[static_cast<size_t>(row)] : 1.0;
          for (int64_t h = 0; h < H; ++h)
            ref[static_cast<size_t>(t * H + h)] += s * yv[static_cast<size_t>(row * H + h)];
        }
        Tensor out = Tensor::empty({r.T, H}, c.dt);
        ops::unpermute(rid, y, out, weighted ? &w : nullptr);
        std::vector<double> got = to_f64(out);
        EXPECT_TRUE(all_close(got, ref, c.tol, c.tol)) << dtype_name(c.dt) << " weighted=" << weighted << " H=" << H;
        for (int64_t t = 0; t < r.T; t += 4)  // tokens without experts are exactly zero
          for (int64_t h = 0; h < H; ++h) ASSERT_EQ(got[static_cast<size_t>(t * H + h)], 0.0);
      }
    }
  }
}

TEST(Unpermute, Bf16SumsRoundExactlyLikeFloatToBf16) {
  // The contract in bits: the f32 sum in expert order (first copy, then += each next), rounded once
  // by float_to_bf16, for 1, 2 and more copies, with and without weights, NaN and Inf included.
  Routing r = make_routing(64, 8, 6, 12, -1, 9);
  const int64_t H = 37;
  Tensor rid = row_id_map_of(r);
  Tensor y = randn({r.N(), H}, DType::bf16, 22, 3.0);
  bf16* yp = y.data_as<bf16>();
  yp[0] = float_to_bf16(INFINITY);
  yp[5 * H + 1] = float_to_bf16(NAN);
  yp[7 * H + 2] = float_to_bf16(3.3e38f);  // two of these overflow to Inf in f32
  yp[8 * H + 2] = float_to_bf16(3.3e38f);
  Tensor w = randn({r.N()}, DType::f32, 23);
  for (bool weighted : {false, true}) {
    Tensor out = Tensor::empty({r.T, H}, DType::bf16);
    ops::unpermute(rid, y, out, weighted ? &w : nullptr);
    const bf16* o = out.data_as<bf16>();
    const float* wp = w.data_as<float>();
    for (int64_t t = 0; t < r.T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        float s = 0;
        bool first = true;
        for (int64_t e = 0; e < r.E; ++e) {
          int32_t row = r.rid[static_cast<size_t>(t * r.E + e)];
          if (row < 0) continue;
          float v = bf16_to_float(yp[row * H + h]) * (weighted ? wp[row] : 1.0f);
          s = first ? v : s + v;
          first = false;
        }
        ASSERT_EQ(o[t * H + h].bits, float_to_bf16(s).bits) << "token " << t << " column " << h << " weighted "
                                                            << weighted;
      }
  }
}

TEST(Unpermute, Bf16FastPathMatchesTheScalarContractInEveryLane) {
  // The vectorised bf16 sum (16 lanes, then a tail) against the scalar contract: the f32 sum in
  // expert order rounded once by float_to_bf16. 1 to 7 copies per token, an expert with no rows,
  // tokens with none (zeros), and lanes holding values the widening or the rounding could get
  // wrong: signalling and quiet NaN payloads, ±Inf, -0, subnormals, rounding ties to even, sums
  // that overflow. Also with 3 threads, bit for bit.
  const int64_t H = 3 * 16 + 5;
  Routing r = make_routing(64, 8, 7, 13, /*dead=*/6, /*empty_every=*/9);
  ASSERT_EQ(r.counts[6], 0);
  Tensor rid = row_id_map_of(r);
  Tensor y = randn({r.N(), H}, DType::bf16, 24, 2.0);
  bf16* yp = y.data_as<bf16>();
  const uint16_t specials[] = {0x7f81, 0xffc3, 0x7f80, 0xff80, 0x8000, 0x0001, 0x8003, 0x7f7f, 0x3f80, 0x3b80};
  for (int64_t row = 0; row < r.N(); ++row) {
    // one special per row, in a lane that moves with the row (every block position and the tail)
    yp[row * H + (row * 7) % H].bits = specials[row % 10];
    // ties: 1 + 2^-8 and 1 + 3·2^-8 are halfway between two bf16 values (even goes down, odd up)
    yp[row * H + (row * 5 + 3) % H].bits = (row % 2) ? 0x3b80 : 0x3c40;
  }
  auto reference = [&](int64_t t, int64_t h) {
    float s = 0;
    bool first = true;
    for (int64_t e = 0; e < r.E; ++e) {
      int32_t row = r.rid[static_cast<size_t>(t * r.E + e)];
      if (row < 0) continue;
      float v = bf16_to_float(yp[row * H + h]);
      s = first ? v : s + v;
      first = false;
    }
    return first ? uint16_t{0} : float_to_bf16(s).bits;
  };
  Tensor one = Tensor::empty({r.T, H}, DType::bf16), many = Tensor::empty({r.T, H}, DType::bf16);
  ops::unpermute(rid, y, one);
  with_threads(3, [&] { ops::unpermute(rid, y, many); });
  EXPECT_TRUE(bit_equal(one, many));
  const bf16* o = one.data_as<bf16>();
  std::vector<int> copies(static_cast<size_t>(r.T), 0);
  for (auto [t, e] : r.rows) ++copies[static_cast<size_t>(t)];
  std::set<int> seen(copies.begin(), copies.end());
  EXPECT_GE(seen.size(), 8u) << "want tokens with 0 and 1..7+ copies";
  for (int64_t t = 0; t < r.T; ++t)
    for (int64_t h = 0; h < H; ++h)
      ASSERT_EQ(o[t * H + h].bits, reference(t, h))
          << "token " << t << " (" << copies[static_cast<size_t>(t)] << " copies) column " << h;
}

TEST(Unpermute, Bf16CombineIsTheF32CombineRoundedOnce) {
  // bf16 rows summed in f32 equal the f32 kernel on the widened rows, rounded to bf16 once.
  Routing r = make_routing(300, 8, 2, 14, /*dead=*/2, /*empty_every=*/0, /*exact_k=*/true);
  const int64_t H = 96;
  Tensor rid = row_id_map_of(r);
  Tensor yb = randn({r.N(), H}, DType::bf16, 25, 5.0);
  Tensor yf = yb.to_dtype(DType::f32);
  Tensor ob = Tensor::empty({r.T, H}, DType::bf16), of = Tensor::empty({r.T, H}, DType::f32);
  ops::unpermute(rid, yb, ob);
  ops::unpermute(rid, yf, of);
  EXPECT_TRUE(bit_equal(ob, of.to_dtype(DType::bf16)));
}

TEST(Unpermute, ThreadCountDoesNotChangeTheSum) {
  Routing r = make_routing(3000, 8, 4, 6, -1, 11);
  const int64_t H = 48;
  Tensor rid = row_id_map_of(r);
  Tensor y = randn({r.N(), H}, DType::f32, 30), w = randn({r.N()}, DType::f32, 31);
  Tensor one = Tensor::empty({r.T, H}, DType::f32), many = Tensor::empty({r.T, H}, DType::f32);
  ops::unpermute(rid, y, one, &w);
  with_threads(3, [&] { ops::unpermute(rid, y, many, &w); });
  EXPECT_TRUE(bit_equal(one, many));
}

TEST(Unpermute, PermuteThenUnpermuteWithWeightsOneOverKIsTheIdentity) {
  const int64_t T = 29, E = 8, H = 10;
  struct Case {
    DType dt;
    int64_t k;
    double tol;  // 0: bit-exact
  };
  // x/k is exact for k a power of two; the partial sums j·x/k are exact while j·m fits the
  // compute mantissa: always for bf16 in f32 and for k = 2; f32 with k = 4 (3x/4 needs two more
  // bits) and k = 3 (1/3 is inexact) are within a few ulps.
  for (Case c : {Case{DType::f32, 1, 0}, Case{DType::f32, 2, 0}, Case{DType::f64, 2, 0}, Case{DType::bf16, 4, 0},
                 Case{DType::bf16, 2, 0}, Case{DType::f32, 4, 1e-6}, Case{DType::f32, 3, 1e-6},
                 Case{DType::f64, 3, 1e-15}}) {
    Routing r = make_routing(T, E, c.k, 40 + static_cast<uint64_t>(c.k), -1, 0, /*exact_k=*/true);
    Tensor rid = row_id_map_of(r);
    DType wdt = ops::prob_dtype_for(c.dt);
    Tensor x = randn({T, H}, c.dt, 41);
    Tensor rows = Tensor::empty({r.N(), H}, c.dt);
    ops::permute(rid, x, rows);
    Tensor w = moe::test::from_f64(std::vector<double>(static_cast<size_t>(r.N()), 1.0 / static_cast<double>(c.k)),
                                   {r.N()}, wdt);
    Tensor back = Tensor::empty({T, H}, c.dt);
    ops::unpermute(rid, rows, back, &w);
    if (c.tol == 0)
      EXPECT_TRUE(bit_equal(back, x)) << dtype_name(c.dt) << " k=" << c.k;
    else
      EXPECT_TRUE(all_close(back, x, c.tol, c.tol)) << dtype_name(c.dt) << " k=" << c.k;
  }
}

TEST(Unpermute, IsTheAdjointOfPermute) {
  // <permute(x), y> = <x, unpermute(y)> for every x, y: unpermute is permute's backward.
  Routing r = make_routing(31, 6, 3, 7, 5, 3);
  const int64_t H = 9;
  Tensor rid = row_id_map_of(r);
  Tensor x = randn({r.T, H}, DType::f64, 50), y = randn({r.N(), H}, DType::f64, 51);
  Tensor px = Tensor::empty({r.N(), H}, DType::f64), uy = Tensor::empty({r.T, H}, DType::f64);
  ops::permute(rid, x, px);
  ops::unpermute(rid, y, uy);
  auto dot = [](const Tensor& a, const Tensor& b) {
    std::vector<double> u = to_f64(a), v = to_f64(b);
    return std::inner_product(u.begin(), u.end(), v.begin(), 0.0);
  };
  EXPECT_NEAR(dot(px, y), dot(x, uy), 1e-12 * (1 + std::abs(dot(px, y))));
}

TEST(Permute, NoRoutedTokensAtAll) {
  Routing r;
  r.T = 6;
  r.E = 3;
  r.map.assign(18, 0);
  r = finish(r);
  ASSERT_EQ(r.N(), 0);
  Tensor rid = row_id_map_of(r);
  EXPECT_EQ(rid.to_vector<int32_t>(), std::vector<int32_t>(18, -1));
  Tensor x = randn({6, 4}, DType::f32, 60), probs = randn({6, 3}, DType::f32, 61);
  Tensor out = Tensor::empty({0, 4}, DType::f32), out_probs = Tensor::empty({0}, DType::f32);
  ops::permute(rid, x, out, &probs, &out_probs);
  Tensor back = randn({6, 4}, DType::f32, 62);  // overwritten with zeros
  ops::unpermute(rid, out, back);
  EXPECT_EQ(to_f64(back), std::vector<double>(24, 0.0));
  Tensor dprobs = randn({6, 3}, DType::f32, 63);
  ops::scatter_rows_to_map(rid, out_probs, dprobs);
  EXPECT_EQ(to_f64(dprobs), std::vector<double>(18, 0.0));
  // No tokens either.
  Routing z;
  z.E = 3;
  z = finish(z);
  Tensor zrid = row_id_map_of(z);
  Tensor zx = Tensor::empty({0, 4}, DType::bf16), zout = Tensor::empty({0, 4}, DType::bf16);
  ops::permute(zrid, zx, zout);
  ops::unpermute(zrid, zout, zx);
  EXPECT_EQ(ops::routing_counts(z.map_tensor()).to_vector<int64_t>(), std::vector<int64_t>(3, 0));
}

TEST(ScatterRowsToMap, WritesRowValuesAtRoutedEntriesAndZerosElsewhere) {
  Routing r = make_routing(23, 5, 3, 8, 1, 4);
  Tensor rid = row_id_map_of(r);
  for (DType pdt : {DType::f32, DType::f64}) {
    Tensor vals = randn({r.N()}, pdt, 70);
    Tensor pg = randn({r.T, r.E}, pdt, 71);  // every entry is overwritten
    ops::scatter_rows_to_map(rid, vals, pg);
    std::vector<double> v = to_f64(vals), got = to_f64(pg), ref(static_cast<size_t>(r.T * r.E), 0.0);
    for (int64_t row = 0; row < r.N(); ++row) {
      auto [t, e] = r.rows[static_cast<size_t>(row)];
      ref[static_cast<size_t>(t * r.E + e)] = v[static_cast<size_t>(row)];
    }
    EXPECT_EQ(got, ref) << dtype_name(pdt);
  }
}

// The all-to-all dispatcher's permute into two buffers (the send rows, and this rank's own rows in
// place among the rows it receives) must write the bytes of the one-output permute on their
// concatenation, rows and probs, for every split; rows of out2 the map does not name stay as they
// were; a map naming the wrong number of rows fails.
TEST(Permute, TwoOutputsAreTheConcatenationBitForBit) {
  Routing r = make_routing(59, 8, 5, 15, /*dead=*/2, /*empty_every=*/7);
  Tensor rid = row_id_map_of(r);
  const int64_t N = r.N(), extra = 3;  // out2 has 3 rows past the map's
  for (int64_t H : {int64_t{13}, int64_t{1024}}) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Tensor x = randn({r.T, H}, dt, 84);
      for (DType pdt : {DType::f32, DType::f64}) {
        Tensor probs = randn({r.T, r.E}, pdt, 85);
        Tensor one = Tensor::empty({N, H}, dt), one_p = Tensor::empty({N}, pdt);
        ops::permute(rid, x, one, &probs, &one_p);
        for (int64_t n1 : {int64_t{0}, int64_t{1}, N / 2, N}) {
          for (int threads : {1, 3}) {
            Tensor a = Tensor::empty({n1, H}, dt), a_p = Tensor::empty({n1}, pdt);
            Tensor b = randn({N - n1 + extra, H}, dt, 86), b_p = randn({N - n1 + extra}, pdt, 87);
            Tensor b_tail = b.narrow(N - n1, extra).clone(), b_p_tail = b_p.narrow(N - n1, extra).clone();
            with_threads(threads, [&] { ops::permute2(rid, x, a, b, N - n1, &probs, &a_p, &b_p); });
            const std::string what = std::string(dtype_name(dt)) + "/" + dtype_name(pdt) + " H=" + std::to_string(H) +
                                     " split at " + std::to_string(n1) + ", " + std::to_string(threads) + " threads";
            ASSERT_TRUE(bit_equal(one.narrow(0, n1), a)) << what;
            ASSERT_TRUE(bit_equal(one.narrow(n1, N - n1), b.narrow(0, N - n1))) << what;
            ASSERT_TRUE(bit_equal(one_p.narrow(0, n1), a_p)) << what;
            ASSERT_TRUE(bit_equal(one_p.narrow(n1, N - n1), b_p.narrow(0, N - n1))) << what;
            ASSERT_TRUE(bit_equal(b.narrow(N - n1, extra), b_tail)) << what << ": rows the map does not name changed";
            ASSERT_TRUE(bit_equal(b_p.narrow(N - n1, extra), b_p_tail)) << what;
          }
        }
      }
    }
  }
  // Without probs, and a map naming another number of out2 rows than claimed.
  Tensor x = randn({r.T, 5}, DType::f32, 88);
  Tensor a = Tensor::empty({N / 2, 5}, DType::f32), b = Tensor::empty({N - N / 2, 5}, DType::f32);
  ops::permute2(rid, x, a, b, N - N / 2);
  Tensor one = Tensor::empty({N, 5}, DType::f32);
  ops::permute(rid, x, one);
  EXPECT_TRUE(bit_equal(one.narrow(N / 2, N - N / 2), b));
  EXPECT_THROW(ops::permute2(rid, x, a, b, N - N / 2 - 1), Error);
  Tensor b_short = Tensor::empty({N - N / 2 - 1, 5}, DType::f32);
  EXPECT_THROW(ops::permute2(rid, x, a, b_short, N - N / 2 - 1), Error);
}

// The all-to-all combine's unpermute over two buffers (the peers' rows, and this rank's own rows
// where they are) must be the one-input unpermute over their concatenation, bit for bit: every
// dtype, weighted or not, with the dprobs scatter, the split anywhere (first / last buffer empty
// too), tokens with 0..6 copies, row lengths with a vector tail, and 1 or 3 threads.
TEST(Unpermute, TwoInputsAreTheConcatenationBitForBit) {
  Routing r = make_routing(67, 8, 6, 14, /*dead=*/5, /*empty_every=*/11);
  Tensor rid = row_id_map_of(r);
  const int64_t N = r.N();
  for (int64_t H : {int64_t{53}, int64_t{1100}}) {
    for (DType dt : {DType::f32, DType::bf16, DType::f64, DType::f16}) {
      Tensor y = randn({N, H}, dt, 80, 2.0);  // (N, H)
      if (dt == DType::f32) y.data_as<float>()[H + 3] = -0.0f;
      for (DType wdt : {DType::f32, DType::f64}) {
        Tensor w = randn({N}, wdt, 81);  // (N) row weights, and the dprobs row values
        for (int64_t n1 : {int64_t{0}, int64_t{1}, N / 3, N - 1, N}) {
          // Two separate buffers (clones, not views of y).
          Tensor a = y.narrow(0, n1).clone(), b = y.narrow(n1, N - n1).clone();
          Tensor wa = w.narrow(0, n1).clone(), wb = w.narrow(n1, N - n1).clone();
          for (bool weighted : {false, true}) {
            for (int threads : {1, 3}) {
              Tensor one = Tensor::empty({r.T, H}, dt), two = Tensor::empty({r.T, H}, dt);
              with_threads(threads, [&] {
                ops::unpermute(rid, y, one, weighted ? &w : nullptr);
                ops::unpermute2(rid, a, b, two, weighted ? &wa : nullptr, weighted ? &wb : nullptr);
              });
              ASSERT_TRUE(bit_equal(one, two)) << dtype_name(dt) << " H=" << H << " weights " << dtype_name(wdt)
                                               << " weighted=" << weighted << " split at " << n1 << " of " << N
                                               << ", " << threads << " threads";
            }
          }
          Tensor pg1 = randn({r.T, r.E}, wdt, 82), pg2 = randn({r.T, r.E}, wdt, 83);  // overwritten
          ops::scatter_rows_to_map(rid, w, pg1);
          ops::scatter_rows_to_map2(rid, wa, wb, pg2);
          ASSERT_TRUE(bit_equal(pg1, pg2)) << "dprobs scatter, " << dtype_name(wdt) << ", split at " << n1;
        }
      }
    }
  }
}

TEST(Unpermute, TwoInputErrorsNameTheMismatch) {
  Routing r = make_routing(10, 4, 2, 9);
  Tensor rid = row_id_map_of(r);
  const int64_t N = r.N();
  Tensor a = randn({3, 5}, DType::f32, 90), b_short = randn({N - 4, 5}, DType::f32, 91);
  Tensor out = Tensor::empty({10, 5}, DType::f32);
  expect_error([&] { ops::unpermute2(rid, a, b_short, out); }, "point past the");
  Tensor b_wide = randn({N - 3, 6}, DType::f32, 92), b_bf = randn({N - 3, 5}, DType::bf16, 93);
  expect_error([&] { ops::unpermute2(rid, a, b_wide, out); }, "in2 must be");
  expect_error([&] { ops::unpermute2(rid, a, b_bf, out); }, "in2 must be");
  Tensor b = randn({N - 3, 5}, DType::f32, 94), wa = randn({3}, DType::f32, 95), wb = randn({N - 3}, DType::f64, 96);
  expect_error([&] { ops::unpermute2(rid, a, b, out, &wa, nullptr); }, "row_weights2");
  expect_error([&] { ops::unpermute2(rid, a, b, out, &wa, &wb); }, "dtypes differ");
  Tensor va = randn({3}, DType::f32, 97), vb_short = randn({N - 4}, DType::f32, 98);
  Tensor pg = Tensor::empty({10, 4}, DType::f32);
  expect_error([&] { ops::scatter_rows_to_map2(rid, va, vb_short, pg); }, "point past the");
}

TEST(ChunkSort, ReordersChunksBitExactAndInverts) {
  // 3 sources × 4 local experts, some chunks empty: [source][expert] → [expert][source] and back.
  const int64_t S = 3, L = 4, H = 7;
  std::vector<int64_t> splits = {2, 0, 3, 1, 0, 0, 4, 2, 5, 1, 0, 3};
  std::vector<int64_t> order, inv_splits, inv_order(static_cast<size_t>(S * L));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t s = 0; s < S; ++s) order.push_back(s * L + l);
  for (size_t i = 0; i < order.size(); ++i) {
    inv_splits.push_back(splits[static_cast<size_t>(order[i])]);
    inv_order[static_cast<size_t>(order[i])] = static_cast<int64_t>(i);
  }
  const int64_t N = std::accumulate(splits.begin(), splits.end(), int64_t{0});
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    Tensor x = randn({N, H}, dt, 80), p = randn({N}, ops::prob_dtype_for(dt), 81);
    Tensor y = Tensor::empty({N, H}, dt), py = Tensor::empty({N}, p.dtype());
    ops::chunk_sort(splits, order, x, y, &p, &py);
    // Reference: copy the chunks in the new order.
    std::vector<int64_t> start(splits.size(), 0);
    for (size_t c = 1; c < splits.size(); ++c) start[c] = start[c - 1] + splits[c - 1];
    std::vector<uint8_t> xb = bytes_of(x), yb = bytes_of(y), pb = bytes_of(p), pyb = bytes_of(py), ref(xb.size()),
                         pref(pb.size());
    const size_t rb = static_cast<size_t>(H) * dtype_size(dt), ps = dtype_size(p.dtype());
    int64_t dst = 0;
    for (int64_t c : order) {
      std::memcpy(ref.data() + dst * rb, xb.data() + start[static_cast<size_t>(c)] * rb,
                  static_cast<size_t>(splits[static_cast<size_t>(c)]) * rb);
      std::memcpy(pref.data() + dst * ps, pb.data() + start[static_cast<size_t>(c)] * ps,
                  static_cast<size_t>(splits[static_cast<size_t>(c)]) * ps);
      dst += splits[static_cast<size_t>(c)];
    }
    EXPECT_EQ(yb, ref) << dtype_name(dt);
    EXPECT_EQ(pyb, pref) << dtype_name(dt);
    Tensor back = Tensor::empty({N, H}, dt), pback = Tensor::empty({N}, p.dtype());
    ops::chunk_sort(inv_splits, inv_order, y, back, &py, &pback);
    EXPECT_TRUE(bit_equal(back, x)) << dtype_name(dt);
    EXPECT_TRUE(bit_equal(pback, p)) << dtype_name(dt);
  }
}

TEST(ChunkSort, LargeChunksSplitOverThreadsGiveTheSameBytes) {
  std::vector<int64_t> splits = {5000, 3, 7000, 0}, order = {2, 0, 3, 1};
  const int64_t N = 12003, H = 64;
  Tensor x = randn({N, H}, DType::f32, 90);
  Tensor one = Tensor::empty({N, H}, DType::f32), many = Tensor::empty({N, H}, DType::f32);
  ops::chunk_sort(splits, order, x, one);
  with_threads(3, [&] { ops::chunk_sort(splits, order, x, many); });
  EXPECT_TRUE(bit_equal(one, many));
  EXPECT_TRUE(bit_equal(one.narrow(0, 7000), x.narrow(5003, 7000)));
  EXPECT_TRUE(bit_equal(one.narrow(7000, 5000), x.narrow(0, 5000)));
  EXPECT_TRUE(bit_equal(one.narrow(12000, 3), x.narrow(5000, 3)));
}

TEST(Permute, ErrorsNameTheMismatch) {
  Routing r = make_routing(10, 4, 2, 9);
  Tensor rid = row_id_map_of(r);
  Tensor x = randn({10, 3}, DType::f32, 100);
  // out with too few / too many rows for the map: caught instead of writing out of bounds.
  Tensor small = Tensor::empty({r.N() - 1, 3}, DType::f32), big = Tensor::empty({r.N() + 1, 3}, DType::f32);
  expect_error([&] { ops::permute(rid, x, small); }, "point past the");
  expect_error([&] { ops::permute(rid, x, big); }, "routes");
  Tensor out10 = Tensor::empty({10, 3}, DType::f32);
  expect_error([&] { ops::unpermute(rid, small, out10); }, "point past the");
  // Shapes and dtypes checked by the wrappers.
  Tensor x_bf = randn({10, 3}, DType::bf16, 101), out = Tensor::empty({r.N(), 3}, DType::f32);
  expect_error([&] { ops::permute(rid, x_bf, out); }, "dtypes differ");
  Tensor probs = randn({10, 4}, DType::f32, 102);
  expect_error([&] { ops::permute(rid, x, out, &probs, nullptr); }, "go together");
  Tensor rid_bad = Tensor::empty({10, 4}, DType::i32);
  expect_error([&] { ops::permute_index(r.map_tensor(), {0, 1, 2}, rid_bad); }, "expert offsets");
  std::vector<int64_t> splits = {2, 3}, not_perm = {1, 1};
  Tensor c_in = randn({5, 3}, DType::f32, 103), c_out = Tensor::empty({5, 3}, DType::f32);
  expect_error([&] { ops::chunk_sort(splits, not_perm, c_in, c_out); }, "not a permutation");
  std::vector<int64_t> bad_splits = {2, 2}, ok_order = {1, 0};
  expect_error([&] { ops::chunk_sort(bad_splits, ok_order, c_in, c_out); }, "expected shape");
  // Row weights must be f32/f64.
  Tensor w_bf = randn({r.N()}, DType::bf16, 104), y = randn({r.N(), 3}, DType::f32, 105);
  EXPECT_THROW(ops::unpermute(rid, y, out10, &w_bf), Error);
}
