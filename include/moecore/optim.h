// libmoecore — Adam(W) over f32 parameters (the trainers' optimizer).
#pragma once
#include <cstdint>
#include <vector>

#include "moecore/param.h"

namespace moe {

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class Adam {
 public:
  // Only trainable parameters take part; each must be f32 (mixed precision is not implemented).
  Adam(std::vector<Parameter*> params, AdamConfig config);
  void step();  // one update from the current .grad values (grads are not zeroed)
  int64_t steps() const { return step_; }
  AdamConfig& config() { return config_; }

 private:
  struct State {
    Parameter* p;
    Tensor m, v;  // like p->value
  };
  std::vector<State> state_;
  AdamConfig config_;
  int64_t step_ = 0;
};

// Σ (y − target)² over all elements (f64); when dy is given it receives scale · 2 (y − target).
double mse_loss(const Tensor& y, const Tensor& target, Tensor* dy, double scale);

// Σ g² over the given parameters' gradients (this rank's shards), in f64.
double grad_sq_norm(const std::vector<Parameter*>& params);
// Multiplies every gradient by s.
void scale_grads(const std::vector<Parameter*>& params, double s);

}  // namespace moe
