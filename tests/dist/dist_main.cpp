// main() for the distributed GoogleTest suites: MPI first (mpi_world), then every test on every
// rank; rank 0 prints the full report, the others only their failures, and every rank exits with
// the worst result over the world so mpiexec's status is the suite's (dist_util.cpp).
#include "dist/dist_util.h"

int main(int argc, char** argv) { return moe::dist::run_dist_tests(argc, argv); }
