#!/usr/bin/env bash
# Install what dsv4d needs to build, run and test on Debian 12 / Ubuntu 24.04 (run as root).
# The CUDA toolkit is optional: with nvcc on PATH the GPU backend is built too.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  build-essential clang meson ninja-build pkg-config python3 python3-pip python3-venv \
  libjansson-dev libmicrohttpd-dev libuv1-dev libonig-dev libcmocka-dev >/dev/null
echo "dsv4d: build dependencies installed"
