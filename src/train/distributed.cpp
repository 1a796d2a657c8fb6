#include "moecore/distributed.h"

#include <algorithm>

#include "device/ops.h"

namespace moe {

TokenShard token_shard(const ProcessGroups& g, int64_t S, int64_t B) {
  const int64_t tp = g.tp().size(), cp = g.cp().size(), dp = g.dp().size();
  MOE_CHECK(S % (tp * cp) == 0, "token_shard: sequence length ", S, " is not divisible by tensor_model_parallel_size·"
            "context_parallel_size = ", tp * cp);
  MOE_CHECK(B % dp == 0, "token_shard: micro-batch size ", B, " is not divisible by the data-parallel size ", dp);
  TokenShard s;
  s.s_len = S / (tp * cp);
  s.s_begin = (g.cp().rank() * tp + g.tp().rank()) * s.s_len;
  s.b_len = B / dp;
  s.b_begin = g.dp().rank() * s.b_len;
  return s;
}

Tensor take_tokens(const Tensor& full, const TokenShard& sh) {
  MOE_CHECK(full.ndim() >= 2, "take_tokens: expected (S, B, ...), got ", full.desc());
  const int64_t S = full.size(0), B = full.size(1);
  const int64_t inner = S * B > 0 ? full.numel() / (S * B) : 0;
  MOE_CHECK(sh.s_begin + sh.s_len <= S && sh.b_begin + sh.b_len <= B, "take_tokens: shard out of range of ",
            full.desc());
  Shape shape = full.shape();
  shape[0] = sh.s_len;
  shape[1] = sh.b_len;
  Tensor out = Tensor::empty(shape, full.dtype(), full.device());
  Tensor src = full.view({S * B, inner});
  Tensor dst = out.view({sh.s_len * sh.b_len, inner});
  for (int64_t s = 0; s < sh.s_len; ++s) {
    Tensor rows = src.narrow((sh.s_begin + s) * B + sh.b_begin, sh.b_len);
    Tensor d = dst.narrow(s * sh.b_len, sh.b_len);
    d.copy_from(rows);
  }
  return out;
}

Tensor gather_tokens(const Tensor& local, const TokenShard& sh, int64_t S, int64_t B, Communicator& world) {
  MOE_CHECK(local.ndim() >= 2 && local.size(0) == sh.s_len && local.size(1) == sh.b_len,
            "gather_tokens: expected (", sh.s_len, ", ", sh.b_len, ", ...), got ", local.desc());
  const int n = world.size();
  const int64_t inner = sh.s_len * sh.b_len > 0 ? local.numel() / (sh.s_len * sh.b_len) : 0;
  // Everyone's shard geometry.
  Tensor geo = Tensor::from_vector(std::vector<int64_t>{sh.s_begin, sh.s_len, sh.b_begin, sh.b_len, inner}, {1, 5});
  Tensor geos = Tensor::empty({n, 5}, DType::i64);
  world.all_gather(geo, geos);
  std::vector<int64_t> G = geos.to_vector<int64_t>();
  std::vector<int64_t> rows(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) rows[static_cast<size_t>(r)] = G[r * 5 + 1] * G[r * 5 + 3];
  int64_t total = 0;
  for (int64_t v : rows) total += v;
  Tensor host = local.device().is_cpu() ? local : local.to(Device::cpu());
  Tensor all = Tensor::empty({total, inner}, local.dtype());
  world.all_gather_v(host.view({sh.s_len * sh.b_len, inner}), all, rows);
  Shape shape = local.shape();
  shape[0] = S;
  shape[1] = B;
  Tensor full = Tensor::zeros(shape, local.dtype());
  Tensor dst = full.view({S * B, inner});
  int64_t off = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t sb = G[r * 5], sl = G[r * 5 + 1], bb = G[r * 5 + 2], bl = G[r * 5 + 3];
    for (int64_t s = 0; s < sl; ++s) {
      Tensor d = dst.narrow((sb + s) * B + bb, bl);
      d.copy_from(all.narrow(off + s * bl, bl));
    }
    off += sl * bl;
  }
  return local.device().is_cpu() ? full : full.to(local.device());
}

namespace {
// Every rank's (canonical index, value) pairs of p's shard, assembled into the canonical f64 values;
// the lowest rank's replica wins. p null: this rank contributes nothing.
std::vector<double> gather_canonical_values(const std::string& name, const Shape& shape, const Parameter* p,
                                            bool use_grad, Communicator& world) {
  std::vector<double> vals;
  std::vector<int64_t> idx;
  if (p) {
    const Tensor& local = use_grad ? p->grad : p->value;
    MOE_CHECK(local.defined(), "gather_parameter: '", name, "' has no ", use_grad ? "gradient" : "value");
    Tensor host = local.device().is_cpu() ? local : local.to(Device::cpu());
    vals = ops::cast(host, DType::f64).to_vector<double>();
    idx = shard_canonical_indices(p->canonical_shape, p->shard);
  }
  const int n = world.size();
  Tensor counts = Tensor::empty({n}, DType::i64);
  world.all_gather(Tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(vals.size())}, {1}), counts);
  std::vector<int64_t> rows = counts.to_vector<int64_t>();
  int64_t total = 0;
  for (int64_t v : rows) total += v;
  Tensor all_vals = Tensor::empty({total}, DType::f64);
  Tensor all_idx = Tensor::empty({total}, DType::i64);
  world.all_gather_v(Tensor::from_vector(vals, {static_cast<int64_t>(vals.size())}), all_vals, rows);
  world.all_gather_v(Tensor::from_vector(idx, {static_cast<int64_t>(idx.size())}), all_idx, rows);
  std::vector<double> v = all_vals.to_vector<double>();
  std::vector<int64_t> ix = all_idx.to_vector<int64_t>();
  const int64_t numel = shape_numel(shape);
  std::vector<double> out(static_cast<size_t>(numel), 0.0);
  std::vector<char> seen(static_cast<size_t>(numel), 0);
  for (int64_t i = 0; i < total; ++i) {  // rank order: the lowest rank's replica wins
    size_t c = static_cast<size_t>(ix[static_cast<size_t>(i)]);
    if (!seen[c]) {
      out[c] = v[static_cast<size_t>(i)];
      seen[c] = 1;
    }
  }
  MOE_CHECK_CODE(std::all_of(seen.begin(), seen.end(), [](char s) { return s != 0; }), ErrorCode::internal,
                 "gather_parameter: the shards of '", name, "' do not cover ", shape_str(shape));
  return out;
}
}  // namespace

Tensor gather_parameter(const Parameter& p, bool use_grad, Communicator& world) {
  const Tensor& local = use_grad ? p.grad : p.value;
  Tensor canonical =
      Tensor::from_vector(gather_canonical_values(p.name, p.canonical_shape, &p, use_grad, world), p.canonical_shape);
  return local.dtype() == DType::f64 ? canonical : ops::cast(canonical, DType::f32);
}

Tensor gather_parameter(const std::string& name, const Shape& canonical_shape, const Parameter* p, bool use_grad,
                        Communicator& world) {
  Tensor canonical =
      Tensor::from_vector(gather_canonical_values(name, canonical_shape, p, use_grad, world), canonical_shape);
  return ops::cast(canonical, DType::f32);
}

void finalize_grads(const std::vector<Parameter*>& params, const ProcessGroups& g) {
  const double scale = 1.0 / static_cast<double>(g.dp_cp().size());
  for (Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    switch (p->grad_group) {
      case GradGroup::router:
      case GradGroup::sequence_parallel:
        g.tp().all_reduce(p->grad);
        g.dp_cp().all_reduce(p->grad);
        break;
      case GradGroup::dense:
        g.dp_cp().all_reduce(p->grad);
        break;
      case GradGroup::expert:
        g.edp().all_reduce(p->grad);
        break;
    }
    if (scale != 1.0) ops::axpby(0.0, p->grad, scale, p->grad);
  }
}

}  // namespace moe
