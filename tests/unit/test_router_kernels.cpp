// Router kernels (kernels/cpu/router.cpp through the Tensor-level ops) against plain references
// written here in double: top-k with every score function, pre/post softmax, groups, expert bias
// and scaling; capacity dropping and padding; aux statistics; z-loss. Backward kernels by finite
// differences in f64. Determinism across thread counts. Error cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/cpu/cpu_kernels.h"

using namespace moe;
using moe::test::expect_error;
using moe::test::all_close;
using moe::test::bit_equal;
using moe::test::check_grad;
using moe::test::from_f64;
using moe::test::randn;
using moe::test::to_f64;

namespace {

// ---- plain references in double ----------------------------------------------------------------
double sigmoid_ref(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double sqrtsoftplus_ref(double x) { return std::sqrt(std::log1p(std::exp(x))); }

std::vector<double> softmax_ref(const std::vector<double>& l) {
  double m = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double s = 0;
  for (size_t i = 0; i < l.size(); ++i) s += (p[i] = std::exp(l[i] - m));
  for (double& v : p) v /= s;
  return p;
}

double lse_ref(const std::vector<double>& l) {
  double m = *std::max_element(l.begin(), l.end());
  double s = 0;
  for (double v : l) s += std::exp(v - m);
  return m + std::log(s);
}

// Indices of `v` sorted by value descending, ties by index ascending; the first k.
std::vector<int> sorted_topk(const std::vector<double>& v, int64_t k) {
  std::vector<int> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
  order.resize(static_cast<size_t>(k));
  return order;
}

struct TopkRef {
  std::vector<double> probs;  // (T, E)
  std::vector<double> map;    // (T, E)
  std::vector<double> idx;    // (T, k)
};

TopkRef topk_ref(const std::vector<double>& logits, int64_t T, int64_t E, const ops::TopkSpec& s,
                 const std::vector<double>& bias) {
  TopkRef r;
  r.probs.assign(static_cast<size_t>(T * E), 0.0);
  r.map.assign(static_cast<size_t>(T * E), 0.0);
  const int64_t k = s.k;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> l(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    std::vector<double> score(E), routing(E);
    for (int64_t e = 0; e < E; ++e) {
      switch (s.score) {
        case ScoreFunction::softmax: score[e] = l[e]; break;
        case ScoreFunction::sigmoid: score[e] = sigmoid_ref(l[e]); break;
        case ScoreFunction::sqrtsoftplus: score[e] = sqrtsoftplus_ref(l[e]); break;
      }
    }
    if (s.score == ScoreFunction::softmax && s.pre_softmax) score = softmax_ref(l);
    for (int64_t e = 0; e < E; ++e) routing[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
    if (s.num_groups > 0) {
      int64_t G = s.num_groups, gs = E / G;
      std::vector<double> gscore(G);
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> part(routing.begin() + g * gs, routing.begin() + (g + 1) * gs);
        std::sort(part.begin(), part.end(), std::greater<double>());
        gscore[g] = std::accumulate(part.begin(), part.begin() + k / s.group_topk, 0.0);
      }
      std::vector<int> keep = sorted_topk(gscore, s.group_topk);
      for (int64_t g = 0; g < G; ++g)
        if (std::find(keep.begin(), keep.end(), g) == keep.end())
          for (int64_t e = 0; e < gs; ++e) routing[g * gs + e] = -INFINITY;
    }
    std::vector<int> idx = sorted_topk(routing, k);
    std::vector<double> p(k);
    if (s.score == ScoreFunction::softmax && !s.pre_softmax) {
      std::vector<double> sel(k);
      for (int64_t j = 0; j < k; ++j) sel[j] = l[idx[j]];
      p = softmax_ref(sel);
    } else {
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += (p[j] = score[idx[j]]);
      if (s.score != ScoreFunction::softmax && k > 1)
        for (double& v : p) v /= sum + 1e-20;
    }
    for (int64_t j = 0; j < k; ++j) {
      r.probs[t * E + idx[j]] = p[j] * s.scaling_factor;
      r.map[t * E + idx[j]] = 1;
      r.idx.push_back(idx[j]);
    }
  }
  return r;
}

// p̂ (E) of the aux losses.
std::vector<double> aux_scores_ref(ScoreFunction f, const std::vector<double>& l) {
  if (f == ScoreFunction::softmax) return softmax_ref(l);
  std::vector<double> s(l.size());
  double sum = 0;
  for (size_t i = 0; i < l.size(); ++i) sum += (s[i] = f == ScoreFunction::sigmoid ? sigmoid_ref(l[i]) : sqrtsoftplus_ref(l[i]));
  for (double& v : s) v /= sum + 1e-20;
  return s;
}

std::vector<double> row(const std::vector<double>& m, int64_t t, int64_t E) {
  return std::vector<double>(m.begin() + t * E, m.begin() + (t + 1) * E);
}

const char* score_name(ScoreFunction f) {
  switch (f) {
    case ScoreFunction::softmax: return "softmax";
    case ScoreFunction::sigmoid: return "sigmoid";
    case ScoreFunction::sqrtsoftplus: return "sqrtsoftplus";
  }
  return "?";
}

struct Case {
  ScoreFunction score;
  bool pre;
  bool groups;
  bool bias;
  double scale;
  int64_t E, k;
  std::string str() const {
    std::ostringstream os;
    os << score_name(score) << (pre ? " pre" : " post") << (groups ? " groups" : "") << (bias ? " bias" : "")
       << " scale=" << scale << " E=" << E << " k=" << k;
    return os.str();
  }
  ops::TopkSpec spec() const {
    ops::TopkSpec s;
    s.k = k;
    s.score = score;
    s.pre_softmax = pre;
    s.scaling_factor = scale;
    if (groups) {
      s.num_groups = 4;
      s.group_topk = k == 1 ? 1 : 2;
    }
    return s;
  }
};

// Every combination the kernel supports (expert bias only with sigmoid-like scores).
std::vector<Case> all_cases() {
  std::vector<Case> cases;
  struct Mode {
    ScoreFunction f;
    bool pre;
  };
  for (Mode m : {Mode{ScoreFunction::softmax, false}, Mode{ScoreFunction::softmax, true}, Mode{ScoreFunction::sigmoid, false},
                 Mode{ScoreFunction::sqrtsoftplus, false}})
    for (bool groups : {false, true})
      for (bool bias : {false, true}) {
        if (bias && m.f == ScoreFunction::softmax) continue;
        for (double scale : {1.0, 2.5})
          for (int64_t E : {8, 16})
            for (int64_t k : {1, 2, 4}) cases.push_back({m.f, m.pre, groups, bias, scale, E, k});
      }
  return cases;
}

struct TopkOut {
  Tensor probs, map, idx;
};
TopkOut run_topk(const ops::TopkSpec& s, const Tensor& logits, const Tensor* bias) {
  int64_t T = logits.size(0), E = logits.size(1);
  TopkOut o{Tensor::empty({T, E}, logits.dtype()), Tensor::empty({T, E}, DType::u8), Tensor::empty({T, s.k}, DType::i32)};
  ops::router_topk(s, logits, bias, o.probs, o.map, o.idx);
  return o;
}

double tol_for(DType dt) { return dt == DType::f64 ? 1e-12 : 2e-6; }

}  // namespace

// ---------------------------------------------------------------------------------------------
TEST(RouterTopk, MatchesReferenceEveryConfiguration) {
  const int64_t T = 37;
  int n = 0;
  for (const Case& c : all_cases()) {
    for (DType dt : {DType::f32, DType::f64}) {
      SCOPED_TRACE(c.str() + " " + dtype_name(dt));
      Tensor logits = randn({T, c.E}, dt, 100 + c.E + c.k, 2.0);
      Tensor bias;
      std::vector<double> bias_v;
      if (c.bias) {
        bias = randn({c.E}, DType::f32, 7, 0.3);
        bias_v = to_f64(bias);
      }
      TopkOut o = run_topk(c.spec(), logits, c.bias ? &bias : nullptr);
      TopkRef r = topk_ref(to_f64(logits), T, c.E, c.spec(), bias_v);
      ASSERT_EQ(to_f64(o.idx), r.idx);
      ASSERT_EQ(to_f64(o.map), r.map);
      ASSERT_TRUE(all_close(to_f64(o.probs), r.probs, tol_for(dt), tol_for(dt)));
      // Invariants: exactly k entries per token, probs zero off the map, post-softmax sums to the scale.
      std::vector<double> map = to_f64(o.map), probs = to_f64(o.probs);
      for (int64_t t = 0; t < T; ++t) {
        double cnt = 0, sum = 0;
        for (int64_t e = 0; e < c.E; ++e) {
          cnt += map[t * c.E + e];
          if (!map[t * c.E + e]) {
            ASSERT_EQ(probs[t * c.E + e], 0.0);
          }
          sum += probs[t * c.E + e];
        }
        ASSERT_EQ(cnt, static_cast<double>(c.k));
        if (c.score == ScoreFunction::softmax && !c.pre) {
          ASSERT_NEAR(sum, c.scale, 1e-5);
        }
      }
      ++n;
    }
  }
  EXPECT_EQ(n, 2 * 2 * 2 * 3 * 2 * (2 + 2 * 2));  // dtypes·scales·E·k·groups·(2 softmax modes + 2 sigmoid-like × bias)
}

TEST(RouterTopk, TiesGoToTheLowerExpert) {
  // All-equal logits: every score function picks experts 0..k-1, in order.
  const int64_t T = 3, E = 8, k = 3;
  Tensor logits = Tensor::zeros({T, E}, DType::f32);
  for (ScoreFunction f : {ScoreFunction::softmax, ScoreFunction::sigmoid, ScoreFunction::sqrtsoftplus}) {
    ops::TopkSpec s;
    s.k = k;
    s.score = f;
    TopkOut o = run_topk(s, logits, nullptr);
    std::vector<int32_t> idx = o.idx.to_vector<int32_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) EXPECT_EQ(idx[t * k + j], j) << score_name(f);
    // With groups (4 groups of 2, keep 1, k 2): equal group scores keep group 0.
    s.num_groups = 4;
    s.group_topk = 1;
    s.k = 2;
    Tensor idx2 = Tensor::empty({T, 2}, DType::i32), p2 = Tensor::empty({T, E}, DType::f32), m2 = Tensor::empty({T, E}, DType::u8);
    ops::router_topk(s, logits, nullptr, p2, m2, idx2);
    EXPECT_EQ(idx2.to_vector<int32_t>(), std::vector<int32_t>({0, 1, 0, 1, 0, 1}));
  }
  // A tie between experts 5 and 2 in the top spot: 2 first.
  std::vector<double> l = {0, 0, 3, 1, 0, 3, 0, 2};
  ops::TopkSpec s;
  s.k = 2;
  TopkOut o = run_topk(s, from_f64(l, {1, 8}), nullptr);
  EXPECT_EQ(o.idx.to_vector<int32_t>(), std::vector<int32_t>({2, 5}));
}

TEST(RouterTopk, GroupLimitPicksBestGroups) {
  // 4 groups of 2, group_topk 1, k 2: group scores (sum of top 1) = 5, 4, 9, 1 → group 2 only.
  std::vector<double> l = {5, -1, 4, 3, 0, 9, 1, 1};
  ops::TopkSpec s;
  s.k = 2;
  s.num_groups = 4;
  s.group_topk = 1;
  TopkOut o = run_topk(s, from_f64(l, {1, 8}), nullptr);
  EXPECT_EQ(o.idx.to_vector<int32_t>(), std::vector<int32_t>({5, 4}));
  // Without the limit the top 2 are experts 5 and 0.
  s.num_groups = s.group_topk = 0;
  o = run_topk(s, from_f64(l, {1, 8}), nullptr);
  EXPECT_EQ(o.idx.to_vector<int32_t>(), std::vector<int32_t>({5, 0}));
  // k 4, group_topk 2: group score = sum of the top 2 = 4, 7, 9, 2 → groups 2 and 1.
  s.k = 4;
  s.num_groups = 4;
  s.group_topk = 2;
  o = run_topk(s, from_f64(l, {1, 8}), nullptr);
  EXPECT_EQ(o.idx.to_vector<int32_t>(), std::vector<int32_t>({5, 2, 3, 4}));
}

TEST(RouterTopk, ExpertBiasOnlyChooses) {
  // Sigmoid: bias pushes expert 7 into the top-1, but the prob is still σ(l_7).
  std::vector<double> l = {2, 1, 0, 0, 0, 0, 0, -1};
  Tensor bias = Tensor::from_vector(std::vector<float>{0, 0, 0, 0, 0, 0, 0, 5}, {8});
  ops::TopkSpec s;
  s.k = 1;
  s.score = ScoreFunction::sigmoid;
  TopkOut o = run_topk(s, from_f64(l, {1, 8}), &bias);
  EXPECT_EQ(o.idx.to_vector<int32_t>(), std::vector<int32_t>({7}));
  EXPECT_DOUBLE_EQ(to_f64(o.probs)[7], sigmoid_ref(-1.0));
}

// ---------------------------------------------------------------------------------------------
// Backward: finite differences of loss(logits) = Σ probs ⊙ G in f64, through the kernel's own
// forward (well-separated random logits keep the selection fixed under the perturbation).
TEST(RouterTopkBwd, FiniteDifferencesEveryConfiguration) {
  const int64_t T = 13;
  for (const Case& c : all_cases()) {
    if (c.E != 8 && c.groups == false) continue;  // keep it quick: E=16 only with groups
    SCOPED_TRACE(c.str());
    ops::TopkSpec s = c.spec();
    Tensor logits = randn({T, c.E}, DType::f64, 300 + c.k, 2.0);
    Tensor G = randn({T, c.E}, DType::f64, 301);
    Tensor bias = c.bias ? randn({c.E}, DType::f32, 8, 0.3) : Tensor();
    const Tensor* bp = c.bias ? &bias : nullptr;
    auto loss = [&] {
      TopkOut o = run_topk(s, logits, bp);
      std::vector<double> p = to_f64(o.probs), g = to_f64(G);
      return std::inner_product(p.begin(), p.end(), g.begin(), 0.0);
    };
    TopkOut o = run_topk(s, logits, bp);
    Tensor dl = Tensor::empty({T, c.E}, DType::f64);
    ops::router_topk_bwd(s, logits, o.idx, o.map, G, dl, false);
    ASSERT_TRUE(check_grad(loss, logits, dl));
    // accumulate adds onto what is there.
    Tensor acc = randn({T, c.E}, DType::f64, 5);
    Tensor expect = acc.clone();
    ops::add_(expect, dl);
    ops::router_topk_bwd(s, logits, o.idx, o.map, G, acc, true);
    ASSERT_TRUE(all_close(acc, expect, 1e-14, 1e-14));
  }
}

TEST(RouterTopkBwd, DroppedSelectionsCarryNoGradient) {
  // Capacity applied inside the loss: the kept probs keep their values, dropped ones become 0.
  const int64_t T = 24, E = 8;
  for (ScoreFunction f : {ScoreFunction::softmax, ScoreFunction::sigmoid, ScoreFunction::sqrtsoftplus})
    for (DropPolicy pol : {DropPolicy::probs, DropPolicy::position}) {
      SCOPED_TRACE(score_name(f));
      ops::TopkSpec s;
      s.k = 2;
      s.score = f;
      Tensor logits = randn({T, E}, DType::f64, 41, 2.0);
      Tensor G = randn({T, E}, DType::f64, 42);
      auto fwd = [&] {
        TopkOut o = run_topk(s, logits, nullptr);
        ops::capacity(4, pol, false, o.probs, o.map);
        return o;
      };
      auto loss = [&] {
        TopkOut o = fwd();
        std::vector<double> p = to_f64(o.probs), g = to_f64(G);
        return std::inner_product(p.begin(), p.end(), g.begin(), 0.0);
      };
      TopkOut o = fwd();
      std::vector<double> map = to_f64(o.map);
      ASSERT_LT(std::accumulate(map.begin(), map.end(), 0.0), static_cast<double>(T * 2));  // some dropped
      Tensor dl = Tensor::empty({T, E}, DType::f64);
      ops::router_topk_bwd(s, logits, o.idx, o.map, G, dl, false);
      ASSERT_TRUE(check_grad(loss, logits, dl));
    }
}

TEST(RouterTopkBwd, F32MatchesF64) {
  const int64_t T = 37;
  for (const Case& c : all_cases()) {
    if (c.E != 16) continue;
    SCOPED_TRACE(c.str());
    ops::TopkSpec s = c.spec();
    Tensor l64 = randn({T, c.E}, DType::f64, 500, 2.0);
    Tensor l32 = ops::cast(l64, DType::f32);
    l64 = ops::cast(l32, DType::f64);  // the same values in both
    Tensor G = randn({T, c.E}, DType::f32, 501);
    Tensor bias = c.bias ? randn({c.E}, DType::f32, 9, 0.3) : Tensor();
    TopkOut o32 = run_topk(s, l32, c.bias ? &bias : nullptr);
    TopkOut o64 = run_topk(s, l64, c.bias ? &bias : nullptr);
    ASSERT_TRUE(bit_equal(o32.idx, o64.idx));
    Tensor d32 = Tensor::empty({T, c.E}, DType::f32), d64 = Tensor::empty({T, c.E}, DType::f64);
    ops::router_topk_bwd(s, l32, o32.idx, o32.map, G, d32, false);
    ops::router_topk_bwd(s, l64, o64.idx, o64.map, ops::cast(G, DType::f64), d64, false);
    ASSERT_TRUE(all_close(d32, d64, 1e-5, 1e-5));
  }
}

// ---------------------------------------------------------------------------------------------
namespace {
// Capacity reference: per expert, keep the top `cap` routed tokens (by prob desc / token order),
// then pad with the earliest unrouted tokens.
void capacity_ref(std::vector<double>& probs, std::vector<double>& map, int64_t T, int64_t E, int64_t cap,
                  DropPolicy pol, bool pad) {
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> routed;
    for (int64_t t = 0; t < T; ++t)
      if (map[t * E + e]) routed.push_back(t);
    if (pol == DropPolicy::probs)
      std::stable_sort(routed.begin(), routed.end(), [&](int64_t a, int64_t b) { return probs[a * E + e] > probs[b * E + e]; });
    std::vector<char> keep(T, 0);
    for (size_t i = 0; i < routed.size() && static_cast<int64_t>(i) < cap; ++i) keep[routed[i]] = 1;
    int64_t kept = std::min<int64_t>(cap, routed.size());
    for (int64_t t = 0; t < T; ++t)
      if (!keep[t]) {
        if (pad && kept < std::min(cap, T) && !map[t * E + e]) {
          map[t * E + e] = 1;
          probs[t * E + e] = 0;
          ++kept;
        } else {
          map[t * E + e] = 0;
          probs[t * E + e] = 0;
        }
      }
  }
}
}  // namespace

TEST(Capacity, MatchesReference) {
  const int64_t T = 37;
  for (DType dt : {DType::f32, DType::f64})
    for (int64_t E : {8, 16})
      for (int64_t k : {1, 2, 4})
        for (DropPolicy pol : {DropPolicy::probs, DropPolicy::position})
          for (bool pad : {false, true})
            for (int64_t cap : {int64_t{0}, int64_t{1}, (T * k + E - 1) / E, T * k / E + 3, T, T + 5}) {
              SCOPED_TRACE(std::string(dtype_name(dt)) + " E=" + std::to_string(E) + " k=" + std::to_string(k) +
                           (pol == DropPolicy::probs ? " probs" : " position") + (pad ? " pad" : "") +
                           " cap=" + std::to_string(cap));
              ops::TopkSpec s;
              s.k = k;
              s.pre_softmax = true;  // probs differ across tokens for the probs policy
              TopkOut o = run_topk(s, randn({T, E}, dt, 900 + k, 2.0), nullptr);
              std::vector<double> p = to_f64(o.probs), m = to_f64(o.map);
              capacity_ref(p, m, T, E, cap, pol, pad);
              ops::capacity(cap, pol, pad, o.probs, o.map);
              ASSERT_EQ(to_f64(o.map), m);
              ASSERT_EQ(to_f64(o.probs), p);
              // Column sums: exactly min(cap, T) when padded, at most cap otherwise.
              std::vector<int64_t> counts = ops::routing_counts(o.map).to_vector<int64_t>();
              int64_t total = 0;
              for (int64_t c : counts) {
                if (pad) {
                  ASSERT_EQ(c, std::min(cap, T));
                } else {
                  ASSERT_LE(c, cap);
                }
                total += c;
              }
              if (pad && cap <= T) {
                ASSERT_EQ(total, cap * E);
              }
              if (cap >= T && !pad) {
                ASSERT_EQ(total, T * k);  // capacity >= T keeps all
              }
            }
}

TEST(Capacity, PoliciesKeepLargestOrEarliest) {
  // One expert, 5 routed tokens with probs 0.1 0.5 0.3 0.5 0.2, capacity 2.
  std::vector<double> probs = {0.1, 0.5, 0.3, 0.5, 0.2};
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor p = from_f64(probs, {5, 1}, dt);
    Tensor m = Tensor::from_vector(std::vector<uint8_t>(5, 1), {5, 1});
    ops::capacity(2, DropPolicy::probs, false, p, m);
    EXPECT_EQ(m.to_vector<uint8_t>(), std::vector<uint8_t>({0, 1, 0, 1, 0}));  // the two 0.5s (a tie, both kept)
    p = from_f64(probs, {5, 1}, dt);
    m = Tensor::from_vector(std::vector<uint8_t>(5, 1), {5, 1});
    ops::capacity(1, DropPolicy::probs, false, p, m);
    EXPECT_EQ(m.to_vector<uint8_t>(), std::vector<uint8_t>({0, 1, 0, 0, 0}));  // tie → lower token
    p = from_f64(probs, {5, 1}, dt);
    m = Tensor::from_vector(std::vector<uint8_t>(5, 1), {5, 1});
    ops::capacity(2, DropPolicy::position, false, p, m);
    EXPECT_EQ(m.to_vector<uint8_t>(), std::vector<uint8_t>({1, 1, 0, 0, 0}));
    EXPECT_EQ(to_f64(p), to_f64(from_f64({0.1, 0.5, 0, 0, 0}, {5, 1}, dt)));  // kept probs unchanged
  }
  // Padding: 2 routed tokens (1 and 3) padded to 4 with the earliest others (0 and 2), prob 0.
  Tensor p = from_f64({0, 0.7, 0, 0.4, 0}, {5, 1});
  Tensor m = Tensor::from_vector(std::vector<uint8_t>{0, 1, 0, 1, 0}, {5, 1});
  ops::capacity(4, DropPolicy::probs, true, p, m);
  EXPECT_EQ(m.to_vector<uint8_t>(), std::vector<uint8_t>({1, 1, 1, 1, 0}));
  EXPECT_EQ(to_f64(p), std::vector<double>({0, 0.7, 0, 0.4, 0}));
}

TEST(Capacity, DroplessKeepsEverything) {
  const int64_t T = 37, E = 8, k = 2;
  ops::TopkSpec s;
  s.k = k;
  TopkOut o = run_topk(s, randn({T, E}, DType::f32, 77, 2.0), nullptr);
  Tensor p0 = o.probs.clone(), m0 = o.map.clone();
  std::vector<int64_t> counts = ops::routing_counts(o.map).to_vector<int64_t>();
  int64_t mx = *std::max_element(counts.begin(), counts.end());
  ops::capacity(mx, DropPolicy::probs, false, o.probs, o.map);  // the largest load fits: nothing dropped
  EXPECT_TRUE(bit_equal(o.map, m0));
  EXPECT_TRUE(bit_equal(o.probs, p0));
  std::vector<double> m = to_f64(o.map);
  EXPECT_EQ(std::accumulate(m.begin(), m.end(), 0.0), static_cast<double>(T * k));
}

// ---------------------------------------------------------------------------------------------
TEST(AuxStats, MatchesReference) {
  const int64_t T = 36;
  for (DType dt : {DType::f32, DType::f64})
    for (ScoreFunction f : {ScoreFunction::softmax, ScoreFunction::sigmoid, ScoreFunction::sqrtsoftplus})
      for (int64_t E : {8, 16})
        for (int64_t k : {1, 2, 4})
          for (int64_t ns : {1, 3, 4}) {
            SCOPED_TRACE(std::string(dtype_name(dt)) + " " + score_name(f) + " E=" + std::to_string(E) +
                         " k=" + std::to_string(k) + " seqs=" + std::to_string(ns));
            Tensor logits = randn({T, E}, dt, 1000 + E + k, 2.0);
            std::vector<double> l = to_f64(logits);
            std::vector<double> ps(ns * E, 0.0), cnt(ns * E, 0.0);
            for (int64_t t = 0; t < T; ++t) {
              std::vector<double> p = aux_scores_ref(f, row(l, t, E));
              for (int64_t e = 0; e < E; ++e) ps[(t % ns) * E + e] += p[e];
              for (int i : sorted_topk(p, k)) cnt[(t % ns) * E + i] += 1;
            }
            Tensor prob_sum = Tensor::empty({ns, E}, DType::f64), counts = Tensor::empty({ns, E}, DType::i64);
            ops::aux_stats(f, k, ns, logits, prob_sum, counts);
            ASSERT_TRUE(all_close(to_f64(prob_sum), ps, tol_for(dt) * 10, tol_for(dt)));
            ASSERT_EQ(to_f64(counts), cnt);
          }
}

TEST(AuxStats, UniformLogitsGiveExactStatistics) {
  const int64_t T = 36, E = 8, k = 2;
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor logits = Tensor::zeros({T, E}, dt);
    Tensor prob_sum = Tensor::empty({1, E}, DType::f64), counts = Tensor::empty({1, E}, DType::i64);
    ops::aux_stats(ScoreFunction::softmax, k, 1, logits, prob_sum, counts);
    for (double v : to_f64(prob_sum)) EXPECT_EQ(v, 36.0 / 8.0);
    EXPECT_EQ(counts.to_vector<int64_t>(), std::vector<int64_t>({36, 36, 0, 0, 0, 0, 0, 0}));
  }
}

// dlogits += J_p̂ᵀ w: finite differences of Σ_t Σ_i w(t % ns, i) p̂(t, i) (reference p̂).
TEST(AuxLossBwd, FiniteDifferences) {
  const int64_t T = 12, E = 8;
  for (ScoreFunction f : {ScoreFunction::softmax, ScoreFunction::sigmoid, ScoreFunction::sqrtsoftplus})
    for (int64_t ns : {1, 3}) {
      SCOPED_TRACE(std::string(score_name(f)) + " seqs=" + std::to_string(ns));
      Tensor logits = randn({T, E}, DType::f64, 60, 2.0);
      Tensor w = randn({ns, E}, DType::f64, 61);
      std::vector<double> wv = to_f64(w);
      auto loss = [&] {
        std::vector<double> l = to_f64(logits);
        double s = 0;
        for (int64_t t = 0; t < T; ++t) {
          std::vector<double> p = aux_scores_ref(f, row(l, t, E));
          for (int64_t e = 0; e < E; ++e) s += wv[(t % ns) * E + e] * p[e];
        }
        return s;
      };
      Tensor d0 = randn({T, E}, DType::f64, 62);
      Tensor d = d0.clone();
      ops::aux_loss_bwd(f, ns, logits, w, d);
      Tensor grad = d.clone();
      ops::axpby(-1.0, d0, 1.0, grad);  // the kernel accumulates: subtract what was there
      ASSERT_TRUE(check_grad(loss, logits, grad));
      // f32 agrees with f64.
      Tensor d32 = Tensor::zeros({T, E}, DType::f32);
      ops::aux_loss_bwd(f, ns, ops::cast(logits, DType::f32), w, d32);
      ASSERT_TRUE(all_close(d32, grad, 1e-6, 1e-5));
    }
}

// ---------------------------------------------------------------------------------------------
TEST(ZLoss, ForwardMatchesReferenceAndBackwardMatchesFiniteDifferences) {
  const int64_t T = 37;
  for (DType dt : {DType::f32, DType::f64})
    for (int64_t E : {8, 16}) {
      Tensor logits = randn({T, E}, dt, 70 + E, 3.0);
      std::vector<double> l = to_f64(logits);
      double ref = 0;
      for (int64_t t = 0; t < T; ++t) ref += std::pow(lse_ref(row(l, t, E)), 2);
      EXPECT_NEAR(ops::z_loss_fwd(logits), ref, (dt == DType::f64 ? 1e-12 : 1e-5) * ref);
    }
  // Large logits stay finite (max-subtracted).
  Tensor big = from_f64({1000, 999, -1000, 0}, {1, 4}, DType::f32);
  double lse = 1000 + std::log1p(std::exp(-1.0));
  EXPECT_NEAR(ops::z_loss_fwd(big), lse * lse, 1e-6 * lse * lse);

  const int64_t E = 8;
  const double coef = 0.37;
  Tensor logits = randn({T, E}, DType::f64, 71, 2.0);
  auto loss = [&] { return coef * ops::z_loss_fwd(logits); };
  Tensor d0 = randn({T, E}, DType::f64, 72);
  Tensor d = d0.clone();
  ops::z_loss_bwd(logits, coef, d);
  ops::axpby(-1.0, d0, 1.0, d);
  EXPECT_TRUE(check_grad(loss, logits, d));
}

// ---------------------------------------------------------------------------------------------
TEST(RouterKernels, SameBitsAtAnyThreadCount) {
  const int64_t T = 64, E = 16, k = 4;
  Tensor logits = randn({T, E}, DType::f32, 80, 2.0);
  Tensor G = randn({T, E}, DType::f32, 81);
  Tensor bias = randn({E}, DType::f32, 82, 0.1);
  ops::TopkSpec s;
  s.k = k;
  s.score = ScoreFunction::sigmoid;
  s.num_groups = 4;
  s.group_topk = 2;
  struct Result {
    Tensor probs, map, idx, dl, ps, cnt;
    double z;
  };
  auto run = [&](int threads) {
    cpu_set_num_threads(threads);
    Result r;
    TopkOut o = run_topk(s, logits, &bias);
    ops::capacity(10, DropPolicy::probs, true, o.probs, o.map);
    r.probs = o.probs;
    r.map = o.map;
    r.idx = o.idx;
    r.dl = Tensor::empty({T, E}, DType::f32);
    ops::router_topk_bwd(s, logits, o.idx, o.map, G, r.dl, false);
    r.ps = Tensor::empty({1, E}, DType::f64);
    r.cnt = Tensor::empty({1, E}, DType::i64);
    ops::aux_stats(s.score, k, 1, logits, r.ps, r.cnt);
    ops::aux_loss_bwd(s.score, 1, logits, r.ps, r.dl);
    ops::z_loss_bwd(logits, 0.1, r.dl);
    r.z = ops::z_loss_fwd(logits);
    return r;
  };
  int before = cpu_num_threads();
  Result a = run(1), b = run(4);
  cpu_set_num_threads(before);
  EXPECT_TRUE(bit_equal(a.probs, b.probs));
  EXPECT_TRUE(bit_equal(a.map, b.map));
  EXPECT_TRUE(bit_equal(a.idx, b.idx));
  EXPECT_TRUE(bit_equal(a.dl, b.dl));
  EXPECT_TRUE(bit_equal(a.ps, b.ps));
  EXPECT_TRUE(bit_equal(a.cnt, b.cnt));
  EXPECT_EQ(a.z, b.z);
}

// ---------------------------------------------------------------------------------------------
namespace {
}  // namespace

TEST(RouterKernels, ErrorsNameTheProblem) {
  const int64_t T = 4, E = 8;
  Tensor logits = randn({T, E}, DType::f32, 1);
  ops::TopkSpec s;
  s.k = 2;
  Tensor probs = Tensor::empty({T, E}, DType::f32), map = Tensor::empty({T, E}, DType::u8);
  Tensor idx = Tensor::empty({T, 2}, DType::i32);
  // Router dtype must be f32/f64.
  Tensor lb = ops::cast(logits, DType::bf16);
  expect_error([&] { ops::router_topk(s, lb, nullptr, probs, map, idx); }, "f32 or f64");
  // Expert bias with softmax.
  Tensor bias = Tensor::zeros({E}, DType::f32);
  expect_error([&] { ops::router_topk(s, logits, &bias, probs, map, idx); }, "expert bias");
  // Bad k, groups and shapes.
  ops::TopkSpec bad = s;
  bad.k = 9;
  expect_error([&] { ops::router_topk(bad, logits, nullptr, probs, map, idx); }, "topk");
  bad = s;
  bad.num_groups = 3;
  bad.group_topk = 1;
  expect_error([&] { ops::router_topk(bad, logits, nullptr, probs, map, idx); }, "groups");
  Tensor idx3 = Tensor::empty({T, 3}, DType::i32);
  expect_error([&] { ops::router_topk(s, logits, nullptr, probs, map, idx3); }, "topk_idx");
  Tensor probs64 = Tensor::empty({T, E}, DType::f64);
  expect_error([&] { ops::router_topk(s, logits, nullptr, probs64, map, idx); }, "probs");
  Tensor ps = Tensor::empty({3, E}, DType::f64), cnt = Tensor::empty({3, E}, DType::i64);
  expect_error([&] { ops::aux_stats(ScoreFunction::softmax, 2, 3, logits, ps, cnt); }, "sequences");
  expect_error([&] { ops::capacity(-1, DropPolicy::probs, false, probs, map); }, "capacity");
}
