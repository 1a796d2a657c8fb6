#!/usr/bin/env bash
# One script for a GPU machine (benchmarks/gpu/README.md): builds libmoecore in Release for the local
# GPU into build-gpu/, runs the CUDA tests, then gpu_bench and the PyTorch peer, and prints one table
# last (merge_table.py): case | ours | peer (Megatron way) | peer (_grouped_mm) | rate | fraction |
# target | met?.
#
#   benchmarks/gpu/run.sh                          # every step: build,test,bench,peer,table
#   benchmarks/gpu/run.sh --steps build,test       # a subset, e.g. to fit a 10-minute call
#   benchmarks/gpu/run.sh --steps bench,peer,table
#   benchmarks/gpu/run.sh --quick                  # tiny shapes, one iteration: a smoke run
#   benchmarks/gpu/run.sh --steps configure        # only unpack the deps and configure (no GPU needed
#                                                  # with CUDA_ARCH=90; MOE_CUDA=OFF for a CPU check)
#
# Dependencies: when .gpu-deps/*.deb exist (benchmarks/gpu/fetch_deps.sh, run on a Debian machine
# with apt), they are unpacked with dpkg -x into a private prefix (build-gpu/deps) and CMake, the
# compiler and the loader are pointed at it; otherwise the system's packages are used.
# Environment: BUILD_DIR (build-gpu), JOBS (nproc), PYTHON (python3: the one with PyTorch + CUDA),
# CUDA_ARCH (native), MOE_CUDA (ON), MOE_DEPS_PREFIX (BUILD_DIR/deps), BENCH_ARGS / PEER_ARGS (extra
# arguments, e.g. "--device cpu" for both: a smoke test of the whole flow on a machine without GPU). Results (logs, JSON lines, table.md) go
# to BUILD_DIR/gpu-results and, when $OUT is set (the device tool), are copied there at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/benchmarks/gpu
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
RESULTS=$BUILD/gpu-results
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
CUDA_ARCH=${CUDA_ARCH:-native}
STEPS="build,test,bench,peer,table"
QUICK=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --steps)
      [ $# -ge 2 ] || { echo "run.sh: --steps needs a value (build,test,bench,peer,table)" >&2; exit 2; }
      STEPS=$2
      shift
      ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${STEPS//,/ }; do
  case "$s" in configure | build | test | bench | peer | table) ;; *) echo "run.sh: unknown step '$s'" >&2; exit 2 ;; esac
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }

FAILED=()
NO_GPU=0
SECONDS=0
step_time() { echo "run.sh: [$1] done after ${SECONDS} s in all"; }

# ---- the header: device and date first ------------------------------------------------------------
echo "== libmoecore GPU benchmarks: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
if command -v nvidia-smi > /dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/== device: /' || true
else
  echo "== device: nvidia-smi not found"
fi
echo "== steps: $STEPS${QUICK:+ (--quick)}; build dir: $BUILD"
mkdir -p "$RESULTS"

# ---- dependencies from .gpu-deps -------------------------------------------------------------------
CMAKE_DEP_ARGS=()
extract_deb() {  # extract_deb DEB PREFIX: dpkg -x where dpkg exists, else ar + tar
  if command -v dpkg-deb > /dev/null 2>&1; then
    dpkg-deb -x "$1" "$2"
  else
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && ar x "$1")
    tar -xf "$tmp"/data.tar.* -C "$2"
    rm -rf "$tmp"
  fi
}
setup_deps() {
  local debs=("$ROOT"/.gpu-deps/*.deb)
  if [ ! -e "${debs[0]}" ]; then
    echo "run.sh: no .gpu-deps/*.deb: using the system's fmt, spdlog, Eigen, nlohmann-json, GoogleTest"
    return
  fi
  local prefix=${MOE_DEPS_PREFIX:-$BUILD/deps}
  local stamp
  stamp=$(cd "$ROOT/.gpu-deps" && find . -maxdepth 1 -name '*.deb' -printf '%s %f\n' | sort)
  if [ ! -f "$prefix/.stamp" ] || [ "$(cat "$prefix/.stamp")" != "$stamp" ]; then
    rm -rf "$prefix"
    mkdir -p "$prefix"
    for deb in "${debs[@]}"; do extract_deb "$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")" "$prefix"; done
    echo "$stamp" > "$prefix/.stamp"
    echo "run.sh: unpacked ${#debs[@]} packages from .gpu-deps into $prefix"
  fi
  local usr=$prefix/usr libdir
  libdir=$(find "$usr/lib" -maxdepth 1 -type d -name '*-linux-gnu' 2> /dev/null | head -1)
  # CMake finds the packages (and through their imported targets the headers and libraries) under
  # the prefix; the loader finds libfmt / libspdlog there when the programs run.
  export CMAKE_PREFIX_PATH="$usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  if [ -n "$libdir" ]; then export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  # Point find_package at each package's config directly too, whatever the compiler's multiarch
  # directory is: <Name>Config.cmake or <name>-config.cmake -> -D<Name>_DIR=<its folder>.
  local cfg name
  while IFS= read -r cfg; do
    name=$(basename "$cfg")
    name=${name%Config.cmake}
    name=${name%-config.cmake}
    CMAKE_DEP_ARGS+=("-D${name}_DIR=$(dirname "$cfg")")
  done < <(find "$usr" \( -name '*Config.cmake' -o -name '*-config.cmake' \) | sort)
  # spdlog 1.10 and fmt 9 from Debian 12 need glibc >= 2.34 and libstdc++ with GLIBCXX_3.4.30
  local glibc
  glibc=$(getconf GNU_LIBC_VERSION 2> /dev/null | awk '{print $2}' || true)
  if [ -n "$glibc" ] && [ "$(printf '%s\n2.34\n' "$glibc" | sort -V | head -1)" != "2.34" ]; then
    echo "run.sh: WARNING: glibc $glibc is older than 2.34, which Debian 12's libspdlog needs" >&2
  fi
}
setup_deps
# CMake 4 refuses package configs that ask for policies older than 3.5; Debian 12's ask for ranges
# that end higher, this is a safety net only.
export CMAKE_POLICY_VERSION_MINIMUM=${CMAKE_POLICY_VERSION_MINIMUM:-3.5}

# ---- build --------------------------------------------------------------------------------------------
if want build || want configure; then
  gen=()
  if [ ! -f "$BUILD/CMakeCache.txt" ] && command -v ninja > /dev/null 2>&1; then gen=(-G Ninja); fi
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA="${MOE_CUDA:-ON}" \
    -DMOE_MPI=OFF -DMOE_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DMOE_BUILD_TESTS=ON \
    -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCHMARKS=ON "${CMAKE_DEP_ARGS[@]}" 2>&1 | tee "$RESULTS/build.log"
  step_time configure
fi
if want build; then
  if ! cmake --build "$BUILD" --target help 2> /dev/null | grep -q gpu_bench; then
    echo "run.sh: the build has no gpu_bench target: benchmarks/CMakeLists.txt needs 'add_subdirectory(gpu)'" >&2
    exit 1
  fi
  targets=(moecore gpu_bench)
  for f in "$ROOT"/tests/cuda/test_*.cpp; do
    [ -e "$f" ] && targets+=("cuda_$(basename "$f" .cpp)")
  done
  echo "run.sh: building ${targets[*]} with $JOBS jobs"
  cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}" 2>&1 | tee -a "$RESULTS/build.log"
  step_time build
fi

# ---- CUDA tests -----------------------------------------------------------------------------------------
if want test; then
  if ! ctest --test-dir "$BUILD" -L cuda --output-on-failure 2>&1 | tee "$RESULTS/ctest.log"; then
    FAILED+=("CUDA tests (ctest -L cuda, see ctest.log)")
  fi
  step_time test
fi

# ---- benchmarks -----------------------------------------------------------------------------------------
if want bench; then
  bench=$BUILD/benchmarks/gpu/gpu_bench
  [ -x "$bench" ] || { echo "run.sh: $bench is not built (run the build step)" >&2; exit 1; }
  set +e
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
  "$bench" --json "$RESULTS/ours.jsonl" "${QUICK[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$RESULTS/gpu_bench.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 77 ]; then
    echo "run.sh: gpu_bench found no GPU (skipped)"
    NO_GPU=1
  elif [ "$rc" -ne 0 ]; then
    FAILED+=("gpu_bench (exit $rc, see gpu_bench.log)")
  fi
  step_time bench
fi

if want peer; then
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  # First the peer's own check (its two expert paths and torch._grouped_mm's call forms agree).
  set +e
  # shellcheck disable=SC2086 # PEER_ARGS is a list of words
  "$PYTHON" "$HERE/torch_peer.py" --selfcheck --device cuda ${PEER_ARGS:-} 2>&1 | tee "$RESULTS/torch_peer.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then FAILED+=("torch_peer --selfcheck (see torch_peer.log)"); fi
  # shellcheck disable=SC2086
  "$PYTHON" "$HERE/torch_peer.py" --device cuda --json "$RESULTS/peer.jsonl" "${QUICK[@]}" ${PEER_ARGS:-} 2>&1 |
    tee -a "$RESULTS/torch_peer.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 77 ]; then
    echo "run.sh: the peer found no torch with CUDA (skipped)"
  elif [ "$rc" -ne 0 ]; then
    FAILED+=("torch_peer (exit $rc, see torch_peer.log)")
  fi
  step_time peer
fi

# ---- the table, last ------------------------------------------------------------------------------------
copy_out() {  # the device tool returns what is under $OUT (at most 8 files)
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    for f in build.log ctest.log gpu_bench.log torch_peer.log ours.jsonl peer.jsonl table.md; do
      if [ -f "$RESULTS/$f" ]; then cp "$RESULTS/$f" "$OUT/"; fi
    done
  fi
}
status_line() {
  if [ ${#FAILED[@]} -eq 0 ]; then
    echo "run.sh: steps $STEPS finished in ${SECONDS} s, nothing failed"
  else
    echo "run.sh: FAILED: $(IFS=';'; echo "${FAILED[*]}")"
  fi
}
if want table; then
  copy_out
  status_line
  echo
  if [ ! -f "$RESULTS/ours.jsonl" ]; then
    echo "run.sh: no gpu_bench results in $RESULTS/ours.jsonl: nothing to tabulate"
    [ "$NO_GPU" -eq 1 ] || FAILED+=("table (no gpu_bench results)")
  else
    "$PYTHON" "$HERE/merge_table.py" --merge-only "$RESULTS/ours.jsonl" "$RESULTS/peer.jsonl" \
      --out "$RESULTS/table.md" || FAILED+=("merge_table")
    if [ -n "${OUT:-}" ] && [ -f "$RESULTS/table.md" ] && [ -d "$OUT" ]; then cp "$RESULTS/table.md" "$OUT/"; fi
  fi
else
  copy_out
  status_line
fi
if [ ${#FAILED[@]} -ne 0 ]; then exit 1; fi
if [ "$NO_GPU" -eq 1 ]; then
  echo "SKIP: run.sh: no GPU on this machine"
  exit 77
fi
