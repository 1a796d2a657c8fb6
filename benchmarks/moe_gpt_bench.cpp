// moe_gpt_bench — the MoE GPT model's forward + backward (lm loss and router losses) on the CPU, timed.
//
//   moe_gpt_bench --preset mixtral-cpu --threads 2
//   moe_gpt_bench --num-layers 2 --hidden-size 1024 --num-attention-heads 8 --group-query-attention
//                 --num-query-groups 2 --moe-ffn-hidden-size 2816 --num-moe-experts 8 --moe-router-topk 2
//                 --vocab-size 16384 --seq-length 1024 --micro-batch-size 1 --normalization RMSNorm
//                 --position-embedding-type rope --untie-embeddings-and-output-weights --swiglu
//
// Flags are Megatron's names: any libmoecore config key (docs/model.md: --num-layers,
// --num-attention-heads, --num-query-groups, --kv-channels, --ffn-hidden-size, --vocab-size,
// --seq-length, --normalization, --position-embedding-type, --rotary-base, --qk-layernorm,
// --moe-layer-freq 0,1,1, and the MoE keys of moe_layer_bench), plus
//   --micro-batch-size b     sequences per step (Megatron's name)        --iters N    measured steps
//   --warmup W               unmeasured steps first                       --threads P  CPU threads (0: as is)
//   --preset NAME            start from mixtral-cpu or deepseek-cpu (flags then override)
//   --swiglu                 gated_linear_unit + silu (the default here)
//   --group-query-attention  accepted for Megatron's command lines (--num-query-groups is what counts)
//   --disable-bias-linear    accepted (the library has no linear biases)
//   --sgemm-reps R           calls of the dense-SGEMM reference (0: skip it), default 3
//   --breakdown              also time each module alone at the model's shapes (--breakdown-reps, 3)
//   --smoke                  one tiny step (CI): a 2-layer model (dense + MoE) unless a preset is given
// Defaults (no --preset): the mixtral-cpu preset's values (the table then says "custom"); fp32,
// aux_loss 1e-2, seed 1234; tokens and labels uniform random ids (seeded), every token in the loss.
//
// Prints the CPU and the GEMM engine, a table (median step time over the measured steps, forward and
// backward apart, tokens/s, GFLOP/s of the model's FLOPs counted as Megatron-LM counts them —
// bench::model_flops in bench_common.h —, the dense-SGEMM reference, memory), optionally the
// per-module breakdown, then as its last two lines
//   sgemm_gflops=<r> efficiency=<e> rss_peak_bytes=<m>
//   tokens_per_s=<x> gflops=<y> peak_bytes=<z> activation_bytes=<a>
// (activation_bytes: the allocator's current bytes right after the last forward minus right before
// it, what the forward keeps for the backward; Megatron's recompute / offload flags change it,
// docs/memory.md)
// peak_bytes: the allocator's peak during the steps above what was held before the first forward
// (parameters and their gradients); rss_peak_bytes: the resident-set high-water mark over the steps
// above the resident set before the first forward (as moe_layer_bench measures both). The SGEMM
// reference is moe_layer_bench's: one OpenBLAS SGEMM on its own threads at the MoE layer's shape
// M = T·k, N = F1 + F, K = H (every expert's forward fused into one call; the MoE layers are most of
// the model's FLOPs), measured at the start of the run.
#include <malloc.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/args.h"
#include "common/run_main.h"
#include "model/modules.h"  // Norm, SelfAttention, SeqBatch: the per-module breakdown
#include "moecore/moecore.h"

using namespace moe;

namespace {

// The fastest of `reps` calls of fn() after one warm-up call, in seconds (the breakdown runs on a
// shared machine: the minimum is the least disturbed estimate of a module's own cost).
double time_best(int64_t reps, const std::function<void()>& fn) {
  double best = 0.0;
  for (int64_t r = 0; r <= reps; ++r) {
    const double t0 = bench::now_s();
    fn();
    const double dt = bench::now_s() - t0;
    if (r == 1 || (r > 1 && dt < best)) best = dt;
  }
  return best;
}

Tensor arange_i64(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return Tensor::from_vector(v, {n});
}

struct BreakdownRow {
  std::string name;
  int64_t count;    // instances per step
  double seconds;   // one instance, forward + backward
  double flops;     // one instance (Megatron's count; 0: not counted)
  bool part;        // a part of the row above (not added to the total)
};

// Each module of the model alone, at the model's shapes (T = b·S tokens, one process), forward +
// backward, the best of `reps` after a warm-up: what one step spends where. Inputs are random; the
// modules have their own parameters.
void print_breakdown(const MoEConfig& c, int64_t b, int64_t reps, double step_s) {
  const Device cpu = Device::cpu();
  const DType dt = dtype_from_name(c.params_dtype);  // f32, or bf16 under --bf16: what the model runs
  const DType st_dt = ops::stat_dtype_for(dt);  // softmax statistics (lse, row max, sums)
  auto rnd = [dt](const Shape& shape, uint64_t seed, float scale = 1.0f) { return bench::randn(shape, seed, scale).to_dtype(dt); };
  const int64_t S = c.seq_length, T = b * S, H = c.hidden_size, V = c.vocab_size, L = c.num_layers;
  const int64_t nh = c.num_attention_heads, ng = c.query_groups(), hd = c.head_dim();
  const int64_t rd = c.position_embedding_type == "rope"
                         ? static_cast<int64_t>(static_cast<double>(hd) * c.rotary_percent)
                         : 0;
  int64_t L_moe = 0;
  for (int64_t i = 0; i < L; ++i) L_moe += c.is_moe_layer(i) ? 1 : 0;
  const int64_t L_dense = L - L_moe;
  const double f = c.gated_linear_unit ? 3.0 : 2.0;
  const double dT = static_cast<double>(T), dH = static_cast<double>(H);
  std::vector<BreakdownRow> rows;
  Tensor x = rnd({T, H}, 3);
  Tensor dy = rnd({T, H}, 4, 1e-2f);

  {  // embedding: word rows (+ learned positions), forward and the gradient's scatter-add
    Tensor ids = bench::random_ids(1, T, V, 5).view({T});
    Tensor table = rnd({V, H}, 6, 0.02f), dtable = Tensor::zeros({V, H}, dt);
    Tensor pos_table, dpos, pos_ids;
    if (c.position_embedding_type == "learned_absolute") {
      pos_table = rnd({S, H}, 7, 0.02f);
      dpos = Tensor::zeros({S, H}, dt);
      std::vector<int64_t> p(static_cast<size_t>(T));
      for (int64_t s = 0; s < S; ++s)
        for (int64_t bi = 0; bi < b; ++bi) p[static_cast<size_t>(s * b + bi)] = s;
      pos_ids = Tensor::from_vector(p, {T});
    }
    Tensor out = Tensor::empty({T, H}, dt);
    rows.push_back({"embedding", 1, time_best(reps, [&] {
                      ops::embedding_fwd(ids, table, 0, out, false);
                      if (pos_table.defined()) ops::embedding_fwd(pos_ids, pos_table, 0, out, true);
                      if (pos_table.defined()) ops::embedding_bwd(pos_ids, dy, 0, dpos);
                      ops::embedding_bwd(ids, dy, 0, dtable);
                    }),
                    0.0, false});
  }
  {  // the (2L + 1) norms over H
    Norm norm(c, cpu, "bench.norm", H);
    ActivationStore st;
    rows.push_back({c.normalization + " (H)", 2 * L + 1, time_best(reps, [&] {
                      Tensor y = norm.forward(x, st, "n");
                      Tensor dx = norm.backward(dy, st, "n");
                    }),
                    0.0, false});
  }
  {  // attention: the module, then its parts
    SelfAttention att(c, cpu, "bench.attention.", nullptr, nullptr);
    SeqBatch seq;
    seq.b = b, seq.s_cp = S, seq.s_loc = S;
    seq.q_pos = arange_i64(S);
    seq.k_pos = arange_i64(S);
    ActivationStore st;
    const double q = static_cast<double>(nh * hd), kv = static_cast<double>(ng * hd);
    const double lin_flops = dT * 6.0 * (dH * (q + 2.0 * kv) + q * dH);
    const double core_flops = static_cast<double>(b) * static_cast<double>(S) * static_cast<double>(S) * 6.0 * q;
    rows.push_back({"attention (module)", L, time_best(reps, [&] {
                      Tensor y = att.forward(x, seq, st);
                      Tensor dx = att.backward(dy, seq, st);
                    }),
                    lin_flops + core_flops, false});
    // linear_qkv and linear_proj: forward, dgrad, wgrad
    const int64_t Q = (nh + 2 * ng) * hd;
    Tensor Wqkv = rnd({Q, H}, 8, 0.02f), dWqkv = Tensor::zeros({Q, H}, dt);
    Tensor Wp = rnd({H, nh * hd}, 9, 0.02f), dWp = Tensor::zeros({H, nh * hd}, dt);
    Tensor dqkv = rnd({T, Q}, 10, 1e-2f), ctxt = rnd({T, nh * hd}, 11);
    rows.push_back({"  linear_qkv + linear_proj GEMMs", L, time_best(reps, [&] {
                      Tensor qkv = ops::matmul(x, false, Wqkv, true);
                      Tensor y = ops::matmul(ctxt, false, Wp, true);
                      ops::gemm(dy, true, ctxt, false, dWp, 1.0, 1.0);
                      Tensor dctx = ops::matmul(dy, false, Wp, false);
                      ops::gemm(dqkv, true, x, false, dWqkv, 1.0, 1.0);
                      Tensor dx = ops::matmul(dqkv, false, Wqkv, false);
                    }),
                    lin_flops, true});
    // core attention (flash-style kernel)
    Tensor q4 = rnd({S, b, nh, hd}, 12), k4 = rnd({S, b, ng, hd}, 13);
    Tensor v4 = rnd({S, b, ng, hd}, 14), do4 = rnd({S, b, nh, hd}, 15, 1e-2f);
    Tensor o = Tensor::empty({S, b, nh, hd}, dt), lse = Tensor::empty({b, nh, S}, st_dt);
    Tensor dq = Tensor::empty({S, b, nh, hd}, dt), dk = Tensor::empty({S, b, ng, hd}, dt);
    Tensor dv = Tensor::empty({S, b, ng, hd}, dt);
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    const double t_fwd = time_best(reps, [&] { ops::attention_fwd(scale, seq.q_pos, seq.k_pos, q4, k4, v4, o, lse); });
    const double t_bwd = time_best(reps, [&] {
      ops::attention_bwd(scale, seq.q_pos, seq.k_pos, q4, k4, v4, o, lse, do4, dq, dk, dv);
    });
    rows.push_back({"  core attention fwd", L, t_fwd, core_flops / 3.0, true});
    rows.push_back({"  core attention bwd", L, t_bwd, core_flops * 2.0 / 3.0, true});
    // rope (q and k, forward and inverse), the qkv split / merge, the q/k norms
    Tensor qkv = rnd({T, Q}, 16);
    Tensor qs = Tensor::empty({T, nh, hd}, dt), ks = Tensor::empty({T, ng, hd}, dt);
    Tensor vs = Tensor::empty({T, ng, hd}, dt);
    rows.push_back({"  qkv split + merge", L, time_best(reps, [&] {
                      ops::qkv_split(qkv, ng, nh / ng, qs, ks, vs);
                      ops::qkv_merge(qs, ks, vs, ng, nh / ng, qkv);
                    }),
                    0.0, true});
    if (rd > 0)
      rows.push_back({"  rope (q, k; fwd + bwd)", L, time_best(reps, [&] {
                        ops::rope(seq.q_pos, rd, c.rotary_base, false, q4, q4);
                        ops::rope(seq.q_pos, rd, c.rotary_base, false, k4, k4);
                        ops::rope(seq.q_pos, rd, c.rotary_base, true, q4, q4);
                        ops::rope(seq.q_pos, rd, c.rotary_base, true, k4, k4);
                      }),
                      0.0, true});
    if (c.qk_layernorm) {
      Norm qn(c, cpu, "bench.q_norm", hd), kn(c, cpu, "bench.k_norm", hd);
      ActivationStore qs_st;
      Tensor qx = q4.view({T * nh, hd}), kx = k4.view({T * ng, hd});
      Tensor dqx = do4.view({T * nh, hd}), dkx = dk.view({T * ng, hd});
      rows.push_back({"  q/k " + c.normalization + " (hd)", L, time_best(reps, [&] {
                        Tensor a = qn.forward(qx, qs_st, "q");
                        Tensor bb = kn.forward(kx, qs_st, "k");
                        Tensor da = qn.backward(dqx, qs_st, "q");
                        Tensor db = kn.backward(dkx, qs_st, "k");
                      }),
                      0.0, true});
    }
  }
  if (L_moe > 0) {  // the MoE layer, as the model runs it ((S, b, H), loss scale 1)
    MoELayer moe(c, cpu, nullptr, 1, "bench.");
    ForwardContext ctx;
    ctx.seq_length = S;
    ctx.batch_size = b;
    int64_t step = 0;
    const double Fm = static_cast<double>(c.moe_ffn_hidden_size);
    const double Fs = static_cast<double>(c.moe_shared_expert_intermediate_size.value_or(0));
    rows.push_back({"MoE layer", L_moe, time_best(reps, [&] {
                      ctx.step = step++;
                      Tensor y = moe.forward(x.view({S, b, H}), ctx);
                      Tensor dx = moe.backward(dy.view({S, b, H}));
                      moe.finish_step();
                    }),
                    dT * 6.0 * dH * (static_cast<double>(c.moe_router_topk) * Fm * f + Fs * f), false});
  }
  if (L_dense > 0) {  // the dense MLP (ffn_hidden_size)
    const int64_t Fd = c.dense_ffn();
    SharedExperts mlp(c, cpu, nullptr, "bench.mlp.", MlpSpec{"bench.mlp.", Fd, false});
    ActivationStore st;
    rows.push_back({"dense MLP", L_dense, time_best(reps, [&] {
                      Tensor y = mlp.forward(x, st);
                      Tensor dx;
                      mlp.backward(dy, dx, st);
                    }),
                    dT * 6.0 * dH * static_cast<double>(Fd) * f, false});
  }
  {  // the output layer's three GEMMs, then the cross entropy on its logits
    Tensor W = rnd({V, H}, 17, 0.02f), dW = Tensor::zeros({V, H}, dt);
    Tensor logits;
    rows.push_back({"output layer GEMMs", 1, time_best(reps, [&] {
                      logits = ops::matmul(x, false, W, true);
                      ops::gemm(logits, true, x, false, dW, 1.0, 1.0);
                      Tensor dh = ops::matmul(logits, false, W, false);
                    }),
                    dT * 6.0 * dH * static_cast<double>(V), false});
    Tensor labels = bench::random_ids(1, T, V, 18).view({T});
    Tensor row_max = Tensor::empty({T}, st_dt), sums = Tensor::empty({2, T}, st_dt);
    Tensor sum_exp = sums.narrow(0, 1).view({T}), target = sums.narrow(1, 1).view({T});
    Tensor grad = Tensor::from_vector(std::vector<float>(static_cast<size_t>(T), 1.0f / static_cast<float>(T)), {T})
                      .to_dtype(st_dt);  // (T) stat
    rows.push_back({"cross entropy (V)", 1, time_best(reps, [&] {
                      ops::xent_max(logits, row_max);
                      ops::xent_sum(logits, labels, 0, row_max, sum_exp, target);
                      ops::xent_bwd(logits, labels, 0, row_max, sum_exp, grad, logits);  // in place, as the model
                    }),
                    0.0, false});
  }
  {  // the residual adds (two per layer forward, two backward)
    Tensor y = rnd({T, H}, 19);
    rows.push_back({"residual adds", 4 * L, time_best(reps, [&] { ops::add_(y, x); }), 0.0, false});
  }

  std::printf("\nper-module breakdown: each module alone at the model's shapes (T = %lld), forward + backward,\n"
              "best of %lld after a warm-up; 'x count' = its time per step; GFLOP/s by Megatron's count\n",
              static_cast<long long>(T), static_cast<long long>(reps));
  std::printf("%-36s %6s %10s %11s %8s %9s\n", "module", "count", "ms each", "ms x count", "% step", "GFLOP/s");
  double sum = 0.0;
  for (const BreakdownRow& r : rows) {
    const double per_step = r.seconds * static_cast<double>(r.count);
    if (!r.part) sum += per_step;
    char gf[32] = "-";
    if (r.flops > 0) std::snprintf(gf, sizeof gf, "%.1f", r.flops / r.seconds * 1e-9);
    std::printf("%-36s %6lld %10.2f %11.2f %7.1f%% %9s\n", r.name.c_str(), static_cast<long long>(r.count),
                r.seconds * 1e3, per_step * 1e3, 100.0 * per_step / step_s, gf);
  }
  std::printf("%-36s %6s %10s %11.2f %7.1f%%\n", "sum of the modules", "", "", sum * 1e3, 100.0 * sum / step_s);
  std::printf("%-36s %6s %10s %11.2f %7.1f%%\n", "the model's step (measured above)", "", "", step_s * 1e3, 100.0);
  std::printf("%-36s %6s %10s %11.2f %7.1f%%\n", "rest (loss on the host, glue)", "", "", (step_s - sum) * 1e3,
              100.0 * (step_s - sum) / step_s);
}

int run(int argc, char** argv) {
  examples::Args args(argc, argv,
                      {"smoke", "swiglu", "breakdown", "group-query-attention", "disable-bias-linear",
                       "untie-embeddings-and-output-weights", "qk-layernorm", "moe-router-enable-expert-bias",
                       "moe-router-pre-softmax", "gated-linear-unit", "moe-shared-expert-gate", "bf16",
                       "fine-grained-activation-offloading"});
  const bool smoke = args.get("smoke", "false") == "true";
  const std::string preset = args.get("preset", "");
  MoEConfig cfg;
  int64_t b = 1;
  if (!preset.empty() || !smoke) {
    const std::string name = preset.empty() ? "mixtral-cpu" : preset;
    const bench::NamedModel* n = bench::find_model(name);
    MOE_CHECK(n != nullptr, "--preset: expected mixtral-cpu or deepseek-cpu, got '", name, "'");
    cfg = n->cfg;
    b = n->micro_batch;
  } else {  // smoke: a dense layer and an MoE layer, GQA, rope, RMSNorm, q/k norm, untied output
    cfg = bench::base_model_config();
    cfg.num_layers = 2, cfg.moe_layer_freq = {0, 1}, cfg.hidden_size = 64, cfg.num_attention_heads = 4;
    cfg.num_query_groups = 2, cfg.qk_layernorm = true, cfg.ffn_hidden_size = 128;
    cfg.moe_ffn_hidden_size = 64, cfg.num_moe_experts = 4, cfg.moe_router_topk = 2;
    cfg.vocab_size = 256, cfg.seq_length = 32;
    b = 2;
  }
  b = args.get_int("micro-batch-size", b);
  const int64_t iters = args.get_int("iters", smoke ? 1 : 3);
  const int64_t warmup = args.get_int("warmup", smoke ? 0 : 1);
  const int64_t threads = args.get_int("threads", 0);
  const int64_t sgemm_reps = args.get_int("sgemm-reps", smoke ? 0 : 3);
  const bool breakdown = args.get("breakdown", "false") == "true";
  const int64_t breakdown_reps = args.get_int("breakdown-reps", smoke ? 1 : 3);
  if (args.get("swiglu", "false") == "true") {
    cfg.gated_linear_unit = true;
    cfg.activation_func = "silu";
  }
  (void)args.get("group-query-attention", "false");  // Megatron's switch; num_query_groups decides here
  if (args.get("disable-bias-linear", "false") == "true") cfg.add_bias_linear = false;
  if (args.get("bf16", "false") == "true") cfg.params_dtype = "bf16";  // Megatron's --bf16
  args.apply_config_flags(cfg);
  cfg = resolve_model_config(cfg);
  validate_model(cfg);
  MOE_CHECK(b >= 1 && iters >= 1 && warmup >= 0 && sgemm_reps >= 0 && breakdown_reps >= 1,
            "--micro-batch-size, --iters and --breakdown-reps must be >= 1, --warmup and --sgemm-reps >= 0");
  MOE_CHECK(cfg.params_dtype == "fp32" || cfg.params_dtype == "bf16", "moe_gpt_bench measures fp32 or bf16, got params_dtype ",
            cfg.params_dtype);
  if (threads > 0) set_num_threads(static_cast<int>(threads));
  const int64_t S = cfg.seq_length, V = cfg.vocab_size, T = b * S;

  // The reference first, before any of the model's OpenMP threads exist.
  const double ref = sgemm_reps > 0 ? bench::layer_reference_gflops(cfg, T, static_cast<int>(sgemm_reps)) : 0.0;

  Backend& cpu = get_backend(Device::cpu());
  const double t_init0 = bench::now_s();
  MoEGPTModel model(cfg, Device::cpu());
  model.zero_grad();
  const double t_init = bench::now_s() - t_init0;
  MicroBatch batch{bench::random_ids(b, S, V, 1), bench::random_ids(b, S, V, 2), Tensor()};
  int64_t n_params = 0;
  for (Parameter* p : model.parameters()) n_params += p->value.numel();

  malloc_trim(0);  // free heap pages left by the setup go back to the OS: the growth below counts every page
  const bool rss_reset = bench::reset_rss_high_water();
  const int64_t rss_base = bench::current_rss_bytes();
  cpu.reset_peak_memory();
  const int64_t alloc_base = cpu.memory_stats().current_bytes;

  std::vector<double> t_fwd, t_bwd, t_step;
  double loss_first = 0.0, loss_last = 0.0, aux = 0.0;
  int64_t activation_bytes = 0;  // allocator bytes the forward leaves for the backward (docs/memory.md)
  for (int64_t it = 0; it < warmup + iters; ++it) {
    ForwardContext ctx;
    ctx.step = it;
    const int64_t before_fwd = cpu.memory_stats().current_bytes;
    const double t0 = bench::now_s();
    const double loss = model.forward(batch, ctx);
    const double t1 = bench::now_s();
    activation_bytes = cpu.memory_stats().current_bytes - before_fwd;
    model.backward();
    const double t2 = bench::now_s();
    aux = 0.0;
    for (int64_t i = 0; i < model.num_layers(); ++i)
      if (MoELayer* l = model.moe_layer(i)) aux += l->last_routing().aux_loss;
    model.finish_step();  // expert-bias updates (a few E-sized host ops), outside the timed step
    if (it == 0) loss_first = loss;
    loss_last = loss;
    if (it < warmup) continue;
    t_fwd.push_back(t1 - t0);
    t_bwd.push_back(t2 - t1);
    t_step.push_back(t2 - t0);
  }
  const int64_t peak_bytes = cpu.memory_stats().peak_bytes - alloc_base;
  const int64_t rss_peak = rss_reset ? bench::rss_high_water_bytes() - rss_base : -1;

  const double step = bench::median(t_step);
  const bench::ModelFlops fl = bench::model_flops(cfg, b);
  const double flops = fl.total();
  const double tokens_per_s = static_cast<double>(T) / step;
  const double gflops = flops / step * 1e-9;

  int64_t L_moe = 0;
  for (int64_t i = 0; i < cfg.num_layers; ++i) L_moe += cfg.is_moe_layer(i) ? 1 : 0;
  std::printf("moe_gpt_bench  %s; threads %d\n", build_info().c_str(), num_threads());
  std::printf("cpu: %s\n", bench::cpu_model_name().c_str());
  std::printf("precision: %s\n", cfg.params_dtype.c_str());
  std::printf("config: %s L=%lld (MoE %lld) H=%lld heads=%lld groups=%lld hd=%lld%s %s %s%s V=%lld%s S=%lld b=%lld\n",
              preset.empty() ? (smoke ? "smoke" : "custom") : preset.c_str(),
              static_cast<long long>(cfg.num_layers), static_cast<long long>(L_moe),
              static_cast<long long>(cfg.hidden_size), static_cast<long long>(cfg.num_attention_heads),
              static_cast<long long>(cfg.query_groups()), static_cast<long long>(cfg.head_dim()),
              cfg.qk_layernorm ? " qk-norm" : "", cfg.normalization.c_str(), cfg.position_embedding_type.c_str(),
              cfg.num_layers > L_moe ? (" ffn=" + std::to_string(cfg.dense_ffn())).c_str() : "",
              static_cast<long long>(V), cfg.untie_embeddings_and_output_weights ? " untied" : " tied",
              static_cast<long long>(S), static_cast<long long>(b));
  std::printf("moe: F=%lld E=%lld k=%lld score=%s%s%s%s act=%s%s aux=%g\n",
              static_cast<long long>(cfg.moe_ffn_hidden_size), static_cast<long long>(cfg.num_moe_experts),
              static_cast<long long>(cfg.moe_router_topk), cfg.moe_router_score_function.c_str(),
              cfg.moe_router_enable_expert_bias ? "+bias" : "",
              cfg.moe_router_num_groups ? (" groups=" + std::to_string(*cfg.moe_router_num_groups) + "/" +
                                           std::to_string(cfg.moe_router_group_topk.value_or(0))).c_str()
                                        : "",
              cfg.has_shared_expert()
                  ? (" shared=" + std::to_string(*cfg.moe_shared_expert_intermediate_size)).c_str()
                  : "",
              cfg.gated_linear_unit ? "glu-" : "", cfg.activation_func.c_str(),
              cfg.moe_aux_loss_coeff.empty() ? 0.0 : cfg.moe_aux_loss_coeff[0]);
  std::printf("%-28s %14s\n", "metric", "value");
  std::printf("%-28s %14.1f\n", "parameters (M)", static_cast<double>(n_params) * 1e-6);
  std::printf("%-28s %14.1f\n", "model construction ms", t_init * 1e3);
  std::printf("%-28s %14lld\n", "measured steps (warm-up)", static_cast<long long>(iters));
  std::printf("%-28s %14.2f\n", "forward ms (median)", bench::median(t_fwd) * 1e3);
  std::printf("%-28s %14.2f\n", "backward ms (median)", bench::median(t_bwd) * 1e3);
  std::printf("%-28s %14.2f\n", "step ms (median)", step * 1e3);
  {
    std::string all;
    for (size_t i = 0; i < t_step.size(); ++i) all += (i ? " " : "") + std::to_string(static_cast<int>(t_step[i] * 1e3 + 0.5));
    std::printf("%-28s %14s\n", "step ms (each)", all.c_str());
  }
  std::printf("%-28s %14.1f\n", "tokens/s", tokens_per_s);
  std::printf("%-28s %14.3f\n", "model GFLOP per step", flops * 1e-9);
  std::printf("%-28s %14s\n", "  MLP / attn / core / logits",
              (std::to_string(static_cast<int>(100 * fl.mlp / flops + 0.5)) + "/" +
               std::to_string(static_cast<int>(100 * fl.attn_linear / flops + 0.5)) + "/" +
               std::to_string(static_cast<int>(100 * fl.attn_core / flops + 0.5)) + "/" +
               std::to_string(static_cast<int>(100 * fl.logits / flops + 0.5)) + " %")
                  .c_str());
  std::printf("%-28s %14.2f\n", "GFLOP/s", gflops);
  if (ref > 0) {
    std::printf("%-28s %14.2f\n", "dense SGEMM GFLOP/s", ref);
    std::printf("%-28s %14.3f\n", "efficiency (÷ SGEMM)", gflops / ref);
  }
  std::printf("%-28s %14s\n", "allocator peak", bench::format_bytes(static_cast<double>(peak_bytes)).c_str());
  std::printf("%-28s %14s\n", "max RSS growth",
              rss_peak >= 0 ? bench::format_bytes(static_cast<double>(rss_peak)).c_str() : "n/a");
  std::printf("%-28s %14.6f\n", "lm loss (first step)", loss_first);
  std::printf("%-28s %14.6f\n", "lm loss (last step)", loss_last);
  std::printf("%-28s %14.6f\n", "aux loss (last, Σ layers)", aux);
  if (breakdown) print_breakdown(cfg, b, breakdown_reps, step);
  std::printf("sgemm_gflops=%.3f efficiency=%.4f rss_peak_bytes=%lld\n", ref, ref > 0 ? gflops / ref : 0.0,
              static_cast<long long>(rss_peak));
  std::printf("tokens_per_s=%.2f gflops=%.3f peak_bytes=%lld activation_bytes=%lld\n", tokens_per_s, gflops,
              static_cast<long long>(peak_bytes), static_cast<long long>(activation_bytes));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("moe_gpt_bench", run, argc, argv); }
