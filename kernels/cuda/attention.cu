// Causal softmax attention with grouped query heads on CUDA: the contract of kernels/ops.h
// (AttnFwdArgs / AttnBwdArgs) with the algorithm of the CPU reference (kernels/cpu/attention.cpp),
// in simple tiled kernels. Query head h reads kv head h / r (r = nq / nkv); key j is visible to
// query i iff k_pos[j] <= q_pos[i] (any order of positions); scores s = (scale·q)·k.
//
// Every kernel works on square tiles of `tile` queries × `tile` keys held in dynamic shared memory
// (converted to the compute type A: f32 for f32/bf16/f16, f64 for f64; rows padded to an odd
// stride so the score loop's threads, which walk key rows, hit distinct banks):
//   attn_fwd_kernel   one block per (b, h, query tile); key tiles streamed through shared memory;
//                     S = Q Kᵀ per (query, key) pair, then one thread per query row does the online
//                     softmax (m' = max(m, max_j s), P = e^(s − m'), l = l·e^(m − m') + Σ P), then
//                     O = O·e^(m − m') + P V per (query, dim); at the end o = O / l, lse = m + log l.
//   attn_d_kernel     D_i = Σ dO_i·o_i, one warp per query row.
//   attn_dq_kernel    one block per (b, h, query tile): dS = P ∘ (dO Vᵀ − D) with P = e^(s − lse)
//                     recomputed, dQ = scale · Σ_j dS_ij k_j.
//   attn_dkdv_kernel  one block per (b, g, key tile), looping over the r query heads of g and the
//                     query tiles: dV = Σ_i P_ij dO_i, dK = Σ_i dS_ij (scale·q_i).
// Each output element is written by one thread (no atomics), and every sum has a fixed order.
// Tiles whose keys all come after all of their queries are skipped. A query without a visible key
// gets o = 0, lse = −inf and no gradient. The tile is the largest of 64 / 32 / 16 / 8 whose shared
// memory fits in 64 KiB, else in the device's opt-in limit.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

// Dynamic shared memory of the attention kernels (carved per kernel below).
extern __shared__ __align__(16) unsigned char g_attn_smem[];

namespace {

using namespace cuda;

constexpr int kThreads = 128;
constexpr int64_t kPosNone = INT64_MIN;  // padding query rows: no key is visible to them
constexpr int64_t kPosLast = INT64_MAX;  // padding key rows: visible to no query

// The problem, as the kernels see it.
struct Geo {
  int64_t Sq, Sk, B, nq, nkv, hd, r;  // r = nq / nkv
  int64_t q_stride, kv_stride;        // elements between consecutive positions of one (b, head)
  int tile;                           // queries per query tile = keys per key tile
  int ld;                             // shared row stride: hd, made odd
  __host__ __device__ int64_t q_off(int64_t i, int64_t b, int64_t h) const { return ((i * B + b) * nq + h) * hd; }
  __host__ __device__ int64_t kv_off(int64_t j, int64_t b, int64_t g) const { return ((j * B + b) * nkv + g) * hd; }
  __host__ __device__ int64_t stat_off(int64_t b, int64_t h) const { return (b * nq + h) * Sq; }  // lse, D
};

template <class Args>
Geo make_geo(const Args& a) {
  Geo g;
  g.Sq = a.Sq;
  g.Sk = a.Sk;
  g.B = a.B;
  g.nq = a.nq;
  g.nkv = a.nkv;
  g.hd = a.hd;
  g.r = a.nq / a.nkv;
  g.q_stride = a.B * a.nq * a.hd;
  g.kv_stride = a.B * a.nkv * a.hd;
  g.ld = static_cast<int>(a.hd % 2 == 0 ? a.hd + 1 : a.hd);
  g.tile = 0;
  return g;
}

// ---- shared memory carving: i64 arrays first, then A arrays (each rounded up to 8 bytes) -----------
__host__ __device__ constexpr size_t round8(size_t b) { return (b + 7) / 8 * 8; }

struct Carver {
  unsigned char* p;
  template <class T>
  __device__ T* take(int64_t n) {
    T* r = reinterpret_cast<T*>(p);
    p += round8(static_cast<size_t>(n) * sizeof(T));
    return r;
  }
};

// Bytes of `pos_arrays` i64 arrays of `tile` and A arrays of `rows_ld` (tile, ld) tiles, `sq`
// (tile, tile) tiles and `vecs` (tile) vectors.
template <class A>
size_t smem_bytes(int tile, int ld, int pos_arrays, int rows_ld, int sq, int vecs) {
  const size_t t = static_cast<size_t>(tile);
  return pos_arrays * round8(t * sizeof(int64_t)) + rows_ld * round8(t * ld * sizeof(A)) +
         sq * round8(t * t * sizeof(A)) + vecs * round8(t * sizeof(A));
}
template <class A>
size_t fwd_smem(int tile, int ld) {
  return smem_bytes<A>(tile, ld, 2, 4, 1, 3);
}
template <class A>
size_t dq_smem(int tile, int ld) {
  return smem_bytes<A>(tile, ld, 2, 5, 1, 2);
}
template <class A>
size_t dkdv_smem(int tile, int ld) {
  return smem_bytes<A>(tile, ld, 2, 6, 2, 2);
}

// The largest tile of 64 / 32 / 16 / 8 whose shared memory (bytes(tile)) fits in 64 KiB, else in
// the device's opt-in limit; raises the kernel's limit when needed. Throws not_supported when even
// 8 does not fit (a very large head dimension).
template <class Kernel, class Bytes>
int pick_tile(Kernel kernel, Bytes bytes, const char* op) {
  for (int t : {64, 32, 16, 8})
    if (bytes(t) <= 64 * 1024) {
      set_smem(kernel, bytes(t), op);
      return t;
    }
  int dev = 0, optin = 0;
  MOE_CUDA_CHECK(cudaGetDevice(&dev));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  for (int t : {32, 16, 8})
    if (bytes(t) <= static_cast<size_t>(optin)) {
      set_smem(kernel, bytes(t), op);
      return t;
    }
  MOE_THROW(ErrorCode::not_supported, op, ": the head dimension needs ", bytes(8),
            " bytes of shared memory per block even with 8-row tiles, the device allows ", optin);
}

// ---- tile loads ----------------------------------------------------------------------------------
// dst (tile, ld) = mul · rows [i0, i0 + n) of (b, head) (row stride `stride`), zero rows past n.
template <class T, class A>
__device__ void load_tile(A* dst, const T* __restrict__ src, int64_t stride, int n, int tile, int ld, int64_t hd,
                          A mul) {
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
    const int i = static_cast<int>(e / hd);
    const int64_t d = e - i * hd;
    dst[i * ld + d] = i < n ? mul * to_acc(src[i * stride + d]) : A(0);
  }
}

// Σ_d a[d]·b[d] over hd, in d order.
template <class A>
__device__ __forceinline__ A dot(const A* a, const A* b, int64_t hd) {
  A acc = 0;
  for (int64_t d = 0; d < hd; ++d) acc += a[d] * b[d];
  return acc;
}

// ---- forward -------------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(Geo g, double scale, const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    acc_t<T>* __restrict__ lse) {
  using A = acc_t<T>;
  const int tile = g.tile, ld = g.ld, tid = threadIdx.x;
  const int64_t hd = g.hd, nqt = (g.Sq + tile - 1) / tile, blk = blockIdx.x;
  const int64_t qt = blk % nqt, h = (blk / nqt) % g.nq, b = blk / (nqt * g.nq), kvh = h / g.r;
  const int64_t i0 = qt * tile;
  const int ni = static_cast<int>(min(static_cast<int64_t>(tile), g.Sq - i0));

  Carver c{g_attn_smem};
  int64_t* sQpos = c.take<int64_t>(tile);  // (tile) query positions, kPosNone past ni
  int64_t* sKpos = c.take<int64_t>(tile);  // (tile) key positions, kPosLast past nk
  A* sQ = c.take<A>(tile * ld);            // (tile, ld) scale · q
  A* sO = c.take<A>(tile * ld);            // (tile, ld) unnormalised output
  A* sK = c.take<A>(tile * ld);            // (tile, ld) key tile
  A* sV = c.take<A>(tile * ld);            // (tile, ld) value tile
  A* sS = c.take<A>(tile * tile);          // (tile, tile) scores, then probabilities
  A* sM = c.take<A>(tile);                 // (tile) running max
  A* sL = c.take<A>(tile);                 // (tile) running sum of e^(s − m)
  A* sC = c.take<A>(tile);                 // (tile) this step's rescale e^(m − m')

  load_tile(sQ, q + g.q_off(i0, b, h), g.q_stride, ni, tile, ld, hd, static_cast<A>(scale));
  for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
    const int i = static_cast<int>(e / hd);
    sO[i * ld + (e - i * hd)] = A(0);
  }
  for (int i = tid; i < tile; i += blockDim.x) {
    sQpos[i] = i < ni ? q_pos[i0 + i] : kPosNone;
    sM[i] = neg_inf<A>();
    sL[i] = A(0);
  }
  __syncthreads();
  int64_t qmax = kPosNone;  // the tile's latest query (every thread computes the same)
  for (int i = 0; i < ni; ++i) qmax = max(qmax, sQpos[i]);

  const T* kb = k + g.kv_off(0, b, kvh);
  const T* vb = v + g.kv_off(0, b, kvh);
  for (int64_t j0 = 0; j0 < g.Sk; j0 += tile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(tile), g.Sk - j0));
    for (int j = tid; j < tile; j += blockDim.x) sKpos[j] = j < nk ? k_pos[j0 + j] : kPosLast;
    __syncthreads();
    bool any = false;  // uniform over the block
    for (int j = 0; j < nk; ++j) any = any || sKpos[j] <= qmax;
    if (!any) {
      __syncthreads();  // sKpos is rewritten next
      continue;
    }
    load_tile(sK, kb + j0 * g.kv_stride, g.kv_stride, nk, tile, ld, hd, A(1));
    load_tile(sV, vb + j0 * g.kv_stride, g.kv_stride, nk, tile, ld, hd, A(1));
    __syncthreads();
    // S = (scale·Q) Kᵀ, −inf where masked
    for (int e = tid; e < tile * tile; e += blockDim.x) {
      const int i = e / tile, j = e - i * tile;
      sS[e] = sKpos[j] <= sQpos[i] ? dot(sQ + i * ld, sK + j * ld, hd) : neg_inf<A>();
    }
    __syncthreads();
    // online softmax, one thread per query row
    for (int i = tid; i < tile; i += blockDim.x) {
      A* si = sS + i * tile;
      A mb = neg_inf<A>();
      for (int j = 0; j < tile; ++j) mb = d_max(mb, si[j]);
      const A m_old = sM[i], m_new = d_max(m_old, mb);
      A corr = A(1);
      if (m_new == neg_inf<A>()) {  // nothing visible yet: P = 0
        for (int j = 0; j < tile; ++j) si[j] = A(0);
      } else {
        corr = d_exp(m_old - m_new);  // 0 while m_old = −inf
        A sum = 0;
        for (int j = 0; j < tile; ++j) {
          const A p = d_exp(si[j] - m_new);  // e^−inf = 0 for masked keys
          si[j] = p;
          sum += p;
        }
        sL[i] = sL[i] * corr + sum;
        sM[i] = m_new;
      }
      sC[i] = corr;
    }
    __syncthreads();
    // O = O · corr + P V
    for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
      const int i = static_cast<int>(e / hd);
      const int64_t d = e - i * hd;
      A acc = sO[i * ld + d] * sC[i];
      for (int j = 0; j < nk; ++j) acc += sS[i * tile + j] * sV[j * ld + d];
      sO[i * ld + d] = acc;
    }
    __syncthreads();
  }

  T* ob = o + g.q_off(i0, b, h);
  for (int64_t e = tid; e < static_cast<int64_t>(ni) * hd; e += blockDim.x) {
    const int i = static_cast<int>(e / hd);
    const int64_t d = e - i * hd;
    const A l = sL[i];
    ob[i * g.q_stride + d] = from_acc<T>(l > A(0) ? sO[i * ld + d] / l : A(0));
  }
  for (int i = tid; i < ni; i += blockDim.x) {
    const A l = sL[i];
    lse[g.stat_off(b, h) + i0 + i] = l > A(0) ? sM[i] + d_log(l) : neg_inf<A>();
  }
}

// ---- backward ------------------------------------------------------------------------------------
// D (B, nq, Sq) = Σ_d dout·o per query row; one warp per row r = (i·B + b)·nq + h of q's layout.
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_d_kernel(Geo g, const T* __restrict__ o, const T* __restrict__ dout, acc_t<T>* __restrict__ D) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = blockIdx.x * int64_t(kThreads / kWarp) + threadIdx.x / kWarp;
  if (row >= g.Sq * g.B * g.nq) return;  // a whole warp leaves together
  const int64_t h = row % g.nq, b = (row / g.nq) % g.B, i = row / (g.nq * g.B);
  const T* orow = o + row * g.hd;
  const T* drow = dout + row * g.hd;
  A acc = 0;
  for (int64_t d = lane; d < g.hd; d += kWarp) acc += to_acc(drow[d]) * to_acc(orow[d]);
  acc = warp_sum(acc);
  if (lane == 0) D[g.stat_off(b, h) + i] = acc;
}

// dq for one (b, h, query tile).
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_dq_kernel(Geo g, double scale, const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                   const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ D, const T* __restrict__ dout,
                   T* __restrict__ dq) {
  using A = acc_t<T>;
  const int tile = g.tile, ld = g.ld, tid = threadIdx.x;
  const int64_t hd = g.hd, nqt = (g.Sq + tile - 1) / tile, blk = blockIdx.x;
  const int64_t qt = blk % nqt, h = (blk / nqt) % g.nq, b = blk / (nqt * g.nq), kvh = h / g.r;
  const int64_t i0 = qt * tile;
  const int ni = static_cast<int>(min(static_cast<int64_t>(tile), g.Sq - i0));

  Carver c{g_attn_smem};
  int64_t* sQpos = c.take<int64_t>(tile);  // (tile)
  int64_t* sKpos = c.take<int64_t>(tile);  // (tile)
  A* sQ = c.take<A>(tile * ld);            // (tile, ld) scale · q
  A* sdO = c.take<A>(tile * ld);           // (tile, ld) dout
  A* sdQ = c.take<A>(tile * ld);           // (tile, ld) Σ_j dS_ij k_j
  A* sK = c.take<A>(tile * ld);            // (tile, ld) key tile
  A* sV = c.take<A>(tile * ld);            // (tile, ld) value tile
  A* sdS = c.take<A>(tile * tile);         // (tile, tile) dS
  A* sLse = c.take<A>(tile);               // (tile) lse, −inf past ni
  A* sD = c.take<A>(tile);                 // (tile) D

  load_tile(sQ, q + g.q_off(i0, b, h), g.q_stride, ni, tile, ld, hd, static_cast<A>(scale));
  load_tile(sdO, dout + g.q_off(i0, b, h), g.q_stride, ni, tile, ld, hd, A(1));
  for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
    const int i = static_cast<int>(e / hd);
    sdQ[i * ld + (e - i * hd)] = A(0);
  }
  for (int i = tid; i < tile; i += blockDim.x) {
    sQpos[i] = i < ni ? q_pos[i0 + i] : kPosNone;
    sLse[i] = i < ni ? lse[g.stat_off(b, h) + i0 + i] : neg_inf<A>();
    sD[i] = i < ni ? D[g.stat_off(b, h) + i0 + i] : A(0);
  }
  __syncthreads();
  int64_t qmax = kPosNone;
  for (int i = 0; i < ni; ++i) qmax = max(qmax, sQpos[i]);

  const T* kb = k + g.kv_off(0, b, kvh);
  const T* vb = v + g.kv_off(0, b, kvh);
  for (int64_t j0 = 0; j0 < g.Sk; j0 += tile) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(tile), g.Sk - j0));
    for (int j = tid; j < tile; j += blockDim.x) sKpos[j] = j < nk ? k_pos[j0 + j] : kPosLast;
    __syncthreads();
    bool any = false;
    for (int j = 0; j < nk; ++j) any = any || sKpos[j] <= qmax;
    if (!any) {
      __syncthreads();
      continue;
    }
    load_tile(sK, kb + j0 * g.kv_stride, g.kv_stride, nk, tile, ld, hd, A(1));
    load_tile(sV, vb + j0 * g.kv_stride, g.kv_stride, nk, tile, ld, hd, A(1));
    __syncthreads();
    // dS = P ∘ (dO Vᵀ − D), P = e^(s − lse)
    for (int e = tid; e < tile * tile; e += blockDim.x) {
      const int i = e / tile, j = e - i * tile;
      A ds = 0;
      if (sKpos[j] <= sQpos[i] && sLse[i] != neg_inf<A>()) {
        const A p = d_exp(dot(sQ + i * ld, sK + j * ld, hd) - sLse[i]);
        ds = p * (dot(sdO + i * ld, sV + j * ld, hd) - sD[i]);
      }
      sdS[e] = ds;
    }
    __syncthreads();
    // dQ += dS K
    for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
      const int i = static_cast<int>(e / hd);
      const int64_t d = e - i * hd;
      A acc = sdQ[i * ld + d];
      for (int j = 0; j < nk; ++j) acc += sdS[i * tile + j] * sK[j * ld + d];
      sdQ[i * ld + d] = acc;
    }
    __syncthreads();
  }

  T* dqb = dq + g.q_off(i0, b, h);
  const A sc = static_cast<A>(scale);
  for (int64_t e = tid; e < static_cast<int64_t>(ni) * hd; e += blockDim.x) {
    const int i = static_cast<int>(e / hd);
    const int64_t d = e - i * hd;
    dqb[i * g.q_stride + d] = from_acc<T>(sc * sdQ[i * ld + d]);
  }
}

// dk, dv for one (b, kv head g, key tile), summed over the r query heads of g.
template <class T>
__global__ void __launch_bounds__(kThreads)
    attn_dkdv_kernel(Geo g, double scale, const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                     const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ D, const T* __restrict__ dout,
                     T* __restrict__ dk, T* __restrict__ dv) {
  using A = acc_t<T>;
  const int tile = g.tile, ld = g.ld, tid = threadIdx.x;
  const int64_t hd = g.hd, nkt = (g.Sk + tile - 1) / tile, blk = blockIdx.x;
  const int64_t kt = blk % nkt, kvh = (blk / nkt) % g.nkv, b = blk / (nkt * g.nkv);
  const int64_t j0 = kt * tile;
  const int nk = static_cast<int>(min(static_cast<int64_t>(tile), g.Sk - j0));

  Carver c{g_attn_smem};
  int64_t* sQpos = c.take<int64_t>(tile);  // (tile)
  int64_t* sKpos = c.take<int64_t>(tile);  // (tile)
  A* sK = c.take<A>(tile * ld);            // (tile, ld) key tile
  A* sV = c.take<A>(tile * ld);            // (tile, ld) value tile
  A* sdK = c.take<A>(tile * ld);           // (tile, ld) Σ_i dS_ij (scale·q_i)
  A* sdV = c.take<A>(tile * ld);           // (tile, ld) Σ_i P_ij dO_i
  A* sQ = c.take<A>(tile * ld);            // (tile, ld) scale · q of the query tile
  A* sdO = c.take<A>(tile * ld);           // (tile, ld) dout of the query tile
  A* sP = c.take<A>(tile * tile);          // (tile, tile) P
  A* sdS = c.take<A>(tile * tile);         // (tile, tile) dS
  A* sLse = c.take<A>(tile);               // (tile)
  A* sD = c.take<A>(tile);                 // (tile)

  const T* kb = k + g.kv_off(j0, b, kvh);
  load_tile(sK, kb, g.kv_stride, nk, tile, ld, hd, A(1));
  load_tile(sV, v + g.kv_off(j0, b, kvh), g.kv_stride, nk, tile, ld, hd, A(1));
  for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
    const int j = static_cast<int>(e / hd);
    const int64_t d = e - j * hd;
    sdK[j * ld + d] = A(0);
    sdV[j * ld + d] = A(0);
  }
  for (int j = tid; j < tile; j += blockDim.x) sKpos[j] = j < nk ? k_pos[j0 + j] : kPosLast;
  __syncthreads();
  int64_t kmin = kPosLast;  // the tile's earliest key
  for (int j = 0; j < nk; ++j) kmin = min(kmin, sKpos[j]);

  for (int64_t hh = 0; hh < g.r; ++hh) {
    const int64_t h = kvh * g.r + hh;
    for (int64_t i0 = 0; i0 < g.Sq; i0 += tile) {
      const int ni = static_cast<int>(min(static_cast<int64_t>(tile), g.Sq - i0));
      for (int i = tid; i < tile; i += blockDim.x) sQpos[i] = i < ni ? q_pos[i0 + i] : kPosNone;
      __syncthreads();
      bool any = false;
      for (int i = 0; i < ni; ++i) any = any || sQpos[i] >= kmin;
      if (!any) {
        __syncthreads();
        continue;
      }
      load_tile(sQ, q + g.q_off(i0, b, h), g.q_stride, ni, tile, ld, hd, static_cast<A>(scale));
      load_tile(sdO, dout + g.q_off(i0, b, h), g.q_stride, ni, tile, ld, hd, A(1));
      for (int i = tid; i < tile; i += blockDim.x) {
        sLse[i] = i < ni ? lse[g.stat_off(b, h) + i0 + i] : neg_inf<A>();
        sD[i] = i < ni ? D[g.stat_off(b, h) + i0 + i] : A(0);
      }
      __syncthreads();
      // P = e^(s − lse), dS = P ∘ (dO Vᵀ − D)
      for (int e = tid; e < tile * tile; e += blockDim.x) {
        const int i = e / tile, j = e - i * tile;
        A p = 0, ds = 0;
        if (sKpos[j] <= sQpos[i] && sLse[i] != neg_inf<A>()) {
          p = d_exp(dot(sQ + i * ld, sK + j * ld, hd) - sLse[i]);
          ds = p * (dot(sdO + i * ld, sV + j * ld, hd) - sD[i]);
        }
        sP[e] = p;
        sdS[e] = ds;
      }
      __syncthreads();
      // dV += Pᵀ dO, dK += dSᵀ (scale·Q)
      for (int64_t e = tid; e < static_cast<int64_t>(tile) * hd; e += blockDim.x) {
        const int j = static_cast<int>(e / hd);
        const int64_t d = e - j * hd;
        A av = sdV[j * ld + d], ak = sdK[j * ld + d];
        for (int i = 0; i < ni; ++i) {
          av += sP[i * tile + j] * sdO[i * ld + d];
          ak += sdS[i * tile + j] * sQ[i * ld + d];
        }
        sdV[j * ld + d] = av;
        sdK[j * ld + d] = ak;
      }
      __syncthreads();
    }
  }

  T* dkb = dk + g.kv_off(j0, b, kvh);
  T* dvb = dv + g.kv_off(j0, b, kvh);
  for (int64_t e = tid; e < static_cast<int64_t>(nk) * hd; e += blockDim.x) {
    const int j = static_cast<int>(e / hd);
    const int64_t d = e - j * hd;
    dkb[j * g.kv_stride + d] = from_acc<T>(sdK[j * ld + d]);
    dvb[j * g.kv_stride + d] = from_acc<T>(sdV[j * ld + d]);
  }
}

}  // namespace

void cuda_attn_fwd(const AttnFwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  const char* op = "attn_fwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (a.B * a.nq * a.Sq == 0) return;
    Geo g = make_geo(a);
    g.tile = pick_tile(attn_fwd_kernel<T>, [&](int t) { return fwd_smem<A>(t, g.ld); }, op);
    const int64_t blocks = a.B * a.nq * ((a.Sq + g.tile - 1) / g.tile);
    attn_fwd_kernel<T><<<grid_rows(blocks, op), kThreads, fwd_smem<A>(g.tile, g.ld), stream_of(ctx)>>>(
        g, a.scale, a.q_pos, a.k_pos, static_cast<const T*>(a.q), static_cast<const T*>(a.k),
        static_cast<const T*>(a.v), static_cast<T*>(a.o), static_cast<A*>(a.lse));
    MOE_CUDA_CHECK_LAUNCH("attn_fwd_kernel");
  });
}

void cuda_attn_bwd(const AttnBwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  const char* op = "attn_bwd";
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const Geo g0 = make_geo(a);
    const T* q = static_cast<const T*>(a.q);
    const T* k = static_cast<const T*>(a.k);
    const T* v = static_cast<const T*>(a.v);
    const T* dout = static_cast<const T*>(a.dout);
    const A* lse = static_cast<const A*>(a.lse);
    const int64_t rows = a.Sq * a.B * a.nq;
    Scratch D(ctx, static_cast<size_t>(rows) * sizeof(A));  // (B, nq, Sq) Σ dO·o
    if (rows > 0) {
      constexpr int warps = kThreads / kWarp;
      attn_d_kernel<T><<<grid_rows(ceil_div(rows, warps), op), kThreads, 0, stream_of(ctx)>>>(
          g0, static_cast<const T*>(a.o), dout, D.as<A>());
      MOE_CUDA_CHECK_LAUNCH("attn_d_kernel");

      Geo g = g0;
      g.tile = pick_tile(attn_dq_kernel<T>, [&](int t) { return dq_smem<A>(t, g.ld); }, op);
      const int64_t blocks = a.B * a.nq * ((a.Sq + g.tile - 1) / g.tile);
      attn_dq_kernel<T><<<grid_rows(blocks, op), kThreads, dq_smem<A>(g.tile, g.ld), stream_of(ctx)>>>(
          g, a.scale, a.q_pos, a.k_pos, q, k, v, lse, D.as<A>(), dout, static_cast<T*>(a.dq));
      MOE_CUDA_CHECK_LAUNCH("attn_dq_kernel");
    }
    if (a.B * a.nkv * a.Sk > 0) {
      Geo g = g0;
      g.tile = pick_tile(attn_dkdv_kernel<T>, [&](int t) { return dkdv_smem<A>(t, g.ld); }, op);
      const int64_t blocks = a.B * a.nkv * ((a.Sk + g.tile - 1) / g.tile);
      attn_dkdv_kernel<T><<<grid_rows(blocks, op), kThreads, dkdv_smem<A>(g.tile, g.ld), stream_of(ctx)>>>(
          g, a.scale, a.q_pos, a.k_pos, q, k, v, lse, D.as<A>(), dout, static_cast<T*>(a.dk), static_cast<T*>(a.dv));
      MOE_CUDA_CHECK_LAUNCH("attn_dkdv_kernel");
    }
  });
}

}  // namespace moe
