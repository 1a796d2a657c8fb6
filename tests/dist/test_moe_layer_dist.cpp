// The MoE layer across ranks: every Parallel Folding layout must compute the function one process
// computes. Each rank recomputes the single-process reference itself (inputs are seeded), so the
// check needs no gathering of expectations.
//   - a grid of (TP, CP, EP, ETP) layouts × both dispatchers vs the single-process layer run on
//     each DP replica's tokens (aux and z losses on): outputs, input grads, and parameter grads
//     equal to the mean over the DP·CP replicas (Megatron's finalize_model_grads);
//   - capacity dropping (per rank, as Megatron drops locally) vs per-rank single-process runs;
//   - the expert bias update uses counts over TP×DP×CP;
//   - dispatchers moving tokens that carry their origin, checked by construction: zero-token
//     ranks, all tokens to one rank's experts, and the round trip being the identity; on one node
//     the all-to-all rows go through shared host segments (the _msg runs: MOE_COMM_SHM=0, messages);
//   - the all-to-all layer gives the same bits through the segments, by messages and after a failed
//     reserve (the fallback mid-run).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>

#include "common/test_util.h"
#include "device/ops.h"
#include "dist/dist_util.h"
#include "moe/dispatcher.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

struct Layout {
  int64_t tp, cp, ep, etp;
};

std::string layout_name(const Layout& L, const std::string& disp) {
  return "tp" + std::to_string(L.tp) + " cp" + std::to_string(L.cp) + " ep" + std::to_string(L.ep) + " etp" +
         std::to_string(L.etp) + " " + disp;
}

bool fits(const Layout& L, int64_t W) {
  return W % (L.tp * L.cp) == 0 && W % (L.etp * L.ep) == 0 && 8 % L.ep == 0;
}

// The grid of the distributed issue: (TP, EP, ETP) ∈ {(1,2,1),(1,4,1),(2,2,1),(2,1,2),(1,2,2),
// (2,4,1),(1,8,1),(4,2,1)}, plus CP = 2 and pure DP cases; each runs where the world allows.
const std::vector<Layout> kGrid = {
    {1, 1, 2, 1}, {1, 1, 4, 1}, {2, 1, 2, 1}, {2, 1, 1, 2}, {1, 1, 2, 2}, {2, 1, 4, 1}, {1, 1, 8, 1},
    {4, 1, 2, 1}, {1, 2, 1, 1}, {1, 2, 2, 1}, {2, 2, 2, 1}, {1, 1, 1, 1}, {2, 1, 2, 2}, {1, 2, 4, 1},
};

MoEConfig layer_config(const Layout& L, const std::string& dispatcher) {
  MoEConfig c;
  c.hidden_size = 8;
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 8;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.moe_z_loss_coeff = 0.001;
  c.moe_shared_expert_intermediate_size = 8;
  c.moe_shared_expert_gate = true;
  c.params_dtype = "fp64";
  c.init_method_std = 0.4;
  c.seed = 17;
  c.tensor_model_parallel_size = L.tp;
  c.context_parallel_size = L.cp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  c.moe_token_dispatcher_type = dispatcher;
  return c;
}

MoEConfig single(MoEConfig c) {
  c.tensor_model_parallel_size = c.context_parallel_size = c.expert_model_parallel_size = 1;
  c.expert_tensor_parallel_size = 1;
  return c;
}

struct Result {
  Tensor out, dx;                         // (S, B, H) full
  std::map<std::string, Tensor> grads;    // canonical
  std::vector<int64_t> counts;            // (E) over all tokens
  double aux = 0, z = 0;                  // this rank's replica
};

// Forward + backward of `layer` on (S, B) tokens held whole by one process.
Result run_single(const MoEConfig& cfg, const Tensor& x, const Tensor& g) {
  MoELayer layer(cfg, Device::cpu());
  Result r;
  ForwardContext ctx;
  r.out = layer.forward(x, ctx);
  r.aux = layer.last_routing().aux_loss;
  r.z = layer.last_routing().z_loss;
  r.counts = layer.last_routing().tokens_per_expert;
  r.dx = layer.backward(g);
  for (Parameter* p : layer.parameters())
    if (p->trainable) r.grads[p->name] = p->grad.clone();
  return r;
}

Tensor batch_part(const Tensor& full, int64_t b_begin, int64_t b_len) {
  TokenShard sh{0, full.size(0), b_begin, b_len};
  return take_tokens(full, sh);
}

TEST(MoELayerDist, LayoutGridMatchesSingleProcess) {
  Communicator& world = dist::world();
  const int64_t W = world.size();
  auto wptr = mpi_world();
  int checked = 0;
  for (const Layout& L : kGrid) {
    if (!fits(L, W)) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      SCOPED_TRACE(layout_name(L, disp));
      MoEConfig cfg = layer_config(L, disp);
      auto groups = ProcessGroups::build(wptr, parallel_sizes_from_config(cfg, W));
      const int64_t DP = groups->dp_size(), CP = L.cp;
      const int64_t S = 8, B = 2 * DP, H = cfg.hidden_size;
      Tensor x = test::randn({S, B, H}, DType::f64, 101);
      Tensor g = test::randn({S, B, H}, DType::f64, 102);

      // Distributed.
      TokenShard sh = token_shard(*groups, S, B);
      MoELayer layer(cfg, Device::cpu(), groups);
      ForwardContext ctx;
      Tensor out = layer.forward(take_tokens(x, sh), ctx);
      double aux = layer.last_routing().aux_loss, z = layer.last_routing().z_loss;
      Tensor dx = layer.backward(take_tokens(g, sh));
      finalize_grads(layer.parameters(), *groups);
      Tensor out_full = gather_tokens(out, sh, S, B, world);
      Tensor dx_full = gather_tokens(dx, sh, S, B, world);

      // Reference: one process per DP replica, gradients averaged over the DP·CP replicas.
      const int64_t b = B / DP;
      std::vector<Result> reps;
      for (int64_t d = 0; d < DP; ++d)
        reps.push_back(run_single(single(cfg), batch_part(x, d * b, b), batch_part(g, d * b, b)));
      for (int64_t d = 0; d < DP; ++d) {
        EXPECT_TRUE(test::all_close(batch_part(out_full, d * b, b), reps[d].out, 1e-12, 1e-10)) << "output, replica " << d;
        EXPECT_TRUE(test::all_close(batch_part(dx_full, d * b, b), reps[d].dx, 1e-12, 1e-10)) << "input grad, replica " << d;
      }
      const int64_t my_rep = groups->dp().rank();
      EXPECT_NEAR(aux, reps[my_rep].aux, 1e-12 * std::max(1.0, std::abs(aux)));
      EXPECT_NEAR(z, reps[my_rep].z, 1e-12 * std::max(1.0, std::abs(z)));
      for (Parameter* p : layer.parameters()) {
        if (!p->trainable) continue;
        std::vector<double> want(static_cast<size_t>(shape_numel(p->canonical_shape)), 0.0);
        for (const Result& r : reps) {
          std::vector<double> v = test::to_f64(r.grads.at(p->name));
          for (size_t i = 0; i < want.size(); ++i) want[i] += v[i] / static_cast<double>(DP * CP);
        }
        EXPECT_TRUE(test::all_close(test::to_f64(gather_parameter(*p, true, world)), want, 1e-12, 1e-9)) << p->name;
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << "no layout of the grid fits world size " << W;
  if (world.rank() == 0) std::printf("checked %d layout × dispatcher cases on %lld ranks\n", checked, (long long)W);
}

// The all-to-all layer at EP = world (with ETP 2 as well where it fits) gives the same bits through
// the shared segments, by messages (MOE_COMM_SHM=0 when the groups are made), and after
// a reserve that failed (the group falls back to messages mid-run): outputs, input grads, grads.
TEST(MoELayerDist, AllToAllSameBitsThroughSegmentsMessagesAndAFailedReserve) {
  const char* shm_env = std::getenv("MOE_COMM_SHM");
  if (shm_env && std::string(shm_env) == "0") GTEST_SKIP() << "MOE_COMM_SHM=0: no segments to compare with";
  Communicator& world = dist::world();
  const int64_t W = world.size();
  auto wptr = mpi_world();
  for (const Layout& L : {Layout{1, 1, W, 1}, Layout{1, 1, W / 2, 2}}) {
    if (L.ep < 2 || !fits(L, W)) continue;
    SCOPED_TRACE(layout_name(L, "alltoall"));
    MoEConfig cfg = layer_config(L, "alltoall");
    const int64_t S = 8, B = 2 * W, H = cfg.hidden_size;  // DP = W (TP = CP = 1)
    Tensor x = test::randn({S, B, H}, DType::f64, 111);
    Tensor g = test::randn({S, B, H}, DType::f64, 112);
    std::vector<std::vector<Tensor>> runs;  // per mode: out, dx, then every trainable grad
    for (const std::string mode : {"segments", "messages", "failed reserve"}) {
      if (mode == "messages") {
        ASSERT_EQ(setenv("MOE_COMM_SHM", "0", 1), 0);
      }
      auto groups = ProcessGroups::build(wptr, parallel_sizes_from_config(cfg, W));
      SharedHostSegments* shm = groups->ep().shared_host();
      ASSERT_EQ(unsetenv("MOE_COMM_SHM"), 0);
      if (mode == "messages") {
        EXPECT_EQ(shm, nullptr);
      } else {
        ASSERT_NE(shm, nullptr);
      }
      if (mode == "failed reserve") {
        EXPECT_FALSE(shm->reserve(size_t{1} << 50));
      }
      TokenShard sh = token_shard(*groups, S, B);
      MoELayer layer(cfg, Device::cpu(), groups);
      ForwardContext ctx;
      std::vector<Tensor> r;
      r.push_back(layer.forward(take_tokens(x, sh), ctx));
      r.push_back(layer.backward(take_tokens(g, sh)));
      for (Parameter* p : layer.parameters())
        if (p->trainable) r.push_back(p->grad.clone());
      if (mode == "segments") {
        EXPECT_GT(shm->bytes(), 0u);
      }
      runs.push_back(std::move(r));
    }
    for (size_t m = 1; m < runs.size(); ++m) {
      ASSERT_EQ(runs[m].size(), runs[0].size());
      for (size_t i = 0; i < runs[0].size(); ++i)
        EXPECT_TRUE(test::bit_equal(runs[m][i], runs[0][i])) << "mode " << m << ", tensor " << i;
    }
  }
}

// Capacity drops happen per rank on the rank's own tokens (as in Megatron); the layer across ranks
// must equal one process run on each rank's token block. Expert bias counts come from all ranks.
TEST(MoELayerDist, CapacityDroppingAndExpertBiasAcrossRanks) {
  Communicator& world = dist::world();
  const int64_t W = world.size();
  auto wptr = mpi_world();
  for (const Layout& L : kGrid) {
    if (!fits(L, W) || L.tp * L.cp * L.ep * L.etp == 1) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      SCOPED_TRACE(layout_name(L, disp));
      MoEConfig cfg = layer_config(L, disp);
      cfg.moe_aux_loss_coeff = {0.0};  // aux and z normalise over TP×CP, a per-block run would not
      cfg.moe_z_loss_coeff.reset();
      cfg.moe_router_score_function = "sigmoid";
      cfg.moe_router_enable_expert_bias = true;
      cfg.moe_router_bias_update_rate = 0.25;
      cfg.moe_expert_capacity_factor = 0.5;
      auto groups = ProcessGroups::build(wptr, parallel_sizes_from_config(cfg, W));
      const int64_t DP = groups->dp_size(), CP = L.cp;
      const int64_t S = 8, B = 2 * DP, H = cfg.hidden_size, E = cfg.num_moe_experts;
      Tensor x = test::randn({S, B, H}, DType::f64, 201);
      Tensor g = test::randn({S, B, H}, DType::f64, 202);
      TokenShard sh = token_shard(*groups, S, B);
      MoELayer layer(cfg, Device::cpu(), groups);
      Tensor out = layer.forward(take_tokens(x, sh), ForwardContext{});
      Tensor dx = layer.backward(take_tokens(g, sh));
      finalize_grads(layer.parameters(), *groups);
      layer.finish_step();
      Tensor out_full = gather_tokens(out, sh, S, B, world);
      Tensor dx_full = gather_tokens(dx, sh, S, B, world);

      // Reference: each world rank's block, one process each.
      const RankLayout& lay = groups->layout();
      std::vector<double> want_counts(static_cast<size_t>(E), 0.0);
      std::map<std::string, std::vector<double>> want_grads;
      for (int r = 0; r < W; ++r) {
        TokenShard rs;
        rs.s_len = S / (L.tp * L.cp);
        rs.s_begin = (lay.rank_in_group(GroupKind::cp, r) * L.tp + lay.rank_in_group(GroupKind::tp, r)) * rs.s_len;
        rs.b_len = B / DP;
        rs.b_begin = lay.rank_in_group(GroupKind::dp, r) * rs.b_len;
        Result ref = run_single(single(cfg), take_tokens(x, rs), take_tokens(g, rs));
        EXPECT_TRUE(test::all_close(take_tokens(out_full, rs), ref.out, 1e-12, 1e-10)) << "output of rank " << r;
        EXPECT_TRUE(test::all_close(take_tokens(dx_full, rs), ref.dx, 1e-12, 1e-10)) << "input grad of rank " << r;
        for (int64_t e = 0; e < E; ++e) want_counts[static_cast<size_t>(e)] += static_cast<double>(ref.counts[e]);
        for (auto& [name, t] : ref.grads) {
          std::vector<double> v = test::to_f64(t);
          auto& w = want_grads[name];
          w.resize(v.size(), 0.0);
          for (size_t i = 0; i < v.size(); ++i) w[i] += v[i] / static_cast<double>(DP * CP);
        }
      }
      for (Parameter* p : layer.parameters()) {
        if (!p->trainable) continue;
        EXPECT_TRUE(test::all_close(test::to_f64(gather_parameter(*p, true, world)), want_grads[p->name], 1e-12, 1e-9))
            << p->name;
      }
      double mean = std::accumulate(want_counts.begin(), want_counts.end(), 0.0) / static_cast<double>(E);
      std::vector<float> bias = layer.router().expert_bias().value.to_vector<float>();
      for (int64_t e = 0; e < E; ++e) {
        double c = want_counts[static_cast<size_t>(e)];
        float want = mean > c ? 0.25f : (mean < c ? -0.25f : 0.0f);
        EXPECT_EQ(bias[e], want) << "expert " << e;
      }
    }
  }
}

// ---- dispatchers by construction ---------------------------------------------------------------

// Token t of world rank r carries (r, t) in its first two features; routing and probs are a
// hash of (r, t, e) every rank can recompute. mode: 0 random top-2, 1 all tokens to expert 0 and
// 1, and rank 1 holds no token at all when `empty_rank1`.
struct Origin {
  int64_t T;
  Tensor x, probs, map;  // (T, H) f64, (T, E) f64, (T, E) u8
};

Origin make_tokens(int r, int64_t E, int mode, bool empty_rank1) {
  const int64_t H = 4;
  const int64_t T = (empty_rank1 && r == 1) ? 0 : 5 + r;
  std::vector<double> x(static_cast<size_t>(T * H)), p(static_cast<size_t>(T * E), 0.0);
  std::vector<uint8_t> m(static_cast<size_t>(T * E), 0);
  for (int64_t t = 0; t < T; ++t) {
    x[t * H + 0] = r;
    x[t * H + 1] = static_cast<double>(t);
    x[t * H + 2] = dist::value_of(r, 7, t);
    x[t * H + 3] = 1.0;
    int64_t e0 = 0, e1 = 1;
    if (mode == 0) {
      e0 = static_cast<int64_t>(dist::mix(r * 131 + t) % static_cast<uint64_t>(E));
      e1 = (e0 + 1 + static_cast<int64_t>(dist::mix(r * 977 + t) % static_cast<uint64_t>(E - 1))) % E;
    }
    m[t * E + e0] = m[t * E + e1] = 1;
    double a = 0.25 + 0.5 * (static_cast<double>(dist::mix(r * 31 + t) % 1000) / 1000.0);
    p[t * E + e0] = a;
    p[t * E + e1] = 1.0 - a;
  }
  return {T, Tensor::from_vector(x, {T, H}), Tensor::from_vector(p, {T, E}), Tensor::from_vector(m, {T, E})};
}

TEST(Dispatchers, TokensCarryTheirOriginAndRoundTrip) {
  Communicator& world = dist::world();
  const int64_t W = world.size();
  auto wptr = mpi_world();
  const int64_t E = 8;
  for (const Layout& L : kGrid) {
    if (!fits(L, W) || L.ep * L.etp == 1) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      for (int mode = 0; mode < 2; ++mode) {
        for (bool empty : {false, true}) {
          SCOPED_TRACE(layout_name(L, disp) + " mode " + std::to_string(mode) + (empty ? " rank1-empty" : ""));
          MoEConfig cfg = layer_config(L, disp);
          auto groups = ProcessGroups::build(wptr, parallel_sizes_from_config(cfg, W));
          const int64_t P = L.ep, Q = L.etp, G = E / P;
          const int p = groups->ep().rank();
          std::unique_ptr<TokenDispatcher> d;
          std::vector<int> members = groups->etp_ep().world_ranks();
          if (disp == "allgather") {
            d = std::make_unique<AllGatherDispatcher>(groups->group_ptr(GroupKind::etp_ep), p * G, G);
          } else {
            std::vector<int> ep_of, etp_of;
            for (int w : members) {
              ep_of.push_back(groups->layout().rank_in_group(GroupKind::ep, w));
              etp_of.push_back(groups->layout().rank_in_group(GroupKind::etp, w));
            }
            d = std::make_unique<AllToAllDispatcher>(groups->group_ptr(GroupKind::ep), groups->group_ptr(GroupKind::etp),
                                                     groups->group_ptr(GroupKind::etp_ep), ep_of, etp_of, E);
          }
          Origin mine = make_tokens(world.rank(), E, mode, empty);
          DispatchOutput out = d->dispatch(mine.x, mine.probs, mine.map);

          // Expected rows, by construction: for each local expert, every routed (source, t) in the
          // dispatcher's source order, token index ascending.
          std::vector<int> sources;  // world ranks in the order their rows arrive
          if (disp == "allgather") {
            sources = members;
          } else {
            for (int64_t qq = 0; qq < Q; ++qq) {
              for (int64_t pp = 0; pp < P; ++pp) {
                for (int w : members) {
                  if (groups->layout().rank_in_group(GroupKind::ep, w) == pp &&
                      groups->layout().rank_in_group(GroupKind::etp, w) == qq)
                    sources.push_back(w);
                }
              }
            }
          }
          std::vector<double> rows = test::to_f64(out.tokens), rp = test::to_f64(out.probs);
          int64_t row = 0;
          bool ok = true;
          for (int64_t gl = 0; gl < G && ok; ++gl) {
            const int64_t e = p * G + gl;
            int64_t n_e = 0;
            for (int src : sources) {
              Origin o = make_tokens(src, E, mode, empty);
              std::vector<uint8_t> m = o.map.to_vector<uint8_t>();
              std::vector<double> pr = o.probs.to_vector<double>();
              for (int64_t t = 0; t < o.T; ++t) {
                if (!m[t * E + e]) continue;
                ++n_e;
                if (row >= out.tokens.size(0) || rows[row * 4] != src || rows[row * 4 + 1] != t ||
                    rp[row] != pr[t * E + e]) {
                  ADD_FAILURE() << "row " << row << " of local expert " << gl << ": expected token " << t
                                << " of rank " << src;
                  ok = false;
                  break;
                }
                ++row;
              }
              if (!ok) break;
            }
            if (ok) {
              EXPECT_EQ(out.rows_per_expert[gl], n_e) << "local expert " << gl;
            }
          }
          EXPECT_EQ(row, out.tokens.size(0)) << "extra rows after the expected ones";

          // Round trip: rows · prob / ETP combined back sum to x (probs of a token sum to 1; the
          // combine sums the ETP replicas).
          Tensor y = Tensor::empty(out.tokens.shape(), DType::f64);
          ops::scale_rows(out.tokens, out.probs, y);
          ops::axpby(0.0, y, 1.0 / static_cast<double>(Q), y);
          Tensor back = d->combine(y);
          EXPECT_TRUE(test::all_close(back, mine.x, 1e-14, 1e-14)) << "round trip";

          // Backward: combine_backward gathers dout rows; dispatch_backward sums them back
          // (2 experts per token) and returns each row's prob gradient to its (t, e).
          Tensor dy = d->combine_backward(mine.x);
          EXPECT_TRUE(test::bit_equal(dy, out.tokens)) << "combine_backward rows";
          Tensor drows = Tensor::empty(dy.shape(), DType::f64);
          ops::axpby(1.0 / static_cast<double>(Q), dy, 0.0, drows);
          Tensor dprow = Tensor::empty({dy.size(0)}, DType::f64);
          ops::axpby(1.0 / static_cast<double>(Q), out.probs, 0.0, dprow);
          Tensor dx = Tensor::empty(mine.x.shape(), DType::f64), dprobs = Tensor::empty(mine.probs.shape(), DType::f64);
          d->dispatch_backward(drows, dprow, dx, dprobs);
          Tensor twice = Tensor::empty(mine.x.shape(), DType::f64);
          ops::axpby(2.0, mine.x, 0.0, twice);
          EXPECT_TRUE(test::all_close(dx, twice, 1e-14, 1e-14)) << "dispatch_backward dx";
          EXPECT_TRUE(test::all_close(dprobs, mine.probs, 1e-14, 1e-14)) << "dispatch_backward dprobs";
          EXPECT_GT(d->traffic().calls, 0);
          // With EP > 1 on one node the all-to-all rows went through the EP group's shared segments
          // (unless MOE_COMM_SHM=0, the dist_moe_layer_msg runs).
          if (disp == "alltoall" && P > 1) {
            const char* shm_env = std::getenv("MOE_COMM_SHM");
            SharedHostSegments* shm = groups->ep().shared_host();
            if (shm_env && std::string(shm_env) == "0") {
              EXPECT_EQ(shm, nullptr);
            } else {
              ASSERT_NE(shm, nullptr);
              EXPECT_GT(shm->bytes(), 0u) << "the dispatcher never reserved the shared segments";
            }
          }
        }
      }
    }
  }
}

}  // namespace
