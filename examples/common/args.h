// Command-line flags for the examples: "--name value" or "--name=value" pairs. Names use dashes;
// any libmoecore config key (Megatron's names) is accepted as a flag.
#pragma once
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moecore/config.h"
#include "moecore/error.h"

namespace moe::examples {

class Args {
 public:
  Args(int argc, char** argv, std::set<std::string> bool_flags = {}) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      MOE_CHECK(a.rfind("--", 0) == 0, "unexpected argument '", a, "': flags look like --name value");
      std::string name = a.substr(2), value;
      size_t eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      } else if (bool_flags.count(name) && (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0)) {
        value = "true";
      } else {
        MOE_CHECK(i + 1 < argc, "flag --", name, " needs a value");
        value = argv[++i];
      }
      for (char& c : name)
        if (c == '_') c = '-';
      MOE_CHECK(!values_.count(name), "flag --", name, " given twice");
      values_[name] = value;
      order_.push_back(name);
    }
  }
  bool has(const std::string& n) const { return values_.count(n) != 0; }
  std::string get(const std::string& n, const std::string& def = "") {
    used_.insert(n);
    auto it = values_.find(n);
    return it == values_.end() ? def : it->second;
  }
  std::string require(const std::string& n) {
    MOE_CHECK(has(n), "missing required flag --", n);
    return get(n);
  }
  int64_t get_int(const std::string& n, int64_t def) {
    std::string v = get(n, std::to_string(def));
    char* end = nullptr;
    long long x = std::strtoll(v.c_str(), &end, 10);
    MOE_CHECK(end && *end == 0 && !v.empty(), "flag --", n, ": expected an integer, got '", v, "'");
    return x;
  }
  double get_double(const std::string& n, double def) {
    std::string v = get(n, std::to_string(def));
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    MOE_CHECK(end && *end == 0 && !v.empty(), "flag --", n, ": expected a number, got '", v, "'");
    return x;
  }
  // Applies every not-yet-used flag that names a config key; the rest are errors.
  void apply_config_flags(MoEConfig& cfg) {
    for (const std::string& n : order_) {
      if (used_.count(n)) continue;
      std::string key = n;
      for (char& c : key)
        if (c == '-') c = '_';
      MOE_CHECK(is_config_key(key), "unknown flag --", n, " (not a trainer flag nor a config key)");
      set_config_value(cfg, key, values_[n]);
      used_.insert(n);
    }
  }

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> order_;
  std::set<std::string> used_;
};

}  // namespace moe::examples
