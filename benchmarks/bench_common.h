// Shared helpers of the CPU benchmarks: the named configs of docs/performance.md, FLOP counts, seeded
// inputs, a wall clock, medians, the process's memory high-water mark, and the dense-SGEMM reference
// rate every efficiency number is measured against.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "device/ops.h"
#include "moecore/moecore.h"

#if MOE_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif
#if MOE_BENCH_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace moe::bench {

// ---- configs --------------------------------------------------------------------------------------
// The three configs of the CPU comparison (fp32, forward + backward, aux loss on). Each returns the
// layer config; the token count travels separately (num_tokens).
struct NamedConfig {
  std::string name;
  MoEConfig cfg;
  int64_t num_tokens = 0;
};

inline MoEConfig base_config() {
  MoEConfig c;
  c.gated_linear_unit = true;  // swiglu
  c.activation_func = "silu";
  c.moe_router_load_balancing_type = {"aux_loss"};
  c.moe_aux_loss_coeff = {1e-2};
  c.params_dtype = "fp32";
  return c;
}

inline std::vector<NamedConfig> named_configs() {
  std::vector<NamedConfig> v;
  {
    MoEConfig c = base_config();
    c.hidden_size = 1024, c.moe_ffn_hidden_size = 2816, c.num_moe_experts = 8, c.moe_router_topk = 2;
    v.push_back({"mixtral-cpu", c, 2048});
  }
  {
    MoEConfig c = base_config();
    c.hidden_size = 1024, c.moe_ffn_hidden_size = 512, c.num_moe_experts = 64, c.moe_router_topk = 6;
    c.moe_router_score_function = "sigmoid";
    c.moe_router_enable_expert_bias = true;
    c.moe_router_num_groups = 8, c.moe_router_group_topk = 3;
    c.moe_shared_expert_intermediate_size = 1024;
    v.push_back({"deepseek-cpu", c, 2048});
  }
  {
    MoEConfig c = base_config();
    c.hidden_size = 256, c.moe_ffn_hidden_size = 512, c.num_moe_experts = 16, c.moe_router_topk = 2;
    v.push_back({"small", c, 4096});
  }
  return v;
}

inline const NamedConfig* find_config(const std::string& name) {
  static const std::vector<NamedConfig> all = named_configs();
  for (const NamedConfig& n : all)
    if (n.name == name) return &n;
  return nullptr;
}

// ---- FLOPs ----------------------------------------------------------------------------------------
// GEMM FLOPs (2·M·N·K each) of one forward + backward of the layer on T tokens, no capacity
// dropping: routed experts (N = T·k rows through fc1 H→F1 and fc2 F→H; the backward's dgrad and
// wgrad double the forward), the shared expert on all T tokens likewise, and the router
// (T×H×E forward; dW and dx backward). Elementwise work is not counted.
inline double layer_gemm_flops(const MoEConfig& c, int64_t T) {
  const double H = static_cast<double>(c.hidden_size), F = static_cast<double>(c.moe_ffn_hidden_size);
  const double F1 = static_cast<double>(c.fc1_out_features());
  const double N = static_cast<double>(T) * static_cast<double>(c.moe_router_topk);
  double f = 6.0 * N * H * (F1 + F);
  if (c.has_shared_expert()) {
    const double Fs = static_cast<double>(*c.moe_shared_expert_intermediate_size);
    const double F1s = c.gated_linear_unit ? 2 * Fs : Fs;
    f += 6.0 * static_cast<double>(T) * H * (F1s + Fs);
  }
  f += 6.0 * static_cast<double>(T) * H * static_cast<double>(c.num_moe_experts);
  return f;
}

// ---- inputs, clocks, statistics -------------------------------------------------------------------
inline Tensor randn(const Shape& shape, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  for (float& x : v) x = d(gen);
  return Tensor::from_vector(v, shape);
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The process's resident-set high-water mark in bytes (getrusage ru_maxrss, KiB on Linux).
inline int64_t max_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

// Current resident set in bytes (/proc/self/statm), 0 where unavailable.
inline int64_t current_rss_bytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  long long size = 0, resident = 0;
  int n = std::fscanf(f, "%lld %lld", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * 4096 : 0;
}

// ---- routing ---------------------------------------------------------------------------------------
// A routing map (T, E) u8 with exactly k distinct experts per token, chosen uniformly (seeded), and
// probs (T, E) f32 on the map (each token's k probs sum to 1).
struct Routing {
  Tensor map;    // (T, E) u8
  Tensor probs;  // (T, E) f32
  std::vector<int64_t> counts;  // (E) tokens per expert
};
inline Routing random_routing(int64_t T, int64_t E, int64_t k, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<uint8_t> m(static_cast<size_t>(T * E), 0);
  std::vector<float> p(static_cast<size_t>(T * E), 0.0f);
  std::vector<int64_t> experts(static_cast<size_t>(E)), counts(static_cast<size_t>(E), 0);
  for (int64_t e = 0; e < E; ++e) experts[static_cast<size_t>(e)] = e;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {  // partial Fisher-Yates: the first k are a uniform k-subset
      std::uniform_int_distribution<int64_t> d(j, E - 1);
      std::swap(experts[static_cast<size_t>(j)], experts[static_cast<size_t>(d(gen))]);
      const int64_t e = experts[static_cast<size_t>(j)];
      m[static_cast<size_t>(t * E + e)] = 1;
      p[static_cast<size_t>(t * E + e)] = 1.0f / static_cast<float>(k);
      ++counts[static_cast<size_t>(e)];
    }
  }
  Routing r;
  r.map = Tensor::from_vector(m, {T, E});
  r.probs = Tensor::from_vector(p, {T, E});
  r.counts = counts;
  return r;
}

// ---- memcpy reference -----------------------------------------------------------------------------
// Bandwidth (bytes read + bytes written per second) of copying `bytes` with `threads` threads, each
// memcpy-ing its contiguous share; the median of `reps` copies after one warm-up copy.
inline double memcpy_bandwidth(size_t bytes, int threads, int reps = 7) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::vector<double> t;
  for (int r = 0; r <= reps; ++r) {
    const double t0 = now_s();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < threads; ++i) {
      const size_t b0 = bytes * static_cast<size_t>(i) / static_cast<size_t>(threads);
      const size_t b1 = bytes * static_cast<size_t>(i + 1) / static_cast<size_t>(threads);
      std::memcpy(dst.data() + b0, src.data() + b0, b1 - b0);
    }
    if (r > 0) t.push_back(now_s() - t0);
  }
  return 2.0 * static_cast<double>(bytes) / median(t);
}

// ---- the dense-SGEMM reference --------------------------------------------------------------------
// C (M, N) = op(A) · op(B) in fp32 (A (M, K) or, transposed, (K, M); B (K, N) or (N, K)) with the
// system's optimised BLAS on its own threads (OpenBLAS's cblas_sgemm, the library torch links on
// Debian too), or the library's own gemm where OpenBLAS is absent. Returns the median GFLOP/s of
// `reps` calls after one warm-up call.
inline double dense_sgemm_gflops(int64_t M, int64_t N, int64_t K, int reps = 3, bool ta = false, bool tb = true) {
  std::vector<double> t;
#if MOE_BENCH_HAVE_OPENBLAS
  // Plain host buffers, not library tensors: the library's allocator keeps large freed blocks for
  // reuse, and blocks left over from here would hide the layer's memory growth from the RSS measure.
  auto fill = [](int64_t n, uint64_t seed) {
    std::vector<float> v(static_cast<size_t>(n));
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (float& x : v) x = d(gen);
    return v;
  };
  std::vector<float> A = fill(M * K, 11), B = fill(N * K, 12), C(static_cast<size_t>(M * N));
  // OpenBLAS with its own threads, as many as the benchmark uses (libmoecore keeps OpenBLAS on one
  // thread and shares tiles over its OpenMP threads; the reference is the BLAS's best on its own).
  const int blas_before = openblas_get_num_threads();
  openblas_set_num_threads(num_threads());
  for (int r = 0; r <= reps; ++r) {
    double t0 = now_s();
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), 1.0f, A.data(),
                static_cast<blasint>(ta ? M : K), B.data(), static_cast<blasint>(tb ? K : N), 0.0f, C.data(),
                static_cast<blasint>(N));
    double dt = now_s() - t0;
    if (r > 0) t.push_back(dt);
  }
  openblas_set_num_threads(blas_before);
#else
  // Without OpenBLAS the reference is the library's own engine (Eigen).
  Tensor A = ta ? randn({K, M}, 11) : randn({M, K}, 11);
  Tensor B = tb ? randn({N, K}, 12) : randn({K, N}, 12);
  Tensor C = Tensor::empty({M, N}, DType::f32);
  for (int r = 0; r <= reps; ++r) {
    double t0 = now_s();
    ops::gemm(A, ta, B, tb, C);
    double dt = now_s() - t0;
    if (r > 0) t.push_back(dt);
  }
#endif
  return 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) / median(t) * 1e-9;
}

// oneDNN's matmul on its own P OpenMP threads (P = the benchmark's thread count): C (M, N) f32 or
// bf16 = op(A) · op(B) with A, B of dtype dt (f32 or bf16), as a PyTorch user's bf16 matmul runs
// it. Median GFLOP/s of `reps` calls after one warm-up call; 0 without oneDNN.
inline double dense_onednn_gflops(DType dt, int64_t M, int64_t N, int64_t K, int reps = 3, bool ta = false,
                                  bool tb = true) {
#if MOE_BENCH_HAVE_DNNL
  using dims = dnnl::memory::dims;
  const auto t = dt == DType::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream st(eng);
  dnnl::memory::desc a({M, K}, t, ta ? dims{1, M} : dims{K, 1});
  dnnl::memory::desc b({K, N}, t, tb ? dims{1, K} : dims{N, 1});
  dnnl::memory::desc c({M, N}, t, dims{N, 1});
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), eng);
  dnnl::matmul mm(pd);
  Tensor A = randn({M, K}, 11), B = randn({N, K}, 12);
  if (dt == DType::bf16) A = ops::cast(A, DType::bf16), B = ops::cast(B, DType::bf16);
  Tensor C = Tensor::empty({M, N}, dt);
  dnnl::memory ma(a, eng, A.data()), mb(b, eng, B.data()), mc(c, eng, C.data());
  std::vector<double> times;
  for (int r = 0; r <= reps; ++r) {
    const double t0 = now_s();
    mm.execute(st, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    st.wait();
    if (r > 0) times.push_back(now_s() - t0);
  }
  return 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) / median(times) * 1e-9;
#else
  (void)dt, (void)M, (void)N, (void)K, (void)reps, (void)ta, (void)tb;
  return 0.0;
#endif
}

// The machine's best dense GEMM rate at a shape, in the precision of dt: f32 — the faster of
// OpenBLAS's SGEMM and oneDNN's f32 matmul, each on its own threads; bf16 — oneDNN's bf16 matmul
// (AMX / AVX512-BF16 where the CPU has them), or the SGEMM rate without oneDNN.
inline double best_gemm_gflops(DType dt, int64_t M, int64_t N, int64_t K, int reps = 3) {
  const double onednn = dense_onednn_gflops(dt, M, N, K, reps);
  if (dt == DType::bf16 && onednn > 0) return onednn;
  return std::max(dense_sgemm_gflops(M, N, K, reps), dense_onednn_gflops(DType::f32, M, N, K, reps));
}

// The reference shape for a layer config: one SGEMM with the routed rows (T·k) as M, the expert
// widths summed (F1 + F) as N and H as K — the forward of every expert fused into one call, so the
// BLAS sees the same amount of work in its most favourable form.
// The rate is the machine's best in the layer's precision (best_gemm_gflops).
inline double layer_reference_gflops(const MoEConfig& c, int64_t T, int reps = 3) {
  const int64_t M = T * c.moe_router_topk, N = c.fc1_out_features() + c.moe_ffn_hidden_size, K = c.hidden_size;
  return best_gemm_gflops(c.params_dtype == "bf16" ? DType::bf16 : DType::f32, M, N, K, reps);
}

}  // namespace moe::bench

// ==== The MoE GPT model (moe_gpt_bench, docs/performance.md "The model") ==========================
#include <fstream>

namespace moe::bench {

// ---- model configs --------------------------------------------------------------------------------
// The model configs of the CPU comparison: fp32, swiglu, aux loss 1e-2, RMSNorm, rope, untied
// output layer; the micro-batch (b sequences of seq_length) travels separately. The PyTorch peer
// (benchmarks/peers/torch_moe_gpt.py) and compare_cpu.sh spell the same values as flags.
struct NamedModel {
  std::string name;
  MoEConfig cfg;
  int64_t micro_batch = 1;
};

inline MoEConfig base_model_config() {
  MoEConfig c = base_config();
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.untie_embeddings_and_output_weights = true;
  return c;
}

inline std::vector<NamedModel> named_models() {
  std::vector<NamedModel> v;
  {  // Mixtral-like: GQA 8 heads / 2 query groups (hd 128), 8 experts top-2, every layer MoE.
    MoEConfig c = base_model_config();
    c.num_layers = 2, c.hidden_size = 1024, c.num_attention_heads = 8, c.num_query_groups = 2;
    c.ffn_hidden_size = 2816, c.moe_ffn_hidden_size = 2816, c.num_moe_experts = 8, c.moe_router_topk = 2;
    c.vocab_size = 16384, c.seq_length = 1024, c.rotary_base = 1e6;
    v.push_back({"mixtral-cpu", c, 1});
  }
  {  // DeepSeek-like: a dense first layer, then fine-grained MoE layers (64 experts top-6, sigmoid
     // router with expert bias, 8 groups / top-3 groups, a shared expert); 16 heads of 64, q/k norm.
    MoEConfig c = base_model_config();
    c.num_layers = 3, c.moe_layer_freq = {0, 1, 1}, c.hidden_size = 1024, c.num_attention_heads = 16;
    c.kv_channels = 64, c.qk_layernorm = true, c.ffn_hidden_size = 2816;
    c.moe_ffn_hidden_size = 512, c.num_moe_experts = 64, c.moe_router_topk = 6;
    c.moe_router_score_function = "sigmoid", c.moe_router_enable_expert_bias = true;
    c.moe_router_num_groups = 8, c.moe_router_group_topk = 3, c.moe_shared_expert_intermediate_size = 1024;
    c.vocab_size = 16384, c.seq_length = 512;
    v.push_back({"deepseek-cpu", c, 2});
  }
  return v;
}

inline const NamedModel* find_model(const std::string& name) {
  static const std::vector<NamedModel> all = named_models();
  for (const NamedModel& n : all)
    if (n.name == name) return &n;
  return nullptr;
}

// ---- model FLOPs, Megatron's way ------------------------------------------------------------------
// FLOPs of one forward + backward of the model on b sequences, counted as Megatron-LM's
// num_floating_point_operations counts them (megatron/training/training.py, transformer_flops();
// followed here at NVIDIA/Megatron-LM main, commit d98e8a64, 2026-08-22, megatron-core 0.20.0 —
// the same terms as in core_r0.12): every GEMM 3× (forward, dgrad, wgrad), 2 FLOPs per FMA,
//   per token:  6·H·[F_dense·f·L_dense + (k·F_moe·f + F_shared·f)·L_moe]      f = 3 swiglu, else 2
//             + 6·[H·(q + 2·kv) + q·H]·L                                      q = nh·hd, kv = ng·hd
//             + 6·H·V                                                         the logits
//   per sequence: S²·6·q·L  (QKᵀ and PV, "/2 causal mask · 2 GEMMs", i.e. half of the S×S scores)
// Not counted, as in Megatron: the router GEMM (T·H·E), norms, rope, softmax, the cross entropy.
struct ModelFlops {
  double mlp = 0, attn_linear = 0, attn_core = 0, logits = 0;
  double total() const { return mlp + attn_linear + attn_core + logits; }
};
inline ModelFlops model_flops(const MoEConfig& config, int64_t micro_batch) {
  const MoEConfig c = resolve_model_config(config);
  const double H = static_cast<double>(c.hidden_size), S = static_cast<double>(c.seq_length);
  const double b = static_cast<double>(micro_batch), T = b * S, L = static_cast<double>(c.num_layers);
  const double hd = static_cast<double>(c.head_dim());
  const double q = hd * static_cast<double>(c.num_attention_heads), kv = hd * static_cast<double>(c.query_groups());
  double moe_layers = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) moe_layers += c.is_moe_layer(i) ? 1 : 0;
  const double dense_layers = L - moe_layers;
  const double f = c.gated_linear_unit ? 3.0 : 2.0;
  const double Fd = static_cast<double>(c.dense_ffn()), Fm = static_cast<double>(c.moe_ffn_hidden_size);
  const double Fs = static_cast<double>(c.moe_shared_expert_intermediate_size.value_or(0));
  const double k = static_cast<double>(c.moe_router_topk);
  ModelFlops r;
  r.mlp = T * 6.0 * H * (Fd * f * dense_layers + (k * Fm * f + Fs * f) * moe_layers);
  r.attn_linear = T * 6.0 * (H * (q + 2.0 * kv) + q * H) * L;
  r.attn_core = b * S * S * 6.0 * q * L;
  r.logits = T * 6.0 * H * static_cast<double>(c.vocab_size);
  return r;
}

// ---- memory high-water mark ------------------------------------------------------------------------
// Resets the kernel's resident-set high-water mark (/proc/self/clear_refs); false where not allowed.
inline bool reset_rss_high_water() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

// VmHWM in bytes (the resident-set high-water mark), or ru_maxrss where /proc is unavailable.
inline int64_t rss_high_water_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return max_rss_bytes();
}

inline std::string format_bytes(double b) {
  char buf[64];
  if (b >= 1 << 30) std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1 << 30));
  else if (b >= 1 << 20) std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1 << 20));
  else std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024);
  return buf;
}

// The CPU's model name (/proc/cpuinfo), "?" where unknown.
inline std::string cpu_model_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "?";
}

// Uniform random ids in [0, V) as a (rows, cols) i64 tensor (seeded).
inline Tensor random_ids(int64_t rows, int64_t cols, int64_t V, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> d(0, V - 1);
  std::vector<int64_t> v(static_cast<size_t>(rows * cols));
  for (int64_t& x : v) x = d(gen);
  return Tensor::from_vector(v, {rows, cols});
}

}  // namespace moe::bench
