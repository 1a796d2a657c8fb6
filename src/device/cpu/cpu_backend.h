// The CPU backend: host memory with counters, inline streams, the reference kernels.
#pragma once
#include <memory>

#include "moecore/backend.h"

namespace moe {
std::unique_ptr<Backend> make_cpu_backend();

// A cap on the CPU backend's live device bytes (0: none), as if the device had this much memory: an
// allocation that would take the live bytes past it throws out_of_memory naming the bytes asked,
// the bytes held and where in the model it happened (docs/reliability.md). Starts from
// MOE_MAX_DEVICE_BYTES (bytes; read when the backend is created); tests set it directly.
void set_cpu_device_byte_limit(int64_t bytes);
int64_t cpu_device_byte_limit();
}  // namespace moe
