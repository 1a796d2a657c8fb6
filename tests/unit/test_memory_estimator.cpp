// estimate_memory (moecore/memory.h) against the allocator: one process, a grid of model configs
// (dense + MoE layers, GQA, qk-layernorm, tied / untied, RMSNorm / LayerNorm, bf16 / f32, AdamW /
// SGD, shared experts, capacity, the memory policies). For each, a training step's measured peak
// (tests/common/memory_measure.h) must be within 10 % of the estimate, and the static parts (weights,
// gradients + main grads, optimizer state) must equal the model's and the optimizer's own bytes.
// The layouts across ranks are in tests/dist/test_memory_estimator_dist.cpp.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/memory_measure.h"
#include "common/test_util.h"
#include "moecore/moecore.h"

using namespace moe;
using moe::test::measure_step;
using moe::test::MeasuredStep;
using moe::test::contains_all;
using moe::test::error_of;

namespace {

MoEConfig base_config() {
  MoEConfig c = moe::test::memory_test_model();
  c.moe_layer_freq = {2};  // layer 0 MoE, layer 1 dense
  return c;
}

struct Case {
  std::string name;
  std::function<void(MoEConfig&, MemoryLayout&)> edit;
};

std::vector<Case> grid() {
  return {
      {"dense+moe gqa rope rmsnorm tied f32 adam M2", [](MoEConfig&, MemoryLayout&) {}},
      {"untied layernorm qk-norm learned bf16", [](MoEConfig& c, MemoryLayout&) {
         c.untie_embeddings_and_output_weights = true;
         c.normalization = "LayerNorm";
         c.qk_layernorm = true;
         c.position_embedding_type = "learned_absolute";
         c.params_dtype = "bf16";
       }},
      {"all moe, gated shared expert, gelu, sgd", [](MoEConfig& c, MemoryLayout& l) {
         c.moe_layer_freq = {1};
         c.moe_shared_expert_intermediate_size = 96;
         c.moe_shared_expert_gate = true;
         c.gated_linear_unit = false;
         c.activation_func = "gelu";
         l.optimizer = "sgd";
       }},
      {"dense only, large vocabulary (logits dominate)", [](MoEConfig& c, MemoryLayout&) {
         c.moe_layer_freq = {0, 0};
         c.vocab_size = 2048;
       }},
      {"4 layers, b 4, capacity 1.0 padded, z-loss, sigmoid", [](MoEConfig& c, MemoryLayout& l) {
         c.num_layers = 4;
         c.moe_layer_freq = {1};
         c.moe_expert_capacity_factor = 1.0;
         c.moe_pad_expert_input_to_capacity = true;
         c.moe_z_loss_coeff = 1e-3;
         c.moe_router_score_function = "sigmoid";
         l.micro_batch_size = 4;
         l.num_microbatches = 1;
       }},
      {"recompute moe_act + shared_experts", [](MoEConfig& c, MemoryLayout&) {
         c.moe_layer_freq = {1};
         c.moe_shared_expert_intermediate_size = 64;
         c.recompute_granularity = "selective";
         c.recompute_modules = {"moe_act", "shared_experts"};
       }},
      {"recompute moe, bf16", [](MoEConfig& c, MemoryLayout&) {
         c.moe_layer_freq = {1};
         c.params_dtype = "bf16";
         c.recompute_granularity = "selective";
         c.recompute_modules = {"moe"};
       }},
      {"recompute layernorm + core_attn + mlp", [](MoEConfig& c, MemoryLayout&) {
         c.recompute_granularity = "selective";
         c.recompute_modules = {"layernorm", "core_attn", "mlp"};
       }},
      {"full recompute uniform 2 of 4 layers", [](MoEConfig& c, MemoryLayout&) {
         c.num_layers = 4;
         c.recompute_granularity = "full";
         c.recompute_method = "uniform";
         c.recompute_num_layers = 2;
       }},
      {"full recompute block 1 of 4 layers", [](MoEConfig& c, MemoryLayout&) {
         c.num_layers = 4;
         c.recompute_granularity = "full";
         c.recompute_method = "block";
         c.recompute_num_layers = 1;
       }},
      {"offload attn_norm + core_attn + attn_proj + mlp_norm", [](MoEConfig& c, MemoryLayout&) {
         c.fine_grained_activation_offloading = true;
         c.offload_modules = {"attn_norm", "core_attn", "attn_proj", "mlp_norm"};
         c.min_offloaded_tensor_size = 1024;
       }},
      {"offload expert_fc1 + moe_act", [](MoEConfig& c, MemoryLayout&) {
         c.moe_layer_freq = {1};
         c.fine_grained_activation_offloading = true;
         c.offload_modules = {"expert_fc1", "moe_act"};
         c.min_offloaded_tensor_size = 1024;  // elements: the test's slots are small
       }},
  };
}

MemoryLayout layout_for(const MoEConfig& c) {
  MemoryLayout l = MemoryLayout::from_config(c, 1);
  l.micro_batch_size = 4;
  l.num_microbatches = 2;
  return l;
}

}  // namespace

// Each config of the grid: static parts exact, what one forward keeps and the total within 10 % of
// the measured bytes. Prints the docs/memory.md table rows (sizes in KiB).
TEST(MemoryEstimator, WithinTenPercentOfTheAllocatorPeak) {
  std::printf("| config | measured peak | estimate | error | weights | grads | optimizer | activations | transient | peak at |\n");
  for (const Case& k : grid()) {
    MoEConfig c = base_config();
    MemoryLayout l = layout_for(c);
    k.edit(c, l);
    validate_model(c, 1);
    const MemoryEstimate e = estimate_memory(c, l);
    const MeasuredStep m = measure_step(c, l);
    std::printf("%s\n", moe::test::memory_row(k.name, e, m).c_str());
    std::printf("    (one micro-batch's forward keeps: measured %.1f KiB, estimated %.1f KiB, %+.1f%%)\n",
                static_cast<double>(m.first_forward) / 1024.0,
                static_cast<double>(e.activation_bytes_per_microbatch) / 1024.0,
                100.0 * (static_cast<double>(e.activation_bytes_per_microbatch) - static_cast<double>(m.first_forward)) /
                    static_cast<double>(m.first_forward));
    EXPECT_EQ(e.weight_bytes, m.weights) << k.name;
    EXPECT_EQ(e.gradient_bytes, m.grads) << k.name;
    EXPECT_EQ(e.optimizer_bytes, m.optimizer) << k.name;
    // The activation model on its own: what one micro-batch's forward keeps (static bytes would
    // otherwise hide an error in it).
    EXPECT_LE(moe::test::rel_error(e.activation_bytes_per_microbatch, m.first_forward), 0.10)
        << k.name << ": estimated " << e.activation_bytes_per_microbatch << " bytes kept by a forward, measured "
        << m.first_forward;
    EXPECT_LE(moe::test::rel_error(e.total_bytes, m.peak), 0.10)
        << k.name << ": estimated " << e.total_bytes << " bytes, measured peak " << m.peak;
  }
}

// Recompute and offload lower the estimate by what they drop, and the estimate names the policy's
// effect the allocator sees (checked above); here the direction on a config where it must show.
TEST(MemoryEstimator, PoliciesLowerTheActivations) {
  MoEConfig c = base_config();
  c.moe_layer_freq = {1};
  const MemoryLayout l = layout_for(c);
  const int64_t keep = estimate_memory(c, l).activation_bytes_per_microbatch;
  MoEConfig act = c;
  act.recompute_granularity = "selective";
  act.recompute_modules = {"moe_act"};
  MoEConfig off = c;
  off.fine_grained_activation_offloading = true;
  off.offload_modules = {"expert_fc1"};
  off.min_offloaded_tensor_size = 1024;
  const MemoryEstimate e_off = estimate_memory(off, l);
  EXPECT_LT(estimate_memory(act, l).activation_bytes_per_microbatch, keep);
  EXPECT_LT(e_off.activation_bytes_per_microbatch, keep);
  EXPECT_GT(e_off.offloaded_bytes, 0);
}

// The distributed optimizer shards masters and moments over DP×CP (dense) and EDP (experts); the
// estimate divides them while weights and gradients stay (one stage of a 4-rank EP 2 layout).
TEST(MemoryEstimator, DistributedOptimizerShardsTheState) {
  MoEConfig c = base_config();
  c.expert_model_parallel_size = 2;
  c.params_dtype = "bf16";
  validate_model(c, 4);
  MemoryLayout l = MemoryLayout::from_config(c, 4);
  const MemoryEstimate rep = estimate_memory(c, l);
  l.use_distributed_optimizer = true;
  const MemoryEstimate dist = estimate_memory(c, l);
  EXPECT_EQ(rep.weight_bytes, dist.weight_bytes);
  EXPECT_EQ(rep.gradient_bytes, dist.gradient_bytes);
  EXPECT_EQ(rep.dp, 4);
  EXPECT_EQ(rep.edp, 2);
  // 12 bytes per element (master + 2 moments): dense / 4, experts / 2, up to padding.
  EXPECT_LT(dist.optimizer_bytes, rep.optimizer_bytes / 2);
  EXPECT_GT(dist.optimizer_bytes, rep.optimizer_bytes / 4);
}

// Pipeline stages: the embedding on the first, the output layer (tied copy) on the last; 1F1B holds
// PP − s micro-batches on stage s.
TEST(MemoryEstimator, PipelineStages) {
  MoEConfig c = base_config();
  c.num_layers = 4;
  c.pipeline_model_parallel_size = 4;
  MemoryLayout l = MemoryLayout::from_config(c, 4);
  l.num_microbatches = 8;
  const std::vector<MemoryEstimate> st = estimate_memory_per_stage(c, l);
  ASSERT_EQ(st.size(), 4u);
  for (int64_t s = 0; s < 4; ++s) {
    EXPECT_EQ(st[s].microbatches_in_flight, 4 - s);
    EXPECT_EQ(st[s].num_layers, 1);
    EXPECT_EQ(st[s].first_layer, s);
  }
  EXPECT_TRUE(st[0].has_embedding && !st[0].has_output_layer);
  EXPECT_TRUE(st[3].has_output_layer && st[3].has_tied_copy);
  const std::string line = format_memory_estimate(st[3], {3});
  EXPECT_TRUE(contains_all(line, {"stage 3 of 4", "Theoretical memory footprints", "weight=", "gradient=",
                                  "optimizer state=", "activation=", "total=", "GiB", "ranks 3"}))
      << line;
}

TEST(MemoryEstimator, BadInputIsRefused) {
  MoEConfig c = base_config();
  MemoryLayout l = layout_for(c);
  l.pp_rank = 1;
  EXPECT_TRUE(contains_all(error_of([&] { estimate_memory(c, l); }), {"pp_rank 1", "pipeline_model_parallel_size 1"}));
  l = layout_for(c);
  l.micro_batch_size = 0;
  EXPECT_TRUE(contains_all(error_of([&] { estimate_memory(c, l); }), {"micro_batch_size", "got 0"}));
  l = layout_for(c);
  l.sizes.tp = 2;
  l.sizes.world = 2;
  EXPECT_TRUE(contains_all(error_of([&] { estimate_memory(c, l); }), {"tp 2", "config's (tp 1"}));
  MoEConfig not_model;
  not_model.hidden_size = 8;
  EXPECT_FALSE(error_of([&] { estimate_memory(not_model, layout_for(c)); }).empty());
}
