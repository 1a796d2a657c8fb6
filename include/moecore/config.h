// libmoecore — configuration.
// Keys are Megatron Core's argument names (underscores); command-line flags are the same names with
// dashes. Defaults are Megatron's. validate() rejects every inconsistent combination before anything
// runs, with a message naming the key, the value and what is allowed.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moe {

struct MoEConfig {
  // ---- model ----
  int64_t hidden_size = 0;                     // H
  int64_t num_moe_experts = 0;                 // E
  int64_t moe_ffn_hidden_size = 0;             // F (per expert)
  int64_t moe_router_topk = 2;                 // k
  std::string moe_router_score_function = "softmax";  // softmax | sigmoid | sqrtsoftplus
  bool moe_router_pre_softmax = false;
  std::optional<double> moe_router_topk_scaling_factor;
  std::optional<int64_t> moe_router_num_groups;   // G (group-limited routing)
  std::optional<int64_t> moe_router_group_topk;   // g
  bool moe_router_enable_expert_bias = false;     // aux-loss-free balancing (sigmoid/sqrtsoftplus)
  double moe_router_bias_update_rate = 1e-3;
  // One or more of aux_loss, seq_aux_loss, global_aux_loss, none; one coefficient per type (a
  // single coefficient applies to all). JSON accepts a string or a list for both.
  std::vector<std::string> moe_router_load_balancing_type = {"aux_loss"};
  std::vector<double> moe_aux_loss_coeff = {0.0};
  std::optional<double> moe_z_loss_coeff;
  std::optional<double> moe_input_jitter_eps;
  std::optional<std::string> moe_router_dtype;  // fp32 | fp64 (unset: the params dtype, widened to fp32 for bf16)
  std::optional<double> moe_expert_capacity_factor;
  std::string moe_token_drop_policy = "probs";  // probs | position
  bool moe_pad_expert_input_to_capacity = false;
  std::optional<int64_t> moe_shared_expert_intermediate_size;
  bool moe_shared_expert_gate = false;
  bool moe_shared_expert_overlap = false;  // true is refused: overlap on a side stream is not implemented
  bool gated_linear_unit = false;          // true + silu = swiglu, true + gelu = geglu
  std::string activation_func = "gelu";    // gelu | silu | relu2 (alias squared_relu)
  std::string params_dtype = "fp32";       // fp32 | fp64 | bf16
  uint64_t seed = 1234;
  double init_method_std = 0.02;

  // ---- the GPT model around the MoE layers (docs/model.md); unused by a lone layer ----
  int64_t num_layers = 0;                        // 0: not a model config
  int64_t num_attention_heads = 0;               // nh
  std::optional<int64_t> num_query_groups;       // ng (unset: nh, plain multi-head attention)
  std::optional<int64_t> kv_channels;            // hd (unset: hidden_size / nh)
  std::optional<int64_t> ffn_hidden_size;        // dense MLP width (unset: 4·hidden_size)
  int64_t vocab_size = 0;                        // V
  int64_t seq_length = 0;                        // S
  std::string normalization = "LayerNorm";       // LayerNorm | RMSNorm
  double layernorm_epsilon = 1e-5;
  std::string position_embedding_type = "learned_absolute";  // learned_absolute | rope
  double rotary_base = 10000;
  double rotary_percent = 1.0;
  bool qk_layernorm = false;
  bool untie_embeddings_and_output_weights = false;
  // One integer N (layer i is MoE when i % N == 0) or one 0/1 per layer (JSON: an int or a list).
  std::vector<int64_t> moe_layer_freq = {1};
  bool add_bias_linear = false;     // Megatron's default is true: true is refused (no biases here)
  double hidden_dropout = 0.0;      // Megatron's default is 0.1: non-zero is refused (no dropout)
  double attention_dropout = 0.0;   // likewise
  int64_t num_microbatches = 1;     // M: micro-batches per replica and step (moe_gpt_io)

  // ---- parallelism (docs/parallelism.md) ----
  int64_t tensor_model_parallel_size = 1;
  int64_t context_parallel_size = 1;
  int64_t pipeline_model_parallel_size = 1;
  // Uneven pipeline stages (Megatron's --decoder-first/last-pipeline-num-layers): the layers of the
  // first / last stage; the other layers are split evenly over the stages in between. Unset: every
  // stage holds num_layers / PP layers. Only with pipeline_model_parallel_size > 1.
  std::optional<int64_t> decoder_first_pipeline_num_layers;
  std::optional<int64_t> decoder_last_pipeline_num_layers;
  int64_t expert_model_parallel_size = 1;
  std::optional<int64_t> expert_tensor_parallel_size;  // unset: tensor_model_parallel_size
  std::string moe_token_dispatcher_type = "allgather";  // allgather | alltoall
  // Megatron requires sequence parallelism for MoE training with TP > 1, and with TP > 1 everything
  // here runs sequence-parallel: unset or true is accepted, an explicit false with TP > 1 is
  // refused. With TP = 1 it has no effect (Megatron turns it off).
  std::optional<bool> sequence_parallel;
  std::string parallel_order = "tp-cp-ep-dp-pp";

  // ---- memory (docs/memory.md) ----
  std::string recompute_granularity;               // "" | selective | full
  // selective: core_attn | layernorm | mlp | moe | moe_act | shared_experts (empty: core_attn, as Megatron)
  std::vector<std::string> recompute_modules;
  std::optional<std::string> recompute_method;     // full: uniform (chunks of N layers) | block (first N layers)
  std::optional<int64_t> recompute_num_layers;     // full: N
  bool fine_grained_activation_offloading = false;
  // attn_norm | core_attn | attn_proj | mlp_norm | expert_fc1 | moe_act (Megatron) | shared_experts
  std::vector<std::string> offload_modules;
  int64_t min_offloaded_tensor_size = 1024 * 1024;  // elements: smaller saved tensors stay on the device

  // ---- derived helpers ----
  int64_t etp() const { return expert_tensor_parallel_size.value_or(tensor_model_parallel_size); }
  int64_t fc1_out_features() const { return gated_linear_unit ? 2 * moe_ffn_hidden_size : moe_ffn_hidden_size; }
  bool has_shared_expert() const { return moe_shared_expert_intermediate_size.value_or(0) > 0; }
  // Model helpers (the defaults Megatron derives).
  int64_t query_groups() const { return num_query_groups.value_or(num_attention_heads); }
  int64_t head_dim() const { return kv_channels.value_or(num_attention_heads > 0 ? hidden_size / num_attention_heads : 0); }
  int64_t dense_ffn() const { return ffn_hidden_size.value_or(4 * hidden_size); }
  bool is_moe_layer(int64_t layer) const;  // layer counted from 0 over the whole model
};

// Parses a JSON object; unknown keys and wrong types are errors naming `source`, the key and the
// expected type. Does not validate cross-key consistency (call validate()).
MoEConfig config_from_json(const std::string& json_text, const std::string& source = "<json>");
MoEConfig load_config(const std::string& path);
std::string config_to_json(const MoEConfig& config);  // every key, pretty-printed

// Sets one key from its textual value ("--moe-router-topk 4" style: key may use dashes or
// underscores, with or without leading dashes). Lists are comma-separated. Unknown key: an error
// that lists the closest known keys.
void set_config_value(MoEConfig& config, const std::string& key, const std::string& value);
bool is_config_key(const std::string& key);
std::vector<std::string> config_keys();
// How a key is written on a command line: one value, a boolean (a switch, or true/false), or a
// list (comma- or, for Megatron command lines, space-separated). Unknown key: an error.
enum class ConfigKeyShape { scalar, boolean, list };
ConfigKeyShape config_key_shape(const std::string& key);

// Throws moe::Error(invalid_argument) on the first inconsistency.
void validate(const MoEConfig& config);
// Also checks the parallel sizes against a world size (divisibility, experts % EP, ...).
void validate_parallel(const MoEConfig& config, int64_t world_size);

// The GPT model's keys (docs/model.md): sizes, heads and query groups, normalization, position
// embedding, moe_layer_freq, refused Megatron features (biases, dropout), the pipeline split of the
// layers (num_layers % PP, or decoder_first/last_pipeline_num_layers); then validate() of the MoE part
// (with moe_ffn_hidden_size defaulting to the dense width as in Megatron). With world_size > 0 also
// the model's parallel rules: heads and query groups over TP, vocabulary over TP, sequence over TP·CP
// (and 2·CP chunks under context parallelism).
void validate_model(const MoEConfig& config, int64_t world_size = 0);
// The config a model layer runs with: moe_ffn_hidden_size defaulted to the dense width (Megatron).
MoEConfig resolve_model_config(const MoEConfig& config);

}  // namespace moe
