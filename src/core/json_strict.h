// JSON parsing that refuses what nlohmann accepts silently: a key repeated inside one object
// (nlohmann keeps the last). Used by the config loader and the safetensors header reader.
#pragma once
#include <nlohmann/json.hpp>

#include <set>
#include <string>
#include <vector>

#include "moecore/error.h"

namespace moe {

// Parses `text`; a syntax error throws invalid_argument "<what>: not valid JSON: <reason with line
// and column>"; a repeated key is returned in *duplicate (empty when none) for the caller to report.
inline nlohmann::json parse_json_strict(const std::string& text, const std::string& what, std::string* duplicate) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> open_objects;
  duplicate->clear();
  json::parser_callback_t cb = [&](int, json::parse_event_t event, json& parsed) {
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
  } catch (const json::parse_error& e) {
    std::string reason = e.what();
    size_t p = reason.find("] ");
    if (reason.rfind("[json.exception", 0) == 0 && p != std::string::npos) reason = reason.substr(p + 2);
    MOE_THROW(ErrorCode::invalid_argument, what, ": not valid JSON: ", reason);
  }
}

}  // namespace moe
