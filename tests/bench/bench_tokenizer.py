#!/usr/bin/env python3
"""Encode throughput, one thread: ours (bench_tokenizer) vs HF tokenizers, same corpus, same run.

    bench_tokenizer.py [--seconds S] [--corpus tests/text/corpus.jsonl]

Needs the `tokenizers` module, the tokenizer.json ($DSV4_TOKENIZER or <build>/tokenizer.json) and
the bench_tokenizer binary ($DSV4_BENCH_TOKENIZER or <build>/tests/text/bench_tokenizer). Both
sides encode every corpus text with added-token matching, repeatedly for S seconds; HF calls
Tokenizer.encode once per text (no batching, so one thread) after a warm-up pass. Exit 77 when
something is missing.
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "text"))
import oracle  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--corpus", default=os.path.join(HERE, "..", "text", "corpus.jsonl"))
    a = ap.parse_args()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("skip: no tokenizers module")
        return 77
    tok_path = oracle.tokenizer_path()
    bench = os.environ.get("DSV4_BENCH_TOKENIZER") or os.path.join(
        os.environ.get("DSV4_BUILD_ROOT", "build"), "tests", "text", "bench_tokenizer")
    if not os.path.isfile(tok_path) or not os.path.isfile(bench):
        print(f"skip: need {tok_path} and {bench}")
        return 77
    texts = []
    with open(a.corpus, encoding="utf-8") as f:
        for line in f:
            it = json.loads(line)
            if "text" in it:
                texts.append(it["text"])
    nbytes = sum(len(t.encode()) for t in texts)
    tok = Tokenizer.from_file(tok_path)
    for t in texts:  # warm-up (HF's word cache, like ours)
        tok.encode(t, add_special_tokens=False)
    passes, ntok, t0 = 0, 0, time.perf_counter()
    while True:
        for t in texts:
            ntok += len(tok.encode(t, add_special_tokens=False).ids)
        passes += 1
        el = time.perf_counter() - t0
        if el >= a.seconds:
            break
    hf = nbytes * passes / el / 1e6
    print(f"HF tokenizers: {hf:.2f} MB/s, {ntok / el:.0f} tokens/s ({len(texts)} texts, "
          f"{nbytes} bytes, {passes} passes, {el:.2f} s)")
    out = subprocess.run([bench, tok_path, a.corpus, str(a.seconds)], capture_output=True,
                         text=True, check=True).stdout.strip()
    print(out)
    ours = float(out.split()[1])
    print(f"ratio ours/HF: {ours / hf:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
