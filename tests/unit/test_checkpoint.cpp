// Checkpoints in one process (docs/checkpoints.md):
//   - boxes: flat ranges and GLU-halves shards map onto exactly the canonical indices
//     shard_canonical_indices gives; subtraction partitions; CRC-32 against zlib's check value;
//   - save / load round trip of every tensor kind (bf16 parameters, f32 masters, AdamW moments, SGD
//     momentum, the router's expert bias), the training state, the index and the shard files;
//   - refusals: a truncated shard, a flipped byte, a missing file, a tensor the index lacks, an
//     index that does not cover a tensor, another model (config keys, tensor shapes), optimizer
//     state that is not there;
//   - a save stopped at every phase (the test hook, and a real crash through MOE_CKPT_FAIL_AT in a
//     forked child) leaves the previous checkpoint loadable and the tracker pointing at it;
//   - bitwise resume: N steps, save, load into a fresh model and optimizer, M steps == N + M steps;
//     finetune / no_load_optim / no_load_rng;
//   - Hugging Face export read back against the checkpoint (q/k/v split per query group, per-expert
//     gate/up/down), and import back into a checkpoint bit for bit.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "common/test_util.h"
#include "common/tiny_gpt.h"
#include "moecore/checkpoint.h"
#include "moecore/model.h"
#include "moecore/optim.h"
#include "moecore/parallel.h"
#include "moecore/safetensors.h"
#include "train/checkpoint_internal.h"

using namespace moe;
namespace fs = std::filesystem;

namespace {

std::string temp_dir(const std::string& name) {
  const std::string d = "/tmp/moe_ckpt_unit_" + std::to_string(::getpid()) + "/" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

struct CleanTemp : ::testing::Environment {
  void TearDown() override { fs::remove_all("/tmp/moe_ckpt_unit_" + std::to_string(::getpid())); }
};
const auto* const kClean = ::testing::AddGlobalTestEnvironment(new CleanTemp);

// A tiny model with every parameter kind: LayerNorm (biases), learned positions, qk-layernorm, GQA,
// an MoE layer (sigmoid router with expert bias, a gated shared expert) and a dense layer, untied.
MoEConfig tiny(const std::string& dtype = "bf16") {
  MoEConfig c = test::tiny_moe_gpt();
  c.normalization = "LayerNorm";
  c.position_embedding_type = "learned_absolute";
  c.untie_embeddings_and_output_weights = true;
  c.moe_router_score_function = "sigmoid";
  c.moe_router_enable_expert_bias = true;
  c.moe_router_bias_update_rate = 1e-2;
  c.params_dtype = dtype;
  c.seed = 7;
  return c;
}

// Sample i of the synthetic data: a deterministic function of i (the data order is the consumed
// samples counter, as Megatron's sampler).
MicroBatch sample(const MoEConfig& c, int64_t i) {
  const int64_t S = c.seq_length;
  std::vector<int64_t> tok(static_cast<size_t>(S + 1));
  std::mt19937_64 g(static_cast<uint64_t>(i) * 1000003ull + 11);
  for (auto& t : tok) t = static_cast<int64_t>(g() % static_cast<uint64_t>(c.vocab_size));
  std::vector<int64_t> in(tok.begin(), tok.end() - 1), lab(tok.begin() + 1, tok.end());
  return MicroBatch{Tensor::from_vector(in, {1, S}), Tensor::from_vector(lab, {1, S}), Tensor()};
}

constexpr int64_t kGlobalBatch = 2;  // sequences per step (one per micro-batch)

// One training step from the state's counters: micro-batches of one sequence each.
double step(MoEGPTModel& model, Optimizer& opt, TrainingState& st) {
  opt.zero_grad();
  double loss = 0;
  for (int64_t m = 0; m < kGlobalBatch; ++m) {
    ForwardContext ctx;
    ctx.step = st.iteration + 1;
    ctx.microbatch = m;
    ctx.loss_scale = 1.0 / kGlobalBatch;
    loss += model.forward(sample(model.config(), st.consumed_train_samples + m), ctx) / kGlobalBatch;
    model.backward();
    opt.accumulate_grads();
  }
  model.finish_step();
  opt.step(1e-2 * (1.0 + 0.1 * static_cast<double>(st.iteration)));
  st.iteration += 1;
  st.consumed_train_samples += kGlobalBatch;
  return loss;
}

OptimizerConfig adam() {
  OptimizerConfig o;
  o.optimizer = "adam";
  o.weight_decay = 0.1;
  o.clip_grad = 1.0;
  return o;
}

TrainingState state_at(int64_t it) {
  TrainingState s;
  s.iteration = it;
  s.seed = 7;
  return s;
}

// Every tensor of the checkpoint's state as the optimizer and model hold it, for comparison.
std::map<std::string, std::vector<double>> snapshot(MoEGPTModel& m, Optimizer& o) {
  std::map<std::string, std::vector<double>> out;
  for (Parameter* p : m.parameters()) out[p->name] = test::to_f64(p->value);
  for (const OptimizerStateSlice& s : o.state_slices()) {
    if (s.master.defined()) out["master." + s.param->name] = test::to_f64(s.master);
    if (s.exp_avg.defined()) out["exp_avg." + s.param->name] = test::to_f64(s.exp_avg);
    if (s.exp_avg_sq.defined()) out["exp_avg_sq." + s.param->name] = test::to_f64(s.exp_avg_sq);
    if (s.momentum.defined()) out["momentum." + s.param->name] = test::to_f64(s.momentum);
  }
  return out;
}

void expect_same(const std::map<std::string, std::vector<double>>& a, const std::map<std::string, std::vector<double>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_EQ(v, b.at(k)) << k;
  }
}

// Saves a 2-step bf16 AdamW run at iteration 2; returns the snapshot.
std::map<std::string, std::vector<double>> trained_checkpoint(const std::string& dir, const MoEConfig& cfg = tiny(),
                                                              OptimizerConfig oc = adam()) {
  MoEGPTModel m(cfg, Device::cpu());
  Optimizer o(m.parameters(), oc);
  TrainingState st = state_at(0);
  step(m, o, st);
  step(m, o, st);
  save_checkpoint(dir, st.iteration, m, &o, st, nullptr);
  return snapshot(m, o);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}
void write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  f << j.dump(1);
}

}  // namespace

// ---- boxes, regions, CRC -----------------------------------------------------------------------------

TEST(CheckpointBoxes, LocalRegionsMatchShardCanonicalIndices) {
  struct Case {
    Shape shape;
    std::vector<DimShard> shard;
  };
  const std::vector<Case> cases = {
      {{6, 5}, {}},
      {{6, 5}, {DimShard{0, 2, 3, false}}},
      {{4, 8, 3}, {DimShard{0, 1, 2, false}, DimShard{1, 1, 4, true}}},  // experts fc1, ETP over GLU halves
      {{8, 3}, {DimShard{0, 2, 4, true}}},                                 // shared expert fc1
      {{3, 4, 6}, {DimShard{2, 3, 3, false}}},
      {{7}, {}},
  };
  for (const Case& c : cases) {
    const std::vector<int64_t> want = shard_canonical_indices(c.shape, c.shard);
    const Shape local = shard_shape(c.shape, c.shard);
    const int64_t n = shape_numel(local);
    for (int64_t b = 0; b < n; b += 3)
      for (int64_t e = b; e <= n; e += 5) {
        // Each element of [b, e) must be covered once, at its canonical index.
        std::vector<int> seen(static_cast<size_t>(n), 0);
        for (const ckpt::Mapped& m : ckpt::local_regions(c.shape, c.shard, b, e)) {
          ckpt::Box box = m.box;
          std::vector<int64_t> idx(box.off.size(), 0);
          for (int64_t k = 0; k < box.numel(); ++k) {
            int64_t rem = k, can = 0, loc = 0;
            std::vector<int64_t> coord(box.off.size());
            for (size_t d = box.off.size(); d-- > 0;) {
              coord[d] = box.off[d] + rem % box.len[d];
              rem /= box.len[d];
            }
            for (size_t d = 0; d < coord.size(); ++d) {
              can = can * c.shape[d] + coord[d];
              loc = loc * local[d] + (coord[d] - m.shift[d]);
            }
            ASSERT_GE(loc, b);
            ASSERT_LT(loc, e);
            EXPECT_EQ(want[static_cast<size_t>(loc)], can) << shape_str(c.shape) << " local " << loc;
            seen[static_cast<size_t>(loc)]++;
          }
        }
        for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)], i >= b && i < e ? 1 : 0);
      }
  }
}

TEST(CheckpointBoxes, SubtractPartitionsAndCrcMatchesZlib) {
  ckpt::Box a{{0, 0, 0}, {4, 5, 6}}, b{{1, 2, 3}, {2, 9, 2}};
  std::vector<ckpt::Box> parts;
  ckpt::subtract(a, b, parts);
  ckpt::Box inter;
  ASSERT_TRUE(ckpt::intersect(a, b, &inter));
  int64_t total = inter.numel();
  for (size_t i = 0; i < parts.size(); ++i) {
    total += parts[i].numel();
    EXPECT_FALSE(ckpt::intersect(parts[i], b, nullptr));
    for (size_t j = i + 1; j < parts.size(); ++j) EXPECT_FALSE(ckpt::intersect(parts[i], parts[j], nullptr));
  }
  EXPECT_EQ(total, a.numel());
  const char* check = "123456789";
  EXPECT_EQ(ckpt::crc32(check, 9), 0xCBF43926u);
  EXPECT_EQ(ckpt::crc32(check + 4, 5, ckpt::crc32(check, 4)), 0xCBF43926u);  // incremental
}

// ---- round trip -------------------------------------------------------------------------------------------

TEST(Checkpoint, RoundTripEveryTensorKindAndTheState) {
  const std::string dir = temp_dir("roundtrip");
  MoEGPTModel m(tiny(), Device::cpu());
  Optimizer o(m.parameters(), adam());
  TrainingState st = state_at(0);
  step(m, o, st);
  step(m, o, st);
  st.consumed_valid_samples = 6;
  st.train_data_position = st.consumed_train_samples;
  st.valid_data_position = 6;
  st.data_seed = 99;
  st.global_batch_size = kGlobalBatch;
  st.rng_states["sampler"] = "1 2 3 4";
  st.scheduler = SchedulerState{4, 1e-2, 1e-3, 1, 10, "cosine"};
  st.extra_json = R"({"note": "x", "n": [1, 2]})";
  const SaveResult sr = save_checkpoint(dir, 2, m, &o, st, nullptr);
  EXPECT_GT(sr.bytes_written, 0);
  EXPECT_EQ(sr.path, dir + "/iter_0000002");
  EXPECT_EQ(read_latest_iteration(dir), std::optional<int64_t>(2));
  const auto before = snapshot(m, o);
  // The expert bias moved (it is part of the state a resume needs).
  const Parameter* bias = m.find_parameter("decoder.layers.0.mlp.router.expert_bias");
  ASSERT_NE(bias, nullptr);
  double bias_abs = 0;
  for (double v : test::to_f64(bias->value)) bias_abs += std::fabs(v);
  EXPECT_GT(bias_abs, 0);

  MoEConfig other_seed = tiny();
  other_seed.seed = 8;  // other initial values: everything must come from the file
  MoEGPTModel m2(other_seed, Device::cpu());
  Optimizer o2(m2.parameters(), adam());
  const LoadResult lr = load_checkpoint(dir, m2, &o2, nullptr);
  EXPECT_EQ(lr.iteration, 2);
  EXPECT_TRUE(lr.optimizer_loaded);
  EXPECT_TRUE(lr.rng_loaded);
  expect_same(before, snapshot(m2, o2));
  EXPECT_EQ(o2.iteration(), 2);
  EXPECT_EQ(lr.state.iteration, 2);
  EXPECT_EQ(lr.state.consumed_train_samples, 4);
  EXPECT_EQ(lr.state.consumed_valid_samples, 6);
  EXPECT_EQ(lr.state.train_data_position, 4);
  EXPECT_EQ(lr.state.valid_data_position, 6);
  EXPECT_EQ(lr.state.data_seed, 99u);
  EXPECT_EQ(lr.state.global_batch_size, kGlobalBatch);
  EXPECT_EQ(lr.state.rng_states.at("sampler"), "1 2 3 4");
  EXPECT_EQ(lr.state.scheduler.decay_style, "cosine");
  EXPECT_EQ(lr.state.scheduler.max_lr, 1e-2);
  EXPECT_EQ(nlohmann::json::parse(lr.state.extra_json), nlohmann::json::parse(st.extra_json));
  EXPECT_NE(lr.saved_config_json.find("\"hidden_size\": 8"), std::string::npos);
  EXPECT_EQ(lr.files_opened, 1);
  EXPECT_GT(lr.bytes_read, 0);

  // SGD with momentum: the momentum buffer round-trips too.
  OptimizerConfig sgd = adam();
  sgd.optimizer = "sgd";
  const std::string dir2 = temp_dir("roundtrip_sgd");
  const auto sgd_before = trained_checkpoint(dir2, tiny("fp32"), sgd);
  MoEGPTModel m3(tiny("fp32"), Device::cpu());
  Optimizer o3(m3.parameters(), sgd);
  load_checkpoint(dir2, m3, &o3, nullptr);
  const auto sgd_after = snapshot(m3, o3);
  expect_same(sgd_before, sgd_after);
  EXPECT_TRUE(sgd_after.count("momentum.decoder.layers.0.mlp.router.weight"));
}

TEST(Checkpoint, IndexAndShardFiles) {
  const std::string dir = temp_dir("index");
  trained_checkpoint(dir);
  const std::string it = dir + "/iter_0000002";
  std::ifstream tr(dir + "/latest_checkpointed_iteration.txt");
  std::string text((std::istreambuf_iterator<char>(tr)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "2");
  const nlohmann::json ix = read_json(it + "/index.json");
  EXPECT_EQ(ix.at("format"), "moecore-checkpoint");
  EXPECT_EQ(ix.at("iteration"), 2);
  EXPECT_EQ(ix.at("layout").at("world_size"), 1);
  EXPECT_EQ(ix.at("optimizer").at("optimizer"), "adam");
  EXPECT_EQ(ix.at("optimizer").at("iteration"), 2);
  const auto& t = ix.at("tensors");
  for (const char* name : {"decoder.layers.0.mlp.router.expert_bias", "decoder.layers.0.mlp.experts.linear_fc1.weight",
                           "optimizer.state.fp32_param.decoder.layers.0.mlp.experts.linear_fc1.weight",
                           "optimizer.state.exp_avg.output_layer.weight",
                           "optimizer.state.exp_avg_sq.embedding.word_embeddings.weight"})
    EXPECT_TRUE(t.contains(name)) << name;
  EXPECT_FALSE(t.contains("optimizer.state.exp_avg.decoder.layers.0.mlp.router.expert_bias")) << "not trainable";
  EXPECT_EQ(t.at("decoder.layers.0.mlp.experts.linear_fc1.weight").at("dtype"), "BF16");
  EXPECT_EQ(t.at("decoder.layers.0.mlp.experts.linear_fc1.weight").at("shape"), nlohmann::json({4, 8, 8}));
  EXPECT_EQ(t.at("optimizer.state.exp_avg.output_layer.weight").at("dtype"), "F32");
  EXPECT_EQ(t.at("decoder.layers.0.mlp.router.expert_bias").at("kind"), "param");
  // The shard file is a plain safetensors file whose slices are the index's, CRC included.
  const SafetensorsFile sf = load_safetensors(it + "/shard_r00000.safetensors");
  EXPECT_EQ(static_cast<uint64_t>(fs::file_size(it + "/shard_r00000.safetensors")),
            ix.at("files").at("shard_r00000.safetensors").at("bytes").get<uint64_t>());
  int64_t slices = 0;
  for (const auto& [name, info] : t.items())
    for (const auto& s : info.at("slices")) {
      ++slices;
      const Tensor& x = sf.at(s.at("key").get<std::string>());
      EXPECT_EQ(x.shape(), s.at("lengths").get<Shape>());
      EXPECT_EQ(ckpt::crc32(x.data(), x.nbytes()), s.at("crc32").get<uint32_t>()) << name;
    }
  EXPECT_EQ(slices, static_cast<int64_t>(sf.names.size()));
  // CheckpointReader assembles whole tensors.
  CheckpointReader r(dir);
  EXPECT_EQ(r.iteration(), 2);
  EXPECT_EQ(r.config().hidden_size, 8);
  EXPECT_EQ(r.shape("decoder.layers.0.mlp.experts.linear_fc2.weight"), Shape({4, 8, 4}));
}

// ---- refusals ---------------------------------------------------------------------------------------------

class CheckpointRefusal : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = temp_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    trained_checkpoint(dir);
    it = dir + "/iter_0000002";
    shard = it + "/shard_r00000.safetensors";
  }
  std::string load_error(const MoEConfig& cfg = tiny(), LoadOptions opts = {}, ErrorCode code = ErrorCode::invalid_argument) {
    MoEGPTModel m(cfg, Device::cpu());
    Optimizer o(m.parameters(), adam());
    return test::error_of([&] { load_checkpoint(dir, m, &o, nullptr, opts); }, code);
  }
  std::string dir, it, shard;
};

TEST_F(CheckpointRefusal, TruncatedShard) {
  fs::resize_file(shard, fs::file_size(shard) - 10);
  EXPECT_TRUE(test::contains_all(load_error(), {"shard_r00000.safetensors", "truncated", "the index says"}));
}

TEST_F(CheckpointRefusal, FlippedByteInData) {
  const nlohmann::json ix = read_json(it + "/index.json");
  const auto& s = ix.at("tensors").at("decoder.layers.0.mlp.experts.linear_fc2.weight").at("slices").at(0);
  std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
  char len[8];
  f.read(len, 8);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<unsigned char>(len[i]);
  const auto pos = static_cast<std::streamoff>(8 + hlen + s.at("data_offsets").at(0).get<uint64_t>() + 3);
  f.seekg(pos);
  char c;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(pos);
  f.write(&c, 1);
  f.close();
  EXPECT_TRUE(test::contains_all(load_error(), {"shard_r00000.safetensors", "decoder.layers.0.mlp.experts.linear_fc2.weight",
                                                "CRC-32", "do not match the index"}));
}

TEST_F(CheckpointRefusal, MissingShard) {
  fs::remove(shard);
  EXPECT_TRUE(test::contains_all(load_error(), {"shard_r00000.safetensors", "missing"}));
}

TEST_F(CheckpointRefusal, TensorMissingFromIndex) {
  nlohmann::json ix = read_json(it + "/index.json");
  ix.at("tensors").erase("decoder.layers.1.mlp.linear_fc2.weight");
  write_json(it + "/index.json", ix);
  EXPECT_TRUE(test::contains_all(load_error(), {"has no tensor 'decoder.layers.1.mlp.linear_fc2.weight'"}));
}

TEST_F(CheckpointRefusal, IndexDoesNotCoverATensor) {
  nlohmann::json ix = read_json(it + "/index.json");
  auto& sl = ix.at("tensors").at("decoder.layers.0.mlp.experts.linear_fc1.weight").at("slices");
  // One expert fewer in the first slice, its bytes shortened alike (so only the coverage is wrong).
  Shape len = sl.at(0).at("lengths").get<Shape>();
  const int64_t dropped = shape_numel(len) / len[0];
  len[0] -= 1;
  sl.at(0).at("lengths") = len;
  auto& off = sl.at(0).at("data_offsets");
  off.at(1) = off.at(0).get<int64_t>() + shape_numel(len) * 2;
  write_json(it + "/index.json", ix);
  EXPECT_TRUE(test::contains_all(load_error(), {"decoder.layers.0.mlp.experts.linear_fc1.weight",
                                                "does not cover the tensor", std::to_string(256 - dropped) + " of 256"}));
}

TEST_F(CheckpointRefusal, HeaderDisagreesWithIndex) {
  nlohmann::json ix = read_json(it + "/index.json");
  ix.at("tensors").at("decoder.final_layernorm.weight").at("slices").at(0).at("crc32") = 12345;
  write_json(it + "/index.json", ix);
  EXPECT_TRUE(test::contains_all(load_error(), {"decoder.final_layernorm.weight", "CRC-32", "expected 12345"}));
}

// Found by tests/fuzz/fuzz_checkpoint_index (replaying hand-edited indexes, then kept in its corpus):
// a field of the wrong type escaped as nlohmann's type_error, and a slice box whose end does not fit
// an int64 overflowed (UBSan) in the bounds check and in the message naming it. Each is now a
// moe::Error naming the index and the field.
TEST_F(CheckpointRefusal, IndexFieldsOfTheWrongTypeOrOverflowingBoxes) {
  const nlohmann::json good = read_json(it + "/index.json");
  auto refusal = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json ix = good;
    edit(ix);
    write_json(it + "/index.json", ix);
    std::string reader = test::error_of([&] {
      CheckpointReader r(dir);
      for (const std::string& n : r.tensor_names()) (void)r.read(n);
      (void)r.training_state();
    });
    return reader + " | " + load_error();
  };
  EXPECT_TRUE(test::contains_all(refusal([](nlohmann::json& ix) { ix["format"] = 5; }), {"index.json", "format must be"}));
  EXPECT_TRUE(test::contains_all(refusal([](nlohmann::json& ix) { ix["optimizer"]["state_saved"] = "yes"; }),
                                 {"index.json", "'optimizer.state_saved' must be true or false", "\"yes\""}));
  EXPECT_TRUE(test::contains_all(refusal([](nlohmann::json& ix) { ix["layout"]["world_size"] = "1"; }),
                                 {"'layout.world_size' must be an integer"}));
  EXPECT_TRUE(test::contains_all(refusal([](nlohmann::json& ix) { ix["rng"]["saved"] = 1; }),
                                 {"'rng.saved' must be true or false"}));
  const std::string sched = refusal([](nlohmann::json& ix) { ix["training_state"]["scheduler"]["max_lr"] = "x"; });
  EXPECT_TRUE(test::contains_all(sched, {"scheduler 'max_lr' must be a number", "\"x\""})) << sched;
  const std::string box = refusal([](nlohmann::json& ix) {
    ix.at("tensors").at("decoder.final_layernorm.weight").at("slices").at(0).at("offsets") =
        std::vector<int64_t>{std::numeric_limits<int64_t>::max()};
  });
  EXPECT_TRUE(test::contains_all(box, {"decoder.final_layernorm.weight", "9223372036854775807:(+8)", "leaves shape (8,)"}))
      << box;
  const std::string huge = refusal([](nlohmann::json& ix) {
    ix.at("tensors").at("decoder.final_layernorm.weight").at("shape") = std::vector<int64_t>{1ll << 62, 1ll << 62};
  });
  EXPECT_TRUE(test::contains_all(huge, {"decoder.final_layernorm.weight", "more bytes than a 64-bit count holds"}))
      << huge;
}

TEST_F(CheckpointRefusal, AnotherModel) {
  MoEConfig wider = tiny();
  wider.hidden_size = 16;
  EXPECT_TRUE(test::contains_all(load_error(wider), {"another model", "hidden_size = 8 in the checkpoint, 16 in this run"}));
  MoEConfig tied = tiny();
  tied.untie_embeddings_and_output_weights = false;
  tied.moe_layer_freq = {1, 1};
  EXPECT_TRUE(test::contains_all(load_error(tied), {"untie_embeddings_and_output_weights = true in the checkpoint",
                                                    "moe_layer_freq (MoE layers) = 10 in the checkpoint, 11"}));
  // Past the config check (the saving run's config given with another model's parameters): shapes.
  MoEGPTModel m(wider, Device::cpu());
  EXPECT_TRUE(test::contains_all(
      test::error_of([&] { load_checkpoint(dir, tiny(), m.parameters(), nullptr, nullptr); }),
      {"'embedding.word_embeddings.weight' has shape (16, 8) in the checkpoint, (16, 16) in this model"}));
  // A parameter the model lacks (only this rank's parameters given): left-over tensors are refused.
  MoEGPTModel full(tiny(), Device::cpu());
  std::vector<Parameter*> most = full.parameters();
  most.pop_back();
  EXPECT_TRUE(test::contains_all(test::error_of([&] { load_checkpoint(dir, tiny(), most, nullptr, nullptr); }),
                                 {"tensors this model does not", "output_layer.weight"}));
}

TEST_F(CheckpointRefusal, OptimizerStateThatIsNotThere) {
  // Saved without optimizer state: loading it needs finetune or no_load_optim.
  MoEGPTModel m(tiny(), Device::cpu());
  Optimizer o(m.parameters(), adam());
  SaveOptions so;
  so.save_optim = false;
  const std::string d2 = temp_dir("no_optim");
  save_checkpoint(d2, 3, m, &o, state_at(3), nullptr, so);
  MoEGPTModel m2(tiny(), Device::cpu());
  Optimizer o2(m2.parameters(), adam());
  EXPECT_TRUE(test::contains_all(test::error_of([&] { load_checkpoint(d2, m2, &o2, nullptr); }),
                                 {"holds no optimizer state", "--no-load-optim"}));
  LoadOptions lo;
  lo.no_load_optim = true;
  EXPECT_FALSE(load_checkpoint(d2, m2, &o2, nullptr, lo).optimizer_loaded);
  // Another optimizer.
  OptimizerConfig sgd = adam();
  sgd.optimizer = "sgd";
  Optimizer o3(m2.parameters(), sgd);
  EXPECT_TRUE(test::contains_all(test::error_of([&] { load_checkpoint(dir, m2, &o3, nullptr); }),
                                 {"optimizer state of 'adam'", "'sgd'"}));
  // No checkpoint at all, and a malformed tracker.
  const std::string empty = temp_dir("empty");
  EXPECT_TRUE(test::contains_all(test::error_of([&] { load_checkpoint(empty, m2, &o2, nullptr); }),
                                 {"no checkpoint", "latest_checkpointed_iteration.txt"}));
  std::ofstream(empty + "/latest_checkpointed_iteration.txt") << "abc";
  EXPECT_TRUE(test::contains_all(test::error_of([&] { read_latest_iteration(empty); }), {"must hold an iteration", "abc"}));
}

// ---- crash safety -------------------------------------------------------------------------------------------

TEST(CheckpointCrash, EveryPhaseLeavesThePreviousCheckpoint) {
  for (const std::string& phase : checkpoint_phases()) {
    SCOPED_TRACE(phase);
    const std::string dir = temp_dir("crash_" + phase);
    const auto first = trained_checkpoint(dir);  // iteration 2
    MoEGPTModel m(tiny(), Device::cpu());
    Optimizer o(m.parameters(), adam());
    TrainingState st = state_at(0);
    for (int i = 0; i < 3; ++i) step(m, o, st);  // other values, iteration 3
    SaveOptions so;
    so.fault_hook = [&](const std::string& p) {
      if (p == phase) throw std::runtime_error("injected fault at " + p);
    };
    EXPECT_THROW(save_checkpoint(dir, 3, m, &o, st, nullptr, so), std::runtime_error);
    const bool published = phase == "done";
    EXPECT_EQ(read_latest_iteration(dir), std::optional<int64_t>(published ? 3 : 2));
    // The tracker's checkpoint loads and holds its values.
    MoEGPTModel m2(tiny(), Device::cpu());
    Optimizer o2(m2.parameters(), adam());
    const LoadResult lr = load_checkpoint(dir, m2, &o2, nullptr);
    EXPECT_EQ(lr.iteration, published ? 3 : 2);
    if (!published) expect_same(first, snapshot(m2, o2));
    // Explicitly asking for the earlier one always works.
    LoadOptions two;
    two.iteration = 2;
    load_checkpoint(dir, m2, &o2, nullptr, two);
    expect_same(first, snapshot(m2, o2));
    // Saving the same iteration again replaces it (an existing iter_0000003 is swapped out).
    const auto third = snapshot(m, o);
    save_checkpoint(dir, 3, m, &o, st, nullptr);
    EXPECT_EQ(load_checkpoint(dir, m2, &o2, nullptr).iteration, 3);
    expect_same(third, snapshot(m2, o2));
    // The next save cleans up what the interrupted one left.
    save_checkpoint(dir, 4, m, &o, st, nullptr);
    for (const fs::directory_entry& e : fs::directory_iterator(dir)) {
      const std::string n = e.path().filename().string();
      EXPECT_EQ(n.find(".tmp-"), std::string::npos) << n;
    }
    EXPECT_EQ(read_latest_iteration(dir), std::optional<int64_t>(4));
  }
}

// A real crash: a forked child saving with MOE_CKPT_FAIL_AT=<phase> exits inside the save.
TEST(CheckpointCrash, ProcessKilledMidSave) {
  for (const std::string phase : {"start", "shards", "index", "publish", "tracker"}) {
    SCOPED_TRACE(phase);
    const std::string dir = temp_dir(std::string("kill_") + phase);
    const auto first = trained_checkpoint(dir);
    MoEGPTModel m(tiny(), Device::cpu());
    Optimizer o(m.parameters(), adam());
    TrainingState st = state_at(5);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {  // the child only saves (no threads are started by a save)
      ::setenv("MOE_CKPT_FAIL_AT", phase.c_str(), 1);
      try {
        save_checkpoint(dir, 5, m, &o, st, nullptr);
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 75) << "the child must die inside the save";
    EXPECT_EQ(read_latest_iteration(dir), std::optional<int64_t>(2));
    MoEGPTModel m2(tiny(), Device::cpu());
    Optimizer o2(m2.parameters(), adam());
    EXPECT_EQ(load_checkpoint(dir, m2, &o2, nullptr).iteration, 2);
    expect_same(first, snapshot(m2, o2));
  }
}

// ---- resume -------------------------------------------------------------------------------------------------

TEST(CheckpointResume, BitwiseAfterLoad) {
  for (const char* dtype : {"bf16", "fp32"}) {
    SCOPED_TRACE(dtype);
    const MoEConfig cfg = tiny(dtype);
    // Reference: 5 uninterrupted steps.
    MoEGPTModel ref(cfg, Device::cpu());
    Optimizer oref(ref.parameters(), adam());
    TrainingState sref = state_at(0);
    std::vector<double> losses;
    for (int i = 0; i < 5; ++i) losses.push_back(step(ref, oref, sref));
    // 2 steps, save, a fresh process' worth of objects, load, 3 steps.
    const std::string dir = temp_dir(std::string("resume_") + dtype);
    {
      MoEGPTModel a(cfg, Device::cpu());
      Optimizer oa(a.parameters(), adam());
      TrainingState sa = state_at(0);
      for (int i = 0; i < 2; ++i) EXPECT_EQ(step(a, oa, sa), losses[static_cast<size_t>(i)]);
      save_checkpoint(dir, sa.iteration, a, &oa, sa, nullptr);
    }
    MoEConfig fresh = cfg;
    fresh.seed = 1234;  // other initial values
    MoEGPTModel b(fresh, Device::cpu());
    Optimizer ob(b.parameters(), adam());
    LoadResult lr = load_checkpoint(dir, cfg, b.parameters(), &ob, nullptr);
    TrainingState sb = lr.state;
    EXPECT_EQ(sb.iteration, 2);
    EXPECT_EQ(sb.consumed_train_samples, 4);
    for (int i = 2; i < 5; ++i) EXPECT_EQ(step(b, ob, sb), losses[static_cast<size_t>(i)]) << "step " << i;
    expect_same(snapshot(ref, oref), snapshot(b, ob));
    EXPECT_EQ(ob.iteration(), oref.iteration());
  }
}

TEST(CheckpointResume, FinetuneAndNoLoadOptions) {
  const std::string dir = temp_dir("finetune");
  const auto saved = trained_checkpoint(dir);
  MoEConfig fresh = tiny();
  fresh.seed = 99;
  MoEGPTModel m(fresh, Device::cpu());
  Optimizer o(m.parameters(), adam());
  LoadOptions ft;
  ft.finetune = true;
  const LoadResult r = load_checkpoint(dir, m, &o, nullptr, ft);
  EXPECT_FALSE(r.optimizer_loaded);
  EXPECT_FALSE(r.rng_loaded);
  EXPECT_EQ(r.state.iteration, 0);
  EXPECT_EQ(r.state.consumed_train_samples, 0);
  EXPECT_EQ(o.iteration(), 0);
  for (Parameter* p : m.parameters()) EXPECT_EQ(test::to_f64(p->value), saved.at(p->name)) << p->name;
  // The masters were re-read from the loaded (bf16) parameters, the moments are fresh.
  for (const OptimizerStateSlice& s : o.state_slices()) {
    EXPECT_EQ(test::to_f64(s.master), test::to_f64(s.param->value)) << s.param->name;
    for (double v : test::to_f64(s.exp_avg)) ASSERT_EQ(v, 0.0);
  }
  // no_load_rng keeps this run's generators but loads the rest.
  LoadOptions nr;
  nr.no_load_rng = true;
  const LoadResult r2 = load_checkpoint(dir, m, &o, nullptr, nr);
  EXPECT_TRUE(r2.optimizer_loaded);
  EXPECT_FALSE(r2.rng_loaded);
  EXPECT_EQ(r2.state.iteration, 2);
  expect_same(saved, snapshot(m, o));
}

TEST(CheckpointResume, Fp32RunLoadsABf16CheckpointFromItsMasters) {
  const std::string dir = temp_dir("dtype_change");
  const auto saved = trained_checkpoint(dir, tiny("bf16"));
  MoEGPTModel m(tiny("fp32"), Device::cpu());
  Optimizer o(m.parameters(), adam());
  load_checkpoint(dir, m, &o, nullptr);
  for (Parameter* p : m.parameters()) {
    const auto it = saved.find("master." + p->name);
    EXPECT_EQ(test::to_f64(p->value), it != saved.end() ? it->second : saved.at(p->name)) << p->name;
  }
}

// ---- Hugging Face ------------------------------------------------------------------------------------------

namespace {
MoEConfig qwen3_like(bool untie) {
  MoEConfig c = tiny("fp32");
  c.normalization = "RMSNorm";
  c.layernorm_epsilon = 1e-6;
  c.position_embedding_type = "rope";
  c.rotary_base = 1e6;
  c.moe_layer_freq = {0, 1};
  c.moe_router_score_function = "softmax";
  c.moe_router_enable_expert_bias = false;
  c.moe_shared_expert_intermediate_size.reset();
  c.moe_shared_expert_gate = false;
  c.untie_embeddings_and_output_weights = untie;
  c.moe_z_loss_coeff.reset();
  return c;
}
}  // namespace

TEST(CheckpointHF, ExportMatchesTheCheckpointAndImportRoundTrips) {
  for (const MoEConfig& cfg : {tiny("bf16"), qwen3_like(true), qwen3_like(false)}) {
    SCOPED_TRACE(cfg.normalization + (cfg.untie_embeddings_and_output_weights ? " untied" : " tied"));
    const std::string dir = temp_dir("hf_ckpt"), out = temp_dir("hf_out"), back = temp_dir("hf_back");
    trained_checkpoint(dir, cfg);
    const int64_t n = export_hf(dir, std::nullopt, out);
    const SafetensorsFile hf = load_safetensors(out + "/model.safetensors");
    EXPECT_EQ(n, static_cast<int64_t>(hf.names.size()));
    CheckpointReader r(dir);
    auto can = [&](const std::string& name) { return test::to_f64(r.read(name)); };
    auto hfv = [&](const std::string& name) { return test::to_f64(hf.at(name)); };
    const int64_t H = 8, hd = 4, qpg = 2, E = 4, F = 4;
    // q / k / v per query group: rows [q heads of the group | k | v] of the fused weight.
    for (int64_t layer = 0; layer < 2; ++layer) {
      const std::string L = std::to_string(layer);
      const auto qkv = can("decoder.layers." + L + ".self_attention.linear_qkv.weight");
      const auto q = hfv("model.layers." + L + ".self_attn.q_proj.weight"), k = hfv("model.layers." + L + ".self_attn.k_proj.weight"),
                 v = hfv("model.layers." + L + ".self_attn.v_proj.weight");
      ASSERT_EQ(q.size(), static_cast<size_t>(4 * hd * H));
      for (int64_t g = 0; g < 2; ++g)
        for (int64_t row = 0; row < hd; ++row)
          for (int64_t col = 0; col < H; ++col) {
            const int64_t base = g * (qpg + 2) * hd;
            for (int64_t j = 0; j < qpg; ++j)
              EXPECT_EQ(q[static_cast<size_t>(((g * qpg + j) * hd + row) * H + col)],
                        qkv[static_cast<size_t>((base + j * hd + row) * H + col)]);
            EXPECT_EQ(k[static_cast<size_t>((g * hd + row) * H + col)], qkv[static_cast<size_t>((base + qpg * hd + row) * H + col)]);
            EXPECT_EQ(v[static_cast<size_t>((g * hd + row) * H + col)],
                      qkv[static_cast<size_t>((base + (qpg + 1) * hd + row) * H + col)]);
          }
    }
    // Experts: linear_fc1 rows [gate | up] per expert, linear_fc2 per expert.
    const int64_t moe = cfg.is_moe_layer(0) ? 0 : 1;
    const std::string ml = std::to_string(moe);
    const auto fc1 = can("decoder.layers." + ml + ".mlp.experts.linear_fc1.weight");
    const auto fc2 = can("decoder.layers." + ml + ".mlp.experts.linear_fc2.weight");
    for (int64_t e = 0; e < E; ++e) {
      const std::string he = "model.layers." + ml + ".mlp.experts." + std::to_string(e) + ".";
      const auto gate = hfv(he + "gate_proj.weight"), up = hfv(he + "up_proj.weight"), down = hfv(he + "down_proj.weight");
      for (int64_t i = 0; i < F * H; ++i) {
        EXPECT_EQ(gate[static_cast<size_t>(i)], fc1[static_cast<size_t>(e * 2 * F * H + i)]);
        EXPECT_EQ(up[static_cast<size_t>(i)], fc1[static_cast<size_t>(e * 2 * F * H + F * H + i)]);
        EXPECT_EQ(down[static_cast<size_t>(i)], fc2[static_cast<size_t>(e * H * F + i)]);
      }
    }
    EXPECT_EQ(hfv("model.layers." + ml + ".mlp.gate.weight"), can("decoder.layers." + ml + ".mlp.router.weight"));
    EXPECT_EQ(hfv("model.norm.weight"), can("decoder.final_layernorm.weight"));
    EXPECT_EQ(hfv("model.embed_tokens.weight"), can("embedding.word_embeddings.weight"));
    EXPECT_EQ(hf.contains("lm_head.weight"), cfg.untie_embeddings_and_output_weights);
    if (cfg.moe_router_enable_expert_bias) {
      EXPECT_EQ(hfv("model.layers.0.mlp.gate.e_score_correction_bias"), can("decoder.layers.0.mlp.router.expert_bias"));
    }
    if (cfg.has_shared_expert()) {  // Qwen2-MoE: a gated shared expert, zero q/k/v biases
      EXPECT_TRUE(hf.contains("model.layers.0.mlp.shared_expert_gate.weight"));
      for (double x : hfv("model.layers.1.self_attn.k_proj.bias")) EXPECT_EQ(x, 0.0);
      EXPECT_EQ(read_json(out + "/config.json").at("model_type"), "qwen2_moe");
    } else {
      EXPECT_FALSE(hf.contains("model.layers.0.self_attn.q_proj.bias"));
    }
    const nlohmann::json cj = read_json(out + "/config.json");
    EXPECT_EQ(cj.at("num_key_value_heads"), 2);
    EXPECT_EQ(cj.at("head_dim"), 4);
    EXPECT_EQ(cj.at("num_experts"), 4);
    EXPECT_EQ(cj.at("num_experts_per_tok"), 2);
    EXPECT_EQ(cj.at("tie_word_embeddings"), !cfg.untie_embeddings_and_output_weights);

    // Import back: every parameter bit for bit.
    import_hf(out, back, 7);
    CheckpointReader rb(back);
    EXPECT_EQ(rb.iteration(), 7);
    EXPECT_EQ(rb.parameter_names(), r.parameter_names());
    for (const std::string& name : r.parameter_names()) EXPECT_TRUE(test::bit_equal(rb.read(name), r.read(name))) << name;
    // A Qwen3-MoE config.json without our own keys maps onto the same model.
    if (cfg.normalization == "RMSNorm") {
      nlohmann::json plain = cj;
      plain.erase("moecore_config");
      write_json(out + "/config.json", plain);
      const std::string back2 = temp_dir("hf_back2");
      import_hf(out, back2, 0);
      CheckpointReader r2(back2);
      for (const std::string& name : r.parameter_names())
        EXPECT_TRUE(test::bit_equal(r2.read(name), r.read(name))) << name;
      const MoEConfig c2 = r2.config();
      EXPECT_EQ(c2.qk_layernorm, true);
      EXPECT_EQ(c2.moe_layer_freq, std::vector<int64_t>({0, 1}));
      EXPECT_EQ(c2.rotary_base, 1e6);
      // ... and it trains from there (parameters only: --finetune).
      MoEGPTModel m(c2, Device::cpu());
      Optimizer o(m.parameters(), adam());
      LoadOptions ft;
      ft.finetune = true;
      load_checkpoint(back2, m, &o, nullptr, ft);
      TrainingState st;
      EXPECT_TRUE(std::isfinite(step(m, o, st)));
    }
    // A tensor left over or missing is refused.
    fs::remove(out + "/model.safetensors");
    std::vector<std::pair<std::string, Tensor>> fewer;
    for (const std::string& name : hf.names)
      if (name != "model.norm.weight") fewer.emplace_back(name, hf.at(name));
    save_safetensors(out + "/model.safetensors", fewer);
    EXPECT_TRUE(test::contains_all(test::error_of([&] { import_hf(out, temp_dir("hf_bad"), 0); }),
                                   {"no tensor 'model.norm.weight'"}));
  }
}

// ---- fixture for the convert_checkpoint tool's CTest (tools/CMakeLists.txt) ----------------------------
// With MOE_CKPT_TOOL_DIR set: a trained checkpoint at $DIR/ckpt and its export at $DIR/hf, for the
// tool to import, re-export and compare. Skipped otherwise.
TEST(CheckpointToolFixture, WriteCheckpointAndExport) {
  const char* d = std::getenv("MOE_CKPT_TOOL_DIR");
  if (!d || !*d) GTEST_SKIP() << "MOE_CKPT_TOOL_DIR is not set (the convert_checkpoint CTest sets it)";
  const std::string dir = d;
  fs::remove_all(dir);
  fs::create_directories(dir);
  trained_checkpoint(dir + "/ckpt");
  EXPECT_GT(export_hf(dir + "/ckpt", std::nullopt, dir + "/hf"), 0);
}
