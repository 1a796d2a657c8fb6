// Whether the GPU suites run, skip or fail (tests/common/gpu_test_main.cpp and the MPI layer test on
// the device, tests/cuda/dist_layer_cuda.cpp).
//   - no GPU on the machine at all (no /dev/nvidia* node, no /proc/driver/nvidia, no nvidia-smi on
//     PATH): the suite is skipped (exit 77, CTest's skip code);
//   - a GPU is visible but libmoecore cannot use it (a build without CUDA, a driver older than the
//     CUDA runtime, no device the runtime can open): the suite FAILS with a message saying why, so a
//     GPU machine never reports a broken CUDA build as "skipped";
//   - otherwise the suite runs.
// MOE_EXPECT_GPU=1 treats the machine as having a GPU (fail instead of skip); MOE_EXPECT_GPU=0 as
// having none (skip), e.g. for a deliberately CPU-only build on a GPU machine.
#pragma once
#include <string>

namespace moe::test {

// Evidence of a GPU on this machine ("/dev/nvidia0", "nvidia-smi at /usr/bin/nvidia-smi"), or ""
// when there is none; MOE_EXPECT_GPU overrides.
std::string machine_gpu_evidence();

// 0: run the suite; 77: skip it (the message is printed); 1: fail (the message is printed to
// stderr). `suite` names the program in the message.
int gpu_suite_gate(const char* suite);

}  // namespace moe::test
