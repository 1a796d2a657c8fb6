// RMSNorm / LayerNorm (docs/model.md): a forward and a backward that mirror each other.
//   forward:  y = (x − mean)·rstd·w + b   (LayerNorm)      y = x·rstd·w   (RMSNorm)
//   backward: dx from (x, mean, rstd, w, dy); dw += Σ_rows dy·x̂; db += Σ_rows dy
#include "device/ops.h"
#include "model/modules.h"
#include "moecore/error.h"

namespace moe {

namespace {
Tensor filled(int64_t n, float value, DType dt, Device device) {
  return Tensor::from_vector(std::vector<float>(static_cast<size_t>(n), value), {n}).to_dtype(dt).to(device);
}
}  // namespace

Norm::Norm(const MoEConfig& config, Device device, const std::string& name, int64_t D)
    : kind_(config.normalization == "RMSNorm" ? NormKind::rms : NormKind::layer),
      eps_(config.layernorm_epsilon),
      D_(D) {
  MOE_CHECK(config.normalization == "RMSNorm" || config.normalization == "LayerNorm", "Norm '", name,
            "': normalization must be RMSNorm or LayerNorm, got '", config.normalization, "'");
  MOE_CHECK(D >= 1, "Norm '", name, "': the normalised size must be >= 1, got ", D);
  const DType dt = dtype_from_name(config.params_dtype);
  weight_ = make_parameter(name + ".weight", {D}, {}, dt, device, config.seed, 0.0, GradGroup::sequence_parallel);
  weight_.value.copy_from(filled(D, 1.0f, dt, device));
  if (kind_ == NormKind::layer)
    bias_ = make_parameter(name + ".bias", {D}, {}, dt, device, config.seed, 0.0, GradGroup::sequence_parallel);
}

Tensor Norm::apply(const Tensor& x) {
  ActivationStore scratch;  // the statistics are recomputed bit for bit and dropped
  return forward(x, scratch, "norm");
}

Tensor Norm::forward(const Tensor& x, ActivationStore& store, const std::string& slot) {
  MOE_CHECK(x.defined() && x.ndim() == 2 && x.size(1) == D_, "Norm '", weight_.name, "': expected x (rows, ", D_,
            "), got ", x.desc());
  const int64_t rows = x.size(0);
  const DType st = ops::stat_dtype_for(x.dtype());
  Tensor y = Tensor::empty({rows, D_}, x.dtype(), x.device());  // (rows, D)
  Tensor rstd = Tensor::empty({rows}, st, x.device());           // (rows) stat
  Tensor mean;                                                   // (rows) stat, LayerNorm only
  if (kind_ == NormKind::layer) mean = Tensor::empty({rows}, st, x.device());
  ops::norm_fwd(kind_, eps_, x, weight_.value, bias_.value.defined() ? &bias_.value : nullptr, y,
                mean.defined() ? &mean : nullptr, rstd);
  store.save(slot + ".input", x);
  store.save(slot + ".rstd", rstd);
  if (mean.defined()) store.save(slot + ".mean", mean);
  return y;
}

Tensor Norm::backward(const Tensor& dy, ActivationStore& store, const std::string& slot) {
  MOE_CHECK(store.has(slot + ".input"), "Norm '", weight_.name, "': backward without a forward (slot '", slot,
            ".input' missing)");
  Tensor x = store.get(slot + ".input");  // (rows, D)
  Tensor rstd = store.get(slot + ".rstd");
  Tensor mean = kind_ == NormKind::layer ? store.get(slot + ".mean") : Tensor();
  dy.check_shape(x.shape(), "Norm::backward: dy");
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());  // (rows, D)
  ops::norm_bwd(kind_, x, weight_.value, mean.defined() ? &mean : nullptr, rstd, dy, dx, weight_.grad,
                bias_.grad.defined() ? &bias_.grad : nullptr);
  store.drop(slot + ".input");
  store.drop(slot + ".rstd");
  if (mean.defined()) store.drop(slot + ".mean");
  return dx;
}

void Norm::parameters(std::vector<Parameter*>& out) {
  out.push_back(&weight_);
  if (bias_.value.defined()) out.push_back(&bias_);
}

}  // namespace moe
