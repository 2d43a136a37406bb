#!/usr/bin/env python3
"""Run one e2e pytest file against a real dsv4d; exit 77 (meson's "skipped") when what it needs
is missing: the Python modules (deploy/install-deps.sh installs them into /opt/dsv4d-e2e) or the
DeepSeek-V4 tokenizer.json that `dsv4d serve` loads for the built-in model (DSV4D_TOKENIZER, or
the data dir deploy/install-deps.sh fills)."""
import importlib
import os
import subprocess
import sys

test = sys.argv[1]
need = ["pytest", "openai", "httpx"] + (["schemathesis"] if "schema" in test else [])
for mod in need:
    try:
        importlib.import_module(mod)
    except ImportError as e:
        print(f"skip: {e} (bash deploy/install-deps.sh creates /opt/dsv4d-e2e)")
        sys.exit(77)
tok = os.environ.get("DSV4D_TOKENIZER")
if not tok:
    for d in [os.environ.get("DSV4D_DATA_DIR"), "/usr/local/share/dsv4d", "/usr/share/dsv4d"]:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            tok = os.path.join(d, "tokenizer.json")
            break
if not tok or not os.path.isfile(tok):
    print("skip: no DeepSeek-V4 tokenizer.json (DSV4D_TOKENIZER, or deploy/install-deps.sh)")
    sys.exit(77)
os.environ["DSV4D_TOKENIZER"] = tok
here = os.path.dirname(os.path.abspath(__file__))
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          os.path.join(here, test)] + sys.argv[2:], cwd=here))
