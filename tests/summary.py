#!/usr/bin/env python3
"""Print the closing `N passed, N failed, N skipped` line from meson's testlog.json.

meson's own summary is not what CI reads. Exit status 1 when a test failed or none ran.
"""
import json
import sys

results = [json.loads(line)["result"] for line in open(sys.argv[1]) if line.strip()]
passed = sum(r in ("OK", "EXPECTEDFAIL") for r in results)
skipped = sum(r == "SKIP" for r in results)
failed = len(results) - passed - skipped
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or not passed else 0)
