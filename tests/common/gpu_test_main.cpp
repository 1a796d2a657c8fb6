// main() for GPU suites: exit 77 (CTest's skip code) when no GPU is present, so a skip is never
// reported as a pass.
#include <gtest/gtest.h>

#include <cstdio>

#include "moecore/backend.h"

int main(int argc, char** argv) {
  if (!moe::backend_available(moe::DeviceType::cuda)) {
    std::printf("SKIP: no CUDA device available (%s)\n", moe::build_info().c_str());
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
