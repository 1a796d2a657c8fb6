#include "device/ops.h"

#include "device/ops_check.h"
#include "moecore/backend.h"

namespace moe::ops {


ExecCtx exec_ctx(Device device) {
  Backend& b = get_backend(device);
  return ExecCtx{&b, b.current_stream().native_handle()};
}

void gemm(const Tensor& A, bool ta, const Tensor& B, bool tb, Tensor& C, double alpha, double beta) {
  const char* op = "gemm";
  need_2d(op, "A", A);
  need_2d(op, "B", B);
  need_2d(op, "C", C);
  need_float(op, "A", A);
  MOE_CHECK(A.dtype() == B.dtype() && A.dtype() == C.dtype(), op, ": dtypes differ: A ", A.desc(), ", B ",
            B.desc(), ", C ", C.desc());
  same_device(op, A, {&B, &C});
  int64_t M = ta ? A.size(1) : A.size(0), K = ta ? A.size(0) : A.size(1);
  int64_t Kb = tb ? B.size(1) : B.size(0), N = tb ? B.size(0) : B.size(1);
  MOE_CHECK(K == Kb, op, ": inner dimensions differ: op(A) is (", M, ", ", K, "), op(B) is (", Kb, ", ", N, ")");
  C.check_shape({M, N}, "gemm: C");
  GemmArgs a;
  a.dtype = A.dtype();
  a.trans_a = ta;
  a.trans_b = tb;
  a.M = M;
  a.N = N;
  a.K = K;
  a.A = A.data();
  a.B = B.data();
  a.C = C.data();
  a.alpha = alpha;
  a.beta = beta;
  need(table(A.device()).gemm, A.device(), op)(a, exec_ctx(A.device()));
  sanitize::check_op(op, {{"C", &C}}, {{"A", &A}, {"B", &B}});
}

Tensor matmul(const Tensor& A, bool ta, const Tensor& B, bool tb) {
  need_2d("matmul", "A", A);
  need_2d("matmul", "B", B);
  Tensor C = Tensor::empty({ta ? A.size(1) : A.size(0), tb ? B.size(0) : B.size(1)}, A.dtype(), A.device());
  gemm(A, ta, B, tb, C, 1.0, 0.0);
  return C;
}

GroupedGemmArgs grouped_gemm_args(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C, int64_t G,
                                  int64_t M, int64_t N, int64_t K, bool accumulate) {
  GroupedGemmArgs a;
  a.dtype = A.dtype();
  a.mode = mode;
  a.G = G;
  a.M = M;
  a.N = N;
  a.K = K;
  a.A = A.data();
  a.B = B.data();
  a.C = C.data();
  a.accumulate = accumulate;
  return a;
}

void grouped_gemm(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C,
                  const std::vector<int64_t>& rows, bool accumulate, const Tensor* rows_device) {
  const char* op = "grouped_gemm";
  need_2d(op, "A", A);
  need_float(op, "A", A);
  MOE_CHECK(A.dtype() == B.dtype() && A.dtype() == C.dtype(), op, ": dtypes differ: A ", A.desc(), ", B ",
            B.desc(), ", C ", C.desc());
  same_device(op, A, {&B, &C, rows_device});
  int64_t G = static_cast<int64_t>(rows.size());
  int64_t M = 0;
  for (int64_t g = 0; g < G; ++g) {
    MOE_CHECK(rows[g] >= 0, op, ": group ", g, " has a negative row count ", rows[g]);
    M += rows[g];
  }
  MOE_CHECK(A.size(0) == M, op, ": A has ", A.size(0), " rows but the group row counts sum to ", M);
  int64_t N = 0, K = 0;
  switch (mode) {
    case GroupedGemmMode::fwd:
    case GroupedGemmMode::dgrad:
      MOE_CHECK(B.ndim() == 3 && B.size(0) == G, op, ": B must be (G=", G, ", N, K), got ", B.desc());
      N = B.size(1);
      K = B.size(2);
      if (mode == GroupedGemmMode::fwd) {
        A.check_shape({M, K}, "grouped_gemm fwd: A");
        C.check_shape({M, N}, "grouped_gemm fwd: C");
      } else {
        A.check_shape({M, N}, "grouped_gemm dgrad: A");
        C.check_shape({M, K}, "grouped_gemm dgrad: C");
      }
      break;
    case GroupedGemmMode::wgrad:
      need_2d(op, "B", B);
      MOE_CHECK(B.size(0) == M, op, " wgrad: B must have ", M, " rows, got ", B.desc());
      N = A.size(1);
      K = B.size(1);
      C.check_shape({G, N, K}, "grouped_gemm wgrad: C");
      break;
  }
  if (rows_device) rows_device->check_shape({G}, "grouped_gemm: rows_device");
  GroupedGemmArgs a = grouped_gemm_args(mode, A, B, C, G, M, N, K, accumulate);
  a.rows_host = rows.data();
  a.rows_device = rows_device ? rows_device->data_as<int64_t>() : nullptr;
  need(table(A.device()).grouped_gemm, A.device(), op)(a, exec_ctx(A.device()));
  sanitize::check_op(op, {{"C", &C}}, {{"A", &A}, {"B", &B}});
}

namespace {
void check_topk_spec(const char* op, const TopkSpec& s, int64_t E) {
  MOE_CHECK(s.k >= 1 && s.k <= E, op, ": topk must be in [1, ", E, "], got ", s.k);
  if (s.num_groups > 0) {
    MOE_CHECK(E % s.num_groups == 0, op, ": ", E, " experts not divisible into ", s.num_groups, " groups");
    MOE_CHECK(s.group_topk >= 1 && s.group_topk <= s.num_groups, op, ": group_topk must be in [1, ",
              s.num_groups, "], got ", s.group_topk);
    MOE_CHECK(s.k % s.group_topk == 0, op, ": topk ", s.k, " must be divisible by group_topk ", s.group_topk);
    MOE_CHECK(s.k <= s.group_topk * (E / s.num_groups), op, ": topk ", s.k, " exceeds the ",
              s.group_topk * (E / s.num_groups), " experts in the selected groups");
  }
}
}  // namespace

void router_topk(const TopkSpec& s, const Tensor& logits, const Tensor* bias, Tensor& probs, Tensor& map,
                 Tensor& idx) {
  const char* op = "router_topk";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  int64_t T = logits.size(0), E = logits.size(1);
  check_topk_spec(op, s, E);
  probs.check_shape({T, E}, "router_topk: probs");
  probs.check_dtype(logits.dtype(), "router_topk: probs");
  map.check_shape({T, E}, "router_topk: routing_map");
  map.check_dtype(DType::u8, "router_topk: routing_map");
  idx.check_shape({T, s.k}, "router_topk: topk_idx");
  idx.check_dtype(DType::i32, "router_topk: topk_idx");
  if (bias && bias->defined()) {
    bias->check_shape({E}, "router_topk: expert_bias");
    bias->check_dtype(DType::f32, "router_topk: expert_bias");
  }
  same_device(op, logits, {&probs, &map, &idx, bias});
  RouterTopkArgs a;
  a.dtype = logits.dtype();
  a.T = T;
  a.E = E;
  a.k = s.k;
  a.score = s.score;
  a.pre_softmax = s.pre_softmax;
  a.num_groups = s.num_groups;
  a.group_topk = s.group_topk;
  a.scaling_factor = s.scaling_factor;
  a.logits = logits.data();
  a.expert_bias = (bias && bias->defined()) ? bias->data_as<float>() : nullptr;
  a.probs = probs.data();
  a.routing_map = map.data_as<uint8_t>();
  a.topk_idx = idx.data_as<int32_t>();
  need(table(logits.device()).router_topk, logits.device(), op)(a, exec_ctx(logits.device()));
  sanitize::check_op(op, {{"probs", &probs}}, {{"logits", &logits}});
}

void router_topk_bwd(const TopkSpec& s, const Tensor& logits, const Tensor& idx, const Tensor& map,
                     const Tensor& dprobs, Tensor& dlogits, bool accumulate) {
  const char* op = "router_topk_bwd";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  int64_t T = logits.size(0), E = logits.size(1);
  idx.check_shape({T, s.k}, "router_topk_bwd: topk_idx");
  idx.check_dtype(DType::i32, "router_topk_bwd: topk_idx");
  map.check_shape({T, E}, "router_topk_bwd: routing_map");
  map.check_dtype(DType::u8, "router_topk_bwd: routing_map");
  dprobs.check_shape({T, E}, "router_topk_bwd: dprobs");
  dprobs.check_dtype(logits.dtype(), "router_topk_bwd: dprobs");
  dlogits.check_shape({T, E}, "router_topk_bwd: dlogits");
  dlogits.check_dtype(logits.dtype(), "router_topk_bwd: dlogits");
  same_device(op, logits, {&idx, &map, &dprobs, &dlogits});
  RouterTopkBwdArgs a;
  a.dtype = logits.dtype();
  a.T = T;
  a.E = E;
  a.k = s.k;
  a.score = s.score;
  a.pre_softmax = s.pre_softmax;
  a.scaling_factor = s.scaling_factor;
  a.logits = logits.data();
  a.topk_idx = idx.data_as<int32_t>();
  a.routing_map = map.data_as<uint8_t>();
  a.dprobs = dprobs.data();
  a.dlogits = dlogits.data();
  a.accumulate = accumulate;
  need(table(logits.device()).router_topk_bwd, logits.device(), op)(a, exec_ctx(logits.device()));
  sanitize::check_op(op, {{"dlogits", &dlogits}}, {{"logits", &logits}, {"dprobs", &dprobs}});
}

void aux_stats(ScoreFunction score, int64_t k, int64_t num_seqs, const Tensor& logits, Tensor& prob_sum,
               Tensor& counts) {
  const char* op = "aux_stats";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  int64_t T = logits.size(0), E = logits.size(1);
  MOE_CHECK(num_seqs >= 1 && T % num_seqs == 0, op, ": ", T, " tokens do not split into ", num_seqs, " sequences");
  MOE_CHECK(k >= 1 && k <= E, op, ": topk must be in [1, ", E, "], got ", k);
  prob_sum.check_shape({num_seqs, E}, "aux_stats: prob_sum");
  prob_sum.check_dtype(DType::f64, "aux_stats: prob_sum");
  counts.check_shape({num_seqs, E}, "aux_stats: counts");
  counts.check_dtype(DType::i64, "aux_stats: counts");
  same_device(op, logits, {&prob_sum, &counts});
  AuxStatsArgs a;
  a.dtype = logits.dtype();
  a.T = T;
  a.E = E;
  a.k = k;
  a.num_seqs = num_seqs;
  a.score = score;
  a.logits = logits.data();
  a.prob_sum = prob_sum.data_as<double>();
  a.counts = counts.data_as<int64_t>();
  need(table(logits.device()).aux_stats, logits.device(), op)(a, exec_ctx(logits.device()));
}

void aux_loss_bwd(ScoreFunction score, int64_t num_seqs, const Tensor& logits, const Tensor& weight,
                  Tensor& dlogits) {
  const char* op = "aux_loss_bwd";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  int64_t T = logits.size(0), E = logits.size(1);
  MOE_CHECK(num_seqs >= 1 && T % num_seqs == 0, op, ": ", T, " tokens do not split into ", num_seqs, " sequences");
  weight.check_shape({num_seqs, E}, "aux_loss_bwd: weight");
  weight.check_dtype(DType::f64, "aux_loss_bwd: weight");
  dlogits.check_shape({T, E}, "aux_loss_bwd: dlogits");
  dlogits.check_dtype(logits.dtype(), "aux_loss_bwd: dlogits");
  same_device(op, logits, {&weight, &dlogits});
  AuxLossBwdArgs a;
  a.dtype = logits.dtype();
  a.T = T;
  a.E = E;
  a.num_seqs = num_seqs;
  a.score = score;
  a.logits = logits.data();
  a.weight = weight.data_as<double>();
  a.dlogits = dlogits.data();
  need(table(logits.device()).aux_loss_bwd, logits.device(), op)(a, exec_ctx(logits.device()));
}

double z_loss_fwd(const Tensor& logits) {
  Tensor sum = Tensor::empty({1}, DType::f64, logits.device());  // (1) f64: Σ_t lse²
  z_loss_sum(logits, sum);
  return sum.to_vector<double>()[0];
}

void z_loss_bwd(const Tensor& logits, double coef, Tensor& dlogits) {
  const char* op = "z_loss_bwd";
  need_2d(op, "logits", logits);
  need_router_dtype(op, logits);
  dlogits.check_shape(logits.shape(), "z_loss_bwd: dlogits");
  dlogits.check_dtype(logits.dtype(), "z_loss_bwd: dlogits");
  same_device(op, logits, {&dlogits});
  ZLossArgs a;
  a.dtype = logits.dtype();
  a.T = logits.size(0);
  a.E = logits.size(1);
  a.logits = logits.data();
  a.dlogits = dlogits.data();
  a.coef = coef;
  need(table(logits.device()).z_loss_bwd, logits.device(), op)(a, exec_ctx(logits.device()));
}

void capacity(int64_t cap, DropPolicy policy, bool pad, Tensor& probs, Tensor& map) {
  const char* op = "capacity";
  need_2d(op, "probs", probs);
  need_router_dtype(op, probs);
  MOE_CHECK(cap >= 0, op, ": capacity must be >= 0, got ", cap);
  map.check_shape(probs.shape(), "capacity: routing_map");
  map.check_dtype(DType::u8, "capacity: routing_map");
  same_device(op, probs, {&map});
  CapacityArgs a;
  a.dtype = probs.dtype();
  a.T = probs.size(0);
  a.E = probs.size(1);
  a.capacity = cap;
  a.policy = policy;
  a.pad = pad;
  a.probs = probs.data();
  a.routing_map = map.data_as<uint8_t>();
  need(table(probs.device()).capacity, probs.device(), op)(a, exec_ctx(probs.device()));
}

Tensor routing_counts(const Tensor& map) {
  const char* op = "routing_counts";
  need_2d(op, "routing_map", map);
  map.check_dtype(DType::u8, "routing_counts: routing_map");
  Tensor counts = Tensor::empty({map.size(1)}, DType::i64, map.device());
  RoutingCountsArgs a;
  a.T = map.size(0);
  a.E = map.size(1);
  a.routing_map = map.data_as<uint8_t>();
  a.counts = counts.data_as<int64_t>();
  need(table(map.device()).routing_counts, map.device(), op)(a, exec_ctx(map.device()));
  return counts;
}

void permute_index(const Tensor& map, const std::vector<int64_t>& offsets, Tensor& row_id_map) {
  const char* op = "permute_index";
  need_2d(op, "routing_map", map);
  map.check_dtype(DType::u8, "permute_index: routing_map");
  int64_t T = map.size(0), E = map.size(1);
  MOE_CHECK(static_cast<int64_t>(offsets.size()) == E, op, ": expected ", E, " expert offsets, got ", offsets.size());
  row_id_map.check_shape({T, E}, "permute_index: row_id_map");
  row_id_map.check_dtype(DType::i32, "permute_index: row_id_map");
  same_device(op, map, {&row_id_map});
  Tensor offsets_dev;
  if (!map.device().is_cpu()) offsets_dev = Tensor::from_vector(offsets, {E}, map.device());
  PermuteIndexArgs a;
  a.T = T;
  a.E = E;
  a.routing_map = map.data_as<uint8_t>();
  a.expert_offsets_host = offsets.data();
  a.expert_offsets = offsets_dev.defined() ? offsets_dev.data_as<int64_t>() : nullptr;
  a.row_id_map = row_id_map.data_as<int32_t>();
  need(table(map.device()).permute_index, map.device(), op)(a, exec_ctx(map.device()));
}

PermuteArgs permute_args(const char* op, const Tensor& rid, const Tensor& in, Tensor& out, const Tensor* probs,
                         Tensor* out_probs) {
  const std::string o = op;
  need_2d(op, "row_id_map", rid);
  rid.check_dtype(DType::i32, (o + ": row_id_map").c_str());
  need_2d(op, "in", in);
  need_2d(op, "out", out);
  const int64_t T = rid.size(0), E = rid.size(1), H = in.size(1), N = out.size(0);
  in.check_shape({T, H}, (o + ": in").c_str());
  out.check_shape({N, H}, (o + ": out").c_str());
  MOE_CHECK(in.dtype() == out.dtype(), op, ": in ", in.desc(), " and out ", out.desc(), " dtypes differ");
  MOE_CHECK((probs == nullptr) == (out_probs == nullptr), op, ": probs and out_probs go together");
  same_device(op, rid, {&in, &out, probs, out_probs});
  PermuteArgs a;
  a.dtype = in.dtype();
  a.T = T;
  a.E = E;
  a.H = H;
  a.N = N;
  a.row_id_map = rid.data_as<int32_t>();
  a.in = in.data();
  a.out = out.data();
  if (probs) {
    probs->check_shape({T, E}, (o + ": probs").c_str());
    out_probs->check_shape({N}, (o + ": out_probs").c_str());
    MOE_CHECK(probs->dtype() == out_probs->dtype(), op, ": probs and out_probs dtypes differ");
    a.prob_dtype = probs->dtype();
    a.probs = probs->data();
    a.out_probs = out_probs->data();
  }
  return a;
}

void permute(const Tensor& rid, const Tensor& in, Tensor& out, const Tensor* probs, Tensor* out_probs) {
  const char* op = "permute";
  PermuteArgs a = permute_args(op, rid, in, out, probs, out_probs);
  need(table(in.device()).permute, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"out", &out}, {"out_probs", out_probs}}, {{"in", &in}, {"probs", probs}});
}

void permute2(const Tensor& rid, const Tensor& in, Tensor& out, Tensor& out2, int64_t out2_written,
              const Tensor* probs, Tensor* out_probs, Tensor* out_probs2) {
  const char* op = "permute2";
  PermuteArgs a = permute_args(op, rid, in, out, probs, out_probs);
  need_2d(op, "out2", out2);
  MOE_CHECK(out2.size(1) == in.size(1) && out2.dtype() == in.dtype(), op, ": out2 must be (N2, ", in.size(1), ") ",
            dtype_name(in.dtype()), " like in ", in.desc(), ", got ", out2.desc());
  MOE_CHECK(out2_written >= 0 && out2_written <= out2.size(0), op, ": the map should name ", out2_written,
            " rows of out2, which has ", out2.size(0));
  MOE_CHECK((out_probs2 != nullptr) == (probs != nullptr), op, ": probs and out_probs2 go together");
  same_device(op, rid, {&out2, out_probs2});
  a.N2 = out2.size(0);
  a.N2_written = out2_written;
  a.out2 = out2.data();
  if (out_probs2) {
    out_probs2->check_shape({a.N2}, "permute2: out_probs2");
    MOE_CHECK(out_probs2->dtype() == probs->dtype(), op, ": probs ", probs->desc(), " and out_probs2 ",
              out_probs2->desc(), " dtypes differ");
    a.out_probs2 = out_probs2->data();
  }
  need(table(in.device()).permute, in.device(), op)(a, exec_ctx(in.device()));
  // out2's rows the map does not name are left as they were (unset, possibly): not checked here.
  sanitize::check_op(op, {{"out", &out}, {"out_probs", out_probs}}, {{"in", &in}, {"probs", probs}});
}

UnpermuteArgs unpermute_args(const char* op, const Tensor& rid, const Tensor& in, const Tensor* in2, Tensor& out,
                             const Tensor* w, const Tensor* w2) {
  const std::string o = op;
  need_2d(op, "row_id_map", rid);
  rid.check_dtype(DType::i32, (o + ": row_id_map").c_str());
  need_2d(op, "in", in);
  need_2d(op, "out", out);
  const int64_t T = rid.size(0), E = rid.size(1), H = in.size(1), N = in.size(0);
  out.check_shape({T, H}, (o + ": out").c_str());
  MOE_CHECK(in.dtype() == out.dtype(), op, ": in ", in.desc(), " and out ", out.desc(), " dtypes differ");
  same_device(op, rid, {&in, in2, &out, w, w2});
  UnpermuteArgs a;
  a.dtype = in.dtype();
  a.T = T;
  a.E = E;
  a.H = H;
  a.N = N;
  a.row_id_map = rid.data_as<int32_t>();
  a.in = in.data();
  a.out = out.data();
  if (in2) {
    need_2d(op, "in2", *in2);
    MOE_CHECK(in2->size(1) == H && in2->dtype() == in.dtype(), op, ": in2 must be (N2, ", H, ") ",
              dtype_name(in.dtype()), " like in ", in.desc(), ", got ", in2->desc());
    a.N2 = in2->size(0);
    a.in2 = in2->data();
  }
  MOE_CHECK(w2 == nullptr || (w != nullptr && in2 != nullptr), op,
            ": row_weights2 needs row_weights and in2");
  MOE_CHECK(w == nullptr || in2 == nullptr || w2 != nullptr, op,
            ": with two inputs, row_weights needs row_weights2 (the weights of in2's rows)");
  if (w) {
    w->check_shape({N}, (o + ": row_weights").c_str());
    a.prob_dtype = w->dtype();
    a.row_weights = w->data();
  }
  if (w2) {
    w2->check_shape({a.N2}, (o + ": row_weights2").c_str());
    MOE_CHECK(w2->dtype() == w->dtype(), op, ": row_weights ", w->desc(), " and row_weights2 ", w2->desc(),
              " dtypes differ");
    a.row_weights2 = w2->data();
  }
  return a;
}

void unpermute(const Tensor& rid, const Tensor& in, Tensor& out, const Tensor* w) {
  const char* op = "unpermute";
  UnpermuteArgs a = unpermute_args(op, rid, in, nullptr, out, w, nullptr);
  need(table(in.device()).unpermute, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"out", &out}}, {{"in", &in}, {"row_weights", w}});
}

void unpermute2(const Tensor& rid, const Tensor& in, const Tensor& in2, Tensor& out, const Tensor* w,
                const Tensor* w2) {
  const char* op = "unpermute2";
  UnpermuteArgs a = unpermute_args(op, rid, in, &in2, out, w, w2);
  need(table(in.device()).unpermute, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"out", &out}},
                     {{"in", &in}, {"in2", &in2}, {"row_weights", w}, {"row_weights2", w2}});
}

namespace {
// scatter_rows_to_map over row_values, or [row_values; row_values2] when row_values2 is given.
void scatter_rows(const char* op, const Tensor& rid, const Tensor& row_values, const Tensor* row_values2,
                  Tensor& probs_grad) {
  const std::string o = op;
  need_2d(op, "row_id_map", rid);
  rid.check_dtype(DType::i32, (o + ": row_id_map").c_str());
  int64_t T = rid.size(0), E = rid.size(1);
  MOE_CHECK(row_values.defined() && row_values.ndim() == 1, op, ": row_values must be (N), got ", row_values.desc());
  probs_grad.check_shape({T, E}, (o + ": probs_grad").c_str());
  MOE_CHECK(row_values.dtype() == probs_grad.dtype(), op, ": dtypes differ: ", row_values.desc(), " vs ",
            probs_grad.desc());
  same_device(op, rid, {&row_values, row_values2, &probs_grad});
  UnpermuteArgs a;
  a.prob_dtype = row_values.dtype();
  a.T = T;
  a.E = E;
  a.N = row_values.size(0);
  a.row_id_map = rid.data_as<int32_t>();
  a.row_values = row_values.data();
  a.probs_grad = probs_grad.data();
  if (row_values2) {
    MOE_CHECK(row_values2->defined() && row_values2->ndim() == 1 && row_values2->dtype() == row_values.dtype(), op,
              ": row_values2 must be (N2) ", dtype_name(row_values.dtype()), " like row_values ", row_values.desc(),
              ", got ", row_values2->desc());
    a.N2 = row_values2->size(0);
    a.row_values2 = row_values2->data();
  }
  need(table(rid.device()).unpermute, rid.device(), op)(a, exec_ctx(rid.device()));
}
}  // namespace

void scatter_rows_to_map(const Tensor& rid, const Tensor& row_values, Tensor& probs_grad) {
  scatter_rows("scatter_rows_to_map", rid, row_values, nullptr, probs_grad);
}

void scatter_rows_to_map2(const Tensor& rid, const Tensor& row_values, const Tensor& row_values2,
                          Tensor& probs_grad) {
  scatter_rows("scatter_rows_to_map2", rid, row_values, &row_values2, probs_grad);
}

void chunk_sort(const std::vector<int64_t>& splits, const std::vector<int64_t>& order, const Tensor& in,
                Tensor& out, const Tensor* probs, Tensor* out_probs) {
  const char* op = "chunk_sort";
  need_2d(op, "in", in);
  int64_t C = static_cast<int64_t>(splits.size());
  MOE_CHECK(static_cast<int64_t>(order.size()) == C, op, ": ", C, " split sizes but ", order.size(), " sorted indices");
  int64_t N = 0;
  std::vector<int> seen(static_cast<size_t>(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    MOE_CHECK(splits[c] >= 0, op, ": chunk ", c, " has negative size ", splits[c]);
    N += splits[c];
    MOE_CHECK(order[c] >= 0 && order[c] < C && !seen[order[c]]++, op, ": sorted_idxs is not a permutation of [0, ", C, ")");
  }
  in.check_shape({N, in.size(1)}, "chunk_sort: in");
  out.check_shape(in.shape(), "chunk_sort: out");
  MOE_CHECK(in.dtype() == out.dtype(), op, ": dtypes differ");
  MOE_CHECK((probs == nullptr) == (out_probs == nullptr), op, ": probs and out_probs go together");
  same_device(op, in, {&out, probs, out_probs});
  ChunkSortArgs a;
  a.dtype = in.dtype();
  a.num_chunks = C;
  a.N = N;
  a.H = in.size(1);
  a.split_sizes_host = splits.data();
  a.sorted_idxs_host = order.data();
  a.in = in.data();
  a.out = out.data();
  if (probs) {
    probs->check_shape({N}, "chunk_sort: probs");
    out_probs->check_shape({N}, "chunk_sort: out_probs");
    a.prob_dtype = probs->dtype();
    a.probs = probs->data();
    a.out_probs = out_probs->data();
  }
  need(table(in.device()).chunk_sort, in.device(), op)(a, exec_ctx(in.device()));
}

namespace {
Tensor columns_op(const Tensor& in, int64_t start, int64_t cols, bool scatter) {
  const char* op = scatter ? "scatter_columns" : "gather_columns";
  need_2d(op, "in", in);
  int64_t R = in.size(0), C = in.size(1);
  if (scatter) {
    MOE_CHECK(start >= 0 && cols >= start + C, op, ": columns [", start, ", ", start + C, ") do not fit ", cols,
              " output columns");
  } else {
    MOE_CHECK(start >= 0 && cols >= 0 && start + cols <= C, op, ": columns [", start, ", ", start + cols,
              ") out of range for ", in.desc());
  }
  Tensor out = Tensor::empty({R, cols}, in.dtype(), in.device());
  ColumnsArgs a;
  a.elem_size = static_cast<int64_t>(dtype_size(in.dtype()));
  a.rows = R;
  a.in_cols = C;
  a.out_cols = cols;
  a.start = start;
  a.scatter = scatter;
  a.in = in.data();
  a.out = out.data();
  need(table(in.device()).columns, in.device(), op)(a, exec_ctx(in.device()));
  return out;
}
}  // namespace

Tensor gather_columns(const Tensor& in, int64_t start, int64_t count) { return columns_op(in, start, count, false); }
Tensor scatter_columns(const Tensor& in, int64_t start, int64_t total) { return columns_op(in, start, total, true); }

namespace {
// (rows, F1) → F, checking the GLU width.
int64_t act_width(const char* op, bool glu, const Tensor& in) {
  need_2d(op, "in", in);
  need_float(op, "in", in);
  MOE_CHECK(!glu || in.size(1) % 2 == 0, op, ": a GLU input needs an even width, got ", in.desc());
  return glu ? in.size(1) / 2 : in.size(1);
}
void need_rows(const char* op, const char* name, const Tensor* t, int64_t rows) {
  if (!t) return;
  MOE_CHECK(t->defined() && t->ndim() == 1 && t->size(0) == rows, op, ": '", name, "' must be (", rows, "), got ",
            t->desc());
}
}  // namespace

ActFwdArgs act_fwd_args(const char* op, Activation act, bool glu, const Tensor& in, const Tensor* row_scale,
                        Tensor& out) {
  const int64_t F = act_width(op, glu, in), rows = in.size(0);
  out.check_shape({rows, F}, (std::string(op) + ": out").c_str());
  MOE_CHECK(out.dtype() == in.dtype(), op, ": dtypes differ: in ", in.desc(), ", out ", out.desc());
  same_device(op, in, {&out, row_scale});
  need_rows(op, "row_scale", row_scale, rows);
  ActFwdArgs a;
  a.dtype = in.dtype();
  a.act = act;
  a.glu = glu;
  a.rows = rows;
  a.F = F;
  a.in = in.data();
  a.out = out.data();
  if (row_scale) {
    a.scale_dtype = row_scale->dtype();
    a.row_scale = row_scale->data();
  }
  return a;
}

void act_fwd(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, Tensor& out) {
  const char* op = "act_fwd";
  ActFwdArgs a = act_fwd_args(op, act, glu, in, row_scale, out);
  need(table(in.device()).act_fwd, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"out", &out}}, {{"in", &in}, {"row_scale", row_scale}});
}

ActBwdArgs act_bwd_args(const char* op, Activation act, bool glu, const Tensor& in, const Tensor* row_scale,
                        const Tensor& dout, Tensor& din, Tensor* drow_scale) {
  const int64_t F = act_width(op, glu, in), rows = in.size(0);
  const std::string o = op;
  dout.check_shape({rows, F}, (o + ": dout").c_str());
  din.check_shape(in.shape(), (o + ": din").c_str());
  MOE_CHECK(dout.dtype() == in.dtype() && din.dtype() == in.dtype(), op, ": dtypes differ: in ", in.desc(), ", dout ",
            dout.desc(), ", din ", din.desc());
  same_device(op, in, {&dout, &din, row_scale, drow_scale});
  need_rows(op, "row_scale", row_scale, rows);
  need_rows(op, "drow_scale", drow_scale, rows);
  MOE_CHECK(!row_scale || !drow_scale || drow_scale->dtype() == row_scale->dtype(), op,
            ": row_scale and drow_scale dtypes differ");
  ActBwdArgs a;
  a.dtype = in.dtype();
  a.act = act;
  a.glu = glu;
  a.rows = rows;
  a.F = F;
  a.in = in.data();
  a.dout = dout.data();
  a.din = din.data();
  if (row_scale) {
    a.scale_dtype = row_scale->dtype();
    a.row_scale = row_scale->data();
  }
  if (drow_scale) {
    a.scale_dtype = drow_scale->dtype();
    a.drow_scale = drow_scale->data();
  }
  return a;
}

void act_bwd(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, const Tensor& dout, Tensor& din,
             Tensor* drow_scale) {
  const char* op = "act_bwd";
  ActBwdArgs a = act_bwd_args(op, act, glu, in, row_scale, dout, din, drow_scale);
  need(table(in.device()).act_bwd, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"din", &din}, {"drow_scale", drow_scale}}, {{"in", &in}, {"dout", &dout}, {"row_scale", row_scale}});
}

namespace {
void check_same(const char* op, const Tensor& a, const Tensor& b) {
  need_float(op, "x", a);
  MOE_CHECK(b.defined() && a.numel() == b.numel() && a.dtype() == b.dtype(), op, ": operands must match: ",
            a.desc(), " vs ", b.desc());
  same_device(op, a, {&b});
}
}  // namespace

void axpby(double alpha, const Tensor& x, double beta, Tensor& y) {
  check_same("axpby", x, y);
  ElementwiseArgs a;
  a.dtype = x.dtype();
  a.n = x.numel();
  a.x = x.data();
  a.y = y.data();
  a.a = alpha;
  a.b = beta;
  need(table(x.device()).axpby, x.device(), "axpby")(a, exec_ctx(x.device()));
  sanitize::check_op("axpby", {{"y", &y}}, {{"x", &x}});
}

void add_(Tensor& y, const Tensor& x) { axpby(1.0, x, 1.0, y); }

void mul(const Tensor& x, const Tensor& y, Tensor& out) {
  check_same("mul", x, y);
  check_same("mul", x, out);
  ElementwiseArgs a;
  a.dtype = x.dtype();
  a.n = x.numel();
  a.x = x.data();
  a.y = const_cast<void*>(y.data());
  a.out = out.data();
  need(table(x.device()).mul, x.device(), "mul")(a, exec_ctx(x.device()));
  sanitize::check_op("mul", {{"out", &out}}, {{"x", &x}, {"y", &y}});
}

void sigmoid(const Tensor& x, Tensor& out) {
  check_same("sigmoid", x, out);
  ElementwiseArgs a;
  a.dtype = x.dtype();
  a.op = UnaryOp::sigmoid;
  a.n = x.numel();
  a.x = x.data();
  a.out = out.data();
  need(table(x.device()).unary, x.device(), "sigmoid")(a, exec_ctx(x.device()));
  sanitize::check_op("sigmoid", {{"out", &out}}, {{"x", &x}});
}

void sigmoid_bwd(const Tensor& dy, const Tensor& y, Tensor& dx) {
  check_same("sigmoid_bwd", dy, y);
  check_same("sigmoid_bwd", dy, dx);
  ElementwiseArgs a;
  a.dtype = dy.dtype();
  a.op = UnaryOp::sigmoid_bwd;
  a.n = dy.numel();
  a.x = dy.data();
  a.y = const_cast<void*>(y.data());
  a.out = dx.data();
  need(table(dy.device()).unary, dy.device(), "sigmoid_bwd")(a, exec_ctx(dy.device()));
  sanitize::check_op("sigmoid_bwd", {{"dx", &dx}}, {{"dy", &dy}, {"y", &y}});
}

void cast_into(const Tensor& x, Tensor& out) {
  need_float("cast", "x", x);
  need_float("cast", "out", out);
  MOE_CHECK(x.numel() == out.numel(), "cast: element counts differ: ", x.desc(), " vs ", out.desc());
  same_device("cast", x, {&out});
  CastArgs a;
  a.src_dtype = x.dtype();
  a.dst_dtype = out.dtype();
  a.n = x.numel();
  a.src = x.data();
  a.dst = out.data();
  need(table(x.device()).cast, x.device(), "cast")(a, exec_ctx(x.device()));
  sanitize::check_op("cast", {{"out", &out}}, {{"x", &x}});
}

Tensor cast(const Tensor& x, DType dtype) {
  Tensor out = Tensor::empty(x.shape(), dtype, x.device());
  cast_into(x, out);
  return out;
}

void scale_rows(const Tensor& in, const Tensor& scale, Tensor& out, bool accumulate) {
  const char* op = "scale_rows";
  need_2d(op, "in", in);
  need_float(op, "in", in);
  out.check_shape(in.shape(), "scale_rows: out");
  MOE_CHECK(out.dtype() == in.dtype(), op, ": dtypes differ");
  scale.check_shape({in.size(0)}, "scale_rows: scale");
  same_device(op, in, {&scale, &out});
  ScaleRowsArgs a;
  a.dtype = in.dtype();
  a.scale_dtype = scale.dtype();
  a.rows = in.size(0);
  a.H = in.size(1);
  a.in = in.data();
  a.scale = scale.data();
  a.out = out.data();
  a.accumulate = accumulate;
  need(table(in.device()).scale_rows, in.device(), op)(a, exec_ctx(in.device()));
  sanitize::check_op(op, {{"out", &out}}, {{"in", &in}, {"scale", &scale}});
}

void row_dot(const Tensor& x, const Tensor& y, Tensor& out) {
  const char* op = "row_dot";
  need_2d(op, "a", x);
  need_float(op, "a", x);
  y.check_shape(x.shape(), "row_dot: b");
  MOE_CHECK(y.dtype() == x.dtype(), op, ": dtypes differ");
  out.check_shape({x.size(0)}, "row_dot: out");
  same_device(op, x, {&y, &out});
  RowDotArgs a;
  a.dtype = x.dtype();
  a.out_dtype = out.dtype();
  a.rows = x.size(0);
  a.H = x.size(1);
  a.a = x.data();
  a.b = y.data();
  a.out = out.data();
  need(table(x.device()).row_dot, x.device(), op)(a, exec_ctx(x.device()));
  sanitize::check_op(op, {{"out", &out}}, {{"x", &x}, {"y", &y}});
}

void jitter(uint64_t key, double eps, Tensor& out) {
  need_float("jitter", "out", out);
  JitterArgs a;
  a.dtype = out.dtype();
  a.n = out.numel();
  a.key = key;
  a.eps = eps;
  a.out = out.data();
  need(table(out.device()).jitter, out.device(), "jitter")(a, exec_ctx(out.device()));
}

double mse(const Tensor& y, const Tensor& target, Tensor* dy, double scale) {
  check_same("mse", y, target);
  if (dy) check_same("mse", y, *dy);
  Tensor sum = Tensor::empty({1}, DType::f64, y.device());
  MseArgs a;
  a.dtype = y.dtype();
  a.n = y.numel();
  a.y = y.data();
  a.target = target.data();
  a.sum_out = sum.data_as<double>();
  a.dy = dy ? dy->data() : nullptr;
  a.scale = scale;
  need(table(y.device()).mse, y.device(), "mse")(a, exec_ctx(y.device()));
  return sum.to_vector<double>()[0];
}

void adam(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
          double eps, double weight_decay, int64_t step) {
  param.check_dtype(DType::f32, "adam: param");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad, &m, &v}) {
    t->check_dtype(DType::f32, "adam");
    MOE_CHECK(t->numel() == param.numel(), "adam: expected ", param.numel(), " elements, got ", t->desc());
  }
  same_device("adam", param, {&grad, &m, &v});
  AdamArgs a;
  a.n = param.numel();
  a.param = param.data_as<float>();
  a.grad = grad.data_as<float>();
  a.m = m.data_as<float>();
  a.v = v.data_as<float>();
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.step = step;
  need(table(param.device()).adam, param.device(), "adam")(a, exec_ctx(param.device()));
  sanitize::check_op("adam", {{"param", &param}, {"m", &m}, {"v", &v}}, {{"grad", &grad}});
}

void sgd(Tensor& param, const Tensor& grad, Tensor* momentum_buf, double lr, double momentum, double weight_decay) {
  param.check_dtype(DType::f32, "sgd: param");
  grad.check_dtype(DType::f32, "sgd: grad");
  MOE_CHECK(grad.numel() == param.numel(), "sgd: grad: expected ", param.numel(), " elements, got ", grad.desc());
  MOE_CHECK(momentum == 0.0 || momentum_buf != nullptr, "sgd: momentum ", momentum, " needs a momentum buffer");
  if (momentum_buf) {
    momentum_buf->check_dtype(DType::f32, "sgd: momentum_buf");
    MOE_CHECK(momentum_buf->numel() == param.numel(), "sgd: momentum_buf: expected ", param.numel(),
              " elements, got ", momentum_buf->desc());
  }
  same_device("sgd", param, {&grad, momentum_buf});
  SgdArgs a;
  a.n = param.numel();
  a.param = param.data_as<float>();
  a.grad = grad.data_as<float>();
  a.momentum_buf = momentum_buf ? momentum_buf->data_as<float>() : nullptr;
  a.lr = lr;
  a.momentum = momentum;
  a.weight_decay = weight_decay;
  need(table(param.device()).sgd, param.device(), "sgd")(a, exec_ctx(param.device()));
  sanitize::check_op("sgd", {{"param", &param}, {"momentum_buf", momentum_buf}}, {{"grad", &grad}});
}

}  // namespace moe::ops
