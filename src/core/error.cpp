#include "moecore/error.h"

#include <atomic>
#include <cstring>

namespace moe {

namespace {
std::atomic<int> g_rank{-1};

std::string prefix(ErrorCode code) {
  int r = g_rank.load();
  std::string p = r >= 0 ? "[r" + std::to_string(r) + "] " : std::string();
  return p + "moecore " + error_code_name(code) + ": ";
}
}  // namespace

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid argument";
    case ErrorCode::not_supported: return "not supported";
    case ErrorCode::out_of_memory: return "out of memory";
    case ErrorCode::backend: return "backend error";
    case ErrorCode::communication: return "communication error";
    case ErrorCode::io: return "I/O error";
    case ErrorCode::internal: return "internal error";
    case ErrorCode::non_finite: return "non-finite value";
  }
  return "error";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(prefix(code) + message), code_(code), detail_(message) {}

void set_process_rank(int rank) { g_rank.store(rank); }
int process_rank() { return g_rank.load(); }

namespace detail {
[[noreturn]] void throw_error(ErrorCode code, const char* file, int line, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  throw Error(code, msg + " (at " + base + ":" + std::to_string(line) + ")");
}
}  // namespace detail

}  // namespace moe
