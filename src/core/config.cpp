// Configuration: one table of keys drives JSON parsing, JSON printing, command-line style setting
// and key listing; validate() is the single place cross-key rules live (Megatron Core's checks).
#include "moecore/config.h"

#include "core/json_strict.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <type_traits>
#include <variant>

#include "moecore/error.h"

namespace moe {

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// ---- small string helpers ------------------------------------------------------------------------

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

template <class Range>
std::string join(const Range& items, const char* sep = ", ") {
  std::ostringstream os;
  bool first = true;
  for (const auto& it : items) {
    os << (first ? "" : sep) << it;
    first = false;
  }
  return os.str();
}

std::string quoted_list(const std::vector<std::string>& items) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < items.size(); ++i) os << (i ? ", " : "") << "'" << items[i] << "'";
  os << "]";
  return os.str();
}

// Levenshtein distance (insert, delete, substitute), for "did you mean" suggestions.
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// ---- codecs: how one field type reads JSON, prints JSON and parses text ----------------------------

// Names the place for messages: "config.json: key 'moe_aux_loss_coeff[1]'" or
// "config key 'moe_router_topk' (given as '--moe-router-topk')".
struct Where {
  std::string prefix, key, suffix;
  std::string str() const { return prefix + "'" + key + "'" + suffix; }
  Where at(size_t i) const { return {prefix, key + "[" + std::to_string(i) + "]", suffix}; }
};

[[noreturn]] void bad_json(const Where& where, const std::string& expected, const json& got) {
  MOE_THROW(ErrorCode::invalid_argument, where.str(), " expects ", expected, ", got ", got.dump(), " (",
            got.type_name(), ")");
}
[[noreturn]] void bad_text(const Where& where, const std::string& expected, const std::string& got) {
  MOE_THROW(ErrorCode::invalid_argument, where.str(), " expects ", expected, ", got '", got, "'");
}

// A double that holds an exact integer in [lo, hi] (JSON 2.0 is the integer 2, 2.5 is not).
bool integral_double(double d, double lo, double hi) {
  return std::isfinite(d) && d == std::trunc(d) && d >= lo && d <= hi;
}

bool parse_double_text(const std::string& text, double& out) {
  std::string t = trim(text);
  if (t.empty()) return false;
  const char* b = t.c_str();
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(b, &end);
  if (end != b + t.size() || errno == ERANGE || !std::isfinite(v)) return false;
  out = v;
  return true;
}

template <class T>
struct Codec;

template <>
struct Codec<int64_t> {
  static std::string type_name() { return "an integer"; }
  static int64_t from_json(const json& j, const Where& where) {
    if (j.is_number_unsigned()) {
      uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) bad_json(where, "a 64-bit integer", j);
      return static_cast<int64_t>(u);
    }
    if (j.is_number_integer()) return j.get<int64_t>();
    if (j.is_number_float() && integral_double(j.get<double>(), -9.2e18, 9.2e18))
      return static_cast<int64_t>(j.get<double>());
    bad_json(where, type_name(), j);
  }
  static ordered_json to_json(int64_t v) { return v; }
  static int64_t from_text(const std::string& text, const Where& where) {
    std::string t = trim(text);
    int64_t v = 0;
    auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    if (!t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size()) return v;
    double d = 0;
    if (parse_double_text(t, d) && integral_double(d, -9.2e18, 9.2e18)) return static_cast<int64_t>(d);
    bad_text(where, type_name(), text);
  }
};

template <>
struct Codec<uint64_t> {
  static std::string type_name() { return "a non-negative integer"; }
  static uint64_t from_json(const json& j, const Where& where) {
    if (j.is_number_unsigned()) return j.get<uint64_t>();
    if (j.is_number_float() && integral_double(j.get<double>(), 0, 1.8e19)) return static_cast<uint64_t>(j.get<double>());
    bad_json(where, type_name(), j);
  }
  static ordered_json to_json(uint64_t v) { return v; }
  static uint64_t from_text(const std::string& text, const Where& where) {
    std::string t = trim(text);
    uint64_t v = 0;
    auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    if (!t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size()) return v;
    double d = 0;
    if (parse_double_text(t, d) && integral_double(d, 0, 1.8e19)) return static_cast<uint64_t>(d);
    bad_text(where, type_name(), text);
  }
};

template <>
struct Codec<double> {
  static std::string type_name() { return "a number"; }
  static double from_json(const json& j, const Where& where) {
    if (j.is_number()) return j.get<double>();
    bad_json(where, type_name(), j);
  }
  static ordered_json to_json(double v) { return v; }
  static double from_text(const std::string& text, const Where& where) {
    double d = 0;
    if (!parse_double_text(text, d)) bad_text(where, "a finite number", text);
    return d;
  }
};

template <>
struct Codec<bool> {
  static std::string type_name() { return "a boolean (true or false)"; }
  static bool from_json(const json& j, const Where& where) {
    if (j.is_boolean()) return j.get<bool>();
    bad_json(where, type_name(), j);
  }
  static ordered_json to_json(bool v) { return v; }
  static bool from_text(const std::string& text, const Where& where) {
    std::string t = lower(trim(text));
    if (t == "true" || t == "1" || t == "yes") return true;
    if (t == "false" || t == "0" || t == "no") return false;
    bad_text(where, "a boolean (true/false, 1/0, yes/no)", text);
  }
};

template <>
struct Codec<std::string> {
  static std::string type_name() { return "a string"; }
  static std::string from_json(const json& j, const Where& where) {
    if (j.is_string()) return j.get<std::string>();
    bad_json(where, type_name(), j);
  }
  static ordered_json to_json(const std::string& v) { return v; }
  static std::string from_text(const std::string& text, const Where&) { return text; }
};

bool is_none_text(const std::string& text) {
  std::string t = lower(trim(text));
  return t == "none" || t == "null";
}

template <class T>
struct Codec<std::optional<T>> {
  static std::string type_name() { return Codec<T>::type_name() + " or null"; }
  static std::optional<T> from_json(const json& j, const Where& where) {
    if (j.is_null()) return std::nullopt;
    if (!matches(j)) bad_json(where, type_name(), j);
    return Codec<T>::from_json(j, where);
  }
  static ordered_json to_json(const std::optional<T>& v) { return v ? Codec<T>::to_json(*v) : ordered_json(nullptr); }
  static std::optional<T> from_text(const std::string& text, const Where& where) {
    if (is_none_text(text)) return std::nullopt;
    try {
      return Codec<T>::from_text(text, where);
    } catch (const Error&) {
      bad_text(where, Codec<T>::type_name() + " or none/null", text);
    }
  }
  // Only to word the error as "X or null" rather than "X".
  static bool matches(const json& j) {
    if constexpr (std::is_same_v<T, std::string>) return j.is_string();
    else if constexpr (std::is_same_v<T, bool>) return j.is_boolean();
    else return j.is_number();
  }
};

// List-valued keys accept a single value or a list; the text form is comma-separated.
template <class T>
struct Codec<std::vector<T>> {
  static std::string type_name() { return Codec<T>::type_name() + " or a list of them"; }
  static std::vector<T> from_json(const json& j, const Where& where) {
    if (!j.is_array()) {
      try {
        return {Codec<T>::from_json(j, where)};
      } catch (const Error&) {
        bad_json(where, type_name(), j);  // word it as "X or a list of them"
      }
    }
    std::vector<T> out;
    for (size_t i = 0; i < j.size(); ++i) out.push_back(Codec<T>::from_json(j[i], where.at(i)));
    return out;
  }
  static ordered_json to_json(const std::vector<T>& v) {
    ordered_json a = ordered_json::array();
    for (const T& x : v) a.push_back(Codec<T>::to_json(x));
    return a;
  }
  static std::vector<T> from_text(const std::string& text, const Where& where) {
    std::vector<T> out;
    if (trim(text).empty()) return out;
    std::string item;
    std::istringstream is(text);
    size_t index = 0;
    while (std::getline(is, item, ',')) {
      std::string t = trim(item);
      if (t.empty()) bad_text(where, "a comma-separated list without empty entries", text);
      out.push_back(Codec<T>::from_text(t, where.at(index++)));
    }
    if (!text.empty() && text.back() == ',') bad_text(where, "a comma-separated list without empty entries", text);
    return out;
  }
};

// ---- the key table: one line per key -------------------------------------------------------------
// The member pointer is the accessor and its type picks the codec; a field of a new type fails to
// compile until FieldPtr and a Codec learn it.

using FieldPtr = std::variant<int64_t MoEConfig::*, uint64_t MoEConfig::*, double MoEConfig::*, bool MoEConfig::*,
                              std::string MoEConfig::*, std::optional<int64_t> MoEConfig::*,
                              std::optional<double> MoEConfig::*, std::optional<std::string> MoEConfig::*,
                              std::optional<bool> MoEConfig::*,
                              std::vector<std::string> MoEConfig::*, std::vector<double> MoEConfig::*,
                              std::vector<int64_t> MoEConfig::*>;

struct KeyInfo {
  const char* name;
  FieldPtr field;
};

#define MOE_CONFIG_KEY(field) KeyInfo{#field, &MoEConfig::field}

const std::vector<KeyInfo>& key_table() {
  static const std::vector<KeyInfo> table = {
      // model
      MOE_CONFIG_KEY(hidden_size),
      MOE_CONFIG_KEY(num_moe_experts),
      MOE_CONFIG_KEY(moe_ffn_hidden_size),
      MOE_CONFIG_KEY(moe_router_topk),
      MOE_CONFIG_KEY(moe_router_score_function),
      MOE_CONFIG_KEY(moe_router_pre_softmax),
      MOE_CONFIG_KEY(moe_router_topk_scaling_factor),
      MOE_CONFIG_KEY(moe_router_num_groups),
      MOE_CONFIG_KEY(moe_router_group_topk),
      MOE_CONFIG_KEY(moe_router_enable_expert_bias),
      MOE_CONFIG_KEY(moe_router_bias_update_rate),
      MOE_CONFIG_KEY(moe_router_load_balancing_type),
      MOE_CONFIG_KEY(moe_aux_loss_coeff),
      MOE_CONFIG_KEY(moe_z_loss_coeff),
      MOE_CONFIG_KEY(moe_input_jitter_eps),
      MOE_CONFIG_KEY(moe_router_dtype),
      MOE_CONFIG_KEY(moe_expert_capacity_factor),
      MOE_CONFIG_KEY(moe_token_drop_policy),
      MOE_CONFIG_KEY(moe_pad_expert_input_to_capacity),
      MOE_CONFIG_KEY(moe_shared_expert_intermediate_size),
      MOE_CONFIG_KEY(moe_shared_expert_gate),
      MOE_CONFIG_KEY(moe_shared_expert_overlap),
      MOE_CONFIG_KEY(gated_linear_unit),
      MOE_CONFIG_KEY(activation_func),
      MOE_CONFIG_KEY(params_dtype),
      MOE_CONFIG_KEY(seed),
      MOE_CONFIG_KEY(init_method_std),
      // the GPT model
      MOE_CONFIG_KEY(num_layers),
      MOE_CONFIG_KEY(num_attention_heads),
      MOE_CONFIG_KEY(num_query_groups),
      MOE_CONFIG_KEY(kv_channels),
      MOE_CONFIG_KEY(ffn_hidden_size),
      MOE_CONFIG_KEY(vocab_size),
      MOE_CONFIG_KEY(seq_length),
      MOE_CONFIG_KEY(normalization),
      MOE_CONFIG_KEY(layernorm_epsilon),
      MOE_CONFIG_KEY(position_embedding_type),
      MOE_CONFIG_KEY(rotary_base),
      MOE_CONFIG_KEY(rotary_percent),
      MOE_CONFIG_KEY(qk_layernorm),
      MOE_CONFIG_KEY(untie_embeddings_and_output_weights),
      MOE_CONFIG_KEY(moe_layer_freq),
      MOE_CONFIG_KEY(add_bias_linear),
      MOE_CONFIG_KEY(hidden_dropout),
      MOE_CONFIG_KEY(attention_dropout),
      MOE_CONFIG_KEY(num_microbatches),
      // parallelism
      MOE_CONFIG_KEY(tensor_model_parallel_size),
      MOE_CONFIG_KEY(context_parallel_size),
      MOE_CONFIG_KEY(pipeline_model_parallel_size),
      MOE_CONFIG_KEY(decoder_first_pipeline_num_layers),
      MOE_CONFIG_KEY(decoder_last_pipeline_num_layers),
      MOE_CONFIG_KEY(expert_model_parallel_size),
      MOE_CONFIG_KEY(expert_tensor_parallel_size),
      MOE_CONFIG_KEY(moe_token_dispatcher_type),
      MOE_CONFIG_KEY(sequence_parallel),
      MOE_CONFIG_KEY(parallel_order),
      // memory
      MOE_CONFIG_KEY(recompute_granularity),
      MOE_CONFIG_KEY(recompute_modules),
      MOE_CONFIG_KEY(recompute_method),
      MOE_CONFIG_KEY(recompute_num_layers),
      MOE_CONFIG_KEY(fine_grained_activation_offloading),
      MOE_CONFIG_KEY(offload_modules),
      MOE_CONFIG_KEY(min_offloaded_tensor_size),
  };
  return table;
}

#undef MOE_CONFIG_KEY

const KeyInfo* find_key(const std::string& name) {
  for (const KeyInfo& k : key_table())
    if (name == k.name) return &k;
  return nullptr;
}

// "--moe-router-topk" / "moe-router-topk" / "moe_router_topk" → "moe_router_topk".
std::string normalize_key(const std::string& key) {
  std::string k = trim(key);
  size_t dashes = 0;
  while (dashes < k.size() && dashes < 2 && k[dashes] == '-') ++dashes;
  k = k.substr(dashes);
  std::replace(k.begin(), k.end(), '-', '_');
  return k;
}

// The known keys nearest to `name`: keys containing it first, then by edit distance.
std::vector<std::string> closest_keys(const std::string& name, size_t n = 3) {
  std::vector<std::pair<size_t, std::string>> scored;
  std::string q = lower(normalize_key(name));
  for (const KeyInfo& k : key_table()) {
    std::string key = k.name;
    size_t d = edit_distance(q, key);
    if (q.size() >= 3 && key.find(q) != std::string::npos) d = std::min<size_t>(d, 1);
    scored.emplace_back(d, key);
  }
  std::sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && i < n; ++i) out.push_back(scored[i].second);
  return out;
}

[[noreturn]] void unknown_key(const std::string& where, const std::string& key) {
  MOE_THROW(ErrorCode::invalid_argument, where, "unknown config key '", key,
            "'; closest known keys: ", join(closest_keys(key)), " (", key_table().size(),
            " keys in all, see moe::config_keys())");
}

// Parses JSON text; a syntax error says line and column, a repeated key in any object is an error.
json parse_json_text(const std::string& text, const std::string& source) {
  std::string duplicate;
  json j = parse_json_strict(text, source, &duplicate);
  MOE_CHECK(duplicate.empty(), source, ": duplicate key '", duplicate, "' (each key may appear once)");
  return j;
}

}  // namespace

// ---- JSON, text and key listing -------------------------------------------------------------------

MoEConfig config_from_json(const std::string& json_text, const std::string& source) {
  json j = parse_json_text(json_text, source);
  MOE_CHECK(j.is_object(), source, ": a config must be a JSON object {\"key\": value, ...}, got ", j.type_name());
  MoEConfig config;
  for (const auto& [name, value] : j.items()) {
    const KeyInfo* key = find_key(name);
    if (!key) unknown_key(source + ": ", name);
    Where where{source + ": key ", name, ""};
    std::visit(
        [&](auto member) {
          using T = std::remove_cvref_t<decltype(config.*member)>;
          config.*member = Codec<T>::from_json(value, where);
        },
        key->field);
  }
  return config;
}

MoEConfig load_config(const std::string& path) {
  std::error_code ec;
  MOE_CHECK_CODE(std::filesystem::exists(path, ec), ErrorCode::io, "cannot read config file '", path,
                 "': no such file");
  MOE_CHECK_CODE(!std::filesystem::is_directory(path, ec), ErrorCode::io, "cannot read config file '", path,
                 "': it is a directory");
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK_CODE(in.good(), ErrorCode::io, "cannot open config file '", path, "' for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  MOE_CHECK_CODE(!in.bad(), ErrorCode::io, "error while reading config file '", path, "'");
  return config_from_json(ss.str(), path);
}

std::string config_to_json(const MoEConfig& config) {
  ordered_json o = ordered_json::object();
  for (const KeyInfo& key : key_table()) {
    std::visit(
        [&](auto member) {
          using T = std::remove_cvref_t<decltype(config.*member)>;
          o[key.name] = Codec<T>::to_json(config.*member);
        },
        key.field);
  }
  return o.dump(2);
}

void set_config_value(MoEConfig& config, const std::string& key, const std::string& value) {
  std::string name = normalize_key(key);
  const KeyInfo* info = find_key(name);
  if (!info) unknown_key("", key);
  Where where{"config key ", name, name != key ? " (given as '" + key + "')" : std::string()};
  std::visit(
      [&](auto member) {
        using T = std::remove_cvref_t<decltype(config.*member)>;
        config.*member = Codec<T>::from_text(value, where);
      },
      info->field);
}

bool is_config_key(const std::string& key) { return find_key(normalize_key(key)) != nullptr; }

ConfigKeyShape config_key_shape(const std::string& key) {
  const KeyInfo* info = find_key(normalize_key(key));
  if (!info) unknown_key("", key);
  const MoEConfig probe;
  return std::visit(
      [&probe](auto member) {
        using T = std::remove_cvref_t<decltype(probe.*member)>;
        if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, std::optional<bool>>) return ConfigKeyShape::boolean;
        else if constexpr (std::is_same_v<T, std::vector<std::string>> || std::is_same_v<T, std::vector<double>> ||
                           std::is_same_v<T, std::vector<int64_t>>)
          return ConfigKeyShape::list;
        else return ConfigKeyShape::scalar;
      },
      info->field);
}

std::vector<std::string> config_keys() {
  std::vector<std::string> out;
  for (const KeyInfo& k : key_table()) out.emplace_back(k.name);
  return out;
}

// ---- validation -------------------------------------------------------------------------------------

namespace {

// Every message starts with "invalid config: " and names the key(s), the value(s) and what is allowed.
#define MOE_CONFIG_REQUIRE(cond, ...) MOE_CHECK(cond, "invalid config: ", __VA_ARGS__)

void require_positive(const char* key, int64_t v) {
  MOE_CONFIG_REQUIRE(v >= 1, key, " must be >= 1, got ", key, " = ", v);
}

// !(v >= 0) also rejects NaN.
void require_non_negative(const char* key, double v) {
  MOE_CONFIG_REQUIRE(v >= 0.0, key, " must be >= 0, got ", key, " = ", v);
}

void require_one_of(const char* key, const std::string& value, const std::vector<std::string>& allowed) {
  MOE_CONFIG_REQUIRE(std::find(allowed.begin(), allowed.end(), value) != allowed.end(), key, " must be one of ",
                     quoted_list(allowed), ", got ", key, " = '", value, "'");
}

void require_all_of(const char* key, const std::vector<std::string>& values, const std::vector<std::string>& allowed) {
  for (const std::string& v : values)
    MOE_CONFIG_REQUIRE(std::find(allowed.begin(), allowed.end(), v) != allowed.end(), key, " entries must be in ",
                       quoted_list(allowed), ", got '", v, "' in ", key, " = ", quoted_list(values));
}

const std::vector<std::string> kParallelAxes = {"tp", "cp", "ep", "dp", "pp"};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += ch;
    }
  }
  out.push_back(cur);
  return out;
}

}  // namespace

void validate(const MoEConfig& c) {
  // ---- sizes ----
  require_positive("hidden_size", c.hidden_size);
  require_positive("num_moe_experts", c.num_moe_experts);
  require_positive("moe_ffn_hidden_size", c.moe_ffn_hidden_size);
  const int64_t E = c.num_moe_experts, k = c.moe_router_topk;
  MOE_CONFIG_REQUIRE(k >= 1 && k <= E, "moe_router_topk must be in [1, num_moe_experts = ", E,
                     "], got moe_router_topk = ", k);

  // ---- router scores ----
  const std::string& sf = c.moe_router_score_function;
  require_one_of("moe_router_score_function", sf, {"softmax", "sigmoid", "sqrtsoftplus"});
  MOE_CONFIG_REQUIRE(!(k == 1 && sf == "softmax" && !c.moe_router_pre_softmax),
                     "moe_router_topk = 1 with moe_router_score_function = 'softmax' requires "
                     "moe_router_pre_softmax = true (topk=1 with softmax requires pre_softmax: a softmax over one "
                     "selected logit is always 1), got moe_router_pre_softmax = false");
  MOE_CONFIG_REQUIRE(!c.moe_router_enable_expert_bias || sf == "sigmoid" || sf == "sqrtsoftplus",
                     "moe_router_enable_expert_bias = true requires moe_router_score_function in "
                     "['sigmoid', 'sqrtsoftplus'], got moe_router_score_function = '", sf, "'");
  require_non_negative("moe_router_bias_update_rate", c.moe_router_bias_update_rate);
  if (c.moe_router_topk_scaling_factor)
    MOE_CONFIG_REQUIRE(std::isfinite(*c.moe_router_topk_scaling_factor) && *c.moe_router_topk_scaling_factor > 0.0,
                       "moe_router_topk_scaling_factor must be a finite number > 0 or null (no scaling), got "
                       "moe_router_topk_scaling_factor = ",
                       *c.moe_router_topk_scaling_factor);

  // ---- group-limited routing ----
  const auto& G = c.moe_router_num_groups;
  const auto& g = c.moe_router_group_topk;
  MOE_CONFIG_REQUIRE(G.has_value() == g.has_value(),
                     "moe_router_num_groups and moe_router_group_topk must be set together, got moe_router_num_groups = ",
                     G ? std::to_string(*G) : "null", ", moe_router_group_topk = ", g ? std::to_string(*g) : "null");
  if (G && g) {
    require_positive("moe_router_num_groups", *G);
    require_positive("moe_router_group_topk", *g);
    MOE_CONFIG_REQUIRE(E % *G == 0, "num_moe_experts = ", E, " must be divisible by moe_router_num_groups = ", *G);
    MOE_CONFIG_REQUIRE(*g <= *G, "moe_router_group_topk = ", *g, " must be <= moe_router_num_groups = ", *G);
    MOE_CONFIG_REQUIRE(k % *g == 0, "moe_router_topk = ", k, " must be divisible by moe_router_group_topk = ", *g);
    MOE_CONFIG_REQUIRE(k <= *g * (E / *G), "moe_router_topk = ", k,
                       " must be <= moe_router_group_topk * (num_moe_experts / moe_router_num_groups) = ", *g, " * (",
                       E, " / ", *G, ") = ", *g * (E / *G), " (the experts of the kept groups)");
  }

  // ---- load balancing ----
  const auto& types = c.moe_router_load_balancing_type;
  MOE_CONFIG_REQUIRE(!types.empty(), "moe_router_load_balancing_type must name at least one of ",
                     "['aux_loss', 'seq_aux_loss', 'global_aux_loss', 'none'], got an empty list");
  require_all_of("moe_router_load_balancing_type", types, {"aux_loss", "seq_aux_loss", "global_aux_loss", "none"});
  for (size_t i = 0; i < types.size(); ++i)
    for (size_t j = i + 1; j < types.size(); ++j)
      MOE_CONFIG_REQUIRE(types[i] != types[j], "moe_router_load_balancing_type lists '", types[i],
                         "' twice: ", quoted_list(types));
  const auto& coeffs = c.moe_aux_loss_coeff;
  MOE_CONFIG_REQUIRE(coeffs.size() == 1 || coeffs.size() == types.size(), "moe_aux_loss_coeff must have 1 value or ",
                     "one per moe_router_load_balancing_type (", types.size(), "), got ", coeffs.size(),
                     " values for moe_router_load_balancing_type = ", quoted_list(types));
  for (double v : coeffs)
    MOE_CONFIG_REQUIRE(v >= 0.0, "moe_aux_loss_coeff values must be >= 0, got ", v, " in moe_aux_loss_coeff = [",
                       join(coeffs), "]");
  if (c.moe_z_loss_coeff) require_non_negative("moe_z_loss_coeff", *c.moe_z_loss_coeff);
  if (c.moe_input_jitter_eps)
    MOE_CONFIG_REQUIRE(*c.moe_input_jitter_eps > 0.0 && *c.moe_input_jitter_eps < 1.0,
                       "moe_input_jitter_eps must be in (0, 1) or null, got moe_input_jitter_eps = ",
                       *c.moe_input_jitter_eps);

  // ---- capacity ----
  if (c.moe_expert_capacity_factor)
    MOE_CONFIG_REQUIRE(*c.moe_expert_capacity_factor > 0.0,
                       "moe_expert_capacity_factor must be > 0 or null (no dropping), got moe_expert_capacity_factor = ",
                       *c.moe_expert_capacity_factor);
  MOE_CONFIG_REQUIRE(!c.moe_pad_expert_input_to_capacity || c.moe_expert_capacity_factor.has_value(),
                     "moe_pad_expert_input_to_capacity = true requires moe_expert_capacity_factor, got "
                     "moe_expert_capacity_factor = null");
  require_one_of("moe_token_drop_policy", c.moe_token_drop_policy, {"probs", "position"});

  // ---- shared expert ----
  if (c.moe_shared_expert_intermediate_size)
    MOE_CONFIG_REQUIRE(*c.moe_shared_expert_intermediate_size >= 1,
                       "moe_shared_expert_intermediate_size must be >= 1 or null (no shared expert), got "
                       "moe_shared_expert_intermediate_size = ",
                       *c.moe_shared_expert_intermediate_size);
  MOE_CONFIG_REQUIRE(!c.moe_shared_expert_gate || c.has_shared_expert(),
                     "moe_shared_expert_gate = true requires moe_shared_expert_intermediate_size, got null");
  MOE_CONFIG_REQUIRE(!c.moe_shared_expert_overlap,
                     "moe_shared_expert_overlap = true is not supported: overlapping the shared expert with the "
                     "token dispatch on a side stream is not implemented (set it to false; the results are the same)");

  // ---- experts and numerics ----
  require_one_of("activation_func", c.activation_func, {"gelu", "silu", "relu2", "squared_relu"});
  require_one_of("params_dtype", c.params_dtype, {"fp32", "fp64", "bf16"});
  if (c.moe_router_dtype) require_one_of("moe_router_dtype", *c.moe_router_dtype, {"fp32", "fp64"});
  require_non_negative("init_method_std", c.init_method_std);

  // ---- parallelism ----
  require_positive("tensor_model_parallel_size", c.tensor_model_parallel_size);
  require_positive("context_parallel_size", c.context_parallel_size);
  require_positive("pipeline_model_parallel_size", c.pipeline_model_parallel_size);
  require_positive("expert_model_parallel_size", c.expert_model_parallel_size);
  if (c.expert_tensor_parallel_size) require_positive("expert_tensor_parallel_size", *c.expert_tensor_parallel_size);
  MOE_CONFIG_REQUIRE(c.moe_token_dispatcher_type != "flex",
                     "moe_token_dispatcher_type = 'flex' is not supported: the flex dispatcher (DeepEP / HybridEP) "
                     "is not implemented; use 'alltoall' or 'allgather'");
  require_one_of("moe_token_dispatcher_type", c.moe_token_dispatcher_type, {"allgather", "alltoall"});
  MOE_CONFIG_REQUIRE(c.sequence_parallel.value_or(true) || c.tensor_model_parallel_size == 1,
                     "sequence_parallel = false with tensor_model_parallel_size = ", c.tensor_model_parallel_size,
                     " is not supported: with tensor parallelism the MoE layer and the model always run "
                     "sequence-parallel (Megatron requires sequence parallelism for MoE training with TP > 1); "
                     "leave sequence_parallel unset or set it to true");
  {
    std::vector<std::string> axes = split(c.parallel_order, '-');
    std::vector<std::string> sorted = axes, expected = kParallelAxes;
    std::sort(sorted.begin(), sorted.end());
    std::sort(expected.begin(), expected.end());
    MOE_CONFIG_REQUIRE(sorted == expected, "parallel_order must be a permutation of tp, cp, ep, dp, pp joined by '-' ",
                       "(e.g. 'tp-cp-ep-dp-pp'), got parallel_order = '", c.parallel_order, "'");
  }

  // ---- memory ----
  // Megatron's TransformerConfig rules (docs/memory.md).
  require_one_of("recompute_granularity", c.recompute_granularity, {"", "selective", "full"});
  if (c.recompute_method) require_one_of("recompute_method", *c.recompute_method, {"uniform", "block"});
  if (c.recompute_num_layers) require_positive("recompute_num_layers", *c.recompute_num_layers);
  if (c.recompute_granularity == "full") {
    MOE_CONFIG_REQUIRE(c.recompute_method.has_value(),
                       "recompute_granularity = 'full' needs recompute_method = 'uniform' or 'block', got none");
    MOE_CONFIG_REQUIRE(c.recompute_num_layers.has_value(),
                       "recompute_granularity = 'full' needs recompute_num_layers (1 to the layers of a pipeline stage), "
                       "got none");
  } else {
    MOE_CONFIG_REQUIRE(!c.recompute_num_layers.has_value(), "recompute_num_layers = ", c.recompute_num_layers.value_or(0),
                       " needs recompute_granularity = 'full', got '", c.recompute_granularity, "'");
    MOE_CONFIG_REQUIRE(!c.recompute_method.has_value(), "recompute_method = '", c.recompute_method.value_or(""),
                       "' needs recompute_granularity = 'full', got '", c.recompute_granularity, "'");
  }
  require_all_of("recompute_modules", c.recompute_modules,
                 {"core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts"});
  require_all_of("offload_modules", c.offload_modules,
                 {"attn_norm", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act", "shared_experts"});
  MOE_CONFIG_REQUIRE(c.min_offloaded_tensor_size >= 0, "min_offloaded_tensor_size must be >= 0, got ",
                     c.min_offloaded_tensor_size);
  MOE_CONFIG_REQUIRE(c.offload_modules.empty() || c.fine_grained_activation_offloading,
                     "offload_modules = ", quoted_list(c.offload_modules),
                     " requires fine_grained_activation_offloading = true, got false");
}

void validate_parallel(const MoEConfig& c, int64_t world_size) {
  MOE_CONFIG_REQUIRE(world_size >= 1, "world size must be >= 1, got ", world_size);
  validate(c);
  const int64_t W = world_size, TP = c.tensor_model_parallel_size, CP = c.context_parallel_size,
                PP = c.pipeline_model_parallel_size, EP = c.expert_model_parallel_size, ETP = c.etp();
  // One process (also a layer or model built without process groups): every size must be 1.
  const char* one_note = W == 1 ? " (one process, or a layer or model built without process groups: every "
                                  "parallel size must be 1)"
                                : "";
  MOE_CONFIG_REQUIRE(W % (TP * CP * PP) == 0, "world size ", W,
                     " is not divisible by tensor_model_parallel_size·context_parallel_size·"
                     "pipeline_model_parallel_size = ",
                     TP * CP * PP, " (", TP, "·", CP, "·", PP, ")", one_note);
  MOE_CONFIG_REQUIRE(W % (ETP * EP * PP) == 0, "world size ", W,
                     " is not divisible by expert_tensor_parallel_size·expert_model_parallel_size·"
                     "pipeline_model_parallel_size = ",
                     ETP * EP * PP, " (", ETP, "·", EP, "·", PP, ")", one_note);
  MOE_CONFIG_REQUIRE(c.num_moe_experts % EP == 0, "num_moe_experts = ", c.num_moe_experts,
                     " is not divisible by expert_model_parallel_size = ", EP);
  const char* glu_note = c.gated_linear_unit ? " (with gated_linear_unit each half of fc1's outputs is split alike)" : "";
  MOE_CONFIG_REQUIRE(c.moe_ffn_hidden_size % ETP == 0, "moe_ffn_hidden_size = ", c.moe_ffn_hidden_size,
                     " is not divisible by expert_tensor_parallel_size = ", ETP, glu_note);
  if (c.has_shared_expert())
    MOE_CONFIG_REQUIRE(*c.moe_shared_expert_intermediate_size % TP == 0, "moe_shared_expert_intermediate_size = ",
                       *c.moe_shared_expert_intermediate_size,
                       " is not divisible by tensor_model_parallel_size = ", TP, glu_note);

  // Both rank generators must produce the same pipeline groups (docs/parallelism.md): the stride of pp (the
  // product of the sizes of the axes before it) must agree on the attention and expert sides.
  if (PP > 1) {
    const int64_t DP = W / (TP * CP * PP), EDP = W / (ETP * EP * PP);
    auto size_of = [&](const std::string& axis, bool expert) -> int64_t {
      if (axis == "tp") return expert ? ETP : TP;
      if (axis == "cp") return expert ? 1 : CP;
      if (axis == "ep") return expert ? EP : 1;
      if (axis == "dp") return expert ? EDP : DP;
      return PP;
    };
    int64_t dense_stride = 1, expert_stride = 1;
    for (const std::string& axis : split(c.parallel_order, '-')) {
      if (axis == "pp") break;
      dense_stride *= size_of(axis, false);
      expert_stride *= size_of(axis, true);
    }
    MOE_CONFIG_REQUIRE(dense_stride == expert_stride, "parallel_order = '", c.parallel_order,
                       "' gives different pipeline groups on the attention side (pp stride ", dense_stride,
                       ") and the expert side (pp stride ", expert_stride,
                       "); put pp where the axes before it have the same product on both sides (e.g. last)");
  }
}

bool MoEConfig::is_moe_layer(int64_t layer) const {
  const auto& f = moe_layer_freq;
  if (static_cast<int64_t>(f.size()) == num_layers && num_layers > 1) return f[static_cast<size_t>(layer)] != 0;
  if (f.size() == 1 && num_layers == 1 && (f[0] == 0 || f[0] == 1)) return f[0] != 0;
  return f.size() == 1 && f[0] >= 1 && layer % f[0] == 0;
}

MoEConfig resolve_model_config(const MoEConfig& config) {
  MoEConfig c = config;
  if (c.moe_ffn_hidden_size == 0) c.moe_ffn_hidden_size = c.dense_ffn();
  return c;
}

void validate_model(const MoEConfig& config, int64_t world_size) {
  const MoEConfig c = resolve_model_config(config);
  require_positive("num_layers", c.num_layers);
  require_positive("hidden_size", c.hidden_size);
  require_positive("num_attention_heads", c.num_attention_heads);
  require_positive("vocab_size", c.vocab_size);
  require_positive("seq_length", c.seq_length);
  const int64_t nh = c.num_attention_heads, ng = c.query_groups(), L = c.num_layers;
  require_positive("num_query_groups", ng);
  MOE_CONFIG_REQUIRE(nh % ng == 0, "num_attention_heads = ", nh, " must be divisible by num_query_groups = ", ng);
  if (!c.kv_channels)
    MOE_CONFIG_REQUIRE(c.hidden_size % nh == 0, "hidden_size = ", c.hidden_size,
                       " must be divisible by num_attention_heads = ", nh, " when kv_channels is unset");
  require_positive("kv_channels", c.head_dim());
  require_positive("ffn_hidden_size", c.dense_ffn());
  require_one_of("normalization", c.normalization, {"LayerNorm", "RMSNorm"});
  MOE_CONFIG_REQUIRE(c.layernorm_epsilon > 0.0, "layernorm_epsilon must be > 0, got layernorm_epsilon = ",
                     c.layernorm_epsilon);
  require_one_of("position_embedding_type", c.position_embedding_type, {"learned_absolute", "rope"});
  if (c.position_embedding_type == "rope") {
    MOE_CONFIG_REQUIRE(c.rotary_base > 0.0, "rotary_base must be > 0, got rotary_base = ", c.rotary_base);
    MOE_CONFIG_REQUIRE(c.rotary_percent > 0.0 && c.rotary_percent <= 1.0,
                       "rotary_percent must be in (0, 1], got rotary_percent = ", c.rotary_percent);
    const double rd = static_cast<double>(c.head_dim()) * c.rotary_percent;
    MOE_CONFIG_REQUIRE(rd == std::floor(rd) && static_cast<int64_t>(rd) % 2 == 0 && rd >= 2,
                       "kv_channels·rotary_percent must be an even number of rotary dims >= 2, got ", c.head_dim(),
                       "·", c.rotary_percent, " = ", rd);
  }
  const auto& f = c.moe_layer_freq;
  const bool pattern = static_cast<int64_t>(f.size()) == L && L > 1;
  if (pattern) {
    for (size_t i = 0; i < f.size(); ++i)
      MOE_CONFIG_REQUIRE(f[i] == 0 || f[i] == 1, "moe_layer_freq as a list takes one 0 (dense) or 1 (MoE) per layer, ",
                         "got moe_layer_freq[", i, "] = ", f[i]);
  } else {
    MOE_CONFIG_REQUIRE(f.size() == 1 && (f[0] >= 1 || (L == 1 && f[0] == 0)),
                       "moe_layer_freq must be one integer N >= 1 (layer i is MoE when i % N == 0) or a list of ",
                       "num_layers = ", L, " entries of 0/1, got ", f.size(), " value(s) starting with ",
                       f.empty() ? 0 : f[0]);
  }
  MOE_CONFIG_REQUIRE(!c.add_bias_linear, "add_bias_linear = true is not supported: linear layers have no biases ",
                     "here (set add_bias_linear = false, --disable-bias-linear in Megatron)");
  MOE_CONFIG_REQUIRE(c.hidden_dropout == 0.0, "hidden_dropout = ", c.hidden_dropout,
                     " is not supported: the model has no dropout (set hidden_dropout = 0)");
  MOE_CONFIG_REQUIRE(c.attention_dropout == 0.0, "attention_dropout = ", c.attention_dropout,
                     " is not supported: the model has no dropout (set attention_dropout = 0)");
  require_positive("num_microbatches", c.num_microbatches);
  // Pipeline stages (Megatron's TransformerConfig rules for an even or uneven split).
  const int64_t PP = c.pipeline_model_parallel_size;
  require_positive("pipeline_model_parallel_size", PP);
  const auto& first_n = c.decoder_first_pipeline_num_layers;
  const auto& last_n = c.decoder_last_pipeline_num_layers;
  if (!first_n && !last_n) {
    MOE_CONFIG_REQUIRE(L % PP == 0, "num_layers = ", L, " must be divisible by pipeline_model_parallel_size = ", PP,
                       " (each stage holds num_layers / PP layers; set decoder_first_pipeline_num_layers / "
                       "decoder_last_pipeline_num_layers for an uneven split)");
  } else {
    MOE_CONFIG_REQUIRE(PP > 1, "decoder_first_pipeline_num_layers / decoder_last_pipeline_num_layers need "
                       "pipeline_model_parallel_size > 1, got pipeline_model_parallel_size = ", PP,
                       " (leave them null)");
    int64_t middle_layers = L, middle_stages = PP;
    if (first_n) {
      MOE_CONFIG_REQUIRE(*first_n > 0, "decoder_first_pipeline_num_layers must be > 0, got ", *first_n);
      middle_layers -= *first_n;
      middle_stages -= 1;
    }
    if (last_n) {
      MOE_CONFIG_REQUIRE(*last_n > 0, "decoder_last_pipeline_num_layers must be > 0, got ", *last_n);
      middle_layers -= *last_n;
      middle_stages -= 1;
    }
    MOE_CONFIG_REQUIRE(middle_layers >= 0 && (middle_layers > 0) == (middle_stages > 0) &&
                           (middle_stages == 0 || middle_layers % middle_stages == 0),
                       "num_layers = ", L, " with decoder_first_pipeline_num_layers = ",
                       first_n ? std::to_string(*first_n) : std::string("null"),
                       " and decoder_last_pipeline_num_layers = ",
                       last_n ? std::to_string(*last_n) : std::string("null"), " leaves ", middle_layers,
                       " layers for the ", middle_stages, " other stage(s) of pipeline_model_parallel_size = ", PP,
                       ": the stages between the first and the last must hold them evenly, at least one layer ",
                       "each, and no layer may be left when there is no such stage");
  }
  validate(c);
  if (world_size <= 0) return;
  validate_parallel(c, world_size);
  const int64_t TP = c.tensor_model_parallel_size, CP = c.context_parallel_size, S = c.seq_length;
  MOE_CONFIG_REQUIRE(ng % TP == 0, "num_query_groups = ", ng, " must be divisible by tensor_model_parallel_size = ",
                     TP, " (tensor parallelism splits whole query groups)");
  MOE_CONFIG_REQUIRE(c.vocab_size % TP == 0, "vocab_size = ", c.vocab_size,
                     " must be divisible by tensor_model_parallel_size = ", TP,
                     " (the embedding and output layer are vocab-parallel; pad the vocabulary)");
  MOE_CONFIG_REQUIRE(c.dense_ffn() % TP == 0, "ffn_hidden_size = ", c.dense_ffn(),
                     " must be divisible by tensor_model_parallel_size = ", TP);
  MOE_CONFIG_REQUIRE(S % (TP * CP) == 0, "seq_length = ", S,
                     " must be divisible by tensor_model_parallel_size·context_parallel_size = ", TP * CP);
  if (CP > 1)
    MOE_CONFIG_REQUIRE(S % (2 * CP) == 0, "seq_length = ", S, " must be divisible by 2·context_parallel_size = ",
                       2 * CP, " (context parallelism splits the sequence into 2·CP load-balanced chunks)");
}

#undef MOE_CONFIG_REQUIRE

}  // namespace moe
