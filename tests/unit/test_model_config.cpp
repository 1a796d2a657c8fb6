// The GPT model's config keys: JSON parsing (moe_layer_freq as an int or a list), Megatron's
// defaults, and every validate_model() rule, each broken alone from a valid config, with a message
// that names the key, the value and what is allowed.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/config.h"
#include "moecore/model.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;

namespace {

MoEConfig model_config() {
  MoEConfig c;
  c.num_layers = 4;
  c.hidden_size = 16;
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.vocab_size = 64;
  c.seq_length = 16;
  c.num_moe_experts = 8;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  return c;
}

std::string model_error(const MoEConfig& c, int64_t world = 0) {
  return error_of([&] { validate_model(c, world); });
}

TEST(ModelConfig, DefaultsFollowMegatron) {
  MoEConfig c = model_config();
  EXPECT_NO_THROW(validate_model(c));
  c.num_query_groups.reset();
  EXPECT_EQ(c.query_groups(), 4);
  EXPECT_EQ(c.head_dim(), 4);       // hidden_size / num_attention_heads
  EXPECT_EQ(c.dense_ffn(), 64);     // 4 · hidden_size
  EXPECT_EQ(resolve_model_config(c).moe_ffn_hidden_size, 64);  // moe_ffn_hidden_size ← ffn_hidden_size
  EXPECT_EQ(MoEConfig{}.normalization, "LayerNorm");
  EXPECT_EQ(MoEConfig{}.position_embedding_type, "learned_absolute");
}

TEST(ModelConfig, MoeLayerFreqIntOrList) {
  MoEConfig c = config_from_json(R"({"num_layers": 4, "moe_layer_freq": 2})");
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_FALSE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));
  c = config_from_json(R"({"num_layers": 4, "moe_layer_freq": [0, 1, 1, 0]})");
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));
  c = config_from_json(R"({"num_layers": 3})");
  for (int64_t i = 0; i < 3; ++i) EXPECT_TRUE(c.is_moe_layer(i)) << i;
  MoEConfig bad = model_config();
  bad.moe_layer_freq = {1, 2, 0, 1};
  EXPECT_TRUE(contains_all(model_error(bad), {"moe_layer_freq[1] = 2", "0 (dense) or 1 (MoE)"}));
  bad.moe_layer_freq = {1, 0};
  EXPECT_TRUE(contains_all(model_error(bad), {"moe_layer_freq", "num_layers = 4"}));
  bad.moe_layer_freq = {0};
  EXPECT_TRUE(contains_all(model_error(bad), {"moe_layer_freq", "N >= 1"}));
}

TEST(ModelConfig, EveryRuleNamesItsKey) {
  struct Case {
    std::function<void(MoEConfig&)> breaks;
    std::vector<std::string> says;
  };
  const std::vector<Case> cases = {
      {[](MoEConfig& c) { c.num_layers = 0; }, {"num_layers", ">= 1"}},
      {[](MoEConfig& c) { c.vocab_size = 0; }, {"vocab_size", ">= 1"}},
      {[](MoEConfig& c) { c.seq_length = 0; }, {"seq_length", ">= 1"}},
      {[](MoEConfig& c) { c.num_attention_heads = 0; }, {"num_attention_heads", ">= 1"}},
      {[](MoEConfig& c) { c.num_query_groups = 3; }, {"num_attention_heads = 4", "num_query_groups = 3"}},
      {[](MoEConfig& c) { c.hidden_size = 18; c.num_query_groups.reset(); }, {"hidden_size = 18", "num_attention_heads = 4", "kv_channels"}},
      {[](MoEConfig& c) { c.normalization = "BatchNorm"; }, {"normalization", "'BatchNorm'", "RMSNorm"}},
      {[](MoEConfig& c) { c.layernorm_epsilon = 0; }, {"layernorm_epsilon", "> 0"}},
      {[](MoEConfig& c) { c.position_embedding_type = "alibi"; }, {"position_embedding_type", "'alibi'", "rope"}},
      {[](MoEConfig& c) { c.rotary_percent = 1.5; }, {"rotary_percent", "(0, 1]"}},
      {[](MoEConfig& c) { c.rotary_percent = 0.25; }, {"rotary dims", "4·0.25 = 1"}},
      {[](MoEConfig& c) { c.add_bias_linear = true; }, {"add_bias_linear = true", "not supported"}},
      {[](MoEConfig& c) { c.hidden_dropout = 0.1; }, {"hidden_dropout = 0.1", "no dropout"}},
      {[](MoEConfig& c) { c.attention_dropout = 0.1; }, {"attention_dropout = 0.1", "no dropout"}},
      {[](MoEConfig& c) { c.num_microbatches = 0; }, {"num_microbatches", ">= 1"}},
      {[](MoEConfig& c) { c.moe_router_topk = 9; }, {"moe_router_topk", "num_moe_experts = 8"}},  // the MoE part too
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    MoEConfig c = model_config();
    cases[i].breaks(c);
    EXPECT_TRUE(contains_all(model_error(c), cases[i].says)) << "case " << i;
  }
}

TEST(ModelConfig, ParallelRules) {
  MoEConfig c = model_config();
  c.tensor_model_parallel_size = 2;
  EXPECT_NO_THROW(validate_model(c, 2));
  c.vocab_size = 63;
  EXPECT_TRUE(contains_all(model_error(c, 2), {"vocab_size = 63", "tensor_model_parallel_size = 2", "vocab-parallel"}));
  c = model_config();
  c.tensor_model_parallel_size = 4;
  EXPECT_TRUE(contains_all(model_error(c, 4), {"num_query_groups = 2", "tensor_model_parallel_size = 4"}));
  c = model_config();
  c.context_parallel_size = 2;
  c.seq_length = 6;
  EXPECT_TRUE(contains_all(model_error(c, 2), {"seq_length = 6", "2·context_parallel_size = 4", "chunks"}));
  c.seq_length = 12;
  c.tensor_model_parallel_size = 2;
  EXPECT_NO_THROW(validate_model(c, 4));  // 12 % (TP·CP) == 0 and 12 % (2·CP) == 0
  c.seq_length = 10;
  c.context_parallel_size = 1;
  c.tensor_model_parallel_size = 2;
  c.num_query_groups = 2;
  EXPECT_NO_THROW(validate_model(c, 2));
  c.seq_length = 9;
  EXPECT_TRUE(contains_all(model_error(c, 2), {"seq_length = 9", "tensor_model_parallel_size·context_parallel_size = 2"}));
  c = model_config();
  c.pipeline_model_parallel_size = 3;  // 4 layers over 3 stages need an explicit uneven split
  EXPECT_TRUE(contains_all(model_error(c, 3), {"num_layers = 4", "pipeline_model_parallel_size = 3",
                                                "decoder_first_pipeline_num_layers"}));
  c = model_config();
  c.tensor_model_parallel_size = 2;
  EXPECT_TRUE(contains_all(model_error(c, 1), {"world size 1", "tensor_model_parallel_size"}));  // TP 2 on one process
}

TEST(ModelConfig, SequenceLayoutIsMegatronsLoadBalancedChunks) {
  // S = 16, CP = 2: chunks of 4; CP rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  SequenceLayout l = SequenceLayout::make(16, 2, 2, 0, 1);
  EXPECT_EQ(l.cp_positions, (std::vector<int64_t>{0, 1, 2, 3, 12, 13, 14, 15}));
  EXPECT_EQ(l.local_positions, (std::vector<int64_t>{12, 13, 14, 15}));  // TP rank 1: the second half
  EXPECT_EQ(l.key_positions,
            (std::vector<int64_t>{0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11}));
  SequenceLayout one = SequenceLayout::make(6, 1, 3, 0, 2);
  EXPECT_EQ(one.cp_positions, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(one.local_positions, (std::vector<int64_t>{4, 5}));
  EXPECT_TRUE(contains_all(error_of([] { SequenceLayout::make(6, 2, 1, 0, 0); }), {"seq_length 6", "2·CP"}));
}

}  // namespace
