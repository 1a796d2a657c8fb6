// libmoecore — what a forward needs to know about where it is in training.
#pragma once
#include <cstdint>

namespace moe {

struct ForwardContext {
  int64_t step = 0;        // optimizer step: part of the jitter key
  int64_t microbatch = 0;  // micro-batch within the step: part of the jitter key
  int64_t seq_length = 0;  // S of this rank's tokens (T = S·B); 0: one sequence of T tokens
  int64_t batch_size = 1;  // B
  bool training = true;    // false: no aux/z losses, no expert-bias counting, no jitter
  // Scale of the aux and z loss gradients injected in the router's backward (Megatron's
  // MoEAuxLossAutoScaler: 1/num_microbatches by default).
  double loss_scale = 1.0;
};

}  // namespace moe
