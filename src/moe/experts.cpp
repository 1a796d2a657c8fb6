// Grouped-GEMM experts (docs/moe.md): fc1 → activation × prob → fc2 over rows grouped by local
// expert, and the backward read in reverse.
//
// Saved slots (names = slot prefix + ...), with what rebuilds them under the recompute policy:
//   fc1_input   x (N, H)           no regenerate function exists here (x comes from the dispatcher),
//                                  so it is keep or offload; under a recompute rule the store keeps
//                                  it (ActivationStore::saved_policy says so).
//   probs       (N) prob dtype     likewise keep or offload.
//   fc1_output  h (N, F1)          fc1 of fc1_input
//   act_output  a (N, F)           act(fc1_output) · probs
// Regeneration reruns the same kernels on the same inputs, so every policy gives the same bits.
//
// Under ETP each rank holds F/etp of every expert's width: y, dx and dprobs are then partial sums
// over the ETP ranks (each covers its slice of F) and the dispatcher reduces them (its
// reduce-scatter of y and dx; dprobs by the same reduction of the prob gradients). Parameter
// gradients are complete per shard. Row counts of a pending forward live in the module under the
// forward's store: several micro-batches (each with its own store) may be in flight at once.
#include "moecore/experts.h"

#include "device/ops.h"
#include "moe/module_util.h"
#include "moecore/error.h"

namespace moe {

GroupedExperts::GroupedExperts(const MoEConfig& config, Device device, ExpertsSharding sharding,
                               const std::string& slot_prefix, const std::string& param_prefix)
    : config_(config), device_(device), prefix_(slot_prefix) {
  const char* who = "GroupedExperts";
  const int64_t E = config.num_moe_experts, H = config.hidden_size, F = config.moe_ffn_hidden_size;
  MOE_CHECK(E > 0, who, ": num_moe_experts must be > 0, got ", E);
  MOE_CHECK(H > 0, who, ": hidden_size must be > 0, got ", H);
  MOE_CHECK(F > 0, who, ": moe_ffn_hidden_size must be > 0, got ", F);
  activation_from_config(config, who);
  G_ = sharding.num_local_experts > 0 ? sharding.num_local_experts : E;
  MOE_CHECK(sharding.num_local_experts >= 0, who, ": num_local_experts must be >= 0, got ", sharding.num_local_experts);
  MOE_CHECK(sharding.first_expert >= 0 && sharding.first_expert + G_ <= E, who, ": local experts [",
            sharding.first_expert, ", ", sharding.first_expert + G_, ") do not fit in ", E, " experts");
  MOE_CHECK(sharding.etp_size >= 1 && sharding.etp_rank >= 0 && sharding.etp_rank < sharding.etp_size, who,
            ": etp_rank must be in [0, etp_size=", sharding.etp_size, "), got ", sharding.etp_rank);
  MOE_CHECK(F % sharding.etp_size == 0, who, ": moe_ffn_hidden_size ", F, " is not divisible by the expert tensor "
            "parallel size ", sharding.etp_size);
  F_ = F / sharding.etp_size;
  const bool glu = config.gated_linear_unit;
  const int64_t F1 = config.fc1_out_features(), F1_local = glu ? 2 * F_ : F_;
  const DType dt = dtype_from_name(config.params_dtype);
  MOE_CHECK(dt == DType::f32 || dt == DType::f64 || dt == DType::bf16, who,
            ": params_dtype must be fp32, fp64 or bf16, got '", config.params_dtype, "'");
  const int64_t f_start = sharding.etp_rank * F_;
  // fc1 (E, F1, H): experts on dim 0; output rows on dim 1, each GLU half split alike.
  fc1_ = make_parameter(param_prefix + "experts.linear_fc1.weight", {E, F1, H},
                        {DimShard{0, sharding.first_expert, G_, false}, DimShard{1, f_start, F1_local, glu}}, dt,
                        device, config.seed, config.init_method_std, GradGroup::expert);
  // fc2 (E, H, F): experts on dim 0; input columns on dim 2.
  fc2_ = make_parameter(param_prefix + "experts.linear_fc2.weight", {E, H, F},
                        {DimShard{0, sharding.first_expert, G_, false}, DimShard{2, f_start, F_, false}}, dt,
                        device, config.seed, config.init_method_std, GradGroup::expert);
}

namespace {
// The grouped GEMM and the activation over host counts or device offsets (the host-sync-free path).
template <class Rows>
void group_gemm(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C, const Rows& r,
                bool accumulate = false) {
  if (r.offsets.defined())
    ops::grouped_gemm_dev(mode, A, B, C, r.offsets, accumulate);
  else
    ops::grouped_gemm(mode, A, B, C, r.host, accumulate);
}
template <class Rows>
Tensor total_rows(const Rows& r) {  // (1) i64 device view of N
  return r.offsets.narrow(r.offsets.numel() - 1, 1);
}
}  // namespace

Tensor GroupedExperts::forward(const Tensor& x, const std::vector<int64_t>& rows, const Tensor& probs,
                               ActivationStore& store) {
  const char* who = "GroupedExperts::forward";
  MOE_CHECK(static_cast<int64_t>(rows.size()) == G_, who, ": expected row counts for ", G_, " local experts, got ",
            rows.size());
  int64_t N = 0;
  for (int64_t g = 0; g < G_; ++g) {
    MOE_CHECK(rows[g] >= 0, who, ": local expert ", g, " has a negative row count ", rows[g]);
    N += rows[g];
  }
  const int64_t H = config_.hidden_size;
  MOE_CHECK(x.defined() && x.ndim() == 2 && x.size(1) == H, who, ": x must be (N, H=", H, "), got ", x.desc());
  MOE_CHECK(x.size(0) == N, who, ": x has ", x.size(0), " rows but the expert row counts sum to ", N);
  return forward_rows(x, Rows{rows, Tensor(), N}, probs, store);
}

Tensor GroupedExperts::forward(const Tensor& x, const Tensor& row_offsets, const Tensor& probs,
                               ActivationStore& store) {
  const char* who = "GroupedExperts::forward";
  MOE_CHECK(row_offsets.defined() && row_offsets.dtype() == DType::i64 && row_offsets.ndim() == 1 &&
                row_offsets.numel() == G_ + 1 && row_offsets.device() == device_,
            who, ": row_offsets must be (G+1=", G_ + 1, ") i64 on ", device_.str(), ", got ",
            row_offsets.defined() ? row_offsets.desc() : std::string("an undefined tensor"));
  const int64_t H = config_.hidden_size;
  MOE_CHECK(x.defined() && x.ndim() == 2 && x.size(1) == H, who, ": x must be (N_max, H=", H, "), got ", x.desc());
  return forward_rows(x, Rows{{}, row_offsets, x.size(0)}, probs, store);
}

Tensor GroupedExperts::forward_rows(const Tensor& x, const Rows& rows, const Tensor& probs, ActivationStore& store) {
  const char* who = "GroupedExperts::forward";
  const int64_t H = config_.hidden_size, N = rows.rows;
  const DType dt = fc1_.value.dtype(), pdt = ops::prob_dtype_for(dt);
  const bool glu = config_.gated_linear_unit;
  const Activation act = activation_from_config(config_, who);
  x.check_dtype(dt, "GroupedExperts::forward: x");
  probs.check_shape({N}, "GroupedExperts::forward: probs");
  probs.check_dtype(pdt, "GroupedExperts::forward: probs");
  MOE_CHECK(x.device() == device_ && probs.device() == device_, who, ": inputs must be on ", device_.str(),
            ", got x ", x.desc(), ", probs ", probs.desc());
  rows_[&store] = rows;  // for the backward of this forward (several may be pending, one per store)

  const std::string s_x = prefix_ + "fc1_input", s_p = prefix_ + "probs", s_h = prefix_ + "fc1_output",
                    s_a = prefix_ + "act_output";
  auto fc1 = [this, dt](const Tensor& in, const Rows& r) {
    Tensor h = Tensor::empty({in.size(0), fc1_.value.size(1)}, dt, device_);  // (N, F1)
    group_gemm(GroupedGemmMode::fwd, in, fc1_.value, h, r);
    return h;
  };
  auto act_fwd = [this, dt, glu, act, rows](const Tensor& h, const Tensor& p) {
    Tensor a = Tensor::empty({h.size(0), F_}, dt, device_);  // (N, F)
    if (rows.offsets.defined())
      ops::act_fwd_dev(act, glu, h, &p, a, total_rows(rows));
    else
      ops::act_fwd(act, glu, h, &p, a);
    return a;
  };

  Tensor h = fc1(x, rows);       // (N, F1)
  Tensor a = act_fwd(h, probs);  // (N, F)
  Tensor y = Tensor::empty({N, H}, dt, device_);  // (N, H)
  group_gemm(GroupedGemmMode::fwd, a, fc2_.value, y, rows);

  store.save(s_x, x);
  store.save(s_p, probs);
  store.save(s_h, h, [fc1, &store, s_x, rows] { return fc1(store.get(s_x), rows); });
  store.save(s_a, a, [act_fwd, &store, s_h, s_p] { return act_fwd(store.get(s_h), store.get(s_p)); });
  return y;
}

void GroupedExperts::backward(const Tensor& dy, Tensor& dx, Tensor& dprobs, ActivationStore& store) {
  const char* who = "GroupedExperts::backward";
  const std::string s_x = prefix_ + "fc1_input", s_p = prefix_ + "probs", s_h = prefix_ + "fc1_output",
                    s_a = prefix_ + "act_output";
  MOE_CHECK(store.has(s_a), who, ": no saved forward in the store (slot '", s_a, "' missing): call forward first");
  const int64_t H = config_.hidden_size;
  const DType dt = fc1_.value.dtype(), pdt = ops::prob_dtype_for(dt);
  const bool glu = config_.gated_linear_unit;
  const Activation act = activation_from_config(config_, who);
  auto rit = rows_.find(&store);
  MOE_CHECK(rit != rows_.end(), who, ": no pending forward with this store (backward called twice?)");
  const Rows rows = rit->second;  // released at the end (a failed check leaves it pending)
  const int64_t N = rows.rows;
  dy.check_shape({N, H}, "GroupedExperts::backward: dy");
  dy.check_dtype(dt, "GroupedExperts::backward: dy");
  if (!dx.defined()) dx = Tensor::empty({N, H}, dt, device_);
  dx.check_shape({N, H}, "GroupedExperts::backward: dx");
  dx.check_dtype(dt, "GroupedExperts::backward: dx");
  if (!dprobs.defined()) dprobs = Tensor::empty({N}, pdt, device_);
  dprobs.check_shape({N}, "GroupedExperts::backward: dprobs");
  dprobs.check_dtype(pdt, "GroupedExperts::backward: dprobs");

  // Buffers are reused once dead, so the backward holds at most one (N, F1) and one (N, F) tensor
  // beyond the saved slots: da takes a's buffer after dW2 has read a; dh takes h's buffer (act_bwd
  // allows din = in on every backend: each element is read before it is written, by the same
  // thread on CUDA); dx may be dy's buffer (the caller's choice): dy is last read before dx is
  // written.

  // fc2: dW2 += dyᵀ a, da = dy · W2
  store.prefetch(s_h);
  Tensor da = store.get(s_a);                           // a (N, F), then da
  group_gemm(GroupedGemmMode::wgrad, dy, da, fc2_.grad, rows, /*accumulate=*/true);
  store.drop(s_a);
  group_gemm(GroupedGemmMode::dgrad, dy, fc2_.value, da, rows);

  // activation × prob: dh, dprobs
  Tensor h = store.get(s_h);                            // (N, F1)
  Tensor p = store.get(s_p);                            // (N)
  Tensor dh = h;                                        // (N, F1), in place
  if (rows.offsets.defined())
    ops::act_bwd_dev(act, glu, h, &p, da, dh, &dprobs, total_rows(rows));
  else
    ops::act_bwd(act, glu, h, &p, da, dh, &dprobs);
  store.drop(s_h);
  store.drop(s_p);
  h = Tensor();
  da = Tensor();

  // fc1: dW1 += dhᵀ x, dx = dh · W1
  Tensor x = store.get(s_x);                            // (N, H)
  group_gemm(GroupedGemmMode::wgrad, dh, x, fc1_.grad, rows, /*accumulate=*/true);
  group_gemm(GroupedGemmMode::dgrad, dh, fc1_.value, dx, rows);
  store.drop(s_x);
  rows_.erase(&store);
}

}  // namespace moe
