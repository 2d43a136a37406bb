/*
 * chat.h - the DeepSeek-V4 chat encoding: OpenAI-shaped messages -> the exact prompt text.
 *
 * A port of the reference encoder encoding/encoding_dsv4.py (encode_messages), byte-exact on its
 * golden fixtures: BOS as text, system / developer / user / assistant / latest_reminder roles,
 * tools (TOOLS_TEMPLATE + json.dumps of each function), DSML tool calls, tool messages merged
 * into user turns as <tool_result> blocks and sorted into call order, thinking / chat modes,
 * dropping earlier reasoning, the reasoning-effort prefix, response_format, tasks and the
 * automatic <｜Assistant｜><think> (or </think>) after a final user turn.
 *
 * Input conventions (serving-layer choices, beyond the reference):
 *   - assistant reasoning may be "reasoning_content" (DeepSeek API) or "reasoning" (vLLM);
 *   - request-level tools go onto the first system message (a new empty system message at
 *     index 0 when there is none), as vLLM does since its PR #51856;
 *   - tool_calls[].function.arguments may be a JSON string (OpenAI) or an object;
 *   - user/tool content may be a list of {"type":"text","text":...} parts (joined by "\n\n");
 *     any other part type is ERR_UNSUPPORTED;
 *   - a message with "prefix": true (vLLM) is rendered without EOS (wo_eos).
 *
 * The result also records which bytes the template itself wrote (chat_prompt.ctrl), so the
 * prompt can be tokenized with control ids only where the template wrote them and everything
 * the caller supplied tokenized as plain text (chat_prompt_tokenize with safe = true).
 *
 * THREAD SAFETY: pure functions of their arguments.
 */
#ifndef DSV4_CHAT_H
#define DSV4_CHAT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "engine/tbuf.h"
#include "engine/tokenizer.h"

enum chat_mode { CHAT_MODE_CHAT = 0, CHAT_MODE_THINKING = 1 };

enum chat_effort {
    CHAT_EFFORT_NONE = 0, /* no prefix (reference None) */
    CHAT_EFFORT_LOW,      /* 0731: no prefix */
    CHAT_EFFORT_HIGH,     /* original: no prefix; 0731: "Absolute maximum" */
    CHAT_EFFORT_MAX,      /* original: "Absolute maximum"; 0731: "Beyond maximum" */
};

enum chat_revision {
    CHAT_REV_ORIGINAL = 0, /* the April 2026 release encoder (sha256 bdbd57c1...) */
    CHAT_REV_0731,         /* the 0731 GA encoder: low / high / max tiers */
};

struct chat_opts {
    enum chat_mode mode;
    enum chat_effort effort;
    enum chat_revision revision;
    bool drop_thinking; /* default true */
    bool add_bos;       /* default true */
};

/* Defaults: thinking mode, no effort prefix, original revision, drop_thinking, BOS. */
void chat_opts_init(struct chat_opts *o);

/* Parse "none" / "low" / "minimal" / "medium" / "high" / "max" (vLLM's mapping: minimal and
 * medium are low, "none" is NONE). ERR_INVAL for anything else. */
int chat_effort_parse(const char *s, enum chat_effort *out);

struct chat_prompt {
    struct tbuf text;      /* the prompt, UTF-8 */
    struct tok_span *ctrl; /* text the template wrote (trusted), in order, disjoint */
    size_t n_ctrl, cap_ctrl;
};

/*
 * Render messages (a JSON array of message objects) with optional request-level tools (a JSON
 * array of OpenAI tools, or NULL) and optional context (messages already in the KV cache, or
 * NULL; reference `context`). The inputs are not modified. On success out->text holds the prompt
 * (out must be zeroed or freed before). ERR_INVAL (with a message naming the message index) for
 * input the reference rejects; ERR_UNSUPPORTED for content it cannot render.
 */
int chat_encode(const json_t *messages, const json_t *tools, const json_t *context,
                const struct chat_opts *o, struct chat_prompt *out);

void chat_prompt_free(struct chat_prompt *p);

/*
 * Tokenize a rendered prompt, appending to ids. safe = false: the whole text with added-token
 * matching (what the reference stacks do: a user's literal "<think>" becomes the control id).
 * safe = true: control ids only at the spans the template wrote; all other text is plain.
 * The two agree whenever the caller-supplied strings contain no added-token text.
 */
int chat_prompt_tokenize(const struct tokenizer *t, const struct chat_prompt *p, bool safe,
                         struct tok_ids *ids);

#endif
