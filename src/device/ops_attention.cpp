// The Tensor-level wrappers of attention (kernels/ops.h: AttnFwdArgs / AttnBwdArgs): check every
// shape, dtype and device, name what was expected and what came, then call the tensor's backend.
#include <cmath>

#include "device/ops.h"
#include "device/ops_check.h"

namespace moe::ops {

namespace {

struct AttnDims {
  int64_t Sq, Sk, B, nq, nkv, hd;
};

// q (Sq, B, nq, hd), k/v (Sk, B, nkv, hd) of one float dtype, nq a positive multiple of nkv,
// q_pos (Sq) / k_pos (Sk) i64, a finite scale, one device.
AttnDims check_inputs(const char* op, double scale, const Tensor& q_pos, const Tensor& k_pos, const Tensor& q,
                      const Tensor& k, const Tensor& v) {
  need_float(op, "q", q);
  need_defined(op, "k", k);
  need_defined(op, "v", v);
  MOE_CHECK(q.ndim() == 4, op, ": 'q' must be 4-D (Sq, B, nq, hd), got ", q.desc());
  MOE_CHECK(k.ndim() == 4, op, ": 'k' must be 4-D (Sk, B, nkv, hd), got ", k.desc());
  const AttnDims d{q.size(0), k.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  MOE_CHECK(k.size(1) == d.B && k.size(3) == d.hd, op, ": 'k' must be (Sk, B=", d.B, ", nkv, hd=", d.hd,
            ") to match q ", q.desc(), ", got ", k.desc());
  MOE_CHECK(v.shape() == k.shape(), op, ": 'v' must have the shape of k ", shape_str(k.shape()), ", got ",
            v.desc());
  MOE_CHECK(d.hd >= 1, op, ": the head dimension must be at least 1, got q ", q.desc());
  MOE_CHECK(d.nkv >= 1 && d.nq >= d.nkv && d.nq % d.nkv == 0, op, ": the ", d.nq,
            " query heads of q must be a positive multiple of the ", d.nkv, " key/value heads of k, got q ",
            q.desc(), ", k ", k.desc());
  MOE_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), op, ": dtypes differ: q ", q.desc(), ", k ",
            k.desc(), ", v ", v.desc());
  need_defined(op, "q_pos", q_pos);
  need_defined(op, "k_pos", k_pos);
  MOE_CHECK(q_pos.dtype() == DType::i64 && q_pos.ndim() == 1 && q_pos.size(0) == d.Sq, op,
            ": 'q_pos' must be (Sq=", d.Sq, ") i64, got ", q_pos.desc());
  MOE_CHECK(k_pos.dtype() == DType::i64 && k_pos.ndim() == 1 && k_pos.size(0) == d.Sk, op,
            ": 'k_pos' must be (Sk=", d.Sk, ") i64, got ", k_pos.desc());
  MOE_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  same_device(op, q, {&k, &v, &q_pos, &k_pos});
  return d;
}

// `t` must be `shape` in `dtype`.
void need_like(const char* op, const char* name, const Tensor& t, const Shape& shape, DType dtype) {
  need_defined(op, name, t);
  MOE_CHECK(t.shape() == shape && t.dtype() == dtype, op, ": '", name, "' must be ", shape_str(shape), " ",
            dtype_name(dtype), ", got ", t.desc());
}

}  // namespace

void attention_fwd(double scale, const Tensor& q_pos, const Tensor& k_pos, const Tensor& q, const Tensor& k,
                   const Tensor& v, Tensor& o, Tensor& lse) {
  const char* op = "attention_fwd";
  const AttnDims d = check_inputs(op, scale, q_pos, k_pos, q, k, v);
  need_like(op, "o", o, q.shape(), q.dtype());
  need_like(op, "lse", lse, {d.B, d.nq, d.Sq}, stat_dtype_for(q.dtype()));
  same_device(op, q, {&o, &lse});
  AttnFwdArgs a;
  a.dtype = q.dtype();
  a.Sq = d.Sq;
  a.Sk = d.Sk;
  a.B = d.B;
  a.nq = d.nq;
  a.nkv = d.nkv;
  a.hd = d.hd;
  a.scale = scale;
  a.q_pos = q_pos.data_as<int64_t>();
  a.k_pos = k_pos.data_as<int64_t>();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  need(table(q.device()).attn_fwd, q.device(), op)(a, exec_ctx(q.device()));
  sanitize::check_op(op, {{"o", &o}, {"lse", &lse}}, {{"q", &q}, {"k", &k}, {"v", &v}});
}

void attention_bwd(double scale, const Tensor& q_pos, const Tensor& k_pos, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                   Tensor& dv) {
  const char* op = "attention_bwd";
  const AttnDims d = check_inputs(op, scale, q_pos, k_pos, q, k, v);
  need_like(op, "o", o, q.shape(), q.dtype());
  need_like(op, "lse", lse, {d.B, d.nq, d.Sq}, stat_dtype_for(q.dtype()));
  need_like(op, "dout", dout, q.shape(), q.dtype());
  need_like(op, "dq", dq, q.shape(), q.dtype());
  need_like(op, "dk", dk, k.shape(), q.dtype());
  need_like(op, "dv", dv, k.shape(), q.dtype());
  same_device(op, q, {&o, &lse, &dout, &dq, &dk, &dv});
  AttnBwdArgs a;
  a.dtype = q.dtype();
  a.Sq = d.Sq;
  a.Sk = d.Sk;
  a.B = d.B;
  a.nq = d.nq;
  a.nkv = d.nkv;
  a.hd = d.hd;
  a.scale = scale;
  a.q_pos = q_pos.data_as<int64_t>();
  a.k_pos = k_pos.data_as<int64_t>();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.o = o.data();
  a.lse = lse.data();
  a.dout = dout.data();
  a.dq = dq.data();
  a.dk = dk.data();
  a.dv = dv.data();
  need(table(q.device()).attn_bwd, q.device(), op)(a, exec_ctx(q.device()));
  sanitize::check_op(op, {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}}, {{"q", &q}, {"k", &k}, {"v", &v}, {"dout", &dout}});
}

}  // namespace moe::ops
