// The CPU backend: host memory with counters, inline streams, the reference kernels.
#pragma once
#include <memory>

#include "moecore/backend.h"

namespace moe {
std::unique_ptr<Backend> make_cpu_backend();
}  // namespace moe
