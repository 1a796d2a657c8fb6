// Allgather token dispatcher over ETP×EP (docs/moe.md).
//
//   forward                                        backward
//   x (T, H), probs (T, E), map (T, E)             dx (T, H), dprobs (T, E)
//   all-gather over ETP×EP → (T_g, ·)              reduce-scatter (sum) over ETP×EP
//   local columns → map, probs (T_g, G)            scatter columns → dprobs (T_g, E)
//   permute → rows (N, H), row probs (N)           unpermute rows, scatter row probs
//   ...experts...                                  ...experts backward...
//   unpermute → (T_g, H)                           permute ← (T_g, H)
//   reduce-scatter (sum) → out (T, H)              all-gather ← dout (T, H)
#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moecore/comm.h"

namespace moe {

AllGatherDispatcher::AllGatherDispatcher(std::shared_ptr<Communicator> group, int64_t first_expert,
                                         int64_t num_local_experts)
    : group_(std::move(group)), first_(first_expert), G_(num_local_experts) {
  MOE_CHECK(group_ != nullptr, "AllGatherDispatcher: null ETP×EP group");
  MOE_CHECK(first_ >= 0 && G_ >= 1, "AllGatherDispatcher: bad local experts [", first_, ", +", G_, ")");
}

Tensor AllGatherDispatcher::gather_rows(const State& st, const Tensor& local) {
  int64_t total = 0;
  for (int64_t r : st.rank_rows) total += r;
  Tensor out = rows_like(local, total);
  group_->all_gather_v(local, out, st.rank_rows);
  const int64_t rb = row_bytes(local);
  traffic_.bytes_sent += local.size(0) * rb * (group_->size() - 1);
  traffic_.bytes_received += (total - local.size(0)) * rb;
  ++traffic_.calls;
  return out;
}

Tensor AllGatherDispatcher::scatter_rows(const State& st, const Tensor& global) {
  int64_t mine = st.rank_rows[static_cast<size_t>(group_->rank())];
  Tensor out = rows_like(global, mine);
  group_->reduce_scatter_v(global, out, st.rank_rows);
  const int64_t rb = row_bytes(global);
  traffic_.bytes_sent += (global.size(0) - mine) * rb;
  traffic_.bytes_received += mine * rb * (group_->size() - 1);
  ++traffic_.calls;
  return out;
}

DispatchOutput AllGatherDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map,
                                             int64_t key) {
  const int64_t T = x.size(0);
  const int64_t E = routing_map.size(1);
  MOE_CHECK(first_ + G_ <= E, "AllGatherDispatcher: local experts [", first_, ", ", first_ + G_, ") exceed ", E,
            " experts");
  State& st = states_.start(key);
  st.E = E;
  // Tokens per rank (ranks may hold different numbers, zero included): shapes the host knows,
  // exchanged in host tensors (CPU memory on every back end), so no device data is read.
  Tensor t_local = Tensor::from_vector(std::vector<int64_t>{T}, {1});  // (1) i64 host
  Tensor t_all = Tensor::empty({group_->size()}, DType::i64);          // (group) i64 host
  group_->all_gather(t_local, t_all);
  const int64_t* rows = t_all.data_as<int64_t>();
  st.rank_rows.assign(rows, rows + group_->size());

  Tensor xg = gather_rows(st, x);                     // (T_g, H)
  Tensor pg = gather_rows(st, probs);                 // (T_g, E)
  Tensor mg = gather_rows(st, routing_map);           // (T_g, E) u8
  Tensor local_map = ops::gather_columns(mg, first_, G_);    // (T_g, G)
  Tensor local_probs = ops::gather_columns(pg, first_, G_);  // (T_g, G)

  // Rows (N, H), row probs (N); in the device-count mode the counts stay on the device: rows for
  // N_max = T_g · min(k, G), offsets read by the experts.
  return permute_for_experts(xg, local_probs, local_map, device_counts_, routes_per_token_, st.row_id_map, st.N,
                             st.num_rows);
}

Tensor AllGatherDispatcher::combine(const Tensor& y, int64_t key) {
  const State& st = states_.find(key, "AllGatherDispatcher::combine");
  Tensor yg = Tensor::empty({st.row_id_map.size(0), y.size(1)}, y.dtype(), y.device());  // (T_g, H)
  ops::unpermute(st.row_id_map, y, yg);
  return scatter_rows(st, yg);  // (T, H)
}

Tensor AllGatherDispatcher::combine_backward(const Tensor& dout, int64_t key) {
  const State& st = states_.find(key, "AllGatherDispatcher::combine_backward");
  Tensor dg = gather_rows(st, dout);                                          // (T_g, H)
  return permute_rows(st.row_id_map, dg, st.N, st.num_rows);  // (N, H)
}

void AllGatherDispatcher::dispatch_backward(const Tensor& drows, const Tensor& drow_probs, Tensor& dx,
                                            Tensor& dprobs, int64_t key) {
  const State& st = states_.find(key, "AllGatherDispatcher::dispatch_backward");
  const int64_t Tg = st.row_id_map.size(0);
  Tensor dxg = Tensor::empty({Tg, drows.size(1)}, drows.dtype(), drows.device());  // (T_g, H)
  ops::unpermute(st.row_id_map, drows, dxg);
  dx.copy_from(scatter_rows(st, dxg));
  Tensor dp_local = Tensor::empty({Tg, G_}, drow_probs.dtype(), drows.device());  // (T_g, G)
  ops::scatter_rows_to_map(st.row_id_map, drow_probs, dp_local);
  Tensor dpg = ops::scatter_columns(dp_local, first_, st.E);  // (T_g, E)
  dprobs.copy_from(scatter_rows(st, dpg));
  states_.release(key);
}

}  // namespace moe
