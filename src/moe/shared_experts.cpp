// The shared expert (docs/moe.md): a dense MLP over every token, optionally gated per token.
//   forward:  xg = all_gather_TP(x)          (T·tp, H)      (xg = x without TP)
//             h  = xg · W1ᵀ                  (T·tp, F1)     W1 local rows (each GLU half split alike)
//             a  = act(h)                    (T·tp, F)
//             yp = a · W2ᵀ                   (T·tp, H)      W2 local columns: a partial sum over TP
//             y  = reduce_scatter_TP(yp)     (T, H)         this rank's tokens
//             out = y · σ(x·w_gᵀ)            (T, H)         with the gate, on the local tokens
//   backward: the same read backwards; all-gather of the output gradient, reduce-scatter of dx.
// The gate weight is replicated over TP while each rank sees its own tokens, so its per-call
// gradient is summed over TP here before it is accumulated: every TP rank then holds the full
// gradient and the dense (DP×CP) reduction is all it needs afterwards.
//
// Saved slots (names = slot prefix + ...):
//   fc1_input   x (T, H)       keep or offload (a recompute rule becomes keep: nothing rebuilds x)
//   fc1_output  h              fc1 of the (gathered) fc1_input
//   act_output  a              act(fc1_output)
//   gate        σ(x·w_gᵀ) (T)  prob dtype; from fc1_input           (gated only)
//   fc2_output  y (T, H)       fc2 of act_output, reduce-scattered  (gated only: the gate's backward)
#include "moecore/experts.h"

#include "device/ops.h"
#include "moe/module_util.h"
#include "moecore/error.h"

namespace moe {

SharedExperts::SharedExperts(const MoEConfig& config, Device device, std::shared_ptr<Communicator> tp,
                             const std::string& slot_prefix)
    : SharedExperts(config, device, std::move(tp), slot_prefix,
                    MlpSpec{"shared_experts.", config.moe_shared_expert_intermediate_size.value_or(0),
                            config.moe_shared_expert_gate}) {}

SharedExperts::SharedExperts(const MoEConfig& config, Device device, std::shared_ptr<Communicator> tp,
                             const std::string& slot_prefix, const MlpSpec& spec)
    : config_(config), device_(device), tp_(std::move(tp)), prefix_(slot_prefix) {
  const std::string who = "MLP '" + spec.param_prefix + "'";
  const int64_t H = config.hidden_size, Fs = spec.width;
  MOE_CHECK(H > 0, who, ": hidden_size must be > 0, got ", H);
  MOE_CHECK(Fs > 0, who, ": the width (moe_shared_expert_intermediate_size or ffn_hidden_size) must be > 0, got ", Fs);
  activation_from_config(config, who.c_str());
  const int64_t tp_size = tp_ ? tp_->size() : 1, tp_rank = tp_ ? tp_->rank() : 0;
  MOE_CHECK(Fs % tp_size == 0, who, ": the width ", Fs, " is not divisible by the tensor parallel size ", tp_size);
  F_ = Fs / tp_size;
  has_gate_ = spec.gate;
  const bool glu = config.gated_linear_unit;
  const int64_t F1s = glu ? 2 * Fs : Fs, F1_local = glu ? 2 * F_ : F_;
  const DType dt = dtype_from_name(config.params_dtype);
  MOE_CHECK(dt == DType::f32 || dt == DType::f64 || dt == DType::bf16, who,
            ": params_dtype must be fp32, fp64 or bf16, got '", config.params_dtype, "'");
  const int64_t f_start = tp_rank * F_;
  const std::string& pre = spec.param_prefix;
  fc1_ = make_parameter(pre + "linear_fc1.weight", {F1s, H}, {DimShard{0, f_start, F1_local, glu}}, dt, device,
                        config.seed, config.init_method_std, GradGroup::dense);
  fc2_ = make_parameter(pre + "linear_fc2.weight", {H, Fs}, {DimShard{1, f_start, F_, false}}, dt, device,
                        config.seed, config.init_method_std, GradGroup::dense);
  if (has_gate_)
    gate_ = make_parameter(pre + "gate_weight", {1, H}, {}, dt, device, config.seed, config.init_method_std,
                           GradGroup::dense);
}


Tensor SharedExperts::forward(const Tensor& x, ActivationStore& store) {
  const char* who = "SharedExperts::forward";
  const int64_t H = config_.hidden_size;
  const DType dt = fc1_.value.dtype(), pdt = ops::prob_dtype_for(dt);
  const bool glu = config_.gated_linear_unit;
  const Activation act = activation_from_config(config_, who);
  MOE_CHECK(x.defined() && x.ndim() == 2 && x.size(1) == H, who, ": x must be (T, H=", H, "), got ", x.desc());
  x.check_dtype(dt, "SharedExperts::forward: x");
  MOE_CHECK(x.device() == device_, who, ": x must be on ", device_.str(), ", got ", x.desc());
  const int64_t T = x.size(0);
  const std::string s_x = prefix_ + "fc1_input", s_h = prefix_ + "fc1_output", s_a = prefix_ + "act_output",
                    s_g = prefix_ + "gate", s_y = prefix_ + "fc2_output";
  std::shared_ptr<Communicator> tp = tp_;

  auto fc1 = [this, tp](const Tensor& in) {  // (T, H) local tokens → (T·tp, F1)
    return ops::matmul(sp_all_gather(tp, in), false, fc1_.value, true);
  };
  auto act_fwd = [this, dt, glu, act](const Tensor& h) {
    Tensor a = Tensor::empty({h.size(0), F_}, dt, device_);  // (T·tp, F)
    ops::act_fwd(act, glu, h, nullptr, a);
    return a;
  };
  auto fc2 = [this, tp](const Tensor& a) {  // (T·tp, F) → (T, H) local tokens
    return sp_reduce_scatter(tp, ops::matmul(a, false, fc2_.value, true));
  };
  auto gate = [this, pdt](const Tensor& in) {  // (T, H) → σ(x·w_gᵀ) (T) in the prob dtype
    Tensor logits = ops::cast(ops::matmul(in, false, gate_.value, true), pdt).view({in.size(0)});  // (T)
    Tensor g = Tensor::empty({in.size(0)}, pdt, device_);                                        // (T)
    ops::sigmoid(logits, g);
    return g;
  };

  Tensor h = fc1(x);      // (T·tp, F1)
  Tensor a = act_fwd(h);  // (T·tp, F)
  Tensor y = fc2(a);      // (T, H)
  store.save(s_x, x, {}, SaveOwner::caller);  // the layer's input: offloading it would free nothing
  store.save(s_h, h, [fc1, &store, s_x] { return fc1(store.get(s_x)); });
  store.save(s_a, a, [act_fwd, &store, s_h] { return act_fwd(store.get(s_h)); });
  if (!has_gate_) return y;

  Tensor g = gate(x);  // (T)
  Tensor out = Tensor::empty({T, H}, dt, device_);  // (T, H)
  ops::scale_rows(y, g, out);
  store.save(s_g, g, [gate, &store, s_x] { return gate(store.get(s_x)); });
  store.save(s_y, y, [fc2, &store, s_a] { return fc2(store.get(s_a)); });
  return out;
}

void SharedExperts::backward(const Tensor& dout, Tensor& dx, ActivationStore& store) {
  const char* who = "SharedExperts::backward";
  const std::string s_x = prefix_ + "fc1_input", s_h = prefix_ + "fc1_output", s_a = prefix_ + "act_output",
                    s_g = prefix_ + "gate", s_y = prefix_ + "fc2_output";
  MOE_CHECK(store.has(s_a), who, ": no saved forward in the store (slot '", s_a, "' missing): call forward first");
  const int64_t H = config_.hidden_size;
  const DType dt = fc1_.value.dtype(), pdt = ops::prob_dtype_for(dt);
  const bool glu = config_.gated_linear_unit;
  const Activation act = activation_from_config(config_, who);
  Tensor x = store.get(s_x);  // (T, H)
  const int64_t T = x.size(0);
  dout.check_shape({T, H}, "SharedExperts::backward: dout");
  dout.check_dtype(dt, "SharedExperts::backward: dout");
  if (!dx.defined()) dx = Tensor::zeros({T, H}, dt, device_);
  dx.check_shape({T, H}, "SharedExperts::backward: dx");
  dx.check_dtype(dt, "SharedExperts::backward: dx");

  // gate: out = y · g  →  dy = dout · g,  dg = Σ_h dout·y,  dlogit = dg · g(1 − g)
  Tensor dy = dout;  // (T, H)
  if (has_gate_) {
    Tensor g = store.get(s_g);  // (T)
    Tensor y = store.get(s_y);  // (T, H)
    Tensor dg = Tensor::empty({T}, pdt, device_);
    ops::row_dot(dout, y, dg);
    Tensor dlogit_p = Tensor::empty({T}, pdt, device_);
    ops::sigmoid_bwd(dg, g, dlogit_p);
    Tensor dlogit = ops::cast(dlogit_p, dt).view({T, 1});  // (T, 1)
    if (sp_active(tp_)) {  // the replicated gate weight sums its gradient over the TP ranks' tokens
      Tensor dw = ops::matmul(dlogit, true, x, false);  // (1, H)
      tp_->all_reduce(dw);
      ops::add_(gate_.grad, dw);
    } else {
      ops::gemm(dlogit, true, x, false, gate_.grad, 1.0, 1.0);  // dw_g += dlogitᵀ x
    }
    ops::gemm(dlogit, false, gate_.value, false, dx, 1.0, 1.0);  // dx += dlogit · w_g
    dy = Tensor::empty({T, H}, dt, device_);
    ops::scale_rows(dout, g, dy);
    store.drop(s_g);
    store.drop(s_y);
  }

  // fc2: dW2 += dygᵀ a, da = dyg · W2. As in the routed experts, da takes a's buffer once dW2 has
  // read a, and dh takes h's (act_bwd allows din = in on every backend).
  Tensor dyg = sp_all_gather(tp_, dy);  // (T·tp, H)
  Tensor da = store.get(s_a);           // a (T·tp, F), then da
  ops::gemm(dyg, true, da, false, fc2_.grad, 1.0, 1.0);
  store.drop(s_a);
  ops::gemm(dyg, false, fc2_.value, false, da, 1.0, 0.0);

  // activation
  Tensor h = store.get(s_h);                                                  // (T·tp, F1)
  Tensor dh = h;  // (T·tp, F1), in place
  ops::act_bwd(act, glu, h, nullptr, da, dh, nullptr);
  store.drop(s_h);
  h = Tensor();
  da = Tensor();

  // fc1: dW1 += dhᵀ xg, dx += reduce_scatter(dh · W1)
  Tensor xg = sp_all_gather(tp_, x);  // (T·tp, H)
  ops::gemm(dh, true, xg, false, fc1_.grad, 1.0, 1.0);
  if (sp_active(tp_)) {
    Tensor dxg = ops::matmul(dh, false, fc1_.value, false);  // (T·tp, H) partial over TP
    ops::add_(dx, sp_reduce_scatter(tp_, dxg));
  } else {
    ops::gemm(dh, false, fc1_.value, false, dx, 1.0, 1.0);
  }
  store.drop(s_x);
}

}  // namespace moe
