// The CUDA backend's entry points, seen by the registry. No CUDA types here.
#pragma once
#include <memory>

#include "moecore/backend.h"

namespace moe {
// Number of usable CUDA devices (0 when the driver or a GPU is missing; never throws).
int cuda_device_count();
std::unique_ptr<Backend> make_cuda_backend(int index);
const KernelTable& cuda_kernel_table();

// Test hook: runs a CUDA runtime call that fails without harming the context (cudaSetDevice(-1))
// through the backend's error check, so tests can inspect the message. Always throws
// moe::Error(ErrorCode::backend).
[[noreturn]] void cuda_raise_test_error();
}  // namespace moe
