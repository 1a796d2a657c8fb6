// Recompute and offload measured by the allocator (docs/memory.md):
//   - `moe` recompute keeps only the layer's input: the allocator's current device bytes right
//     after the forward minus right before it are the output and the last-routing report, nothing
//     else, and outputs, gradients, losses, expert bias and global-aux counts are bit-identical to
//     keep (two micro-batches in flight, backwards in reverse order);
//   - every selective module and offload module bit-identical to keep, each holding fewer bytes;
//   - the offload manager: pinned buffers reused across steps (the allocator's pinned bytes stay
//     flat), prefetch of the slot the backward needs next, caller-held and small tensors kept.
#include <gtest/gtest.h>

#include <cstdio>
#include <map>

#include "common/test_util.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

MoEConfig layer_config() {
  MoEConfig c;
  c.hidden_size = 16;
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 12;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.init_method_std = 0.3;
  c.seed = 11;
  return c;
}

int64_t device_current() { return get_backend(Device::cpu()).memory_stats().current_bytes; }
int64_t pinned_current() { return get_backend(Device::cpu()).memory_stats().pinned_current_bytes; }

struct StepResult {
  std::vector<Tensor> tensors;  // outputs, input grads, parameter grads, expert bias
  std::vector<double> losses;   // aux and z of each forward
  std::vector<int64_t> activation_bytes;  // allocator bytes each forward left behind, minus its output
  int64_t peak = 0;  // allocator peak over the two steps, above the bytes before them
};

// Two steps of two micro-batches each (forwards 0, 1, backwards 1, 0), finish_step between.
StepResult run_steps(const MoEConfig& cfg, bool jitter_ctx = true) {
  MoELayer layer(cfg, Device::cpu());
  const int64_t S = 8, B = 2, H = cfg.hidden_size;
  StepResult r;
  const int64_t base = device_current();
  get_backend(Device::cpu()).reset_peak_memory();
  for (int64_t step = 0; step < 2; ++step) {
    std::vector<Tensor> xs, gs, outs;
    for (int64_t m = 0; m < 2; ++m) {
      xs.push_back(test::randn({S, B, H}, DType::f32, 100 + 10 * step + m));
      gs.push_back(test::randn({S, B, H}, DType::f32, 200 + 10 * step + m));
    }
    for (int64_t m = 0; m < 2; ++m) {
      ForwardContext ctx;
      ctx.microbatch = m;
      ctx.step = jitter_ctx ? step : 0;
      const int64_t before = device_current();
      outs.push_back(layer.forward(xs[m], ctx));
      const RoutingSummary& rs = layer.last_routing();
      r.activation_bytes.push_back(device_current() - before - static_cast<int64_t>(outs.back().nbytes()));
      r.losses.push_back(rs.aux_loss);
      r.losses.push_back(rs.z_loss);
      r.tensors.push_back(outs.back());
    }
    for (int64_t m = 1; m >= 0; --m) r.tensors.push_back(layer.backward(gs[m], m));
    layer.finish_step();
  }
  r.peak = get_backend(Device::cpu()).memory_stats().peak_bytes - base;
  for (Parameter* p : layer.parameters()) r.tensors.push_back(p->trainable ? p->grad : p->value);
  return r;
}

void expect_bit_identical(const StepResult& a, const StepResult& b, const std::string& what) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << what;
  for (size_t i = 0; i < a.tensors.size(); ++i) EXPECT_TRUE(test::bit_equal(a.tensors[i], b.tensors[i])) << what << ", tensor " << i;
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) EXPECT_EQ(a.losses[i], b.losses[i]) << what << ", loss " << i;
}

MoEConfig with_recompute(MoEConfig c, std::vector<std::string> modules) {
  c.recompute_granularity = "selective";
  c.recompute_modules = std::move(modules);
  return c;
}

MoEConfig with_offload(MoEConfig c, std::vector<std::string> modules) {
  c.fine_grained_activation_offloading = true;
  c.offload_modules = std::move(modules);
  c.min_offloaded_tensor_size = 0;
  return c;
}

struct Case {
  const char* name;
  void (*tweak)(MoEConfig&);
};

const Case kCases[] = {
    {"plain", [](MoEConfig&) {}},
    {"jitter_seqaux_z_gated_shared",
     [](MoEConfig& c) {
       c.moe_input_jitter_eps = 0.05;
       c.moe_router_load_balancing_type = {"seq_aux_loss"};
       c.moe_z_loss_coeff = 1e-3;
       c.moe_shared_expert_intermediate_size = 16;
       c.moe_shared_expert_gate = true;
     }},
    {"sigmoid_bias_global_aux",
     [](MoEConfig& c) {
       c.moe_router_score_function = "sigmoid";
       c.moe_router_enable_expert_bias = true;
       c.moe_router_bias_update_rate = 0.01;
       c.moe_router_load_balancing_type = {"global_aux_loss", "aux_loss"};
       c.moe_aux_loss_coeff = {0.02, 0.01};
     }},
    {"capacity_pad", [](MoEConfig& c) {
       c.moe_expert_capacity_factor = 1.0;
       c.moe_pad_expert_input_to_capacity = true;
       c.moe_token_drop_policy = "position";
     }},
};

class MemoryCases : public ::testing::TestWithParam<Case> {};

}  // namespace

// `moe` recompute: the same bits as keep, and the forward leaves on the device only what the caller
// holds (its input and output), the last-routing report (probs (T, E), routing map (T, E), counts
// (E)) and the routing losses' E-sized state (aux / z gradient weights and loss values, kept so
// nothing is counted twice): nothing that grows with the tokens beyond the input.
TEST_P(MemoryCases, MoeRecomputeKeepsOnlyTheInputAndIsBitIdentical) {
  MoEConfig c = layer_config();
  GetParam().tweak(c);
  StepResult keep = run_steps(c);
  StepResult moe = run_steps(with_recompute(c, {"moe"}));
  expect_bit_identical(keep, moe, "moe recompute");
  const int64_t T = 16, B = 2, E = c.num_moe_experts, H = c.hidden_size;
  const int64_t report = T * E * (4 + 1) + E * 8;  // probs f32, routing map u8, counts i64
  const int64_t routing_state = 2 * B * E * 8 + 2 * 8;  // ≤ two aux types' (B, E) f64 weights, (2) f64 losses
  for (size_t i = 0; i < moe.activation_bytes.size(); ++i) {
    // Every forward after the first replaces the previous forward's report.
    const int64_t extra = moe.activation_bytes[i] - (i == 0 ? report : 0);
    EXPECT_GE(extra, 0) << "forward " << i;
    EXPECT_LE(extra, routing_state) << "forward " << i << ": moe recompute keeps only its input";
    EXPECT_GT(keep.activation_bytes[i] - (i == 0 ? report : 0), 4 * T * H * 4)
        << "forward " << i << ": keep holds more than 4x the input";
  }
  // Two micro-batches in flight: the step's peak falls (the first micro-batch's state is gone
  // while the second runs).
  EXPECT_LT(moe.peak, keep.peak) << "moe recompute lowers the peak with two micro-batches in flight";
  // The same with 4x the tokens: what moe recompute keeps does not grow with them.
  MoEConfig big = with_recompute(c, {"moe"});
  MoELayer layer(big, Device::cpu());
  Tensor x = test::randn({4 * 8, B, H}, DType::f32, 9);
  ForwardContext ctx;
  const int64_t before = device_current();
  Tensor out = layer.forward(x, ctx);
  const int64_t big_report = 4 * T * E * 5 + E * 8;
  EXPECT_LE(device_current() - before - static_cast<int64_t>(out.nbytes()) - big_report, routing_state);
  EXPECT_EQ(layer.saved_device_bytes(), static_cast<int64_t>(x.nbytes())) << "the one saved slot is the input";
  EXPECT_TRUE(layer.store().get("moe.input").shares_storage_with(x));
  layer.release(0);
}

// Every selective module and offload module of the layer: bit-identical, and fewer device bytes
// left by the forward than keep (allocator).
TEST_P(MemoryCases, EachModulePolicyIsBitIdenticalAndSaves) {
  MoEConfig c = layer_config();
  GetParam().tweak(c);
  StepResult keep = run_steps(c);
  std::vector<std::pair<std::string, MoEConfig>> policies = {
      {"recompute moe_act", with_recompute(c, {"moe_act"})},
      {"recompute moe_act+moe", with_recompute(c, {"moe_act", "moe"})},
      {"offload expert_fc1", with_offload(c, {"expert_fc1"})},
      {"offload moe_act", with_offload(c, {"moe_act"})},
  };
  if (c.has_shared_expert()) {
    policies.push_back({"recompute shared_experts", with_recompute(c, {"shared_experts"})});
    policies.push_back({"offload shared_experts", with_offload(c, {"shared_experts"})});
  }
  for (const auto& [name, pc] : policies) {
    SCOPED_TRACE(name);
    StepResult r = run_steps(pc);
    expect_bit_identical(keep, r, name);
    EXPECT_LT(r.activation_bytes[0], keep.activation_bytes[0]) << name << " saves nothing by the allocator";
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, MemoryCases, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// The pinned pool is reused across steps: the pinned bytes after the first step stay flat and the
// later steps allocate no new buffer. Offloaded slots come back in reverse save order, each get()
// prefetching the one saved before it.
TEST(OffloadManager, PoolReusedAcrossStepsAndPrefetchInReverseOrder) {
  auto mgr = std::make_shared<OffloadManager>();
  const int64_t pinned0 = pinned_current();
  std::vector<Tensor> t = {test::randn({32, 16}, DType::f32, 1), test::randn({32, 8}, DType::f32, 2),
                           test::randn({64, 16}, DType::f32, 3)};
  int64_t total = 0;
  for (const Tensor& x : t) total += static_cast<int64_t>(x.nbytes());
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    ActivationStore st;
    st.set_offload_manager(mgr);
    st.set_policy("a.", SavePolicy::offload);
    const int64_t dev0 = device_current();
    for (size_t i = 0; i < t.size(); ++i) st.save("a." + std::to_string(i), t[i].clone());
    EXPECT_EQ(device_current(), dev0) << "offloaded slots hold no device memory";
    EXPECT_EQ(st.host_bytes(), total);
    EXPECT_EQ(pinned_current(), pinned0 + total);
    Tensor last = st.get("a.2");  // the backward's first need: prefetches a.1
    EXPECT_EQ(st.prefetches(), 1);
    EXPECT_EQ(st.device_bytes(), static_cast<int64_t>(t[2].nbytes() + t[1].nbytes()));
    EXPECT_TRUE(test::bit_equal(last, t[2]));
    EXPECT_TRUE(test::bit_equal(st.get("a.1"), t[1]));  // prefetches a.0
    EXPECT_EQ(st.prefetches(), 2);
    EXPECT_TRUE(test::bit_equal(st.get("a.0"), t[0]));
    EXPECT_EQ(st.reloads(), 3);
    st.clear();
    OffloadManager::Stats s = mgr->stats();
    EXPECT_EQ(s.buffers_created, 3) << "every step after the first reuses the pool";
    EXPECT_EQ(s.buffers_reused, 3 * step);
    EXPECT_EQ(s.in_flight, 0);
    EXPECT_EQ(s.pooled_bytes, total);
    EXPECT_EQ(pinned_current(), pinned0 + total) << "the pool holds its buffers, nothing more";
  }
  mgr->trim();
  EXPECT_EQ(pinned_current(), pinned0);
}

// A tensor the caller still holds is kept (offloading it would free nothing), as is one under the
// minimum size; a bare store frees its pinned buffer after the copy back.
TEST(OffloadManager, CallerHeldAndSmallTensorsAreKept) {
  ActivationStore st;
  st.set_policy("x", SavePolicy::offload);
  st.set_policy("y", SavePolicy::offload);
  st.set_policy("z", SavePolicy::offload);
  st.set_min_offload_numel(100);
  Tensor x = test::randn({16, 16}, DType::f32, 4);
  st.save("x", x, {}, SaveOwner::caller);
  st.save("y", test::randn({9, 11}, DType::f32, 5));  // 99 elements < 100
  st.save("z", test::randn({10, 10}, DType::f32, 6));
  EXPECT_EQ(st.saved_policy("x"), SavePolicy::keep);
  EXPECT_EQ(st.saved_policy("y"), SavePolicy::keep);
  EXPECT_EQ(st.saved_policy("z"), SavePolicy::offload);
  EXPECT_TRUE(st.get("x").shares_storage_with(x));
  const int64_t pinned0 = pinned_current();
  st.get("z");
  EXPECT_EQ(pinned_current(), pinned0 - 400) << "a bare store frees the pinned buffer after the copy back";
}

// The shared expert's input is the layer's input, which the caller (and the router) hold:
// offloading shared_experts must not move it, only the expert's own intermediates.
TEST(OffloadManager, SharedExpertsOffloadLeavesTheCallersInput) {
  MoEConfig c = with_offload(layer_config(), {"shared_experts"});
  c.moe_shared_expert_intermediate_size = 16;
  MoELayer layer(c, Device::cpu());
  Tensor x = test::randn({16, c.hidden_size}, DType::f32, 7);
  layer.forward(x, ForwardContext{});
  EXPECT_EQ(layer.store().saved_policy("shared_experts.fc1_input"), SavePolicy::keep);
  EXPECT_EQ(layer.store().saved_policy("shared_experts.fc1_output"), SavePolicy::offload);
  EXPECT_TRUE(layer.store().get("shared_experts.fc1_input").shares_storage_with(x));
  layer.release(0);
}

// ---- the model: every recompute / offload module and full recompute, by the allocator ----------------

namespace {

MoEConfig model_config() {
  MoEConfig c;
  c.num_layers = 4;
  c.hidden_size = 16;
  c.num_attention_heads = 2;
  c.vocab_size = 13;
  c.seq_length = 8;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 12;
  c.ffn_hidden_size = 24;
  c.moe_layer_freq = {0, 1, 1, 0};  // dense, MoE, MoE, dense
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.1};
  c.moe_z_loss_coeff = 0.01;
  c.moe_input_jitter_eps = 0.05;
  c.moe_shared_expert_intermediate_size = 8;
  c.normalization = "LayerNorm";
  c.qk_layernorm = true;
  c.position_embedding_type = "rope";
  c.init_method_std = 0.3;
  c.seed = 5;
  return c;
}

MicroBatch model_batch(const MoEConfig& c, int64_t b, uint64_t seed) {
  std::vector<int64_t> tok(static_cast<size_t>(b * c.seq_length)), lab(tok.size());
  uint64_t x = seed * 2654435761ull + 99;
  for (size_t i = 0; i < tok.size(); ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    tok[i] = static_cast<int64_t>((x >> 33) % static_cast<uint64_t>(c.vocab_size));
    lab[i] = static_cast<int64_t>((x >> 17) % static_cast<uint64_t>(c.vocab_size));
  }
  return MicroBatch{Tensor::from_vector(tok, {b, c.seq_length}), Tensor::from_vector(lab, {b, c.seq_length}), Tensor()};
}

struct ModelRun {
  std::vector<Tensor> grads;
  std::vector<double> losses;
  int64_t activation_bytes = 0;  // allocator bytes the forward of micro-batch 0 left behind
  int64_t peak = 0;              // allocator peak over the step, above the bytes before it
};

// One step of two micro-batches (forwards 0, 1, then backwards 1, 0).
ModelRun run_model(const MoEConfig& cfg) {
  MoEGPTModel model(cfg, Device::cpu());
  Backend& be = get_backend(Device::cpu());
  ModelRun r;
  std::vector<MicroBatch> mbs = {model_batch(cfg, 2, 1), model_batch(cfg, 2, 2)};
  const int64_t base = device_current();
  be.reset_peak_memory();
  for (int64_t m = 0; m < 2; ++m) {
    ForwardContext ctx;
    ctx.microbatch = m;
    ctx.loss_scale = 0.5;
    const int64_t before = device_current();
    r.losses.push_back(model.forward(mbs[static_cast<size_t>(m)], ctx));
    if (m == 0) r.activation_bytes = device_current() - before;
  }
  model.backward_stage(1, Tensor());
  model.backward_stage(0, Tensor());
  r.peak = be.memory_stats().peak_bytes - base;
  model.finish_step();
  for (Parameter* p : model.parameters()) r.grads.push_back(p->grad);
  return r;
}

}  // namespace

// Each policy: the same bits as keep (losses, every gradient), and fewer device bytes kept by the
// forward (allocator). Full recompute with several layers also lowers the step's peak.
TEST(ModelMemoryPolicies, EveryModuleIsBitIdenticalAndSaves) {
  const MoEConfig c = model_config();
  const ModelRun keep = run_model(c);
  auto sel = [&](std::vector<std::string> mods) {
    MoEConfig x = c;
    x.recompute_granularity = "selective";
    x.recompute_modules = std::move(mods);
    return x;
  };
  auto off = [&](std::vector<std::string> mods) {
    MoEConfig x = c;
    x.fine_grained_activation_offloading = true;
    x.offload_modules = std::move(mods);
    x.min_offloaded_tensor_size = 0;
    return x;
  };
  auto full = [&](const char* method, int64_t n) {
    MoEConfig x = c;
    x.recompute_granularity = "full";
    x.recompute_method = method;
    x.recompute_num_layers = n;
    return x;
  };
  const std::vector<std::pair<std::string, MoEConfig>> policies = {
      {"selective core_attn", sel({"core_attn"})},
      {"selective (default: core_attn)", sel({})},
      {"selective layernorm", sel({"layernorm"})},
      {"selective mlp", sel({"mlp"})},
      {"selective moe", sel({"moe"})},
      {"selective moe_act", sel({"moe_act"})},
      {"selective shared_experts", sel({"shared_experts"})},
      {"selective all", sel({"core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts"})},
      {"offload attn_norm", off({"attn_norm"})},
      {"offload core_attn", off({"core_attn"})},
      {"offload attn_proj", off({"attn_proj"})},
      {"offload mlp_norm", off({"mlp_norm"})},
      {"offload expert_fc1", off({"expert_fc1"})},
      {"offload moe_act", off({"moe_act"})},
      {"full uniform 1", full("uniform", 1)},
      {"full uniform 3", full("uniform", 3)},
      {"full block 2", full("block", 2)},
  };
  for (const auto& [name, pc] : policies) {
    SCOPED_TRACE(name);
    const ModelRun r = run_model(pc);
    ASSERT_EQ(r.grads.size(), keep.grads.size());
    for (size_t i = 0; i < r.grads.size(); ++i) EXPECT_TRUE(test::bit_equal(r.grads[i], keep.grads[i])) << "grad " << i;
    for (size_t i = 0; i < r.losses.size(); ++i) EXPECT_EQ(r.losses[i], keep.losses[i]) << "loss " << i;
    EXPECT_LT(r.activation_bytes, keep.activation_bytes) << name << " keeps as much as keep";
    std::printf("%-32s activation_bytes %7lld (keep %lld)  peak %7lld (keep %lld)\n", name.c_str(),
                (long long)r.activation_bytes, (long long)keep.activation_bytes, (long long)r.peak, (long long)keep.peak);
    if (name.rfind("full", 0) == 0) {
      EXPECT_LT(r.peak, keep.peak) << "full recompute lowers the step's peak";
    }
  }
}

// Full recompute keeps each chunk's input only: with chunks of N layers the stage keeps
// ceil(L/N) inputs (s·b, H) beside the head (final norm, logits), so N = 1, 2, 4 differ by exactly
// that many inputs, and the MoE layers keep nothing.
TEST(ModelMemoryPolicies, FullUniformKeepsOnlyTheChunkInputs) {
  const int64_t rows = 8 * 2, H = 16, input = rows * H * 4;
  std::map<int64_t, int64_t> saved;
  for (int64_t n : {1, 2, 4}) {
    MoEConfig c = model_config();
    c.recompute_granularity = "full";
    c.recompute_method = "uniform";
    c.recompute_num_layers = n;
    MoEGPTModel model(c, Device::cpu());
    model.forward(model_batch(c, 2, 1), ForwardContext{});
    for (int64_t l = 0; l < c.num_layers; ++l)
      if (MoELayer* ml = model.moe_layer(l)) {
        EXPECT_EQ(ml->saved_device_bytes(), 0) << "layer " << l << ", N " << n;
      }
    saved[n] = model.saved_activation_bytes();
    model.release_all();
  }
  EXPECT_EQ(saved[1] - saved[4], 3 * input);
  EXPECT_EQ(saved[2] - saved[4], 1 * input);
}

// Megatron's rules for full recompute are refused by name.
TEST(ModelMemoryPolicies, FullRecomputeRulesAreRefused) {
  MoEConfig c = model_config();
  c.recompute_granularity = "full";
  c.recompute_method = "block";
  EXPECT_TRUE(test::contains_all(test::error_of([&] { MoEGPTModel m(c, Device::cpu()); }),
                                 {"recompute_granularity = 'full' needs recompute_num_layers"}));
  c.recompute_num_layers = 5;
  EXPECT_TRUE(test::contains_all(test::error_of([&] { MoEGPTModel m(c, Device::cpu()); }),
                                 {"recompute_num_layers = 5", "between 1 and the layers of pipeline stage 0 (4)"}));
  c.recompute_granularity = "selective";
  c.recompute_num_layers = 2;
  EXPECT_TRUE(test::contains_all(test::error_of([&] { MoEGPTModel m(c, Device::cpu()); }),
                                 {"recompute_num_layers = 2 needs recompute_granularity = 'full'"}));
}
