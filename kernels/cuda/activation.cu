// Expert activations with the routing-prob multiply on CUDA (docs/moe.md), the same formulas as the
// CPU reference (kernels/cpu/activation.cpp):
//   silu(x)  = x / (1 + e^−x)               silu'(x)  = σ(x)·(1 + x·(1 − σ(x)))
//   gelu(x)  = ½x(1 + erf(x/√2))            gelu'(x)  = ½(1 + erf(x/√2)) + x·φ(x)
//   relu2(x) = max(x, 0)²                   relu2'(x) = 2·max(x, 0)
// glu: the input row is [a | b] (F each), out = act(a)·b·s; otherwise out = act(x)·s, s = row_scale[r]
// or 1. Backward: g = dout·s; glu: da = g·b·act'(a), db = g·act(a); else dx = g·act'(x);
// drow_scale[r] = Σ_f dout·act(a)·b (or Σ_f dout·act(x)).
// Forward: a grid-stride loop over rows·F in 16-byte packs (8 bf16) when the shapes and pointers
// allow, without a division per element. Backward: one warp per row in the same packs (the
// drow_scale sum is a fixed lane-partial + shuffle-tree order, so it repeats bit for bit). In place:
// act_bwd's din may be in, act_fwd's out may be in without glu (no __restrict__ on those).
#include <initializer_list>
#include <type_traits>

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

// VP elements of T moved as one aligned pack (16 bytes when the rows and pointers allow: 8 bf16).
template <class T, int VP>
struct alignas(sizeof(T) * VP) Pack {
  T v[VP];
};

// Forward: a grid-stride loop over the rows · F/VP packs. A thread keeps its (row, pack) position
// and advances it by the stride's quotient and remainder (one division per thread, none per
// element). out may be in when !glu (each element is read and written by the same thread).
template <class T, class S, class Fn, int VP>
__global__ void __launch_bounds__(kThreads)
    act_fwd_kernel(const T* in, const S* __restrict__ row_scale, T* out, int64_t rows, int64_t F, bool glu,
                   const int64_t* __restrict__ num_rows) {
  using A = acc_t<T>;
  using P = Pack<T, VP>;
  if (num_rows) rows = d_min(rows, num_rows[0]);  // the host-sync-free path: rows past the count are padding
  const int64_t per_row = F / VP, n = rows * per_row, in_w = glu ? 2 * F : F;
  const int64_t start = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (start >= n) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t dr = stride / per_row, dv = stride - dr * per_row;
  int64_t r = start / per_row, v = start - r * per_row;
  for (int64_t i = start; i < n; i += stride) {
    const A s = row_scale ? static_cast<A>(row_scale[r]) : A(1);
    const T* x = in + r * in_w;
    const P a = reinterpret_cast<const P*>(x)[v];
    P o;
    if (glu) {
      const P b = reinterpret_cast<const P*>(x + F)[v];
#pragma unroll
      for (int k = 0; k < VP; ++k) o.v[k] = from_acc<T>(Fn::f(to_acc(a.v[k])) * to_acc(b.v[k]) * s);
    } else {
#pragma unroll
      for (int k = 0; k < VP; ++k) o.v[k] = from_acc<T>(Fn::f(to_acc(a.v[k])) * s);
    }
    reinterpret_cast<P*>(out + r * F)[v] = o;
    r += dr;
    v += dv;
    if (v >= per_row) {
      v -= per_row;
      ++r;
    }
  }
}

// Backward: one warp per row, VP-element packs. din may be in (the experts' backward reuses h's
// buffer for dh): every element of a row is read before it is written by the same thread.
template <class T, class S, class Fn, int VP>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    act_bwd_kernel(const T* in, const S* __restrict__ row_scale, const T* __restrict__ dout, T* din,
                   S* __restrict__ drow_scale, int64_t rows, int64_t F, bool glu, const int64_t* __restrict__ num_rows) {
  using A = acc_t<T>;
  using P = Pack<T, VP>;
  if (num_rows) rows = d_min(rows, num_rows[0]);  // the host-sync-free path: rows past the count are padding
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;  // a whole warp leaves together
  const int64_t in_w = glu ? 2 * F : F, per_row = F / VP;
  const A s = row_scale ? static_cast<A>(row_scale[r]) : A(1);
  const T* x = in + r * in_w;
  const P* dy = reinterpret_cast<const P*>(dout + r * F);
  T* dx = din + r * in_w;
  A ds = 0;
  for (int64_t v = lane; v < per_row; v += kWarp) {
    const P d = dy[v];
    if (glu) {
      const P a = reinterpret_cast<const P*>(x)[v], b = reinterpret_cast<const P*>(x + F)[v];
      P da, db;
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        const A av = to_acc(a.v[k]), bv = to_acc(b.v[k]), dv = to_acc(d.v[k]);
        const A act = Fn::f(av), g = dv * s;
        da.v[k] = from_acc<T>(g * bv * Fn::df(av));
        db.v[k] = from_acc<T>(g * act);
        ds += dv * act * bv;
      }
      reinterpret_cast<P*>(dx)[v] = da;
      reinterpret_cast<P*>(dx + F)[v] = db;
    } else {
      const P a = reinterpret_cast<const P*>(x)[v];
      P da;
#pragma unroll
      for (int k = 0; k < VP; ++k) {
        const A xv = to_acc(a.v[k]), dv = to_acc(d.v[k]);
        da.v[k] = from_acc<T>(dv * s * Fn::df(xv));
        ds += dv * Fn::f(xv);
      }
      reinterpret_cast<P*>(dx)[v] = da;
    }
  }
  ds = warp_sum(ds);
  if (drow_scale && lane == 0) drow_scale[r] = static_cast<S>(ds);
}

// 16-byte packs when F is a multiple of the pack and every pointer is 16-byte aligned (rows then
// stay aligned: their strides are multiples of F elements), else single elements.
template <class T>
bool use_packs(int64_t F, std::initializer_list<const void*> ptrs) {
  constexpr int64_t kVec = 16 / sizeof(T);
  if (kVec <= 1 || F % kVec != 0) return false;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

namespace {
// num_rows: (1) i64 device bound of the rows (act_fwd_dev), or null.
void act_fwd_launch(const ActFwdArgs& a, const int64_t* num_rows, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "act_fwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr, op, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_act<acc_t<T>>(a.act, [&](auto ftag) {
        using Fn = typename decltype(ftag)::type;
        if (a.rows * a.F == 0) return;
        auto launch = [&](auto vtag) {
          constexpr int VP = decltype(vtag)::value;
          const int64_t n = a.rows * (a.F / VP);
          act_fwd_kernel<T, S, Fn, VP><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(
              static_cast<const T*>(a.in), static_cast<const S*>(a.row_scale), static_cast<T*>(a.out), a.rows, a.F,
              a.glu, num_rows);
          MOE_CUDA_CHECK_LAUNCH("act_fwd_kernel");
        };
        if (use_packs<T>(a.F, {a.in, a.out}))
          launch(std::integral_constant<int, 16 / sizeof(T)>{});
        else
          launch(std::integral_constant<int, 1>{});
      });
    });
  });
}

void act_bwd_launch(const ActBwdArgs& a, const int64_t* num_rows, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "act_bwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.scale_dtype, a.row_scale != nullptr || a.drow_scale != nullptr, op, [&](auto stag) {
      using S = typename decltype(stag)::type;
      dispatch_act<acc_t<T>>(a.act, [&](auto ftag) {
        using Fn = typename decltype(ftag)::type;
        if (a.rows == 0) return;
        auto launch = [&](auto vtag) {
          constexpr int VP = decltype(vtag)::value;
          act_bwd_kernel<T, S, Fn, VP>
              <<<grid_rows(ceil_div(a.rows, kRowsPerBlock), op), kRowsPerBlock * kWarp, 0, stream_of(ctx)>>>(
                  static_cast<const T*>(a.in), static_cast<const S*>(a.row_scale), static_cast<const T*>(a.dout),
                  static_cast<T*>(a.din), static_cast<S*>(a.drow_scale), a.rows, a.F, a.glu, num_rows);
          MOE_CUDA_CHECK_LAUNCH("act_bwd_kernel");
        };
        if (use_packs<T>(a.F, {a.in, a.dout, a.din}))
          launch(std::integral_constant<int, 16 / sizeof(T)>{});
        else
          launch(std::integral_constant<int, 1>{});
      });
    });
  });
}

}  // namespace

void cuda_act_fwd(const ActFwdArgs& a, const ExecCtx& ctx) { act_fwd_launch(a, nullptr, ctx); }
void cuda_act_bwd(const ActBwdArgs& a, const ExecCtx& ctx) { act_bwd_launch(a, nullptr, ctx); }
void cuda_act_fwd_dev(const ActFwdDevArgs& d, const ExecCtx& ctx) { act_fwd_launch(d.base, d.num_rows, ctx); }
void cuda_act_bwd_dev(const ActBwdDevArgs& d, const ExecCtx& ctx) { act_bwd_launch(d.base, d.num_rows, ctx); }

}  // namespace moe
