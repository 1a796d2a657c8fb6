// Causal attention with grouped query heads (kernels/ops.h: AttnFwdArgs / AttnBwdArgs) on the CPU:
// forward and backward against a naive full-matrix softmax written here in f64, for several shapes
// (GQA ratios 1, 2, 4, head sizes that are not a multiple of 8, B > 1, more than one block of
// queries and keys) and for context-parallel positions (queries = two chunks of a 4-chunk
// sequence, keys = the whole sequence in a permuted chunk order); finite-difference gradients of
// q, k and v in f64; bf16 against f32; queries without a visible key; bit-identical results at any
// thread count; a 4096-token sequence checked on sampled rows; and the wrapper's error messages.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

using namespace moe;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::randn;
using moe::test::to_f64;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Problem {
  std::string name;
  int64_t B, nq, nkv, hd;
  std::vector<int64_t> q_pos, k_pos;  // (Sq), (Sk)
  int64_t Sq() const { return static_cast<int64_t>(q_pos.size()); }
  int64_t Sk() const { return static_cast<int64_t>(k_pos.size()); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(hd)); }
};

std::vector<int64_t> iota(int64_t from, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = from + i;
  return v;
}
// The positions of `chunks` (chunk c = [c·len, (c+1)·len)), concatenated in the given order.
std::vector<int64_t> chunk_positions(int64_t len, const std::vector<int64_t>& chunks) {
  std::vector<int64_t> v;
  for (int64_t c : chunks)
    for (int64_t i = 0; i < len; ++i) v.push_back(c * len + i);
  return v;
}

Problem causal(const std::string& name, int64_t S, int64_t B, int64_t nq, int64_t nkv, int64_t hd) {
  return {name, B, nq, nkv, hd, iota(0, S), iota(0, S)};
}
// Context parallelism over 2 ranks with a 4-chunk sequence: this rank's queries are chunks
// `q_chunks` (Megatron's load balancing gives rank 0 chunks {0, 3}, rank 1 chunks {1, 2}); the keys
// are the whole sequence gathered in the chunk order `k_order`.
Problem context_parallel(const std::string& name, int64_t len, std::vector<int64_t> q_chunks,
                         std::vector<int64_t> k_order, int64_t B, int64_t nq, int64_t nkv, int64_t hd) {
  return {name, B, nq, nkv, hd, chunk_positions(len, q_chunks), chunk_positions(len, k_order)};
}

// The shapes every comparison runs over.
std::vector<Problem> problems() {
  return {
      causal("tiny", 1, 1, 1, 1, 1),
      causal("S=37 B=2 mha hd=12", 37, 2, 2, 2, 12),
      causal("S=70 gqa2 hd=5", 70, 1, 4, 2, 5),
      causal("S=130 B=2 gqa4 hd=16", 130, 2, 8, 2, 16),
      causal("S=65 mqa hd=33", 65, 1, 4, 1, 33),
      // the register-blocked f32 paths (hd 32 / 64 / 128; row counts not a multiple of the block)
      causal("S=70 gqa2 hd=32", 70, 1, 4, 2, 32),
      causal("S=131 B=2 gqa2 hd=64", 131, 2, 4, 2, 64),
      causal("S=67 mqa hd=128", 67, 1, 2, 1, 128),
      // decoding-like: 5 queries at the end of a 100-token sequence
      {"Sq=5 Sk=100 gqa2", 1, 2, 1, 8, iota(95, 5), iota(0, 100)},
      context_parallel("cp rank0 len=45", 45, {0, 3}, {2, 0, 3, 1}, 2, 4, 2, 12),
      context_parallel("cp rank1 len=45", 45, {1, 2}, {2, 0, 3, 1}, 1, 4, 1, 7),
      context_parallel("cp rank0 len=70 gqa4", 70, {0, 3}, {3, 1, 0, 2}, 1, 4, 1, 20),
      context_parallel("cp rank1 len=90 hd=64", 90, {1, 2}, {1, 3, 2, 0}, 1, 2, 1, 64),
  };
}

struct Inputs {
  Tensor q, k, v, dout;
};
Inputs make_inputs(const Problem& p, DType dt, uint64_t seed) {
  return {randn({p.Sq(), p.B, p.nq, p.hd}, dt, seed), randn({p.Sk(), p.B, p.nkv, p.hd}, dt, seed + 1),
          randn({p.Sk(), p.B, p.nkv, p.hd}, dt, seed + 2), randn({p.Sq(), p.B, p.nq, p.hd}, dt, seed + 3)};
}

Tensor pos_tensor(const std::vector<int64_t>& v) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
}

DType stat_of(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

// A tensor of `shape` in `dt` full of NaN: outputs must be overwritten.
Tensor nans(const Shape& shape, DType dt) {
  return moe::test::from_f64(std::vector<double>(static_cast<size_t>(shape_numel(shape)), std::nan("")), shape, dt);
}

struct Fwd {
  Tensor o, lse;
};
Fwd run_fwd(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v) {
  Fwd f{nans(q.shape(), q.dtype()), nans({p.B, p.nq, p.Sq()}, stat_of(q.dtype()))};
  ops::attention_fwd(p.scale(), pos_tensor(p.q_pos), pos_tensor(p.k_pos), q, k, v, f.o, f.lse);
  return f;
}

struct Bwd {
  Tensor dq, dk, dv;
};
Bwd run_bwd(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v, const Fwd& f, const Tensor& dout) {
  Bwd g{nans(q.shape(), q.dtype()), nans(k.shape(), q.dtype()), nans(k.shape(), q.dtype())};
  ops::attention_bwd(p.scale(), pos_tensor(p.q_pos), pos_tensor(p.k_pos), q, k, v, f.o, f.lse, dout, g.dq, g.dk,
                     g.dv);
  return g;
}

// ---- the naive reference, in f64 ----------------------------------------------------------------
struct Ref {
  std::vector<double> o, lse, dq, dk, dv;
};

// Row i of query head h (or key row j of kv head g) in the (S, B, heads, hd) layout.
size_t at(int64_t s, int64_t b, int64_t h, int64_t heads, int64_t B, int64_t hd) {
  return static_cast<size_t>(((s * B + b) * heads + h) * hd);
}

// The full softmax row by row (no blocks, no online rescaling): for each (b, h, i) the scores of
// every key, P = softmax over the visible ones; the backward from the same P. `rows`, when given,
// restricts the work to those query rows (the other outputs stay 0). No dout: forward only.
Ref naive(const Problem& p, const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
          const std::vector<double>* dout, const std::vector<int64_t>* rows = nullptr) {
  const int64_t Sq = p.Sq(), Sk = p.Sk(), B = p.B, nq = p.nq, nkv = p.nkv, hd = p.hd, r = nq / nkv;
  const double scale = p.scale();
  Ref R;
  R.o.assign(q.size(), 0.0);
  R.lse.assign(static_cast<size_t>(B * nq * Sq), 0.0);
  R.dq.assign(q.size(), 0.0);
  R.dk.assign(k.size(), 0.0);
  R.dv.assign(k.size(), 0.0);
  std::vector<int64_t> all = iota(0, Sq);
  if (!rows) rows = &all;
  std::vector<double> P(static_cast<size_t>(Sk)), dP(static_cast<size_t>(Sk));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nq; ++h) {
      const int64_t g = h / r;
      for (int64_t i : *rows) {
        const size_t qi = at(i, b, h, nq, B, hd);
        double m = -kInf;
        for (int64_t j = 0; j < Sk; ++j) {
          const size_t kj = at(j, b, g, nkv, B, hd);
          double s = -kInf;
          if (p.k_pos[static_cast<size_t>(j)] <= p.q_pos[static_cast<size_t>(i)]) {
            s = 0;
            for (int64_t d = 0; d < hd; ++d) s += q[qi + d] * k[kj + d];
            s *= scale;
          }
          P[static_cast<size_t>(j)] = s;
          m = std::max(m, s);
        }
        const size_t li = static_cast<size_t>((b * nq + h) * Sq + i);
        if (m == -kInf) {  // no visible key: o = 0, lse = −inf, no gradient
          R.lse[li] = -kInf;
          continue;
        }
        double l = 0;
        for (int64_t j = 0; j < Sk; ++j) l += std::exp(P[static_cast<size_t>(j)] - m);
        R.lse[li] = m + std::log(l);
        for (int64_t j = 0; j < Sk; ++j) P[static_cast<size_t>(j)] = std::exp(P[static_cast<size_t>(j)] - m) / l;
        for (int64_t j = 0; j < Sk; ++j) {
          const size_t kj = at(j, b, g, nkv, B, hd);
          for (int64_t d = 0; d < hd; ++d) R.o[qi + d] += P[static_cast<size_t>(j)] * v[kj + d];
        }
        if (!dout) continue;
        double D = 0;
        for (int64_t d = 0; d < hd; ++d) D += (*dout)[qi + d] * R.o[qi + d];
        for (int64_t j = 0; j < Sk; ++j) {
          const size_t kj = at(j, b, g, nkv, B, hd);
          double dp = 0;
          for (int64_t d = 0; d < hd; ++d) dp += (*dout)[qi + d] * v[kj + d];
          const double pj = P[static_cast<size_t>(j)], ds = pj * (dp - D);
          for (int64_t d = 0; d < hd; ++d) {
            R.dv[kj + d] += pj * (*dout)[qi + d];
            R.dq[qi + d] += scale * ds * k[kj + d];
            R.dk[kj + d] += scale * ds * q[qi + d];
          }
        }
      }
    }
  return R;
}

Ref naive_of(const Problem& p, const Inputs& in, bool backward) {
  std::vector<double> dout = to_f64(in.dout);
  return naive(p, to_f64(in.q), to_f64(in.k), to_f64(in.v), backward ? &dout : nullptr);
}

// Tolerances against the f64 reference (inputs are the same rounded values on both sides):
//   f64: summation order only.
//   f32: f32 accumulation over up to a few hundred keys, the polynomial expf (2 ulp).
struct Tol {
  double atol, rtol;
};
Tol tol_for(DType dt) { return dt == DType::f64 ? Tol{1e-12, 1e-11} : Tol{2e-5, 2e-5}; }

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(AttentionFwd, MatchesNaiveReference) {
  uint64_t seed = 1;
  for (const Problem& p : problems())
    for (DType dt : {DType::f64, DType::f32}) {
      SCOPED_TRACE(p.name + " " + dtype_name(dt));
      Inputs in = make_inputs(p, dt, seed += 10);
      Fwd f = run_fwd(p, in.q, in.k, in.v);
      Ref R = naive_of(p, in, false);
      const Tol t = tol_for(dt);
      EXPECT_TRUE(all_close(to_f64(f.o), R.o, t.atol, t.rtol)) << "o";
      EXPECT_TRUE(all_close(to_f64(f.lse), R.lse, t.atol, t.rtol)) << "lse";
    }
}

TEST(AttentionBwd, MatchesNaiveReference) {
  uint64_t seed = 500;
  for (const Problem& p : problems())
    for (DType dt : {DType::f64, DType::f32}) {
      SCOPED_TRACE(p.name + " " + dtype_name(dt));
      Inputs in = make_inputs(p, dt, seed += 10);
      Fwd f = run_fwd(p, in.q, in.k, in.v);
      Bwd g = run_bwd(p, in.q, in.k, in.v, f, in.dout);
      Ref R = naive_of(p, in, true);
      // Gradients sum ~Sk (dq) or ~Sq·r (dk, dv) terms of either sign: an absolute floor in f32.
      const Tol t = dt == DType::f64 ? Tol{1e-11, 1e-10} : Tol{5e-5, 5e-5};
      EXPECT_TRUE(all_close(to_f64(g.dq), R.dq, t.atol, t.rtol)) << "dq";
      EXPECT_TRUE(all_close(to_f64(g.dk), R.dk, t.atol, t.rtol)) << "dk";
      EXPECT_TRUE(all_close(to_f64(g.dv), R.dv, t.atol, t.rtol)) << "dv";
    }
}

TEST(AttentionBwd, FiniteDifferencesInF64) {
  // loss = Σ o·w, so dout = w. Shapes small enough to probe every element, plus one spanning two
  // blocks of queries and keys (probed at 40 spread elements per tensor).
  struct Case {
    Problem p;
    int64_t max_elems;
  };
  const std::vector<Case> cases = {
      {causal("S=9 B=2 mha hd=3", 9, 2, 2, 2, 3), 0},
      {causal("S=8 gqa2 hd=5", 8, 1, 4, 2, 5), 0},
      {causal("S=7 gqa4 hd=2", 7, 1, 4, 1, 2), 0},
      {context_parallel("cp rank0 len=3", 3, {0, 3}, {2, 0, 3, 1}, 2, 2, 1, 3), 0},
      {context_parallel("cp keys 2..3 only", 3, {0, 3}, {3, 2}, 1, 2, 1, 3), 0},  // chunk-0 queries see nothing
      {causal("S=80 B=1 gqa2 hd=9", 80, 1, 2, 1, 9), 40},
  };
  uint64_t seed = 1000;
  for (const Case& c : cases) {
    const Problem& p = c.p;
    SCOPED_TRACE(p.name);
    Inputs in = make_inputs(p, DType::f64, seed += 10);
    auto loss = [&] {
      std::vector<double> o = to_f64(run_fwd(p, in.q, in.k, in.v).o), w = to_f64(in.dout);
      double l = 0;
      for (size_t i = 0; i < o.size(); ++i) l += o[i] * w[i];
      return l;
    };
    Fwd f = run_fwd(p, in.q, in.k, in.v);
    Bwd g = run_bwd(p, in.q, in.k, in.v, f, in.dout);
    EXPECT_TRUE(check_grad(loss, in.q, g.dq, 1e-6, 1e-7, c.max_elems)) << "dq";
    EXPECT_TRUE(check_grad(loss, in.k, g.dk, 1e-6, 1e-7, c.max_elems)) << "dk";
    EXPECT_TRUE(check_grad(loss, in.v, g.dv, 1e-6, 1e-7, c.max_elems)) << "dv";
  }
}

TEST(Attention, QueriesWithoutVisibleKeys) {
  // Queries of chunks {0, 3}, keys of chunks {3, 2} only: chunk-0 queries see no key (o = 0,
  // lse = −inf, zero dq), chunk-3 queries see both chunks. Then Sk = 0: nothing is visible at all.
  const int64_t len = 70;
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Problem p = context_parallel("partial", len, {0, 3}, {3, 2}, 2, 4, 2, 6);
    Inputs in = make_inputs(p, dt, 77);
    Fwd f = run_fwd(p, in.q, in.k, in.v);
    Bwd g = run_bwd(p, in.q, in.k, in.v, f, in.dout);
    std::vector<double> o = to_f64(f.o), lse = to_f64(f.lse), dq = to_f64(g.dq);
    for (int64_t i = 0; i < p.Sq(); ++i)
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t h = 0; h < p.nq; ++h) {
          const bool blind = i < len;
          const double l = lse[static_cast<size_t>((b * p.nq + h) * p.Sq() + i)];
          EXPECT_EQ(blind, l == -kInf) << "row " << i;
          EXPECT_TRUE(blind || std::isfinite(l)) << "row " << i << " lse " << l;
          for (int64_t d = 0; d < p.hd; ++d) {
            const size_t e = at(i, b, h, p.nq, p.B, p.hd) + static_cast<size_t>(d);
            if (blind) {
              EXPECT_EQ(o[e], 0.0);
              EXPECT_EQ(dq[e], 0.0);
            }
            EXPECT_TRUE(std::isfinite(o[e]) && std::isfinite(dq[e]));
          }
        }
    for (const Tensor* t : {&g.dk, &g.dv})
      for (double x : to_f64(*t)) EXPECT_TRUE(std::isfinite(x));

    Problem e{"no keys", 2, 4, 2, 6, iota(0, 5), {}};
    Inputs ie = make_inputs(e, dt, 78);
    Fwd fe = run_fwd(e, ie.q, ie.k, ie.v);
    Bwd ge = run_bwd(e, ie.q, ie.k, ie.v, fe, ie.dout);
    EXPECT_EQ(to_f64(fe.o), std::vector<double>(static_cast<size_t>(ie.q.numel()), 0.0));
    EXPECT_EQ(to_f64(fe.lse), std::vector<double>(static_cast<size_t>(fe.lse.numel()), -kInf));
    EXPECT_EQ(to_f64(ge.dq), std::vector<double>(static_cast<size_t>(ie.q.numel()), 0.0));
    // And Sq = 0: every key gets a zero gradient.
    Problem z{"no queries", 2, 4, 2, 6, {}, iota(0, 5)};
    Inputs iz = make_inputs(z, dt, 79);
    Fwd fz = run_fwd(z, iz.q, iz.k, iz.v);
    Bwd gz = run_bwd(z, iz.q, iz.k, iz.v, fz, iz.dout);
    EXPECT_EQ(to_f64(gz.dk), std::vector<double>(static_cast<size_t>(iz.k.numel()), 0.0));
    EXPECT_EQ(to_f64(gz.dv), std::vector<double>(static_cast<size_t>(iz.k.numel()), 0.0));
  }
}

TEST(Attention, Bf16MatchesF32) {
  // The same bf16-rounded inputs in bf16 and in f32. Both compute in f32, so the outputs differ by
  // the final rounding to bf16 (2^-8 relative, taken as 8e-3 with margin) plus f32 noise; lse stays
  // f32 in both (f32 noise only). The backward reads the bf16 forward's o (rounded) on both sides.
  uint64_t seed = 2000;
  for (const Problem& p : problems()) {
    SCOPED_TRACE(p.name);
    Inputs b = make_inputs(p, DType::bf16, seed += 10);
    Inputs f{ops::cast(b.q, DType::f32), ops::cast(b.k, DType::f32), ops::cast(b.v, DType::f32),
             ops::cast(b.dout, DType::f32)};
    Fwd fb = run_fwd(p, b.q, b.k, b.v);
    Fwd ff = run_fwd(p, f.q, f.k, f.v);
    EXPECT_TRUE(all_close(fb.o, ff.o, 1e-5, 8e-3)) << "o";
    EXPECT_TRUE(all_close(fb.lse, ff.lse, 1e-5, 1e-5)) << "lse";
    Fwd ff_rounded{ops::cast(fb.o, DType::f32), fb.lse};
    Bwd gb = run_bwd(p, b.q, b.k, b.v, fb, b.dout);
    Bwd gf = run_bwd(p, f.q, f.k, f.v, ff_rounded, f.dout);
    EXPECT_TRUE(all_close(gb.dq, gf.dq, 1e-5, 8e-3)) << "dq";
    EXPECT_TRUE(all_close(gb.dk, gf.dk, 1e-5, 8e-3)) << "dk";
    EXPECT_TRUE(all_close(gb.dv, gf.dv, 1e-5, 8e-3)) << "dv";
  }
}

TEST(Attention, SameBitsAtAnyThreadCount) {
  const int before = cpu_num_threads();
  std::vector<Problem> ps = {causal("S=150 B=2 gqa2", 150, 2, 4, 2, 24),
                             context_parallel("cp len=50", 50, {1, 2}, {2, 0, 3, 1}, 2, 4, 1, 13)};
  for (const Problem& p : ps)
    for (DType dt : {DType::f32, DType::f64, DType::bf16}) {
      SCOPED_TRACE(p.name + " " + dtype_name(dt));
      Inputs in = make_inputs(p, dt, 3000);
      std::vector<Fwd> fs;
      std::vector<Bwd> gs;
      for (int threads : {1, 2, 3}) {
        cpu_set_num_threads(threads);
        fs.push_back(run_fwd(p, in.q, in.k, in.v));
        gs.push_back(run_bwd(p, in.q, in.k, in.v, fs.back(), in.dout));
      }
      for (size_t t = 1; t < fs.size(); ++t) {
        EXPECT_TRUE(bit_equal(fs[t].o, fs[0].o)) << "o, run " << t;
        EXPECT_TRUE(bit_equal(fs[t].lse, fs[0].lse)) << "lse, run " << t;
        EXPECT_TRUE(bit_equal(gs[t].dq, gs[0].dq)) << "dq, run " << t;
        EXPECT_TRUE(bit_equal(gs[t].dk, gs[0].dk)) << "dk, run " << t;
        EXPECT_TRUE(bit_equal(gs[t].dv, gs[0].dv)) << "dv, run " << t;
      }
    }
  cpu_set_num_threads(before);
}

TEST(Attention, LongSequenceSampledRows) {
  // S = 4096, one head, hd = 16, f32: o, lse and dq of sampled query rows against the naive rows
  // (each needs only its own row of P). The kernel never holds an (S × S) matrix.
  const int64_t S = 4096;
  Problem p = causal("S=4096", S, 1, 1, 1, 16);
  Inputs in = make_inputs(p, DType::f32, 4000);
  const auto t0 = std::chrono::steady_clock::now();
  Fwd f = run_fwd(p, in.q, in.k, in.v);
  Bwd g = run_bwd(p, in.q, in.k, in.v, f, in.dout);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ info ] S=4096 hd=16 f32 forward + backward: %.3f s\n", secs);
  const std::vector<int64_t> rows = {0, 1, 63, 64, 65, 127, 1000, 2047, 2048, 3333, 4031, 4032, 4095};
  std::vector<double> dout = to_f64(in.dout);
  Ref R = naive(p, to_f64(in.q), to_f64(in.k), to_f64(in.v), &dout, &rows);
  std::vector<double> o = to_f64(f.o), lse = to_f64(f.lse), dq = to_f64(g.dq);
  std::vector<double> go, ro, gl, rl, gdq, rdq;
  for (int64_t i : rows) {
    gl.push_back(lse[static_cast<size_t>(i)]);
    rl.push_back(R.lse[static_cast<size_t>(i)]);
    for (int64_t d = 0; d < p.hd; ++d) {
      const size_t e = static_cast<size_t>(i * p.hd + d);
      go.push_back(o[e]);
      ro.push_back(R.o[e]);
      gdq.push_back(dq[e]);
      rdq.push_back(R.dq[e]);
    }
  }
  EXPECT_TRUE(all_close(go, ro, 2e-5, 2e-5)) << "o";
  EXPECT_TRUE(all_close(gl, rl, 2e-5, 2e-5)) << "lse";
  EXPECT_TRUE(all_close(gdq, rdq, 5e-5, 5e-5)) << "dq";
  for (const Tensor* t : {&g.dk, &g.dv})
    for (double x : to_f64(*t)) ASSERT_TRUE(std::isfinite(x));
}

TEST(Attention, ErrorsNameTheProblem) {
  Problem p = causal("ok", 6, 2, 4, 2, 8);
  Inputs in = make_inputs(p, DType::f32, 5000);
  Tensor qp = pos_tensor(p.q_pos), kp = pos_tensor(p.k_pos);
  Tensor o = Tensor::empty(in.q.shape(), DType::f32), lse = Tensor::empty({2, 4, 6}, DType::f32);
  Tensor dq = Tensor::empty(in.q.shape(), DType::f32), dk = Tensor::empty(in.k.shape(), DType::f32);
  Tensor dv = Tensor::empty(in.k.shape(), DType::f32);
  const double s = p.scale();
  using test::expect_error;
  // wrong shapes
  Tensor k_hd = randn({6, 2, 2, 7}, DType::f32, 1);
  expect_error([&] { ops::attention_fwd(s, qp, kp, in.q, k_hd, k_hd, o, lse); }, "attention_fwd: 'k' must be");
  Tensor q3 = randn({6, 2, 32}, DType::f32, 2);
  expect_error([&] { ops::attention_fwd(s, qp, kp, q3, in.k, in.v, o, lse); }, "'q' must be 4-D");
  Tensor v_short = randn({5, 2, 2, 8}, DType::f32, 3);
  expect_error([&] { ops::attention_fwd(s, qp, kp, in.q, in.k, v_short, o, lse); }, "'v' must have the shape of k");
  // nq not a multiple of nkv
  Tensor q3h = randn({6, 2, 3, 8}, DType::f32, 4), o3h = Tensor::empty({6, 2, 3, 8}, DType::f32);
  Tensor lse3h = Tensor::empty({2, 3, 6}, DType::f32);
  expect_error([&] { ops::attention_fwd(s, qp, kp, q3h, in.k, in.v, o3h, lse3h); }, "multiple of the 2 key/value");
  // positions
  Tensor kp_short = pos_tensor(iota(0, 5));
  expect_error([&] { ops::attention_fwd(s, qp, kp_short, in.q, in.k, in.v, o, lse); }, "'k_pos' must be (Sk=6) i64");
  Tensor qp_f = moe::test::from_f64({0, 1, 2, 3, 4, 5}, {6}, DType::f32);
  expect_error([&] { ops::attention_fwd(s, qp_f, kp, in.q, in.k, in.v, o, lse); }, "'q_pos' must be (Sq=6) i64");
  // dtypes and outputs
  Tensor k64 = ops::cast(in.k, DType::f64);
  expect_error([&] { ops::attention_fwd(s, qp, kp, in.q, k64, in.v, o, lse); }, "dtypes differ");
  Tensor lse64 = Tensor::empty({2, 4, 6}, DType::f64);
  expect_error([&] { ops::attention_fwd(s, qp, kp, in.q, in.k, in.v, o, lse64); }, "'lse' must be (2, 4, 6) f32");
  Tensor lse_t = Tensor::empty({2, 6, 4}, DType::f32);
  expect_error([&] { ops::attention_fwd(s, qp, kp, in.q, in.k, in.v, o, lse_t); }, "'lse' must be (2, 4, 6) f32");
  expect_error([&] { ops::attention_fwd(std::nan(""), qp, kp, in.q, in.k, in.v, o, lse); }, "scale must be finite");
  // backward outputs
  expect_error([&] { ops::attention_bwd(s, qp, kp, in.q, in.k, in.v, o, lse, in.dout, dq, dq, dv); },
               "attention_bwd: 'dk' must be");
  Tensor dout16 = ops::cast(in.dout, DType::bf16);
  expect_error([&] { ops::attention_bwd(s, qp, kp, in.q, in.k, in.v, o, lse, dout16, dq, dk, dv); },
               "'dout' must be");
  // a correct call passes
  ops::attention_fwd(s, qp, kp, in.q, in.k, in.v, o, lse);
  ops::attention_bwd(s, qp, kp, in.q, in.k, in.v, o, lse, in.dout, dq, dk, dv);
}
