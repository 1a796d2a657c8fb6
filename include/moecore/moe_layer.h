// libmoecore — the MoE layer: router → dispatch → grouped-GEMM experts → combine, plus the shared
// expert, forward and backward (DESIGN.md §4, §6, §7).
#pragma once
#include <cstdint>
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

// What one forward routed, for logging and tests.
struct RoutingSummary {
  std::vector<int64_t> tokens_per_expert;  // (E) this rank's tokens, after capacity
  double aux_loss = 0, z_loss = 0;
  int64_t capacity = 0;
  Tensor probs;        // (T, E) router dtype
  Tensor routing_map;  // (T, E) u8
};

class MoELayer {
 public:
  // groups null: a single process. layer_number enters the jitter key. param_prefix goes before
  // every parameter's canonical name ("decoder.layers.3.mlp." inside a model; "" alone).
  MoELayer(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups = nullptr,
           int64_t layer_number = 0, const std::string& param_prefix = "");
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  // hidden (T, H) or (S, B, H) in the params dtype, this rank's tokens (token t = s·B + b).
  // Returns the output in the same shape.
  Tensor forward(const Tensor& hidden, const ForwardContext& ctx);
  // grad_output shaped like the forward's output → grad of the input. Parameter grads accumulate.
  Tensor backward(const Tensor& grad_output);
  // Once per optimizer step (expert-bias update, global-aux reset).
  void finish_step();

  std::vector<Parameter*> parameters();  // router.weight, experts.*, shared_experts.*, router.expert_bias
  Parameter* find_parameter(const std::string& canonical_name);
  void zero_grad();

  const RoutingSummary& last_routing() const { return summary_; }
  ActivationStore& store() { return store_; }
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
  ActivationStore store_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<GroupedExperts> experts_;
  std::unique_ptr<SharedExperts> shared_;
  std::unique_ptr<TokenDispatcher> dispatcher_;
  RoutingSummary summary_;
  Shape input_shape_;
  DType router_dtype_ = DType::f32;
};

}  // namespace moe
