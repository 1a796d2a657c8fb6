// The mixed-precision optimizer in one process: AdamW and SGD against hand-computed steps (bias
// correction, decoupled / coupled weight decay, no decay on 1-D parameters), clipping, a non-finite
// gradient skipping the step, bf16 parameters with f32 masters and main grads, the state's bytes
// against the allocator, main-grad accumulation over micro-batches, and a tiny MoE GPT model
// trained in bf16 tracking the same model in f32.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/moecore.h"
#include "moecore/optim.h"

using namespace moe;

namespace {

Parameter toy(const std::string& name, const std::vector<double>& values, const Shape& shape, DType dtype = DType::f32,
              GradGroup group = GradGroup::dense) {
  Parameter p = make_parameter(name, shape, {}, dtype, Device::cpu(), 1, 0.0, group);
  p.value.copy_from(test::from_f64(values, shape, dtype));
  return p;
}

void set_grad(Parameter& p, const std::vector<double>& g) { p.grad.copy_from(test::from_f64(g, p.value.shape(), p.grad.dtype())); }

std::vector<double> vals(const Parameter& p) { return test::to_f64(p.value); }

OptimizerConfig adam_cfg(double wd = 0.1) {
  OptimizerConfig c;
  c.optimizer = "adam";
  c.weight_decay = wd;
  c.adam_beta1 = 0.9;
  c.adam_beta2 = 0.999;
  c.adam_eps = 1e-8;
  c.clip_grad = 0.0;
  return c;
}

OptimizerConfig sgd_cfg(double momentum, double wd) {
  OptimizerConfig c;
  c.optimizer = "sgd";
  c.sgd_momentum = momentum;
  c.weight_decay = wd;
  c.clip_grad = 0.0;
  return c;
}

// One micro-batch: grads into p->grad, then into the main grads.
void feed(Optimizer& opt, std::vector<std::pair<Parameter*, std::vector<double>>> grads) {
  opt.zero_grad();
  for (auto& [p, g] : grads) set_grad(*p, g);
  opt.accumulate_grads();
}

int64_t cpu_bytes() { return get_backend(Device::cpu()).memory_stats().current_bytes; }

}  // namespace

// PyTorch's AdamW, written out: m = b1 m + (1−b1) g, v = b2 v + (1−b2) g², m̂ = m/(1−b1^t),
// v̂ = v/(1−b2^t), p ← p − lr·(m̂/(√v̂ + eps) + wd·p), with wd = 0 for the 1-D parameter.
TEST(Optimizer, AdamWMatchesClosedFormTwoSteps) {
  const std::vector<double> w0 = {0.5, -1.0, 2.0, 0.25, -0.75, 1.5}, n0 = {1.0, 0.9, 1.1};
  Parameter W = toy("decoder.layers.0.mlp.linear_fc1.weight", w0, {2, 3});
  Parameter N = toy("decoder.layers.0.input_layernorm.weight", n0, {3});
  const std::vector<std::vector<double>> gw = {{0.1, -0.2, 0.3, -0.4, 0.5, 1e-3}, {-0.3, 0.1, 0.2, 0.05, -0.5, 0.7}};
  const std::vector<std::vector<double>> gn = {{0.2, -0.1, 0.05}, {0.3, 0.3, -0.2}};
  const double lr = 0.01, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  Optimizer opt({&W, &N}, adam_cfg(wd));

  auto reference = [&](std::vector<double> p, const std::vector<std::vector<double>>& g, double decay) {
    std::vector<double> m(p.size(), 0.0), v(p.size(), 0.0);
    for (int t = 1; t <= 2; ++t)
      for (size_t i = 0; i < p.size(); ++i) {
        const double gi = g[t - 1][i];
        m[i] = b1 * m[i] + (1 - b1) * gi;
        v[i] = b2 * v[i] + (1 - b2) * gi * gi;
        const double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
        p[i] -= lr * (mh / (std::sqrt(vh) + eps) + decay * p[i]);
      }
    return p;
  };
  for (int t = 0; t < 2; ++t) {
    feed(opt, {{&W, gw[t]}, {&N, gn[t]}});
    OptimizerStepResult r = opt.step(lr);
    EXPECT_FALSE(r.skipped);
  }
  EXPECT_EQ(opt.iteration(), 2);
  EXPECT_TRUE(test::all_close(vals(W), reference(w0, gw, wd), 1e-6, 1e-6)) << "2-D: decoupled weight decay";
  EXPECT_TRUE(test::all_close(vals(N), reference(n0, gn, 0.0), 1e-6, 1e-6)) << "1-D: no weight decay";
  // The weight decay is visible: without it W would be elsewhere.
  EXPECT_FALSE(test::all_close(vals(W), reference(w0, gw, 0.0), 1e-5, 0.0));
}

// PyTorch's SGD (dampening 0, coupled weight decay): d = g + wd·p, buf = μ·buf + d (buf = d on the
// first step), p ← p − lr·buf; no decay on 1-D parameters.
TEST(Optimizer, SgdMomentumMatchesClosedFormTwoSteps) {
  const std::vector<double> w0 = {0.5, -1.0, 2.0, 0.25}, b0 = {0.1, -0.2};
  Parameter W = toy("output_layer.weight", w0, {2, 2});
  Parameter B = toy("decoder.layers.0.self_attention.linear_proj.bias", b0, {2});
  const std::vector<std::vector<double>> gw = {{0.1, -0.2, 0.3, -0.4}, {-0.3, 0.1, 0.2, 0.05}};
  const std::vector<std::vector<double>> gb = {{0.2, -0.1}, {0.3, 0.3}};
  const double lr = 0.1, mu = 0.9, wd = 0.05;
  Optimizer opt({&W, &B}, sgd_cfg(mu, wd));
  auto reference = [&](std::vector<double> p, const std::vector<std::vector<double>>& g, double decay) {
    std::vector<double> buf(p.size(), 0.0);
    for (int t = 0; t < 2; ++t)
      for (size_t i = 0; i < p.size(); ++i) {
        const double d = g[t][i] + decay * p[i];
        buf[i] = t == 0 ? d : mu * buf[i] + d;
        p[i] -= lr * buf[i];
      }
    return p;
  };
  for (int t = 0; t < 2; ++t) {
    feed(opt, {{&W, gw[t]}, {&B, gb[t]}});
    opt.step(lr);
  }
  EXPECT_TRUE(test::all_close(vals(W), reference(w0, gw, wd), 1e-6, 1e-6));
  EXPECT_TRUE(test::all_close(vals(B), reference(b0, gb, 0.0), 1e-6, 1e-6)) << "1-D: no weight decay";
  // Momentum 0 keeps no buffer: p ← p − lr·(g + wd·p).
  Parameter P = toy("w", {1.0, 2.0}, {1, 2});
  Optimizer plain({&P}, sgd_cfg(0.0, 0.5));
  EXPECT_EQ(plain.memory().moment_bytes, 0);
  feed(plain, {{&P, {0.25, -0.5}}});
  plain.step(0.1);
  EXPECT_TRUE(test::all_close(vals(P), {1.0 - 0.1 * (0.25 + 0.5), 2.0 - 0.1 * (-0.5 + 1.0)}, 1e-7, 1e-7));
}

// Megatron's clip_grad_norm_fp32: coeff = max_norm / (norm + 1e-6), applied when < 1.
TEST(Optimizer, ClipsToTheGlobalNorm) {
  for (double clip : {0.0, 1.0, 10.0}) {
    SCOPED_TRACE("clip_grad " + std::to_string(clip));
    Parameter A = toy("a", {1.0, 1.0}, {1, 2}), B = toy("b", {1.0}, {1, 1});
    OptimizerConfig c = sgd_cfg(0.0, 0.0);
    c.clip_grad = clip;
    Optimizer opt({&A, &B}, c);
    feed(opt, {{&A, {3.0, 0.0}}, {&B, {4.0}}});  // the norm over both parameters is 5
    OptimizerStepResult r = opt.step(0.1);
    EXPECT_NEAR(r.grad_norm, 5.0, 1e-12);
    const double k = clip > 0 && clip / (5.0 + 1e-6) < 1 ? clip / (5.0 + 1e-6) : 1.0;
    EXPECT_TRUE(test::all_close(vals(A), {1.0 - 0.1 * 3.0 * k, 1.0}, 1e-7, 1e-7));
    EXPECT_TRUE(test::all_close(vals(B), {1.0 - 0.1 * 4.0 * k}, 1e-7, 1e-7));
    // The main grads are clipped too (what the update used).
    EXPECT_NEAR(test::to_f64(opt.main_grad(&B))[0], 4.0 * k, 1e-6);
  }
}

TEST(Optimizer, NonFiniteGradientSkipsTheStep) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()})
    for (DType dt : {DType::f32, DType::bf16}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " grad " + std::to_string(bad));
      Parameter A = toy("a", {0.5, -0.5}, {1, 2}, dt), B = toy("b", {0.25}, {1}, dt);
      Parameter A2 = toy("a", {0.5, -0.5}, {1, 2}, dt), B2 = toy("b", {0.25}, {1}, dt);
      OptimizerConfig c = adam_cfg();
      c.clip_grad = 1.0;
      Optimizer opt({&A, &B}, c), fresh({&A2, &B2}, c);
      const Tensor a0 = A.value.clone(), b0 = B.value.clone();
      feed(opt, {{&A, {0.1, bad}}, {&B, {0.2}}});
      OptimizerStepResult r = opt.step(0.1);
      EXPECT_TRUE(r.skipped);
      EXPECT_FALSE(std::isfinite(r.grad_norm));
      EXPECT_TRUE(test::bit_equal(A.value, a0));
      EXPECT_TRUE(test::bit_equal(B.value, b0));
      EXPECT_EQ(opt.iteration(), 0);
      EXPECT_EQ(opt.skipped_iterations(), 1);
      // Nothing advanced: the next good step is a first step (bias correction t = 1, zero moments).
      feed(opt, {{&A, {0.1, 0.3}}, {&B, {0.2}}});
      feed(fresh, {{&A2, {0.1, 0.3}}, {&B2, {0.2}}});
      EXPECT_FALSE(opt.step(0.1).skipped);
      fresh.step(0.1);
      EXPECT_TRUE(test::bit_equal(A.value, A2.value));
      EXPECT_TRUE(test::bit_equal(B.value, B2.value));
    }
}

// bf16 parameters keep their dtype; the update goes to f32 masters, so steps smaller than half a
// bf16 ulp accumulate instead of vanishing; micro-batch grads (bf16) are summed in f32.
TEST(Optimizer, Bf16ParametersHaveF32MastersAndMainGrads) {
  Parameter P = toy("w", {1.0, 1.0}, {1, 2}, DType::bf16);
  Optimizer opt({&P}, sgd_cfg(0.0, 0.0));
  ASSERT_EQ(P.value.dtype(), DType::bf16);
  ASSERT_EQ(opt.main_grad(&P).dtype(), DType::f32);
  // Three micro-batches of bf16 grads: the f32 main grad is their exact sum, which bf16 could not hold.
  opt.zero_grad();
  for (double g : {1.0, 1.0 / 256, 1.0 / 256}) {
    set_grad(P, {g, -g});
    opt.accumulate_grads();
    EXPECT_TRUE(test::to_f64(P.grad) == std::vector<double>({0.0, 0.0})) << "p->grad is cleared";
  }
  EXPECT_TRUE(test::to_f64(opt.main_grad(&P)) == std::vector<double>({1.0 + 2.0 / 256, -1.0 - 2.0 / 256}));

  // lr·g = 1e-3 < half a bf16 ulp at 1.0 (2^-8): one step leaves the bf16 value, ten steps move it.
  Parameter Q = toy("q", {1.0}, {1, 1}, DType::bf16);
  Optimizer o2({&Q}, sgd_cfg(0.0, 0.0));
  feed(o2, {{&Q, {1.0}}});
  o2.step(1e-3);
  EXPECT_EQ(test::to_f64(Q.value)[0], 1.0);
  for (int i = 1; i < 10; ++i) {
    feed(o2, {{&Q, {1.0}}});
    o2.step(1e-3);
  }
  EXPECT_EQ(test::to_f64(Q.value)[0], 0.98828125) << "bf16(0.99): the f32 master accumulated ten steps";
  EXPECT_EQ(Q.value.dtype(), DType::bf16);
}

// state_bytes() is what the allocator handed out: bf16 → main grad 4 + master 4 + moments 8 bytes
// per element; f32 parameters are their own masters (4 + 8).
TEST(Optimizer, StateBytesMatchTheAllocator) {
  for (DType dt : {DType::f32, DType::bf16})
    for (const char* name : {"adam", "sgd"}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + name);
      std::vector<double> v(60, 0.5);
      Parameter A = toy("a", v, {6, 10}, dt), B = toy("b", std::vector<double>(7, 1.0), {7}, dt);
      Parameter bias = make_parameter("router.expert_bias", {4}, {}, DType::f32, Device::cpu(), 1, 0.0,
                                      GradGroup::dense, /*trainable=*/false);
      OptimizerConfig c = adam_cfg();
      c.optimizer = name;
      const int64_t before = cpu_bytes();
      Optimizer opt({&A, &bias, &B}, c);
      const int64_t delta = cpu_bytes() - before;
      const int64_t n = 67, per = 4 + (dt == DType::bf16 ? 4 : 0) + (c.optimizer == "adam" ? 8 : 4);
      EXPECT_EQ(opt.state_bytes(), n * per);
      EXPECT_EQ(delta, opt.state_bytes());
      EXPECT_EQ(opt.memory().num_params, n) << "the non-trainable expert bias is not counted";
      const std::string rep = opt.memory_report();
      EXPECT_TRUE(test::contains_all(rep, {"main grads", "master weights", "moments", "optimizer state"})) << rep;
    }
}

TEST(Optimizer, RefusesWhatItDoesNotImplement) {
  Parameter H = toy("h", {1.0}, {1}, DType::f16);
  test::expect_error([&] { Optimizer o({&H}, OptimizerConfig{}); }, "dynamic loss scaling");
  Parameter D = toy("d", {1.0}, {1}, DType::f64);
  test::expect_error([&] { Optimizer o({&D}, OptimizerConfig{}); }, "f32 or bf16");
  Parameter P = toy("p", {1.0}, {1});
  OptimizerConfig c;
  c.optimizer = "adagrad";
  test::expect_error([&] { Optimizer o({&P}, c); }, "adam, sgd");
  c = OptimizerConfig{};
  c.clip_grad = -1;
  test::expect_error([&] { Optimizer o({&P}, c); }, "clip_grad");
  test::expect_error([&] { Optimizer o({&P, &P}, OptimizerConfig{}); }, "twice");
  // The config refuses fp16 parameters before anything is built.
  MoEConfig mc;
  mc.hidden_size = 8;
  mc.num_moe_experts = 2;
  mc.moe_ffn_hidden_size = 4;
  mc.params_dtype = "fp16";
  test::expect_error([&] { validate(mc); }, "params_dtype");
}

// ---- the model ----------------------------------------------------------------------------------

namespace {

MoEConfig tiny_gpt(const std::string& dtype) {
  MoEConfig c;
  c.num_layers = 2;
  c.moe_layer_freq = {1, 0};
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.ffn_hidden_size = 16;
  c.vocab_size = 32;
  c.seq_length = 8;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 8;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_shared_expert_intermediate_size = 8;
  c.params_dtype = dtype;
  c.init_method_std = 0.1;
  c.seed = 7;
  return c;
}

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// b sequences starting at global sequence index g0: a learnable pattern (next = f(current)).
MicroBatch batch(const MoEConfig& c, int64_t g0, int64_t b) {
  const int64_t S = c.seq_length, V = c.vocab_size;
  std::vector<int64_t> tok(static_cast<size_t>(b * S)), lab(tok.size());
  for (int64_t i = 0; i < b; ++i)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t t = static_cast<int64_t>(mix(static_cast<uint64_t>((g0 + i) * 101 + s)) % static_cast<uint64_t>(V));
      tok[static_cast<size_t>(i * S + s)] = t;
      lab[static_cast<size_t>(i * S + s)] = (3 * t + 1) % V;
    }
  return MicroBatch{Tensor::from_vector(tok, {b, S}), Tensor::from_vector(lab, {b, S}), Tensor()};
}

}  // namespace

// M micro-batches of one sequence each, accumulated into the main grads, equal one micro-batch of M
// sequences (router losses off: the aux loss depends on how tokens are batched). f32 sums in another
// order: agreement to f32 rounding.
TEST(Optimizer, MainGradAccumulationEqualsOneBigMicroBatch) {
  MoEConfig c = tiny_gpt("fp32");
  c.moe_aux_loss_coeff = {0.0};
  const int64_t M = 4;
  MoEGPTModel a(c, Device::cpu()), b(c, Device::cpu());
  Optimizer oa(a.parameters(), adam_cfg()), ob(b.parameters(), adam_cfg());
  oa.zero_grad();
  for (int64_t m = 0; m < M; ++m) {
    ForwardContext ctx;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / static_cast<double>(M);
    a.forward(batch(c, m, 1), ctx);
    a.backward();
    oa.accumulate_grads();
  }
  ob.zero_grad();
  ForwardContext ctx;
  b.forward(batch(c, 0, M), ctx);
  b.backward();
  ob.accumulate_grads();
  int64_t n = 0;
  for (Parameter* p : a.parameters()) {
    if (!p->trainable) continue;
    const std::vector<double> ga = test::to_f64(oa.main_grad(p)), gb = test::to_f64(ob.main_grad(b.find_parameter(p->name)));
    EXPECT_TRUE(test::all_close(ga, gb, 2e-6, 1e-4)) << p->name;
    double norm = 0;
    for (double v : ga) norm += v * v;
    EXPECT_GT(norm, 0.0) << p->name << " has a gradient";
    ++n;
  }
  EXPECT_GT(n, 10);
}

// The same model trained in bf16 and in f32 (the same initial values up to bf16 rounding, the same
// batches) over six AdamW steps: the losses agree within 0.2% and the gradient norms within 2%
// (measured: 5e-4 and 0.4%; bf16 rounds parameters and activations to 2^-9 relative), the bf16
// run is not the f32 one, parameters stay bf16 and the f32 masters are counted.
TEST(Optimizer, Bf16ModelTracksF32Model) {
  const MoEConfig c32 = tiny_gpt("fp32"), c16 = tiny_gpt("bf16");
  MoEGPTModel m32(c32, Device::cpu()), m16(c16, Device::cpu());
  OptimizerConfig oc = adam_cfg(0.01);
  oc.clip_grad = 1.0;
  Optimizer o32(m32.parameters(), oc), o16(m16.parameters(), oc);
  int64_t n16 = 0;
  for (Parameter* p : m16.parameters())
    if (p->trainable) {
      EXPECT_EQ(p->value.dtype(), DType::bf16) << p->name;
      n16 += p->value.numel();
    }
  EXPECT_EQ(o16.memory().master_bytes, 4 * n16);
  EXPECT_EQ(o32.memory().master_bytes, 0);
  const int64_t steps = 6, M = 2;
  std::vector<double> l32, l16;
  for (int64_t st = 0; st < steps; ++st) {
    double s32 = 0, s16 = 0;
    o32.zero_grad();
    o16.zero_grad();
    for (int64_t m = 0; m < M; ++m) {
      ForwardContext ctx;
      ctx.step = st;
      ctx.microbatch = m;
      ctx.loss_scale = 1.0 / static_cast<double>(M);
      const MicroBatch mb = batch(c32, st * M + m, 2);
      s32 += m32.forward(mb, ctx) / static_cast<double>(M);
      m32.backward();
      o32.accumulate_grads();
      s16 += m16.forward(mb, ctx) / static_cast<double>(M);
      m16.backward();
      o16.accumulate_grads();
    }
    m32.finish_step();
    m16.finish_step();
    const OptimizerStepResult r32 = o32.step(3e-3), r16 = o16.step(3e-3);
    EXPECT_FALSE(r16.skipped);
    EXPECT_NEAR(r16.grad_norm, r32.grad_norm, 0.02 * r32.grad_norm) << "step " << st;
    l32.push_back(s32);
    l16.push_back(s16);
  }
  for (int64_t st = 0; st < steps; ++st) {
    SCOPED_TRACE("step " + std::to_string(st) + ": f32 " + std::to_string(l32[st]) + " bf16 " + std::to_string(l16[st]));
    EXPECT_NEAR(l16[st], l32[st], 2e-3 * l32[st]);
    EXPECT_NE(l16[st], l32[st]) << "bf16 must not be f32 in disguise";
  }
  EXPECT_LT(l32.back(), l32.front()) << "training lowers the loss";
  EXPECT_LT(l16.back(), l16.front());
  for (Parameter* p : m16.parameters()) EXPECT_EQ(p->value.dtype(), p->trainable ? DType::bf16 : p->value.dtype());
}
