// Causal self-attention with grouped query heads, tensor / sequence / context parallel (docs/model.md).
//
//   forward                                              backward
//   x (s_loc·b, H)                                       dx = reduce_scatter_TP(dqkv·W_qkv)
//   xg = all_gather_TP(x)          (S_cp·b, H)            dW_qkv += dqkvᵀ·xg
//   qkv = xg·W_qkvᵀ                (S_cp·b, ng·(r+2)·hd)  dqkv = merge(dq, dk, dv)
//   q, k, v = split per group      (S_cp·b, nh|ng, hd)    q/k-norm backward
//   q, k = qk-norm (optional)                             rope⁻¹(dq), rope⁻¹(dk)
//   q, k = rope(q), rope(k) at the CP positions           dk, dv = reduce_scatter_CP(dk_all, dv_all)
//   k_all, v_all = all_gather_CP(k, v)  (S, b, ng, hd)    dq, dk_all, dv_all = attention_bwd
//   o = attention(q, k_all, v_all)  (S_cp, b, nh, hd)     dctx = dyg·W_proj, dW_proj += dygᵀ·ctx
//   out = reduce_scatter_TP(o·W_projᵀ)  (s_loc·b, H)       dyg = all_gather_TP(dout)
// nh, ng: this rank's query heads and groups (nh/TP, ng/TP); r = nh/ng query heads per group.
//
// Saved slots (names prefixed "attention."): input x, q and k after rope, v (all this CP rank's
// rows), o and lse; the norms keep their own. Keys and values are re-gathered over CP and the
// input over TP in the backward instead of being kept gathered (Megatron does the same for the
// sequence-parallel input).
#include <cmath>

#include "device/ops.h"
#include "model/modules.h"
#include "moe/module_util.h"
#include "moecore/error.h"

namespace moe {

namespace {
// (S_cp, ...) this CP rank's rows → (S, ...) every CP rank's rows in CP rank order.
Tensor cp_all_gather(const std::shared_ptr<Communicator>& cp, const Tensor& x) { return sp_all_gather(cp, x); }
// (S, ...) partial sums → (S_cp, ...) this CP rank's rows of the sum over CP.
Tensor cp_reduce_scatter(const std::shared_ptr<Communicator>& cp, const Tensor& x) {
  return sp_reduce_scatter(cp, x);
}
}  // namespace

SelfAttention::SelfAttention(const MoEConfig& config, Device device, const std::string& prefix,
                             std::shared_ptr<Communicator> tp, std::shared_ptr<Communicator> cp)
    : config_(config), device_(device), tp_(std::move(tp)), cp_(std::move(cp)) {
  const int64_t H = config.hidden_size, nh = config.num_attention_heads, ng = config.query_groups();
  const int64_t tp_size = tp_ ? tp_->size() : 1, tp_rank = tp_ ? tp_->rank() : 0;
  MOE_CHECK(nh >= 1 && ng >= 1 && nh % ng == 0, "SelfAttention '", prefix, "': num_attention_heads = ", nh,
            " must be a positive multiple of num_query_groups = ", ng);
  MOE_CHECK(ng % tp_size == 0, "SelfAttention '", prefix, "': num_query_groups = ", ng,
            " is not divisible by the tensor parallel size ", tp_size);
  hd_ = config.head_dim();
  ng_ = ng / tp_size;
  q_per_group_ = nh / ng;
  nh_ = ng_ * q_per_group_;
  rd_ = config.position_embedding_type == "rope"
            ? static_cast<int64_t>(static_cast<double>(hd_) * config.rotary_percent)
            : 0;
  scale_ = 1.0 / std::sqrt(static_cast<double>(hd_));
  const DType dt = dtype_from_name(config.params_dtype);
  const int64_t rows_per_group = (q_per_group_ + 2) * hd_;
  // linear_qkv ((nh + 2·ng)·hd, H): rows grouped per query group; this rank holds its groups' rows.
  qkv_ = make_parameter(prefix + "linear_qkv.weight", {(nh + 2 * ng) * hd_, H},
                        {DimShard{0, tp_rank * ng_ * rows_per_group, ng_ * rows_per_group, false}}, dt, device,
                        config.seed, config.init_method_std, GradGroup::dense);
  // linear_proj (H, nh·hd): this rank's heads' columns. Megatron's output-layer init: std/sqrt(2·L).
  const double proj_std = config.init_method_std / std::sqrt(2.0 * static_cast<double>(std::max<int64_t>(1, config.num_layers)));
  proj_ = make_parameter(prefix + "linear_proj.weight", {H, nh * hd_}, {DimShard{1, tp_rank * nh_ * hd_, nh_ * hd_, false}},
                         dt, device, config.seed, proj_std, GradGroup::dense);
  if (config.qk_layernorm) {
    q_norm_ = std::make_unique<Norm>(config, device, prefix + "q_layernorm", hd_);
    k_norm_ = std::make_unique<Norm>(config, device, prefix + "k_layernorm", hd_);
  }
}

Tensor SelfAttention::forward(const Tensor& x, const SeqBatch& seq, ActivationStore& store) {
  const int64_t H = config_.hidden_size, b = seq.b, S_cp = seq.s_cp, n = S_cp * b;
  x.check_shape({seq.s_loc * b, H}, "SelfAttention::forward: x");
  const DType dt = x.dtype();
  Tensor xg = sp_all_gather(tp_, x);                                 // (S_cp·b, H)
  Tensor qkv = ops::matmul(xg, false, qkv_.value, true);             // (S_cp·b, ng·(r+2)·hd)
  Tensor q = Tensor::empty({n, nh_, hd_}, dt, device_);              // (S_cp·b, nh, hd)
  Tensor k = Tensor::empty({n, ng_, hd_}, dt, device_);              // (S_cp·b, ng, hd)
  Tensor v = Tensor::empty({n, ng_, hd_}, dt, device_);              // (S_cp·b, ng, hd)
  ops::qkv_split(qkv, ng_, q_per_group_, q, k, v);
  qkv = Tensor();
  if (q_norm_) {
    q = q_norm_->forward(q.view({n * nh_, hd_}), store, "attention.q_layernorm").view({n, nh_, hd_});
    k = k_norm_->forward(k.view({n * ng_, hd_}), store, "attention.k_layernorm").view({n, ng_, hd_});
  }
  Tensor q4 = q.view({S_cp, b, nh_, hd_});  // (S_cp, b, nh, hd)
  Tensor k4 = k.view({S_cp, b, ng_, hd_});  // (S_cp, b, ng, hd)
  Tensor v4 = v.view({S_cp, b, ng_, hd_});  // (S_cp, b, ng, hd)
  if (rd_ > 0) {
    ops::rope(seq.q_pos, rd_, config_.rotary_base, false, q4, q4);
    ops::rope(seq.q_pos, rd_, config_.rotary_base, false, k4, k4);
  }
  Tensor k_all = cp_all_gather(cp_, k4);  // (S, b, ng, hd)
  Tensor v_all = cp_all_gather(cp_, v4);  // (S, b, ng, hd)
  Tensor o = Tensor::empty({S_cp, b, nh_, hd_}, dt, device_);                  // (S_cp, b, nh, hd)
  Tensor lse = Tensor::empty({b, nh_, S_cp}, ops::stat_dtype_for(dt), device_);  // (b, nh, S_cp)
  ops::attention_fwd(scale_, seq.q_pos, seq.k_pos, q4, k_all, v_all, o, lse);
  Tensor y = ops::matmul(o.view({n, nh_ * hd_}), false, proj_.value, true);  // (S_cp·b, H) partial over TP
  store.save("attention.input", x);
  store.save("attention.q", q4);
  store.save("attention.k", k4);
  store.save("attention.v", v4);
  store.save("attention.o", o);
  // core_attn recompute: the attention's own saved state (lse) is rebuilt from q, k, v (keys and
  // values re-gathered over CP), as Megatron's checkpoint of core attention keeps only its inputs.
  store.save("attention.lse", lse, [this, seq, &store, dt] {
    Tensor q = store.get("attention.q"), k_all = cp_all_gather(cp_, store.get("attention.k")),
           v_all = cp_all_gather(cp_, store.get("attention.v"));  // (S_cp, b, nh, hd), (S, b, ng, hd) ×2
    Tensor o2 = Tensor::empty(q.shape(), dt, device_);                                             // (S_cp, b, nh, hd)
    Tensor lse2 = Tensor::empty({seq.b, nh_, seq.s_cp}, ops::stat_dtype_for(dt), device_);        // (b, nh, S_cp)
    ops::attention_fwd(scale_, seq.q_pos, seq.k_pos, q, k_all, v_all, o2, lse2);
    return lse2;
  });
  return sp_reduce_scatter(tp_, y);  // (s_loc·b, H)
}

Tensor SelfAttention::backward(const Tensor& dout, const SeqBatch& seq, ActivationStore& store) {
  MOE_CHECK(store.has("attention.o"), "SelfAttention::backward: no saved forward (call forward first)");
  const int64_t H = config_.hidden_size, b = seq.b, S_cp = seq.s_cp, n = S_cp * b;
  dout.check_shape({seq.s_loc * b, H}, "SelfAttention::backward: dout");
  const DType dt = dout.dtype();

  // linear_proj: dW_proj += dygᵀ·ctx, dctx = dyg·W_proj
  Tensor dyg = sp_all_gather(tp_, dout);                   // (S_cp·b, H)
  Tensor o = store.get("attention.o");                     // (S_cp, b, nh, hd)
  ops::gemm(dyg, true, o.view({n, nh_ * hd_}), false, proj_.grad, 1.0, 1.0);
  Tensor dctx = ops::matmul(dyg, false, proj_.value, false);  // (S_cp·b, nh·hd)
  dyg = Tensor();

  // core attention
  Tensor q4 = store.get("attention.q"), k4 = store.get("attention.k"), v4 = store.get("attention.v");
  Tensor k_all = cp_all_gather(cp_, k4);  // (S, b, ng, hd)
  Tensor v_all = cp_all_gather(cp_, v4);  // (S, b, ng, hd)
  const int64_t S = k_all.size(0);
  Tensor dq = Tensor::empty({S_cp, b, nh_, hd_}, dt, device_);  // (S_cp, b, nh, hd)
  Tensor dk_all = Tensor::empty({S, b, ng_, hd_}, dt, device_);  // (S, b, ng, hd)
  Tensor dv_all = Tensor::empty({S, b, ng_, hd_}, dt, device_);  // (S, b, ng, hd)
  ops::attention_bwd(scale_, seq.q_pos, seq.k_pos, q4, k_all, v_all, o, store.get("attention.lse"),
                     dctx.view({S_cp, b, nh_, hd_}), dq, dk_all, dv_all);
  for (const char* s : {"attention.q", "attention.k", "attention.v", "attention.o", "attention.lse"}) store.drop(s);
  o = q4 = k4 = v4 = k_all = v_all = dctx = Tensor();
  Tensor dk = cp_reduce_scatter(cp_, dk_all);  // (S_cp, b, ng, hd)
  Tensor dv = cp_reduce_scatter(cp_, dv_all);  // (S_cp, b, ng, hd)
  dk_all = dv_all = Tensor();

  // rope and the q/k norms, backwards
  if (rd_ > 0) {
    ops::rope(seq.q_pos, rd_, config_.rotary_base, true, dq, dq);
    ops::rope(seq.q_pos, rd_, config_.rotary_base, true, dk, dk);
  }
  if (q_norm_) {
    dq = q_norm_->backward(dq.view({n * nh_, hd_}), store, "attention.q_layernorm");
    dk = k_norm_->backward(dk.view({n * ng_, hd_}), store, "attention.k_layernorm");
  }

  // linear_qkv: dW_qkv += dqkvᵀ·xg, dx = reduce_scatter(dqkv·W_qkv)
  Tensor dqkv = Tensor::empty({n, ng_ * (q_per_group_ + 2) * hd_}, dt, device_);  // (S_cp·b, ng·(r+2)·hd)
  ops::qkv_merge(dq.view({n, nh_, hd_}), dk.view({n, ng_, hd_}), dv.view({n, ng_, hd_}), ng_, q_per_group_, dqkv);
  dq = dk = dv = Tensor();
  Tensor xg = sp_all_gather(tp_, store.get("attention.input"));  // (S_cp·b, H)
  store.drop("attention.input");
  ops::gemm(dqkv, true, xg, false, qkv_.grad, 1.0, 1.0);
  Tensor dxg = ops::matmul(dqkv, false, qkv_.value, false);  // (S_cp·b, H) partial over TP
  return sp_reduce_scatter(tp_, dxg);                        // (s_loc·b, H)
}

void SelfAttention::parameters(std::vector<Parameter*>& out) {
  out.push_back(&qkv_);
  if (q_norm_) {
    q_norm_->parameters(out);
    k_norm_->parameters(out);
  }
  out.push_back(&proj_);
}

}  // namespace moe
