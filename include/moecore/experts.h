// libmoecore — grouped-GEMM experts (docs/moe.md).
// forward over rows grouped by local expert (per-expert row counts, zeros allowed):
//   h (N, F1) = x (N, H) · W1[e]ᵀ          fc1, F1 = 2F with a GLU
//   a (N, F)  = act(h) · prob              activation, then the routing prob
//   y (N, H)  = a · W2[e]ᵀ                 fc2
// backward mirrors it: dW2 += dyᵀa, da = dy·W2, (dh, dprob) = act'(...), dW1 += dhᵀx, dx = dh·W1.
// Weights may be split over ETP: fc1 by output rows (each GLU half alike), fc2 by input columns;
// F here is the local width and the caller reduces the partial fc2 outputs.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/activation_store.h"
#include "moecore/comm.h"
#include "moecore/config.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe {

struct ExpertsSharding {
  int64_t first_expert = 0;  // canonical index of local expert 0 (EP)
  int64_t num_local_experts = 0;  // 0: all of config.num_moe_experts
  int64_t etp_rank = 0, etp_size = 1;  // split of F
};

class GroupedExperts {
 public:
  // param_prefix goes before the canonical names ("decoder.layers.3.mlp." inside a model).
  GroupedExperts(const MoEConfig& config, Device device, ExpertsSharding sharding = {},
                 const std::string& slot_prefix = "experts.", const std::string& param_prefix = "");

  // x (N, H), rows (G) per local expert, probs (N) in the prob dtype → y (N, H).
  Tensor forward(const Tensor& x, const std::vector<int64_t>& rows, const Tensor& probs, ActivationStore& store);
  // The host-sync-free form: row_offsets (G+1) i64 on the device (exclusive prefix sum of the rows
  // per local expert, total N last) and x (N_max, H), probs (N_max) with N_max >= N rows; rows past
  // N are neither read nor written (y's too), and the backward's dy, dx, dprobs have N_max rows.
  Tensor forward(const Tensor& x, const Tensor& row_offsets, const Tensor& probs, ActivationStore& store);
  // dy (N, H) → dx (N, H) overwritten, dprobs (N) overwritten; fc1/fc2 grads accumulated.
  // dx may be dy itself (dy is read before dx is written). The backward of the forward that saved
  // into `store` (forwards with other stores may be pending at the same time).
  void backward(const Tensor& dy, Tensor& dx, Tensor& dprobs, ActivationStore& store);

  // Drops the pending forward that saved into `store` without its backward.
  void release(const ActivationStore& store) { rows_.erase(&store); }

  Parameter& fc1() { return fc1_; }  // experts.linear_fc1.weight local (G, F1_local, H)
  Parameter& fc2() { return fc2_; }  // experts.linear_fc2.weight local (G, H, F_local)
  int64_t num_local_experts() const { return G_; }
  int64_t local_ffn() const { return F_; }

 private:
  MoEConfig config_;
  Device device_;
  std::string prefix_;
  int64_t G_, F_;
  Parameter fc1_, fc2_;
  // Row groups of a forward: host counts, or device offsets (G+1) i64 with `rows` the row bound.
  struct Rows {
    std::vector<int64_t> host;
    Tensor offsets;
    int64_t rows = 0;  // N (host counts) or N_max (device offsets)
  };
  Tensor forward_rows(const Tensor& x, const Rows& rows, const Tensor& probs, ActivationStore& store);
  // Row groups of each pending forward, by the store it saved into (backward(…, store) reads and
  // releases them).
  std::map<const ActivationStore*, Rows> rows_;
};

// What tells a dense MLP from the shared expert (as in Megatron, whose SharedExpertMLP is an MLP):
// the names, the width and the gate.
struct MlpSpec {
  std::string param_prefix = "shared_experts.";  // "decoder.layers.1.mlp." for a model's dense MLP
  int64_t width = 0;                             // F (fc1 gives 2F with a GLU)
  bool gate = false;
};

// The shared expert: one dense MLP of width moe_shared_expert_intermediate_size over every
// token, optionally scaled by a sigmoid gate σ(x·w_gᵀ) (docs/moe.md). With a TP group it runs like
// Megatron's sequence-parallel column/row-parallel MLP: all-gather the tokens over TP, fc1 split by
// output rows, fc2 by input columns, reduce-scatter back to this rank's tokens, then the gate.
// The same class is the model's dense MLP (MlpSpec: its names and ffn_hidden_size, no gate).
class SharedExperts {
 public:
  SharedExperts(const MoEConfig& config, Device device, std::shared_ptr<Communicator> tp = nullptr,
                const std::string& slot_prefix = "shared_experts.");
  SharedExperts(const MoEConfig& config, Device device, std::shared_ptr<Communicator> tp,
                const std::string& slot_prefix, const MlpSpec& spec);
  // x (T, H) this rank's tokens → out (T, H).
  Tensor forward(const Tensor& x, ActivationStore& store);
  // dout (T, H); dx (T, H) += input gradient; grads accumulated.
  void backward(const Tensor& dout, Tensor& dx, ActivationStore& store);

  Parameter& fc1() { return fc1_; }   // <prefix>linear_fc1.weight (F1s, H), local rows
  Parameter& fc2() { return fc2_; }   // shared_experts.linear_fc2.weight (H, Fs), local columns
  Parameter& gate() { return gate_; } // shared_experts.gate_weight (1, H) (undefined without a gate)
  bool has_gate() const { return has_gate_; }

 private:
  MoEConfig config_;
  Device device_;
  std::shared_ptr<Communicator> tp_;
  std::string prefix_;
  int64_t F_;  // local width
  bool has_gate_;
  Parameter fc1_, fc2_, gate_;
};

}  // namespace moe
