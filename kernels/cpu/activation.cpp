// Expert activations with the routing-prob multiply on the CPU (DESIGN.md §7).
//   silu(x)  = x·σ(x)                     silu'(x)  = σ(x)·(1 + x·(1 − σ(x)))
//   gelu(x)  = x·Φ(x) = ½x(1 + erf(x/√2))  gelu'(x)  = Φ(x) + x·φ(x),  φ(x) = exp(−x²/2)/√(2π)
//   relu2(x) = max(x, 0)²                 relu2'(x) = 2·max(x, 0)
// glu: the input row is [a | b] (F each) and out = act(a)·b·s; otherwise out = act(x)·s, with
// s = row_scale[r] (the routing prob) or 1. The backward reads dout and the same input:
//   g = dout·s;  glu: da = g·b·act'(a), db = g·act(a);  else: dx = g·act'(x)
//   drow_scale[r] = Σ_f dout·act(a)·b  (or Σ_f dout·act(x)): ∂out/∂s, computed without dividing by s.
// Compute is f32 for f32/bf16/f16 storage and f64 for f64; rows are independent, so the row loop
// is split over threads with no effect on the result.
#include <cmath>
#include <type_traits>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"

namespace moe {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

namespace {

constexpr int64_t kParallelElems = int64_t{1} << 14;

template <class A>
struct Silu {
  static A f(A x) { return x / (A(1) + std::exp(-x)); }
  static A df(A x) {
    A s = A(1) / (A(1) + std::exp(-x));
    return s * (A(1) + x * (A(1) - s));
  }
};
template <class A>
struct Gelu {
  static constexpr A kInvSqrt2 = A(0.70710678118654752440);
  static constexpr A kInvSqrt2Pi = A(0.39894228040143267794);
  static A f(A x) { return A(0.5) * x * (A(1) + std::erf(x * kInvSqrt2)); }
  static A df(A x) { return A(0.5) * (A(1) + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(A(-0.5) * x * x); }
};
template <class A>
struct Relu2 {
  static A f(A x) {
    A r = x > A(0) ? x : A(0);
    return r * r;
  }
  static A df(A x) { return x > A(0) ? A(2) * x : A(0); }
};

// Calls f(Act<A>{}) for the activation.
template <class A, class F>
void dispatch_act(Activation act, F&& f) {
  switch (act) {
    case Activation::silu: return f(Silu<A>{});
    case Activation::gelu: return f(Gelu<A>{});
    case Activation::relu2: return f(Relu2<A>{});
  }
  MOE_THROW(ErrorCode::invalid_argument, "activation: unknown activation ", static_cast<int>(act));
}

// Calls f(S{}) with S the scale's C++ type, or f(nullptr) when there is no scale.
template <class F>
void dispatch_scale(DType dt, bool present, const char* op, F&& f) {
  if (!present) return f(nullptr);
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": row scale dtype must be f32 or f64, got ", dtype_name(dt));
}

template <class A, class S>
A row_scale_of(const void* scale, int64_t r) {
  if constexpr (std::is_same_v<S, std::nullptr_t>)
    return A(1);
  else
    return static_cast<A>(static_cast<const S*>(scale)[r]);
}

}  // namespace

void cpu_act_fwd(const ActFwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "act_fwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr, "act_fwd", [&](auto stag) {
      using S = decltype(stag);
      dispatch_act<A>(a.act, [&](auto fn) {
        using Fn = decltype(fn);
        const int64_t F = a.F, in_w = a.glu ? 2 * F : F;
        const T* in = static_cast<const T*>(a.in);
        T* out = static_cast<T*>(a.out);
#pragma omp parallel for schedule(static) if (a.rows * F > kParallelElems)
        for (int64_t r = 0; r < a.rows; ++r) {
          const A s = row_scale_of<A, S>(a.row_scale, r);
          const T* x = in + r * in_w;
          T* o = out + r * F;
          if (a.glu) {
            for (int64_t f = 0; f < F; ++f) o[f] = from_acc<T>(Fn::f(to_acc(x[f])) * to_acc(x[F + f]) * s);
          } else {
            for (int64_t f = 0; f < F; ++f) o[f] = from_acc<T>(Fn::f(to_acc(x[f])) * s);
          }
        }
      });
    });
  });
}

void cpu_act_bwd(const ActBwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "act_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    // One scale type for row_scale and drow_scale (the wrapper checks they agree).
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr || a.drow_scale != nullptr, "act_bwd", [&](auto stag) {
      using S = decltype(stag);
      dispatch_act<A>(a.act, [&](auto fn) {
        using Fn = decltype(fn);
        const int64_t F = a.F, in_w = a.glu ? 2 * F : F;
        const T* in = static_cast<const T*>(a.in);
        const T* dout = static_cast<const T*>(a.dout);
        T* din = static_cast<T*>(a.din);
#pragma omp parallel for schedule(static) if (a.rows * F > kParallelElems)
        for (int64_t r = 0; r < a.rows; ++r) {
          const A s = a.row_scale ? row_scale_of<A, S>(a.row_scale, r) : A(1);
          const T* x = in + r * in_w;
          const T* dy = dout + r * F;
          T* dx = din + r * in_w;
          A ds = 0;
          if (a.glu) {
            for (int64_t f = 0; f < F; ++f) {
              const A av = to_acc(x[f]), bv = to_acc(x[F + f]), d = to_acc(dy[f]);
              const A act = Fn::f(av), g = d * s;
              dx[f] = from_acc<T>(g * bv * Fn::df(av));
              dx[F + f] = from_acc<T>(g * act);
              ds += d * act * bv;
            }
          } else {
            for (int64_t f = 0; f < F; ++f) {
              const A xv = to_acc(x[f]), d = to_acc(dy[f]);
              dx[f] = from_acc<T>(d * s * Fn::df(xv));
              ds += d * Fn::f(xv);
            }
          }
          if constexpr (!std::is_same_v<S, std::nullptr_t>) {
            if (a.drow_scale) static_cast<S*>(a.drow_scale)[r] = static_cast<S>(ds);
          }
        }
      });
    });
  });
}

}  // namespace moe
