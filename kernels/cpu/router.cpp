// Router kernels on the CPU (docs/moe.md): scores, group-limited top-k, probabilities and their
// backward; the aux-loss statistics and gradient; the z-loss; capacity dropping and padding.
// Compute is in the storage type (f32 or f64). Every token (and, for capacity, every expert column)
// is independent, so the OpenMP loops give the same bits at any thread count; sums over tokens
// (aux statistics, z-loss) run afterwards in token order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"

namespace moe {

namespace {

// ---- scalar score functions -------------------------------------------------------------------
template <class A>
inline A sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}
// softplus(x) = log(1 + e^x), stable for both signs.
template <class A>
inline A softplus(A x) {
  return x > A(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}
// The unnormalised score s(l) of sigmoid / sqrtsoftplus.
template <class A>
inline A raw_score(ScoreFunction f, A l) {
  return f == ScoreFunction::sigmoid ? sigmoid(l) : std::sqrt(softplus(l));
}
// ds/dl given l and s = raw_score(l): σ' = s(1 − s); d sqrt(softplus)/dl = σ(l) / (2 s).
template <class A>
inline A raw_score_grad(ScoreFunction f, A l, A s) {
  if (f == ScoreFunction::sigmoid) return s * (A(1) - s);
  return s > A(0) ? sigmoid(l) / (A(2) * s) : A(0);  // s = 0 only when softplus underflows: the limit is 0
}

// out (E) = softmax(l (E)), max-subtracted.
template <class A>
inline void softmax_row(const A* l, A* out, int64_t E) {
  A m = l[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, l[e]);
  A sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    out[e] = std::exp(l[e] - m);
    sum += out[e];
  }
  A inv = A(1) / sum;
  for (int64_t e = 0; e < E; ++e) out[e] *= inv;
}

template <class A>
inline A logsumexp_row(const A* l, int64_t E) {
  A m = l[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, l[e]);
  A sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - m);
  return m + std::log(sum);
}

// Top-k of sc (n) by repeated arg-max: descending, ties to the lower index. idx (k) out; `used`
// (n) is scratch.
template <class A>
inline void topk_row(const A* sc, int64_t n, int64_t k, int32_t* idx, std::vector<uint8_t>& used) {
  std::fill(used.begin(), used.begin() + n, uint8_t{0});
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n; ++e) {
      if (used[e]) continue;
      if (best < 0 || sc[e] > sc[best]) best = e;
    }
    used[best] = 1;
    idx[j] = static_cast<int32_t>(best);
  }
}

// Group-limited masking in place on sc (E): group score = sum of the group's top (k/g) scores;
// the best g groups stay, the rest become −inf.
template <class A>
void group_mask_row(A* sc, int64_t E, int64_t k, int64_t G, int64_t g, std::vector<A>& gscore,
                    std::vector<int32_t>& tmp_idx, std::vector<uint8_t>& used) {
  const int64_t gs = E / G, per_group = k / g;
  for (int64_t grp = 0; grp < G; ++grp) {
    const A* s = sc + grp * gs;
    topk_row(s, gs, per_group, tmp_idx.data(), used);
    A sum = 0;
    for (int64_t j = 0; j < per_group; ++j) sum += s[tmp_idx[j]];
    gscore[grp] = sum;
  }
  topk_row(gscore.data(), G, g, tmp_idx.data(), used);
  std::vector<uint8_t>& keep = used;  // reuse: keep[grp] after the top-g selection
  std::fill(keep.begin(), keep.begin() + G, uint8_t{0});
  for (int64_t j = 0; j < g; ++j) keep[tmp_idx[j]] = 1;
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t grp = 0; grp < G; ++grp)
    if (!keep[grp])
      for (int64_t e = 0; e < gs; ++e) sc[grp * gs + e] = ninf;
}

// p̂ (E) for the aux losses: softmax(l), or s(l)/(Σ s(l) + 1e-20) for sigmoid / sqrtsoftplus.
// Returns the denominator D (1 for softmax); s (E) gets the raw scores for sigmoid-like.
template <class A>
inline A aux_scores_row(ScoreFunction f, const A* l, int64_t E, A* p, A* s) {
  if (f == ScoreFunction::softmax) {
    softmax_row(l, p, E);
    return A(1);
  }
  A sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    s[e] = raw_score(f, l[e]);
    sum += s[e];
  }
  A D = sum + A(1e-20);
  for (int64_t e = 0; e < E; ++e) p[e] = s[e] / D;
  return D;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void cpu_router_topk(const RouterTopkArgs& a, const ExecCtx&) {
  MOE_CHECK(a.expert_bias == nullptr || a.score != ScoreFunction::softmax,
            "router_topk: the expert bias needs score function sigmoid or sqrtsoftplus, got softmax");
  cpu::dispatch_router(a.dtype, "router_topk", [&](auto tag) {
    using A = decltype(tag);  // f32 / f64 storage is its own compute type
    const int64_t T = a.T, E = a.E, k = a.k;
    const A* logits = static_cast<const A*>(a.logits);
    A* probs = static_cast<A*>(a.probs);
    const bool groups = a.num_groups > 0;
    const A scale = static_cast<A>(a.scaling_factor);
#pragma omp parallel
    {
      std::vector<A> sel(static_cast<size_t>(E)), s(static_cast<size_t>(E)), gscore(static_cast<size_t>(std::max<int64_t>(a.num_groups, 1)));
      std::vector<int32_t> tmp_idx(static_cast<size_t>(E));
      std::vector<uint8_t> used(static_cast<size_t>(E));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        const A* l = logits + t * E;
        int32_t* idx = a.topk_idx + t * k;
        // 1. Routing scores: what the top-k (and group) selection ranks.
        if (a.score == ScoreFunction::softmax) {
          if (a.pre_softmax) {
            softmax_row(l, s.data(), E);
            std::copy(s.begin(), s.end(), sel.begin());
          } else {
            std::copy(l, l + E, sel.begin());
          }
        } else {
          for (int64_t e = 0; e < E; ++e) {
            s[e] = raw_score(a.score, l[e]);
            sel[e] = a.expert_bias ? s[e] + static_cast<A>(a.expert_bias[e]) : s[e];
          }
        }
        // 2. Group limit, then top-k.
        if (groups) group_mask_row(sel.data(), E, k, a.num_groups, a.group_topk, gscore, tmp_idx, used);
        topk_row(sel.data(), E, k, idx, used);
        // 3. Probabilities of the selected experts, in selection order.
        A* p = probs + t * E;
        uint8_t* m = a.routing_map + t * E;
        std::fill(p, p + E, A(0));
        std::fill(m, m + E, uint8_t{0});
        if (a.score == ScoreFunction::softmax && !a.pre_softmax) {
          A mx = l[idx[0]];  // the first selected logit is the largest
          A sum = 0;
          for (int64_t j = 0; j < k; ++j) {
            s[j] = std::exp(l[idx[j]] - mx);
            sum += s[j];
          }
          for (int64_t j = 0; j < k; ++j) p[idx[j]] = s[j] / sum;
        } else if (a.score == ScoreFunction::softmax) {
          for (int64_t j = 0; j < k; ++j) p[idx[j]] = s[idx[j]];
        } else if (k > 1) {
          A sum = 0;
          for (int64_t j = 0; j < k; ++j) sum += s[idx[j]];
          A D = sum + A(1e-20);
          for (int64_t j = 0; j < k; ++j) p[idx[j]] = s[idx[j]] / D;
        } else {
          p[idx[0]] = s[idx[0]];
        }
        for (int64_t j = 0; j < k; ++j) {
          p[idx[j]] *= scale;
          m[idx[j]] = 1;
        }
      }
    }
  });
}

void cpu_router_topk_bwd(const RouterTopkBwdArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "router_topk_bwd", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E, k = a.k;
    const A* logits = static_cast<const A*>(a.logits);
    const A* dprobs = static_cast<const A*>(a.dprobs);
    A* dlogits = static_cast<A*>(a.dlogits);
    const A scale = static_cast<A>(a.scaling_factor);
#pragma omp parallel
    {
      std::vector<A> s(static_cast<size_t>(E)), g(static_cast<size_t>(k)), dl(static_cast<size_t>(E));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        const A* l = logits + t * E;
        const int32_t* idx = a.topk_idx + t * k;
        const uint8_t* m = a.routing_map + t * E;
        // Upstream gradient of each selection (zero where capacity dropped it), times the scale.
        for (int64_t j = 0; j < k; ++j) g[j] = m[idx[j]] ? dprobs[t * E + idx[j]] * scale : A(0);
        std::fill(dl.begin(), dl.end(), A(0));
        if (a.score == ScoreFunction::softmax && !a.pre_softmax) {
          // q = softmax over the k selected logits: dl_j = q_j (g_j − Σ g q).
          A mx = l[idx[0]];
          for (int64_t j = 1; j < k; ++j) mx = std::max(mx, l[idx[j]]);
          A sum = 0;
          for (int64_t j = 0; j < k; ++j) {
            s[j] = std::exp(l[idx[j]] - mx);
            sum += s[j];
          }
          A dot = 0;
          for (int64_t j = 0; j < k; ++j) {
            s[j] /= sum;
            dot += g[j] * s[j];
          }
          for (int64_t j = 0; j < k; ++j) dl[idx[j]] = s[j] * (g[j] - dot);
        } else if (a.score == ScoreFunction::softmax) {
          // s = softmax over all E: dl_i = s_i (g̃_i − Σ_j g_j s_idx_j) for every i.
          softmax_row(l, s.data(), E);
          A dot = 0;
          for (int64_t j = 0; j < k; ++j) dot += g[j] * s[idx[j]];
          for (int64_t e = 0; e < E; ++e) dl[e] = -s[e] * dot;
          for (int64_t j = 0; j < k; ++j) dl[idx[j]] += s[idx[j]] * g[j];
        } else {
          // p_j = s_j / D with D = Σ_sel s + 1e-20 (k > 1), else p = s.
          for (int64_t j = 0; j < k; ++j) s[j] = raw_score(a.score, l[idx[j]]);
          if (k > 1) {
            A sum = 0, gs = 0;
            for (int64_t j = 0; j < k; ++j) {
              sum += s[j];
              gs += g[j] * s[j];
            }
            A D = sum + A(1e-20);
            for (int64_t j = 0; j < k; ++j) {
              A ds = g[j] / D - gs / (D * D);
              dl[idx[j]] = ds * raw_score_grad(a.score, l[idx[j]], s[j]);
            }
          } else {
            dl[idx[0]] = g[0] * raw_score_grad(a.score, l[idx[0]], s[0]);
          }
        }
        A* out = dlogits + t * E;
        if (a.accumulate)
          for (int64_t e = 0; e < E; ++e) out[e] += dl[e];
        else
          for (int64_t e = 0; e < E; ++e) out[e] = dl[e];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
void cpu_aux_stats(const AuxStatsArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "aux_stats", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E, k = a.k, ns = a.num_seqs;
    const A* logits = static_cast<const A*>(a.logits);
    // Per-token p̂ and plain top-k flags (parallel), then the sums in token order (serial).
    std::vector<A> P(static_cast<size_t>(T * E));
    std::vector<uint8_t> U(static_cast<size_t>(T * E), 0);
#pragma omp parallel
    {
      std::vector<A> s(static_cast<size_t>(E));
      std::vector<int32_t> idx(static_cast<size_t>(k));
      std::vector<uint8_t> used(static_cast<size_t>(E));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        A* p = P.data() + t * E;
        aux_scores_row(a.score, logits + t * E, E, p, s.data());
        topk_row(p, E, k, idx.data(), used);
        for (int64_t j = 0; j < k; ++j) U[static_cast<size_t>(t * E + idx[j])] = 1;
      }
    }
    std::fill(a.prob_sum, a.prob_sum + ns * E, 0.0);
    std::fill(a.counts, a.counts + ns * E, int64_t{0});
    for (int64_t t = 0; t < T; ++t) {
      double* ps = a.prob_sum + (t % ns) * E;
      int64_t* c = a.counts + (t % ns) * E;
      for (int64_t e = 0; e < E; ++e) {
        ps[e] += static_cast<double>(P[static_cast<size_t>(t * E + e)]);
        c[e] += U[static_cast<size_t>(t * E + e)];
      }
    }
  });
}

void cpu_aux_loss_bwd(const AuxLossBwdArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "aux_loss_bwd", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E, ns = a.num_seqs;
    const A* logits = static_cast<const A*>(a.logits);
    A* dlogits = static_cast<A*>(a.dlogits);
#pragma omp parallel
    {
      std::vector<A> p(static_cast<size_t>(E)), s(static_cast<size_t>(E));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        const A* l = logits + t * E;
        const double* w = a.weight + (t % ns) * E;
        A* out = dlogits + t * E;
        A D = aux_scores_row(a.score, l, E, p.data(), s.data());
        if (a.score == ScoreFunction::softmax) {
          // dl_i = p̂_i (w_i − Σ_j w_j p̂_j)
          A dot = 0;
          for (int64_t e = 0; e < E; ++e) dot += static_cast<A>(w[e]) * p[e];
          for (int64_t e = 0; e < E; ++e) out[e] += p[e] * (static_cast<A>(w[e]) - dot);
        } else {
          // p̂_m = s_m / D: ds_m = w_m / D − Σ_j w_j s_j / D², dl_m = ds_m · s'(l_m)
          A ws = 0;
          for (int64_t e = 0; e < E; ++e) ws += static_cast<A>(w[e]) * s[e];
          for (int64_t e = 0; e < E; ++e) {
            A ds = static_cast<A>(w[e]) / D - ws / (D * D);
            out[e] += ds * raw_score_grad(a.score, l[e], s[e]);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
void cpu_z_loss_fwd(const ZLossArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "z_loss_fwd", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E;
    const A* logits = static_cast<const A*>(a.logits);
    std::vector<double> lse(static_cast<size_t>(T));
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) lse[static_cast<size_t>(t)] = static_cast<double>(logsumexp_row(logits + t * E, E));
    double sum = 0;  // token order: the same bits at any thread count
    for (int64_t t = 0; t < T; ++t) sum += lse[static_cast<size_t>(t)] * lse[static_cast<size_t>(t)];
    a.sum_out[0] = sum;
  });
}

void cpu_z_loss_bwd(const ZLossArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "z_loss_bwd", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E;
    const A* logits = static_cast<const A*>(a.logits);
    A* dlogits = static_cast<A*>(a.dlogits);
    const A two_coef = static_cast<A>(2.0 * a.coef);
#pragma omp parallel
    {
      std::vector<A> p(static_cast<size_t>(E));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t) {
        const A* l = logits + t * E;
        A lse = logsumexp_row(l, E);
        softmax_row(l, p.data(), E);
        A c = two_coef * lse;
        for (int64_t e = 0; e < E; ++e) dlogits[t * E + e] += c * p[e];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
void cpu_capacity(const CapacityArgs& a, const ExecCtx&) {
  cpu::dispatch_router(a.dtype, "capacity", [&](auto tag) {
    using A = decltype(tag);
    const int64_t T = a.T, E = a.E, cap = a.capacity;
    A* probs = static_cast<A*>(a.probs);
    uint8_t* map = a.routing_map;
    const int64_t full = std::min(cap, T);  // rows per expert after padding
#pragma omp parallel
    {
      std::vector<int64_t> routed;
      routed.reserve(static_cast<size_t>(T));
#pragma omp for schedule(static)
      for (int64_t e = 0; e < E; ++e) {
        routed.clear();
        for (int64_t t = 0; t < T; ++t)
          if (map[t * E + e]) routed.push_back(t);
        int64_t n = static_cast<int64_t>(routed.size());
        if (n > cap) {
          if (a.policy == DropPolicy::probs) {
            // Largest probs first; the stable sort keeps ties in token order.
            std::stable_sort(routed.begin(), routed.end(),
                             [&](int64_t x, int64_t y) { return probs[x * E + e] > probs[y * E + e]; });
          }
          for (int64_t i = cap; i < n; ++i) {
            map[routed[i] * E + e] = 0;
            probs[routed[i] * E + e] = A(0);
          }
          n = cap;
        }
        if (a.pad) {
          // Fill with the earliest tokens not routed here; their probs stay zero.
          int64_t need = full - n;
          for (int64_t t = 0; t < T && need > 0; ++t) {
            if (map[t * E + e]) continue;
            map[t * E + e] = 1;
            probs[t * E + e] = A(0);
            --need;
          }
        }
      }
    }
  });
}

}  // namespace moe
