// The MoE layer: one forward and one backward that mirror each other.
//
//   forward                                   backward
//   x (T, H)                                  dx (T, H) = Σ of the three paths below
//   ├─ router: probs, map (T, E) ─────────────┤ router.backward(dprobs) → dx +=
//   ├─ dispatch → rows (N, H), row probs (N) ─┤ dispatch_backward → dx, dprobs (T, E)
//   │  experts → y (N, H) ────────────────────┤ experts.backward → d rows, d row probs
//   │  combine → routed (T, H) ───────────────┤ combine_backward(dout) → dy (N, H)
//   └─ shared experts → (T, H) ───────────────┤ shared.backward(dout) → dx +=
//   out = routed + shared                     dout (T, H)
#include "moecore/moe_layer.h"

#include <algorithm>

#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moe/layer_factory.h"

namespace moe {

namespace {
DType params_dtype_of(const MoEConfig& c) { return dtype_from_name(c.params_dtype); }

// recompute_modules / offload_modules (Megatron names) → slot policies.
void apply_memory_policies(const MoEConfig& c, ActivationStore& store) {
  for (const std::string& m : c.recompute_modules) {
    if (m == "moe_act") store.set_policy("experts.act_output", SavePolicy::recompute);
    if (m == "shared_experts") store.set_policy("shared_experts.", SavePolicy::recompute);
    if (m == "moe") {
      store.set_policy("experts.fc1_output", SavePolicy::recompute);
      store.set_policy("experts.act_output", SavePolicy::recompute);
      store.set_policy("shared_experts.", SavePolicy::recompute);
      store.set_policy("router.logits", SavePolicy::recompute);
    }
  }
  if (!c.fine_grained_activation_offloading) return;
  for (const std::string& m : c.offload_modules) {
    if (m == "expert_fc1") store.set_policy("experts.fc1_input", SavePolicy::offload);
    if (m == "moe_act") store.set_policy("experts.fc1_output", SavePolicy::offload);
    if (m == "shared_experts") store.set_policy("shared_experts.", SavePolicy::offload);
  }
}
}  // namespace

MoELayer::MoELayer(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups,
                   int64_t layer_number, const std::string& param_prefix, bool pipeline_stage)
    : config_(config), device_(device), groups_(std::move(groups)), layer_number_(layer_number) {
  validate(config_);
  LayerParts parts = make_layer_parts(config_, device_, groups_, layer_number_, param_prefix, pipeline_stage);
  router_ = std::move(parts.router);
  experts_ = std::move(parts.experts);
  shared_ = std::move(parts.shared);
  dispatcher_ = std::move(parts.dispatcher);
  router_dtype_ = router_->router_dtype();
}

MoELayer::~MoELayer() = default;

ActivationStore& MoELayer::store(int64_t microbatch) {
  auto it = stores_.find(microbatch);
  if (it != stores_.end()) return it->second;
  ActivationStore& st = stores_[microbatch];
  apply_memory_policies(config_, st);
  return st;
}

ActivationStore& MoELayer::store() { return store(last_forward_); }

int64_t MoELayer::saved_device_bytes() const {
  int64_t b = 0;
  for (const auto& [mb, st] : stores_) b += st.device_bytes();
  return b;
}

Tensor MoELayer::forward(const Tensor& hidden, const ForwardContext& ctx) {
  const int64_t H = config_.hidden_size;
  MOE_CHECK(hidden.defined() && (hidden.ndim() == 2 || hidden.ndim() == 3) && hidden.size(-1) == H,
            "MoELayer::forward: expected hidden states (T, ", H, ") or (S, B, ", H, "), got ", hidden.desc());
  MOE_CHECK(hidden.dtype() == params_dtype_of(config_), "MoELayer::forward: expected dtype ", config_.params_dtype,
            " (params_dtype), got ", hidden.desc());
  MOE_CHECK(hidden.device() == device_, "MoELayer::forward: layer lives on ", device_.str(), ", input is ",
            hidden.desc());
  const int64_t mb = ctx.microbatch;
  ForwardContext c = ctx;
  if (hidden.ndim() == 3 && c.seq_length == 0) {
    c.seq_length = hidden.size(0);
    c.batch_size = hidden.size(1);
  }
  // A pending forward of the same micro-batch is replaced (as a forward without backward was before).
  release(mb);
  ActivationStore& st = store(mb);
  last_forward_ = mb;
  Tensor x = hidden.view({hidden.numel() / H, H});  // (T, H)

  RouterOutput ro = router_->forward(x, c, st);
  DType pd = ops::prob_dtype_for(x.dtype());
  Tensor probs = ro.probs.dtype() == pd ? ro.probs : ops::cast(ro.probs, pd);  // (T, E) prob dtype

  DispatchOutput d = dispatcher_->dispatch(x, probs, ro.routing_map, mb);
  Tensor y = experts_->forward(d.tokens, d.rows_per_expert, d.probs, st);  // (N, H)
  Tensor out = dispatcher_->combine(y, mb);                                  // (T, H)
  if (shared_) ops::add_(out, shared_->forward(x, st));

  summary_.tokens_per_expert = ro.tokens_per_expert;
  summary_.aux_loss = ro.aux_loss;
  summary_.z_loss = ro.z_loss;
  summary_.capacity = ro.capacity;
  summary_.probs = ro.probs;
  summary_.routing_map = ro.routing_map;
  pending_[mb] = hidden.shape();
  pending_order_.push_back(mb);
  return out.view(hidden.shape());
}

void MoELayer::release(int64_t mb) {
  auto it = stores_.find(mb);
  if (it != stores_.end()) {
    router_->release(it->second);
    experts_->release(it->second);
    it->second.clear();
  }
  dispatcher_->release(mb);
  pending_.erase(mb);
  pending_order_.erase(std::remove(pending_order_.begin(), pending_order_.end(), mb), pending_order_.end());
}

Tensor MoELayer::backward(const Tensor& grad_output) {
  MOE_CHECK(!pending_order_.empty(), "MoELayer::backward called without a forward");
  return backward(grad_output, pending_order_.back());
}

Tensor MoELayer::backward(const Tensor& grad_output, int64_t mb) {
  auto pit = pending_.find(mb);
  MOE_CHECK(pit != pending_.end(), "MoELayer::backward: micro-batch ", mb,
            " has no pending forward (backward called twice, or before its forward)");
  grad_output.check_shape(pit->second, "MoELayer::backward: grad_output");
  const int64_t H = config_.hidden_size, E = config_.num_moe_experts;
  ActivationStore& st = store(mb);
  Tensor dout = grad_output.view({grad_output.numel() / H, H});  // (T, H)
  const int64_t T = dout.size(0);

  Tensor dy = dispatcher_->combine_backward(dout, mb);  // (N, H), a fresh tensor
  Tensor drows = dy;  // the experts' dx overwrites dy: their backward reads dy before it writes dx
  Tensor drow_probs = Tensor::empty({dy.size(0)}, ops::prob_dtype_for(dy.dtype()), device_);
  experts_->backward(dy, drows, drow_probs, st);

  Tensor dx = Tensor::empty({T, H}, dout.dtype(), device_);                  // (T, H)
  Tensor dprobs = Tensor::empty({T, E}, drow_probs.dtype(), device_);        // (T, E)
  dispatcher_->dispatch_backward(drows, drow_probs, dx, dprobs, mb);
  if (shared_) shared_->backward(dout, dx, st);
  Tensor dprobs_r = dprobs.dtype() == router_dtype_ ? dprobs : ops::cast(dprobs, router_dtype_);
  router_->backward(dprobs_r, dx, st);
  st.clear();
  pending_.erase(mb);
  pending_order_.erase(std::remove(pending_order_.begin(), pending_order_.end(), mb), pending_order_.end());
  return dx.view(grad_output.shape());
}

void MoELayer::finish_step() { router_->finish_step(); }

std::vector<Parameter*> MoELayer::parameters() {
  std::vector<Parameter*> out{&router_->weight(), &experts_->fc1(), &experts_->fc2()};
  if (shared_) {
    out.push_back(&shared_->fc1());
    out.push_back(&shared_->fc2());
    if (shared_->has_gate()) out.push_back(&shared_->gate());
  }
  if (router_->expert_bias().value.defined()) out.push_back(&router_->expert_bias());
  return out;
}

Parameter* MoELayer::find_parameter(const std::string& name) {
  for (Parameter* p : parameters())
    if (p->name == name) return p;
  return nullptr;
}

void MoELayer::zero_grad() {
  for (Parameter* p : parameters()) p->zero_grad();
}

}  // namespace moe
