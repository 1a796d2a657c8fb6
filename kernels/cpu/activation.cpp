// Expert activations with the routing-prob multiply on the CPU (docs/moe.md).
//   silu(x)  = x·σ(x)                     silu'(x)  = σ(x)·(1 + x·(1 − σ(x)))
//   gelu(x)  = x·Φ(x) = ½x(1 + erf(x/√2))  gelu'(x)  = Φ(x) + x·φ(x),  φ(x) = exp(−x²/2)/√(2π)
//   relu2(x) = max(x, 0)²                 relu2'(x) = 2·max(x, 0)
// glu: the input row is [a | b] (F each) and out = act(a)·b·s; otherwise out = act(x)·s, with
// s = row_scale[r] (the routing prob) or 1. The backward reads dout and the same input:
//   g = dout·s;  glu: da = g·b·act'(a), db = g·act(a);  else: dx = g·act'(x)
//   drow_scale[r] = Σ_f dout·act(a)·b  (or Σ_f dout·act(x)): ∂out/∂s, computed without dividing by s.
// Compute is f32 for f32/bf16/f16 storage and f64 for f64; rows are independent, so the row loop
// is split over threads with no effect on the result.
//
// f32 and bf16 silu (swiglu and plain) take a vectorised path (bf16 loaded into f32 lanes by a
// shift, computed in f32, rounded once to nearest-even on the store, as float_to_bf16 does): σ from a polynomial exp (Cephes' expf
// coefficients, within 2 ulp of expf over the clamped range, NaN in gives NaN out), rows in blocks
// of 16 lanes, the drow_scale sum kept in 16 lane sums added in a fixed order, and the row
// functions compiled for x86-64-v4 / v3 / baseline with the best picked at load time
// (target_clones). Each output element is the same arithmetic whichever lane or thread computes
// it, so results do not depend on the thread count. The backward reads each element (and its GLU
// partner) before it writes it, so din may be the same buffer as in (the experts' backward
// overwrites fc1's output with its gradient on the CPU).
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

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

// ---- the vectorised f32 / bf16 silu path (kernels/cpu/simd.h: 16-lane vectors, polynomial exp) ----
using namespace cpu::simd;

// o (F) = silu(x_a) · x_b · s (glu: x = [a | b]) or silu(x) · s. T: f32 or bf16 storage.
template <class T>
MOE_SIMD_INLINE void silu_fwd_row_impl(const T* x, float s, T* o, int64_t F, bool glu) {
  const T* xb = glu ? x + F : nullptr;
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
    const vf a = load(x + f);
    vf y = a * sigmoid_f32(a);
    if (xb) y = y * load(xb + f);
    store(o + f, y * s);
  }
  if (f < F) {
    const int64_t n = F - f;
    const vf a = load_part(x + f, n, 0.0f);
    vf y = a * sigmoid_f32(a);
    if (xb) y = y * load_part(xb + f, n, 0.0f);
    store_part(o + f, y * s, n);
  }
}

// 16 lanes of the backward: a, b (the GLU partner; 1 without), d = dout → dx_a, dx_b, and
// acc += dout · act · b (∂o/∂s summed lane-wise).
MOE_SIMD_INLINE void silu_bwd_block(vf a, vf b, vf d, float s, vf& da, vf& db, vf& acc) {
  const vf sg = sigmoid_f32(a);
  const vf act = a * sg, dact = sg * (1.0f + a * (1.0f - sg)), g = d * s;
  da = g * b * dact;
  db = g * act;
  acc += d * act * b;
}

// dx = ∂o/∂x · dy for the row (dx may be x itself: every block is loaded before it is stored);
// returns Σ_f dy · o / s, the lane sums added in a fixed order.
template <class T>
MOE_SIMD_INLINE float silu_bwd_row_impl(const T* x, float s, const T* dy, T* dx, int64_t F, bool glu) {
  vf acc = splat(0.0f), da, db;
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
    const vf b = glu ? load(x + F + f) : splat(1.0f);
    silu_bwd_block(load(x + f), b, load(dy + f), s, da, db, acc);
    store(dx + f, da);
    if (glu) store(dx + F + f, db);
  }
  if (f < F) {  // the tail, zero-padded: the padding adds exact zeros to acc
    const int64_t n = F - f;
    const vf b = glu ? load_part(x + F + f, n, 0.0f) : splat(1.0f);
    silu_bwd_block(load_part(x + f, n, 0.0f), b, load_part(dy + f, n, 0.0f), s, da, db, acc);
    store_part(dx + f, da, n);
    if (glu) store_part(dx + F + f, db, n);
  }
  float ds = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) ds += acc[i];
  return ds;
}

// The row functions, one clone set per storage type.
MOE_SIMD_CLONES void silu_fwd_row(const float* x, float s, float* o, int64_t F, bool glu) {
  silu_fwd_row_impl(x, s, o, F, glu);
}
MOE_SIMD_CLONES void silu_fwd_row(const bf16* x, float s, bf16* o, int64_t F, bool glu) {
  silu_fwd_row_impl(x, s, o, F, glu);
}
MOE_SIMD_CLONES float silu_bwd_row(const float* x, float s, const float* dy, float* dx, int64_t F, bool glu) {
  return silu_bwd_row_impl(x, s, dy, dx, F, glu);
}
MOE_SIMD_CLONES float silu_bwd_row(const bf16* x, float s, const bf16* dy, bf16* dx, int64_t F, bool glu) {
  return silu_bwd_row_impl(x, s, dy, dx, F, glu);
}

}  // namespace

void cpu_act_fwd(const ActFwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "act_fwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr, "act_fwd", [&](auto stag) {
      using S = decltype(stag);
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (a.act == Activation::silu) {
          const int64_t F = a.F, in_w = a.glu ? 2 * F : F;
          const T* in = static_cast<const T*>(a.in);
          T* out = static_cast<T*>(a.out);
#pragma omp parallel for schedule(static) if (a.rows * F > kParallelElems)
          for (int64_t r = 0; r < a.rows; ++r)
            silu_fwd_row(in + r * in_w, row_scale_of<float, S>(a.row_scale, r), out + r * F, F, a.glu);
          return;
        }
      }
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
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (a.act == Activation::silu) {
          const int64_t F = a.F, in_w = a.glu ? 2 * F : F;
          const T* in = static_cast<const T*>(a.in);
          const T* dout = static_cast<const T*>(a.dout);
          T* din = static_cast<T*>(a.din);
#pragma omp parallel for schedule(static) if (a.rows * F > kParallelElems)
          for (int64_t r = 0; r < a.rows; ++r) {
            const float s = a.row_scale ? row_scale_of<float, S>(a.row_scale, r) : 1.0f;
            const float ds = silu_bwd_row(in + r * in_w, s, dout + r * F, din + r * in_w, F, a.glu);
            if constexpr (!std::is_same_v<S, std::nullptr_t>) {
              if (a.drow_scale) static_cast<S*>(a.drow_scale)[r] = static_cast<S>(ds);
            }
          }
          return;
        }
      }
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
