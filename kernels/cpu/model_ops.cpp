// The transformer's small ops on the CPU (kernels/ops.h has each contract): RMSNorm / LayerNorm
// forward and backward, rotary embedding, vocab-parallel embedding and cross entropy, and the
// fused-QKV split / merge. Compute is f32 for f32/bf16/f16 storage and f64 for f64 storage; the
// statistics (mean, rstd, row max, sums) are stored in the compute type, which is the stat dtype.
//
// Rows are independent in every forward, so the row loops are split over threads with no effect
// on the result. The two reductions across rows are arranged so the thread count cannot change a
// bit either:
//   norm_bwd's dweight / dbias: threads own blocks of columns and add the rows in row order
//     (acc = dweight[d]; acc += term(r, d) for r = 0, 1, ...; one store), exactly the sequential
//     sum whatever the thread count;
//   embedding_bwd: the (id, i) pairs of the ids in the slice are sorted, and threads own table
//     rows, each adding its dout rows in i order.
// f32 and bf16 storage take vectorised row functions for the norms and the cross entropy
// (kernels/cpu/simd.h: 16 f32 lanes, compiled per ISA and picked at load time): a row's sums are
// kept in 16 lane sums added in a fixed order, the exponential is the polynomial one (within 2 ulp
// of expf, exactly 0 below −87.3 where expf is < 1.2e−38), and bf16 is widened on the load and
// rounded once on the store. Every row is the same arithmetic whichever thread computes it.
// In-place use: norm y may be x, norm dx may be dy, rope y may be x, xent dlogits may be logits.
// Every loop reads an element (and, for rope, its rotation partner) before it writes it, and the
// norm backward finishes its column sums (which read dy) before it overwrites dx; so none of those
// pointers is declared __restrict__.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

namespace moe {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

namespace {

constexpr int64_t kParallelElems = int64_t{1} << 14;  // below this much work one thread is faster
constexpr int64_t kColBlock = 64;                     // norm_bwd: columns per thread task

// x̂ = (x − mean)·rstd (layer) or x·rstd (rms); `mean` is 0 for rms.
template <class A>
inline A xhat_of(A x, A mean, A rstd, bool layer) {
  return layer ? (x - mean) * rstd : x * rstd;
}

// ---- vectorised rows (f32 and bf16 storage) ------------------------------------------------------
using namespace cpu::simd;

// One row of the norm forward; returns mean (0 for rms) and rstd through the pointers.
template <class T>
MOE_SIMD_INLINE void norm_fwd_row_impl(const T* x, const T* w, const T* b, T* y, int64_t D, float eps, bool layer,
                                       float* mean_out, float* rstd_out) {
  const float invD = 1.0f / static_cast<float>(D);
  float mean = 0.0f;
  vf acc = splat(0.0f);
  int64_t d = 0;
  if (layer) {
    for (d = 0; d + kLanes <= D; d += kLanes) acc += load(x + d);
    if (d < D) acc += load_part(x + d, D - d, 0.0f);
    mean = hsum(acc) * invD;
    acc = splat(0.0f);
    for (d = 0; d + kLanes <= D; d += kLanes) {
      const vf c = load(x + d) - mean;
      acc += c * c;
    }
    if (d < D) {
      const vf c = load_part(x + d, D - d, mean) - mean;  // the padding lanes give exact zeros
      acc += c * c;
    }
  } else {
    for (d = 0; d + kLanes <= D; d += kLanes) {
      const vf v = load(x + d);
      acc += v * v;
    }
    if (d < D) {
      const vf v = load_part(x + d, D - d, 0.0f);
      acc += v * v;
    }
  }
  const float rstd = 1.0f / std::sqrt(hsum(acc) * invD + eps);
  // y[d] depends on x[d] only (and the row's statistics, complete by now): y may be x.
  for (d = 0; d + kLanes <= D; d += kLanes) {
    vf v = (layer ? load(x + d) - mean : load(x + d)) * rstd * load(w + d);
    if (b) v += load(b + d);
    store(y + d, v);
  }
  if (d < D) {
    const int64_t n = D - d;
    vf v = (layer ? load_part(x + d, n, 0.0f) - mean : load_part(x + d, n, 0.0f)) * rstd * load_part(w + d, n, 0.0f);
    if (b) v += load_part(b + d, n, 0.0f);
    store_part(y + d, v, n);
  }
  if (mean_out) *mean_out = mean;
  *rstd_out = rstd;
}

// One row of the norm backward's dx (dx may be dy: each block is loaded before it is stored).
template <class T>
MOE_SIMD_INLINE void norm_bwd_row_impl(const T* x, const T* w, const T* dy, T* dx, int64_t D, float m, float rs,
                                       bool layer) {
  const float invD = 1.0f / static_cast<float>(D);
  vf sgx = splat(0.0f), sg = splat(0.0f);
  int64_t d = 0;
  for (d = 0; d + kLanes <= D; d += kLanes) {
    const vf g = load(dy + d) * load(w + d);
    sgx += g * ((layer ? load(x + d) - m : load(x + d)) * rs);
    sg += g;
  }
  if (d < D) {  // zero-padded: g = 0 in the padding
    const int64_t n = D - d;
    const vf g = load_part(dy + d, n, 0.0f) * load_part(w + d, n, 0.0f);
    sgx += g * ((layer ? load_part(x + d, n, 0.0f) - m : load_part(x + d, n, 0.0f)) * rs);
    sg += g;
  }
  const float c1 = hsum(sgx) * invD, c2 = layer ? hsum(sg) * invD : 0.0f;
  for (d = 0; d + kLanes <= D; d += kLanes) {
    const vf g = load(dy + d) * load(w + d);
    const vf xh = (layer ? load(x + d) - m : load(x + d)) * rs;
    store(dx + d, rs * (g - c2 - xh * c1));
  }
  if (d < D) {
    const int64_t n = D - d;
    const vf g = load_part(dy + d, n, 0.0f) * load_part(w + d, n, 0.0f);
    const vf xh = (layer ? load_part(x + d, n, 0.0f) - m : load_part(x + d, n, 0.0f)) * rs;
    store_part(dx + d, rs * (g - c2 - xh * c1), n);
  }
}

// dweight / dbias of kColBlock full columns [d0, d0 + kColBlock): each column adds its rows in row
// order onto the incoming value (the sequential sum, whatever the thread count).
constexpr int64_t kColVecs = kColBlock / kLanes;
static_assert(kColBlock % kLanes == 0);
template <class T>
MOE_SIMD_INLINE void norm_dweight_block_impl(const T* xs, const T* dys, const float* mean, const float* rstd,
                                             int64_t rows, int64_t D, int64_t d0, bool layer, T* dw, T* db) {
  vf sw[kColVecs], sb[kColVecs];
  for (int64_t u = 0; u < kColVecs; ++u) {
    sw[u] = dw ? load(dw + d0 + u * kLanes) : splat(0.0f);
    sb[u] = db ? load(db + d0 + u * kLanes) : splat(0.0f);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = xs + r * D + d0;
    const T* dy = dys + r * D + d0;
    const float m = mean ? mean[r] : 0.0f, rs = rstd[r];
    for (int64_t u = 0; u < kColVecs; ++u) {
      const vf g = load(dy + u * kLanes);
      sw[u] += g * ((layer ? load(x + u * kLanes) - m : load(x + u * kLanes)) * rs);
      sb[u] += g;
    }
  }
  for (int64_t u = 0; u < kColVecs; ++u) {
    if (dw) store(dw + d0 + u * kLanes, sw[u]);
    if (db) store(db + d0 + u * kLanes, sb[u]);
  }
}

// Cross-entropy rows: the max, Σ e^(l − m), and the gradient g·(softmax − onehot(t)).
template <class T>
MOE_SIMD_INLINE float xent_max_row_impl(const T* l, int64_t V) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf m = splat(ninf);
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    const vf x = load(l + v);
    m = x > m ? x : m;
  }
  if (v < V) {
    const vf x = load_part(l + v, V - v, ninf);
    m = x > m ? x : m;
  }
  return hmax(m);
}
template <class T>
MOE_SIMD_INLINE float xent_sum_row_impl(const T* l, int64_t V, float m) {
  vf s = splat(0.0f);
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) s += exp_f32_flush(load(l + v) - m);
  if (v < V) s += exp_f32_flush(load_part(l + v, V - v, -std::numeric_limits<float>::infinity()) - m);  // e^−inf = 0
  return hsum(s);
}
template <class T>
MOE_SIMD_INLINE void xent_bwd_row_impl(const T* l, T* dl, int64_t V, float m, float s, float g, int64_t t) {
  const bool has_t = t >= 0 && t < V;
  const vf lt = has_t ? load_part(l + t, 1, 0.0f) : splat(0.0f);  // read before dl (maybe l) is written
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) store(dl + v, g * (exp_f32_flush(load(l + v) - m) / s));
  if (v < V) store_part(dl + v, g * (exp_f32_flush(load_part(l + v, V - v, 0.0f) - m) / s), V - v);
  if (has_t) {  // the target: the same p, minus 1
    const vf p = exp_f32_flush(lt - m) / s;
    dl[t] = from_acc<T>(g * (p[0] - 1.0f));
  }
}

// The row functions, compiled per ISA, one overload per storage type.
#define MOE_MODEL_ROWS(T)                                                                                        \
  MOE_SIMD_CLONES void norm_fwd_row(const T* x, const T* w, const T* b, T* y, int64_t D, float eps, bool layer, \
                                    float* mean, float* rstd) {                                                  \
    norm_fwd_row_impl(x, w, b, y, D, eps, layer, mean, rstd);                                                    \
  }                                                                                                              \
  MOE_SIMD_CLONES void norm_bwd_row(const T* x, const T* w, const T* dy, T* dx, int64_t D, float m, float rs,   \
                                    bool layer) {                                                                \
    norm_bwd_row_impl(x, w, dy, dx, D, m, rs, layer);                                                            \
  }                                                                                                              \
  MOE_SIMD_CLONES void norm_dweight_block(const T* xs, const T* dys, const float* mean, const float* rstd,      \
                                          int64_t rows, int64_t D, int64_t d0, bool layer, T* dw, T* db) {      \
    norm_dweight_block_impl(xs, dys, mean, rstd, rows, D, d0, layer, dw, db);                                    \
  }                                                                                                              \
  MOE_SIMD_CLONES float xent_max_row(const T* l, int64_t V) { return xent_max_row_impl(l, V); }                  \
  MOE_SIMD_CLONES float xent_sum_row(const T* l, int64_t V, float m) { return xent_sum_row_impl(l, V, m); }      \
  MOE_SIMD_CLONES void xent_bwd_row(const T* l, T* dl, int64_t V, float m, float s, float g, int64_t t) {       \
    xent_bwd_row_impl(l, dl, V, m, s, g, t);                                                                     \
  }
MOE_MODEL_ROWS(float)
MOE_MODEL_ROWS(bf16)
#undef MOE_MODEL_ROWS

template <class T>
constexpr bool kVectorRows = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Normalisation over the last dim. rms: rstd = 1/sqrt(Σx²/D + eps), y = x·rstd·w.
// layer: mean = Σx/D, var = Σ(x − mean)²/D (two passes), y = (x − mean)·rstd·w + b.
void cpu_norm_fwd(const NormFwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "norm_fwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;  // also the stat type
    const int64_t rows = a.rows, D = a.D;
    const bool layer = a.kind == NormKind::layer;
    const T* xs = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.weight);
    const T* b = layer ? static_cast<const T*>(a.bias) : nullptr;
    T* ys = static_cast<T*>(a.y);
    A* mean_out = layer ? static_cast<A*>(a.mean) : nullptr;
    A* rstd_out = static_cast<A*>(a.rstd);
    const A eps = static_cast<A>(a.eps), invD = D > 0 ? A(1) / static_cast<A>(D) : A(0);
    if constexpr (kVectorRows<T>) {
      if (D > 0) {
#pragma omp parallel for schedule(static) if (rows * D > kParallelElems)
        for (int64_t r = 0; r < rows; ++r)
          norm_fwd_row(xs + r * D, w, b, ys + r * D, D, eps, layer, mean_out ? mean_out + r : nullptr, rstd_out + r);
        return;
      }
    }
#pragma omp parallel for schedule(static) if (rows * D > kParallelElems)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = xs + r * D;
      T* y = ys + r * D;
      A mean = 0, var = 0;
      if (layer) {
        for (int64_t d = 0; d < D; ++d) mean += to_acc(x[d]);
        mean *= invD;
        for (int64_t d = 0; d < D; ++d) {
          const A c = to_acc(x[d]) - mean;
          var += c * c;
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const A v = to_acc(x[d]);
          var += v * v;
        }
      }
      var *= invD;
      const A rstd = A(1) / std::sqrt(var + eps);
      // y[d] depends on x[d] only (and the row's statistics, complete by now): y may be x.
      for (int64_t d = 0; d < D; ++d) {
        A v = xhat_of(to_acc(x[d]), mean, rstd, layer) * to_acc(w[d]);
        if (b) v += to_acc(b[d]);
        y[d] = from_acc<T>(v);
      }
      if (mean_out) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

// With g = dy·w and x̂ as above:
//   rms:   dx = rstd·(g − x̂·mean(g·x̂))
//   layer: dx = rstd·(g − mean(g) − x̂·mean(g·x̂))
//   dweight += Σ_r dy·x̂, dbias += Σ_r dy (row order, see the file comment).
void cpu_norm_bwd(const NormBwdArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "norm_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t rows = a.rows, D = a.D;
    const bool layer = a.kind == NormKind::layer;
    const T* xs = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.weight);
    const A* mean = layer ? static_cast<const A*>(a.mean) : nullptr;
    const A* rstd = static_cast<const A*>(a.rstd);
    const T* dys = static_cast<const T*>(a.dy);
    T* dxs = static_cast<T*>(a.dx);
    T* dw = static_cast<T*>(a.dweight);
    T* db = layer ? static_cast<T*>(a.dbias) : nullptr;
    const bool par = rows * D > kParallelElems;

    // 1. Parameter gradients first: they read dy, which step 2 may overwrite (dx aliasing dy).
    if (dw || db) {
      const int64_t nblocks = (D + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (par)
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t d0 = blk * kColBlock, nd = std::min(kColBlock, D - d0);
        if constexpr (kVectorRows<T>) {
          if (nd == kColBlock) {
            norm_dweight_block(xs, dys, mean, rstd, rows, D, d0, layer, dw, db);
            continue;
          }
        }
        A sw[kColBlock], sb[kColBlock];
        for (int64_t j = 0; j < nd; ++j) {
          sw[j] = dw ? to_acc(dw[d0 + j]) : A(0);
          sb[j] = db ? to_acc(db[d0 + j]) : A(0);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const T* x = xs + r * D + d0;
          const T* dy = dys + r * D + d0;
          const A m = mean ? mean[r] : A(0), rs = rstd[r];
          for (int64_t j = 0; j < nd; ++j) {
            const A g = to_acc(dy[j]);
            sw[j] += g * xhat_of(to_acc(x[j]), m, rs, layer);
            sb[j] += g;
          }
        }
        for (int64_t j = 0; j < nd; ++j) {
          if (dw) dw[d0 + j] = from_acc<T>(sw[j]);
          if (db) db[d0 + j] = from_acc<T>(sb[j]);
        }
      }
    }

    // 2. dx, row by row.
    const A invD = D > 0 ? A(1) / static_cast<A>(D) : A(0);
    if constexpr (kVectorRows<T>) {
      if (D > 0) {
#pragma omp parallel for schedule(static) if (par)
        for (int64_t r = 0; r < rows; ++r)
          norm_bwd_row(xs + r * D, w, dys + r * D, dxs + r * D, D, mean ? mean[r] : 0.0f, rstd[r], layer);
        return;
      }
    }
#pragma omp parallel for schedule(static) if (par)
    for (int64_t r = 0; r < rows; ++r) {
      const T* x = xs + r * D;
      const T* dy = dys + r * D;
      T* dx = dxs + r * D;
      const A m = mean ? mean[r] : A(0), rs = rstd[r];
      A sum_gx = 0, sum_g = 0;
      for (int64_t d = 0; d < D; ++d) {
        const A g = to_acc(dy[d]) * to_acc(w[d]);
        sum_gx += g * xhat_of(to_acc(x[d]), m, rs, layer);
        sum_g += g;
      }
      const A c1 = sum_gx * invD, c2 = layer ? sum_g * invD : A(0);
      // dx[d] reads dy[d] before writing it: dx may be dy.
      for (int64_t d = 0; d < D; ++d) {
        const A g = to_acc(dy[d]) * to_acc(w[d]);
        dx[d] = from_acc<T>(rs * (g - c2 - xhat_of(to_acc(x[d]), m, rs, layer) * c1));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding. cos / sin of every (position, frequency) are tabulated once per call: the angle
// pos · base^(−2i/rd) in f64, rounded to acc, cos and sin in acc (inverse: sin negated).
void cpu_rope(const RopeArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "rope", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t S = a.S, B = a.B, heads = a.heads, hd = a.hd, rd = a.rd, half = rd / 2;
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i)
      inv_freq[static_cast<size_t>(i)] = std::pow(a.base, -static_cast<double>(2 * i) / static_cast<double>(rd));
    std::vector<A> cs(static_cast<size_t>(S * half)), sn(static_cast<size_t>(S * half));
#pragma omp parallel for schedule(static) if (S * half > kParallelElems / 8)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < half; ++i) {
        const A ang = static_cast<A>(static_cast<double>(a.positions[s]) * inv_freq[static_cast<size_t>(i)]);
        cs[static_cast<size_t>(s * half + i)] = std::cos(ang);
        sn[static_cast<size_t>(s * half + i)] = a.inverse ? -std::sin(ang) : std::sin(ang);
      }
    const T* xs = static_cast<const T*>(a.x);
    T* ys = static_cast<T*>(a.y);
    const bool same = a.x == a.y;
    const int64_t nheads = S * B * heads;
#pragma omp parallel for schedule(static) if (nheads * hd > kParallelElems)
    for (int64_t h = 0; h < nheads; ++h) {
      const int64_t s = h / (B * heads);
      const A* c = cs.data() + s * half;
      const A* sv = sn.data() + s * half;
      const T* x = xs + h * hd;
      T* y = ys + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const A x1 = to_acc(x[i]), x2 = to_acc(x[i + half]);  // both read before either is written
        y[i] = from_acc<T>(x1 * c[i] - x2 * sv[i]);
        y[i + half] = from_acc<T>(x2 * c[i] + x1 * sv[i]);
      }
      if (!same && rd < hd) std::memcpy(y + rd, x + rd, static_cast<size_t>(hd - rd) * sizeof(T));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup: rows of the table slice; ids outside [vocab_start, vocab_start + V) give zeros
// (or leave out untouched when accumulating).
void cpu_embedding_fwd(const EmbeddingArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "embedding_fwd", [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = a.n, V = a.V, H = a.H;
    const T* table = static_cast<const T*>(a.table);
    T* out = static_cast<T*>(a.out);
#pragma omp parallel for schedule(static) if (n * H > kParallelElems)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = a.ids[i] - a.vocab_start;
      T* o = out + i * H;
      const bool in = v >= 0 && v < V;
      if (!in) {
        if (!a.accumulate) std::memset(static_cast<void*>(o), 0, static_cast<size_t>(H) * sizeof(T));
        continue;
      }
      const T* row = table + v * H;
      if (!a.accumulate) {
        std::memcpy(static_cast<void*>(o), row, static_cast<size_t>(H) * sizeof(T));
      } else {
        for (int64_t h = 0; h < H; ++h) o[h] = from_acc<T>(to_acc(o[h]) + to_acc(row[h]));
      }
    }
  });
}

// Scatter-add: dtable[v] = dtable[v] + Σ_{i: ids[i] = v} dout[i], the terms added in i order in acc
// and stored once.
void cpu_embedding_bwd(const EmbeddingArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "embedding_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t n = a.n, V = a.V, H = a.H;
    const T* dout = static_cast<const T*>(a.dout);
    T* dtable = static_cast<T*>(a.dtable);
    // (table row, token) for the ids in the slice, sorted: runs of one row in token order.
    std::vector<std::pair<int64_t, int64_t>> hits;
    hits.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = a.ids[i] - a.vocab_start;
      if (v >= 0 && v < V) hits.emplace_back(v, i);
    }
    std::sort(hits.begin(), hits.end());
    std::vector<int64_t> run_start;  // index into hits where each row's run begins (+ the end)
    for (size_t j = 0; j < hits.size(); ++j)
      if (j == 0 || hits[j].first != hits[j - 1].first) run_start.push_back(static_cast<int64_t>(j));
    const int64_t runs = static_cast<int64_t>(run_start.size());
    run_start.push_back(static_cast<int64_t>(hits.size()));
#pragma omp parallel if (static_cast<int64_t>(hits.size()) * H > kParallelElems)
    {
      std::vector<A> acc(static_cast<size_t>(H));
#pragma omp for schedule(static)
      for (int64_t rn = 0; rn < runs; ++rn) {
        const int64_t j0 = run_start[static_cast<size_t>(rn)], j1 = run_start[static_cast<size_t>(rn + 1)];
        T* row = dtable + hits[static_cast<size_t>(j0)].first * H;
        for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(h)] = to_acc(row[h]);
        for (int64_t j = j0; j < j1; ++j) {
          const T* g = dout + hits[static_cast<size_t>(j)].second * H;
          for (int64_t h = 0; h < H; ++h) acc[static_cast<size_t>(h)] += to_acc(g[h]);
        }
        for (int64_t h = 0; h < H; ++h) row[h] = from_acc<T>(acc[static_cast<size_t>(h)]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Vocab-parallel cross entropy (the all-reduces between the steps are the caller's).
void cpu_xent_max(const XentArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "xent_max", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t n = a.n, V = a.V;
    const T* logits = static_cast<const T*>(a.logits);
    A* row_max = static_cast<A*>(a.row_max);
    if constexpr (kVectorRows<T>) {
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
      for (int64_t i = 0; i < n; ++i) row_max[i] = xent_max_row(logits + i * V, V);
      return;
    }
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
    for (int64_t i = 0; i < n; ++i) {
      const T* l = logits + i * V;
      A m = -std::numeric_limits<A>::infinity();
      for (int64_t v = 0; v < V; ++v) m = std::max(m, to_acc(l[v]));
      row_max[i] = m;
    }
  });
}

void cpu_xent_sum(const XentArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "xent_sum", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t n = a.n, V = a.V;
    const T* logits = static_cast<const T*>(a.logits);
    const A* row_max = static_cast<const A*>(a.row_max);
    A* sum_exp = static_cast<A*>(a.sum_exp);
    A* target = static_cast<A*>(a.target);
    if constexpr (kVectorRows<T>) {
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
      for (int64_t i = 0; i < n; ++i) {
        const T* l = logits + i * V;
        sum_exp[i] = xent_sum_row(l, V, row_max[i]);
        const int64_t t = a.labels[i] - a.vocab_start;
        target[i] = (t >= 0 && t < V) ? to_acc(l[t]) : A(0);
      }
      return;
    }
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
    for (int64_t i = 0; i < n; ++i) {
      const T* l = logits + i * V;
      const A m = row_max[i];
      A s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp(to_acc(l[v]) - m);
      sum_exp[i] = s;
      const int64_t t = a.labels[i] - a.vocab_start;
      target[i] = (t >= 0 && t < V) ? to_acc(l[t]) : A(0);
    }
  });
}

void cpu_xent_bwd(const XentArgs& a, const ExecCtx&) {
  cpu::dispatch_float(a.dtype, "xent_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t n = a.n, V = a.V;
    const T* logits = static_cast<const T*>(a.logits);
    const A* row_max = static_cast<const A*>(a.row_max);
    const A* sum_exp = static_cast<const A*>(a.sum_exp);
    const A* grad = static_cast<const A*>(a.grad);
    T* dlogits = static_cast<T*>(a.dlogits);
    if constexpr (kVectorRows<T>) {
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
      for (int64_t i = 0; i < n; ++i)
        xent_bwd_row(logits + i * V, dlogits + i * V, V, row_max[i], sum_exp[i], grad[i], a.labels[i] - a.vocab_start);
      return;
    }
#pragma omp parallel for schedule(static) if (n * V > kParallelElems)
    for (int64_t i = 0; i < n; ++i) {
      const T* l = logits + i * V;
      T* dl = dlogits + i * V;  // may be l: each element is read before it is written
      const A m = row_max[i], s = sum_exp[i], g = grad[i];
      const int64_t t = a.labels[i] - a.vocab_start;
      for (int64_t v = 0; v < V; ++v) {
        const A p = std::exp(to_acc(l[v]) - m) / s;
        dl[v] = from_acc<T>(g * (v == t ? p - A(1) : p));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Fused QKV split / merge: per row and query group g, [q_per_group query heads | key | value].
// Pure data movement (bytes copied, bit-exact for any dtype).
void cpu_qkv(const QkvArgs& a, const ExecCtx&) {
  const int64_t rows = a.rows, ng = a.ng, qpg = a.q_per_group, hd = a.hd;
  const size_t es = dtype_size(a.dtype);
  const size_t head = static_cast<size_t>(hd) * es;
  const int64_t W = ng * (qpg + 2) * hd;  // qkv row width in elements
  char* qkv = static_cast<char*>(a.qkv);
  char* q = static_cast<char*>(a.q);
  char* k = static_cast<char*>(a.k);
  char* v = static_cast<char*>(a.v);
#pragma omp parallel for schedule(static) if (rows * W > kParallelElems)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      char* src = qkv + static_cast<size_t>(r * W + g * (qpg + 2) * hd) * es;  // this group's block
      for (int64_t j = 0; j < qpg; ++j) {
        char* qh = q + static_cast<size_t>((r * ng * qpg + g * qpg + j) * hd) * es;
        char* blk = src + static_cast<size_t>(j) * head;
        if (a.merge) {
          std::memcpy(blk, qh, head);
        } else {
          std::memcpy(qh, blk, head);
        }
      }
      char* kh = k + static_cast<size_t>((r * ng + g) * hd) * es;
      char* vh = v + static_cast<size_t>((r * ng + g) * hd) * es;
      char* kb = src + static_cast<size_t>(qpg) * head;
      char* vb = kb + head;
      if (a.merge) {
        std::memcpy(kb, kh, head);
        std::memcpy(vb, vh, head);
      } else {
        std::memcpy(kh, kb, head);
        std::memcpy(vh, vb, head);
      }
    }
  }
}

}  // namespace moe
