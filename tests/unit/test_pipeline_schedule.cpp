// Pipeline parallelism in one process:
//   - one_f_one_b_order against hand-written 1F1B tables (PP 1, 2, 4; M < PP, M = PP, M > PP;
//     forward-only), and a simulation of all stages together: every order is causal (a stage
//     forwards micro-batch m after the previous stage did, and runs its backward after the next
//     stage's), completes, and never holds more than PP − stage micro-batches;
//   - pipeline_stage_layers: Megatron's even split and decoder_first/last_pipeline_num_layers;
//     validate_model's rules for them;
//   - per-micro-batch state: forwards of several micro-batches, then their backwards in any order,
//     give the gradients, global-aux losses and expert biases of the plain forward/backward loop,
//     for the whole model and for a lone MoE layer;
//   - run_schedule on one stage (the no-pipelining schedule) is the forward/backward loop, bit for
//     bit; the single-rank communicator's point-to-point is a copy to itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moe/dispatcher.h"
#include "moecore/moecore.h"

using namespace moe;
using test::contains_all;
using test::error_of;

namespace {

std::string order_str(const std::vector<ScheduleEvent>& order) {
  std::string s;
  for (const ScheduleEvent& e : order) {
    if (!s.empty()) s.push_back(' ');
    s.push_back(e.kind);
    s.append(std::to_string(e.microbatch));
  }
  return s;
}

TEST(PipelineSchedule, OneFOneBMatchesTheTables) {
  // Megatron's 1F1B figure: PP = 4, M = 8.
  EXPECT_EQ(order_str(one_f_one_b_order(4, 0, 8)), "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7");
  EXPECT_EQ(order_str(one_f_one_b_order(4, 1, 8)), "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7");
  EXPECT_EQ(order_str(one_f_one_b_order(4, 2, 8)), "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7");
  EXPECT_EQ(order_str(one_f_one_b_order(4, 3, 8)), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7");
  EXPECT_EQ(order_str(one_f_one_b_order(2, 0, 4)), "F0 F1 B0 F2 B1 F3 B2 B3");
  EXPECT_EQ(order_str(one_f_one_b_order(2, 1, 4)), "F0 B0 F1 B1 F2 B2 F3 B3");
  EXPECT_EQ(order_str(one_f_one_b_order(4, 0, 2)), "F0 F1 B0 B1");  // M < PP: all warm-up
  EXPECT_EQ(order_str(one_f_one_b_order(4, 2, 2)), "F0 F1 B0 B1");
  EXPECT_EQ(order_str(one_f_one_b_order(4, 3, 2)), "F0 B0 F1 B1");
  EXPECT_EQ(order_str(one_f_one_b_order(1, 0, 3)), "F0 B0 F1 B1 F2 B2");  // no pipelining
  EXPECT_EQ(order_str(one_f_one_b_order(4, 1, 3, true)), "F0 F1 F2");
  EXPECT_TRUE(contains_all(error_of([] { one_f_one_b_order(2, 2, 4); }), {"stage 2"}));
  EXPECT_TRUE(contains_all(error_of([] { one_f_one_b_order(2, 0, 0); }), {"M 0"}));
}

// All stages' orders run together, one op per stage per tick when its inputs are there: they must
// all finish (no stage waits forever), respect the data dependencies, and bound the in-flight count.
TEST(PipelineSchedule, AllStagesTogetherAreCausalAndBounded) {
  for (int64_t PP : {1, 2, 3, 4, 6})
    for (int64_t M : {1, 2, 3, 4, 5, 8, 13}) {
      SCOPED_TRACE("PP " + std::to_string(PP) + " M " + std::to_string(M));
      std::vector<std::vector<ScheduleEvent>> orders;
      for (int64_t s = 0; s < PP; ++s) orders.push_back(one_f_one_b_order(PP, s, M));
      std::vector<size_t> next(static_cast<size_t>(PP), 0);
      std::vector<std::vector<int>> fwd_done(static_cast<size_t>(PP), std::vector<int>(static_cast<size_t>(M), 0));
      std::vector<std::vector<int>> bwd_done = fwd_done;
      std::vector<int64_t> in_flight(static_cast<size_t>(PP), 0);
      bool progress = true;
      while (progress) {
        progress = false;
        std::vector<std::pair<int64_t, ScheduleEvent>> ready;
        for (int64_t s = 0; s < PP; ++s) {
          if (next[s] == orders[s].size()) continue;
          const ScheduleEvent e = orders[s][next[s]];
          const bool ok = e.kind == 'F' ? (s == 0 || fwd_done[s - 1][e.microbatch])
                                        : (fwd_done[s][e.microbatch] && (s == PP - 1 || bwd_done[s + 1][e.microbatch]));
          if (ok) ready.emplace_back(s, e);
        }
        for (const auto& [s, e] : ready) {  // this tick's ops complete together
          (e.kind == 'F' ? fwd_done : bwd_done)[s][e.microbatch] = 1;
          in_flight[s] += e.kind == 'F' ? 1 : -1;
          EXPECT_LE(in_flight[s], std::min(PP - s, M)) << "stage " << s;
          ++next[s];
          progress = true;
        }
      }
      for (int64_t s = 0; s < PP; ++s) EXPECT_EQ(next[s], orders[s].size()) << "stage " << s << " is stuck";
    }
}

MoEConfig stage_config(int64_t L, int64_t PP, std::optional<int64_t> first, std::optional<int64_t> last) {
  MoEConfig c;
  c.num_layers = L;
  c.pipeline_model_parallel_size = PP;
  c.decoder_first_pipeline_num_layers = first;
  c.decoder_last_pipeline_num_layers = last;
  return c;
}

std::string stages_str(const MoEConfig& c) {
  std::string s;
  for (int64_t p = 0; p < c.pipeline_model_parallel_size; ++p) {
    StageLayers l = pipeline_stage_layers(c, p);
    if (p) s.push_back(' ');
    s.push_back('[');
    s.append(std::to_string(l.first));
    s.push_back(',');
    s.append(std::to_string(l.first + l.count));
    s.push_back(')');
  }
  return s;
}

TEST(PipelineSchedule, StageLayersFollowMegatron) {
  EXPECT_EQ(stages_str(stage_config(8, 4, {}, {})), "[0,2) [2,4) [4,6) [6,8)");
  EXPECT_EQ(stages_str(stage_config(8, 4, 1, 1)), "[0,1) [1,4) [4,7) [7,8)");
  EXPECT_EQ(stages_str(stage_config(8, 4, 2, {})), "[0,2) [2,4) [4,6) [6,8)");
  EXPECT_EQ(stages_str(stage_config(7, 4, 1, {})), "[0,1) [1,3) [3,5) [5,7)");
  EXPECT_EQ(stages_str(stage_config(7, 4, {}, 4)), "[0,1) [1,2) [2,3) [3,7)");
  EXPECT_EQ(stages_str(stage_config(5, 2, 2, 3)), "[0,2) [2,5)");
  EXPECT_EQ(stages_str(stage_config(5, 2, {}, 4)), "[0,1) [1,5)");
  EXPECT_EQ(stages_str(stage_config(3, 1, {}, {})), "[0,3)");
}

MoEConfig model_config() {
  MoEConfig c;
  c.num_layers = 4;
  c.hidden_size = 8;
  c.num_attention_heads = 2;
  c.vocab_size = 11;
  c.seq_length = 6;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 6;
  c.ffn_hidden_size = 10;
  c.moe_layer_freq = {1, 0, 1, 1};
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_router_load_balancing_type = {"aux_loss", "global_aux_loss"};
  c.moe_aux_loss_coeff = {0.1};
  c.moe_z_loss_coeff = 0.01;
  c.moe_router_score_function = "sigmoid";
  c.moe_router_enable_expert_bias = true;
  c.moe_router_bias_update_rate = 0.25;
  c.moe_shared_expert_intermediate_size = 4;
  c.moe_shared_expert_gate = true;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.params_dtype = "fp64";
  c.init_method_std = 0.5;
  c.seed = 11;
  return c;
}

TEST(PipelineSchedule, ValidateModelChecksTheSplit) {
  MoEConfig c = model_config();
  c.pipeline_model_parallel_size = 2;
  EXPECT_NO_THROW(validate_model(c, 2));
  c.pipeline_model_parallel_size = 3;
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c, 3); }),
                           {"num_layers = 4", "pipeline_model_parallel_size = 3", "decoder_first_pipeline_num_layers"}));
  c.decoder_first_pipeline_num_layers = 2;  // 2 | 1 | 1
  EXPECT_NO_THROW(validate_model(c, 3));
  c.decoder_first_pipeline_num_layers = 1;  // 1 | 3 layers over 2 stages
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c, 3); }), {"leaves 3 layers", "2 other stage(s)"}));
  c.decoder_last_pipeline_num_layers = 2;  // 1 | 1 | 2
  EXPECT_NO_THROW(validate_model(c, 3));
  c.decoder_last_pipeline_num_layers = 3;  // nothing left for the middle stage
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c, 3); }), {"leaves 0 layers", "1 other stage(s)"}));
  c.decoder_last_pipeline_num_layers = 0;
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c, 3); }), {"decoder_last_pipeline_num_layers must be > 0"}));
  c = model_config();
  c.decoder_first_pipeline_num_layers = 4;
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c); }), {"pipeline_model_parallel_size > 1"}));
  c = model_config();
  c.pipeline_model_parallel_size = 2;
  EXPECT_TRUE(contains_all(error_of([&] { validate_model(c, 3); }), {"world size 3", "pipeline_model_parallel_size"}));
  EXPECT_TRUE(contains_all(error_of([&] { MoEGPTModel m(c, Device::cpu()); }), {"world size 1"}));
  EXPECT_TRUE(is_config_key("decoder_first_pipeline_num_layers"));
  EXPECT_EQ(config_from_json(R"({"decoder_last_pipeline_num_layers": 3})").decoder_last_pipeline_num_layers, 3);
}

MicroBatch batch_of(const MoEConfig& c, int64_t b, uint64_t seed) {
  std::vector<int64_t> tok(static_cast<size_t>(b * c.seq_length)), lab(tok.size());
  std::vector<float> mask(tok.size(), 1.0f);
  uint64_t x = seed * 2654435761ull + 12345;
  for (size_t i = 0; i < tok.size(); ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    tok[i] = static_cast<int64_t>((x >> 33) % static_cast<uint64_t>(c.vocab_size));
    lab[i] = static_cast<int64_t>((x >> 17) % static_cast<uint64_t>(c.vocab_size));
    if (i % 4 == 1) mask[i] = 0.0f;
  }
  return MicroBatch{Tensor::from_vector(tok, {b, c.seq_length}), Tensor::from_vector(lab, {b, c.seq_length}),
                    Tensor::from_vector(mask, {b, c.seq_length})};
}

struct Step {
  std::vector<double> losses, aux;
  std::map<std::string, std::vector<double>> grads, values;
};

Step collect(MoEGPTModel& model) {
  Step s;
  model.finish_step();
  for (Parameter* p : model.parameters()) {
    if (p->trainable) s.grads[p->name] = test::to_f64(p->grad);
    else s.values[p->name] = test::to_f64(p->value);
  }
  return s;
}

double aux_of(MoEGPTModel& model) {
  double a = 0.0;
  for (int64_t i = 0; i < model.num_layers(); ++i)
    if (MoELayer* l = model.moe_layer(i)) a += l->last_routing().aux_loss;
  return a;
}

// The plain loop: forward m, backward m.
Step sequential(const MoEConfig& c, const std::vector<MicroBatch>& mbs) {
  MoEGPTModel model(c, Device::cpu());
  Step s;
  for (size_t m = 0; m < mbs.size(); ++m) {
    ForwardContext ctx;
    ctx.microbatch = static_cast<int64_t>(m);
    ctx.loss_scale = 1.0 / static_cast<double>(mbs.size());
    s.losses.push_back(model.forward(mbs[m], ctx));
    s.aux.push_back(aux_of(model));
    model.backward();
  }
  Step r = collect(model);
  r.losses = s.losses;
  r.aux = s.aux;
  return r;
}

void expect_same(const Step& a, const Step& b, double tol) {
  EXPECT_TRUE(test::all_close(a.losses, b.losses, tol, tol));
  EXPECT_TRUE(test::all_close(a.aux, b.aux, tol, tol)) << "aux + global aux losses";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (const auto& [name, g] : a.grads) EXPECT_TRUE(test::all_close(g, b.grads.at(name), tol, tol)) << name;
  for (const auto& [name, v] : a.values) EXPECT_EQ(v, b.values.at(name)) << name << " (expert bias after the step)";
}

// Forwards of every micro-batch first, then the backwards in a shuffled order: the same step.
TEST(PipelineSchedule, MicroBatchesInFlightGiveTheSameStep) {
  const MoEConfig c = model_config();
  std::vector<MicroBatch> mbs;
  for (int64_t m = 0; m < 4; ++m) mbs.push_back(batch_of(c, 1 + m % 2, 40 + static_cast<uint64_t>(m)));
  const Step want = sequential(c, mbs);

  MoEGPTModel model(c, Device::cpu());
  Step got;
  for (size_t m = 0; m < mbs.size(); ++m) {
    ForwardContext ctx;
    ctx.microbatch = static_cast<int64_t>(m);
    ctx.loss_scale = 0.25;
    double loss = 0.0;
    EXPECT_FALSE(model.forward_stage(mbs[m], ctx, Tensor(), &loss).defined()) << "one stage: nothing to send";
    got.losses.push_back(loss);
    got.aux.push_back(aux_of(model));
    EXPECT_EQ(model.pending_microbatches(), static_cast<int64_t>(m) + 1);
    for (int64_t i : {0, 2, 3}) EXPECT_EQ(model.moe_layer(i)->pending_microbatches(), static_cast<int64_t>(m) + 1);
  }
  const int64_t held = model.saved_activation_bytes();
  EXPECT_GT(held, 0);
  for (int64_t m : {2, 0, 3, 1}) EXPECT_FALSE(model.backward_stage(m, Tensor()).defined());
  EXPECT_EQ(model.pending_microbatches(), 0);
  EXPECT_EQ(model.saved_activation_bytes(), 0);
  EXPECT_TRUE(contains_all(error_of([&] { model.backward_stage(1, Tensor()); }), {"micro-batch 1", "no pending"}));
  Step r = collect(model);
  r.losses = got.losses;
  r.aux = got.aux;
  expect_same(r, want, 1e-12);
}

// A lone MoE layer: forwards of three micro-batches, backwards in reverse, the plain loop's results.
TEST(PipelineSchedule, MoELayerKeepsEachMicroBatch) {
  MoEConfig c = model_config();
  c.num_layers = 0;
  c.moe_layer_freq = {1};
  c.hidden_size = 8;
  c.moe_ffn_hidden_size = 6;
  c.recompute_granularity = "selective";
  c.recompute_modules = {"moe_act", "shared_experts"};
  std::vector<Tensor> xs, gs;
  for (int m = 0; m < 3; ++m) {
    xs.push_back(test::randn({5 + m, 2, 8}, DType::f64, 100 + static_cast<uint64_t>(m)));
    gs.push_back(test::randn({5 + m, 2, 8}, DType::f64, 200 + static_cast<uint64_t>(m)));
  }
  auto ctx_of = [](int m) {
    ForwardContext ctx;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / 3.0;
    return ctx;
  };
  MoELayer a(c, Device::cpu()), b(c, Device::cpu());
  std::vector<Tensor> dx_a, dx_b, out_a, out_b;
  for (int m = 0; m < 3; ++m) {
    out_a.push_back(a.forward(xs[m], ctx_of(m)));
    dx_a.push_back(a.backward(gs[m]));
  }
  for (int m = 0; m < 3; ++m) out_b.push_back(b.forward(xs[m], ctx_of(m)));
  EXPECT_EQ(b.pending_microbatches(), 3);
  EXPECT_EQ(b.dispatcher().pending(), 3);
  EXPECT_EQ(b.router().pending(), 3);
  dx_b.resize(3);
  for (int m : {2, 0, 1}) dx_b[m] = b.backward(gs[m], m);
  EXPECT_EQ(b.pending_microbatches(), 0);
  EXPECT_EQ(b.dispatcher().pending(), 0);
  EXPECT_EQ(b.router().pending(), 0);
  EXPECT_EQ(b.saved_device_bytes(), 0);
  for (int m = 0; m < 3; ++m) {
    EXPECT_TRUE(test::bit_equal(out_a[m], out_b[m])) << "output " << m;
    EXPECT_TRUE(test::bit_equal(dx_a[m], dx_b[m])) << "input gradient " << m;
  }
  std::vector<Parameter*> pa = a.parameters(), pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    if (pa[i]->trainable) {
      EXPECT_TRUE(test::all_close(pb[i]->grad, pa[i]->grad, 1e-13, 1e-12)) << pa[i]->name;
    }
  a.finish_step();
  b.finish_step();
  EXPECT_TRUE(test::bit_equal(a.router().expert_bias().value, b.router().expert_bias().value));
  EXPECT_TRUE(contains_all(error_of([&] { b.backward(gs[0], 0); }), {"micro-batch 0", "no pending forward"}));
}

// One stage: run_schedule is the forward/backward loop, bit for bit, with the loop's order.
TEST(PipelineSchedule, NoPipeliningScheduleIsTheLoop) {
  const MoEConfig c = model_config();
  std::vector<MicroBatch> mbs;
  for (int64_t m = 0; m < 3; ++m) mbs.push_back(batch_of(c, 2, 70 + static_cast<uint64_t>(m)));
  MoEGPTModel loop(c, Device::cpu()), sched(c, Device::cpu());
  double loop_loss = 0.0;
  for (int64_t m = 0; m < 3; ++m) {
    ForwardContext ctx;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / 3.0;
    loop_loss += loop.forward(mbs[static_cast<size_t>(m)], ctx) / 3.0;
    loop.backward();
  }
  ScheduleOptions opt;
  opt.record_order = true;
  std::vector<int64_t> after_f, after_b;
  opt.after_forward = [&](int64_t m) { after_f.push_back(m); };
  opt.after_backward = [&](int64_t m) { after_b.push_back(m); };
  const ScheduleResult r = run_schedule(sched, mbs, ForwardContext{}, opt);
  EXPECT_EQ(order_str(r.order), "F0 B0 F1 B1 F2 B2");
  EXPECT_EQ(after_f, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(after_b, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_NEAR(r.loss, loop_loss, 1e-14);
  EXPECT_EQ(r.max_in_flight, 1);
  EXPECT_EQ(r.bubble_s, 0.0);  // nothing to wait for
  sched.finish_grads_pipeline();  // a no-op on one stage
  std::vector<Parameter*> pl = loop.parameters(), ps = sched.parameters();
  ASSERT_EQ(pl.size(), ps.size());
  for (size_t i = 0; i < pl.size(); ++i)
    if (pl[i]->trainable) {
      EXPECT_TRUE(test::bit_equal(pl[i]->grad, ps[i]->grad)) << pl[i]->name;
    }
  EXPECT_EQ(sched.embedding_group(), nullptr);
  EXPECT_EQ(sched.shared_embedding_copy(), nullptr);
  EXPECT_TRUE(contains_all(error_of([&] { run_schedule(sched, {}, ForwardContext{}); }), {"no micro-batches"}));
  // A forward left without its backward (evaluation) does not stop the next step.
  ForwardContext eval;
  eval.training = false;
  sched.forward(mbs[0], eval);
  EXPECT_EQ(sched.pending_microbatches(), 1);
  EXPECT_EQ(run_schedule(sched, mbs, ForwardContext{}).max_in_flight, 1);
  EXPECT_EQ(sched.pending_microbatches(), 0);
}

TEST(PipelineSchedule, SingleRankPointToPointIsACopy) {
  auto comm = make_single_communicator("pp");
  Tensor src = test::randn({3, 4}, DType::f32, 5), dst = Tensor::zeros({3, 4}, DType::f32);
  comm->batch_send_recv({P2POp{P2POp::Kind::send, src, 0}, P2POp{P2POp::Kind::recv, dst, 0}});
  EXPECT_TRUE(test::bit_equal(src, dst));
  Tensor other = Tensor::zeros({4, 3}, DType::f32);
  EXPECT_TRUE(contains_all(error_of([&] { comm->recv(other, 0); }), {"0 send(s)"}));
  EXPECT_TRUE(contains_all(
      error_of([&] { comm->batch_send_recv({P2POp{P2POp::Kind::send, src, 0}, P2POp{P2POp::Kind::recv, other, 0}}); }),
      {"matching receive expects"}));
  EXPECT_TRUE(contains_all(error_of([&] { comm->send(src, 1); }), {"peer 1"}));
}

}  // namespace
