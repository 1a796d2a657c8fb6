// Faults inside a model step across ranks (np 2, EP 2, both dispatchers; docs/reliability.md):
//   - a NaN in one expert's weight on one rank under MOE_SANITIZE: that rank stops at the first op
//     whose output is non-finite, naming step, micro-batch, pass, layer, module, op and rank; its
//     peer, left waiting in the combine, times out naming it as the silent rank;
//   - the same model under MOE_SANITIZE with healthy weights: forward and backward raise nothing
//     (no false alarm from the finite checks or the dispatchers' count conservation);
//   - every token routed to the experts of one EP rank at 8x the tokens (that rank's rows 8x or
//     more of a balanced baseline): completes; and under a device-memory cap on that rank fails with an
//     out_of_memory error naming the layer, module and bytes asked, its peer timing out cleanly.
// Every case runs on a fresh split of the world, so a group broken by a fault never touches the
// world, and all ranks meet again on it (MOE_COMM_TIMEOUT_S is 2 s here).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <thread>
#include <string>
#include <vector>

#include "comm/comm_util.h"
#include "core/sanitize.h"
#include "device/cpu/cpu_backend.h"
#include "dist/dist_util.h"
#include "moecore/backend.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

// Two layers (dense, then MoE), 8 experts top-2 over EP 2: experts 4..7 live on rank 1.
MoEConfig config(const std::string& dispatcher, int64_t seq_length) {
  MoEConfig c;
  c.num_layers = 2;
  c.moe_layer_freq = {0, 1};
  c.hidden_size = 8;
  c.num_attention_heads = 2;
  c.ffn_hidden_size = 8;
  c.vocab_size = 16;
  c.seq_length = seq_length;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 64;  // the experts' rows dominate the memory
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.params_dtype = "fp32";
  c.seed = 5;
  c.expert_model_parallel_size = 2;
  c.moe_token_dispatcher_type = dispatcher;
  return c;
}

// Routes every token to experts 4 and 5 (rank 1's) through a sigmoid router with a large bias.
void route_all_to_rank1(MoEConfig& c) {
  c.moe_router_score_function = "sigmoid";
  c.moe_router_enable_expert_bias = true;
}
void set_bias_to_rank1(MoEGPTModel& m) {
  m.find_parameter("decoder.layers.1.mlp.router.expert_bias")
      ->value.copy_from(Tensor::from_vector(std::vector<float>{0, 0, 0, 0, 50, 50, 0, 0}, {8}));
}

MicroBatch batch(int64_t b, int64_t S, int rank) {
  std::vector<int64_t> tok(static_cast<size_t>(b * S)), lab(tok.size());
  for (size_t i = 0; i < tok.size(); ++i) {
    tok[i] = static_cast<int64_t>(dist::mix(i * 31 + static_cast<uint64_t>(rank)) % 16);
    lab[i] = static_cast<int64_t>(dist::mix(i * 17 + 3) % 16);
  }
  return MicroBatch{Tensor::from_vector(tok, {b, S}), Tensor::from_vector(lab, {b, S}), Tensor()};
}

std::shared_ptr<ProcessGroups> fresh_groups(const MoEConfig& c, const char* name) {
  Communicator& w = dist::world();
  return ProcessGroups::build(w.split(0, w.rank(), name), parallel_sizes_from_config(c, w.size()));
}

// One forward + backward of micro-batch 0 at `step`.
double step_once(MoEGPTModel& m, const MicroBatch& mb, int64_t step) {
  ForwardContext ctx;
  ctx.step = step;
  ctx.microbatch = 0;
  const double loss = m.forward(mb, ctx);
  m.backward();
  return loss;
}

// The peer left waiting by a rank that stopped: a communication error naming `silent` as silent.
void expect_peer_timeout(const Error& e, int silent) {
  EXPECT_EQ(e.code(), ErrorCode::communication) << e.what();
  const std::string want = "silent (dead, or not in this operation";
  const std::string who = "rank " + std::to_string(silent) + " (world rank " + std::to_string(silent) + ")";
  const std::string m = e.what();
  EXPECT_NE(m.find(want), std::string::npos) << m;
  EXPECT_NE(m.find(who, m.find(want)), std::string::npos) << "the silent rank is not named: " << m;
}

class Reliability : public ::testing::TestWithParam<std::string> {
 protected:
  void TearDown() override {
    sanitize::set_enabled(false);
    set_cpu_device_byte_limit(0);
    // The rank that stopped lets its peer time out (and probe for silent ranks) before the world
    // barrier, which would otherwise time out first.
    if (stopped_) std::this_thread::sleep_for(std::chrono::duration<double>(1.5 * comm::timeout_seconds() + 0.5));
    dist::world().barrier();  // everyone meets again on the healthy world
  }
  // One step that must fail: rank 1 (the faulty one) with `code` and a message holding every part,
  // rank 0 with a timeout naming rank 1.
  void expect_fault(const std::function<void()>& step, ErrorCode code, const std::vector<std::string>& parts) {
    const int me = dist::world().rank();
    try {
      step();
      ADD_FAILURE() << "rank " << me << ": the step completed despite the fault";
    } catch (const Error& e) {
      std::printf("[rank %d] %s\n", me, e.what());
      if (me != 1) return expect_peer_timeout(e, 1);
      stopped_ = true;
      EXPECT_EQ(e.code(), code) << e.what();
      const std::string m = e.what();
      for (const std::string& part : parts) EXPECT_NE(m.find(part), std::string::npos) << "missing '" << part << "' in: " << m;
    }
  }
  bool stopped_ = false;  // this rank raised the fault (its peer is left waiting)
};

TEST_P(Reliability, NanInOneExpertWeightIsTracedToItsOp) {
  ASSERT_EQ(dist::world().size(), 2);
  MoEConfig c = config(GetParam(), 8);
  route_all_to_rank1(c);
  auto groups = fresh_groups(c, "world_nan");
  MoEGPTModel model(c, Device::cpu(), groups);
  set_bias_to_rank1(model);
  const int me = dist::world().rank();
  if (me == 1) {
    // One element of local expert 0 (global expert 4) of rank 1's fc1 weight.
    Parameter* fc1 = model.find_parameter("decoder.layers.1.mlp.experts.linear_fc1.weight");
    ASSERT_NE(fc1, nullptr);
    std::vector<float> w = fc1->value.to_vector<float>();
    w[3] = std::numeric_limits<float>::quiet_NaN();
    fc1->value.copy_from(Tensor::from_vector(w, fc1->value.shape()));
  }
  sanitize::set_enabled(true);
  expect_fault([&] { step_once(model, batch(1, 8, me), 7); }, ErrorCode::non_finite,
               {"[r1] moecore non-finite value: MOE_SANITIZE: the output 'C'", "of op grouped_gemm",
                "at step 7, micro-batch 0, forward, layer 1 (decoder.layers.1), module mlp.experts, rank 1",
                "inputs: A finite, B 1 non-finite; it came in through an input"});
}

TEST_P(Reliability, HealthyStepRaisesNothingUnderSanitize) {
  MoEConfig c = config(GetParam(), 8);
  auto groups = fresh_groups(c, "world_ok");
  MoEGPTModel model(c, Device::cpu(), groups);
  sanitize::set_enabled(true);
  const double loss = step_once(model, batch(2, 8, dist::world().rank()), 1);
  EXPECT_TRUE(std::isfinite(loss));
}

TEST_P(Reliability, EveryTokenToOneRankCompletesOrFailsCleanly) {
  const int me = dist::world().rank();
  MoEConfig base = config(GetParam(), 16);
  Backend& cpu = get_backend(Device::cpu());
  // Baseline: balanced routing, b = 1: the rows rank 1's experts receive.
  int64_t balanced_rows = 0;
  {
    auto groups = fresh_groups(base, "world_balanced");
    MoEGPTModel model(base, Device::cpu(), groups);
    step_once(model, batch(1, 16, me), 1);
    const auto& n = model.moe_layer(1)->last_routing().tokens_per_expert;  // (E) over this rank's tokens
    Tensor t = Tensor::from_vector(n, {8});
    dist::world().all_reduce(t);
    for (int64_t e = 4; e < 8; ++e) balanced_rows += t.to_vector<int64_t>()[static_cast<size_t>(e)];
  }
  // Every token to experts 4, 5 at b = 8: rank 1 receives every route of both ranks.
  MoEConfig hot = base;
  route_all_to_rank1(hot);
  const int64_t hot_rows = 2 /*ranks*/ * 8 /*b*/ * 16 /*S*/ * 2 /*top-k*/;
  EXPECT_GE(hot_rows, 8 * balanced_rows) << "the hot rank's rows should grow at least 8x (balanced: " << balanced_rows
                                         << ")";
  int64_t need = 0, held = 0;
  {
    auto groups = fresh_groups(hot, "world_hot");
    MoEGPTModel model(hot, Device::cpu(), groups);
    set_bias_to_rank1(model);
    held = cpu.memory_stats().current_bytes;
    cpu.reset_peak_memory();
    const double loss = step_once(model, batch(8, 16, me), 1);
    need = cpu.memory_stats().peak_bytes - held;
    EXPECT_TRUE(std::isfinite(loss));
    const auto& n = model.moe_layer(1)->last_routing().tokens_per_expert;
    EXPECT_EQ(n[4], 8 * 16) << "every token of this rank to expert 4";
    EXPECT_EQ(n[5], 8 * 16) << "every token of this rank to expert 5";
  }
  // The same under a cap on rank 1 halfway to what it needed: a clean out_of_memory there.
  {
    auto groups = fresh_groups(hot, "world_capped");
    MoEGPTModel model(hot, Device::cpu(), groups);
    set_bias_to_rank1(model);
    if (me == 1) set_cpu_device_byte_limit(cpu.memory_stats().current_bytes + need / 2);
    expect_fault([&] { step_once(model, batch(8, 16, me), 3); }, ErrorCode::out_of_memory,
                 {"[r1] moecore out of memory: cpu allocator: ", " bytes asked would exceed the device limit of ",
                  "bytes held) at step 3, micro-batch 0, forward, layer 1 (decoder.layers.1), module mlp.", ", rank 1"});
  }
}

INSTANTIATE_TEST_SUITE_P(Dispatchers, Reliability, ::testing::Values("alltoall", "allgather"));

}  // namespace
