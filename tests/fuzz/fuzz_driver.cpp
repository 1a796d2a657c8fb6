// The fuzz driver: a coverage-guided mutation loop over a target's corpus (tests/fuzz/fuzz.h).
//
//   fuzz_<name> [-max_total_time=S] [-runs=N] [-seed=N] [-timeout=S] [-max_len=N]
//               [-artifact_prefix=P] CORPUS_DIR...      fuzz for S seconds (or N inputs)
//   fuzz_<name> FILE...                                  run each file once (reproduce a finding)
//   fuzz_<name> -make_seeds=DIR                          write seed inputs with the library's writers
//
// The flags and the output follow libFuzzer's where they overlap. Coverage: the reader sources and
// the target are compiled with GCC's -fsanitize-coverage=trace-pc, which calls
// __sanitizer_cov_trace_pc() (defined here, not instrumented) at every basic block; an input
// whose edge hit counts (AFL's buckets) reach a new cell of the map joins the corpus. A finding (a
// sanitizer report, an exception other than moe::Error, a timeout, a broken property) saves the
// input as P<kind>-<name>-<hash> and exits non-zero.
#include <sanitizer/common_interface_defs.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <exception>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "fuzz/fuzz.h"
#include "moecore/error.h"

namespace {

constexpr size_t kMapSize = size_t(1) << 16;
uint8_t g_hits[kMapSize];       // this input's edge hit counts
uint8_t g_seen[kMapSize];       // OR of the buckets every kept input reached
uintptr_t g_prev_pc = 0;

}  // namespace

// Called by GCC at every basic block of the instrumented sources: one edge (prev → this block).
extern "C" void __sanitizer_cov_trace_pc() {
  const uintptr_t pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  const uint64_t h = (static_cast<uint64_t>(pc) * 0x9E3779B97F4A7C15ull) >> 48;  // 16 bits
  g_hits[(h ^ g_prev_pc) & (kMapSize - 1)]++;
  g_prev_pc = h >> 1;
}

namespace {

moe::fuzz::Target g_target;
std::vector<uint8_t> g_input;        // the input being run (saved on a finding)
std::string g_artifact_prefix = "./";
char g_timeout_path[4096];           // where the SIGALRM handler saves the input

uint8_t bucket(uint8_t n) {
  if (n <= 3) return n == 0 ? 0 : uint8_t(1u << (n - 1));  // 1, 2, 3 -> 1, 2, 4
  if (n <= 7) return 8;
  if (n <= 15) return 16;
  if (n <= 31) return 32;
  if (n <= 127) return 64;
  return 128;
}

// Folds this input's hits into g_seen; true when it reached something new.
bool new_coverage() {
  bool fresh = false;
  for (size_t i = 0; i < kMapSize; ++i) {
    if (!g_hits[i]) continue;
    const uint8_t b = bucket(g_hits[i]);
    if ((g_seen[i] | b) != g_seen[i]) {
      g_seen[i] |= b;
      fresh = true;
    }
  }
  return fresh;
}

size_t edges() {
  size_t n = 0;
  for (uint8_t s : g_seen) n += s != 0;
  return n;
}

std::string hex_hash(const std::vector<uint8_t>& v) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (uint8_t b : v) h = (h ^ b) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string artifact_path(const char* kind) {
  return g_artifact_prefix + kind + "-" + g_target.name + "-" + hex_hash(g_input);
}

bool g_saved = false;  // the death callback and the SIGABRT handler both run on a sanitizer report

void save_input(const std::string& path) {
  if (g_saved) return;
  g_saved = true;
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(g_input.data()), static_cast<std::streamsize>(g_input.size()));
  f.close();
  if (!f.good()) {
    std::fprintf(stderr, "==fuzz== %s: cannot save the %zu-byte input to %s (does the -artifact_prefix "
                 "directory exist?)\n", g_target.name, g_input.size(), path.c_str());
    return;
  }
  std::fprintf(stderr, "==fuzz== %s: %zu-byte input saved to %s\n  reproduce: %s %s\n", g_target.name,
               g_input.size(), path.c_str(), "<this binary>", path.c_str());
}

// A sanitizer report ends the process through here.
void on_death() { save_input(artifact_path("crash")); }

void on_abort(int) {
  signal(SIGABRT, SIG_DFL);
  save_input(artifact_path("crash"));
  raise(SIGABRT);
}

void on_alarm(int) {
  // Only async-signal-safe calls: save the input, exit.
  static const char msg[] = "==fuzz== timeout: the input ran too long; saved to ";
  (void)!write(2, msg, sizeof msg - 1);
  (void)!write(2, g_timeout_path, strlen(g_timeout_path));
  (void)!write(2, "\n", 1);
  int fd = ::open(g_timeout_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    (void)!write(fd, g_input.data(), g_input.size());
    ::close(fd);
  }
  _exit(70);
}

// Runs the target on g_input; a non-moe exception is a finding.
void run_one(unsigned timeout_s) {
  std::memset(g_hits, 0, sizeof g_hits);
  g_prev_pc = 0;
  std::snprintf(g_timeout_path, sizeof g_timeout_path, "%s", artifact_path("timeout").c_str());
  alarm(timeout_s);
  try {
    g_target.one(g_input.data(), g_input.size());
  } catch (const std::exception& e) {
    alarm(0);
    std::fprintf(stderr, "==fuzz== %s: the reader threw %s instead of moe::Error: %s\n", g_target.name,
                 typeid(e).name(), e.what());
    save_input(artifact_path("exception"));
    std::exit(1);
  } catch (...) {
    alarm(0);
    std::fprintf(stderr, "==fuzz== %s: the reader threw a non-std exception\n", g_target.name);
    save_input(artifact_path("exception"));
    std::exit(1);
  }
  alarm(0);
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// ---- mutations ------------------------------------------------------------------------------------

const char* const kNumbers[] = {"0", "1", "-1", "2", "3", "7", "8", "16", "255", "256", "65535", "65536",
                                "2147483647", "2147483648", "-2147483649", "4294967295", "4294967296",
                                "9223372036854775807", "9223372036854775808", "-9223372036854775808",
                                "18446744073709551615", "18446744073709551616", "99999999999999999999999",
                                "1e308", "1e400", "-0", "0.5", "1e-400", "nan", "NaN", "inf", "1.0"};
const uint64_t kIntegers[] = {0,          1,           2,           7,           8,          0x7f,
                              0x80,       0xff,        0x100,       0x7fff,      0x8000,     0xffff,
                              0x10000,    0x7fffffff,  0x80000000u, 0xffffffffu, 1ull << 32, 1ull << 40,
                              ~0ull >> 1, 1ull << 63,  ~0ull,       ~0ull - 7,   12,         34};

struct Mutator {
  std::mt19937_64 rng;
  size_t max_len;
  const std::vector<std::vector<uint8_t>>* corpus;

  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng() % n); }

  void insert(std::vector<uint8_t>& v, size_t at, const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    v.insert(v.begin() + static_cast<std::ptrdiff_t>(at), b, b + n);
  }
  void overwrite(std::vector<uint8_t>& v, size_t at, const void* p, size_t n) {
    if (at + n > v.size()) v.resize(at + n);
    std::memcpy(v.data() + at, p, n);
  }

  void once(std::vector<uint8_t>& v) {
    const size_t n = v.size();
    switch (below(12)) {
      case 0:  // flip a bit
        if (n) v[below(n)] ^= uint8_t(1u << below(8));
        break;
      case 1:  // a random byte
        if (n) v[below(n)] = static_cast<uint8_t>(rng());
        break;
      case 2: {  // add a small delta to a byte
        if (n) v[below(n)] += static_cast<uint8_t>(below(33)) - 16;
        break;
      }
      case 3: {  // insert random bytes
        uint8_t b[8];
        const size_t k = 1 + below(8);
        for (size_t i = 0; i < k; ++i) b[i] = static_cast<uint8_t>(rng());
        insert(v, below(n + 1), b, k);
        break;
      }
      case 4: {  // erase a range
        if (!n) break;
        const size_t at = below(n), k = 1 + below(std::min<size_t>(n - at, 32));
        v.erase(v.begin() + static_cast<std::ptrdiff_t>(at), v.begin() + static_cast<std::ptrdiff_t>(at + k));
        break;
      }
      case 5: {  // copy a range elsewhere (insert or overwrite)
        if (!n) break;
        const size_t at = below(n), k = 1 + below(std::min<size_t>(n - at, 64));
        std::vector<uint8_t> piece(v.begin() + static_cast<std::ptrdiff_t>(at),
                                   v.begin() + static_cast<std::ptrdiff_t>(at + k));
        if (rng() & 1)
          insert(v, below(n + 1), piece.data(), k);
        else
          overwrite(v, below(n), piece.data(), k);
        break;
      }
      case 6: {  // an interesting little-endian integer of 1, 2, 4 or 8 bytes
        uint64_t x = kIntegers[below(std::size(kIntegers))];
        if (rng() & 1) x = ~x + 1;
        const size_t k = size_t(1) << below(4);
        overwrite(v, below(n + 1), &x, k);
        break;
      }
      case 7:
      case 8: {  // a dictionary token
        if (g_target.dictionary.empty()) break;
        const std::string& t = g_target.dictionary[below(g_target.dictionary.size())];
        if (rng() & 1)
          insert(v, below(n + 1), t.data(), t.size());
        else
          overwrite(v, below(n + 1), t.data(), t.size());
        break;
      }
      case 9:
      case 10: {  // replace a number written as text by an interesting one
        if (!n) break;
        size_t at = below(n);
        size_t tries = 0;
        while (tries++ < n && !(v[at] >= '0' && v[at] <= '9')) at = (at + 1) % n;
        if (!(v[at] >= '0' && v[at] <= '9')) break;
        size_t b = at, e = at;
        while (b > 0 && ((v[b - 1] >= '0' && v[b - 1] <= '9') || v[b - 1] == '-' || v[b - 1] == '.')) --b;
        while (e < n && ((v[e] >= '0' && v[e] <= '9') || v[e] == '.' || v[e] == 'e')) ++e;
        const std::string num = rng() % 4 == 0 ? std::to_string(static_cast<int64_t>(rng() % 4096) - 64)
                                               : std::string(kNumbers[below(std::size(kNumbers))]);
        v.erase(v.begin() + static_cast<std::ptrdiff_t>(b), v.begin() + static_cast<std::ptrdiff_t>(e));
        insert(v, b, num.data(), num.size());
        break;
      }
      case 11: {  // splice: a prefix of this input and a suffix of another
        if (corpus->empty()) break;
        const std::vector<uint8_t>& o = (*corpus)[below(corpus->size())];
        const size_t cut = below(n + 1), from = below(o.size() + 1);
        v.resize(cut);
        v.insert(v.end(), o.begin() + static_cast<std::ptrdiff_t>(from), o.end());
        break;
      }
    }
    if (v.size() > max_len) v.resize(max_len);
  }
};

long long flag_value(const std::string& arg, const char* name, bool* matched) {
  const std::string prefix = std::string("-") + name + "=";
  if (arg.rfind(prefix, 0) != 0) return 0;
  *matched = true;
  return std::stoll(arg.substr(prefix.size()));
}

int usage(const char* argv0, const std::string& why) {
  std::fprintf(stderr,
               "%s: %s\nusage: %s [-max_total_time=S] [-runs=N] [-seed=N] [-timeout=S] [-max_len=N] "
               "[-artifact_prefix=P] CORPUS_DIR...\n       %s FILE...\n       %s -make_seeds=DIR\n",
               argv0, why.c_str(), argv0, argv0, argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  g_target = moe::fuzz::fuzz_target();
  long long max_time = 0, runs = -1, seed = -1, timeout = 10, max_len = 0;
  std::vector<std::string> dirs, files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    bool m = false;
    if (a.rfind("-make_seeds=", 0) == 0) {
      const std::string dir = a.substr(std::strlen("-make_seeds="));
      std::filesystem::create_directories(dir);
      g_target.write_seeds(dir);
      std::printf("%s: seeds written to %s\n", g_target.name, dir.c_str());
      return 0;
    }
    if (a.rfind("-artifact_prefix=", 0) == 0) {
      g_artifact_prefix = a.substr(std::strlen("-artifact_prefix="));
      continue;
    }
    try {
      long long v;
      if ((v = flag_value(a, "max_total_time", &m)), m) { max_time = v; continue; }
      if ((v = flag_value(a, "runs", &m)), m) { runs = v; continue; }
      if ((v = flag_value(a, "seed", &m)), m) { seed = v; continue; }
      if ((v = flag_value(a, "timeout", &m)), m) { timeout = v; continue; }
      if ((v = flag_value(a, "max_len", &m)), m) { max_len = v; continue; }
    } catch (const std::exception&) {
      return usage(argv[0], "flag '" + a + "' needs an integer value");
    }
    if (!a.empty() && a[0] == '-') return usage(argv[0], "unknown flag '" + a + "'");
    struct stat st {};
    if (::stat(a.c_str(), &st) != 0) return usage(argv[0], "'" + a + "' does not exist");
    (S_ISDIR(st.st_mode) ? dirs : files).push_back(a);
  }
  if (timeout <= 0 || max_time < 0) return usage(argv[0], "-timeout must be > 0 and -max_total_time >= 0");

  __sanitizer_set_death_callback(on_death);
  signal(SIGABRT, on_abort);
  signal(SIGALRM, on_alarm);

  // Reproduce: each file once.
  if (!files.empty()) {
    if (!dirs.empty()) return usage(argv[0], "give corpus directories or files, not both");
    for (const std::string& f : files) {
      g_input = read_file(f);
      std::printf("%s: running %s (%zu bytes)\n", g_target.name, f.c_str(), g_input.size());
      std::fflush(stdout);
      run_one(static_cast<unsigned>(timeout));
    }
    std::printf("%s: %zu inputs ran without a finding\n", g_target.name, files.size());
    return 0;
  }
  if (dirs.empty()) return usage(argv[0], "no corpus directory");

  std::vector<std::vector<uint8_t>> corpus;
  size_t largest = 0;
  for (const std::string& d : dirs) {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(d))
      if (e.is_regular_file()) names.push_back(e.path().string());
    std::sort(names.begin(), names.end());
    for (const std::string& f : names) {
      corpus.push_back(read_file(f));
      largest = std::max(largest, corpus.back().size());
    }
  }
  if (corpus.empty()) corpus.push_back({});
  const size_t seeds = corpus.size();
  Mutator mut;
  const uint64_t rng_seed = seed >= 0 ? static_cast<uint64_t>(seed)
                                      : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  mut.rng.seed(rng_seed);
  mut.max_len = max_len > 0 ? static_cast<size_t>(max_len) : std::max<size_t>(4096, 2 * largest);
  mut.corpus = &corpus;
  std::printf("%s: seed %llu, %zu seed inputs (largest %zu bytes), max_len %zu, max_total_time %lld s\n",
              g_target.name, static_cast<unsigned long long>(rng_seed), seeds, largest, mut.max_len, max_time);

  // The seeds themselves first.
  for (const auto& s : corpus) {
    g_input = s;
    run_one(static_cast<unsigned>(timeout));
    new_coverage();
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  long long execs = 0;
  double next_report = 5;
  while ((runs < 0 || execs < runs) && (max_time == 0 ? runs >= 0 : elapsed() < double(max_time))) {
    g_input = corpus[mut.below(corpus.size())];
    const size_t k = 1 + mut.below(4);
    for (size_t i = 0; i < k; ++i) mut.once(g_input);
    run_one(static_cast<unsigned>(timeout));
    ++execs;
    if (new_coverage() && corpus.size() < 8192) corpus.push_back(g_input);
    if (elapsed() >= next_report) {
      std::printf("#%lld\tcov: %zu edges\tcorpus: %zu\texec/s: %.0f\n", execs, edges(), corpus.size(),
                  double(execs) / elapsed());
      std::fflush(stdout);
      next_report += 5;
    }
  }
  const double t = elapsed();
  std::printf("%s: %lld inputs in %.1f s (%.0f/s), corpus %zu (%zu seeds), %zu edges, no finding\n", g_target.name,
              execs, t, t > 0 ? double(execs) / t : 0.0, corpus.size(), seeds, edges());
  return 0;
}

// ---- helpers shared by the targets ----------------------------------------------------------------

namespace moe::fuzz {

const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::string tmpl = base + "/moe_fuzz_XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("fuzz: cannot create a scratch directory in " + base);
    static const std::string keep = tmpl;
    std::atexit([] { std::error_code ec; std::filesystem::remove_all(keep, ec); });
    return tmpl;
  }();
  return dir;
}

void write_file(const std::string& path, const void* data, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f.good()) throw std::runtime_error("fuzz: cannot write " + path);
}

void write_file(const std::string& path, const std::string& text) { write_file(path, text.data(), text.size()); }

void finding(const std::string& what) {
  std::fprintf(stderr, "==fuzz== %s: %s\n", g_target.name, what.c_str());
  std::abort();
}

}  // namespace moe::fuzz
