"""Token ids identical to HF `tokenizers` on the committed corpus (tests/text/corpus.jsonl).

Also: decode(encode(x)) == x, decode equal to HF's decode, invalid UTF-8 handled as HF handles
the same bytes decoded with errors="replace"."""
import collections
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402

CORPUS = oracle.corpus()
TEXTS = [t for c, t, b in CORPUS if t is not None]
CATS = [c for c, t, b in CORPUS if t is not None]
RAW = [b for c, t, b in CORPUS if b is not None]


@pytest.fixture(scope="module")
def hf():
    return oracle.hf_tokenizers()


def assert_same(ours, ref, label, inputs):
    bad = [i for i in range(len(ref)) if ours[i] != ref[i]]
    print(f"{label}: {len(ref) - len(bad)}/{len(ref)} identical")
    if bad:
        i = bad[0]
        pytest.fail(f"{label}: {len(bad)} differ; first {inputs[i]!r:.200}: ours {ours[i][:30]} "
                    f"HF {ref[i][:30]}")


def test_corpus_shape():
    assert len(CORPUS) >= 2000
    cats = collections.Counter(c for c, _, _ in CORPUS)
    for need in ["code", "code_tabs", "whitespace", "cjk", "japanese", "emoji", "digits", "punct",
                 "mixed", "special", "long_letters", "invalid_utf8", "random_unicode"]:
        assert cats[need] > 0, need


def test_ids_with_added_tokens(hf):
    full, _ = hf
    ours = oracle.tokenize_texts(TEXTS, special=True)
    ref = [e.ids for e in full.encode_batch(TEXTS, add_special_tokens=False)]
    assert_same(ours, ref, "added tokens on", TEXTS)


def test_ids_plain_text(hf):
    """Without --special, added-token strings are ordinary text (HF with no added tokens)."""
    _, plain = hf
    ours = oracle.tokenize_texts(TEXTS, special=False)
    ref = [e.ids for e in plain.encode_batch(TEXTS, add_special_tokens=False)]
    assert_same(ours, ref, "added tokens off", TEXTS)


def test_invalid_utf8(hf):
    full, _ = hf
    data = b"".join(b + b"\n" for b in RAW)
    out = oracle.run_cli(["tokenize", "--tokenizer", oracle.tokenizer_path(), "--special"], data)
    ours = [[int(x) for x in ln.split()] for ln in out.decode().split("\n")[: len(RAW)]]
    ref = [full.encode(b.decode("utf-8", "replace"), add_special_tokens=False).ids for b in RAW]
    assert_same(ours, ref, "invalid UTF-8 (as errors='replace')", RAW)


def detokenize(id_lists):
    data = "".join(" ".join(map(str, ids)) + "\n" for ids in id_lists).encode()
    out = oracle.run_cli(["detokenize", "--tokenizer", oracle.tokenizer_path(), "--json-lines"], data)
    import json
    return [json.loads(ln) for ln in out.decode().split("\n")[: len(id_lists)]]


def test_roundtrip():
    for special in (True, False):
        ids = oracle.tokenize_texts(TEXTS, special=special)
        back = detokenize(ids)
        bad = [i for i in range(len(TEXTS)) if back[i] != TEXTS[i]]
        assert not bad, f"decode(encode(x)) != x for {len(bad)} texts, e.g. {TEXTS[bad[0]]!r:.100}"


def test_decode_matches_hf(hf):
    full, _ = hf
    rng = random.Random(5)
    n = full.get_vocab_size(with_added_tokens=True)
    seqs = [[rng.randrange(n) for _ in range(rng.randint(1, 12))] for _ in range(1500)]
    # Many single byte-tokens too (ids 3..258), where partial UTF-8 shows.
    seqs += [[rng.randint(3, 258) for _ in range(rng.randint(1, 6))] for _ in range(1500)]
    ours = detokenize(seqs)
    ref = [full.decode(s, skip_special_tokens=False) for s in seqs]
    bad = [i for i in range(len(seqs)) if ours[i] != ref[i]]
    assert not bad, f"{len(bad)} differ, e.g. {seqs[bad[0]]}: ours {ours[bad[0]]!r} HF {ref[bad[0]]!r}"
