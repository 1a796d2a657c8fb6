#!/usr/bin/env bash
# ONE command for a GPU machine (docs/gpu.md, benchmarks/gpu/README.md): prints the machine, builds
# what the checks need (CUDA, MPI and NCCL on, Release, -j16, only the needed targets), runs the CUDA
# test suites, compute-sanitizer memcheck and racecheck on the op tests, a two-process MPI layer test
# on the one GPU and NCCL at world size 1, then the GPU benchmarks (gpu_bench, the PyTorch peer, the
# model benchmark when it exists). Every step has its own timeout and the whole run a budget (8
# minutes by default), so it ends inside one 10-minute call of the device tool.
#
#   benchmarks/gpu/first_run.sh                       # on the GPU machine (carry .gpu-deps)
#   benchmarks/gpu/first_run.sh --steps bench,peer    # a subset (the build is reused when present)
#   benchmarks/gpu/first_run.sh --dry-run --build-dir build
#                                                     # here, without a GPU: the same steps against an
#                                                     # already-built tree, GPU-only parts skipped (and
#                                                     # said so), small timeouts (CTest gpu_first_run_dry)
#
# Options:
#   --dry-run          no GPU: reuse --build-dir as it is (nothing is built), skip what needs a GPU,
#                      check what can be checked (filters, scripts, the MPI test on the CPU)
#   --build-dir DIR    the build tree (default: build-gpu-first; with --dry-run: required)
#   --out DIR          where logs and results go (default: $OUT, the device tool's folder, else
#                      DIR/first-run-out)
#   --steps LIST       comma-separated subset of: env,deps,configure,build,ctest,mpi,nccl,sanitize,
#                      bench,peer,model (default: all, in this order)
#   --budget S         seconds for the whole run (default 480; dry run 170); a step that cannot get
#                      its minimum time in what is left is skipped and says so
#   --jobs N           build jobs (default: nproc, 16 on the GPU machine)
#   --overlap-peer     run the PyTorch peer on the idle GPU during the build (saves its minute or
#                      two when the budget is tight; its timings may suffer from the busy CPUs)
# Environment: CUDA_ARCH (90: H100/H200), PYTHON (python3), BENCH_ARGS (gpu_bench arguments, default
# "--only copy,permute,gemm,layer --warmup 2 --repeat 5"), PEER_ARGS, MODEL_BENCH_ARGS.
#
# What comes back under $OUT (at most 8 files, as the device tool returns them):
#   summary.md     the table (step, status, seconds, note), rewritten after every step
#   steps.log      each finished step's log (long ones cut to head and tail), appended as it ends
#   running.log    the log of the step in progress (gone when it ends): a cut-off run shows it
#   logs.tar.gz    every finished step's full log, rewritten after every step
#   ours.jsonl, peer.jsonl, table.md   the benchmark results (gpu_bench, torch_peer.py, merged)
# Exit status: 0 when no step FAILED or TIMED OUT (skips are fine), else 1.
set -uo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
ROOT=$(cd "$HERE/../.." && pwd)
ALL_STEPS="env,deps,configure,build,ctest,mpi,nccl,sanitize,bench,peer,model"

# ---- the step runner re-enters here: `first_run.sh __step NAME` (state in $FR_STATE) -----------------
if [ "${1:-}" = "__step" ]; then
  STEP=$2
  # shellcheck disable=SC1090,SC1091
  . "$FR_STATE/config.sh"
  [ -f "$FR_STATE/env.sh" ] && . "$FR_STATE/env.sh"
else
  DRY=0
  BUILD=""
  OUTDIR=${OUT:-}
  STEPS=$ALL_STEPS
  BUDGET=""
  JOBS=$(nproc)
  OVERLAP_PEER=0
  usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; }
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY=1 ;;
      --build-dir) BUILD=$2; shift ;;
      --out) OUTDIR=$2; shift ;;
      --steps) STEPS=$2; shift ;;
      --budget) BUDGET=$2; shift ;;
      --jobs) JOBS=$2; shift ;;
      --overlap-peer) OVERLAP_PEER=1 ;;
      -h | --help) usage; exit 0 ;;
      *) echo "first_run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  for s in ${STEPS//,/ }; do
    [[ ",$ALL_STEPS," == *",$s,"* ]] || { echo "first_run.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2; }
  done
  if [ "$DRY" -eq 1 ]; then
    [ -n "$BUILD" ] || { echo "first_run.sh: --dry-run needs --build-dir (an already-built tree)" >&2; exit 2; }
    [ -f "$BUILD/CMakeCache.txt" ] || { echo "first_run.sh: $BUILD is not a configured build tree" >&2; exit 2; }
    BUDGET=${BUDGET:-170}
  else
    BUILD=${BUILD:-$ROOT/build-gpu-first}
    BUDGET=${BUDGET:-480}
  fi
  BUILD=$(mkdir -p "$BUILD" && cd "$BUILD" && pwd)
  OUTDIR=${OUTDIR:-$BUILD/first-run-out}
  mkdir -p "$OUTDIR"
  OUTDIR=$(cd "$OUTDIR" && pwd)
  FR_STATE=$BUILD/first-run
  rm -rf "$FR_STATE/logs" "$FR_STATE/notes"
  mkdir -p "$FR_STATE/logs" "$FR_STATE/notes"
  rm -f "$OUTDIR/summary.md" "$OUTDIR/steps.log" "$OUTDIR/running.log" "$OUTDIR/logs.tar.gz"
  # The settings every step sees (the steps run as separate processes under `timeout`).
  {
    printf 'DRY=%q\nBUILD=%q\nOUTDIR=%q\nJOBS=%q\nROOT=%q\nHERE=%q\n' "$DRY" "$BUILD" "$OUTDIR" "$JOBS" "$ROOT" "$HERE"
    printf 'PYTHON=%q\nCUDA_ARCH=%q\n' "${PYTHON:-python3}" "${CUDA_ARCH:-90}"
  } > "$FR_STATE/config.sh"
  rm -f "$FR_STATE/env.sh"
  export FR_STATE
  PYTHON=${PYTHON:-python3}
fi

# ---- helpers shared by the steps ----------------------------------------------------------------------
note() { echo "$*" >> "$FR_STATE/notes/$STEP"; echo "first_run.sh [$STEP]: $*"; }
skip() { note "$*"; exit 77; }
# The executable of a CMake target in the build tree (first match), or "".
exe() { find "$BUILD" -type f -perm -u+x -name "$1" -not -path "*/CMakeFiles/*" 2> /dev/null | head -1; }
cache_var() { sed -n "s/^$1:[A-Z]*=//p" "$BUILD/CMakeCache.txt" 2> /dev/null | head -1; }
mpirun_cmd() {
  local m
  m=$(cache_var MPIEXEC_EXECUTABLE)
  [ -n "$m" ] && [ -x "$m" ] || m=$(command -v mpirun.openmpi || command -v mpirun || command -v mpiexec || true)
  echo "$m"
}
# Open MPI as root, oversubscribed, on one machine without ssh, shared memory without CMA.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none OMPI_MCA_plm_rsh_agent=false
export PMIX_MCA_pcompress_base_silence_warning=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export MOE_LOG_LEVEL=${MOE_LOG_LEVEL:-warn} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The op tests' filters for compute-sanitizer: the hand-written kernels on small shapes (no cuBLAS-only
# tests, no multi-GiB cases).
SAN_OPS="CudaOps.RouterTopk:CudaOps.RouterTopkBackward:CudaOps.AuxStatsAndLossBackward:CudaOps.ZLoss:CudaOps.Capacity:CudaOps.RoutingCountsAndRowIdMap:CudaOps.PermuteUnpermuteAndScatter:CudaOps.ChunkSort:CudaOps.Columns:CudaOps.Activations:CudaOps.ElementwiseCastScaleRowDot"
SAN_MODEL="CudaModelOps.*"
SAN_ATTN="CudaAttention.ForwardAndBackwardMatchCpu:CudaAttention.RepeatsBitForBit"

# ---- the steps ----------------------------------------------------------------------------------------
step_env() {
  echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host:     $(hostname) ($(uname -srm)); $(nproc) cores; $(free -g 2> /dev/null | awk '/Mem:/ {print $2 " GiB memory"}')"
  echo "os:       $(. /etc/os-release 2> /dev/null && echo "$PRETTY_NAME"); glibc $(getconf GNU_LIBC_VERSION 2> /dev/null | awk '{print $2}')"
  echo "mode:     $([ "$DRY" -eq 1 ] && echo "dry run (no GPU needed)" || echo "GPU run"); build dir $BUILD"
  local gpu=0
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm --format=csv && gpu=1
    nvidia-smi 2>&1 | head -20
  else
    echo "nvidia-smi: not found"
  fi
  ls -l /dev/nvidia* 2> /dev/null | head -5 || true
  [ -r /proc/driver/nvidia/version ] && cat /proc/driver/nvidia/version
  local nvcc
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2> /dev/null || true)
  if [ -n "$nvcc" ]; then "$nvcc" --version | tail -2; else echo "nvcc: not found"; fi
  cmake --version | head -1
  c++ --version | head -1
  command -v ninja > /dev/null && echo "ninja $(ninja --version)"
  local san
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true)
  if [ -n "$san" ]; then "$san" --version | tail -1; else echo "compute-sanitizer: not found"; fi
  local m
  m=$(command -v mpirun || true)
  echo "mpirun on PATH: ${m:-none}"
  "$PYTHON" - << 'EOF' 2>&1 || true
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
          "device", torch.cuda.get_device_name(0) if cuda else "-",
          "_grouped_mm", "present" if hasattr(torch, "_grouped_mm") else "absent")
except Exception as e:  # noqa: BLE001
    print("torch: not importable:", e)
EOF
  [ -f "$ROOT/.gpu-deps/MANIFEST" ] && head -1 "$ROOT/.gpu-deps/MANIFEST"
  if [ "$DRY" -eq 0 ] && [ "$gpu" -eq 0 ]; then
    note "no GPU visible (nvidia-smi failed or missing): the GPU steps will fail"
    return 1
  fi
  [ "$DRY" -eq 1 ] && note "dry run: nvidia-smi $([ "$gpu" -eq 1 ] && echo "answered" || echo "absent, as expected")"
  return 0
}

# Unpacks .gpu-deps into a private prefix and writes the environment the later steps need.
step_deps() {
  local debs=("$ROOT"/.gpu-deps/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    if [ "$DRY" -eq 1 ]; then skip "no .gpu-deps/*.deb here (benchmarks/gpu/fetch_deps.sh not run): nothing to check"; fi
    note "no .gpu-deps/*.deb: using the system's packages"
    return 0
  fi
  local prefix=$FR_STATE/deps
  [ "$DRY" -eq 1 ] && prefix=$FR_STATE/deps-check
  local stamp
  stamp=$(cd "$ROOT/.gpu-deps" && find . -maxdepth 1 -name '*.deb' -printf '%s %f\n' | sort)
  if [ ! -f "$prefix/.stamp" ] || [ "$(cat "$prefix/.stamp")" != "$stamp" ]; then
    rm -rf "$prefix"
    mkdir -p "$prefix"
    local deb tmp
    for deb in "${debs[@]}"; do
      if command -v dpkg-deb > /dev/null 2>&1; then
        dpkg-deb -x "$deb" "$prefix" || return 1
      else
        tmp=$(mktemp -d)
        (cd "$tmp" && ar x "$deb") && tar -xf "$tmp"/data.tar.* -C "$prefix" || return 1
        rm -rf "$tmp"
      fi
    done
    echo "$stamp" > "$prefix/.stamp"
    echo "unpacked ${#debs[@]} packages into $prefix"
  fi
  local usr=$prefix/usr
  local libdir=$usr/lib/x86_64-linux-gnu
  local env=$FR_STATE/env.sh
  [ "$DRY" -eq 1 ] && env=$FR_STATE/env-check.sh
  {
    printf 'export CMAKE_PREFIX_PATH=%q\n' "$usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
    printf 'export LD_LIBRARY_PATH=%q\n' "$libdir:$libdir/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    printf 'export CMAKE_POLICY_VERSION_MINIMUM=3.5\n'
    if [ -x "$usr/bin/mpirun.openmpi" ]; then
      # Open MPI relocated: OPAL_PREFIX makes mpirun, mpicxx and libmpi look for their plugins, help
      # files and wrapper data under the prefix instead of /usr.
      printf 'export OPAL_PREFIX=%q\n' "$usr"
      printf 'export PATH=%q\n' "$usr/bin:$PATH"
      printf 'DEP_MPICXX=%q\nDEP_MPIRUN=%q\n' "$usr/bin/mpicxx.openmpi" "$usr/bin/mpirun.openmpi"
    fi
  } > "$env"
  local cfgs
  cfgs=$(find "$usr" \( -name '*Config.cmake' -o -name '*-config.cmake' \) 2> /dev/null | sort)
  echo "CMake package configs: $(echo "$cfgs" | xargs -n1 basename 2> /dev/null | tr '\n' ' ')"
  # NCCL: the CUDA toolkit's, else PyTorch's nvidia-nccl wheel's, else the library found anywhere
  # usual; headers from the same place, else the ones fetch_deps.sh copied.
  local nccl_inc="" nccl_lib="" d
  local cands=(/usr/local/cuda/include /usr/local/cuda/targets/x86_64-linux/include /usr/include /usr/local/include)
  local libcands=(/usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/local/lib)
  local pyn
  pyn=$("$PYTHON" -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2> /dev/null || true)
  [ -n "$pyn" ] && cands+=("$pyn/include") && libcands+=("$pyn/lib")
  for d in "${cands[@]}"; do [ -f "$d/nccl.h" ] && nccl_inc=$d && break; done
  for d in "${libcands[@]}"; do
    nccl_lib=$(ls "$d"/libnccl.so "$d"/libnccl.so.2 2> /dev/null | head -1)
    [ -n "$nccl_lib" ] && break
  done
  [ -z "$nccl_inc" ] && [ -f "$ROOT/.gpu-deps/nccl/include/nccl.h" ] && nccl_inc=$ROOT/.gpu-deps/nccl/include
  if [ -n "$nccl_inc" ] && [ -n "$nccl_lib" ]; then
    printf 'DEP_NCCL_INC=%q\nDEP_NCCL_LIB=%q\n' "$nccl_inc" "$nccl_lib" >> "$env"
    printf 'export LD_LIBRARY_PATH=%q:$LD_LIBRARY_PATH\n' "$(dirname "$nccl_lib")" >> "$env"
    note "NCCL: headers $nccl_inc, library $nccl_lib"
  else
    note "NCCL not found (headers: ${nccl_inc:-none}, library: ${nccl_lib:-none}): the build runs without NCCL"
  fi
  if [ "$DRY" -eq 1 ]; then
    # Check the relocated Open MPI the GPU run will use: two ranks of a trivial program.
    if [ -x "$usr/bin/mpirun.openmpi" ]; then
      (
        # shellcheck disable=SC1090
        . "$env"
        "$DEP_MPIRUN" -n 2 --bind-to none true
      ) && note "the carried Open MPI starts 2 ranks from $usr" || { note "the carried Open MPI failed to start 2 ranks"; return 1; }
    fi
  fi
  return 0
}

cmake_args() {
  local gen=()
  [ ! -f "$1/CMakeCache.txt" ] && command -v ninja > /dev/null 2>&1 && gen=(-G Ninja)
  local args=(-S "$ROOT" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH"
    -DMOE_MPI=ON -DMOE_BLAS=Eigen -DMOE_BUILD_TESTS=ON -DMOE_BUILD_BENCHMARKS=ON -DMOE_BUILD_EXAMPLES=OFF)
  local usr=""
  [ -n "${CMAKE_PREFIX_PATH:-}" ] && usr=${CMAKE_PREFIX_PATH%%:*}
  if [ -n "$usr" ] && [ -d "$usr" ]; then
    local cfg name
    while IFS= read -r cfg; do
      name=$(basename "$cfg")
      name=${name%Config.cmake}
      name=${name%-config.cmake}
      args+=("-D${name}_DIR=$(dirname "$cfg")")
    done < <(find "$usr" \( -name '*Config.cmake' -o -name '*-config.cmake' \) | sort)
  fi
  [ -n "${DEP_MPICXX:-}" ] && args+=(-DMPI_CXX_COMPILER="$DEP_MPICXX" -DMPIEXEC_EXECUTABLE="$DEP_MPIRUN")
  if [ -n "${DEP_NCCL_INC:-}" ]; then
    args+=(-DMOE_NCCL=ON -DNCCL_INCLUDE_DIR="$DEP_NCCL_INC" -DNCCL_LIBRARY="$DEP_NCCL_LIB")
  else
    args+=(-DMOE_NCCL=AUTO)
  fi
  printf '%s\n' "${args[@]}"
}

step_configure() {
  if ! command -v nvcc > /dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    [ "$DRY" -eq 1 ] && skip "no nvcc here: the CUDA configure cannot be checked"
    note "no nvcc"
    return 1
  fi
  local dir=$BUILD
  if [ "$DRY" -eq 1 ]; then
    # Check the GPU run's configure line in a scratch tree (the build tree is left as it is).
    dir=$FR_STATE/configure-check
    rm -rf "$dir"
    [ -f "$FR_STATE/env-check.sh" ] && . "$FR_STATE/env-check.sh"
  fi
  local args=()
  mapfile -t args < <(cmake_args "$dir")
  echo "cmake -B $dir ${args[*]}"
  cmake -B "$dir" "${args[@]}" || return 1
  grep -E "MOE_HAVE|libmoecore:" "$dir/CMakeCache.txt" 2> /dev/null | head -5
  [ "$DRY" -eq 1 ] && note "dry run: configured a scratch tree with the GPU run's flags (CUDA, MPI, NCCL, Eigen)"
  return 0
}

# The targets the later steps run.
wanted_targets() {
  local t
  echo moecore
  for t in "$ROOT"/tests/cuda/test_*.cpp; do echo "cuda_$(basename "$t" .cpp)"; done
  echo cuda_dist_layer
  echo dist_comm
  echo dist_nccl
  echo gpu_bench
  echo moe_gpt_bench
}

step_build() {
  local have=()
  local help
  help=$(cmake --build "$BUILD" --target help 2> /dev/null)
  local t
  for t in $(wanted_targets); do
    if grep -Eq "(^|[ .])$t(:| |$)" <<< "$help"; then have+=("$t"); else note "no target $t in this build (skipped)"; fi
  done
  if [ "$DRY" -eq 1 ]; then
    # Nothing is built: check that the already-built tree has the executables the steps run.
    local missing=()
    for t in "${have[@]}"; do
      [ "$t" = moecore ] && continue
      [ -n "$(exe "$t")" ] || missing+=("$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      note "dry run: targets configured but not built: ${missing[*]}"
      return 1
    fi
    note "dry run: nothing built; ${#have[@]} targets present and built"
    return 0
  fi
  local jobs=${FR_BUILD_JOBS:-$JOBS}
  echo "building ${have[*]} with $jobs jobs"
  cmake --build "$BUILD" -j "$jobs" --target "${have[@]}"
}

step_ctest() {
  if [ "$DRY" -eq 1 ]; then
    # No nested ctest run in the tree the outer ctest is using (its Testing/ logs are shared): list
    # what the GPU run would select, then run each GPU suite directly; without a GPU each must skip
    # (exit 77), which checks tests/common/gpu_gate.h's decision on a machine without one.
    ctest --test-dir "$BUILD" -L cuda -LE gpu-script -N | tail -n +1
    local bin rc bad=0 n=0
    for bin in "$ROOT"/tests/cuda/test_*.cpp; do
      bin=$(exe "cuda_$(basename "$bin" .cpp)")
      [ -n "$bin" ] || continue
      n=$((n + 1))
      timeout 30 "$bin" > "$FR_STATE/suite.out" 2>&1
      rc=$?
      echo "$(basename "$bin"): exit $rc: $(head -c 300 "$FR_STATE/suite.out" | head -1)"
      [ "$rc" -eq 77 ] || bad=$((bad + 1))
    done
    note "dry run: $n GPU suites run directly, each must skip (77) without a GPU; $bad did not"
    [ "$bad" -eq 0 ]
    return
  fi
  ctest --test-dir "$BUILD" -L cuda -LE gpu-script --timeout 150 -j 4 --output-on-failure 2>&1 |
    tee "$FR_STATE/ctest.out"
  local rc=${PIPESTATUS[0]}
  # On a GPU machine a CUDA suite must run: skips (other than NCCL across 2 GPUs) are failures.
  local bad
  bad=$(grep -E "\*\*\*Skipped|Not Run" "$FR_STATE/ctest.out" | grep -v "dist_nccl" || true)
  if [ -n "$bad" ]; then
    note "suites skipped on a GPU machine: $(echo "$bad" | awk '{print $4}' | tr '\n' ' ')"
    return 1
  fi
  return "$rc"
}

# Two MPI ranks on the one GPU: the layer (device tensors staged through pinned host memory by the
# MPI communicator) and the communicator's own staging test.
step_mpi() {
  local mpirun layer comm
  mpirun=$(mpirun_cmd)
  layer=$(exe cuda_dist_layer)
  comm=$(exe dist_comm)
  [ -n "$mpirun" ] || skip "no mpirun"
  [ -n "$layer" ] || skip "cuda_dist_layer not built (a build without MPI)"
  local dev=cuda
  [ "$DRY" -eq 1 ] && dev=cpu
  echo "MOE_DEVICE=$dev $mpirun -n 2 --bind-to none $layer"
  MOE_DEVICE=$dev MOE_COMM_TIMEOUT_S=60 MOE_NUM_THREADS=1 "$mpirun" -n 2 --bind-to none "$layer" || return 1
  if [ -n "$comm" ]; then
    echo "$mpirun -n 2 --bind-to none $comm --gtest_filter=MpiComm.CudaTensorsStageThroughPinnedHost"
    MOE_COMM_TIMEOUT_S=60 "$mpirun" -n 2 --bind-to none "$comm" --gtest_filter=MpiComm.CudaTensorsStageThroughPinnedHost ||
      return 1
  fi
  [ "$DRY" -eq 1 ] && note "dry run: the MPI layer test ran on the CPU backend (2 ranks); on the GPU it runs with MOE_DEVICE=cuda"
  return 0
}

# Lists the tests a filter selects (works without a GPU: gpu_test_main lists before its GPU check);
# fails when it selects none (a renamed test would make the check vacuous).
check_filter() {
  local bin=$1 filter=$2 n
  n=$("$bin" --gtest_list_tests --gtest_filter="$filter" 2> /dev/null | grep -c '^  ' || true)
  echo "$(basename "$bin") --gtest_filter=$filter selects $n tests"
  [ "$n" -gt 0 ]
}

step_nccl() {
  local bin
  bin=$(exe cuda_test_comm_cuda)
  [ -n "$bin" ] || skip "cuda_test_comm_cuda not built"
  check_filter "$bin" "NcclComm.*" || { note "the NCCL tests are not in $bin (a build without NCCL?)"; [ "$DRY" -eq 1 ] && exit 77; return 1; }
  [ "$DRY" -eq 1 ] && skip "needs a GPU; the filter selects the NCCL world-of-one tests"
  "$bin" --gtest_filter='NcclComm.*'
}

sanitize_one() {  # tool binary filter timeout
  local tool=$1 name=$2 filter=$3 t=$4 bin san
  bin=$(exe "$name")
  [ -n "$bin" ] || { echo "$name: not built"; return 2; }
  check_filter "$bin" "$filter" || return 1
  [ "$DRY" -eq 1 ] && return 0
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || true)
  [ -n "$san" ] || { echo "compute-sanitizer not found"; return 3; }
  echo "== $tool on $name ($filter), at most $t s"
  timeout -k 5 "$t" "$san" --tool "$tool" --error-exitcode 3 --print-limit 20 "$bin" --gtest_filter="$filter" 2>&1 |
    tee "$FR_STATE/san.out"
  local rc=${PIPESTATUS[0]}
  if grep -q "Device not supported\|Target application returned an error" "$FR_STATE/san.out" &&
    grep -q "Device not supported" "$FR_STATE/san.out"; then
    echo "compute-sanitizer does not support this machine's device or runtime (gVisor?)"
    return 3
  fi
  [ "$rc" -eq 124 ] && echo "$tool on $name: timed out after $t s (partial)"
  return "$rc"
}

step_sanitize() {
  # memcheck and racecheck on the three op suites, each bounded; the step's time is shared out.
  local left=${FR_STEP_TIMEOUT:-180} per fails=0 skips=0 r
  per=$(((left - 10) / 6))
  [ "$per" -gt 60 ] && per=60
  for tool in memcheck racecheck; do
    for pair in "cuda_test_ops_cuda|$SAN_OPS" "cuda_test_model_ops_cuda|$SAN_MODEL" "cuda_test_attention_cuda|$SAN_ATTN"; do
      sanitize_one "$tool" "${pair%%|*}" "${pair#*|}" "$per"
      r=$?
      case $r in
        0) ;;
        2 | 3) skips=$((skips + 1)) ;;
        124) note "$tool ${pair%%|*}: TIMEOUT after $per s"; fails=$((fails + 1)) ;;
        *) note "$tool ${pair%%|*}: FAILED (exit $r)"; fails=$((fails + 1)) ;;
      esac
    done
  done
  [ "$fails" -gt 0 ] && return 1
  [ "$DRY" -eq 1 ] && skip "needs a GPU; all six filters select tests"
  [ "$skips" -eq 6 ] && skip "compute-sanitizer unavailable or unsupported here"
  return 0
}

step_bench() {
  local bin
  bin=$(exe gpu_bench)
  [ -n "$bin" ] || skip "gpu_bench not built (a build without CUDA)"
  if [ "$DRY" -eq 1 ]; then
    "$bin" --quick --device cpu --json "$OUTDIR/ours.jsonl" || return 1
    note "dry run: gpu_bench --quick on the CPU backend (the GPU run: ${BENCH_ARGS:-copy,permute,gemm, then the layer} on cuda:0)"
    return 0
  fi
  # Host-side parameter init of the layer benchmark uses the CPU threads.
  export OMP_NUM_THREADS=$JOBS MOE_NUM_THREADS=$JOBS OPENBLAS_NUM_THREADS=$JOBS
  if [ -n "${BENCH_ARGS:-}" ]; then
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
    "$bin" --json "$OUTDIR/ours.jsonl" $BENCH_ARGS
    return
  fi
  # The short measurements first (kept even if the layer runs out of time), then the layer with the
  # rest of the step's time; its records are appended as they come.
  "$bin" --json "$OUTDIR/ours.jsonl" --only copy,permute,gemm --warmup 2 --repeat 5 || return 1
  local left=$((${FR_STEP_TIMEOUT:-120} - SECONDS - 5)) rc
  [ "$left" -ge 20 ] || { note "no time left for the layer benchmark"; return 0; }
  timeout -k 5 "$left" "$bin" --json "$FR_STATE/ours_layer.jsonl" --only layer --warmup 1 --repeat 3
  rc=$?
  cat "$FR_STATE/ours_layer.jsonl" >> "$OUTDIR/ours.jsonl" 2> /dev/null
  [ "$rc" -eq 124 ] && note "the layer benchmark ran out of its $left s (what it measured is kept)"
  return "$rc"
}

step_peer() {
  local dev=cuda extra=()
  if [ "$DRY" -eq 1 ]; then
    "$PYTHON" -c "import torch" 2> /dev/null || skip "no torch in $PYTHON here: the peer is not checked"
    dev=cpu
    extra=(--quick)
  fi
  "$PYTHON" "$HERE/torch_peer.py" --selfcheck --device "$dev" || return 1
  # shellcheck disable=SC2086
  "$PYTHON" "$HERE/torch_peer.py" --device "$dev" --json "$OUTDIR/peer.jsonl" "${extra[@]}" ${PEER_ARGS:-} || return 1
  [ "$DRY" -eq 1 ] && note "dry run: the peer on the CPU (--quick); on the GPU: torch._grouped_mm where torch has it, and the expert loop"
  [ -n "${FR_PEER_BG:-}" ] && note "ran on the GPU while the build used the CPUs (2 cores left to it): rerun --steps peer for a quiet measurement"
  return 0
}

step_model() {
  local bin
  bin=$(exe moe_gpt_bench)
  [ -n "$bin" ] || skip "moe_gpt_bench not built (not in this tree yet)"
  if ! "$bin" --help 2>&1 | grep -q -- "--device"; then
    skip "moe_gpt_bench has no --device option yet (CPU only): not run on the GPU"
  fi
  if [ "$DRY" -eq 1 ]; then
    "$bin" --device cpu --smoke || return 1
    note "dry run: moe_gpt_bench --smoke on the CPU"
    return 0
  fi
  # shellcheck disable=SC2086
  "$bin" --device cuda ${MODEL_BENCH_ARGS:-}
}

if [ "${1:-}" = "__step" ]; then
  "step_$STEP"
  exit $?
fi

# ---- the driver: runs each step under its timeout, logs, summary ----------------------------------------
declare -a ROWS=()
FAILED=0
START=$(date +%s)
step_default() {  # name → "timeout min" (GPU run; the dry run uses smaller ones)
  if [ "$DRY" -eq 1 ]; then
    case $1 in
      env) echo "15 5" ;; deps) echo "30 5" ;; configure) echo "60 20" ;; build) echo "20 5" ;;
      ctest) echo "60 15" ;; mpi) echo "40 10" ;; nccl) echo "15 5" ;; sanitize) echo "20 5" ;;
      bench) echo "30 10" ;; peer) echo "60 15" ;; model) echo "30 10" ;;
    esac
  else
    case $1 in
      env) echo "30 5" ;; deps) echo "60 10" ;; configure) echo "90 30" ;; build) echo "330 120" ;;
      ctest) echo "180 60" ;; mpi) echo "60 20" ;; nccl) echo "30 10" ;; sanitize) echo "150 40" ;;
      bench) echo "120 30" ;; peer) echo "100 30" ;; model) echo "60 20" ;;
    esac
  fi
}
write_summary() {
  local f=$OUTDIR/summary.md
  {
    echo "# first_run.sh $([ "$DRY" -eq 1 ] && echo "--dry-run ")summary"
    echo
    echo "- started $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC' 2> /dev/null || date -u) on $(hostname); build dir $BUILD"
    echo "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | head -1 || echo none)"
    echo "- elapsed $(($(date +%s) - START)) s of a $BUDGET s budget"
    echo
    echo "| # | step | status | seconds | note |"
    echo "| --- | --- | --- | --- | --- |"
    local r
    for r in "${ROWS[@]}"; do echo "$r"; done
  } > "$f.tmp" && mv "$f.tmp" "$f"
}
append_log() {  # n name status seconds logfile
  local lines
  lines=$(wc -l < "$5")
  {
    echo "=================================================================================================="
    echo "== step $1 $2: $3 after $4 s ($lines lines)"
    echo "=================================================================================================="
    if [ "$lines" -gt 1600 ]; then
      head -n 100 "$5"
      echo "... ($((lines - 1100)) lines cut; the whole log is in logs.tar.gz) ..."
      tail -n 1000 "$5"
    else
      cat "$5"
    fi
  } >> "$OUTDIR/steps.log"
  tar -C "$FR_STATE" -czf "$OUTDIR/logs.tar.gz.tmp" logs && mv "$OUTDIR/logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
}

echo "== first_run.sh: $([ "$DRY" -eq 1 ] && echo "DRY RUN, " )steps $STEPS; budget $BUDGET s; build dir $BUILD; results in $OUTDIR"
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# --overlap-peer: the peer (PyTorch only, no build needed) runs on the idle GPU while the build uses
# the CPUs (the build leaves it 2 cores); its row is written when the loop reaches it. Off by
# default: a CPU-bound eager peer measured beside a build would be slowed unfairly.
PEER_BG=""
start_peer_bg() {
  local t min
  read -r t min <<< "$(step_default peer)"
  PEER_T=$t
  PEER_S0=$(date +%s)
  echo "== [peer] start in the background, during the build (timeout $t s)"
  (
    FR_PEER_BG=1 FR_STEP_TIMEOUT=$t timeout -k 10 "$t" "$SELF" __step peer > "$FR_STATE/peer.bg.log" 2>&1
    echo $? > "$FR_STATE/peer.bg.rc"
  ) &
  PEER_BG=$!
  export FR_BUILD_JOBS=$((JOBS > 4 ? JOBS - 2 : JOBS))
}
record() {  # n step rc secs log [timeout]
  local n=$1 step=$2 rc=$3 secs=$4 log=$5 t=${6:-?} status notes=""
  case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124 | 137) status=TIMEOUT; FAILED=1 ;;
    *) status=FAIL; FAILED=1 ;;
  esac
  [ -f "$FR_STATE/notes/$step" ] && notes=$(tr '\n' ' ' < "$FR_STATE/notes/$step" | sed 's/|/\//g; s/ *$//')
  [ "$status" = TIMEOUT ] && notes="timed out after $t s${notes:+; $notes}"
  [ "$status" = FAIL ] && [ -z "$notes" ] && notes="exit $rc (see steps.log)"
  ROWS+=("| $n | $step | $status | $secs | $notes |")
  write_summary
  append_log "$n" "$step" "$status" "$secs" "$log"
  echo "== [$step] $status after $secs s"
}
n=0
for step in ${ALL_STEPS//,/ }; do
  want "$step" || continue
  n=$((n + 1))
  log=$FR_STATE/logs/$(printf '%02d' "$n")_$step.log
  if [ "$step" = build ] && [ "$DRY" -eq 0 ] && [ "$OVERLAP_PEER" -eq 1 ] && want peer && [ -z "$PEER_BG" ]; then
    start_peer_bg
  fi
  if [ "$step" = peer ] && [ -n "$PEER_BG" ]; then
    wait "$PEER_BG"
    rc=$(cat "$FR_STATE/peer.bg.rc" 2> /dev/null || echo 1)
    cp "$FR_STATE/peer.bg.log" "$log"
    cat "$log"
    record "$n" peer "$rc" "$(($(date -r "$FR_STATE/peer.bg.rc" +%s 2> /dev/null || date +%s) - PEER_S0))" "$log" "$PEER_T"
    continue
  fi
  read -r t min <<< "$(step_default "$step")"
  left=$((BUDGET - ($(date +%s) - START) - 5))
  [ "$t" -gt "$left" ] && t=$left
  if [ "$t" -lt "$min" ]; then
    echo "budget: $left s left, step needs at least $min s" > "$log"
    ROWS+=("| $n | $step | SKIP | 0 | budget: $left s left, needs $min s; rerun with --steps $step |")
    write_summary
    append_log "$n" "$step" SKIP 0 "$log"
    echo "== [$step] SKIP (budget)"
    continue
  fi
  echo "== [$step] start (timeout $t s)"
  s0=$(date +%s)
  FR_STEP_TIMEOUT=$t timeout -k 10 "$t" "$SELF" __step "$step" 2>&1 | tee "$OUTDIR/running.log"
  rc=${PIPESTATUS[0]}
  cp "$OUTDIR/running.log" "$log"
  rm -f "$OUTDIR/running.log"
  record "$n" "$step" "$rc" "$(($(date +%s) - s0))" "$log" "$t"
done
[ -n "$PEER_BG" ] && wait "$PEER_BG" 2> /dev/null

# The benchmark table when both sides measured something.
if [ -s "$OUTDIR/ours.jsonl" ]; then
  # (a missing peer file gives n/a in its columns)
  "$PYTHON" "$HERE/merge_table.py" --merge-only "$OUTDIR/ours.jsonl" "$OUTDIR/peer.jsonl" --out "$OUTDIR/table.md" \
    > /dev/null 2>&1 && echo && cat "$OUTDIR/table.md"
fi
echo
cat "$OUTDIR/summary.md"
exit "$FAILED"
