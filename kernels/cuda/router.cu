// Router kernels on CUDA (DESIGN.md §6): scores, group-limited top-k and probabilities with their
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
constexpr int kCapThreads = 256;                  // threads per expert column (capacity)
constexpr int kCapWarps = kCapThreads / kWarp;
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

template <class R>
__global__ void __launch_bounds__(kCapThreads)
    capacity_kernel(R* __restrict__ probs, uint8_t* __restrict__ map, int64_t T, int64_t E, int64_t cap,
                    bool by_probs, bool pad) {
  using U = std::conditional_t<sizeof(R) == 4, uint32_t, uint64_t>;
  __shared__ int red[kCapWarps + 1];
  const int64_t e = blockIdx.x;
  // Routed tokens of this expert.
  int local = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) local += map[t * E + e] != 0;
  const int64_t n = block_sum(local, red);
  const int64_t full = cap < T ? cap : T;     // rows after padding
  const int64_t kept_n = n < cap ? n : cap;  // rows kept before padding
  const bool drop = n > cap;
  // probs policy: x = the key of the cap-th largest routed prob (bitwise search from the top bit:
  // the largest x with #{key >= x} >= cap), gt = #{key > x}, and the `need` earliest tokens whose
  // key equals x are kept too (ties to the lower token).
  U x = 0;
  int64_t need = 0;
  if (drop && by_probs && cap > 0) {
    for (int bit = static_cast<int>(sizeof(U) * 8) - 1; bit >= 0; --bit) {
      const U cand = x | (U(1) << bit);
      int cnt = 0;
      for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
        cnt += (map[t * E + e] != 0 && order_key(probs[t * E + e]) >= cand) ? 1 : 0;
      if (block_sum(cnt, red) >= cap) x = cand;
    }
    int gt = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
      gt += (map[t * E + e] != 0 && order_key(probs[t * E + e]) > x) ? 1 : 0;
    need = cap - block_sum(gt, red);
  }
  const int64_t pad_need = pad ? full - kept_n : 0;
  if (!drop && pad_need == 0) return;  // the column stays as it is
  int64_t carry = 0, pad_carry = 0;
  for (int64_t base = 0; base < T; base += blockDim.x) {  // every thread runs every round
    const int64_t t = base + threadIdx.x;
    const bool valid = t < T;
    const bool routed = valid && map[t * E + e] != 0;
    bool kept = routed;
    if (drop) {
      int total = 0;
      if (cap == 0) {
        kept = false;
      } else if (!by_probs) {  // position: the earliest cap routed tokens
        const int r = block_exclusive_scan(routed ? 1 : 0, red, total);
        kept = routed && carry + r < cap;
        carry += total;
      } else {
        const U key = routed ? order_key(probs[t * E + e]) : U(0);
        const bool eq = routed && key == x;
        const int r = block_exclusive_scan(eq ? 1 : 0, red, total);
        kept = (routed && key > x) || (eq && carry + r < need);
        carry += total;
      }
    }
    bool padded = false;
    if (pad_need > 0) {  // the earliest tokens not kept fill the column to `full` rows
      const bool free_row = valid && !kept;
      int total = 0;
      const int r = block_exclusive_scan(free_row ? 1 : 0, red, total);
      padded = free_row && pad_carry + r < pad_need;
      pad_carry += total;
    }
    if (routed && !kept) {  // dropped
      map[t * E + e] = 0;
      probs[t * E + e] = R(0);
    }
    if (padded) {
      map[t * E + e] = 1;
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

// Per expert column, O(T · bits) for the probs policy (a bitwise threshold search over the column,
// then one scan); columns whose routed count fits the capacity and need no padding return at once.
// Reads are strided by E (one column per block); fine at router sizes, a transpose would coalesce.
void cuda_capacity(const CapacityArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  dispatch_f32_f64(a.dtype, "capacity", "probs", [&](auto tag) {
    using R = typename decltype(tag)::type;
    if (a.T == 0 || a.E == 0) return;
    MOE_CHECK_CODE(a.T <= 0x7fffffffLL, ErrorCode::not_supported, "capacity: ", a.T,
                   " tokens exceed the CUDA kernel's 32-bit token counts");
    capacity_kernel<R><<<grid_rows(a.E, "capacity"), kCapThreads, 0, stream_of(ctx)>>>(
        static_cast<R*>(a.probs), a.routing_map, a.T, a.E, a.capacity, a.policy == DropPolicy::probs, a.pad);
    MOE_CUDA_CHECK_LAUNCH("capacity_kernel");
  });
}

}  // namespace moe
