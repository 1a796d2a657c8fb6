// Expert activations with the prob multiply (docs/moe.md): forward against an f64 reference for
// every activation with and without a GLU, in f32 / f64 / bf16 (and f16), backward by finite
// differences in f64 (din and drow_scale), and the error cases.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

using namespace moe;
using moe::test::expect_error;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::randn;
using moe::test::to_f64;

namespace {

struct Combo {
  const char* name;
  Activation act;
  bool glu;
};
// swiglu, geglu, reglu2 (relu² with a GLU), and the plain gelu / relu2 / silu.
const Combo kCombos[] = {{"swiglu", Activation::silu, true},  {"geglu", Activation::gelu, true},
                         {"reglu2", Activation::relu2, true}, {"gelu", Activation::gelu, false},
                         {"relu2", Activation::relu2, false}, {"silu", Activation::silu, false}};

double act_ref(Activation act, double x) {
  switch (act) {
    case Activation::silu: return x / (1.0 + std::exp(-x));
    case Activation::gelu: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::relu2: return x > 0 ? x * x : 0.0;
  }
  return 0;
}

// out (rows, F) in f64 from the input's values (after its rounding to the storage dtype).
std::vector<double> fwd_ref(const Combo& c, const Tensor& in, const Tensor* scale) {
  std::vector<double> x = to_f64(in), s = scale ? to_f64(*scale) : std::vector<double>();
  const int64_t rows = in.size(0), F = c.glu ? in.size(1) / 2 : in.size(1), W = in.size(1);
  std::vector<double> out(static_cast<size_t>(rows * F));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t f = 0; f < F; ++f) {
      double v = act_ref(c.act, x[static_cast<size_t>(r * W + f)]);
      if (c.glu) v *= x[static_cast<size_t>(r * W + F + f)];
      out[static_cast<size_t>(r * F + f)] = v * (scale ? s[static_cast<size_t>(r)] : 1.0);
    }
  return out;
}

Tensor run_fwd(const Combo& c, const Tensor& in, const Tensor* scale) {
  Tensor out = Tensor::empty({in.size(0), c.glu ? in.size(1) / 2 : in.size(1)}, in.dtype());
  ops::act_fwd(c.act, c.glu, in, scale, out);
  return out;
}

}  // namespace

TEST(ActFwd, MatchesF64ReferenceForEveryCombinationAndDtype) {
  const int64_t rows = 17, F = 12;
  struct Case {
    DType dt;
    double tol;  // f64: a few ulps of erf/exp; f32: compute rounding; bf16/f16: one output rounding
  };
  for (const Combo& c : kCombos) {
    for (Case k : {Case{DType::f64, 1e-13}, Case{DType::f32, 2e-6}, Case{DType::bf16, 8e-3}, Case{DType::f16, 1e-3}}) {
      for (DType sdt : {DType::f32, DType::f64}) {
        for (bool scaled : {false, true}) {
          Tensor in = randn({rows, c.glu ? 2 * F : F}, k.dt, 1, 2.0);
          Tensor s = moe::test::uniform({rows}, sdt, 2, 0.0, 1.0);
          Tensor out = run_fwd(c, in, scaled ? &s : nullptr);
          EXPECT_TRUE(all_close(to_f64(out), fwd_ref(c, in, scaled ? &s : nullptr), k.tol, k.tol))
              << c.name << " " << dtype_name(k.dt) << " scale " << (scaled ? dtype_name(sdt) : "none");
        }
      }
    }
  }
}

TEST(ActFwd, ExactValuesAtKnownPoints) {
  // gelu(1) = Φ(1) = 0.841344746..., silu(1) = σ(1) = 0.731058578..., relu2(-3) = 0, relu2(3) = 9.
  Tensor x = moe::test::from_f64({1.0, -3.0, 3.0, 0.0}, {1, 4});
  std::vector<double> g = to_f64(run_fwd({"gelu", Activation::gelu, false}, x, nullptr));
  std::vector<double> s = to_f64(run_fwd({"silu", Activation::silu, false}, x, nullptr));
  std::vector<double> r = to_f64(run_fwd({"relu2", Activation::relu2, false}, x, nullptr));
  EXPECT_NEAR(g[0], 0.8413447460685429, 1e-15);
  EXPECT_NEAR(s[0], 0.7310585786300049, 1e-15);
  EXPECT_EQ(r[1], 0.0);
  EXPECT_EQ(r[2], 9.0);
  EXPECT_EQ(g[3], 0.0);
  EXPECT_EQ(s[3], 0.0);
}

TEST(ActBwd, FiniteDifferencesInF64ForInputAndRowScale) {
  const int64_t rows = 6, F = 5;
  for (const Combo& c : kCombos) {
    Tensor in = randn({rows, c.glu ? 2 * F : F}, DType::f64, 10, 1.5);
    Tensor s = moe::test::uniform({rows}, DType::f64, 11, 0.2, 1.0);
    Tensor w = randn({rows, F}, DType::f64, 12);  // loss = Σ out·w, so dout = w
    auto loss = [&] {
      std::vector<double> o = to_f64(run_fwd(c, in, &s)), wv = to_f64(w);
      double l = 0;
      for (size_t i = 0; i < o.size(); ++i) l += o[i] * wv[i];
      return l;
    };
    Tensor din = Tensor::empty(in.shape(), DType::f64), ds = Tensor::empty({rows}, DType::f64);
    ops::act_bwd(c.act, c.glu, in, &s, w, din, &ds);
    EXPECT_TRUE(check_grad(loss, in, din, 1e-6, 1e-7)) << c.name << " din";
    EXPECT_TRUE(check_grad(loss, s, ds, 1e-6, 1e-7)) << c.name << " drow_scale";
    // Without a row scale the input gradient is the scale-1 one and drow_scale is Σ dout·act.
    Tensor ones = moe::test::from_f64(std::vector<double>(rows, 1.0), {rows});
    Tensor din1 = Tensor::empty(in.shape(), DType::f64), din_ones = Tensor::empty(in.shape(), DType::f64);
    Tensor ds1 = Tensor::empty({rows}, DType::f64), ds_ones = Tensor::empty({rows}, DType::f64);
    ops::act_bwd(c.act, c.glu, in, nullptr, w, din1, &ds1);
    ops::act_bwd(c.act, c.glu, in, &ones, w, din_ones, &ds_ones);
    EXPECT_TRUE(bit_equal(din1, din_ones)) << c.name;
    EXPECT_TRUE(bit_equal(ds1, ds_ones)) << c.name;
    // drow_scale is computed without dividing by s: s = 0 still gives Σ dout·act.
    Tensor zeros = Tensor::zeros({rows}, DType::f64), ds0 = Tensor::empty({rows}, DType::f64);
    ops::act_bwd(c.act, c.glu, in, &zeros, w, din1, &ds0);
    EXPECT_TRUE(all_close(ds0, ds1, 1e-14, 1e-14)) << c.name;
    EXPECT_EQ(to_f64(din1), std::vector<double>(static_cast<size_t>(in.numel()), 0.0)) << c.name;
  }
}

TEST(ActBwd, LowPrecisionMatchesF64Backward) {
  const int64_t rows = 9, F = 16;
  for (const Combo& c : kCombos) {
    Tensor in64 = randn({rows, c.glu ? 2 * F : F}, DType::f64, 20, 1.5);
    Tensor dout64 = randn({rows, F}, DType::f64, 21);
    Tensor s32 = moe::test::uniform({rows}, DType::f32, 22, 0.1, 1.0);
    for (DType dt : {DType::f32, DType::bf16}) {
      // Same (rounded) values in both precisions, so only compute rounding differs.
      Tensor in = ops::cast(in64, dt), dout = ops::cast(dout64, dt);
      Tensor in_r = ops::cast(in, DType::f64), dout_r = ops::cast(dout, DType::f64), s64 = ops::cast(s32, DType::f64);
      Tensor din = Tensor::empty(in.shape(), dt), ds = Tensor::empty({rows}, DType::f32);
      Tensor din_r = Tensor::empty(in.shape(), DType::f64), ds_r = Tensor::empty({rows}, DType::f64);
      ops::act_bwd(c.act, c.glu, in, &s32, dout, din, &ds);
      ops::act_bwd(c.act, c.glu, in_r, &s64, dout_r, din_r, &ds_r);
      // bf16: one rounding of each din element (2^-8 relative); drow_scale stays f32 (F-term sum).
      double tol = dt == DType::f32 ? 1e-5 : 8e-3;
      EXPECT_TRUE(all_close(din, din_r, tol, tol)) << c.name << " " << dtype_name(dt);
      EXPECT_TRUE(all_close(ds, ds_r, 1e-5, 1e-5)) << c.name << " " << dtype_name(dt);
    }
  }
}

TEST(Activation, ZeroRowsAndThreadCountInvariance) {
  for (const Combo& c : kCombos) {
    Tensor in = Tensor::empty({0, c.glu ? 8 : 4}, DType::f32), out = Tensor::empty({0, 4}, DType::f32);
    Tensor s = Tensor::empty({0}, DType::f32);
    ops::act_fwd(c.act, c.glu, in, &s, out);
    Tensor din = Tensor::empty(in.shape(), DType::f32), ds = Tensor::empty({0}, DType::f32);
    ops::act_bwd(c.act, c.glu, in, &s, out, din, &ds);
  }
  const int64_t rows = 700, F = 64;
  Combo c = kCombos[0];
  Tensor in = randn({rows, 2 * F}, DType::f32, 30), s = randn({rows}, DType::f32, 31), dout = randn({rows, F}, DType::f32, 32);
  Tensor out1 = run_fwd(c, in, &s), din1 = Tensor::empty(in.shape(), DType::f32), ds1 = Tensor::empty({rows}, DType::f32);
  ops::act_bwd(c.act, c.glu, in, &s, dout, din1, &ds1);
  Tensor out3, din3 = Tensor::empty(in.shape(), DType::f32), ds3 = Tensor::empty({rows}, DType::f32);
  cpu_set_num_threads(3);
  out3 = run_fwd(c, in, &s);
  ops::act_bwd(c.act, c.glu, in, &s, dout, din3, &ds3);
  cpu_set_num_threads(1);
  EXPECT_TRUE(bit_equal(out1, out3));
  EXPECT_TRUE(bit_equal(din1, din3));
  EXPECT_TRUE(bit_equal(ds1, ds3));
}

TEST(Activation, ErrorsNameTheProblem) {
  Tensor odd = randn({3, 5}, DType::f32, 1), out = Tensor::empty({3, 2}, DType::f32);
  expect_error([&] { ops::act_fwd(Activation::silu, true, odd, nullptr, out); }, "even width");
  Tensor in = randn({3, 8}, DType::f32, 2), bad_out = Tensor::empty({3, 8}, DType::f32);
  expect_error([&] { ops::act_fwd(Activation::silu, true, in, nullptr, bad_out); }, "act_fwd: out");
  Tensor s_bf = randn({3}, DType::bf16, 3), out4 = Tensor::empty({3, 4}, DType::f32);
  expect_error([&] { ops::act_fwd(Activation::gelu, true, in, &s_bf, out4); }, "row scale dtype");
  Tensor s_short = randn({2}, DType::f32, 4);
  expect_error([&] { ops::act_fwd(Activation::gelu, true, in, &s_short, out4); }, "row_scale");
  Tensor dout = randn({3, 4}, DType::f32, 5), din = Tensor::empty({3, 8}, DType::f32);
  Tensor s32 = randn({3}, DType::f32, 6), ds64 = Tensor::empty({3}, DType::f64);
  expect_error([&] { ops::act_bwd(Activation::gelu, true, in, &s32, dout, din, &ds64); }, "dtypes differ");
  Tensor dout_bad = randn({3, 8}, DType::f32, 7);
  expect_error([&] { ops::act_bwd(Activation::gelu, true, in, &s32, dout_bad, din, nullptr); }, "act_bwd: dout");
}
