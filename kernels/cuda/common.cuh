// Shared device-side helpers of the CUDA kernels: element types and their compute types, dtype
// dispatch, launch helpers, deterministic block reductions and scans, raw row copies. Included by
// kernels/cuda/*.cu only (it holds device code); host-only helpers live in check.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/cuda/check.cuh"
#include "kernels/ops.h"
#include "moecore/error.h"

namespace moe::cuda {

// ---------------------------------------------------------------------------------------------
// Element types. Storage: float, double, __nv_bfloat16, __half (moe::bf16/f16 have the same bits).
// Compute ("acc"): double for double, float otherwise.
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

// Rounds a compute value to storage. double -> 16-bit goes through float, as the CPU does.
template <class T> __device__ __forceinline__ T from_acc(float v);
template <class T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ float from_acc<float>(double v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ double from_acc<double>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }

// Math in the compute type (float or double) without relying on overload resolution.
__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float d_erf(float x) { return erff(x); }
__device__ __forceinline__ double d_erf(double x) { return erf(x); }
__device__ __forceinline__ float d_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double d_abs(double x) { return fabs(x); }
// IEEE round-to-nearest multiply / add that the compiler may not contract into an FMA: where the
// CPU reference does a·b + c as two roundings, these repeat its bits.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
template <class A> __device__ __forceinline__ A d_sigmoid(A x) { return A(1) / (A(1) + d_exp(-x)); }
template <class A> __device__ __forceinline__ A d_max(A a, A b) { return a > b ? a : b; }
template <class A> __device__ __forceinline__ A d_min(A a, A b) { return a < b ? a : b; }
template <class A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// ---------------------------------------------------------------------------------------------
// Dtype dispatch: f(TypeTag<T>{}) with T the CUDA storage type. Unsupported dtypes throw
// not_supported naming the op and the dtype.
template <class T> struct TypeTag { using type = T; };

template <class F>
void dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::f64: f(TypeTag<double>{}); return;
    case DType::bf16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::f16: f(TypeTag<__half>{}); return;
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": the CUDA backend has no kernel for dtype ", dtype_name(dt));
}

// The router dtypes (and scale / probability dtypes): f32, f64.
template <class F>
void dispatch_f32_f64(DType dt, const char* op, const char* what, F&& f) {
  switch (dt) {
    case DType::f32: f(TypeTag<float>{}); return;
    case DType::f64: f(TypeTag<double>{}); return;
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": ", what, " dtype must be f32 or f64 on the CUDA backend, got ",
            dtype_name(dt));
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.
constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, at most 2^20.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = ceil_div(n, threads);
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// One block per row: gridDim.x is at most 2^31 − 1.
inline unsigned grid_rows(int64_t rows, const char* op) {
  MOE_CHECK_CODE(rows <= 0x7fffffffLL, ErrorCode::not_supported, op, ": ", rows,
                 " rows exceed the CUDA grid limit of 2^31 - 1 blocks");
  return static_cast<unsigned>(rows);
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB;
// throws not_supported naming the op when the device cannot give that much.
template <class Kernel>
void set_smem(Kernel kernel, size_t bytes, const char* op) {
  if (bytes <= 48 * 1024) return;
  int dev = 0, optin = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&dev));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  MOE_CHECK_CODE(bytes <= static_cast<size_t>(optin), ErrorCode::not_supported, op, ": needs ", bytes,
                 " bytes of shared memory per block, the device allows ", optin);
  MOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions: a fixed shuffle tree inside each warp, then warp 0 over the per-warp
// values in warp order. For a fixed blockDim the summation order is fixed, so results repeat bit for
// bit. `shared` needs blockDim.x / 32 elements. Every thread of the block must call; all get the
// result.
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = d_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class A>
__device__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A r = lane < nwarps ? shared[lane] : A(0);
  r = warp_sum(r);  // every warp reduces the same values in the same order
  return r;
}

template <class A>
__device__ A block_max(A v, A* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A r = lane < nwarps ? shared[lane] : neg_inf<A>();
  return warp_max(r);
}

// Arg-max over (value, index) pairs: larger value wins, equal values go to the lower index. Index
// `sentinel` (>= any real index) marks "no candidate". `sv`/`si` need blockDim.x / 32 elements.
template <class A>
__device__ __forceinline__ bool better(A va, int ia, A vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}
template <class A>
__device__ void block_argmax(A& v, int& i, A* sv, int* si) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) {
    A ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = lane < nwarps ? sv[lane] : neg_inf<A>();
  i = lane < nwarps ? si[lane] : 0x7fffffff;
  for (int o = kWarp / 2; o > 0; o /= 2) {
    A ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

// Exclusive prefix sum of one int per thread over the block, in thread order. Returns the
// exclusive prefix; `total` gets the block total. `shared` needs blockDim.x / 32 + 1 ints.
__device__ __forceinline__ int block_exclusive_scan(int v, int* shared, int& total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  int x = v;  // inclusive scan inside the warp
  for (int o = 1; o < kWarp; o *= 2) {
    int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == kWarp - 1) shared[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? shared[lane] : 0;
    for (int o = 1; o < kWarp; o *= 2) {
      int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nwarps) shared[lane] = w;  // inclusive per-warp totals
  }
  __syncthreads();
  int warp_prefix = warp > 0 ? shared[warp - 1] : 0;
  total = shared[nwarps - 1];
  return warp_prefix + x - v;
}

// ---------------------------------------------------------------------------------------------
// Per-column ranks over token chunks (the row map of permute and the capacity kernels): the tokens
// are cut into chunks of kRankChunk; a count pass writes counts[c · E + e] (chunk c, column e), this
// scan turns them into exclusive prefixes over the chunks, and a scatter pass walks each chunk from
// its prefix. Every pass has chunks × expert tiles blocks, so the work spreads over the GPU however
// many tokens there are (the older kernels walked all T tokens in one block per 32 experts).
constexpr int kRankChunk = 1024;  // tokens per chunk (32 tiles of 32 tokens)
constexpr int kScanThreads = 256;

// One block per column e: bases[c·E + e] = (offsets ? offsets[e] : 0) + Σ_{c' < c} counts[c'·E + e]
// (in chunk order, so the result is exact and deterministic); totals[e] (optional) = Σ_c counts.
// Integer sums: fit in int32 because T < 2^31 (the callers check).
template <class C>
__global__ void __launch_bounds__(kScanThreads)
    chunk_scan_kernel(const C* __restrict__ counts, int64_t nchunks, int64_t E, const int64_t* __restrict__ offsets,
                      C* __restrict__ bases, C* __restrict__ totals) {
  __shared__ int smem[kScanThreads / kWarp + 1];
  const int64_t e = blockIdx.x;
  C carry = offsets ? static_cast<C>(offsets[e]) : C(0);
  for (int64_t base = 0; base < nchunks; base += kScanThreads) {
    const int64_t c = base + threadIdx.x;
    const int v = c < nchunks ? static_cast<int>(counts[c * E + e]) : 0;
    int total = 0;
    const int ex = block_exclusive_scan(v, smem, total);
    if (c < nchunks) bases[c * E + e] = carry + static_cast<C>(ex);
    carry += static_cast<C>(total);
  }
  if (totals && threadIdx.x == 0) totals[e] = carry - (offsets ? static_cast<C>(offsets[e]) : C(0));
}

// Bits of lanes below this one (for ranks from a ballot).
__device__ __forceinline__ unsigned lanes_below() { return (1u << (threadIdx.x % kWarp)) - 1u; }

// ---------------------------------------------------------------------------------------------
// Raw row copies (data movement stays bit-exact): the widest word W of 16/8/4/2/1 bytes that divides
// the row size and the alignment of every base pointer.
inline int copy_word_bytes(size_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % static_cast<size_t>(w) == 0;
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(w) == 0);
    if (ok) return w;
  }
  return 1;
}

// Calls f(TypeTag<W>{}) for the word type of `bytes` (16: uint4, 8: uint2, 4: uint32_t, 2: uint16_t,
// 1: uint8_t).
template <class F>
void dispatch_word(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(TypeTag<uint4>{}); return;
    case 8: f(TypeTag<uint2>{}); return;
    case 4: f(TypeTag<uint32_t>{}); return;
    case 2: f(TypeTag<uint16_t>{}); return;
    default: f(TypeTag<uint8_t>{}); return;
  }
}

}  // namespace moe::cuda
