// moe_micro_bench — Google Benchmark micro-benchmarks of the CPU pieces of one MoE layer, on the
// shapes of the three configs of docs/performance.md (mixtral-cpu, deepseek-cpu, small):
//
//   permute/<cfg>        x (T, H) → expert-major rows (N = T·k, H) with their probs
//   unpermute/<cfg>      rows (N, H) → (T, H), the k copies of a token summed
//       GB/s = (bytes read + bytes written) / time; memcpy_GBps = the same measure for a memcpy of
//       the N·H·4 row bytes over as many threads (measured in the same run); vs_memcpy = ratio
//   router/<cfg>         router forward + backward with the aux loss: tokens/s
//   gg_fwd|gg_dgrad|gg_wgrad/<cfg>   grouped GEMM of fc1 (F1 = 2F, H) over the E experts with the
//       row counts of a uniform random top-k routing: GFLOP/s; sgemm_GFLOPs = one dense SGEMM of
//       the same M = N_rows, N, K and transposes by OpenBLAS on its own threads, in the same run;
//       vs_sgemm = ratio
//   layer/<cfg>          the layer's forward + backward: tokens/s, GFLOP/s (GEMM FLOPs, as
//       moe_layer_bench counts them), peak_bytes (allocator peak above what was held before)
//
//   moe_micro_bench [--threads P] [--smoke] [Google Benchmark flags]
// --threads sets the CPU threads (default: as is, i.e. all cores); --smoke runs every benchmark
// once on tiny shapes (CI).
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench_common.h"
#include "device/ops.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

struct Shape3 {
  std::string name;
  MoEConfig cfg;
  int64_t T = 0;
};

std::vector<Shape3> shapes(bool smoke) {
  std::vector<Shape3> v;
  if (smoke) {
    MoEConfig c = bench::base_config();
    c.hidden_size = 32, c.moe_ffn_hidden_size = 64, c.num_moe_experts = 4, c.moe_router_topk = 2;
    v.push_back({"tiny", c, 64});
    return v;
  }
  for (const bench::NamedConfig& n : bench::named_configs()) v.push_back({n.name, n.cfg, n.num_tokens});
  return v;
}

using Counter = benchmark::Counter;

// Permutation fixture: routing, row map, tokens.
struct PermuteData {
  int64_t T, E, H, N;
  Tensor row_id_map, x, probs, rows, row_probs, out;
};
PermuteData permute_data(const Shape3& s) {
  PermuteData d;
  d.T = s.T, d.E = s.cfg.num_moe_experts, d.H = s.cfg.hidden_size;
  bench::Routing r = bench::random_routing(d.T, d.E, s.cfg.moe_router_topk, 7);
  std::vector<int64_t> offsets(r.counts.size());
  d.N = 0;
  for (size_t e = 0; e < r.counts.size(); ++e) offsets[e] = d.N, d.N += r.counts[e];
  d.row_id_map = Tensor::empty({d.T, d.E}, DType::i32);
  ops::permute_index(r.map, offsets, d.row_id_map);
  d.x = bench::randn({d.T, d.H}, 8);
  d.probs = r.probs;
  d.rows = Tensor::empty({d.N, d.H}, DType::f32);
  d.row_probs = Tensor::empty({d.N}, DType::f32);
  d.out = Tensor::empty({d.T, d.H}, DType::f32);
  return d;
}

void bw_counters(benchmark::State& st, double bytes_per_iter, size_t ref_bytes) {
  const double mc = bench::memcpy_bandwidth(ref_bytes, num_threads());
  st.counters["GBps"] = Counter(bytes_per_iter * 1e-9, Counter::kIsIterationInvariantRate);
  st.counters["memcpy_GBps"] = mc * 1e-9;
  st.counters["bytes"] = bytes_per_iter;
  // Filled in after the run (the rate needs the measured time): the ratio to memcpy.
  st.counters["memcpy_Bps_"] = mc;
}

void BM_permute(benchmark::State& st, Shape3 s) {
  PermuteData d = permute_data(s);
  for (auto _ : st) ops::permute(d.row_id_map, d.x, d.rows, &d.probs, &d.row_probs);
  // Bytes: each row read and written once, plus the probs (read and written) and the row map read.
  const double bytes = 2.0 * static_cast<double>(d.N * d.H * 4) + 2.0 * static_cast<double>(d.N * 4) +
                       static_cast<double>(d.T * d.E * 4);
  bw_counters(st, bytes, static_cast<size_t>(d.N * d.H * 4));
}

void BM_unpermute(benchmark::State& st, Shape3 s) {
  PermuteData d = permute_data(s);
  ops::permute(d.row_id_map, d.x, d.rows);
  for (auto _ : st) ops::unpermute(d.row_id_map, d.rows, d.out);
  // Bytes: every row read once, every token written once, the row map read.
  const double bytes = static_cast<double>(d.N * d.H * 4) + static_cast<double>(d.T * d.H * 4) +
                       static_cast<double>(d.T * d.E * 4);
  bw_counters(st, bytes, static_cast<size_t>(d.N * d.H * 4));
}

void BM_router(benchmark::State& st, Shape3 s) {
  MoEConfig c = s.cfg;
  Router router(c, Device::cpu());
  ActivationStore store;
  Tensor x = bench::randn({s.T, c.hidden_size}, 3);
  Tensor dprobs = bench::randn({s.T, c.num_moe_experts}, 4, 1e-2f);
  Tensor dx = Tensor::zeros({s.T, c.hidden_size}, DType::f32);
  for (auto _ : st) {
    store.clear();
    RouterOutput ro = router.forward(x, ForwardContext{}, store);
    router.backward(dprobs, dx, store);
    router.finish_step();
    benchmark::DoNotOptimize(ro.aux_loss);
  }
  st.counters["tokens_per_s"] = Counter(static_cast<double>(s.T), Counter::kIsIterationInvariantRate);
}

void BM_grouped_gemm(benchmark::State& st, Shape3 s, GroupedGemmMode mode) {
  const MoEConfig& c = s.cfg;
  const int64_t E = c.num_moe_experts, H = c.hidden_size, F1 = c.fc1_out_features();
  bench::Routing r = bench::random_routing(s.T, E, c.moe_router_topk, 9);
  int64_t M = 0;
  for (int64_t n : r.counts) M += n;
  // fc1 as the grouped GEMM sees it: W (E, N = F1, K = H).
  const int64_t N = F1, K = H;
  Tensor W = bench::randn({E, N, K}, 5, 0.02f);
  Tensor A, B, C;
  bool ta = false, tb = false;
  int64_t m = M, n = N, k = K;  // the dense equivalent: C (m, n) = op(A) (m, k) · op(B) (k, n)
  switch (mode) {
    case GroupedGemmMode::fwd:  // h (M, N) = x (M, K) · W_gᵀ
      A = bench::randn({M, K}, 1), B = W, C = Tensor::empty({M, N}, DType::f32);
      tb = true;
      break;
    case GroupedGemmMode::dgrad:  // dx (M, K) = dh (M, N) · W_g
      A = bench::randn({M, N}, 1), B = W, C = Tensor::empty({M, K}, DType::f32);
      n = K, k = N;
      break;
    case GroupedGemmMode::wgrad:  // dW_g (N, K) += dh_gᵀ (N, m_g) · x_g (m_g, K)
      A = bench::randn({M, N}, 1), B = bench::randn({M, K}, 2), C = Tensor::zeros({E, N, K}, DType::f32);
      ta = true, m = N, n = K, k = M;
      break;
  }
  const bool acc = mode == GroupedGemmMode::wgrad;
  for (auto _ : st) ops::grouped_gemm(mode, A, B, C, r.counts, acc);
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const double ref = bench::dense_sgemm_gflops(m, n, k, 3, ta, tb);
  st.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  st.counters["sgemm_GFLOPs"] = ref;
  st.counters["sgemm_GFLOPs_"] = ref;
}

void BM_layer(benchmark::State& st, Shape3 s) {
  MoEConfig c = s.cfg;
  MoELayer layer(c, Device::cpu());
  Tensor x = bench::randn({s.T, c.hidden_size}, 1);
  Tensor dout = bench::randn({s.T, c.hidden_size}, 2, 1e-2f);
  Backend& cpu = get_backend(Device::cpu());
  cpu.reset_peak_memory();
  const int64_t base = cpu.memory_stats().current_bytes;
  for (auto _ : st) {
    Tensor y = layer.forward(x, ForwardContext{});
    Tensor dx = layer.backward(dout);
    layer.finish_step();
    benchmark::DoNotOptimize(dx.data());
  }
  st.counters["tokens_per_s"] = Counter(static_cast<double>(s.T), Counter::kIsIterationInvariantRate);
  st.counters["GFLOPs"] = Counter(bench::layer_gemm_flops(c, s.T) * 1e-9, Counter::kIsIterationInvariantRate);
  st.counters["peak_bytes"] = static_cast<double>(cpu.memory_stats().peak_bytes - base);
}

// Adds the ratio counters (vs_memcpy, vs_sgemm) once the rates are known (reporters see the counters
// finished: rate counters are per second by then), and drops the helper counters.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  RatioReporter() : ConsoleReporter(OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> out = runs;
    for (Run& r : out) {
      if (r.counters.count("memcpy_Bps_")) {
        r.counters["vs_memcpy"] = r.counters["GBps"].value * 1e9 / r.counters["memcpy_Bps_"].value;
        r.counters.erase("memcpy_Bps_");
      }
      if (r.counters.count("sgemm_GFLOPs_")) {
        r.counters["vs_sgemm"] = r.counters["GFLOPs"].value / r.counters["sgemm_GFLOPs_"].value;
        r.counters.erase("sgemm_GFLOPs_");
      }
    }
    ConsoleReporter::ReportRuns(out);
  }
};

}  // namespace

int main(int argc, char** argv) {
  bool smoke = false;
  int threads = 0;
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads = std::atoi(argv[i] + 10);
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (threads > 0) set_num_threads(threads);
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;

  auto reg = [&](const std::string& name, auto fn, auto... extra) {
    for (const Shape3& s : shapes(smoke)) {
      benchmark::internal::Benchmark* b = benchmark::RegisterBenchmark((name + "/" + s.name).c_str(), fn, s, extra...);
      b->UseRealTime()->Unit(benchmark::kMillisecond);
      if (smoke) b->Iterations(1);
    }
  };
  reg("permute", BM_permute);
  reg("unpermute", BM_unpermute);
  reg("router", BM_router);
  reg("gg_fwd", BM_grouped_gemm, GroupedGemmMode::fwd);
  reg("gg_dgrad", BM_grouped_gemm, GroupedGemmMode::dgrad);
  reg("gg_wgrad", BM_grouped_gemm, GroupedGemmMode::wgrad);
  reg("layer", BM_layer);
  std::printf("moe_micro_bench: %s; threads %d\n", build_info().c_str(), num_threads());
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
