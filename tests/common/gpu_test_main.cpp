// main() for GPU suites (tests/common/gpu_gate.h): exit 77 (CTest's skip code) when the machine has
// no GPU at all, so a skip is never reported as a pass; FAIL loudly when the machine has a GPU but the
// CUDA backend is missing or unusable. Listing the tests (--gtest_list_tests) needs no GPU, so scripts
// can check their --gtest_filter patterns on any machine (benchmarks/gpu/first_run.sh --dry-run).
#include <gtest/gtest.h>

#include <cstring>

#include "common/gpu_gate.h"

int main(int argc, char** argv) {
  bool list_only = false;
  for (int i = 1; i < argc; ++i) list_only = list_only || std::strcmp(argv[i], "--gtest_list_tests") == 0;
  if (!list_only) {
    const int gate = moe::test::gpu_suite_gate(argv[0]);
    if (gate != 0) return gate;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
