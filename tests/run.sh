#!/usr/bin/env bash
# Build dsv4d and run the whole test suite; ends with `N passed, N failed, N skipped`.
# Usage: tests/run.sh [BUILD_DIR]    (after deploy/install-deps.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-test}
if [ ! -d "$build" ]; then
  meson setup "$build" -Dbuildtype=debugoptimized -Db_ndebug=false || exit 1
fi
ninja -C "$build" || exit 1
meson test -C "$build" --print-errorlogs --num-processes 2 --timeout-multiplier 3
python3 tests/summary.py "$build/meson-logs/testlog.json"
