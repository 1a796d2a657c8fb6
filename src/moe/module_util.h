// Small pieces the expert modules share.
#pragma once
#include <string>

#include "kernels/ops.h"
#include "moecore/config.h"
#include "moecore/error.h"

namespace moe {

// activation_func (Megatron's name) → the kernels' Activation.
inline Activation activation_from_config(const MoEConfig& c, const char* who) {
  const std::string& f = c.activation_func;
  if (f == "silu") return Activation::silu;
  if (f == "gelu") return Activation::gelu;
  if (f == "relu2" || f == "squared_relu") return Activation::relu2;
  MOE_THROW(ErrorCode::invalid_argument, who, ": activation_func must be gelu, silu, relu2 or squared_relu, got '",
            f, "'");
}

}  // namespace moe
