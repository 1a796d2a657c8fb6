// Pipeline parallelism across ranks: every layout must compute what one process computes. Each rank
// recomputes the one-process reference itself (parameters are drawn from the seed by canonical
// name and index) and checks, after run_schedule + finish_grads_pipeline + finalize_grads:
//   - the step's loss on every rank (the mean over replicas and micro-batches of the lm loss);
//   - its logits (last stage: S/CP rows at its CP positions, its vocabulary slice) per micro-batch;
//   - its shard of every parameter gradient of its stage (a tied word embedding on both ends, after
//     the embedding-group sum) against the one-process run with DP·M micro-batches;
//   - the expert biases after finish_step where they are on (the step's counts, whatever the order);
//   - the order of forwards and backwards of its stage against 1F1B's (one_f_one_b_order), and that
//     it never holds more micro-batches' activations than 1F1B allows (PP − stage, so never more
//     than PP), from the model's and the MoE layers' own counters.
// Layouts: PP = 2 and 4 with M = 2 (< PP), 4 and 8; PP folded with EP (PP=2, EP=2 on 4 ranks;
// PP=2, TP=2, EP=4 on 8 ranks), with TP, CP and DP; tied and untied embeddings; uneven stages
// (decoder_first/last_pipeline_num_layers); both dispatchers; global aux loss where DP = 1.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
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
  int64_t np, tp, cp, pp, ep, etp, M, layers;
  bool tied;
  int64_t first_layers, last_layers;  // 0: unset (even split)
  const char* disp;
  bool bias;  // sigmoid router with expert bias (checked after finish_step)
};

std::string name_of(const Layout& L) {
  std::string s = "np" + std::to_string(L.np) + " tp" + std::to_string(L.tp) + " cp" + std::to_string(L.cp) + " pp" +
                  std::to_string(L.pp) + " ep" + std::to_string(L.ep) + " etp" + std::to_string(L.etp) + " M" +
                  std::to_string(L.M) + " L" + std::to_string(L.layers) + (L.tied ? " tied" : " untied");
  if (L.first_layers || L.last_layers)
    s += " first" + std::to_string(L.first_layers) + " last" + std::to_string(L.last_layers);
  return s + " " + L.disp + (L.bias ? " bias" : "");
}

const std::vector<Layout> kGrid = {
    // np tp cp pp ep etp M  L  tied   first last  dispatcher   bias
    {2, 1, 1, 2, 1, 1, 4, 4, true, 0, 0, "allgather", false},
    {2, 1, 1, 2, 1, 1, 4, 4, false, 1, 0, "allgather", true},
    {2, 1, 1, 2, 1, 1, 2, 3, true, 0, 2, "alltoall", false},
    {2, 1, 1, 1, 2, 1, 2, 2, true, 0, 0, "alltoall", false},  // PP = 1: the no-pipelining schedule, DP = 2
    {4, 1, 1, 4, 1, 1, 8, 4, true, 0, 0, "allgather", false},
    {4, 1, 1, 4, 1, 1, 4, 6, false, 1, 1, "alltoall", true},
    {4, 1, 1, 4, 1, 1, 2, 4, true, 0, 0, "allgather", false},  // M < PP
    {4, 1, 1, 2, 2, 1, 4, 4, true, 0, 0, "alltoall", false},   // PP × EP folding, DP = 2
    {4, 1, 1, 2, 2, 1, 4, 4, false, 3, 0, "allgather", false},
    {4, 2, 1, 2, 1, 2, 4, 4, true, 0, 0, "alltoall", false},
    {4, 1, 2, 2, 1, 1, 4, 4, false, 0, 0, "allgather", false},
    {8, 2, 1, 2, 4, 1, 4, 4, true, 0, 0, "alltoall", false},   // PP=2, TP=2, EP=4 (over TP×DP)
    {8, 2, 1, 2, 4, 1, 4, 4, false, 1, 3, "allgather", true},
    {8, 2, 1, 4, 2, 1, 8, 4, true, 0, 0, "alltoall", false},
    {8, 2, 2, 2, 2, 2, 4, 4, true, 1, 0, "allgather", false},
};

std::string order_str(const std::vector<ScheduleEvent>& order) {
  std::string s;
  for (const ScheduleEvent& e : order) {
    if (!s.empty()) s.push_back(' ');
    s.push_back(e.kind);
    s.append(std::to_string(e.microbatch));
  }
  return s;
}

MoEConfig model_config(const Layout& L) {
  MoEConfig c = test::tiny_moe_gpt();
  c.num_layers = L.layers;
  c.moe_layer_freq.clear();
  for (int64_t i = 0; i < L.layers; ++i) c.moe_layer_freq.push_back(i % 3 == 1 ? 0 : 1);  // MoE, dense, MoE, ...
  c.position_embedding_type = L.tied ? "rope" : "learned_absolute";
  c.untie_embeddings_and_output_weights = !L.tied;
  c.num_moe_experts = 8;
  c.params_dtype = "fp64";
  c.seed = 29;
  c.tensor_model_parallel_size = L.tp;
  c.context_parallel_size = L.cp;
  c.pipeline_model_parallel_size = L.pp;
  c.expert_model_parallel_size = L.ep;
  c.expert_tensor_parallel_size = L.etp;
  if (L.first_layers) c.decoder_first_pipeline_num_layers = L.first_layers;
  if (L.last_layers) c.decoder_last_pipeline_num_layers = L.last_layers;
  c.moe_token_dispatcher_type = L.disp;
  c.num_microbatches = L.M;
  if (L.bias) {
    c.moe_router_score_function = "sigmoid";
    c.moe_router_enable_expert_bias = true;
    c.moe_router_bias_update_rate = 0.125;
  }
  return c;
}

MoEConfig single(MoEConfig c) {
  c.tensor_model_parallel_size = c.context_parallel_size = c.expert_model_parallel_size = 1;
  c.pipeline_model_parallel_size = 1;
  c.expert_tensor_parallel_size = 1;
  c.decoder_first_pipeline_num_layers.reset();
  c.decoder_last_pipeline_num_layers.reset();
  return c;
}

// Micro-batch g of the global batch (two sequences), the same on every rank.
MicroBatch micro_batch(const MoEConfig& c, int64_t g) {
  const int64_t S = c.seq_length, b = 2;
  std::vector<int64_t> tok(static_cast<size_t>(b * S)), lab(tok.size());
  std::vector<float> mask(tok.size(), 1.0f);
  for (int64_t i = 0; i < b * S; ++i) {
    tok[i] = static_cast<int64_t>(dist::mix(static_cast<uint64_t>(g * 131 + i)) % static_cast<uint64_t>(c.vocab_size));
    lab[i] = static_cast<int64_t>(dist::mix(static_cast<uint64_t>(g * 977 + i + 5)) % static_cast<uint64_t>(c.vocab_size));
    if ((g + i) % 5 == 3) mask[i] = 0.0f;  // holes
  }
  return MicroBatch{Tensor::from_vector(tok, {b, S}), Tensor::from_vector(lab, {b, S}), Tensor::from_vector(mask, {b, S})};
}

struct Reference {
  double loss = 0;
  std::vector<std::vector<double>> logits;  // per micro-batch (S, b, V)
  std::map<std::string, std::vector<double>> grads;
  std::map<std::string, std::vector<double>> biases;  // after finish_step
};

// One process, DP·M micro-batches of the global batch, loss scale 1/(DP·M), the plain
// forward/backward loop.
Reference run_reference(const MoEConfig& cfg, int64_t n_micro) {
  MoEGPTModel model(single(cfg), Device::cpu());
  Reference r;
  for (int64_t g = 0; g < n_micro; ++g) {
    ForwardContext ctx;
    ctx.microbatch = g;
    ctx.loss_scale = 1.0 / static_cast<double>(n_micro);
    r.loss += model.forward(micro_batch(cfg, g), ctx, true) / static_cast<double>(n_micro);
    r.logits.push_back(test::to_f64(model.last_logits()));
    model.backward();
  }
  model.finish_step();
  for (Parameter* p : model.parameters()) {
    if (p->trainable) r.grads[p->name] = test::to_f64(p->grad);
    else r.biases[p->name] = test::to_f64(p->value);
  }
  return r;
}

void check_layout(const Layout& L) {
  Communicator& world = dist::world();
  const MoEConfig cfg = model_config(L);
  auto groups = ProcessGroups::build(mpi_world(), parallel_sizes_from_config(cfg, world.size()));
  const int64_t DP = groups->dp_size(), M = L.M, V = cfg.vocab_size, PP = L.pp;
  MoEConfig ref_cfg = cfg;
  if (DP == 1) ref_cfg.moe_router_load_balancing_type = {"aux_loss", "global_aux_loss"};  // see below
  MoEConfig run_cfg = cfg;
  run_cfg.moe_router_load_balancing_type = ref_cfg.moe_router_load_balancing_type;
  // global_aux_loss sums its counts over the replicas' m-th micro-batches, so it equals one process
  // only with DP = 1; there it checks that the step's running counts do not depend on the order.
  const Reference ref = run_reference(ref_cfg, DP * M);

  MoEGPTModel model(run_cfg, Device::cpu(), groups);
  const int64_t stage = model.pipeline_rank();
  ASSERT_EQ(model.pipeline_size(), PP);
  const SequenceLayout& lay = model.layout();
  const int64_t V_l = V / lay.tp;
  std::vector<MicroBatch> batches;
  for (int64_t m = 0; m < M; ++m) batches.push_back(micro_batch(cfg, groups->dp().rank() * M + m));

  ScheduleOptions opt;
  opt.keep_logits = true;
  opt.record_order = true;
  int64_t max_moe_pending = 0;
  // Saved bytes: each micro-batch's share is what its forward added; the most ever held must be at
  // most PP − stage of the largest shares.
  int64_t bytes_now = 0, largest_share = 0, most_held = 0;
  opt.after_backward = [&](int64_t) { bytes_now = model.saved_activation_bytes(); };
  opt.after_forward = [&](int64_t m) {
    const int64_t held = model.saved_activation_bytes();
    largest_share = std::max(largest_share, held - bytes_now);
    most_held = std::max(most_held, held);
    bytes_now = held;
    for (int64_t i = 0; i < model.num_layers(); ++i)
      if (MoELayer* l = model.moe_layer(i)) max_moe_pending = std::max(max_moe_pending, l->pending_microbatches());
    if (!model.is_last_stage()) return;
    const int64_t g = groups->dp().rank() * M + m;
    const std::vector<double> mine = test::to_f64(model.last_logits()), &full = ref.logits[static_cast<size_t>(g)];
    std::vector<double> want;
    for (int64_t s = 0; s < lay.s_cp(); ++s)
      for (int64_t bi = 0; bi < 2; ++bi)
        for (int64_t v = 0; v < V_l; ++v)
          want.push_back(full[static_cast<size_t>((lay.cp_positions[s] * 2 + bi) * V + lay.tp_rank * V_l + v)]);
    EXPECT_TRUE(test::all_close(mine, want, 1e-12, 1e-10)) << "logits of micro-batch " << g;
  };
  const ScheduleResult r = run_schedule(model, batches, ForwardContext{}, opt);
  model.finish_grads_pipeline();
  finalize_grads(model.parameters(), *groups);
  model.finish_step();

  // The loss is on every rank of the pipeline; the replicas' mean is the step's.
  Tensor l = Tensor::from_vector(std::vector<double>{r.loss}, {1});
  groups->dp().all_reduce(l);
  EXPECT_NEAR(l.to_vector<double>()[0] / static_cast<double>(DP), ref.loss, 1e-12 * std::max(1.0, ref.loss)) << "loss";

  // 1F1B's order, and no more micro-batches in flight than it allows.
  EXPECT_EQ(order_str(r.order), order_str(one_f_one_b_order(PP, stage, M))) << "stage " << stage;
  EXPECT_EQ(r.max_in_flight, std::min(PP - stage, M)) << "stage " << stage;
  EXPECT_LE(r.max_in_flight, PP);
  EXPECT_LE(max_moe_pending, std::min(PP - stage, M)) << "MoE layers' own count, stage " << stage;
  EXPECT_GT(r.peak_saved_bytes, 0);
  EXPECT_EQ(r.peak_saved_bytes, most_held);
  EXPECT_LE(most_held, std::min(PP - stage, M) * largest_share) << "saved bytes, stage " << stage;
  EXPECT_EQ(model.pending_microbatches(), 0);
  EXPECT_EQ(model.saved_activation_bytes(), 0) << "nothing is held after the step";
  EXPECT_GE(r.bubble_s, 0.0);
  EXPECT_GE(r.total_s, r.bubble_s);

  // Every gradient of this stage (each rank's own shard) against one process; the stage holds
  // exactly its layers' parameters.
  int64_t checked = 0;
  for (Parameter* p : model.parameters()) {
    if (!p->trainable) {
      const std::vector<double>& b = ref.biases.at(p->name);
      EXPECT_EQ(test::to_f64(p->value), b) << p->name << " after finish_step";
      continue;
    }
    const std::vector<double>& full = ref.grads.at(p->name);
    std::vector<double> want;
    for (int64_t i : shard_canonical_indices(p->canonical_shape, p->shard)) want.push_back(full[static_cast<size_t>(i)]);
    EXPECT_TRUE(test::all_close(test::to_f64(p->grad), want, 1e-12, 1e-9)) << p->name << " on stage " << stage;
    ++checked;
    const std::string layer_prefix = "decoder.layers.";
    if (p->name.rfind(layer_prefix, 0) == 0) {
      const int64_t i = std::stoll(p->name.substr(layer_prefix.size()));
      EXPECT_TRUE(model.has_layer(i)) << p->name << " is not a layer of stage " << stage;
    }
  }
  // Across the pipeline every canonical parameter is somewhere (the tied copy counted once).
  const bool copy = model.shared_embedding_copy() != nullptr;
  Tensor n = Tensor::from_vector(std::vector<int64_t>{checked - (copy ? 1 : 0)}, {1});
  groups->pp().all_reduce(n);
  EXPECT_EQ(static_cast<size_t>(n.to_vector<int64_t>()[0]), ref.grads.size()) << "parameters over the stages";
  EXPECT_EQ(copy, PP > 1 && L.tied && model.is_last_stage());
  EXPECT_EQ(model.embedding_group() != nullptr, PP > 1 && L.tied && (model.is_first_stage() || model.is_last_stage()));
}

TEST(PipelineDist, LayoutsMatchSingleProcess) {
  const int64_t W = dist::world().size();
  int cases = 0;
  for (const Layout& L : kGrid) {
    if (L.np != W) continue;
    SCOPED_TRACE(name_of(L));
    check_layout(L);
    ++cases;
  }
  EXPECT_GT(cases, 0) << "no layout for world size " << W;
  if (dist::world().rank() == 0) std::printf("checked %d pipeline layouts on %lld ranks\n", cases, (long long)W);
}

// Forward-only (evaluation): every stage runs M forwards, the losses are the one-process forward
// losses, and nothing stays held.
TEST(PipelineDist, ForwardOnlyScheduleGivesTheLosses) {
  Communicator& world = dist::world();
  Layout L = kGrid[0];
  L.np = world.size();
  L.pp = world.size() >= 4 ? 4 : 2;
  L.M = 3;
  const MoEConfig cfg = model_config(L);
  auto groups = ProcessGroups::build(mpi_world(), parallel_sizes_from_config(cfg, world.size()));
  MoEGPTModel ref(single(cfg), Device::cpu());
  MoEGPTModel model(cfg, Device::cpu(), groups);
  std::vector<MicroBatch> batches;
  std::vector<double> want;
  for (int64_t m = 0; m < L.M; ++m) {
    batches.push_back(micro_batch(cfg, groups->dp().rank() * L.M + m));
    ForwardContext ctx;
    ctx.training = false;
    want.push_back(ref.forward(batches.back(), ctx));
  }
  ScheduleOptions opt;
  opt.forward_only = true;
  opt.record_order = true;
  ForwardContext ctx;
  ctx.training = false;
  const ScheduleResult r = run_schedule(model, batches, ctx, opt);
  EXPECT_TRUE(test::all_close(r.losses, want, 1e-12, 1e-12));
  EXPECT_EQ(order_str(r.order), order_str(one_f_one_b_order(L.pp, model.pipeline_rank(), L.M, true)));
  EXPECT_EQ(model.pending_microbatches(), 0);
  EXPECT_EQ(model.saved_activation_bytes(), 0);
}

TEST(PipelineDist, MisuseIsAClearError) {
  Communicator& world = dist::world();
  Layout L = kGrid[0];
  L.np = world.size();
  const MoEConfig cfg = model_config(L);
  auto groups = ProcessGroups::build(mpi_world(), parallel_sizes_from_config(cfg, world.size()));
  MoEGPTModel model(cfg, Device::cpu(), groups);
  const MicroBatch mb = micro_batch(cfg, 0);
  EXPECT_TRUE(test::contains_all(test::error_of([&] { model.forward(mb, ForwardContext{}); }), {"run_schedule"}));
  EXPECT_TRUE(test::contains_all(test::error_of([&] { model.backward_stage(3, Tensor()); }), {"micro-batch 3"}));
  if (!model.is_first_stage()) {  // a middle or last stage needs its input
    EXPECT_TRUE(test::contains_all(test::error_of([&] { model.forward_stage(mb, ForwardContext{}, Tensor()); }),
                                   {"previous stage's output"}));
  }
  EXPECT_EQ(model.pending_microbatches(), 0);
}

}  // namespace

namespace {

// Point-to-point over MPI: a ring in one batch, two messages to the same peer arrive in order, a
// send to oneself, and a receive that gets fewer bytes than it expects is an error naming both.
TEST(PipelineDist, PointToPointOverMpi) {
  Communicator& world = dist::world();
  const int n = world.size(), r = world.rank(), next = (r + 1) % n, prev = (r + n - 1) % n;
  Tensor a = dist::rank_data(DType::f32, {3, 5}, r, 1), b = dist::rank_data(DType::f64, {2, 4}, r, 2);
  Tensor self = dist::rank_data(DType::i64, {4}, r, 3);
  Tensor got_a = Tensor::empty({3, 5}, DType::f32), got_b = Tensor::empty({2, 4}, DType::f64);
  Tensor got_self = Tensor::empty({4}, DType::i64);
  world.batch_send_recv({{P2POp::Kind::recv, got_a, prev},
                         {P2POp::Kind::send, a, next},
                         {P2POp::Kind::send, b, next},
                         {P2POp::Kind::recv, got_b, prev},
                         {P2POp::Kind::send, self, r},
                         {P2POp::Kind::recv, got_self, r}});
  EXPECT_TRUE(test::bit_equal(got_a, dist::rank_data(DType::f32, {3, 5}, prev, 1)));
  EXPECT_TRUE(test::bit_equal(got_b, dist::rank_data(DType::f64, {2, 4}, prev, 2)));
  EXPECT_TRUE(test::bit_equal(got_self, self));
  // Separate calls between one pair keep their order.
  if (n >= 2 && r < 2) {
    const int peer = 1 - r;
    if (r == 0) {
      world.send(a, peer);
      world.send(b.view({8}), peer);
    } else {
      Tensor x = Tensor::empty({3, 5}, DType::f32), y = Tensor::empty({8}, DType::f64);
      world.recv(x, peer);
      world.recv(y, peer);
      EXPECT_TRUE(test::bit_equal(x, dist::rank_data(DType::f32, {3, 5}, peer, 1)));
      EXPECT_TRUE(test::bit_equal(y, dist::rank_data(DType::f64, {2, 4}, peer, 2).view({8})));
    }
  }
  // A short message, on a group of its own (ranks 0 and 1).
  auto pair = world.split(r < 2 ? 0 : 1, r, "p2p_pair");
  if (r < 2 && pair->size() == 2) {
    if (r == 0) {
      pair->send(Tensor::zeros({3, 4}, DType::f32), 1);
    } else {
      Tensor big = Tensor::empty({4, 4}, DType::f32);
      EXPECT_TRUE(test::contains_all(test::error_of([&] { pair->recv(big, 0); }, ErrorCode::communication),
                                     {"fewer bytes", "from rank 0"}));
    }
  }
  EXPECT_TRUE(test::contains_all(test::error_of([&] { world.send(a, n); }), {"peer", "not a rank of the group"}));
  world.barrier();
}

// A small loop for docs/model.md: one training step's schedule (+ the embedding-group sum and the
// DP gradient reduction) with PP = 2 against PP = 1 (DP = 2) on the same 2 ranks and the same
// global batch, f32. Not run by default:
//   mpiexec -n 2 dist_pipeline --gtest_also_run_disabled_tests --gtest_filter='*Benchmark*'
TEST(PipelineDist, DISABLED_BenchmarkPp2AgainstPp1) {
  Communicator& world = dist::world();
  if (world.size() != 2) GTEST_SKIP() << "the benchmark runs on 2 ranks";
  const int64_t global_sequences = 32, b = 2, steps = 8;
  for (int64_t pp : {1, 2}) {
    MoEConfig c;
    c.num_layers = 8;
    c.moe_layer_freq = {1, 0, 1, 0, 1, 0, 1, 0};
    c.hidden_size = 128;
    c.num_attention_heads = 4;
    c.num_query_groups = 2;
    c.ffn_hidden_size = 256;
    c.vocab_size = 1024;
    c.seq_length = 128;
    c.normalization = "RMSNorm";
    c.position_embedding_type = "rope";
    c.num_moe_experts = 8;
    c.moe_ffn_hidden_size = 128;
    c.moe_router_topk = 2;
    c.gated_linear_unit = true;
    c.activation_func = "silu";
    c.moe_aux_loss_coeff = {0.01};
    c.moe_token_dispatcher_type = "alltoall";
    c.pipeline_model_parallel_size = pp;
    auto groups = ProcessGroups::build(mpi_world(), parallel_sizes_from_config(c, world.size()));
    const int64_t DP = groups->dp_size(), M = global_sequences / (DP * b);
    MoEGPTModel model(c, Device::cpu(), groups);
    std::vector<MicroBatch> batches;
    for (int64_t m = 0; m < M; ++m) {
      std::vector<int64_t> tok(static_cast<size_t>(b * c.seq_length));
      for (size_t i = 0; i < tok.size(); ++i)
        tok[i] = static_cast<int64_t>(dist::mix(static_cast<uint64_t>(m * 7919 + static_cast<int64_t>(i)) +
                                                static_cast<uint64_t>(groups->dp().rank())) %
                                      static_cast<uint64_t>(c.vocab_size));
      Tensor t = Tensor::from_vector(tok, {b, c.seq_length});
      batches.push_back(MicroBatch{t, t, Tensor()});
    }
    std::vector<double> step_s, compute_s, bubble_s;
    for (int64_t s = 0; s < steps + 1; ++s) {  // the first step warms up
      model.zero_grad();
      world.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      const ScheduleResult r = run_schedule(model, batches, ForwardContext{});
      model.finish_grads_pipeline();
      finalize_grads(model.parameters(), *groups);
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s == 0) continue;
      step_s.push_back(dt);
      compute_s.push_back(r.compute_s);
      bubble_s.push_back(r.bubble_s);
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const double tokens = static_cast<double>(global_sequences * c.seq_length);
    std::printf("[rank %d] PP=%lld DP=%lld M=%lld stage %lld: step %.3f s (median of %lld), compute %.3f s, "
                "waiting in send/recv %.3f s, %.0f tokens/s\n",
                world.rank(), static_cast<long long>(pp), static_cast<long long>(DP), static_cast<long long>(M),
                static_cast<long long>(model.pipeline_rank()), median(step_s), static_cast<long long>(steps),
                median(compute_s), median(bubble_s), tokens / median(step_s));
    std::fflush(stdout);
    world.barrier();
  }
}

}  // namespace
