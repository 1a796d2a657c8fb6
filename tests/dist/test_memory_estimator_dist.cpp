// estimate_memory across ranks: every rank runs a training step of its layout (tests/common/
// memory_measure.h), reads the allocator's peak and checks it against the estimate for its
// pipeline stage — within 10 %, as is what one forward keeps (PP = 1) — and the static parts
// (weights, gradients + main grads, optimizer state) against the model's and the optimizer's own
// bytes. Layouts at np 2 and 4: TP (sequence
// parallel), CP, EP with both dispatchers, ETP, PP (1F1B, several micro-batches in flight), the
// distributed optimizer, bf16.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/memory_measure.h"
#include "dist/dist_util.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

struct Layout {
  int64_t np, tp, cp, pp, ep, etp, M;
  const char* disp;
  bool dist_opt, bf16;
};

const std::vector<Layout> kGrid = {
    // np tp cp pp ep etp M  dispatcher  dist   bf16
    {2, 2, 1, 1, 1, 1, 2, "allgather", false, false},
    {2, 1, 2, 1, 1, 1, 2, "allgather", true, false},
    {2, 1, 1, 1, 2, 1, 2, "allgather", true, true},
    {2, 1, 1, 1, 2, 1, 2, "alltoall", false, false},
    {2, 1, 1, 2, 1, 1, 4, "allgather", false, false},
    {4, 2, 1, 1, 2, 1, 2, "alltoall", true, false},
    {4, 2, 1, 1, 2, 2, 2, "allgather", false, true},
    {4, 1, 1, 2, 2, 1, 4, "alltoall", true, false},
};

std::string name_of(const Layout& L) {
  return "np" + std::to_string(L.np) + " tp" + std::to_string(L.tp) + " cp" + std::to_string(L.cp) + " pp" +
         std::to_string(L.pp) + " ep" + std::to_string(L.ep) + " etp" + std::to_string(L.etp) + " M" +
         std::to_string(L.M) + " " + L.disp + (L.dist_opt ? " distopt" : "") + (L.bf16 ? " bf16" : "");
}

MoEConfig config_for(const Layout& L) {
  MoEConfig c = moe::test::memory_test_model();  // every layer MoE
  c.tensor_model_parallel_size = L.tp;
  c.context_parallel_size = L.cp;
  c.pipeline_model_parallel_size = L.pp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  c.moe_token_dispatcher_type = L.disp;
  if (L.bf16) c.params_dtype = "bf16";
  return c;
}

}  // namespace

TEST(MemoryEstimatorDist, WithinTenPercentOfEveryRanksPeak) {
  Communicator& w = dist::world();
  int ran = 0;
  for (const Layout& L : kGrid) {
    if (L.np != w.size()) continue;
    ++ran;
    const MoEConfig c = config_for(L);
    validate_model(c, w.size());
    std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(c);
    MemoryLayout ml = MemoryLayout::from_config(c, w.size(), groups->pp().rank());
    ml.micro_batch_size = 4;
    ml.num_microbatches = L.M;
    ml.use_distributed_optimizer = L.dist_opt;
    const MemoryEstimate e = estimate_memory(c, ml);
    const moe::test::MeasuredStep m = moe::test::measure_step(c, ml, groups, groups->dp().rank());
    const std::string row = moe::test::memory_row(name_of(L) + " r" + std::to_string(w.rank()), e, m);
    // Rows of every rank, printed by rank 0 in rank order.
    for (int r = 0; r < w.size(); ++r) {
      w.barrier();
      if (r == w.rank()) std::printf("%s\n", row.c_str());
      std::fflush(stdout);
    }
    EXPECT_EQ(e.weight_bytes, m.weights) << name_of(L) << " rank " << w.rank();
    EXPECT_EQ(e.gradient_bytes, m.grads) << name_of(L) << " rank " << w.rank();
    EXPECT_NEAR(static_cast<double>(e.optimizer_bytes), static_cast<double>(m.optimizer),
                0.01 * static_cast<double>(m.optimizer))
        << name_of(L) << " rank " << w.rank() << " (the distributed optimizer's shard boundaries: within 1 %)";
    if (L.pp == 1) {  // what one forward keeps (with PP the stage's output is still held when it is read)
      EXPECT_LE(moe::test::rel_error(e.activation_bytes_per_microbatch, m.first_forward), 0.10)
          << name_of(L) << " rank " << w.rank() << ": estimated " << e.activation_bytes_per_microbatch
          << " bytes kept by a forward, measured " << m.first_forward;
    }
    EXPECT_LE(moe::test::rel_error(e.total_bytes, m.peak), 0.10)
        << name_of(L) << " rank " << w.rank() << ": estimated " << e.total_bytes << " bytes, measured peak " << m.peak;
  }
  EXPECT_GT(ran, 0) << "no layout of the grid runs on " << w.size() << " ranks";
}
