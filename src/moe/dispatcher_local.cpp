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

DispatchOutput LocalDispatcher::dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key) {
  LocalPermutation p = make_local_permutation(routing_map);
  State& st = states_.start(key);
  st.row_id_map = p.row_id_map;
  st.N = p.num_rows;
  DispatchOutput out;
  out.tokens = Tensor::empty({st.N, x.size(1)}, x.dtype(), x.device());  // (N, H)
  out.probs = Tensor::empty({st.N}, probs.dtype(), x.device());          // (N)
  ops::permute(st.row_id_map, x, out.tokens, &probs, &out.probs);
  out.rows_per_expert = std::move(p.counts);
  return out;
}

Tensor LocalDispatcher::combine(const Tensor& y, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::combine");
  Tensor out = Tensor::empty({st.row_id_map.size(0), y.size(1)}, y.dtype(), y.device());  // (T, H)
  ops::unpermute(st.row_id_map, y, out);
  return out;
}

Tensor LocalDispatcher::combine_backward(const Tensor& dout, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::combine_backward");
  Tensor dy = Tensor::empty({st.N, dout.size(1)}, dout.dtype(), dout.device());  // (N, H)
  ops::permute(st.row_id_map, dout, dy);
  return dy;
}

void LocalDispatcher::dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x,
                                        Tensor& grad_probs, int64_t key) {
  const State& st = states_.find(key, "LocalDispatcher::dispatch_backward");
  ops::unpermute(st.row_id_map, grad_rows, grad_x);                 // (T, H)
  ops::scatter_rows_to_map(st.row_id_map, grad_row_probs, grad_probs);  // (T, E)
  states_.release(key);
}

}  // namespace moe
