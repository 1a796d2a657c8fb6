#include "device/cpu/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <vector>

#include "core/sanitize.h"
#include "device/memory_counter.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/ops.h"

namespace moe {

namespace {

class CpuStream final : public Stream {
 public:
  void synchronize() override {}
  void* native_handle() const override { return nullptr; }
};

class CpuEvent final : public Event {
 public:
  void record(Stream&) override {}
  void wait(Stream&) override {}
  void synchronize() override {}
  bool query() override { return true; }
};

constexpr size_t kAlign = 64;

int64_t limit_from_env() {
  const char* v = std::getenv("MOE_MAX_DEVICE_BYTES");
  if (!v || !*v) return 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  MOE_CHECK(end && *end == '\0' && x >= 0, "MOE_MAX_DEVICE_BYTES: expected a number of bytes >= 0 (0: no cap), got '",
            v, "'");
  return static_cast<int64_t>(x);
}

std::atomic<int64_t>& device_byte_limit() {
  static std::atomic<int64_t> limit{limit_from_env()};
  return limit;
}

// Large device blocks are cached after they are freed and handed out again for a request of the same
// size class: a training step allocates the same sizes every step, and a block fresh from the OS
// costs a page fault and the kernel's zeroing per 4 KiB page on first touch (measured: 2–5% of a
// layer's forward + backward, docs/performance.md). Smaller blocks are left to malloc's own free
// lists. The size class rounds up to a multiple of 1/8 of the request's power of two (at most 12.5%
// more), so slowly varying sizes (all-to-all row counts) still hit. The cache holds at most the
// largest number of bytes ever live at once (at least 256 MiB), evicting the oldest block first.
// The counters keep counting the requested bytes of live blocks; cached bytes are reported apart.
class BlockCache {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr int64_t kMinCapacity = int64_t{256} << 20;

  static size_t size_class(size_t bytes) {
    const size_t step = std::max<size_t>(std::bit_floor(bytes) / 8, kAlign);
    return (bytes + step - 1) / step * step;
  }
  // A cached block of this class, or nullptr.
  void* take(size_t cls) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(cls);
    if (it == free_.end() || it->second.empty()) return nullptr;
    const uint64_t seq = it->second.back();
    it->second.pop_back();
    auto b = order_.find(seq);
    void* p = b->second.ptr;
    order_.erase(b);
    cached_ -= static_cast<int64_t>(cls);
    return p;
  }
  // Keeps a freed block; evicts the oldest while over capacity (`live_max`: the most bytes ever live).
  void put(void* p, size_t cls, int64_t live_max) {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t seq = next_++;
    order_[seq] = Block{p, cls};
    free_[cls].push_back(seq);
    cached_ += static_cast<int64_t>(cls);
    const int64_t cap = std::max(kMinCapacity, live_max);
    while (cached_ > cap && !order_.empty()) {
      auto oldest = order_.begin();
      std::vector<uint64_t>& v = free_[oldest->second.cls];
      v.erase(std::find(v.begin(), v.end(), oldest->first));
      cached_ -= static_cast<int64_t>(oldest->second.cls);
      std::free(oldest->second.ptr);
      order_.erase(oldest);
    }
  }
  // Frees every cached block (before an allocation is given up as out of memory).
  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [seq, b] : order_) std::free(b.ptr);
    order_.clear();
    free_.clear();
    cached_ = 0;
  }
  int64_t cached() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }
  ~BlockCache() {
    for (auto& [seq, b] : order_) std::free(b.ptr);
  }

 private:
  struct Block {
    void* ptr;
    size_t cls;
  };
  mutable std::mutex mutex_;
  std::map<size_t, std::vector<uint64_t>> free_;  // class → sequence numbers of its free blocks
  std::map<uint64_t, Block> order_;               // sequence number (age) → block
  uint64_t next_ = 0;
  int64_t cached_ = 0;
};

class CpuBackend final : public Backend {
 public:
  DeviceType type() const override { return DeviceType::cpu; }
  Device device() const override { return Device::cpu(); }
  std::string name() const override { return "cpu"; }

  void* allocate(size_t bytes, MemoryKind kind) override {
    const int64_t limit = device_byte_limit().load(std::memory_order_relaxed);
    if (limit > 0 && kind == MemoryKind::device && device_.current() + static_cast<int64_t>(bytes) > limit)
      MOE_THROW(ErrorCode::out_of_memory, "cpu allocator: ", bytes, " bytes asked would exceed the device limit of ",
                limit, " bytes (MOE_MAX_DEVICE_BYTES; ", device_.current(), " bytes held) at ", sanitize::where_str());
    const bool cacheable = kind == MemoryKind::device && bytes >= BlockCache::kMinBytes;
    size_t rounded = cacheable ? BlockCache::size_class(bytes) : (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = cacheable ? cache_.take(rounded) : nullptr;
    if (p) {
      note_live(counter(kind), static_cast<int64_t>(bytes));
      return p;
    }
    p = std::aligned_alloc(kAlign, rounded);
    if (!p && cacheable) {
      cache_.release_all();
      p = std::aligned_alloc(kAlign, rounded);
    }
    MOE_CHECK_CODE(p != nullptr, ErrorCode::out_of_memory, "cpu allocator: could not allocate ", bytes,
                   " bytes at ", sanitize::where_str(), " (", (kind == MemoryKind::device ? "device" : "pinned host"),
                   " memory; current ", counter(kind).current(), " bytes held)");
    note_live(counter(kind), static_cast<int64_t>(bytes));
    return p;
  }
  void deallocate(void* ptr, size_t bytes, MemoryKind kind) override {
    counter(kind).sub(static_cast<int64_t>(bytes));
    if (kind == MemoryKind::device && bytes >= BlockCache::kMinBytes)
      cache_.put(ptr, BlockCache::size_class(bytes), live_max_.load());
    else
      std::free(ptr);
  }
  void copy(void* dst, const void* src, size_t bytes, CopyKind) override { std::memmove(dst, src, bytes); }
  void memset_zero(void* ptr, size_t bytes) override { std::memset(ptr, 0, bytes); }

  Stream& current_stream() override { return stream_; }
  void set_current_stream(Stream*) override {}
  std::unique_ptr<Stream> create_stream() override { return std::make_unique<CpuStream>(); }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CpuEvent>(); }
  void synchronize() override {}

  MemoryStats memory_stats() const override {
    MemoryStats s;
    s.current_bytes = device_.current();
    s.peak_bytes = device_.peak();
    s.num_allocs = device_.allocs();
    s.pinned_current_bytes = pinned_.current();
    s.pinned_peak_bytes = pinned_.peak();
    s.cached_bytes = cache_.cached();
    return s;
  }
  void reset_peak_memory() override {
    device_.reset_peak();
    pinned_.reset_peak();
  }
  const KernelTable& kernels() const override { return cpu_kernel_table(); }

 private:
  MemoryCounter& counter(MemoryKind kind) { return kind == MemoryKind::device ? device_ : pinned_; }
  // Counts a new live block and keeps the most device bytes ever live (the cache's capacity).
  void note_live(MemoryCounter& c, int64_t bytes) {
    c.add(bytes);
    if (&c != &device_) return;
    int64_t now = device_.current(), prev = live_max_.load();
    while (now > prev && !live_max_.compare_exchange_weak(prev, now)) {
    }
  }
  CpuStream stream_;
  MemoryCounter device_, pinned_;
  std::atomic<int64_t> live_max_{0};
  BlockCache cache_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

void set_cpu_device_byte_limit(int64_t bytes) {
  MOE_CHECK(bytes >= 0, "set_cpu_device_byte_limit: expected bytes >= 0 (0: no cap), got ", bytes);
  device_byte_limit().store(bytes, std::memory_order_relaxed);
}
int64_t cpu_device_byte_limit() { return device_byte_limit().load(std::memory_order_relaxed); }

}  // namespace moe
