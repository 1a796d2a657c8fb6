// The top-k router (docs/moe.md): logits → scores → (group-limited) top-k → probs → capacity,
// with the load-balancing and z losses computed in the forward and their gradients injected in the
// backward. Everything big goes through the Tensor-level ops (so it runs on any backend); only
// E-sized statistics are handled on the host.
#include "moecore/router.h"

#include <cmath>

#include "device/ops.h"
#include "kernels/common/rng.h"

namespace moe {

namespace {

constexpr const char* kInputSlot = "router.input";
constexpr const char* kLogitsSlot = "router.logits";

ScoreFunction parse_score(const std::string& s) {
  if (s == "softmax") return ScoreFunction::softmax;
  if (s == "sigmoid") return ScoreFunction::sigmoid;
  if (s == "sqrtsoftplus") return ScoreFunction::sqrtsoftplus;
  MOE_THROW(ErrorCode::invalid_argument, "Router: moe_router_score_function must be softmax, sigmoid or sqrtsoftplus, got '",
            s, "'");
}

enum class AuxType { aux, seq_aux, global_aux, none };
AuxType parse_aux_type(const std::string& s) {
  if (s == "aux_loss") return AuxType::aux;
  if (s == "seq_aux_loss") return AuxType::seq_aux;
  if (s == "global_aux_loss") return AuxType::global_aux;
  if (s == "none") return AuxType::none;
  MOE_THROW(ErrorCode::invalid_argument,
            "Router: moe_router_load_balancing_type entries must be aux_loss, seq_aux_loss, global_aux_loss or none, got '",
            s, "'");
}

DType params_dtype_of(const MoEConfig& c) {
  DType d = dtype_from_name(c.params_dtype);
  MOE_CHECK(d == DType::f32 || d == DType::f64 || d == DType::bf16, "Router: params_dtype must be fp32, fp64 or bf16, got '",
            c.params_dtype, "'");
  return d;
}

DType router_dtype_of(const MoEConfig& c, DType params) {
  if (!c.moe_router_dtype) return params == DType::f64 ? DType::f64 : DType::f32;
  DType d = dtype_from_name(*c.moe_router_dtype);
  MOE_CHECK(d == DType::f32 || d == DType::f64, "Router: moe_router_dtype must be fp32 or fp64, got '",
            *c.moe_router_dtype, "'");
  return d;
}

int group_size(const std::shared_ptr<Communicator>& g) { return g ? g->size() : 1; }

// In-place sum over a group of a device tensor (skipped for a group of one).
void all_reduce_device(const std::shared_ptr<Communicator>& g, Tensor& t) {
  if (g && g->size() > 1) g->all_reduce(t, ReduceOp::sum);
}

// In-place sum over a group of a small host vector (skipped for a group of one).
void all_reduce_host(const std::shared_ptr<Communicator>& g, std::vector<double>& v) {
  if (!g || g->size() == 1 || v.empty()) return;
  Tensor t = Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
  g->all_reduce(t, ReduceOp::sum);
  v = t.to_vector<double>();
}

// logits (T, E) router dtype = cast(x (T, H)) · cast(W (E, H))ᵀ.
Tensor compute_logits(const Tensor& x, const Tensor& w, DType rd) {
  Tensor xr = x.dtype() == rd ? x : ops::cast(x, rd);
  Tensor wr = w.dtype() == rd ? w : ops::cast(w, rd);
  return ops::matmul(xr, false, wr, true);
}

}  // namespace

// What the backward needs beside the store's slots.
struct Router::Pending {
  int64_t T = 0;
  ops::TopkSpec spec;
  Tensor topk_idx;     // (T, k) i32
  Tensor routing_map;  // (T, E) u8, final
  Tensor noise;        // (T, H) params dtype; undefined without jitter
  struct AuxGrad {
    int64_t num_seqs = 1;
    Tensor weight;  // (num_seqs, E) f64 on the router's device, loss scale and coefficient included
  };
  std::vector<AuxGrad> aux;
  bool z = false;
  double z_coef = 0.0;  // loss_scale · coeff / (n · T)
  Tensor losses;  // (2) f64 on the router's device: aux, z as reported (RouterOutput::losses)
};

// `moe` recompute: the first forward's gradient weights and loss values (E-sized device tensors).
struct Router::Replay {
  std::vector<Pending::AuxGrad> aux;
  bool z = false;
  double z_coef = 0.0;
  Tensor losses;  // (2) f64
};

Router::Router(const MoEConfig& config, Device device, RouterGroups groups, int64_t layer_number,
               const std::string& param_prefix)
    : config_(config), device_(device), groups_(std::move(groups)), layer_number_(layer_number) {
  const MoEConfig& c = config_;
  const int64_t E = c.num_moe_experts, H = c.hidden_size, k = c.moe_router_topk;
  MOE_CHECK(H > 0, "Router: hidden_size must be > 0, got ", H);
  MOE_CHECK(E > 0, "Router: num_moe_experts must be > 0, got ", E);
  MOE_CHECK(k >= 1 && k <= E, "Router: moe_router_topk must be in [1, ", E, "], got ", k);
  ScoreFunction score = parse_score(c.moe_router_score_function);
  MOE_CHECK(!(score == ScoreFunction::softmax && k == 1 && !c.moe_router_pre_softmax),
            "Router: moe_router_topk=1 with the softmax score function needs moe_router_pre_softmax (post-softmax over "
            "one expert is constantly 1)");
  MOE_CHECK(c.moe_router_num_groups.has_value() == c.moe_router_group_topk.has_value(),
            "Router: moe_router_num_groups and moe_router_group_topk must be set together");
  if (c.moe_router_num_groups) {
    int64_t G = *c.moe_router_num_groups, g = *c.moe_router_group_topk;
    MOE_CHECK(G >= 1 && E % G == 0, "Router: moe_router_num_groups must divide num_moe_experts ", E, ", got ", G);
    MOE_CHECK(g >= 1 && g <= G, "Router: moe_router_group_topk must be in [1, ", G, "], got ", g);
    MOE_CHECK(k % g == 0, "Router: moe_router_topk ", k, " must be divisible by moe_router_group_topk ", g);
    MOE_CHECK(k <= g * (E / G), "Router: moe_router_topk ", k, " exceeds the ", g * (E / G),
              " experts of the selected groups");
  }
  MOE_CHECK(!c.moe_router_enable_expert_bias || score != ScoreFunction::softmax,
            "Router: moe_router_enable_expert_bias needs score function sigmoid or sqrtsoftplus, got softmax");
  const auto& types = c.moe_router_load_balancing_type;
  const auto& coeffs = c.moe_aux_loss_coeff;
  for (const auto& t : types) parse_aux_type(t);
  MOE_CHECK(coeffs.size() == 1 || coeffs.size() == types.size(), "Router: moe_aux_loss_coeff needs 1 or ",
            types.size(), " entries (one per moe_router_load_balancing_type), got ", coeffs.size());
  MOE_CHECK(!c.moe_input_jitter_eps || (*c.moe_input_jitter_eps >= 0 && *c.moe_input_jitter_eps < 1),
            "Router: moe_input_jitter_eps must be in [0, 1), got ", c.moe_input_jitter_eps.value_or(0));
  MOE_CHECK(!c.moe_expert_capacity_factor || *c.moe_expert_capacity_factor > 0,
            "Router: moe_expert_capacity_factor must be > 0, got ", c.moe_expert_capacity_factor.value_or(0));
  MOE_CHECK(c.moe_token_drop_policy == "probs" || c.moe_token_drop_policy == "position",
            "Router: moe_token_drop_policy must be probs or position, got '", c.moe_token_drop_policy, "'");
  MOE_CHECK(!c.moe_pad_expert_input_to_capacity || c.moe_expert_capacity_factor.has_value(),
            "Router: moe_pad_expert_input_to_capacity needs moe_expert_capacity_factor");

  const DType pd = params_dtype_of(c);
  router_dtype_ = router_dtype_of(c, pd);
  weight_ = make_parameter(param_prefix + "router.weight", {E, H}, {}, pd, device_, c.seed, c.init_method_std, GradGroup::router);
  if (c.moe_router_enable_expert_bias) {
    expert_bias_ = make_parameter(param_prefix + "router.expert_bias", {E}, {}, DType::f32, device_, c.seed, 0.0, GradGroup::router,
                                  /*trainable=*/false);
    local_tokens_per_expert_ = Tensor::zeros({E}, DType::f64, device_);
  } else {
    expert_bias_.name = param_prefix + "router.expert_bias";
    expert_bias_.canonical_shape = {E};
    expert_bias_.grad_group = GradGroup::router;
    expert_bias_.trainable = false;
  }
  global_tokens_per_expert_ = Tensor::zeros({E}, DType::f64, device_);
}

RouterOutput Router::forward(const Tensor& x, const ForwardContext& ctx, ActivationStore& store, bool recompute) {
  RouterOutput out = forward_on_device(x, ctx, store, recompute);
  out.tokens_per_expert = out.counts.to_vector<int64_t>();
  const std::vector<double> losses = out.losses.to_vector<double>();
  out.aux_loss = losses[0];
  out.z_loss = losses[1];
  return out;
}

RouterOutput Router::forward_on_device(const Tensor& x, const ForwardContext& ctx, ActivationStore& store,
                                       bool recompute) {
  const MoEConfig& c = config_;
  const int64_t E = c.num_moe_experts, H = c.hidden_size, k = c.moe_router_topk;
  const DType pd = weight_.value.dtype(), rd = router_dtype_;
  MOE_CHECK(x.defined() && x.ndim() == 2 && x.size(1) == H, "Router::forward: x must be (T, H=", H, "), got ",
            x.defined() ? x.desc() : std::string("an undefined tensor"));
  MOE_CHECK(x.dtype() == pd, "Router::forward: x must have the params dtype ", dtype_name(pd), ", got ", x.desc());
  MOE_CHECK(x.device() == device_, "Router::forward: x must be on ", device_.str(), ", got ", x.desc());
  const int64_t T = x.size(0);
  std::shared_ptr<Replay> replay;
  if (recompute) {
    auto rit = replay_.find(&store);
    MOE_CHECK(rit != replay_.end(), "Router::forward(recompute): no first forward kept for recompute with this store ",
              "(call keep_for_recompute after the first forward)");
    replay = rit->second;
  }
  auto p = std::make_shared<Pending>();
  p->T = T;

  // 1. Input jitter: x_j = x ⊙ U(1 − eps, 1 + eps), a pure function of (seed, step, layer, micro-batch).
  Tensor xj = x;
  if (ctx.training && c.moe_input_jitter_eps && *c.moe_input_jitter_eps > 0) {
    uint64_t key = rng::make_key(c.seed, static_cast<uint64_t>(ctx.step), static_cast<uint64_t>(layer_number_),
                                 static_cast<uint64_t>(ctx.microbatch), /*stream=*/1);
    p->noise = Tensor::empty({T, H}, pd, device_);
    ops::jitter(key, *c.moe_input_jitter_eps, p->noise);
    xj = Tensor::empty({T, H}, pd, device_);
    ops::mul(x, p->noise, xj);
  }

  // 2. logits (T, E) in the router dtype.
  Tensor logits = compute_logits(xj, weight_.value, rd);
  store.save(kInputSlot, xj, {}, xj.shares_storage_with(x) ? SaveOwner::caller : SaveOwner::store);
  store.save(kLogitsSlot, logits, [st = &store, w = weight_.value, rd] { return compute_logits(st->get(kInputSlot), w, rd); });

  // 3. Scores and top-k.
  ops::TopkSpec& spec = p->spec;
  spec.k = k;
  spec.score = parse_score(c.moe_router_score_function);
  spec.pre_softmax = c.moe_router_pre_softmax;
  spec.num_groups = c.moe_router_num_groups.value_or(0);
  spec.group_topk = c.moe_router_group_topk.value_or(0);
  spec.scaling_factor = c.moe_router_topk_scaling_factor.value_or(1.0);
  RouterOutput out;
  out.probs = Tensor::empty({T, E}, rd, device_);
  out.routing_map = Tensor::empty({T, E}, DType::u8, device_);
  out.topk_idx = Tensor::empty({T, k}, DType::i32, device_);
  ops::router_topk(spec, logits, c.moe_router_enable_expert_bias ? &expert_bias_.value : nullptr, out.probs,
                   out.routing_map, out.topk_idx);

  // 4. Capacity: cap = ceil(T·k/E · cf), at most T.
  if (c.moe_expert_capacity_factor) {
    double cap = std::ceil(static_cast<double>(T * k) / static_cast<double>(E) * *c.moe_expert_capacity_factor);
    out.capacity = std::min<int64_t>(static_cast<int64_t>(cap), T);
    ops::capacity(out.capacity, c.moe_token_drop_policy == "position" ? DropPolicy::position : DropPolicy::probs,
                  c.moe_pad_expert_input_to_capacity, out.probs, out.routing_map);
  }

  // 5. Load-balancing and z losses (training only): values into out.losses (2) f64 (aux, z) on the
  // device, gradient weights for the backward; nothing is read on the host. A rank with no tokens
  // still joins every collective (its terms are zero).
  if (replay) {  // re-run for recompute: the first forward's weights and values, nothing counted again
    p->aux = replay->aux;
    p->z = replay->z;
    p->z_coef = replay->z_coef;
    out.losses = replay->losses;
  } else {
    out.losses = Tensor::zeros({2}, DType::f64, device_);  // (2) f64 aux, z
  }
  if (!replay && ctx.training) {
    const int n = group_size(groups_.tp_cp);
    Tensor aux_value = out.losses.narrow(0, 1), z_value = out.losses.narrow(1, 1);  // (1) f64 views
    const auto& types = c.moe_router_load_balancing_type;
    for (size_t i = 0; i < types.size(); ++i) {
      const AuxType type = parse_aux_type(types[i]);
      const double coeff = c.moe_aux_loss_coeff.size() == 1 ? c.moe_aux_loss_coeff[0] : c.moe_aux_loss_coeff[i];
      if (type == AuxType::none || coeff == 0.0) continue;
      int64_t num_seqs = 1;
      if (type == AuxType::seq_aux && ctx.seq_length > 0) {
        MOE_CHECK(ctx.batch_size >= 1 && T == ctx.seq_length * ctx.batch_size, "Router::forward: seq_aux_loss needs T = ",
                  "seq_length·batch_size, got T=", T, ", seq_length=", ctx.seq_length, ", batch_size=", ctx.batch_size);
        num_seqs = ctx.batch_size;
      }
      Tensor prob_sum = Tensor::empty({num_seqs, E}, DType::f64, device_);  // (B, E) f64
      Tensor counts_i = Tensor::empty({num_seqs, E}, DType::i64, device_);  // (B, E) i64
      ops::aux_stats(spec.score, k, num_seqs, logits, prob_sum, counts_i);
      Tensor counts = Tensor::zeros({num_seqs, E}, DType::f64, device_);  // (B, E) f64, reduced below
      ops::accumulate(counts, counts_i);
      // Per sequence r_b = E·Σ_i P_bi c_bi / (k·T_tot²) (exactly 1 for uniform logits); the value is
      // coeff · mean_b r_b, its gradient weight w_bi = scale · coeff · E/(k·T_tot²) · c_bi / B
      // (ops::aux_loss_value). global_aux: c is the running mean of the step's micro-batches.
      AuxLossValueArgs term;
      term.B = num_seqs;
      term.E = E;
      term.k = k;
      term.coeff = coeff;
      term.loss_scale = ctx.loss_scale;
      Tensor* global = nullptr;
      if (type == AuxType::aux) {
        all_reduce_device(groups_.tp_cp, counts);
        term.T_tot = static_cast<double>(T) * n;
      } else if (type == AuxType::seq_aux) {
        all_reduce_device(groups_.tp_cp, counts);
        term.T_tot = static_cast<double>(T / num_seqs) * n;
      } else {  // global_aux: counts over TP×DP×CP, averaged over the step's micro-batches
        all_reduce_device(groups_.tp_dp_cp, counts);
        global_aux_steps_ += 1;
        term.global_steps = static_cast<double>(global_aux_steps_);
        global = &global_tokens_per_expert_;
        term.T_tot = static_cast<double>(T) * group_size(groups_.tp_dp_cp);
      }
      Pending::AuxGrad g;
      g.num_seqs = num_seqs;
      g.weight = Tensor::empty({num_seqs, E}, DType::f64, device_);  // (B, E) f64
      ops::aux_loss_value(term, prob_sum, counts, global, g.weight, aux_value);
      p->aux.push_back(std::move(g));
    }
    if (c.moe_z_loss_coeff && *c.moe_z_loss_coeff != 0.0) {
      const double coeff = *c.moe_z_loss_coeff;
      if (T > 0) {
        ops::z_loss_sum(logits, z_value);                                // Σ_t lse²
        ops::scale_at(out.losses, 1, coeff / n, static_cast<double>(T));  // · coeff / n / T
        p->z = true;
        p->z_coef = ctx.loss_scale * coeff / (static_cast<double>(n) * static_cast<double>(T));
      }
    }
    all_reduce_device(groups_.tp_cp, out.losses);
  }
  p->losses = out.losses;

  // 6–7. Tokens per expert of the final map (on the device); counted for the expert bias in
  // training (once: not when re-run for recompute).
  out.counts = ops::routing_counts(out.routing_map);  // (E) i64
  if (!replay && ctx.training && c.moe_router_enable_expert_bias) ops::accumulate(local_tokens_per_expert_, out.counts);

  p->topk_idx = out.topk_idx;
  p->routing_map = out.routing_map;
  pending_[&store] = std::move(p);
  replay_.erase(&store);
  return out;
}

void Router::keep_for_recompute(ActivationStore& store) {
  auto pit = pending_.find(&store);
  MOE_CHECK(pit != pending_.end(), "Router::keep_for_recompute: no pending forward with this store");
  const Pending& p = *pit->second;
  auto r = std::make_shared<Replay>();
  r->aux = p.aux;
  r->z = p.z;
  r->z_coef = p.z_coef;
  r->losses = p.losses;
  pending_.erase(pit);
  store.drop(kInputSlot);
  store.drop(kLogitsSlot);
  replay_[&store] = std::move(r);
}

void Router::backward(const Tensor& dprobs, Tensor& dx, ActivationStore& store) {
  auto pit = pending_.find(&store);
  MOE_CHECK(pit != pending_.end(),
            "Router::backward: no pending forward with this store (backward called twice, or before forward?)");
  const std::shared_ptr<Pending> keep = pit->second;
  const Pending& p = *keep;
  const int64_t E = config_.num_moe_experts, H = config_.hidden_size, T = p.T;
  const DType pd = weight_.value.dtype(), rd = router_dtype_;
  MOE_CHECK(dprobs.defined(), "Router::backward: dprobs is undefined");
  dprobs.check_shape({T, E}, "Router::backward: dprobs");
  dprobs.check_dtype(rd, "Router::backward: dprobs (the router dtype)");
  MOE_CHECK(dx.defined(), "Router::backward: dx is undefined");
  dx.check_shape({T, H}, "Router::backward: dx");
  dx.check_dtype(pd, "Router::backward: dx (the params dtype)");

  Tensor logits = store.get(kLogitsSlot);
  // dlogits (T, E): the top-k probs' gradient, then the injected aux and z gradients.
  Tensor dlogits = Tensor::empty({T, E}, rd, device_);
  ops::router_topk_bwd(p.spec, logits, p.topk_idx, p.routing_map, dprobs, dlogits, /*accumulate=*/false);
  for (const auto& g : p.aux) ops::aux_loss_bwd(p.spec.score, g.num_seqs, logits, g.weight, dlogits);
  if (p.z) ops::z_loss_bwd(logits, p.z_coef, dlogits);
  store.drop(kLogitsSlot);

  Tensor xj = store.get(kInputSlot);
  // weight.grad (E, H) += dlogitsᵀ · x_j, computed in the router dtype.
  Tensor xr = xj.dtype() == rd ? xj : ops::cast(xj, rd);
  if (pd == rd) {
    ops::gemm(dlogits, true, xr, false, weight_.grad, 1.0, 1.0);
  } else {
    Tensor dw = ops::matmul(dlogits, true, xr, false);
    ops::add_(weight_.grad, ops::cast(dw, pd));
  }
  store.drop(kInputSlot);

  // dx (T, H) += (dlogits · W) ⊙ noise.
  Tensor wr = pd == rd ? weight_.value : ops::cast(weight_.value, rd);
  Tensor dxr = ops::matmul(dlogits, false, wr, false);
  Tensor dxp = pd == rd ? dxr : ops::cast(dxr, pd);
  if (p.noise.defined()) ops::mul(dxp, p.noise, dxp);
  ops::add_(dx, dxp);
  pending_.erase(&store);
}

void Router::finish_step() {
  const MoEConfig& c = config_;
  const int64_t E = c.num_moe_experts;
  if (c.moe_router_enable_expert_bias) {
    std::vector<double> counts = local_tokens_per_expert_.to_vector<double>();  // once per step
    all_reduce_host(groups_.tp_dp_cp, counts);
    double total = 0.0;
    for (double v : counts) total += v;
    const double mean = total / static_cast<double>(E);
    Tensor host = expert_bias_.value.device().is_cpu() ? expert_bias_.value : expert_bias_.value.to(Device::cpu());
    std::vector<float> b = host.to_vector<float>();
    const float rate = static_cast<float>(c.moe_router_bias_update_rate);
    for (int64_t e = 0; e < E; ++e) {
      double d = mean - counts[e];
      float sign = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
      b[e] += rate * sign;
    }
    expert_bias_.value.copy_from_host(b.data(), b.size() * sizeof(float));
    local_tokens_per_expert_.zero_();
  }
  global_tokens_per_expert_.zero_();
  global_aux_steps_ = 0;
}

}  // namespace moe
