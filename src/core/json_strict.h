// JSON parsing that refuses what nlohmann accepts silently: a key repeated inside one object
// (nlohmann keeps the last), and nesting deeper than kMaxJsonDepth (nlohmann's copy, dump and
// comparison recurse, so a file of a million '[' would overflow the stack later). Every failure is
// a moe::Error, never a nlohmann exception (a number too large for a double is nlohmann's
// out_of_range, not a parse_error). Used by the config loader, the safetensors header reader and
// the checkpoint index.
#pragma once
#include <nlohmann/json.hpp>

#include <set>
#include <string>
#include <vector>

#include "moecore/error.h"

namespace moe {

inline constexpr int kMaxJsonDepth = 512;

// Parses `text`; a syntax error, a number out of range or nesting deeper than kMaxJsonDepth throws
// invalid_argument "<what>: not valid JSON: <reason with line and column>"; a repeated key is
// returned in *duplicate (empty when none) for the caller to report.
inline nlohmann::json parse_json_strict(const std::string& text, const std::string& what, std::string* duplicate) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> open_objects;
  duplicate->clear();
  json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    MOE_CHECK(depth <= kMaxJsonDepth, what, ": JSON nested deeper than ", kMaxJsonDepth,
              " levels of objects and arrays (refused: no libmoecore file nests that deep)");
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == json::parse_event_t::key && !open_objects.empty() && parsed.is_string()) {
      if (!open_objects.back().insert(parsed.get<std::string>()).second && duplicate->empty())
        *duplicate = parsed.get<std::string>();
    }
    return true;
  };
  try {
    return json::parse(text, cb);
  } catch (const json::exception& e) {  // parse_error, out_of_range (a number too large), ...
    std::string reason = e.what();
    size_t p = reason.find("] ");
    if (reason.rfind("[json.exception", 0) == 0 && p != std::string::npos) reason = reason.substr(p + 2);
    MOE_THROW(ErrorCode::invalid_argument, what, ": not valid JSON: ", reason);
  }
}

}  // namespace moe
