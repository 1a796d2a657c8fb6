// libmoecore — the MoE GPT model: Megatron Core's GPTModel with the local layer spec (docs/model.md).
//
//   tokens (b, S) ─ embedding (vocab-parallel over TP, + learned positions) ─ h (s, b, H)
//   each layer i:   h += linear_proj(attention(norm₁(h)))        attention: TP over query groups,
//                   h += mlp(norm₂(h))                             CP over the sequence
//                   (mlp: the MoE layer when config.is_moe_layer(i), else a dense MLP)
//   final norm ─ logits = h·W_outᵀ (vocab-parallel; W_out = the word embedding when tied)
//   ─ cross entropy per token ─ lm loss = Σ mask·ce / Σ mask over the micro-batch
//
// Every rank holds the residual stream of its own tokens: the micro-batch's sequences cut into
// 2·CP load-balanced chunks (CP rank r holds chunks r and 2·CP−1−r; one chunk when CP = 1), that
// part cut again into TP contiguous pieces (sequence parallelism). Inside the MoE layers the
// tokens are flattened t = s·b + bi (Megatron's [s, b, h] order).
//
// Pipeline parallelism (PP > 1): each pipeline stage holds contiguous layers (pipeline_stage_layers),
// the first stage the embedding, the last the final norm, output layer and loss; with tied
// embeddings the last stage holds its own copy of the word embedding, whose gradient is summed
// with the first stage's over the embedding group (finish_grads_pipeline). Hidden states
// (s_local·b, H) and their gradients cross stages; run_schedule drives the stages (Megatron's 1F1B).
//
// Micro-batches: forward_stage() keeps what backward_stage() needs under the micro-batch's id
// (ForwardContext::microbatch), so several micro-batches may be in flight and their backwards run
// in any order. backward accumulates the parameter gradients of loss_scale·(lm + every MoE layer's
// aux and z losses), scaled for finalize_grads' mean over DP×CP replicas (the lm gradient and the
// router losses' injected gradients are multiplied by CP as Megatron's schedule does, so the DP·CP
// mean gives the full-sequence gradient).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moecore/comm.h"
#include "moecore/config.h"
#include "moecore/context.h"
#include "moecore/moe_layer.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe {

class ProcessGroups;  // moecore/parallel.h

// One micro-batch of one data-parallel replica: whole sequences, the same on every rank of the
// replica (its TP and CP ranks take their parts). Host tensors.
struct MicroBatch {
  Tensor tokens;     // (b, S) i64, ids in [0, vocab_size)
  Tensor labels;     // (b, S) i64, ids in [0, vocab_size)
  Tensor loss_mask;  // (b, S) f32, optional (undefined: every token counts)
};

// Which tokens of a micro-batch this rank holds (pure function of S, CP, TP and the ranks).
struct SequenceLayout {
  int64_t S = 0, cp = 1, tp = 1, cp_rank = 0, tp_rank = 0;
  std::vector<int64_t> cp_positions;     // (S/CP) the sequence positions of this CP rank, in order
  std::vector<int64_t> local_positions;  // (S/(CP·TP)) this rank's own rows: its TP piece of the above
  std::vector<int64_t> key_positions;    // (S) cp_positions of every CP rank, in CP rank order

  static SequenceLayout make(int64_t S, int64_t cp, int64_t tp, int64_t cp_rank, int64_t tp_rank);
  int64_t s_cp() const { return S / cp; }
  int64_t s_local() const { return S / (cp * tp); }
};

// The layers of pipeline stage `pp_rank` (Megatron's split): num_layers / PP each, or, with
// decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers, those on the first / last
// stage and the rest split evenly over the stages between. Layers [first, first + count).
struct StageLayers {
  int64_t first = 0, count = 0;
};
StageLayers pipeline_stage_layers(const MoEConfig& config, int64_t pp_rank);

class MoEGPTModel {
 public:
  // groups null: a single process. The config must pass validate_model (checked here, with the
  // world size of `groups`). With PP > 1 and tied embeddings the constructor is collective over
  // the world (it splits off the embedding group).
  MoEGPTModel(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups = nullptr);
  ~MoEGPTModel();
  MoEGPTModel(const MoEGPTModel&) = delete;
  MoEGPTModel& operator=(const MoEGPTModel&) = delete;

  // ---- one micro-batch at a time (PP = 1) ----
  // Forward and loss of micro-batch ctx.microbatch. Returns the micro-batch's lm loss (Σ mask·ce /
  // Σ mask over all its tokens; the same value on every rank of the replica). keep_logits: keep
  // this rank's logits for last_logits(). With PP > 1 use run_schedule (or forward_stage).
  double forward(const MicroBatch& batch, const ForwardContext& ctx, bool keep_logits = false);
  // Backward of the most recent pending forward.
  void backward();
  // Once per optimizer step, after the last backward (expert-bias updates, global-aux resets).
  void finish_step();

  // ---- one pipeline stage (any PP; run_schedule drives these) ----
  // Forward of micro-batch ctx.microbatch on this rank's stage. batch: the micro-batch (tokens
  // give b on every stage; the first stage embeds them, the last reads labels and loss_mask).
  // input: the previous stage's output (s_local·b, H) in the params dtype, undefined on the first
  // stage. Returns this stage's output (s_local·b, H) for the next stage, undefined on the last
  // stage, which writes the lm loss to *lm_loss (when given) and keeps logits on request. A
  // pending forward of the same micro-batch is replaced.
  Tensor forward_stage(const MicroBatch& batch, const ForwardContext& ctx, const Tensor& input,
                       double* lm_loss = nullptr, bool keep_logits = false);
  // Backward of micro-batch `microbatch`'s pending forward. output_grad: the gradient of this
  // stage's output (s_local·b, H), from the next stage; undefined on the last stage (it starts
  // from the loss). Returns the gradient of this stage's input for the previous stage (undefined
  // on the first stage). Releases the micro-batch's saved state.
  Tensor backward_stage(int64_t microbatch, const Tensor& output_grad);
  // Drops a pending forward without its backward (forward-only schedules); release_all(): every one.
  void release(int64_t microbatch);
  void release_all();
  // Micro-batches whose forward on this stage is pending (their activations are held).
  int64_t pending_microbatches() const;
  // Device bytes held by the saved slots and per-micro-batch state of every pending micro-batch.
  int64_t saved_activation_bytes() const;

  // ---- pipeline stage of this rank ----
  int64_t pipeline_rank() const { return pp_rank_; }
  int64_t pipeline_size() const { return pp_size_; }
  bool is_first_stage() const { return pp_rank_ == 0; }
  bool is_last_stage() const { return pp_rank_ == pp_size_ - 1; }
  const StageLayers& stage_layers() const { return stage_; }
  bool has_layer(int64_t layer) const { return layer >= stage_.first && layer < stage_.first + stage_.count; }
  const std::shared_ptr<ProcessGroups>& groups() const { return groups_; }

  // Tied embeddings across stages (Megatron's embedding group: the first and last stage of each
  // pipeline). Sums the word embedding's gradient over the embedding group, so both copies hold
  // the gradient one stage-less model would. Call after the last backward of the step and before
  // finalize_grads / the optimizer's reduction. grad_of: the tensor to sum for a parameter
  // (default: p.grad; an optimizer that accumulates main grads passes its main grad). A no-op
  // where there is nothing to sum (PP = 1, untied, or a middle stage).
  void finish_grads_pipeline(const std::function<Tensor(Parameter&)>& grad_of = {});
  // The embedding group of this rank (first or last stage, tied, PP > 1), else null.
  Communicator* embedding_group() const { return embedding_group_.get(); }
  // The last stage's copy of the tied word embedding (PP > 1; null elsewhere): updated like any
  // parameter, but a gradient norm must not count it (the first stage's copy holds the same
  // gradient), as Megatron's `shared` attribute says.
  Parameter* shared_embedding_copy();

  // This rank's parameters (this stage's only), each under its full canonical name
  // (docs/model.md); the tied output layer is the word embedding itself (on the last stage of a
  // pipeline, its copy).
  std::vector<Parameter*> parameters();
  Parameter* find_parameter(const std::string& canonical_name);
  void zero_grad();

  // This rank's logits of the last forward on the last stage (kept only with keep_logits):
  // (S/CP, b, V/TP) f32, rows at layout().cp_positions, vocabulary ids [tp_rank·V/TP, +V/TP).
  const Tensor& last_logits() const { return logits_; }
  const SequenceLayout& layout() const { return layout_; }
  int64_t num_layers() const;  // of the whole model (every stage)
  bool is_moe_layer(int64_t layer) const { return config_.is_moe_layer(layer); }
  MoELayer* moe_layer(int64_t layer);  // null for a dense layer or a layer of another stage
  const MoEConfig& config() const { return config_; }
  Device device() const { return device_; }

 private:
  struct Impl;
  MoEConfig config_;
  Device device_;
  std::shared_ptr<ProcessGroups> groups_;
  SequenceLayout layout_;
  int64_t pp_rank_ = 0, pp_size_ = 1;
  StageLayers stage_;
  std::shared_ptr<Communicator> embedding_group_;
  std::unique_ptr<Impl> impl_;
  Tensor logits_;
};

// ---- pipeline schedules (Megatron's forward_backward_no_pipelining / ..._without_interleaving) ----

// One step of a stage's schedule: the forward ('F') or backward ('B') of a micro-batch.
struct ScheduleEvent {
  char kind = 'F';
  int64_t microbatch = 0;
  bool operator==(const ScheduleEvent& o) const { return kind == o.kind && microbatch == o.microbatch; }
};

// What 1F1B runs on stage `stage` of `pp` stages with M micro-batches (pure; PP = 1 gives F0 B0
// F1 B1 …): min(pp − stage − 1, M) warm-up forwards, then one forward and one backward each, then
// the cool-down backwards; forward_only: M forwards.
std::vector<ScheduleEvent> one_f_one_b_order(int64_t pp, int64_t stage, int64_t num_microbatches,
                                            bool forward_only = false);

struct ScheduleOptions {
  bool forward_only = false;  // forwards only (evaluation): nothing is kept for a backward
  bool keep_logits = false;   // the last stage keeps each micro-batch's logits (read them in after_forward)
  bool record_order = false;  // fill ScheduleResult::order
  // Called on this rank right after its stage's forward / backward of a micro-batch (e.g. read
  // moe_layer(i)->last_routing() or last_logits() after a forward; Optimizer::accumulate_grads()
  // after a backward).
  std::function<void(int64_t microbatch)> after_forward, after_backward;
};

struct ScheduleResult {
  double loss = 0;             // mean lm loss over the micro-batches, on every rank of the pipeline
  std::vector<double> losses;  // each micro-batch's lm loss, on every rank of the pipeline
  double bubble_s = 0;         // seconds this rank spent in point-to-point transfers (waiting for its neighbours)
  double compute_s = 0;        // seconds in its stage's forwards and backwards
  double total_s = 0;          // wall time of the schedule
  int64_t max_in_flight = 0;   // the most micro-batches whose activations this stage held at once
  int64_t peak_saved_bytes = 0;  // the most bytes of saved activations held at once (after a forward)
  std::vector<ScheduleEvent> order;  // with record_order
};

// Forward and backward of the step's micro-batches on every stage of the pipeline: the
// no-pipelining schedule (forward, backward per micro-batch) for PP = 1, Megatron's 1F1B for
// PP > 1. Collective over the world. batches: this replica's M micro-batches (the same list on
// every stage: each stage reads what it needs, and b from the tokens). ctx: the step's context;
// micro-batch m runs with ctx.microbatch = m and loss_scale = ctx.loss_scale / M (Megatron's
// division by num_microbatches; leave ctx.loss_scale at 1 for the step's mean). Gradients
// accumulate into the parameters; call finish_grads_pipeline() afterwards. Forwards left pending
// before the call (e.g. evaluation through forward()) are released first.
ScheduleResult run_schedule(MoEGPTModel& model, const std::vector<MicroBatch>& batches, const ForwardContext& ctx,
                            const ScheduleOptions& options = {});

}  // namespace moe
