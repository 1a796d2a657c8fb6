// The CUDA backend: one object per GPU. Device selection (a device guard around every call),
// streams and events, a caching device allocator with current/peak/cached counters, pinned host
// memory, copies on the current stream, and lazily created cuBLAS / cuBLASLt handles.
//
// Threading model: like the rest of libmoecore, one host thread drives a device. The current stream
// belongs to the backend object (not to the calling thread); the allocators and the handle creation
// are nevertheless mutex-protected so that concurrent frees (e.g. from a prefetch thread) are safe.
// Memory used on several streams is protected by events (device/stream_pool.h); cuBLAS handles are
// per stream.
#include "device/cuda/cuda_backend.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "device/memory_counter.h"
#include "device/stream_pool.h"
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

// Host-blocking waits (stream / event / device synchronisation, device→host copies) of every CUDA
// backend since the process started: cuda_host_sync_count().
std::atomic<int64_t> g_host_syncs{0};
void count_host_sync() { g_host_syncs.fetch_add(1, std::memory_order_relaxed); }

// ---------------------------------------------------------------------------------------------
// Events for the allocators' stream bookkeeping (device/stream_pool.h): created on demand, reused,
// never destroyed (backends live until process exit). Failures never throw (frees run in
// destructors): an event that cannot be recorded is replaced by synchronising its stream, and a
// null event counts as complete.
struct CudaEventOps {
  using Stream = cudaStream_t;
  using Event = cudaEvent_t;
  std::vector<cudaEvent_t> spare;

  cudaEvent_t record(cudaStream_t s) {
    cudaEvent_t e = nullptr;
    if (!spare.empty()) {
      e = spare.back();
      spare.pop_back();
    } else if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
      (void)cudaGetLastError();
      if (cudaStreamSynchronize(s) != cudaSuccess) (void)cudaGetLastError();
      return nullptr;
    }
    if (cudaEventRecord(e, s) != cudaSuccess) {
      (void)cudaGetLastError();
      if (cudaStreamSynchronize(s) != cudaSuccess) (void)cudaGetLastError();
      spare.push_back(e);
      return nullptr;
    }
    return e;
  }
  bool done(cudaEvent_t e) {
    if (!e) return true;
    const cudaError_t err = cudaEventQuery(e);
    if (err == cudaSuccess) return true;
    (void)cudaGetLastError();
    return err != cudaErrorNotReady;  // an error: nothing left to wait for
  }
  void wait(cudaEvent_t e) {
    if (e && cudaEventSynchronize(e) != cudaSuccess) (void)cudaGetLastError();
  }
  void release(cudaEvent_t e) {
    if (e) spare.push_back(e);
  }
};

// ---------------------------------------------------------------------------------------------
// Streams and events.
class CudaStream final : public Stream {
 public:
  // owned: created here (non-blocking: ordering against other streams is by events only);
  // otherwise a view of the legacy default stream (handle nullptr). on_destroy runs after the
  // stream's work has completed and before the handle is destroyed (the allocators forget it).
  CudaStream(int device, cudaStream_t stream, bool owned, std::function<void(cudaStream_t)> on_destroy = {})
      : device_(device), stream_(stream), owned_(owned), on_destroy_(std::move(on_destroy)) {}
  ~CudaStream() override {
    if (!owned_) return;
    QuietDeviceGuard g(device_);
    // Work still queued may read memory the allocators would hand out again, and a later stream
    // may get the same handle (with the same cuBLAS handle and workspace): finish it first.
    if (cudaStreamSynchronize(stream_) != cudaSuccess) (void)cudaGetLastError();
    if (on_destroy_) on_destroy_(stream_);
    if (cudaStreamDestroy(stream_) != cudaSuccess) (void)cudaGetLastError();
  }
  void synchronize() override {
    DeviceGuard g(device_);
    count_host_sync();
    MOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void* native_handle() const override { return stream_; }
  int device() const { return device_; }
  cudaStream_t get() const { return stream_; }

 private:
  int device_;
  cudaStream_t stream_;
  bool owned_;
  std::function<void(cudaStream_t)> on_destroy_;
};

CudaStream* as_cuda_stream(Stream& s, const char* op) {
  auto* cs = dynamic_cast<CudaStream*>(&s);
  MOE_CHECK(cs != nullptr, op, ": expected a CUDA stream, got a stream of another backend");
  return cs;
}

// The cudaStream_t of a Stream that must belong to `device`.
cudaStream_t stream_for(Stream& s, int device, const char* op) {
  CudaStream* cs = as_cuda_stream(s, op);
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
  // A stream of any CUDA device may wait for the event (cudaStreamWaitEvent accepts an event of
  // another device): cross-device copies order both devices' streams this way.
  void wait(Stream& stream) override {
    CudaStream* cs = as_cuda_stream(stream, "Event::wait");
    DeviceGuard g(cs->device());
    MOE_CUDA_CHECK(cudaStreamWaitEvent(cs->get(), event_, 0));
  }
  void synchronize() override {
    DeviceGuard g(device_);
    count_host_sync();
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
// Caching device allocator. Requests are rounded up to a bucket size; a freed block is reused by an
// allocation of the same bucket on the stream it was allocated on, at once when no other stream can
// have used it, else once events recorded on those streams have completed (device/stream_pool.h:
// every stream made current while the block was alive, and the stream current at the free, count as
// users). Counters: current/peak = bytes requested by live allocations; cached = bucket bytes of
// free and pending blocks. On cudaMalloc failure the cache is released (waiting for pending blocks)
// and the call retried once.
class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}
  ~CachingAllocator() {
    QuietDeviceGuard g(device_);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [p, size] : pool_.drain())
      if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
  }

  // Bucket sizes: multiples of 512 B up to 1 MiB; above, multiples of max(1 MiB, 2^floor(log2 n)/8)
  // (at most 12.5% slack beyond 8 MiB, and a bounded number of distinct buckets).
  static size_t bucket(size_t bytes) {
    constexpr size_t kSmallStep = 512, kLargeFrom = size_t{1} << 20;
    if (bytes <= kLargeFrom) return (bytes + kSmallStep - 1) / kSmallStep * kSmallStep;
    size_t step = std::max(kLargeFrom, std::bit_floor(bytes) / 8);
    return (bytes + step - 1) / step * step;
  }

  void note_current(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mu_);
    pool_.note_current(s);
  }
  void forget_stream(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mu_);
    pool_.forget_stream(s, nullptr);
  }

  void* allocate(size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return nullptr;
    MOE_CHECK_CODE(bytes <= (size_t{1} << 62), ErrorCode::out_of_memory, "cuda:", device_,
                   " allocator: cannot allocate ", bytes, " bytes (more than any device holds)");
    const size_t size = bucket(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    if (void* p = pool_.take(size, stream)) {
      requested_[p] = bytes;
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
    pool_.add_live(p, size, stream);
    requested_[p] = bytes;
    counter_.add(static_cast<int64_t>(bytes));
    return p;
  }

  // `current`: the backend's current stream at the free.
  void deallocate(void* p, cudaStream_t current) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = requested_.find(p);
    if (it == requested_.end() || !pool_.give_back(p, current)) {
      // Called from destructors: report instead of throwing (a throw would terminate).
      log(LogLevel::error, "cuda:" + std::to_string(device_) +
                               " allocator: deallocate of a pointer it did not allocate (ignored; this is a bug)");
      return;
    }
    counter_.sub(static_cast<int64_t>(it->second));
    requested_.erase(it);
  }

  void release_cache() {  // caller holds mu_
    for (auto& [p, size] : pool_.drain()) {
      MOE_CUDA_CHECK(cudaFree(p));
      reserved_ -= static_cast<int64_t>(size);
    }
  }

  int64_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pool_.cached_bytes();
  }
  const MemoryCounter& counter() const { return counter_; }
  MemoryCounter& counter() { return counter_; }

 private:
  int device_;
  mutable std::mutex mu_;
  StreamPool<CudaEventOps> pool_;
  std::unordered_map<void*, size_t> requested_;  // live block → bytes asked for
  int64_t reserved_ = 0;  // bucket bytes obtained from cudaMalloc and not yet returned
  MemoryCounter counter_;
};

// Pinned host memory (the offload target and the MPI staging buffers). cudaFreeHost is deferred until
// every stream that may still copy from or to the buffer has passed an event recorded at the free
// (its own stream included: a host→device copy from the buffer may still be queued), so a caller
// may drop a pinned tensor right after enqueueing an asynchronous copy of it. Deferred buffers are
// released at the next pinned allocation or free once their events completed.
class PinnedAllocator {
 public:
  explicit PinnedAllocator(int device) : device_(device), pool_(CudaEventOps{}, /*fence_own_stream=*/true) {}
  ~PinnedAllocator() {
    QuietDeviceGuard g(device_);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [p, size] : pool_.drain())
      if (cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();
  }
  void note_current(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mu_);
    pool_.note_current(s);
  }
  void forget_stream(cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mu_);
    pool_.forget_stream(s, nullptr);
  }
  void* allocate(size_t bytes, cudaStream_t stream) {
    if (bytes == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    reap();
    void* p = nullptr;
    cudaError_t err = cudaMallocHost(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {  // wait for the deferred frees, then try once more
      (void)cudaGetLastError();
      for (auto& [q, size] : pool_.drain())
        if (cudaFreeHost(q) != cudaSuccess) (void)cudaGetLastError();
      err = cudaMallocHost(&p, bytes);
    }
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      MOE_THROW(ErrorCode::out_of_memory, "cuda:", device_, " pinned host memory: cudaMallocHost(", bytes,
                " bytes) failed (cudaErrorMemoryAllocation); ", counter_.current(), " pinned bytes held");
    }
    if (err != cudaSuccess) cuda::throw_cuda_error(err, "cudaMallocHost", __FILE__, __LINE__);
    pool_.add_live(p, bytes, stream);
    counter_.add(static_cast<int64_t>(bytes));
    return p;
  }
  void deallocate(void* p, size_t bytes, cudaStream_t current) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (!pool_.give_back(p, current)) {
      log(LogLevel::error, "cuda:" + std::to_string(device_) +
                               " pinned allocator: free of a pointer it did not allocate (ignored; this is a bug)");
      return;
    }
    counter_.sub(static_cast<int64_t>(bytes));
    reap();
  }
  size_t deferred() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pool_.pending_count();
  }
  const MemoryCounter& counter() const { return counter_; }
  MemoryCounter& counter() { return counter_; }

 private:
  void reap() {  // caller holds mu_
    pool_.collect();
    for (auto& [p, size] : pool_.take_free())
      if (cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();
  }

  int device_;
  mutable std::mutex mu_;
  StreamPool<CudaEventOps> pool_;
  MemoryCounter counter_;
};

// ---------------------------------------------------------------------------------------------
class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index)
      : index_(index),
        default_stream_(index, nullptr, /*owned=*/false),
        current_(&default_stream_),
        alloc_(index),
        pinned_(index) {
    DeviceGuard g(index_);
    cudaDeviceProp prop;
    MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, index_));
    name_ = "cuda:" + std::to_string(index_) + " " + prop.name;
    // cuBLAS workspace per handle (one handle per stream): PyTorch's default sizes, 32 MiB on
    // Hopper and later, 8 MiB before.
    blas_workspace_bytes_ = prop.major >= 9 ? (size_t{32} << 20) : (size_t{8} << 20);
    MOE_CUDA_CHECK(cudaFree(nullptr));  // create the context now so that failures surface here
    alloc_.note_current(nullptr);
    pinned_.note_current(nullptr);
  }
  // The cuBLAS handles and their workspaces are deliberately not destroyed: backends live until
  // process exit, when the CUDA runtime may already be torn down and destroying a handle can crash
  // (PyTorch leaks its handles for the same reason). The allocators' caches are freed, ignoring late
  // errors.
  ~CudaBackend() override = default;

  DeviceType type() const override { return DeviceType::cuda; }
  Device device() const override { return Device::cuda(index_); }
  std::string name() const override { return name_; }

  void* allocate(size_t bytes, MemoryKind kind) override {
    DeviceGuard g(index_);
    if (kind == MemoryKind::device) return alloc_.allocate(bytes, current_->get());
    return pinned_.allocate(bytes, current_->get());
  }

  void deallocate(void* ptr, size_t bytes, MemoryKind kind) override {
    if (!ptr) return;
    QuietDeviceGuard g(index_);  // runs from Storage destructors: must not throw
    if (kind == MemoryKind::device) {
      alloc_.deallocate(ptr, current_->get());
      return;
    }
    pinned_.deallocate(ptr, bytes, current_->get());
  }

  // Copies run on the current stream. device_to_host synchronises that stream before returning so
  // host code can read the result; host_to_host (pinned buffers) first waits for the stream, since
  // pending device copies may still be writing the source or reading the destination. A pinned
  // source of host_to_device may be freed right after the call (PinnedAllocator defers the free).
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
        count_host_sync();
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        return;
      case CopyKind::device_to_device:
        // cudaMemcpyDefault: the pointers may belong to another device (Tensor::copy_from orders
        // the other device's stream with events).
        MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
        return;
      case CopyKind::host_to_host:
        count_host_sync();
        MOE_CUDA_CHECK(cudaStreamSynchronize(s));
        std::memmove(dst, src, bytes);
        return;
    }
  }

  // No synchronisation, no host sync counted: the offload manager orders the readers of dst with
  // an event and keeps src alive until that event completed.
  void copy_to_pinned_async(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    DeviceGuard g(index_);
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, current_->get()));
  }

  void memset_zero(void* ptr, size_t bytes) override {
    if (bytes == 0) return;
    DeviceGuard g(index_);
    MOE_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, current_->get()));
  }

  Stream& current_stream() override { return *current_; }
  void set_current_stream(Stream* stream) override {
    CudaStream* next = &default_stream_;
    if (stream) {
      stream_for(*stream, index_, "set_current_stream");  // checks backend and device
      next = static_cast<CudaStream*>(stream);
    }
    current_ = next;
    alloc_.note_current(next->get());
    pinned_.note_current(next->get());
  }
  std::unique_ptr<Stream> create_stream() override {
    DeviceGuard g(index_);
    cudaStream_t s = nullptr;
    MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return std::make_unique<CudaStream>(index_, s, /*owned=*/true, [this](cudaStream_t dead) {
      alloc_.forget_stream(dead);
      pinned_.forget_stream(dead);
    });
  }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CudaEvent>(index_); }
  void synchronize() override {
    DeviceGuard g(index_);
    count_host_sync();
    MOE_CUDA_CHECK(cudaDeviceSynchronize());
  }

  MemoryStats memory_stats() const override {
    MemoryStats s;
    s.current_bytes = alloc_.counter().current();
    s.peak_bytes = alloc_.counter().peak();
    s.num_allocs = alloc_.counter().allocs();
    s.pinned_current_bytes = pinned_.counter().current();
    s.pinned_peak_bytes = pinned_.counter().peak();
    s.cached_bytes = alloc_.cached_bytes();
    return s;
  }
  void reset_peak_memory() override {
    alloc_.counter().reset_peak();
    pinned_.counter().reset_peak();
  }
  const KernelTable& kernels() const override { return cuda_kernel_table(); }

  // One cuBLAS handle per stream, created on first use, bound to that stream once and for all, with
  // its own workspace (as PyTorch keeps one workspace per handle and stream), and with reduced-
  // precision split-K reductions disallowed (bf16/f16 GEMMs reduce in f32, as the CPU does). A
  // handle is only ever used on its stream, so no call rebinds a handle another thread is using.
  cublasHandle_t cublas(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(handle_mu_);
    auto it = blas_.find(stream);
    if (it != blas_.end()) return it->second;
    DeviceGuard g(index_);
    cublasHandle_t h = nullptr;
    MOE_CUBLAS_CHECK(cublasCreate(&h));
    MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
    void* ws = nullptr;
    MOE_CUDA_CHECK(cudaMalloc(&ws, blas_workspace_bytes_));
    MOE_CUBLAS_CHECK(cublasSetWorkspace(h, ws, blas_workspace_bytes_));
    MOE_CUBLAS_CHECK(cublasSetMathMode(
        h, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    blas_.emplace(stream, h);
    return h;
  }
  cublasLtHandle_t cublaslt() {
    std::lock_guard<std::mutex> lock(handle_mu_);
    if (!cublaslt_) {
      DeviceGuard g(index_);
      MOE_CUBLAS_CHECK(cublasLtCreate(&cublaslt_));
    }
    return cublaslt_;
  }
  size_t pinned_deferred() const { return pinned_.deferred(); }

 private:
  int index_;
  std::string name_;
  CudaStream default_stream_;
  CudaStream* current_;
  CachingAllocator alloc_;
  PinnedAllocator pinned_;
  size_t blas_workspace_bytes_ = 0;
  std::mutex handle_mu_;
  std::unordered_map<cudaStream_t, cublasHandle_t> blas_;
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

std::string cuda_status() {
  int n = 0, driver = 0, runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) (void)cudaGetLastError();
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) (void)cudaGetLastError();
  const std::string versions = "driver supports CUDA " + std::to_string(driver / 1000) + "." +
                               std::to_string(driver % 1000 / 10) + ", runtime " + std::to_string(runtime / 1000) +
                               "." + std::to_string(runtime % 1000 / 10);
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
           "); " + versions;
  }
  return std::to_string(n) + " CUDA device(s); " + versions;
}

int64_t cuda_host_sync_count() { return g_host_syncs.load(std::memory_order_relaxed); }

size_t cuda_pinned_deferred_frees(int device) {
  return static_cast<CudaBackend&>(get_backend(Device::cuda(device))).pinned_deferred();
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
