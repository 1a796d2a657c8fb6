// Megatron's training and validation log lines (megatron/training/training.py training_log and
// evaluate_and_print_results; the MoE losses of megatron/core/transformer/moe/moe_logging.py), the
// JSON-lines metrics file and the terminal progress bar.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>

#include "moecore/error.h"
#include "moecore/training.h"

namespace moe {

namespace {

using ordered_json = nlohmann::ordered_json;

// printf into a std::string.
template <class... A>
std::string strf(const char* format, A... args) {
  char buf[256];
  int n = std::snprintf(buf, sizeof(buf), format, args...);
  if (n < 0) return std::string();
  if (static_cast<size_t>(n) < sizeof(buf)) return std::string(buf, static_cast<size_t>(n));
  std::string out(static_cast<size_t>(n) + 1, '\0');
  std::snprintf(out.data(), out.size(), format, args...);
  out.resize(static_cast<size_t>(n));
  return out;
}

// Python's '{:.6E}'.format(x) (printf's %E spells nan and inf NAN and INF, as Python does).
std::string sci6(double x) { return strf("%.6E", x); }

// A JSON number, or null when it is not finite (JSON has no NaN or infinity).
ordered_json num(double x) { return std::isfinite(x) ? ordered_json(x) : ordered_json(nullptr); }

ordered_json losses_object(const std::vector<std::pair<std::string, double>>& losses) {
  ordered_json o = ordered_json::object();
  for (const auto& [name, value] : losses) o[name] = num(value);
  return o;
}

std::optional<double> find_loss(const std::vector<std::pair<std::string, double>>& losses, const std::string& name) {
  for (const auto& [n, v] : losses)
    if (n == name) return v;
  return std::nullopt;
}

}  // namespace

// ---- log lines ------------------------------------------------------------------------------------------

std::string format_train_log_line(const TrainLogFields& f) {
  std::string s;
  if (!f.timestamp.empty()) s += " [" + f.timestamp + "]";
  s += strf(" iteration %8lld/%8lld |", static_cast<long long>(f.iteration), static_cast<long long>(f.train_iters));
  s += strf(" consumed samples: %12lld |", static_cast<long long>(f.consumed_samples));
  s += strf(" elapsed time per iteration (ms): %.1f |", f.elapsed_ms_per_iteration);
  if (f.learning_rate) s += " learning rate: " + sci6(*f.learning_rate) + " |";
  s += strf(" global batch size: %5lld |", static_cast<long long>(f.global_batch_size));
  for (const auto& [name, value] : f.losses)
    if (value >= 0.0) s += " " + name + ": " + sci6(value) + " |";  // Megatron prints avg >= 0 only
  s += strf(" loss scale: %.1f |", f.loss_scale);
  if (f.grad_norm) s += strf(" grad norm: %.3f |", *f.grad_norm);
  s += strf(" number of skipped iterations: %3lld |", static_cast<long long>(f.skipped_iterations));
  s += strf(" number of nan iterations: %3lld |", static_cast<long long>(f.nan_iterations));
  if (f.tokens_per_second_per_gpu) s += strf(" tokens per second per GPU: %.1f |", *f.tokens_per_second_per_gpu);
  if (f.peak_memory_mb) s += strf(" peak memory (MB): %.1f |", *f.peak_memory_mb);
  return s;
}

std::string format_validation_line(const std::string& prefix,
                                   const std::vector<std::pair<std::string, double>>& losses) {
  std::string s = " validation loss at " + prefix + " | ";
  for (const auto& [name, value] : losses) {
    s += name + " value: " + sci6(value) + " | ";
    const double capped = value < 20.0 ? value : 20.0;  // Python's min(20, x): NaN gives 20
    s += name + " PPL: " + sci6(std::exp(capped)) + " | ";
  }
  const std::string dashes(s.size() + 1, '-');
  return dashes + "\n" + s + "\n" + dashes;
}

std::string format_validation_line(const std::string& prefix, double lm_loss) {
  return format_validation_line(prefix, {{"lm loss", lm_loss}});
}

std::vector<std::string> moe_loss_names(const MoEConfig& c) {
  std::vector<std::string> names;
  auto has = [&](const char* t) {
    return std::find(c.moe_router_load_balancing_type.begin(), c.moe_router_load_balancing_type.end(), t) !=
           c.moe_router_load_balancing_type.end();
  };
  if (has("aux_loss")) names.emplace_back("load_balancing_loss");
  if (has("seq_aux_loss")) names.emplace_back("seq_load_balancing_loss");
  if (has("global_aux_loss")) names.emplace_back("global_load_balancing_loss");
  if (c.moe_z_loss_coeff) names.emplace_back("z_loss");
  return names;
}

std::string megatron_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S", &tm);
  return std::string(buf) + strf(".%06lld", static_cast<long long>(micros < 0 ? micros + 1000000 : micros));
}

// ---- metrics --------------------------------------------------------------------------------------------

ExpertLoadStats expert_load_stats(const std::vector<int64_t>& load) {
  ExpertLoadStats s;
  if (load.empty()) return s;
  auto [mn, mx] = std::minmax_element(load.begin(), load.end());
  s.min = *mn;
  s.max = *mx;
  double mean = 0.0;
  for (int64_t v : load) mean += static_cast<double>(v);
  mean /= static_cast<double>(load.size());
  if (mean == 0.0) return s;
  double var = 0.0;
  for (int64_t v : load) var += (static_cast<double>(v) - mean) * (static_cast<double>(v) - mean);
  var /= static_cast<double>(load.size());
  s.cv = std::sqrt(var) / mean;
  return s;
}

std::vector<std::string> MetricsWriter::step_lines(const StepMetrics& m) {
  std::vector<std::string> lines;
  ordered_json t = ordered_json::object();
  t["type"] = "train";
  t["iteration"] = m.iteration;
  t["consumed_samples"] = m.consumed_samples;
  t["lr"] = num(m.lr);
  const std::optional<double> lm = find_loss(m.losses, "lm loss");
  t["lm_loss"] = lm ? num(*lm) : ordered_json(nullptr);
  t["losses"] = losses_object(m.losses);
  t["grad_norm"] = m.grad_norm ? num(*m.grad_norm) : ordered_json(nullptr);
  t["elapsed_ms_per_iteration"] = num(m.elapsed_ms_per_iteration);
  t["tokens_per_second"] = num(m.tokens_per_second);
  t["peak_bytes"] = m.peak_bytes;
  lines.push_back(t.dump());
  for (const MoELayerMetrics& l : m.moe_layers) {
    const ExpertLoadStats st = expert_load_stats(l.tokens_per_expert);
    ordered_json o = ordered_json::object();
    o["type"] = "moe_layer";
    o["iteration"] = m.iteration;
    o["layer"] = l.layer;
    o["tokens_per_expert"] = l.tokens_per_expert;
    o["load_min"] = st.min;
    o["load_max"] = st.max;
    o["load_cv"] = num(st.cv);
    o["aux_loss"] = num(l.aux_loss);
    o["z_loss"] = num(l.z_loss);
    o["dropped_tokens"] = l.dropped_tokens;
    lines.push_back(o.dump());
  }
  return lines;
}

std::string MetricsWriter::validation_line(int64_t iteration,
                                           const std::vector<std::pair<std::string, double>>& losses) {
  ordered_json o = ordered_json::object();
  o["type"] = "validation";
  o["iteration"] = iteration;
  const std::optional<double> lm = find_loss(losses, "lm loss");
  o["lm_loss"] = lm ? num(*lm) : ordered_json(nullptr);
  o["ppl"] = lm ? num(std::exp(*lm < 20.0 ? *lm : 20.0)) : ordered_json(nullptr);
  o["losses"] = losses_object(losses);
  return o.dump();
}

MetricsWriter::MetricsWriter(const std::string& path, bool truncate) : path_(path) {
  MOE_CHECK(!path.empty(), "MetricsWriter: empty path");
  const int flags = O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (truncate ? O_TRUNC : 0);
  fd_ = ::open(path.c_str(), flags, 0644);
  MOE_CHECK_CODE(fd_ >= 0, ErrorCode::io, "cannot open metrics file '", path, "' for writing: ", std::strerror(errno));
}

MetricsWriter::~MetricsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsWriter::write_line(const std::string& line) {
  const std::string text = line + "\n";
  size_t done = 0;
  while (done < text.size()) {  // one write for any line of sane size; the loop covers short writes
    ssize_t n = ::write(fd_, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    MOE_CHECK_CODE(n > 0, ErrorCode::io, "cannot write to metrics file '", path_, "': ", std::strerror(errno));
    done += static_cast<size_t>(n);
  }
}

void MetricsWriter::write_step(const StepMetrics& step) {
  for (const std::string& line : step_lines(step)) write_line(line);
}

void MetricsWriter::write_validation(int64_t iteration, const std::vector<std::pair<std::string, double>>& losses) {
  write_line(validation_line(iteration, losses));
}

void MetricsWriter::write_run_info(const std::string& json_object) {
  ordered_json in;
  try {
    in = ordered_json::parse(json_object);
  } catch (const std::exception& e) {
    MOE_THROW(ErrorCode::invalid_argument, "MetricsWriter::write_run_info: not valid JSON: ", e.what());
  }
  MOE_CHECK(in.is_object(), "MetricsWriter::write_run_info: expected a JSON object, got ", in.type_name());
  ordered_json o = ordered_json::object();
  o["type"] = "run";
  for (auto it = in.begin(); it != in.end(); ++it)
    if (it.key() != "type") o[it.key()] = it.value();
  write_line(o.dump());
}

// ---- progress -------------------------------------------------------------------------------------------

bool stdout_is_tty() { return ::isatty(STDOUT_FILENO) == 1; }

std::string progress_bar_text(int64_t done, int64_t total, int width, const std::string& status) {
  const int64_t t = std::max<int64_t>(total, 1);
  const int64_t d = std::clamp<int64_t>(done, 0, t);
  const int w = std::max(width, 1);
  const int filled = static_cast<int>(d * w / t);
  std::string bar = "[";
  bar.append(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(w - filled), '-');
  bar += ']';
  const int digits = static_cast<int>(std::to_string(t).size());
  std::string s = bar + strf(" %*lld/%lld %3lld%%", digits, static_cast<long long>(d), static_cast<long long>(t),
                            static_cast<long long>(d * 100 / t));
  if (!status.empty()) s += "  " + status;
  return s;
}

ProgressIndicator::ProgressIndicator(int64_t total, bool enabled, int width)
    : total_(total), enabled_(enabled), width_(width) {}

ProgressIndicator::~ProgressIndicator() { finish(); }

void ProgressIndicator::update(int64_t done, const std::string& status) {
  if (!enabled_) return;
  std::string line = "\r";
  line += progress_bar_text(done, total_, width_, status);
  line += "\033[K";
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);
  drawn_ = true;
}

void ProgressIndicator::clear() {
  if (!enabled_ || !drawn_) return;
  std::fputs("\r\033[K", stdout);
  std::fflush(stdout);
  drawn_ = false;
}

void ProgressIndicator::finish() { clear(); }

}  // namespace moe
