// Host reads per MoE layer step (docs/gpu.md): every Tensor::to_vector / copy_to_host is counted on
// every back end (host_read_count()), and on a GPU each is a device→host sync, so these CPU runs
// prove the GPU path's sync count. The local and allgather dispatchers read nothing on the host in a
// training forward + backward (aux, seq-aux, global-aux and z losses, capacity, expert bias
// included); the all-to-all dispatcher reads its counts, as Megatron's does. last_routing() reads
// the counts and losses only when asked. Run alone (local) and under mpiexec -n 2 (EP 2: allgather
// and all-to-all).
#include <gtest/gtest.h>

#include "common/host_sync_step.h"
#include "common/test_util.h"
#include "moecore/moecore.h"

using namespace moe;
using test::randn;

namespace {

MoEConfig config(const std::string& dispatcher) {
  MoEConfig c;
  c.hidden_size = 8;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 6;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_token_dispatcher_type = dispatcher;
  c.moe_aux_loss_coeff = {1e-2};
  c.moe_z_loss_coeff = 1e-3;
  c.init_method_std = 0.3;
  c.seed = 11;
  return c;
}

using Reads = test::StepCounts;

// One training step of the layer (after a warm-up step), with its host reads counted.
Reads count_step(const MoEConfig& c, std::shared_ptr<ProcessGroups> groups) {
  MoELayer layer(c, Device::cpu(), groups);
  const int rank = groups ? groups->world().rank() : 0;
  Tensor x = randn({6, 2, c.hidden_size}, DType::f32, 100 + rank);  // (S, B, H)
  Tensor g = randn({6, 2, c.hidden_size}, DType::f32, 200 + rank);
  Reads r = test::layer_step(layer, x, g, ForwardContext{}, host_read_count);
  const int64_t s2 = host_read_count();
  // The values are there when asked: one read each for counts and losses, then none.
  const RoutingSummary& rs = layer.last_routing();
  EXPECT_EQ(host_read_count() - s2, 2);
  int64_t routed = 0;
  for (int64_t n : rs.tokens_per_expert) routed += n;
  EXPECT_GT(routed, 0);
  EXPECT_LE(routed, 12 * c.moe_router_topk);
  EXPECT_GT(rs.aux_loss, 0.0);
  EXPECT_GT(rs.z_loss, 0.0);
  const int64_t s3 = host_read_count();
  layer.last_routing();
  EXPECT_EQ(host_read_count(), s3);
  return r;
}

// EP 2 over the two ranks (DP 2 on the dense side).
Reads count_ep2_step(MoEConfig c) {
  c.expert_model_parallel_size = 2;
  return count_step(c, ProcessGroups::build(mpi_world(), parallel_sizes_from_config(c, world_size())));
}

// Every loss type and the knobs that touch routing, one at a time.
std::vector<std::pair<std::string, MoEConfig>> variants(const std::string& dispatcher) {
  std::vector<std::pair<std::string, MoEConfig>> v;
  v.emplace_back("aux+z", config(dispatcher));
  MoEConfig c = config(dispatcher);
  c.moe_router_load_balancing_type = {"seq_aux_loss"};
  v.emplace_back("seq_aux", c);
  c = config(dispatcher);
  c.moe_router_load_balancing_type = {"global_aux_loss"};
  v.emplace_back("global_aux", c);
  c = config(dispatcher);
  c.moe_expert_capacity_factor = 1.0;
  v.emplace_back("capacity", c);
  c.moe_pad_expert_input_to_capacity = true;
  v.emplace_back("capacity+pad", c);
  c = config(dispatcher);
  c.moe_router_score_function = "sigmoid";
  c.moe_router_enable_expert_bias = true;
  v.emplace_back("sigmoid+bias", c);
  return v;
}

}  // namespace

TEST(HostSyncs, HostReadCounterCountsReads) {
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3}, {3});
  const int64_t s0 = host_read_count();
  EXPECT_EQ(t.to_vector<float>()[2], 3.0f);
  float buf[3];
  t.copy_to_host(buf, sizeof(buf));
  EXPECT_EQ(host_read_count() - s0, 2);
  Tensor u = t.clone();  // device to device: not a read
  EXPECT_EQ(host_read_count() - s0, 2);
}

TEST(HostSyncs, LocalDispatcherLayerStepReadsNothing) {
  if (world_size() > 1) GTEST_SKIP() << "the one-process layer (run without mpiexec)";
  for (const auto& [name, c] : variants("alltoall")) {  // EP 1: the local dispatcher
    SCOPED_TRACE(name);
    Reads r = count_step(c, nullptr);
    EXPECT_EQ(r.forward, 0);
    EXPECT_EQ(r.backward, 0);
  }
}

// The allgather dispatcher over a group of one (no mpiexec needed): no reads, and the same bits as
// the layer with the local dispatcher.
TEST(HostSyncs, AllGatherDispatcherOverOneRankReadsNothing) {
  MoEConfig c = config("allgather");
  MoELayer layer(c, Device::cpu());
  Tensor x = randn({12, c.hidden_size}, DType::f32, 100);  // (T, H)
  Tensor g = randn({12, c.hidden_size}, DType::f32, 200);
  ForwardContext ctx;
  Reads local = test::layer_step(layer, x, g, ctx, host_read_count);
  Reads ag = test::allgather_step(c, Device::cpu(), x, g, ctx, host_read_count);
  EXPECT_EQ(ag.forward, 0);
  EXPECT_EQ(ag.backward, 0);
  EXPECT_TRUE(test::bit_equal(ag.out, local.out));
  EXPECT_TRUE(test::bit_equal(ag.dx, local.dx));
}

TEST(HostSyncs, AllGatherDispatcherLayerStepReadsNothing) {
  if (world_size() != 2) GTEST_SKIP() << "EP 2 needs mpiexec -n 2";
  for (const auto& [name, c] : variants("allgather")) {
    SCOPED_TRACE(name);
    Reads r = count_ep2_step(c);
    EXPECT_EQ(r.forward, 0);
    EXPECT_EQ(r.backward, 0);
  }
}

TEST(HostSyncs, AllToAllDispatcherReadsItsCounts) {
  if (world_size() != 2) GTEST_SKIP() << "EP 2 needs mpiexec -n 2";
  Reads r = count_ep2_step(config("alltoall"));
  // Megatron's all-to-all dispatcher brings its split sizes to the host (one sync); ours reads its
  // counts in the forward: this rank's counts (make_local_permutation) and the counts gathered over
  // ETP×EP (the first could be taken from the second, leaving one). Nothing else is read: the
  // router's losses and counts stay on the device, and the backward reuses the forward's splits.
  EXPECT_GE(r.forward, 1);
  EXPECT_LE(r.forward, 2);
  EXPECT_EQ(r.backward, 0);
}
