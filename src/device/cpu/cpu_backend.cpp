#include "device/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>

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

class CpuBackend final : public Backend {
 public:
  DeviceType type() const override { return DeviceType::cpu; }
  Device device() const override { return Device::cpu(); }
  std::string name() const override { return "cpu"; }

  void* allocate(size_t bytes, MemoryKind kind) override {
    size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    MOE_CHECK_CODE(p != nullptr, ErrorCode::out_of_memory, "cpu allocator: could not allocate ", bytes,
                   " bytes (", (kind == MemoryKind::device ? "device" : "pinned host"), " memory; current ",
                   counter(kind).current(), " bytes held)");
    counter(kind).add(static_cast<int64_t>(bytes));
    return p;
  }
  void deallocate(void* ptr, size_t bytes, MemoryKind kind) override {
    std::free(ptr);
    counter(kind).sub(static_cast<int64_t>(bytes));
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
    return s;
  }
  void reset_peak_memory() override {
    device_.reset_peak();
    pinned_.reset_peak();
  }
  const KernelTable& kernels() const override { return cpu_kernel_table(); }

 private:
  MemoryCounter& counter(MemoryKind kind) { return kind == MemoryKind::device ? device_ : pinned_; }
  CpuStream stream_;
  MemoryCounter device_, pinned_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace moe
