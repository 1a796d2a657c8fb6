// Causal softmax attention with grouped query heads on the CPU (kernels/ops.h: AttnFwdArgs /
// AttnBwdArgs): FlashAttention-2's algorithm in plain loops, never an (Sq × Sk) matrix.
//
//   q (Sq, B, nq, hd), k/v (Sk, B, nkv, hd), o like q, lse (B, nq, Sq) in the stat dtype.
//   Query head h reads key/value head g = h / r, r = nq / nkv. Key j is visible to query i iff
//   k_pos[j] <= q_pos[i] (positions may come in any order: context-parallel chunks).
//
// Forward, one task per (b, h, block of kBq queries), keys in blocks of kBk:
//   S = (scale·Q) Kᵀ (kBq, kBk), masked to −inf;  online softmax per row i:
//   m' = max(m, max_j S_ij), P_ij = e^(S_ij − m'), l = l·e^(m − m') + Σ_j P_ij, O = O·e^(m − m') + P V
//   and at the end o_i = O_i / l_i, lse_i = m_i + log l_i (no visible key: o_i = 0, lse_i = −inf).
// Backward, one task per (b, kv head g), owning dk/dv of g and dq of the r query heads of g:
//   D_i = Σ dO_i·o_i;  per key block (outer) and per (query head, query block) (inner):
//   P = e^(S − lse) (recomputed), dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D),
//   dQ += dS K (times scale at the end), dK += dSᵀ (scale·Q).
// Tasks never share an output element and every sum runs in a fixed order, so the results are the
// same bits at any thread count. Blocks whose keys are all after all of the block's queries (by the
// per-block min/max positions) are skipped; blocks whose keys all precede all of its queries need
// no mask.
//
// Compute ("A") is f32 for f32/bf16/f16 storage and f64 for f64. The f32 exponential is Cephes'
// expf polynomial on GCC vector extensions (within 2 ulp of expf), as in activation.cpp; the task
// functions are compiled for x86-64-v4 / v3 / baseline with the best picked at load time
// (target_clones), so the plain inner loops (over the keys of a block or over hd) vectorise.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

namespace moe {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

namespace {

constexpr int64_t kBq = 64;  // queries per block
constexpr int64_t kBk = 64;  // keys per block
// Below about this many score elements × hd a call runs on one thread (a parallel region would
// cost more than it saves; finite-difference tests make thousands of tiny calls).
constexpr int64_t kParallelWork = int64_t{1} << 20;

using namespace cpu::simd;  // vf, load / store, exp_f32_flush (kernels/cpu/simd.h)

template <class A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// ---- positions: which blocks see which ---------------------------------------------------------
struct PosRange {
  int64_t lo, hi;  // min and max position in the block
};
// (ceil(n / bs)) ranges of the blocks of `bs` consecutive entries of pos (n).
std::vector<PosRange> block_ranges(const int64_t* pos, int64_t n, int64_t bs) {
  std::vector<PosRange> r(static_cast<size_t>((n + bs - 1) / bs));
  for (size_t blk = 0; blk < r.size(); ++blk) {
    const int64_t i0 = static_cast<int64_t>(blk) * bs, i1 = std::min(n, i0 + bs);
    PosRange pr{pos[i0], pos[i0]};
    for (int64_t i = i0 + 1; i < i1; ++i) {
      pr.lo = std::min(pr.lo, pos[i]);
      pr.hi = std::max(pr.hi, pos[i]);
    }
    r[blk] = pr;
  }
  return r;
}

enum class Vis { none, some, all };
// A key block against a query block: no key visible to any query, every key visible to every
// query, or a mix (then the mask is applied element by element).
MOE_SIMD_INLINE Vis visibility(PosRange q, PosRange k) {
  if (k.lo > q.hi) return Vis::none;
  if (k.hi <= q.lo) return Vis::all;
  return Vis::some;
}

// ---- block helpers -----------------------------------------------------------------------------
// dst (n, hd) = mul · rows of src (row r at src + r·stride), in the compute type.
template <class T, class A>
MOE_SIMD_INLINE void load_rows(const T* src, int64_t stride, int64_t n, int64_t hd, A mul, A* __restrict dst) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < hd; ++d) dst[r * hd + d] = mul * to_acc(src[r * stride + d]);
}

// dst (hd, kBk) = the same rows transposed, dst[d·kBk + j] = src row j element d; columns j ≥ n are 0.
template <class T, class A>
MOE_SIMD_INLINE void load_rows_t(const T* src, int64_t stride, int64_t n, int64_t hd, A* __restrict dst) {
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t j = n; j < kBk; ++j) dst[d * kBk + j] = A(0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < hd; ++d) dst[d * kBk + j] = to_acc(src[j * stride + d]);
}

// Rows of dst (T, row r at dst + r·stride) = mul · src (n, hd).
template <class T, class A>
MOE_SIMD_INLINE void store_rows(const A* __restrict src, int64_t n, int64_t hd, A mul, T* dst, int64_t stride) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t d = 0; d < hd; ++d) dst[r * stride + d] = from_acc<T>(mul * src[r * hd + d]);
}

// s (rows, kBk) = a (rows, hd) · bt (hd, kBk): per row a sum of hd rank-1 updates, the inner loop
// over the kBk keys (a small GEMM; used for S = Q Kᵀ and dP = dO Vᵀ).
template <class A>
MOE_SIMD_INLINE void block_gemm_nt(const A* __restrict a, const A* __restrict bt, int64_t rows, int64_t hd,
                                   A* __restrict s) {
  for (int64_t i = 0; i < rows; ++i) {
    A* si = s + i * kBk;
    for (int64_t j = 0; j < kBk; ++j) si[j] = A(0);
    for (int64_t d = 0; d < hd; ++d) {
      const A ad = a[i * hd + d];
      const A* bd = bt + d * kBk;
      for (int64_t j = 0; j < kBk; ++j) si[j] += ad * bd[j];
    }
  }
}

// f32: four rows at a time, their 4 × kBk sums held in registers across the hd loop, so each
// loaded row of bt feeds four rows; every sum still adds its terms in d order (the same bits).
MOE_SIMD_INLINE void block_gemm_nt(const float* __restrict a, const float* __restrict bt, int64_t rows, int64_t hd,
                                   float* __restrict s) {
  constexpr int64_t R = 4, NV = kBk / kLanes;
  int64_t i = 0;
  for (; i + R <= rows; i += R) {
    vf acc[R][NV];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
    for (int64_t d = 0; d < hd; ++d) {
      vf b[NV];
      for (int64_t v = 0; v < NV; ++v) b[v] = load(bt + d * kBk + v * kLanes);
      for (int64_t r = 0; r < R; ++r) {
        const vf ad = splat(a[(i + r) * hd + d]);
        for (int64_t v = 0; v < NV; ++v) acc[r][v] += ad * b[v];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < NV; ++v) store(s + (i + r) * kBk + v * kLanes, acc[r][v]);
  }
  if (i < rows) block_gemm_nt<float>(a + i * hd, bt, rows - i, hd, s + i * kBk);
}

// s (rows, kBk) = −inf where key j is not visible to query i: j ≥ nk, or (unless the whole block
// is visible) k_pos[j] > q_pos[i].
template <class A>
MOE_SIMD_INLINE void apply_mask(A* __restrict s, int64_t rows, int64_t nk, const int64_t* q_pos, const int64_t* k_pos,
                                Vis vis) {
  for (int64_t i = 0; i < rows; ++i) {
    A* si = s + i * kBk;
    if (vis == Vis::some)
      for (int64_t j = 0; j < nk; ++j)
        if (k_pos[j] > q_pos[i]) si[j] = neg_inf<A>();
    for (int64_t j = nk; j < kBk; ++j) si[j] = neg_inf<A>();
  }
}

// s (kBk) = e^(s − sub) in place, −inf (a masked score) giving exactly 0. f32: the polynomial
// exp of kernels/cpu/simd.h (Cephes' expf coefficients, within 2 ulp of expf; the auto-vectoriser
// leaves a clamped scalar version alone under -ftrapping-math), exactly 0 below −87.3.
static_assert(kBk % kLanes == 0);

MOE_SIMD_INLINE void exp_row(float* __restrict s, float sub) {
  for (int64_t j = 0; j < kBk; j += kLanes) store(s + j, exp_f32_flush(load(s + j) - sub));
}
MOE_SIMD_INLINE void exp_row(double* __restrict s, double sub) {
  for (int64_t j = 0; j < kBk; ++j) s[j] = std::exp(s[j] - sub);
}

// Σ_j s_j (kBk) in 8 lane sums added in a fixed order (vectorisable, and the same bits every time).
template <class A>
MOE_SIMD_INLINE A row_sum(const A* __restrict s) {
  A lanes[8] = {};
  for (int64_t j = 0; j < kBk; j += 8)
    for (int64_t u = 0; u < 8; ++u) lanes[u] += s[j + u];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// max_j s_j (kBk); f32 in 16 lanes (a scalar max chain is latency bound), then across the lanes.
MOE_SIMD_INLINE float row_max(const float* __restrict s) {
  vf m = load(s);
  for (int64_t j = kLanes; j < kBk; j += kLanes) {
    const vf x = load(s + j);
    m = x > m ? x : m;
  }
  return hmax(m);
}
MOE_SIMD_INLINE double row_max(const double* __restrict s) {
  double m = s[0];
  for (int64_t j = 1; j < kBk; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// out (hd) += Σ_j w[j] · x_j over n rows x_j (hd each, at x + j·hd), skipping zero weights (masked
// keys). Columns go in chunks of C held in registers across the j loop (then chunks of 16, then
// one by one), so each output element is loaded and stored once per call; every element still
// sums its terms in j order.
template <int64_t C, class A>
MOE_SIMD_INLINE int64_t add_weighted_cols(A* __restrict out, const A* __restrict w, int64_t wstride,
                                          const A* __restrict x, int64_t n, int64_t hd, int64_t d0) {
  for (; d0 + C <= hd; d0 += C) {
    A acc[C];
    for (int64_t c = 0; c < C; ++c) acc[c] = out[d0 + c];
    for (int64_t j = 0; j < n; ++j) {
      const A wj = w[j * wstride];
      if (wj == A(0)) continue;
      const A* xj = x + j * hd + d0;
      for (int64_t c = 0; c < C; ++c) acc[c] += wj * xj[c];
    }
    for (int64_t c = 0; c < C; ++c) out[d0 + c] = acc[c];
  }
  return d0;
}
template <class A>
MOE_SIMD_INLINE void add_weighted_rows(A* __restrict out, const A* __restrict w, int64_t wstride, const A* __restrict x,
                                       int64_t n, int64_t hd) {
  int64_t d0 = add_weighted_cols<64>(out, w, wstride, x, n, hd, 0);
  d0 = add_weighted_cols<16>(out, w, wstride, x, n, hd, d0);
  add_weighted_cols<1>(out, w, wstride, x, n, hd, d0);
}

// out (n_out, hd; row o at out + o·hd) += W X: out_o += Σ_{j < n_in} w[o·os + j·js] · x_j (x_j at
// x + j·hd), every element summing its terms in j order. f32 with hd a multiple of 16 up to 128
// takes R rows at a time (R·hd/16 sums in registers across the j loop, each loaded x_j feeding R
// rows) and no zero skipping (a zero weight adds an exact zero); the rest go row by row above.
template <int64_t NV, int64_t R>
MOE_SIMD_INLINE int64_t add_weighted_block_f32(float* __restrict out, const float* __restrict w, int64_t os,
                                               int64_t js, const float* __restrict x, int64_t n_out, int64_t n_in) {
  constexpr int64_t hd = NV * kLanes;
  int64_t o = 0;
  for (; o + R <= n_out; o += R) {
    vf acc[R][NV];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = load(out + (o + r) * hd + v * kLanes);
    for (int64_t j = 0; j < n_in; ++j) {
      vf xv[NV];
      for (int64_t v = 0; v < NV; ++v) xv[v] = load(x + j * hd + v * kLanes);
      for (int64_t r = 0; r < R; ++r) {
        const vf wr = splat(w[(o + r) * os + j * js]);
        for (int64_t v = 0; v < NV; ++v) acc[r][v] += wr * xv[v];
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < NV; ++v) store(out + (o + r) * hd + v * kLanes, acc[r][v]);
  }
  return o;
}
template <class A>
MOE_SIMD_INLINE void add_weighted_block(A* __restrict out, const A* __restrict w, int64_t os, int64_t js,
                                        const A* __restrict x, int64_t n_out, int64_t n_in, int64_t hd) {
  int64_t o = 0;
  if constexpr (std::is_same_v<A, float>) {
    if (hd == 32) o = add_weighted_block_f32<2, 6>(out, w, os, js, x, n_out, n_in);
    else if (hd == 64) o = add_weighted_block_f32<4, 4>(out, w, os, js, x, n_out, n_in);
    else if (hd == 128) o = add_weighted_block_f32<8, 2>(out, w, os, js, x, n_out, n_in);
  }
  for (; o < n_out; ++o) add_weighted_rows(out + o * hd, w + o * os, js, x, n_in, hd);
}

// ---- the problem, shared by both directions ------------------------------------------------------
struct Plan {
  int64_t Sq, Sk, B, nq, nkv, hd, r;  // r = nq / nkv query heads per kv head
  int64_t nqb, nkb;                   // query blocks, key blocks
  int64_t q_stride, kv_stride;        // elements between consecutive positions of one (b, head)
  std::vector<PosRange> qr, kr;       // (nqb), (nkb) position ranges per block

  template <class Args>
  explicit Plan(const Args& a)
      : Sq(a.Sq), Sk(a.Sk), B(a.B), nq(a.nq), nkv(a.nkv), hd(a.hd), r(a.nq / a.nkv),
        nqb((a.Sq + kBq - 1) / kBq), nkb((a.Sk + kBk - 1) / kBk), q_stride(a.B * a.nq * a.hd),
        kv_stride(a.B * a.nkv * a.hd), qr(block_ranges(a.q_pos, a.Sq, kBq)), kr(block_ranges(a.k_pos, a.Sk, kBk)) {}
  // Element offset of row i of (b, head) in a (S, B, heads, hd) tensor.
  int64_t q_off(int64_t i, int64_t b, int64_t h) const { return ((i * B + b) * nq + h) * hd; }
  int64_t kv_off(int64_t j, int64_t b, int64_t g) const { return ((j * B + b) * nkv + g) * hd; }
  int64_t lse_off(int64_t b, int64_t h) const { return (b * nq + h) * Sq; }  // row (b, h) of lse (B, nq, Sq)
};

// ---- forward -----------------------------------------------------------------------------------
// One thread's buffers.
template <class A>
struct FwdWork {
  std::vector<A> q;     // (kBq, hd) scale · q of the query block
  std::vector<A> kt;    // (hd, kBk) the key block transposed, zero columns past the last key
  std::vector<A> v;     // (kBk, hd) the value block
  std::vector<A> s;     // (kBq, kBk) scores, then probabilities
  std::vector<A> o;     // (kBq, hd) unnormalised output Σ_j P_ij v_j
  std::vector<A> m, l;  // (kBq) running max and running sum of e^(s − m)
  explicit FwdWork(int64_t hd)
      : q(kBq * hd), kt(hd * kBk), v(kBk * hd), s(kBq * kBk), o(kBq * hd), m(kBq), l(kBq) {}
};

// Task = (b, h, query block qb), flattened in that order.
template <class T>
MOE_SIMD_INLINE void fwd_task(const AttnFwdArgs& a, const Plan& p, int64_t task, FwdWork<acc_t<T>>& w) {
  using A = acc_t<T>;
  const int64_t qb = task % p.nqb, h = (task / p.nqb) % p.nq, b = task / (p.nqb * p.nq), g = h / p.r, hd = p.hd;
  const int64_t i0 = qb * kBq, ni = std::min(kBq, p.Sq - i0);
  const T* k = static_cast<const T*>(a.k) + p.kv_off(0, b, g);  // (Sk) rows of (b, g)
  const T* v = static_cast<const T*>(a.v) + p.kv_off(0, b, g);
  A* q = w.q.data();
  A* s = w.s.data();
  A* o = w.o.data();
  A* m = w.m.data();
  A* l = w.l.data();
  load_rows(static_cast<const T*>(a.q) + p.q_off(i0, b, h), p.q_stride, ni, hd, static_cast<A>(a.scale), q);
  std::fill(o, o + ni * hd, A(0));
  std::fill(m, m + ni, neg_inf<A>());
  std::fill(l, l + ni, A(0));

  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const Vis vis = visibility(p.qr[static_cast<size_t>(qb)], p.kr[static_cast<size_t>(kb)]);
    if (vis == Vis::none) continue;
    const int64_t j0 = kb * kBk, nk = std::min(kBk, p.Sk - j0);
    load_rows_t(k + j0 * p.kv_stride, p.kv_stride, nk, hd, w.kt.data());
    load_rows(v + j0 * p.kv_stride, p.kv_stride, nk, hd, A(1), w.v.data());
    block_gemm_nt(q, w.kt.data(), ni, hd, s);  // S = (scale·Q) Kᵀ
    apply_mask(s, ni, nk, a.q_pos + i0, a.k_pos + j0, vis);
    for (int64_t i = 0; i < ni; ++i) {
      A* si = s + i * kBk;
      const A mb = row_max(si);
      if (mb == neg_inf<A>()) {  // no visible key in this block: P_i = 0, the row's state unchanged
        std::fill(si, si + kBk, A(0));
        continue;
      }
      const A m_new = std::max(m[i], mb);
      const A corr = std::exp(m[i] - m_new);  // 0 while m_i is −inf
      exp_row(si, m_new);                      // P_ij = e^(S_ij − m')
      l[i] = l[i] * corr + row_sum(si);
      m[i] = m_new;
      A* oi = o + i * hd;
      if (corr != A(1))
        for (int64_t d = 0; d < hd; ++d) oi[d] *= corr;
    }
    add_weighted_block(o, s, kBk, 1, w.v.data(), ni, nk, hd);  // O_i += Σ_j P_ij v_j
  }

  T* out = static_cast<T*>(a.o) + p.q_off(i0, b, h);
  A* lse = static_cast<A*>(a.lse) + p.lse_off(b, h) + i0;
  for (int64_t i = 0; i < ni; ++i) {
    const bool seen = l[i] > A(0);  // l_i ≥ 1 once a key was visible
    const A inv = seen ? A(1) / l[i] : A(0);
    for (int64_t d = 0; d < hd; ++d) out[i * p.q_stride + d] = from_acc<T>(o[i * hd + d] * inv);
    lse[i] = seen ? m[i] + std::log(l[i]) : neg_inf<A>();
  }
}

// The task function compiled per ISA (target_clones), one per storage type.
MOE_SIMD_CLONES void fwd_task_f32(const AttnFwdArgs& a, const Plan& p, int64_t t, FwdWork<float>& w) {
  fwd_task<float>(a, p, t, w);
}
MOE_SIMD_CLONES void fwd_task_f64(const AttnFwdArgs& a, const Plan& p, int64_t t, FwdWork<double>& w) {
  fwd_task<double>(a, p, t, w);
}
MOE_SIMD_CLONES void fwd_task_bf16(const AttnFwdArgs& a, const Plan& p, int64_t t, FwdWork<float>& w) {
  fwd_task<bf16>(a, p, t, w);
}
MOE_SIMD_CLONES void fwd_task_f16(const AttnFwdArgs& a, const Plan& p, int64_t t, FwdWork<float>& w) {
  fwd_task<f16>(a, p, t, w);
}
template <class T>
constexpr auto fwd_task_fn() {
  if constexpr (std::is_same_v<T, float>) return &fwd_task_f32;
  else if constexpr (std::is_same_v<T, double>) return &fwd_task_f64;
  else if constexpr (std::is_same_v<T, bf16>) return &fwd_task_bf16;
  else return &fwd_task_f16;
}

// ---- backward ----------------------------------------------------------------------------------
template <class A>
struct BwdWork {
  std::vector<A> dq;      // (r, Sq, hd) Σ_j dS_ij k_j for the r query heads of the task (× scale at the end)
  std::vector<A> D;       // (r, Sq) D_i = Σ dO_i·o_i
  std::vector<A> q;       // (kBq, hd) scale · q of the query block
  std::vector<A> dout;    // (kBq, hd) dO of the query block
  std::vector<A> k;       // (kBk, hd) the key block
  std::vector<A> kt, vt;  // (hd, kBk) the key and value blocks transposed
  std::vector<A> dk, dv;  // (kBk, hd) gradients of the key block, summed over the r query heads
  std::vector<A> p;       // (kBq, kBk) probabilities P
  std::vector<A> ds;      // (kBq, kBk) dP, then dS
  BwdWork(int64_t r, int64_t Sq, int64_t hd)
      : dq(r * Sq * hd), D(r * Sq), q(kBq * hd), dout(kBq * hd), k(kBk * hd), kt(hd * kBk), vt(hd * kBk),
        dk(kBk * hd), dv(kBk * hd), p(kBq * kBk), ds(kBq * kBk) {}
};

// Task = (b, kv head g), flattened in that order.
template <class T>
MOE_SIMD_INLINE void bwd_task(const AttnBwdArgs& a, const Plan& p, int64_t task, BwdWork<acc_t<T>>& w) {
  using A = acc_t<T>;
  const int64_t g = task % p.nkv, b = task / p.nkv, hd = p.hd, r = p.r;
  const T* Q = static_cast<const T*>(a.q);
  const T* O = static_cast<const T*>(a.o);
  const T* dO = static_cast<const T*>(a.dout);
  const A* LSE = static_cast<const A*>(a.lse);

  // D_i = Σ_d dO_id · o_id for the r query heads of g.
  for (int64_t hh = 0; hh < r; ++hh) {
    const int64_t h = g * r + hh;
    for (int64_t i = 0; i < p.Sq; ++i) {
      const T* oi = O + p.q_off(i, b, h);
      const T* di = dO + p.q_off(i, b, h);
      A acc = 0;
      for (int64_t d = 0; d < hd; ++d) acc += to_acc(di[d]) * to_acc(oi[d]);
      w.D[static_cast<size_t>(hh * p.Sq + i)] = acc;
    }
  }
  std::fill(w.dq.begin(), w.dq.end(), A(0));

  A* P = w.p.data();
  A* dS = w.ds.data();
  for (int64_t kb = 0; kb < p.nkb; ++kb) {
    const int64_t j0 = kb * kBk, nk = std::min(kBk, p.Sk - j0);
    const T* kblk = static_cast<const T*>(a.k) + p.kv_off(j0, b, g);
    load_rows(kblk, p.kv_stride, nk, hd, A(1), w.k.data());
    load_rows_t(kblk, p.kv_stride, nk, hd, w.kt.data());
    load_rows_t(static_cast<const T*>(a.v) + p.kv_off(j0, b, g), p.kv_stride, nk, hd, w.vt.data());
    std::fill(w.dk.begin(), w.dk.end(), A(0));
    std::fill(w.dv.begin(), w.dv.end(), A(0));

    for (int64_t hh = 0; hh < r; ++hh) {
      const int64_t h = g * r + hh;
      for (int64_t qb = 0; qb < p.nqb; ++qb) {
        const Vis vis = visibility(p.qr[static_cast<size_t>(qb)], p.kr[static_cast<size_t>(kb)]);
        if (vis == Vis::none) continue;
        const int64_t i0 = qb * kBq, ni = std::min(kBq, p.Sq - i0);
        load_rows(Q + p.q_off(i0, b, h), p.q_stride, ni, hd, static_cast<A>(a.scale), w.q.data());
        load_rows(dO + p.q_off(i0, b, h), p.q_stride, ni, hd, A(1), w.dout.data());
        const A* lse = LSE + p.lse_off(b, h) + i0;
        const A* D = w.D.data() + hh * p.Sq + i0;

        // P = e^(S − lse), S = (scale·Q) Kᵀ masked (a query without visible keys has lse = −inf
        // and no visible key here either: its row is 0).
        block_gemm_nt(w.q.data(), w.kt.data(), ni, hd, P);
        apply_mask(P, ni, nk, a.q_pos + i0, a.k_pos + j0, vis);
        for (int64_t i = 0; i < ni; ++i) {
          if (lse[i] == neg_inf<A>())
            std::fill(P + i * kBk, P + (i + 1) * kBk, A(0));
          else
            exp_row(P + i * kBk, lse[i]);
        }
        // dV_j += Σ_i P_ij dO_i
        add_weighted_block(w.dv.data(), P, 1, kBk, w.dout.data(), nk, ni, hd);
        // dP = dO Vᵀ, dS = P ∘ (dP − D)
        block_gemm_nt(w.dout.data(), w.vt.data(), ni, hd, dS);
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < kBk; ++j) dS[i * kBk + j] = P[i * kBk + j] * (dS[i * kBk + j] - D[i]);
        // dQ_i += Σ_j dS_ij k_j
        add_weighted_block(w.dq.data() + (hh * p.Sq + i0) * hd, dS, kBk, 1, w.k.data(), ni, nk, hd);
        // dK_j += Σ_i dS_ij (scale·q_i)
        add_weighted_block(w.dk.data(), dS, 1, kBk, w.q.data(), nk, ni, hd);
      }
    }
    store_rows(w.dk.data(), nk, hd, A(1), static_cast<T*>(a.dk) + p.kv_off(j0, b, g), p.kv_stride);
    store_rows(w.dv.data(), nk, hd, A(1), static_cast<T*>(a.dv) + p.kv_off(j0, b, g), p.kv_stride);
  }

  // dq = scale · Σ_j dS_ij k_j
  for (int64_t hh = 0; hh < r; ++hh)
    store_rows(w.dq.data() + hh * p.Sq * hd, p.Sq, hd, static_cast<A>(a.scale),
               static_cast<T*>(a.dq) + p.q_off(0, b, g * r + hh), p.q_stride);
}

MOE_SIMD_CLONES void bwd_task_f32(const AttnBwdArgs& a, const Plan& p, int64_t t, BwdWork<float>& w) {
  bwd_task<float>(a, p, t, w);
}
MOE_SIMD_CLONES void bwd_task_f64(const AttnBwdArgs& a, const Plan& p, int64_t t, BwdWork<double>& w) {
  bwd_task<double>(a, p, t, w);
}
MOE_SIMD_CLONES void bwd_task_bf16(const AttnBwdArgs& a, const Plan& p, int64_t t, BwdWork<float>& w) {
  bwd_task<bf16>(a, p, t, w);
}
MOE_SIMD_CLONES void bwd_task_f16(const AttnBwdArgs& a, const Plan& p, int64_t t, BwdWork<float>& w) {
  bwd_task<f16>(a, p, t, w);
}
template <class T>
constexpr auto bwd_task_fn() {
  if constexpr (std::is_same_v<T, float>) return &bwd_task_f32;
  else if constexpr (std::is_same_v<T, double>) return &bwd_task_f64;
  else if constexpr (std::is_same_v<T, bf16>) return &bwd_task_bf16;
  else return &bwd_task_f16;
}

}  // namespace

void cpu_attn_fwd(const AttnFwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "attn_fwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t tasks = a.B * a.nq * ((a.Sq + kBq - 1) / kBq);
    if (tasks == 0) return;
    const Plan p(a);
    constexpr auto task_fn = fwd_task_fn<T>();
    // Tasks differ in cost (causal), hence the dynamic schedule; each writes only its own rows.
#pragma omp parallel if (tasks > 1 && a.B * a.nq * a.Sq * a.Sk * a.hd > kParallelWork)
    {
      FwdWork<A> w(a.hd);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) task_fn(a, p, t, w);
    }
  });
}

void cpu_attn_bwd(const AttnBwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "attn_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t tasks = a.B * a.nkv;
    if (tasks == 0) return;
    const Plan p(a);
    constexpr auto task_fn = bwd_task_fn<T>();
#pragma omp parallel if (tasks > 1 && a.B * a.nq * a.Sq * a.Sk * a.hd > kParallelWork)
    {
      BwdWork<A> w(p.r, a.Sq, a.hd);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) task_fn(a, p, t, w);
    }
  });
}

}  // namespace moe
