#!/usr/bin/env bash
# Downloads the Debian packages libmoecore builds against into .gpu-deps/ at the repository root, for
# a GPU machine that has a compiler, CUDA, CMake and ninja but no package registry and none of our
# build dependencies. Run it HERE (a Debian machine with apt); benchmarks/gpu/run.sh on the GPU
# machine unpacks them with `dpkg -x` into a private prefix (nothing is installed system-wide).
#
# The set is the minimum for a CUDA build with tests, without MPI/NCCL and without OpenBLAS (run.sh
# builds with -DMOE_BLAS=Eigen): fmt and spdlog (headers, CMake configs, shared libraries), Eigen and
# nlohmann-json (header-only), GoogleTest and GoogleMock (static libraries; GTest's CMake config
# refers to the GMock targets too). Google Benchmark is optional for the build and not fetched.
#
#   benchmarks/gpu/fetch_deps.sh            # uses apt's current package lists
#   benchmarks/gpu/fetch_deps.sh --update   # runs apt-get update first
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${GPU_DEPS_DIR:-$ROOT/.gpu-deps}

PACKAGES=(
  libfmt-dev libfmt9
  libspdlog-dev libspdlog1.10
  libeigen3-dev
  nlohmann-json3-dev
  libgtest-dev libgmock-dev
)

if [ "${1:-}" = "--update" ]; then
  apt-get update -qq
fi
for p in "${PACKAGES[@]}"; do
  if ! apt-cache show "$p" > /dev/null 2>&1; then
    echo "fetch_deps: apt knows no package '$p' (run with --update, or this is not Debian 12)" >&2
    exit 1
  fi
done

mkdir -p "$DEST"
rm -f "$DEST"/*.deb
# apt-get download writes into the current directory; as root it warns that the download is not
# sandboxed (the _apt user cannot write here), which is harmless.
if ! (cd "$DEST" && apt-get download "${PACKAGES[@]}") > "$DEST/download.log" 2>&1; then
  cat "$DEST/download.log" >&2
  echo "fetch_deps: apt-get download failed" >&2
  exit 1
fi
grep -v "unsandboxed" "$DEST/download.log" || true
rm -f "$DEST/download.log"

missing=0
for p in "${PACKAGES[@]}"; do
  if ! ls "$DEST/${p}_"*.deb > /dev/null 2>&1; then
    echo "fetch_deps: ${p} was not downloaded" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1

echo "fetch_deps: $(find "$DEST" -maxdepth 1 -name '*.deb' | wc -l) packages in $DEST:"
find "$DEST" -maxdepth 1 -name '*.deb' -printf '  %8s bytes  %f\n' | sort -k3
echo "fetch_deps: total $(du -ch "$DEST"/*.deb | tail -1 | cut -f1) (the GPU call carries at most 64 MiB in all)"
echo "fetch_deps: next, on the GPU machine: benchmarks/gpu/run.sh (carry .gpu-deps)"
