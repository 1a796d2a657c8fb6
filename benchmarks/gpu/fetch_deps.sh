#!/usr/bin/env bash
# Fetches, HERE (a Debian 12 machine with apt and a package registry), everything the GPU machine
# lacks into ONE folder, .gpu-deps/ at the repository root (git-ignored; the device tool carries it:
# `carry: [".gpu-deps"]`, 64 MiB at most for everything carried). The GPU machine has a compiler,
# CUDA 13 (nvcc, cuBLAS), CMake, ninja, compute-sanitizer and a python3 with PyTorch (which has
# torch._grouped_mm), but no package registry and none of our build dependencies.
#
# What it fetches:
#   .gpu-deps/*.deb        Debian 12 packages, unpacked there with `dpkg -x` into a private prefix
#                          (nothing is installed system-wide; benchmarks/gpu/first_run.sh and run.sh):
#                          - build: fmt, spdlog (headers, CMake configs, shared libraries), Eigen and
#                            nlohmann-json (header-only), GoogleTest and GoogleMock (static libraries);
#                          - MPI (with --no-mpi: left out): Open MPI 4.1 (mpirun, mpicxx, headers,
#                            libmpi) and the shared libraries it loads that an Ubuntu image may lack
#                            (PMIx, libevent, hwloc, libfabric, UCX, verbs, PSM, netlink, numa, munge).
#                            The prefix is relocated with OPAL_PREFIX, so mpirun finds its plugins and
#                            help files there.
#   .gpu-deps/nccl/include the NCCL headers of this machine's CUDA, used only when the GPU machine has
#                          a libnccl.so.2 (PyTorch's nvidia-nccl wheel has one) but no nccl.h.
#   .gpu-deps/whl/         Python wheels listed in GPU_DEPS_WHEELS (none by default: the image's
#                          torch 2.11 is what the peer needs), fetched with pip download for Python
#                          3.12 manylinux x86_64; first_run.sh installs them into a private folder.
#   .gpu-deps/MANIFEST     what was fetched, with sizes (first_run.sh prints it).
#
#   benchmarks/gpu/fetch_deps.sh            # uses apt's current package lists
#   benchmarks/gpu/fetch_deps.sh --update   # runs apt-get update first
#   benchmarks/gpu/fetch_deps.sh --no-mpi   # only the build dependencies (about 2.3 MB)
#   GPU_DEPS_WHEELS="pkg==1.2 other==3.4" benchmarks/gpu/fetch_deps.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${GPU_DEPS_DIR:-$ROOT/.gpu-deps}
UPDATE=0
MPI=1
while [ $# -gt 0 ]; do
  case "$1" in
    --update) UPDATE=1 ;;
    --no-mpi) MPI=0 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "fetch_deps: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PACKAGES=(
  libfmt-dev libfmt9
  libspdlog-dev libspdlog1.10
  libeigen3-dev
  nlohmann-json3-dev
  libgtest-dev libgmock-dev
)
# Open MPI and the closure of shared libraries it loads (apt-cache depends --recurse on openmpi-bin,
# less what any glibc-based image has: libc6, libstdc++6, libgcc-s1, zlib1g, libudev1, and the
# optional hwloc plugins / ssh: mpirun on one machine needs no ssh, first_run.sh sets
# OMPI_MCA_plm_rsh_agent=false).
MPI_PACKAGES=(
  openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev
  libpmix2 libevent-core-2.1-7 libevent-pthreads-2.1-7 libhwloc15 libfabric1 libucx0
  libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200 libpsm-infinipath1 libpsm2-2 libnuma1 libmunge2
)
if [ "$MPI" -eq 1 ]; then PACKAGES+=("${MPI_PACKAGES[@]}"); fi

if [ "$UPDATE" -eq 1 ]; then
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

# NCCL headers from this machine's CUDA (a few hundred KB), for a GPU machine whose NCCL came as a
# library only.
rm -rf "$DEST/nccl"
nccl_h=""
for d in /usr/local/cuda/include /usr/include /usr/local/include; do
  if [ -f "$d/nccl.h" ]; then nccl_h=$(readlink -f "$d/nccl.h"); break; fi
done
if [ -n "$nccl_h" ]; then
  mkdir -p "$DEST/nccl/include"
  inc=$(dirname "$nccl_h")
  cp "$nccl_h" "$DEST/nccl/include/"
  # nccl.h may include nccl_device.h and the nccl_device/ folder (NCCL >= 2.28).
  [ -f "$inc/nccl_device.h" ] && cp "$inc/nccl_device.h" "$DEST/nccl/include/"
  [ -d "$inc/nccl_device" ] && cp -r "$inc/nccl_device" "$DEST/nccl/include/"
  echo "fetch_deps: NCCL headers from $inc ($(grep -m1 -E '#define NCCL_(MAJOR|VERSION_CODE)' "$nccl_h" | tr -s ' '))"
else
  echo "fetch_deps: no nccl.h on this machine: the GPU machine must bring its own NCCL headers"
fi

# Python wheels (optional).
rm -rf "$DEST/whl"
if [ -n "${GPU_DEPS_WHEELS:-}" ]; then
  mkdir -p "$DEST/whl"
  # shellcheck disable=SC2086 # a list of requirement words
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DEST/whl" $GPU_DEPS_WHEELS
fi

{
  echo "# .gpu-deps fetched $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname) ($(. /etc/os-release && echo "$PRETTY_NAME"))"
  find "$DEST" -type f ! -name MANIFEST -printf '%10s  %P\n' | sort -k2
} > "$DEST/MANIFEST"

echo "fetch_deps: $(find "$DEST" -maxdepth 1 -name '*.deb' | wc -l) packages in $DEST:"
find "$DEST" -maxdepth 1 -name '*.deb' -printf '  %8s bytes  %f\n' | sort -k3
total=$(du -sb "$DEST" | cut -f1)
echo "fetch_deps: total $((total / 1024)) KiB (the GPU call carries at most 64 MiB in all)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "fetch_deps: WARNING: more than 48 MiB; with the working tree this may exceed the 64 MiB carry limit" >&2
fi
echo "fetch_deps: next, with the device tool: benchmarks/gpu/first_run.sh (carry .gpu-deps)"
