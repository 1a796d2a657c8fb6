// Fuzz targets for libmoecore's readers (docs/reliability.md, "Fuzzed readers").
//
// Each fuzz_<name>.cpp defines fuzz_target(): the reader driven by one input, a dictionary of
// tokens the mutator may insert, and a writer of seed inputs made by the library's own writers
// (the committed corpus in tests/fuzz/corpus/<name>/ came from it). fuzz_driver.cpp runs the
// target: a coverage-guided mutation loop (GCC's -fsanitize-coverage=trace-pc on the reader
// sources), under AddressSanitizer and UndefinedBehaviorSanitizer, for a bounded time.
//
// The contract a target checks: any input either reads or throws moe::Error. Any other exception
// (nlohmann, std::length_error, ...), a sanitizer report, a timeout or a broken property (e.g.
// a round trip) is a finding: the driver saves the input and exits non-zero.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace moe::fuzz {

struct Target {
  const char* name;
  // Runs the reader on one input. Returns normally when the input read or was refused with
  // moe::Error; throws or aborts on a finding.
  void (*one)(const uint8_t* data, size_t size);
  std::vector<std::string> dictionary;
  // Writes seed inputs (files) into `dir` using the library's writers.
  void (*write_seeds)(const std::string& dir);
};

Target fuzz_target();  // defined by each fuzz_<name>.cpp

// A private scratch directory (under /dev/shm when it exists), removed at exit.
const std::string& scratch_dir();
// Writes bytes to a file (replacing it); throws std::runtime_error on failure.
void write_file(const std::string& path, const void* data, size_t size);
void write_file(const std::string& path, const std::string& text);
// A finding that is not a crash: prints `what` and aborts (the driver saves the input).
[[noreturn]] void finding(const std::string& what);

}  // namespace moe::fuzz
