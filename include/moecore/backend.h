// libmoecore — the device abstraction.
// One Backend object per device: memory (with current/peak counters), copies, streams and events,
// and a kernel table with one entry per op. No vendor type appears here; the CPU backend always
// exists, the CUDA one when the library was built with it and a GPU is present at run time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/tensor.h"

namespace moe {

struct KernelTable;  // kernels/ops.h (internal)

// An ordered queue of work. On the CPU every op runs inline, so a stream is always complete.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual void synchronize() = 0;
  virtual void* native_handle() const = 0;  // cudaStream_t on CUDA, nullptr on CPU
};

class Event {
 public:
  virtual ~Event() = default;
  virtual void record(Stream& stream) = 0;
  virtual void wait(Stream& stream) = 0;  // make `stream` wait for this event
  virtual void synchronize() = 0;
  virtual bool query() = 0;  // true when complete
};

struct MemoryStats {
  int64_t current_bytes = 0;  // device memory held by live tensors
  int64_t peak_bytes = 0;
  int64_t num_allocs = 0;
  int64_t pinned_current_bytes = 0;  // page-locked host memory (offload target)
  int64_t pinned_peak_bytes = 0;
  int64_t cached_bytes = 0;  // held by a caching allocator but free
};

enum class CopyKind : uint8_t { host_to_device, device_to_host, device_to_device, host_to_host };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceType type() const = 0;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "cpu", "cuda:0 NVIDIA H100 80GB HBM3"

  virtual void* allocate(size_t bytes, MemoryKind kind) = 0;  // throws out_of_memory
  virtual void deallocate(void* ptr, size_t bytes, MemoryKind kind) = 0;
  // On the current stream. device_to_host and host_to_host return once dst holds the data (the
  // host may read it); host_to_device and device_to_device may still be running when they return.
  virtual void copy(void* dst, const void* src, size_t bytes, CopyKind kind) = 0;
  // Device → pinned host on the current stream, without waiting: it may still be running when it
  // returns. The caller records an event after it, reads dst only after that event and keeps src
  // alive until then (the offload manager does both). Default: the synchronous copy (the CPU).
  virtual void copy_to_pinned_async(void* dst, const void* src, size_t bytes) {
    copy(dst, src, bytes, CopyKind::device_to_host);
  }
  virtual void memset_zero(void* ptr, size_t bytes) = 0;                          // on the current stream

  virtual Stream& current_stream() = 0;
  virtual void set_current_stream(Stream* stream) = 0;  // nullptr: the default stream
  virtual std::unique_ptr<Stream> create_stream() = 0;
  virtual std::unique_ptr<Event> create_event() = 0;
  virtual void synchronize() = 0;  // the whole device

  virtual MemoryStats memory_stats() const = 0;
  virtual void reset_peak_memory() = 0;
  virtual const KernelTable& kernels() const = 0;
};

// The registry (src/device/registry.cpp): the one place that knows which backends exist.
bool backend_available(DeviceType type);
Backend& get_backend(Device device);  // throws not_supported naming what this build has
std::vector<Device> available_devices();
// MOE_DEVICE=cpu|cuda overrides; otherwise CUDA when available, else CPU.
Device default_device();
std::string build_info();  // backends compiled in, BLAS engine, MPI/NCCL

// Sets the threads used by CPU kernels and the BLAS (0 = leave as is). Tests run one per rank.
void set_num_threads(int n);
int num_threads();

// RAII: makes `stream` the backend's current stream for the scope.
class StreamGuard {
 public:
  StreamGuard(Backend& backend, Stream& stream) : backend_(backend), prev_(&backend.current_stream()) {
    backend_.set_current_stream(&stream);
  }
  ~StreamGuard() { backend_.set_current_stream(prev_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  Backend& backend_;
  Stream* prev_;
};

}  // namespace moe
