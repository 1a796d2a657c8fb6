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
// One micro-batch at a time: forward() keeps what backward() needs; backward() accumulates the
// parameter gradients of loss_scale·(lm + every MoE layer's aux and z losses), scaled for
// finalize_grads' mean over DP×CP replicas (the lm gradient and the router losses' injected
// gradients are multiplied by CP as Megatron's schedule does, so the DP·CP mean gives the
// full-sequence gradient).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

class MoEGPTModel {
 public:
  // groups null: a single process. The config must pass validate_model (checked here, with the
  // world size of `groups`).
  MoEGPTModel(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups = nullptr);
  ~MoEGPTModel();
  MoEGPTModel(const MoEGPTModel&) = delete;
  MoEGPTModel& operator=(const MoEGPTModel&) = delete;

  // Forward and loss of one micro-batch. Returns the micro-batch's lm loss (Σ mask·ce / Σ mask over
  // all its tokens; the same value on every rank of the replica). keep_logits: keep this rank's
  // logits for last_logits().
  double forward(const MicroBatch& batch, const ForwardContext& ctx, bool keep_logits = false);
  // Backward of the last forward.
  void backward();
  // Once per optimizer step, after the last backward (expert-bias updates, global-aux resets).
  void finish_step();

  // Every parameter, each under its full canonical name (docs/model.md); the tied output layer is
  // the word embedding itself.
  std::vector<Parameter*> parameters();
  Parameter* find_parameter(const std::string& canonical_name);
  void zero_grad();

  // This rank's logits of the last forward (kept only with keep_logits): (S/CP, b, V/TP) f32, rows
  // at layout().cp_positions, vocabulary ids [tp_rank·V/TP, +V/TP).
  const Tensor& last_logits() const { return logits_; }
  const SequenceLayout& layout() const { return layout_; }
  int64_t num_layers() const;
  bool is_moe_layer(int64_t layer) const { return config_.is_moe_layer(layer); }
  MoELayer* moe_layer(int64_t layer);  // null for a dense layer
  const MoEConfig& config() const { return config_; }
  Device device() const { return device_; }

 private:
  struct Impl;
  MoEConfig config_;
  Device device_;
  std::shared_ptr<ProcessGroups> groups_;
  SequenceLayout layout_;
  std::unique_ptr<Impl> impl_;
  Tensor logits_;
};

}  // namespace moe
