// libmoecore — the memory estimator (docs/memory.md, "Estimating memory").
//
// estimate_memory(config, layout) predicts, per rank, the device bytes one training step of
// MoEGPTModel + Optimizer holds at its peak (the allocator's peak_bytes over forward, backward and
// the optimizer step), by component, as Megatron's report_theoretical_memory does — but counted
// from what this library's modules actually allocate and save, and accounting for every parallel
// size (TP with sequence parallelism, CP, PP, EP, ETP, EDP), the distributed optimizer, bf16,
// recompute and offload:
//
//   weights      every local parameter in its dtype (the embedding on the first stage, the output
//                layer or the tied copy on the last, this stage's layers)
//   gradients    the parameters' own gradients (their dtype) + the optimizer's f32 main grads
//                (every local element, padded to a multiple of DP×CP / EDP)
//   optimizer    f32 master weights of bf16 parameters + AdamW moments (2 × f32) or the SGD momentum,
//                over every local element, or this rank's shard of them with the distributed
//                optimizer (1/(DP×CP) of the dense bucket, 1/EDP of the expert one)
//   activations  what the forward of one micro-batch keeps for its backward, slot by slot (norms,
//                attention, MLP / router / dispatcher / experts / shared experts, the embedding ids,
//                the output layer input and the logits with their cross-entropy statistics),
//                under the config's recompute / offload policies, times the micro-batches in flight
//                (1F1B: stage s of PP holds min(PP − s, M); no pipelining: 1), plus what each MoE layer
//                keeps between steps (its last routing) and the step's input batches
//   transient    the largest set of temporaries live on top of the saved activations at one moment:
//                the cross entropy and output layer's backward (logits, gathered input and its
//                gradient), a layer's forward or backward (gathered rows, recomputed slots,
//                dispatcher buffers, attention gradients), or the optimizer step (the distributed
//                optimizer's all-gather buffers)
//   total        weights + gradients + optimizer + the largest (saved + transient) over the phases
//                of the step (each layer's forward and backward, the output layer's, the optimizer
//                step); activation + transient = that largest phase
//
// Routed rows are what the dispatcher allocates: the local and allgather dispatchers a bound
// (tokens × min(top-k, local experts)), the all-to-all dispatcher the rows it receives, counted for
// balanced routing (an unbalanced step holds more). Nothing here allocates.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "moecore/config.h"
#include "moecore/parallel.h"

namespace moe {

// The run around the config: parallel sizes, which pipeline stage, batch and optimizer.
struct MemoryLayout {
  ParallelSizes sizes;                 // world, tp, cp, pp, ep, etp (parallel_sizes_from_config)
  int64_t pp_rank = 0;                 // the pipeline stage whose ranks are estimated
  int64_t micro_batch_size = 1;        // b: sequences per micro-batch
  int64_t num_microbatches = 1;        // M: micro-batches per replica and step
  bool use_distributed_optimizer = false;
  std::string optimizer = "adam";      // adam (AdamW: two f32 moments) | sgd
  double sgd_momentum = 0.9;           // sgd: 0 keeps no momentum buffer (bf16 or not: config.params_dtype)

  // The config's parallel sizes on `world` ranks, its num_microbatches, stage `pp_rank`.
  static MemoryLayout from_config(const MoEConfig& config, int64_t world, int64_t pp_rank = 0);
};

struct MemoryEstimate {
  // The role: pipeline stage and what it holds.
  int64_t pp_rank = 0, pp_size = 1;
  int64_t first_layer = 0, num_layers = 0;  // this stage's layers [first, first + num)
  bool has_embedding = false, has_output_layer = false, has_tied_copy = false;
  int64_t dp = 1, edp = 1;

  int64_t num_params = 0;              // elements of this rank's parameters
  int64_t weight_bytes = 0;
  int64_t gradient_bytes = 0;          // parameter grads + f32 main grads
  int64_t optimizer_bytes = 0;         // f32 masters + moments (this rank's shard)
  int64_t activation_bytes_per_microbatch = 0;  // saved by one micro-batch's forward
  int64_t microbatches_in_flight = 1;
  int64_t activation_bytes = 0;        // in flight × per micro-batch + persistent (all saved at a forward's end)
  int64_t transient_bytes = 0;         // what the peak phase adds beyond activation_bytes
  std::string peak_phase;              // where the peak falls ("output layer backward", "layer 3 backward", ...)
  int64_t total_bytes = 0;             // the predicted allocator peak: static + activations + transient
  int64_t offloaded_bytes = 0;         // pinned host bytes the offloaded slots take (not in total)

  // Activations of one micro-batch by module (for reports): "layer 0 attention", "output layer", ...
  std::vector<std::pair<std::string, int64_t>> activation_items;

  int64_t static_bytes() const { return weight_bytes + gradient_bytes + optimizer_bytes; }
};

// One stage's ranks (every rank of a stage holds the same amounts up to padding). Validates the
// config (validate_model with the layout's world size) and the layout; throws on a bad one.
MemoryEstimate estimate_memory(const MoEConfig& config, const MemoryLayout& layout);
// Every stage: estimate_memory for pp_rank 0 .. PP − 1.
std::vector<MemoryEstimate> estimate_memory_per_stage(const MoEConfig& config, const MemoryLayout& layout);

// Megatron's "Theoretical memory footprints" line for one stage's ranks, with our components:
//   [stage 0 of 2: layers 0-1, embedding | ranks 0,1] Theoretical memory footprints: weight=1.23 MB,
//   gradient=..., optimizer state=..., weight and optimizer=..., activation=... (2 micro-batches in
//   flight × ... MB), transient=..., total=... MB (... GiB)
// `ranks`: the world ranks of the stage (empty: left out).
std::string format_memory_estimate(const MemoryEstimate& estimate, const std::vector<int>& ranks = {});

}  // namespace moe
