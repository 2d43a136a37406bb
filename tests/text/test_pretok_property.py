"""Property test of the pre-tokenizer on random Unicode.

Our pieces (Oniguruma running the tokenizer.json Split regexes) must equal HF tokenizers' own
pre_tokenize_str on every string, and equal the Python `regex` module running the same patterns
with Isolated semantics wherever `regex` itself agrees with HF (the two engines' Unicode tables
can differ on a few code points; those are counted and printed, and must stay rare)."""
import json
import os
import random
import sys

import pytest
import regex

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402

N = 3000

# Weighted pools: ASCII classes, the CJK range edges of pattern 2, every kind of space, marks,
# numbers of other scripts, symbols, emoji, unassigned / private-use / noncharacter code points.
POOLS = [
    (30, [chr(c) for c in range(0x20, 0x7F)]),
    (10, list(" \t\n\r\x0b\x0c") * 3),
    (6, [chr(c) for c in (0x85, 0xA0, 0x1680, 0x2000, 0x2005, 0x200A, 0x2028, 0x2029, 0x202F,
                          0x205F, 0x3000, 0xFEFF, 0x180E, 0x200B, 0x1C, 0x1D, 0x1E, 0x1F)]),
    (8, [chr(c) for c in (0x4E00, 0x4E01, 0x9FA5, 0x9FA6, 0x9FFF, 0x3040, 0x3041, 0x309F, 0x30A0,
                          0x30FB, 0x30FC, 0x30FF, 0x3400, 0x31F0, 0xFF66, 0x3005, 0x3007)]),
    (6, [chr(c) for c in list(range(0x300, 0x370)) + [0x20DD, 0x1AB0, 0xFE0F, 0x200D]]),
    (6, [chr(c) for c in (0x0660, 0x0969, 0x0E51, 0xFF11, 0x00B2, 0x00BD, 0x2162, 0x3007,
                          0x1D7CE, 0x10107, 0x2460, 0x24F5, 0x1F100, 0x0F33)]),
    (6, [chr(c) for c in (0x2018, 0x201C, 0x3001, 0x3002, 0xFF01, 0xFF1F, 0x00A7, 0x00B6, 0x2E3A,
                          0x05BE, 0x058A, 0x2010, 0xFE58, 0x00AB, 0x00BB, 0x1F600, 0x1F44D,
                          0x20AC, 0x00A9, 0x2122, 0x221E, 0x2190, 0x02C2, 0x00AF, 0x1F3FB)]),
    (10, None),  # any code point of the BMP or beyond, surrogates excluded
    (3, [chr(c) for c in (0x0378, 0x0CF3, 0x1E030, 0x2FFFF, 0xE000, 0xF8FF, 0xFDD0, 0xFFFE,
                          0x10FFFF, 0x1FBF0, 0x11F00, 0x31350, 0x2EBF0)]),
]


def rand_char(rng):
    total = sum(w for w, _ in POOLS)
    r = rng.uniform(0, total)
    for w, pool in POOLS:
        r -= w
        if r <= 0:
            break
    if pool is None:
        while True:
            c = rng.randint(0x80, 0x10FFFF if rng.random() < 0.3 else 0xFFFF)
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)
    return rng.choice(pool)


def strings():
    rng = random.Random(1234)
    out = []
    for _ in range(N):
        n = rng.randint(1, 24)
        out.append("".join(rand_char(rng) for _ in range(n)))
    return out


def regex_pieces(patterns, s):
    pieces = [s]
    for pat in patterns:
        nxt = []
        for p in pieces:
            last = 0
            for m in pat.finditer(p):
                if m.start() > last:
                    nxt.append(p[last:m.start()])
                if m.end() > m.start():
                    nxt.append(m.group())
                last = m.end()
            if last < len(p):
                nxt.append(p[last:])
        pieces = nxt
    return pieces


@pytest.fixture(scope="module")
def setup():
    with open(oracle.tokenizer_path(), encoding="utf-8") as f:
        j = json.load(f)
    pts = j["pre_tokenizer"]["pretokenizers"]
    patterns = [regex.compile(p["pattern"]["Regex"]) for p in pts if p["type"] == "Split"]
    _, plain = oracle.hf_tokenizers()
    return patterns, plain


def test_pieces(setup):
    patterns, plain = setup
    ss = strings()
    ours = oracle.tokenize_texts(ss, special=False, pieces=True)
    hf_vs_ours = regex_vs_hf = regex_vs_ours = 0
    examples = []
    for s, o in zip(ss, ours):
        hf = [s[a:b] for _, (a, b) in plain.pre_tokenizer.pre_tokenize_str(s)]
        rx = regex_pieces(patterns, s)
        if o != hf:
            hf_vs_ours += 1
            examples.append((s, o, hf))
        if rx != hf:
            regex_vs_hf += 1
        elif rx != o:
            regex_vs_ours += 1
    print(f"{len(ss)} random strings: ours == HF on {len(ss) - hf_vs_ours}; "
          f"python-regex != HF on {regex_vs_hf} (Unicode table differences); "
          f"ours != python-regex where regex == HF: {regex_vs_ours}")
    assert hf_vs_ours == 0, f"first: {examples[0]!r}"
    assert regex_vs_ours == 0
    assert regex_vs_hf <= len(ss) // 20
    # and the ids, through BPE
    ids = oracle.tokenize_texts(ss, special=False)
    ref = [e.ids for e in plain.encode_batch(ss, add_special_tokens=False)]
    assert ids == ref


def test_every_code_point(setup):
    """Each of the 1,112,064 scalar values once, in shuffled runs mixed with ASCII and spaces."""
    _, plain = setup
    rng = random.Random(99)
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    rng.shuffle(cps)
    fillers = list(" a1.\n\t") + ["  ", "ab", "\r\n"]
    ss = []
    for i in range(0, len(cps), 48):
        parts = []
        for c in cps[i:i + 48]:
            parts.append(chr(c))
            if rng.random() < 0.25:
                parts.append(rng.choice(fillers))
        ss.append("".join(parts))
    ours = oracle.tokenize_texts(ss, special=False, pieces=True)
    bad = 0
    first = None
    for s, o in zip(ss, ours):
        hf = [s[a:b] for _, (a, b) in plain.pre_tokenizer.pre_tokenize_str(s)]
        if o != hf:
            bad += 1
            first = first or (s, o, hf)
    print(f"every code point: {len(ss) - bad}/{len(ss)} strings split as HF does")
    assert bad == 0, f"first: {first!r:.300}"
