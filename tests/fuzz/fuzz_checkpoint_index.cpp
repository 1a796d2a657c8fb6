// Fuzz target: the checkpoint index reader (DIR/iter_N/index.json: CheckpointReader, read_index)
// and the shard reads it drives. A real checkpoint of a tiny MoE GPT model (every tensor kind:
// bf16 parameters, f32 masters, AdamW moments) is saved once; each input replaces its index.json,
// and every tensor the index lists is then read (slices checked against the shard headers and the
// CRCs, boxes copied into the whole tensor), with the config and the training state.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fuzz/fuzz.h"
#include "moecore/checkpoint.h"
#include "moecore/config.h"
#include "moecore/error.h"
#include "moecore/model.h"
#include "moecore/optim.h"

namespace {

constexpr int64_t kIteration = 1;

// Every parameter kind the checkpoint writes: GQA, a sigmoid router with expert bias, a gated
// shared expert, an MoE and a dense layer, bf16 parameters (so f32 masters and AdamW moments too).
moe::MoEConfig tiny() {
  return moe::config_from_json(
      R"({"num_layers": 2, "moe_layer_freq": [1, 0], "hidden_size": 8, "num_attention_heads": 4,
          "num_query_groups": 2, "kv_channels": 4, "ffn_hidden_size": 8, "vocab_size": 16, "seq_length": 8,
          "num_moe_experts": 4, "moe_ffn_hidden_size": 4, "moe_router_topk": 2,
          "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": true,
          "gated_linear_unit": true, "activation_func": "silu", "moe_shared_expert_intermediate_size": 4,
          "moe_shared_expert_gate": true, "params_dtype": "bf16"})",
      "fuzz_checkpoint_index");
}

// DIR holding a saved checkpoint at kIteration (made once per process).
const std::string& checkpoint_dir() {
  static const std::string dir = [] {
    const std::string d = moe::fuzz::scratch_dir() + "/ckpt";
    moe::MoEGPTModel m(tiny(), moe::Device::cpu());
    moe::OptimizerConfig oc;
    oc.optimizer = "adam";
    moe::Optimizer o(m.parameters(), oc);
    moe::TrainingState st;
    st.iteration = kIteration;
    st.rng_states["sampler"] = "1 2 3";
    moe::save_checkpoint(d, kIteration, m, &o, st, nullptr);
    return d;
  }();
  return dir;
}

void one(const uint8_t* data, size_t size) {
  const std::string& dir = checkpoint_dir();
  moe::fuzz::write_file(moe::checkpoint_iteration_dir(dir, kIteration) + "/index.json", data, size);
  try {
    moe::CheckpointReader r(dir, kIteration);
    for (const std::string& n : r.tensor_names()) {
      const moe::Tensor t = r.read(n);
      if (t.shape() != r.shape(n) || t.dtype() != r.dtype(n)) moe::fuzz::finding("read('" + n + "') != its index entry");
    }
    (void)r.config();
    (void)r.training_state();
  } catch (const moe::Error&) {
  }
}

void write_seeds(const std::string& out) {
  std::ifstream f(moe::checkpoint_iteration_dir(checkpoint_dir(), kIteration) + "/index.json", std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  moe::fuzz::write_file(out + "/index.json", ss.str());
  // The same index listing two tensors only: short inputs mutate into the interesting cases faster.
  nlohmann::json ix = nlohmann::json::parse(ss.str());
  nlohmann::json kept = nlohmann::json::object();
  for (const auto& [name, t] : ix.at("tensors").items())
    if (kept.size() < 2 && (name.find("router") != std::string::npos || name.find("final") != std::string::npos))
      kept[name] = t;
  ix["tensors"] = kept;
  moe::fuzz::write_file(out + "/two_tensors.json", ix.dump(1));
}

}  // namespace

moe::fuzz::Target moe::fuzz::fuzz_target() {
  return {"checkpoint_index", one,
          {"{", "}", "[", "]", ",", ":", "\"", "null", "\"slices\"", "\"offsets\"", "\"lengths\"",
           "\"data_offsets\"", "\"crc32\"", "\"shape\"", "\"dtype\"", "\"file\"", "\"files\"", "\"bytes\"",
           "\"tensors\"", "\"kind\"", "\"param\"", "\"shard_r00000.safetensors\"", "\"../x\"", "\"F32\"", "\"BF16\"",
           "\"training_state\"", "\"rng\"", "\"config\"", "\"layout\"", "\"optimizer\"", "\"iteration\"", "-1",
           "9223372036854775807", "4611686018427387904"},
          write_seeds};
}
