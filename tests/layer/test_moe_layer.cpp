// The whole MoE layer against a naive dense loop (each token through its k experts, weighted sum,
// plus the shared expert), finite-difference gradients of the whole layer in f64, and the
// saved-slot policies (keep / recompute / offload) giving bit-identical results.
#include <gtest/gtest.h>

#include <cmath>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/moecore.h"

using namespace moe;
using test::all_close;
using test::check_grad;
using test::randn;
using test::to_f64;

namespace {

MoEConfig base_config() {
  MoEConfig c;
  c.hidden_size = 12;
  c.num_moe_experts = 6;
  c.moe_ffn_hidden_size = 8;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.init_method_std = 0.3;
  c.seed = 7;
  return c;
}

double act_ref(const std::string& f, double x) {
  if (f == "silu") return x / (1 + std::exp(-x));
  if (f == "gelu") return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
  double r = x > 0 ? x : 0;  // relu2
  return r * r;
}

// out (T, H) = Σ_e map[t,e]·W2[e]·(act(W1[e]·x_t)·p[t,e]) (+ shared expert), in double.
std::vector<double> dense_reference(MoELayer& layer, const std::vector<double>& x, int64_t T) {
  const MoEConfig& c = layer.config();
  const int64_t H = c.hidden_size, E = c.num_moe_experts, F = c.moe_ffn_hidden_size;
  const bool glu = c.gated_linear_unit;
  std::vector<double> W1 = to_f64(layer.experts().fc1().value);  // (E, F1, H)
  std::vector<double> W2 = to_f64(layer.experts().fc2().value);  // (E, H, F)
  std::vector<double> P = to_f64(layer.last_routing().probs);     // (T, E)
  std::vector<double> M = to_f64(layer.last_routing().routing_map);
  const int64_t F1 = glu ? 2 * F : F;
  std::vector<double> out(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      if (M[t * E + e] == 0) continue;
      std::vector<double> h(F1, 0.0), a(F, 0.0);
      for (int64_t f = 0; f < F1; ++f)
        for (int64_t j = 0; j < H; ++j) h[f] += W1[(e * F1 + f) * H + j] * x[t * H + j];
      for (int64_t f = 0; f < F; ++f)
        a[f] = (glu ? act_ref(c.activation_func, h[f]) * h[F + f] : act_ref(c.activation_func, h[f])) * P[t * E + e];
      for (int64_t j = 0; j < H; ++j)
        for (int64_t f = 0; f < F; ++f) out[t * H + j] += W2[(e * H + j) * F + f] * a[f];
    }
  if (SharedExperts* s = layer.shared_experts()) {
    const int64_t Fs = c.moe_shared_expert_intermediate_size.value();
    const int64_t F1s = glu ? 2 * Fs : Fs;
    std::vector<double> S1 = to_f64(s->fc1().value), S2 = to_f64(s->fc2().value);
    std::vector<double> G = s->has_gate() ? to_f64(s->gate().value) : std::vector<double>();
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> h(F1s, 0.0), a(Fs, 0.0);
      for (int64_t f = 0; f < F1s; ++f)
        for (int64_t j = 0; j < H; ++j) h[f] += S1[f * H + j] * x[t * H + j];
      for (int64_t f = 0; f < Fs; ++f)
        a[f] = glu ? act_ref(c.activation_func, h[f]) * h[Fs + f] : act_ref(c.activation_func, h[f]);
      double gate = 1.0;
      if (s->has_gate()) {
        double z = 0;
        for (int64_t j = 0; j < H; ++j) z += G[j] * x[t * H + j];
        gate = 1 / (1 + std::exp(-z));
      }
      for (int64_t j = 0; j < H; ++j) {
        double y = 0;
        for (int64_t f = 0; f < Fs; ++f) y += S2[j * Fs + f] * a[f];
        out[t * H + j] += y * gate;
      }
    }
  }
  return out;
}

struct Case {
  const char* name;
  void (*tweak)(MoEConfig&);
};

const Case kCases[] = {
    {"softmax_swiglu_shared_gate",
     [](MoEConfig& c) {
       c.moe_shared_expert_intermediate_size = 10;
       c.moe_shared_expert_gate = true;
       c.moe_z_loss_coeff = 1e-3;
     }},
    {"sigmoid_groups_bias",
     [](MoEConfig& c) {
       c.num_moe_experts = 8;
       c.moe_router_topk = 4;
       c.moe_router_score_function = "sigmoid";
       c.moe_router_num_groups = 4;
       c.moe_router_group_topk = 2;
       c.moe_router_enable_expert_bias = true;
       c.moe_router_topk_scaling_factor = 2.5;
       c.moe_router_load_balancing_type = {"seq_aux_loss"};
     }},
    {"pre_softmax_top1_gelu",
     [](MoEConfig& c) {
       c.moe_router_topk = 1;
       c.moe_router_pre_softmax = true;
       c.gated_linear_unit = false;
       c.activation_func = "gelu";
     }},
    {"capacity_probs_relu2",
     [](MoEConfig& c) {
       c.moe_expert_capacity_factor = 0.75;
       c.gated_linear_unit = false;
       c.activation_func = "relu2";
     }},
    {"capacity_position_padded",
     [](MoEConfig& c) {
       c.moe_expert_capacity_factor = 1.0;
       c.moe_token_drop_policy = "position";
       c.moe_pad_expert_input_to_capacity = true;
     }},
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class LayerCases : public ::testing::TestWithParam<Case> {};

TEST_P(LayerCases, MatchesNaiveDenseLoop) {
  MoEConfig c = base_config();
  GetParam().tweak(c);
  c.params_dtype = "fp64";
  MoELayer layer(c, Device::cpu());
  const int64_t S = 5, B = 3, T = S * B;
  Tensor x = randn({S, B, c.hidden_size}, DType::f64, 11);
  Tensor out = layer.forward(x, ForwardContext{});
  std::vector<double> ref = dense_reference(layer, to_f64(x), T);
  EXPECT_TRUE(all_close(to_f64(out), ref, 1e-12, 1e-10));
  // Every token keeps at most k experts, and dropless routing keeps exactly T·k.
  int64_t routed = 0;
  for (int64_t n : layer.last_routing().tokens_per_expert) routed += n;
  if (!c.moe_expert_capacity_factor) {
    EXPECT_EQ(routed, T * c.moe_router_topk);
  }
}

// Σ out·G + aux + z, evaluated by a fresh forward.
double layer_loss(MoELayer& layer, const Tensor& x, const Tensor& G) {
  Tensor out = layer.forward(x, ForwardContext{});
  std::vector<double> o = to_f64(out), g = to_f64(G);
  double l = 0;
  for (size_t i = 0; i < o.size(); ++i) l += o[i] * g[i];
  return l + layer.last_routing().aux_loss + layer.last_routing().z_loss;
}

TEST_P(LayerCases, GradientsMatchFiniteDifferences) {
  MoEConfig c = base_config();
  GetParam().tweak(c);
  c.params_dtype = "fp64";
  MoELayer layer(c, Device::cpu());
  const int64_t S = 4, B = 2;
  Tensor x = randn({S, B, c.hidden_size}, DType::f64, 21);
  Tensor G = randn({S, B, c.hidden_size}, DType::f64, 22);
  layer.zero_grad();
  layer.forward(x, ForwardContext{});
  Tensor dx = layer.backward(G);
  auto loss = [&] { return layer_loss(layer, x, G); };
  EXPECT_TRUE(check_grad(loss, x, dx, 1e-6, 1e-6)) << "input";
  for (Parameter* p : layer.parameters()) {
    if (!p->trainable) continue;
    Tensor an = p->grad.clone();
    EXPECT_TRUE(check_grad(loss, p->value, an, 1e-6, 1e-6, 64)) << p->name;
  }
}

TEST_P(LayerCases, SlotPoliciesAreBitIdentical) {
  MoEConfig c = base_config();
  GetParam().tweak(c);
  const int64_t S = 6, B = 2;
  Tensor x = randn({S, B, c.hidden_size}, DType::f32, 31);
  Tensor G = randn({S, B, c.hidden_size}, DType::f32, 32);
  auto run = [&](const MoEConfig& cfg, std::vector<Tensor>& grads) {
    MoELayer layer(cfg, Device::cpu());
    Tensor out = layer.forward(x, ForwardContext{});
    Tensor dx = layer.backward(G);
    grads = {out, dx};
    for (Parameter* p : layer.parameters())
      if (p->trainable) grads.push_back(p->grad);
  };
  std::vector<Tensor> keep, recompute, offload;
  run(c, keep);
  MoEConfig rc = c;
  rc.recompute_granularity = "selective";
  rc.recompute_modules = {"moe_act", "moe"};
  if (c.has_shared_expert()) rc.recompute_modules.push_back("shared_experts");
  run(rc, recompute);
  MoEConfig oc = c;
  oc.fine_grained_activation_offloading = true;
  oc.offload_modules = {"expert_fc1", "moe_act"};
  oc.min_offloaded_tensor_size = 0;  // tiny shapes (Megatron's default skips tensors under 1M elements)
  run(oc, offload);
  ASSERT_EQ(keep.size(), recompute.size());
  for (size_t i = 0; i < keep.size(); ++i) {
    EXPECT_TRUE(test::bit_equal(keep[i], recompute[i])) << "recompute, tensor " << i;
    EXPECT_TRUE(test::bit_equal(keep[i], offload[i])) << "offload, tensor " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, LayerCases, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// Routing computed here from scratch for the default softmax top-k: logits = x·Wᵀ, top-k, softmax
// over the k, so the layer test does not trust the router's own output.
TEST(MoELayer, RouterProbsFromScratch) {
  MoEConfig c = base_config();
  c.params_dtype = "fp64";
  MoELayer layer(c, Device::cpu());
  const int64_t T = 9, H = c.hidden_size, E = c.num_moe_experts, k = c.moe_router_topk;
  Tensor x = randn({T, H}, DType::f64, 41);
  layer.forward(x, ForwardContext{});
  std::vector<double> W = to_f64(layer.router().weight().value), xv = to_f64(x);
  std::vector<double> P = to_f64(layer.last_routing().probs);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<std::pair<double, int64_t>> l(E);
    for (int64_t e = 0; e < E; ++e) {
      double z = 0;
      for (int64_t j = 0; j < H; ++j) z += W[e * H + j] * xv[t * H + j];
      l[e] = {z, e};
    }
    std::sort(l.begin(), l.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    double mx = l[0].first, den = 0;
    for (int64_t j = 0; j < k; ++j) den += std::exp(l[j].first - mx);
    std::vector<double> want(E, 0.0);
    for (int64_t j = 0; j < k; ++j) want[l[j].second] = std::exp(l[j].first - mx) / den;
    for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(P[t * E + e], want[e], 1e-13) << "token " << t << " expert " << e;
  }
}

// Experts that receive no token: the output still matches and their gradients are exactly zero.
TEST(MoELayer, ZeroTokenExpertsGiveZeroGradients) {
  MoEConfig c = base_config();
  c.params_dtype = "fp64";
  MoELayer layer(c, Device::cpu());
  const int64_t T = 8, H = c.hidden_size, E = c.num_moe_experts;
  // Router weight rows 0 and 1 large and aligned with x: experts 0 and 1 take every token.
  std::vector<double> W(static_cast<size_t>(E * H), 0.0);
  for (int64_t j = 0; j < H; ++j) {
    W[0 * H + j] = 1.0;
    W[1 * H + j] = 0.5;
  }
  layer.router().weight().value.copy_from(Tensor::from_vector(W, {E, H}));
  Tensor x = test::uniform({T, H}, DType::f64, 51, 0.5, 1.0);
  Tensor out = layer.forward(x, ForwardContext{});
  const auto& load = layer.last_routing().tokens_per_expert;
  EXPECT_EQ(load[0], T);
  EXPECT_EQ(load[1], T);
  for (int64_t e = 2; e < E; ++e) EXPECT_EQ(load[e], 0);
  EXPECT_TRUE(all_close(to_f64(out), dense_reference(layer, to_f64(x), T), 1e-12, 1e-10));
  layer.zero_grad();
  Tensor dx = layer.backward(randn({T, H}, DType::f64, 52));
  std::vector<double> g1 = to_f64(layer.experts().fc1().grad);
  const int64_t per = static_cast<int64_t>(g1.size()) / E;
  for (int64_t e = 2; e < E; ++e)
    for (int64_t i = 0; i < per; ++i) ASSERT_EQ(g1[e * per + i], 0.0) << "expert " << e;
  for (double v : to_f64(dx)) ASSERT_TRUE(std::isfinite(v));
}

// Recompute and offload hold fewer bytes on the device between forward and backward.
TEST(MoELayer, RecomputeAndOffloadReduceSavedDeviceBytes) {
  MoEConfig c = base_config();
  c.moe_shared_expert_intermediate_size = 16;
  const int64_t T = 64;
  Tensor x = randn({T, c.hidden_size}, DType::f32, 61);
  auto saved = [&](const MoEConfig& cfg) {
    MoELayer layer(cfg, Device::cpu());
    layer.forward(x, ForwardContext{});
    return std::pair<int64_t, int64_t>(layer.store().device_bytes(), layer.store().host_bytes());
  };
  auto [keep_dev, keep_host] = saved(c);
  MoEConfig rc = c;
  rc.recompute_granularity = "selective";
  rc.recompute_modules = {"moe_act", "shared_experts"};
  auto [rc_dev, rc_host] = saved(rc);
  MoEConfig oc = c;
  oc.fine_grained_activation_offloading = true;
  oc.offload_modules = {"expert_fc1", "moe_act"};
  oc.min_offloaded_tensor_size = 0;  // tiny shapes (Megatron's default skips tensors under 1M elements)
  auto [of_dev, of_host] = saved(oc);
  EXPECT_EQ(keep_host, 0);
  EXPECT_LT(rc_dev, keep_dev);
  EXPECT_LT(of_dev, keep_dev);
  EXPECT_GT(of_host, 0);
}

TEST(MoELayer, BadInputIsAClearError) {
  MoEConfig c = base_config();
  MoELayer layer(c, Device::cpu());
  Tensor wrong_h = Tensor::zeros({4, c.hidden_size + 1}, DType::f32);
  EXPECT_THROW(layer.forward(wrong_h, ForwardContext{}), Error);
  Tensor wrong_dtype = Tensor::zeros({4, c.hidden_size}, DType::f64);
  EXPECT_THROW(layer.forward(wrong_dtype, ForwardContext{}), Error);
  EXPECT_THROW(layer.backward(Tensor::zeros({4, c.hidden_size}, DType::f32)), Error);
  MoEConfig bad = c;
  bad.moe_router_topk = 7;
  EXPECT_THROW(MoELayer(bad, Device::cpu()), Error);
}

}  // namespace

namespace {

// bf16 parameters and activations (f32 router and compute): the same function as f32, to bf16's
// precision.
TEST(MoELayer, Bf16FollowsF32) {
  MoEConfig c = base_config();
  c.moe_shared_expert_intermediate_size = 8;
  c.moe_shared_expert_gate = true;
  c.init_method_std = 0.25;
  const int64_t T = 24;
  Tensor x32 = randn({T, c.hidden_size}, DType::f32, 71);
  Tensor g32 = randn({T, c.hidden_size}, DType::f32, 72);
  // Round the inputs to bf16 first so both runs see the same values.
  x32 = x32.to_dtype(DType::bf16).to_dtype(DType::f32);
  g32 = g32.to_dtype(DType::bf16).to_dtype(DType::f32);
  MoELayer f(c, Device::cpu());
  MoEConfig cb = c;
  cb.params_dtype = "bf16";
  MoELayer b(cb, Device::cpu());
  EXPECT_EQ(b.router().router_dtype(), DType::f32);
  // Same parameter values: the bf16 layer's, widened.
  for (Parameter* p : f.parameters()) {
    Parameter* q = b.find_parameter(p->name);
    ASSERT_NE(q, nullptr) << p->name;
    if (p->value.defined()) p->value.copy_from(q->value.to_dtype(p->value.dtype()));
  }
  Tensor yf = f.forward(x32, ForwardContext{});
  Tensor yb = b.forward(x32.to_dtype(DType::bf16), ForwardContext{});
  EXPECT_TRUE(test::bit_equal(f.last_routing().routing_map, b.last_routing().routing_map));
  EXPECT_TRUE(all_close(yb, yf, 2e-2, 2e-2));
  Tensor dxf = f.backward(g32), dxb = b.backward(g32.to_dtype(DType::bf16));
  EXPECT_TRUE(all_close(dxb, dxf, 2e-2, 2e-2));
  for (Parameter* p : f.parameters()) {
    if (!p->trainable) continue;
    EXPECT_EQ(b.find_parameter(p->name)->grad.dtype(), DType::bf16);
    EXPECT_TRUE(all_close(b.find_parameter(p->name)->grad, p->grad, 3e-2, 3e-2)) << p->name;
  }
}

}  // namespace
