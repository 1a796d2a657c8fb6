// Small pieces the expert modules share.
#pragma once
#include <memory>
#include <string>

#include "kernels/ops.h"
#include "moecore/comm.h"
#include "moecore/config.h"
#include "moecore/error.h"
#include "moecore/tensor.h"

namespace moe {

// Sequence parallelism over a TP group (Megatron's gather_from / reduce_scatter_to the sequence
// parallel region); a null or single-rank group is the identity.
inline bool sp_active(const std::shared_ptr<Communicator>& tp) { return tp && tp->size() > 1; }

// (T, ...) this rank's rows → (T·tp, ...) every TP rank's rows in rank order.
inline Tensor sp_all_gather(const std::shared_ptr<Communicator>& tp, const Tensor& x) {
  if (!sp_active(tp)) return x;
  Shape shape = x.shape();
  shape[0] *= tp->size();
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  tp->all_gather(x, out);
  return out;
}

// (T·tp, ...) partial sums → (T, ...) this rank's rows of the sum over TP.
inline Tensor sp_reduce_scatter(const std::shared_ptr<Communicator>& tp, const Tensor& x) {
  if (!sp_active(tp)) return x;
  Shape shape = x.shape();
  shape[0] /= tp->size();
  Tensor out = Tensor::empty(shape, x.dtype(), x.device());
  tp->reduce_scatter(x, out);
  return out;
}

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
