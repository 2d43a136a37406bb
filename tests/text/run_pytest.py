#!/usr/bin/env python3
"""Run one pytest file; exit 77 (meson's "skipped") when the oracle modules are missing.

DSV4_ORACLE_PYTHON names another interpreter to re-run under (one that has the modules)."""
import os
import subprocess
import sys

alt = os.environ.get("DSV4_ORACLE_PYTHON")
if alt and os.path.realpath(alt) != os.path.realpath(sys.executable) and not os.environ.get("_DSV4_REEXEC"):
    os.environ["_DSV4_REEXEC"] = "1"
    sys.exit(subprocess.call([alt] + sys.argv))
try:
    import pytest  # noqa: F401
    import regex  # noqa: F401
    import tokenizers  # noqa: F401
except ImportError as e:
    print(f"skip: {e} (pip install tokenizers regex pytest, or set DSV4_ORACLE_PYTHON)")
    sys.exit(77)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402

if not os.path.isfile(oracle.tokenizer_path()):
    print(f"skip: no tokenizer.json at {oracle.tokenizer_path()} (tests/text/fetch_tokenizer.sh)")
    sys.exit(77)
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"] + sys.argv[1:]))
