// Log lines and metrics: Megatron's training and validation lines byte for byte (the expected strings
// were printed by Megatron's own format expressions in Python), the MoE loss names, the JSON-lines
// metrics file parsed back (also with concurrent writers), load statistics, the progress bar.
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/test_util.h"
#include "moecore/error.h"
#include "moecore/training.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;
using json = nlohmann::json;

namespace {

TrainLogFields example_fields() {
  TrainLogFields f;
  f.timestamp = "2024-05-01 12:00:00.123456";
  f.iteration = 10;
  f.train_iters = 100;
  f.consumed_samples = 320;
  f.elapsed_ms_per_iteration = 0.12345 * 1000.0;
  f.learning_rate = 1e-4;
  f.global_batch_size = 32;
  f.losses = {{"lm loss", 3.4567891}, {"load_balancing_loss", 1.0123456}, {"z_loss", 0.00123}};
  f.loss_scale = 1.0;
  f.grad_norm = 0.12345;
  return f;
}

// Printed by Megatron's training_log format expressions (Python) for example_fields().
const char* const kMegatronLine =
    " [2024-05-01 12:00:00.123456] iteration       10/     100 | consumed samples:          320 | elapsed time "
    "per iteration (ms): 123.5 | learning rate: 1.000000E-04 | global batch size:    32 | lm loss: 3.456789E+00 | "
    "load_balancing_loss: 1.012346E+00 | z_loss: 1.230000E-03 | loss scale: 1.0 | grad norm: 0.123 | number of "
    "skipped iterations:   0 | number of nan iterations:   0 |";

std::string temp_path(const std::string& name) {
  std::string tmpl = "/tmp/moecore_test_train_log_XXXXXX";
  EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
  return tmpl + "/" + name;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

}  // namespace

TEST(TrainLog, MegatronsLineExactly) {
  EXPECT_EQ(format_train_log_line(example_fields()), kMegatronLine);
}

TEST(TrainLog, OurFieldsFollowMegatrons) {
  TrainLogFields f = example_fields();
  f.tokens_per_second_per_gpu = 12345.678;
  f.peak_memory_mb = 1536.04;
  EXPECT_EQ(format_train_log_line(f),
            std::string(kMegatronLine) + " tokens per second per GPU: 12345.7 | peak memory (MB): 1536.0 |");
}

TEST(TrainLog, OptionalFieldsAndWidths) {
  TrainLogFields f = example_fields();
  f.timestamp.clear();
  f.learning_rate.reset();
  f.grad_norm.reset();
  f.losses = {{"lm loss", 2.0}, {"load_balancing_loss", -1.0}, {"z_loss", std::nan("")}};
  f.iteration = 123456789;  // wider than the field: Python's {:8d} does not cut, nor does printf
  f.train_iters = 123456789;
  f.consumed_samples = 7;
  f.global_batch_size = 123456;
  f.skipped_iterations = 2;
  f.nan_iterations = 1234;
  f.loss_scale = 65536.0;
  const std::string line = format_train_log_line(f);
  EXPECT_EQ(line,
            " iteration 123456789/123456789 | consumed samples:            7 | elapsed time per iteration (ms): "
            "123.5 | global batch size: 123456 | lm loss: 2.000000E+00 | loss scale: 65536.0 | number of skipped "
            "iterations:   2 | number of nan iterations: 1234 |");
  // Megatron prints a loss only when avg >= 0: negative and NaN values are left out.
  EXPECT_EQ(line.find("load_balancing_loss"), std::string::npos);
  EXPECT_EQ(line.find("z_loss"), std::string::npos);
  EXPECT_EQ(line.find("learning rate"), std::string::npos);
  EXPECT_EQ(line.find("grad norm"), std::string::npos);
}

TEST(TrainLog, ValidationBlockExactly) {
  // Printed by Megatron's evaluate_and_print_results expressions (Python).
  const std::string middle = " validation loss at iteration 10 | lm loss value: 2.500000E+00 | lm loss PPL: 1.218249E+01 | ";
  const std::string dashes(middle.size() + 1, '-');
  EXPECT_EQ(dashes.size(), 94u);
  EXPECT_EQ(format_validation_line("iteration 10", 2.5), dashes + "\n" + middle + "\n" + dashes);
  EXPECT_EQ(format_validation_line("iteration 10", {{"lm loss", 2.5}}), dashes + "\n" + middle + "\n" + dashes);
  // PPL = exp(min(20, loss)); Python's min(20, nan) is 20.
  EXPECT_TRUE(contains_all(format_validation_line("iteration 7 on validation set", 25.0),
                           {" validation loss at iteration 7 on validation set | ", "lm loss value: 2.500000E+01",
                            "lm loss PPL: 4.851652E+08 | "}));
  EXPECT_TRUE(contains_all(format_validation_line("iteration 7", std::nan("")),
                           {"lm loss value: NAN | ", "lm loss PPL: 4.851652E+08 | "}));
}

TEST(TrainLog, MoELossNamesInMegatronsOrder) {
  MoEConfig c;
  EXPECT_EQ(moe_loss_names(c), std::vector<std::string>{"load_balancing_loss"});
  c.moe_router_load_balancing_type = {"global_aux_loss", "seq_aux_loss", "aux_loss"};
  c.moe_z_loss_coeff = 1e-3;
  EXPECT_EQ(moe_loss_names(c), (std::vector<std::string>{"load_balancing_loss", "seq_load_balancing_loss",
                                                        "global_load_balancing_loss", "z_loss"}));
  c.moe_router_load_balancing_type = {"none"};
  c.moe_z_loss_coeff.reset();
  EXPECT_TRUE(moe_loss_names(c).empty());
}

TEST(TrainLog, TimestampLooksLikePythons) {
  const std::string t = megatron_timestamp();
  EXPECT_TRUE(std::regex_match(t, std::regex(R"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})"))) << t;
}

TEST(Metrics, ExpertLoadStats) {
  ExpertLoadStats s = expert_load_stats({10, 10, 10, 10});
  EXPECT_EQ(s.min, 10);
  EXPECT_EQ(s.max, 10);
  EXPECT_EQ(s.cv, 0.0);
  s = expert_load_stats({0, 20});  // mean 10, population std 10
  EXPECT_EQ(s.min, 0);
  EXPECT_EQ(s.max, 20);
  EXPECT_DOUBLE_EQ(s.cv, 1.0);
  s = expert_load_stats({1, 2, 3, 6});  // mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5
  EXPECT_DOUBLE_EQ(s.cv, std::sqrt(3.5) / 3.0);
  EXPECT_EQ(expert_load_stats({0, 0, 0}).cv, 0.0);
  EXPECT_EQ(expert_load_stats({}).max, 0);
}

TEST(Metrics, StepAndValidationRecordsParseBack) {
  const std::string path = temp_path("metrics.jsonl");
  StepMetrics m;
  m.iteration = 20;
  m.consumed_samples = 640;
  m.lr = 2.5e-4;
  m.losses = {{"lm loss", 3.25}, {"load_balancing_loss", 1.0625}, {"z_loss", std::numeric_limits<double>::infinity()}};
  m.grad_norm = 0.5;
  m.elapsed_ms_per_iteration = 12.5;
  m.tokens_per_second = 1024.0;
  m.peak_bytes = 123456789012;
  m.moe_layers = {{0, {4, 0, 12, 0}, 1.25, 0.5, 3}, {2, {5, 5, 5, 1}, 1.0, 0.25, 0}};
  {
    MetricsWriter w(path);
    EXPECT_EQ(w.path(), path);
    w.write_run_info(R"({"world_size": 4, "type": "ignored", "config": {"num_layers": 4}})");
    w.write_step(m);
    w.write_validation(20, {{"lm loss", 3.0}});
  }
  const std::vector<std::string> lines = read_lines(path);
  ASSERT_EQ(lines.size(), 5u);
  json run = json::parse(lines[0]);
  EXPECT_EQ(run["type"], "run");
  EXPECT_EQ(run["world_size"], 4);
  EXPECT_EQ(run["config"]["num_layers"], 4);
  json t = json::parse(lines[1]);
  EXPECT_EQ(t["type"], "train");
  EXPECT_EQ(t["iteration"], 20);
  EXPECT_EQ(t["consumed_samples"], 640);
  EXPECT_EQ(t["lr"].get<double>(), 2.5e-4);
  EXPECT_EQ(t["lm_loss"].get<double>(), 3.25);
  EXPECT_EQ(t["losses"]["load_balancing_loss"].get<double>(), 1.0625);
  EXPECT_TRUE(t["losses"]["z_loss"].is_null());  // not finite → null (JSON has no infinity)
  EXPECT_EQ(t["grad_norm"].get<double>(), 0.5);
  EXPECT_EQ(t["elapsed_ms_per_iteration"].get<double>(), 12.5);
  EXPECT_EQ(t["tokens_per_second"].get<double>(), 1024.0);
  EXPECT_EQ(t["peak_bytes"].get<int64_t>(), 123456789012);
  json l0 = json::parse(lines[2]), l2 = json::parse(lines[3]);
  EXPECT_EQ(l0["type"], "moe_layer");
  EXPECT_EQ(l0["iteration"], 20);
  EXPECT_EQ(l0["layer"], 0);
  EXPECT_EQ(l0["tokens_per_expert"].get<std::vector<int64_t>>(), (std::vector<int64_t>{4, 0, 12, 0}));
  EXPECT_EQ(l0["load_min"], 0);
  EXPECT_EQ(l0["load_max"], 12);
  EXPECT_DOUBLE_EQ(l0["load_cv"].get<double>(), expert_load_stats({4, 0, 12, 0}).cv);
  EXPECT_EQ(l0["aux_loss"].get<double>(), 1.25);
  EXPECT_EQ(l0["z_loss"].get<double>(), 0.5);
  EXPECT_EQ(l0["dropped_tokens"], 3);
  EXPECT_EQ(l2["layer"], 2);
  EXPECT_EQ(l2["load_min"], 1);
  json v = json::parse(lines[4]);
  EXPECT_EQ(v["type"], "validation");
  EXPECT_EQ(v["lm_loss"].get<double>(), 3.0);
  EXPECT_DOUBLE_EQ(v["ppl"].get<double>(), std::exp(3.0));
  EXPECT_EQ(v["losses"]["lm loss"].get<double>(), 3.0);
  // The static helpers give the same lines.
  std::vector<std::string> again = MetricsWriter::step_lines(m);
  ASSERT_EQ(again.size(), 3u);
  EXPECT_EQ(again[0], lines[1]);
  EXPECT_EQ(MetricsWriter::validation_line(20, {{"lm loss", 3.0}}), lines[4]);
  // Each line is on disk as soon as write returns: no flush or close needed.
  MetricsWriter w(path, /*truncate=*/false);
  w.write_validation(30, {{"lm loss", 2.0}});
  EXPECT_EQ(read_lines(path).size(), 6u);
  // A new writer truncates by default.
  MetricsWriter fresh(path);
  EXPECT_EQ(read_lines(path).size(), 0u);
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

TEST(Metrics, ConcurrentWritersNeverInterleave) {
  const std::string path = temp_path("shared.jsonl");
  { MetricsWriter create(path); }
  constexpr int kThreads = 4, kLines = 300;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      MetricsWriter w(path, /*truncate=*/false);
      StepMetrics m;
      m.losses = {{"lm loss", 1.0 + t}};
      m.moe_layers = {{t, std::vector<int64_t>(64, t), 0.0, 0.0, 0}};  // a long line
      for (int i = 0; i < kLines; ++i) {
        m.iteration = i;
        w.write_step(m);
      }
    });
  for (auto& th : threads) th.join();
  const std::vector<std::string> lines = read_lines(path);
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kLines * 2));
  std::vector<int> per_thread(kThreads, 0);
  for (const std::string& line : lines) {
    json j = json::parse(line);  // throws on a torn line
    if (j["type"] == "train") ++per_thread[static_cast<size_t>(j["lm_loss"].get<double>() - 1.0)];
  }
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(per_thread[static_cast<size_t>(t)], kLines);
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

TEST(Metrics, Errors) {
  EXPECT_TRUE(contains_all(error_of([] { MetricsWriter w("/nonexistent_dir_moecore/m.jsonl"); }, ErrorCode::io),
                           {"/nonexistent_dir_moecore/m.jsonl", "metrics file"}));
  EXPECT_TRUE(contains_all(error_of([] { MetricsWriter w(""); }), {"empty path"}));
  const std::string path = temp_path("bad.jsonl");
  MetricsWriter w(path);
  EXPECT_TRUE(contains_all(error_of([&] { w.write_run_info("[1, 2]"); }), {"JSON object", "array"}));
  EXPECT_TRUE(contains_all(error_of([&] { w.write_run_info("{"); }), {"not valid JSON"}));
  std::filesystem::remove_all(std::filesystem::path(path).parent_path());
}

TEST(Progress, BarText) {
  EXPECT_EQ(progress_bar_text(45, 100, 20, "loss 3.2"), "[#########-----------]  45/100  45%  loss 3.2");
  EXPECT_EQ(progress_bar_text(0, 7, 4, ""), "[----] 0/7   0%");
  EXPECT_EQ(progress_bar_text(7, 7, 4, ""), "[####] 7/7 100%");
  EXPECT_EQ(progress_bar_text(9, 7, 4, ""), "[####] 7/7 100%");  // clamped
}

TEST(Progress, DrawsOnlyWhenEnabled) {
  testing::internal::CaptureStdout();
  {
    ProgressIndicator off(10, /*enabled=*/false);
    off.update(3, "x");
    off.clear();
  }
  EXPECT_EQ(testing::internal::GetCapturedStdout(), "");
  testing::internal::CaptureStdout();
  {
    ProgressIndicator on(10, /*enabled=*/true, 10);
    EXPECT_TRUE(on.enabled());
    on.update(5, "half");
    on.clear();
    on.clear();  // nothing drawn: nothing to clear
  }
  EXPECT_EQ(testing::internal::GetCapturedStdout(), "\r[#####-----]  5/10  50%  half\033[K\r\033[K");
  // Under ctest stdout is a file or a pipe, never a terminal: the default is off.
  EXPECT_FALSE(ProgressIndicator(10).enabled() && !stdout_is_tty());
}
