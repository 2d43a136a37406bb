"""Shared helpers of the tests/text oracle tests: paths, the corpus, and running text_cli."""
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def tokenizer_path():
    env = os.environ.get("DSV4_TOKENIZER")
    if env:
        return env
    return os.path.join(os.environ.get("DSV4_BUILD_ROOT", "build"), "tokenizer.json")


def text_cli():
    return os.environ.get("DSV4_TEXT_CLI") or os.path.join(
        os.environ.get("DSV4_BUILD_ROOT", "build"), "tests", "text", "text_cli")


def corpus():
    """[(category, text_or_None, raw_bytes_or_None)] from tests/text/corpus.jsonl."""
    out = []
    with open(os.path.join(HERE, "corpus.jsonl"), encoding="utf-8") as f:
        for line in f:
            it = json.loads(line)
            if "text" in it:
                out.append((it["cat"], it["text"], None))
            else:
                out.append((it["cat"], None, bytes.fromhex(it["hex"])))
    return out


def run_cli(args, data: bytes) -> bytes:
    p = subprocess.run([text_cli()] + args, input=data, capture_output=True)
    if p.returncode != 0:
        raise AssertionError(f"text_cli {' '.join(args)} failed ({p.returncode}): "
                             f"{p.stderr.decode(errors='replace')}")
    return p.stdout


def tokenize_texts(texts, special, pieces=False):
    """Our ids (or pieces) for each text, via `tokenize --json-lines`."""
    args = ["tokenize", "--tokenizer", tokenizer_path(), "--json-lines"]
    if special:
        args.append("--special")
    if pieces:
        args.append("--pieces")
    data = "".join(json.dumps(t) + "\n" for t in texts).encode()
    lines = run_cli(args, data).decode().split("\n")[: len(texts)]
    if pieces:
        return [json.loads(ln) for ln in lines]
    return [[int(x) for x in ln.split()] for ln in lines]


def hf_tokenizers():
    """(with added tokens, without added tokens): HF tokenizers on the same tokenizer.json."""
    from tokenizers import Tokenizer
    with open(tokenizer_path(), encoding="utf-8") as f:
        j = json.load(f)
    full = Tokenizer.from_str(json.dumps(j))
    j["added_tokens"] = []
    plain = Tokenizer.from_str(json.dumps(j))
    return full, plain
