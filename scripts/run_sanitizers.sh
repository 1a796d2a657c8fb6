#!/usr/bin/env bash
# The sanitizer suites (docs/reliability.md): configures ${ASAN_BUILD_DIR:-build-asan} with
# AddressSanitizer + UndefinedBehaviorSanitizer (cmake/MoeSanitizers.cmake: -O1 -g, CUDA and the
# benchmarks off), builds it, runs the unit, ops and layer suites and the tests labelled `sanitize`
# (two parity runs and a few small dist cases; LeakSanitizer on, Open MPI's own allocations suppressed by
# tests/sanitizers/lsan.supp), then every fuzz target (label `fuzz`) for FUZZ_SECONDS each
# (default 20). Extra arguments go to the cmake configure step. Exits non-zero on any report.
#   scripts/run_sanitizers.sh                 # what CI runs after the normal suite
#   FUZZ_SECONDS=300 scripts/run_sanitizers.sh   # a longer fuzzing session
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${ASAN_BUILD_DIR:-build-asan}
JOBS=${JOBS:-$(nproc)}
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
start=$(date +%s)

cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 -DCMAKE_C_FLAGS_RELEASE=-O1 \
  -DMOE_SANITIZERS=address,undefined -DMOE_CUDA=OFF -DMOE_BUILD_BENCHMARKS=OFF \
  -DMOE_FUZZ_SECONDS="$FUZZ_SECONDS" "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"
built=$(date +%s)

# The one-process unit, ops and layer tests, then the MPI cases and tool runs labelled `sanitize`.
ctest --test-dir "$BUILD_DIR" -L '^(unit|ops|layer)$' -LE '^dist$' --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 900
ctest --test-dir "$BUILD_DIR" -L '^sanitize$' --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 900
tested=$(date +%s)
# The fuzz targets one at a time (each is one process; two share the two cores).
ctest --test-dir "$BUILD_DIR" -L fuzz --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 900
done_=$(date +%s)
echo "run_sanitizers: build $((built - start)) s, sanitize suites $((tested - built)) s," \
     "fuzz $((done_ - tested)) s, total $((done_ - start)) s"
