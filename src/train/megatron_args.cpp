// A Megatron pretrain_gpt.py command line → TrainingArgs + MoEConfig.
//
// Every flag is one entry of one table (registry()): the trainer's flags (Megatron's names and
// defaults), every MoEConfig key (its name with dashes), Megatron's aliases and switches, flags
// accepted although they change nothing here (each with the note the trainer prints), and Megatron
// flags refused by name with the reason. Anything else is an unknown flag with suggestions. Rules
// that involve several flags (Megatron's derivations and exclusions) are in finish(); the model's own
// rules stay in validate_model (src/core/config.cpp), which runs last.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <variant>

#include "moecore/data.h"
#include "moecore/error.h"
#include "moecore/training.h"

namespace moe {

namespace {

// ---- small helpers -----------------------------------------------------------------------------------

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string dashed(std::string s) {
  std::replace(s.begin(), s.end(), '_', '-');
  return s;
}

int64_t parse_int(const std::string& flag, const std::string& text) {
  const std::string t = trim(text);
  int64_t v = 0;
  auto r = std::from_chars(t.data(), t.data() + t.size(), v);
  MOE_CHECK(!t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size(), "--", flag,
            " expects an integer, got '", text, "'");
  return v;
}

double parse_double(const std::string& flag, const std::string& text) {
  const std::string t = trim(text);
  char* end = nullptr;
  errno = 0;
  const double v = t.empty() ? 0.0 : std::strtod(t.c_str(), &end);
  MOE_CHECK(!t.empty() && end == t.c_str() + t.size() && errno != ERANGE && std::isfinite(v), "--", flag,
            " expects a finite number, got '", text, "'");
  return v;
}

void require_choice(const std::string& flag, const std::string& value, const std::vector<std::string>& allowed,
                    const std::string& why = "") {
  MOE_CHECK(std::find(allowed.begin(), allowed.end(), value) != allowed.end(), "--", flag, " must be one of ",
            join(allowed, ", "), ", got '", value, "'", why);
}

// ---- the flag table ---------------------------------------------------------------------------------------

enum class Arity { none, one, many, bool_opt };  // bool_opt: a switch, or one true/false value

struct State {
  TrainingArgs& a;
  MoEConfig& m;
  std::map<std::string, std::string> given;  // dest → the flag it was given as
  std::string moe_layer_freq_text;           // --moe-layer-freq as written
  bool has(const std::string& dest) const { return given.count(dest) != 0; }
};

using Apply = std::function<void(State&, const std::string& flag, const std::vector<std::string>& values)>;

struct FlagDef {
  std::string name;  // dashed, without the leading "--"
  Arity arity = Arity::one;
  MegatronFlagInfo::Kind kind = MegatronFlagInfo::Kind::trainer;
  std::string dest;  // what it sets (aliases share it with their key): given twice is an error
  std::string text;  // note, reason, or the key an alias sets
  Apply apply;
};

// Trainer-flag builders.
FlagDef int_flag(const std::string& name, std::function<void(TrainingArgs&, int64_t)> set) {
  return {name, Arity::one, MegatronFlagInfo::Kind::trainer, name, "",
          [set](State& s, const std::string& f, const std::vector<std::string>& v) { set(s.a, parse_int(f, v[0])); }};
}
FlagDef double_flag(const std::string& name, std::function<void(TrainingArgs&, double)> set) {
  return {name, Arity::one, MegatronFlagInfo::Kind::trainer, name, "",
          [set](State& s, const std::string& f, const std::vector<std::string>& v) {
            set(s.a, parse_double(f, v[0]));
          }};
}
FlagDef string_flag(const std::string& name, std::function<void(TrainingArgs&, const std::string&)> set) {
  return {name, Arity::one, MegatronFlagInfo::Kind::trainer, name, "",
          [set](State& s, const std::string&, const std::vector<std::string>& v) { set(s.a, v[0]); }};
}
FlagDef list_flag(const std::string& name, std::function<void(TrainingArgs&, const std::vector<std::string>&)> set) {
  return {name, Arity::many, MegatronFlagInfo::Kind::trainer, name, "",
          [set](State& s, const std::string&, const std::vector<std::string>& v) { set(s.a, v); }};
}
FlagDef switch_flag(const std::string& name, std::function<void(State&)> set) {
  return {name, Arity::none, MegatronFlagInfo::Kind::trainer, name, "",
          [set](State& s, const std::string&, const std::vector<std::string>&) { set(s); }};
}
// A switch or value flag Megatron has that changes nothing here: accepted, with a note to print.
FlagDef note_flag(const std::string& name, Arity arity, const std::string& note) {
  return {name, arity, MegatronFlagInfo::Kind::accepted_note, name, note,
          [note](State& s, const std::string& f, const std::vector<std::string>& v) {
            s.a.notes.push_back("--" + f + (v.empty() ? "" : " " + join(v, " ")) + ": accepted, " + note);
          }};
}
FlagDef refused(const std::string& name, const std::string& reason) {
  return {name, Arity::many, MegatronFlagInfo::Kind::refused, name, reason, nullptr};
}
// A Megatron spelling of a config key.
FlagDef alias_of(const std::string& name, const std::string& key) {
  return {name, Arity::one, MegatronFlagInfo::Kind::alias, key, key,
          [key](State& s, const std::string&, const std::vector<std::string>& v) { set_config_value(s.m, key, v[0]); }};
}

// The reasons, one per feature.
const char* const kFp16 = "fp16 training needs dynamic loss scaling, which is not implemented (use --bf16)";
const char* const kLossScale = "loss scaling belongs to fp16 training, which is not implemented (use --bf16)";
const char* const kFp8 = "FP8 / FP4 training is not implemented";
const char* const kVirtualPipeline = "interleaved (virtual) pipeline stages are not implemented";
const char* const kPipelineOption = "this pipeline-parallel option is not implemented";
const char* const kCheckpoint = "this checkpoint option is not implemented (supported: --save, --load, "
                                 "--save-interval, --finetune, --no-load-optim, --no-load-rng, --no-save-optim, "
                                 "--no-save-rng)";
const char* const kBoards =
    "TensorBoard and W&B logging are not implemented: use --metrics-file (JSON lines) and --plots-dir";
const char* const kSamples =
    "sample-based training is not implemented: use --train-iters with --lr-decay-iters / --lr-warmup-iters";
const char* const kRampup = "batch-size ramp-up is not implemented: the global batch size is fixed";
const char* const kFlex =
    "the flex dispatcher (DeepEP / HybridEP) is not implemented: use --moe-token-dispatcher-type alltoall or "
    "allgather";
const char* const kMla = "multi-latent attention is not implemented";
const char* const kMtp = "multi-token prediction is not implemented";
const char* const kTokenizerFiles =
    "only the byte-level tokenizer exists here (--tokenizer-type ByteLevelTokenizer); it reads no vocabulary or "
    "model file";
const char* const kSplitPaths = "per-split data paths are not implemented: use --data-path with --split";
const char* const kFsdp = "FSDP is not implemented";
const char* const kCudaGraph = "CUDA graphs are not implemented";
const char* const kBias = "linear layers have no biases here";
const char* const kRope =
    "this RoPE variant is not implemented (plain RoPE only: --position-embedding-type rope, --rotary-base, "
    "--rotary-percent)";
const char* const kWindow = "sliding-window attention is not implemented";
const char* const kHybrid = "hybrid (Mamba), heterogeneous and custom-spec models are not implemented";
const char* const kActivation =
    "this activation is not implemented (gelu, --swiglu, --squared-relu, or --activation-func / "
    "--gated-linear-unit)";
const char* const kGradPrecision = "precision options for gradients and optimizer state are not implemented";
const char* const kWdSchedule = "weight-decay schedules are not implemented: --weight-decay stays constant";
const char* const kNotImplemented = "not implemented";
const char* const kFusion = "kernel fusion switches change no numbers here";

const char* const kAttentionNote = "attention is always the blocked online-softmax kernel (FlashAttention-2's algorithm)";

const std::vector<std::string> kMegatronTokenizers = {
    "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer",        "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
    "MultimodalTokenizer",     "NullTokenizer",     "NullMultimodalTokenizer", "SFTTokenizer"};
const std::vector<std::string> kMegatronOptimizers = {"adam", "sgd", "muon", "dist_muon", "lion", "soap",
                                                      "adaptive_muon"};

std::vector<FlagDef> special_flags() {
  using K = MegatronFlagInfo::Kind;
  std::vector<FlagDef> f;
  auto add = [&](FlagDef d) { f.push_back(std::move(d)); };

  // ---- trainer: batch, length, schedule ----
  add(int_flag("micro-batch-size", [](TrainingArgs& a, int64_t v) { a.micro_batch_size = v; }));
  add(int_flag("global-batch-size", [](TrainingArgs& a, int64_t v) { a.global_batch_size = v; }));
  add(int_flag("train-iters", [](TrainingArgs& a, int64_t v) { a.train_iters = v; }));
  add(double_flag("lr", [](TrainingArgs& a, double v) { a.lr = v; }));
  add(double_flag("min-lr", [](TrainingArgs& a, double v) { a.min_lr = v; }));
  add(int_flag("lr-warmup-iters", [](TrainingArgs& a, int64_t v) { a.lr_warmup_iters = v; }));
  add(double_flag("lr-warmup-fraction", [](TrainingArgs& a, double v) { a.lr_warmup_fraction = v; }));
  add(double_flag("lr-warmup-init", [](TrainingArgs& a, double v) { a.lr_warmup_init = v; }));
  add(int_flag("lr-decay-iters", [](TrainingArgs& a, int64_t v) { a.lr_decay_iters = v; }));
  add(string_flag("lr-decay-style", [](TrainingArgs& a, const std::string& v) { a.lr_decay_style = v; }));
  add(int_flag("lr-wsd-decay-iters", [](TrainingArgs& a, int64_t v) { a.lr_wsd_decay_iters = v; }));
  add(string_flag("lr-wsd-decay-style", [](TrainingArgs& a, const std::string& v) { a.lr_wsd_decay_style = v; }));
  // ---- optimizer ----
  add(string_flag("optimizer", [](TrainingArgs& a, const std::string& v) { a.optimizer = v; }));
  add(double_flag("weight-decay", [](TrainingArgs& a, double v) { a.weight_decay = v; }));
  add(double_flag("adam-beta1", [](TrainingArgs& a, double v) { a.adam_beta1 = v; }));
  add(double_flag("adam-beta2", [](TrainingArgs& a, double v) { a.adam_beta2 = v; }));
  add(double_flag("adam-eps", [](TrainingArgs& a, double v) { a.adam_eps = v; }));
  add(double_flag("sgd-momentum", [](TrainingArgs& a, double v) { a.sgd_momentum = v; }));
  add(double_flag("clip-grad", [](TrainingArgs& a, double v) { a.clip_grad = v; }));
  add(switch_flag("use-distributed-optimizer", [](State& s) { s.a.use_distributed_optimizer = true; }));
  // ---- precision ----
  add(switch_flag("bf16", [](State& s) { s.a.bf16 = true; }));
  // ---- validation, logging ----
  add(int_flag("eval-interval", [](TrainingArgs& a, int64_t v) { a.eval_interval = v; }));
  add(int_flag("eval-iters", [](TrainingArgs& a, int64_t v) { a.eval_iters = v; }));
  add(int_flag("log-interval", [](TrainingArgs& a, int64_t v) { a.log_interval = v; }));
  // ---- data, tokenizer ----
  add(list_flag("data-path", [](TrainingArgs& a, const std::vector<std::string>& v) { a.data_path = v; }));
  add(string_flag("split", [](TrainingArgs& a, const std::string& v) { a.split = v; }));
  add(string_flag("tokenizer-type", [](TrainingArgs& a, const std::string& v) { a.tokenizer_type = v; }));
  {
    // Megatron's --vocab-size (the tokenizer's, before padding), not MoEConfig::vocab_size (padded).
    FlagDef d = int_flag("vocab-size", [](TrainingArgs& a, int64_t v) { a.vocab_size = v; });
    d.dest = "vocab_size";
    add(d);
  }
  add(int_flag("padded-vocab-size", [](TrainingArgs& a, int64_t v) { a.padded_vocab_size = v; }));
  add(int_flag("make-vocab-size-divisible-by", [](TrainingArgs& a, int64_t v) { a.make_vocab_size_divisible_by = v; }));
  add(int_flag("max-position-embeddings", [](TrainingArgs& a, int64_t v) { a.max_position_embeddings = v; }));
  // ---- sampling, this trainer's own ----
  add(list_flag("sample-prompts", [](TrainingArgs& a, const std::vector<std::string>& v) { a.sample_prompts = v; }));
  add(int_flag("max-new-tokens", [](TrainingArgs& a, int64_t v) { a.max_new_tokens = v; }));
  add(double_flag("temperature", [](TrainingArgs& a, double v) { a.temperature = v; }));
  add(int_flag("top-k", [](TrainingArgs& a, int64_t v) { a.top_k = v; }));
  add(int_flag("threads", [](TrainingArgs& a, int64_t v) { a.threads = v; }));
  add(string_flag("metrics-file", [](TrainingArgs& a, const std::string& v) { a.metrics_file = v; }));
  add(string_flag("plots-dir", [](TrainingArgs& a, const std::string& v) { a.plots_dir = v; }));
  add(double_flag("expect-val-loss-below", [](TrainingArgs& a, double v) { a.expect_val_loss_below = v; }));

  // ---- Megatron's spellings of config keys, and its model switches ----
  add(alias_of("num-experts", "num_moe_experts"));
  add(alias_of("norm-epsilon", "layernorm_epsilon"));
  add({"disable-bias-linear", Arity::none, K::alias, "add_bias_linear", "add_bias_linear = false",
       [](State& s, const std::string&, const std::vector<std::string>&) { s.m.add_bias_linear = false; }});
  add({"swiglu", Arity::none, K::alias, "swiglu", "gated_linear_unit = true, activation_func = silu",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add({"squared-relu", Arity::none, K::alias, "squared-relu", "activation_func = relu2",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add({"group-query-attention", Arity::none, K::alias, "group-query-attention",
       "num_query_groups = --num-query-groups (Megatron's default 1)",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add({"no-position-embedding", Arity::none, K::alias, "no-position-embedding",
       "no learned position table (with --position-embedding-type rope only, as in Megatron)",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add({"use-rotary-position-embeddings", Arity::none, K::alias, "position_embedding_type",
       "position_embedding_type = rope",
       [](State& s, const std::string&, const std::vector<std::string>&) { s.m.position_embedding_type = "rope"; }});
  {
    // A config key with a Megatron rule: it counts only with --group-query-attention (finish()).
    FlagDef d = alias_of("num-query-groups", "num_query_groups");
    d.kind = K::config_key;
    add(d);
  }
  add({"moe-layer-freq", Arity::one, K::config_key, "moe_layer_freq", "moe_layer_freq",
       [](State& s, const std::string&, const std::vector<std::string>& v) {
         s.m.moe_layer_freq = parse_moe_layer_freq(v[0]);
         s.moe_layer_freq_text = v[0];
       }});
  add(refused("num-microbatches",
              "set --global-batch-size: Megatron derives the micro-batches per step as global / (micro · "
              "data-parallel size)"));

  // ---- accepted: no effect here, with the note the trainer prints ----
  add(note_flag("use-flash-attn", Arity::none, kAttentionNote));
  add({"attention-backend", Arity::one, K::accepted_note, "attention-backend", kAttentionNote,
       [](State& s, const std::string& flag, const std::vector<std::string>& v) {
         require_choice(flag, v[0], {"auto", "flash", "fused", "unfused", "local"});
         s.a.notes.push_back("--" + flag + " " + v[0] + ": accepted, " + kAttentionNote);
       }});
  add({"transformer-impl", Arity::one, K::accepted_note, "transformer-impl", "our own modules run either way",
       [](State& s, const std::string& flag, const std::vector<std::string>& v) {
         require_choice(flag, v[0], {"local", "transformer_engine"});
         s.a.notes.push_back("--" + flag + " " + v[0] + ": accepted, our own modules run either way");
       }});
  add({"distributed-backend", Arity::one, K::accepted_note, "distributed-backend",
       "communication uses MPI, and NCCL between GPUs when the library is built with it",
       [](State& s, const std::string& flag, const std::vector<std::string>& v) {
         require_choice(flag, v[0], {"nccl", "gloo"});
         s.a.notes.push_back("--" + flag + " " + v[0] +
                             ": accepted, communication uses MPI, and NCCL between GPUs when built with it");
       }});
  add(note_flag("moe-grouped-gemm", Arity::none, "the experts already run one grouped GEMM over per-expert rows"));
  add(note_flag("use-mcore-models", Arity::none, "deprecated in Megatron, which ignores it too"));
  add(note_flag("overlap-grad-reduce", Arity::none,
                "gradients are reduced after the backward (finalize_grads): the same numbers, no overlap"));
  add(note_flag("overlap-param-gather", Arity::none,
                "the distributed optimizer gathers the updated parameters right after its step: the same numbers, "
                "no overlap"));
  for (const char* n : {"no-masked-softmax-fusion", "no-bias-dropout-fusion", "no-bias-swiglu-fusion",
                        "no-bias-gelu-fusion", "no-rope-fusion", "no-gradient-accumulation-fusion",
                        "no-persist-layer-norm", "moe-permute-fusion", "moe-router-fusion",
                        "cross-entropy-loss-fusion"})
    add(note_flag(n, Arity::none, kFusion));
  add(note_flag("attention-softmax-in-fp32", Arity::none, "softmax always runs in f32 here"));
  add(note_flag("use-cpu-initialization", Arity::none,
                "parameters are drawn from (seed, name, index): the same values on any device"));
  add(note_flag("moe-per-layer-logging", Arity::none, "per-layer MoE metrics go to --metrics-file"));
  add(note_flag("manual-gc", Arity::none, "there is no Python garbage collector here"));
  add(note_flag("manual-gc-interval", Arity::one, "there is no Python garbage collector here"));

  // ---- refused by name ----
  add(refused("fp16", kFp16));
  add(refused("fp16-lm-cross-entropy", kFp16));
  for (const char* n : {"loss-scale", "initial-loss-scale", "min-loss-scale", "loss-scale-window", "hysteresis"})
    add(refused(n, kLossScale));
  for (const char* n : {"fp8-format", "fp8-recipe", "fp8-margin", "fp8-interval", "fp8-amax-history-len",
                        "fp8-amax-compute-algo", "fp8-param-gather", "fp8-wgrad", "fp4-format", "fp4-recipe",
                        "fp4-param-gather", "first-last-layers-bf16"})
    add(refused(n, kFp8));
  // (Megatron's --decoder-first/last-pipeline-num-layers are config keys, hence flags, when MoEConfig has them.)
  for (const char* n : {"num-layers-per-virtual-pipeline-stage", "num-virtual-stages-per-pipeline-rank",
                        "microbatch-group-size-per-virtual-pipeline-stage"})
    add(refused(n, kVirtualPipeline));
  for (const char* n : {"pipeline-model-parallel-layout", "account-for-embedding-in-pipeline-split",
                        "account-for-loss-in-pipeline-split", "overlap-p2p-communication",
                        "overlap-p2p-communication-warmup-flush"})
    add(refused(n, kPipelineOption));
  // Checkpoints (docs/checkpoints.md): Megatron's directory layout and tracker file, any layout loads any.
  add(string_flag("save", [](TrainingArgs& a, const std::string& v) { a.save = v; }));
  add(string_flag("load", [](TrainingArgs& a, const std::string& v) { a.load = v; }));
  add(int_flag("save-interval", [](TrainingArgs& a, int64_t v) { a.save_interval = v; }));
  add(switch_flag("finetune", [](State& s) { s.a.finetune = true; }));
  add(switch_flag("check-for-nan-in-loss-and-grad", [](State& s) { s.a.check_for_nan_in_loss_and_grad = true; }));
  add(switch_flag("no-check-for-nan-in-loss-and-grad",
                  [](State& s) { s.a.check_for_nan_in_loss_and_grad = false; }));
  add(switch_flag("no-load-optim", [](State& s) { s.a.no_load_optim = true; }));
  add(switch_flag("no-load-rng", [](State& s) { s.a.no_load_rng = true; }));
  add(switch_flag("no-save-optim", [](State& s) { s.a.no_save_optim = true; }));
  add(switch_flag("no-save-rng", [](State& s) { s.a.no_save_rng = true; }));
  // Print each stage's estimated memory per rank (moecore/memory.h) and exit without training.
  add(switch_flag("estimate-memory", [](State& s) { s.a.estimate_memory = true; }));
  for (const char* n : {"persistent-save-interval", "pretrained-checkpoint", "ckpt-format",
                        "ckpt-step", "async-save", "auto-detect-ckpt-format", "use-checkpoint-args",
                        "exit-on-missing-checkpoint", "non-persistent-save-interval", "moe-use-upcycling",
                        "override-opt-param-scheduler", "use-checkpoint-opt-param-scheduler"})
    add(refused(n, kCheckpoint));
  for (const char* n : {"tensorboard-dir", "tensorboard-log-interval", "tensorboard-queue-size",
                        "log-timers-to-tensorboard", "log-memory-to-tensorboard", "log-validation-ppl-to-tensorboard",
                        "log-world-size-to-tensorboard", "wandb-project", "wandb-exp-name", "wandb-save-dir",
                        "wandb-entity"})
    add(refused(n, kBoards));
  for (const char* n : {"train-samples", "lr-decay-samples", "lr-warmup-samples", "lr-wsd-decay-samples"})
    add(refused(n, kSamples));
  for (const char* n : {"rampup-batch-size", "step-batch-size-schedule", "decrease-batch-size-if-needed"})
    add(refused(n, kRampup));
  for (const char* n : {"moe-enable-deepep", "moe-flex-dispatcher-backend"}) add(refused(n, kFlex));
  for (const char* n : {"multi-latent-attention", "q-lora-rank", "kv-lora-rank", "qk-head-dim", "qk-pos-emb-head-dim",
                        "v-head-dim"})
    add(refused(n, kMla));
  for (const char* n : {"mtp-num-layers", "mtp-loss-scaling-factor"}) add(refused(n, kMtp));
  for (const char* n : {"vocab-file", "merge-file", "tokenizer-model"}) add(refused(n, kTokenizerFiles));
  for (const char* n : {"train-data-path", "valid-data-path", "test-data-path", "data-args-path",
                        "per-split-data-args-path"})
    add(refused(n, kSplitPaths));
  add(refused("mock-data", "synthetic data is not implemented: give --data-path"));
  for (const char* n : {"use-torch-fsdp2", "use-megatron-fsdp"}) add(refused(n, kFsdp));
  for (const char* n : {"enable-cuda-graph", "cuda-graph-impl", "external-cuda-graph", "cuda-graph-scope"})
    add(refused(n, kCudaGraph));
  add(refused("add-qkv-bias", kBias));
  for (const char* n : {"rotary-interleaved", "use-rope-scaling", "rope-scaling-factor",
                        "rotary-seq-len-interpolation-factor", "no-rope-freq", "rope-type", "mrope-section"})
    add(refused(n, kRope));
  for (const char* n : {"window-size", "window-attn-skip-freq"}) add(refused(n, kWindow));
  for (const char* n : {"hybrid-layer-pattern", "heterogeneous-layers-config-path", "spec"}) add(refused(n, kHybrid));
  for (const char* n : {"openai-gelu", "quick-geglu"}) add(refused(n, kActivation));
  for (const char* n : {"grad-reduce-in-bf16", "accumulate-allreduce-grads-in-fp32", "main-grads-dtype",
                        "main-params-dtype", "exp-avg-dtype", "exp-avg-sq-dtype"})
    add(refused(n, kGradPrecision));
  for (const char* n : {"start-weight-decay", "end-weight-decay", "weight-decay-incr-style"})
    add(refused(n, kWdSchedule));
  add(refused("apply-layernorm-1p", "zero-centred norm weights are not implemented"));
  add(refused("apply-residual-connection-post-layernorm", "post-norm residuals are not implemented"));
  add(refused("fp32-residual-connection", "an f32 residual stream for lower-precision parameters is not implemented"));
  for (const char* n : {"qk-l2-norm", "qk-clip", "attention-output-gate", "init-method-xavier-uniform",
                        "embedding-init-method-std", "use-mup", "calculate-per-token-loss", "decoupled-lr",
                        "decoupled-min-lr", "optimizer-cpu-offload", "distribute-saved-activations",
                        "moe-apply-probs-on-input", "moe-latent-size", "moe-router-force-load-balancing",
                        "moe-router-padding-for-fp8", "moe-router-padding-for-quantization", "deterministic-mode",
                        "log-params-norm",
                        "log-num-zeros-in-grad", "log-progress", "timing-log-level", "timing-log-option",
                        "exit-interval", "exit-duration-in-mins", "exit-signal-handler", "empty-unused-memory-level"})
    add(refused(n, kNotImplemented));
  for (const char* n : {"tp-comm-overlap", "overlap-moe-expert-parallel-comm", "delay-wgrad-compute"})
    add(refused(n, "this communication overlap is not implemented"));
  add(refused("log-throughput", "TFLOP/s is not computed: the log line prints tokens per second per GPU"));
  for (const char* n : {"num-workers", "dataloader-type"}) add(refused(n, "the data loader runs in-process here"));
  for (const char* n : {"encoder-num-layers", "decoder-num-layers"}) add(refused(n, "use --num-layers"));
  for (const char* n : {"encoder-seq-length", "decoder-seq-length"}) add(refused(n, "use --seq-length"));
  add(refused("warmup", "use --lr-warmup-iters or --lr-warmup-fraction"));
  // Megatron's older spellings of selective recompute (docs/memory.md), applied in finish().
  add({"recompute-activations", Arity::none, K::alias, "recompute-activations", "recompute_granularity = selective",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add({"moe-layer-recompute", Arity::none, K::alias, "moe-layer-recompute",
       "recompute_granularity = selective, recompute_modules += moe",
       [](State&, const std::string&, const std::vector<std::string>&) {}});
  add(refused("moe-router-topk-limited-devices", "use --moe-router-num-groups with --moe-router-group-topk"));
  for (const char* n : {"cpu-offloading", "cpu-offloading-num-layers"})
    add(refused(n, "use --fine-grained-activation-offloading with --offload-modules"));
  add(refused("distributed-timeout-minutes", "set MOE_COMM_TIMEOUT_S (seconds) in the environment instead"));
  return f;
}

// The whole table: the special flags, then every config key not already there.
const std::vector<FlagDef>& registry() {
  static const std::vector<FlagDef> table = [] {
    std::vector<FlagDef> t = special_flags();
    std::set<std::string> names;
    for (const FlagDef& d : t) names.insert(d.name);
    for (const std::string& key : config_keys()) {
      const std::string name = dashed(key);
      if (names.count(name)) continue;  // spelled specially above
      const ConfigKeyShape shape = config_key_shape(key);
      const Arity arity = shape == ConfigKeyShape::boolean ? Arity::bool_opt
                          : shape == ConfigKeyShape::list  ? Arity::many
                                                           : Arity::one;
      t.push_back({name, arity, MegatronFlagInfo::Kind::config_key, key, key,
                   [arity](State& s, const std::string& flag, const std::vector<std::string>& v) {
                     // Megatron's lists are space-separated; ours are comma-separated: both work.
                     const std::string text = arity == Arity::bool_opt && v.empty() ? "true" : join(v, ",");
                     set_config_value(s.m, "--" + flag, text);  // messages name the flag as given
                   }});
    }
    return t;
  }();
  return table;
}

const FlagDef* find_flag(const std::string& name) {
  for (const FlagDef& d : registry())
    if (d.name == name) return &d;
  return nullptr;
}

std::vector<std::string> closest_flags(const std::string& name, size_t n = 3) {
  std::vector<std::pair<size_t, std::string>> scored;
  for (const FlagDef& d : registry()) {
    size_t dist = edit_distance(name, d.name);
    if (name.size() >= 3 && d.name.find(name) != std::string::npos) dist = std::min<size_t>(dist, 1);
    scored.emplace_back(dist, d.name);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && i < n; ++i) out.push_back("--" + scored[i].second);
  return out;
}

// ---- argv → (flag, values) groups ------------------------------------------------------------------

struct Group {
  std::string name;  // dashed, no leading dashes
  std::string given; // as written (for messages)
  std::vector<std::string> values;
  bool inline_value = false;
};

bool looks_like_flag(const std::string& t) { return t.size() > 2 && t[0] == '-' && t[1] == '-'; }

// A value token: anything not starting with '-', or a negative number ("-1", "-.5", "-1e-3").
bool is_value_token(const std::string& t) {
  if (t.empty() || t[0] != '-') return true;
  if (t.size() < 2) return false;
  return std::isdigit(static_cast<unsigned char>(t[1])) || t[1] == '.';
}

std::vector<Group> group_argv(const std::vector<std::string>& argv) {
  std::vector<Group> groups;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& t = argv[i];
    MOE_CHECK(looks_like_flag(t), "unexpected argument '", t, "': flags look like --name value");
    Group g;
    std::string body = t.substr(2);
    const size_t eq = body.find('=');
    if (eq != std::string::npos) {
      g.values.push_back(body.substr(eq + 1));
      g.inline_value = true;
      body = body.substr(0, eq);
    }
    g.given = "--" + body;
    g.name = dashed(body);
    if (!g.inline_value)
      while (i + 1 < argv.size() && is_value_token(argv[i + 1])) g.values.push_back(argv[++i]);
    groups.push_back(std::move(g));
  }
  return groups;
}

// ---- rules involving several flags (Megatron's derivations) ---------------------------------------------

void finish(State& s) {
  TrainingArgs& a = s.a;
  MoEConfig& m = s.m;

  // Activations: --swiglu = gated silu, --squared-relu = relu2 (Megatron asserts they exclude each other).
  const bool swiglu = s.has("swiglu"), squared = s.has("squared-relu");
  MOE_CHECK(!(swiglu && squared), "--swiglu and --squared-relu exclude each other");
  if (swiglu || squared) {
    for (const char* key : {"activation_func", "gated_linear_unit"})
      MOE_CHECK(!s.has(key), s.given.at(key), " conflicts with ", swiglu ? "--swiglu" : "--squared-relu",
                " (which sets the activation): give one of them");
  }
  if (swiglu) {
    m.gated_linear_unit = true;
    m.activation_func = "silu";
  }
  if (squared) m.activation_func = "relu2";

  // Megatron's older recompute switches: --recompute-activations is selective recompute (its
  // default module core_attn); --moe-layer-recompute is selective with moe (refused with full).
  if (s.has("moe-layer-recompute")) {
    MOE_CHECK(m.recompute_granularity != "full",
              "--moe-layer-recompute with --recompute-granularity full: Megatron refuses it (do not set "
              "--moe-layer-recompute with full recompute granularity)");
    m.recompute_granularity = "selective";
    if (std::find(m.recompute_modules.begin(), m.recompute_modules.end(), "moe") == m.recompute_modules.end())
      m.recompute_modules.push_back("moe");
  }
  if (s.has("recompute-activations")) m.recompute_granularity = "selective";

  // Grouped-query attention: Megatron reads --num-query-groups only with --group-query-attention,
  // whose argparse default is 1.
  if (s.has("num_query_groups"))
    MOE_CHECK(s.has("group-query-attention"), s.given.at("num_query_groups"),
              " has no effect without --group-query-attention in Megatron: add --group-query-attention");
  if (s.has("group-query-attention") && !s.has("num_query_groups")) m.num_query_groups = 1;

  // Position embeddings.
  if (s.has("no-position-embedding"))
    MOE_CHECK(m.position_embedding_type == "rope", "--no-position-embedding is deprecated, use "
              "--position-embedding-type (Megatron accepts it only with rope; got position_embedding_type = '",
              m.position_embedding_type, "')");
  // (--use-rotary-position-embeddings and --position-embedding-type share a destination: giving both
  // is the "given twice" error.)

  // Precision: --bf16 sets the parameters' dtype.
  if (a.bf16) {
    MOE_CHECK(!s.has("params_dtype") || m.params_dtype == "bf16", "--bf16 conflicts with ", s.given.at("params_dtype"),
              " ", m.params_dtype);
    m.params_dtype = "bf16";
  }

  // Megatron's --swiglu default for the dense MLP width: int((4·H·2/3)/64)·64.
  if (swiglu && !m.ffn_hidden_size.has_value() && m.hidden_size > 0) {
    const int64_t H = m.hidden_size;
    const int64_t ffn = static_cast<int64_t>((static_cast<double>(4 * H * 2) / 3.0) / 64.0) * 64;
    MOE_CHECK(ffn >= 1, "--swiglu without --ffn-hidden-size gives Megatron's int((4·H·2/3)/64)·64 = 0 for hidden "
              "size ", H, ": give --ffn-hidden-size");
    m.ffn_hidden_size = ffn;
  }

  // Megatron's validate_args: moe_ffn_hidden_size defaults to ffn_hidden_size (after the --swiglu
  // default above), set in the config so that every later check sees the width the model uses.
  m = resolve_model_config(m);

  // A --moe-layer-freq pattern has one entry per layer (Megatron asserts the length).
  if (s.has("moe_layer_freq")) {
    // parse_moe_layer_freq gives "N" as {N}; a pattern always contains '['.
    const bool pattern = s.moe_layer_freq_text.find('[') != std::string::npos;
    if (pattern) {
      MOE_CHECK(static_cast<int64_t>(m.moe_layer_freq.size()) == m.num_layers, "--moe-layer-freq has ",
                m.moe_layer_freq.size(), " entries but --num-layers is ", m.num_layers,
                " (the pattern needs one 0/1 per layer)");
      for (int64_t v : m.moe_layer_freq)
        MOE_CHECK(v == 0 || v == 1, "--moe-layer-freq pattern entries must be 0 (dense) or 1 (MoE), got ", v);
    }
  }

  // Tokenizer and vocabulary.
  if (a.tokenizer_type != kByteTokenizerType) {
    const bool megatron = std::find(kMegatronTokenizers.begin(), kMegatronTokenizers.end(), a.tokenizer_type) !=
                          kMegatronTokenizers.end();
    MOE_THROW(ErrorCode::invalid_argument, "--tokenizer-type ", a.tokenizer_type, " is ",
              megatron ? "a Megatron tokenizer that is not supported here: " : "not a known tokenizer: ",
              "only ", kByteTokenizerType, " exists (token = UTF-8 byte, ", ByteTokenizer::eod, " = end of document)");
  }
  MOE_CHECK(a.make_vocab_size_divisible_by >= 1, "--make-vocab-size-divisible-by must be >= 1, got ",
            a.make_vocab_size_divisible_by);
  if (a.vocab_size)
    MOE_CHECK(*a.vocab_size >= ByteTokenizer::vocab_size, "--vocab-size ", *a.vocab_size, " is too small for ",
              kByteTokenizerType, ": it needs ", ByteTokenizer::vocab_size, " ids (256 bytes + end of document)");
  if (a.padded_vocab_size) {
    MOE_CHECK(*a.padded_vocab_size >= a.vocab_size.value_or(ByteTokenizer::vocab_size), "--padded-vocab-size ",
              *a.padded_vocab_size, " is smaller than the tokenizer's vocabulary (",
              a.vocab_size.value_or(ByteTokenizer::vocab_size), ")");
    m.vocab_size = *a.padded_vocab_size;
  } else {
    m.vocab_size = padded_vocab_size(a.vocab_size.value_or(ByteTokenizer::vocab_size), a.make_vocab_size_divisible_by,
                                     m.tensor_model_parallel_size);
  }

  // Position table size.
  if (a.max_position_embeddings) {
    const int64_t P = *a.max_position_embeddings, S = m.seq_length;
    MOE_CHECK(P >= S, "--max-position-embeddings (", P, ") must be >= --seq-length (", S, ")");
    MOE_CHECK(m.position_embedding_type != "learned_absolute" || P == S, "--max-position-embeddings ", P,
              " with learned absolute positions is not supported: the position table has --seq-length (", S,
              ") rows here; give ", S, " or use --position-embedding-type rope");
  }

  if (s.has("sequence_parallel") && m.sequence_parallel.value_or(false) && m.tensor_model_parallel_size == 1)
    a.notes.push_back("--sequence-parallel: accepted, no effect with --tensor-model-parallel-size 1 (Megatron turns "
                      "it off too)");

  // ---- the trainer's own rules ----
  MOE_CHECK(a.micro_batch_size.has_value(), "--micro-batch-size is required");
  MOE_CHECK(*a.micro_batch_size >= 1, "--micro-batch-size must be >= 1, got ", *a.micro_batch_size);
  if (a.global_batch_size)
    MOE_CHECK(*a.global_batch_size >= 1, "--global-batch-size must be >= 1, got ", *a.global_batch_size);
  MOE_CHECK(a.train_iters.has_value(), "--train-iters is required (sample-based training is not implemented)");
  MOE_CHECK(*a.train_iters >= 1, "--train-iters must be >= 1, got ", *a.train_iters);
  MOE_CHECK(a.lr.has_value(), "--lr is required (Megatron has no default learning rate)");
  MOE_CHECK(*a.lr >= 0.0, "--lr must be >= 0, got ", *a.lr);
  MOE_CHECK(a.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0, got ", a.lr_warmup_iters);
  if (a.lr_warmup_fraction) {
    MOE_CHECK(a.lr_warmup_iters == 0, "can only specify one of --lr-warmup-fraction and --lr-warmup-iters");
    MOE_CHECK(*a.lr_warmup_fraction >= 0.0, "--lr-warmup-fraction must be >= 0, got ", *a.lr_warmup_fraction);
  }
  require_choice("lr-decay-style", a.lr_decay_style, {"constant", "linear", "cosine", "inverse-square-root", "WSD"});
  require_choice("lr-wsd-decay-style", a.lr_wsd_decay_style, {"exponential", "linear", "cosine", "minus_sqrt"});
  if (a.lr_wsd_decay_iters)
    MOE_CHECK(a.lr_decay_style == "WSD", "--lr-wsd-decay-iters applies to --lr-decay-style WSD only, got --lr-decay-style ",
              a.lr_decay_style);
  (void)LRScheduler(a, 1);  // Megatron's scheduler checks (they do not depend on the batch size)

  if (std::find(kMegatronOptimizers.begin(), kMegatronOptimizers.end(), a.optimizer) != kMegatronOptimizers.end())
    MOE_CHECK(a.optimizer == "adam" || a.optimizer == "sgd", "--optimizer ", a.optimizer,
              " is not implemented: use adam or sgd");
  require_choice("optimizer", a.optimizer, {"adam", "sgd"});
  MOE_CHECK(a.weight_decay >= 0.0, "--weight-decay must be >= 0, got ", a.weight_decay);
  MOE_CHECK(a.adam_beta1 >= 0.0 && a.adam_beta1 < 1.0, "--adam-beta1 must be in [0, 1), got ", a.adam_beta1);
  MOE_CHECK(a.adam_beta2 >= 0.0 && a.adam_beta2 < 1.0, "--adam-beta2 must be in [0, 1), got ", a.adam_beta2);
  MOE_CHECK(a.adam_eps > 0.0, "--adam-eps must be > 0, got ", a.adam_eps);
  MOE_CHECK(a.sgd_momentum >= 0.0 && a.sgd_momentum < 1.0, "--sgd-momentum must be in [0, 1), got ", a.sgd_momentum);
  MOE_CHECK(a.clip_grad >= 0.0, "--clip-grad must be >= 0 (0: no clipping), got ", a.clip_grad);
  if (a.eval_interval) MOE_CHECK(*a.eval_interval >= 1, "--eval-interval must be >= 1, got ", *a.eval_interval);
  MOE_CHECK(a.eval_iters >= 0, "--eval-iters must be >= 0, got ", a.eval_iters);
  MOE_CHECK(a.log_interval >= 1, "--log-interval must be >= 1, got ", a.log_interval);
  if (!a.data_path.empty() && !a.split) a.split = "969, 30, 1";  // Megatron's legacy default, as it warns
  if (a.split) (void)split_document_ranges(*a.split, 1000);  // the data loader's parser checks the syntax
  if (!a.data_path.empty()) (void)data_blend(a.data_path);
  MOE_CHECK(a.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got ", a.max_new_tokens);
  MOE_CHECK(a.temperature >= 0.0, "--temperature must be >= 0 (0: greedy), got ", a.temperature);
  MOE_CHECK(a.top_k >= 0, "--top-k must be >= 0 (0: the whole vocabulary), got ", a.top_k);
  MOE_CHECK(a.threads >= 0, "--threads must be >= 0, got ", a.threads);
  if (a.save_interval) {
    MOE_CHECK(*a.save_interval >= 1, "--save-interval must be >= 1, got ", *a.save_interval);
    MOE_CHECK(!a.save.empty(), "--save-interval ", *a.save_interval, " needs --save DIR");
  }
  MOE_CHECK(!(a.finetune || a.no_load_optim || a.no_load_rng) || !a.load.empty(),
            "--finetune / --no-load-optim / --no-load-rng need --load DIR");
}

}  // namespace

// ---- public ------------------------------------------------------------------------------------------------

MoEConfig megatron_model_defaults() {
  MoEConfig c;
  c.add_bias_linear = true;
  c.hidden_dropout = 0.1;
  c.attention_dropout = 0.1;
  return c;
}

std::vector<MegatronFlagInfo> megatron_flags() {
  std::vector<MegatronFlagInfo> out;
  for (const FlagDef& d : registry()) out.push_back({d.name, d.kind, d.text});
  return out;
}

TrainingArgs parse_megatron_args(const std::vector<std::string>& argv, MoEConfig& model) {
  return parse_megatron_args(argv, model, TrainingArgs{});
}

TrainingArgs parse_megatron_args(const std::vector<std::string>& argv, MoEConfig& model, TrainingArgs start) {
  MoEConfig m = model;  // the caller's config changes only when everything parsed
  TrainingArgs a = std::move(start);
  a.notes.clear();
  State s{a, m, {}, {}};
  for (const Group& g : group_argv(argv)) {
    const FlagDef* d = find_flag(g.name);
    if (!d)
      MOE_THROW(ErrorCode::invalid_argument, "unknown flag ", g.given, "; closest: ", join(closest_flags(g.name), ", "));
    if (d->kind == MegatronFlagInfo::Kind::refused)
      MOE_THROW(ErrorCode::not_supported, g.given, " is not supported: ", d->text);
    auto earlier = s.given.find(d->dest);
    MOE_CHECK(earlier == s.given.end(), g.given, " given twice",
              earlier != s.given.end() && earlier->second != g.given ? " (also as " + earlier->second + ")" : "",
              ": give each flag once");
    const size_t n = g.values.size();
    switch (d->arity) {
      case Arity::none:
        MOE_CHECK(n == 0, g.given, " is a switch and takes no value, got '", join(g.values, " "), "'");
        break;
      case Arity::one:
        MOE_CHECK(n == 1, g.given, " takes one value, got ",
                  n == 0 ? std::string("none") : std::to_string(n) + " ('" + join(g.values, "' '") + "')");
        break;
      case Arity::many:
        MOE_CHECK(n >= 1, g.given, " takes one or more values, got none");
        break;
      case Arity::bool_opt:
        MOE_CHECK(n <= 1, g.given, " is a switch or takes one true/false value, got '", join(g.values, " "), "'");
        break;
    }
    s.given[d->dest] = g.given;
    if (d->apply) d->apply(s, g.name, g.values);
  }
  finish(s);
  validate_model(m);
  model = m;
  return a;
}

// ---- --moe-layer-freq ----------------------------------------------------------------------------------------

namespace {

// A tiny evaluator for Python list expressions over integers: + (int add, list concat), * (int
// multiply, list repeat), parentheses, list literals of integer expressions.
class FreqExpr {
 public:
  using Value = std::variant<int64_t, std::vector<int64_t>>;
  explicit FreqExpr(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = expr();
    skip();
    if (i_ != s_.size()) fail("unexpected '" + std::string(1, s_[i_]) + "'");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    MOE_THROW(ErrorCode::invalid_argument, "--moe-layer-freq '", s_, "': ", what, " at position ", i_,
              " (expected an integer or a list expression such as \"([1]*3+[0]*1)*2\")");
  }
  void skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool eat(char c) {
    skip();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  Value expr() {
    Value v = term();
    while (eat('+')) {
      Value r = term();
      if (std::holds_alternative<int64_t>(v) && std::holds_alternative<int64_t>(r)) {
        v = std::get<int64_t>(v) + std::get<int64_t>(r);
      } else if (std::holds_alternative<std::vector<int64_t>>(v) && std::holds_alternative<std::vector<int64_t>>(r)) {
        auto& l = std::get<std::vector<int64_t>>(v);
        const auto& rr = std::get<std::vector<int64_t>>(r);
        l.insert(l.end(), rr.begin(), rr.end());
      } else {
        fail("cannot add a list and an integer");
      }
    }
    return v;
  }
  Value term() {
    Value v = factor();
    while (eat('*')) {
      Value r = factor();
      const bool li = std::holds_alternative<int64_t>(v), ri = std::holds_alternative<int64_t>(r);
      if (li && ri) {
        v = std::get<int64_t>(v) * std::get<int64_t>(r);
      } else if (li != ri) {
        const int64_t times = li ? std::get<int64_t>(v) : std::get<int64_t>(r);
        const std::vector<int64_t> base = li ? std::get<std::vector<int64_t>>(r) : std::get<std::vector<int64_t>>(v);
        if (times > 0 && base.size() * static_cast<size_t>(times) > 1000000) fail("the pattern is too long");
        std::vector<int64_t> out;
        for (int64_t k = 0; k < times; ++k) out.insert(out.end(), base.begin(), base.end());
        v = std::move(out);
      } else {
        fail("cannot multiply two lists");
      }
    }
    return v;
  }
  Value factor() {
    skip();
    if (eat('(')) {
      Value v = expr();
      if (!eat(')')) fail("missing ')'");
      return v;
    }
    if (eat('[')) {
      std::vector<int64_t> items;
      if (eat(']')) return items;
      while (true) {
        Value e = expr();
        if (!std::holds_alternative<int64_t>(e)) fail("list entries must be integers");
        items.push_back(std::get<int64_t>(e));
        if (eat(']')) break;
        if (!eat(',')) fail("expected ',' or ']'");
        if (eat(']')) break;  // a trailing comma, as Python allows
      }
      skip();
      if (i_ < s_.size() && s_[i_] == '[') fail("indexing is not supported");
      return items;
    }
    skip();
    const size_t b = i_;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (b == i_) fail(i_ < s_.size() ? "unexpected '" + std::string(1, s_[i_]) + "'" : "unexpected end");
    int64_t v = 0;
    auto r = std::from_chars(s_.data() + b, s_.data() + i_, v);
    if (r.ec != std::errc()) fail("integer out of range");
    return v;
  }

  std::string s_;
  size_t i_ = 0;
};

}  // namespace

std::vector<int64_t> parse_moe_layer_freq(const std::string& text) {
  const std::string t = trim(text);
  if (t.find('[') == std::string::npos) {
    int64_t v = 0;
    auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    MOE_CHECK(!t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size(), "--moe-layer-freq '", text,
              "': expected an integer N (every N-th layer is MoE) or a list expression such as \"([1]*3+[0]*1)*2\"");
    return {v};
  }
  FreqExpr::Value v = FreqExpr(t).parse();
  MOE_CHECK(std::holds_alternative<std::vector<int64_t>>(v), "--moe-layer-freq '", text,
            "': a list expression must give a list, got an integer");
  return std::get<std::vector<int64_t>>(v);
}

// ---- --data-path ------------------------------------------------------------------------------

DataBlend data_blend(const std::vector<std::string>& blend) {
  DataBlend out;
  if (blend.size() % 2 == 1) {
    out.prefixes = blend;
    return out;
  }
  std::vector<double> weights;
  std::vector<std::string> prefixes;
  size_t numeric = 0;
  for (size_t i = 0; i < blend.size(); i += 2) {
    const std::string t = trim(blend[i]);
    char* end = nullptr;
    const double w = t.empty() ? 0.0 : std::strtod(t.c_str(), &end);
    const bool is_number = !t.empty() && end == t.c_str() + t.size() && std::isfinite(w);
    numeric += is_number ? 1 : 0;
    weights.push_back(w);
    prefixes.push_back(blend[i + 1]);
  }
  if (numeric == 0) {
    out.prefixes = blend;
    return out;
  }
  MOE_CHECK(numeric == weights.size(), "--data-path: either give prefixes only, or weight prefix pairs; got ",
            join(blend, " "));
  for (double w : weights) MOE_CHECK(w >= 0.0, "--data-path: weights must be >= 0, got ", w);
  out.prefixes = prefixes;
  out.weights = weights;
  return out;
}

int64_t resolve_batch_sizes(TrainingArgs& a, MoEConfig& model, int64_t dp) {
  MOE_CHECK(dp >= 1, "resolve_batch_sizes: data-parallel size must be >= 1, got ", dp);
  MOE_CHECK(a.micro_batch_size && *a.micro_batch_size >= 1, "--micro-batch-size is required and must be >= 1");
  const int64_t mb = *a.micro_batch_size;
  if (!a.global_batch_size) a.global_batch_size = mb * dp;
  const int64_t gbs = *a.global_batch_size;
  MOE_CHECK(gbs >= 1 && gbs % (mb * dp) == 0, "--global-batch-size (", gbs,
            ") must be a multiple of --micro-batch-size × data-parallel size (", mb, " × ", dp, " = ", mb * dp, ")");
  model.num_microbatches = gbs / (mb * dp);
  return model.num_microbatches;
}

}  // namespace moe
