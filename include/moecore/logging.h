// libmoecore — logging. Lines carry a "[r<rank>]" prefix; the level comes from MOE_LOG_LEVEL
// (trace, debug, info, warn, error, off; default info). spdlog stays behind this header.
#pragma once
#include <string>

namespace moe {

enum class LogLevel { trace, debug, info, warn, error, off };

void set_log_level(LogLevel level);
LogLevel log_level();
void log(LogLevel level, const std::string& message);
inline void log_info(const std::string& m) { log(LogLevel::info, m); }
inline void log_warn(const std::string& m) { log(LogLevel::warn, m); }
inline void log_debug(const std::string& m) { log(LogLevel::debug, m); }

}  // namespace moe
