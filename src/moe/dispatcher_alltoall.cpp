// All-to-all token dispatcher (docs/moe.md): an exchange over EP, all-gather-v / reduce-scatter-v
// over ETP.
//
//   forward                                          backward (the mirror, directions swapped)
//   x (T, H) ─ permute → send rows (N_loc − own, H)   unpermute ← rows back (N_loc − own, H)
//              and own rows in place in (N_recv, H)              and own rows where they are (N_recv, H)
//   exchange over EP → (N_recv, H)                    exchange back over EP (own rows stay)
//   all-gather-v over ETP → (N_g, H)                  reduce-scatter-v over ETP (sums partials)
//   sort chunks → [local expert][source] (ETP > 1)    inverse sort
//   ...experts (N_g rows)...                          ...experts backward...
//   (combine: inverse sort; reduce-scatter-v over ETP; exchange back over EP; unpermute)
// A source is a (ETP rank, EP rank) pair, ordered ETP-major to match the all-gather over ETP.
//
// The EP exchange is one batch of point-to-point transfers, one per (EP rank, local expert) chunk
// and one for its probs, each received straight into its place in [local expert][EP source] order,
// so no chunk sort follows it. This rank's own rows are permuted straight into that order on the
// way out and read from it on the way back: one row map (row_id_map) numbers the rows of [packed
// rows of the other EP ranks; (N_recv) rows in [local expert][EP source] order], a two-output permute
// writes both in one pass over the tokens and a two-input unpermute reads both without concatenating
// them. Without ETP its output is the experts'
// input. Every row lands where Megatron's all-to-all + sort_chunks_by_idxs puts it and every token
// sums its copies in the same (expert) order, so results are the same bits.
//
// On one node (CPU tensors, the EP group has shared host segments) the packed rows live in each
// rank's own segment instead of a send buffer: the permute writes them there and each expert rank
// copies its chunks out; on the way back each expert rank writes rank j's rows into j's segment,
// where j's unpermute reads them. One copy each way instead of two, the same rows in the same
// places. Every rank knows every rank's packed layout from the count table (peer_offsets), and each
// use of the segments is fenced before the writes (all reads of the last use are done) and after
// them (the rows are there).
#include <algorithm>
#include <numeric>

#include "core/sanitize.h"
#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moecore/comm.h"

namespace moe {

namespace {
int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }
Shape rows_shape(const Tensor& t, int64_t rows) {
  Shape s = t.shape();
  s[0] = rows;
  return s;
}
// Calls f(j, c, n, at) for every chunk c = j·G + g between another EP rank j (≠ p) and my local
// expert g that has rows: n = counts[c] rows, starting at row at = starts[c] of j's packed rows.
template <class F>
void for_each_peer_chunk(int P, int p, int64_t G, const std::vector<int64_t>& counts,
                         const std::vector<int64_t>& starts, F&& f) {
  for (int j = 0; j < P; ++j)
    for (int64_t g = 0; g < G && j != p; ++g) {
      const size_t c = static_cast<size_t>(j * G + g);
      if (counts[c] > 0) f(j, c, counts[c], static_cast<size_t>(starts[c]));
    }
}
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

size_t AllToAllDispatcher::probs_at(const State& st, size_t row_bytes) {
  return (static_cast<size_t>(st.max_packed) * row_bytes + 63) / 64 * 64;
}

SharedHostSegments* AllToAllDispatcher::shared_segments(const State& st, const Tensor& rows, size_t row_bytes,
                                                        size_t prob_bytes) {
  if (ep_->size() == 1 || !rows.device().is_cpu()) return nullptr;
  SharedHostSegments* shm = ep_->shared_host();
  if (!shm) return nullptr;
  shm->fence();  // every rank is done with what the segments held (reads of the last exchange included)
  if (!shm->reserve(probs_at(st, row_bytes) + static_cast<size_t>(st.max_packed) * prob_bytes)) return nullptr;
  return shm;
}

void AllToAllDispatcher::exchange(const State& st, bool to_experts, const Tensor& in, Tensor& out,
                                  const Tensor* in_probs, Tensor* out_probs) {
  const int P = ep_->size(), p = ep_->rank();
  // Chunk c = j·G + g: on the local side the rows for local expert g of EP rank j (in the packed
  // buffer of the other EP ranks' rows, both ways), on the expert side the rows EP rank j sends to my
  // local expert g. Sent from one side, received into the other.
  const std::vector<int64_t>& local_off = st.packed_offsets;
  const std::vector<int64_t>& src_off = to_experts ? local_off : st.recv_offsets;
  const std::vector<int64_t>& src_n = to_experts ? st.local_counts : st.recv_counts;
  const std::vector<int64_t>& dst_off = to_experts ? st.recv_offsets : local_off;
  const std::vector<int64_t>& dst_n = to_experts ? st.recv_counts : st.local_counts;
  const int64_t rb = row_bytes(in) + (in_probs ? row_bytes(*in_probs) : 0);
  std::vector<P2POp> ops;
  ops.reserve(static_cast<size_t>(4 * P * G_));
  for (int j = 0; j < P; ++j) {
    for (int64_t g = 0; g < G_; ++g) {
      const size_t c = static_cast<size_t>(j * G_ + g);
      if (j == p) {  // this rank's own rows: permuted into place on the way out, read in place on the way back
        MOE_CHECK_CODE(src_n[c] == dst_n[c], ErrorCode::internal, "AllToAllDispatcher: EP rank ", p, " keeps ",
                       st.local_counts[c], " rows of its local expert ", g, " but the count table says ",
                       st.recv_counts[c]);
        continue;
      }
      if (src_n[c] > 0) {
        ops.push_back({P2POp::Kind::send, in.narrow(src_off[c], src_n[c]), j});
        if (in_probs) ops.push_back({P2POp::Kind::send, in_probs->narrow(src_off[c], src_n[c]), j});
        traffic_.bytes_sent += src_n[c] * rb;
      }
      if (dst_n[c] > 0) {
        ops.push_back({P2POp::Kind::recv, out.narrow(dst_off[c], dst_n[c]), j});
        if (out_probs) ops.push_back({P2POp::Kind::recv, out_probs->narrow(dst_off[c], dst_n[c]), j});
        traffic_.bytes_received += dst_n[c] * rb;
      }
    }
  }
  // Every rank takes part (a rank with nothing to move still keeps the call order of the others).
  ep_->batch_send_recv(ops);
  traffic_.calls += 1;
}

Tensor AllToAllDispatcher::forward_path(const State& st, const Tensor& x, const Tensor* probs, Tensor* out_probs) {
  const int q = etp_->rank(), Q = etp_->size();
  // The rows for other EP ranks (packed, expert-major) and (N_recv, ·) in [local expert][EP source]
  // order, this rank's own rows permuted straight into it; without ETP, all the experts' rows.
  // With shared segments the send rows are permuted straight into this rank's segment, where the
  // experts' ranks read them (one copy instead of a message's two).
  const int p = ep_->rank();
  const int64_t n_packed = st.n_left + st.n_right;
  const size_t rb = static_cast<size_t>(row_bytes(x)), pb = probs ? dtype_size(probs->dtype()) : 0;
  SharedHostSegments* shm = shared_segments(st, x, rb, pb);
  const size_t p_at = probs_at(st, rb);  // where the probs start in a segment
  Tensor send = shm ? shm->segment(p, 0, rows_shape(x, n_packed), x.dtype()) : rows_like(x, n_packed);
  Tensor recv = rows_like(x, st.N_recv);
  Tensor send_probs, recv_probs;
  if (probs) {
    send_probs = shm ? shm->segment(p, p_at, {n_packed}, probs->dtype())
                     : Tensor::empty({n_packed}, probs->dtype(), x.device());
    recv_probs = Tensor::empty({st.N_recv}, probs->dtype(), x.device());
  }
  // One pass over the tokens: row ids below n_left + n_right are send rows, the others this rank's
  // own rows at their place in recv (the combine's row map, read the other way).
  ops::permute2(st.row_id_map, x, send, recv, st.N_local - n_packed, probs, probs ? &send_probs : nullptr,
                probs ? &recv_probs : nullptr);
  if (shm) {
    shm->fence();  // every rank's send rows are in its segment
    const auto copy_out = [&](int j, size_t c, int64_t n, size_t at) {
      recv.narrow(st.recv_offsets[c], n).copy_from(shm->segment(j, at * rb, rows_shape(x, n), x.dtype()));
      if (probs)
        recv_probs.narrow(st.recv_offsets[c], n)
            .copy_from(shm->segment(j, p_at + at * pb, {n}, probs->dtype()));
    };
    for_each_peer_chunk(ep_->size(), p, G_, st.recv_counts, st.peer_offsets, copy_out);
    traffic_.bytes_sent += n_packed * static_cast<int64_t>(rb + pb);
    traffic_.bytes_received += (st.N_recv - (st.N_local - n_packed)) * static_cast<int64_t>(rb + pb);
    traffic_.calls += 1;
  } else {
    exchange(st, true, send, recv, probs ? &send_probs : nullptr, probs ? &recv_probs : nullptr);
  }
  if (Q == 1) {
    if (out_probs) *out_probs = recv_probs;
    return recv;
  }
  // All-gather over ETP: (N_g, ·) in [ETP rank][local expert][EP source] order, then sorted to
  // [local expert][ETP rank][EP source].
  const int64_t rpb = static_cast<int64_t>(rb + pb);  // bytes per row with its prob
  Tensor gathered = rows_like(x, st.N_g);
  etp_->all_gather_v(recv, gathered, st.etp_rows);
  Tensor gathered_probs;
  if (probs) {
    gathered_probs = rows_like(recv_probs, st.N_g);
    etp_->all_gather_v(recv_probs, gathered_probs, st.etp_rows);
  }
  traffic_.bytes_sent += st.N_recv * rpb * (Q - 1);
  traffic_.bytes_received += (st.N_g - st.etp_rows[static_cast<size_t>(q)]) * rpb;
  traffic_.calls += 1;
  Tensor sorted = rows_like(x, st.N_g);  // (N_g, ·) [local expert][source]
  if (probs) {
    *out_probs = rows_like(recv_probs, st.N_g);
    ops::chunk_sort(st.etp_chunks, st.sort_order, gathered, sorted, &gathered_probs, out_probs);
  } else {
    ops::chunk_sort(st.etp_chunks, st.sort_order, gathered, sorted);
  }
  return sorted;
}

Tensor AllToAllDispatcher::reverse_path(const State& st, const Tensor& expert_rows, Tensor& own,
                                        const Tensor* expert_probs, Tensor* out_probs, Tensor* own_probs) {
  const int q = etp_->rank(), Q = etp_->size();
  Tensor mine = expert_rows;  // (N_recv, ·) [local expert][EP source], summed over ETP
  Tensor mine_probs = expert_probs ? *expert_probs : Tensor{};
  const size_t rb = static_cast<size_t>(row_bytes(expert_rows));
  const size_t pb = expert_probs ? dtype_size(expert_probs->dtype()) : 0;
  if (Q > 1) {
    const int64_t rpb = static_cast<int64_t>(rb + pb);  // bytes per row with its prob
    Tensor unsorted = rows_like(expert_rows, st.N_g);  // (N_g, ·) [ETP rank][local expert][EP source]
    Tensor unsorted_probs = expert_probs ? rows_like(*expert_probs, st.N_g) : Tensor{};
    if (expert_probs)
      ops::chunk_sort(st.sorted_chunks, st.unsort_order, expert_rows, unsorted, expert_probs, &unsorted_probs);
    else
      ops::chunk_sort(st.sorted_chunks, st.unsort_order, expert_rows, unsorted);
    mine = rows_like(expert_rows, st.N_recv);
    etp_->reduce_scatter_v(unsorted, mine, st.etp_rows);
    if (expert_probs) {
      mine_probs = rows_like(*expert_probs, st.N_recv);
      etp_->reduce_scatter_v(unsorted_probs, mine_probs, st.etp_rows);
    }
    traffic_.bytes_sent += (st.N_g - st.etp_rows[static_cast<size_t>(q)]) * rpb;
    traffic_.bytes_received += st.N_recv * rpb * (Q - 1);
    traffic_.calls += 1;
  }
  // The other EP ranks' rows come back packed like the send buffer; this rank's own rows stay in
  // `mine`, where the combine's row map points. With shared segments each rank writes the rows of
  // the others straight into their segments, and the rows come back there, in place.
  const int p = ep_->rank();
  const int64_t n_packed = st.n_left + st.n_right;
  const size_t p_at = probs_at(st, rb);  // where the probs start in a segment
  Tensor back;  // (N_loc − own, ·) packed
  if (SharedHostSegments* shm = shared_segments(st, expert_rows, rb, pb)) {
    const auto write_back = [&](int j, size_t c, int64_t n, size_t at) {
      Tensor dst = shm->segment(j, at * rb, rows_shape(expert_rows, n), expert_rows.dtype());
      dst.copy_from(mine.narrow(st.recv_offsets[c], n));
      if (expert_probs) {
        Tensor dst_p = shm->segment(j, p_at + at * pb, {n}, expert_probs->dtype());
        dst_p.copy_from(mine_probs.narrow(st.recv_offsets[c], n));
      }
    };
    for_each_peer_chunk(ep_->size(), p, G_, st.recv_counts, st.peer_offsets, write_back);
    shm->fence();  // every rank's rows are back in its segment
    back = shm->segment(p, 0, rows_shape(expert_rows, n_packed), expert_rows.dtype());
    if (expert_probs) *out_probs = shm->segment(p, p_at, {n_packed}, expert_probs->dtype());
    traffic_.bytes_sent += (st.N_recv - (st.N_local - n_packed)) * static_cast<int64_t>(rb + pb);
    traffic_.bytes_received += n_packed * static_cast<int64_t>(rb + pb);
    traffic_.calls += 1;
  } else {
    back = rows_like(expert_rows, n_packed);
    if (expert_probs) *out_probs = rows_like(*expert_probs, n_packed);
    exchange(st, false, mine, back, expert_probs ? &mine_probs : nullptr, out_probs);
  }
  own = mine;
  if (own_probs) *own_probs = mine_probs;
  return back;
}

DispatchOutput AllToAllDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map,
                                            int64_t key) {
  MOE_CHECK(routing_map.size(1) == E_, "AllToAllDispatcher: routing map has ", routing_map.size(1),
            " experts, expected ", E_);
  const int64_t P = ep_->size(), Q = etp_->size(), M = P * Q;
  const int p = ep_->rank(), q = etp_->rank();
  State& st = states_.start(key);

  // 1. Rows per expert over all E experts, expert-major (N_loc, H): the rows for local expert g of EP
  //    rank j are one contiguous chunk.
  st.local_counts = ops::routing_counts(routing_map).to_vector<int64_t>();  // (E)
  st.N_local = sum(st.local_counts);
  std::vector<int64_t> local_offsets(static_cast<size_t>(E_), 0);  // (E) first expert-major row of each expert
  for (int64_t e = 1; e < E_; ++e)
    local_offsets[static_cast<size_t>(e)] = local_offsets[static_cast<size_t>(e - 1)] + st.local_counts[static_cast<size_t>(e - 1)];
  // The send buffer packs the chunks of the other EP ranks, expert-major: experts below mine (the
  // left block), then above (the right block).
  const int64_t lo = p * G_, hi = lo + G_;
  const int64_t own_end = local_offsets[static_cast<size_t>(hi - 1)] + st.local_counts[static_cast<size_t>(hi - 1)];
  st.n_left = local_offsets[static_cast<size_t>(lo)];
  st.n_right = st.N_local - own_end;
  st.packed_offsets.assign(static_cast<size_t>(E_), 0);
  for (int64_t e = 0; e < E_; ++e) {
    const size_t i = static_cast<size_t>(e);
    if (e < lo) st.packed_offsets[i] = local_offsets[i];
    else if (e >= hi) st.packed_offsets[i] = st.n_left + local_offsets[i] - own_end;
  }

  // 2. Counts of every (ETP, EP) source for every expert: C (M, E), gathered once per dispatch
  //    (one round of point-to-point transfers: every member sends its counts to every other);
  //    both directions of every exchange (forward and backward) follow from it.
  Tensor c_local = Tensor::from_vector(st.local_counts, {1, E_});
  Tensor c_all = Tensor::empty({M, E_}, DType::i64);
  const int me = etp_ep_->rank();
  std::vector<P2POp> count_ops;
  for (int m = 0; m < static_cast<int>(M); ++m) {
    if (m == me) continue;
    count_ops.push_back({P2POp::Kind::send, c_local, m});
    count_ops.push_back({P2POp::Kind::recv, c_all.narrow(m, 1), m});
  }
  Tensor c_mine = c_all.narrow(me, 1);
  c_mine.copy_from(c_local);
  etp_ep_->batch_send_recv(count_ops);
  std::vector<int64_t> C = c_all.to_vector<int64_t>();
  // R[s][g]: rows source s = q'·P + p' sends to my local expert g.
  std::vector<int64_t> R(static_cast<size_t>(M * G_), 0);
  for (int64_t m = 0; m < M; ++m) {
    int64_t s = static_cast<int64_t>(etp_rank_of_[static_cast<size_t>(m)]) * P + ep_rank_of_[static_cast<size_t>(m)];
    for (int64_t g = 0; g < G_; ++g) R[static_cast<size_t>(s * G_ + g)] = C[static_cast<size_t>(m * E_ + p * G_ + g)];
  }
  // 3. Layouts. The EP exchange: chunk (EP rank j, g) of ETP rank q lands at [g][j]. After the
  //    all-gather over ETP, chunk (q', g) (all EP sources) goes to [g][q'].
  st.recv_counts.assign(static_cast<size_t>(P * G_), 0);
  st.recv_offsets.assign(static_cast<size_t>(P * G_), 0);
  st.etp_rows.assign(static_cast<size_t>(Q), 0);
  st.etp_chunks.assign(static_cast<size_t>(Q * G_), 0);
  for (int64_t qq = 0; qq < Q; ++qq)
    for (int64_t pp = 0; pp < P; ++pp)
      for (int64_t g = 0; g < G_; ++g) {
        int64_t n = R[static_cast<size_t>((qq * P + pp) * G_ + g)];
        if (qq == q) st.recv_counts[static_cast<size_t>(pp * G_ + g)] = n;
        st.etp_rows[static_cast<size_t>(qq)] += n;
        st.etp_chunks[static_cast<size_t>(qq * G_ + g)] += n;
      }
  for (int64_t g = 0, row = 0; g < G_; ++g)
    for (int64_t pp = 0; pp < P; ++pp) {
      st.recv_offsets[static_cast<size_t>(pp * G_ + g)] = row;
      row += st.recv_counts[static_cast<size_t>(pp * G_ + g)];
    }
  st.N_recv = sum(st.recv_counts);
  st.N_g = sum(st.etp_rows);
  // Every EP rank's packed layout, for the exchange through shared segments: EP rank j (of my ETP
  // rank) packs the experts outside its own block, expert-major.
  st.peer_offsets.assign(static_cast<size_t>(P * G_), 0);
  st.max_packed = 0;
  for (int64_t m = 0; m < M; ++m) {
    if (etp_rank_of_[static_cast<size_t>(m)] != q) continue;
    const int64_t j = ep_rank_of_[static_cast<size_t>(m)];
    int64_t row = 0;
    for (int64_t e = 0; e < E_; ++e) {
      if (e / G_ == j) continue;
      if (e / G_ == p) st.peer_offsets[static_cast<size_t>(j * G_ + e % G_)] = row;
      row += C[static_cast<size_t>(m * E_ + e)];
    }
    st.max_packed = std::max(st.max_packed, row);
  }
  // The row map of the permute and of the combine (T, E) i32: route (t, e) → its row in [the packed rows of the other EP
  // ranks (n_left + n_right); this rank's (N_recv) rows in [local expert][EP source] order], where
  // the rows of my local expert g start at recv_offsets[p·G + g] (the expert's rows in token order,
  // as the permute put them).
  {
    const int64_t n_packed = st.n_left + st.n_right;
    std::vector<int64_t> row_offsets = st.packed_offsets;  // (E)
    for (int64_t g = 0; g < G_; ++g)
      row_offsets[static_cast<size_t>(lo + g)] = n_packed + st.recv_offsets[static_cast<size_t>(p * G_ + g)];
    st.row_id_map = Tensor::empty(routing_map.shape(), DType::i32, routing_map.device());
    ops::permute_index(routing_map, row_offsets, st.row_id_map);
  }
  MOE_CHECK_CODE(st.etp_rows[static_cast<size_t>(q)] == st.N_recv, ErrorCode::internal,
                 "AllToAllDispatcher: this rank receives ", st.N_recv, " rows over EP but the count table says ",
                 st.etp_rows[static_cast<size_t>(q)]);
  if (Q > 1) {
    for (int64_t g = 0; g < G_; ++g)
      for (int64_t qq = 0; qq < Q; ++qq) {
        st.sort_order.push_back(qq * G_ + g);
        st.sorted_chunks.push_back(st.etp_chunks[static_cast<size_t>(qq * G_ + g)]);
      }
    for (int64_t qq = 0; qq < Q; ++qq)
      for (int64_t g = 0; g < G_; ++g) st.unsort_order.push_back(g * Q + qq);
  }

  // 4. Move the rows and their probs.
  DispatchOutput out;
  out.tokens = forward_path(st, x, &probs, &out.probs);  // (N_g, H), (N_g)
  out.rows_per_expert.assign(static_cast<size_t>(G_), 0);
  for (int64_t s = 0; s < M; ++s)
    for (int64_t g = 0; g < G_; ++g) out.rows_per_expert[static_cast<size_t>(g)] += R[static_cast<size_t>(s * G_ + g)];
  if (sanitize::enabled()) check_conservation(st, routing_map, out);
  return out;
}

// MOE_SANITIZE: count conservation. Routes selected here = rows sent (N_loc); Σ over the EP group of
// rows sent = Σ of rows received (one all-reduce); rows received over ETP = Σ rows per local expert
// = the rows handed to the experts.
void AllToAllDispatcher::check_conservation(const State& st, const Tensor& routing_map, const DispatchOutput& out) {
  const std::vector<int64_t> routed = ops::routing_counts(routing_map).to(Device::cpu()).to_vector<int64_t>();
  const int64_t selected = std::accumulate(routed.begin(), routed.end(), int64_t(0));
  const int64_t per_expert = std::accumulate(out.rows_per_expert.begin(), out.rows_per_expert.end(), int64_t(0));
  Tensor sums = Tensor::from_vector(std::vector<int64_t>{st.N_local, st.N_recv}, {2});  // (2) i64: sent, received
  ep_->all_reduce(sums);
  const std::vector<int64_t> s = sums.to_vector<int64_t>();
  MOE_CHECK_CODE(selected == st.N_local && s[0] == s[1] && per_expert == st.N_g && out.tokens.size(0) == st.N_g,
                 ErrorCode::internal, "MOE_SANITIZE: AllToAllDispatcher lost or invented rows at ",
                 sanitize::where_str(), ": routes selected here ", selected, ", rows sent ", st.N_local,
                 "; over the EP group rows sent ", s[0], ", received ", s[1], "; rows per local expert sum to ",
                 per_expert, ", rows handed to the experts ", out.tokens.size(0), " (expected ", st.N_g, ")");
}

Tensor AllToAllDispatcher::combine(const Tensor& y, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::combine");
  Tensor own;                                // (N_recv, H) [local expert][EP source]
  Tensor back = reverse_path(st, y, own);    // (N_loc − own, H) packed
  Tensor out = Tensor::empty({st.row_id_map.size(0), y.size(1)}, y.dtype(), y.device());  // (T, H)
  ops::unpermute2(st.row_id_map, back, own, out);
  return out;
}

Tensor AllToAllDispatcher::combine_backward(const Tensor& dout, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::combine_backward");
  return forward_path(st, dout);  // (N_g, H)
}

void AllToAllDispatcher::dispatch_backward(const Tensor& drows, const Tensor& drow_probs, Tensor& dx,
                                           Tensor& dprobs, int64_t key) {
  const State& st = states_.find(key, "AllToAllDispatcher::dispatch_backward");
  Tensor own, own_dp, back_dp;  // (N_recv, H), (N_recv), (N_loc − own)
  Tensor back = reverse_path(st, drows, own, &drow_probs, &back_dp, &own_dp);  // (N_loc − own, H) packed
  ops::unpermute2(st.row_id_map, back, own, dx);
  ops::scatter_rows_to_map2(st.row_id_map, back_dp, own_dp, dprobs);
  states_.release(key);
}

}  // namespace moe
