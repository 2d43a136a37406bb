#!/usr/bin/env python3
"""Generate tests/text/corpus.jsonl: the tokenizer agreement corpus (deterministic, seed fixed).

Each line is a JSON object: {"cat": CATEGORY, "text": STRING} for valid text, or
{"cat": "invalid_utf8", "hex": HEX} for raw bytes that are not valid UTF-8 (never containing a
newline byte). Run from the repository root: python3 tests/text/gen_corpus.py > tests/text/corpus.jsonl
Only the Python standard library is used (the code samples come from its own source files).
"""
import json
import os
import random
import sys
import sysconfig

R = random.Random(20260731)

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>", "<｜action｜>", "<|EOT|>",
            "<｜place▁holder▁no▁5｜>", "<|place_holder_mm_span_0021|>", "<｜/table>｜", "<｜image｜>",
            "<｜▁pad▁｜>", "<dsml:", "</dsml:", "<｜tool▁sep｜>", "<｜end_of_query｜>"]

WORDS_EN = ("the quick brown fox jumps over a lazy dog while tokenizers split text into pieces "
            "and merge bytes by rank hello world don't can't it's we'll they've I'm you'd "
            "Python C Rust JSON HTTP GPU CUDA H100 DeepSeek V4 model inference server").split()
ZH = ("我们今天讨论的是分词器的实现细节，中文没有空格。深度求索公司创造了这个模型。"
      "小柴胡冲剂和布洛芬能否一起服用？请及时就医。世界著名温泉有哪些")
JA = "これは日本語のテキストです。カタカナとひらがなと漢字が混ざっています。トークナイザーのテスト、ラーメン！"
KO = "안녕하세요 세계 토크나이저 테스트입니다"
AR = "مرحبا بالعالم هذا اختبار"
HI = "नमस्ते दुनिया यह एक परीक्षण है"
RU = "Привет мир это проверка токенизатора"
TH = "สวัสดีชาวโลก"
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "❤️", "🧑‍💻", "🙈🙉🙊", "1️⃣", "👩🏾‍🚀", "🤖"]
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…—–“”‘’«»、。，！？：；（）【】《》·￥"
WS = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", " \t ", "\u00a0",
      "\u3000", "\u2003", "\u200b", "\u2028", "\u0085", "\x0b", "\x0c", "\x1c"]
DIGITS = ["0", "7", "42", "123", "1234", "12345", "1234567", "3.14159", "1,000,000", "٣٤٥", "१२३",
          "１２３４", "½", "²³", "Ⅻ", "0x1F", "1e-5", "2026-07-31"]

# Unicode ranges sampled by the random generator (blocks with letters, marks, numbers,
# punctuation, symbols, separators and controls, plus some rarely assigned code points).
RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0x24F), (0x300, 0x36F),
          (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F),
          (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2070, 0x209F),
          (0x20A0, 0x20CF), (0x2100, 0x214F), (0x2150, 0x218F), (0x2190, 0x21FF),
          (0x2200, 0x22FF), (0x2460, 0x24FF), (0x2500, 0x257F), (0x2600, 0x26FF),
          (0x3000, 0x303F), (0x3040, 0x309F), (0x30A0, 0x30FF), (0x3400, 0x4DBF),
          (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xF900, 0xFAFF), (0xFE00, 0xFE0F),
          (0xFF00, 0xFFEF), (0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF),
          (0x20000, 0x2A6DF), (0xE0000, 0xE007F), (0xF0000, 0xF00FF)]


def rand_cp():
    lo, hi = R.choice(RANGES)
    while True:
        cp = R.randint(lo, hi)
        if not 0xD800 <= cp <= 0xDFFF:
            return chr(cp)


def rand_unicode(n):
    return "".join(rand_cp() for _ in range(n))


def pick_words(k):
    return " ".join(R.choice(WORDS_EN) for _ in range(k))


def code_samples():
    """Functions cut from the stdlib's own .py files: indentation, tabs, comments, strings."""
    libdir = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(libdir) if f.endswith(".py"))
    out = []
    for name in names[:200]:
        try:
            with open(os.path.join(libdir, name), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) < 40:
            continue
        start = R.randint(0, len(lines) - 30)
        out.append("\n".join(lines[start:start + R.randint(3, 30)]))
    return out


def mix(parts, k):
    return "".join(R.choice(parts) for _ in range(k))


def main():
    items = []

    def add(cat, text):
        items.append({"cat": cat, "text": text})

    for s in code_samples():
        add("code", s)
        add("code_tabs", s.replace("    ", "\t"))
        add("code_crlf", s.replace("\n", "\r\n"))
    for _ in range(200):
        add("whitespace", mix(WS + ["a", "b", "x", "1", ".", "Hello", "world", "int"], R.randint(1, 25)))
    for _ in range(100):
        add("ws_runs", R.choice(["", "a", "x"]) + R.choice(WS) * R.randint(1, 40) + R.choice(["", "b", "int", "\n", "。"]))
    for _ in range(150):
        i = R.randint(0, len(ZH) - 2)
        add("cjk", ZH[i:i + R.randint(1, 40)] + R.choice(["", " ", "123", "abc", "。", "\n"]) + ZH[:R.randint(0, 10)])
    for _ in range(100):
        i = R.randint(0, len(JA) - 2)
        add("japanese", JA[i:i + R.randint(1, 30)] + R.choice(["", " ", "ｶﾀｶﾅ", "ー", "々", "〜"]))
    for _ in range(120):
        add("emoji", mix(EMOJI + [" ", "a", "好", "!", "\u200d", "\ufe0f", "🏻"], R.randint(1, 15)))
    for _ in range(150):
        add("digits", mix(DIGITS + [" ", "-", ".", "a", "x", "\n", "号"], R.randint(1, 12)) + "".join(R.choice("0123456789") for _ in range(R.randint(0, 30))))
    for _ in range(150):
        add("punct", mix(list(PUNCT) + [" ", "a", "Z", "\n", "\r", "ab", "好"], R.randint(1, 30)))
    scripts = [ZH, JA, KO, AR, HI, RU, TH, " ".join(WORDS_EN)]
    for _ in range(200):
        parts = []
        for _ in range(R.randint(2, 8)):
            s = R.choice(scripts)
            i = R.randint(0, len(s) - 2)
            parts.append(s[i:i + R.randint(1, 20)])
        add("mixed", R.choice(["", " ", "\n"]).join(parts))
    for _ in range(150):
        parts = [pick_words(R.randint(0, 4)) for _ in range(R.randint(1, 5))]
        add("special", "".join(p + R.choice(SPECIALS) for p in parts) + R.choice(["", "tail", " ", "\n"]))
    for s in SPECIALS:
        add("special_alone", s)
        add("special_partial", s[:-1])
    for _ in range(40):
        add("english", pick_words(R.randint(1, 60)) + R.choice([".", "!", "?", "\n", ""]))
    for _ in range(300):
        add("random_unicode", rand_unicode(R.randint(1, 40)))
    # Very long lines: a few tens of KB each.
    add("long_letters", "a" * 20000)
    add("long_spaces", " " * 10000 + "x")
    add("long_newlines", "\n" * 5000)
    add("long_digits", "1234567890" * 2000)
    add("long_cjk", ZH * 200)
    add("long_words", pick_words(8000))
    add("long_mixed", rand_unicode(20000))
    add("long_punct", "-=" * 8000)
    add("long_emoji", "👨‍👩‍👧‍👦" * 2000)
    add("empty", "")
    # Invalid UTF-8 (no newline bytes: the test feeds these as raw lines).
    bad = [b"\xff", b"\xc3", b"abc\xe4\xbd", b"\xe4\xbd\xa0\xe5", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
           b"\xc0\xaf", b"\xe0\x80\xaf", b"a\x80b", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80\x80",
           b"hello \xfe world", b"\xef\xbb\xbfBOM", b"\xc3\x28", b"\xa0\xa1", b"\xf8\x88\x80\x80\x80"]
    for _ in range(60):
        b = bytearray(rand_unicode(R.randint(1, 15)).encode("utf-8"))
        for _ in range(R.randint(1, 3)):
            b.insert(R.randint(0, len(b)), R.choice([0x80, 0xbf, 0xc3, 0xe4, 0xf0, 0xff, 0xed]))
        bad.append(bytes(b).replace(b"\n", b" "))
    for b in bad:
        items.append({"cat": "invalid_utf8", "hex": b.hex()})
    for it in items:
        sys.stdout.write(json.dumps(it, ensure_ascii=True) + "\n")
    print(f"{len(items)} strings", file=sys.stderr)


if __name__ == "__main__":
    main()
