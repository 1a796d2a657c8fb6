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

#include "core/sanitize.h"
#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moe/layer_factory.h"

namespace moe {

namespace {
DType params_dtype_of(const MoEConfig& c) { return dtype_from_name(c.params_dtype); }

constexpr const char* kInputSlot = "moe.input";

bool selective(const MoEConfig& c, const char* module) {
  return c.recompute_granularity == "selective" &&
         std::find(c.recompute_modules.begin(), c.recompute_modules.end(), module) != c.recompute_modules.end();
}

// recompute_modules / offload_modules (Megatron names) → slot policies (docs/memory.md). `moe` is
// not a slot rule: the layer keeps only its input and re-runs the whole forward in the backward.
void apply_memory_policies(const MoEConfig& c, ActivationStore& store) {
  if (selective(c, "moe_act")) store.set_policy("experts.act_output", SavePolicy::recompute);
  if (selective(c, "shared_experts")) store.set_policy("shared_experts.", SavePolicy::recompute);
  store.set_min_offload_numel(c.min_offloaded_tensor_size);
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
  // The host-sync-free mode (docs/gpu.md): counts stay on the device; rows per token bound the
  // dispatchers' row buffers (capacity padding may route a token to more).
  dispatcher_->use_device_counts(config_.moe_pad_expert_input_to_capacity ? 0 : config_.moe_router_topk);
  router_dtype_ = router_->router_dtype();
  recompute_moe_ = selective(config_, "moe");
}

MoELayer::~MoELayer() = default;

ActivationStore& MoELayer::store(int64_t microbatch) {
  auto it = stores_.find(microbatch);
  if (it != stores_.end()) return it->second;
  ActivationStore& st = stores_[microbatch];
  apply_memory_policies(config_, st);
  st.set_offload_manager(offload_);
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

  RouterOutput ro;
  Tensor out = run_forward(x, c, st, mb, /*replay=*/false, /*need_output=*/true, &ro);  // (T, H)
  contexts_[mb] = c;
  if (recompute_moe_) {
    // `moe` recompute: keep only the input; the backward re-runs router, dispatch and experts.
    drop_saved(st, mb);
    st.save(kInputSlot, x);
  }

  summary_.counts = ro.counts;  // read on the host only by last_routing()
  summary_.losses = ro.losses;
  summary_read_ = false;
  summary_.capacity = ro.capacity;
  summary_.probs = ro.probs;
  summary_.routing_map = ro.routing_map;
  pending_[mb] = hidden.shape();
  pending_order_.push_back(mb);
  return out.view(hidden.shape());
}

void MoELayer::drop_saved(ActivationStore& st, int64_t mb) {
  router_->keep_for_recompute(st);
  experts_->release(st);
  dispatcher_->release(mb);
  st.clear();
}

void MoELayer::discard_saved(int64_t mb) {
  MOE_CHECK(pending_.count(mb) != 0, "MoELayer::discard_saved: micro-batch ", mb, " has no pending forward");
  ActivationStore& st = store(mb);
  if (recompute_moe_) {
    st.clear();  // only the input was kept; the router's loss state stays
  } else {
    drop_saved(st, mb);
  }
}

Tensor MoELayer::recompute_forward(const Tensor& hidden, int64_t mb) {
  auto pit = pending_.find(mb);
  auto cit = contexts_.find(mb);
  MOE_CHECK(pit != pending_.end() && cit != contexts_.end(), "MoELayer::recompute_forward: micro-batch ", mb,
            " has no pending forward whose saved state was discarded");
  hidden.check_shape(pit->second, "MoELayer::recompute_forward: hidden");
  const int64_t H = config_.hidden_size;
  Tensor x = hidden.view({hidden.numel() / H, H});  // (T, H)
  ActivationStore& st = store(mb);
  Tensor out = run_forward(x, cit->second, st, mb, /*replay=*/true, /*need_output=*/true, nullptr);  // (T, H)
  if (recompute_moe_) {
    drop_saved(st, mb);
    st.save(kInputSlot, x);
  }
  return out.view(hidden.shape());
}

Tensor MoELayer::run_forward(const Tensor& x, const ForwardContext& c, ActivationStore& st, int64_t mb,
                             bool recompute, bool need_output, RouterOutput* routed) {
  sanitize::ModuleScope where_module("mlp.router");  // names the module in errors (docs/reliability.md)
  RouterOutput ro = router_->forward_on_device(x, c, st, recompute);
  DType pd = ops::prob_dtype_for(x.dtype());
  Tensor probs = ro.probs.dtype() == pd ? ro.probs : ops::cast(ro.probs, pd);  // (T, E) prob dtype

  sanitize::set_module("mlp.token_dispatcher");
  DispatchOutput d = dispatcher_->dispatch(x, probs, ro.routing_map, mb);
  sanitize::set_module("mlp.experts");
  // (N, H); (N_max, H) when the counts stayed on the device (local, allgather: no host sync)
  Tensor y = d.row_offsets.defined() ? experts_->forward(d.tokens, d.row_offsets, d.probs, st)
                                     : experts_->forward(d.tokens, d.rows_per_expert, d.probs, st);
  Tensor out;
  // A re-run for recompute needs what the forwards save, not the output: the combine (whose
  // backward reads only the dispatch's state) and the shared expert's output are not rebuilt.
  sanitize::set_module("mlp.token_dispatcher");
  if (need_output) out = dispatcher_->combine(y, mb);  // (T, H)
  sanitize::set_module("mlp.shared_experts");
  if (shared_) {
    Tensor s = shared_->forward(x, st);  // (T, H)
    if (need_output) ops::add_(out, s);
  }
  if (routed) *routed = std::move(ro);
  return out;
}

void MoELayer::release(int64_t mb) {
  auto it = stores_.find(mb);
  if (it != stores_.end()) {
    router_->release(it->second);
    experts_->release(it->second);
    it->second.clear();
  }
  dispatcher_->release(mb);
  contexts_.erase(mb);
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
  if (recompute_moe_) {  // re-run router, dispatch (with its communication) and experts
    Tensor x = st.get(kInputSlot);  // (T, H)
    st.drop(kInputSlot);
    auto cit = contexts_.find(mb);
    MOE_CHECK_CODE(cit != contexts_.end(), ErrorCode::internal, "MoELayer::backward: micro-batch ", mb,
                   " has no forward context kept for the moe recompute");
    run_forward(x, cit->second, st, mb, /*replay=*/true, /*need_output=*/false, nullptr);
  }
  contexts_.erase(mb);

  sanitize::ModuleScope where_module("mlp.token_dispatcher");
  Tensor dy = dispatcher_->combine_backward(dout, mb);  // (N, H), a fresh tensor
  sanitize::set_module("mlp.experts");
  Tensor drows = dy;  // the experts' dx overwrites dy: their backward reads dy before it writes dx
  Tensor drow_probs = Tensor::empty({dy.size(0)}, ops::prob_dtype_for(dy.dtype()), device_);
  experts_->backward(dy, drows, drow_probs, st);

  Tensor dx = Tensor::empty({T, H}, dout.dtype(), device_);                  // (T, H)
  Tensor dprobs = Tensor::empty({T, E}, drow_probs.dtype(), device_);        // (T, E)
  sanitize::set_module("mlp.token_dispatcher");
  dispatcher_->dispatch_backward(drows, drow_probs, dx, dprobs, mb);
  sanitize::set_module("mlp.shared_experts");
  if (shared_) shared_->backward(dout, dx, st);
  sanitize::set_module("mlp.router");
  Tensor dprobs_r = dprobs.dtype() == router_dtype_ ? dprobs : ops::cast(dprobs, router_dtype_);
  router_->backward(dprobs_r, dx, st);
  st.clear();
  pending_.erase(mb);
  pending_order_.erase(std::remove(pending_order_.begin(), pending_order_.end(), mb), pending_order_.end());
  return dx.view(grad_output.shape());
}

const RoutingSummary& MoELayer::last_routing() const {
  if (!summary_read_ && summary_.counts.defined()) {
    summary_.tokens_per_expert = summary_.counts.to_vector<int64_t>();
    const std::vector<double> l = summary_.losses.to_vector<double>();
    summary_.aux_loss = l[0];
    summary_.z_loss = l[1];
  }
  summary_read_ = true;
  return summary_;
}

void MoELayer::accumulate_routing(Tensor& counts, Tensor& losses, double loss_divisor) const {
  MOE_CHECK(summary_.counts.defined(), "MoELayer::accumulate_routing: no forward yet");
  if (!counts.defined()) counts = Tensor::zeros({config_.num_moe_experts}, DType::i64, device_);
  if (!losses.defined()) losses = Tensor::zeros({2}, DType::f64, device_);
  ops::accumulate(counts, summary_.counts);
  ops::accumulate(losses, summary_.losses, loss_divisor);
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
