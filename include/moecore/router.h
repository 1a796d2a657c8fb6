// libmoecore — the top-k router (docs/moe.md).
// forward: x (T, H) → logits (T, E) = x·Wᵀ in the router dtype → scores → (group-limited) top-k →
// probs, then capacity dropping/padding. Aux, seq-aux, global-aux and z losses are computed in
// the forward (training only) and their gradients injected in the backward, scaled by the
// context's loss_scale; they are reported, not added to the model loss.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/activation_store.h"
#include "moecore/comm.h"
#include "moecore/config.h"
#include "moecore/context.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe {

// Groups the router reduces over; null members mean a group of one.
struct RouterGroups {
  std::shared_ptr<Communicator> tp_cp;     // aux/seq-aux/z loss token counts
  std::shared_ptr<Communicator> tp_dp_cp;  // global aux loss, expert-bias counts
};

struct RouterOutput {
  Tensor probs;        // (T, E) router dtype, zero off the map
  Tensor routing_map;  // (T, E) u8, after capacity
  Tensor topk_idx;     // (T, k) i32
  std::vector<int64_t> tokens_per_expert;  // (E) column sums of routing_map, this rank's tokens
  double aux_loss = 0;  // Σ over the enabled aux types, with coefficients, summed over TP×CP
  double z_loss = 0;    // with its coefficient, summed over TP×CP
  int64_t capacity = 0;  // per-expert capacity (0: dropless)
  // The same values on the router's device (forward_on_device leaves the host fields above empty):
  Tensor counts;  // (E) i64 tokens_per_expert
  Tensor losses;  // (2) f64 aux_loss, z_loss
};

class Router {
 public:
  // param_prefix goes before the canonical names ("decoder.layers.3.mlp." inside a model).
  Router(const MoEConfig& config, Device device, RouterGroups groups = {}, int64_t layer_number = 0,
         const std::string& param_prefix = "");

  // x (T, H) in the params dtype. What the backward needs is kept in `store` and, for the rest,
  // under that store: forwards of several micro-batches (each with its own store) may be pending
  // at once and run their backwards in any order.
  // recompute: re-running a forward for the `moe` recompute policy (docs/memory.md) after
  // keep_for_recompute(store): the routing is computed again (same bits), but nothing is counted
  // twice (expert-bias and global-aux counts), the loss collectives are not re-run, and the aux /
  // z gradients and reported loss values are the first forward's.
  RouterOutput forward(const Tensor& x, const ForwardContext& ctx, ActivationStore& store, bool recompute = false);
  // `moe` recompute: after the first forward with `store`, drops every device tensor that forward
  // kept (slots, jitter noise, routing map) and keeps only the E-sized aux / z gradient weights
  // and loss values (device tensors), for forward(..., recompute = true).
  void keep_for_recompute(ActivationStore& store);
  // The same forward with the counts and loss values left on the device (RouterOutput::counts,
  // ::losses; the host fields stay empty/zero): no host read, so no device→host sync on a GPU.
  // forward() is this plus one read of each. The layer calls this one.
  RouterOutput forward_on_device(const Tensor& x, const ForwardContext& ctx, ActivationStore& store,
                                 bool recompute = false);
  // dprobs (T, E) router dtype. Accumulates weight.grad; dx (T, H) += the router's input gradient.
  // The backward of the forward that used `store`.
  void backward(const Tensor& dprobs, Tensor& dx, ActivationStore& store);
  // Forwards whose backward has not run yet; release() drops one without its backward.
  int64_t pending() const { return static_cast<int64_t>(pending_.size()); }
  void release(const ActivationStore& store) {
    pending_.erase(&store);
    replay_.erase(&store);
  }

  // Once per optimizer step, after the last micro-batch's backward: all-reduces the expert-bias
  // token counts over TP×DP×CP and applies b_i += rate·sign(mean(c) − c_i); resets the global aux
  // loss accumulators. Returns nothing; bias is in expert_bias().value.
  void finish_step();

  Parameter& weight() { return weight_; }            // router.weight (E, H)
  Parameter& expert_bias() { return expert_bias_; }  // router.expert_bias (E) f32, not trainable
  const MoEConfig& config() const { return config_; }
  DType router_dtype() const { return router_dtype_; }

 private:
  MoEConfig config_;
  Device device_;
  RouterGroups groups_;
  int64_t layer_number_;
  DType router_dtype_;
  Parameter weight_;
  Parameter expert_bias_;
  // Expert-bias counts accumulated over the step's micro-batches (E) f64 on the device (read once
  // per step by finish_step).
  Tensor local_tokens_per_expert_;
  // global_aux_loss: counts accumulated over the step's micro-batches (E) f64 on the device, and
  // their number.
  Tensor global_tokens_per_expert_;
  int64_t global_aux_steps_ = 0;
  // Per-forward state the backward reads (beside the store's slots), by the forward's store. The
  // step's counts above do not depend on the order in which pending backwards run.
  struct Pending;
  std::map<const ActivationStore*, std::shared_ptr<Pending>> pending_;
  // `moe` recompute: what a re-run forward takes from the first one (host only), by store.
  struct Replay;
  std::map<const ActivationStore*, std::shared_ptr<Replay>> replay_;
};

}  // namespace moe
