// libmoecore — errors.
// One error type for the whole library. A message says what failed, where (file:line and the
// calling op), what was expected and what was got, and which rank raised it.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

enum class ErrorCode {
  invalid_argument,  // bad shapes, dtypes, config values, malformed files
  not_supported,     // a valid request this build or backend cannot do
  out_of_memory,     // an allocator refused
  backend,           // a CUDA / cuBLAS / BLAS call failed
  communication,     // MPI / NCCL failures and timeouts
  io,                // file system errors
  internal,          // a broken invariant: a bug in libmoecore
  non_finite,        // a NaN or Inf where a finite number was required (MOE_SANITIZE, the trainer's checks)
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }
  // The message without the "[r<rank>] <code>:" prefix.
  const std::string& detail() const noexcept { return detail_; }

 private:
  ErrorCode code_;
  std::string detail_;
};

// The rank stamped on every error and log line of this process (-1: not distributed).
void set_process_rank(int rank);
int process_rank();

namespace detail {
inline void append(std::ostringstream&) {}
template <class T, class... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  append(os, args...);
  return os.str();
}
[[noreturn]] void throw_error(ErrorCode code, const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace moe

// MOE_CHECK(cond, "what", ...): throws moe::Error(invalid_argument) with the location when cond is
// false. The remaining arguments are streamed into the message: say expected vs got.
#define MOE_CHECK(cond, ...)                                                                       \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::moe::detail::throw_error(::moe::ErrorCode::invalid_argument, __FILE__, __LINE__,           \
                                 ::moe::detail::concat(__VA_ARGS__));                              \
  } while (0)

// MOE_CHECK_CODE(cond, code, ...): the same with an explicit error code.
#define MOE_CHECK_CODE(cond, code, ...)                                                            \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::moe::detail::throw_error(code, __FILE__, __LINE__, ::moe::detail::concat(__VA_ARGS__));    \
  } while (0)

#define MOE_THROW(code, ...)                                                                       \
  ::moe::detail::throw_error(code, __FILE__, __LINE__, ::moe::detail::concat(__VA_ARGS__))
