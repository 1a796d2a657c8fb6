#!/usr/bin/env bash
# Installs the Debian packages libmoecore builds against. Idempotent; run as root (or with sudo).
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is expected at /usr/local/cuda when present; without it the
# CPU build is complete and the CUDA backend is simply not built.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libeigen3-dev libfmt-dev libspdlog-dev nlohmann-json3-dev
  libopenblas-dev
  libopenmpi-dev openmpi-bin
  libgtest-dev libgmock-dev libbenchmark-dev
)
# --with-torch: also Debian's PyTorch for /usr/bin/python3 (the parity reference and the CPU peer
# benchmark). The test command passes it so the parity suite runs rather than skips.
if [ "${1:-}" = "--with-torch" ]; then
  PACKAGES+=(python3-torch python3-numpy)
fi

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
