// parse_megatron_args: a Megatron pretrain_gpt.py command line → TrainingArgs + MoEConfig. Switches,
// space-separated lists, aliases, --moe-layer-freq expressions, Megatron's derivations, refusals by
// name, unknown flags with suggestions, and realistic Mixtral / DeepSeek-style command lines shrunk
// to small sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/config.h"
#include "moecore/data.h"
#include "moecore/error.h"
#include "moecore/training.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;
using Argv = std::vector<std::string>;

namespace {

// The smallest complete command line: model sizes, MoE, batch, length, learning rate.
Argv base_argv() {
  return {"--num-layers", "2",  "--hidden-size",      "32", "--num-attention-heads", "4",   "--seq-length", "16",
          "--num-experts", "4", "--micro-batch-size", "2",  "--train-iters",         "10",  "--lr",         "1e-3"};
}

// base_argv() with one flag's value replaced.
Argv setting(const std::string& flag, const std::string& value) {
  Argv a = base_argv();
  for (size_t i = 0; i + 1 < a.size(); ++i)
    if (a[i] == flag) a[i + 1].assign(value);
  return a;
}

Argv with(Argv a, const Argv& more) {
  a.insert(a.end(), more.begin(), more.end());
  return a;
}

struct Parsed {
  TrainingArgs args;
  MoEConfig model;
};

Parsed parse(const Argv& argv, MoEConfig start = MoEConfig{}) {
  Parsed p;
  p.model = start;
  p.args = parse_megatron_args(argv, p.model);
  return p;
}

std::string parse_error(const Argv& argv, ErrorCode code = ErrorCode::invalid_argument, MoEConfig start = MoEConfig{}) {
  return error_of([&] { parse(argv, start); }, code);
}

bool has_note(const TrainingArgs& a, const std::string& part) {
  for (const std::string& n : a.notes)
    if (n.find(part) != std::string::npos) return true;
  return false;
}

}  // namespace

// ---- defaults ------------------------------------------------------------------------------------------

TEST(MegatronArgs, TrainerDefaultsAreMegatrons) {
  TrainingArgs a;
  EXPECT_FALSE(a.micro_batch_size.has_value());
  EXPECT_FALSE(a.global_batch_size.has_value());
  EXPECT_FALSE(a.lr.has_value());
  EXPECT_EQ(a.min_lr, 0.0);
  EXPECT_EQ(a.lr_warmup_iters, 0);
  EXPECT_EQ(a.lr_warmup_init, 0.0);
  EXPECT_EQ(a.lr_decay_style, "linear");
  EXPECT_EQ(a.lr_wsd_decay_style, "exponential");
  EXPECT_EQ(a.optimizer, "adam");
  EXPECT_EQ(a.weight_decay, 0.01);
  EXPECT_EQ(a.adam_beta1, 0.9);
  EXPECT_EQ(a.adam_beta2, 0.999);
  EXPECT_EQ(a.adam_eps, 1e-8);
  EXPECT_EQ(a.sgd_momentum, 0.9);
  EXPECT_EQ(a.clip_grad, 1.0);
  EXPECT_FALSE(a.eval_interval.has_value());
  EXPECT_EQ(a.eval_iters, 100);
  EXPECT_EQ(a.log_interval, 100);
  EXPECT_EQ(a.make_vocab_size_divisible_by, 128);
  EXPECT_EQ(a.tokenizer_type, "ByteLevelTokenizer");
  MoEConfig m = megatron_model_defaults();
  EXPECT_TRUE(m.add_bias_linear);
  EXPECT_EQ(m.hidden_dropout, 0.1);
  EXPECT_EQ(m.attention_dropout, 0.1);
}

TEST(MegatronArgs, MinimalCommandLine) {
  Parsed p = parse(base_argv());
  EXPECT_EQ(p.args.micro_batch_size, 2);
  EXPECT_EQ(p.args.train_iters, 10);
  EXPECT_EQ(p.args.lr, 1e-3);
  EXPECT_EQ(p.model.num_layers, 2);
  EXPECT_EQ(p.model.hidden_size, 32);
  EXPECT_EQ(p.model.num_moe_experts, 4);
  EXPECT_EQ(p.model.moe_ffn_hidden_size, 128);  // = ffn_hidden_size = 4·H, as Megatron sets it
  EXPECT_NO_THROW(validate(p.model));           // the MoE part alone is complete (no 0 widths left)
  EXPECT_EQ(p.model.vocab_size, 384);  // 257 (bytes + end of document) padded to a multiple of 128
  EXPECT_TRUE(p.args.notes.empty());
  // Megatron's model defaults make a command line without --disable-bias-linear and zero dropouts
  // fail by name rather than train another model.
  EXPECT_TRUE(contains_all(parse_error(base_argv(), ErrorCode::invalid_argument, megatron_model_defaults()),
                           {"add_bias_linear = true is not supported", "--disable-bias-linear"}));
  Parsed q = parse(with(base_argv(), {"--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0.0"}),
                   megatron_model_defaults());
  EXPECT_FALSE(q.model.add_bias_linear);
  EXPECT_EQ(q.model.hidden_dropout, 0.0);
  EXPECT_EQ(q.model.attention_dropout, 0.0);
  EXPECT_TRUE(contains_all(
      parse_error(with(base_argv(), {"--disable-bias-linear", "--hidden-dropout", "0"}), ErrorCode::invalid_argument,
                  megatron_model_defaults()),
      {"attention_dropout = 0.1 is not supported"}));
}

TEST(MegatronArgs, EveryTrainerFlag) {
  Parsed p = parse(with(base_argv(), {"--global-batch-size", "16", "--min-lr", "1e-5", "--lr-warmup-init", "1e-6",
                                      "--lr-decay-iters", "8", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3",
                                      "--lr-wsd-decay-style", "minus_sqrt", "--lr-warmup-fraction", "0.1",
                                      "--weight-decay", "0.1", "--adam-beta1", "0.8", "--adam-beta2", "0.95",
                                      "--adam-eps", "1e-6", "--optimizer", "sgd", "--sgd-momentum", "0.5",
                                      "--clip-grad", "0", "--eval-interval", "5", "--eval-iters", "2",
                                      "--log-interval", "1", "--data-path", "30", "a", "70", "b", "--split", "90,5,5",
                                      "--threads", "3", "--metrics-file", "m.jsonl", "--plots-dir", "plots",
                                      "--expect-val-loss-below", "4.5", "--sample-prompts", "Once upon", "The",
                                      "--max-new-tokens", "20", "--temperature", "0.7", "--top-k", "5"}));
  const TrainingArgs& a = p.args;
  EXPECT_EQ(a.global_batch_size, 16);
  EXPECT_EQ(a.min_lr, 1e-5);
  EXPECT_EQ(a.lr_warmup_init, 1e-6);
  EXPECT_EQ(a.lr_decay_iters, 8);
  EXPECT_EQ(a.lr_decay_style, "WSD");
  EXPECT_EQ(a.lr_wsd_decay_iters, 3);
  EXPECT_EQ(a.lr_wsd_decay_style, "minus_sqrt");
  EXPECT_EQ(a.lr_warmup_fraction, 0.1);
  EXPECT_EQ(a.weight_decay, 0.1);
  EXPECT_EQ(a.adam_beta1, 0.8);
  EXPECT_EQ(a.adam_beta2, 0.95);
  EXPECT_EQ(a.adam_eps, 1e-6);
  EXPECT_EQ(a.optimizer, "sgd");
  EXPECT_EQ(a.sgd_momentum, 0.5);
  EXPECT_EQ(a.clip_grad, 0.0);
  EXPECT_EQ(a.eval_interval, 5);
  EXPECT_EQ(a.eval_iters, 2);
  EXPECT_EQ(a.log_interval, 1);
  EXPECT_EQ(a.data_path, (Argv{"30", "a", "70", "b"}));
  EXPECT_EQ(a.split, "90,5,5");
  EXPECT_EQ(a.threads, 3);
  EXPECT_EQ(a.metrics_file, "m.jsonl");
  EXPECT_EQ(a.plots_dir, "plots");
  EXPECT_EQ(a.expect_val_loss_below, 4.5);
  EXPECT_EQ(a.sample_prompts, (Argv{"Once upon", "The"}));
  EXPECT_EQ(a.max_new_tokens, 20);
  EXPECT_EQ(a.temperature, 0.7);
  EXPECT_EQ(a.top_k, 5);
  // A data path without --split gets Megatron's legacy default, as Megatron warns.
  EXPECT_EQ(parse(with(base_argv(), {"--data-path", "corpus"})).args.split, "969, 30, 1");
}

// ---- syntax -----------------------------------------------------------------------------------------------

TEST(MegatronArgs, Syntax) {
  // --flag=value, underscores, negative numbers as values.
  Parsed p = parse(with(base_argv(), {"--min-lr=1e-5", "--adam_beta1", "0.5", "--moe-aux-loss-coeff", "1e-2"}));
  EXPECT_EQ(p.args.min_lr, 1e-5);
  EXPECT_EQ(p.args.adam_beta1, 0.5);
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--min-lr", "-1e-5"})), {"--min-lr", ">= 0", "-1e-05"}));
  // Mistakes.
  EXPECT_TRUE(contains_all(parse_error({"train", "--lr", "1"}), {"unexpected argument 'train'", "--name value"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"-x"})), {"unexpected argument '-x'"}));
  EXPECT_TRUE(contains_all(parse_error({"--lr"}), {"--lr takes one value, got none"}));
  EXPECT_TRUE(contains_all(parse_error({"--lr", "1", "2"}), {"--lr takes one value, got 2", "'1' '2'"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--swiglu", "true"})),
                           {"--swiglu is a switch and takes no value", "'true'"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr", "2e-3"})), {"--lr given twice"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--num-moe-experts", "8"})),
                           {"--num-moe-experts given twice", "(also as --num-experts)"}));
  EXPECT_TRUE(contains_all(parse_error({"--lr", "fast"}), {"--lr expects a finite number", "'fast'"}));
  EXPECT_TRUE(contains_all(parse_error({"--train-iters", "1.5"}), {"--train-iters expects an integer", "'1.5'"}));
  EXPECT_TRUE(contains_all(parse_error({"--data-path"}), {"--data-path takes one or more values, got none"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--moe-router-topk", "two"})),
                           {"moe_router_topk", "an integer", "'two'"}));
}

TEST(MegatronArgs, RequiredFlagsAndTheStartOverload) {
  auto without = [](const std::string& flag) {
    Argv a = base_argv(), out;
    for (size_t i = 0; i < a.size(); i += 2)
      if (a[i] != flag) out.insert(out.end(), {a[i], a[i + 1]});
    return out;
  };
  EXPECT_TRUE(contains_all(parse_error(without("--micro-batch-size")), {"--micro-batch-size is required"}));
  EXPECT_TRUE(contains_all(parse_error(without("--train-iters")), {"--train-iters is required"}));
  EXPECT_TRUE(contains_all(parse_error(without("--lr")), {"--lr is required"}));
  TrainingArgs start;
  start.lr = 5e-4;
  start.train_iters = 7;
  start.log_interval = 3;
  MoEConfig m;
  TrainingArgs a = parse_megatron_args(without("--lr"), m, start);
  EXPECT_EQ(a.lr, 5e-4);
  EXPECT_EQ(a.train_iters, 10);  // the command line wins
  EXPECT_EQ(a.log_interval, 3);
}

TEST(MegatronArgs, FailedParseLeavesTheModelAlone) {
  MoEConfig m;
  m.hidden_size = 7;
  EXPECT_THROW(parse_megatron_args(with(base_argv(), {"--bogus"}), m), Error);
  EXPECT_EQ(m.hidden_size, 7);
  EXPECT_EQ(m.num_layers, 0);
}

// ---- switches, aliases, lists ----------------------------------------------------------------------------

TEST(MegatronArgs, SwitchesAndAliases) {
  Parsed p = parse(with(base_argv(),
                        {"--swiglu", "--moe-router-pre-softmax", "--untie-embeddings-and-output-weights",
                         "--sequence-parallel", "--bf16", "--qk-layernorm", "--disable-bias-linear", "--normalization",
                         "RMSNorm", "--position-embedding-type", "rope", "--no-position-embedding",
                         "--group-query-attention", "--num-query-groups", "2", "--norm-epsilon", "1e-6",
                         "--rotary-base", "1000000", "--use-distributed-optimizer", "--use-flash-attn",
                         "--attention-dropout", "0", "--hidden-dropout", "0"}));
  const MoEConfig& m = p.model;
  EXPECT_TRUE(m.gated_linear_unit);
  EXPECT_EQ(m.activation_func, "silu");
  EXPECT_TRUE(m.moe_router_pre_softmax);
  EXPECT_TRUE(m.untie_embeddings_and_output_weights);
  EXPECT_EQ(m.sequence_parallel, true);
  EXPECT_TRUE(p.args.bf16);
  EXPECT_EQ(m.params_dtype, "bf16");
  EXPECT_TRUE(m.qk_layernorm);
  EXPECT_FALSE(m.add_bias_linear);
  EXPECT_EQ(m.normalization, "RMSNorm");
  EXPECT_EQ(m.position_embedding_type, "rope");
  EXPECT_EQ(m.num_query_groups, 2);
  EXPECT_EQ(m.layernorm_epsilon, 1e-6);
  EXPECT_EQ(m.rotary_base, 1e6);
  EXPECT_TRUE(p.args.use_distributed_optimizer);
  EXPECT_TRUE(has_note(p.args, "--use-flash-attn: accepted"));
  EXPECT_TRUE(has_note(p.args, "--sequence-parallel: accepted, no effect with --tensor-model-parallel-size 1"));
  // --swiglu without --ffn-hidden-size: Megatron's int((4·H·2/3)/64)·64 (= 64 for H = 32, 256 for H = 96).
  EXPECT_EQ(m.ffn_hidden_size, 64);
  EXPECT_EQ(m.moe_ffn_hidden_size, 64);  // Megatron: moe_ffn_hidden_size defaults to ffn_hidden_size
  const Argv h96 = setting("--hidden-size", "96");
  EXPECT_EQ(parse(with(h96, {"--swiglu"})).model.ffn_hidden_size, 256);
  EXPECT_EQ(parse(with(h96, {"--swiglu", "--ffn-hidden-size", "80"})).model.ffn_hidden_size, 80);
  EXPECT_EQ(parse(h96).model.dense_ffn(), 384);  // without --swiglu: 4·H
  const Argv h16 = setting("--hidden-size", "16");
  EXPECT_TRUE(contains_all(parse_error(with(h16, {"--swiglu"})), {"--swiglu without --ffn-hidden-size", "= 0"}));
  // Switches that are config keys also take an explicit boolean (our spelling).
  EXPECT_FALSE(parse(with(base_argv(), {"--moe-router-pre-softmax", "false"})).model.moe_router_pre_softmax);
  EXPECT_TRUE(parse(with(base_argv(), {"--qk-layernorm=true"})).model.qk_layernorm);
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--qk-layernorm", "sometimes"})),
                           {"qk_layernorm", "boolean", "'sometimes'"}));
  // --squared-relu; activation conflicts.
  EXPECT_EQ(parse(with(base_argv(), {"--squared-relu"})).model.activation_func, "relu2");
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--swiglu", "--squared-relu"})), {"exclude each other"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--swiglu", "--activation-func", "gelu"})),
                           {"--activation-func conflicts with --swiglu"}));
  // --bf16 against an explicit dtype.
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--bf16", "--params-dtype", "fp32"})),
                           {"--bf16 conflicts with --params-dtype fp32"}));
  // Our config keys work as flags too.
  Parsed k = parse(with(base_argv(), {"--moe-ffn-hidden-size", "24", "--moe-router-dtype", "fp64",
                                      "--moe-expert-capacity-factor", "1.5", "--parallel-order", "tp-cp-ep-dp-pp"}));
  EXPECT_EQ(k.model.moe_ffn_hidden_size, 24);
  EXPECT_EQ(k.model.moe_router_dtype, "fp64");
  EXPECT_EQ(k.model.moe_expert_capacity_factor, 1.5);
}

TEST(MegatronArgs, GroupQueryAttentionAsMegatron) {
  // Megatron reads --num-query-groups only with --group-query-attention, whose default is 1.
  EXPECT_EQ(parse(with(base_argv(), {"--group-query-attention"})).model.num_query_groups, 1);
  EXPECT_FALSE(parse(base_argv()).model.num_query_groups.has_value());
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--num-query-groups", "2"})),
                           {"--num-query-groups has no effect without --group-query-attention"}));
}

TEST(MegatronArgs, PositionEmbeddings) {
  EXPECT_EQ(parse(with(base_argv(), {"--use-rotary-position-embeddings"})).model.position_embedding_type, "rope");
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--no-position-embedding"})),
                           {"--no-position-embedding is deprecated", "rope", "'learned_absolute'"}));
  // --max-position-embeddings: >= seq length; the learned table has exactly seq_length rows here.
  EXPECT_EQ(parse(with(base_argv(), {"--max-position-embeddings", "16"})).args.max_position_embeddings, 16);
  EXPECT_NO_THROW(parse(with(base_argv(), {"--max-position-embeddings", "4096", "--position-embedding-type", "rope"})));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--max-position-embeddings", "64"})),
                           {"--max-position-embeddings 64", "learned absolute", "--seq-length (16)"}));
  EXPECT_TRUE(contains_all(
      parse_error(with(base_argv(), {"--max-position-embeddings", "8", "--position-embedding-type", "rope"})),
      {"--max-position-embeddings (8) must be >= --seq-length (16)"}));
}

TEST(MegatronArgs, SpaceSeparatedLists) {
  Parsed p = parse(with(base_argv(), {"--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss",
                                      "--moe-aux-loss-coeff", "1e-2", "1e-3", "--recompute-granularity", "selective",
                                      "--recompute-modules", "moe_act", "shared_experts", "--data-path", "a", "b"}));
  EXPECT_EQ(p.model.moe_router_load_balancing_type, (Argv{"aux_loss", "seq_aux_loss"}));
  EXPECT_EQ(p.model.moe_aux_loss_coeff, (std::vector<double>{1e-2, 1e-3}));
  EXPECT_EQ(p.model.recompute_modules, (Argv{"moe_act", "shared_experts"}));
  EXPECT_EQ(p.args.data_path, (Argv{"a", "b"}));
  // Commas (our spelling) still work for config keys.
  Parsed c = parse(with(base_argv(), {"--moe-router-load-balancing-type", "aux_loss,seq_aux_loss",
                                      "--moe-aux-loss-coeff", "1e-2,1e-3"}));
  EXPECT_EQ(c.model.moe_aux_loss_coeff, (std::vector<double>{1e-2, 1e-3}));
  // Full recompute and fine-grained offloading (docs/memory.md).
  Parsed f = parse(with(base_argv(), {"--recompute-granularity", "full", "--recompute-method", "uniform",
                                      "--recompute-num-layers", "1", "--fine-grained-activation-offloading",
                                      "--offload-modules", "attn_norm", "expert_fc1", "--min-offloaded-tensor-size",
                                      "4096"}));
  EXPECT_EQ(f.model.recompute_method, std::optional<std::string>("uniform"));
  EXPECT_EQ(f.model.recompute_num_layers, std::optional<int64_t>(1));
  EXPECT_TRUE(f.model.fine_grained_activation_offloading);
  EXPECT_EQ(f.model.offload_modules, (Argv{"attn_norm", "expert_fc1"}));
  EXPECT_EQ(f.model.min_offloaded_tensor_size, 4096);
  // Megatron's older switches: selective recompute (core_attn by default), and selective + moe.
  EXPECT_EQ(parse(with(base_argv(), {"--recompute-activations"})).model.recompute_granularity, "selective");
  Parsed ml = parse(with(base_argv(), {"--moe-layer-recompute", "--recompute-modules", "moe_act"}));
  EXPECT_EQ(ml.model.recompute_granularity, "selective");
  EXPECT_EQ(ml.model.recompute_modules, (Argv{"moe_act", "moe"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--moe-layer-recompute", "--recompute-granularity", "full",
                                                          "--recompute-method", "block", "--recompute-num-layers", "1"})),
                           {"--moe-layer-recompute with --recompute-granularity full"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--moe-router-load-balancing-type", "aux_loss",
                                                          "seq_aux_loss", "--moe-aux-loss-coeff", "1", "2", "3"})),
                           {"moe_aux_loss_coeff", "got 3 values"}));
}

// ---- --moe-layer-freq -------------------------------------------------------------------------------------

TEST(MegatronArgs, MoeLayerFreqGrammar) {
  using V = std::vector<int64_t>;
  EXPECT_EQ(parse_moe_layer_freq("2"), V{2});
  EXPECT_EQ(parse_moe_layer_freq(" 1 "), V{1});
  EXPECT_EQ(parse_moe_layer_freq("[1]*3+[0]*1"), (V{1, 1, 1, 0}));
  EXPECT_EQ(parse_moe_layer_freq("([0]+[1]*3)*2"), (V{0, 1, 1, 1, 0, 1, 1, 1}));
  EXPECT_EQ(parse_moe_layer_freq("([1]*3+[0]*1)*3"), (V{1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0}));
  EXPECT_EQ(parse_moe_layer_freq("[1,0,1,1]"), (V{1, 0, 1, 1}));
  EXPECT_EQ(parse_moe_layer_freq("3*[1,0]"), (V{1, 0, 1, 0, 1, 0}));
  EXPECT_EQ(parse_moe_layer_freq("[1]*(2*2)"), (V{1, 1, 1, 1}));
  EXPECT_EQ(parse_moe_layer_freq("[1]*(1+1)+[0]"), (V{1, 1, 0}));
  EXPECT_EQ(parse_moe_layer_freq("[0]+[1]*23").size(), 24u);
  EXPECT_EQ(parse_moe_layer_freq("[1,]"), V{1});  // Python's trailing comma
  EXPECT_EQ(parse_moe_layer_freq("[1]*0+[0]"), V{0});
  EXPECT_EQ(parse_moe_layer_freq("[ 1 , 0 ] * 2"), (V{1, 0, 1, 0}));
  struct Bad {
    const char* text;
    const char* part;
  };
  for (const Bad& b : std::vector<Bad>{{"[1]+2", "cannot add a list and an integer"},
                                       {"[1]*[2]", "cannot multiply two lists"},
                                       {"[1]*", "unexpected end"},
                                       {"[[1]]", "list entries must be integers"},
                                       {"[1,0][0]", "indexing is not supported"},
                                       {"([1]", "missing ')'"},
                                       {"[1 0]", "expected ',' or ']'"},
                                       {"[1]-[0]", "unexpected '-'"},
                                       {"(2)*3", "expected an integer"},
                                       {"1.5", "expected an integer"},
                                       {"every", "expected an integer"},
                                       {"", "expected an integer"}})
    EXPECT_TRUE(contains_all(error_of([&] { parse_moe_layer_freq(b.text); }), {"--moe-layer-freq", b.part})) << b.text;
}

TEST(MegatronArgs, MoeLayerFreqOnTheCommandLine) {
  const Argv four = setting("--num-layers", "4");
  Parsed p = parse(with(four, {"--moe-layer-freq", "([0]+[1]*3)"}));
  EXPECT_EQ(p.model.moe_layer_freq, (std::vector<int64_t>{0, 1, 1, 1}));
  EXPECT_FALSE(p.model.is_moe_layer(0));
  EXPECT_TRUE(p.model.is_moe_layer(3));
  Parsed n = parse(with(four, {"--moe-layer-freq", "2"}));
  EXPECT_EQ(n.model.moe_layer_freq, (std::vector<int64_t>{2}));
  EXPECT_TRUE(n.model.is_moe_layer(2));
  EXPECT_FALSE(n.model.is_moe_layer(3));
  // A pattern has one entry per layer; "[1]" is not "every layer" for 4 layers.
  EXPECT_TRUE(contains_all(parse_error(with(four, {"--moe-layer-freq", "[1]"})),
                           {"--moe-layer-freq has 1 entries but --num-layers is 4"}));
  EXPECT_TRUE(contains_all(parse_error(with(four, {"--moe-layer-freq", "[1]*3"})), {"3 entries", "--num-layers is 4"}));
  EXPECT_TRUE(contains_all(parse_error(with(four, {"--moe-layer-freq", "[1,2,1,1]"})), {"0 (dense) or 1 (MoE)", "2"}));
  EXPECT_TRUE(contains_all(parse_error(with(four, {"--moe-layer-freq", "0"})), {"moe_layer_freq"}));
}

// ---- vocabulary, tokenizer, batch ---------------------------------------------------------------------------

TEST(MegatronArgs, VocabularyAsMegatronPadsIt) {
  EXPECT_EQ(parse(with(base_argv(), {"--tensor-model-parallel-size", "2"})).model.vocab_size, 512);
  EXPECT_EQ(parse(with(base_argv(), {"--make-vocab-size-divisible-by", "1"})).model.vocab_size, 257);
  EXPECT_EQ(parse(with(base_argv(), {"--vocab-size", "300", "--make-vocab-size-divisible-by", "64"})).model.vocab_size,
            320);
  EXPECT_EQ(parse(with(base_argv(), {"--padded-vocab-size", "1000"})).model.vocab_size, 1000);
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--vocab-size", "100"})),
                           {"--vocab-size 100 is too small", "257"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--padded-vocab-size", "200"})), {"--padded-vocab-size 200"}));
}

TEST(MegatronArgs, OnlyTheByteLevelTokenizer) {
  EXPECT_NO_THROW(parse(with(base_argv(), {"--tokenizer-type", "ByteLevelTokenizer"})));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--tokenizer-type", "GPT2BPETokenizer"})),
                           {"--tokenizer-type GPT2BPETokenizer", "Megatron tokenizer that is not supported",
                            "ByteLevelTokenizer"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--tokenizer-type", "Words"})),
                           {"not a known tokenizer", "ByteLevelTokenizer"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--vocab-file", "gpt2-vocab.json"}), ErrorCode::not_supported),
                           {"--vocab-file is not supported", "byte-level"}));
}

TEST(MegatronArgs, BatchArithmetic) {
  Parsed p = parse(base_argv());
  EXPECT_EQ(resolve_batch_sizes(p.args, p.model, 4), 1);  // default global = micro · DP
  EXPECT_EQ(p.args.global_batch_size, 8);
  p = parse(with(base_argv(), {"--global-batch-size", "32"}));
  EXPECT_EQ(resolve_batch_sizes(p.args, p.model, 4), 4);
  EXPECT_EQ(p.model.num_microbatches, 4);
  p = parse(with(base_argv(), {"--global-batch-size", "30"}));
  EXPECT_TRUE(contains_all(error_of([&] { resolve_batch_sizes(p.args, p.model, 4); }),
                           {"--global-batch-size (30)", "2 × 4 = 8"}));
  // The micro-batch count is derived, never given.
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--num-microbatches", "2"}), ErrorCode::not_supported),
                           {"--num-microbatches is not supported", "--global-batch-size"}));
}

TEST(MegatronArgs, SplitAndBlend) {
  // --split is checked at parse time by the data loader's parser (split_document_ranges).
  EXPECT_EQ(parse(with(base_argv(), {"--split", "969, 30, 1"})).args.split, "969, 30, 1");
  EXPECT_EQ(parse(with(base_argv(), {"--split", "99,1"})).args.split, "99,1");
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--split", "0,0,0"})), {"split '0,0,0'"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--split", "1,1,1,1"})), {"split '1,1,1,1'", "3"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--split", "1.2.3"})), {"split '1.2.3'"}));
  DataBlend b = data_blend({"a", "b"});
  EXPECT_EQ(b.prefixes, (Argv{"a", "b"}));
  EXPECT_TRUE(b.weights.empty());
  b = data_blend({"30", "a", "70", "b"});
  EXPECT_EQ(b.prefixes, (Argv{"a", "b"}));
  EXPECT_EQ(b.weights, (std::vector<double>{30, 70}));
  EXPECT_EQ(data_blend({"only"}).prefixes, Argv{"only"});
  EXPECT_TRUE(contains_all(error_of([] { data_blend({"30", "a", "b", "c"}); }), {"weight prefix pairs"}));
}

// ---- learning-rate rules --------------------------------------------------------------------------------

TEST(MegatronArgs, ScheduleRules) {
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"})),
                           {"only specify one of --lr-warmup-fraction and --lr-warmup-iters"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr-decay-style", "step"})),
                           {"--lr-decay-style", "'step'", "inverse-square-root"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr-decay-style", "WSD"})), {"--lr-wsd-decay-iters"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr-wsd-decay-iters", "3"})),
                           {"--lr-wsd-decay-iters applies to --lr-decay-style WSD"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--lr-warmup-iters", "10"})), {"--lr-warmup-iters 10"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--min-lr", "1"})), {"--lr", "--min-lr"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--optimizer", "muon"})),
                           {"--optimizer muon is not implemented", "adam or sgd"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--optimizer", "adagrad"})), {"--optimizer", "'adagrad'"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--adam-beta2", "1"})), {"--adam-beta2", "[0, 1)"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--eval-interval", "0"})), {"--eval-interval", ">= 1"}));
  EXPECT_EQ(parse(with(base_argv(), {"--temperature", "0"})).args.temperature, 0.0);  // greedy
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--temperature", "-1"})), {"--temperature", ">= 0"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--clip-grad", "-1"})), {"--clip-grad", ">= 0"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--log-interval", "0"})), {"--log-interval", ">= 1"}));
}

// ---- accepted with a note, refused by name, unknown ------------------------------------------------------------

TEST(MegatronArgs, AcceptedWithNotes) {
  Parsed p = parse(with(base_argv(), {"--overlap-grad-reduce", "--overlap-param-gather", "--moe-grouped-gemm",
                                      "--use-mcore-models", "--no-masked-softmax-fusion", "--attention-backend",
                                      "flash", "--transformer-impl", "local", "--moe-permute-fusion"}));
  for (const char* f : {"--overlap-grad-reduce: accepted", "--overlap-param-gather: accepted",
                        "--moe-grouped-gemm: accepted", "--use-mcore-models: accepted",
                        "--no-masked-softmax-fusion: accepted", "--attention-backend flash: accepted",
                        "--transformer-impl local: accepted", "--moe-permute-fusion: accepted"})
    EXPECT_TRUE(has_note(p.args, f)) << f;
  EXPECT_EQ(p.args.notes.size(), 8u);
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--attention-backend", "magic"})),
                           {"--attention-backend", "'magic'", "flash"}));
}

TEST(MegatronArgs, RefusedByNameWithTheReason) {
  struct Case {
    Argv flags;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {{"--fp8-format", "e4m3"}, {"--fp8-format is not supported", "FP8"}},
      {{"--fp16"}, {"--fp16 is not supported", "dynamic loss scaling", "--bf16"}},
      {{"--loss-scale", "1024"}, {"--loss-scale is not supported", "fp16"}},
      {{"--ckpt-format", "torch_dist"}, {"--ckpt-format is not supported", "checkpoint option", "--save"}},
      {{"--async-save"}, {"--async-save", "checkpoint option"}},
      {{"--num-layers-per-virtual-pipeline-stage", "2"}, {"interleaved (virtual) pipeline stages"}},
      {{"--pipeline-model-parallel-layout", "Et|tL"}, {"pipeline-parallel option is not implemented"}},
      {{"--tensorboard-dir", "tb"}, {"--tensorboard-dir is not supported", "--metrics-file"}},
      {{"--wandb-project", "x"}, {"--wandb-project", "--metrics-file"}},
      {{"--train-samples", "1000"}, {"sample-based training is not implemented", "--train-iters"}},
      {{"--rampup-batch-size", "16", "16", "1000"}, {"batch-size ramp-up"}},
      {{"--moe-enable-deepep"}, {"flex dispatcher", "alltoall"}},
      {{"--multi-latent-attention"}, {"multi-latent attention"}},
      {{"--mtp-num-layers", "1"}, {"multi-token prediction"}},
      {{"--add-qkv-bias"}, {"no biases"}},
      {{"--rotary-interleaved"}, {"RoPE variant"}},
      {{"--quick-geglu"}, {"activation"}},
      {{"--use-torch-fsdp2"}, {"FSDP"}},
      {{"--tp-comm-overlap"}, {"overlap is not implemented"}},
      {{"--log-throughput"}, {"tokens per second per GPU"}},
      {{"--distributed-timeout-minutes", "5"}, {"MOE_COMM_TIMEOUT_S"}},
      {{"--mock-data"}, {"--data-path"}},
  };
  for (const Case& c : cases)
    EXPECT_TRUE(contains_all(parse_error(with(base_argv(), c.flags), ErrorCode::not_supported), c.parts)) << c.flags[0];
  // Refused values of config keys: validate() says why.
  const std::vector<Case> values = {
      {{"--moe-token-dispatcher-type", "flex"}, {"'flex' is not supported", "DeepEP"}},
      // Megatron's rules for full recompute (docs/memory.md).
      {{"--recompute-granularity", "full"}, {"recompute_granularity = 'full' needs recompute_method"}},
      {{"--recompute-method", "uniform"}, {"recompute_method = 'uniform' needs recompute_granularity = 'full'"}},
      {{"--recompute-num-layers", "1"}, {"recompute_num_layers = 1 needs recompute_granularity = 'full'"}},
      {{"--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-overlap"},
       {"moe_shared_expert_overlap = true is not supported", "side stream"}},
      {{"--tensor-model-parallel-size", "2", "--sequence-parallel", "false"},
       {"sequence_parallel = false with tensor_model_parallel_size = 2"}},
  };
  for (const Case& c : values) EXPECT_TRUE(contains_all(parse_error(with(base_argv(), c.flags)), c.parts)) << c.flags[0];
}

TEST(MegatronArgs, CheckpointFlags) {
  Parsed p = parse(with(base_argv(), {"--save", "ck", "--save-interval", "5", "--load", "ck", "--no-load-optim",
                                      "--no-load-rng", "--finetune", "--no-save-optim", "--no-save-rng"}));
  EXPECT_EQ(p.args.save, "ck");
  EXPECT_EQ(p.args.load, "ck");
  EXPECT_EQ(p.args.save_interval, 5);
  EXPECT_TRUE(p.args.no_load_optim && p.args.no_load_rng && p.args.finetune && p.args.no_save_optim &&
              p.args.no_save_rng);
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--save-interval", "5"})), {"--save-interval 5", "--save DIR"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--save", "ck", "--save-interval", "0"})),
                           {"--save-interval must be >= 1"}));
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--finetune"})), {"--finetune", "--load DIR"}));
}

TEST(MegatronArgs, UnknownFlagsSuggestTheClosest) {
  EXPECT_TRUE(contains_all(parse_error(with(base_argv(), {"--moe-router-top-k", "2"})),
                           {"unknown flag --moe-router-top-k; closest: --moe-router-topk"}));
  EXPECT_TRUE(contains_all(parse_error({"--hiden-size", "8"}), {"unknown flag --hiden-size", "--hidden-size"}));
  EXPECT_TRUE(contains_all(parse_error({"--warmup-iters", "8"}), {"unknown flag --warmup-iters", "--lr-warmup-iters"}));
  EXPECT_TRUE(contains_all(parse_error({"--bogus"}), {"unknown flag --bogus; closest: "}));
}

TEST(MegatronArgs, FlagTable) {
  std::set<std::string> names;
  size_t refused = 0, notes = 0, keys = 0;
  for (const MegatronFlagInfo& f : megatron_flags()) {
    EXPECT_TRUE(names.insert(f.name).second) << "listed twice: " << f.name;
    EXPECT_EQ(f.name.find('_'), std::string::npos) << f.name;
    if (f.kind == MegatronFlagInfo::Kind::refused) {
      ++refused;
      EXPECT_FALSE(f.text.empty()) << f.name;
    }
    if (f.kind == MegatronFlagInfo::Kind::accepted_note) ++notes;
    if (f.kind == MegatronFlagInfo::Kind::config_key) ++keys;
  }
  // Every config key is a flag (its name with dashes).
  for (std::string k : config_keys()) {
    std::replace(k.begin(), k.end(), '_', '-');
    EXPECT_TRUE(names.count(k)) << k;
  }
  for (const char* n : {"num-experts", "swiglu", "disable-bias-linear", "group-query-attention", "norm-epsilon",
                        "micro-batch-size", "lr-wsd-decay-style", "fp8-format", "save", "use-flash-attn"})
    EXPECT_TRUE(names.count(n)) << n;
  EXPECT_GT(refused, 100u);
  EXPECT_GT(notes, 10u);
  EXPECT_GE(keys, config_keys().size() - 3);
}

// ---- realistic command lines ---------------------------------------------------------------------------------

// examples/mixtral/train_mixtral_8x7b_distributed.sh, shrunk: sizes divided down, PP 4 → 1, Llama2's
// tokenizer → the byte-level one, TensorBoard flags removed (they are refused).
TEST(MegatronArgs, MixtralCommandLineShrunk) {
  const Argv argv = {
      "--use-mcore-models", "--disable-bias-linear", "--seq-length", "64", "--max-position-embeddings", "512",
      "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "224", "--num-attention-heads", "4",
      "--init-method-std", "0.01", "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
      "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
      "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion", "--no-position-embedding",
      "--rotary-base", "1000000",
      // MoE
      "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
      "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
      "--overlap-param-gather", "--overlap-grad-reduce",
      // data
      "--tokenizer-type", "ByteLevelTokenizer", "--data-path", "/data/corpus_text_document", "--split", "99990,8,2",
      // training
      "--micro-batch-size", "1", "--global-batch-size", "16", "--lr", "1e-4", "--train-iters", "500",
      "--lr-decay-iters", "320", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "0.1",
      "--lr-warmup-iters", "5", "--clip-grad", "1.0", "--bf16",
      // parallel
      "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "8",
      "--use-distributed-optimizer", "--sequence-parallel",
      // logging
      "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "10"};
  MoEConfig m = megatron_model_defaults();
  TrainingArgs a = parse_megatron_args(argv, m);
  EXPECT_EQ(m.num_layers, 4);
  EXPECT_EQ(m.hidden_size, 64);
  EXPECT_EQ(m.ffn_hidden_size, 224);
  EXPECT_EQ(m.moe_ffn_hidden_size, 224);  // Megatron: moe ffn defaults to ffn
  EXPECT_EQ(m.num_attention_heads, 4);
  EXPECT_EQ(m.num_query_groups, 2);
  EXPECT_EQ(m.seq_length, 64);
  EXPECT_EQ(m.init_method_std, 0.01);
  EXPECT_EQ(m.normalization, "RMSNorm");
  EXPECT_EQ(m.position_embedding_type, "rope");
  EXPECT_EQ(m.rotary_base, 1e6);
  EXPECT_TRUE(m.gated_linear_unit);
  EXPECT_EQ(m.activation_func, "silu");
  EXPECT_TRUE(m.untie_embeddings_and_output_weights);
  EXPECT_FALSE(m.add_bias_linear);
  EXPECT_EQ(m.hidden_dropout, 0.0);
  EXPECT_EQ(m.num_moe_experts, 8);
  EXPECT_EQ(m.moe_router_topk, 2);
  EXPECT_EQ(m.moe_router_load_balancing_type, Argv{"aux_loss"});
  EXPECT_EQ(m.moe_aux_loss_coeff, std::vector<double>{1e-2});
  EXPECT_EQ(m.moe_token_dispatcher_type, "alltoall");
  EXPECT_EQ(m.expert_model_parallel_size, 8);
  EXPECT_EQ(m.params_dtype, "bf16");
  EXPECT_EQ(m.vocab_size, 384);
  EXPECT_EQ(a.micro_batch_size, 1);
  EXPECT_EQ(a.global_batch_size, 16);
  EXPECT_EQ(a.lr_decay_style, "cosine");
  EXPECT_EQ(a.lr_decay_iters, 320);
  EXPECT_EQ(a.max_position_embeddings, 512);
  EXPECT_TRUE(a.bf16);
  EXPECT_TRUE(a.use_distributed_optimizer);
  EXPECT_EQ(a.eval_interval, 100);
  EXPECT_EQ(a.eval_iters, 10);
  EXPECT_TRUE(has_note(a, "--overlap-grad-reduce"));
  EXPECT_TRUE(has_note(a, "--sequence-parallel"));
  EXPECT_NO_THROW(validate_model(m, 8));  // EP 8 over 8 ranks (DP 8)
  EXPECT_EQ(resolve_batch_sizes(a, m, 8), 2);
  EXPECT_EQ(LRScheduler(a, 16).lr(5), 1e-4);
  // The original script's checkpoint flags are taken; its TensorBoard flags are refused by name.
  Argv orig = argv;
  orig.insert(orig.end(), {"--save-interval", "10000", "--save", "/ckpt", "--load", "/ckpt"});
  MoEConfig m2 = megatron_model_defaults();
  TrainingArgs a2 = parse_megatron_args(orig, m2);
  EXPECT_EQ(a2.save, "/ckpt");
  EXPECT_EQ(a2.load, "/ckpt");
  EXPECT_EQ(a2.save_interval, 10000);
  orig.insert(orig.end(), {"--tensorboard-dir", "/ckpt/tb"});
  MoEConfig m3 = megatron_model_defaults();
  EXPECT_TRUE(contains_all(error_of([&] { parse_megatron_args(orig, m3); }, ErrorCode::not_supported),
                           {"--tensorboard-dir is not supported", "--metrics-file"}));
}

// A DeepSeek-V3-style MoE: sigmoid router with expert bias, group-limited top-k, top-k scaling, a
// shared expert, a dense first layer, sequence aux loss, z loss, RMSNorm + qk-layernorm, EP + TP.
TEST(MegatronArgs, DeepSeekStyleCommandLineShrunk) {
  const Argv argv = {
      "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "8",
      "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
      "--rotary-percent", "0.5", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--qk-layernorm", "--swiglu",
      "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout",
      "0", "--init-method-std", "0.006",
      // MoE
      "--num-experts", "16", "--moe-layer-freq", "([0]*1+[1]*3)", "--moe-ffn-hidden-size", "32",
      "--moe-shared-expert-intermediate-size", "32", "--moe-router-score-function", "sigmoid",
      "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-3", "--moe-router-topk", "4",
      "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "2.5",
      "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4", "--moe-z-loss-coeff", "1e-3",
      "--moe-router-dtype", "fp32", "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
      "--moe-permute-fusion",
      // memory
      "--recompute-granularity", "selective", "--recompute-modules", "moe_act", "shared_experts",
      // parallel
      "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1",
      "--sequence-parallel",
      // training
      "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "200", "--lr", "2.2e-4", "--min-lr",
      "2.2e-5", "--lr-warmup-iters", "20", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "40",
      "--lr-wsd-decay-style", "cosine", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
      "--clip-grad", "1.0", "--bf16", "--seed", "42", "--data-path", "0.7", "web", "0.3", "code", "--split",
      "98,1,1", "--log-interval", "10", "--eval-interval", "50", "--eval-iters", "4"};
  MoEConfig m = megatron_model_defaults();
  TrainingArgs a = parse_megatron_args(argv, m);
  EXPECT_EQ(m.moe_layer_freq, (std::vector<int64_t>{0, 1, 1, 1}));
  EXPECT_EQ(m.num_moe_experts, 16);
  EXPECT_EQ(m.moe_ffn_hidden_size, 32);
  EXPECT_EQ(m.ffn_hidden_size, 128);  // given: the --swiglu default does not apply
  EXPECT_EQ(m.moe_shared_expert_intermediate_size, 32);
  EXPECT_EQ(m.moe_router_score_function, "sigmoid");
  EXPECT_TRUE(m.moe_router_enable_expert_bias);
  EXPECT_EQ(m.moe_router_topk, 4);
  EXPECT_EQ(m.moe_router_num_groups, 4);
  EXPECT_EQ(m.moe_router_group_topk, 2);
  EXPECT_EQ(m.moe_router_topk_scaling_factor, 2.5);
  EXPECT_EQ(m.moe_router_load_balancing_type, Argv{"seq_aux_loss"});
  EXPECT_EQ(m.moe_aux_loss_coeff, std::vector<double>{1e-4});
  EXPECT_EQ(m.moe_z_loss_coeff, 1e-3);
  EXPECT_EQ(m.moe_router_dtype, "fp32");
  EXPECT_EQ(m.recompute_granularity, "selective");
  EXPECT_EQ(m.recompute_modules, (Argv{"moe_act", "shared_experts"}));
  EXPECT_EQ(m.tensor_model_parallel_size, 2);
  EXPECT_EQ(m.expert_model_parallel_size, 4);
  EXPECT_EQ(m.expert_tensor_parallel_size, 1);
  EXPECT_EQ(m.sequence_parallel, true);
  EXPECT_TRUE(m.qk_layernorm);
  EXPECT_EQ(m.rotary_percent, 0.5);
  EXPECT_EQ(m.layernorm_epsilon, 1e-6);
  EXPECT_EQ(m.seed, 42u);
  EXPECT_EQ(m.params_dtype, "bf16");
  EXPECT_EQ(m.vocab_size, 512);  // 257 padded to a multiple of 128 · TP 2
  EXPECT_EQ(a.lr_decay_style, "WSD");
  EXPECT_EQ(a.lr_wsd_decay_iters, 40);
  EXPECT_EQ(a.lr_wsd_decay_style, "cosine");
  EXPECT_EQ(a.adam_beta2, 0.95);
  DataBlend blend = data_blend(a.data_path);
  EXPECT_EQ(blend.prefixes, (Argv{"web", "code"}));
  EXPECT_EQ(blend.weights, (std::vector<double>{0.7, 0.3}));
  EXPECT_EQ(moe_loss_names(m), (Argv{"seq_load_balancing_loss", "z_loss"}));
  EXPECT_NO_THROW(validate_model(m, 8));  // TP 2 × DP 4; EP 4 × EDP 2
  EXPECT_EQ(resolve_batch_sizes(a, m, 4), 1);
  LRScheduler lr(a, 8);
  EXPECT_DOUBLE_EQ(lr.lr(10), 1.1e-4);  // half-way through the warm-up
  EXPECT_EQ(lr.lr(160), 2.2e-4);        // stable until the last 40 iterations
  EXPECT_DOUBLE_EQ(lr.lr(180), 2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5));
}
