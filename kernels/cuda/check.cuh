// Host-side helpers of the CUDA backend and kernels: error-check macros, the device guard, the
// backend's cuBLAS handles and stream-ordered scratch memory. Plain C++ (no device code), so both
// the .cu kernels and the backend's .cpp files include it. Only kernels/cuda/** and
// src/device/cuda/** may include it (it pulls in CUDA headers).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/ops.h"
#include "moecore/error.h"

namespace moe::cuda {

// ---------------------------------------------------------------------------------------------
// Error checking. Every CUDA runtime call, kernel launch and cuBLAS status goes through one of these
// macros; a failure becomes moe::Error(ErrorCode::backend) naming the call, the CUDA error name and
// string, the current device and file:line. (Defined in src/device/cuda/cuda_error.cpp.)
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line);

}  // namespace moe::cuda

#define MOE_CUDA_CHECK(call)                                                                       \
  do {                                                                                             \
    cudaError_t moe_err_ = (call);                                                                 \
    if (moe_err_ != cudaSuccess) ::moe::cuda::throw_cuda_error(moe_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: configuration errors surface through cudaGetLastError. `what` names the
// kernel (a string literal).
#define MOE_CUDA_CHECK_LAUNCH(what)                                                                \
  do {                                                                                             \
    cudaError_t moe_err_ = cudaGetLastError();                                                     \
    if (moe_err_ != cudaSuccess)                                                                   \
      ::moe::cuda::throw_cuda_error(moe_err_, "launch of " what, __FILE__, __LINE__);              \
  } while (0)

#define MOE_CUBLAS_CHECK(call)                                                                     \
  do {                                                                                             \
    cublasStatus_t moe_st_ = (call);                                                               \
    if (moe_st_ != CUBLAS_STATUS_SUCCESS)                                                          \
      ::moe::cuda::throw_cublas_error(moe_st_, #call, __FILE__, __LINE__);                         \
  } while (0)

namespace moe::cuda {

// ---------------------------------------------------------------------------------------------
// The backend's cuBLAS / cuBLASLt handles bound to ctx.stream (created lazily, one per backend;
// defined in src/device/cuda/cuda_backend.cpp).
cublasHandle_t cublas_handle(const ExecCtx& ctx);
cublasLtHandle_t cublaslt_handle(const ExecCtx& ctx);

inline cudaStream_t stream_of(const ExecCtx& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

// Makes the backend's device current for the scope (kernels launch on the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    MOE_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device_) MOE_CUDA_CHECK(cudaSetDevice(device_));
  }
  explicit DeviceGuard(const ExecCtx& ctx) : DeviceGuard(ctx.backend->device().index) {}
  ~DeviceGuard() {
    if (prev_ != device_) (void)cudaSetDevice(prev_);  // never throws from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

// Device memory for the duration of one op, from the backend's caching allocator. The allocator
// reuses a freed block only for allocations on the same stream, so releasing the scratch right
// after enqueueing the kernels that use it is safe (stream order). This relies on ctx.stream being
// the backend's current stream, which ops::exec_ctx guarantees.
class Scratch {
 public:
  Scratch(const ExecCtx& ctx, size_t bytes) : backend_(ctx.backend), bytes_(bytes) {
    if (bytes_ > 0) ptr_ = backend_->allocate(bytes_, MemoryKind::device);
  }
  ~Scratch() {
    if (ptr_) backend_->deallocate(ptr_, bytes_, MemoryKind::device);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  Backend* backend_;
  size_t bytes_;
  void* ptr_ = nullptr;
};

// Copies a small host table into stream-ordered scratch, on ctx's stream (so work still reading an
// earlier use of the block finishes first). The source is pageable host memory, which
// cudaMemcpyAsync stages before it returns (its documented "may be synchronous" case; the Tensor
// copies rely on the same), so the caller may free it afterwards.
inline void upload(const ExecCtx& ctx, const Scratch& dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src, bytes, cudaMemcpyHostToDevice, stream_of(ctx)));
}

}  // namespace moe::cuda
