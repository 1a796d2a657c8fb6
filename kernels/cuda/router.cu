// Router kernels on CUDA (docs/moe.md): scores, group-limited top-k and probabilities with their
// backward; the aux-loss statistics and gradient; the z-loss; capacity dropping and padding.
//
// Layout: one thread block per token for the per-token ops (the E scores of a token live in shared
// memory; thread `tid` owns experts e ≡ tid mod blockDim and is the only one to touch their
// per-expert scratch), one block per expert column for capacity. Compute is in the router dtype
// (f32 or f64), with the same formulas as the CPU reference (kernels/cpu/router.cpp). Top-k is k
// rounds of a block arg-max: larger value first, ties to the lower index. Sums over tokens are
// deterministic: fixed per-block partials, then one fixed-order final sum.
#include <algorithm>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

// Dynamic shared memory of the router kernels (carved per kernel below).
extern __shared__ __align__(16) unsigned char g_router_smem[];

namespace {

using namespace cuda;

constexpr int kTokThreads = 128;                  // threads per token block
constexpr int kTokWarps = kTokThreads / kWarp;
constexpr int kTile = 32;                         // capacity: experts (and tokens) per tile
constexpr int64_t kAuxChunk = 64;                 // tokens per block of the aux statistics
constexpr int kSumThreads = 256;                  // the single block of a final sum

// ---- shared memory carving -----------------------------------------------------------------
// Arrays are laid out in order, each rounded up to 8 bytes; the host computes the same total.
__host__ __device__ constexpr size_t round8(size_t b) { return (b + 7) / 8 * 8; }

struct Carver {
  char* p;
  template <class T>
  __device__ T* take(int64_t n) {
    T* r = reinterpret_cast<T*>(p);
    p += round8(static_cast<size_t>(n) * sizeof(T));
    return r;
  }
};
// ---- scalar score functions (as in the CPU reference) --------------------------------------
template <class R>
__device__ __forceinline__ R raw_score(ScoreFunction f, R l) {
  if (f == ScoreFunction::sigmoid) return d_sigmoid(l);
  R sp = l > R(0) ? l + d_log1p(d_exp(-l)) : d_log1p(d_exp(l));  // softplus, stable for both signs
  return d_sqrt(sp);
}
// ds/dl given s = raw_score(l): σ' = s(1 − s); d sqrt(softplus)/dl = σ(l) / (2 s) (0 in the limit s = 0).
template <class R>
__device__ __forceinline__ R raw_score_grad(ScoreFunction f, R l, R s) {
  if (f == ScoreFunction::sigmoid) return s * (R(1) - s);
  return s > R(0) ? d_sigmoid(l) / (R(2) * s) : R(0);
}
template <class R>
__device__ __forceinline__ R nan_to_neg_inf(R v) {
  return v != v ? neg_inf<R>() : v;
}

// Softmax statistics of a row over the block: max and Σ exp(l − max) (barriers inside).
template <class R>
__device__ void softmax_stats(const R* l, int64_t E, R* red, R& mx, R& sum) {
  R m = neg_inf<R>();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) m = d_max(m, l[e]);
  mx = block_max(m, red);
  R s = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) s += d_exp(l[e] - mx);
  sum = block_sum(s, red);
}

// The j-th round of a top-k over keys (E): the best (value desc, index asc) expert not yet taken.
// `taken` is owner-private (thread e mod blockDim), so no barrier is needed around its updates.
template <class R, class Flag>
__device__ int block_take_best(const R* key, Flag* taken, int64_t E, R* red, int* redi) {
  R v = neg_inf<R>();
  int i = 0x7fffffff;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    if (taken[e]) continue;
    R ke = key[e];
    if (better(ke, static_cast<int>(e), v, i)) {
      v = ke;
      i = static_cast<int>(e);
    }
  }
  block_argmax(v, i, red, redi);
  return i;  // < E: keys are never NaN and at least one expert is left
}

// ---------------------------------------------------------------------------------------------
// router_topk: one block per token.
template <class R>
size_t topk_smem(int64_t E, int64_t k, int64_t G) {
  int64_t g = std::max<int64_t>(G, 1);
  return 2 * round8(E * sizeof(R)) + round8(E * sizeof(int)) + round8(k * sizeof(R)) + round8(k * sizeof(int)) +
         round8(kTokWarps * sizeof(R)) + round8(kTokWarps * sizeof(int)) + round8(g * sizeof(R)) +
         round8(g * sizeof(int));
}

template <class R>
__global__ void __launch_bounds__(kTokThreads)
    router_topk_kernel(const R* __restrict__ logits, const float* __restrict__ bias, R* __restrict__ probs,
                       uint8_t* __restrict__ map, int32_t* __restrict__ topk_idx, int64_t E, int64_t k,
                       ScoreFunction score, bool pre_softmax, int64_t G, int64_t gtop, R scale) {
  Carver c{reinterpret_cast<char*>(g_router_smem)};
  R* key = c.take<R>(E);    // what the selection ranks
  R* val = c.take<R>(E);    // softmax (pre) or raw sigmoid-like scores
  int* sel = c.take<int>(E);  // 0: not selected; j + 1: selected in round j (owner-private)
  R* pk = c.take<R>(k);     // probs in selection order
  int* ik = c.take<int>(k);  // selected experts in selection order
  R* red = c.take<R>(kTokWarps);
  int* redi = c.take<int>(kTokWarps);
  R* gscore = c.take<R>(G > 0 ? G : 1);
  int* gkeep = c.take<int>(G > 0 ? G : 1);

  const int64_t t = blockIdx.x;
  const R* l = logits + t * E;
  // 1. Routing scores.
  if (score == ScoreFunction::softmax) {
    if (pre_softmax) {
      R mx, sum;
      softmax_stats(l, E, red, mx, sum);
      const R inv = R(1) / sum;
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        val[e] = d_exp(l[e] - mx) * inv;
        key[e] = nan_to_neg_inf(val[e]);
        sel[e] = 0;
      }
    } else {
      for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
        key[e] = nan_to_neg_inf(l[e]);
        sel[e] = 0;
      }
    }
  } else {
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      R s = raw_score(score, l[e]);
      val[e] = s;
      key[e] = nan_to_neg_inf(bias ? s + static_cast<R>(bias[e]) : s);
      sel[e] = 0;
    }
  }
  // 2. Group limit: group score = sum of the group's top (k / gtop) keys; keep the best gtop groups.
  if (G > 0) {
    __syncthreads();
    const int64_t gs = E / G, per = k / gtop;
    for (int64_t grp = threadIdx.x; grp < G; grp += blockDim.x) {
      // Successive maxima in (value desc, index asc) order without marking: each round takes the
      // best element ordered after the previous pick.
      R sum = 0, pv = static_cast<R>(INFINITY);
      int pi = -1;
      for (int64_t j = 0; j < per; ++j) {
        R bv = neg_inf<R>();
        int bi = 0x7fffffff;
        for (int64_t e = grp * gs; e < (grp + 1) * gs; ++e) {
          R v = key[e];
          if (better(pv, pi, v, static_cast<int>(e)) && better(v, static_cast<int>(e), bv, bi)) {
            bv = v;
            bi = static_cast<int>(e);
          }
        }
        sum += bv;
        pv = bv;
        pi = bi;
      }
      gscore[grp] = sum;
      gkeep[grp] = 0;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      R pv = static_cast<R>(INFINITY);
      int pi = -1;
      for (int64_t j = 0; j < gtop; ++j) {
        R bv = neg_inf<R>();
        int bi = 0x7fffffff;
        for (int64_t grp = 0; grp < G; ++grp) {
          R v = nan_to_neg_inf(gscore[grp]);
          if (better(pv, pi, v, static_cast<int>(grp)) && better(v, static_cast<int>(grp), bv, bi)) {
            bv = v;
            bi = static_cast<int>(grp);
          }
        }
        gkeep[bi] = 1;
        pv = bv;
        pi = bi;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
      if (!gkeep[e / gs]) key[e] = neg_inf<R>();
  }
  // 3. Top-k: round j marks its winner sel[w] = j + 1 (by the owner thread, the only one that reads
  // sel[w] afterwards; sel doubles as the taken flag of block_take_best).
  for (int64_t j = 0; j < k; ++j) {
    int w = block_take_best(key, sel, E, red, redi);
    if (w % static_cast<int>(blockDim.x) == static_cast<int>(threadIdx.x)) sel[w] = static_cast<int>(j) + 1;
    if (threadIdx.x == 0) ik[j] = w;
  }
  __syncthreads();
  // 4. Probabilities of the selected experts, in selection order (thread 0; k is small).
  if (threadIdx.x == 0) {
    if (score == ScoreFunction::softmax && !pre_softmax) {
      const R mx = l[ik[0]];  // the first selected logit is the largest
      R sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        pk[j] = d_exp(l[ik[j]] - mx);
        sum += pk[j];
      }
      for (int64_t j = 0; j < k; ++j) pk[j] = pk[j] / sum;
    } else if (score == ScoreFunction::softmax) {
      for (int64_t j = 0; j < k; ++j) pk[j] = val[ik[j]];
    } else if (k > 1) {
      R sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += val[ik[j]];
      const R D = sum + static_cast<R>(1e-20);
      for (int64_t j = 0; j < k; ++j) pk[j] = val[ik[j]] / D;
    } else {
      pk[0] = val[ik[0]];
    }
    for (int64_t j = 0; j < k; ++j) pk[j] *= scale;
  }
  __syncthreads();
  // 5. Outputs: the whole probs / map row, and the indices in selection order.
  R* p = probs + t * E;
  uint8_t* m = map + t * E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const int j = sel[e] - 1;
    const bool on = sel[e] > 0;
    m[e] = on ? 1 : 0;
    p[e] = on ? pk[j] : R(0);
  }
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) topk_idx[t * k + j] = ik[j];
}

// router_topk_bwd: one block per token; the selection comes from topk_idx.
template <class R>
size_t topk_bwd_smem(int64_t E, int64_t k) {
  return round8(E * sizeof(int)) + 3 * round8(k * sizeof(R)) + round8(kTokWarps * sizeof(R)) + round8(sizeof(R));
}

template <class R>
__global__ void __launch_bounds__(kTokThreads)
    router_topk_bwd_kernel(const R* __restrict__ logits, const int32_t* __restrict__ topk_idx,
                           const uint8_t* __restrict__ map, const R* __restrict__ dprobs, R* __restrict__ dlogits,
                           int64_t E, int64_t k, ScoreFunction score, bool pre_softmax, R scale, bool accumulate) {
  Carver c{reinterpret_cast<char*>(g_router_smem)};
  int* sel = c.take<int>(E);  // selection round of e, or -1
  R* gk = c.take<R>(k);       // upstream gradient per selection (0 where capacity dropped it)
  R* sk = c.take<R>(k);       // scores per selection
  R* dk = c.take<R>(k);       // dlogits per selection (pre-softmax: the upstream gradient)
  R* red = c.take<R>(kTokWarps);
  R* dot_s = c.take<R>(1);

  const int64_t t = blockIdx.x;
  const R* l = logits + t * E;
  const int32_t* idx = topk_idx + t * k;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) sel[e] = -1;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) sel[idx[j]] = static_cast<int>(j);
  R mx = 0, inv = 0;
  if (score == ScoreFunction::softmax && pre_softmax) {  // block-uniform; barriers inside
    R sum;
    softmax_stats(l, E, red, mx, sum);
    inv = R(1) / sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = idx[j];
      gk[j] = map[t * E + i] ? dprobs[t * E + i] * scale : R(0);
    }
    if (score == ScoreFunction::softmax && !pre_softmax) {
      // q = softmax over the k selected logits: dl_j = q_j (g_j − Σ g q).
      R m = l[idx[0]];
      for (int64_t j = 1; j < k; ++j) m = d_max(m, l[idx[j]]);
      R sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        sk[j] = d_exp(l[idx[j]] - m);
        sum += sk[j];
      }
      R dot = 0;
      for (int64_t j = 0; j < k; ++j) {
        sk[j] /= sum;
        dot += gk[j] * sk[j];
      }
      for (int64_t j = 0; j < k; ++j) dk[j] = sk[j] * (gk[j] - dot);
    } else if (score == ScoreFunction::softmax) {
      // p = softmax over all E: dl_e = p_e (G_e − Σ_j g_j p_idx_j), G_e = g_j at e = idx_j.
      R dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += gk[j] * (d_exp(l[idx[j]] - mx) * inv);
      for (int64_t j = 0; j < k; ++j) dk[j] = gk[j];
      dot_s[0] = dot;
    } else {
      // p_j = s_j / D with D = Σ_sel s + 1e-20 (k > 1), else p = s.
      for (int64_t j = 0; j < k; ++j) sk[j] = raw_score(score, l[idx[j]]);
      if (k > 1) {
        R sum = 0, gs = 0;
        for (int64_t j = 0; j < k; ++j) {
          sum += sk[j];
          gs += gk[j] * sk[j];
        }
        const R D = sum + static_cast<R>(1e-20);
        for (int64_t j = 0; j < k; ++j) {
          const R ds = gk[j] / D - gs / (D * D);
          dk[j] = ds * raw_score_grad(score, l[idx[j]], sk[j]);
        }
      } else {
        dk[0] = gk[0] * raw_score_grad(score, l[idx[0]], sk[0]);
      }
    }
  }
  __syncthreads();
  R* out = dlogits + t * E;
  const bool pre = score == ScoreFunction::softmax && pre_softmax;
  const R dot = pre ? dot_s[0] : R(0);
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const int j = sel[e];
    R v;
    if (pre) {
      const R pe = d_exp(l[e] - mx) * inv;
      v = -pe * dot;
      if (j >= 0) v += pe * dk[j];
    } else {
      v = j >= 0 ? dk[j] : R(0);
    }
    out[e] = accumulate ? out[e] + v : v;
  }
}

// ---------------------------------------------------------------------------------------------
// Aux statistics. p̂ of one token into `p` (owner-private entries); returns nothing, barriers inside.
template <class R>
__device__ void aux_scores(ScoreFunction score, const R* l, int64_t E, R* p, R* red) {
  if (score == ScoreFunction::softmax) {
    R mx, sum;
    softmax_stats(l, E, red, mx, sum);
    const R inv = R(1) / sum;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) p[e] = d_exp(l[e] - mx) * inv;
  } else {
    R s = 0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      p[e] = raw_score(score, l[e]);
      s += p[e];
    }
    const R D = block_sum(s, red) + static_cast<R>(1e-20);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) p[e] = p[e] / D;
  }
}

template <class R>
size_t aux_smem(int64_t E) {
  return round8(E * sizeof(R)) + round8(E * sizeof(R)) + round8(E * sizeof(double)) + round8(E * sizeof(int)) +
         round8(E * sizeof(int)) + round8(kTokWarps * sizeof(R)) + round8(kTokWarps * sizeof(int));
}

// Block b = c·num_seqs + s sums tokens t = s + j·num_seqs for j in chunk c (kAuxChunk tokens) into
// part_sum / part_cnt (b, E).
template <class R>
__global__ void __launch_bounds__(kTokThreads)
    aux_stats_partial_kernel(const R* __restrict__ logits, int64_t T, int64_t E, int64_t k, int64_t ns,
                             ScoreFunction score, double* __restrict__ part_sum, int* __restrict__ part_cnt) {
  Carver c{reinterpret_cast<char*>(g_router_smem)};
  R* p = c.take<R>(E);
  R* key = c.take<R>(E);
  double* acc = c.take<double>(E);
  int* cnt = c.take<int>(E);
  int* taken = c.take<int>(E);
  R* red = c.take<R>(kTokWarps);
  int* redi = c.take<int>(kTokWarps);

  const int64_t b = blockIdx.x, s = b % ns, chunk = b / ns;
  const int64_t tseq = T / ns, j0 = chunk * kAuxChunk, j1 = tseq < j0 + kAuxChunk ? tseq : j0 + kAuxChunk;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    acc[e] = 0.0;
    cnt[e] = 0;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t t = s + j * ns;
    aux_scores(score, logits + t * E, E, p, red);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      acc[e] += static_cast<double>(p[e]);
      key[e] = nan_to_neg_inf(p[e]);
      taken[e] = 0;
    }
    for (int64_t q = 0; q < k; ++q) {
      int w = block_take_best(key, taken, E, red, redi);
      if (w % static_cast<int>(blockDim.x) == static_cast<int>(threadIdx.x)) {
        taken[w] = 1;
        cnt[w] += 1;
      }
    }
  }
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    part_sum[b * E + e] = acc[e];
    part_cnt[b * E + e] = cnt[e];
  }
}

// prob_sum / counts (ns, E) = Σ over chunks, in chunk order.
__global__ void aux_stats_final_kernel(const double* __restrict__ part_sum, const int* __restrict__ part_cnt,
                                       int64_t nchunks, int64_t ns, int64_t E, double* __restrict__ prob_sum,
                                       int64_t* __restrict__ counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < ns * E; i += int64_t(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    int64_t n = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      sum += part_sum[ch * ns * E + i];
      n += part_cnt[ch * ns * E + i];
    }
    prob_sum[i] = sum;
    counts[i] = n;
  }
}

// dlogits(t, :) += J_p̂(t)ᵀ · w(t mod ns, :); one block per token.
template <class R>
__global__ void __launch_bounds__(kTokThreads)
    aux_loss_bwd_kernel(const R* __restrict__ logits, const double* __restrict__ weight, R* __restrict__ dlogits,
                        int64_t E, int64_t ns, ScoreFunction score) {
  __shared__ R red[kTokWarps];
  const int64_t t = blockIdx.x;
  const R* l = logits + t * E;
  const double* w = weight + (t % ns) * E;
  R* out = dlogits + t * E;
  if (score == ScoreFunction::softmax) {
    // dl_i = p̂_i (w_i − Σ_j w_j p̂_j)
    R mx, sum;
    softmax_stats(l, E, red, mx, sum);
    const R inv = R(1) / sum;
    R dot = 0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) dot += static_cast<R>(w[e]) * (d_exp(l[e] - mx) * inv);
    dot = block_sum(dot, red);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      const R pe = d_exp(l[e] - mx) * inv;
      out[e] += pe * (static_cast<R>(w[e]) - dot);
    }
  } else {
    // p̂_m = s_m / D: ds_m = w_m / D − Σ_j w_j s_j / D², dl_m = ds_m · s'(l_m)
    R sum = 0, ws = 0;
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      const R s = raw_score(score, l[e]);
      sum += s;
      ws += static_cast<R>(w[e]) * s;
    }
    const R D = block_sum(sum, red) + static_cast<R>(1e-20);
    ws = block_sum(ws, red);
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      const R s = raw_score(score, l[e]);
      const R ds = static_cast<R>(w[e]) / D - ws / (D * D);
      out[e] += ds * raw_score_grad(score, l[e], s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// z-loss: lse² per token (f64), then a fixed-order sum in one block.
template <class R>
__global__ void __launch_bounds__(kTokThreads)
    z_loss_lse_kernel(const R* __restrict__ logits, int64_t E, double* __restrict__ lse_sq) {
  __shared__ R red[kTokWarps];
  const int64_t t = blockIdx.x;
  R mx, sum;
  softmax_stats(logits + t * E, E, red, mx, sum);
  if (threadIdx.x == 0) {
    const double lse = static_cast<double>(mx + d_log(sum));
    lse_sq[t] = lse * lse;
  }
}

__global__ void __launch_bounds__(kSumThreads) sum_f64_kernel(const double* __restrict__ x, int64_t n,
                                                              double* __restrict__ out) {
  __shared__ double red[kSumThreads / kWarp];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[0] = s;
}

// dlogits(t, :) += 2·coef·lse(l_t)·softmax(l_t)
template <class R>
__global__ void __launch_bounds__(kTokThreads)
    z_loss_bwd_kernel(const R* __restrict__ logits, R* __restrict__ dlogits, int64_t E, R two_coef) {
  __shared__ R red[kTokWarps];
  const int64_t t = blockIdx.x;
  const R* l = logits + t * E;
  R mx, sum;
  softmax_stats(l, E, red, mx, sum);
  const R lse = mx + d_log(sum), inv = R(1) / sum;
  const R cf = two_coef * lse;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) dlogits[t * E + e] += cf * (d_exp(l[e] - mx) * inv);
}

// ---------------------------------------------------------------------------------------------
// Capacity: one block per expert column, in place.
// Order-preserving unsigned keys of probs (larger prob, larger key; -0 counts as +0).
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t order_key(double v) {
  uint64_t u = v == 0.0 ? 0ull : static_cast<uint64_t>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Capacity as count → (select) → scan → apply over chunks of kRankChunk tokens, every pass with
// chunks × ceil(E/32) blocks of (32 experts × 32 token rows), reading the (T, E) arrays in rows of
// 32 experts (coalesced), never one strided column per block:
//   1. count routed tokens per (chunk, expert); scan them over the chunks (chunk_scan_kernel) →
//      each chunk's routed rank base, and each column's routed total n[e];
//   2. probs policy, columns with n > cap > 0 only: the key x of the cap-th largest routed prob by
//      an MSD radix select, 8 bits per pass (a per-column histogram of the keys that share the
//      digits chosen so far, then one block per column picks the digit), and `need`, how many of
//      the routed tokens with key == x are kept (the earliest ones: ties to the lower token); then
//      count and scan the routed tokens with key > x and key == x per chunk;
//   3. apply: each chunk walks its tokens in tiles of 32 with the running ranks of its columns
//      (ballots, as the row map does), decides kept / dropped / padded per (token, expert) and
//      writes map and probs in place. Kept-before counts give each token's rank among the tokens
//      not kept, so padding takes the earliest `full − kept` of them.
// Everything stays on the device: no host synchronisation, whatever the column counts.
template <class R>
using CapKey = std::conditional_t<sizeof(R) == 4, uint32_t, uint64_t>;

struct CapColumns {  // per-column device state, E entries each
  int32_t* routed_total;  // n[e]
  int32_t* need;          // probs policy: ties at the threshold to keep; 0: column not selecting
  void* key;              // probs policy: the threshold key x (CapKey<R>)
};

// mode 0: counts0[c·E + e] = routed tokens of the chunk; mode 1 (selecting columns only):
// counts0 = routed with key > x, counts1 = routed with key == x.
template <class R, int kMode>
__global__ void __launch_bounds__(kTile * kTile)
    cap_count_kernel(const R* __restrict__ probs, const uint8_t* __restrict__ map, int64_t T, int64_t E,
                     CapColumns col, int32_t* __restrict__ counts0, int32_t* __restrict__ counts1) {
  using U = CapKey<R>;
  __shared__ int part0[kTile][kTile + 1], part1[kTile][kTile + 1];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t e = blockIdx.y * int64_t(kTile) + x;
  const int64_t t0 = c * kRankChunk, t1 = t0 + kRankChunk < T ? t0 + kRankChunk : T;
  int n0 = 0, n1 = 0;
  if (e < E && (kMode == 0 || col.need[e] > 0)) {
    const U xk = kMode == 1 ? static_cast<const U*>(col.key)[e] : U(0);
    for (int64_t t = t0 + y; t < t1; t += kTile) {
      if (map[t * E + e] == 0) continue;
      if (kMode == 0) {
        ++n0;
      } else {
        const U k = order_key(probs[t * E + e]);
        n0 += k > xk;
        n1 += k == xk;
      }
    }
  }
  part0[y][x] = n0;
  part1[y][x] = n1;
  __syncthreads();
  if (y == 0 && e < E) {
    int s0 = 0, s1 = 0;
    for (int r = 0; r < kTile; ++r) {
      s0 += part0[r][x];
      s1 += part1[r][x];
    }
    counts0[c * E + e] = s0;
    if (kMode == 1) counts1[c * E + e] = s1;
  }
}

// need[e] = cap for the columns that drop by probs (n > cap > 0), else 0; key[e] = 0.
template <class R>
__global__ void cap_select_init_kernel(CapColumns col, int64_t E, int64_t cap) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < E; e += int64_t(gridDim.x) * blockDim.x) {
    col.need[e] = (cap > 0 && col.routed_total[e] > cap) ? static_cast<int32_t>(cap) : 0;
    static_cast<CapKey<R>*>(col.key)[e] = 0;
  }
}

// One radix pass: hist[e·256 + d] += routed tokens of selecting column e whose key agrees with key[e]
// above bit shift + 8 and has digit d at bits [shift, shift + 8). Per-block histograms in shared
// memory, then integer atomics (order-independent totals).
template <class R>
__global__ void __launch_bounds__(kTile * 8)
    cap_hist_kernel(const R* __restrict__ probs, const uint8_t* __restrict__ map, int64_t T, int64_t E,
                    CapColumns col, int shift, unsigned* __restrict__ hist) {
  using U = CapKey<R>;
  constexpr int kBits = static_cast<int>(sizeof(U) * 8);
  __shared__ unsigned h[kTile][256];
  const int x = threadIdx.x, y = threadIdx.y;  // blockDim (32, 8)
  for (int i = y * kTile + x; i < kTile * 256; i += kTile * 8) h[i / 256][i % 256] = 0;
  __syncthreads();
  const int64_t c = blockIdx.x;
  const int64_t e = blockIdx.y * int64_t(kTile) + x;
  const int64_t t0 = c * kRankChunk, t1 = t0 + kRankChunk < T ? t0 + kRankChunk : T;
  if (e < E && col.need[e] > 0) {
    const U prefix = static_cast<const U*>(col.key)[e];
    const bool all = shift + 8 >= kBits;
    for (int64_t t = t0 + y; t < t1; t += 8) {
      if (map[t * E + e] == 0) continue;
      const U k = order_key(probs[t * E + e]);
      if (!all && (k >> (shift + 8)) != (prefix >> (shift + 8))) continue;
      atomicAdd(&h[x][static_cast<int>((k >> shift) & U(255))], 1u);
    }
  }
  __syncthreads();
  for (int i = y * kTile + x; i < kTile * 256; i += kTile * 8) {
    const int64_t ee = blockIdx.y * int64_t(kTile) + i / 256;
    const unsigned v = h[i / 256][i % 256];
    if (v && ee < E) atomicAdd(hist + ee * 256 + i % 256, v);
  }
}

// One block of 256 threads per column: the digit d with #{digits ≥ d} ≥ need > #{digits > d} among
// the histogram; key[e] gains d at `shift` and need[e] drops by #{digits > d}. Zeroes its histogram
// row for the next pass.
template <class R>
__global__ void __launch_bounds__(256) cap_select_kernel(CapColumns col, int shift, unsigned* __restrict__ hist) {
  using U = CapKey<R>;
  __shared__ int smem[256 / kWarp + 1];
  const int64_t e = blockIdx.x;
  const int k = col.need[e];
  if (k <= 0) return;  // the whole block leaves together
  const int d = 255 - static_cast<int>(threadIdx.x);  // thread 0 holds the top digit
  const int v = static_cast<int>(hist[e * 256 + d]);
  int total = 0;
  const int above = block_exclusive_scan(v, smem, total);  // #{digits > d}
  __syncthreads();
  hist[e * 256 + d] = 0;
  if (above < k && above + v >= k) {
    U* key = static_cast<U*>(col.key);
    key[e] |= static_cast<U>(d) << shift;
    col.need[e] = k - above;
  }
}

// The apply pass (see above). bases: routed (and, for selecting columns, gt and eq) ranks at the
// chunk's first token.
template <class R>
__global__ void __launch_bounds__(kTile * kTile)
    cap_apply_kernel(R* __restrict__ probs, uint8_t* __restrict__ map, int64_t T, int64_t E, int64_t cap,
                     bool by_probs, bool pad, CapColumns col, const int32_t* __restrict__ routed_base,
                     const int32_t* __restrict__ gt_base, const int32_t* __restrict__ eq_base) {
  using U = CapKey<R>;
  __shared__ uint8_t routed[kTile][kTile + 1];  // [token in tile][expert in tile]
  __shared__ uint8_t action[kTile][kTile + 1];  // 0 keep as is, 1 drop, 2 pad
  __shared__ U keys[kTile][kTile + 1];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t e = blockIdx.y * int64_t(kTile) + x;   // load / store phase
  const int64_t ey = blockIdx.y * int64_t(kTile) + y;  // the column warp y decides
  const int64_t t0 = c * kRankChunk, t1 = t0 + kRankChunk < T ? t0 + kRankChunk : T;
  // Column constants of warp y.
  const int64_t full = cap < T ? cap : T;
  int64_t n = 0, kept_n = 0, pad_need = 0, need = 0;
  bool drop = false, select = false, active = false;
  U xk = 0;
  int64_t r_carry = 0, gt_carry = 0, eq_carry = 0;
  if (ey < E) {
    n = col.routed_total[ey];
    drop = n > cap;
    kept_n = n < cap ? n : cap;
    pad_need = pad ? full - kept_n : 0;
    active = drop || pad_need > 0;
    select = drop && by_probs && cap > 0;
    r_carry = routed_base[c * E + ey];
    if (select) {
      need = col.need[ey];
      xk = static_cast<const U*>(col.key)[ey];
      gt_carry = gt_base[c * E + ey];
      eq_carry = eq_base[c * E + ey];
    }
  }
  for (int64_t base = t0; base < t1; base += kTile) {  // every thread runs every round
    const int64_t t = base + y;
    const bool inside = t < t1 && e < E;
    const bool rt = inside && map[t * E + e] != 0;
    routed[y][x] = rt;
    if (by_probs) keys[y][x] = rt ? order_key(probs[t * E + e]) : U(0);
    __syncthreads();
    // Decide phase: warp y, column ey; lane x is token base + x.
    {
      const int64_t tt = base + x;
      const bool valid = tt < t1;
      const bool r = routed[x][y] != 0;
      const unsigned below = lanes_below();
      const unsigned b_r = __ballot_sync(0xffffffffu, r);
      const int64_t r_rank = r_carry + __popc(b_r & below);  // routed tokens before tt
      bool kept = r;
      int64_t kept_before = r_rank;
      if (drop) {
        if (cap == 0) {
          kept = false;
          kept_before = 0;
        } else if (!select) {  // position: the earliest cap routed tokens
          kept = r && r_rank < cap;
          kept_before = r_rank < cap ? r_rank : cap;
        } else {
          const U k = keys[x][y];
          const bool gt = r && k > xk, eq = r && k == xk;
          const unsigned b_gt = __ballot_sync(0xffffffffu, gt), b_eq = __ballot_sync(0xffffffffu, eq);
          const int64_t gt_rank = gt_carry + __popc(b_gt & below), eq_rank = eq_carry + __popc(b_eq & below);
          kept = gt || (eq && eq_rank < need);
          kept_before = gt_rank + (eq_rank < need ? eq_rank : need);
          gt_carry += __popc(b_gt);
          eq_carry += __popc(b_eq);
        }
      }
      r_carry += __popc(b_r);
      uint8_t act = 0;
      if (active && valid) {
        const int64_t free_rank = (tt - 0) - kept_before;  // tokens before tt that are not kept
        if (r && !kept) act = 1;
        if (!kept && pad_need > 0 && free_rank < pad_need) act = 2;
      }
      action[x][y] = act;
    }
    __syncthreads();
    // Store phase (own slots only, as in the row map).
    if (inside && action[y][x] != 0) {
      map[t * E + e] = action[y][x] == 2 ? 1 : 0;
      probs[t * E + e] = R(0);
    }
  }
}

size_t check_token_smem(size_t bytes, const char* op) {
  MOE_CHECK_CODE(bytes <= 200 * 1024, ErrorCode::not_supported, op, ": the expert count needs ", bytes,
                 " bytes of shared memory per token block, more than the CUDA router kernels support");
  return bytes;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void cuda_router_topk(const RouterTopkArgs& a, const ExecCtx& ctx) {
  MOE_CHECK(a.expert_bias == nullptr || a.score != ScoreFunction::softmax,
            "router_topk: the expert bias needs score function sigmoid or sqrtsoftplus, got softmax");
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "router_topk", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (a.T == 0) return;
    const size_t smem = check_token_smem(topk_smem<R>(a.E, a.k, a.num_groups), "router_topk");
    set_smem(router_topk_kernel<R>, smem, "router_topk");
    router_topk_kernel<R><<<grid_rows(a.T, "router_topk"), kTokThreads, smem, stream_of(ctx)>>>(
        static_cast<const R*>(a.logits), a.expert_bias, static_cast<R*>(a.probs), a.routing_map, a.topk_idx, a.E,
        a.k, a.score, a.pre_softmax, a.num_groups, a.group_topk, static_cast<R>(a.scaling_factor));
    MOE_CUDA_CHECK_LAUNCH("router_topk_kernel");
  });
}

void cuda_router_topk_bwd(const RouterTopkBwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "router_topk_bwd", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (a.T == 0) return;
    const size_t smem = check_token_smem(topk_bwd_smem<R>(a.E, a.k), "router_topk_bwd");
    set_smem(router_topk_bwd_kernel<R>, smem, "router_topk_bwd");
    router_topk_bwd_kernel<R><<<grid_rows(a.T, "router_topk_bwd"), kTokThreads, smem, stream_of(ctx)>>>(
        static_cast<const R*>(a.logits), a.topk_idx, a.routing_map, static_cast<const R*>(a.dprobs),
        static_cast<R*>(a.dlogits), a.E, a.k, a.score, a.pre_softmax, static_cast<R>(a.scaling_factor),
        a.accumulate);
    MOE_CUDA_CHECK_LAUNCH("router_topk_bwd_kernel");
  });
}

void cuda_aux_stats(const AuxStatsArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "aux_stats", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    const int64_t ns = a.num_seqs, E = a.E;
    if (ns * E == 0) return;
    const int64_t nchunks = ceil_div(a.T / ns, kAuxChunk);
    Scratch part_sum(ctx, static_cast<size_t>(nchunks * ns * E) * sizeof(double));
    Scratch part_cnt(ctx, static_cast<size_t>(nchunks * ns * E) * sizeof(int));
    if (nchunks > 0) {
      const size_t smem = check_token_smem(aux_smem<R>(E), "aux_stats");
      set_smem(aux_stats_partial_kernel<R>, smem, "aux_stats");
      aux_stats_partial_kernel<R><<<grid_rows(nchunks * ns, "aux_stats"), kTokThreads, smem, stream_of(ctx)>>>(
          static_cast<const R*>(a.logits), a.T, E, a.k, ns, a.score, part_sum.as<double>(), part_cnt.as<int>());
      MOE_CUDA_CHECK_LAUNCH("aux_stats_partial_kernel");
    }
    aux_stats_final_kernel<<<grid_for(ns * E, 256), 256, 0, stream_of(ctx)>>>(
        part_sum.as<double>(), part_cnt.as<int>(), nchunks, ns, E, a.prob_sum, a.counts);
    MOE_CUDA_CHECK_LAUNCH("aux_stats_final_kernel");
  });
}

void cuda_aux_loss_bwd(const AuxLossBwdArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "aux_loss_bwd", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (a.T == 0 || a.E == 0) return;
    aux_loss_bwd_kernel<R><<<grid_rows(a.T, "aux_loss_bwd"), kTokThreads, 0, stream_of(ctx)>>>(
        static_cast<const R*>(a.logits), a.weight, static_cast<R*>(a.dlogits), a.E, a.num_seqs, a.score);
    MOE_CUDA_CHECK_LAUNCH("aux_loss_bwd_kernel");
  });
}

void cuda_z_loss_fwd(const ZLossArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "z_loss_fwd", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    Scratch lse_sq(ctx, static_cast<size_t>(a.T) * sizeof(double));
    if (a.T > 0) {
      z_loss_lse_kernel<R><<<grid_rows(a.T, "z_loss_fwd"), kTokThreads, 0, stream_of(ctx)>>>(
          static_cast<const R*>(a.logits), a.E, lse_sq.as<double>());
      MOE_CUDA_CHECK_LAUNCH("z_loss_lse_kernel");
    }
    sum_f64_kernel<<<1, kSumThreads, 0, stream_of(ctx)>>>(lse_sq.as<double>(), a.T, a.sum_out);
    MOE_CUDA_CHECK_LAUNCH("sum_f64_kernel");
  });
}

void cuda_z_loss_bwd(const ZLossArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "z_loss_bwd", "router", [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (a.T == 0) return;
    z_loss_bwd_kernel<R><<<grid_rows(a.T, "z_loss_bwd"), kTokThreads, 0, stream_of(ctx)>>>(
        static_cast<const R*>(a.logits), static_cast<R*>(a.dlogits), a.E, static_cast<R>(2.0 * a.coef));
    MOE_CUDA_CHECK_LAUNCH("z_loss_bwd_kernel");
  });
}

// Count → select → scan → apply (see cap_apply_kernel): O(T·E) reads per pass, 3 + 2·(key bytes)
// passes for the probs policy, 3 for position; all on the stream, no host synchronisation.
void cuda_capacity(const CapacityArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "capacity", "probs", [&](auto tag) {
    using R = typename decltype(tag)::type;
    using U = CapKey<R>;
    const char* op = "capacity";
    if (a.T == 0 || a.E == 0) return;
    MOE_CHECK_CODE(a.T <= 0x7fffffffLL, ErrorCode::not_supported, op, ": ", a.T,
                   " tokens exceed the CUDA kernel's 32-bit token counts");
    MOE_CHECK_CODE(ceil_div(a.E, kTile) <= 65535, ErrorCode::not_supported, op, ": ", a.E,
                   " experts exceed the CUDA grid (65535 tiles of 32)");
    const int64_t E = a.E, nchunks = ceil_div(a.T, kRankChunk);
    const int64_t cap = a.capacity < 0 ? 0 : a.capacity;
    const bool by_probs = a.policy == DropPolicy::probs;
    const size_t cells = static_cast<size_t>(nchunks * E);
    cudaStream_t st = stream_of(ctx);
    Scratch counts(ctx, cells * sizeof(int32_t) * (by_probs ? 2 : 1));
    Scratch bases(ctx, cells * sizeof(int32_t) * (by_probs ? 3 : 1));
    Scratch cols(ctx, static_cast<size_t>(E) * (2 * sizeof(int32_t) + sizeof(U)));
    int32_t* cnt0 = counts.as<int32_t>();
    int32_t* cnt1 = by_probs ? cnt0 + cells : nullptr;
    int32_t* routed_base = bases.as<int32_t>();
    int32_t* gt_base = by_probs ? routed_base + cells : nullptr;
    int32_t* eq_base = by_probs ? routed_base + 2 * cells : nullptr;
    CapColumns col;
    col.key = cols.as<void>();  // U first: its alignment
    col.routed_total = reinterpret_cast<int32_t*>(cols.as<char>() + static_cast<size_t>(E) * sizeof(U));
    col.need = col.routed_total + E;
    const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(ceil_div(E, kTile)));
    const dim3 tile(kTile, kTile);
    R* probs = static_cast<R*>(a.probs);

    cap_count_kernel<R, 0><<<grid, tile, 0, st>>>(probs, a.routing_map, a.T, E, col, cnt0, nullptr);
    MOE_CUDA_CHECK_LAUNCH("cap_count_kernel");
    chunk_scan_kernel<int32_t><<<grid_rows(E, op), kScanThreads, 0, st>>>(cnt0, nchunks, E, nullptr, routed_base,
                                                                          col.routed_total);
    MOE_CUDA_CHECK_LAUNCH("chunk_scan_kernel");
    if (by_probs) {
      Scratch hist(ctx, static_cast<size_t>(E) * 256 * sizeof(unsigned));
      MOE_CUDA_CHECK(cudaMemsetAsync(hist.as<void>(), 0, static_cast<size_t>(E) * 256 * sizeof(unsigned), st));
      cap_select_init_kernel<R><<<grid_for(E, 256), 256, 0, st>>>(col, E, cap);
      MOE_CUDA_CHECK_LAUNCH("cap_select_init_kernel");
      for (int shift = static_cast<int>(sizeof(U) * 8) - 8; shift >= 0; shift -= 8) {
        cap_hist_kernel<R><<<grid, dim3(kTile, 8), 0, st>>>(probs, a.routing_map, a.T, E, col, shift,
                                                            hist.as<unsigned>());
        MOE_CUDA_CHECK_LAUNCH("cap_hist_kernel");
        cap_select_kernel<R><<<grid_rows(E, op), 256, 0, st>>>(col, shift, hist.as<unsigned>());
        MOE_CUDA_CHECK_LAUNCH("cap_select_kernel");
      }
      cap_count_kernel<R, 1><<<grid, tile, 0, st>>>(probs, a.routing_map, a.T, E, col, cnt0, cnt1);
      MOE_CUDA_CHECK_LAUNCH("cap_count_kernel");
      chunk_scan_kernel<int32_t><<<grid_rows(E, op), kScanThreads, 0, st>>>(cnt0, nchunks, E, nullptr, gt_base,
                                                                            nullptr);
      MOE_CUDA_CHECK_LAUNCH("chunk_scan_kernel");
      chunk_scan_kernel<int32_t><<<grid_rows(E, op), kScanThreads, 0, st>>>(cnt1, nchunks, E, nullptr, eq_base,
                                                                            nullptr);
      MOE_CUDA_CHECK_LAUNCH("chunk_scan_kernel");
    }
    cap_apply_kernel<R><<<grid, tile, 0, st>>>(probs, a.routing_map, a.T, E, cap, by_probs, a.pad, col, routed_base,
                                               gt_base, eq_base);
    MOE_CUDA_CHECK_LAUNCH("cap_apply_kernel");
  });
}

}  // namespace moe
