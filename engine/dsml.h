/*
 * dsml.h - parsing what DSV4 generates: reasoning, content and DSML tool calls.
 *
 * One incremental state machine serves both streaming and finished text (a finished parse is
 * feed(all) + finish), so the two always agree. It takes decoded text (valid UTF-8, e.g. from
 * tok_stream_feed) in chunks of any size and reports events in order:
 *   DSML_EV_REASONING / DSML_EV_CONTENT  text deltas;
 *   DSML_EV_TOOL_BEGIN                   a tool call starts: index, id ("call_" + 24 hex), name;
 *   DSML_EV_TOOL_ARGS                    a fragment of its arguments JSON text;
 *   DSML_EV_TOOL_END                     its arguments are complete.
 * Concatenating a call's TOOL_ARGS fragments gives exactly the reference's
 * decode_dsml_to_arguments: "{" + ", ".join(json(key) + ": " + (json(value) if string="true"
 * else the raw value text)) + "}".
 *
 * Grammar (reference parse_message_from_completion_text, read leniently):
 *   [reasoning "</think>"] content ["\n\n"] "<｜DSML｜tool_calls>" ws
 *   ( "<｜DSML｜invoke" ws 'name="' NAME '">' ws
 *     ( "<｜DSML｜parameter" ws 'name="' KEY '"' ws 'string="' ("true"|"false") '">' VALUE
 *       "</｜DSML｜parameter>" ws )* "</｜DSML｜invoke>" ws )* "</｜DSML｜tool_calls>"
 *   ["<｜end▁of▁sentence｜>"]
 * The parser starts in reasoning when thinking, else in content. "</think>" ends reasoning; a
 * tool-call block inside reasoning also ends it (as vLLM). Stray "<think>" / "</think>" are
 * dropped from content. Text after the EOS string is ignored. Text that could still be the start
 * of a control sequence is held back until it is decided, so no half-written control sequence
 * ever reaches a content or reasoning delta. Malformed DSML never fails: an open tool call is
 * closed with valid JSON, and the unparsed text (with the block opener if no call had started)
 * continues as content.
 *
 * THREAD SAFETY: a parser belongs to one thread at a time.
 */
#ifndef DSV4_DSML_H
#define DSV4_DSML_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tbuf.h"

enum dsml_event_kind {
    DSML_EV_REASONING,
    DSML_EV_CONTENT,
    DSML_EV_TOOL_BEGIN,
    DSML_EV_TOOL_ARGS,
    DSML_EV_TOOL_END,
};

struct dsml_event {
    enum dsml_event_kind kind;
    const char *text; /* REASONING / CONTENT / TOOL_ARGS: the delta (borrowed, not NUL-ended) */
    size_t len;
    int tool_index;   /* TOOL_*: 0, 1, ... in order */
    const char *id;   /* TOOL_BEGIN: NUL-terminated */
    const char *name; /* TOOL_BEGIN: NUL-terminated */
};

/* Receives each event; returns 0, or a negative ERR_* code that stops the parser and is
 * returned by feed/finish. */
typedef int (*dsml_emit_fn)(void *ud, const struct dsml_event *ev);

struct dsml_parser;

/* thinking: start in reasoning. id_seed: tool-call ids are derived from it (pass randomness). */
int dsml_parser_new(bool thinking, uint64_t id_seed, dsml_emit_fn fn, void *ud,
                    struct dsml_parser **out);
/* Feed the next decoded text. 0, or a negative ERR_* (memory, or the callback's code). */
int dsml_parser_feed(struct dsml_parser *p, const char *text, size_t len);
/* End of generation: flush held text and close anything open. Feeding afterwards is an error. */
int dsml_parser_finish(struct dsml_parser *p);
void dsml_parser_free(struct dsml_parser *p);

/* A finished parse in OpenAI shape. */
struct dsml_result {
    struct tbuf reasoning;
    struct tbuf content;
    json_t *tool_calls; /* [{"id", "type": "function", "function": {"name", "arguments"}}] */
};

/* Parse a whole completion (text after the prompt, EOS string optional). out must be zeroed;
 * free with dsml_result_free. Only allocation failures fail. */
int dsml_parse(const char *text, size_t len, bool thinking, uint64_t id_seed,
               struct dsml_result *out);
void dsml_result_free(struct dsml_result *r);

#endif
