// train_moe_regression — a student MoE layer learns to imitate a fixed, randomly initialised teacher
// MoE layer (same config, different seed) with Adam on a mean-squared error.
//
//   train_moe_regression                                  # the default config (README's main job)
//   train_moe_regression --train-iters 500 --num-moe-experts 16 --moe-router-topk 4 --lr 3e-3
//   train_moe_regression --config cfg.json --expect-loss-drop 10
//
// Every config key is a flag (Megatron's names with dashes). Trainer flags: --train-iters,
// --lr, --min-lr, --lr-decay-style (constant|linear|cosine), --lr-warmup-iters, --seq-length, --micro-batch-size, --num-microbatches, --log-interval, --teacher-init-std,
// --threads, --expect-loss-drop X (exit 3 unless the loss falls by X times from its start).
// Prints one progress line every --log-interval steps: step, loss, aux loss, tokens/s and the
// min/max tokens any expert received.
//
// Under mpirun any valid Parallel Folding layout runs; the world size gives DP:
//   mpirun -np 4 train_moe_regression --expert-model-parallel-size 4 --moe-token-dispatcher-type alltoall
//   mpirun -np 4 train_moe_regression --tensor-model-parallel-size 2 --expert-model-parallel-size 2
// The global batch (seq-length × micro-batch-size) is split over TP·CP (sequence) and DP (batch);
// the loss is the mean over the global batch, the numbers printed are global.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/args.h"
#include "common/run_main.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

MoEConfig default_config() {
  MoEConfig c;
  c.hidden_size = 32;
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 64;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";  // swiglu
  c.moe_router_load_balancing_type = {"aux_loss"};
  c.moe_aux_loss_coeff = {1e-2};
  c.init_method_std = 0.1;
  c.seed = 1234;
  return c;
}

// Seeded N(0, 1) hidden states for one micro-batch.
Tensor make_batch(int64_t S, int64_t B, int64_t H, uint64_t seed, Device dev) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(S * B * H));
  for (float& x : v) x = d(gen);
  return Tensor::from_vector(v, {S, B, H}, dev);
}

int run(int argc, char** argv) {
  examples::Args args(argc, argv);
  MoEConfig cfg = args.has("config") ? load_config(args.get("config")) : default_config();
  const int64_t iters = args.get_int("train-iters", 2000);
  const double lr = args.get_double("lr", 1e-2);
  const double min_lr = args.get_double("min-lr", 0.0);
  const std::string decay = args.get("lr-decay-style", "cosine");
  const int64_t warmup = args.get_int("lr-warmup-iters", 0);
  const int64_t S = args.get_int("seq-length", 64), B = args.get_int("micro-batch-size", 4);
  const int64_t num_mb = args.get_int("num-microbatches", 1);
  const int64_t log_interval = args.get_int("log-interval", 200);
  const double teacher_std = args.get_double("teacher-init-std", 0.0);
  const int64_t threads = args.get_int("threads", 0);
  const double expect_drop = args.get_double("expect-loss-drop", 0.0);
  args.apply_config_flags(cfg);
  validate(cfg);
  MOE_CHECK(decay == "constant" || decay == "linear" || decay == "cosine",
            "--lr-decay-style: expected constant, linear or cosine, got '", decay, "'");
  MOE_CHECK(iters >= 1 && S >= 1 && B >= 1 && num_mb >= 1 && log_interval >= 1,
            "train-iters, seq-length, micro-batch-size, num-microbatches and log-interval must be >= 1");
  MOE_CHECK(cfg.params_dtype == "fp32", "train_moe_regression trains fp32 parameters, got params_dtype ",
            cfg.params_dtype);
  if (threads > 0) set_num_threads(static_cast<int>(threads));

  // One process, or the world of mpirun split by the config's parallel sizes.
  std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(cfg);
  std::shared_ptr<Communicator> world = groups->world_ptr();
  const bool root = world->rank() == 0;
  const TokenShard shard = token_shard(*groups, S, B);
  const double replicas = static_cast<double>(groups->dp_cp().size());

  Device dev = default_device();
  MoEConfig teacher_cfg = cfg;
  teacher_cfg.seed = cfg.seed + 1000003;
  if (teacher_std > 0) teacher_cfg.init_method_std = teacher_std;
  teacher_cfg.moe_input_jitter_eps.reset();
  MoELayer teacher(teacher_cfg, dev, groups);
  MoELayer student(cfg, dev, groups);
  Adam adam(student.parameters(), AdamConfig{lr});
  const int64_t H = cfg.hidden_size, E = cfg.num_moe_experts, T = S * B;

  if (root)
    std::printf("train_moe_regression: %s | H %lld E %lld F %lld top-%lld %s%s | %lld tokens/step | %s\n",
              get_backend(dev).name().c_str(), (long long)H, (long long)E, (long long)cfg.moe_ffn_hidden_size,
              (long long)cfg.moe_router_topk, cfg.gated_linear_unit ? "glu-" : "", cfg.activation_func.c_str(),
              (long long)(T * num_mb), build_info().c_str());
  if (root && world->size() > 1)
    std::printf("layout: world %d | tp %lld cp %lld dp %lld | ep %lld etp %lld edp %lld | dispatcher %s\n",
                world->size(), (long long)groups->tp().size(), (long long)groups->cp().size(),
                (long long)groups->dp_size(), (long long)groups->ep().size(), (long long)groups->etp().size(),
                (long long)groups->edp_size(), cfg.moe_token_dispatcher_type.c_str());

  double first_loss = -1, window_loss = 0, window_aux = 0, last_window = 0;
  int64_t window_n = 0, window_tokens = 0;
  std::vector<int64_t> window_load(static_cast<size_t>(E), 0);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= iters; ++step) {
    student.zero_grad();
    double step_loss = 0, step_aux = 0;
    for (int64_t mb = 0; mb < num_mb; ++mb) {
      Tensor x_full = make_batch(S, B, H, cfg.seed * 7919 + static_cast<uint64_t>(step * num_mb + mb), Device::cpu());
      Tensor x = take_tokens(x_full, shard).to(dev);  // (s_len, b_len, H) this rank's tokens
      ForwardContext tctx;
      tctx.training = false;
      Tensor target = teacher.forward(x, tctx);
      ForwardContext ctx;
      ctx.step = step;
      ctx.microbatch = mb;
      ctx.loss_scale = 1.0 / static_cast<double>(num_mb);
      Tensor y = student.forward(x, ctx);
      Tensor dy = Tensor::empty(y.shape(), y.dtype(), dev);
      // The mean over the global batch; the gradient is scaled by the DP·CP replicas that
      // finalize_grads averages over, so the update is that of the global mean.
      const double n = static_cast<double>(T * H);
      double sq = mse_loss(y, target, &dy, replicas / (n * static_cast<double>(num_mb)));
      student.backward(dy);
      Tensor stats = Tensor::from_vector(std::vector<double>{sq, student.last_routing().aux_loss}, {2});
      world->all_reduce(stats);
      std::vector<double> st = stats.to_vector<double>();
      step_loss += st[0] / n / static_cast<double>(num_mb);
      // aux_loss is summed over TP×CP on each rank: average the DP replicas' values.
      step_aux += st[1] / static_cast<double>(groups->tp_cp().size() * groups->dp_size() * num_mb);
      Tensor load = Tensor::from_vector(student.last_routing().tokens_per_expert, {E});
      world->all_reduce(load);
      std::vector<int64_t> lv = load.to_vector<int64_t>();
      for (int64_t e = 0; e < E; ++e) window_load[static_cast<size_t>(e)] += lv[static_cast<size_t>(e)];
      window_tokens += T;
    }
    finalize_grads(student.parameters(), *groups);
    // Megatron's schedule: linear warm-up, then constant / linear / cosine decay to min-lr.
    double lr_now = lr;
    if (step <= warmup) {
      lr_now = lr * static_cast<double>(step) / static_cast<double>(warmup);
    } else if (decay != "constant") {
      double frac = static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, iters - warmup));
      double coef = decay == "linear" ? 1.0 - frac : 0.5 * (1.0 + std::cos(3.141592653589793 * frac));
      lr_now = min_lr + (lr - min_lr) * coef;
    }
    adam.config().lr = lr_now;
    adam.step();
    student.finish_step();
    if (first_loss < 0) first_loss = step_loss;
    window_loss += step_loss;
    window_aux += step_aux;
    ++window_n;
    if (step % log_interval == 0 || step == iters) {
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      auto [mn, mx] = std::minmax_element(window_load.begin(), window_load.end());
      last_window = window_loss / static_cast<double>(window_n);
      if (root)
        std::printf("step %5lld/%lld | loss %.4e | aux loss %.4e | tokens/s %.0f | expert load min %lld max %lld\n",
                  (long long)step, (long long)iters, last_window, window_aux / static_cast<double>(window_n),
                  static_cast<double>(window_tokens) / std::max(secs, 1e-9), (long long)*mn, (long long)*mx);
      std::fflush(stdout);
      window_loss = window_aux = 0;
      window_n = window_tokens = 0;
      std::fill(window_load.begin(), window_load.end(), 0);
      t0 = std::chrono::steady_clock::now();
    }
  }
  double drop = first_loss / std::max(last_window, 1e-300);
  if (root) std::printf("done: loss %.4e -> %.4e (fell %.1fx)\n", first_loss, last_window, drop);
  if (expect_drop > 0 && !(drop >= expect_drop)) {
    if (root)
      std::fprintf(stderr, "train_moe_regression: the loss fell %.2fx, expected at least %.2fx\n", drop, expect_drop);
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("train_moe_regression", run, argc, argv); }
