// All-to-all token dispatcher (docs/moe.md): all-to-all-v over EP, all-gather-v / reduce-scatter-v
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

Tensor AllToAllDispatcher::forward_path(const State& st, const Tensor& local) {
  const int p = ep_->rank(), q = etp_->rank();
  Tensor recv = rows_like(local, st.N_recv);  // (N_recv, ·)
  ep_->all_to_all_v(local, st.input_splits, recv, st.output_splits);
  const int64_t rb = row_bytes(local);
  traffic_.bytes_sent += (st.N_local - st.input_splits[static_cast<size_t>(p)]) * rb;
  traffic_.bytes_received += (st.N_recv - st.output_splits[static_cast<size_t>(p)]) * rb;
  // (N_g, ·) in [source][local expert] order; without ETP the received rows are already all of them.
  Tensor gathered = recv;
  if (etp_->size() > 1) {
    gathered = rows_like(local, st.N_g);
    etp_->all_gather_v(recv, gathered, st.etp_rows);
  }
  traffic_.bytes_sent += st.N_recv * rb * (etp_->size() - 1);
  traffic_.bytes_received += (st.N_g - st.etp_rows[static_cast<size_t>(q)]) * rb;
  traffic_.calls += 2;
  Tensor sorted = rows_like(local, st.N_g);  // (N_g, ·) in [local expert][source] order
  ops::chunk_sort(st.chunk_sizes, st.sort_order, gathered, sorted);
  return sorted;
}

Tensor AllToAllDispatcher::reverse_path(const State& st, const Tensor& expert_rows) {
  const int p = ep_->rank(), q = etp_->rank();
  Tensor unsorted = rows_like(expert_rows, st.N_g);  // (N_g, ·) [source][local expert]
  ops::chunk_sort(st.sorted_sizes, st.unsort_order, expert_rows, unsorted);
  Tensor mine = unsorted;  // (N_recv, ·), summed over ETP (without ETP, the rows themselves)
  if (etp_->size() > 1) {
    mine = rows_like(expert_rows, st.N_recv);
    etp_->reduce_scatter_v(unsorted, mine, st.etp_rows);
  }
  const int64_t rb = row_bytes(expert_rows);
  traffic_.bytes_sent += (st.N_g - st.etp_rows[static_cast<size_t>(q)]) * rb;
  traffic_.bytes_received += st.N_recv * rb * (etp_->size() - 1);
  Tensor back = rows_like(expert_rows, st.N_local);  // (N_loc, ·)
  ep_->all_to_all_v(mine, st.output_splits, back, st.input_splits);
  traffic_.bytes_sent += (st.N_recv - st.output_splits[static_cast<size_t>(p)]) * rb;
  traffic_.bytes_received += (st.N_local - st.input_splits[static_cast<size_t>(p)]) * rb;
  traffic_.calls += 2;
  return back;
}

DispatchOutput AllToAllDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map,
                                            int64_t key) {
  MOE_CHECK(routing_map.size(1) == E_, "AllToAllDispatcher: routing map has ", routing_map.size(1),
            " experts, expected ", E_);
  const int64_t H = x.size(1), P = ep_->size(), Q = etp_->size(), M = P * Q;
  const int p = ep_->rank(), q = etp_->rank();
  State& st = states_.start(key);

  // 1. Local permutation over all E experts: rows (N_loc, H) expert-major, so the rows for EP
  //    rank j are one contiguous block.
  LocalPermutation perm = make_local_permutation(routing_map);
  st.row_id_map = perm.row_id_map;
  st.N_local = perm.num_rows;
  st.input_splits.assign(static_cast<size_t>(P), 0);
  for (int64_t e = 0; e < E_; ++e) st.input_splits[static_cast<size_t>(e / G_)] += perm.counts[static_cast<size_t>(e)];

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
  st.output_splits.assign(static_cast<size_t>(P), 0);
  st.etp_rows.assign(static_cast<size_t>(Q), 0);
  for (int64_t qq = 0; qq < Q; ++qq)
    for (int64_t pp = 0; pp < P; ++pp)
      for (int64_t g = 0; g < G_; ++g) {
        int64_t n = R[static_cast<size_t>((qq * P + pp) * G_ + g)];
        if (qq == q) st.output_splits[static_cast<size_t>(pp)] += n;
        st.etp_rows[static_cast<size_t>(qq)] += n;
      }
  st.N_recv = sum(st.output_splits);
  st.N_g = sum(st.etp_rows);
  MOE_CHECK_CODE(st.etp_rows[static_cast<size_t>(q)] == st.N_recv, ErrorCode::internal,
                 "AllToAllDispatcher: this rank receives ", st.N_recv, " rows over EP but the count table says ",
                 st.etp_rows[static_cast<size_t>(q)]);

  // 3. Chunk orders: [source][local expert] ↔ [local expert][source].
  st.chunk_sizes.assign(R.begin(), R.end());
  for (int64_t g = 0; g < G_; ++g)
    for (int64_t s = 0; s < M; ++s) {
      st.sort_order.push_back(s * G_ + g);
      st.sorted_sizes.push_back(R[static_cast<size_t>(s * G_ + g)]);
    }
  for (int64_t s = 0; s < M; ++s)
    for (int64_t g = 0; g < G_; ++g) st.unsort_order.push_back(g * M + s);

  // 4. Move the rows and their probs.
  Tensor local_rows = Tensor::empty({st.N_local, H}, x.dtype(), x.device());    // (N_loc, H)
  Tensor local_probs = Tensor::empty({st.N_local}, probs.dtype(), x.device());  // (N_loc)
  ops::permute(st.row_id_map, x, local_rows, &probs, &local_probs);
  DispatchOutput out;
  out.tokens = forward_path(st, local_rows);                                         // (N_g, H)
  out.probs = forward_path(st, local_probs.view({st.N_local, 1})).view({st.N_g});    // (N_g)
  out.rows_per_expert.assign(static_cast<size_t>(G_), 0);
  for (int64_t s = 0; s < M; ++s)
    for (int64_t g = 0; g < G_; ++g) out.rows_per_expert[static_cast<size_t>(g)] += R[static_cast<size_t>(s * G_ + g)];
  return out;
}

Tensor AllToAllDispatcher::combine(const Tensor& y, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::combine");
  Tensor local = reverse_path(st, y);  // (N_loc, H)
  Tensor out = Tensor::empty({st.row_id_map.size(0), y.size(1)}, y.dtype(), y.device());  // (T, H)
  ops::unpermute(st.row_id_map, local, out);
  return out;
}

Tensor AllToAllDispatcher::combine_backward(const Tensor& dout, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::combine_backward");
  Tensor local = Tensor::empty({st.N_local, dout.size(1)}, dout.dtype(), dout.device());  // (N_loc, H)
  ops::permute(st.row_id_map, dout, local);
  return forward_path(st, local);  // (N_g, H)
}

void AllToAllDispatcher::dispatch_backward(const Tensor& drows, const Tensor& drow_probs, Tensor& dx,
                                           Tensor& dprobs, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::dispatch_backward");
  Tensor local = reverse_path(st, drows);  // (N_loc, H)
  ops::unpermute(st.row_id_map, local, dx);
  Tensor local_dp = reverse_path(st, drow_probs.view({st.N_g, 1})).view({st.N_local});  // (N_loc)
  ops::scatter_rows_to_map(st.row_id_map, local_dp, dprobs);
  states_.release(key);
}

}  // namespace moe
