// moe_layer_bench — one MoE layer's forward + backward on the CPU, timed.
//
//   moe_layer_bench --hidden-size 1024 --moe-ffn-hidden-size 2816 --num-moe-experts 8
//                   --moe-router-topk 2 --num-tokens 2048 --iters 5 --warmup 1 --threads 2
//   moe_layer_bench --preset deepseek-cpu --threads 2
//
// Flags are Megatron's names: any libmoecore config key (--moe-router-score-function sigmoid,
// --moe-router-num-groups 8, --moe-router-group-topk 3, --moe-router-enable-expert-bias,
// --moe-shared-expert-intermediate-size 1024, --moe-aux-loss-coeff 1e-2, ...) plus
//   --num-tokens T   tokens per step (one sequence)          --iters N    measured steps
//   --warmup W       unmeasured steps first                   --threads P  CPU threads (0: as is)
//   --preset NAME    start from mixtral-cpu, deepseek-cpu or small (flags then override)
//   --swiglu         gated_linear_unit + silu (the default here; --activation-func gelu
//                    --gated-linear-unit false for a plain GELU MLP)
//   --sgemm-reps R   calls of the dense-SGEMM reference (0: skip it), default 3
//   --smoke          one tiny step (CI): small shapes unless given, no reference
//   --bf16           params_dtype bf16 (parameters, activations and GEMMs in bf16, f32
//                    accumulation); the reference is then the machine's best bf16 GEMM rate
// Defaults: fp32, swiglu, aux_loss with coefficient 1e-2, seed 1234, inputs N(0, 1).
//
// Prints a table (median step time over the measured steps, forward and backward apart, tokens/s,
// GFLOP/s of the layer's GEMM FLOPs, the dense-SGEMM reference, memory), then
//   sgemm_gflops=<r> efficiency=<e> rss_peak_bytes=<m>
//   tokens_per_s=<x> gflops=<y> peak_bytes=<z> activation_bytes=<a>
// as its last two lines (activation_bytes: the allocator's current bytes right after the last
// forward minus right before it — what the forward keeps for the backward, with its output; the
// recompute / offload flags are Megatron's: --recompute-granularity selective --recompute-modules
// moe, --fine-grained-activation-offloading --offload-modules expert_fc1,moe_act, docs/memory.md).
// peak_bytes is the allocator's peak during the steps above what was held
// before the first forward (parameters, their gradients, the input and the output gradient);
// rss_peak_bytes is the resident-set high-water mark over the steps above the resident set before
// the first forward (VmHWM after a reset through /proc/self/clear_refs, with malloc_trim first so
// that no freed-but-resident heap pages from the setup hide growth) — the measure the PyTorch peer
// reports too.
#include <malloc.h>

#include <cstdio>
#include <fstream>
#include <set>
#include <string>

#include "bench_common.h"
#include "common/args.h"
#include "common/run_main.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

// Resets the kernel's resident-set high-water mark; false where the kernel does not allow it.
bool reset_rss_peak() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

// VmHWM in bytes (the resident-set high-water mark), or ru_maxrss where /proc is unavailable.
int64_t rss_peak_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return bench::max_rss_bytes();
}

std::string human_bytes(double b) {
  char buf[64];
  if (b >= 1 << 30) std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1 << 30));
  else if (b >= 1 << 20) std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1 << 20));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024);
  return buf;
}

int run(int argc, char** argv) {
  examples::Args args(argc, argv, {"moe-router-enable-expert-bias", "swiglu", "smoke", "moe-router-pre-softmax",
                                   "gated-linear-unit", "moe-shared-expert-gate", "bf16",
                                   "fine-grained-activation-offloading"});
  const bool smoke = args.get("smoke", "false") == "true";
  const std::string preset = args.get("preset", "");
  MoEConfig cfg = bench::base_config();
  int64_t T = 2048;
  if (!preset.empty()) {
    const bench::NamedConfig* n = bench::find_config(preset);
    MOE_CHECK(n != nullptr, "--preset: expected mixtral-cpu, deepseek-cpu or small, got '", preset, "'");
    cfg = n->cfg;
    T = n->num_tokens;
  } else if (smoke) {
    cfg.hidden_size = 32, cfg.moe_ffn_hidden_size = 64, cfg.num_moe_experts = 4, cfg.moe_router_topk = 2;
    T = 64;
  } else {
    cfg.hidden_size = 1024, cfg.moe_ffn_hidden_size = 2816, cfg.num_moe_experts = 8, cfg.moe_router_topk = 2;
  }
  T = args.get_int("num-tokens", T);
  const int64_t iters = args.get_int("iters", smoke ? 1 : 5);
  const int64_t warmup = args.get_int("warmup", smoke ? 0 : 1);
  const int64_t threads = args.get_int("threads", 0);
  const int64_t sgemm_reps = args.get_int("sgemm-reps", smoke ? 0 : 3);
  if (args.get("swiglu", "false") == "true") {
    cfg.gated_linear_unit = true;
    cfg.activation_func = "silu";
  }
  if (args.get("bf16", "false") == "true") cfg.params_dtype = "bf16";
  args.apply_config_flags(cfg);
  validate(cfg);
  MOE_CHECK(T >= 1 && iters >= 1 && warmup >= 0 && sgemm_reps >= 0,
            "--num-tokens and --iters must be >= 1, --warmup and --sgemm-reps >= 0");
  MOE_CHECK(cfg.params_dtype == "fp32" || cfg.params_dtype == "bf16", "moe_layer_bench measures fp32 or bf16, got params_dtype ",
            cfg.params_dtype);
  const DType dt = cfg.params_dtype == "bf16" ? DType::bf16 : DType::f32;
  if (threads > 0) set_num_threads(static_cast<int>(threads));
  const int64_t H = cfg.hidden_size;

  // The reference first, before any of the layer's OpenMP threads exist (a spinning idle worker
  // would slow the BLAS's own threads down).
  const double ref = sgemm_reps > 0 ? bench::layer_reference_gflops(cfg, T, static_cast<int>(sgemm_reps)) : 0.0;

  Backend& cpu = get_backend(Device::cpu());
  MoELayer layer(cfg, Device::cpu());
  Tensor x = ops::cast(bench::randn({T, H}, 1), dt);
  Tensor dout = ops::cast(bench::randn({T, H}, 2, 1e-2f), dt);
  layer.zero_grad();

  malloc_trim(0);  // free heap pages left by the setup go back to the OS: the growth below counts every page
  const bool rss_reset = reset_rss_peak();
  const int64_t rss_base = bench::current_rss_bytes();
  cpu.reset_peak_memory();
  const int64_t alloc_base = cpu.memory_stats().current_bytes;

  std::vector<double> t_fwd, t_bwd, t_step;
  double aux = 0.0;
  int64_t activation_bytes = 0;  // allocator bytes the forward leaves for the backward (+ its output)
  for (int64_t it = 0; it < warmup + iters; ++it) {
    ForwardContext ctx;
    ctx.step = it;
    const int64_t before_fwd = cpu.memory_stats().current_bytes;
    const double t0 = bench::now_s();
    Tensor y = layer.forward(x, ctx);
    const double t1 = bench::now_s();
    activation_bytes = cpu.memory_stats().current_bytes - before_fwd;
    Tensor dx = layer.backward(dout);
    const double t2 = bench::now_s();
    layer.finish_step();  // expert-bias update (a few E-sized host ops), outside the timed step
    aux = layer.last_routing().aux_loss;
    if (it < warmup) continue;
    t_fwd.push_back(t1 - t0);
    t_bwd.push_back(t2 - t1);
    t_step.push_back(t2 - t0);
  }
  const int64_t peak_bytes = cpu.memory_stats().peak_bytes - alloc_base;
  const int64_t rss_peak = rss_reset ? rss_peak_bytes() - rss_base : -1;

  const double step = bench::median(t_step);
  const double flops = bench::layer_gemm_flops(cfg, T);
  const double tokens_per_s = static_cast<double>(T) / step;
  const double gflops = flops / step * 1e-9;

  std::printf("moe_layer_bench  %s; threads %d\n", build_info().c_str(), num_threads());
  std::printf("precision: %s\n", cfg.params_dtype.c_str());
  std::printf("config: %s H=%lld F=%lld E=%lld k=%lld score=%s%s%s%s act=%s%s aux=%g T=%lld\n",
              preset.empty() ? "custom" : preset.c_str(), static_cast<long long>(H),
              static_cast<long long>(cfg.moe_ffn_hidden_size), static_cast<long long>(cfg.num_moe_experts),
              static_cast<long long>(cfg.moe_router_topk), cfg.moe_router_score_function.c_str(),
              cfg.moe_router_enable_expert_bias ? "+bias" : "",
              cfg.moe_router_num_groups ? (" groups=" + std::to_string(*cfg.moe_router_num_groups) + "/" +
                                           std::to_string(*cfg.moe_router_group_topk)).c_str()
                                        : "",
              cfg.has_shared_expert()
                  ? (" shared=" + std::to_string(*cfg.moe_shared_expert_intermediate_size)).c_str()
                  : "",
              cfg.gated_linear_unit ? "glu-" : "", cfg.activation_func.c_str(),
              cfg.moe_aux_loss_coeff.empty() ? 0.0 : cfg.moe_aux_loss_coeff[0], static_cast<long long>(T));
  std::printf("%-28s %14s\n", "metric", "value");
  std::printf("%-28s %14lld\n", "measured steps (warm-up)", static_cast<long long>(iters));
  std::printf("%-28s %14.2f\n", "forward ms (median)", bench::median(t_fwd) * 1e3);
  std::printf("%-28s %14.2f\n", "backward ms (median)", bench::median(t_bwd) * 1e3);
  std::printf("%-28s %14.2f\n", "step ms (median)", step * 1e3);
  std::printf("%-28s %14.1f\n", "tokens/s", tokens_per_s);
  std::printf("%-28s %14.3f\n", "GEMM GFLOP per step", flops * 1e-9);
  std::printf("%-28s %14.2f\n", "GFLOP/s", gflops);
  if (ref > 0) {
    std::printf("%-28s %14.2f\n", dt == DType::bf16 ? "best bf16 GEMM GFLOP/s" : "best SGEMM GFLOP/s", ref);
    std::printf("%-28s %14.3f\n", "efficiency (÷ SGEMM)", gflops / ref);
  }
  std::printf("%-28s %14s\n", "allocator peak", human_bytes(static_cast<double>(peak_bytes)).c_str());
  std::printf("%-28s %14s\n", "max RSS growth",
              rss_peak >= 0 ? human_bytes(static_cast<double>(rss_peak)).c_str() : "n/a");
  std::printf("%-28s %14.6f\n", "aux loss (last step)", aux);
  std::printf("sgemm_gflops=%.3f efficiency=%.4f rss_peak_bytes=%lld\n", ref, ref > 0 ? gflops / ref : 0.0,
              static_cast<long long>(rss_peak));
  std::printf("tokens_per_s=%.2f gflops=%.3f peak_bytes=%lld activation_bytes=%lld\n", tokens_per_s, gflops,
              static_cast<long long>(peak_bytes), static_cast<long long>(activation_bytes));
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("moe_layer_bench", run, argc, argv); }
