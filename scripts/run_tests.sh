#!/usr/bin/env bash
# The README's second command: install dependencies, build everything (CUDA code included when the
# toolkit is present), run the whole CTest suite, then the sanitizer suites and the fuzzed readers
# (scripts/run_sanitizers.sh). GPU suites report SKIPPED (exit 77) without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --with-torch
scripts/build.sh "$@"
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "${CTEST_JOBS:-2}" --timeout 900
# The sanitizer suites and the fuzzed readers (docs/reliability.md): a separate ASan + UBSan build.
# SKIP_SANITIZERS=1 leaves them out (a quick local run).
if [ "${SKIP_SANITIZERS:-0}" != 1 ]; then scripts/run_sanitizers.sh; fi
