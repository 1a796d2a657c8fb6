// The checks every Tensor-level op wrapper makes before it builds its Args (shared by ops.cpp and
// the transformer ops in ops_model.cpp / ops_attention.cpp). Internal.
#pragma once
#include <initializer_list>

#include "core/sanitize.h"
#include "kernels/ops.h"
#include "moecore/backend.h"
#include "moecore/tensor.h"

namespace moe::ops {

inline const KernelTable& table(Device d) { return get_backend(d).kernels(); }

template <class Fn>
inline Fn need(Fn fn, Device d, const char* op) {
  MOE_CHECK_CODE(fn != nullptr, ErrorCode::not_supported, op, ": backend ", get_backend(d).name(),
                 " has no kernel for this op");
  return fn;
}

inline void same_device(const char* op, const Tensor& ref, std::initializer_list<const Tensor*> others) {
  for (const Tensor* t : others) {
    if (!t || !t->defined()) continue;
    MOE_CHECK(t->device() == ref.device(), op, ": all tensors must be on ", ref.device().str(), ", got ",
              t->desc());
  }
}

inline void need_defined(const char* op, const char* name, const Tensor& t) {
  MOE_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
}

inline void need_float(const char* op, const char* name, const Tensor& t) {
  need_defined(op, name, t);
  MOE_CHECK(dtype_is_float(t.dtype()), op, ": '", name, "' must be a float tensor, got ", t.desc());
}

inline void need_router_dtype(const char* op, const Tensor& t) {
  MOE_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, op,
            ": router tensors must be f32 or f64, got ", t.desc());
}

inline void need_2d(const char* op, const char* name, const Tensor& t) {
  need_defined(op, name, t);
  MOE_CHECK(t.ndim() == 2, op, ": '", name, "' must be 2-D, got ", t.desc());
}

// The checks and arguments of a permute (ops::permute and ops::permute_dev): row_id_map (T, E) i32,
// in (T, H), out (N, H), optional probs (T, E) with out_probs (N). Defined in ops.cpp.
PermuteArgs permute_args(const char* op, const Tensor& rid, const Tensor& in, Tensor& out, const Tensor* probs,
                         Tensor* out_probs);
// The checks and arguments of an unpermute (ops::unpermute, ops::unpermute2): row_id_map (T, E) i32,
// in (N, H), optional in2 (N2, H) of in's dtype, out (T, H), optional row_weights (N) with
// row_weights2 (N2) when in2 is given. Defined in ops.cpp.
UnpermuteArgs unpermute_args(const char* op, const Tensor& rid, const Tensor& in, const Tensor* in2, Tensor& out,
                             const Tensor* row_weights, const Tensor* row_weights2);
// The checks and arguments of the activations (act_fwd / act_bwd and their _dev forms): in (rows, F1)
// with F1 = 2F under a GLU, out / dout (rows, F), din like in, optional row_scale / drow_scale (rows).
ActFwdArgs act_fwd_args(const char* op, Activation act, bool glu, const Tensor& in, const Tensor* row_scale,
                        Tensor& out);
ActBwdArgs act_bwd_args(const char* op, Activation act, bool glu, const Tensor& in, const Tensor* row_scale,
                        const Tensor& dout, Tensor& din, Tensor* drow_scale);
// The pointers and sizes of a grouped GEMM whose shapes were checked by the caller.
GroupedGemmArgs grouped_gemm_args(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C, int64_t G,
                                  int64_t M, int64_t N, int64_t K, bool accumulate);

}  // namespace moe::ops
