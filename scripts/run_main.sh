#!/usr/bin/env bash
# The README's first command: install dependencies, build, and run the main job — a student MoE
# layer learning to imitate a teacher MoE layer (examples/train_moe_regression). Extra arguments go
# to the trainer, e.g. scripts/run_main.sh --train-iters 500. NP=4 runs it under mpirun with the
# layout given by the flags (e.g. NP=4 scripts/run_main.sh --expert-model-parallel-size 4).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
TARGETS=train_moe_regression scripts/build.sh > /dev/null
if [ "${NP:-1}" -gt 1 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  exec mpirun -np "$NP" --oversubscribe --bind-to none "${BUILD_DIR:-build}/examples/train_moe_regression" "$@"
fi
exec "${BUILD_DIR:-build}/examples/train_moe_regression" "$@"
