// Optimizer kernels on the CPU (Adam lives in elementwise.cpp): SGD with momentum.
#include "kernels/cpu/cpu_kernels.h"

namespace moe {

void cpu_sgd(const SgdArgs& a, const ExecCtx&) {
  const float wd = static_cast<float>(a.weight_decay), mom = static_cast<float>(a.momentum);
  for (int64_t i = 0; i < a.n; ++i) {
    float d = a.grad[i];
    if (a.weight_decay != 0.0) d = d + wd * a.param[i];
    if (a.momentum_buf) {
      a.momentum_buf[i] = mom * a.momentum_buf[i] + d;
      d = a.momentum_buf[i];
    }
    a.param[i] = static_cast<float>(static_cast<double>(a.param[i]) - a.lr * static_cast<double>(d));
  }
}

}  // namespace moe
