// libmoecore — the pieces of a Megatron-style pretraining loop around MoEGPTModel:
//   * TrainingArgs and parse_megatron_args: a Megatron `pretrain_gpt.py` command line (Megatron's
//     flag names, switches, space-separated lists, defaults), model flags into MoEConfig;
//   * LRScheduler: Megatron Core's OptimizerParamScheduler (get_lr), iteration-based;
//   * format_train_log_line / format_validation_line: Megatron's log lines, byte for byte;
//   * MetricsWriter: a JSON-lines metrics file (scripts/plot_metrics.py draws it);
//   * ProgressIndicator: a one-line progress bar on a terminal.
// Nothing here runs a model; examples/train_moe_gpt.cpp wires it up.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "moecore/config.h"

namespace moe {

// --tokenizer-type of the only tokenizer here: moe::ByteTokenizer (moecore/data.h; ids 0..255 are
// bytes, 256 ends a document, 257 ids before padding).
inline constexpr const char* kByteTokenizerType = "ByteLevelTokenizer";

// ---- Megatron's trainer-level arguments ---------------------------------------------------------------
// Names and defaults are Megatron's (megatron/training/arguments.py and config/training_config.py);
// std::nullopt is Megatron's None. Model flags live in MoEConfig (its `seed` is Megatron's --seed).
struct TrainingArgs {
  // batch and length of training
  std::optional<int64_t> micro_batch_size;   // required
  std::optional<int64_t> global_batch_size;  // None: micro_batch_size · data-parallel size
  std::optional<int64_t> train_iters;        // required (sample-based training is refused)

  // learning rate (OptimizerParamScheduler)
  std::optional<double> lr;                  // required
  double min_lr = 0.0;
  int64_t lr_warmup_iters = 0;
  std::optional<double> lr_warmup_fraction;  // of the decay steps; excludes lr_warmup_iters
  double lr_warmup_init = 0.0;
  std::optional<int64_t> lr_decay_iters;     // None: train_iters
  std::string lr_decay_style = "linear";     // constant | linear | cosine | inverse-square-root | WSD
  std::optional<int64_t> lr_wsd_decay_iters; // required by WSD: the length of its final anneal
  std::string lr_wsd_decay_style = "exponential";  // exponential | linear | cosine | minus_sqrt

  // optimizer (Megatron's Adam is AdamW: decoupled weight decay)
  std::string optimizer = "adam";            // adam | sgd
  double weight_decay = 0.01;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  double sgd_momentum = 0.9;
  double clip_grad = 1.0;                    // global L2 norm; 0 disables clipping
  // Megatron's check (on by default there and here; --no-check-for-nan-in-loss-and-grad turns it
  // off): a non-finite lm loss or grad norm stops the run with an error instead of a skipped step.
  bool check_for_nan_in_loss_and_grad = true;
  bool use_distributed_optimizer = false;

  // precision: --bf16 also sets MoEConfig::params_dtype = "bf16" (--fp16 is refused)
  bool bf16 = false;

  // validation and logging
  std::optional<int64_t> eval_interval;      // None: no validation during training
  int64_t eval_iters = 100;
  int64_t log_interval = 100;

  // data and tokenizer
  std::vector<std::string> data_path;        // Megatron's blend list: prefixes, or weight prefix pairs
  std::optional<std::string> split;          // "99,1,0" (split_document_ranges, moecore/data.h); None
                                             // with a data path: Megatron's legacy "969, 30, 1"
  std::string tokenizer_type = kByteTokenizerType;
  std::optional<int64_t> vocab_size;         // the tokenizer's, before padding (None: ByteTokenizer's 257)
  std::optional<int64_t> padded_vocab_size;  // the model's, as given (None: vocab_size padded)
  int64_t make_vocab_size_divisible_by = 128;
  std::optional<int64_t> max_position_embeddings;  // >= seq_length; == seq_length with learned_absolute

  // sampling from the trained model (this trainer's)
  std::vector<std::string> sample_prompts;
  int64_t max_new_tokens = 64;
  double temperature = 1.0;                   // 0: greedy
  int64_t top_k = 0;                          // 0: sample from the whole vocabulary

  // this trainer's own
  int64_t threads = 0;                        // 0: the library's default
  // checkpoints (docs/checkpoints.md)
  std::string save;                           // directory to save into; empty: no checkpoints
  std::string load;                           // directory to resume from; empty: start fresh
  std::optional<int64_t> save_interval;       // iterations between saves (and one at the end)
  bool finetune = false, no_load_optim = false, no_load_rng = false, no_save_optim = false, no_save_rng = false;

  // --estimate-memory: print every stage's theoretical memory per rank (estimate_memory,
  // moecore/memory.h) and exit without training.
  bool estimate_memory = false;
  std::string metrics_file;                   // JSON lines (MetricsWriter); empty: none
  std::string plots_dir;                      // where scripts/plot_metrics.py draws; empty: none
  std::optional<double> expect_val_loss_below;  // exit non-zero unless the last validation loss is below

  // Filled by parse_megatron_args: one line per flag that was accepted although it changes nothing
  // here (fusions, overlap, kernel choices), saying why. Print them at start so nothing is dropped
  // silently.
  std::vector<std::string> notes;
};

// Parses a Megatron pretrain_gpt.py command line (argv without the program name) into TrainingArgs
// and `model` (updated in place; what `model` holds already is the starting point):
//   * flags are spelled as Megatron spells them; "--flag value", "--flag=value"; switches take no
//     value; list flags take space-separated values (commas also work for config keys);
//   * every MoEConfig key is a flag (its name with dashes); bool keys are switches or take a value;
//   * Megatron's aliases and switches: --num-experts, --norm-epsilon, --swiglu, --squared-relu,
//     --disable-bias-linear, --group-query-attention (+ --num-query-groups), --no-position-embedding
//     (rope only), --use-rotary-position-embeddings, --bf16, --sequence-parallel, ...;
//   * --moe-layer-freq: an integer, or a Python list expression ("[1]*3+[0]*1", "([0]+[1]*3)*2");
//   * Megatron's derivations: the --swiglu default ffn_hidden_size int((4·H·2/3)/64)·64,
//     moe_ffn_hidden_size = ffn_hidden_size when unset (resolve_model_config), the
//     tokenizer's vocabulary padded to make_vocab_size_divisible_by · TP (padded_vocab_size,
//     moecore/data.h; MoEConfig::vocab_size is the padded size);
//   * flags we deliberately do not support are refused by name with the reason; any other unknown
//     flag is an error naming the closest known flags; a flag given twice is an error.
// Checks every trainer rule, builds the LR schedule once to check it, and ends with
// validate_model(model) (call validate_model(model, world_size) again once the world is known).
// Throws moe::Error(invalid_argument) on the first problem.
TrainingArgs parse_megatron_args(const std::vector<std::string>& argv, MoEConfig& model);
// The same, starting from `start` instead of Megatron's defaults (a trainer's own defaults; the
// required flags are then satisfied by values already set in `start`).
TrainingArgs parse_megatron_args(const std::vector<std::string>& argv, MoEConfig& model, TrainingArgs start);

// Megatron's defaults for the model where they differ from MoEConfig's: add_bias_linear = true,
// hidden_dropout = attention_dropout = 0.1. Start from this to read a Megatron command line with
// Megatron's meaning: unless it says --disable-bias-linear and zero dropouts, validate_model refuses
// it by name (biases and dropout are not implemented) instead of training a different model.
MoEConfig megatron_model_defaults();

// The Megatron flag names parse_megatron_args knows (without the leading dashes), by kind.
struct MegatronFlagInfo {
  std::string name;
  enum class Kind { trainer, config_key, alias, accepted_note, refused } kind;
  std::string text;  // alias: the key it sets; accepted_note: the note; refused: the reason
};
std::vector<MegatronFlagInfo> megatron_flags();

// Megatron's --moe-layer-freq argument: "N" → {N}; a list expression of [], integers, ',', '+', '*'
// and parentheses (Python semantics: list + list, list * int, int * list, int arithmetic) → the list.
std::vector<int64_t> parse_moe_layer_freq(const std::string& text);

// Megatron's get_blend_from_list: "a b" → prefixes with equal weight; "30 a 70 b" → weighted.
struct DataBlend {
  std::vector<std::string> prefixes;
  std::vector<double> weights;  // empty: equal weights
};
DataBlend data_blend(const std::vector<std::string>& data_path);

// Megatron's batch arithmetic for data-parallel size DP (world / (TP·CP·PP)): sets
// args.global_batch_size (default micro · DP), checks it is a multiple of micro · DP, sets
// model.num_microbatches = global / (micro · DP) and returns it.
int64_t resolve_batch_sizes(TrainingArgs& args, MoEConfig& model, int64_t data_parallel_size);

// ---- the learning-rate schedule ------------------------------------------------------------------------
// Megatron Core's OptimizerParamScheduler.get_lr as get_optimizer_param_scheduler builds it for
// iteration-based training: its steps count samples, so after `iteration` iterations the scheduler
// stands at num_steps = iteration · global_batch_size, with
//   warmup_steps = lr_warmup_fraction · decay_steps, or lr_warmup_iters · global_batch_size
//   decay_steps  = (lr_decay_iters or train_iters) · global_batch_size
//   wsd_steps    = lr_wsd_decay_iters · global_batch_size
// and
//   warmup (warmup_steps > 0 and n <= warmup_steps): init + (max − init) · n / warmup_steps
//   constant: max;   n > decay_steps: min
//   inverse-square-root: max(min, max · sqrt(max(warmup_steps, 1)) / sqrt(max(n, 1)))
//   otherwise r = (n − warmup_steps) / (decay_steps − warmup_steps), lr = min + coeff · (max − min):
//     linear 1 − r;  cosine (cos(π r) + 1) / 2;
//     WSD: 1 until n <= decay_steps − wsd_steps, then with w = (n − (decay_steps − wsd_steps)) / wsd_steps:
//          linear 1 − w, cosine (cos(π w) + 1) / 2, exponential 2 · 0.5^w − 1, minus_sqrt 1 − sqrt(w).
// Megatron steps the scheduler after each optimizer step, so the optimizer step of iteration i
// (counted from 1) uses lr(i − 1), and the log line of iteration i prints lr(i).
class LRScheduler {
 public:
  LRScheduler(const TrainingArgs& args, int64_t global_batch_size);
  double lr(int64_t iteration) const;      // get_lr() after `iteration` iterations
  double lr_at_step(double num_steps) const;  // get_lr() at num_steps samples
  double max_lr() const { return max_lr_; }
  double min_lr() const { return min_lr_; }
  double warmup_steps() const { return warmup_steps_; }
  double decay_steps() const { return decay_steps_; }

 private:
  double init_lr_, max_lr_, min_lr_, warmup_steps_, decay_steps_, wsd_steps_;
  int64_t global_batch_size_;
  std::string style_, wsd_style_;
};

// ---- log lines -------------------------------------------------------------------------------------------
// One training log line as Megatron's training_log prints it, then ours:
//  [2024-05-01 12:00:00.123456] iteration       10/     100 | consumed samples:          320 |
//  elapsed time per iteration (ms): 123.4 | learning rate: 1.000000E-04 | global batch size:    32 |
//  lm loss: 3.456789E+00 | load_balancing_loss: 1.012345E+00 | loss scale: 1.0 | grad norm: 0.123 |
//  number of skipped iterations:   0 | number of nan iterations:   0 | tokens per second per GPU:
//  1234.5 | peak memory (MB): 12.3 |
// (one line; the timestamp part only when `timestamp` is set). Losses print in the given order, each
// as "{name}: {:.6E}", and, as Megatron does, only when >= 0 (a NaN loss is left out).
struct TrainLogFields {
  std::string timestamp;  // megatron_timestamp(), or empty
  int64_t iteration = 0;
  int64_t train_iters = 0;
  int64_t consumed_samples = 0;
  double elapsed_ms_per_iteration = 0.0;
  std::optional<double> learning_rate;
  int64_t global_batch_size = 0;
  // "lm loss" first, then moe_loss_names(config) with their values: each the mean over the log
  // interval's iterations of the per-step value (MoE losses: unscaled, i.e. divided by their
  // coefficient, averaged over the MoE layers and micro-batches, as Megatron's tracker reports them).
  std::vector<std::pair<std::string, double>> losses;
  double loss_scale = 1.0;
  std::optional<double> grad_norm;
  int64_t skipped_iterations = 0;
  int64_t nan_iterations = 0;
  // ours, after Megatron's fields
  std::optional<double> tokens_per_second_per_gpu;
  std::optional<double> peak_memory_mb;  // MiB (2^20 bytes), as Megatron's report_memory
};
std::string format_train_log_line(const TrainLogFields& fields);

// Megatron's validation block (evaluate_and_print_results), three lines joined by '\n' (no final
// newline): dashes, " validation loss at {prefix} | lm loss value: {:.6E} | lm loss PPL: {:.6E} | ",
// dashes; the dashes are one longer than the middle line; PPL = exp(min(20, loss)). Megatron's
// prefix is "iteration N" during training and "iteration N on validation set" at the end.
std::string format_validation_line(const std::string& prefix,
                                   const std::vector<std::pair<std::string, double>>& losses);
std::string format_validation_line(const std::string& prefix, double lm_loss);

// The MoE loss names Megatron's training_log reports for a config, in its order:
// load_balancing_loss (aux_loss), seq_load_balancing_loss, global_load_balancing_loss, z_loss (when
// moe_z_loss_coeff is set).
std::vector<std::string> moe_loss_names(const MoEConfig& config);

// "2024-05-01 12:00:00.123456", local time, as datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f').
std::string megatron_timestamp();

// ---- the metrics file ----------------------------------------------------------------------------------
// One logged step of one MoE layer.
struct MoELayerMetrics {
  int64_t layer = 0;                         // model layer index, from 0
  std::vector<int64_t> tokens_per_expert;    // (E) over the logged window, all ranks
  double aux_loss = 0.0;                     // unscaled load-balancing loss(es), summed over types
  double z_loss = 0.0;                       // unscaled
  int64_t dropped_tokens = 0;                // routed slots dropped by capacity
};

struct StepMetrics {
  int64_t iteration = 0;
  int64_t consumed_samples = 0;
  double lr = 0.0;
  std::vector<std::pair<std::string, double>> losses;  // as TrainLogFields::losses ("lm loss" first)
  std::optional<double> grad_norm;
  double elapsed_ms_per_iteration = 0.0;
  double tokens_per_second = 0.0;            // all ranks
  int64_t peak_bytes = 0;                    // device memory high-water mark (this rank)
  std::vector<MoELayerMetrics> moe_layers;
};

// Load statistics of one tokens-per-expert vector: min, max, and the coefficient of variation
// (population standard deviation / mean; 0 when the mean is 0).
struct ExpertLoadStats {
  int64_t min = 0, max = 0;
  double cv = 0.0;
};
ExpertLoadStats expert_load_stats(const std::vector<int64_t>& tokens_per_expert);

// Appends JSON lines to a file. Each record is one write(2) of the whole line on an O_APPEND
// descriptor: no user-space buffering (a line is in the file when the call returns, even if the
// trainer dies next) and concurrent writers never interleave within a line. Records:
//   {"type":"train","iteration":10,"consumed_samples":320,"lr":1e-4,"lm_loss":3.4,
//    "losses":{"lm loss":3.4,"load_balancing_loss":1.01},"grad_norm":0.12,
//    "elapsed_ms_per_iteration":123.4,"tokens_per_second":5000.0,"peak_bytes":123456}
//   {"type":"moe_layer","iteration":10,"layer":0,"tokens_per_expert":[...],"load_min":..,
//    "load_max":..,"load_cv":..,"aux_loss":..,"z_loss":..,"dropped_tokens":0}
//   {"type":"validation","iteration":10,"lm_loss":3.1,"ppl":22.2,"losses":{"lm loss":3.1}}
//   {"type":"run", ...}: free-form key/values describing the run (config, layout)
// Non-finite numbers are written as null.
class MetricsWriter {
 public:
  // truncate: start a new file (the default); otherwise append to an existing one.
  explicit MetricsWriter(const std::string& path, bool truncate = true);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;

  void write_step(const StepMetrics& step);  // one "train" record + one "moe_layer" record per layer
  void write_validation(int64_t iteration, const std::vector<std::pair<std::string, double>>& losses);
  // A "run" record from a JSON object text ({"world_size": 4, ...}); throws if it is not an object.
  void write_run_info(const std::string& json_object);
  const std::string& path() const { return path_; }

  // The lines write_step would write, without writing them (for tests and other sinks).
  static std::vector<std::string> step_lines(const StepMetrics& step);
  static std::string validation_line(int64_t iteration, const std::vector<std::pair<std::string, double>>& losses);

 private:
  void write_line(const std::string& line);
  std::string path_;
  int fd_ = -1;
};

// ---- progress on a terminal ----------------------------------------------------------------------------
bool stdout_is_tty();

// "[#########-----------]  45/100  45%  <status>" with `width` bar characters.
std::string progress_bar_text(int64_t done, int64_t total, int width, const std::string& status);

// Redraws one progress line on stdout ('\r', cleared to the end of the line) when enabled — by
// default only when stdout is a terminal, so logs and pipes never see it. Call clear() before
// printing a log line and the bar comes back on the next update().
class ProgressIndicator {
 public:
  explicit ProgressIndicator(int64_t total, bool enabled = stdout_is_tty(), int width = 30);
  ~ProgressIndicator();
  void update(int64_t done, const std::string& status = "");
  void clear();
  void finish();  // clears the line for good
  bool enabled() const { return enabled_; }

 private:
  int64_t total_;
  bool enabled_;
  int width_;
  bool drawn_ = false;
};

}  // namespace moe
