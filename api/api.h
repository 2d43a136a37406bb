/*
 * api.h - the OpenAI wire format: request JSON -> validated C structs, and the response, chunk
 * and error JSON the server writes (jansson).
 *
 * Requests: api_parse_gen() turns a /v1/completions or /v1/chat/completions body into a struct
 * api_gen_request. Every wrong type or out-of-range value is refused with a struct api_error
 * naming the offending `param` (400, type "invalid_request_error"), as OpenAI does; unknown
 * fields are ignored. Parsing needs no tokenizer or model: checks that do (token ids against the
 * vocabulary, prompt + max_tokens against max_model_len) are the server's.
 *
 * Responses: builders return new jansson references (the caller owns them, or passes them on to
 * a function whose parameter is marked "steals"); api_dump() turns one into compact JSON text.
 *
 * THREAD SAFETY: pure functions of their arguments; a request struct belongs to one thread.
 */
#ifndef DSV4_API_H
#define DSV4_API_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

/* ---- errors ---- */

/* Caps that bound what one request can ask for (beyond the body-size cap). */
#define API_MAX_PROMPTS 64        /* prompts in one /v1/completions request */
#define API_MAX_N 16              /* choices per prompt (the engine's limit) */
#define API_MAX_LOGIT_BIAS 1024   /* logit_bias entries */
#define API_MAX_STOP_IDS 64       /* stop_token_ids entries */
#define API_MAX_PROMPT_IDS (1 << 22)

struct api_error {
    int status;          /* HTTP status: 400, 401, 404, 405, 413, 415, 500, 503 ... */
    const char *type;    /* static: "invalid_request_error", "authentication_error", ... */
    const char *code;    /* static or NULL (JSON null) */
    char param[64];      /* "" means null */
    char message[512];
};

/*
 * Fill *e (param and code may be NULL) and return ERR_INVAL, so a failure site reads
 * `return api_error_set(e, 400, "invalid_request_error", "n", NULL, "...")`.
 */
int api_error_set(struct api_error *e, int status, const char *type, const char *param,
                  const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* The default error type for an HTTP status (400 invalid_request_error, 401
 * authentication_error, 404 not_found_error, 503 unavailable_error, 5xx server_error...). */
const char *api_error_type(int status);

/* {"error": {"message", "type", "param", "code"}} as JSON text. Caller frees; NULL on OOM. */
char *api_error_json(const struct api_error *e, size_t *len);

/* ---- generation requests ---- */

enum api_kind { API_KIND_COMPLETION, API_KIND_CHAT };

/* One prompt of a completions request: text (borrowed from the request's root) or token ids. */
struct api_prompt {
    const char *text; /* NULL for a token-id prompt */
    size_t len;
    int32_t *ids;     /* owned; NULL for a text prompt */
    int n_ids;
};

enum api_thinking { API_THINKING_DEFAULT = -1, API_THINKING_OFF = 0, API_THINKING_ON = 1 };

struct api_gen_request {
    enum api_kind kind;
    json_t *root;            /* owned: the parsed body; the borrowed pointers below point in it */
    const char *model;       /* borrowed; NULL when absent */
    /* completions */
    struct api_prompt *prompts; /* owned array (n_prompts) */
    int n_prompts;
    int echo;
    /* chat */
    const json_t *messages;  /* borrowed: a non-empty array of message objects */
    const json_t *tools;     /* borrowed: an array, or NULL */
    int tool_choice_none;    /* tool_choice "none": tools are neither shown nor parsed */
    int thinking;            /* enum api_thinking */
    const char *reasoning_effort; /* borrowed; NULL when absent (already validated) */
    int top_logprobs;        /* chat: with logprobs true */
    /* both */
    int max_tokens;          /* -1: not given (the server picks the default) */
    int n;                   /* 1..API_MAX_N */
    int stream;
    int include_usage;       /* stream_options.include_usage */
    int logprobs;            /* -1: none, else the number of alternatives (0..20) */
    struct engine_sampling sampling;      /* logit_bias points into the owned array below */
    struct engine_logit_bias *logit_bias; /* owned (sampling.n_logit_bias entries) */
    const char *stop[ENGINE_MAX_STOP];    /* borrowed stop strings */
    int n_stop;
    int32_t *stop_ids;       /* owned: stop_token_ids (vLLM extension) */
    int n_stop_ids;
    int ignore_eos;
    int skip_special_tokens; /* default 1 (vLLM) */
    const char *user;        /* borrowed; NULL when absent */
};

/*
 * Parse and validate a request body (body[0..len), not necessarily NUL-terminated). On success
 * *out is filled (free with api_gen_request_free) and 0 is returned; on failure *err says why
 * (400 for bad JSON or parameters) and out is left freed.
 */
int api_parse_gen(enum api_kind kind, const char *body, size_t len, struct api_gen_request *out,
                  struct api_error *err);
void api_gen_request_free(struct api_gen_request *r);

/*
 * Parse a body that must be a JSON object (tokenize / detokenize). Returns a new reference or
 * NULL with *err filled (400).
 */
json_t *api_parse_object(const char *body, size_t len, struct api_error *err);

/* Map an OpenAI/DeepSeek reasoning_effort string to the chat encoder's spelling ("low",
 * "high", "max", "none"); NULL when unknown. */
const char *api_effort_canonical(const char *s);

/* ---- responses ---- */

/* Compact JSON text of v (steals v). Caller frees; NULL on OOM. */
char *api_dump(json_t *v, size_t *len);

/* {"prompt_tokens", "completion_tokens", "total_tokens"} */
json_t *api_usage(int prompt_tokens, int completion_tokens);

/* The OpenAI finish_reason string for an engine finish ("stop", "length", "abort", "error"). */
const char *api_finish_reason(enum engine_finish f);

/* {"id", "object", "created", "model", "choices"}; steals choices (an array). */
json_t *api_envelope(const char *object, const char *id, long long created, const char *model,
                     json_t *choices);

/* A JSON string of bytes s[0..n) that may be invalid UTF-8 (ill-formed parts -> U+FFFD). */
json_t *api_string_lossy(const char *s, size_t n);

/*
 * Logprobs accumulators. Completions style: {"tokens", "token_logprobs", "top_logprobs",
 * "text_offset"}; chat style: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}.
 * Token text is given by a callback so the api layer needs no tokenizer.
 */
typedef const char *(*api_token_text_fn)(void *ud, int32_t id, size_t *len);
json_t *api_logprobs_completion_new(void);
int api_logprobs_completion_add(json_t *lp, api_token_text_fn fn, void *ud, int32_t token,
                                const float *logprob, const struct engine_logprob *top, int n_top,
                                long text_offset);
json_t *api_logprobs_chat_new(void);
int api_logprobs_chat_add(json_t *lp, api_token_text_fn fn, void *ud, int32_t token,
                          float logprob, const struct engine_logprob *top, int n_top);

/* ---- other routes ---- */

/* {"object": "model", "id", "created", "owned_by", "root", "parent", "max_model_len"} */
json_t *api_model_card(const char *id, const char *root, long long created, int max_model_len);

#endif
