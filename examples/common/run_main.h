// main() for the programs (examples and benchmarks): runs `run`, turns any exception into a message
// on stderr and exit status 1, and under mpirun ends the whole job so peers waiting in a collective
// do not sit until their timeout.
#pragma once
#include <cstdio>
#include <exception>

#include "moecore/comm.h"

namespace moe::examples {

inline int run_main(const char* program, int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    std::fflush(stderr);
    if (world_size() > 1) abort_world(1);
    return 1;
  }
}

}  // namespace moe::examples
