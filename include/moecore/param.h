// libmoecore — parameters: a named value and its gradient.
// Gradients accumulate (+=) and are zeroed explicitly. `name` is the canonical unsharded name
// (docs/moe.md); `shard` says which part of the canonical tensor this rank holds.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moecore/tensor.h"

namespace moe {

// This rank holds indices [start, start+length) of canonical dimension `dim`. With glu_halves the
// dimension is [gate (n/2) | up (n/2)] and each half is split alike: the local indices are
// [start, start+length/2) of the gate half followed by the same range of the up half.
struct DimShard {
  int64_t dim = 0;
  int64_t start = 0;
  int64_t length = 0;
  bool glu_halves = false;
};

// Which gradient reduction a parameter takes (docs/parallelism.md): dense params over DP×CP, expert params
// over EDP, and the router weight additionally summed over TP. sequence_parallel: replicated over TP
// while each TP rank sees other tokens or heads (norm weights, learned position embeddings under
// sequence parallelism, qk-layernorm weights): summed over TP, then like dense (Megatron's
// `sequence_parallel` parameter attribute).
enum class GradGroup : uint8_t { dense, expert, router, sequence_parallel };

struct Parameter {
  std::string name;              // canonical, e.g. "experts.linear_fc1.weight"
  Shape canonical_shape;         // unsharded shape
  std::vector<DimShard> shard;   // empty: this rank holds the whole tensor
  GradGroup grad_group = GradGroup::dense;
  bool trainable = true;         // false for buffers such as router.expert_bias
  Tensor value;                  // local shard
  Tensor grad;                   // same shape and dtype as value (undefined when not trainable)

  void zero_grad() {
    if (grad.defined()) grad.zero_();
  }
};

// A parameter's local shard initialised from N(0, std²) by a counter-based hash of (seed, name,
// canonical flat index): every parallel layout holds exactly the values a single rank would.
Parameter make_parameter(const std::string& name, const Shape& canonical_shape, std::vector<DimShard> shard,
                         DType dtype, Device device, uint64_t seed, double init_std, GradGroup group,
                         bool trainable = true);
// The canonical flat indices this rank's shard covers, in local order (for loading and gathering).
std::vector<int64_t> shard_canonical_indices(const Shape& canonical_shape, const std::vector<DimShard>& shard);
// Local shape of a shard.
Shape shard_shape(const Shape& canonical_shape, const std::vector<DimShard>& shard);
// Copies this rank's part of a full canonical tensor (any float dtype) into p.value.
void load_shard(Parameter& p, const Tensor& canonical);

}  // namespace moe
