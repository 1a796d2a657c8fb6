// The CUDA backend's entry points, seen by the registry. No CUDA types here.
#pragma once
#include <memory>

#include "moecore/backend.h"

namespace moe {
// Number of usable CUDA devices (0 when the driver or a GPU is missing; never throws).
int cuda_device_count();
std::unique_ptr<Backend> make_cuda_backend(int index);
const KernelTable& cuda_kernel_table();
}  // namespace moe
