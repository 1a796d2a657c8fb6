// Expert activations with the routing-prob multiply on CUDA (DESIGN.md §7), the same formulas as the
// CPU reference (kernels/cpu/activation.cpp):
//   silu(x)  = x / (1 + e^−x)               silu'(x)  = σ(x)·(1 + x·(1 − σ(x)))
//   gelu(x)  = ½x(1 + erf(x/√2))            gelu'(x)  = ½(1 + erf(x/√2)) + x·φ(x)
//   relu2(x) = max(x, 0)²                   relu2'(x) = 2·max(x, 0)
// glu: the input row is [a | b] (F each), out = act(a)·b·s; otherwise out = act(x)·s, s = row_scale[r]
// or 1. Backward: g = dout·s; glu: da = g·b·act'(a), db = g·act(a); else dx = g·act'(x);
// drow_scale[r] = Σ_f dout·act(a)·b (or Σ_f dout·act(x)).
// Forward: a grid-stride loop over rows·F. Backward: one warp per row (the drow_scale sum is a fixed
// lane-partial + shuffle-tree order, so it repeats bit for bit).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 4;  // act_bwd: one warp per row

template <class A>
struct Silu {
  static __device__ __forceinline__ A f(A x) { return x / (A(1) + d_exp(-x)); }
  static __device__ __forceinline__ A df(A x) {
    const A s = A(1) / (A(1) + d_exp(-x));
    return s * (A(1) + x * (A(1) - s));
  }
};
template <class A>
struct Gelu {
  static __device__ __forceinline__ A f(A x) { return A(0.5) * x * (A(1) + d_erf(x * A(0.70710678118654752440))); }
  static __device__ __forceinline__ A df(A x) {
    return A(0.5) * (A(1) + d_erf(x * A(0.70710678118654752440))) +
           x * A(0.39894228040143267794) * d_exp(A(-0.5) * x * x);
  }
};
template <class A>
struct Relu2 {
  static __device__ __forceinline__ A f(A x) {
    const A r = x > A(0) ? x : A(0);
    return r * r;
  }
  static __device__ __forceinline__ A df(A x) { return x > A(0) ? A(2) * x : A(0); }
};

template <class A, class F>
void dispatch_act(Activation act, F&& f) {
  switch (act) {
    case Activation::silu: f(TypeTag<Silu<A>>{}); return;
    case Activation::gelu: f(TypeTag<Gelu<A>>{}); return;
    case Activation::relu2: f(TypeTag<Relu2<A>>{}); return;
  }
  MOE_THROW(ErrorCode::invalid_argument, "activation: unknown activation ", static_cast<int>(act));
}

// Scale dtype S (f32 / f64); float when there is no scale at all (the pointers are then null).
template <class F>
void dispatch_scale(DType dt, bool present, const char* op, F&& f) {
  if (!present) {
    f(TypeTag<float>{});
    return;
  }
  dispatch_f32_f64(dt, op, "row scale", f);
}

template <class T, class S, class Fn>
__global__ void __launch_bounds__(kThreads)
    act_fwd_kernel(const T* __restrict__ in, const S* __restrict__ row_scale, T* __restrict__ out, int64_t rows,
                   int64_t F, bool glu) {
  using A = acc_t<T>;
  const int64_t n = rows * F, in_w = glu ? 2 * F : F;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i - r * F;
    const A s = row_scale ? static_cast<A>(row_scale[r]) : A(1);
    const T* x = in + r * in_w;
    const A v = glu ? Fn::f(to_acc(x[f])) * to_acc(x[F + f]) * s : Fn::f(to_acc(x[f])) * s;
    out[i] = from_acc<T>(v);
  }
}

template <class T, class S, class Fn>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    act_bwd_kernel(const T* __restrict__ in, const S* __restrict__ row_scale, const T* __restrict__ dout,
                   T* __restrict__ din, S* __restrict__ drow_scale, int64_t rows, int64_t F, bool glu) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;  // a whole warp leaves together
  const int64_t in_w = glu ? 2 * F : F;
  const A s = row_scale ? static_cast<A>(row_scale[r]) : A(1);
  const T* x = in + r * in_w;
  const T* dy = dout + r * F;
  T* dx = din + r * in_w;
  A ds = 0;
  for (int64_t f = lane; f < F; f += kWarp) {
    if (glu) {
      const A av = to_acc(x[f]), bv = to_acc(x[F + f]), d = to_acc(dy[f]);
      const A act = Fn::f(av), g = d * s;
      dx[f] = from_acc<T>(g * bv * Fn::df(av));
      dx[F + f] = from_acc<T>(g * act);
      ds += d * act * bv;
    } else {
      const A xv = to_acc(x[f]), d = to_acc(dy[f]);
      dx[f] = from_acc<T>(d * s * Fn::df(xv));
      ds += d * Fn::f(xv);
    }
  }
  ds = warp_sum(ds);
  if (drow_scale && lane == 0) drow_scale[r] = static_cast<S>(ds);
}

}  // namespace

void cuda_act_fwd(const ActFwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "act_fwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr, op, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_act<acc_t<T>>(a.act, [&](auto ftag) {
        using Fn = typename decltype(ftag)::type;
        const int64_t n = a.rows * a.F;
        if (n == 0) return;
        act_fwd_kernel<T, S, Fn><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(
            static_cast<const T*>(a.in), static_cast<const S*>(a.row_scale), static_cast<T*>(a.out), a.rows, a.F,
            a.glu);
        MOE_CUDA_CHECK_LAUNCH("act_fwd_kernel");
      });
    });
  });
}

void cuda_act_bwd(const ActBwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "act_bwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr || a.drow_scale != nullptr, op, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_act<acc_t<T>>(a.act, [&](auto ftag) {
        using Fn = typename decltype(ftag)::type;
        if (a.rows == 0) return;
        act_bwd_kernel<T, S, Fn>
            <<<grid_rows(ceil_div(a.rows, kRowsPerBlock), op), kRowsPerBlock * kWarp, 0, stream_of(ctx)>>>(
                static_cast<const T*>(a.in), static_cast<const S*>(a.row_scale), static_cast<const T*>(a.dout),
                static_cast<T*>(a.din), static_cast<S*>(a.drow_scale), a.rows, a.F, a.glu);
        MOE_CUDA_CHECK_LAUNCH("act_bwd_kernel");
      });
    });
  });
}

}  // namespace moe
