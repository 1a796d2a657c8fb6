// The CUDA backend: one object per GPU. Device selection (a device guard around every call),
// streams and events, a caching device allocator with current/peak/cached counters, pinned host
// memory, copies on the current stream, and lazily created cuBLAS / cuBLASLt handles.
//
// Threading model: like the rest of libmoecore, one host thread drives a device. The current stream
// belongs to the backend object (not to the calling thread); the allocator and the handle creation
// are nevertheless mutex-protected so that concurrent frees (e.g. from a prefetch thread) are safe.
#include "device/cuda/cuda_backend.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "device/memory_counter.h"
#include "kernels/cuda/check.cuh"
#include "kernels/ops.h"
#include "moecore/logging.h"

namespace moe {

namespace {

using cuda::DeviceGuard;

// A device guard for destructors: never throws, ignores failures (the runtime may already be shut
// down at process exit).
class QuietDeviceGuard {
 public:
  explicit QuietDeviceGuard(int device) : device_(device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      (void)cudaGetLastError();
      prev_ = device_;
    }
    if (prev_ != device_ && cudaSetDevice(device_) != cudaSuccess) (void)cudaGetLastError();
  }
  ~QuietDeviceGuard() {
    if (prev_ != device_ && cudaSetDevice(prev_) != cudaSuccess) (void)cudaGetLastError();
  }
  QuietDeviceGuard(const QuietDeviceGuard&) = delete;
  QuietDeviceGuard& operator=(const QuietDeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Streams and events.
class CudaStream final : public Stream {
 public:
  // owned: created here (non-blocking: ordering against other streams is by events only);
  // otherwise a view of the legacy default stream (handle nullptr).
  CudaStream(int device, cudaStream_t stream, bool owned) : device_(device), stream_(stream), owned_(owned) {}
  ~CudaStream() override {
    if (!owned_) return;
    QuietDeviceGuard g(device_);
    if (cudaStreamDestroy(stream_) != cudaSuccess) (void)cudaGetLastError();
  }
  void synchronize() override {
    DeviceGuard g(device_);
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void* native_handle() const override { return stream_; }
  int device() const { return device_; }
  cudaStream_t get() const { return stream_; }

 private:
  int device_;
  cudaStream_t stream_;
  bool owned_;
};

// The cudaStream_t of a Stream that must belong to `device`.
cudaStream_t stream_for(Stream& s, int device, const char* op) {
  auto* cs = dynamic_cast<CudaStream*>(&s);
  MOE_CHECK(cs != nullptr, op, ": expected a stream of cuda:", device, ", got a stream of another backend");
  MOE_CHECK(cs->device() == device, op, ": expected a stream of cuda:", device, ", got one of cuda:", cs->device());
  return cs->get();
}

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(int device) : device_(device) {
    DeviceGuard g(device_);
    MOE_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
  }
  ~CudaEvent() override {
    QuietDeviceGuard g(device_);
    if (cudaEventDestroy(event_) != cudaSuccess) (void)cudaGetLastError();
  }
  void record(Stream& stream) override {
    DeviceGuard g(device_);
    MOE_CUDA_CHECK(cudaEventRecord(event_, stream_for(stream, device_, "Event::record")));
  }
  void wait(Stream& stream) override {
    DeviceGuard g(device_);
    MOE_CUDA_CHECK(cudaStreamWaitEvent(stream_for(stream, device_, "Event::wait"), event_, 0));
  }
  void synchronize() override {
    DeviceGuard g(device_);
    MOE_CUDA_CHECK(cudaEventSynchronize(event_));
  }
  bool query() override {
    DeviceGuard g(device_);
    cudaError_t err = cudaEventQuery(event_);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();  // "not ready" is an answer, not an error
      return false;
    }
    MOE_CUDA_CHECK(err);
    return true;
  }

 private:
  int device_;
  cudaEvent_t event_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Caching device allocator. Requests are rounded up to a bucket size; freed blocks go to a free
// list keyed by (stream at allocation, bucket size) and are reused only by an allocation of the same
// bucket on the same stream, so reuse is ordered by the stream (work still reading a block on that
// stream finishes before work enqueued later). A tensor used on another stream must be synchronised
// with an event before it is freed (as with PyTorch's allocator without record_stream).
// Counters: current/peak = bytes requested by live allocations; cached = bucket bytes of free
// blocks. On cudaMalloc failure the cache is released and the call retried once.
class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}
  ~CachingAllocator() {
    QuietDeviceGuard g(device_);
    std::lock_guard<std::mutex> lock(mu_);
    release_cache_quiet();
  }

  // Bucket sizes: multiples of 512 B up to 1 MiB; above, multiples of max(1 MiB, 2^floor(log2 n)/8)
  // (at most 12.5% slack beyond 8 MiB, and a bounded number of distinct buckets).
  static size_t bucket(size_t bytes) {
    constexpr size_t kSmallStep = 512, kLargeFrom = size_t{1} << 20;
    if (bytes <= kLargeFrom) return (bytes + kSmallStep - 1) / kSmallStep * kSmallStep;
    size_t step = std::max(kLargeFrom, std::bit_floor(bytes) / 8);
    return (bytes + step - 1) / step * step;
  }

  void* allocate(size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return nullptr;
    MOE_CHECK_CODE(bytes <= (size_t{1} << 62), ErrorCode::out_of_memory, "cuda:", device_,
                   " allocator: cannot allocate ", bytes, " bytes (more than any device holds)");
    const size_t size = bucket(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(Key{reinterpret_cast<uintptr_t>(stream), size});
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= static_cast<int64_t>(size);
      live_[p] = Block{size, bytes, stream};
      counter_.add(static_cast<int64_t>(bytes));
      return p;
    }
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, size);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      release_cache();
      err = cudaMalloc(&p, size);
    }
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
      MOE_THROW(ErrorCode::out_of_memory, "cuda:", device_, " allocator: cudaMalloc(", size,
                " bytes) failed (cudaErrorMemoryAllocation) for a request of ", bytes, " bytes; this allocator holds ",
                reserved_, " bytes (", counter_.current(), " bytes requested by live tensors; the cache was emptied"
                " and the call retried); the device reports ", free_b, " of ", total_b, " bytes free");
    }
    if (err != cudaSuccess) cuda::throw_cuda_error(err, "cudaMalloc", __FILE__, __LINE__);
    reserved_ += static_cast<int64_t>(size);
    live_[p] = Block{size, bytes, stream};
    counter_.add(static_cast<int64_t>(bytes));
    return p;
  }

  void deallocate(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) {
      // Called from destructors: report instead of throwing (a throw would terminate).
      log(LogLevel::error, "cuda:" + std::to_string(device_) +
                               " allocator: deallocate of a pointer it did not allocate (ignored; this is a bug)");
      return;
    }
    Block b = it->second;
    live_.erase(it);
    counter_.sub(static_cast<int64_t>(b.requested));
    free_[Key{reinterpret_cast<uintptr_t>(b.stream), b.size}].push_back(p);
    cached_ += static_cast<int64_t>(b.size);
  }

  void release_cache() {  // caller holds mu_
    for (auto& [key, ptrs] : free_) {
      for (void* p : ptrs) {
        MOE_CUDA_CHECK(cudaFree(p));
        reserved_ -= static_cast<int64_t>(key.size);
        cached_ -= static_cast<int64_t>(key.size);
      }
    }
    free_.clear();
  }

  int64_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }
  const MemoryCounter& counter() const { return counter_; }
  MemoryCounter& counter() { return counter_; }

 private:
  struct Block {
    size_t size;       // bucket bytes
    size_t requested;  // bytes asked for
    cudaStream_t stream;
  };
  struct Key {
    uintptr_t stream;
    size_t size;
    bool operator<(const Key& o) const { return stream != o.stream ? stream < o.stream : size < o.size; }
  };

  void release_cache_quiet() {
    for (auto& [key, ptrs] : free_)
      for (void* p : ptrs)
        if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
    free_.clear();
    cached_ = 0;
  }

  int device_;
  mutable std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  std::map<Key, std::vector<void*>> free_;
  int64_t cached_ = 0;    // bucket bytes in free lists
  int64_t reserved_ = 0;  // bucket bytes obtained from cudaMalloc and not yet returned
  MemoryCounter counter_;
};

// ---------------------------------------------------------------------------------------------
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index)
      : index_(index), default_stream_(index, nullptr, /*owned=*/false), current_(&default_stream_), alloc_(index) {
    DeviceGuard g(index_);
    cudaDeviceProp prop;
    MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, index_));
    name_ = "cuda:" + std::to_string(index_) + " " + prop.name;
    MOE_CUDA_CHECK(cudaFree(nullptr));  // create the context now so that failures surface here
  }
  // The cuBLAS / cuBLASLt handles are deliberately not destroyed: backends live until process exit,
  // when the CUDA runtime may already be torn down and destroying a handle can crash (PyTorch leaks
  // its handles for the same reason). The allocator's cache is freed, ignoring late errors.
  ~CudaBackend() override = default;

  DeviceType type() const override { return DeviceType::cuda; }
  Device device() const override { return Device::cuda(index_); }
  std::string name() const override { return name_; }

  void* allocate(size_t bytes, MemoryKind kind) override {
    DeviceGuard g(index_);
    if (kind == MemoryKind::device) return alloc_.allocate(bytes, current_->get());
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    cudaError_t err = cudaMallocHost(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      MOE_THROW(ErrorCode::out_of_memory, "cuda:", index_, " pinned host memory: cudaMallocHost(", bytes,
                " bytes) failed (cudaErrorMemoryAllocation); ", pinned_.current(), " pinned bytes held");
    }
    if (err != cudaSuccess) cuda::throw_cuda_error(err, "cudaMallocHost", __FILE__, __LINE__);
    pinned_.add(static_cast<int64_t>(bytes));
    return p;
  }

  void deallocate(void* ptr, size_t bytes, MemoryKind kind) override {
    if (!ptr) return;
    QuietDeviceGuard g(index_);  // runs from Storage destructors: must not throw
    if (kind == MemoryKind::device) {
      alloc_.deallocate(ptr);
      return;
    }
    if (cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
    pinned_.sub(static_cast<int64_t>(bytes));
  }

  // Copies run on the current stream. device_to_host synchronises that stream before returning so
  // host code can read the result; host_to_host (pinned buffers) first waits for the stream, since
  // pending device copies may still be writing the source or reading the destination.
  void copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    if (bytes == 0) return;
    DeviceGuard g(index_);
    cudaStream_t s = current_->get();
    switch (kind) {
      case CopyKind::host_to_device:
        MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
        return;
      case CopyKind::device_to_host:
        MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        return;
      case CopyKind::device_to_device:
        MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
        return;
      case CopyKind::host_to_host:
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        std::memmove(dst, src, bytes);
        return;
    }
  }

  void memset_zero(void* ptr, size_t bytes) override {
    if (bytes == 0) return;
    DeviceGuard g(index_);
    MOE_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, current_->get()));
  }

  Stream& current_stream() override { return *current_; }
  void set_current_stream(Stream* stream) override {
    if (!stream) {
      current_ = &default_stream_;
      return;
    }
    stream_for(*stream, index_, "set_current_stream");  // checks backend and device
    current_ = static_cast<CudaStream*>(stream);
  }
  std::unique_ptr<Stream> create_stream() override {
    DeviceGuard g(index_);
    cudaStream_t s = nullptr;
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return std::make_unique<CudaStream>(index_, s, /*owned=*/true);
  }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CudaEvent>(index_); }
  void synchronize() override {
    DeviceGuard g(index_);
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
  }

  MemoryStats memory_stats() const override {
    MemoryStats s;
    s.current_bytes = alloc_.counter().current();
    s.peak_bytes = alloc_.counter().peak();
    s.num_allocs = alloc_.counter().allocs();
    s.pinned_current_bytes = pinned_.current();
    s.pinned_peak_bytes = pinned_.peak();
    s.cached_bytes = alloc_.cached_bytes();
    return s;
  }
  void reset_peak_memory() override {
    alloc_.counter().reset_peak();
    pinned_.reset_peak();
  }
  const KernelTable& kernels() const override { return cuda_kernel_table(); }

  // Handles are created on first use and bound to `stream` on every call.
  cublasHandle_t cublas(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(handle_mu_);
    if (!cublas_) {
      DeviceGuard g(index_);
      MOE_CUBLAS_CHECK(cublasCreate(&cublas_));
    }
    MOE_CUBLAS_CHECK(cublasSetStream(cublas_, stream));
    return cublas_;
  }
  cublasLtHandle_t cublaslt() {
    std::lock_guard<std::mutex> lock(handle_mu_);
    if (!cublaslt_) {
      DeviceGuard g(index_);
      MOE_CUBLAS_CHECK(cublasLtCreate(&cublaslt_));
    }
    return cublaslt_;
  }

 private:
  int index_;
  std::string name_;
  CudaStream default_stream_;
  CudaStream* current_;
  CachingAllocator alloc_;
  MemoryCounter pinned_;
  std::mutex handle_mu_;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t cublaslt_ = nullptr;
};

CudaBackend& backend_of(const ExecCtx& ctx) {
  auto* b = dynamic_cast<CudaBackend*>(ctx.backend);
  MOE_CHECK_CODE(b != nullptr, ErrorCode::internal, "CUDA kernel called with a non-CUDA backend (",
                 ctx.backend ? ctx.backend->name() : std::string("null"), ")");
  return *b;
}

}  // namespace

int cuda_device_count() {
  static const int count = [] {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {  // no driver, no device, or a driver/runtime mismatch: no CUDA
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int index) {
  int n = cuda_device_count();
  MOE_CHECK_CODE(index >= 0 && index < n, ErrorCode::not_supported, "make_cuda_backend: cuda:", index,
                 " requested but ", n, " CUDA device(s) are present");
  return std::make_unique<CudaBackend>(index);
}

void cuda_raise_test_error() {
  // cudaSetDevice(-1) fails with cudaErrorInvalidDevice, which is not sticky: the context survives.
  MOE_CUDA_CHECK(cudaSetDevice(-1));
  MOE_THROW(ErrorCode::internal, "cuda_raise_test_error: cudaSetDevice(-1) unexpectedly succeeded");
}

namespace cuda {
cublasHandle_t cublas_handle(const ExecCtx& ctx) { return backend_of(ctx).cublas(stream_of(ctx)); }
cublasLtHandle_t cublaslt_handle(const ExecCtx& ctx) { return backend_of(ctx).cublaslt(); }
}  // namespace cuda

}  // namespace moe
