/*
 * response.c - response, chunk and error JSON in OpenAI's shapes (jansson).
 *
 * Every builder returns a new reference or NULL on allocation failure; "steals" marks a
 * parameter whose reference is taken over even on failure. Strings that come from the model
 * (token pieces, generated text) may be invalid UTF-8 on their own; they go through
 * api_string_lossy so the JSON is always valid.
 *
 * THREAD SAFETY: pure functions.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"
#include "engine/tbuf.h"
#include "engine/utf8.h"

char *api_dump(json_t *v, size_t *len)
{
    if (!v)
        return NULL;
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(v);
    if (s && len)
        *len = strlen(s);
    return s;
}

char *api_error_json(const struct api_error *e, size_t *len)
{
    json_t *err = json_object();
    json_t *root = json_object();
    if (!err || !root) {
        json_decref(err);
        json_decref(root);
        return NULL;
    }
    json_object_set_new(err, "message", api_string_lossy(e->message, strlen(e->message)));
    json_object_set_new(err, "type", json_string(e->type ? e->type : api_error_type(e->status)));
    json_object_set_new(err, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(err, "code", e->code ? json_string(e->code) : json_integer(e->status));
    json_object_set_new(root, "error", err);
    return api_dump(root, len);
}

json_t *api_string_lossy(const char *s, size_t n)
{
    if (utf8_valid_prefix(s, n) == n)
        return json_stringn_nocheck(s, n);
    struct tbuf b = {0};
    json_t *v = NULL;
    if (utf8_append_lossy(&b, s, n) == 0)
        v = json_stringn_nocheck(b.s ? b.s : "", b.len);
    tbuf_free(&b);
    return v;
}

json_t *api_usage(int prompt_tokens, int completion_tokens)
{
    return json_pack("{s:i, s:i, s:i}", "prompt_tokens", prompt_tokens, "completion_tokens",
                     completion_tokens, "total_tokens", prompt_tokens + completion_tokens);
}

const char *api_finish_reason(enum engine_finish f)
{
    switch (f) {
    case ENGINE_FINISH_STOP: return "stop";
    case ENGINE_FINISH_LENGTH: return "length";
    case ENGINE_FINISH_ABORT: return "abort";
    default: return "error";
    }
}

json_t *api_envelope(const char *object, const char *id, long long created, const char *model,
                     json_t *choices)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", id, "object", object, "created",
                     (json_int_t)created, "model", model, "choices", choices);
}

/* ---- logprobs ---- */

/* A logprob as JSON: -inf (a banned token) has no JSON spelling; OpenAI clients expect a
 * number, so it becomes -9999.0 as vLLM does. */
static json_t *lp_num(float x)
{
    return json_real(isfinite(x) ? (double)x : -9999.0);
}

static json_t *token_str(api_token_text_fn fn, void *ud, int32_t id)
{
    size_t n = 0;
    const char *s = fn(ud, id, &n);
    return s ? api_string_lossy(s, n) : json_string("");
}

json_t *api_logprobs_completion_new(void)
{
    return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs",
                     "text_offset");
}

int api_logprobs_completion_add(json_t *lp, api_token_text_fn fn, void *ud, int32_t token,
                                const float *logprob, const struct engine_logprob *top, int n_top,
                                long text_offset)
{
    json_t *tops = json_null();
    if (logprob && n_top > 0) {
        tops = json_object();
        for (int i = 0; tops && i < n_top; i++) {
            size_t n = 0;
            const char *s = fn(ud, top[i].token, &n);
            json_t *key = s ? api_string_lossy(s, n) : NULL;
            /* distinct ids can decode to the same text: keep the first (the likelier) */
            if (key && !json_object_get(tops, json_string_value(key)))
                json_object_set_new(tops, json_string_value(key), lp_num(top[i].logprob));
            json_decref(key);
        }
    }
    int rc = 0;
    rc |= json_array_append_new(json_object_get(lp, "tokens"), token_str(fn, ud, token));
    rc |= json_array_append_new(json_object_get(lp, "token_logprobs"),
                                logprob ? lp_num(*logprob) : json_null());
    rc |= json_array_append_new(json_object_get(lp, "top_logprobs"), tops);
    rc |= json_array_append_new(json_object_get(lp, "text_offset"), json_integer(text_offset));
    return rc ? -1 : 0;
}

json_t *api_logprobs_chat_new(void)
{
    return json_pack("{s:[]}", "content");
}

/* {"token", "logprob", "bytes"} for one id */
static json_t *chat_lp_entry(api_token_text_fn fn, void *ud, int32_t id, float logprob)
{
    size_t n = 0;
    const char *s = fn(ud, id, &n);
    json_t *bytes = json_array();
    for (size_t i = 0; s && bytes && i < n; i++)
        json_array_append_new(bytes, json_integer((unsigned char)s[i]));
    return json_pack("{s:o, s:o, s:o}", "token", s ? api_string_lossy(s, n) : json_string(""),
                     "logprob", lp_num(logprob), "bytes", bytes ? bytes : json_null());
}

int api_logprobs_chat_add(json_t *lp, api_token_text_fn fn, void *ud, int32_t token,
                          float logprob, const struct engine_logprob *top, int n_top)
{
    json_t *e = chat_lp_entry(fn, ud, token, logprob);
    json_t *tops = json_array();
    if (!e || !tops) {
        json_decref(e);
        json_decref(tops);
        return -1;
    }
    for (int i = 0; i < n_top; i++)
        json_array_append_new(tops, chat_lp_entry(fn, ud, top[i].token, top[i].logprob));
    json_object_set_new(e, "top_logprobs", tops);
    return json_array_append_new(json_object_get(lp, "content"), e) ? -1 : 0;
}

/* ---- models ---- */

json_t *api_model_card(const char *id, const char *root, long long created, int max_model_len)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:n, s:i}", "id", id, "object", "model",
                     "created", (json_int_t)created, "owned_by", "dsv4d", "root", root, "parent",
                     "max_model_len", max_model_len);
}
