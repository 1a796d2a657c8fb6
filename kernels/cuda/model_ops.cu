// The transformer's small ops on CUDA, the same formulas as the CPU reference
// (kernels/cpu/model_ops.cpp; kernels/ops.h has each contract). Compute is f32 for f32/bf16/f16
// storage and f64 for f64; statistics are stored in the compute type (the stat dtype).
//   norm_fwd / norm_bwd dx, xent_max / xent_sum: one block per row, fixed block reductions
//     (common.cuh's block_sum / block_max: repeatable bit for bit).
//   norm_bwd dweight / dbias: column sums over fixed row chunks into a scratch of partials, then one
//     thread per column adds the chunks in order onto dweight (deterministic, no atomics; its
//     summation order differs from the CPU's plain row order, so the bits may differ from it).
//   rope, embedding_fwd, xent_bwd, qkv: grid-stride elementwise loops with 64-bit indices.
//   embedding_bwd: atomicAdd (f32 into the table, f64 into the table, 16-bit types into an f32
//     copy of the table converted back afterwards): correct, but the order of the adds, and so
//     the last bits, is not deterministic.
// In-place use (norm y = x, norm dx = dy, rope y = x, xent dlogits = logits): each element is read
// and written by the same thread, and a row kernel's reductions (which read the input) finish at a
// block barrier before any thread writes; those pointers are not __restrict__. The norm backward
// launches its parameter-gradient kernels (which read dy) before the dx kernel.
#include <cmath>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

constexpr int kThreads = 256;    // elementwise kernels, and the per-row blocks
constexpr int kMaxChunks = 512;  // norm_bwd: row chunks of the parameter-gradient partials
constexpr int64_t kMinChunkRows = 16;

#define MOE_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ float cos_of(float x) { return cosf(x); }
__device__ __forceinline__ double cos_of(double x) { return cos(x); }
__device__ __forceinline__ float sin_of(float x) { return sinf(x); }
__device__ __forceinline__ double sin_of(double x) { return sin(x); }

// ---------------------------------------------------------------------------------------------
// Norms. x̂ = (x − mean)·rstd with mean = 0 for rms (x − 0 is exact, so both kinds share the code).
template <class T>
__global__ void __launch_bounds__(kThreads)
    norm_fwd_kernel(const T* xs, const T* __restrict__ w, const T* __restrict__ b, T* ys,
                    acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ rstd_out, int64_t D, acc_t<T> eps,
                    bool layer) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / kWarp];
  const int64_t r = blockIdx.x;
  const T* x = xs + r * D;
  T* y = ys + r * D;
  const A invD = A(1) / static_cast<A>(D);
  A mean = 0;
  if (layer) {
    A s = 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s += to_acc(x[d]);
    mean = block_sum(s, red) * invD;
  }
  A s2 = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A c = to_acc(x[d]) - mean;
    s2 += c * c;
  }
  const A var = block_sum(s2, red) * invD;  // every thread's reads of x are done past this barrier
  const A rstd = A(1) / d_sqrt(var + eps);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    A v = (to_acc(x[d]) - mean) * rstd * to_acc(w[d]);
    if (b) v += to_acc(b[d]);
    y[d] = from_acc<T>(v);
  }
  if (threadIdx.x == 0) {
    if (mean_out) mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·w (rms: without the mean(g) term).
template <class T>
__global__ void __launch_bounds__(kThreads)
    norm_bwd_dx_kernel(const T* __restrict__ xs, const T* __restrict__ w, const acc_t<T>* __restrict__ mean,
                       const acc_t<T>* __restrict__ rstd, const T* dys, T* dxs, int64_t D, bool layer) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / kWarp];
  const int64_t r = blockIdx.x;
  const T* x = xs + r * D;
  const T* dy = dys + r * D;
  T* dx = dxs + r * D;
  const A m = mean ? mean[r] : A(0), rs = rstd[r];
  const A invD = A(1) / static_cast<A>(D);
  A sgx = 0, sg = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A g = to_acc(dy[d]) * to_acc(w[d]);
    sgx += g * ((to_acc(x[d]) - m) * rs);
    sg += g;
  }
  sgx = block_sum(sgx, red);
  sg = block_sum(sg, red);
  const A c1 = sgx * invD, c2 = layer ? sg * invD : A(0);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const A g = to_acc(dy[d]) * to_acc(w[d]);
    dx[d] = from_acc<T>(rs * (g - c2 - (to_acc(x[d]) - m) * rs * c1));
  }
}

// Partial column sums over row chunk blockIdx.y: pw[c, d] = Σ_{r in chunk c} dy·x̂, pb[c, d] = Σ dy.
template <class T>
__global__ void __launch_bounds__(kThreads)
    norm_bwd_partial_kernel(const T* __restrict__ xs, const acc_t<T>* __restrict__ mean,
                            const acc_t<T>* __restrict__ rstd, const T* __restrict__ dys, acc_t<T>* __restrict__ pw,
                            acc_t<T>* __restrict__ pb, int64_t rows, int64_t D, int64_t chunk_rows) {
  using A = acc_t<T>;
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  const int64_t c = blockIdx.y, r0 = c * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  A sw = 0, sb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const A g = to_acc(dys[r * D + d]);
    const A m = mean ? mean[r] : A(0);
    sw += g * ((to_acc(xs[r * D + d]) - m) * rstd[r]);
    sb += g;
  }
  if (pw) pw[c * D + d] = sw;
  if (pb) pb[c * D + d] = sb;
}

// dweight[d] += Σ_c pw[c, d] (chunks in order, one rounding to storage); dbias alike.
template <class T>
__global__ void __launch_bounds__(kThreads)
    norm_bwd_reduce_kernel(const acc_t<T>* __restrict__ pw, const acc_t<T>* __restrict__ pb, T* __restrict__ dw,
                           T* __restrict__ db, int64_t nchunks, int64_t D) {
  using A = acc_t<T>;
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  if (dw) {
    A s = to_acc(dw[d]);
    for (int64_t c = 0; c < nchunks; ++c) s += pw[c * D + d];
    dw[d] = from_acc<T>(s);
  }
  if (db) {
    A s = to_acc(db[d]);
    for (int64_t c = 0; c < nchunks; ++c) s += pb[c * D + d];
    db[d] = from_acc<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding. W work items per head (hd − rd/2 when the dims past rd are copied, else rd/2):
// item w < rd/2 rotates the pair (w, w + rd/2), item w >= rd/2 copies dim w + rd/2 (>= rd).
// inv_freq (rd/2) f64 comes from the host, computed exactly as the CPU does, so the f64 angle has
// the CPU's bits.
template <class T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* xs, T* ys, const int64_t* __restrict__ pos, const double* __restrict__ inv_freq, int64_t S,
                int64_t BH, int64_t hd, int64_t rd, int64_t W, bool inverse) {
  using A = acc_t<T>;
  const int64_t half = rd / 2, n = S * BH * W;
  MOE_GRID_STRIDE(i, n) {
    const int64_t head = i / W, w = i - head * W, s = head / BH;
    const T* x = xs + head * hd;
    T* y = ys + head * hd;
    if (w < half) {
      const A ang = static_cast<A>(static_cast<double>(pos[s]) * inv_freq[w]);
      const A c = cos_of(ang), sn = inverse ? -sin_of(ang) : sin_of(ang);
      const A x1 = to_acc(x[w]), x2 = to_acc(x[w + half]);  // both read before either is written
      y[w] = from_acc<T>(x1 * c - x2 * sn);
      y[w + half] = from_acc<T>(x2 * c + x1 * sn);
    } else {
      y[w + half] = x[w + half];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding.
template <class T>
__global__ void __launch_bounds__(kThreads)
    embedding_fwd_kernel(const int64_t* __restrict__ ids, const T* __restrict__ table, T* __restrict__ out, int64_t n,
                         int64_t V, int64_t H, int64_t vocab_start, bool accumulate) {
  using A = acc_t<T>;
  const int64_t total = n * H;
  MOE_GRID_STRIDE(e, total) {
    const int64_t i = e / H, h = e - i * H, v = ids[i] - vocab_start;
    if (v >= 0 && v < V) {
      const T t = table[v * H + h];
      out[e] = accumulate ? from_acc<T>(to_acc(out[e]) + to_acc(t)) : t;
    } else if (!accumulate) {
      out[e] = from_acc<T>(A(0));
    }
  }
}

// target[v − vocab_start, h] += dout[i, h] for the ids in the slice (U: float or double).
template <class T, class U>
__global__ void __launch_bounds__(kThreads)
    embedding_bwd_kernel(const int64_t* __restrict__ ids, const T* __restrict__ dout, U* __restrict__ target, int64_t n,
                         int64_t V, int64_t H, int64_t vocab_start) {
  const int64_t total = n * H;
  MOE_GRID_STRIDE(e, total) {
    const int64_t i = e / H, h = e - i * H, v = ids[i] - vocab_start;
    if (v >= 0 && v < V) atomicAdd(target + v * H + h, static_cast<U>(to_acc(dout[e])));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    widen_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  MOE_GRID_STRIDE(i, n) dst[i] = static_cast<float>(to_acc(src[i]));
}
template <class T>
__global__ void __launch_bounds__(kThreads)
    narrow_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  MOE_GRID_STRIDE(i, n) dst[i] = from_acc<T>(src[i]);
}

// ---------------------------------------------------------------------------------------------
// Cross entropy.
template <class T>
__global__ void __launch_bounds__(kThreads)
    xent_max_kernel(const T* __restrict__ logits, acc_t<T>* __restrict__ row_max, int64_t V) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  const T* l = logits + i * V;
  A m = neg_inf<A>();
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = d_max(m, to_acc(l[v]));
  m = block_max(m, red);
  if (threadIdx.x == 0) row_max[i] = m;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    xent_sum_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                    const acc_t<T>* __restrict__ row_max, acc_t<T>* __restrict__ sum_exp, acc_t<T>* __restrict__ target,
                    int64_t V, int64_t vocab_start) {
  using A = acc_t<T>;
  __shared__ A red[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  const T* l = logits + i * V;
  const A m = row_max[i];
  A s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += d_exp(to_acc(l[v]) - m);
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    sum_exp[i] = s;
    const int64_t t = labels[i] - vocab_start;
    target[i] = (t >= 0 && t < V) ? to_acc(l[t]) : A(0);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    xent_bwd_kernel(const T* logits, const int64_t* __restrict__ labels, const acc_t<T>* __restrict__ row_max,
                    const acc_t<T>* __restrict__ sum_exp, const acc_t<T>* __restrict__ grad, T* dlogits, int64_t n,
                    int64_t V, int64_t vocab_start) {
  using A = acc_t<T>;
  const int64_t total = n * V;
  MOE_GRID_STRIDE(e, total) {
    const int64_t i = e / V, v = e - i * V;
    const A p = d_exp(to_acc(logits[e]) - row_max[i]) / sum_exp[i];
    const bool hit = v == labels[i] - vocab_start;
    dlogits[e] = from_acc<T>(grad[i] * (hit ? p - A(1) : p));
  }
}

// ---------------------------------------------------------------------------------------------
// QKV split / merge, one element (a word of the element size) per thread in qkv order.
template <class U>
__global__ void __launch_bounds__(kThreads)
    qkv_kernel(U* __restrict__ qkv, U* __restrict__ q, U* __restrict__ k, U* __restrict__ v, int64_t rows, int64_t ng,
               int64_t qpg, int64_t hd, bool merge) {
  const int64_t G = (qpg + 2) * hd, W = ng * G, total = rows * W;
  MOE_GRID_STRIDE(e, total) {
    const int64_t r = e / W, c = e - r * W, g = c / G, in = c - g * G, j = in / hd, d = in - j * hd;
    U* other;
    if (j < qpg)
      other = q + ((r * ng + g) * qpg + j) * hd + d;
    else if (j == qpg)
      other = k + (r * ng + g) * hd + d;
    else
      other = v + (r * ng + g) * hd + d;
    if (merge)
      qkv[e] = *other;
    else
      *other = qkv[e];
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void cuda_norm_fwd(const NormFwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "norm_fwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.rows == 0 || a.D == 0) return;
    const bool layer = a.kind == NormKind::layer;
    norm_fwd_kernel<T><<<grid_rows(a.rows, op), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.weight), layer ? static_cast<const T*>(a.bias) : nullptr,
        static_cast<T*>(a.y), layer ? static_cast<A*>(a.mean) : nullptr, static_cast<A*>(a.rstd), a.D,
        static_cast<A>(a.eps), layer);
    MOE_CUDA_CHECK_LAUNCH("norm_fwd_kernel");
  });
}

void cuda_norm_bwd(const NormBwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "norm_bwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.rows == 0 || a.D == 0) return;
    const bool layer = a.kind == NormKind::layer;
    const int64_t rows = a.rows, D = a.D;
    const A* mean = layer ? static_cast<const A*>(a.mean) : nullptr;
    const A* rstd = static_cast<const A*>(a.rstd);
    T* dw = static_cast<T*>(a.dweight);
    T* db = layer ? static_cast<T*>(a.dbias) : nullptr;
    // 1. dweight / dbias (read dy before step 2 may overwrite it).
    if (dw || db) {
      int64_t nchunks = ceil_div(rows, kMinChunkRows);
      if (nchunks > kMaxChunks) nchunks = kMaxChunks;
      const int64_t chunk_rows = ceil_div(rows, nchunks);
      nchunks = ceil_div(rows, chunk_rows);
      const size_t plane = static_cast<size_t>(nchunks * D) * sizeof(A);
      Scratch partial(ctx, plane * (db ? 2 : 1));
      A* pw = dw ? partial.as<A>() : nullptr;
      A* pb = db ? reinterpret_cast<A*>(partial.as<char>() + (dw ? plane : 0)) : nullptr;
      MOE_CHECK_CODE(ceil_div(D, kThreads) <= 0x7fffffffLL, ErrorCode::not_supported, op, ": D = ", D,
                     " exceeds the CUDA grid limit");
      const dim3 grid(static_cast<unsigned>(ceil_div(D, kThreads)), static_cast<unsigned>(nchunks));
      norm_bwd_partial_kernel<T><<<grid, kThreads, 0, stream_of(ctx)>>>(
          static_cast<const T*>(a.x), mean, rstd, static_cast<const T*>(a.dy), pw, pb, rows, D, chunk_rows);
      MOE_CUDA_CHECK_LAUNCH("norm_bwd_partial_kernel");
      norm_bwd_reduce_kernel<T>
          <<<static_cast<unsigned>(ceil_div(D, kThreads)), kThreads, 0, stream_of(ctx)>>>(pw, pb, dw, db, nchunks, D);
      MOE_CUDA_CHECK_LAUNCH("norm_bwd_reduce_kernel");
    }
    // 2. dx, one block per row.
    norm_bwd_dx_kernel<T><<<grid_rows(rows, op), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.x), static_cast<const T*>(a.weight), mean, rstd, static_cast<const T*>(a.dy),
        static_cast<T*>(a.dx), D, layer);
    MOE_CUDA_CHECK_LAUNCH("norm_bwd_dx_kernel");
  });
}

void cuda_rope(const RopeArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "rope";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t half = a.rd / 2, BH = a.B * a.heads;
    const bool copy_rest = a.x != a.y && a.rd < a.hd;
    const int64_t W = copy_rest ? a.hd - half : half;  // work items per head
    const int64_t n = a.S * BH * W;
    if (n == 0) return;
    // inv_freq_i = base^(−2i/rd), evaluated on the host exactly as the CPU reference does.
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i)
      inv_freq[static_cast<size_t>(i)] = std::pow(a.base, -static_cast<double>(2 * i) / static_cast<double>(a.rd));
    Scratch freq(ctx, inv_freq.size() * sizeof(double));
    upload(ctx, freq, inv_freq.data(), inv_freq.size() * sizeof(double));
    rope_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.x), static_cast<T*>(a.y), a.positions, freq.as<double>(), a.S, BH, a.hd, a.rd, W,
        a.inverse);
    MOE_CUDA_CHECK_LAUNCH("rope_kernel");
  });
}

void cuda_embedding_fwd(const EmbeddingArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "embedding_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t total = a.n * a.H;
    if (total == 0) return;
    embedding_fwd_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream_of(ctx)>>>(
        a.ids, static_cast<const T*>(a.table), static_cast<T*>(a.out), a.n, a.V, a.H, a.vocab_start, a.accumulate);
    MOE_CUDA_CHECK_LAUNCH("embedding_fwd_kernel");
  });
}

void cuda_embedding_bwd(const EmbeddingArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "embedding_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t total = a.n * a.H;
    if (total == 0 || a.V == 0) return;
    const T* dout = static_cast<const T*>(a.dout);
    T* dtable = static_cast<T*>(a.dtable);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      embedding_bwd_kernel<T, T><<<grid_for(total, kThreads), kThreads, 0, stream_of(ctx)>>>(a.ids, dout, dtable, a.n,
                                                                                             a.V, a.H, a.vocab_start);
      MOE_CUDA_CHECK_LAUNCH("embedding_bwd_kernel");
    } else {
      // 16-bit tables: accumulate in an f32 copy, round once at the end.
      const int64_t tn = a.V * a.H;
      Scratch acc(ctx, static_cast<size_t>(tn) * sizeof(float));
      widen_kernel<T><<<grid_for(tn, kThreads), kThreads, 0, stream_of(ctx)>>>(dtable, acc.as<float>(), tn);
      MOE_CUDA_CHECK_LAUNCH("widen_kernel");
      embedding_bwd_kernel<T, float><<<grid_for(total, kThreads), kThreads, 0, stream_of(ctx)>>>(
          a.ids, dout, acc.as<float>(), a.n, a.V, a.H, a.vocab_start);
      MOE_CUDA_CHECK_LAUNCH("embedding_bwd_kernel");
      narrow_kernel<T><<<grid_for(tn, kThreads), kThreads, 0, stream_of(ctx)>>>(acc.as<float>(), dtable, tn);
      MOE_CUDA_CHECK_LAUNCH("narrow_kernel");
    }
  });
}

void cuda_xent_max(const XentArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "xent_max";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.n == 0 || a.V == 0) return;
    xent_max_kernel<T><<<grid_rows(a.n, op), kThreads, 0, stream_of(ctx)>>>(static_cast<const T*>(a.logits),
                                                                            static_cast<A*>(a.row_max), a.V);
    MOE_CUDA_CHECK_LAUNCH("xent_max_kernel");
  });
}

void cuda_xent_sum(const XentArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "xent_sum";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.n == 0 || a.V == 0) return;
    xent_sum_kernel<T><<<grid_rows(a.n, op), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.logits), a.labels, static_cast<const A*>(a.row_max), static_cast<A*>(a.sum_exp),
        static_cast<A*>(a.target), a.V, a.vocab_start);
    MOE_CUDA_CHECK_LAUNCH("xent_sum_kernel");
  });
}

void cuda_xent_bwd(const XentArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_float(a.dtype, "xent_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t total = a.n * a.V;
    if (total == 0) return;
    xent_bwd_kernel<T><<<grid_for(total, kThreads), kThreads, 0, stream_of(ctx)>>>(
        static_cast<const T*>(a.logits), a.labels, static_cast<const A*>(a.row_max), static_cast<const A*>(a.sum_exp),
        static_cast<const A*>(a.grad), static_cast<T*>(a.dlogits), a.n, a.V, a.vocab_start);
    MOE_CUDA_CHECK_LAUNCH("xent_bwd_kernel");
  });
}

void cuda_qkv(const QkvArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const int64_t total = a.rows * a.ng * (a.q_per_group + 2) * a.hd;
  if (total == 0) return;
  auto launch = [&](auto tag) {
    using U = typename decltype(tag)::type;
    qkv_kernel<U><<<grid_for(total, kThreads), kThreads, 0, stream_of(ctx)>>>(
        static_cast<U*>(a.qkv), static_cast<U*>(a.q), static_cast<U*>(a.k), static_cast<U*>(a.v), a.rows, a.ng,
        a.q_per_group, a.hd, a.merge);
    MOE_CUDA_CHECK_LAUNCH("qkv_kernel");
  };
  switch (dtype_size(a.dtype)) {
    case 1: launch(TypeTag<uint8_t>{}); return;
    case 2: launch(TypeTag<uint16_t>{}); return;
    case 4: launch(TypeTag<uint32_t>{}); return;
    case 8: launch(TypeTag<unsigned long long>{}); return;
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, "qkv: no CUDA kernel for elements of ", dtype_size(a.dtype), " bytes (dtype ",
            dtype_name(a.dtype), ")");
}

}  // namespace moe
