// Current/peak byte counters shared by every backend's allocator.
#pragma once
#include <atomic>
#include <cstdint>

namespace moe {

class MemoryCounter {
 public:
  void add(int64_t bytes) {
    int64_t now = current_.fetch_add(bytes) + bytes;
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    allocs_.fetch_add(1);
  }
  void sub(int64_t bytes) { current_.fetch_sub(bytes); }
  int64_t current() const { return current_.load(); }
  int64_t peak() const { return peak_.load(); }
  int64_t allocs() const { return allocs_.load(); }
  void reset_peak() { peak_.store(current_.load()); }

 private:
  std::atomic<int64_t> current_{0}, peak_{0}, allocs_{0};
};

}  // namespace moe
