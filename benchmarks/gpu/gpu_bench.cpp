// gpu_bench: libmoecore's CUDA benchmarks (benchmarks/gpu/README.md). On Device::cuda(0), bf16:
//   (a) copy     the device's copy bandwidth: one large D2D Tensor::copy_from, bytes read + written
//   (b) permute / unpermute on Mixtral-like token shapes (T 4096, H 4096, top-2, E 8): GB/s and the
//       fraction of (a)
//   (c) grouped GEMM fwd / dgrad / wgrad for the expert GEMMs of both layer shapes with uneven
//       per-expert row counts: TFLOP/s and the fraction of one dense ops::gemm of equal FLOPs
//       (same operands, the expert dimension folded into M or K) timed in the same run
//   (d) the MoE layer (MoELayer, params bf16) forward + backward for both layer shapes: ms per step
// Each measurement: warm-up, then the median of `repeat` samples timed with CUDA events on the
// backend's stream (a sample may run `inner` calls and divide). Prints a table; --json PATH writes
// one JSON object per line (the format benchmarks/gpu/merge_table.py reads, shared with
// torch_peer.py). --quick runs tiny shapes once (a smoke run). Exits 77 (skipped) without a GPU.
// --device cpu runs the same code on the CPU backend with host clocks: a smoke test of this file on
// machines without a GPU, not a benchmark.
//
// Vendor code (the CUDA runtime, for event timing and device properties) stays in this file; the
// library is used through its public API and src/device/ops.h only.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "device/ops.h"
#include "moecore/moecore.h"

namespace {

using namespace moe;

#define BENCH_CUDA_OK(call)                                                                          \
  do {                                                                                               \
    cudaError_t err_ = (call);                                                                       \
    MOE_CHECK_CODE(err_ == cudaSuccess, ErrorCode::backend, "gpu_bench: ", #call, " failed: ",        \
                   cudaGetErrorString(err_));                                                        \
  } while (0)

// ---- options ----------------------------------------------------------------------------------------
struct Options {
  bool quick = false;
  std::string json_path;
  Device device = Device::cuda(0);
  int warmup = -1;  // -1: per-benchmark default
  int repeat = -1;
  std::vector<std::string> only;  // empty: all of copy, permute, gemm, layer
  bool wants(const std::string& what) const {
    return only.empty() || std::find(only.begin(), only.end(), what) != only.end();
  }
};

void usage() {
  std::printf(
      "usage: gpu_bench [--quick] [--json PATH] [--device cuda|cpu] [--warmup N] [--repeat N]\n"
      "                 [--only copy,permute,gemm,layer]\n"
      "  --quick    tiny shapes, one timed iteration (a smoke run)\n"
      "  --json     also write one JSON object per measurement to PATH\n"
      "  --device   cuda (default) or cpu (a smoke test of this program, not a benchmark)\n"
      "Exits 77 when no CUDA device is present (and --device cpu is not given).\n");
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      MOE_CHECK(i + 1 < argc, "gpu_bench: ", a, " needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--json") {
      o.json_path = value();
    } else if (a == "--device") {
      const std::string d = value();
      MOE_CHECK(d == "cuda" || d == "cpu", "gpu_bench: --device must be cuda or cpu, got '", d, "'");
      o.device = d == "cpu" ? Device::cpu() : Device::cuda(0);
    } else if (a == "--warmup") {
      o.warmup = std::stoi(value());
      MOE_CHECK(o.warmup >= 0, "gpu_bench: --warmup must be >= 0, got ", o.warmup);
    } else if (a == "--repeat") {
      o.repeat = std::stoi(value());
      MOE_CHECK(o.repeat >= 1, "gpu_bench: --repeat must be >= 1, got ", o.repeat);
    } else if (a == "--only") {
      o.only = split_commas(value());
      for (const std::string& w : o.only)
        MOE_CHECK(w == "copy" || w == "permute" || w == "gemm" || w == "layer",
                  "gpu_bench: --only takes copy, permute, gemm, layer; got '", w, "'");
    } else if (a == "-h" || a == "--help") {
      usage();
      std::exit(0);
    } else {
      MOE_THROW(ErrorCode::invalid_argument, "gpu_bench: unknown argument '", a, "' (see --help)");
    }
  }
  return o;
}

// ---- shapes -----------------------------------------------------------------------------------------
// Megatron's moe_perf proxies on one GPU (no expert parallelism), 4096 tokens, swiglu, bf16.
// torch_peer.py defines the same shapes; keep the two in step.
struct LayerShape {
  std::string name;  // "mixtral" | "deepseek": the key shared with torch_peer.py
  int64_t T = 0, H = 0, F = 0, E = 0, k = 0;
  bool sigmoid = false;  // sigmoid + expert bias + group-limited top-k (else softmax, post)
  int64_t num_groups = 0, group_topk = 0;
  int64_t shared_F = 0;  // shared expert width (0: none)
  std::string balancing;  // aux_loss | seq_aux_loss
  double aux_coeff = 0.0;
};

std::vector<LayerShape> layer_shapes(bool quick) {
  LayerShape mix{"mixtral", 4096, 4096, 14336, 8, 2, false, 0, 0, 0, "aux_loss", 1e-2};
  LayerShape ds{"deepseek", 4096, 7168, 2048, 32, 8, true, 8, 4, 2048, "seq_aux_loss", 1e-4};
  if (quick) {  // tiny, same routing structure (E, k, groups)
    mix.T = 64, mix.H = 64, mix.F = 128;
    ds.T = 64, ds.H = 64, ds.F = 32, ds.shared_F = 32;
  }
  return {mix, ds};
}

std::string layer_label(const LayerShape& s) {
  std::ostringstream os;
  os << s.name << " T" << s.T << " H" << s.H << " F" << s.F << " E" << s.E << " top" << s.k;
  if (s.num_groups) os << " g" << s.num_groups << "/" << s.group_topk;
  if (s.sigmoid) os << " sigmoid+bias";
  if (s.shared_F) os << " shared" << s.shared_F;
  return os.str();
}

MoEConfig layer_config(const LayerShape& s) {
  MoEConfig c;
  c.hidden_size = s.H;
  c.num_moe_experts = s.E;
  c.moe_ffn_hidden_size = s.F;
  c.moe_router_topk = s.k;
  c.gated_linear_unit = true;  // swiglu
  c.activation_func = "silu";
  c.params_dtype = "bf16";
  c.moe_router_dtype = "fp32";
  c.moe_router_load_balancing_type = {s.balancing};
  c.moe_aux_loss_coeff = {s.aux_coeff};
  if (s.sigmoid) {
    c.moe_router_score_function = "sigmoid";
    c.moe_router_enable_expert_bias = true;
    c.moe_router_num_groups = s.num_groups;
    c.moe_router_group_topk = s.group_topk;
  }
  if (s.shared_F) c.moe_shared_expert_intermediate_size = s.shared_F;
  return c;
}

// Rows per expert for the grouped-GEMM benchmarks: uneven but deterministic (weights 1 ± 0.25 by a
// sine over the expert index), summing to n_rows. torch_peer.py computes the same counts.
std::vector<int64_t> expert_rows(int64_t n_rows, int64_t E) {
  std::vector<double> w(static_cast<size_t>(E));
  double sum = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    w[static_cast<size_t>(e)] = 1.0 + 0.25 * std::sin(1.7 * static_cast<double>(e) + 0.3);
    sum += w[static_cast<size_t>(e)];
  }
  std::vector<int64_t> rows(static_cast<size_t>(E));
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    rows[static_cast<size_t>(e)] =
        static_cast<int64_t>(std::floor(static_cast<double>(n_rows) * w[static_cast<size_t>(e)] / sum));
    total += rows[static_cast<size_t>(e)];
  }
  rows[0] += n_rows - total;
  return rows;
}

// The k distinct experts of token t for the permute benchmarks: a multiplicative hash picks a start
// and an odd stride (distinct for k <= E when E is a power of two). torch_peer.py does the same.
std::vector<int64_t> token_experts(int64_t t, int64_t E, int64_t k) {
  const uint32_t h = static_cast<uint32_t>(t) * 2654435761u;
  const int64_t start = static_cast<int64_t>(h % static_cast<uint32_t>(E));
  const int64_t step = 2 * static_cast<int64_t>((h >> 8) % static_cast<uint32_t>(E / 2)) + 1;
  std::vector<int64_t> out(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) out[static_cast<size_t>(j)] = (start + j * step) % E;
  return out;
}

// ---- timing -----------------------------------------------------------------------------------------
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  MOE_CHECK(!v.empty(), "gpu_bench: median of no samples");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Timing {
  double ms = 0.0;      // median per call
  double ms_min = 0.0;  // fastest sample per call
  int samples = 0;
  int inner = 1;
};

// Times fn(i) (i counts calls, for rotating buffers): `warmup` untimed calls, then `repeat` samples
// of `inner` calls each between two CUDA events on the backend's current stream (host clock after a
// device synchronize on the CPU backend).
class Timer {
 public:
  explicit Timer(Device d) : device_(d) {
    if (!d.is_cpu()) {
      BENCH_CUDA_OK(cudaEventCreate(&start_));
      BENCH_CUDA_OK(cudaEventCreate(&stop_));
    }
  }
  ~Timer() {
    if (start_) (void)cudaEventDestroy(start_);
    if (stop_) (void)cudaEventDestroy(stop_);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  Timing run(int warmup, int repeat, int inner, const std::function<void(int64_t)>& fn) {
    Backend& b = get_backend(device_);
    int64_t call = 0;
    for (int w = 0; w < warmup; ++w) fn(call++);
    b.synchronize();
    std::vector<double> per_call;
    for (int r = 0; r < repeat; ++r) {
      double ms = 0.0;
      if (device_.is_cpu()) {
        const double t0 = now_s();
        for (int j = 0; j < inner; ++j) fn(call++);
        b.synchronize();
        ms = (now_s() - t0) * 1e3;
      } else {
        auto stream = static_cast<cudaStream_t>(b.current_stream().native_handle());
        BENCH_CUDA_OK(cudaEventRecord(start_, stream));
        for (int j = 0; j < inner; ++j) fn(call++);
        BENCH_CUDA_OK(cudaEventRecord(stop_, stream));
        BENCH_CUDA_OK(cudaEventSynchronize(stop_));
        float f = 0.0f;
        BENCH_CUDA_OK(cudaEventElapsedTime(&f, start_, stop_));
        ms = static_cast<double>(f);
      }
      per_call.push_back(ms / inner);
    }
    Timing t;
    t.ms = median(per_call);
    t.ms_min = *std::min_element(per_call.begin(), per_call.end());
    t.samples = repeat;
    t.inner = inner;
    return t;
  }

 private:
  Device device_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

// ---- device data ------------------------------------------------------------------------------------
// A tensor of `shape` and `dtype` on `d` filled with scale·(u1 − u2), u1, u2 uniform in [0, 2) from
// the library's counter-based jitter op (the difference of two uniforms: zero mean, full mantissas,
// never zeros). Generated on the device in chunks, so large weights cost milliseconds, not minutes.
Tensor device_random(const Shape& shape, DType dtype, Device d, uint64_t seed, double scale) {
  Tensor out = Tensor::empty(shape, dtype, d);
  Tensor flat = out.view({out.numel()});  // (n) dtype
  const int64_t chunk = int64_t(1) << 26;
  const int64_t first = std::min<int64_t>(chunk, std::max<int64_t>(out.numel(), 1));
  Tensor u1 = Tensor::empty({first}, DType::f32, d), u2 = Tensor::empty({first}, DType::f32, d);  // (chunk) f32
  int64_t c = 0;
  for (int64_t start = 0; start < out.numel(); start += chunk, ++c) {
    const int64_t len = std::min(chunk, out.numel() - start);
    Tensor a = u1.narrow(0, len), b = u2.narrow(0, len);
    const uint64_t key = seed * 0x9E3779B97F4A7C15ull + 2 * static_cast<uint64_t>(c);
    ops::jitter(key, 1.0, a);
    ops::jitter(key + 1, 1.0, b);
    ops::axpby(scale, a, -scale, b);  // b = scale·(a − b)
    Tensor dst = flat.narrow(start, len);
    ops::cast_into(b, dst);
  }
  return out;
}

// ---- results ----------------------------------------------------------------------------------------
// One measurement: the fields every record has, plus extra "key": value pairs (JSON text).
struct Record {
  std::string kind;   // device | copy | dense_gemm | permute | unpermute | grouped_gemm | layer
  std::string name;   // the row key shared with torch_peer.py
  std::string label;  // for people
  Timing t;
  double bytes = 0.0, flops = 0.0;
  double rate = 0.0;      // GB/s (bytes) or TFLOP/s (flops)
  double fraction = std::numeric_limits<double>::quiet_NaN();  // of copy bandwidth / dense rate
  std::string fraction_of;  // "copy" | "dense"
  std::vector<std::pair<std::string, std::string>> extra;
};

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      o += '\\';
      o += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      o += buf;
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

std::string json_num(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os << std::setprecision(10) << v;
  return os.str();
}

std::string json_ints(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  os << "]";
  return os.str();
}

std::string to_json(const Record& r, const std::string& device_name) {
  std::string o = "{\"source\":\"ours\",\"variant\":\"moecore\"";
  o += ",\"kind\":" + json_str(r.kind) + ",\"name\":" + json_str(r.name) + ",\"label\":" + json_str(r.label);
  o += ",\"device\":" + json_str(device_name);
  if (r.kind != "device") {
    o += ",\"ms\":" + json_num(r.t.ms) + ",\"ms_min\":" + json_num(r.t.ms_min);
    o += ",\"samples\":" + std::to_string(r.t.samples) + ",\"inner\":" + std::to_string(r.t.inner);
    if (r.bytes > 0) o += ",\"bytes\":" + json_num(r.bytes) + ",\"gbps\":" + json_num(r.rate);
    if (r.flops > 0) o += ",\"flops\":" + json_num(r.flops) + ",\"tflops\":" + json_num(r.rate);
    if (!r.fraction_of.empty())
      o += ",\"fraction\":" + json_num(r.fraction) + ",\"fraction_of\":" + json_str(r.fraction_of);
  }
  for (const auto& [k, v] : r.extra) o += "," + json_str(k) + ":" + v;
  return o + "}";
}

class Results {
 public:
  Results(std::string device_name, std::string json_path) : device_name_(std::move(device_name)) {
    if (!json_path.empty()) {
      json_.open(json_path, std::ios::out | std::ios::trunc);
      MOE_CHECK_CODE(json_.good(), ErrorCode::io, "gpu_bench: cannot write --json file '", json_path, "'");
    }
  }
  void add(const Record& r) {
    if (r.kind != "device") {
      std::printf("  %-58s %10.4f ms  %9.2f %-7s", r.label.c_str(), r.t.ms, r.rate, r.bytes > 0 ? "GB/s" : "TFLOP/s");
      if (!r.fraction_of.empty()) std::printf("  %5.1f %% of %s", 100.0 * r.fraction, r.fraction_of.c_str());
      std::printf("\n");
      std::fflush(stdout);
    }
    records_.push_back(r);
    if (json_.is_open()) {
      json_ << to_json(r, device_name_) << "\n";
      json_.flush();
    }
  }
  void print_table() const {
    std::printf("\n%-60s %12s %12s %16s\n", "case", "ms (median)", "rate", "fraction");
    for (const Record& r : records_) {
      if (r.kind == "device") continue;
      std::ostringstream rate, frac;
      rate << std::fixed << std::setprecision(2) << r.rate << (r.bytes > 0 ? " GB/s" : " TF/s");
      if (!r.fraction_of.empty())
        frac << std::fixed << std::setprecision(1) << 100.0 * r.fraction << " % " << r.fraction_of;
      std::printf("%-60s %12.4f %12s %16s\n", r.label.c_str(), r.t.ms, rate.str().c_str(), frac.str().c_str());
    }
  }

 private:
  std::string device_name_;
  std::ofstream json_;
  std::vector<Record> records_;
};

double gbps(double bytes, double ms) { return bytes / (ms * 1e-3) * 1e-9; }
double tflops(double flops, double ms) { return flops / (ms * 1e-3) * 1e-12; }

struct Run {
  Options opt;
  Timer timer;
  Results results;
  double copy_gbps = std::numeric_limits<double>::quiet_NaN();  // (a), for the permute fractions
  double best_dense_tflops = 0.0;                              // for the layer fraction

  int warmup(int dflt) const { return opt.warmup >= 0 ? opt.warmup : (opt.quick ? 0 : dflt); }
  int repeat(int dflt) const { return opt.repeat >= 1 ? opt.repeat : (opt.quick ? 1 : dflt); }
  int inner(int dflt) const { return opt.quick ? 1 : dflt; }
};

// ---- (a) copy bandwidth -----------------------------------------------------------------------------
void bench_copy(Run& run) {
  const Device d = run.opt.device;
  const int64_t n = run.opt.quick ? (int64_t(1) << 19) : (int64_t(1) << 28);  // bf16 elements: 1 MiB / 512 MiB
  Tensor src = device_random({n}, DType::bf16, d, 1, 1.0), dst = Tensor::empty({n}, DType::bf16, d);  // (n) bf16
  Record r;
  r.kind = "copy";
  r.name = "copy";
  r.label = "copy D2D bf16 " + std::to_string(n * 2 >> 20) + " MiB (Tensor::copy_from)";
  r.t = run.timer.run(run.warmup(3), run.repeat(20), run.inner(5), [&](int64_t) { dst.copy_from(src); });
  r.bytes = 2.0 * static_cast<double>(src.nbytes());  // read + written
  r.rate = gbps(r.bytes, r.t.ms);
  run.copy_gbps = r.rate;
  run.results.add(r);
}

// ---- dense reference --------------------------------------------------------------------------------
void bench_dense_reference(Run& run) {
  const Device d = run.opt.device;
  const int64_t n = run.opt.quick ? 256 : 8192;
  Tensor A = device_random({n, n}, DType::bf16, d, 2, 1.0), B = device_random({n, n}, DType::bf16, d, 3, 1.0);
  Tensor C = Tensor::empty({n, n}, DType::bf16, d);  // (n, n) bf16
  Record r;
  r.kind = "dense_gemm";
  r.name = "dense";
  r.label = "dense bf16 GEMM " + std::to_string(n) + "^3 (ops::gemm, A·B^T)";
  r.t = run.timer.run(run.warmup(3), run.repeat(10), 1, [&](int64_t) { ops::gemm(A, false, B, true, C); });
  r.flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  r.rate = tflops(r.flops, r.t.ms);
  run.best_dense_tflops = std::max(run.best_dense_tflops, r.rate);
  r.extra.push_back({"M", std::to_string(n)});
  r.extra.push_back({"N", std::to_string(n)});
  r.extra.push_back({"K", std::to_string(n)});
  run.results.add(r);
}

// ---- (b) permute / unpermute ------------------------------------------------------------------------
void bench_permute(Run& run) {
  const Device d = run.opt.device;
  const LayerShape s = layer_shapes(run.opt.quick)[0];  // Mixtral-like tokens
  const int64_t T = s.T, H = s.H, E = s.E, k = s.k;
  std::vector<uint8_t> map_host(static_cast<size_t>(T * E), 0);
  std::vector<float> probs_host(static_cast<size_t>(T * E), 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e : token_experts(t, E, k)) {
      map_host[static_cast<size_t>(t * E + e)] = 1;
      probs_host[static_cast<size_t>(t * E + e)] = 1.0f / static_cast<float>(k);
    }
  Tensor map = Tensor::from_vector(map_host, {T, E}, d);      // (T, E) u8
  Tensor probs = Tensor::from_vector(probs_host, {T, E}, d);  // (T, E) f32
  std::vector<int64_t> counts = ops::routing_counts(map).to_vector<int64_t>();
  std::vector<int64_t> offsets(static_cast<size_t>(E));
  int64_t N = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[static_cast<size_t>(e)] = N;
    N += counts[static_cast<size_t>(e)];
  }
  MOE_CHECK(N == T * k, "gpu_bench: permute routing has ", N, " rows, expected T·k = ", T * k);
  Tensor row_id_map = Tensor::empty({T, E}, DType::i32, d);  // (T, E) i32
  ops::permute_index(map, offsets, row_id_map);

  // Three buffer sets in rotation, so repeated calls do not run out of L2.
  constexpr int kSets = 3;
  std::vector<Tensor> tokens, rows, row_probs, combined;
  for (int i = 0; i < kSets; ++i) {
    tokens.push_back(device_random({T, H}, DType::bf16, d, 10 + static_cast<uint64_t>(i), 1.0));  // (T, H) bf16
    rows.push_back(device_random({N, H}, DType::bf16, d, 20 + static_cast<uint64_t>(i), 1.0));    // (N, H) bf16
    row_probs.push_back(Tensor::empty({N}, DType::f32, d));                                        // (N) f32
    combined.push_back(Tensor::empty({T, H}, DType::bf16, d));                                     // (T, H) bf16
  }
  const double es = 2.0;  // bf16
  const std::string shape = "T" + std::to_string(T) + " H" + std::to_string(H) + " top" + std::to_string(k) +
                            " E" + std::to_string(E) + " bf16";
  {
    Record r;
    r.kind = "permute";
    r.name = "permute";
    r.label = "permute " + shape + " (+probs)";
    r.t = run.timer.run(run.warmup(5), run.repeat(20), run.inner(20), [&](int64_t i) {
      const size_t j = static_cast<size_t>(i % kSets);
      ops::permute(row_id_map, tokens[j], rows[j], &probs, &row_probs[j]);
    });
    // rows read + written, the index map, probs read and written
    r.bytes = 2.0 * static_cast<double>(N * H) * es + 4.0 * static_cast<double>(T * E) * 2.0 + 4.0 * static_cast<double>(N);
    r.rate = gbps(r.bytes, r.t.ms);
    r.fraction = r.rate / run.copy_gbps;
    r.fraction_of = "copy";
    r.extra.push_back({"rows_per_expert", json_ints(counts)});
    run.results.add(r);
  }
  {
    Record r;
    r.kind = "unpermute";
    r.name = "unpermute";
    r.label = "unpermute " + shape;
    r.t = run.timer.run(run.warmup(5), run.repeat(20), run.inner(20), [&](int64_t i) {
      const size_t j = static_cast<size_t>(i % kSets);
      ops::unpermute(row_id_map, rows[j], combined[j]);
    });
    // rows read, tokens written, the index map
    r.bytes = static_cast<double>(N * H) * es + static_cast<double>(T * H) * es + 4.0 * static_cast<double>(T * E);
    r.rate = gbps(r.bytes, r.t.ms);
    r.fraction = r.rate / run.copy_gbps;
    r.fraction_of = "copy";
    r.extra.push_back({"rows_per_expert", json_ints(counts)});
    run.results.add(r);
  }
}

// ---- (c) grouped GEMM -------------------------------------------------------------------------------
// One expert GEMM of a layer: weights (G, N, K); fc1: N = 2F (swiglu), K = H; fc2: N = H, K = F.
struct GemmCase {
  std::string layer, matrix;
  int64_t G = 0, N = 0, K = 0;
  std::vector<int64_t> rows;  // (G), summing to T·k
};

std::vector<GemmCase> gemm_cases(bool quick) {
  std::vector<GemmCase> v;
  for (const LayerShape& s : layer_shapes(quick)) {
    const std::vector<int64_t> rows = expert_rows(s.T * s.k, s.E);
    v.push_back({s.name, "fc1", s.E, 2 * s.F, s.H, rows});
    v.push_back({s.name, "fc2", s.E, s.H, s.F, rows});
  }
  return v;
}

void bench_grouped_gemm(Run& run) {
  const Device d = run.opt.device;
  for (const GemmCase& c : gemm_cases(run.opt.quick)) {
    int64_t M = 0;
    for (int64_t m : c.rows) M += m;
    const int64_t G = c.G, N = c.N, K = c.K;
    Tensor X = device_random({M, K}, DType::bf16, d, 31, 1.0);     // (M, K) bf16: expert inputs
    Tensor W = device_random({G, N, K}, DType::bf16, d, 32, 0.02);  // (G, N, K) bf16: expert weights
    Tensor Y = device_random({M, N}, DType::bf16, d, 33, 1.0);     // (M, N) bf16: outputs / their grads
    Tensor W0 = W.narrow(0, 1).view({N, K});                        // (N, K) bf16: one expert, for dense
    const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
    for (GroupedGemmMode mode : {GroupedGemmMode::fwd, GroupedGemmMode::dgrad, GroupedGemmMode::wgrad}) {
      const char* mname = mode == GroupedGemmMode::fwd ? "fwd" : mode == GroupedGemmMode::dgrad ? "dgrad" : "wgrad";
      Tensor out, dense_out;
      std::function<void(int64_t)> grouped, dense;
      switch (mode) {
        case GroupedGemmMode::fwd:  // Y_g (m_g, N) = X_g · W_gᵀ; dense: (M, N) = X · W0ᵀ
          out = Tensor::empty({M, N}, DType::bf16, d);
          dense_out = Tensor::empty({M, N}, DType::bf16, d);
          grouped = [&](int64_t) { ops::grouped_gemm(GroupedGemmMode::fwd, X, W, out, c.rows); };
          dense = [&](int64_t) { ops::gemm(X, false, W0, true, dense_out); };
          break;
        case GroupedGemmMode::dgrad:  // dX_g (m_g, K) = dY_g · W_g; dense: (M, K) = dY · W0
          out = Tensor::empty({M, K}, DType::bf16, d);
          dense_out = Tensor::empty({M, K}, DType::bf16, d);
          grouped = [&](int64_t) { ops::grouped_gemm(GroupedGemmMode::dgrad, Y, W, out, c.rows); };
          dense = [&](int64_t) { ops::gemm(Y, false, W0, false, dense_out); };
          break;
        case GroupedGemmMode::wgrad:  // dW_g (N, K) = dY_gᵀ · X_g; dense: (N, K) = dYᵀ · X (inner M)
          out = Tensor::empty({G, N, K}, DType::bf16, d);
          dense_out = Tensor::empty({N, K}, DType::bf16, d);
          grouped = [&](int64_t) { ops::grouped_gemm(GroupedGemmMode::wgrad, Y, X, out, c.rows); };
          dense = [&](int64_t) { ops::gemm(Y, true, X, false, dense_out); };
          break;
      }
      const Timing td = run.timer.run(run.warmup(3), run.repeat(10), 1, dense);
      const Timing tg = run.timer.run(run.warmup(3), run.repeat(10), 1, grouped);
      Record r;
      r.kind = "grouped_gemm";
      r.name = std::string("grouped.") + mname + "." + c.layer + "." + c.matrix;
      std::ostringstream label;
      label << "grouped " << mname << " " << c.layer << " " << c.matrix << " G" << G << " M" << M << " N" << N
            << " K" << K;
      r.label = label.str();
      r.t = tg;
      r.flops = flops;
      r.rate = tflops(flops, tg.ms);
      const double dense_tf = tflops(flops, td.ms);
      run.best_dense_tflops = std::max(run.best_dense_tflops, dense_tf);
      r.fraction = r.rate / dense_tf;
      r.fraction_of = "dense";
      r.extra.push_back({"mode", json_str(mname)});
      r.extra.push_back({"G", std::to_string(G)});
      r.extra.push_back({"M", std::to_string(M)});
      r.extra.push_back({"N", std::to_string(N)});
      r.extra.push_back({"K", std::to_string(K)});
      r.extra.push_back({"rows_per_expert", json_ints(c.rows)});
      r.extra.push_back({"dense_ms", json_num(td.ms)});
      r.extra.push_back({"dense_tflops", json_num(dense_tf)});
      run.results.add(r);
    }
  }
}

// ---- (d) the layer ----------------------------------------------------------------------------------
// GEMM FLOPs of one forward + backward (no dropping): routed experts on T·k rows, the shared expert
// on T rows, the router; each GEMM once forward and twice backward.
double layer_flops(const LayerShape& s) {
  const double T = static_cast<double>(s.T), H = static_cast<double>(s.H), F = static_cast<double>(s.F);
  double f = 3.0 * 2.0 * T * static_cast<double>(s.k) * H * (2.0 * F + F);
  if (s.shared_F) f += 3.0 * 2.0 * T * H * 3.0 * static_cast<double>(s.shared_F);
  return f + 3.0 * 2.0 * T * H * static_cast<double>(s.E);
}

void bench_layer(Run& run) {
  const Device d = run.opt.device;
  for (const LayerShape& s : layer_shapes(run.opt.quick)) {
    MoEConfig cfg = layer_config(s);
    validate(cfg);
    std::printf("  [%s] constructing the layer (host-side parameter init; a minute at full size)...\n",
                s.name.c_str());
    std::fflush(stdout);
    get_backend(d).reset_peak_memory();  // peak_bytes below: this layer's, not the GEMM benchmarks'
    const double t0 = now_s();
    MoELayer layer(cfg, d);
    get_backend(d).synchronize();
    const double setup_s = now_s() - t0;
    Tensor x = device_random({s.T, s.H}, DType::bf16, d, 41, 1.0);    // (T, H) bf16
    Tensor dy = device_random({s.T, s.H}, DType::bf16, d, 42, 1e-2);  // (T, H) bf16
    ForwardContext ctx;
    ctx.seq_length = s.T;  // one sequence of T tokens (seq_aux_loss per sequence)
    ctx.batch_size = 1;
    const Timing t = run.timer.run(run.warmup(3), run.repeat(10), 1, [&](int64_t) {
      Tensor y = layer.forward(x, ctx);  // (T, H) bf16
      Tensor dx = layer.backward(dy);    // (T, H) bf16
      (void)dx;
    });
    Record r;
    r.kind = "layer";
    r.name = "layer." + s.name;
    r.label = "layer fwd+bwd " + layer_label(s);
    r.t = t;
    r.flops = layer_flops(s);
    r.rate = tflops(r.flops, t.ms);
    if (run.best_dense_tflops > 0) {
      r.fraction = r.rate / run.best_dense_tflops;
      r.fraction_of = "dense";
    }
    r.extra.push_back({"setup_s", json_num(setup_s)});
    r.extra.push_back({"tokens_per_expert", json_ints(layer.last_routing().tokens_per_expert)});
    r.extra.push_back({"peak_bytes", std::to_string(get_backend(d).memory_stats().peak_bytes)});
    run.results.add(r);
  }
}

int run_main(int argc, char** argv) {
  Options opt = parse_options(argc, argv);
  if (!opt.device.is_cpu() && !backend_available(DeviceType::cuda)) {
    std::printf("SKIP: gpu_bench: no CUDA device available (%s)\n", build_info().c_str());
    return 77;
  }
  std::string device_name = get_backend(opt.device).name();
  if (!opt.device.is_cpu()) {
    cudaDeviceProp p{};
    BENCH_CUDA_OK(cudaGetDeviceProperties(&p, opt.device.index));
    device_name = p.name;
  }
  std::printf("gpu_bench on %s%s (%s)\n", device_name.c_str(), opt.quick ? ", --quick" : "",
              build_info().c_str());
  if (opt.device.is_cpu()) std::printf("note: --device cpu is a smoke test of this program, not a benchmark\n");
  Run run{opt, Timer(opt.device), Results(device_name, opt.json_path)};
  Record dev;
  dev.kind = "device";
  dev.name = "device";
  dev.label = device_name;
  dev.extra.push_back({"quick", opt.quick ? "true" : "false"});
  dev.extra.push_back({"build", json_str(build_info())});
  run.results.add(dev);

  // The copy rate and the dense reference come first: the fractions below are relative to them.
  if (opt.wants("copy") || opt.wants("permute")) bench_copy(run);
  if (opt.wants("permute")) bench_permute(run);
  if (opt.wants("gemm") || opt.wants("layer")) bench_dense_reference(run);
  if (opt.wants("gemm")) bench_grouped_gemm(run);
  if (opt.wants("layer")) bench_layer(run);
  run.results.print_table();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_bench: error: %s\n", e.what());
    return 1;
  }
}
