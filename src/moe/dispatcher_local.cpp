#include <algorithm>

#include "device/ops.h"
#include "moe/dispatcher.h"

namespace moe {

LocalPermutation make_local_permutation(const Tensor& routing_map) {
  LocalPermutation p;
  Tensor counts = ops::routing_counts(routing_map);  // (E) i64
  p.counts = counts.to_vector<int64_t>();
  std::vector<int64_t> offsets(p.counts.size());
  for (size_t e = 0; e < p.counts.size(); ++e) {
    offsets[e] = p.num_rows;
    p.num_rows += p.counts[e];
  }
  p.row_id_map = Tensor::empty(routing_map.shape(), DType::i32, routing_map.device());
  ops::permute_index(routing_map, offsets, p.row_id_map);
  return p;
}

DevicePermutation make_device_permutation(const Tensor& routing_map, int64_t routes_per_token) {
  const int64_t T = routing_map.size(0), E = routing_map.size(1);
  DevicePermutation p;
  p.row_offsets = ops::row_offsets(ops::routing_counts(routing_map));  // (E+1) i64
  p.max_rows = T * (routes_per_token > 0 ? std::min(routes_per_token, E) : E);
  p.row_id_map = Tensor::empty(routing_map.shape(), DType::i32, routing_map.device());  // (T, E) i32
  ops::permute_index_dev(routing_map, p.row_offsets, p.row_id_map);
  return p;
}

DispatchOutput permute_for_experts(const Tensor& x, const Tensor& probs, const Tensor& routing_map, bool device_counts,
                                   int64_t routes_per_token, Tensor& row_id_map, int64_t& N, Tensor& num_rows) {
  DispatchOutput out;
  if (device_counts) {  // the counts stay on the device: N_max rows, offsets for the experts
    DevicePermutation p = make_device_permutation(routing_map, routes_per_token);
    row_id_map = p.row_id_map;
    N = p.max_rows;
    num_rows = p.num_rows();
    out.row_offsets = p.row_offsets;
  } else {
    LocalPermutation p = make_local_permutation(routing_map);
    row_id_map = p.row_id_map;
    N = p.num_rows;
    num_rows = Tensor();
    out.rows_per_expert = std::move(p.counts);
  }
  out.tokens = Tensor::empty({N, x.size(1)}, x.dtype(), x.device());  // (N, H)
  out.probs = Tensor::empty({N}, probs.dtype(), x.device());          // (N)
  if (device_counts)
    ops::permute_dev(row_id_map, x, out.tokens, &probs, &out.probs, num_rows);
  else
    ops::permute(row_id_map, x, out.tokens, &probs, &out.probs);
  return out;
}

Tensor permute_rows(const Tensor& row_id_map, const Tensor& in, int64_t N, const Tensor& num_rows) {
  Tensor out = Tensor::empty({N, in.size(1)}, in.dtype(), in.device());  // (N, H)
  if (num_rows.defined())
    ops::permute_dev(row_id_map, in, out, nullptr, nullptr, num_rows);
  else
    ops::permute(row_id_map, in, out);
  return out;
}

int64_t row_bytes(const Tensor& t) {
  int64_t per = 1;
  for (int64_t d = 1; d < t.ndim(); ++d) per *= t.size(d);
  return per * static_cast<int64_t>(dtype_size(t.dtype()));
}

Tensor rows_like(const Tensor& t, int64_t rows) {
  Shape s = t.shape();
  s[0] = rows;
  return Tensor::empty(s, t.dtype(), t.device());
}

// In the device-count mode the counts stay on the device: rows are allocated for N_max = T · min(k,
// E) and the experts read their row offsets from device memory (docs/gpu.md).
DispatchOutput LocalDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key) {
  State& st = states_.start(key);
  return permute_for_experts(x, probs, routing_map, device_counts_, routes_per_token_, st.row_id_map, st.N,
                             st.num_rows);
}

Tensor LocalDispatcher::combine(const Tensor& y, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::combine");
  Tensor out = Tensor::empty({st.row_id_map.size(0), y.size(1)}, y.dtype(), y.device());  // (T, H)
  ops::unpermute(st.row_id_map, y, out);
  return out;
}

Tensor LocalDispatcher::combine_backward(const Tensor& dout, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::combine_backward");
  return permute_rows(st.row_id_map, dout, st.N, st.num_rows);  // (N, H)
}

void LocalDispatcher::dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x,
                                        Tensor& grad_probs, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::dispatch_backward");
  ops::unpermute(st.row_id_map, grad_rows, grad_x);                 // (T, H)
  ops::scatter_rows_to_map(st.row_id_map, grad_row_probs, grad_probs);  // (T, E)
  states_.release(key);
}

}  // namespace moe
