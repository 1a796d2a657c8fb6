#!/usr/bin/env bash
# Installs the Debian packages libmoecore builds against. Idempotent; run as root (or with sudo).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is expected at /usr/local/cuda when present; without it the
# CPU build is complete and the CUDA backend is simply not built.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libeigen3-dev libfmt-dev libspdlog-dev nlohmann-json3-dev
  libopenblas-dev libdnnl-dev  # CPU GEMM engines (kernels/cpu/gemm.cpp): oneDNN preferred, OpenBLAS for f64
  libopenmpi-dev openmpi-bin
  libgtest-dev libgmock-dev libbenchmark-dev
  fortunes  # the default training corpus (scripts/prepare_corpus.sh)
)
# --with-plots: matplotlib for scripts/plot_metrics.py (the main command draws the training curves).
# --with-torch: also Debian's PyTorch for /usr/bin/python3 (the parity reference and the CPU peer
# benchmark). The test command passes it so the parity suite runs rather than skips.
for opt in "$@"; do
  case "$opt" in
    --with-plots) PACKAGES+=(python3-matplotlib) ;;
    --with-torch) PACKAGES+=(python3-torch python3-numpy python3-matplotlib) ;;
    *) echo "setup: unknown option '$opt' (expected --with-plots or --with-torch)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
