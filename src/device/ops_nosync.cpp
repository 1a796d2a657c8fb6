// Tensor-level wrappers of the host-sync-free path's ops (kernels/ops.h, docs/gpu.md): sizes and
// loss values stay in device tensors, so none of these reads anything on the host.
#include "device/ops.h"
#include "device/ops_check.h"

namespace moe::ops {

namespace {
// A (1) i64 device scalar, or (G+1) i64 offsets, on `ref`'s device.
void need_i64(const char* op, const char* name, const Tensor& t, int64_t numel, const Tensor& ref) {
  need_defined(op, name, t);
  MOE_CHECK(t.dtype() == DType::i64 && t.ndim() == 1 && t.numel() == numel, op, ": '", name, "' must be (", numel,
            ") i64, got ", t.desc());
  same_device(op, ref, {&t});
}
// MOE_SANITIZE: the rows in use of a bound (N_max, ...) tensor: entry `index` of a device i64
// tensor (a host read, under the sanitizer only).
int64_t used_rows(const Tensor& counts, int64_t index) {
  return counts.to(Device::cpu()).to_vector<int64_t>()[static_cast<size_t>(index)];
}
}  // namespace

Tensor row_offsets(const Tensor& counts) {
  const char* op = "row_offsets";
  need_defined(op, "counts", counts);
  const int64_t G = counts.numel();
  need_i64(op, "counts", counts, G, counts);
  Tensor offsets = Tensor::empty({G + 1}, DType::i64, counts.device());  // (G+1) i64
  RowOffsetsArgs a;
  a.G = G;
  a.counts = counts.data_as<int64_t>();
  a.offsets = offsets.data_as<int64_t>();
  need(table(counts.device()).row_offsets, counts.device(), op)(a, exec_ctx(counts.device()));
  return offsets;
}

void grouped_gemm_dev(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C, const Tensor& offsets,
                      bool accumulate) {
  const char* op = "grouped_gemm_dev";
  need_2d(op, "A", A);
  need_float(op, "A", A);
  MOE_CHECK(A.dtype() == B.dtype() && A.dtype() == C.dtype(), op, ": dtypes differ: A ", A.desc(), ", B ", B.desc(),
            ", C ", C.desc());
  same_device(op, A, {&B, &C});
  need_defined(op, "row_offsets", offsets);
  const int64_t G = offsets.numel() - 1, M = A.size(0);
  need_i64(op, "row_offsets", offsets, G + 1, A);
  MOE_CHECK(G >= 1, op, ": row_offsets needs G+1 >= 2 entries, got ", offsets.desc());
  int64_t N = 0, K = 0;
  if (mode == GroupedGemmMode::wgrad) {
    need_2d(op, "B", B);
    N = A.size(1);
    K = B.size(1);
    B.check_shape({M, K}, "grouped_gemm_dev wgrad: B (the row bound of A)");
    C.check_shape({G, N, K}, "grouped_gemm_dev wgrad: C");
  } else {
    MOE_CHECK(B.ndim() == 3 && B.size(0) == G, op, ": B must be (G=", G, ", N, K), got ", B.desc());
    N = B.size(1);
    K = B.size(2);
    const bool fwd = mode == GroupedGemmMode::fwd;
    A.check_shape({M, fwd ? K : N}, fwd ? "grouped_gemm_dev fwd: A" : "grouped_gemm_dev dgrad: A");
    C.check_shape({M, fwd ? N : K}, fwd ? "grouped_gemm_dev fwd: C" : "grouped_gemm_dev dgrad: C");
  }
  GroupedGemmDevArgs d;
  d.base = grouped_gemm_args(mode, A, B, C, G, M, N, K, accumulate);
  d.row_offsets = offsets.data_as<int64_t>();
  need(table(A.device()).grouped_gemm_dev, A.device(), op)(d, exec_ctx(A.device()));
  if (sanitize::enabled()) {
    const int64_t n = used_rows(offsets, G);  // rows past n are a bound, not data
    const Tensor An = A.narrow(0, n), Bn = mode == GroupedGemmMode::wgrad ? B.narrow(0, n) : B;
    const Tensor Cn = mode == GroupedGemmMode::wgrad ? C : C.narrow(0, n);
    sanitize::check_op(op, {{"C", &Cn}}, {{"A", &An}, {"B", &Bn}});
  }
}

void permute_index_dev(const Tensor& map, const Tensor& offsets, Tensor& row_id_map) {
  const char* op = "permute_index_dev";
  need_2d(op, "routing_map", map);
  map.check_dtype(DType::u8, "permute_index_dev: routing_map");
  const int64_t T = map.size(0), E = map.size(1);
  need_defined(op, "row_offsets", offsets);
  MOE_CHECK(offsets.dtype() == DType::i64 && offsets.ndim() == 1 && offsets.numel() >= E, op,
            ": row_offsets must be (>= ", E, ") i64, got ", offsets.desc());
  row_id_map.check_shape({T, E}, "permute_index_dev: row_id_map");
  row_id_map.check_dtype(DType::i32, "permute_index_dev: row_id_map");
  same_device(op, map, {&offsets, &row_id_map});
  PermuteIndexArgs a;
  a.T = T;
  a.E = E;
  a.routing_map = map.data_as<uint8_t>();
  // The CPU kernel reads the offsets as host memory, which CPU device memory is; other back ends
  // take them from device memory (their kernels never read expert_offsets_host when it is null).
  a.expert_offsets_host = map.device().is_cpu() ? offsets.data_as<int64_t>() : nullptr;
  a.expert_offsets = offsets.data_as<int64_t>();
  a.row_id_map = row_id_map.data_as<int32_t>();
  need(table(map.device()).permute_index, map.device(), op)(a, exec_ctx(map.device()));
}

void permute_dev(const Tensor& rid, const Tensor& in, Tensor& out, const Tensor* probs, Tensor* out_probs,
                 const Tensor& num_rows) {
  const char* op = "permute_dev";
  PermuteDevArgs d;
  d.base = permute_args(op, rid, in, out, probs, out_probs);
  need_i64(op, "num_rows", num_rows, 1, rid);
  d.num_rows = num_rows.data_as<int64_t>();
  need(table(in.device()).permute_dev, in.device(), op)(d, exec_ctx(in.device()));
}

void act_fwd_dev(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, Tensor& out,
                 const Tensor& num_rows) {
  const char* op = "act_fwd_dev";
  ActFwdDevArgs d;
  d.base = act_fwd_args(op, act, glu, in, row_scale, out);
  need_i64(op, "num_rows", num_rows, 1, in);
  d.num_rows = num_rows.data_as<int64_t>();
  need(table(in.device()).act_fwd_dev, in.device(), op)(d, exec_ctx(in.device()));
  if (sanitize::enabled()) {
    const int64_t n = used_rows(num_rows, 0);
    const Tensor on = out.narrow(0, n), inn = in.narrow(0, n);
    sanitize::check_op(op, {{"out", &on}}, {{"in", &inn}});
  }
}

void act_bwd_dev(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, const Tensor& dout, Tensor& din,
                 Tensor* drow_scale, const Tensor& num_rows) {
  const char* op = "act_bwd_dev";
  ActBwdDevArgs d;
  d.base = act_bwd_args(op, act, glu, in, row_scale, dout, din, drow_scale);
  need_i64(op, "num_rows", num_rows, 1, in);
  d.num_rows = num_rows.data_as<int64_t>();
  need(table(in.device()).act_bwd_dev, in.device(), op)(d, exec_ctx(in.device()));
  if (sanitize::enabled()) {
    const int64_t n = used_rows(num_rows, 0);
    const Tensor dn = din.narrow(0, n), inn = in.narrow(0, n), don = dout.narrow(0, n);
    sanitize::check_op(op, {{"din", &dn}}, {{"in", &inn}, {"dout", &don}});
  }
}

void aux_loss_value(const AuxLossValueArgs& spec, const Tensor& prob_sum, const Tensor& counts, Tensor* global_acc,
                    Tensor& weight, Tensor& value) {
  const char* op = "aux_loss_value";
  const int64_t B = spec.B, E = spec.E;
  prob_sum.check_shape({B, E}, "aux_loss_value: prob_sum");
  prob_sum.check_dtype(DType::f64, "aux_loss_value: prob_sum");
  counts.check_shape({B, E}, "aux_loss_value: counts");
  counts.check_dtype(DType::f64, "aux_loss_value: counts");
  weight.check_shape({B, E}, "aux_loss_value: weight");
  weight.check_dtype(DType::f64, "aux_loss_value: weight");
  MOE_CHECK(value.defined() && value.dtype() == DType::f64 && value.numel() == 1, op,
            ": value must be (1) f64, got ", value.desc());
  MOE_CHECK(!global_acc || B == 1, op, ": the global aux loss has one sequence, got ", B);
  if (global_acc) {
    global_acc->check_shape({E}, "aux_loss_value: global_acc");
    global_acc->check_dtype(DType::f64, "aux_loss_value: global_acc");
  }
  same_device(op, prob_sum, {&counts, global_acc, &weight, &value});
  AuxLossValueArgs a = spec;
  a.prob_sum = prob_sum.data_as<double>();
  a.counts = counts.data_as<double>();
  a.global_acc = global_acc ? global_acc->data_as<double>() : nullptr;
  a.weight = weight.data_as<double>();
  a.value = value.data_as<double>();
  need(table(prob_sum.device()).aux_loss_value, prob_sum.device(), op)(a, exec_ctx(prob_sum.device()));
}

void z_loss_sum(const Tensor& logits, Tensor& sum) {
  const char* op = "z_loss_sum";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  MOE_CHECK(sum.defined() && sum.dtype() == DType::f64 && sum.numel() == 1, op, ": sum must be (1) f64, got ",
            sum.desc());
  same_device(op, logits, {&sum});
  ZLossArgs a;
  a.dtype = logits.dtype();
  a.T = logits.size(0);
  a.E = logits.size(1);
  a.logits = logits.data();
  a.sum_out = sum.data_as<double>();
  need(table(logits.device()).z_loss_fwd, logits.device(), op)(a, exec_ctx(logits.device()));
}

void accumulate(Tensor& y, const Tensor& x, double divisor) {
  const char* op = "accumulate";
  need_defined(op, "y", y);
  need_defined(op, "x", x);
  MOE_CHECK(y.numel() == x.numel(), op, ": y ", y.desc(), " and x ", x.desc(), " differ in size");
  const bool ok = y.dtype() == DType::f64 ? (x.dtype() == DType::f64 || x.dtype() == DType::i64)
                                          : (y.dtype() == DType::i64 && x.dtype() == DType::i64 && divisor == 1.0);
  MOE_CHECK(ok, op, ": expected f64 y with f64/i64 x, or i64 y and x with divisor 1, got y ", y.desc(), ", x ",
            x.desc(), ", divisor ", divisor);
  same_device(op, y, {&x});
  AccumulateArgs a;
  a.y_dtype = y.dtype();
  a.x_dtype = x.dtype();
  a.n = y.numel();
  a.divisor = divisor;
  a.x = x.data();
  a.y = y.data();
  need(table(y.device()).accumulate, y.device(), op)(a, exec_ctx(y.device()));
}

void scale_at(Tensor& y, int64_t index, double mul, double div) {
  const char* op = "scale_at";
  need_defined(op, "y", y);
  y.check_dtype(DType::f64, "scale_at: y");
  MOE_CHECK(index >= 0 && index < y.numel(), op, ": index ", index, " out of range for ", y.desc());
  AccumulateArgs a;
  a.y_dtype = DType::f64;
  a.n = y.numel();
  a.index = index;
  a.mul = mul;
  a.divisor = div;
  a.y = y.data();
  need(table(y.device()).scale_at, y.device(), op)(a, exec_ctx(y.device()));
}

}  // namespace moe::ops
