// Elementwise helpers, casts, row scaling, jitter, MSE, Adam and SGD on CUDA. Grid-stride loops with
// 64-bit indices. Where the CPU reference computes a·b + c as two roundings, the kernels use
// explicit round-to-nearest multiplies and adds (mul_rn / add_rn), so axpby, scale_rows, jitter, the
// MSE gradient and Adam give the CPU's bits. Sums (row_dot, the MSE value) use fixed reduction trees:
// repeatable bit for bit, equal to the CPU's sequential sums up to rounding.
#include <cmath>

#include "kernels/common/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // row_dot: one warp per row
constexpr int kMaxSumBlocks = 1024;

#define MOE_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Elementwise kernels may run in place (x == y / out): no __restrict__ on their pointers.
template <class T>
__global__ void axpby_kernel(const T* x, T* y, int64_t n, acc_t<T> alpha, acc_t<T> beta) {
  using A = acc_t<T>;
  MOE_GRID_STRIDE(i, n) {
    const A yv = beta == A(0) ? A(0) : mul_rn(beta, to_acc(y[i]));  // b = 0 ignores y (NaN included)
    y[i] = from_acc<T>(add_rn(mul_rn(alpha, to_acc(x[i])), yv));
  }
}

template <class T>
__global__ void mul_kernel(const T* x, const T* y, T* out, int64_t n) {
  MOE_GRID_STRIDE(i, n) out[i] = from_acc<T>(mul_rn(to_acc(x[i]), to_acc(y[i])));
}

template <class T>
__global__ void sigmoid_kernel(const T* x, T* out, int64_t n) {
  using A = acc_t<T>;
  MOE_GRID_STRIDE(i, n) out[i] = from_acc<T>(A(1) / (A(1) + d_exp(-to_acc(x[i]))));
}

// out = dy · y · (1 − y)
template <class T>
__global__ void sigmoid_bwd_kernel(const T* dy, const T* y, T* out, int64_t n) {
  using A = acc_t<T>;
  MOE_GRID_STRIDE(i, n) {
    const A s = to_acc(y[i]);
    out[i] = from_acc<T>(mul_rn(mul_rn(to_acc(dy[i]), s), A(1) - s));
  }
}

// Widens through double so f64 -> f32 rounds once (f64 -> bf16/f16 goes through f32, as on the CPU).
template <class S, class D>
__global__ void cast_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  MOE_GRID_STRIDE(i, n) dst[i] = from_acc<D>(static_cast<double>(to_acc(src[i])));
}

template <class T, class S>
__global__ void scale_rows_kernel(const T* __restrict__ in, const S* __restrict__ scale, T* __restrict__ out,
                                  int64_t rows, int64_t H, bool accumulate) {
  using A = acc_t<T>;
  const int64_t n = rows * H;
  MOE_GRID_STRIDE(i, n) {
    const A s = static_cast<A>(scale[i / H]);
    const A v = mul_rn(to_acc(in[i]), s);
    out[i] = from_acc<T>(accumulate ? add_rn(to_acc(out[i]), v) : v);
  }
}

template <class T, class O>
__global__ void __launch_bounds__(kRowsPerBlock * kWarp)
    row_dot_kernel(const T* __restrict__ a, const T* __restrict__ b, O* __restrict__ out, int64_t rows, int64_t H) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;
  A s = 0;
  for (int64_t h = lane; h < H; h += kWarp) s += to_acc(a[r * H + h]) * to_acc(b[r * H + h]);
  s = warp_sum(s);
  if (lane == 0) out[r] = static_cast<O>(s);
}

// out[i] = (1 − eps) + 2·eps·u(key, i), computed in double with the CPU's two roundings, then
// rounded to the compute type and the storage type: the same bits as the CPU.
template <class T>
__global__ void jitter_kernel(T* __restrict__ out, int64_t n, uint64_t key, double one_minus_eps, double two_eps) {
  using A = acc_t<T>;
  MOE_GRID_STRIDE(i, n) {
    const double u = rng::uniform01(key, static_cast<uint64_t>(i));
    out[i] = from_acc<T>(static_cast<A>(__dadd_rn(one_minus_eps, __dmul_rn(two_eps, u))));
  }
}

// Pass 1 of the MSE: per-block partial sums of (y − t)² in f64 (and dy); pass 2 is sum_f64_kernel.
template <class T>
__global__ void __launch_bounds__(kThreads)
    mse_partial_kernel(const T* __restrict__ y, const T* __restrict__ t, T* __restrict__ dy, int64_t n,
                       acc_t<T> two_scale, double* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ double red[kThreads / kWarp];
  double s = 0.0;
  MOE_GRID_STRIDE(i, n) {
    const A d = to_acc(y[i]) - to_acc(t[i]);
    s += static_cast<double>(d) * static_cast<double>(d);
    if (dy) dy[i] = from_acc<T>(mul_rn(two_scale, d));
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* __restrict__ x, int64_t n,
                                                                double* __restrict__ out) {
  __shared__ double red[kThreads / kWarp];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[0] = s;
}

// Adam(W) in the CPU's operation order: m, v in f32; the update in f64.
__global__ void adam_kernel(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                            float* __restrict__ v, int64_t n, float b1, float one_minus_b1, float b2,
                            float one_minus_b2, double bc1, double bc2, double lr, double eps, double wd) {
  MOE_GRID_STRIDE(i, n) {
    const float g = grad[i];
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(one_minus_b1, g));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
    m[i] = mi;
    v[i] = vi;
    const double mhat = __ddiv_rn(static_cast<double>(mi), bc1), vhat = __ddiv_rn(static_cast<double>(vi), bc2);
    const double p = param[i];
    const double upd = __dadd_rn(__ddiv_rn(mhat, __dadd_rn(__dsqrt_rn(vhat), eps)), __dmul_rn(wd, p));
    param[i] = static_cast<float>(__dsub_rn(p, __dmul_rn(lr, upd)));
  }
}

// SGD with momentum in the CPU's operation order: d and the buffer in f32, the update in f64.
__global__ void sgd_kernel(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ buf,
                           int64_t n, bool decay, float wd, float mom, double lr) {
  MOE_GRID_STRIDE(i, n) {
    float d = grad[i];
    if (decay) d = __fadd_rn(d, __fmul_rn(wd, param[i]));
    if (buf) {
      d = __fadd_rn(__fmul_rn(mom, buf[i]), d);
      buf[i] = d;
    }
    param[i] = static_cast<float>(__dsub_rn(static_cast<double>(param[i]), __dmul_rn(lr, static_cast<double>(d))));
  }
}

// Scale and row-dot output dtypes: f32 / f64.
template <class F>
void dispatch_scale(DType dt, const char* op, F&& f) {
  dispatch_f32_f64(dt, op, "scale", f);
}

}  // namespace

void cuda_axpby(const ElementwiseArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "axpby", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.n == 0) return;
    axpby_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.x), static_cast<T*>(a.y), a.n, static_cast<A>(a.a), static_cast<A>(a.b));
    MOE_CUDA_CHECK_LAUNCH("axpby_kernel");
  });
}

void cuda_mul(const ElementwiseArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "mul", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.n == 0) return;
    mul_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.y), static_cast<T*>(a.out), a.n);
    MOE_CUDA_CHECK_LAUNCH("mul_kernel");
  });
}

void cuda_unary(const ElementwiseArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "unary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.n == 0) return;
    switch (a.op) {
      case UnaryOp::sigmoid:
        sigmoid_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(static_cast<const T*>(a.x),
                                                                                    static_cast<T*>(a.out), a.n);
        MOE_CUDA_CHECK_LAUNCH("sigmoid_kernel");
        return;
      case UnaryOp::sigmoid_bwd:
        sigmoid_bwd_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(
            static_cast<const T*>(a.x), static_cast<const T*>(a.y), static_cast<T*>(a.out), a.n);
        MOE_CUDA_CHECK_LAUNCH("sigmoid_bwd_kernel");
        return;
    }
    MOE_THROW(ErrorCode::invalid_argument, "unary: unknown op ", static_cast<int>(a.op));
  });
}

void cuda_cast(const CastArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.src_dtype == a.dst_dtype) {
    if (a.n > 0)
      MOE_CUDA_CHECK(cudaMemcpyAsync(a.dst, a.src, static_cast<size_t>(a.n) * dtype_size(a.src_dtype),
                                     cudaMemcpyDeviceToDevice, stream_of(ctx)));
    return;
  }
  dispatch_float(a.src_dtype, "cast", [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch_float(a.dst_dtype, "cast", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      if (a.n == 0) return;
      cast_kernel<S, D><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(static_cast<const S*>(a.src),
                                                                                 static_cast<D*>(a.dst), a.n);
      MOE_CUDA_CHECK_LAUNCH("cast_kernel");
    });
  });
}

void cuda_scale_rows(const ScaleRowsArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "scale_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.scale_dtype, "scale_rows", [&](auto stag) {
      using S = typename decltype(stag)::type;
      const int64_t n = a.rows * a.H;
      if (n == 0) return;
      scale_rows_kernel<T, S><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(
          static_cast<const T*>(a.in), static_cast<const S*>(a.scale), static_cast<T*>(a.out), a.rows, a.H,
          a.accumulate);
      MOE_CUDA_CHECK_LAUNCH("scale_rows_kernel");
    });
  });
}

void cuda_row_dot(const RowDotArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "row_dot", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_scale(a.out_dtype, "row_dot", [&](auto otag) {
      using O = typename decltype(otag)::type;
      if (a.rows == 0) return;
      row_dot_kernel<T, O>
          <<<grid_rows(ceil_div(a.rows, kRowsPerBlock), "row_dot"), kRowsPerBlock * kWarp, 0, stream_of(ctx)>>>(
              static_cast<const T*>(a.a), static_cast<const T*>(a.b), static_cast<O*>(a.out), a.rows, a.H);
      MOE_CUDA_CHECK_LAUNCH("row_dot_kernel");
    });
  });
}

void cuda_jitter(const JitterArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "jitter", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.n == 0) return;
    // The CPU evaluates (1.0 − eps) + 2.0·eps·u left to right: (2·eps)·u, then the add.
    jitter_kernel<T><<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(static_cast<T*>(a.out), a.n, a.key,
                                                                               1.0 - a.eps, 2.0 * a.eps);
    MOE_CUDA_CHECK_LAUNCH("jitter_kernel");
  });
}

// Deterministic: the number of partial blocks depends on n only, each block reduces a fixed set of
// elements in a fixed tree, and one block adds the partials in a fixed tree.
void cuda_mse(const MseArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "mse", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t nb = std::min<int64_t>(ceil_div(a.n, kThreads * 4), kMaxSumBlocks);
    Scratch partial(ctx, static_cast<size_t>(nb) * sizeof(double));
    if (nb > 0) {
      mse_partial_kernel<T><<<static_cast<unsigned>(nb), kThreads, 0, stream_of(ctx)>>>(
          static_cast<const T*>(a.y), static_cast<const T*>(a.target), static_cast<T*>(a.dy), a.n,
          static_cast<A>(a.scale * 2.0), partial.as<double>());
      MOE_CUDA_CHECK_LAUNCH("mse_partial_kernel");
    }
    if (a.sum_out) {
      sum_partials_kernel<<<1, kThreads, 0, stream_of(ctx)>>>(partial.as<double>(), nb, a.sum_out);
      MOE_CUDA_CHECK_LAUNCH("sum_partials_kernel");
    }
  });
}

void cuda_adam(const AdamArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.n == 0) return;
  // Host-side constants computed exactly as the CPU does.
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  const float b1 = static_cast<float>(a.beta1), b2 = static_cast<float>(a.beta2);
  adam_kernel<<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(
      a.param, a.grad, a.m, a.v, a.n, b1, 1.0f - b1, b2, 1.0f - b2, bc1, bc2, a.lr, a.eps, a.weight_decay);
  MOE_CUDA_CHECK_LAUNCH("adam_kernel");
}

void cuda_sgd(const SgdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.n == 0) return;
  sgd_kernel<<<grid_for(a.n, kThreads), kThreads, 0, stream_of(ctx)>>>(
      a.param, a.grad, a.momentum_buf, a.n, a.weight_decay != 0.0, static_cast<float>(a.weight_decay),
      static_cast<float>(a.momentum), a.lr);
  MOE_CUDA_CHECK_LAUNCH("sgd_kernel");
}

}  // namespace moe
