// The transformer's small ops (kernels/ops.h): RMSNorm / LayerNorm, rotary embedding, the
// vocab-parallel embedding and cross entropy, and the fused-QKV split, each against a plain f64
// reference written here; f64 finite-difference checks of every backward; bf16 / f32 against f64
// with the tolerance's reason beside it; in-place use where the contract allows it; bitwise
// thread-count invariance of the two cross-row reductions (norm dweight / dbias, embedding
// scatter-add); and the wrappers' error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

using namespace moe;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::expect_error;
using moe::test::from_f64;
using moe::test::randn;
using moe::test::to_f64;

namespace {

size_t z(int64_t i) { return static_cast<size_t>(i); }

Tensor i64(const std::vector<int64_t>& v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); }

// Runs f with n CPU threads, then restores the previous count.
template <class F>
void with_threads(int n, F&& f) {
  const int before = cpu_num_threads();
  cpu_set_num_threads(n);
  f();
  cpu_set_num_threads(before);
}

// ---- norms ------------------------------------------------------------------------------------
struct NormRef {
  std::vector<double> y, mean, rstd;
};
NormRef norm_ref(NormKind kind, const std::vector<double>& x, const std::vector<double>& w,
                 const std::vector<double>* b, int64_t rows, int64_t D, double eps) {
  NormRef r;
  r.y.resize(z(rows * D));
  for (int64_t i = 0; i < rows; ++i) {
    double mean = 0, var = 0;
    if (kind == NormKind::layer) {
      for (int64_t d = 0; d < D; ++d) mean += x[z(i * D + d)];
      mean /= static_cast<double>(D);
    }
    for (int64_t d = 0; d < D; ++d) var += (x[z(i * D + d)] - mean) * (x[z(i * D + d)] - mean);
    var /= static_cast<double>(D);
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t d = 0; d < D; ++d)
      r.y[z(i * D + d)] = (x[z(i * D + d)] - mean) * rstd * w[z(d)] + (b ? (*b)[z(d)] : 0.0);
    r.mean.push_back(mean);
    r.rstd.push_back(rstd);
  }
  return r;
}

struct NormOut {
  Tensor y, mean, rstd;
};
NormOut run_norm(NormKind kind, double eps, const Tensor& x, const Tensor& w, const Tensor* b) {
  const DType sd = ops::stat_dtype_for(x.dtype());
  NormOut o;
  o.y = Tensor::empty(x.shape(), x.dtype());
  o.rstd = Tensor::empty({x.size(0)}, sd);
  if (kind == NormKind::layer) o.mean = Tensor::empty({x.size(0)}, sd);
  ops::norm_fwd(kind, eps, x, w, b, o.y, kind == NormKind::layer ? &o.mean : nullptr, o.rstd);
  return o;
}

struct NormCase {
  const char* name;
  NormKind kind;
  bool bias;
};
const NormCase kNormCases[] = {
    {"rms", NormKind::rms, false}, {"layer", NormKind::layer, false}, {"layer+bias", NormKind::layer, true}};

// ---- rope -------------------------------------------------------------------------------------
// Megatron's formulation, written independently of the kernel's pair loop: emb = [angle, angle],
// y = x·cos(emb) + rotate_half(x)·sin(emb) on the first rd dims, rotate_half([x1, x2]) = [−x2, x1].
std::vector<double> rope_ref(const std::vector<double>& x, const std::vector<int64_t>& pos, int64_t B, int64_t heads,
                             int64_t hd, int64_t rd, double base, bool inverse) {
  const int64_t S = static_cast<int64_t>(pos.size()), half = rd / 2;
  std::vector<double> y = x;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < B * heads; ++h) {
      const double* xv = x.data() + (s * B * heads + h) * hd;
      double* yv = y.data() + (s * B * heads + h) * hd;
      for (int64_t j = 0; j < rd; ++j) {
        const double inv_freq = std::pow(base, -2.0 * static_cast<double>(j % half) / static_cast<double>(rd));
        const double emb = static_cast<double>(pos[z(s)]) * inv_freq;
        const double rot = j < half ? -xv[j + half] : xv[j - half];
        yv[j] = xv[j] * std::cos(emb) + rot * (inverse ? -std::sin(emb) : std::sin(emb));
      }
    }
  return y;
}

Tensor run_rope(const std::vector<int64_t>& pos, int64_t rd, bool inverse, const Tensor& x, double base = 10000.0) {
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  ops::rope(i64(pos), rd, base, inverse, x, y);
  return y;
}

// ---- cross entropy ----------------------------------------------------------------------------
// Full-vocabulary cross entropy and its gradient in f64: loss_i = lse(l_i) − l_i[label_i],
// dl = grad_i·(softmax(l_i) − onehot).
void xent_ref(const std::vector<double>& l, const std::vector<int64_t>& labels, const std::vector<double>& grad,
              int64_t n, int64_t V, std::vector<double>& loss, std::vector<double>& dl) {
  loss.assign(z(n), 0.0);
  dl.assign(z(n * V), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, l[z(i * V + v)]);
    for (int64_t v = 0; v < V; ++v) s += std::exp(l[z(i * V + v)] - m);
    loss[z(i)] = std::log(s) + m - l[z(i * V + labels[z(i)])];
    for (int64_t v = 0; v < V; ++v)
      dl[z(i * V + v)] = grad[z(i)] * (std::exp(l[z(i * V + v)] - m) / s - (v == labels[z(i)] ? 1.0 : 0.0));
  }
}

// The vocab-parallel pipeline over slices of the vocabulary, the all-reduces done by hand: the max
// of the slice maxes, then the sums of sum_exp and target. Returns loss (n) in f64; fills the
// per-slice dlogits when `dl` is given.
struct Slice {
  Tensor logits;  // (n, V_s)
  int64_t start;
};
std::vector<double> xent_split(const std::vector<Slice>& slices, const Tensor& labels, const std::vector<double>& grad,
                               std::vector<Tensor>* dl) {
  const int64_t n = slices[0].logits.size(0);
  const DType sd = ops::stat_dtype_for(slices[0].logits.dtype());
  std::vector<double> mx(z(n), -INFINITY), se(z(n), 0.0), tg(z(n), 0.0);
  for (const Slice& s : slices) {  // xent_max, all-reduce max
    Tensor m = Tensor::empty({n}, sd);
    ops::xent_max(s.logits, m);
    std::vector<double> mv = to_f64(m);
    for (int64_t i = 0; i < n; ++i) mx[z(i)] = std::max(mx[z(i)], mv[z(i)]);
  }
  Tensor row_max = from_f64(mx, {n}, sd);
  for (const Slice& s : slices) {  // xent_sum, all-reduce sum
    Tensor e = Tensor::empty({n}, sd), t = Tensor::empty({n}, sd);
    ops::xent_sum(s.logits, labels, s.start, row_max, e, t);
    std::vector<double> ev = to_f64(e), tv = to_f64(t);
    for (int64_t i = 0; i < n; ++i) {
      se[z(i)] += ev[z(i)];
      tg[z(i)] += tv[z(i)];
    }
  }
  std::vector<double> loss(z(n));
  for (int64_t i = 0; i < n; ++i) loss[z(i)] = std::log(se[z(i)]) + mx[z(i)] - tg[z(i)];
  if (dl) {
    dl->clear();
    Tensor sum_exp = from_f64(se, {n}, sd), g = from_f64(grad, {n}, sd);
    for (const Slice& s : slices) {
      Tensor d = Tensor::empty(s.logits.shape(), s.logits.dtype());
      ops::xent_bwd(s.logits, labels, s.start, row_max, sum_exp, g, d);
      dl->push_back(d);
    }
  }
  return loss;
}

// Columns [c0, c0 + w) of a row-major (n, V) f64 vector.
std::vector<double> cols(const std::vector<double>& a, int64_t n, int64_t V, int64_t c0, int64_t w) {
  std::vector<double> o;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < w; ++c) o.push_back(a[z(i * V + c0 + c)]);
  return o;
}

}  // namespace

// =============================================================================================
TEST(NormFwd, MatchesF64ReferenceForBothKindsAndDtypes) {
  const int64_t rows = 13, D = 40;
  const double eps = 1e-5;
  struct Case {
    DType dt;
    double atol, rtol;  // of y; statistics separately below
  };
  // f64: rounding of D-term sums; f32: f32 sums of 40 terms (~1e-6 relative); bf16: one rounding
  // of y to bf16 (2^-9 relative) on top of f32 compute.
  for (Case k : {Case{DType::f64, 1e-13, 1e-13}, Case{DType::f32, 1e-5, 1e-5}, Case{DType::bf16, 1e-2, 8e-3}}) {
    for (const NormCase& c : kNormCases) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(k.dt));
      // An offset of 1.5 so LayerNorm's mean matters.
      std::vector<double> xv = to_f64(randn({rows, D}, DType::f64, 1, 2.0));
      for (double& e : xv) e += 1.5;
      Tensor x = from_f64(xv, {rows, D}, k.dt);
      Tensor w = ops::cast(moe::test::uniform({D}, DType::f64, 2, 0.5, 1.5), k.dt);
      Tensor b = randn({D}, k.dt, 3);
      NormOut o = run_norm(c.kind, eps, x, w, c.bias ? &b : nullptr);
      std::vector<double> bv = to_f64(b);
      NormRef r = norm_ref(c.kind, to_f64(x), to_f64(w), c.bias ? &bv : nullptr, rows, D, eps);
      EXPECT_EQ(o.rstd.dtype(), k.dt == DType::f64 ? DType::f64 : DType::f32);
      EXPECT_TRUE(all_close(to_f64(o.y), r.y, k.atol, k.rtol));
      // Statistics stay in f32 for bf16 data: f32 accuracy.
      const double st = k.dt == DType::f64 ? 1e-13 : 1e-5;
      EXPECT_TRUE(all_close(to_f64(o.rstd), r.rstd, st, st));
      if (c.kind == NormKind::layer) {
        EXPECT_TRUE(all_close(to_f64(o.mean), r.mean, st, st));
      }
      // In place (y = x) gives the same bits.
      Tensor xi = x.clone();
      Tensor mean2 = Tensor::empty({rows}, ops::stat_dtype_for(k.dt)),
             rstd2 = Tensor::empty({rows}, ops::stat_dtype_for(k.dt));
      ops::norm_fwd(c.kind, eps, xi, w, c.bias ? &b : nullptr, xi, c.kind == NormKind::layer ? &mean2 : nullptr, rstd2);
      EXPECT_TRUE(bit_equal(xi, o.y));
      EXPECT_TRUE(bit_equal(rstd2, o.rstd));
    }
  }
}

TEST(NormFwd, KnownValuesAndEps) {
  // x = (3, 4): RMS = sqrt(12.5); LayerNorm: mean 3.5, var 0.25 → (−1, 1).
  Tensor x = from_f64({3.0, 4.0}, {1, 2}), w = from_f64({1.0, 2.0}, {2}), b = from_f64({0.5, -0.5}, {2});
  NormOut r = run_norm(NormKind::rms, 0.0, x, w, nullptr);
  EXPECT_NEAR(to_f64(r.y)[0], 3.0 / std::sqrt(12.5), 1e-15);
  EXPECT_NEAR(to_f64(r.y)[1], 8.0 / std::sqrt(12.5), 1e-15);
  NormOut l = run_norm(NormKind::layer, 0.0, x, w, &b);
  EXPECT_NEAR(to_f64(l.y)[0], -0.5, 1e-15);
  EXPECT_NEAR(to_f64(l.y)[1], 1.5, 1e-15);
  EXPECT_EQ(to_f64(l.mean)[0], 3.5);
  EXPECT_EQ(to_f64(l.rstd)[0], 2.0);
  // eps enters under the square root: a constant row with eps = 0.25 gives rstd = 2 (layer).
  Tensor c = from_f64({7.0, 7.0, 7.0}, {1, 3}), w3 = from_f64({1.0, 1.0, 1.0}, {3});
  EXPECT_EQ(to_f64(run_norm(NormKind::layer, 0.25, c, w3, nullptr).rstd)[0], 2.0);
  EXPECT_EQ(to_f64(run_norm(NormKind::rms, 0.25, from_f64({0.0, 0.0, 0.0}, {1, 3}), w3, nullptr).rstd)[0], 2.0);
}

TEST(NormBwd, FiniteDifferencesInF64ForInputWeightAndBias) {
  const int64_t rows = 5, D = 7;
  for (const NormCase& c : kNormCases) {
    SCOPED_TRACE(c.name);
    Tensor x = randn({rows, D}, DType::f64, 10, 1.5);
    Tensor w = moe::test::uniform({D}, DType::f64, 11, 0.5, 1.5);
    Tensor b = randn({D}, DType::f64, 12);
    Tensor G = randn({rows, D}, DType::f64, 13);  // loss = Σ y·G, so dy = G
    const double eps = 1e-3;
    auto loss = [&] {
      std::vector<double> y = to_f64(run_norm(c.kind, eps, x, w, c.bias ? &b : nullptr).y), g = to_f64(G);
      double l = 0;
      for (size_t i = 0; i < y.size(); ++i) l += y[i] * g[i];
      return l;
    };
    NormOut o = run_norm(c.kind, eps, x, w, c.bias ? &b : nullptr);
    Tensor dx = Tensor::empty({rows, D}, DType::f64), dw = Tensor::zeros({D}, DType::f64),
           db = Tensor::zeros({D}, DType::f64);
    const bool layer = c.kind == NormKind::layer;
    ops::norm_bwd(c.kind, x, w, layer ? &o.mean : nullptr, o.rstd, G, dx, dw, layer ? &db : nullptr);
    EXPECT_TRUE(check_grad(loss, x, dx, 1e-6, 1e-7)) << "dx";
    EXPECT_TRUE(check_grad(loss, w, dw, 1e-6, 1e-7)) << "dweight";
    if (c.bias) {
      EXPECT_TRUE(check_grad(loss, b, db, 1e-6, 1e-7)) << "dbias";
    }
    if (layer && !c.bias) {  // dbias = Σ_r dy without a forward bias too
      std::vector<double> g = to_f64(G), want(z(D), 0.0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) want[z(d)] += g[z(r * D + d)];
      EXPECT_TRUE(all_close(to_f64(db), want, 1e-14, 1e-14));
    }
    // dweight / dbias accumulate; dx is overwritten; dx may be dy.
    Tensor dw2 = dw.clone(), db2 = db.clone(), dyx = G.clone();
    ops::norm_bwd(c.kind, x, w, layer ? &o.mean : nullptr, o.rstd, dyx, dyx, dw2, layer ? &db2 : nullptr);
    EXPECT_TRUE(bit_equal(dyx, dx));
    std::vector<double> twice = to_f64(dw);
    for (double& e : twice) e *= 2.0;
    EXPECT_TRUE(all_close(to_f64(dw2), twice, 1e-14, 1e-14));
  }
}

TEST(NormBwd, LowPrecisionMatchesF64) {
  const int64_t rows = 33, D = 48;
  for (const NormCase& c : kNormCases) {
    const bool layer = c.kind == NormKind::layer;
    Tensor x64 = randn({rows, D}, DType::f64, 20, 2.0), w64 = moe::test::uniform({D}, DType::f64, 21, 0.5, 1.5);
    Tensor dy64 = randn({rows, D}, DType::f64, 22), b64 = randn({D}, DType::f64, 23);
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt));
      // The same rounded values in both precisions, so only compute rounding differs.
      Tensor x = ops::cast(x64, dt), w = ops::cast(w64, dt), dy = ops::cast(dy64, dt), b = ops::cast(b64, dt);
      Tensor xr = ops::cast(x, DType::f64), wr = ops::cast(w, DType::f64), dyr = ops::cast(dy, DType::f64),
             br = ops::cast(b, DType::f64);
      NormOut o = run_norm(c.kind, 1e-5, x, w, c.bias ? &b : nullptr);
      NormOut orr = run_norm(c.kind, 1e-5, xr, wr, c.bias ? &br : nullptr);
      Tensor dx = Tensor::empty(x.shape(), dt), dw = Tensor::zeros({D}, dt), db = Tensor::zeros({D}, dt);
      Tensor dxr = Tensor::empty(x.shape(), DType::f64), dwr = Tensor::zeros({D}, DType::f64),
             dbr = Tensor::zeros({D}, DType::f64);
      ops::norm_bwd(c.kind, x, w, layer ? &o.mean : nullptr, o.rstd, dy, dx, dw, layer ? &db : nullptr);
      ops::norm_bwd(c.kind, xr, wr, layer ? &orr.mean : nullptr, orr.rstd, dyr, dxr, dwr, layer ? &dbr : nullptr);
      // f32: 48-term f32 sums (row) and 33-term sums (dweight); bf16: one rounding of each output
      // to bf16 (2^-9 relative) after f32 compute; dweight's entries reach ~10.
      const double tol = dt == DType::f32 ? 2e-5 : 8e-3, atol = dt == DType::f32 ? 2e-5 : 2e-2;
      EXPECT_TRUE(all_close(o.y, orr.y, atol, tol)) << "y";
      EXPECT_TRUE(all_close(dx, dxr, atol, tol)) << "dx";
      EXPECT_TRUE(all_close(dw, dwr, atol, tol)) << "dweight";
      if (layer) {
        EXPECT_TRUE(all_close(db, dbr, atol, tol)) << "dbias";
      }
    }
  }
}

TEST(NormBwd, ParameterGradientsDoNotDependOnTheThreadCount) {
  const int64_t rows = 517, D = 150;  // rows·D well above the parallel threshold; D not a multiple of 64
  for (const NormCase& c : kNormCases) {
    const bool layer = c.kind == NormKind::layer;
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt));
      Tensor x = randn({rows, D}, dt, 30), w = randn({D}, dt, 31), dy = randn({rows, D}, dt, 32),
             b = randn({D}, dt, 33);
      Tensor dw0 = randn({D}, dt, 34), db0 = randn({D}, dt, 35);  // accumulate onto non-zero values
      NormOut o = run_norm(c.kind, 1e-5, x, w, c.bias ? &b : nullptr);
      std::vector<Tensor> dx, dw, db;
      for (int t : {1, 2, 3, 4}) {
        with_threads(t, [&] {
          dx.push_back(Tensor::empty(x.shape(), dt));
          dw.push_back(dw0.clone());
          db.push_back(db0.clone());
          ops::norm_bwd(c.kind, x, w, layer ? &o.mean : nullptr, o.rstd, dy, dx.back(), dw.back(),
                        layer ? &db.back() : nullptr);
        });
      }
      for (size_t i = 1; i < dx.size(); ++i) {
        EXPECT_TRUE(bit_equal(dx[i], dx[0])) << i + 1 << " threads";
        EXPECT_TRUE(bit_equal(dw[i], dw[0])) << i + 1 << " threads";
        EXPECT_TRUE(bit_equal(db[i], db[0])) << i + 1 << " threads";
      }
    }
  }
  // f64: dweight is exactly the row-order sum dweight0 + Σ_r dy·x̂ (x̂ = x·rstd for rms).
  Tensor x = randn({rows, D}, DType::f64, 36), w = randn({D}, DType::f64, 37), dy = randn({rows, D}, DType::f64, 38);
  Tensor dw0 = randn({D}, DType::f64, 39);
  NormOut o = run_norm(NormKind::rms, 1e-5, x, w, nullptr);
  Tensor dx = Tensor::empty(x.shape(), DType::f64), dw = dw0.clone();
  with_threads(3, [&] { ops::norm_bwd(NormKind::rms, x, w, nullptr, o.rstd, dy, dx, dw, nullptr); });
  std::vector<double> xv = to_f64(x), dyv = to_f64(dy), rs = to_f64(o.rstd), want = to_f64(dw0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const double xh = xv[z(r * D + d)] * rs[z(r)];
      want[z(d)] += dyv[z(r * D + d)] * xh;
    }
  EXPECT_EQ(to_f64(dw), want);
}

// =============================================================================================
TEST(Rope, MatchesF64ReferenceWithPartialRotaryAndEveryDtype) {
  const int64_t B = 2, heads = 3;
  const std::vector<int64_t> pos = {0, 3, 7, 100, 2};
  const int64_t S = static_cast<int64_t>(pos.size());
  struct Dims {
    int64_t hd, rd;  // rotary_percent = rd / hd
  };
  struct Case {
    DType dt;
    double atol, rtol;
  };
  // f64: libm cos/sin; f32: the angle is rounded to f32 before cos / sin (positions up to 100:
  // up to 4e-6 rad) times |x| <= ~4; bf16: one rounding of the output (2^-9 relative).
  for (Dims dm : {Dims{16, 16}, Dims{16, 8}, Dims{10, 6}, Dims{8, 0}}) {
    for (Case k : {Case{DType::f64, 1e-13, 1e-13}, Case{DType::f32, 3e-5, 1e-5}, Case{DType::bf16, 2e-2, 8e-3}}) {
      for (bool inverse : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(k.dt)) + " hd=" + std::to_string(dm.hd) + " rd=" + std::to_string(dm.rd) +
                     (inverse ? " inverse" : ""));
        Tensor x = randn({S, B, heads, dm.hd}, k.dt, 40);
        std::vector<double> xv = to_f64(x);
        Tensor y = run_rope(pos, dm.rd, inverse, x);
        EXPECT_TRUE(all_close(to_f64(y), rope_ref(xv, pos, B, heads, dm.hd, dm.rd, 10000.0, inverse), k.atol, k.rtol));
        // Dims past rd pass through bit for bit.
        std::vector<double> yv = to_f64(y);
        for (int64_t h = 0; h < S * B * heads; ++h)
          for (int64_t d = dm.rd; d < dm.hd; ++d) ASSERT_EQ(yv[z(h * dm.hd + d)], xv[z(h * dm.hd + d)]);
        // In place gives the same bits.
        Tensor xi = x.clone();
        ops::rope(i64(pos), dm.rd, 10000.0, inverse, xi, xi);
        EXPECT_TRUE(bit_equal(xi, y));
      }
    }
  }
  // Another base, and position 0 is the identity.
  Tensor x = randn({S, B, heads, 12}, DType::f64, 41);
  EXPECT_TRUE(all_close(to_f64(run_rope(pos, 12, false, x, 500.0)),
                        rope_ref(to_f64(x), pos, B, heads, 12, 12, 500.0, false), 1e-13, 1e-13));
  Tensor x0 = randn({1, B, heads, 12}, DType::f32, 42);
  EXPECT_TRUE(bit_equal(run_rope({0}, 12, false, x0), x0));
}

TEST(Rope, LongSequenceOnSeveralThreads) {
  // Enough positions that the cos / sin table and the head loop run on several threads.
  const int64_t S = 700;
  std::vector<int64_t> pos(z(S));
  for (int64_t s = 0; s < S; ++s) pos[z(s)] = 3 * s + 1;
  Tensor x = randn({S, 2, 2, 12}, DType::f64, 45);
  Tensor y1 = run_rope(pos, 8, false, x), y3;
  with_threads(3, [&] { y3 = run_rope(pos, 8, false, x); });
  EXPECT_TRUE(bit_equal(y1, y3));
  EXPECT_TRUE(all_close(to_f64(y3), rope_ref(to_f64(x), pos, 2, 2, 12, 8, 10000.0, false), 1e-12, 1e-12));
}

TEST(Rope, InverseUndoesTheForward) {
  const std::vector<int64_t> pos = {5, 0, 1234, 17};
  Tensor x = randn({4, 3, 2, 16}, DType::f64, 50);
  Tensor back = run_rope(pos, 12, true, run_rope(pos, 12, false, x));
  EXPECT_TRUE(all_close(back, x, 1e-14, 1e-14));
  Tensor x32 = randn({4, 3, 2, 16}, DType::f32, 51);
  // f32: two rotations, each with a few ulps of rounding.
  EXPECT_TRUE(all_close(run_rope(pos, 16, false, run_rope(pos, 16, true, x32)), x32, 2e-6, 2e-6));
}

TEST(Rope, BackwardIsTheInverseByFiniteDifferences) {
  const std::vector<int64_t> pos = {3, 1, 40};
  for (int64_t rd : {8, 4}) {
    Tensor x = randn({3, 2, 2, 8}, DType::f64, 60), G = randn({3, 2, 2, 8}, DType::f64, 61);
    auto loss = [&] {
      std::vector<double> y = to_f64(run_rope(pos, rd, false, x)), g = to_f64(G);
      double l = 0;
      for (size_t i = 0; i < y.size(); ++i) l += y[i] * g[i];
      return l;
    };
    Tensor dx = run_rope(pos, rd, true, G);  // the backward: the transposed rotation applied to dy
    EXPECT_TRUE(check_grad(loss, x, dx, 1e-6, 1e-8)) << "rd " << rd;
  }
}

// =============================================================================================
TEST(Embedding, VocabSliceForwardAndBackward) {
  const int64_t V = 7, H = 6, start = 5;  // this rank holds ids [5, 12)
  const std::vector<int64_t> ids = {5, 0, 11, 8, 12, 8, 4, 30, 8, 6, 11};
  const int64_t n = static_cast<int64_t>(ids.size());
  auto in_slice = [&](int64_t id) { return id >= start && id < start + V; };
  struct Case {
    DType dt;
    double tol;  // sums: f64 exact order; f32 / bf16: f32 adds, bf16 one final rounding
  };
  for (Case k : {Case{DType::f64, 1e-15}, Case{DType::f32, 1e-6}, Case{DType::bf16, 8e-3}}) {
    SCOPED_TRACE(dtype_name(k.dt));
    Tensor table = randn({V, H}, k.dt, 70);
    Tensor out = Tensor::empty({n, H}, k.dt);
    ops::embedding_fwd(i64(ids), table, start, out, false);
    std::vector<double> tv = to_f64(table), ov = to_f64(out);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h)
        ASSERT_EQ(ov[z(i * H + h)], in_slice(ids[z(i)]) ? tv[z((ids[z(i)] - start) * H + h)] : 0.0) << i << "," << h;
    // accumulate adds the rows and leaves the out-of-slice rows untouched.
    Tensor base = randn({n, H}, k.dt, 71), acc = base.clone();
    ops::embedding_fwd(i64(ids), table, start, acc, true);
    std::vector<double> bv = to_f64(base), av = to_f64(acc), want = bv;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) {
        if (in_slice(ids[z(i)])) {
          want[z(i * H + h)] += tv[z((ids[z(i)] - start) * H + h)];
        } else {
          ASSERT_EQ(av[z(i * H + h)], bv[z(i * H + h)]);
        }
      }
    EXPECT_TRUE(all_close(av, want, k.tol, k.tol));
    // Backward: the slice's rows gain the dout rows of their ids (8 three times, 11 twice); other
    // rows keep their bits; ids outside the slice contribute nothing.
    Tensor dout = randn({n, H}, k.dt, 72), dt0 = randn({V, H}, k.dt, 73), dtable = dt0.clone();
    ops::embedding_bwd(i64(ids), dout, start, dtable);
    std::vector<double> dv = to_f64(dout), d0 = to_f64(dt0), got = to_f64(dtable), exp = d0;
    std::vector<bool> hit(z(V), false);
    for (int64_t i = 0; i < n; ++i)
      if (in_slice(ids[z(i)])) {
        hit[z(ids[z(i)] - start)] = true;
        for (int64_t h = 0; h < H; ++h) exp[z((ids[z(i)] - start) * H + h)] += dv[z(i * H + h)];
      }
    EXPECT_TRUE(all_close(got, exp, k.tol, k.tol));
    for (int64_t v = 0; v < V; ++v)
      if (!hit[z(v)]) {
        for (int64_t h = 0; h < H; ++h) ASSERT_EQ(got[z(v * H + h)], d0[z(v * H + h)]) << "row " << v;
      }
  }
}

TEST(Embedding, BackwardDoesNotDependOnTheThreadCount) {
  const int64_t n = 3000, V = 40, H = 64, start = 20;
  std::vector<int64_t> ids(z(n));
  for (int64_t i = 0; i < n; ++i) ids[z(i)] = (i * 7919 + i / 3) % 90;  // about half in [20, 60), many repeats
  for (DType dt : {DType::f32, DType::bf16, DType::f64}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor dout = randn({n, H}, dt, 80), d0 = randn({V, H}, dt, 81);
    std::vector<Tensor> res;
    for (int t : {1, 2, 3, 4})
      with_threads(t, [&] {
        res.push_back(d0.clone());
        ops::embedding_bwd(i64(ids), dout, start, res.back());
      });
    for (size_t i = 1; i < res.size(); ++i) EXPECT_TRUE(bit_equal(res[i], res[0])) << i + 1 << " threads";
    if (dt == DType::f64) {  // and it is the sum in token order
      std::vector<double> want = to_f64(d0), dv = to_f64(dout);
      for (int64_t i = 0; i < n; ++i)
        if (ids[z(i)] >= start && ids[z(i)] < start + V)
          for (int64_t h = 0; h < H; ++h) want[z((ids[z(i)] - start) * H + h)] += dv[z(i * H + h)];
      EXPECT_EQ(to_f64(res[0]), want);
    }
  }
}

// =============================================================================================
TEST(Xent, SplitVocabularyEqualsFullCrossEntropy) {
  const int64_t n = 6, V = 11, V0 = 5;  // slices [0, 5) and [5, 11)
  const std::vector<int64_t> labels = {0, 4, 5, 10, 7, 2};
  const std::vector<double> grad = {1.0, 0.5, -2.0, 0.25, 1.5, 3.0};
  struct Case {
    DType dt;
    double loss_tol, grad_atol, grad_rtol;
  };
  // f64: libm exp/log; f32: f32 exp and sums of 11 terms; bf16: the logits are bf16 but every
  // statistic is f32 (loss as f32), dlogits rounded once to bf16 (2^-9 relative, |dl| <= 3).
  for (Case k : {Case{DType::f64, 1e-13, 1e-14, 1e-13}, Case{DType::f32, 1e-5, 1e-6, 1e-5},
                 Case{DType::bf16, 1e-5, 4e-3, 8e-3}}) {
    SCOPED_TRACE(dtype_name(k.dt));
    Tensor full = randn({n, V}, k.dt, 90, 3.0);
    std::vector<double> lv = to_f64(full);
    std::vector<double> loss_ref, dl_ref;
    xent_ref(lv, labels, grad, n, V, loss_ref, dl_ref);
    Tensor l0 = from_f64(cols(lv, n, V, 0, V0), {n, V0}, k.dt),
           l1 = from_f64(cols(lv, n, V, V0, V - V0), {n, V - V0}, k.dt);
    std::vector<Tensor> dl;
    std::vector<double> loss = xent_split({{l0, 0}, {l1, V0}}, i64(labels), grad, &dl);
    EXPECT_TRUE(all_close(loss, loss_ref, k.loss_tol, k.loss_tol)) << "loss";
    EXPECT_TRUE(all_close(to_f64(dl[0]), cols(dl_ref, n, V, 0, V0), k.grad_atol, k.grad_rtol)) << "dlogits slice 0";
    EXPECT_TRUE(all_close(to_f64(dl[1]), cols(dl_ref, n, V, V0, V - V0), k.grad_atol, k.grad_rtol))
        << "dlogits slice 1";
    // One slice holding the whole vocabulary agrees too.
    std::vector<Tensor> dlf;
    EXPECT_TRUE(all_close(xent_split({{full, 0}}, i64(labels), grad, &dlf), loss_ref, k.loss_tol, k.loss_tol));
    EXPECT_TRUE(all_close(to_f64(dlf[0]), dl_ref, k.grad_atol, k.grad_rtol));
    // target is 0 for labels outside the slice; dlogits may overwrite the logits.
    const DType sd = ops::stat_dtype_for(k.dt);
    Tensor m = Tensor::empty({n}, sd), se = Tensor::empty({n}, sd), tg = Tensor::empty({n}, sd);
    ops::xent_max(l1, m);
    ops::xent_sum(l1, i64(labels), V0, m, se, tg);
    std::vector<double> tv = to_f64(tg), l1v = to_f64(l1);
    for (int64_t i = 0; i < n; ++i)
      EXPECT_EQ(tv[z(i)], labels[z(i)] >= V0 ? l1v[z(i * (V - V0) + labels[z(i)] - V0)] : 0.0) << i;
    Tensor g = from_f64(grad, {n}, sd), out = Tensor::empty(l1.shape(), k.dt), inplace = l1.clone();
    ops::xent_bwd(l1, i64(labels), V0, m, se, g, out);
    ops::xent_bwd(inplace, i64(labels), V0, m, se, g, inplace);
    EXPECT_TRUE(bit_equal(inplace, out));
  }
}

// Rows long enough for the vectorised f32 / bf16 path (16 lanes, then a tail): whole vectors,
// a tail, and the label in either, against the f64 reference; in place equals out of place.
TEST(Xent, LongRowsMatchF64ReferenceInBodyAndTail) {
  for (int64_t V : {16, 53, 16 * 64 + 7}) {
    const int64_t n = 5;
    const std::vector<int64_t> labels = {0, 15, V - 1, V / 2, 16 % V};
    const std::vector<double> grad = {1.0, -0.5, 2.0, 0.25, 1.5};
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " V=" + std::to_string(V));
      Tensor l = randn({n, V}, dt, 110 + V, 3.0);
      std::vector<double> loss_ref, dl_ref;
      xent_ref(to_f64(l), labels, grad, n, V, loss_ref, dl_ref);
      std::vector<Tensor> dl;
      std::vector<double> loss = xent_split({{l, 0}}, i64(labels), grad, &dl);
      // f32 statistics either way (sums of up to 1031 terms, exp within 2 ulp); bf16 dlogits
      // rounded once (2^-9 relative, |dl| <= 2).
      EXPECT_TRUE(all_close(loss, loss_ref, 2e-5, 2e-5)) << "loss";
      EXPECT_TRUE(all_close(to_f64(dl[0]), dl_ref, dt == DType::f32 ? 1e-6 : 4e-3, dt == DType::f32 ? 1e-5 : 8e-3))
          << "dlogits";
      const DType sd = ops::stat_dtype_for(dt);
      Tensor m = Tensor::empty({n}, sd), se = Tensor::empty({n}, sd), tg = Tensor::empty({n}, sd);
      ops::xent_max(l, m);
      ops::xent_sum(l, i64(labels), 0, m, se, tg);
      Tensor g = from_f64(grad, {n}, sd), out = Tensor::empty(l.shape(), dt), inplace = l.clone();
      ops::xent_bwd(l, i64(labels), 0, m, se, g, out);
      ops::xent_bwd(inplace, i64(labels), 0, m, se, g, inplace);
      EXPECT_TRUE(bit_equal(inplace, out));
    }
  }
}

TEST(Xent, BackwardByFiniteDifferencesAcrossTwoSlices) {
  const int64_t n = 4, V0 = 3, V1 = 5;
  const std::vector<int64_t> labels = {1, 3, 7, 4};  // two in each slice
  const std::vector<double> grad = {1.0, -0.5, 2.0, 0.75};
  Tensor l0 = randn({n, V0}, DType::f64, 100, 2.0), l1 = randn({n, V1}, DType::f64, 101, 2.0);
  auto loss = [&] {
    std::vector<double> li = xent_split({{l0, 0}, {l1, V0}}, i64(labels), grad, nullptr);
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += grad[z(i)] * li[z(i)];
    return s;
  };
  std::vector<Tensor> dl;
  xent_split({{l0, 0}, {l1, V0}}, i64(labels), grad, &dl);
  EXPECT_TRUE(check_grad(loss, l0, dl[0], 1e-6, 1e-7)) << "slice 0";
  EXPECT_TRUE(check_grad(loss, l1, dl[1], 1e-6, 1e-7)) << "slice 1";
}

TEST(Xent, LargeLogitsStayFinite) {
  // exp is taken after subtracting the row max: logits of 1e4 do not overflow.
  Tensor l = from_f64({1e4, 1e4 - 1.0, -1e4}, {1, 3}, DType::f32);
  std::vector<Tensor> dl;
  std::vector<double> loss = xent_split({{l, 0}}, i64({1}), {1.0}, &dl);
  EXPECT_NEAR(loss[0], 1.0 + std::log1p(std::exp(-1.0)), 1e-5);
  for (double v : to_f64(dl[0])) EXPECT_TRUE(std::isfinite(v));
}

// =============================================================================================
TEST(Qkv, SplitLayoutAndMergeRoundTripBitExact) {
  struct Case {
    int64_t rows, ng, qpg, hd;
  };
  for (DType dt : {DType::f32, DType::bf16, DType::f64})
    for (Case c : {Case{3, 2, 3, 4}, Case{2, 1, 1, 5}, Case{4, 4, 2, 2}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " ng=" + std::to_string(c.ng) + " qpg=" + std::to_string(c.qpg));
      const int64_t W = c.ng * (c.qpg + 2) * c.hd;
      std::vector<double> vals(z(c.rows * W));
      for (size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<double>(i + 1);  // distinct, exact in bf16 (< 256)
      Tensor qkv = from_f64(vals, {c.rows, W}, dt);
      Tensor q = Tensor::empty({c.rows, c.ng * c.qpg, c.hd}, dt), k = Tensor::empty({c.rows, c.ng, c.hd}, dt),
             v = Tensor::empty({c.rows, c.ng, c.hd}, dt);
      ops::qkv_split(qkv, c.ng, c.qpg, q, k, v);
      std::vector<double> qv = to_f64(q), kv = to_f64(k), vv = to_f64(v);
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t g = 0; g < c.ng; ++g) {
          const int64_t blk = r * W + g * (c.qpg + 2) * c.hd;  // this group's [q.. | k | v] block
          for (int64_t d = 0; d < c.hd; ++d) {
            for (int64_t j = 0; j < c.qpg; ++j)
              ASSERT_EQ(qv[z(((r * c.ng * c.qpg) + g * c.qpg + j) * c.hd + d)], vals[z(blk + j * c.hd + d)]);
            ASSERT_EQ(kv[z((r * c.ng + g) * c.hd + d)], vals[z(blk + c.qpg * c.hd + d)]);
            ASSERT_EQ(vv[z((r * c.ng + g) * c.hd + d)], vals[z(blk + (c.qpg + 1) * c.hd + d)]);
          }
        }
      Tensor back = Tensor::zeros({c.rows, W}, dt);
      ops::qkv_merge(q, k, v, c.ng, c.qpg, back);
      EXPECT_TRUE(bit_equal(back, qkv));
    }
  // Arbitrary bits (random values) survive the round trip.
  Tensor qkv = randn({7, 3 * 6 * 8}, DType::bf16, 110);
  Tensor q = Tensor::empty({7, 12, 8}, DType::bf16), k = Tensor::empty({7, 3, 8}, DType::bf16),
         v = Tensor::empty({7, 3, 8}, DType::bf16), back = Tensor::empty(qkv.shape(), DType::bf16);
  ops::qkv_split(qkv, 3, 4, q, k, v);
  ops::qkv_merge(q, k, v, 3, 4, back);
  EXPECT_TRUE(bit_equal(back, qkv));
}

// =============================================================================================
TEST(ModelOps, ZeroRows) {
  Tensor x = Tensor::empty({0, 8}, DType::f32), w = randn({8}, DType::f32, 1);
  NormOut o = run_norm(NormKind::layer, 1e-5, x, w, nullptr);
  Tensor dw = Tensor::zeros({8}, DType::f32), dx = Tensor::empty({0, 8}, DType::f32);
  ops::norm_bwd(NormKind::layer, x, w, &o.mean, o.rstd, x, dx, dw, nullptr);
  EXPECT_EQ(to_f64(dw), std::vector<double>(8, 0.0));
  Tensor r = Tensor::empty({0, 2, 2, 4}, DType::f32);
  ops::rope(Tensor::empty({0}, DType::i64), 4, 10000.0, false, r, r);
  Tensor table = randn({4, 3}, DType::f32, 2), out = Tensor::empty({0, 3}, DType::f32);
  ops::embedding_fwd(Tensor::empty({0}, DType::i64), table, 0, out, false);
  ops::embedding_bwd(Tensor::empty({0}, DType::i64), out, 0, table);
  Tensor l = Tensor::empty({0, 5}, DType::f32), m = Tensor::empty({0}, DType::f32);
  ops::xent_max(l, m);
  Tensor qkv = Tensor::empty({0, 12}, DType::f32), q = Tensor::empty({0, 1, 4}, DType::f32);
  Tensor k = Tensor::empty({0, 1, 4}, DType::f32), v = Tensor::empty({0, 1, 4}, DType::f32);
  ops::qkv_split(qkv, 1, 1, q, k, v);
}

TEST(ModelOps, WrapperErrorsNameTheProblem) {
  const int64_t rows = 3, D = 8;
  Tensor x = randn({rows, D}, DType::f32, 1), w = randn({D}, DType::f32, 2), b = randn({D}, DType::f32, 3);
  Tensor y = Tensor::empty({rows, D}, DType::f32), mean = Tensor::empty({rows}, DType::f32),
         rstd = Tensor::empty({rows}, DType::f32);
  // norm_fwd
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, w, &b, y, nullptr, rstd); }, "only allowed with LayerNorm");
  expect_error([&] { ops::norm_fwd(NormKind::layer, 1e-5, x, w, &b, y, nullptr, rstd); }, "needs a 'mean'");
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, w, nullptr, y, &mean, rstd); },
               "'mean' is only written by LayerNorm");
  Tensor rstd64 = Tensor::empty({rows}, DType::f64);
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, w, nullptr, y, nullptr, rstd64); }, "stat dtype f32");
  Tensor xb = randn({rows, D}, DType::bf16, 4), wb = randn({D}, DType::bf16, 5),
         yb = Tensor::empty({rows, D}, DType::bf16);
  Tensor rstdb = Tensor::empty({rows}, DType::bf16);
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, xb, wb, nullptr, yb, nullptr, rstdb); },
               "'rstd' must be in the stat dtype f32 (for bf16 data)");
  Tensor w7 = randn({7}, DType::f32, 6);
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, w7, nullptr, y, nullptr, rstd); },
               "'weight' must have shape (8,)");
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, wb, nullptr, y, nullptr, rstd); }, "'weight' must be f32");
  Tensor rstd2 = Tensor::empty({2}, DType::f32);
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x, w, nullptr, y, nullptr, rstd2); },
               "'rstd' must have shape (3,)");
  Tensor x3 = randn({1, rows, D}, DType::f32, 7);
  expect_error([&] { ops::norm_fwd(NormKind::rms, 1e-5, x3, w, nullptr, y, nullptr, rstd); }, "must be 2-D");
  expect_error([&] { ops::norm_fwd(NormKind::rms, -1.0, x, w, nullptr, y, nullptr, rstd); }, "eps");
  // norm_bwd
  Tensor dx = Tensor::empty({rows, D}, DType::f32), dw = Tensor::zeros({D}, DType::f32),
         db = Tensor::zeros({D}, DType::f32);
  expect_error([&] { ops::norm_bwd(NormKind::rms, x, w, nullptr, rstd, y, dx, dw, &db); },
               "bias gradient is only allowed");
  expect_error([&] { ops::norm_bwd(NormKind::layer, x, w, nullptr, rstd, y, dx, dw, &db); },
               "needs the forward's 'mean'");
  Tensor dy_bad = Tensor::empty({rows, D + 1}, DType::f32);
  expect_error([&] { ops::norm_bwd(NormKind::rms, x, w, nullptr, rstd, dy_bad, dx, dw, nullptr); },
               "'dy' must have shape (3, 8)");
  // rope
  Tensor q = randn({2, 1, 2, 8}, DType::f32, 8), qo = Tensor::empty({2, 1, 2, 8}, DType::f32);
  Tensor pos = i64({0, 1});
  expect_error([&] { ops::rope(pos, 5, 10000.0, false, q, qo); }, "must be even");
  expect_error([&] { ops::rope(pos, 10, 10000.0, false, q, qo); }, "rd = 10");
  expect_error(
      [&] {
        ops::rope(Tensor::from_vector(std::vector<int32_t>{0, 1}, {2}), 8, 10000.0, false, q, qo);
      },
      "'positions' must be i64");
  expect_error([&] { ops::rope(i64({0, 1, 2}), 8, 10000.0, false, q, qo); }, "'positions' must have shape (2,)");
  expect_error([&] { ops::rope(pos, 8, 10000.0, false, x, y); }, "must be 4-D");
  expect_error([&] { ops::rope(pos, 8, 0.0, false, q, qo); }, "base");
  Tensor qo64 = Tensor::empty({2, 1, 2, 8}, DType::f64);
  expect_error([&] { ops::rope(pos, 8, 10000.0, false, q, qo64); }, "'y' must be f32");
  // embedding
  Tensor table = randn({5, 4}, DType::f32, 9), eo = Tensor::empty({2, 4}, DType::f32);
  expect_error(
      [&] {
        ops::embedding_fwd(Tensor::from_vector(std::vector<int32_t>{0, 1}, {2}), table, 0, eo, false);
      },
      "'ids' must be i64");
  Tensor eo_bad = Tensor::empty({2, 5}, DType::f32);
  expect_error([&] { ops::embedding_fwd(pos, table, 0, eo_bad, false); }, "'out' must have shape (2, 4)");
  expect_error([&] { ops::embedding_fwd(pos, table, -1, eo, false); }, "vocab_start");
  Tensor dtab_bf = Tensor::zeros({5, 4}, DType::bf16);
  expect_error([&] { ops::embedding_bwd(pos, eo, 0, dtab_bf); }, "'dout' must be bf16");
  // cross entropy
  Tensor l = randn({2, 5}, DType::f32, 10), m = Tensor::empty({2}, DType::f32), se = Tensor::empty({2}, DType::f32),
         tg = Tensor::empty({2}, DType::f32), g = Tensor::empty({2}, DType::f32);
  Tensor m64 = Tensor::empty({2}, DType::f64);
  expect_error([&] { ops::xent_max(l, m64); }, "'row_max' must be in the stat dtype f32");
  expect_error([&] { ops::xent_sum(l, i64({1}), 0, m, se, tg); }, "'labels' must have shape (2,)");
  expect_error([&] { ops::xent_sum(l, pos, -3, m, se, tg); }, "vocab_start");
  Tensor dl_bad = Tensor::empty({2, 5}, DType::f64);
  expect_error([&] { ops::xent_bwd(l, pos, 0, m, se, g, dl_bad); }, "'dlogits' must be f32");
  expect_error([&] { ops::xent_max(Tensor::empty({2, 0}, DType::f32), m); }, "at least one id");
  // qkv
  Tensor qkv = randn({2, 30}, DType::f32, 11), qq = Tensor::empty({2, 2, 5}, DType::f32),
         kk = Tensor::empty({2, 1, 5}, DType::f32), vv = Tensor::empty({2, 1, 5}, DType::f32);
  expect_error([&] { ops::qkv_split(qkv, 1, 5, qq, kk, vv); }, "is not ng");
  Tensor qq_bad = Tensor::empty({2, 3, 5}, DType::f32);
  expect_error([&] { ops::qkv_split(qkv, 2, 1, qq_bad, kk, vv); }, "'q' must have shape");
  expect_error([&] { ops::qkv_split(qkv, 0, 1, qq, kk, vv); }, "query groups");
  Tensor qkv64 = Tensor::empty({2, 20}, DType::f64);
  expect_error([&] { ops::qkv_merge(qq, kk, vv, 1, 2, qkv64); }, "'qkv' must be f32");
}
