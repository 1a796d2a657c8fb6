// The CUDA backend's entry points, seen by the registry. No CUDA types here.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "moecore/backend.h"

namespace moe {
// Number of usable CUDA devices (0 when the driver or a GPU is missing; never throws).
int cuda_device_count();
// Why CUDA is or is not usable, for messages: the device count or cudaGetDeviceCount's error, and
// the driver's and the runtime's CUDA versions (never throws).
std::string cuda_status();
// Host-blocking waits of all CUDA backends since the process started: stream, event and device
// synchronisations and device→host copies (each of which synchronises its stream). Tests count the
// syncs of a layer's forward and backward with it.
int64_t cuda_host_sync_count();
// Pinned host buffers of cuda:device freed by their owners but not yet returned to the system
// because a stream may still copy them (tests).
size_t cuda_pinned_deferred_frees(int device);
std::unique_ptr<Backend> make_cuda_backend(int index);
const KernelTable& cuda_kernel_table();

// Test hook: runs a CUDA runtime call that fails without harming the context (cudaSetDevice(-1))
// through the backend's error check, so tests can inspect the message. Always throws
// moe::Error(ErrorCode::backend).
[[noreturn]] void cuda_raise_test_error();
}  // namespace moe
