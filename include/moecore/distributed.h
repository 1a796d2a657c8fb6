// libmoecore — helpers for running a layer across ranks: which tokens a rank holds, gathering
// tokens and canonical parameters back, and Megatron's gradient finalisation.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moecore/comm.h"
#include "moecore/param.h"
#include "moecore/parallel.h"
#include "moecore/tensor.h"

namespace moe {

// A rank's tokens of a global (S, B) batch: the sequence is split into TP·CP contiguous chunks
// (chunk cp_rank·TP + tp_rank, as sequence parallelism inside context parallelism does) and the
// batch into DP contiguous parts.
struct TokenShard {
  int64_t s_begin = 0, s_len = 0;
  int64_t b_begin = 0, b_len = 0;
};
TokenShard token_shard(const ProcessGroups& groups, int64_t S, int64_t B);

// full (S, B, ...) → this rank's (s_len, b_len, ...).
Tensor take_tokens(const Tensor& full, const TokenShard& shard);
// Every rank's (s_len, b_len, ...) → the full (S, B, ...) on every rank (all-gather over world).
Tensor gather_tokens(const Tensor& local, const TokenShard& shard, int64_t S, int64_t B, Communicator& world);

// The canonical (unsharded) tensor from every rank's shard of p (values, or grads with
// use_grad), on every rank: f64 for f64 parameters, else f32. Replicas hold equal values; the lowest world rank's wins.
Tensor gather_parameter(const Parameter& p, bool use_grad, Communicator& world);
// The same for a parameter that only some ranks hold (pipeline stages): `p` null on the others,
// `name` and `canonical_shape` known everywhere; always f32. Collective over the world.
Tensor gather_parameter(const std::string& name, const Shape& canonical_shape, const Parameter* p, bool use_grad,
                        Communicator& world);

// Megatron's finalize_model_grads for these parameters: router-like grads (GradGroup::router)
// are summed over TP; dense grads summed over DP×CP, expert grads over EDP; both are then scaled by
// 1/(DP·CP), so the result is the mean over the DP·CP replicas of each replica's gradient.
void finalize_grads(const std::vector<Parameter*>& params, const ProcessGroups& groups);

}  // namespace moe
