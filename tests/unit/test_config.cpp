// Configuration: JSON round trips, typed parsing with clear errors, command-line style setting,
// unknown-key suggestions, file loading, and every validate()/validate_parallel() rule.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/config.h"
#include "moecore/error.h"
#include "moecore/moe_layer.h"

using namespace moe;
using moe::test::error_of;
using moe::test::contains_all;

namespace {



// A small valid config; every rule test breaks exactly one thing in it.
MoEConfig base_config() {
  MoEConfig c;
  c.hidden_size = 16;
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 32;
  return c;
}

// A config with every key away from its default. Some of those values are refused by validate()
// (features not implemented); valid_full_config() resets exactly those.
MoEConfig full_config() {
  MoEConfig c = base_config();
  c.moe_router_topk = 4;
  c.moe_router_score_function = "sigmoid";
  c.moe_router_pre_softmax = true;
  c.moe_router_topk_scaling_factor = 2.5;
  c.moe_router_num_groups = 4;
  c.moe_router_group_topk = 2;
  c.moe_router_enable_expert_bias = true;
  c.moe_router_bias_update_rate = 0.125;
  c.moe_router_load_balancing_type = {"seq_aux_loss", "global_aux_loss"};
  c.moe_aux_loss_coeff = {1e-2, 0.1 + 0.2};  // a value that needs all 17 digits
  c.moe_z_loss_coeff = 1e-3;
  c.moe_input_jitter_eps = 0.01;
  c.moe_router_dtype = "fp64";
  c.moe_expert_capacity_factor = 1.25;
  c.moe_token_drop_policy = "position";
  c.moe_pad_expert_input_to_capacity = true;
  c.moe_shared_expert_intermediate_size = 48;
  c.moe_shared_expert_gate = true;
  c.moe_shared_expert_overlap = true;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.params_dtype = "bf16";
  c.seed = 18446744073709551615ull;  // the largest uint64
  c.init_method_std = 0.006;
  c.tensor_model_parallel_size = 2;
  c.context_parallel_size = 2;
  c.pipeline_model_parallel_size = 2;
  c.expert_model_parallel_size = 4;
  c.expert_tensor_parallel_size = 1;
  c.moe_token_dispatcher_type = "alltoall";
  c.sequence_parallel = true;
  c.parallel_order = "tp-cp-ep-dp-pp";
  c.recompute_granularity = "selective";
  c.recompute_modules = {"moe_act", "shared_experts"};
  c.recompute_method = "block";
  c.recompute_num_layers = 2;
  c.fine_grained_activation_offloading = true;
  c.offload_modules = {"expert_fc1"};
  return c;
}

// full_config() without the values validate() refuses.
MoEConfig valid_full_config() {
  MoEConfig c = full_config();
  c.moe_shared_expert_overlap = false;
  c.recompute_method.reset();
  c.recompute_num_layers.reset();
  return c;
}

// Field-by-field equality through the one printer every key goes through.
void expect_same(const MoEConfig& a, const MoEConfig& b) { EXPECT_EQ(config_to_json(a), config_to_json(b)); }

}  // namespace

// ---- JSON -------------------------------------------------------------------------------------------

TEST(ConfigJson, RoundTripEveryKey) {
  MoEConfig c = full_config();
  ASSERT_NO_THROW(validate(valid_full_config()));
  std::string text = config_to_json(c);
  for (const std::string& k : config_keys()) EXPECT_NE(text.find("\"" + k + "\""), std::string::npos) << k;
  MoEConfig back = config_from_json(text);
  expect_same(back, c);
  // Spot-check the struct itself, not only its printout.
  EXPECT_EQ(back.moe_router_topk, 4);
  EXPECT_EQ(back.moe_router_score_function, "sigmoid");
  EXPECT_EQ(back.moe_router_topk_scaling_factor, 2.5);
  EXPECT_EQ(back.moe_router_num_groups, 4);
  EXPECT_EQ(back.moe_router_load_balancing_type, (std::vector<std::string>{"seq_aux_loss", "global_aux_loss"}));
  EXPECT_EQ(back.moe_aux_loss_coeff, (std::vector<double>{1e-2, 0.1 + 0.2}));  // bit-exact doubles
  EXPECT_EQ(back.moe_router_dtype, "fp64");
  EXPECT_EQ(back.seed, 18446744073709551615ull);
  EXPECT_EQ(back.expert_tensor_parallel_size, 1);
  EXPECT_EQ(back.offload_modules, (std::vector<std::string>{"expert_fc1"}));
  EXPECT_TRUE(back.moe_shared_expert_overlap);
  EXPECT_EQ(back.sequence_parallel, true);
  EXPECT_EQ(back.recompute_method, "block");
  EXPECT_EQ(back.recompute_num_layers, 2);
}

TEST(ConfigJson, OptionalBoolKey) {
  // sequence_parallel is unset by default (printed as null) and takes true, false or null.
  EXPECT_NE(config_to_json(MoEConfig{}).find("\"sequence_parallel\": null"), std::string::npos);
  EXPECT_FALSE(config_from_json("{}").sequence_parallel.has_value());
  EXPECT_EQ(config_from_json(R"({"sequence_parallel": true})").sequence_parallel, true);
  EXPECT_EQ(config_from_json(R"({"sequence_parallel": false})").sequence_parallel, false);
  EXPECT_FALSE(config_from_json(R"({"sequence_parallel": null})").sequence_parallel.has_value());
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"sequence_parallel": 1})"); }),
                           {"sequence_parallel", "a boolean (true or false) or null", "1"}));
  MoEConfig c;
  set_config_value(c, "--sequence-parallel", "true");
  EXPECT_EQ(c.sequence_parallel, true);
  set_config_value(c, "--sequence-parallel", "none");
  EXPECT_FALSE(c.sequence_parallel.has_value());
  EXPECT_TRUE(contains_all(error_of([&] { set_config_value(c, "--sequence-parallel", "maybe"); }),
                           {"sequence_parallel", "boolean", "'maybe'"}));
}

TEST(ConfigJson, KeyShapes) {
  EXPECT_EQ(config_key_shape("moe_router_pre_softmax"), ConfigKeyShape::boolean);
  EXPECT_EQ(config_key_shape("--sequence-parallel"), ConfigKeyShape::boolean);  // optional<bool>
  EXPECT_EQ(config_key_shape("moe_aux_loss_coeff"), ConfigKeyShape::list);
  EXPECT_EQ(config_key_shape("moe-layer-freq"), ConfigKeyShape::list);
  EXPECT_EQ(config_key_shape("recompute_modules"), ConfigKeyShape::list);
  EXPECT_EQ(config_key_shape("moe_router_topk"), ConfigKeyShape::scalar);
  EXPECT_EQ(config_key_shape("recompute_method"), ConfigKeyShape::scalar);
  EXPECT_EQ(config_key_shape("moe_expert_capacity_factor"), ConfigKeyShape::scalar);
  EXPECT_TRUE(contains_all(error_of([] { config_key_shape("moe_router_top_k"); }), {"moe_router_topk"}));
  // Every key has a shape.
  for (const std::string& k : config_keys()) EXPECT_NO_THROW(config_key_shape(k)) << k;
}

TEST(ConfigJson, DefaultsRoundTripWithNulls) {
  MoEConfig d;
  std::string text = config_to_json(d);
  EXPECT_NE(text.find("\"moe_router_num_groups\": null"), std::string::npos) << text;
  MoEConfig back = config_from_json(text);
  expect_same(back, d);
  EXPECT_FALSE(back.moe_router_num_groups.has_value());
  // An empty object is the defaults (Megatron's).
  expect_same(config_from_json("{}"), d);
  EXPECT_EQ(d.moe_router_topk, 2);
  EXPECT_EQ(d.moe_router_load_balancing_type, std::vector<std::string>{"aux_loss"});
}

TEST(ConfigJson, KeysAreTheStructFields) {
  std::vector<std::string> keys = config_keys();
  EXPECT_EQ(keys.front(), "hidden_size");
  EXPECT_EQ(std::set<std::string>(keys.begin(), keys.end()).size(), keys.size()) << "duplicate key in the table";
  for (const std::string& k : keys) EXPECT_TRUE(is_config_key(k)) << k;
  EXPECT_TRUE(is_config_key("--moe-router-topk"));
  EXPECT_TRUE(is_config_key("moe-router-topk"));
  EXPECT_FALSE(is_config_key("moe_router_top_k"));
  EXPECT_FALSE(is_config_key(""));
}

TEST(ConfigJson, ListKeysTakeScalarOrList) {
  MoEConfig c = config_from_json(R"({"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.01,
                                     "recompute_modules": "moe_act", "offload_modules": ["moe_act", "expert_fc1"]})");
  EXPECT_EQ(c.moe_router_load_balancing_type, std::vector<std::string>{"seq_aux_loss"});
  EXPECT_EQ(c.moe_aux_loss_coeff, std::vector<double>{0.01});
  EXPECT_EQ(c.recompute_modules, std::vector<std::string>{"moe_act"});
  EXPECT_EQ(c.offload_modules, (std::vector<std::string>{"moe_act", "expert_fc1"}));
  c = config_from_json(R"({"moe_aux_loss_coeff": [1, 0.5], "recompute_modules": []})");
  EXPECT_EQ(c.moe_aux_loss_coeff, (std::vector<double>{1.0, 0.5}));
  EXPECT_TRUE(c.recompute_modules.empty());
  // Elements are typed too, and the message says which one.
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"moe_aux_loss_coeff": [0.1, "x"]})"); }),
                           {"moe_aux_loss_coeff[1]", "a number", "\"x\""}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"recompute_modules": null})"); }),
                           {"recompute_modules", "a string or a list", "null"}));
}

TEST(ConfigJson, IntegersMustBeIntegral) {
  EXPECT_EQ(config_from_json(R"({"moe_router_topk": 2.0})").moe_router_topk, 2);
  EXPECT_EQ(config_from_json(R"({"moe_router_num_groups": 4.0})").moe_router_num_groups, 4);
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"moe_router_topk": 2.5})", "my.json"); }),
                           {"my.json", "moe_router_topk", "an integer", "2.5"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"moe_router_group_topk": 1.5})"); }),
                           {"moe_router_group_topk", "1.5"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"seed": -1})"); }), {"seed", "non-negative", "-1"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"hidden_size": 1e30})"); }), {"hidden_size", "1e+30"}));
  // Doubles take integers.
  EXPECT_EQ(config_from_json(R"({"init_method_std": 1})").init_method_std, 1.0);
}

TEST(ConfigJson, WrongTypesNameKeyExpectedAndGot) {
  struct Case {
    const char* json;
    std::vector<std::string> parts;
  };
  std::vector<Case> cases = {
      {R"({"hidden_size": "16"})", {"hidden_size", "an integer", "\"16\"", "string"}},
      {R"({"moe_router_pre_softmax": 1})", {"moe_router_pre_softmax", "a boolean", "1"}},
      {R"({"moe_router_score_function": 3})", {"moe_router_score_function", "a string", "3"}},
      {R"({"init_method_std": true})", {"init_method_std", "a number", "true"}},
      {R"({"moe_router_dtype": 32})", {"moe_router_dtype", "a string or null", "32"}},
      {R"({"moe_expert_capacity_factor": "1.0"})", {"moe_expert_capacity_factor", "a number or null", "\"1.0\""}},
      {R"({"hidden_size": null})", {"hidden_size", "an integer", "null"}},
      {R"({"moe_token_drop_policy": null})", {"moe_token_drop_policy", "a string", "null"}},
      {R"({"moe_router_load_balancing_type": {"a": 1}})", {"moe_router_load_balancing_type", "object"}},
  };
  for (const Case& c : cases) EXPECT_TRUE(contains_all(error_of([&] { config_from_json(c.json, "cfg.json"); }), c.parts))
                                  << c.json;
}

TEST(ConfigJson, NullClearsOptionalKeys) {
  MoEConfig c = config_from_json(R"({"moe_expert_capacity_factor": null, "moe_router_dtype": null,
                                     "expert_tensor_parallel_size": null, "moe_z_loss_coeff": 0.5})");
  EXPECT_FALSE(c.moe_expert_capacity_factor.has_value());
  EXPECT_FALSE(c.moe_router_dtype.has_value());
  EXPECT_FALSE(c.expert_tensor_parallel_size.has_value());
  EXPECT_EQ(c.moe_z_loss_coeff, 0.5);
}

TEST(ConfigJson, UnknownKeySuggestsClosest) {
  std::string m = error_of([] { config_from_json(R"({"moe_router_top_k": 2})", "run.json"); });
  EXPECT_TRUE(contains_all(m, {"run.json", "unknown config key 'moe_router_top_k'", "moe_router_topk"}));
  // Keys are exactly the field names: dashes are for the command line.
  m = error_of([] { config_from_json(R"({"moe-router-topk": 2})"); });
  EXPECT_TRUE(contains_all(m, {"'moe-router-topk'", "closest known keys: moe_router_topk"}));
  m = error_of([] { config_from_json(R"({"num_experts": 8})"); });
  EXPECT_TRUE(contains_all(m, {"num_moe_experts"}));
  m = error_of([] { config_from_json(R"({"dispatcher_type": "alltoall"})"); });
  EXPECT_TRUE(contains_all(m, {"moe_token_dispatcher_type"}));
}

TEST(ConfigJson, RejectsNonObjectsDuplicatesAndBadSyntax) {
  EXPECT_TRUE(contains_all(error_of([] { config_from_json("[1, 2]", "a.json"); }), {"a.json", "JSON object", "array"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json("42"); }), {"JSON object"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"hidden_size": 1, "hidden_size": 2})"); }),
                           {"duplicate key 'hidden_size'"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json("{\n  \"hidden_size\": 1,\n}", "b.json"); }),
                           {"b.json", "not valid JSON", "line 3"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(""); }), {"not valid JSON"}));
}

// Found by tests/fuzz/fuzz_config: nlohmann reports a number too large for a double as out_of_range
// (not parse_error), which escaped as a nlohmann exception; deep nesting is refused before nlohmann's
// recursive copy / dump could overflow the stack.
TEST(ConfigJson, NumberOverflowAndDeepNestingAreMoeErrors) {
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"hidden_size": 1e400})", "c.json"); }),
                           {"c.json", "not valid JSON", "1e400"}));
  EXPECT_TRUE(contains_all(error_of([] { config_from_json(R"({"moe_aux_loss_coeff": [-1e999]})", "d.json"); }),
                           {"d.json", "not valid JSON"}));
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_TRUE(contains_all(error_of([&] { config_from_json(deep, "e.json"); }), {"e.json", "nested deeper than 512"}));
  const std::string ok = "{\"x\": " + std::string(500, '[') + std::string(500, ']') + "}";
  EXPECT_TRUE(contains_all(error_of([&] { config_from_json(ok, "f.json"); }), {"f.json", "'x'"}))
      << "500 levels parse; the unknown key is what is refused";
}

// ---- files ------------------------------------------------------------------------------------------

class ConfigFile : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/moecore_test_config_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    std::string p = dir_ + "/" + name;
    std::ofstream(p) << text;
    return p;
  }
  std::string dir_;
};

TEST_F(ConfigFile, LoadsAFile) {  // loading does not validate: full_config() holds refused values
  std::string p = write("ok.json", config_to_json(full_config()));
  expect_same(load_config(p), full_config());
}

TEST_F(ConfigFile, MissingFileIsAnIoError) {
  std::string p = dir_ + "/nope.json";
  EXPECT_TRUE(contains_all(error_of([&] { load_config(p); }, ErrorCode::io), {p, "no such file"}));
  EXPECT_TRUE(contains_all(error_of([&] { load_config(dir_); }, ErrorCode::io), {dir_, "directory"}));
}

TEST_F(ConfigFile, MalformedJsonSaysWhere) {
  std::string p = write("bad.json", "{\n  \"hidden_size\": 16,\n  \"num_moe_experts\": 8 8\n}\n");
  EXPECT_TRUE(contains_all(error_of([&] { load_config(p); }), {p, "not valid JSON", "line 3, column"}));
  p = write("unknown.json", R"({"moe_ffn_hiden_size": 8})");
  EXPECT_TRUE(contains_all(error_of([&] { load_config(p); }), {p, "moe_ffn_hiden_size", "moe_ffn_hidden_size"}));
}

// ---- set_config_value ---------------------------------------------------------------------------------

TEST(SetConfigValue, DashesUnderscoresAndLeadingDashes) {
  MoEConfig c;
  set_config_value(c, "--moe-router-topk", "4");
  EXPECT_EQ(c.moe_router_topk, 4);
  set_config_value(c, "moe-router-topk", "6");
  EXPECT_EQ(c.moe_router_topk, 6);
  set_config_value(c, "moe_router_topk", "8");
  EXPECT_EQ(c.moe_router_topk, 8);
  set_config_value(c, "--expert-model-parallel-size", "2.0");
  EXPECT_EQ(c.expert_model_parallel_size, 2);
  set_config_value(c, "--seed", "42");
  EXPECT_EQ(c.seed, 42u);
}

TEST(SetConfigValue, ParsesEachType) {
  MoEConfig c;
  for (const char* t : {"true", "1", "yes", "True", "YES"}) {
    c.moe_router_pre_softmax = false;
    set_config_value(c, "--moe-router-pre-softmax", t);
    EXPECT_TRUE(c.moe_router_pre_softmax) << t;
  }
  for (const char* f : {"false", "0", "no", "No"}) {
    c.moe_router_pre_softmax = true;
    set_config_value(c, "--moe-router-pre-softmax", f);
    EXPECT_FALSE(c.moe_router_pre_softmax) << f;
  }
  set_config_value(c, "--moe-expert-capacity-factor", "1.5");
  EXPECT_EQ(c.moe_expert_capacity_factor, 1.5);
  set_config_value(c, "--moe-expert-capacity-factor", "none");
  EXPECT_FALSE(c.moe_expert_capacity_factor.has_value());
  set_config_value(c, "--moe-router-dtype", "fp64");
  EXPECT_EQ(c.moe_router_dtype, "fp64");
  set_config_value(c, "--moe-router-dtype", "null");
  EXPECT_FALSE(c.moe_router_dtype.has_value());
  set_config_value(c, "--moe-router-num-groups", "4");
  EXPECT_EQ(c.moe_router_num_groups, 4);
  set_config_value(c, "--moe-router-load-balancing-type", "seq_aux_loss, global_aux_loss");
  EXPECT_EQ(c.moe_router_load_balancing_type, (std::vector<std::string>{"seq_aux_loss", "global_aux_loss"}));
  set_config_value(c, "--moe-aux-loss-coeff", "0.01,0.001");
  EXPECT_EQ(c.moe_aux_loss_coeff, (std::vector<double>{0.01, 0.001}));
  set_config_value(c, "--recompute-modules", "");
  EXPECT_TRUE(c.recompute_modules.empty());
  set_config_value(c, "--moe-token-dispatcher-type", "alltoall");
  EXPECT_EQ(c.moe_token_dispatcher_type, "alltoall");
  set_config_value(c, "--recompute-granularity", "");
  EXPECT_EQ(c.recompute_granularity, "");
}

TEST(SetConfigValue, BadValuesNameKeyAndValue) {
  MoEConfig c;
  struct Case {
    const char* key;
    const char* value;
    std::vector<std::string> parts;
  };
  std::vector<Case> cases = {
      {"--moe-router-topk", "two", {"--moe-router-topk", "moe_router_topk", "an integer", "'two'"}},
      {"--moe-router-topk", "2.5", {"moe_router_topk", "'2.5'"}},
      {"--moe-router-topk", "", {"moe_router_topk", "''"}},
      {"--moe-router-pre-softmax", "maybe", {"moe_router_pre_softmax", "boolean", "'maybe'"}},
      {"--init-method-std", "0.02x", {"init_method_std", "'0.02x'"}},
      {"--init-method-std", "nan", {"init_method_std", "finite", "'nan'"}},
      {"--moe-expert-capacity-factor", "big", {"moe_expert_capacity_factor", "none/null", "'big'"}},
      {"--moe-aux-loss-coeff", "0.1,,0.2", {"moe_aux_loss_coeff", "empty entries", "'0.1,,0.2'"}},
      {"--moe-aux-loss-coeff", "0.1,x", {"moe_aux_loss_coeff[1]", "'x'"}},
      {"--seed", "-3", {"seed", "'-3'"}},
  };
  for (const Case& k : cases)
    EXPECT_TRUE(contains_all(error_of([&] { set_config_value(c, k.key, k.value); }), k.parts)) << k.key << " " << k.value;
  // A failed set leaves the config untouched.
  EXPECT_EQ(c.moe_router_topk, MoEConfig{}.moe_router_topk);
  EXPECT_EQ(c.moe_aux_loss_coeff, MoEConfig{}.moe_aux_loss_coeff);
}

TEST(SetConfigValue, UnknownKeySuggestsClosest) {
  MoEConfig c;
  std::string m = error_of([&] { set_config_value(c, "--moe-router-topK", "2"); });
  EXPECT_TRUE(contains_all(m, {"'--moe-router-topK'", "moe_router_topk"}));
  m = error_of([&] { set_config_value(c, "--expert-parallel-size", "2"); });
  EXPECT_TRUE(contains_all(m, {"expert_model_parallel_size"}));
}

// ---- validate -------------------------------------------------------------------------------------------

TEST(Validate, ValidConfigsPass) {
  EXPECT_NO_THROW(validate(base_config()));
  EXPECT_NO_THROW(validate(valid_full_config()));
  MoEConfig c = base_config();
  c.moe_router_topk = 1;
  c.moe_router_pre_softmax = true;
  EXPECT_NO_THROW(validate(c));
  c.moe_router_score_function = "sigmoid";
  c.moe_router_pre_softmax = false;
  EXPECT_NO_THROW(validate(c));  // topk=1 is fine with sigmoid
  c = base_config();
  c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss"};
  c.moe_aux_loss_coeff = {0.1};  // one coefficient applies to all
  EXPECT_NO_THROW(validate(c));
  c.activation_func = "squared_relu";
  c.recompute_granularity = "selective";
  c.recompute_modules = {"moe"};
  c.parallel_order = "pp-dp-ep-cp-tp";
  c.moe_router_score_function = "sqrtsoftplus";
  c.moe_router_enable_expert_bias = true;
  c.moe_router_topk_scaling_factor = 1e-3;
  EXPECT_NO_THROW(validate(c));
  // sequence_parallel: unset or true with TP > 1; anything with TP = 1 (no effect there).
  c = base_config();
  c.tensor_model_parallel_size = 2;
  EXPECT_NO_THROW(validate(c));
  c.sequence_parallel = true;
  EXPECT_NO_THROW(validate(c));
  c.tensor_model_parallel_size = 1;
  c.sequence_parallel = false;
  EXPECT_NO_THROW(validate(c));
  c.sequence_parallel = true;
  EXPECT_NO_THROW(validate(c));
}

TEST(Validate, EveryRuleRejectsNamingKeyAndValue) {
  struct Rule {
    const char* what;
    std::function<void(MoEConfig&)> breaks;
    std::vector<std::string> parts;  // the key(s) and value(s) the message must name
  };
  std::vector<Rule> rules = {
      {"hidden_size < 1", [](MoEConfig& c) { c.hidden_size = 0; }, {"hidden_size", ">= 1", "0"}},
      {"num_moe_experts < 1", [](MoEConfig& c) { c.num_moe_experts = -2; }, {"num_moe_experts", "-2"}},
      {"moe_ffn_hidden_size < 1", [](MoEConfig& c) { c.moe_ffn_hidden_size = 0; }, {"moe_ffn_hidden_size"}},
      {"topk < 1", [](MoEConfig& c) { c.moe_router_topk = 0; }, {"moe_router_topk", "= 0"}},
      {"topk > E", [](MoEConfig& c) { c.moe_router_topk = 9; }, {"moe_router_topk", "num_moe_experts = 8", "9"}},
      {"score function", [](MoEConfig& c) { c.moe_router_score_function = "tanh"; },
       {"moe_router_score_function", "'tanh'", "sqrtsoftplus"}},
      {"topk=1 softmax", [](MoEConfig& c) { c.moe_router_topk = 1; },
       {"moe_router_topk = 1", "softmax", "moe_router_pre_softmax", "requires pre_softmax"}},
      {"expert bias with softmax", [](MoEConfig& c) { c.moe_router_enable_expert_bias = true; },
       {"moe_router_enable_expert_bias", "sigmoid", "'softmax'"}},
      {"bias rate < 0", [](MoEConfig& c) { c.moe_router_bias_update_rate = -0.1; },
       {"moe_router_bias_update_rate", "-0.1"}},
      {"groups without group_topk", [](MoEConfig& c) { c.moe_router_num_groups = 2; },
       {"moe_router_num_groups = 2", "moe_router_group_topk = null"}},
      {"group_topk without groups", [](MoEConfig& c) { c.moe_router_group_topk = 1; },
       {"moe_router_num_groups = null", "moe_router_group_topk = 1"}},
      {"num_groups < 1",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 0;
         c.moe_router_group_topk = 1;
       },
       {"moe_router_num_groups", "0"}},
      {"group_topk < 1",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 2;
         c.moe_router_group_topk = 0;
       },
       {"moe_router_group_topk", "0"}},
      {"E % G",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 3;
         c.moe_router_group_topk = 1;
       },
       {"num_moe_experts = 8", "moe_router_num_groups = 3"}},
      {"g > G",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 2;
         c.moe_router_group_topk = 4;
         c.moe_router_topk = 4;
       },
       {"moe_router_group_topk = 4", "moe_router_num_groups = 2"}},
      {"k % g",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 4;
         c.moe_router_group_topk = 2;
         c.moe_router_topk = 3;
       },
       {"moe_router_topk = 3", "moe_router_group_topk = 2"}},
      {"k > g*(E/G)",
       [](MoEConfig& c) {
         c.moe_router_num_groups = 4;  // 2 experts per group, keep 1 group: at most 2 experts
         c.moe_router_group_topk = 1;
         c.moe_router_topk = 3;
       },
       {"moe_router_topk = 3", "moe_router_group_topk", "= 2"}},
      {"balancing type", [](MoEConfig& c) { c.moe_router_load_balancing_type = {"sinkhorn"}; },
       {"moe_router_load_balancing_type", "'sinkhorn'", "global_aux_loss"}},
      {"balancing type empty", [](MoEConfig& c) { c.moe_router_load_balancing_type = {}; },
       {"moe_router_load_balancing_type", "empty"}},
      {"duplicate balancing types", [](MoEConfig& c) { c.moe_router_load_balancing_type = {"aux_loss", "aux_loss"}; },
       {"moe_router_load_balancing_type", "'aux_loss' twice"}},
      {"coeff count",
       [](MoEConfig& c) {
         c.moe_router_load_balancing_type = {"aux_loss", "seq_aux_loss", "global_aux_loss"};
         c.moe_aux_loss_coeff = {0.1, 0.2};
       },
       {"moe_aux_loss_coeff", "(3)", "got 2 values"}},
      {"negative coeff", [](MoEConfig& c) { c.moe_aux_loss_coeff = {-0.5}; }, {"moe_aux_loss_coeff", "-0.5"}},
      {"z loss < 0", [](MoEConfig& c) { c.moe_z_loss_coeff = -1.0; }, {"moe_z_loss_coeff", "-1"}},
      {"jitter = 0", [](MoEConfig& c) { c.moe_input_jitter_eps = 0.0; }, {"moe_input_jitter_eps", "(0, 1)", "= 0"}},
      {"jitter = 1", [](MoEConfig& c) { c.moe_input_jitter_eps = 1.0; }, {"moe_input_jitter_eps", "= 1"}},
      {"capacity <= 0", [](MoEConfig& c) { c.moe_expert_capacity_factor = 0.0; },
       {"moe_expert_capacity_factor", "> 0", "= 0"}},
      {"pad without capacity", [](MoEConfig& c) { c.moe_pad_expert_input_to_capacity = true; },
       {"moe_pad_expert_input_to_capacity", "moe_expert_capacity_factor"}},
      {"drop policy", [](MoEConfig& c) { c.moe_token_drop_policy = "random"; },
       {"moe_token_drop_policy", "'random'", "'position'"}},
      {"shared size < 1", [](MoEConfig& c) { c.moe_shared_expert_intermediate_size = 0; },
       {"moe_shared_expert_intermediate_size", "= 0"}},
      {"gate without shared", [](MoEConfig& c) { c.moe_shared_expert_gate = true; },
       {"moe_shared_expert_gate", "moe_shared_expert_intermediate_size"}},
      {"shared expert overlap", [](MoEConfig& c) { c.moe_shared_expert_overlap = true; },
       {"moe_shared_expert_overlap = true is not supported", "side stream", "not implemented"}},
      {"shared expert overlap, with a shared expert",
       [](MoEConfig& c) {
         c.moe_shared_expert_intermediate_size = 16;
         c.moe_shared_expert_overlap = true;
       },
       {"moe_shared_expert_overlap = true is not supported", "not implemented"}},
      {"topk scaling factor 0", [](MoEConfig& c) { c.moe_router_topk_scaling_factor = 0.0; },
       {"moe_router_topk_scaling_factor", "finite number > 0", "= 0"}},
      {"topk scaling factor < 0", [](MoEConfig& c) { c.moe_router_topk_scaling_factor = -2.5; },
       {"moe_router_topk_scaling_factor", "-2.5"}},
      {"topk scaling factor inf",
       [](MoEConfig& c) { c.moe_router_topk_scaling_factor = std::numeric_limits<double>::infinity(); },
       {"moe_router_topk_scaling_factor", "inf"}},
      {"topk scaling factor nan",
       [](MoEConfig& c) { c.moe_router_topk_scaling_factor = std::numeric_limits<double>::quiet_NaN(); },
       {"moe_router_topk_scaling_factor", "nan"}},
      {"activation", [](MoEConfig& c) { c.activation_func = "swish"; }, {"activation_func", "'swish'", "relu2"}},
      {"params dtype", [](MoEConfig& c) { c.params_dtype = "fp16"; }, {"params_dtype", "'fp16'", "'bf16'"}},
      {"router dtype", [](MoEConfig& c) { c.moe_router_dtype = "bf16"; }, {"moe_router_dtype", "'bf16'", "'fp64'"}},
      {"init std < 0", [](MoEConfig& c) { c.init_method_std = -0.02; }, {"init_method_std", "-0.02"}},
      {"TP < 1", [](MoEConfig& c) { c.tensor_model_parallel_size = 0; }, {"tensor_model_parallel_size", "0"}},
      {"CP < 1", [](MoEConfig& c) { c.context_parallel_size = 0; }, {"context_parallel_size", "0"}},
      {"PP < 1", [](MoEConfig& c) { c.pipeline_model_parallel_size = 0; }, {"pipeline_model_parallel_size", "0"}},
      {"EP < 1", [](MoEConfig& c) { c.expert_model_parallel_size = -1; }, {"expert_model_parallel_size", "-1"}},
      {"ETP < 1", [](MoEConfig& c) { c.expert_tensor_parallel_size = 0; }, {"expert_tensor_parallel_size", "0"}},
      {"dispatcher", [](MoEConfig& c) { c.moe_token_dispatcher_type = "dense"; },
       {"moe_token_dispatcher_type", "'dense'", "'alltoall'"}},
      {"flex dispatcher", [](MoEConfig& c) { c.moe_token_dispatcher_type = "flex"; },
       {"moe_token_dispatcher_type = 'flex' is not supported", "DeepEP", "'alltoall'"}},
      {"sequence_parallel false with TP 2",
       [](MoEConfig& c) {
         c.tensor_model_parallel_size = 2;
         c.sequence_parallel = false;
       },
       {"sequence_parallel = false with tensor_model_parallel_size = 2 is not supported", "sequence-parallel"}},
      {"recompute granularity", [](MoEConfig& c) { c.recompute_granularity = "block"; },
       {"recompute_granularity", "'block'", "'selective'"}},
      {"full recompute without a method", [](MoEConfig& c) { c.recompute_granularity = "full"; },
       {"recompute_granularity = 'full' needs recompute_method", "'uniform'", "'block'"}},
      {"full recompute without a layer count",
       [](MoEConfig& c) {
         c.recompute_granularity = "full";
         c.recompute_method = "uniform";
       },
       {"recompute_granularity = 'full' needs recompute_num_layers"}},
      {"recompute method value", [](MoEConfig& c) { c.recompute_method = "every"; },
       {"recompute_method", "'every'", "'uniform'", "'block'"}},
      {"recompute method", [](MoEConfig& c) { c.recompute_method = "uniform"; },
       {"recompute_method = 'uniform' needs recompute_granularity = 'full'"}},
      {"recompute num layers < 1", [](MoEConfig& c) { c.recompute_num_layers = 0; },
       {"recompute_num_layers", ">= 1", "0"}},
      {"recompute num layers", [](MoEConfig& c) { c.recompute_num_layers = 4; },
       {"recompute_num_layers = 4 needs recompute_granularity = 'full'"}},
      {"recompute module", [](MoEConfig& c) { c.recompute_modules = {"moe_act", "attention"}; },
       {"recompute_modules", "'attention'", "'shared_experts'"}},
      {"offload module",
       [](MoEConfig& c) {
         c.fine_grained_activation_offloading = true;
         c.offload_modules = {"router"};
       },
       {"offload_modules", "'router'", "'expert_fc1'"}},
      {"offload without flag", [](MoEConfig& c) { c.offload_modules = {"moe_act"}; },
       {"offload_modules", "fine_grained_activation_offloading"}},
      {"order missing axis", [](MoEConfig& c) { c.parallel_order = "tp-cp-ep-dp"; }, {"parallel_order", "'tp-cp-ep-dp'"}},
      {"order repeated axis", [](MoEConfig& c) { c.parallel_order = "tp-tp-ep-dp-pp"; }, {"parallel_order"}},
      {"order bad separator", [](MoEConfig& c) { c.parallel_order = "tp,cp,ep,dp,pp"; }, {"parallel_order"}},
  };
  for (const Rule& r : rules) {
    MoEConfig c = base_config();
    r.breaks(c);
    std::string m = error_of([&] { validate(c); });
    EXPECT_TRUE(contains_all(m, r.parts)) << r.what;
    EXPECT_NE(m.find("invalid config"), std::string::npos) << r.what << ": " << m;
  }
}

TEST(ValidateParallel, ValidLayoutsPass) {
  MoEConfig c = base_config();
  c.tensor_model_parallel_size = 2;
  c.expert_model_parallel_size = 4;
  c.expert_tensor_parallel_size = 1;
  EXPECT_NO_THROW(validate_parallel(c, 8));  // docs/parallelism.md's worked example
  c.expert_model_parallel_size = 8;           // EP > DP folds over TP
  EXPECT_NO_THROW(validate_parallel(c, 8));
  c.pipeline_model_parallel_size = 2;
  c.expert_model_parallel_size = 4;
  EXPECT_NO_THROW(validate_parallel(c, 16));
}

TEST(ValidateParallel, RejectsNamingTheSizes) {
  struct Case {
    const char* what;
    std::function<void(MoEConfig&)> set;
    int64_t world;
    std::vector<std::string> parts;
  };
  std::vector<Case> cases = {
      {"W % TP*CP*PP",
       [](MoEConfig& c) {
         c.tensor_model_parallel_size = 2;
         c.pipeline_model_parallel_size = 2;
         c.expert_tensor_parallel_size = 1;
       },
       6,
       {"world size 6 is not divisible by tensor_model_parallel_size·context_parallel_size·"
        "pipeline_model_parallel_size = 4"}},
      {"W % ETP*EP*PP", [](MoEConfig& c) { c.expert_model_parallel_size = 4; }, 6,
       {"world size 6", "expert_tensor_parallel_size·expert_model_parallel_size·pipeline_model_parallel_size = 4"}},
      {"E % EP", [](MoEConfig& c) { c.expert_model_parallel_size = 3; }, 3,
       {"num_moe_experts = 8", "expert_model_parallel_size = 3"}},
      {"F % ETP",
       [](MoEConfig& c) {
         c.moe_ffn_hidden_size = 30;
         c.expert_tensor_parallel_size = 4;
       },
       4, {"moe_ffn_hidden_size = 30", "expert_tensor_parallel_size = 4"}},
      {"F % ETP (unset ETP follows TP), GLU",
       [](MoEConfig& c) {
         c.moe_ffn_hidden_size = 6;
         c.gated_linear_unit = true;
         c.tensor_model_parallel_size = 4;
       },
       4, {"moe_ffn_hidden_size = 6", "expert_tensor_parallel_size = 4", "gated_linear_unit"}},
      {"Fs % TP",
       [](MoEConfig& c) {
         c.moe_shared_expert_intermediate_size = 10;
         c.tensor_model_parallel_size = 4;
         c.expert_tensor_parallel_size = 1;
       },
       4, {"moe_shared_expert_intermediate_size = 10", "tensor_model_parallel_size = 4"}},
      {"pp groups differ",
       [](MoEConfig& c) {
         c.tensor_model_parallel_size = 2;
         c.expert_tensor_parallel_size = 1;
         c.pipeline_model_parallel_size = 2;
         c.parallel_order = "tp-pp-cp-ep-dp";
       },
       8, {"parallel_order = 'tp-pp-cp-ep-dp'", "pp stride 2", "pp stride 1"}},
      {"world < 1", [](MoEConfig&) {}, 0, {"world size", "0"}},
      {"TP 2 on one process", [](MoEConfig& c) { c.tensor_model_parallel_size = 2; }, 1,
       {"world size 1", "tensor_model_parallel_size", "without process groups"}},
      {"EP 2 on one process", [](MoEConfig& c) { c.expert_model_parallel_size = 2; }, 1,
       {"world size 1", "expert_model_parallel_size", "every parallel size must be 1"}},
      {"also validate()", [](MoEConfig& c) { c.moe_router_topk = 0; }, 8, {"moe_router_topk"}},
  };
  for (const Case& k : cases) {
    MoEConfig c = base_config();
    k.set(c);
    EXPECT_TRUE(contains_all(error_of([&] { validate_parallel(c, k.world); }), k.parts)) << k.what;
  }
}

// A layer built without process groups runs on one process: parallel sizes > 1 in its config are
// refused (they used to be ignored silently).
TEST(ValidateParallel, LayerWithoutGroupsRefusesParallelSizes) {
  MoEConfig c = base_config();
  EXPECT_NO_THROW(MoELayer(c, Device::cpu()));
  for (int which = 0; which < 4; ++which) {
    MoEConfig p = c;
    if (which == 0) p.tensor_model_parallel_size = 2;
    if (which == 1) p.expert_model_parallel_size = 2;
    if (which == 2) p.context_parallel_size = 2;
    if (which == 3) p.expert_tensor_parallel_size = 2;
    EXPECT_TRUE(contains_all(error_of([&] { MoELayer layer(p, Device::cpu()); }),
                             {"world size 1", "without process groups"}))
        << which;
  }
}
