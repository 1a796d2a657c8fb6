// The MoE GPT model across ranks: every layout of the grid must compute what one process computes.
// Each rank recomputes the single-process reference itself (parameters are drawn from the seed by
// canonical name and index, so both models hold the same values) and checks its own part:
//   - the step's loss (mean over replicas and micro-batches of the lm loss);
//   - its logits (S/CP rows at its CP positions, its vocabulary slice) for each micro-batch;
//   - its shard of every parameter gradient after finalize_grads (the gradient of
//     J = 1/(DP·M) Σ [lm + router losses]), against the one-process run with DP·M micro-batches;
//   - tokens per expert of each MoE layer, summed over the batch and the world.
// Layouts: TP=2 (GQA, whole query groups), CP=2 (load-balanced chunks), TP=2×CP=2, EP folded over
// TP×DP, ETP=2, DP=2 with M=2, … for both dispatchers; and one where every token goes to the experts
// of one EP rank (expert bias), leaving the others without tokens.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "common/tiny_gpt.h"
#include "dist/dist_util.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

struct Layout {
  int64_t np, tp, cp, ep, etp, M;
};

std::string name_of(const Layout& L, const std::string& disp) {
  return "np" + std::to_string(L.np) + " tp" + std::to_string(L.tp) + " cp" + std::to_string(L.cp) + " ep" +
         std::to_string(L.ep) + " etp" + std::to_string(L.etp) + " M" + std::to_string(L.M) + " " + disp;
}

const std::vector<Layout> kGrid = {
    {2, 2, 1, 1, 1, 1}, {2, 2, 1, 1, 2, 1}, {2, 1, 2, 1, 1, 1}, {2, 1, 1, 1, 1, 2}, {2, 1, 1, 2, 1, 1},
    {2, 1, 1, 1, 2, 1}, {4, 2, 2, 1, 1, 1}, {4, 2, 1, 4, 1, 1}, {4, 1, 1, 2, 2, 2}, {4, 1, 2, 2, 1, 2},
    {4, 2, 1, 2, 2, 1}, {4, 1, 1, 4, 1, 1}, {8, 2, 2, 4, 1, 2}, {8, 2, 1, 8, 1, 1}, {8, 2, 2, 2, 2, 1},
};

MoEConfig model_config(const Layout& L, const std::string& disp) {
  MoEConfig c = test::tiny_moe_gpt();
  c.num_moe_experts = 8;
  c.params_dtype = "fp64";
  c.seed = 23;
  c.tensor_model_parallel_size = L.tp;
  c.context_parallel_size = L.cp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  c.moe_token_dispatcher_type = disp;
  c.num_microbatches = L.M;
  return c;
}

MoEConfig single(MoEConfig c) {
  c.tensor_model_parallel_size = c.context_parallel_size = c.expert_model_parallel_size = 1;
  c.expert_tensor_parallel_size = 1;
  return c;
}

// Micro-batch g of the global batch (one sequence each), the same on every rank.
MicroBatch micro_batch(const MoEConfig& c, int64_t g) {
  const int64_t S = c.seq_length;
  std::vector<int64_t> tok(static_cast<size_t>(S)), lab(tok.size());
  std::vector<float> mask(tok.size(), 1.0f);
  for (int64_t s = 0; s < S; ++s) {
    tok[s] = static_cast<int64_t>(dist::mix(static_cast<uint64_t>(g * 131 + s)) % static_cast<uint64_t>(c.vocab_size));
    lab[s] = static_cast<int64_t>(dist::mix(static_cast<uint64_t>(g * 977 + s + 5)) % static_cast<uint64_t>(c.vocab_size));
    if ((g + s) % 4 == 3) mask[s] = 0.0f;  // holes
  }
  return MicroBatch{Tensor::from_vector(tok, {1, S}), Tensor::from_vector(lab, {1, S}), Tensor::from_vector(mask, {1, S})};
}

struct Reference {
  double loss = 0;
  std::vector<std::vector<double>> logits;  // per micro-batch (S, 1, V)
  std::map<std::string, std::vector<double>> grads;
  std::map<int64_t, std::vector<int64_t>> counts;  // MoE layer → (E)
};

// One process, DP·M micro-batches of the global batch, loss scale 1/(DP·M).
Reference run_reference(const MoEConfig& cfg, int64_t n_micro, const std::vector<float>* bias) {
  MoEGPTModel model(single(cfg), Device::cpu());
  if (bias) model.find_parameter("decoder.layers.0.mlp.router.expert_bias")->value.copy_from(Tensor::from_vector(*bias, {8}));
  Reference r;
  for (int64_t g = 0; g < n_micro; ++g) {
    ForwardContext ctx;
    ctx.microbatch = g;
    ctx.loss_scale = 1.0 / static_cast<double>(n_micro);
    r.loss += model.forward(micro_batch(cfg, g), ctx, true) / static_cast<double>(n_micro);
    r.logits.push_back(test::to_f64(model.last_logits()));
    for (int64_t i = 0; i < model.num_layers(); ++i)
      if (MoELayer* l = model.moe_layer(i)) {
        auto& acc = r.counts[i];
        const auto& c = l->last_routing().tokens_per_expert;
        if (acc.empty()) acc.assign(c.size(), 0);
        for (size_t e = 0; e < c.size(); ++e) acc[e] += c[e];
      }
    model.backward();
  }
  for (Parameter* p : model.parameters())
    if (p->trainable) r.grads[p->name] = test::to_f64(p->grad);
  return r;
}

void check_layout(const Layout& L, const std::string& disp, const std::vector<float>* bias) {
  Communicator& world = dist::world();
  MoEConfig cfg = model_config(L, disp);
  if (bias) {
    cfg.moe_router_score_function = "sigmoid";
    cfg.moe_router_enable_expert_bias = true;
  }
  auto groups = ProcessGroups::build(mpi_world(), parallel_sizes_from_config(cfg, world.size()));
  const int64_t DP = groups->dp_size(), M = L.M, V = cfg.vocab_size;
  const Reference ref = run_reference(cfg, DP * M, bias);

  MoEGPTModel model(cfg, Device::cpu(), groups);
  if (bias) model.find_parameter("decoder.layers.0.mlp.router.expert_bias")->value.copy_from(Tensor::from_vector(*bias, {8}));
  const SequenceLayout& lay = model.layout();
  const int64_t V_l = V / lay.tp;
  double loss = 0.0;
  std::map<int64_t, std::vector<int64_t>> counts;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = groups->dp().rank() * M + m;  // the global micro-batch this replica runs
    ForwardContext ctx;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / static_cast<double>(M);
    loss += model.forward(micro_batch(cfg, g), ctx, true) / static_cast<double>(M);
    // logits: (S/CP, 1, V/TP) at this rank's positions and vocabulary slice
    const std::vector<double> mine = test::to_f64(model.last_logits()), &full = ref.logits[static_cast<size_t>(g)];
    std::vector<double> want;
    for (int64_t s = 0; s < lay.s_cp(); ++s)
      for (int64_t v = 0; v < V_l; ++v) want.push_back(full[static_cast<size_t>(lay.cp_positions[s] * V + lay.tp_rank * V_l + v)]);
    EXPECT_TRUE(test::all_close(mine, want, 1e-12, 1e-10)) << "logits of micro-batch " << g;
    for (int64_t i = 0; i < model.num_layers(); ++i)
      if (MoELayer* l = model.moe_layer(i)) {
        auto& acc = counts[i];
        const auto& c = l->last_routing().tokens_per_expert;
        if (acc.empty()) acc.assign(c.size(), 0);
        for (size_t e = 0; e < c.size(); ++e) acc[e] += c[e];
      }
    model.backward();
  }
  finalize_grads(model.parameters(), *groups);

  Tensor l = Tensor::from_vector(std::vector<double>{loss}, {1});
  groups->dp().all_reduce(l);
  EXPECT_NEAR(l.to_vector<double>()[0] / static_cast<double>(DP), ref.loss, 1e-12 * std::max(1.0, ref.loss)) << "loss";
  for (auto& [layer, c] : counts) {
    Tensor t = Tensor::from_vector(c, {static_cast<int64_t>(c.size())});
    world.all_reduce(t);
    EXPECT_EQ(t.to_vector<int64_t>(), ref.counts.at(layer)) << "tokens per expert, layer " << layer;
  }
  int64_t checked = 0;
  for (Parameter* p : model.parameters()) {
    if (!p->trainable) continue;
    const std::vector<double>& full = ref.grads.at(p->name);
    std::vector<double> want;
    for (int64_t i : shard_canonical_indices(p->canonical_shape, p->shard)) want.push_back(full[static_cast<size_t>(i)]);
    EXPECT_TRUE(test::all_close(test::to_f64(p->grad), want, 1e-12, 1e-9)) << p->name;
    ++checked;
  }
  EXPECT_EQ(static_cast<size_t>(checked), ref.grads.size()) << "every parameter has a shard on every rank";
}

TEST(GptModelDist, LayoutGridMatchesSingleProcess) {
  const int64_t W = dist::world().size();
  int cases = 0;
  for (const Layout& L : kGrid) {
    if (L.np != W) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      SCOPED_TRACE(name_of(L, disp));
      check_layout(L, disp, nullptr);
      ++cases;
    }
  }
  EXPECT_GT(cases, 0) << "no layout of the grid for world size " << W;
  if (dist::world().rank() == 0) std::printf("checked %d layout × dispatcher cases on %lld ranks\n", cases, (long long)W);
}

// Every token to experts 5 and 6 (a sigmoid router with a large expert bias): with EP the other
// expert ranks receive nothing, which is a normal case.
TEST(GptModelDist, EveryTokenToOneExpertRank) {
  const int64_t W = dist::world().size();
  const std::vector<float> bias = {0, 0, 0, 0, 0, 50, 50, 0};
  for (const Layout& L : kGrid) {
    if (L.np != W || L.ep == 1) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      SCOPED_TRACE(name_of(L, disp) + " (all tokens to experts 5, 6)");
      check_layout(L, disp, &bias);
    }
  }
}

}  // namespace
