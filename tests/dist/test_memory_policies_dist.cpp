// `moe` recompute across ranks (docs/memory.md): on each layout × both dispatchers, the layer with
// --recompute-modules moe gives the same bits as keep on the same layout (outputs, input grads,
// parameter grads after finalize_grads, aux/z losses, the expert bias after finish_step) over two
// micro-batches in flight with jitter, expert bias and the global aux loss, and its backward
// re-runs the dispatch's communication (the dispatcher moves more bytes than keep's).
#include <gtest/gtest.h>

#include <cstdio>

#include "common/test_util.h"
#include "dist/dist_util.h"
#include "moe/dispatcher.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

struct Layout {
  int64_t tp, ep, etp;
};

// Every routing side effect a re-run could count twice is on: jitter, expert bias, global aux, z.
MoEConfig config(const Layout& L, const std::string& dispatcher) {
  MoEConfig c = config_from_json(R"({
    "hidden_size": 8, "num_moe_experts": 8, "moe_ffn_hidden_size": 8, "moe_router_topk": 2,
    "gated_linear_unit": true, "activation_func": "silu", "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": true, "moe_router_bias_update_rate": 0.01,
    "moe_router_load_balancing_type": ["global_aux_loss", "aux_loss"], "moe_aux_loss_coeff": [0.02, 0.01],
    "moe_z_loss_coeff": 0.001, "moe_input_jitter_eps": 0.05, "moe_shared_expert_intermediate_size": 8,
    "moe_shared_expert_gate": true, "params_dtype": "fp64", "init_method_std": 0.4, "seed": 23})");
  c.tensor_model_parallel_size = L.tp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  c.moe_token_dispatcher_type = dispatcher;
  return c;
}

struct PolicyRun {
  std::vector<Tensor> tensors;
  std::vector<double> losses;
  int64_t bytes_sent = 0;
};

PolicyRun run(const MoEConfig& cfg, const std::shared_ptr<ProcessGroups>& groups) {
  MoELayer layer(cfg, Device::cpu(), groups);
  const int64_t S = 8, B = 2, H = cfg.hidden_size;
  const int me = dist::world().rank();
  PolicyRun r;
  for (int64_t step = 0; step < 2; ++step) {
    std::vector<Tensor> g;
    for (int64_t m = 0; m < 2; ++m) {
      ForwardContext ctx;
      ctx.microbatch = m;
      ctx.step = step;
      Tensor x = test::randn({S, B, H}, DType::f64, 1000 + 100 * static_cast<uint64_t>(me) + 10 * step + m);
      g.push_back(test::randn({S, B, H}, DType::f64, 2000 + 100 * static_cast<uint64_t>(me) + 10 * step + m));
      r.tensors.push_back(layer.forward(x, ctx));
      r.losses.push_back(layer.last_routing().aux_loss);
      r.losses.push_back(layer.last_routing().z_loss);
    }
    for (int64_t m = 1; m >= 0; --m) r.tensors.push_back(layer.backward(g[static_cast<size_t>(m)], m));
    layer.finish_step();
  }
  finalize_grads(layer.parameters(), *groups);
  for (Parameter* p : layer.parameters()) r.tensors.push_back(p->trainable ? p->grad : p->value);
  r.bytes_sent = layer.dispatcher().traffic().bytes_sent;
  return r;
}

}  // namespace

TEST(MemoryPoliciesDist, MoeRecomputeIsBitIdenticalAndRerunsTheDispatch) {
  const int64_t W = dist::world().size();
  auto wptr = mpi_world();
  const std::vector<Layout> layouts = {{1, 2, 1}, {1, 1, 2}, {2, 2, 1}, {1, 4, 1}, {1, 2, 2}};
  int checked = 0;
  for (const Layout& L : layouts) {
    if (W % (L.tp) != 0 || W % (L.ep * L.etp) != 0 || L.ep * L.etp > W || L.tp > W) continue;
    for (const std::string disp : {"allgather", "alltoall"}) {
      SCOPED_TRACE("tp" + std::to_string(L.tp) + " ep" + std::to_string(L.ep) + " etp" + std::to_string(L.etp) + " " +
                   disp);
      MoEConfig keep_cfg = config(L, disp);
      auto groups = ProcessGroups::build(wptr, parallel_sizes_from_config(keep_cfg, W));
      MoEConfig moe_cfg = keep_cfg;
      moe_cfg.recompute_granularity = "selective";
      moe_cfg.recompute_modules = {"moe"};
      PolicyRun keep = run(keep_cfg, groups);
      PolicyRun moe = run(moe_cfg, groups);
      ASSERT_EQ(keep.tensors.size(), moe.tensors.size());
      for (size_t i = 0; i < keep.tensors.size(); ++i)
        EXPECT_TRUE(test::bit_equal(keep.tensors[i], moe.tensors[i])) << "tensor " << i << " on rank " << dist::world().rank();
      for (size_t i = 0; i < keep.losses.size(); ++i) EXPECT_EQ(keep.losses[i], moe.losses[i]) << "loss " << i;
      if (L.ep * L.etp > 1) {
        EXPECT_GT(moe.bytes_sent, keep.bytes_sent) << "the backward re-runs the dispatch's communication";
      }
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
  if (dist::world().rank() == 0) std::printf("checked %d layout x dispatcher cases on %lld ranks\n", checked, (long long)W);
}
