// The checks every Tensor-level op wrapper makes before it builds its Args (shared by ops.cpp and
// the transformer ops in ops_model.cpp / ops_attention.cpp). Internal.
#pragma once
#include <initializer_list>

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

}  // namespace moe::ops
