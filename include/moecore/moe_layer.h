// libmoecore — the MoE layer: router → dispatch → grouped-GEMM experts → combine, plus the shared
// expert, forward and backward (docs/architecture.md, docs/moe.md).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/activation_store.h"
#include "moecore/config.h"
#include "moecore/context.h"
#include "moecore/experts.h"
#include "moecore/param.h"
#include "moecore/router.h"
#include "moecore/tensor.h"

namespace moe {

class ProcessGroups;    // moecore/parallel.h
class TokenDispatcher;  // internal (src/moe/dispatcher.h)

// What one forward routed, for logging and tests. The forward leaves the counts and loss values on
// the device (counts, losses); last_routing() reads them into the host fields on first use after a
// forward (one host read each: a device→host sync on a GPU). A trainer that logs only every few
// steps accumulates the device tensors instead (examples/train_moe_gpt.cpp).
struct RoutingSummary {
  std::vector<int64_t> tokens_per_expert;  // (E) this rank's tokens, after capacity
  double aux_loss = 0, z_loss = 0;
  int64_t capacity = 0;
  Tensor probs;        // (T, E) router dtype
  Tensor routing_map;  // (T, E) u8
  Tensor counts;       // (E) i64 on the layer's device: tokens_per_expert
  Tensor losses;       // (2) f64 on the layer's device: aux_loss, z_loss
};

// Micro-batches: every forward is kept under its micro-batch (ForwardContext::microbatch) until its
// backward, so a pipeline schedule may run the forwards of several micro-batches before their
// backwards, in any order. A forward of a micro-batch that is still pending replaces it.
class MoELayer {
 public:
  // groups null: a single process. layer_number enters the jitter key. param_prefix goes before
  // every parameter's canonical name ("decoder.layers.3.mlp." inside a model; "" alone).
  // pipeline_stage: the layer is part of one pipeline stage of a model (MoEGPTModel), so the groups
  // may have PP > 1 (they are the stage's groups); a lone layer needs PP = 1.
  MoELayer(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups = nullptr,
           int64_t layer_number = 0, const std::string& param_prefix = "", bool pipeline_stage = false);
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  // hidden (T, H) or (S, B, H) in the params dtype, this rank's tokens (token t = s·B + b), of
  // micro-batch ctx.microbatch. Returns the output in the same shape.
  Tensor forward(const Tensor& hidden, const ForwardContext& ctx);
  // grad_output shaped like the forward's output → grad of the input. Parameter grads accumulate.
  // The backward of the most recent pending forward.
  Tensor backward(const Tensor& grad_output);
  // The backward of micro-batch `microbatch`'s pending forward.
  Tensor backward(const Tensor& grad_output, int64_t microbatch);
  // Once per optimizer step (expert-bias update, global-aux reset).
  void finish_step();
  // Micro-batches forwarded and not yet backwarded; release() drops one without its backward.
  int64_t pending_microbatches() const { return static_cast<int64_t>(pending_.size()); }
  void release(int64_t microbatch);
  // Full-layer recompute (MoEGPTModel, docs/memory.md): discard_saved() drops everything micro-batch
  // m's forward saved (it stays pending, with its context and the router's E-sized loss state);
  // recompute_forward() re-runs that forward from the same input, counting nothing twice, and
  // returns its output again.
  void discard_saved(int64_t microbatch);
  Tensor recompute_forward(const Tensor& hidden, int64_t microbatch);

  std::vector<Parameter*> parameters();  // router.weight, experts.*, shared_experts.*, router.expert_bias
  Parameter* find_parameter(const std::string& canonical_name);
  void zero_grad();

  const RoutingSummary& last_routing() const;  // of the most recent forward (reads counts and losses)
  // The same without reading anything on the host: the host fields may be stale, counts and losses
  // are current.
  const RoutingSummary& last_routing_on_device() const { return summary_; }
  // Adds the most recent forward's tokens per expert and loss values (÷ loss_divisor) into device
  // tensors, created on the first call (counts (E) i64, losses (2) f64: aux, z, on the layer's
  // device), without a host read: a trainer sums its logging window there and reads it once per
  // log line.
  void accumulate_routing(Tensor& counts, Tensor& losses, double loss_divisor = 1.0) const;
  // The saved slots of the most recent forward's micro-batch (micro-batch 0 before any forward);
  // store(m): of micro-batch m. Each micro-batch's store starts with the config's policies.
  ActivationStore& store();
  ActivationStore& store(int64_t microbatch);
  // Device bytes held by the saved slots of every pending micro-batch.
  int64_t saved_device_bytes() const;
  Router& router() { return *router_; }
  GroupedExperts& experts() { return *experts_; }
  SharedExperts* shared_experts() { return shared_.get(); }
  const MoEConfig& config() const { return config_; }
  Device device() const { return device_; }
  TokenDispatcher& dispatcher() { return *dispatcher_; }

 private:
  MoEConfig config_;
  Device device_;
  std::shared_ptr<ProcessGroups> groups_;
  int64_t layer_number_;
  std::map<int64_t, ActivationStore> stores_;  // per micro-batch, emptied by its backward
  std::map<int64_t, Shape> pending_;           // pending micro-batches → their input shape
  std::vector<int64_t> pending_order_;         // pending micro-batches in forward order
  int64_t last_forward_ = 0;
  std::unique_ptr<Router> router_;
  std::unique_ptr<GroupedExperts> experts_;
  std::unique_ptr<SharedExperts> shared_;
  std::unique_ptr<TokenDispatcher> dispatcher_;
  mutable RoutingSummary summary_;
  mutable bool summary_read_ = true;  // the host fields of summary_ hold the device values
  DType router_dtype_ = DType::f32;
  // `moe` recompute (docs/memory.md): the forward keeps only its input (slot moe.input) and, per
  // pending micro-batch, its context; the backward re-runs run_forward with recompute = true.
  bool recompute_moe_ = false;
  std::shared_ptr<OffloadManager> offload_ = std::make_shared<OffloadManager>();  // every micro-batch's store
  std::map<int64_t, ForwardContext> contexts_;
  // Router → dispatch → experts (→ combine and shared expert). replay: a re-run (the router counts
  // nothing again). Returns the output (T, H), or undefined without need_output.
  Tensor run_forward(const Tensor& x, const ForwardContext& ctx, ActivationStore& st, int64_t mb, bool replay,
                     bool need_output, RouterOutput* routed);
  void drop_saved(ActivationStore& st, int64_t mb);  // all but the router's loss state
};

}  // namespace moe
