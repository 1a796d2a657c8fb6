// The MoE GPT model in one process, in f64:
//   - finite-difference gradients of J = lm + Σ_MoE layers (aux + z) for every parameter, on
//     configs that cover tied/untied embeddings, RMSNorm/LayerNorm, rope/learned positions, GQA with
//     qk-layernorm and partial rotary, a dense+MoE layer pattern, a loss mask with holes, a sigmoid
//     router with seq-aux and z losses, a gated shared expert, capacity dropping;
//   - micro-batches: two micro-batches with loss scale 1/2 accumulate the gradient of their mean;
//   - every token routed to the same experts (expert bias) still gives exact gradients;
//   - uniform logits (zero output layer) give lm loss = ln V exactly;
//   - bad inputs (token id ≥ vocab, wrong shapes) are refused with the place and the value.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/moecore.h"

using namespace moe;
using test::check_grad;
using test::contains_all;
using test::error_of;

namespace {

MoEConfig base() {
  MoEConfig c;
  c.num_layers = 2;
  c.hidden_size = 8;
  c.num_attention_heads = 2;
  c.vocab_size = 11;
  c.seq_length = 6;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 6;
  c.ffn_hidden_size = 10;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.1};
  c.moe_z_loss_coeff = 0.01;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.params_dtype = "fp64";
  c.init_method_std = 0.5;
  c.seed = 7;
  return c;
}

// Seeded tokens, labels and (optionally holed) mask for a (b, S) micro-batch.
MicroBatch batch_of(const MoEConfig& c, int64_t b, uint64_t seed, bool holes) {
  std::vector<int64_t> tok(static_cast<size_t>(b * c.seq_length)), lab(tok.size());
  std::vector<float> mask(tok.size(), 1.0f);
  uint64_t x = seed * 2654435761ull + 12345;
  for (size_t i = 0; i < tok.size(); ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    tok[i] = static_cast<int64_t>((x >> 33) % static_cast<uint64_t>(c.vocab_size));
    lab[i] = static_cast<int64_t>((x >> 17) % static_cast<uint64_t>(c.vocab_size));
    if (holes && (i % 3 == 1)) mask[i] = 0.0f;
  }
  MicroBatch mb{Tensor::from_vector(tok, {b, c.seq_length}), Tensor::from_vector(lab, {b, c.seq_length}),
                Tensor::from_vector(mask, {b, c.seq_length})};
  return mb;
}

// J = Σ_m scale·(lm_m + Σ layers (aux + z)) over the micro-batches, forward only.
double objective(MoEGPTModel& model, const std::vector<MicroBatch>& mbs) {
  double J = 0.0;
  for (size_t m = 0; m < mbs.size(); ++m) {
    ForwardContext ctx;
    ctx.microbatch = static_cast<int64_t>(m);
    ctx.loss_scale = 1.0 / static_cast<double>(mbs.size());
    double j = model.forward(mbs[m], ctx);
    for (int64_t i = 0; i < model.num_layers(); ++i)
      if (MoELayer* l = model.moe_layer(i)) j += l->last_routing().aux_loss + l->last_routing().z_loss;
    J += ctx.loss_scale * j;
  }
  return J;
}

void run_backward(MoEGPTModel& model, const std::vector<MicroBatch>& mbs) {
  model.zero_grad();
  for (size_t m = 0; m < mbs.size(); ++m) {
    ForwardContext ctx;
    ctx.microbatch = static_cast<int64_t>(m);
    ctx.loss_scale = 1.0 / static_cast<double>(mbs.size());
    model.forward(mbs[m], ctx);
    model.backward();
  }
}

// Finite differences of every trainable parameter (a few elements each) against the backward.
void check_model_grads(const MoEConfig& c, const std::vector<MicroBatch>& mbs, int64_t per_param = 12) {
  MoEGPTModel model(c, Device::cpu());
  run_backward(model, mbs);
  std::vector<Parameter*> params = model.parameters();
  ASSERT_FALSE(params.empty());
  for (Parameter* p : params) {
    if (!p->trainable) continue;
    Tensor analytic = p->grad.clone();
    auto J = [&] { return objective(model, mbs); };
    EXPECT_TRUE(check_grad(J, p->value, analytic, 1e-6, 2e-6, per_param)) << p->name;
  }
}

TEST(GptModel, GradTiedRmsNormRope) { check_model_grads(base(), {batch_of(base(), 2, 1, false)}); }

TEST(GptModel, GradUntiedLayerNormLearned) {
  MoEConfig c = base();
  c.untie_embeddings_and_output_weights = true;
  c.normalization = "LayerNorm";
  c.position_embedding_type = "learned_absolute";
  check_model_grads(c, {batch_of(c, 2, 2, false)});
}

TEST(GptModel, GradGqaQkLayerNormPartialRotary) {
  MoEConfig c = base();
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.kv_channels = 4;
  c.qk_layernorm = true;
  c.rotary_percent = 0.5;
  c.normalization = "LayerNorm";
  check_model_grads(c, {batch_of(c, 2, 3, false)});
}

TEST(GptModel, GradDenseAndMoeLayersMaskWithHolesTwoMicrobatches) {
  MoEConfig c = base();
  c.num_layers = 3;
  c.moe_layer_freq = {0, 1, 0};
  check_model_grads(c, {batch_of(c, 2, 4, true), batch_of(c, 1, 5, true)});
}

TEST(GptModel, GradSigmoidSeqAuxSharedGateCapacity) {
  MoEConfig c = base();
  c.moe_router_score_function = "sigmoid";
  c.moe_router_load_balancing_type = {"seq_aux_loss"};
  c.moe_shared_expert_intermediate_size = 6;
  c.moe_shared_expert_gate = true;
  c.moe_expert_capacity_factor = 1.5;
  check_model_grads(c, {batch_of(c, 3, 6, false)});
}

TEST(GptModel, GradEveryTokenToTheSameExperts) {
  MoEConfig c = base();
  c.moe_router_score_function = "sigmoid";
  c.moe_router_enable_expert_bias = true;
  c.moe_aux_loss_coeff = {0.0};
  c.moe_router_load_balancing_type = {"none"};
  MoEGPTModel model(c, Device::cpu());
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    Parameter* bias = model.find_parameter("decoder.layers." + std::to_string(i) + ".mlp.router.expert_bias");
    ASSERT_NE(bias, nullptr);
    bias->value.copy_from(Tensor::from_vector(std::vector<float>{0.f, 50.f, 0.f, 50.f}, {4}));
  }
  std::vector<MicroBatch> mbs = {batch_of(c, 2, 8, false)};
  run_backward(model, mbs);
  for (int64_t i = 0; i < model.num_layers(); ++i) {
    const auto& n = model.moe_layer(i)->last_routing().tokens_per_expert;
    EXPECT_EQ(n, (std::vector<int64_t>{0, 12, 0, 12})) << "layer " << i;
  }
  for (Parameter* p : model.parameters()) {
    if (!p->trainable) continue;
    Tensor analytic = p->grad.clone();
    EXPECT_TRUE(check_grad([&] { return objective(model, mbs); }, p->value, analytic, 1e-6, 2e-6, 8)) << p->name;
  }
}

TEST(GptModel, UniformLogitsGiveLnV) {
  MoEConfig c = base();
  c.untie_embeddings_and_output_weights = true;
  MoEGPTModel model(c, Device::cpu());
  model.find_parameter("output_layer.weight")->value.zero_();
  const double lm = model.forward(batch_of(c, 2, 9, true), ForwardContext{});
  EXPECT_NEAR(lm, std::log(static_cast<double>(c.vocab_size)), 1e-12);
}

TEST(GptModel, MicrobatchesAccumulateTheMean) {
  // One micro-batch of 2 sequences without a mask = the mean of two micro-batches of 1 for the lm
  // loss (equal token counts); router losses differ per micro-batch, so they are switched off here.
  MoEConfig c = base();
  c.moe_aux_loss_coeff = {0.0};
  c.moe_z_loss_coeff.reset();
  MicroBatch both = batch_of(c, 2, 10, false);
  MicroBatch first{both.tokens.narrow(0, 1).clone(), both.labels.narrow(0, 1).clone(), Tensor()};
  MicroBatch second{both.tokens.narrow(1, 1).clone(), both.labels.narrow(1, 1).clone(), Tensor()};
  MoEGPTModel a(c, Device::cpu()), b(c, Device::cpu());
  run_backward(a, {MicroBatch{both.tokens, both.labels, Tensor()}});
  run_backward(b, {first, second});
  std::vector<Parameter*> pa = a.parameters(), pb = b.parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    if (!pa[i]->trainable) continue;
    EXPECT_TRUE(test::all_close(pb[i]->grad, pa[i]->grad, 1e-12, 1e-10)) << pa[i]->name;
  }
}

TEST(GptModel, ParameterNamesAreCanonical) {
  MoEConfig c = base();
  c.num_layers = 2;
  c.moe_layer_freq = {0, 1};
  c.untie_embeddings_and_output_weights = true;
  c.qk_layernorm = true;
  c.normalization = "LayerNorm";
  c.position_embedding_type = "learned_absolute";
  MoEGPTModel model(c, Device::cpu());
  std::vector<std::string> names;
  for (Parameter* p : model.parameters()) names.push_back(p->name + " " + shape_str(p->canonical_shape));
  const std::vector<std::string> expected = {
      "embedding.word_embeddings.weight (11, 8)",
      "embedding.position_embeddings.weight (6, 8)",
      "decoder.layers.0.input_layernorm.weight (8,)",
      "decoder.layers.0.input_layernorm.bias (8,)",
      "decoder.layers.0.self_attention.linear_qkv.weight (24, 8)",
      "decoder.layers.0.self_attention.q_layernorm.weight (4,)",
      "decoder.layers.0.self_attention.q_layernorm.bias (4,)",
      "decoder.layers.0.self_attention.k_layernorm.weight (4,)",
      "decoder.layers.0.self_attention.k_layernorm.bias (4,)",
      "decoder.layers.0.self_attention.linear_proj.weight (8, 8)",
      "decoder.layers.0.pre_mlp_layernorm.weight (8,)",
      "decoder.layers.0.pre_mlp_layernorm.bias (8,)",
      "decoder.layers.0.mlp.linear_fc1.weight (20, 8)",
      "decoder.layers.0.mlp.linear_fc2.weight (8, 10)",
      "decoder.layers.1.input_layernorm.weight (8,)",
      "decoder.layers.1.input_layernorm.bias (8,)",
      "decoder.layers.1.self_attention.linear_qkv.weight (24, 8)",
      "decoder.layers.1.self_attention.q_layernorm.weight (4,)",
      "decoder.layers.1.self_attention.q_layernorm.bias (4,)",
      "decoder.layers.1.self_attention.k_layernorm.weight (4,)",
      "decoder.layers.1.self_attention.k_layernorm.bias (4,)",
      "decoder.layers.1.self_attention.linear_proj.weight (8, 8)",
      "decoder.layers.1.pre_mlp_layernorm.weight (8,)",
      "decoder.layers.1.pre_mlp_layernorm.bias (8,)",
      "decoder.layers.1.mlp.router.weight (4, 8)",
      "decoder.layers.1.mlp.experts.linear_fc1.weight (4, 12, 8)",
      "decoder.layers.1.mlp.experts.linear_fc2.weight (4, 8, 6)",
      "decoder.final_layernorm.weight (8,)",
      "decoder.final_layernorm.bias (8,)",
      "output_layer.weight (11, 8)",
  };
  EXPECT_EQ(names, expected);
}

TEST(GptModel, BadInputsAreRefused) {
  MoEConfig c = base();
  MoEGPTModel model(c, Device::cpu());
  MicroBatch mb = batch_of(c, 1, 11, false);
  mb.tokens.data_as<int64_t>()[3] = 11;
  EXPECT_TRUE(contains_all(error_of([&] { model.forward(mb, ForwardContext{}); }),
                           {"token id 11", "(0, 3)", "vocab_size=11"}));
  mb = batch_of(c, 1, 11, false);
  mb.labels = Tensor::zeros({1, 5}, DType::i64);
  EXPECT_TRUE(contains_all(error_of([&] { model.forward(mb, ForwardContext{}); }), {"labels", "(1, 6)"}));
  mb = batch_of(c, 1, 11, false);
  mb.tokens = Tensor::zeros({1, 7}, DType::i64);
  EXPECT_TRUE(contains_all(error_of([&] { model.forward(mb, ForwardContext{}); }), {"tokens", "seq_length=6"}));
  EXPECT_TRUE(contains_all(error_of([&] { model.backward(); }), {"without a forward"}));
  MoEConfig bad = c;
  bad.num_query_groups = 3;
  EXPECT_TRUE(contains_all(error_of([&] { MoEGPTModel m(bad, Device::cpu()); }), {"num_query_groups = 3"}));
}

}  // namespace
