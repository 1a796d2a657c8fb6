// Elementwise helpers, casts, row scaling, jitter, MSE and Adam on the CPU.
//
// axpby and the f32 <-> bf16 casts (the residual adds, gradient accumulation and the bf16 model's
// conversions) run on 16-lane vectors (kernels/cpu/simd.h, compiled per ISA) in blocks of
// kSpan elements split over threads above kParallelElems; every element is the same arithmetic
// whichever thread or lane computes it. A bf16 store rounds to nearest-even like float_to_bf16,
// so the casts give the same bits as the scalar loop.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/common/rng.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

namespace moe {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

namespace {

using namespace cpu::simd;
constexpr int64_t kSpan = 4096;                       // elements per thread task
constexpr int64_t kParallelElems = int64_t{1} << 16;  // below this one thread is faster

// f(lo, hi) over [0, n) in kSpan blocks, split over threads when n is large.
template <class F>
void for_spans(int64_t n, F&& f) {
  if (n < kParallelElems) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
  const int64_t blocks = (n + kSpan - 1) / kSpan;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) f(b * kSpan, std::min(n, (b + 1) * kSpan));
}

// y = alpha·x + beta·y (beta = 0: y is not read).
template <class T>
MOE_SIMD_INLINE void axpby_impl(const T* x, T* y, int64_t n, float alpha, float beta) {
  int64_t i = 0;
  if (beta == 0.0f) {
    for (; i + kLanes <= n; i += kLanes) store(y + i, alpha * load(x + i));
    if (i < n) store_part(y + i, alpha * load_part(x + i, n - i, 0.0f), n - i);
  } else {
    for (; i + kLanes <= n; i += kLanes) store(y + i, alpha * load(x + i) + beta * load(y + i));
    if (i < n) store_part(y + i, alpha * load_part(x + i, n - i, 0.0f) + beta * load_part(y + i, n - i, 0.0f), n - i);
  }
}
template <class S, class D>
MOE_SIMD_INLINE void cast_impl(const S* s, D* d, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(d + i, load(s + i));
  if (i < n) store_part(d + i, load_part(s + i, n - i, 0.0f), n - i);
}
MOE_SIMD_CLONES void axpby_span(const float* x, float* y, int64_t n, float a, float b) { axpby_impl(x, y, n, a, b); }
MOE_SIMD_CLONES void axpby_span(const bf16* x, bf16* y, int64_t n, float a, float b) { axpby_impl(x, y, n, a, b); }
MOE_SIMD_CLONES void cast_span(const float* s, bf16* d, int64_t n) { cast_impl(s, d, n); }
MOE_SIMD_CLONES void cast_span(const bf16* s, float* d, int64_t n) { cast_impl(s, d, n); }

}  // namespace

void cpu_axpby(const ElementwiseArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "axpby", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    const A alpha = static_cast<A>(a.a), beta = static_cast<A>(a.b);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
      for_spans(a.n, [&](int64_t lo, int64_t hi) { axpby_span(x + lo, y + lo, hi - lo, alpha, beta); });
      return;
    }
    for (int64_t i = 0; i < a.n; ++i) {
      A yv = beta == A(0) ? A(0) : beta * to_acc(y[i]);
      y[i] = from_acc<T>(alpha * to_acc(x[i]) + yv);
    }
  });
}

void cpu_mul(const ElementwiseArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "mul", [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(a.x);
    const T* y = static_cast<const T*>(a.y);
    T* out = static_cast<T*>(a.out);
    for (int64_t i = 0; i < a.n; ++i) out[i] = from_acc<T>(to_acc(x[i]) * to_acc(y[i]));
  });
}

void cpu_unary(const ElementwiseArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "unary", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(a.x);
    const T* y = static_cast<const T*>(a.y);
    T* out = static_cast<T*>(a.out);
    switch (a.op) {
      case UnaryOp::sigmoid:
        for (int64_t i = 0; i < a.n; ++i) out[i] = from_acc<T>(A(1) / (A(1) + std::exp(-to_acc(x[i]))));
        break;
      case UnaryOp::sigmoid_bwd:
        for (int64_t i = 0; i < a.n; ++i) {
          A s = to_acc(y[i]);
          out[i] = from_acc<T>(to_acc(x[i]) * s * (A(1) - s));
        }
        break;
    }
  });
}

void cpu_cast(const CastArgs& a, const ExecCtx&) {
  if (a.src_dtype == a.dst_dtype) {
    std::memcpy(a.dst, a.src, static_cast<size_t>(a.n) * dtype_size(a.src_dtype));
    return;
  }
  cpu::dispatch_float(a.src_dtype, "cast", [&](auto stag) {
    using S = decltype(stag);
    cpu::dispatch_float(a.dst_dtype, "cast", [&](auto dtag) {
      using D = decltype(dtag);
      const S* s = static_cast<const S*>(a.src);
      D* d = static_cast<D*>(a.dst);
      if constexpr ((std::is_same_v<S, float> && std::is_same_v<D, bf16>) ||
                    (std::is_same_v<S, bf16> && std::is_same_v<D, float>)) {
        for_spans(a.n, [&](int64_t lo, int64_t hi) { cast_span(s + lo, d + lo, hi - lo); });
        return;
      }
      // Widen through double so f64 -> f32 rounds once.
      for (int64_t i = 0; i < a.n; ++i) d[i] = from_acc<D>(static_cast<double>(to_acc(s[i])));
    });
  });
}

namespace {
template <class F>
void dispatch_scale(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); return;
    case DType::f64: f(double{}); return;
    default: MOE_THROW(ErrorCode::not_supported, op, ": scale dtype must be f32 or f64, got ", dtype_name(dt));
  }
}
}  // namespace

void cpu_scale_rows(const ScaleRowsArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "scale_rows", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    dispatch_scale(a.scale_dtype, "scale_rows", [&](auto stag) {
      using S = decltype(stag);
      const T* in = static_cast<const T*>(a.in);
      const S* sc = static_cast<const S*>(a.scale);
      T* out = static_cast<T*>(a.out);
      for (int64_t r = 0; r < a.rows; ++r) {
        A s = static_cast<A>(sc[r]);
        const T* src = in + r * a.H;
        T* dst = out + r * a.H;
        if (a.accumulate)
          for (int64_t h = 0; h < a.H; ++h) dst[h] = from_acc<T>(to_acc(dst[h]) + to_acc(src[h]) * s);
        else
          for (int64_t h = 0; h < a.H; ++h) dst[h] = from_acc<T>(to_acc(src[h]) * s);
      }
    });
  });
}

void cpu_row_dot(const RowDotArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "row_dot", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    dispatch_scale(a.out_dtype, "row_dot", [&](auto otag) {
      using O = decltype(otag);
      const T* x = static_cast<const T*>(a.a);
      const T* y = static_cast<const T*>(a.b);
      O* out = static_cast<O*>(a.out);
      for (int64_t r = 0; r < a.rows; ++r) {
        A s = 0;
        for (int64_t h = 0; h < a.H; ++h) s += to_acc(x[r * a.H + h]) * to_acc(y[r * a.H + h]);
        out[r] = static_cast<O>(s);
      }
    });
  });
}

void cpu_jitter(const JitterArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "jitter", [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(a.out);
    for (int64_t i = 0; i < a.n; ++i) {
      double u = rng::uniform01(a.key, static_cast<uint64_t>(i));
      out[i] = from_acc<T>(static_cast<acc_t<T>>((1.0 - a.eps) + 2.0 * a.eps * u));
    }
  });
}

void cpu_mse(const MseArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "mse", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const T* y = static_cast<const T*>(a.y);
    const T* t = static_cast<const T*>(a.target);
    T* dy = static_cast<T*>(a.dy);
    double sum = 0;
    for (int64_t i = 0; i < a.n; ++i) {
      A d = to_acc(y[i]) - to_acc(t[i]);
      sum += static_cast<double>(d) * static_cast<double>(d);
      if (dy) dy[i] = from_acc<T>(static_cast<A>(a.scale * 2.0) * d);
    }
    if (a.sum_out) a.sum_out[0] = sum;
  });
}

void cpu_adam(const AdamArgs& a, const ExecCtx&) {
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  const float b1 = static_cast<float>(a.beta1), b2 = static_cast<float>(a.beta2);
  for (int64_t i = 0; i < a.n; ++i) {
    float g = a.grad[i];
    a.m[i] = b1 * a.m[i] + (1.0f - b1) * g;
    a.v[i] = b2 * a.v[i] + (1.0f - b2) * g * g;
    double mhat = a.m[i] / bc1, vhat = a.v[i] / bc2;
    double p = a.param[i];
    p -= a.lr * (mhat / (std::sqrt(vhat) + a.eps) + a.weight_decay * p);
    a.param[i] = static_cast<float>(p);
  }
}

}  // namespace moe
