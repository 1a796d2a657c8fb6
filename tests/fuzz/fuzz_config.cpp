// Fuzz target: the JSON config reader (config_from_json over parse_json_strict) and validate(). A
// config that reads must survive a round trip: config_from_json(config_to_json(c)) writes the same
// JSON again.
#include "fuzz/fuzz.h"
#include "moecore/config.h"
#include "moecore/error.h"

namespace {

void one(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::MoEConfig c;
  try {
    c = moe::config_from_json(text, "<fuzz>");
  } catch (const moe::Error&) {
    return;
  }
  try {
    moe::validate(c);
  } catch (const moe::Error&) {
  }
  const std::string j1 = moe::config_to_json(c);
  moe::MoEConfig c2;
  try {
    c2 = moe::config_from_json(j1, "<round trip>");
  } catch (const moe::Error& e) {
    moe::fuzz::finding(std::string("config_to_json wrote JSON config_from_json refuses: ") + e.what() + "\n" + j1);
  }
  const std::string j2 = moe::config_to_json(c2);
  if (j1 != j2) moe::fuzz::finding("config round trip changed the config:\n" + j1 + "\n---\n" + j2);
}

void write_seeds(const std::string& dir) {
  // The defaults, and two configs written back by config_to_json after reading them.
  moe::fuzz::write_file(dir + "/defaults.json", moe::config_to_json(moe::MoEConfig{}));
  moe::fuzz::write_file(dir + "/readme.json", moe::config_to_json(moe::config_from_json(
      R"({"hidden_size": 64, "num_moe_experts": 8, "moe_ffn_hidden_size": 128, "moe_router_topk": 2,
          "gated_linear_unit": true, "activation_func": "silu", "moe_aux_loss_coeff": [0.01]})")));
  moe::fuzz::write_file(dir + "/small.json",
                        R"({"hidden_size": 16, "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 8,)"
                        R"( "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": true,)"
                        R"( "moe_expert_capacity_factor": 1.5, "moe_token_drop_policy": "position",)"
                        R"( "moe_layer_freq": [1, 0, 1], "moe_aux_loss_coeff": [0.01, 0.001]})");
}

}  // namespace

moe::fuzz::Target moe::fuzz::fuzz_target() {
  return {"config", one,
          {"{", "}", "[", "]", ",", ":", "\"", "null", "true", "false", "\"hidden_size\"", "\"num_moe_experts\"",
           "\"moe_router_topk\"", "\"moe_layer_freq\"", "\"moe_aux_loss_coeff\"", "\"moe_expert_capacity_factor\"",
           "\"moe_router_score_function\"", "\"moe_token_dispatcher_type\"", "\"seq_length\"", "\"params_dtype\"",
           "1e308", "-1", "0.5", "\"\"", "\\u0000", "\\ud800", "[[[[[[[[", "]]]]]]]]"},
          write_seeds};
}
