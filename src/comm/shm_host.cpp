#include "comm/shm_host.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "comm/comm_util.h"
#include "moecore/logging.h"

namespace moe::comm {

bool shm_enabled_by_env() {
  const char* v = std::getenv("MOE_COMM_SHM");
  if (!v || !*v || std::strcmp(v, "1") == 0) return true;
  MOE_CHECK(std::strcmp(v, "0") == 0, "MOE_COMM_SHM: expected 0 (off) or 1 (on, the default), got '", v, "'");
  return false;
}

namespace {

constexpr size_t kNameBytes = 64;          // a segment's name, NUL-padded, as all-gathered
constexpr size_t kGrain = size_t{1} << 20;  // segments grow in whole MiB

// One mapping of one rank's segment; unmapped when the last tensor over it is gone.
struct Mapping {
  void* ptr = nullptr;
  size_t bytes = 0;
  Mapping(void* p, size_t n) : ptr(p), bytes(n) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (ptr) munmap(ptr, bytes);
  }
};

std::string errno_str(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

// Maps `name` (created here when `create`) with `bytes` bytes; nullptr and `why` on failure.
std::shared_ptr<Mapping> map_segment(const std::string& name, size_t bytes, bool create, std::string& why) {
  const int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  if (fd < 0) {
    why = "shm_open(" + name + ") failed: " + errno_str(errno);
    return nullptr;
  }
  auto fail = [&](const std::string& call, int e) {
    why = call + " of " + std::to_string(bytes) + " bytes for " + name + " failed: " + errno_str(e);
    close(fd);
    if (create) shm_unlink(name.c_str());  // nobody else has the name yet
    return nullptr;
  };
  if (create) {
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate", errno);
    // Reserve the pages now: a full /dev/shm must fail here, not as SIGBUS on a later write.
    if (int e = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) return fail("posix_fallocate", e);
  } else {
    struct stat sb {};
    if (fstat(fd, &sb) != 0) return fail("fstat", errno);
    if (static_cast<size_t>(sb.st_size) < bytes)
      return fail("a segment of " + std::to_string(sb.st_size) + " bytes: mapping", EINVAL);
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    if (create) shm_unlink(name.c_str());
    why = "mmap of " + std::to_string(bytes) + " bytes for " + name + " failed: " + errno_str(e);
    return nullptr;
  }
  return std::make_shared<Mapping>(p, bytes);
}

class PosixSharedHost final : public SharedHostSegments {
 public:
  explicit PosixSharedHost(Communicator& group) : group_(group) {}

  bool reserve(size_t bytes) override {
    if (failed_) return false;
    if (!maps_.empty() && bytes <= bytes_) return true;  // the same answer on every rank
    // Grow by at least a quarter, in whole MiB, so slowly rising row counts remap rarely.
    size_t want = std::max({bytes, bytes_ + bytes_ / 4, kGrain});
    want = (want + kGrain - 1) / kGrain * kGrain;
    const int n = group_.size(), me = group_.rank();
    static std::atomic<uint64_t> serial{0};
    const std::string name = "/moecore." + std::to_string(getpid()) + "." + std::to_string(serial++);
    std::string why;
    std::shared_ptr<Mapping> mine = map_segment(name, want, true, why);
    const bool created = mine != nullptr;
    // 1. Every rank made its segment? Then exchange the names and map the others'.
    bool ok = agree(created);
    std::vector<std::shared_ptr<Mapping>> maps(static_cast<size_t>(n));
    if (ok) {
      Tensor mine_name = Tensor::zeros({static_cast<int64_t>(kNameBytes)}, DType::u8);  // (64) u8
      std::memcpy(mine_name.data(), name.c_str(), std::min(name.size(), kNameBytes - 1));
      Tensor names = Tensor::empty({static_cast<int64_t>(kNameBytes) * n}, DType::u8);  // (n·64) u8
      group_.all_gather(mine_name, names);
      const char* all = static_cast<const char*>(names.data());
      bool mapped = true;
      for (int r = 0; r < n && mapped; ++r) {
        if (r == me) {
          maps[static_cast<size_t>(r)] = mine;
          continue;
        }
        const std::string peer(all + static_cast<size_t>(r) * kNameBytes,
                               strnlen(all + static_cast<size_t>(r) * kNameBytes, kNameBytes));
        maps[static_cast<size_t>(r)] = map_segment(peer, want, false, why);
        mapped = maps[static_cast<size_t>(r)] != nullptr;
      }
      // 2. Every rank mapped every segment? Only then may the names go (and they go either way).
      ok = agree(mapped);
    }
    if (created) shm_unlink(name.c_str());
    if (!ok) {
      failed_ = true;
      maps_.clear();
      bytes_ = 0;
      log_warn("shared host segments for " + group_desc(group_) + ": could not share " + std::to_string(want) +
               " bytes" + (why.empty() ? std::string(" (another rank failed)") : "; " + why) +
               "; this group moves rows by messages from now on (MOE_COMM_SHM=0 turns the segments off)");
      return false;
    }
    maps_ = std::move(maps);
    bytes_ = want;
    return true;
  }

  size_t bytes() const override { return bytes_; }

  Tensor segment(int rank, size_t offset, const Shape& shape, DType dtype) const override {
    MOE_CHECK(rank >= 0 && rank < static_cast<int>(maps_.size()), "shared host segments of ", group_desc(group_),
              ": rank ", rank, " out of range (", maps_.size(), " segments mapped)");
    const size_t n = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
    MOE_CHECK_CODE(offset <= bytes_ && n <= bytes_ - offset, ErrorCode::internal, "shared host segments of ",
                   group_desc(group_), ": bytes [", offset, ", ", offset + n, ") of rank ", rank,
                   "'s segment asked, it holds ", bytes_, " (reserve first)");
    const std::shared_ptr<Mapping>& m = maps_[static_cast<size_t>(rank)];
    return Tensor::from_external(static_cast<char*>(m->ptr) + offset, shape, dtype, Device::cpu(), m);
  }

  void fence() override {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    group_.barrier();
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }

 private:
  // True on every rank when `mine` is true on every rank.
  bool agree(bool mine) {
    Tensor v = Tensor::from_vector(std::vector<int64_t>{mine ? 1 : 0}, {1});  // (1) i64
    group_.all_reduce(v, ReduceOp::min);
    return v.to_vector<int64_t>()[0] == 1;
  }

  Communicator& group_;
  std::vector<std::shared_ptr<Mapping>> maps_;  // (size) one per rank, in group-rank order
  size_t bytes_ = 0;
  bool failed_ = false;
};

}  // namespace

std::unique_ptr<SharedHostSegments> make_posix_shared_host(Communicator& group) {
  return std::make_unique<PosixSharedHost>(group);
}

}  // namespace moe::comm
