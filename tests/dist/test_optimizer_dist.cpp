// The optimizer across ranks, with tiny MoE GPT models:
//   - the distributed optimizer gives bit for bit the parameters (and gradient norms) of the
//     replicated one after several AdamW steps, with DP = 2 and EDP = 2 (EP folded over TP or CP),
//     with a DP×CP group of 4, in f32 and bf16;
//   - the global gradient norm equals the one-process norm of the same model on the same data
//     (DP·M micro-batches in one process) in layouts with TP, CP, EP, ETP and DP, and one SGD step
//     then gives the one-process parameters; with synthetic gradients whose reduced values are
//     known exactly, the norm counts every element once to the last bit;
//   - the optimizer state per rank (masters and moments) shrinks by DP×CP for dense and by EDP for
//     expert parameters, as the allocator counts it.
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
#include "moecore/optim.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

struct Layout {
  int64_t np, tp, cp, ep, etp, M;
  const char* dtype;
  const char* disp;
};

std::string name_of(const Layout& L) {
  return "np" + std::to_string(L.np) + " tp" + std::to_string(L.tp) + " cp" + std::to_string(L.cp) + " ep" +
         std::to_string(L.ep) + " etp" + std::to_string(L.etp) + " M" + std::to_string(L.M) + " " + L.dtype + " " +
         L.disp;
}

MoEConfig model_config(const Layout& L) {
  MoEConfig c = test::tiny_moe_gpt();
  c.normalization = "LayerNorm";
  c.position_embedding_type = "learned_absolute";
  c.params_dtype = L.dtype;
  c.seed = 29;
  c.tensor_model_parallel_size = L.tp;
  c.context_parallel_size = L.cp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  c.moe_token_dispatcher_type = L.disp;
  c.num_microbatches = L.M;
  return c;
}

MoEConfig single(MoEConfig c) {
  c.tensor_model_parallel_size = c.context_parallel_size = c.expert_model_parallel_size = 1;
  c.expert_tensor_parallel_size = 1;
  return c;
}

// Global micro-batch g (one sequence), the same on every rank; step st draws other sequences.
MicroBatch micro_batch(const MoEConfig& c, int64_t st, int64_t g) {
  const int64_t S = c.seq_length;
  std::vector<int64_t> tok(static_cast<size_t>(S)), lab(tok.size());
  std::vector<float> mask(tok.size(), 1.0f);
  const uint64_t key = static_cast<uint64_t>(st * 7919 + g * 131);
  for (int64_t s = 0; s < S; ++s) {
    tok[s] = static_cast<int64_t>(dist::mix(key + static_cast<uint64_t>(s)) % static_cast<uint64_t>(c.vocab_size));
    lab[s] = static_cast<int64_t>(dist::mix(key * 3 + static_cast<uint64_t>(s) + 5) % static_cast<uint64_t>(c.vocab_size));
    if ((g + s) % 4 == 3) mask[s] = 0.0f;  // holes
  }
  return MicroBatch{Tensor::from_vector(tok, {1, S}), Tensor::from_vector(lab, {1, S}), Tensor::from_vector(mask, {1, S})};
}

// One optimizer step of `model`: this replica's M micro-batches (global micro-batch dp_rank·M + m
// of the step), accumulated into the main grads, then step(lr).
OptimizerStepResult train_step(MoEGPTModel& model, Optimizer& opt, int64_t st, int64_t dp_rank, int64_t M, double lr) {
  opt.zero_grad();
  for (int64_t m = 0; m < M; ++m) {
    ForwardContext ctx;
    ctx.step = st;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / static_cast<double>(M);
    model.forward(micro_batch(model.config(), st, dp_rank * M + m), ctx);
    model.backward();
    opt.accumulate_grads();
  }
  model.finish_step();
  return opt.step(lr);
}

OptimizerConfig adam_config(bool distributed) {
  OptimizerConfig c;
  c.optimizer = "adam";
  c.weight_decay = 0.1;
  c.clip_grad = 0.5;  // below the norms here: the clipping path runs
  c.use_distributed_optimizer = distributed;
  return c;
}

std::shared_ptr<ProcessGroups> groups_for(const MoEConfig& cfg) {
  return ProcessGroups::build(mpi_world(), parallel_sizes_from_config(cfg, dist::world().size()));
}

// ---- distributed == replicated, bit for bit -----------------------------------------------------

const std::vector<Layout> kBitLayouts = {
    {2, 1, 1, 1, 1, 2, "fp32", "alltoall"},  // DP = 2, EDP = 2
    {2, 1, 1, 1, 1, 1, "bf16", "alltoall"},
    {2, 1, 1, 2, 1, 1, "bf16", "allgather"},  // DP = 2, EDP = 1
    {4, 2, 1, 2, 1, 1, "bf16", "alltoall"},   // TP = 2, DP = 2; EP = 2 folded over TP, EDP = 2
    {4, 2, 1, 2, 1, 2, "fp32", "alltoall"},   // the same in f32 with M = 2
    {4, 1, 2, 2, 1, 1, "bf16", "alltoall"},   // DP×CP = 4 (CP = 2, DP = 2); EP = 2 over CP, EDP = 2
    {4, 1, 1, 2, 1, 1, "bf16", "allgather"},  // DP = 4, EDP = 2
};

TEST(OptimizerDist, DistributedOptimizerEqualsReplicatedBitForBit) {
  const int64_t W = dist::world().size();
  int cases = 0;
  for (const Layout& L : kBitLayouts) {
    if (L.np != W) continue;
    SCOPED_TRACE(name_of(L));
    const MoEConfig cfg = model_config(L);
    auto groups = groups_for(cfg);
    MoEGPTModel rep(cfg, Device::cpu(), groups), dis(cfg, Device::cpu(), groups);
    Optimizer orep(rep.parameters(), adam_config(false), groups), odis(dis.parameters(), adam_config(true), groups);
    std::vector<Tensor> initial;
    for (Parameter* p : rep.parameters()) initial.push_back(p->value.clone());
    for (int64_t st = 0; st < 3; ++st) {
      const OptimizerStepResult a = train_step(rep, orep, st, groups->dp().rank(), L.M, 1e-2);
      const OptimizerStepResult b = train_step(dis, odis, st, groups->dp().rank(), L.M, 1e-2);
      EXPECT_FALSE(a.skipped);
      EXPECT_GT(a.grad_norm, 0.5) << "clipping is exercised";
      EXPECT_EQ(a.grad_norm, b.grad_norm) << "step " << st;
    }
    const std::vector<Parameter*> pa = rep.parameters(), pb = dis.parameters();
    ASSERT_EQ(pa.size(), pb.size());
    int64_t moved = 0;
    for (size_t i = 0; i < pa.size(); ++i) {
      ASSERT_EQ(pa[i]->name, pb[i]->name);
      EXPECT_TRUE(test::bit_equal(pa[i]->value, pb[i]->value)) << pa[i]->name;
      if (pa[i]->trainable) moved += !test::bit_equal(pa[i]->value, initial[i]);
    }
    EXPECT_GT(moved, 0);
    // Every DP×CP replica holds the same dense parameters, every EDP replica the same experts:
    // the all-gather wrote them all.
    for (Parameter* p : pb) {
      if (!p->trainable) continue;
      Tensor mine = test::from_f64(test::to_f64(p->value), {p->value.numel()});
      Communicator& rg = p->grad_group == GradGroup::expert ? groups->edp() : groups->dp_cp();
      Tensor all = Tensor::empty({rg.size() * mine.numel()}, DType::f64);
      rg.all_gather(mine, all);
      for (int r = 0; r < rg.size(); ++r)
        EXPECT_TRUE(test::bit_equal(all.narrow(r * mine.numel(), mine.numel()), mine))
            << p->name << " replica " << r;
    }
    ++cases;
  }
  EXPECT_GT(cases, 0) << "no layout for world size " << W;
}

// ---- the global gradient norm against one process -----------------------------------------------

const std::vector<Layout> kNormLayouts = {
    {2, 2, 1, 1, 1, 1, "fp32", "alltoall"},  // TP = 2 (router and norms replicated over TP)
    {2, 1, 2, 1, 1, 1, "fp32", "alltoall"},  // CP = 2
    {2, 1, 1, 2, 1, 1, "fp32", "alltoall"},  // EP = 2, DP = 2
    {2, 1, 1, 1, 2, 2, "fp32", "allgather"},  // ETP = 2 (experts split, EDP = 1), DP = 2
    {4, 2, 2, 1, 1, 1, "fp32", "alltoall"},  // TP = 2 × CP = 2
    {4, 2, 1, 2, 2, 1, "fp32", "alltoall"},  // TP = 2, EP = 2, ETP = 2, DP = 2
    {4, 2, 1, 2, 1, 2, "fp32", "allgather"},  // TP = 2, EP = 2 over TP, EDP = 2
    {4, 1, 2, 2, 1, 1, "fp32", "alltoall"},  // CP = 2, EP = 2
};

struct Reference {
  double norm = 0;
  std::map<std::string, std::vector<double>> values;  // after one step
};

Reference one_process(const MoEConfig& cfg, int64_t n_micro, const OptimizerConfig& oc, double lr) {
  MoEGPTModel model(single(cfg), Device::cpu());
  Optimizer opt(model.parameters(), oc);
  Reference r;
  r.norm = train_step(model, opt, 0, 0, n_micro, lr).grad_norm;
  for (Parameter* p : model.parameters()) r.values[p->name] = test::to_f64(p->value);
  return r;
}

TEST(OptimizerDist, GlobalGradNormEqualsOneProcess) {
  const int64_t W = dist::world().size();
  int cases = 0;
  for (const Layout& L : kNormLayouts) {
    if (L.np != W) continue;
    for (bool distributed : {false, true}) {
      SCOPED_TRACE(name_of(L) + (distributed ? " distributed" : " replicated"));
      const MoEConfig cfg = model_config(L);
      auto groups = groups_for(cfg);
      OptimizerConfig oc;
      oc.optimizer = "sgd";
      oc.sgd_momentum = 0.9;
      oc.weight_decay = 0.1;
      oc.clip_grad = 0.5;
      oc.use_distributed_optimizer = distributed;
      const double lr = 0.05;
      const Reference ref = one_process(cfg, groups->dp_size() * L.M, oc, lr);
      MoEGPTModel model(cfg, Device::cpu(), groups);
      Optimizer opt(model.parameters(), oc, groups);
      const OptimizerStepResult r = train_step(model, opt, 0, groups->dp().rank(), L.M, lr);
      // f32 gradients of the model summed in other orders (measured up to 4.5e-6 relative).
      // Counting the TP replicas twice moves the norm by 11%; NormCountsEachElementOnce checks the
      // counting exactly.
      EXPECT_NEAR(r.grad_norm, ref.norm, 3e-5 * ref.norm);
      Tensor n = Tensor::from_vector(std::vector<double>{r.grad_norm}, {1});
      Tensor all = Tensor::empty({dist::world().size()}, DType::f64);
      dist::world().all_gather(n, all);
      for (double v : all.to_vector<double>()) EXPECT_EQ(v, r.grad_norm) << "every rank reports the same norm";
      // The clipped SGD step gives the one-process parameters (this rank's shard of each).
      for (Parameter* p : model.parameters()) {
        const std::vector<double>& full = ref.values.at(p->name);
        std::vector<double> want;
        for (int64_t i : shard_canonical_indices(p->canonical_shape, p->shard)) want.push_back(full[static_cast<size_t>(i)]);
        EXPECT_TRUE(test::all_close(test::to_f64(p->value), want, 2e-6, 1e-5)) << p->name;
      }
      ++cases;
    }
  }
  EXPECT_GT(cases, 0) << "no layout for world size " << W;
}

// Exact: every rank sets its gradient shards so that the reduced gradient of canonical element i
// of parameter P is v(P, i), a multiple of 1/64 (f32 holds every partial sum exactly): router and
// sequence-parallel grads v/TP on each TP rank (summed over TP), expert grads v·DP·CP/EDP (summed
// over EDP, then scaled by 1/(DP·CP)), dense grads v. The norm must then be sqrt(Σ v²) over the
// canonical parameters to the last bit: any element counted twice or missed shows.
uint64_t fnv(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

TEST(OptimizerDist, NormCountsEachElementOnce) {
  const int64_t W = dist::world().size();
  int cases = 0;
  std::vector<Layout> layouts = kNormLayouts;
  layouts.insert(layouts.end(), kBitLayouts.begin(), kBitLayouts.end());
  for (Layout L : layouts) {
    if (L.np != W) continue;
    L.dtype = "fp32";
    for (bool distributed : {false, true}) {
      SCOPED_TRACE(name_of(L) + (distributed ? " distributed" : " replicated"));
      const MoEConfig cfg = model_config(L);
      auto groups = groups_for(cfg);
      MoEGPTModel model(cfg, Device::cpu(), groups);
      OptimizerConfig oc;
      oc.optimizer = "sgd";
      oc.clip_grad = 0;
      oc.use_distributed_optimizer = distributed;
      Optimizer opt(model.parameters(), oc, groups);
      opt.zero_grad();
      double expected = 0;
      const double dpcp = static_cast<double>(groups->dp_cp().size()), edp = static_cast<double>(groups->edp().size());
      const double tp = static_cast<double>(groups->tp().size());
      for (Parameter* p : model.parameters()) {
        if (!p->trainable) continue;
        const uint64_t salt = fnv(p->name);
        for (int64_t i = 0; i < shape_numel(p->canonical_shape); ++i) expected += std::pow(dist::value_of(0, salt, i), 2);
        const double f = p->grad_group == GradGroup::expert ? dpcp / edp
                         : (p->grad_group == GradGroup::router || p->grad_group == GradGroup::sequence_parallel) ? 1.0 / tp
                                                                                                              : 1.0;
        std::vector<double> g;
        for (int64_t i : shard_canonical_indices(p->canonical_shape, p->shard)) g.push_back(f * dist::value_of(0, salt, i));
        p->grad.copy_from(test::from_f64(g, p->grad.shape(), DType::f32));
      }
      opt.accumulate_grads();
      const OptimizerStepResult r = opt.step(0.0);
      EXPECT_EQ(r.grad_norm, std::sqrt(expected));
      ++cases;
    }
  }
  EXPECT_GT(cases, 0) << "no layout for world size " << W;
}

// ---- memory ---------------------------------------------------------------------------------

const std::vector<Layout> kMemLayouts = {
    {2, 1, 1, 1, 1, 1, "bf16", "alltoall"},  // DP = 2, EDP = 2
    {4, 2, 1, 2, 1, 1, "bf16", "alltoall"},  // TP = 2, DP = 2, EP = 2 over TP, EDP = 2
    {4, 1, 1, 2, 1, 1, "bf16", "alltoall"},  // DP = 4, EDP = 2
};

int64_t cpu_bytes() { return get_backend(Device::cpu()).memory_stats().current_bytes; }

// Elements of [0, n) padded to a multiple of g that rank r's shard holds.
int64_t owned(int64_t n, int64_t g, int64_t r) {
  const int64_t s = (n + g - 1) / g;
  return std::max<int64_t>(0, std::min(n, (r + 1) * s) - r * s);
}

TEST(OptimizerDist, StateShrinksByDataParallelSize) {
  const int64_t W = dist::world().size();
  int cases = 0;
  for (const Layout& L : kMemLayouts) {
    if (L.np != W) continue;
    SCOPED_TRACE(name_of(L));
    MoEConfig cfg = model_config(L);
    cfg.hidden_size = 32;  // large enough for the figures to mean something
    cfg.ffn_hidden_size = 64;
    cfg.moe_ffn_hidden_size = 32;
    cfg.moe_shared_expert_intermediate_size = 32;
    cfg.vocab_size = 64;
    auto groups = groups_for(cfg);
    MoEGPTModel model(cfg, Device::cpu(), groups);
    int64_t nd = 0, ne = 0;
    for (Parameter* p : model.parameters())
      if (p->trainable) (p->grad_group == GradGroup::expert ? ne : nd) += p->value.numel();
    const int64_t G = groups->dp_cp().size(), E = groups->edp().size();
    ASSERT_GT(ne, 0);
    for (bool distributed : {false, true}) {
      OptimizerConfig oc;
      oc.use_distributed_optimizer = distributed;
      const int64_t before = cpu_bytes();
      Optimizer opt(model.parameters(), oc, groups);
      const int64_t delta = cpu_bytes() - before;
      const OptimizerMemory m = opt.memory();
      EXPECT_EQ(delta, opt.state_bytes()) << "state_bytes() is what the allocator handed out";
      EXPECT_EQ(m.main_grad_bytes, 4 * ((nd + G - 1) / G * G + (ne + E - 1) / E * E)) << "main grads: every element";
      const int64_t own = distributed ? owned(nd, G, groups->dp_cp().rank()) + owned(ne, E, groups->edp().rank()) : nd + ne;
      EXPECT_EQ(m.master_bytes, 4 * own) << "f32 masters of the bf16 parameters this rank updates";
      EXPECT_EQ(m.moment_bytes, 8 * own) << "exp_avg and exp_avg_sq";
      // The figures for docs/training.md, one line per rank.
      std::vector<int64_t> mine = {m.num_params, m.main_grad_bytes, m.master_bytes, m.moment_bytes, delta};
      Tensor t = Tensor::from_vector(mine, {1, 5});
      Tensor all = Tensor::empty({W, 5}, DType::i64);
      dist::world().all_gather(t, all);
      if (dist::world().rank() == 0) {
        const std::vector<int64_t> a = all.to_vector<int64_t>();
        std::printf("%s, %s optimizer (dense %lld elements over DPxCP=%lld, expert %lld over EDP=%lld)\n",
                    name_of(L).c_str(), distributed ? "distributed" : "replicated", (long long)nd, (long long)G,
                    (long long)ne, (long long)E);
        for (int64_t r = 0; r < W; ++r)
          std::printf("  rank %lld: params %lld, main grads %lld B, masters %lld B, moments %lld B, allocator delta %lld B\n",
                      (long long)r, (long long)a[r * 5], (long long)a[r * 5 + 1], (long long)a[r * 5 + 2],
                      (long long)a[r * 5 + 3], (long long)a[r * 5 + 4]);
        std::printf("%s\n", opt.memory_report().c_str());
      }
    }
    ++cases;
  }
  EXPECT_GT(cases, 0) << "no layout for world size " << W;
}

}  // namespace
