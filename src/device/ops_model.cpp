// Tensor-level wrappers of the transformer's small ops (norms, rotary embedding, vocab-parallel
// embedding and cross entropy, the fused-QKV split): each checks ndim, shapes, dtypes (the storage
// dtype, the statistics dtype next to it, i64 ids / labels / positions) and devices, names what it
// expected and what it got, then builds the op's Args (kernels/ops.h) and calls the kernel of the
// tensor's backend. An optional tensor passed as a pointer to an undefined Tensor counts as absent.
#include <cmath>

#include "device/ops.h"
#include "device/ops_check.h"

namespace moe::ops {

namespace {

bool present(const Tensor* t) { return t != nullptr && t->defined(); }

// A statistics tensor: shape (rows) in the stat dtype of `dtype`.
void need_stat(const char* op, const char* name, const Tensor& t, int64_t rows, DType dtype) {
  need_defined(op, name, t);
  const DType sd = stat_dtype_for(dtype);
  MOE_CHECK(t.ndim() == 1 && t.size(0) == rows, op, ": '", name, "' must have shape ", shape_str({rows}), ", got ",
            t.desc());
  MOE_CHECK(t.dtype() == sd, op, ": '", name, "' must be in the stat dtype ", dtype_name(sd), " (for ",
            dtype_name(dtype), " data), got ", t.desc());
}

// An index tensor: shape (n) i64.
void need_index(const char* op, const char* name, const Tensor& t, int64_t n) {
  need_defined(op, name, t);
  MOE_CHECK(t.ndim() == 1 && t.size(0) == n, op, ": '", name, "' must have shape ", shape_str({n}), ", got ", t.desc());
  MOE_CHECK(t.dtype() == DType::i64, op, ": '", name, "' must be i64, got ", t.desc());
}

// `t` has exactly `shape` and `dtype`.
void need_like(const char* op, const char* name, const Tensor& t, const Shape& shape, DType dtype) {
  need_defined(op, name, t);
  MOE_CHECK(t.shape() == shape, op, ": '", name, "' must have shape ", shape_str(shape), ", got ", t.desc());
  MOE_CHECK(t.dtype() == dtype, op, ": '", name, "' must be ", dtype_name(dtype), " like the input, got ", t.desc());
}

void need_vocab_start(const char* op, int64_t vocab_start) {
  MOE_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void norm_fwd(NormKind kind, double eps, const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& y,
              Tensor* mean, Tensor& rstd) {
  const char* op = kind == NormKind::layer ? "norm_fwd (layer)" : "norm_fwd (rms)";
  need_2d(op, "x", x);
  need_float(op, "x", x);
  const int64_t rows = x.size(0), D = x.size(1);
  const DType dt = x.dtype();
  MOE_CHECK(D >= 1, op, ": the normalised dimension must be >= 1, got x ", x.desc());
  MOE_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  need_like(op, "weight", weight, {D}, dt);
  need_like(op, "y", y, {rows, D}, dt);
  need_stat(op, "rstd", rstd, rows, dt);
  if (kind == NormKind::layer) {
    MOE_CHECK(present(mean), op, ": LayerNorm needs a 'mean' output (rows = ", rows, ")");
    need_stat(op, "mean", *mean, rows, dt);
    if (present(bias)) need_like(op, "bias", *bias, {D}, dt);
  } else {
    MOE_CHECK(!present(bias), op, ": a bias is only allowed with LayerNorm, got ", bias->desc());
    MOE_CHECK(!present(mean), op, ": 'mean' is only written by LayerNorm, got ", mean->desc());
  }
  same_device(op, x, {&weight, bias, &y, mean, &rstd});
  NormFwdArgs a;
  a.dtype = dt;
  a.kind = kind;
  a.rows = rows;
  a.D = D;
  a.eps = eps;
  a.x = x.data();
  a.weight = weight.data();
  a.bias = present(bias) ? bias->data() : nullptr;
  a.y = y.data();
  a.mean = present(mean) ? mean->data() : nullptr;
  a.rstd = rstd.data();
  need(table(x.device()).norm_fwd, x.device(), op)(a, exec_ctx(x.device()));
  sanitize::check_op(op, {{"y", &y}}, {{"x", &x}, {"weight", &weight}, {"bias", bias}});
}

void norm_bwd(NormKind kind, const Tensor& x, const Tensor& weight, const Tensor* mean, const Tensor& rstd,
              const Tensor& dy, Tensor& dx, Tensor& dweight, Tensor* dbias) {
  const char* op = kind == NormKind::layer ? "norm_bwd (layer)" : "norm_bwd (rms)";
  need_2d(op, "x", x);
  need_float(op, "x", x);
  const int64_t rows = x.size(0), D = x.size(1);
  const DType dt = x.dtype();
  MOE_CHECK(D >= 1, op, ": the normalised dimension must be >= 1, got x ", x.desc());
  need_like(op, "weight", weight, {D}, dt);
  need_stat(op, "rstd", rstd, rows, dt);
  need_like(op, "dy", dy, {rows, D}, dt);
  need_like(op, "dx", dx, {rows, D}, dt);
  need_like(op, "dweight", dweight, {D}, dt);
  if (kind == NormKind::layer) {
    MOE_CHECK(present(mean), op, ": LayerNorm needs the forward's 'mean' (rows = ", rows, ")");
    need_stat(op, "mean", *mean, rows, dt);
    if (present(dbias)) need_like(op, "dbias", *dbias, {D}, dt);
  } else {
    MOE_CHECK(!present(dbias), op, ": a bias gradient is only allowed with LayerNorm, got ", dbias->desc());
    MOE_CHECK(!present(mean), op, ": 'mean' is LayerNorm only, got ", mean->desc());
  }
  same_device(op, x, {&weight, mean, &rstd, &dy, &dx, &dweight, dbias});
  NormBwdArgs a;
  a.dtype = dt;
  a.kind = kind;
  a.rows = rows;
  a.D = D;
  a.x = x.data();
  a.weight = weight.data();
  a.mean = present(mean) ? mean->data() : nullptr;
  a.rstd = rstd.data();
  a.dy = dy.data();
  a.dx = dx.data();
  a.dweight = dweight.data();
  a.dbias = present(dbias) ? dbias->data() : nullptr;
  need(table(x.device()).norm_bwd, x.device(), op)(a, exec_ctx(x.device()));
  sanitize::check_op(op, {{"dx", &dx}, {"dweight", &dweight}, {"dbias", dbias}}, {{"x", &x}, {"weight", &weight}, {"dy", &dy}});
}

// ---------------------------------------------------------------------------------------------
void rope(const Tensor& positions, int64_t rd, double base, bool inverse, const Tensor& x, Tensor& y) {
  const char* op = inverse ? "rope (inverse)" : "rope";
  need_float(op, "x", x);
  MOE_CHECK(x.ndim() == 4, op, ": 'x' must be 4-D (S, B, heads, hd), got ", x.desc());
  const int64_t S = x.size(0), B = x.size(1), heads = x.size(2), hd = x.size(3);
  MOE_CHECK(rd >= 0 && rd % 2 == 0 && rd <= hd, op, ": the rotary dims must be even and in [0, hd = ", hd,
            "], got rd = ", rd);
  MOE_CHECK(std::isfinite(base) && base > 0.0, op, ": the rotary base must be finite and > 0, got ", base);
  need_like(op, "y", y, x.shape(), x.dtype());
  need_index(op, "positions", positions, S);
  same_device(op, x, {&positions, &y});
  RopeArgs a;
  a.dtype = x.dtype();
  a.S = S;
  a.B = B;
  a.heads = heads;
  a.hd = hd;
  a.rd = rd;
  a.base = base;
  a.inverse = inverse;
  a.positions = positions.data_as<int64_t>();
  a.x = x.data();
  a.y = y.data();
  need(table(x.device()).rope, x.device(), op)(a, exec_ctx(x.device()));
  sanitize::check_op(op, {{"y", &y}}, {{"x", &x}});
}

// ---------------------------------------------------------------------------------------------
void embedding_fwd(const Tensor& ids, const Tensor& table_, int64_t vocab_start, Tensor& out, bool accumulate) {
  const char* op = "embedding_fwd";
  need_2d(op, "table", table_);
  need_float(op, "table", table_);
  need_defined(op, "ids", ids);
  MOE_CHECK(ids.ndim() == 1, op, ": 'ids' must be 1-D (n), got ", ids.desc());
  need_index(op, "ids", ids, ids.size(0));
  need_vocab_start(op, vocab_start);
  const int64_t n = ids.size(0), V = table_.size(0), H = table_.size(1);
  need_like(op, "out", out, {n, H}, table_.dtype());
  same_device(op, table_, {&ids, &out});
  EmbeddingArgs a;
  a.dtype = table_.dtype();
  a.n = n;
  a.V = V;
  a.H = H;
  a.vocab_start = vocab_start;
  a.accumulate = accumulate;
  a.ids = ids.data_as<int64_t>();
  a.table = table_.data();
  a.out = out.data();
  need(table(table_.device()).embedding_fwd, table_.device(), op)(a, exec_ctx(table_.device()));
  sanitize::check_op(op, {{"out", &out}}, {{"table", &table_}});
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, int64_t vocab_start, Tensor& dtable) {
  const char* op = "embedding_bwd";
  need_2d(op, "dtable", dtable);
  need_float(op, "dtable", dtable);
  need_defined(op, "ids", ids);
  MOE_CHECK(ids.ndim() == 1, op, ": 'ids' must be 1-D (n), got ", ids.desc());
  need_index(op, "ids", ids, ids.size(0));
  need_vocab_start(op, vocab_start);
  const int64_t n = ids.size(0), V = dtable.size(0), H = dtable.size(1);
  need_like(op, "dout", dout, {n, H}, dtable.dtype());
  same_device(op, dtable, {&ids, &dout});
  EmbeddingArgs a;
  a.dtype = dtable.dtype();
  a.n = n;
  a.V = V;
  a.H = H;
  a.vocab_start = vocab_start;
  a.ids = ids.data_as<int64_t>();
  a.dout = dout.data();
  a.dtable = dtable.data();
  need(table(dtable.device()).embedding_bwd, dtable.device(), op)(a, exec_ctx(dtable.device()));
  sanitize::check_op(op, {{"dtable", &dtable}}, {{"dout", &dout}});
}

// ---------------------------------------------------------------------------------------------
namespace {
// logits (n, V) with V >= 1; returns n.
int64_t check_logits(const char* op, const Tensor& logits) {
  need_2d(op, "logits", logits);
  need_float(op, "logits", logits);
  MOE_CHECK(logits.size(1) >= 1, op, ": the vocabulary slice must hold at least one id, got logits ", logits.desc());
  return logits.size(0);
}
}  // namespace

void xent_max(const Tensor& logits, Tensor& row_max) {
  const char* op = "xent_max";
  const int64_t n = check_logits(op, logits);
  need_stat(op, "row_max", row_max, n, logits.dtype());
  same_device(op, logits, {&row_max});
  XentArgs a;
  a.dtype = logits.dtype();
  a.n = n;
  a.V = logits.size(1);
  a.logits = logits.data();
  a.row_max = row_max.data();
  need(table(logits.device()).xent_max, logits.device(), op)(a, exec_ctx(logits.device()));
  sanitize::check_op(op, {{"row_max", &row_max}}, {{"logits", &logits}});
}

void xent_sum(const Tensor& logits, const Tensor& labels, int64_t vocab_start, const Tensor& row_max, Tensor& sum_exp,
              Tensor& target) {
  const char* op = "xent_sum";
  const int64_t n = check_logits(op, logits);
  need_index(op, "labels", labels, n);
  need_vocab_start(op, vocab_start);
  need_stat(op, "row_max", row_max, n, logits.dtype());
  need_stat(op, "sum_exp", sum_exp, n, logits.dtype());
  need_stat(op, "target", target, n, logits.dtype());
  same_device(op, logits, {&labels, &row_max, &sum_exp, &target});
  XentArgs a;
  a.dtype = logits.dtype();
  a.n = n;
  a.V = logits.size(1);
  a.vocab_start = vocab_start;
  a.logits = logits.data();
  a.labels = labels.data_as<int64_t>();
  a.row_max = row_max.data();
  a.sum_exp = sum_exp.data();
  a.target = target.data();
  need(table(logits.device()).xent_sum, logits.device(), op)(a, exec_ctx(logits.device()));
  sanitize::check_op(op, {{"sum_exp", &sum_exp}, {"target", &target}}, {{"logits", &logits}});
}

void xent_bwd(const Tensor& logits, const Tensor& labels, int64_t vocab_start, const Tensor& row_max,
              const Tensor& sum_exp, const Tensor& grad, Tensor& dlogits) {
  const char* op = "xent_bwd";
  const int64_t n = check_logits(op, logits);
  need_index(op, "labels", labels, n);
  need_vocab_start(op, vocab_start);
  need_stat(op, "row_max", row_max, n, logits.dtype());
  need_stat(op, "sum_exp", sum_exp, n, logits.dtype());
  need_stat(op, "grad", grad, n, logits.dtype());
  need_like(op, "dlogits", dlogits, logits.shape(), logits.dtype());
  same_device(op, logits, {&labels, &row_max, &sum_exp, &grad, &dlogits});
  XentArgs a;
  a.dtype = logits.dtype();
  a.n = n;
  a.V = logits.size(1);
  a.vocab_start = vocab_start;
  a.logits = logits.data();
  a.labels = labels.data_as<int64_t>();
  a.row_max = row_max.data();  // read only in the backward
  a.sum_exp = sum_exp.data();
  a.grad = grad.data();
  a.dlogits = dlogits.data();
  need(table(logits.device()).xent_bwd, logits.device(), op)(a, exec_ctx(logits.device()));
  sanitize::check_op(op, {{"dlogits", &dlogits}}, {{"grad", &grad}});
}

// ---------------------------------------------------------------------------------------------
namespace {
void check_groups(const char* op, int64_t ng, int64_t q_per_group) {
  MOE_CHECK(ng >= 1, op, ": the number of query groups must be >= 1, got ", ng);
  MOE_CHECK(q_per_group >= 1, op, ": the query heads per group must be >= 1, got ", q_per_group);
}

// q (rows, ng·qpg, hd), k, v (rows, ng, hd), qkv (rows, ng·(qpg + 2)·hd), one dtype.
void check_qkv(const char* op, const Tensor& qkv, int64_t ng, int64_t qpg, const Tensor& q, const Tensor& k,
               const Tensor& v, int64_t rows, int64_t hd) {
  const DType dt = qkv.dtype();
  need_like(op, "qkv", qkv, {rows, ng * (qpg + 2) * hd}, dt);
  need_like(op, "q", q, {rows, ng * qpg, hd}, dt);
  need_like(op, "k", k, {rows, ng, hd}, dt);
  need_like(op, "v", v, {rows, ng, hd}, dt);
  same_device(op, qkv, {&q, &k, &v});
}

void run_qkv(const char* op, bool merge, const Tensor& qkv, int64_t ng, int64_t qpg, const Tensor& q, const Tensor& k,
             const Tensor& v, int64_t rows, int64_t hd) {
  QkvArgs a;
  a.dtype = qkv.dtype();
  a.rows = rows;
  a.ng = ng;
  a.q_per_group = qpg;
  a.hd = hd;
  a.merge = merge;
  a.qkv = qkv.data();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  need(table(qkv.device()).qkv, qkv.device(), op)(a, exec_ctx(qkv.device()));
}
}  // namespace

void qkv_split(const Tensor& qkv, int64_t ng, int64_t q_per_group, Tensor& q, Tensor& k, Tensor& v) {
  const char* op = "qkv_split";
  need_2d(op, "qkv", qkv);
  check_groups(op, ng, q_per_group);
  const int64_t rows = qkv.size(0), W = qkv.size(1), per = ng * (q_per_group + 2);
  MOE_CHECK(W % per == 0, op, ": the qkv width ", W, " is not ng·(q_per_group + 2)·hd for ng = ", ng,
            ", q_per_group = ", q_per_group, " (", per, " heads); got qkv ", qkv.desc());
  const int64_t hd = W / per;
  check_qkv(op, qkv, ng, q_per_group, q, k, v, rows, hd);
  run_qkv(op, false, qkv, ng, q_per_group, q, k, v, rows, hd);
}

void qkv_merge(const Tensor& q, const Tensor& k, const Tensor& v, int64_t ng, int64_t q_per_group, Tensor& qkv) {
  const char* op = "qkv_merge";
  need_defined(op, "q", q);
  MOE_CHECK(q.ndim() == 3, op, ": 'q' must be 3-D (rows, ng·q_per_group, hd), got ", q.desc());
  check_groups(op, ng, q_per_group);
  const int64_t rows = q.size(0), hd = q.size(2);
  need_defined(op, "qkv", qkv);
  MOE_CHECK(qkv.dtype() == q.dtype(), op, ": 'qkv' must be ", dtype_name(q.dtype()), " like q, got ", qkv.desc());
  check_qkv(op, qkv, ng, q_per_group, q, k, v, rows, hd);
  run_qkv(op, true, qkv, ng, q_per_group, q, k, v, rows, hd);
}

}  // namespace moe::ops
