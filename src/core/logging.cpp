#include "moecore/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "moecore/error.h"

namespace moe {

namespace {
LogLevel parse_env_level() {
  const char* env = std::getenv("MOE_LOG_LEVEL");
  if (!env) return LogLevel::info;
  std::string s(env);
  if (s == "trace") return LogLevel::trace;
  if (s == "debug") return LogLevel::debug;
  if (s == "info") return LogLevel::info;
  if (s == "warn" || s == "warning") return LogLevel::warn;
  if (s == "error") return LogLevel::error;
  if (s == "off") return LogLevel::off;
  return LogLevel::info;
}

spdlog::level::level_enum to_spd(LogLevel l) {
  switch (l) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
    case LogLevel::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

struct State {
  std::shared_ptr<spdlog::logger> logger;
  LogLevel level;
  State() : level(parse_env_level()) {
    logger = spdlog::stderr_color_mt("moecore");
    logger->set_pattern("%v");
    logger->set_level(to_spd(level));
  }
};
State& state() {
  static State s;
  return s;
}
}  // namespace

void set_log_level(LogLevel level) {
  state().level = level;
  state().logger->set_level(to_spd(level));
}
LogLevel log_level() { return state().level; }

void log(LogLevel level, const std::string& message) {
  auto& s = state();
  if (level < s.level || level == LogLevel::off) return;
  int r = process_rank();
  std::string p = r >= 0 ? "[r" + std::to_string(r) + "] " : std::string("[r0] ");
  s.logger->log(to_spd(level), "{}{}", p, message);
}

}  // namespace moe
