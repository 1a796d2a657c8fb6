// The transformer's modules around the MoE layer (docs/model.md): norms and causal self-attention
// with tensor, sequence and context parallelism. Each has an explicit forward and a backward that
// mirrors it; what the forward keeps lives in named slots of the caller's ActivationStore.
// Internal to the library: MoEGPTModel (moecore/model.h) is the public face.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "moecore/activation_store.h"
#include "moecore/comm.h"
#include "moecore/config.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe {

// The sequence geometry of one micro-batch on this rank (see SequenceLayout in moecore/model.h).
struct SeqBatch {
  int64_t b = 0;      // sequences in the micro-batch
  int64_t s_cp = 0;   // S / CP: this CP rank's positions (what attention sees after the TP gather)
  int64_t s_loc = 0;  // S / (CP·TP): this rank's own rows of the residual stream
  Tensor q_pos;       // (s_cp) i64 on the device: positions of this CP rank's tokens
  Tensor k_pos;       // (S) i64 on the device: positions of the keys after the CP all-gather
};

// RMSNorm or LayerNorm over the last dimension D (Megatron's `normalization`), statistics in f32
// (f64 for f64). weight (D) starts at 1, bias (D, LayerNorm only) at 0. Replicated over TP while
// the ranks see different tokens or heads: gradients summed over TP (GradGroup::sequence_parallel).
//   forward:  x (rows, D) → y (rows, D);       slots <slot>.input, <slot>.mean (LayerNorm), <slot>.rstd
//   backward: dy (rows, D) → dx (rows, D);     dweight, dbias accumulated
class Norm {
 public:
  Norm(const MoEConfig& config, Device device, const std::string& name, int64_t D);
  Tensor forward(const Tensor& x, ActivationStore& store, const std::string& slot);
  // The forward's output alone, saving nothing (the layernorm recompute's regenerate function).
  Tensor apply(const Tensor& x);
  Tensor backward(const Tensor& dy, ActivationStore& store, const std::string& slot);
  void parameters(std::vector<Parameter*>& out);

 private:
  NormKind kind_;
  double eps_;
  int64_t D_;
  Parameter weight_, bias_;
};

// Causal self-attention with grouped query heads (Megatron's SelfAttention, local spec).
//   TP: whole query groups per rank (linear_qkv column-parallel over the groups, linear_proj
//       row-parallel over their heads), sequence parallel around it (all-gather the rows before,
//       reduce-scatter after).
//   CP: keys and values all-gathered over CP in the forward (the causal mask is by position), their
//       gradients reduce-scattered back in the backward.
//   forward:  x (s_loc·b, H) this rank's rows of norm₁(h) → out (s_loc·b, H)
//   backward: dout (s_loc·b, H) → dx (s_loc·b, H); weight gradients accumulated
class SelfAttention {
 public:
  SelfAttention(const MoEConfig& config, Device device, const std::string& prefix,
                std::shared_ptr<Communicator> tp, std::shared_ptr<Communicator> cp);
  Tensor forward(const Tensor& x, const SeqBatch& seq, ActivationStore& store);
  Tensor backward(const Tensor& dout, const SeqBatch& seq, ActivationStore& store);
  void parameters(std::vector<Parameter*>& out);

 private:
  MoEConfig config_;
  Device device_;
  std::shared_ptr<Communicator> tp_, cp_;
  int64_t nh_, ng_, hd_, rd_;  // this rank's query heads and groups, head dim, rotary dims (0: none)
  int64_t q_per_group_;
  double scale_;
  Parameter qkv_, proj_;
  std::unique_ptr<Norm> q_norm_, k_norm_;
};

}  // namespace moe
