// The Router module (src/moe/router.cpp): finite-difference gradient checks in f64 of
// loss = Σ probs ⊙ G + aux_loss + z_loss with respect to router.weight and x for every score
// function, loss type, pre-softmax, groups, expert bias, jitter and capacity; invariants (uniform
// logits give aux_loss == coeff, expert bias balances, global aux accumulation and reset, eval
// mode, recompute/offload bit-identity, loss scale, group sizes); error cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/router.h"

using namespace moe;
using moe::test::expect_error;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::randn;
using moe::test::to_f64;

namespace {

// A group of `n` identical ranks: all_reduce(sum) multiplies by n. Only what the router uses.
class FakeComm : public Communicator {
 public:
  explicit FakeComm(int n) : n_(n) {}
  int rank() const override { return 0; }
  int size() const override { return n_; }
  const std::string& name() const override { return name_; }
  std::string backend_name() const override { return "fake"; }
  std::vector<int> world_ranks() const override {
    std::vector<int> r(static_cast<size_t>(n_));
    std::iota(r.begin(), r.end(), 0);
    return r;
  }
  void all_reduce(Tensor& t, ReduceOp op) override {
    MOE_CHECK(op == ReduceOp::sum && t.dtype() == DType::f64 && t.device().is_cpu(), "FakeComm: f64 host sums only");
    double* d = t.data_as<double>();
    for (int64_t i = 0; i < t.numel(); ++i) d[i] *= n_;
    ++calls;
  }
  void all_gather(const Tensor&, Tensor&) override { unsupported(); }
  void all_gather_v(const Tensor&, Tensor&, const std::vector<int64_t>&) override { unsupported(); }
  void reduce_scatter(const Tensor&, Tensor&) override { unsupported(); }
  void reduce_scatter_v(const Tensor&, Tensor&, const std::vector<int64_t>&) override { unsupported(); }
  void all_to_all_v(const Tensor&, const std::vector<int64_t>&, Tensor&, const std::vector<int64_t>&) override {
    unsupported();
  }
  void broadcast(Tensor&, int) override { unsupported(); }
  void barrier() override {}
  std::shared_ptr<Communicator> split(int, int, const std::string&) override { unsupported(); }
  int calls = 0;

 private:
  [[noreturn]] static void unsupported() { MOE_THROW(ErrorCode::not_supported, "FakeComm: not used by the router"); }
  int n_;
  std::string name_ = "fake";
};

constexpr int64_t kT = 36, kH = 12;

MoEConfig base_config(int64_t E = 8, int64_t k = 2, const std::string& score = "softmax") {
  MoEConfig c;
  c.hidden_size = kH;
  c.num_moe_experts = E;
  c.moe_ffn_hidden_size = 16;
  c.moe_router_topk = k;
  c.moe_router_score_function = score;
  c.params_dtype = "fp64";
  c.init_method_std = 0.5;  // logits of O(1) spread: no near-ties under a 1e-6 perturbation
  c.moe_router_load_balancing_type = {"none"};
  c.moe_aux_loss_coeff = {0.0};
  c.seed = 42;
  return c;
}

double dot(const Tensor& a, const Tensor& b) {
  std::vector<double> x = to_f64(a), y = to_f64(b);
  return std::inner_product(x.begin(), x.end(), y.begin(), 0.0);
}

struct GradCase {
  std::string name;
  std::function<void(MoEConfig&)> edit;
  int64_t seq_length = 0, batch_size = 1;
  bool prior_microbatch = false;  // global aux: a first micro-batch feeds the accumulated counts
  bool set_bias = false;          // random non-zero expert bias (selection only)
};

void run_grad_case(const GradCase& gc) {
  SCOPED_TRACE(gc.name);
  MoEConfig c = base_config();
  gc.edit(c);
  const int64_t E = c.num_moe_experts;
  Router r(c, Device::cpu(), {}, /*layer_number=*/3);
  if (gc.set_bias) {
    std::vector<double> b = to_f64(randn({E}, DType::f64, 17, 0.3));
    std::vector<float> bf(b.begin(), b.end());
    r.expert_bias().value.copy_from_host(bf.data(), bf.size() * sizeof(float));
  }
  Tensor x = randn({kT, kH}, DType::f64, 11);
  Tensor x0 = randn({kT, kH}, DType::f64, 12);
  Tensor G = randn({kT, E}, DType::f64, 13);
  ForwardContext ctx;
  ctx.step = 5;
  ctx.microbatch = 1;
  ctx.seq_length = gc.seq_length;
  ctx.batch_size = gc.batch_size;
  ForwardContext ctx0 = ctx;
  ctx0.microbatch = 0;

  auto forward = [&](ActivationStore& st) {
    if (gc.prior_microbatch) {
      r.finish_step();
      ActivationStore s0;
      r.forward(x0, ctx0, s0);
    }
    return r.forward(x, ctx, st);
  };
  auto loss = [&] {
    ActivationStore st;
    RouterOutput o = forward(st);
    return dot(o.probs, G) + o.aux_loss + o.z_loss;
  };

  ActivationStore st;
  RouterOutput o = forward(st);
  if (c.moe_expert_capacity_factor && !c.moe_pad_expert_input_to_capacity) {
    int64_t kept = std::accumulate(o.tokens_per_expert.begin(), o.tokens_per_expert.end(), int64_t{0});
    ASSERT_LT(kept, kT * c.moe_router_topk) << "the case should drop tokens";
  }
  r.weight().zero_grad();
  Tensor dx = Tensor::zeros({kT, kH}, DType::f64);
  r.backward(G, dx, st);
  EXPECT_FALSE(st.has("router.input"));
  EXPECT_FALSE(st.has("router.logits"));
  EXPECT_TRUE(check_grad(loss, r.weight().value, r.weight().grad)) << "router.weight";
  EXPECT_TRUE(check_grad(loss, x, dx)) << "x";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(RouterGrad, FiniteDifferences) {
  std::vector<GradCase> cases = {
      {"softmax aux_loss", [](MoEConfig& c) { c.moe_router_load_balancing_type = {"aux_loss"}; c.moe_aux_loss_coeff = {0.1}; }},
      {"softmax pre aux_loss", [](MoEConfig& c) {
         c.moe_router_pre_softmax = true;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"softmax pre k=1 scaled", [](MoEConfig& c) {
         c.moe_router_topk = 1;
         c.moe_router_pre_softmax = true;
         c.moe_router_topk_scaling_factor = 1.7;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"sigmoid aux_loss scaled", [](MoEConfig& c) {
         c.moe_router_score_function = "sigmoid";
         c.moe_router_topk_scaling_factor = 2.5;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"sigmoid k=1", [](MoEConfig& c) {
         c.moe_router_score_function = "sigmoid";
         c.moe_router_topk = 1;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"sqrtsoftplus aux_loss", [](MoEConfig& c) {
         c.moe_router_score_function = "sqrtsoftplus";
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"sigmoid expert bias", [](MoEConfig& c) {
         c.moe_router_score_function = "sigmoid";
         c.moe_router_enable_expert_bias = true;
       }, 0, 1, false, true},
      {"seq_aux_loss", [](MoEConfig& c) {
         c.moe_router_load_balancing_type = {"seq_aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }, 12, 3},
      {"global_aux_loss over two micro-batches", [](MoEConfig& c) {
         c.moe_router_load_balancing_type = {"global_aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }, 0, 1, true},
      {"z_loss", [](MoEConfig& c) { c.moe_z_loss_coeff = 0.05; }},
      {"aux + seq_aux + global_aux + z", [](MoEConfig& c) {
         c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss", "global_aux_loss"};
         c.moe_aux_loss_coeff = {0.1, 0.2, 0.3};
         c.moe_z_loss_coeff = 0.02;
       }, 9, 4, true},
      {"groups softmax", [](MoEConfig& c) {
         c.num_moe_experts = 16;
         c.moe_router_topk = 4;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"groups sigmoid bias", [](MoEConfig& c) {
         c.num_moe_experts = 16;
         c.moe_router_topk = 4;
         c.moe_router_score_function = "sigmoid";
         c.moe_router_enable_expert_bias = true;
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
       }, 0, 1, false, true},
      {"jitter", [](MoEConfig& c) {
         c.moe_input_jitter_eps = 0.1;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"capacity probs", [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 1.0;
         c.moe_router_load_balancing_type = {"aux_loss"};
         c.moe_aux_loss_coeff = {0.1};
       }},
      {"capacity position", [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 0.75;
         c.moe_token_drop_policy = "position";
         c.moe_router_score_function = "sigmoid";
       }},
      {"capacity pad", [](MoEConfig& c) {
         c.moe_expert_capacity_factor = 1.0;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_router_pre_softmax = true;
       }},
      {"sqrtsoftplus groups capacity jitter z", [](MoEConfig& c) {
         c.num_moe_experts = 16;
         c.moe_router_topk = 4;
         c.moe_router_score_function = "sqrtsoftplus";
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_expert_capacity_factor = 1.0;
         c.moe_input_jitter_eps = 0.05;
         c.moe_z_loss_coeff = 0.03;
         c.moe_router_load_balancing_type = {"seq_aux_loss"};
         c.moe_aux_loss_coeff = {0.2};
       }, 18, 2},
  };
  for (const GradCase& gc : cases) run_grad_case(gc);
}

// ---------------------------------------------------------------------------------------------
TEST(Router, UniformLogitsGiveAuxLossEqualToCoeff) {
  const double coeff = 0.01;
  for (const char* pd : {"fp64", "fp32"})
    for (const char* type : {"aux_loss", "seq_aux_loss"})
      for (int n : {1, 2})
        for (const char* score : {"softmax", "sigmoid"}) {
          SCOPED_TRACE(std::string(pd) + " " + type + " tp_cp=" + std::to_string(n) + " " + score);
          MoEConfig c = base_config(8, 2, score);
          c.params_dtype = pd;
          c.init_method_std = 0.0;  // zero weight: every logit is 0
          c.moe_router_load_balancing_type = {type};
          c.moe_aux_loss_coeff = {coeff};
          RouterGroups groups;
          if (n > 1) groups.tp_cp = std::make_shared<FakeComm>(n);
          Router r(c, Device::cpu(), groups);
          ForwardContext ctx;
          ctx.seq_length = 9;
          ctx.batch_size = 4;
          ActivationStore st;
          RouterOutput o = r.forward(randn({kT, kH}, r.weight().value.dtype(), 3), ctx, st);
          EXPECT_EQ(o.aux_loss, coeff);
          EXPECT_EQ(o.z_loss, 0.0);
        }
}

TEST(Router, OutputsAreConsistent) {
  MoEConfig c = base_config(8, 2, "sigmoid");
  c.moe_router_dtype = "fp32";
  c.params_dtype = "fp32";
  Router r(c, Device::cpu());
  EXPECT_EQ(r.router_dtype(), DType::f32);
  EXPECT_EQ(r.weight().name, "router.weight");
  EXPECT_EQ(r.weight().value.shape(), (Shape{8, kH}));
  EXPECT_EQ(r.weight().grad_group, GradGroup::router);
  EXPECT_FALSE(r.expert_bias().value.defined());  // bias disabled
  ActivationStore st;
  RouterOutput o = r.forward(randn({kT, kH}, DType::f32, 1), ForwardContext{}, st);
  EXPECT_EQ(o.probs.shape(), (Shape{kT, 8}));
  EXPECT_EQ(o.probs.dtype(), DType::f32);
  EXPECT_EQ(o.topk_idx.shape(), (Shape{kT, 2}));
  EXPECT_EQ(o.capacity, 0);
  std::vector<uint8_t> m = o.routing_map.to_vector<uint8_t>();
  std::vector<int64_t> cols(8, 0);
  for (int64_t t = 0; t < kT; ++t)
    for (int64_t e = 0; e < 8; ++e) cols[e] += m[t * 8 + e];
  EXPECT_EQ(o.tokens_per_expert, cols);
  EXPECT_EQ(std::accumulate(cols.begin(), cols.end(), int64_t{0}), kT * 2);
}

TEST(Router, CapacityIsReportedAndApplied) {
  for (bool pad : {false, true}) {
    MoEConfig c = base_config(8, 2);
    c.moe_expert_capacity_factor = 1.1;  // ceil(36·2/8·1.1) = ceil(9.9) = 10
    c.moe_pad_expert_input_to_capacity = pad;
    Router r(c, Device::cpu());
    ActivationStore st;
    RouterOutput o = r.forward(randn({kT, kH}, DType::f64, 2), ForwardContext{}, st);
    EXPECT_EQ(o.capacity, 10);
    for (int64_t n : o.tokens_per_expert) {
      if (pad)
        EXPECT_EQ(n, 10);
      else
        EXPECT_LE(n, 10);
    }
  }
  // The capacity never exceeds T.
  MoEConfig c = base_config(8, 4);
  c.moe_expert_capacity_factor = 5.0;  // ceil(36·4/8·5) = 90 > 36
  Router r(c, Device::cpu());
  ActivationStore st;
  RouterOutput o = r.forward(randn({kT, kH}, DType::f64, 2), ForwardContext{}, st);
  EXPECT_EQ(o.capacity, kT);
  EXPECT_EQ(std::accumulate(o.tokens_per_expert.begin(), o.tokens_per_expert.end(), int64_t{0}), kT * 4);
}

TEST(Router, ExpertBiasMovesTowardBalance) {
  MoEConfig c = base_config(8, 2, "sigmoid");
  c.moe_router_enable_expert_bias = true;
  c.moe_router_bias_update_rate = 0.02;
  c.init_method_std = 0.3;
  Router r(c, Device::cpu());
  ASSERT_TRUE(r.expert_bias().value.defined());
  EXPECT_FALSE(r.expert_bias().trainable);
  EXPECT_EQ(r.expert_bias().name, "router.expert_bias");
  // Skew: feature 0 is large for every token and experts 0 and 1 weigh it heavily.
  std::vector<double> w = to_f64(r.weight().value);
  w[0 * kH] = w[1 * kH] = 1.5;
  r.weight().value.copy_from_host(w.data(), w.size() * sizeof(double));
  std::vector<double> xv = to_f64(randn({kT, kH}, DType::f64, 5));
  for (int64_t t = 0; t < kT; ++t) xv[t * kH] += 2.0;
  Tensor x = Tensor::from_vector(xv, {kT, kH});

  auto load = [&] {
    ActivationStore st;
    return r.forward(x, ForwardContext{}, st).tokens_per_expert;
  };
  std::vector<int64_t> c0 = load();
  int64_t max0 = *std::max_element(c0.begin(), c0.end());
  ASSERT_GT(max0, 2 * kT * 2 / 8);  // skewed
  r.finish_step();
  std::vector<float> b = r.expert_bias().value.to_vector<float>();
  const double mean = kT * 2.0 / 8;
  for (int64_t e = 0; e < 8; ++e) {
    float expect = c0[e] > mean ? -0.02f : (c0[e] < mean ? 0.02f : 0.0f);
    EXPECT_EQ(b[e], expect) << "expert " << e << " load " << c0[e];
  }
  // Several steps: the largest load falls.
  for (int i = 0; i < 60; ++i) {
    load();
    r.finish_step();
  }
  std::vector<int64_t> c1 = load();
  int64_t max1 = *std::max_element(c1.begin(), c1.end());
  EXPECT_LT(max1, max0);
  EXPECT_LE(max1, kT / 2);  // 30 and 31 of the 36 tokens on experts 0 and 1 before; about 15 after
  // The bias only chooses: probs are the normalised sigmoid of the selected logits.
  ActivationStore st;
  RouterOutput o = r.forward(x, ForwardContext{}, st);
  std::vector<double> p = to_f64(o.probs);
  for (int64_t t = 0; t < kT; ++t) {
    double s = 0;
    for (int64_t e = 0; e < 8; ++e) s += p[t * 8 + e];
    EXPECT_NEAR(s, 1.0, 1e-12);
  }
}

TEST(Router, GlobalAuxLossAccumulatesOverMicrobatchesAndResets) {
  MoEConfig c = base_config(8, 2);
  c.moe_router_load_balancing_type = {"global_aux_loss"};
  c.moe_aux_loss_coeff = {0.1};
  Tensor x1 = randn({kT, kH}, DType::f64, 21), x2 = randn({kT, kH}, DType::f64, 22);
  auto run = [&](Router& r, const Tensor& x) {
    ActivationStore st;
    return r.forward(x, ForwardContext{}, st).aux_loss;
  };
  Router alone(c, Device::cpu());
  double a2 = run(alone, x2);

  Router r(c, Device::cpu());
  run(r, x1);
  double v2 = run(r, x2);
  // Reference: counts averaged over the two micro-batches, probabilities of the second.
  auto stats = [&](const Tensor& x, std::vector<double>& P, std::vector<double>& cnt) {
    Tensor logits = ops::matmul(x, false, r.weight().value, true);
    Tensor ps = Tensor::empty({1, 8}, DType::f64), cs = Tensor::empty({1, 8}, DType::i64);
    ops::aux_stats(ScoreFunction::softmax, 2, 1, logits, ps, cs);
    P = to_f64(ps);
    cnt = to_f64(cs);
  };
  std::vector<double> P1, c1, P2, c2;
  stats(x1, P1, c1);
  stats(x2, P2, c2);
  ASSERT_NE(c1, c2);
  double ref = 0;
  for (int e = 0; e < 8; ++e) ref += P2[e] * (c1[e] + c2[e]) / 2;
  ref *= 0.1 * 8 / (2.0 * kT * kT);
  EXPECT_NEAR(v2, ref, 1e-14);
  EXPECT_NE(v2, a2);
  r.finish_step();
  EXPECT_EQ(run(r, x2), a2);  // reset: the first micro-batch of a new step stands alone
}

TEST(Router, EvalModeHasNoAuxZJitterOrBiasCounting) {
  MoEConfig full = base_config(8, 2, "sigmoid");
  full.moe_router_load_balancing_type = {"aux_loss"};
  full.moe_aux_loss_coeff = {0.1};
  full.moe_z_loss_coeff = 0.1;
  full.moe_input_jitter_eps = 0.2;
  full.moe_router_enable_expert_bias = true;
  MoEConfig plain = base_config(8, 2, "sigmoid");
  plain.moe_router_enable_expert_bias = true;
  Tensor x = randn({kT, kH}, DType::f64, 31), G = randn({kT, 8}, DType::f64, 32);

  Router a(full, Device::cpu()), b(plain, Device::cpu());
  ForwardContext eval;
  eval.training = false;
  ActivationStore sa, sb;
  RouterOutput oa = a.forward(x, eval, sa);
  RouterOutput ob = b.forward(x, ForwardContext{}, sb);
  EXPECT_EQ(oa.aux_loss, 0.0);
  EXPECT_EQ(oa.z_loss, 0.0);
  EXPECT_TRUE(bit_equal(oa.probs, ob.probs));
  Tensor dxa = Tensor::zeros({kT, kH}, DType::f64), dxb = Tensor::zeros({kT, kH}, DType::f64);
  a.backward(G, dxa, sa);
  b.backward(G, dxb, sb);
  EXPECT_TRUE(bit_equal(a.weight().grad, b.weight().grad));
  EXPECT_TRUE(bit_equal(dxa, dxb));
  a.finish_step();  // nothing was counted: the bias stays zero
  for (float v : a.expert_bias().value.to_vector<float>()) EXPECT_EQ(v, 0.0f);
  // The same router in training mode does get losses and jitter.
  ActivationStore st;
  RouterOutput ot = a.forward(x, ForwardContext{}, st);
  EXPECT_GT(ot.aux_loss, 0.0);
  EXPECT_GT(ot.z_loss, 0.0);
  EXPECT_FALSE(bit_equal(ot.probs, oa.probs));
}

TEST(Router, RecomputeAndOffloadGiveBitIdenticalGradients) {
  MoEConfig c = base_config(8, 2, "sigmoid");
  c.params_dtype = "fp32";
  c.moe_input_jitter_eps = 0.1;
  c.moe_router_load_balancing_type = {"aux_loss"};
  c.moe_aux_loss_coeff = {0.01};
  c.moe_z_loss_coeff = 0.001;
  c.moe_expert_capacity_factor = 1.0;
  Tensor x = randn({kT, kH}, DType::f32, 41), G = randn({kT, 8}, DType::f32, 42);
  struct Grads {
    Tensor dw, dx;
    int64_t regen, reloads;
  };
  auto run = [&](const std::vector<std::pair<std::string, SavePolicy>>& policies) {
    Router r(c, Device::cpu());
    ActivationStore st;
    for (const auto& [slot, pol] : policies) st.set_policy(slot, pol);
    ForwardContext ctx;
    ctx.step = 2;
    r.forward(x, ctx, st);
    Tensor dx = Tensor::zeros({kT, kH}, DType::f32);
    r.backward(G, dx, st);
    return Grads{r.weight().grad.clone(), dx, st.regenerations(), st.reloads()};
  };
  Grads keep = run({});
  Grads rec = run({{"router.logits", SavePolicy::recompute}});
  Grads both = run({{"router.logits", SavePolicy::recompute}, {"router.input", SavePolicy::offload}});
  Grads off = run({{"router.", SavePolicy::offload}});
  EXPECT_EQ(keep.regen, 0);
  EXPECT_EQ(rec.regen, 1);
  EXPECT_EQ(both.regen, 1);
  EXPECT_EQ(both.reloads, 1);
  EXPECT_EQ(off.reloads, 2);
  for (const Grads* g : {&rec, &both, &off}) {
    EXPECT_TRUE(bit_equal(g->dw, keep.dw));
    EXPECT_TRUE(bit_equal(g->dx, keep.dx));
  }
}

TEST(Router, LossScaleScalesOnlyTheInjectedGradients) {
  MoEConfig c = base_config(8, 2);
  c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss"};
  c.moe_aux_loss_coeff = {0.1};  // one coefficient for both types
  c.moe_z_loss_coeff = 0.1;
  Tensor x = randn({kT, kH}, DType::f64, 51);
  Tensor zero = Tensor::zeros({kT, 8}, DType::f64);
  auto grad = [&](double scale, double& aux, double& z) {
    Router r(c, Device::cpu());
    ActivationStore st;
    ForwardContext ctx;
    ctx.loss_scale = scale;
    ctx.seq_length = 12;
    ctx.batch_size = 3;
    RouterOutput o = r.forward(x, ctx, st);
    aux = o.aux_loss;
    z = o.z_loss;
    Tensor dx = Tensor::zeros({kT, kH}, DType::f64);
    r.backward(zero, dx, st);  // only the aux and z gradients flow
    return dx;
  };
  double aux1, z1, aux2, z2;
  Tensor g1 = grad(1.0, aux1, z1), g2 = grad(0.25, aux2, z2);
  EXPECT_EQ(aux1, aux2);  // the reported values do not depend on the scale
  EXPECT_EQ(z1, z2);
  EXPECT_GT(std::abs(to_f64(g1)[0]), 0.0);
  ops::axpby(0.25, g1, 0.0, g1);
  EXPECT_TRUE(all_close(g2, g1, 1e-15, 1e-12));
}

TEST(Router, GroupSizesScaleLossesAndGradients) {
  MoEConfig c = base_config(8, 2);
  c.moe_router_load_balancing_type = {"aux_loss"};
  c.moe_aux_loss_coeff = {0.1};
  Tensor x = randn({kT, kH}, DType::f64, 61);
  Tensor zero = Tensor::zeros({kT, 8}, DType::f64);
  auto run = [&](const MoEConfig& cfg, RouterGroups groups, double& aux, double& z) {
    Router r(cfg, Device::cpu(), groups);
    ActivationStore st;
    RouterOutput o = r.forward(x, ForwardContext{}, st);
    aux = o.aux_loss;
    z = o.z_loss;
    Tensor dx = Tensor::zeros({kT, kH}, DType::f64);
    r.backward(zero, dx, st);
    return dx;
  };
  double a1, z1, a2, z2;
  // n identical TP×CP ranks: counts and T_tot scale by n, so each rank's gradient is 1/n of the
  // single-rank one and the summed value equals it.
  auto comm = std::make_shared<FakeComm>(2);
  Tensor g1 = run(c, {}, a1, z1);
  Tensor g2 = run(c, {comm, nullptr}, a2, z2);
  EXPECT_GT(comm->calls, 0);
  EXPECT_NEAR(a2, a1, 1e-15);
  ops::axpby(0.5, g1, 0.0, g1);
  EXPECT_TRUE(all_close(g2, g1, 1e-15, 1e-12));
  // z-loss: coeff / n per rank, summed over n ranks.
  MoEConfig cz = base_config(8, 2);
  cz.moe_z_loss_coeff = 0.1;
  g1 = run(cz, {}, a1, z1);
  g2 = run(cz, {std::make_shared<FakeComm>(4), nullptr}, a2, z2);
  EXPECT_NEAR(z2, z1, 1e-14 * z1);
  ops::axpby(0.25, g1, 0.0, g1);
  EXPECT_TRUE(all_close(g2, g1, 1e-15, 1e-12));
  // global aux over TP×DP×CP of 4 identical ranks: counts ×4, T_tot ×4 → a quarter per rank.
  MoEConfig cg = base_config(8, 2);
  cg.moe_router_load_balancing_type = {"global_aux_loss"};
  cg.moe_aux_loss_coeff = {0.1};
  run(cg, {}, a1, z1);
  run(cg, {nullptr, std::make_shared<FakeComm>(4)}, a2, z2);
  EXPECT_NEAR(a2, a1 / 4, 1e-15);
}

TEST(Router, ZeroTokenRankStillJoinsCollectives) {
  MoEConfig c = base_config(8, 2, "sigmoid");
  c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss", "global_aux_loss"};
  c.moe_aux_loss_coeff = {0.1};
  c.moe_z_loss_coeff = 0.1;
  c.moe_router_enable_expert_bias = true;
  c.moe_expert_capacity_factor = 1.0;
  auto run = [&](int64_t T, int& tp_cp_calls, int& tp_dp_cp_calls) {
    auto a = std::make_shared<FakeComm>(2), b = std::make_shared<FakeComm>(4);
    Router r(c, Device::cpu(), {a, b});
    ActivationStore st;
    RouterOutput o = r.forward(randn({T, kH}, DType::f64, 91), ForwardContext{}, st);
    Tensor dx = Tensor::zeros({T, kH}, DType::f64);
    r.backward(Tensor::zeros({T, 8}, DType::f64), dx, st);
    r.finish_step();
    tp_cp_calls = a->calls;
    tp_dp_cp_calls = b->calls;
    return o;
  };
  int a0, b0, a1, b1;
  RouterOutput o = run(0, a0, b0);
  run(kT, a1, b1);
  EXPECT_EQ(a0, a1);  // the same collectives in the same number: no rank hangs
  EXPECT_EQ(b0, b1);
  EXPECT_EQ(o.aux_loss, 0.0);
  EXPECT_EQ(o.z_loss, 0.0);
  EXPECT_EQ(o.capacity, 0);
  EXPECT_EQ(o.tokens_per_expert, std::vector<int64_t>(8, 0));
}

TEST(Router, Bf16ParamsAndRouterDtypes) {
  // bf16 params: the router computes in f32; the gradients come back in bf16 and accumulate.
  MoEConfig c = base_config(8, 2, "sigmoid");
  c.params_dtype = "bf16";
  c.moe_router_load_balancing_type = {"aux_loss"};
  c.moe_aux_loss_coeff = {0.1};
  Router r(c, Device::cpu());
  EXPECT_EQ(r.router_dtype(), DType::f32);
  EXPECT_EQ(r.weight().value.dtype(), DType::bf16);
  Tensor x = ops::cast(randn({kT, kH}, DType::f64, 71), DType::bf16);
  Tensor G = randn({kT, 8}, DType::f32, 72);
  ActivationStore st;
  RouterOutput o = r.forward(x, ForwardContext{}, st);
  EXPECT_EQ(o.probs.dtype(), DType::f32);
  Tensor dx = Tensor::zeros({kT, kH}, DType::bf16);
  r.backward(G, dx, st);
  // The same computation in f64 from the same (bf16-exact) values.
  MoEConfig c64 = c;
  c64.params_dtype = "fp64";
  Router r64(c64, Device::cpu());
  r64.weight().value.copy_from(ops::cast(r.weight().value, DType::f64));
  ActivationStore st64;
  RouterOutput o64 = r64.forward(ops::cast(x, DType::f64), ForwardContext{}, st64);
  ASSERT_TRUE(bit_equal(o.topk_idx, o64.topk_idx));
  EXPECT_TRUE(all_close(o.probs, o64.probs, 1e-6, 1e-5));
  EXPECT_NEAR(o.aux_loss, o64.aux_loss, 1e-6);
  Tensor dx64 = Tensor::zeros({kT, kH}, DType::f64);
  r64.backward(ops::cast(G, DType::f64), dx64, st64);
  EXPECT_TRUE(all_close(r.weight().grad, r64.weight().grad, 2e-2, 1e-2));  // bf16 rounding of the result
  EXPECT_TRUE(all_close(dx, dx64, 2e-2, 1e-2));
  // An explicit fp64 router dtype with fp32 params.
  MoEConfig c2 = base_config(8, 2);
  c2.params_dtype = "fp32";
  c2.moe_router_dtype = "fp64";
  Router r2(c2, Device::cpu());
  EXPECT_EQ(r2.router_dtype(), DType::f64);
  ActivationStore s2;
  RouterOutput o2 = r2.forward(randn({kT, kH}, DType::f32, 73), ForwardContext{}, s2);
  EXPECT_EQ(o2.probs.dtype(), DType::f64);
  Tensor dx2 = Tensor::zeros({kT, kH}, DType::f32);
  r2.backward(randn({kT, 8}, DType::f64, 74), dx2, s2);
  EXPECT_EQ(r2.weight().grad.dtype(), DType::f32);
}

TEST(Router, JitterIsAPureFunctionOfStepLayerAndMicrobatch) {
  MoEConfig c = base_config(8, 2);
  c.moe_input_jitter_eps = 0.3;
  Tensor x = randn({kT, kH}, DType::f64, 81);
  auto probs = [&](int64_t layer, int64_t step, int64_t mb) {
    Router r(c, Device::cpu(), {}, layer);
    ActivationStore st;
    ForwardContext ctx;
    ctx.step = step;
    ctx.microbatch = mb;
    return r.forward(x, ctx, st).probs;
  };
  Tensor p = probs(1, 2, 3);
  EXPECT_TRUE(bit_equal(p, probs(1, 2, 3)));
  EXPECT_FALSE(bit_equal(p, probs(0, 2, 3)));
  EXPECT_FALSE(bit_equal(p, probs(1, 1, 3)));
  EXPECT_FALSE(bit_equal(p, probs(1, 2, 0)));
}

// ---------------------------------------------------------------------------------------------
namespace {
}  // namespace

TEST(Router, BadInputsNameTheProblem) {
  MoEConfig c = base_config(8, 2);
  Router r(c, Device::cpu());
  ActivationStore st;
  ForwardContext ctx;
  expect_error([&] { r.forward(Tensor::zeros({kT, kH + 1}, DType::f64), ctx, st); }, "x must be (T, H=12)");
  expect_error([&] { r.forward(Tensor::zeros({kT * kH}, DType::f64), ctx, st); }, "x must be (T, H=12)");
  expect_error([&] { r.forward(Tensor(), ctx, st); }, "undefined");
  expect_error([&] { r.forward(Tensor::zeros({kT, kH}, DType::f32), ctx, st); }, "params dtype f64");
  Tensor dx = Tensor::zeros({kT, kH}, DType::f64);
  expect_error([&] { r.backward(Tensor::zeros({kT, 8}, DType::f64), dx, st); }, "no pending forward");
  r.forward(randn({kT, kH}, DType::f64, 1), ctx, st);
  expect_error([&] { r.backward(Tensor::zeros({kT, 7}, DType::f64), dx, st); }, "dprobs");
  expect_error([&] { r.backward(Tensor::zeros({kT, 8}, DType::f32), dx, st); }, "dprobs");
  Tensor dx32 = Tensor::zeros({kT, kH}, DType::f32);
  expect_error([&] { r.backward(Tensor::zeros({kT, 8}, DType::f64), dx32, st); }, "dx");
  r.backward(Tensor::zeros({kT, 8}, DType::f64), dx, st);
  expect_error([&] { r.backward(Tensor::zeros({kT, 8}, DType::f64), dx, st); }, "no pending forward");
  // seq_aux_loss needs T = seq_length · batch_size.
  MoEConfig cs = base_config(8, 2);
  cs.moe_router_load_balancing_type = {"seq_aux_loss"};
  cs.moe_aux_loss_coeff = {0.1};
  Router rs(cs, Device::cpu());
  ForwardContext bad;
  bad.seq_length = 10;
  bad.batch_size = 3;
  expect_error([&] { rs.forward(randn({kT, kH}, DType::f64, 1), bad, st); }, "seq_length");
}

TEST(Router, BadConfigsNameTheKey) {
  auto ctor = [](std::function<void(MoEConfig&)> edit) {
    return [edit] {
      MoEConfig c = base_config(8, 2);
      edit(c);
      Router r(c, Device::cpu());
    };
  };
  expect_error(ctor([](MoEConfig& c) { c.moe_router_topk = 9; }), "moe_router_topk");
  expect_error(ctor([](MoEConfig& c) { c.moe_router_score_function = "tanh"; }), "moe_router_score_function");
  expect_error(ctor([](MoEConfig& c) { c.moe_router_topk = 1; }), "moe_router_pre_softmax");
  expect_error(ctor([](MoEConfig& c) { c.moe_router_enable_expert_bias = true; }), "moe_router_enable_expert_bias");
  expect_error(ctor([](MoEConfig& c) {
                 c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss", "z"};
               }),
               "moe_router_load_balancing_type");
  expect_error(ctor([](MoEConfig& c) {
                 c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss", "global_aux_loss"};
                 c.moe_aux_loss_coeff = {0.1, 0.2};
               }),
               "moe_aux_loss_coeff");
  expect_error(ctor([](MoEConfig& c) { c.moe_router_num_groups = 4; }), "moe_router_group_topk");
  expect_error(ctor([](MoEConfig& c) {
                 c.moe_router_num_groups = 3;
                 c.moe_router_group_topk = 1;
               }),
               "moe_router_num_groups");
  expect_error(ctor([](MoEConfig& c) { c.moe_router_dtype = "bf16"; }), "moe_router_dtype");
  expect_error(ctor([](MoEConfig& c) { c.params_dtype = "fp16"; }), "params_dtype");
  expect_error(ctor([](MoEConfig& c) { c.moe_token_drop_policy = "random"; }), "moe_token_drop_policy");
  expect_error(ctor([](MoEConfig& c) { c.moe_pad_expert_input_to_capacity = true; }), "moe_expert_capacity_factor");
  expect_error(ctor([](MoEConfig& c) { c.hidden_size = 0; }), "hidden_size");
}
