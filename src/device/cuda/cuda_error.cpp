// CUDA / cuBLAS failures become moe::Error(ErrorCode::backend) naming the call, the error, the
// device and the source location.
#include <string>

#include "kernels/cuda/check.cuh"

namespace moe::cuda {

namespace {
std::string current_device_str() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return "cuda:?";
  }
  return "cuda:" + std::to_string(dev);
}
}  // namespace

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  // Clear the (non-sticky) error so the next check does not report it again.
  (void)cudaGetLastError();
  detail::throw_error(ErrorCode::backend, file, line,
                      detail::concat(call, " failed on ", current_device_str(), ": ", cudaGetErrorName(err), " (",
                                     cudaGetErrorString(err), ")"));
}

void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line) {
  detail::throw_error(ErrorCode::backend, file, line,
                      detail::concat(call, " failed on ", current_device_str(), ": ", cublasGetStatusName(st), " (",
                                     cublasGetStatusString(st), ")"));
}

}  // namespace moe::cuda
