#!/usr/bin/env python3
"""Completions and their reference parses, for the output-parser test (deterministic).

    gen_parse_cases.py ORACLE_DIR CHAT_CASES_JSONL > parse_cases.jsonl

ORACLE_DIR holds the reference encoding_dsv4.py (not part of this repository). Every assistant
message of the chat cases is rendered as the model would generate it (render_message with
thinking kept: "{reasoning}</think>{content}{DSML tool calls}<｜end▁of▁sentence｜>", or without the
reasoning part in chat mode) and parsed back with the reference
parse_message_from_completion_text. Each line: {"text", "thinking", "reasoning", "content",
"tool_calls": [{"name", "arguments"}]}. Completions the reference rejects are skipped.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import encoding_dsv4 as ref  # noqa: E402

seen = set()
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        case = json.loads(line)
        for m in case["request"]["messages"]:
            if m.get("role") != "assistant":
                continue
            for mode in ("thinking", "chat"):
                msg = dict(m)
                msg.pop("wo_eos", None)
                text = ref.render_message(0, [msg], mode, drop_thinking=False)
                if text in seen:
                    continue
                seen.add(text)
                try:
                    p = ref.parse_message_from_completion_text(text, mode)
                except Exception:
                    continue
                out = {"text": text, "thinking": mode == "thinking",
                       "reasoning": p["reasoning_content"], "content": p["content"],
                       "tool_calls": [tc["function"] for tc in p["tool_calls"]]}
                sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
