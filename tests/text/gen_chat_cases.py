#!/usr/bin/env python3
"""Random chat requests for the encoder differential test (deterministic seed).

    gen_chat_cases.py ORACLE_DIR N > cases.jsonl

ORACLE_DIR holds the reference encoding_dsv4.py (from the official DeepSeek-V4 release; not part
of this repository). Each output line is {"args": [...chat-encode flags], "request": {...},
"expected": PROMPT}: the reference's encode_messages output for that request. Cases the
reference rejects (asserts, crashes) are skipped. The committed tests/text/chat_cases.jsonl was
made with this script.
"""
import copy
import json
import random
import sys

sys.path.insert(0, sys.argv[1])
import encoding_dsv4 as ref  # noqa: E402

R = random.Random(4)
TEXTS = ["", "Hello", "What's the weather in Beijing?", "你好，世界", "line1\nline2", "  spaced  ",
         "tab\there", "quote \" and \\ backslash", "emoji 👨‍👩‍👧", "control \x01\x1f chars",
         "CJK 日本語テキスト", "Result: {\"a\": 1}", "ünïcödé", "\u2028sep\u2029", "1.5e-7",
         "<b>bold</b>", "trailing\n\n"]
FLOATS = [0.0, -0.0, 1.0, 1.5, 0.1, 1e-05, 1e16, 1e15, 123456789.125, -2.5e-300, 3.14159,
          1e22, 0.0001, 2.0 ** 60]


def rtext():
    return R.choice(TEXTS) + (R.choice(TEXTS) if R.random() < 0.3 else "")


def rvalue(depth=0):
    k = R.randint(0, 8 if depth < 2 else 5)
    if k == 0:
        return rtext()
    if k == 1:
        return R.randint(-10 ** 12, 10 ** 12)
    if k == 2:
        return R.choice(FLOATS)
    if k == 3:
        return R.choice([True, False])
    if k == 4:
        return None
    if k == 5:
        return rtext()
    if k in (6, 7):
        return [rvalue(depth + 1) for _ in range(R.randint(0, 3))]
    return {R.choice(["a", "b", "名前", "x y", "k\"q"]) + str(i): rvalue(depth + 1)
            for i in range(R.randint(0, 3))}


def rtool(i):
    props = {f"p{j}": {"type": R.choice(["string", "integer", "number", "array"]),
                       "description": rtext()} for j in range(R.randint(0, 3))}
    fn = {"name": f"tool_{i}", "description": rtext(),
          "parameters": {"type": "object", "properties": props, "required": list(props)[:1]}}
    if R.random() < 0.3:
        fn["parameters"]["default"] = rvalue()
    return {"type": "function", "function": fn}


def rargs():
    r = R.random()
    if r < 0.75:
        return json.dumps({f"arg{j}": rvalue() for j in range(R.randint(0, 4))},
                          ensure_ascii=R.random() < 0.5)
    if r < 0.9:
        return "not json {"
    return json.dumps({"x": 1}, indent=2)


def rconv():
    msgs = []
    ids = 0
    if R.random() < 0.7:
        msgs.append({"role": "system", "content": rtext() or "sys"})
    for _ in range(R.randint(1, 6)):
        r = R.random()
        if r < 0.1:
            msgs.append({"role": "latest_reminder", "content": rtext()})
        if r < 0.15:
            msgs.append({"role": "developer", "content": rtext() or "dev"})
        else:
            m = {"role": "user", "content": rtext()}
            if R.random() < 0.08:
                m["task"] = R.choice(["action", "query", "title", "domain"])
            msgs.append(m)
        if R.random() < 0.2:
            msgs.append({"role": "user", "content": rtext()})
        if R.random() < 0.8:
            a = {"role": "assistant", "content": rtext()}
            if R.random() < 0.6:
                a["reasoning_content"] = rtext()
            if R.random() < 0.4:
                calls = []
                for _ in range(R.randint(1, 3)):
                    ids += 1
                    calls.append({"id": f"call_{ids}", "type": "function",
                                  "function": {"name": f"tool_{R.randint(0, 3)}", "arguments": rargs()}})
                a["tool_calls"] = calls
                msgs.append(a)
                order = list(calls)
                R.shuffle(order)
                for c in order:
                    t = {"role": "tool", "tool_call_id": c["id"], "content": rtext()}
                    if R.random() < 0.1:
                        t["content"] = [{"type": "text", "text": rtext()}, {"type": "image"}]
                    msgs.append(t)
                continue
            if R.random() < 0.05:
                a["wo_eos"] = True
            msgs.append(a)
    return msgs


def main():
    n = int(sys.argv[2])
    out = 0
    while out < n:
        msgs = rconv()
        tools = [rtool(i) for i in range(R.randint(0, 3))] if R.random() < 0.5 else None
        mode = R.choice(["thinking", "chat"])
        effort = R.choice([None, "high", "max"])
        drop = R.random() < 0.8
        ctx_n = R.randint(0, min(2, len(msgs) - 1)) if R.random() < 0.15 else 0
        rf = {"type": "json_schema", "schema": {"type": "object", "x": R.choice(FLOATS)}} if R.random() < 0.1 else None
        ref_msgs = copy.deepcopy(msgs)
        if tools:
            for m in ref_msgs:
                if m["role"] == "system":
                    m["tools"] = tools
                    break
            else:
                ref_msgs.insert(0, {"role": "system", "tools": tools})
        if rf:
            for m in ref_msgs:
                if m["role"] == "system":
                    m["response_format"] = rf
                    break
        context, rest = ref_msgs[:ctx_n], ref_msgs[ctx_n:]
        try:
            expected = ref.encode_messages(rest, mode, context=context or None, drop_thinking=drop,
                                           reasoning_effort=effort)
        except Exception:
            continue
        req = {"messages": rest}
        if context:
            req["context"] = context
        args = ["--mode", mode]
        if effort:
            args += ["--reasoning-effort", effort]
        if not drop:
            args.append("--keep-thinking")
        sys.stdout.write(json.dumps({"args": args, "request": req, "expected": expected},
                                    ensure_ascii=False) + "\n")
        out += 1


if __name__ == "__main__":
    main()
