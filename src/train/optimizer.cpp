#include "device/ops.h"
#include "moecore/optim.h"

namespace moe {

Adam::Adam(std::vector<Parameter*> params, AdamConfig config) : config_(config) {
  for (Parameter* p : params) {
    MOE_CHECK(p != nullptr, "Adam: null parameter");
    if (!p->trainable) continue;
    MOE_CHECK(p->value.dtype() == DType::f32, "Adam: parameter '", p->name, "' must be f32 (fp32 params_dtype), got ",
              p->value.desc());
    MOE_CHECK(p->grad.defined(), "Adam: parameter '", p->name, "' has no gradient tensor");
    state_.push_back({p, Tensor::zeros(p->value.shape(), DType::f32, p->value.device()),
                      Tensor::zeros(p->value.shape(), DType::f32, p->value.device())});
  }
}

void Adam::step() {
  ++step_;
  for (State& s : state_)
    ops::adam(s.p->value, s.p->grad, s.m, s.v, config_.lr, config_.beta1, config_.beta2, config_.eps,
              config_.weight_decay, step_);
}

double mse_loss(const Tensor& y, const Tensor& target, Tensor* dy, double scale) {
  return ops::mse(y, target, dy, scale);
}

double grad_sq_norm(const std::vector<Parameter*>& params) {
  double total = 0;
  for (const Parameter* p : params) {
    if (!p->trainable || !p->grad.defined() || p->grad.numel() == 0) continue;
    Tensor g = p->grad.view({1, p->grad.numel()});
    Tensor out = Tensor::empty({1}, DType::f64, g.device());
    ops::row_dot(g, g, out);
    total += out.to_vector<double>()[0];
  }
  return total;
}

void scale_grads(const std::vector<Parameter*>& params, double s) {
  for (Parameter* p : params)
    if (p->trainable && p->grad.defined() && p->grad.numel() > 0) ops::axpby(0.0, p->grad, s, p->grad);
}

}  // namespace moe
