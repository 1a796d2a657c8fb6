#!/usr/bin/env bash
# Configures and builds libmoecore (Release) into ${BUILD_DIR:-build}. Extra arguments go to cmake,
# e.g. scripts/build.sh -DMOE_CUDA=OFF. CUDA is built when nvcc is found (AUTO). TARGETS="a b"
# builds only those targets.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "$@"
if [ -n "${TARGETS:-}" ]; then
  for t in $TARGETS; do cmake --build "$BUILD_DIR" -j "$JOBS" --target "$t"; done
else
  cmake --build "$BUILD_DIR" -j "$JOBS"
fi
