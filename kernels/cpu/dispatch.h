// Element access for CPU kernels: load any float storage type as its compute type, store back.
#pragma once
#include "kernels/ops.h"
#include "moecore/error.h"

namespace moe::cpu {

template <class T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };
template <class T> using acc_t = typename acc_of<T>::type;

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return bf16_to_float(v); }
inline float to_acc(f16 v) { return f16_to_float(v); }

template <class T, class A> inline T from_acc(A v);
template <> inline float from_acc<float, float>(float v) { return v; }
template <> inline float from_acc<float, double>(double v) { return static_cast<float>(v); }
template <> inline double from_acc<double, double>(double v) { return v; }
template <> inline double from_acc<double, float>(float v) { return v; }
template <> inline bf16 from_acc<bf16, float>(float v) { return float_to_bf16(v); }
template <> inline bf16 from_acc<bf16, double>(double v) { return float_to_bf16(static_cast<float>(v)); }
template <> inline f16 from_acc<f16, float>(float v) { return float_to_f16(v); }
template <> inline f16 from_acc<f16, double>(double v) { return float_to_f16(static_cast<float>(v)); }

// Calls f(T{}) with T the C++ type of a float dtype: f32, f64, bf16, f16.
template <class F>
decltype(auto) dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    case DType::bf16: return f(bf16{});
    case DType::f16: return f(f16{});
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": the CPU backend has no kernel for dtype ", dtype_name(dt));
}

// Same, restricted to the router dtypes f32 and f64.
template <class F>
decltype(auto) dispatch_router(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": router dtype must be f32 or f64, got ", dtype_name(dt));
}

}  // namespace moe::cpu
