// Grouped-GEMM experts and the shared expert (docs/moe.md): forward against a dense per-expert
// loop written here, every gradient by finite differences in f64, zero-row experts, ETP/EP shards
// against the unsharded module, saved-slot policies (bit-identical results, measured memory), the
// shared expert's TP path over an in-process two-rank communicator, and the error cases.
#include <gtest/gtest.h>

#include <barrier>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <thread>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/experts.h"

using namespace moe;
using moe::test::expect_error;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::randn;
using moe::test::to_f64;

namespace {

MoEConfig make_config(bool glu, const std::string& act, const std::string& dtype, int64_t F = 5) {
  MoEConfig c;
  c.hidden_size = 6;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = F;
  c.gated_linear_unit = glu;
  c.activation_func = act;
  c.params_dtype = dtype;
  c.init_method_std = 0.4;  // O(1) pre-activations, so every activation's curvature shows
  c.seed = 7;
  return c;
}

double act_ref(const std::string& act, double x) {
  if (act == "silu") return x / (1.0 + std::exp(-x));
  if (act == "gelu") return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
  return x > 0 ? x * x : 0.0;  // relu2 / squared_relu
}

double dot(const Tensor& a, const Tensor& b) {
  std::vector<double> u = to_f64(a), v = to_f64(b);
  return std::inner_product(u.begin(), u.end(), v.begin(), 0.0);
}

// One MLP row in f64: y (H) = W2 (H, F) · (act(W1 (F1, H) · x)[gate] · up · s).
std::vector<double> mlp_row(const MoEConfig& c, const double* x, const double* w1, const double* w2, int64_t H,
                            int64_t F, double s) {
  const int64_t F1 = c.gated_linear_unit ? 2 * F : F;
  std::vector<double> h(static_cast<size_t>(F1), 0.0), a(static_cast<size_t>(F)), y(static_cast<size_t>(H), 0.0);
  for (int64_t o = 0; o < F1; ++o)
    for (int64_t i = 0; i < H; ++i) h[static_cast<size_t>(o)] += w1[o * H + i] * x[i];
  for (int64_t f = 0; f < F; ++f)
    a[static_cast<size_t>(f)] = act_ref(c.activation_func, h[static_cast<size_t>(f)]) *
                                (c.gated_linear_unit ? h[static_cast<size_t>(F + f)] : 1.0) * s;
  for (int64_t o = 0; o < H; ++o)
    for (int64_t f = 0; f < F; ++f) y[static_cast<size_t>(o)] += w2[o * F + f] * a[static_cast<size_t>(f)];
  return y;
}

// The dense per-expert loop: every row of expert g through expert g's MLP, scaled by its prob.
std::vector<double> experts_ref(const MoEConfig& c, GroupedExperts& ex, const Tensor& x,
                                const std::vector<int64_t>& rows, const Tensor& probs) {
  const int64_t H = c.hidden_size, F = ex.local_ffn(), F1 = c.gated_linear_unit ? 2 * F : F;
  std::vector<double> xv = to_f64(x), pv = to_f64(probs), w1 = to_f64(ex.fc1().value), w2 = to_f64(ex.fc2().value);
  std::vector<double> y;
  int64_t r = 0;
  for (size_t g = 0; g < rows.size(); ++g)
    for (int64_t i = 0; i < rows[g]; ++i, ++r) {
      std::vector<double> yr = mlp_row(c, xv.data() + r * H, w1.data() + static_cast<int64_t>(g) * F1 * H,
                                       w2.data() + static_cast<int64_t>(g) * H * F, H, F, pv[static_cast<size_t>(r)]);
      y.insert(y.end(), yr.begin(), yr.end());
    }
  return y;
}


const std::vector<int64_t> kRows = {3, 0, 5, 2};  // expert 1 gets no rows
constexpr int64_t kN = 10;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Grouped experts

TEST(GroupedExperts, ParametersHaveCanonicalNamesShapesAndGroups) {
  MoEConfig c = make_config(true, "silu", "fp32");
  GroupedExperts ex(c, Device::cpu());
  EXPECT_EQ(ex.fc1().name, "experts.linear_fc1.weight");
  EXPECT_EQ(ex.fc1().canonical_shape, (Shape{4, 10, 6}));
  EXPECT_EQ(ex.fc1().value.shape(), (Shape{4, 10, 6}));
  EXPECT_EQ(ex.fc2().name, "experts.linear_fc2.weight");
  EXPECT_EQ(ex.fc2().value.shape(), (Shape{4, 6, 5}));
  EXPECT_EQ(ex.fc1().grad_group, GradGroup::expert);
  EXPECT_EQ(ex.fc2().grad_group, GradGroup::expert);
  EXPECT_EQ(ex.fc1().value.dtype(), DType::f32);
  EXPECT_EQ(GroupedExperts(make_config(false, "gelu", "bf16"), Device::cpu()).fc1().value.dtype(), DType::bf16);
  EXPECT_EQ(ex.num_local_experts(), 4);
  EXPECT_EQ(ex.local_ffn(), 5);
}

TEST(GroupedExperts, ForwardMatchesDensePerExpertLoop) {
  struct Case {
    bool glu;
    const char* act;
    const char* dtype;
    double tol;  // f64: summation order; f32: compute rounding; bf16: rounding of h, a and y
  };
  for (Case k : {Case{true, "silu", "fp64", 1e-13}, Case{true, "gelu", "fp64", 1e-13},
                 Case{false, "gelu", "fp64", 1e-13}, Case{false, "relu2", "fp64", 1e-13},
                 Case{false, "silu", "fp64", 1e-13}, Case{true, "squared_relu", "fp64", 1e-13},
                 Case{true, "silu", "fp32", 2e-6}, Case{false, "gelu", "fp32", 2e-6},
                 Case{true, "silu", "bf16", 2e-2}}) {
    MoEConfig c = make_config(k.glu, k.act, k.dtype);
    GroupedExperts ex(c, Device::cpu());
    DType dt = ex.fc1().value.dtype();
    Tensor x = randn({kN, 6}, dt, 1), probs = moe::test::uniform({kN}, ops::prob_dtype_for(dt), 2, 0.1, 1.0);
    ActivationStore store;
    Tensor y = ex.forward(x, kRows, probs, store);
    EXPECT_EQ(y.shape(), (Shape{kN, 6}));
    EXPECT_TRUE(all_close(to_f64(y), experts_ref(c, ex, x, kRows, probs), k.tol, k.tol))
        << k.act << " glu=" << k.glu << " " << k.dtype;
  }
}

TEST(GroupedExperts, GradientsMatchFiniteDifferencesInF64) {
  for (auto [glu, act] : std::vector<std::pair<bool, const char*>>{{true, "silu"}, {true, "gelu"}, {false, "gelu"},
                          {false, "relu2"}}) {
    MoEConfig c = make_config(glu, act, "fp64");
    GroupedExperts ex(c, Device::cpu());
    Tensor x = randn({kN, 6}, DType::f64, 3), probs = moe::test::uniform({kN}, DType::f64, 4, 0.1, 1.0);
    Tensor w = randn({kN, 6}, DType::f64, 5);  // loss = Σ y·w, so dy = w
    auto loss = [&] {
      ActivationStore s;
      return dot(ex.forward(x, kRows, probs, s), w);
    };
    ActivationStore store;
    ex.forward(x, kRows, probs, store);
    Tensor dx, dprobs;
    ex.backward(w, dx, dprobs, store);
    EXPECT_TRUE(check_grad(loss, ex.fc1().value, ex.fc1().grad)) << act << " glu=" << glu << " fc1";
    EXPECT_TRUE(check_grad(loss, ex.fc2().value, ex.fc2().grad)) << act << " glu=" << glu << " fc2";
    EXPECT_TRUE(check_grad(loss, x, dx)) << act << " glu=" << glu << " dx";
    EXPECT_TRUE(check_grad(loss, probs, dprobs)) << act << " glu=" << glu << " dprobs";
    // The expert with no rows has exactly zero gradients.
    const int64_t n1 = ex.fc1().value.numel() / 4, n2 = ex.fc2().value.numel() / 4;
    std::vector<double> g1 = to_f64(ex.fc1().grad), g2 = to_f64(ex.fc2().grad);
    EXPECT_EQ(std::vector<double>(g1.begin() + n1, g1.begin() + 2 * n1), std::vector<double>(n1, 0.0));
    EXPECT_EQ(std::vector<double>(g2.begin() + n2, g2.begin() + 2 * n2), std::vector<double>(n2, 0.0));
    EXPECT_NE(g1[0], 0.0);
  }
}

TEST(GroupedExperts, ParameterGradientsAccumulateAndActivationGradientsOverwrite) {
  MoEConfig c = make_config(true, "silu", "fp64");
  GroupedExperts ex(c, Device::cpu());
  Tensor x = randn({kN, 6}, DType::f64, 6), probs = moe::test::uniform({kN}, DType::f64, 7, 0.1, 1.0);
  Tensor dy = randn({kN, 6}, DType::f64, 8);
  auto step = [&](Tensor& dx, Tensor& dp) {
    ActivationStore s;
    ex.forward(x, kRows, probs, s);
    ex.backward(dy, dx, dp, s);
  };
  Tensor dx1, dp1;
  step(dx1, dp1);
  Tensor g1 = ex.fc1().grad.clone(), g2 = ex.fc2().grad.clone();
  Tensor dx2 = randn({kN, 6}, DType::f64, 9), dp2 = randn({kN}, DType::f64, 10);  // overwritten
  step(dx2, dp2);
  EXPECT_TRUE(bit_equal(dx1, dx2));
  EXPECT_TRUE(bit_equal(dp1, dp2));
  ops::axpby(2.0, g1.clone(), 0.0, g1);  // 2·g is exact, as is g + g
  ops::axpby(2.0, g2.clone(), 0.0, g2);
  EXPECT_TRUE(bit_equal(ex.fc1().grad, g1));
  EXPECT_TRUE(bit_equal(ex.fc2().grad, g2));
  ex.fc1().zero_grad();
  EXPECT_EQ(to_f64(ex.fc1().grad), std::vector<double>(static_cast<size_t>(ex.fc1().grad.numel()), 0.0));
}

TEST(GroupedExperts, NoRowsAtAll) {
  MoEConfig c = make_config(true, "silu", "fp32");
  GroupedExperts ex(c, Device::cpu());
  ActivationStore store;
  Tensor x = Tensor::empty({0, 6}, DType::f32), probs = Tensor::empty({0}, DType::f32);
  Tensor y = ex.forward(x, {0, 0, 0, 0}, probs, store);
  EXPECT_EQ(y.shape(), (Shape{0, 6}));
  Tensor dx, dprobs;
  ex.backward(Tensor::empty({0, 6}, DType::f32), dx, dprobs, store);
  EXPECT_EQ(dx.shape(), (Shape{0, 6}));
  EXPECT_EQ(dprobs.shape(), (Shape{0}));
  EXPECT_EQ(to_f64(ex.fc1().grad), std::vector<double>(static_cast<size_t>(ex.fc1().grad.numel()), 0.0));
  EXPECT_EQ(to_f64(ex.fc2().grad), std::vector<double>(static_cast<size_t>(ex.fc2().grad.numel()), 0.0));
}

TEST(GroupedExperts, ExpertParallelShardHoldsTheCanonicalExperts) {
  MoEConfig c = make_config(true, "silu", "fp64");
  GroupedExperts full(c, Device::cpu());
  GroupedExperts local(c, Device::cpu(), ExpertsSharding{2, 2, 0, 1});
  EXPECT_EQ(local.num_local_experts(), 2);
  EXPECT_TRUE(bit_equal(local.fc1().value, full.fc1().value.narrow(2, 2)));
  EXPECT_TRUE(bit_equal(local.fc2().value, full.fc2().value.narrow(2, 2)));
  // Its forward over experts 2 and 3 is the full module's forward with no rows for experts 0, 1.
  Tensor x = randn({7, 6}, DType::f64, 11), probs = moe::test::uniform({7}, DType::f64, 12, 0.1, 1.0);
  ActivationStore s1, s2;
  Tensor y_local = local.forward(x, {4, 3}, probs, s1);
  Tensor y_full = full.forward(x, {0, 0, 4, 3}, probs, s2);
  EXPECT_TRUE(all_close(y_local, y_full, 1e-14, 1e-14));
}

TEST(GroupedExperts, ExpertTensorParallelShardsSumToTheFullModule) {
  for (bool glu : {true, false}) {
    MoEConfig c = make_config(glu, glu ? "silu" : "gelu", "fp64", /*F=*/6);
    GroupedExperts full(c, Device::cpu());
    GroupedExperts r0(c, Device::cpu(), ExpertsSharding{0, 0, 0, 2}), r1(c, Device::cpu(), ExpertsSharding{0, 0, 1, 2});
    EXPECT_EQ(r0.local_ffn(), 3);
    Tensor x = randn({kN, 6}, DType::f64, 13), probs = moe::test::uniform({kN}, DType::f64, 14, 0.1, 1.0);
    Tensor dy = randn({kN, 6}, DType::f64, 15);
    Tensor y[3], dx[3], dp[3];
    GroupedExperts* mods[3] = {&full, &r0, &r1};
    for (int i = 0; i < 3; ++i) {
      ActivationStore s;
      y[i] = mods[i]->forward(x, kRows, probs, s);
      mods[i]->backward(dy, dx[i], dp[i], s);
    }
    // Partial fc2 outputs, input gradients and prob gradients sum over the ETP ranks.
    auto sum = [](const Tensor& a, const Tensor& b) {
      Tensor s = a.clone();
      ops::add_(s, b);
      return s;
    };
    EXPECT_TRUE(all_close(sum(y[1], y[2]), y[0], 1e-13, 1e-13)) << "glu=" << glu;
    EXPECT_TRUE(all_close(sum(dx[1], dx[2]), dx[0], 1e-13, 1e-13)) << "glu=" << glu;
    EXPECT_TRUE(all_close(sum(dp[1], dp[2]), dp[0], 1e-13, 1e-13)) << "glu=" << glu;
    // Each shard's values and gradients are the full module's at the canonical indices it covers
    // (for fc1 with a GLU: the same rows of the gate half and of the up half).
    for (GroupedExperts* m : {&r0, &r1}) {
      for (auto [local, whole] : std::vector<std::pair<Parameter*, Parameter*>>{{&m->fc1(), &full.fc1()}, {&m->fc2(), &full.fc2()}}) {
        std::vector<int64_t> idx = shard_canonical_indices(local->canonical_shape, local->shard);
        std::vector<double> lv = to_f64(local->value), lg = to_f64(local->grad), wv = to_f64(whole->value),
                            wg = to_f64(whole->grad), wv_at, wg_at;
        for (int64_t i : idx) {
          wv_at.push_back(wv[static_cast<size_t>(i)]);
          wg_at.push_back(wg[static_cast<size_t>(i)]);
        }
        EXPECT_EQ(lv, wv_at) << local->name;
        EXPECT_TRUE(all_close(lg, wg_at, 1e-13, 1e-13)) << local->name << " glu=" << glu;
      }
    }
  }
}

namespace {
struct RunResult {
  Tensor y, dx, dprobs, g1, g2;
  int64_t device_bytes = 0, host_bytes = 0, regenerations = 0, reloads = 0;
};

RunResult run_with_policies(GroupedExperts& ex, const std::vector<std::pair<std::string, SavePolicy>>& rules,
                            const Tensor& x, const Tensor& probs, const Tensor& dy, const std::string& prefix) {
  ex.fc1().zero_grad();
  ex.fc2().zero_grad();
  ActivationStore store;
  for (auto& [slot, pol] : rules) store.set_policy(slot, pol);
  RunResult r;
  r.y = ex.forward(x, kRows, probs, store);
  for (const char* s : {"fc1_input", "probs", "fc1_output", "act_output"})
    EXPECT_TRUE(store.has(prefix + s)) << prefix + s;
  r.device_bytes = store.device_bytes();
  r.host_bytes = store.host_bytes();
  ex.backward(dy, r.dx, r.dprobs, store);
  r.g1 = ex.fc1().grad.clone();
  r.g2 = ex.fc2().grad.clone();
  r.regenerations = store.regenerations();
  r.reloads = store.reloads();
  EXPECT_EQ(store.device_bytes(), 0) << "backward drops every slot";
  return r;
}
}  // namespace

TEST(GroupedExperts, SlotPoliciesGiveBitIdenticalResultsAndSaveMemory) {
  MoEConfig c = make_config(true, "silu", "fp32");
  const std::string P = "layers.0.mlp.experts.";
  GroupedExperts ex(c, Device::cpu(), {}, P);
  Tensor x = randn({kN, 6}, DType::f32, 16), probs = moe::test::uniform({kN}, DType::f32, 17, 0.1, 1.0);
  Tensor dy = randn({kN, 6}, DType::f32, 18);
  RunResult base = run_with_policies(ex, {}, x, probs, dy, P);
  const int64_t bx = 10 * 6 * 4, bp = 10 * 4, bh = 10 * 10 * 4, ba = 10 * 5 * 4;
  EXPECT_EQ(base.device_bytes, bx + bp + bh + ba);
  EXPECT_EQ(base.regenerations, 0);

  struct Case {
    std::vector<std::pair<std::string, SavePolicy>> rules;
    int64_t device_bytes, host_bytes;
    bool regenerates, reloads;
  };
  const SavePolicy K = SavePolicy::keep, R = SavePolicy::recompute, O = SavePolicy::offload;
  std::vector<Case> cases = {
      {{{P + "fc1_output", R}}, bx + bp + ba, 0, true, false},
      {{{P + "act_output", R}}, bx + bp + bh, 0, true, false},
      {{{P, R}}, bx + bp, 0, true, false},  // fc1_input and probs have no regenerate: kept
      {{{P + "fc1_input", R}}, bx + bp + bh + ba, 0, false, false},
      {{{P + "probs", R}}, bx + bp + bh + ba, 0, false, false},
      {{{P, O}}, 0, bx + bp + bh + ba, false, true},
      {{{P + "fc1_input", O}}, bp + bh + ba, bx, false, true},
      {{{P + "probs", O}}, bx + bh + ba, bp, false, true},
      {{{P + "fc1_output", O}, {P + "act_output", R}}, bx + bp, bh, true, true},
      {{{P, R}, {P + "act_output", K}}, bx + bp + ba, 0, true, false},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& k = cases[i];
    RunResult r = run_with_policies(ex, k.rules, x, probs, dy, P);
    EXPECT_TRUE(bit_equal(r.y, base.y)) << "case " << i;
    EXPECT_TRUE(bit_equal(r.dx, base.dx)) << "case " << i;
    EXPECT_TRUE(bit_equal(r.dprobs, base.dprobs)) << "case " << i;
    EXPECT_TRUE(bit_equal(r.g1, base.g1)) << "case " << i;
    EXPECT_TRUE(bit_equal(r.g2, base.g2)) << "case " << i;
    EXPECT_EQ(r.device_bytes, k.device_bytes) << "case " << i;
    EXPECT_EQ(r.host_bytes, k.host_bytes) << "case " << i;
    EXPECT_EQ(r.regenerations > 0, k.regenerates) << "case " << i;
    EXPECT_EQ(r.reloads > 0, k.reloads) << "case " << i;
  }
  // A recompute rule on a slot without a regenerate function keeps it, visibly.
  ActivationStore store;
  store.set_policy(P, SavePolicy::recompute);
  ex.forward(x, kRows, probs, store);
  EXPECT_EQ(store.saved_policy(P + "fc1_input"), SavePolicy::keep);
  EXPECT_EQ(store.saved_policy(P + "probs"), SavePolicy::keep);
  EXPECT_EQ(store.saved_policy(P + "fc1_output"), SavePolicy::recompute);
}

TEST(GroupedExperts, ErrorsNameTheProblem) {
  MoEConfig c = make_config(true, "silu", "fp32");
  GroupedExperts ex(c, Device::cpu());
  ActivationStore store;
  Tensor x = randn({kN, 6}, DType::f32, 19), probs = moe::test::uniform({kN}, DType::f32, 20, 0.1, 1.0);
  expect_error([&] { ex.forward(x, {3, 0, 5, 1}, probs, store); }, "sum to 9");
  expect_error([&] { ex.forward(x, {5, 5}, probs, store); }, "for 4 local experts");
  expect_error([&] { ex.forward(x, {3, -1, 6, 2}, probs, store); }, "negative row count");
  expect_error([&] { ex.forward(randn({kN, 5}, DType::f32, 21), kRows, probs, store); }, "H=6");
  expect_error([&] { ex.forward(randn({kN, 6}, DType::f64, 22), kRows, probs, store); }, "expected dtype f32");
  expect_error([&] { ex.forward(x, kRows, randn({kN}, DType::f64, 23), store); }, "probs");
  expect_error([&] { ex.forward(x, kRows, randn({kN + 1}, DType::f32, 24), store); }, "probs");
  Tensor dx, dp;
  expect_error([&] { ex.backward(randn({kN, 6}, DType::f32, 25), dx, dp, store); }, "call forward first");
  ex.forward(x, kRows, probs, store);
  expect_error([&] { ex.backward(randn({kN - 1, 6}, DType::f32, 26), dx, dp, store); }, "dy");
  Tensor bad_dx = Tensor::empty({kN, 5}, DType::f32);
  expect_error([&] { ex.backward(randn({kN, 6}, DType::f32, 27), bad_dx, dp, store); }, "dx");
  // Configurations.
  MoEConfig odd = make_config(true, "silu", "fp32", 5);
  expect_error([&] { GroupedExperts(odd, Device::cpu(), ExpertsSharding{0, 0, 0, 2}); }, "not divisible");
  expect_error([&] { GroupedExperts(c, Device::cpu(), ExpertsSharding{3, 2, 0, 1}); }, "do not fit");
  expect_error([&] { GroupedExperts(c, Device::cpu(), ExpertsSharding{0, 0, 2, 2}); }, "etp_rank");
  MoEConfig bad_act = make_config(true, "tanh", "fp32");
  expect_error([&] { GroupedExperts(bad_act, Device::cpu()); }, "activation_func");
  MoEConfig bad_dt = make_config(true, "silu", "fp16");
  expect_error([&] { GroupedExperts(bad_dt, Device::cpu()); }, "params_dtype");
}

// ---------------------------------------------------------------------------------------------
// Shared experts

namespace {

MoEConfig shared_config(bool glu, const std::string& act, bool gate, const std::string& dtype) {
  MoEConfig c = make_config(glu, act, dtype);
  c.moe_shared_expert_intermediate_size = 4;
  c.moe_shared_expert_gate = gate;
  return c;
}

// Dense reference: out[t] = W2 · act(W1 · x[t]) · σ(w_g · x[t]).
std::vector<double> shared_ref(const MoEConfig& c, SharedExperts& se, const Tensor& x) {
  const int64_t T = x.size(0), H = c.hidden_size, Fs = *c.moe_shared_expert_intermediate_size;
  std::vector<double> xv = to_f64(x), w1 = to_f64(se.fc1().value), w2 = to_f64(se.fc2().value),
                      wg = se.has_gate() ? to_f64(se.gate().value) : std::vector<double>();
  std::vector<double> out;
  for (int64_t t = 0; t < T; ++t) {
    const double* xr = xv.data() + t * H;
    double g = 1.0;
    if (se.has_gate()) {
      double l = 0;
      for (int64_t h = 0; h < H; ++h) l += wg[static_cast<size_t>(h)] * xr[h];
      g = 1.0 / (1.0 + std::exp(-l));
    }
    std::vector<double> y = mlp_row(c, xr, w1.data(), w2.data(), H, Fs, g);
    out.insert(out.end(), y.begin(), y.end());
  }
  return out;
}

}  // namespace

TEST(SharedExperts, ParametersHaveCanonicalNamesAndShapes) {
  SharedExperts se(shared_config(true, "silu", true, "fp32"), Device::cpu());
  EXPECT_EQ(se.fc1().name, "shared_experts.linear_fc1.weight");
  EXPECT_EQ(se.fc1().value.shape(), (Shape{8, 6}));
  EXPECT_EQ(se.fc2().name, "shared_experts.linear_fc2.weight");
  EXPECT_EQ(se.fc2().value.shape(), (Shape{6, 4}));
  ASSERT_TRUE(se.has_gate());
  EXPECT_EQ(se.gate().name, "shared_experts.gate_weight");
  EXPECT_EQ(se.gate().value.shape(), (Shape{1, 6}));
  EXPECT_EQ(se.gate().grad_group, GradGroup::dense);
  EXPECT_EQ(se.fc1().grad_group, GradGroup::dense);
  SharedExperts plain(shared_config(false, "gelu", false, "fp32"), Device::cpu());
  EXPECT_FALSE(plain.has_gate());
  EXPECT_FALSE(plain.gate().value.defined());
  EXPECT_EQ(plain.fc1().value.shape(), (Shape{4, 6}));
}

TEST(SharedExperts, ForwardMatchesDenseReference) {
  for (bool gate : {false, true})
    for (auto [glu, act] : std::vector<std::pair<bool, const char*>>{{true, "silu"}, {false, "gelu"}, {false, "relu2"}}) {
      for (auto [dtype, tol] : std::vector<std::pair<const char*, double>>{{"fp64", 1e-13}, {"fp32", 2e-6}, {"bf16", 2e-2}}) {
        MoEConfig c = shared_config(glu, act, gate, dtype);
        SharedExperts se(c, Device::cpu());
        Tensor x = randn({7, 6}, se.fc1().value.dtype(), 30);
        ActivationStore store;
        Tensor out = se.forward(x, store);
        EXPECT_TRUE(all_close(to_f64(out), shared_ref(c, se, x), tol, tol))
            << act << " glu=" << glu << " gate=" << gate << " " << dtype;
      }
    }
}

TEST(SharedExperts, GradientsMatchFiniteDifferencesInF64) {
  for (bool gate : {false, true})
    for (auto [glu, act] : std::vector<std::pair<bool, const char*>>{{true, "silu"}, {false, "gelu"}, {true, "relu2"}}) {
      MoEConfig c = shared_config(glu, act, gate, "fp64");
      SharedExperts se(c, Device::cpu());
      Tensor x = randn({7, 6}, DType::f64, 31), w = randn({7, 6}, DType::f64, 32);
      auto loss = [&] {
        ActivationStore s;
        return dot(se.forward(x, s), w);
      };
      ActivationStore store;
      se.forward(x, store);
      Tensor dx0 = randn({7, 6}, DType::f64, 33), dx = dx0.clone();  // dx accumulates
      se.backward(w, dx, store);
      ops::axpby(-1.0, dx0, 1.0, dx);
      std::string what = std::string(act) + " glu=" + std::to_string(glu) + " gate=" + std::to_string(gate);
      EXPECT_TRUE(check_grad(loss, se.fc1().value, se.fc1().grad)) << what << " fc1";
      EXPECT_TRUE(check_grad(loss, se.fc2().value, se.fc2().grad)) << what << " fc2";
      EXPECT_TRUE(check_grad(loss, x, dx, 1e-6, 1e-8)) << what << " dx";
      if (gate) {
        EXPECT_TRUE(check_grad(loss, se.gate().value, se.gate().grad)) << what << " gate";
      }
    }
}

TEST(SharedExperts, SlotPoliciesGiveBitIdenticalResultsAndSaveMemory) {
  MoEConfig c = shared_config(true, "silu", true, "fp32");
  const std::string P = "layers.1.mlp.shared_experts.";
  SharedExperts se(c, Device::cpu(), nullptr, P);
  Tensor x = randn({7, 6}, DType::f32, 34), dout = randn({7, 6}, DType::f32, 35);
  auto run = [&](const std::vector<std::pair<std::string, SavePolicy>>& rules, int64_t* dev, int64_t* regen) {
    se.fc1().zero_grad();
    se.fc2().zero_grad();
    se.gate().zero_grad();
    ActivationStore store;
    for (auto& [slot, pol] : rules) store.set_policy(slot, pol);
    std::vector<Tensor> res;
    res.push_back(se.forward(x, store));
    *dev = store.device_bytes();
    Tensor dx = Tensor::zeros({7, 6}, DType::f32);
    se.backward(dout, dx, store);
    *regen = store.regenerations();
    EXPECT_EQ(store.device_bytes(), 0);
    for (Tensor t : {dx, se.fc1().grad, se.fc2().grad, se.gate().grad}) res.push_back(t.clone());
    return res;
  };
  int64_t dev0 = 0, regen0 = 0;
  std::vector<Tensor> base = run({}, &dev0, &regen0);
  const int64_t bx = 7 * 6 * 4, bh = 7 * 8 * 4, ba = 7 * 4 * 4, bg = 7 * 4, by = 7 * 6 * 4;
  EXPECT_EQ(dev0, bx + bh + ba + bg + by);
  const SavePolicy R = SavePolicy::recompute, O = SavePolicy::offload;
  struct Case {
    std::vector<std::pair<std::string, SavePolicy>> rules;
    int64_t device_bytes;
  };
  // Offload keeps fc1_input: it is the caller's x (offloading it would free nothing).
  for (Case k : {Case{{{P, R}}, bx}, Case{{{P, O}}, bx}, Case{{{P + "fc1_output", R}}, bx + ba + bg + by},
                 Case{{{P + "act_output", O}, {P + "gate", R}}, bx + bh + by},
                 Case{{{P + "fc2_output", R}, {P + "fc1_output", O}}, bx + ba + bg}}) {
    int64_t dev = 0, regen = 0;
    std::vector<Tensor> got = run(k.rules, &dev, &regen);
    for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(bit_equal(got[i], base[i])) << "result " << i;
    EXPECT_EQ(dev, k.device_bytes);
  }
}

TEST(SharedExperts, ErrorsNameTheProblem) {
  MoEConfig c = shared_config(true, "silu", true, "fp32");
  SharedExperts se(c, Device::cpu());
  ActivationStore store;
  expect_error([&] { se.forward(randn({3, 5}, DType::f32, 40), store); }, "H=6");
  expect_error([&] { se.forward(randn({3, 6}, DType::bf16, 41), store); }, "expected dtype f32");
  Tensor dx;
  expect_error([&] { se.backward(randn({3, 6}, DType::f32, 42), dx, store); }, "call forward first");
  se.forward(randn({3, 6}, DType::f32, 43), store);
  expect_error([&] { se.backward(randn({4, 6}, DType::f32, 44), dx, store); }, "dout");
  MoEConfig none = make_config(true, "silu", "fp32");
  expect_error([&] { SharedExperts(none, Device::cpu()); }, "moe_shared_expert_intermediate_size");
}

// ---------------------------------------------------------------------------------------------
// The shared expert's TP path, over two ranks running in threads of this process.

namespace {

// Collectives between threads: each rank publishes its tensor, waits for the others, reads what it
// needs (every rank sums in rank order, so all get the same bits), and waits again before reuse.
struct ThreadGroup {
  explicit ThreadGroup(int n) : size(n), sync(n), slots(static_cast<size_t>(n)) {}
  int size;
  std::barrier<> sync;
  std::vector<Tensor> slots;
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(std::shared_ptr<ThreadGroup> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size; }
  const std::string& name() const override { return name_; }
  std::string backend_name() const override { return "threads"; }
  std::vector<int> world_ranks() const override {
    std::vector<int> r(static_cast<size_t>(g_->size));
    std::iota(r.begin(), r.end(), 0);
    return r;
  }
  void all_reduce(Tensor& t, ReduceOp op) override {
    EXPECT_EQ(op, ReduceOp::sum);
    publish(t);
    Tensor sum = g_->slots[0].clone();
    for (int r = 1; r < g_->size; ++r) ops::add_(sum, g_->slots[static_cast<size_t>(r)]);
    done();
    t.copy_from(sum);
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    publish(in);
    for (int r = 0; r < g_->size; ++r) out.narrow(r * in.size(0), in.size(0)).copy_from(g_->slots[static_cast<size_t>(r)]);
    done();
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    publish(in);
    const int64_t R = out.size(0);
    Tensor sum = g_->slots[0].narrow(rank_ * R, R).clone();
    for (int r = 1; r < g_->size; ++r) ops::add_(sum, g_->slots[static_cast<size_t>(r)].narrow(rank_ * R, R));
    done();
    out.copy_from(sum);
  }
  void all_gather_v(const Tensor&, Tensor&, const std::vector<int64_t>&) override { unused("all_gather_v"); }
  void reduce_scatter_v(const Tensor&, Tensor&, const std::vector<int64_t>&) override { unused("reduce_scatter_v"); }
  void all_to_all_v(const Tensor&, const std::vector<int64_t>&, Tensor&, const std::vector<int64_t>&) override {
    unused("all_to_all_v");
  }
  void broadcast(Tensor&, int) override { unused("broadcast"); }
  void barrier() override { g_->sync.arrive_and_wait(); }
  std::shared_ptr<Communicator> split(int, int, const std::string&) override { unused("split"); }

 private:
  void publish(const Tensor& t) {
    g_->slots[static_cast<size_t>(rank_)] = t.clone();
    g_->sync.arrive_and_wait();
  }
  void done() { g_->sync.arrive_and_wait(); }
  [[noreturn]] void unused(const char* op) { MOE_THROW(ErrorCode::not_supported, "ThreadComm: ", op); }
  std::shared_ptr<ThreadGroup> g_;
  int rank_;
  std::string name_ = "tp";
};

}  // namespace

TEST(SharedExperts, TensorParallelRanksReproduceTheSingleRankModule) {
  for (bool glu : {true, false}) {
    MoEConfig c = shared_config(glu, glu ? "silu" : "gelu", /*gate=*/true, "fp64");
    const int64_t T = 8, Tl = T / 2;
    Tensor x = randn({T, 6}, DType::f64, 50), dout = randn({T, 6}, DType::f64, 51);
    SharedExperts full(c, Device::cpu());
    ActivationStore fs;
    Tensor out_full = full.forward(x, fs);
    Tensor dx_full = Tensor::zeros({T, 6}, DType::f64);
    full.backward(dout, dx_full, fs);

    auto group = std::make_shared<ThreadGroup>(2);
    std::unique_ptr<SharedExperts> ranks[2];
    Tensor out[2], dx[2];
    std::string failure[2];
    auto body = [&](int r) {
      try {
        ranks[r] = std::make_unique<SharedExperts>(c, Device::cpu(), std::make_shared<ThreadComm>(group, r));
        ActivationStore s;
        s.set_policy("shared_experts.fc1_output", SavePolicy::recompute);  // regeneration gathers again
        out[r] = ranks[r]->forward(x.narrow(r * Tl, Tl).clone(), s);
        dx[r] = Tensor::zeros({Tl, 6}, DType::f64);
        ranks[r]->backward(dout.narrow(r * Tl, Tl).clone(), dx[r], s);
      } catch (const std::exception& e) {
        failure[r] = e.what();
        group->sync.arrive_and_drop();  // the other rank's collectives no longer wait for this one
      }
    };
    std::thread t1(body, 1);
    body(0);
    t1.join();
    ASSERT_EQ(failure[0], "");
    ASSERT_EQ(failure[1], "");
    for (int r = 0; r < 2; ++r) {
      EXPECT_TRUE(all_close(out[r], out_full.narrow(r * Tl, Tl), 1e-13, 1e-13)) << "rank " << r << " glu=" << glu;
      EXPECT_TRUE(all_close(dx[r], dx_full.narrow(r * Tl, Tl), 1e-13, 1e-13)) << "rank " << r << " glu=" << glu;
      // The replicated gate holds the full gradient on every rank; fc1/fc2 shards hold theirs.
      EXPECT_TRUE(all_close(ranks[r]->gate().grad, full.gate().grad, 1e-13, 1e-13)) << "rank " << r;
      for (auto [local, whole] : std::vector<std::pair<Parameter*, Parameter*>>{{&ranks[r]->fc1(), &full.fc1()},
                                  {&ranks[r]->fc2(), &full.fc2()}}) {
        std::vector<int64_t> idx = shard_canonical_indices(local->canonical_shape, local->shard);
        std::vector<double> wv = to_f64(whole->value), wg = to_f64(whole->grad), wv_at, wg_at;
        for (int64_t i : idx) {
          wv_at.push_back(wv[static_cast<size_t>(i)]);
          wg_at.push_back(wg[static_cast<size_t>(i)]);
        }
        EXPECT_EQ(to_f64(local->value), wv_at) << local->name;
        EXPECT_TRUE(all_close(to_f64(local->grad), wg_at, 1e-13, 1e-13)) << local->name << " rank " << r;
      }
    }
  }
}
