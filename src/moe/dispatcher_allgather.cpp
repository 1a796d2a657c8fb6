// Allgather token dispatcher over ETP×EP (DESIGN.md §7).
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

Tensor AllGatherDispatcher::gather_rows(const Tensor& local) {
  int64_t total = 0;
  for (int64_t r : rank_rows_) total += r;
  Tensor out = rows_like(local, total);
  group_->all_gather_v(local, out, rank_rows_);
  const int64_t rb = row_bytes(local);
  traffic_.bytes_sent += local.size(0) * rb * (group_->size() - 1);
  traffic_.bytes_received += (total - local.size(0)) * rb;
  ++traffic_.calls;
  return out;
}

Tensor AllGatherDispatcher::scatter_rows(const Tensor& global) {
  int64_t mine = rank_rows_[static_cast<size_t>(group_->rank())];
  Tensor out = rows_like(global, mine);
  group_->reduce_scatter_v(global, out, rank_rows_);
  const int64_t rb = row_bytes(global);
  traffic_.bytes_sent += (global.size(0) - mine) * rb;
  traffic_.bytes_received += mine * rb * (group_->size() - 1);
  ++traffic_.calls;
  return out;
}

DispatchOutput AllGatherDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map) {
  const int64_t T = x.size(0), H = x.size(1);
  E_ = routing_map.size(1);
  MOE_CHECK(first_ + G_ <= E_, "AllGatherDispatcher: local experts [", first_, ", ", first_ + G_, ") exceed ", E_,
            " experts");
  // Tokens per rank (ranks may hold different numbers, zero included).
  Tensor t_local = Tensor::from_vector(std::vector<int64_t>{T}, {1});
  Tensor t_all = Tensor::empty({group_->size()}, DType::i64);
  group_->all_gather(t_local, t_all);
  rank_rows_ = t_all.to_vector<int64_t>();

  Tensor xg = gather_rows(x);                     // (T_g, H)
  Tensor pg = gather_rows(probs);                 // (T_g, E)
  Tensor mg = gather_rows(routing_map);           // (T_g, E) u8
  Tensor local_map = ops::gather_columns(mg, first_, G_);    // (T_g, G)
  Tensor local_probs = ops::gather_columns(pg, first_, G_);  // (T_g, G)

  LocalPermutation p = make_local_permutation(local_map);
  row_id_map_ = p.row_id_map;
  N_ = p.num_rows;
  DispatchOutput out;
  out.tokens = Tensor::empty({N_, H}, x.dtype(), x.device());   // (N, H)
  out.probs = Tensor::empty({N_}, probs.dtype(), x.device());   // (N)
  ops::permute(row_id_map_, xg, out.tokens, &local_probs, &out.probs);
  out.rows_per_expert = std::move(p.counts);
  return out;
}

Tensor AllGatherDispatcher::combine(const Tensor& y) {
  Tensor yg = Tensor::empty({row_id_map_.size(0), y.size(1)}, y.dtype(), y.device());  // (T_g, H)
  ops::unpermute(row_id_map_, y, yg);
  return scatter_rows(yg);  // (T, H)
}

Tensor AllGatherDispatcher::combine_backward(const Tensor& dout) {
  Tensor dg = gather_rows(dout);                                          // (T_g, H)
  Tensor dy = Tensor::empty({N_, dout.size(1)}, dout.dtype(), dout.device());  // (N, H)
  ops::permute(row_id_map_, dg, dy);
  return dy;
}

void AllGatherDispatcher::dispatch_backward(const Tensor& drows, const Tensor& drow_probs, Tensor& dx,
                                            Tensor& dprobs) {
  const int64_t Tg = row_id_map_.size(0);
  Tensor dxg = Tensor::empty({Tg, drows.size(1)}, drows.dtype(), drows.device());  // (T_g, H)
  ops::unpermute(row_id_map_, drows, dxg);
  dx.copy_from(scatter_rows(dxg));
  Tensor dp_local = Tensor::empty({Tg, G_}, drow_probs.dtype(), drows.device());  // (T_g, G)
  ops::scatter_rows_to_map(row_id_map_, drow_probs, dp_local);
  Tensor dpg = ops::scatter_columns(dp_local, first_, E_);  // (T_g, E)
  dprobs.copy_from(scatter_rows(dpg));
}

}  // namespace moe
