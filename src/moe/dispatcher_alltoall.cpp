// All-to-all token dispatcher (DESIGN.md §7): all-to-all-v over EP, all-gather-v / reduce-scatter-v
// over ETP, chunk sorting between [source][local expert] and [local expert][source].
//
//   forward                                          backward (the mirror, splits swapped)
//   x (T, H) ─ permute (all E) → (N_loc, H)           unpermute ← (N_loc, H) → dx (T, H)
//   all-to-all-v over EP → (N_recv, H)                all-to-all-v back
//   all-gather-v over ETP → (N_g, H)                  reduce-scatter-v over ETP (sums partials)
//   sort chunks → [local expert][source]              inverse sort
//   ...experts (N_g rows)...                          ...experts backward...
//   (combine: inverse sort; reduce-scatter-v over ETP; all-to-all-v back over EP; unpermute)
// A source is a (ETP rank, EP rank) pair, ordered ETP-major to match the all-gather over ETP.
#include <numeric>

#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moecore/comm.h"

namespace moe {

namespace {
int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }
}  // namespace

AllToAllDispatcher::AllToAllDispatcher(std::shared_ptr<Communicator> ep, std::shared_ptr<Communicator> etp,
                                       std::shared_ptr<Communicator> etp_ep, std::vector<int> ep_rank_of,
                                       std::vector<int> etp_rank_of, int64_t num_experts)
    : ep_(std::move(ep)), etp_(std::move(etp)), etp_ep_(std::move(etp_ep)), ep_rank_of_(std::move(ep_rank_of)),
      etp_rank_of_(std::move(etp_rank_of)), E_(num_experts) {
  MOE_CHECK(ep_ && etp_ && etp_ep_, "AllToAllDispatcher: null process group");
  MOE_CHECK(etp_ep_->size() == ep_->size() * etp_->size(), "AllToAllDispatcher: ETP×EP group has ", etp_ep_->size(),
            " ranks, expected EP ", ep_->size(), " × ETP ", etp_->size());
  MOE_CHECK(static_cast<int>(ep_rank_of_.size()) == etp_ep_->size() &&
                static_cast<int>(etp_rank_of_.size()) == etp_ep_->size(),
            "AllToAllDispatcher: rank tables must have one entry per ETP×EP member");
  MOE_CHECK(E_ % ep_->size() == 0, "AllToAllDispatcher: ", E_, " experts not divisible by EP ", ep_->size());
  G_ = E_ / ep_->size();
}

Tensor AllToAllDispatcher::forward_path(const Tensor& local) {
  const int p = ep_->rank(), q = etp_->rank();
  Tensor recv = rows_like(local, N_recv_);  // (N_recv, ·)
  ep_->all_to_all_v(local, input_splits_, recv, output_splits_);
  const int64_t rb = row_bytes(local);
  traffic_.bytes_sent += (N_local_ - input_splits_[static_cast<size_t>(p)]) * rb;
  traffic_.bytes_received += (N_recv_ - output_splits_[static_cast<size_t>(p)]) * rb;
  // (N_g, ·) in [source][local expert] order; without ETP the received rows are already all of them.
  Tensor gathered = recv;
  if (etp_->size() > 1) {
    gathered = rows_like(local, N_g_);
    etp_->all_gather_v(recv, gathered, etp_rows_);
  }
  traffic_.bytes_sent += N_recv_ * rb * (etp_->size() - 1);
  traffic_.bytes_received += (N_g_ - etp_rows_[static_cast<size_t>(q)]) * rb;
  traffic_.calls += 2;
  Tensor sorted = rows_like(local, N_g_);  // (N_g, ·) in [local expert][source] order
  ops::chunk_sort(chunk_sizes_, sort_order_, gathered, sorted);
  return sorted;
}

Tensor AllToAllDispatcher::reverse_path(const Tensor& expert_rows) {
  const int p = ep_->rank(), q = etp_->rank();
  Tensor unsorted = rows_like(expert_rows, N_g_);  // (N_g, ·) [source][local expert]
  ops::chunk_sort(sorted_sizes_, unsort_order_, expert_rows, unsorted);
  Tensor mine = unsorted;  // (N_recv, ·), summed over ETP (without ETP, the rows themselves)
  if (etp_->size() > 1) {
    mine = rows_like(expert_rows, N_recv_);
    etp_->reduce_scatter_v(unsorted, mine, etp_rows_);
  }
  const int64_t rb = row_bytes(expert_rows);
  traffic_.bytes_sent += (N_g_ - etp_rows_[static_cast<size_t>(q)]) * rb;
  traffic_.bytes_received += N_recv_ * rb * (etp_->size() - 1);
  Tensor back = rows_like(expert_rows, N_local_);  // (N_loc, ·)
  ep_->all_to_all_v(mine, output_splits_, back, input_splits_);
  traffic_.bytes_sent += (N_recv_ - output_splits_[static_cast<size_t>(p)]) * rb;
  traffic_.bytes_received += (N_local_ - input_splits_[static_cast<size_t>(p)]) * rb;
  traffic_.calls += 2;
  return back;
}

DispatchOutput AllToAllDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map) {
  MOE_CHECK(routing_map.size(1) == E_, "AllToAllDispatcher: routing map has ", routing_map.size(1),
            " experts, expected ", E_);
  const int64_t H = x.size(1), P = ep_->size(), Q = etp_->size(), M = P * Q;
  const int p = ep_->rank(), q = etp_->rank();

  // 1. Local permutation over all E experts: rows (N_loc, H) expert-major, so the rows for EP
  //    rank j are one contiguous block.
  LocalPermutation perm = make_local_permutation(routing_map);
  row_id_map_ = perm.row_id_map;
  N_local_ = perm.num_rows;
  input_splits_.assign(static_cast<size_t>(P), 0);
  for (int64_t e = 0; e < E_; ++e) input_splits_[static_cast<size_t>(e / G_)] += perm.counts[static_cast<size_t>(e)];

  // 2. Counts of every (ETP, EP) source for every expert: C (M, E).
  Tensor c_local = Tensor::from_vector(perm.counts, {1, E_});
  Tensor c_all = Tensor::empty({M, E_}, DType::i64);
  etp_ep_->all_gather(c_local, c_all);
  std::vector<int64_t> C = c_all.to_vector<int64_t>();
  // R[s][g]: rows source s = q'·P + p' sends to my local expert g.
  std::vector<int64_t> R(static_cast<size_t>(M * G_), 0);
  for (int64_t m = 0; m < M; ++m) {
    int64_t s = static_cast<int64_t>(etp_rank_of_[static_cast<size_t>(m)]) * P + ep_rank_of_[static_cast<size_t>(m)];
    for (int64_t g = 0; g < G_; ++g) R[static_cast<size_t>(s * G_ + g)] = C[static_cast<size_t>(m * E_ + p * G_ + g)];
  }
  output_splits_.assign(static_cast<size_t>(P), 0);
  etp_rows_.assign(static_cast<size_t>(Q), 0);
  for (int64_t qq = 0; qq < Q; ++qq)
    for (int64_t pp = 0; pp < P; ++pp)
      for (int64_t g = 0; g < G_; ++g) {
        int64_t n = R[static_cast<size_t>((qq * P + pp) * G_ + g)];
        if (qq == q) output_splits_[static_cast<size_t>(pp)] += n;
        etp_rows_[static_cast<size_t>(qq)] += n;
      }
  N_recv_ = sum(output_splits_);
  N_g_ = sum(etp_rows_);
  MOE_CHECK_CODE(etp_rows_[static_cast<size_t>(q)] == N_recv_, ErrorCode::internal,
                 "AllToAllDispatcher: this rank receives ", N_recv_, " rows over EP but the count table says ",
                 etp_rows_[static_cast<size_t>(q)]);

  // 3. Chunk orders: [source][local expert] ↔ [local expert][source].
  chunk_sizes_.assign(R.begin(), R.end());
  sort_order_.clear();
  sorted_sizes_.clear();
  for (int64_t g = 0; g < G_; ++g)
    for (int64_t s = 0; s < M; ++s) {
      sort_order_.push_back(s * G_ + g);
      sorted_sizes_.push_back(R[static_cast<size_t>(s * G_ + g)]);
    }
  unsort_order_.clear();
  for (int64_t s = 0; s < M; ++s)
    for (int64_t g = 0; g < G_; ++g) unsort_order_.push_back(g * M + s);

  // 4. Move the rows and their probs.
  Tensor local_rows = Tensor::empty({N_local_, H}, x.dtype(), x.device());  // (N_loc, H)
  Tensor local_probs = Tensor::empty({N_local_}, probs.dtype(), x.device());  // (N_loc)
  ops::permute(row_id_map_, x, local_rows, &probs, &local_probs);
  DispatchOutput out;
  out.tokens = forward_path(local_rows);                                            // (N_g, H)
  out.probs = forward_path(local_probs.view({N_local_, 1})).view({N_g_});           // (N_g)
  out.rows_per_expert.assign(static_cast<size_t>(G_), 0);
  for (int64_t s = 0; s < M; ++s)
    for (int64_t g = 0; g < G_; ++g) out.rows_per_expert[static_cast<size_t>(g)] += R[static_cast<size_t>(s * G_ + g)];
  return out;
}

Tensor AllToAllDispatcher::combine(const Tensor& y) {
  Tensor local = reverse_path(y);  // (N_loc, H)
  Tensor out = Tensor::empty({row_id_map_.size(0), y.size(1)}, y.dtype(), y.device());  // (T, H)
  ops::unpermute(row_id_map_, local, out);
  return out;
}

Tensor AllToAllDispatcher::combine_backward(const Tensor& dout) {
  Tensor local = Tensor::empty({N_local_, dout.size(1)}, dout.dtype(), dout.device());  // (N_loc, H)
  ops::permute(row_id_map_, dout, local);
  return forward_path(local);  // (N_g, H)
}

void AllToAllDispatcher::dispatch_backward(const Tensor& drows, const Tensor& drow_probs, Tensor& dx,
                                           Tensor& dprobs) {
  Tensor local = reverse_path(drows);  // (N_loc, H)
  ops::unpermute(row_id_map_, local, dx);
  Tensor local_dp = reverse_path(drow_probs.view({N_g_, 1})).view({N_local_});  // (N_loc)
  ops::scatter_rows_to_map(row_id_map_, local_dp, dprobs);
}

}  // namespace moe
