/*
 * request.c - /v1/completions and /v1/chat/completions bodies -> struct api_gen_request.
 *
 * Field rules (OpenAI's where it defines them, vLLM's extensions otherwise):
 *   max_tokens / max_completion_tokens  integer >= 1 (or null); the latter wins when both given
 *   temperature [0, 2]; top_p (0, 1]; top_k -1, 0 (off) or >= 1; min_p [0, 1]
 *   presence_penalty / frequency_penalty [-2, 2]; repetition_penalty (0, 2]
 *   seed integer; n 1..16; stop string or list of <= 16 non-empty strings
 *   logprobs: completions an integer 0..20, chat a boolean with top_logprobs 0..20
 *   logit_bias {"<token id>": number in [-100, 100]}; stream bool; stream_options object (only
 *   with stream: true, as vLLM); ignore_eos, echo, skip_special_tokens bool; user string.
 * `null` means "not given" for every optional field. Unknown fields are ignored.
 *
 * THREAD SAFETY: pure functions.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"
#include "engine/err.h"

/* ---- errors ---- */

int api_error_set(struct api_error *e, int status, const char *type, const char *param,
                  const char *code, const char *fmt, ...)
{
    va_list ap;
    e->status = status;
    e->type = type ? type : api_error_type(status);
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return ERR_INVAL;
}

const char *api_error_type(int status)
{
    switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 405: return "invalid_request_error";
    case 413: return "invalid_request_error";
    case 415: return "invalid_request_error";
    case 429: return "rate_limit_error";
    case 503: return "unavailable_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

/* ---- field helpers ---- */

/* The value of key, or NULL when absent or null. */
static json_t *opt(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static int bad_type(struct api_error *e, const char *param, const char *want)
{
    return api_error_set(e, 400, NULL, param, NULL, "'%s' must be %s", param, want);
}

/* An integer field in [lo, hi]; *out untouched when absent. */
static int get_int(const json_t *o, const char *key, long long lo, long long hi, long long *out,
                   struct api_error *e)
{
    json_t *v = opt(o, key);
    if (!v)
        return 0;
    /* 2.0 is accepted as 2 (Python clients sometimes send floats); 2.5 is not */
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v) &&
               fabs(json_real_value(v)) < 9e15) {
        x = (long long)json_real_value(v);
    } else {
        return bad_type(e, key, "an integer");
    }
    if (x < lo || x > hi)
        return api_error_set(e, 400, NULL, key, NULL, "'%s' must be in [%lld, %lld], got %lld",
                             key, lo, hi, x);
    *out = x;
    return 0;
}

/* A number field in [lo, hi] (lo_open: lo itself excluded). */
static int get_num(const json_t *o, const char *key, double lo, double hi, int lo_open,
                   float *out, struct api_error *e)
{
    json_t *v = opt(o, key);
    if (!v)
        return 0;
    if (!json_is_number(v))
        return bad_type(e, key, "a number");
    double x = json_number_value(v);
    if (!isfinite(x) || x > hi || (lo_open ? x <= lo : x < lo))
        return api_error_set(e, 400, NULL, key, NULL, "'%s' must be in %c%g, %g], got %g", key,
                             lo_open ? '(' : '[', lo, hi, x);
    *out = (float)x;
    return 0;
}

static int get_bool(const json_t *o, const char *key, int *out, struct api_error *e)
{
    json_t *v = opt(o, key);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return bad_type(e, key, "a boolean");
    *out = json_is_true(v);
    return 0;
}

static int get_str(const json_t *o, const char *key, const char **out, struct api_error *e)
{
    json_t *v = opt(o, key);
    if (!v)
        return 0;
    if (!json_is_string(v))
        return bad_type(e, key, "a string");
    *out = json_string_value(v);
    return 0;
}

/* A token id (JSON integer in [0, INT32_MAX]). */
static int token_id(const json_t *v, int32_t *out)
{
    if (!json_is_integer(v))
        return -1;
    json_int_t x = json_integer_value(v);
    if (x < 0 || x > INT32_MAX)
        return -1;
    *out = (int32_t)x;
    return 0;
}

/* ---- prompts ---- */

static int is_id_array(const json_t *a)
{
    return json_is_array(a) && json_array_size(a) > 0 && json_is_integer(json_array_get(a, 0));
}

static int ids_from_array(const json_t *a, struct api_prompt *p, const char *param,
                          struct api_error *e)
{
    size_t n = json_array_size(a);
    if (n == 0)
        return api_error_set(e, 400, NULL, param, NULL, "'%s' must not be empty", param);
    if (n > API_MAX_PROMPT_IDS)
        return api_error_set(e, 400, NULL, param, NULL, "'%s' has too many tokens", param);
    p->ids = malloc(n * sizeof *p->ids);
    if (!p->ids)
        return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
    p->n_ids = (int)n;
    for (size_t i = 0; i < n; i++)
        if (token_id(json_array_get(a, i), &p->ids[i]) < 0)
            return api_error_set(e, 400, NULL, param, NULL,
                                 "'%s' must hold token ids (integers >= 0); element %zu is not",
                                 param, i);
    return 0;
}

static int parse_prompts(struct api_gen_request *r, struct api_error *e)
{
    json_t *p = opt(r->root, "prompt");
    if (!p)
        return api_error_set(e, 400, NULL, "prompt", NULL, "'prompt' is required");
    size_t n;
    if (json_is_string(p) || is_id_array(p)) {
        n = 1;
    } else if (json_is_array(p) && json_array_size(p) > 0) {
        n = json_array_size(p);
    } else {
        return api_error_set(e, 400, NULL, "prompt", NULL,
                             "'prompt' must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids");
    }
    if (n > API_MAX_PROMPTS)
        return api_error_set(e, 400, NULL, "prompt", NULL, "at most %d prompts per request",
                             API_MAX_PROMPTS);
    r->prompts = calloc(n, sizeof *r->prompts);
    if (!r->prompts)
        return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
    r->n_prompts = (int)n;
    if (json_is_string(p)) {
        r->prompts[0].text = json_string_value(p);
        r->prompts[0].len = json_string_length(p);
        return 0;
    }
    if (is_id_array(p))
        return ids_from_array(p, &r->prompts[0], "prompt", e);
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(p, i);
        if (json_is_string(x)) {
            r->prompts[i].text = json_string_value(x);
            r->prompts[i].len = json_string_length(x);
        } else if (json_is_array(x)) {
            int rc = ids_from_array(x, &r->prompts[i], "prompt", e);
            if (rc < 0)
                return rc;
        } else {
            return api_error_set(e, 400, NULL, "prompt", NULL,
                                 "'prompt' element %zu must be a string or a list of token ids",
                                 i);
        }
    }
    return 0;
}

/* ---- chat ---- */

static int parse_messages(struct api_gen_request *r, struct api_error *e)
{
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};
    json_t *m = opt(r->root, "messages");
    if (!m)
        return api_error_set(e, 400, NULL, "messages", NULL, "'messages' is required");
    if (!json_is_array(m) || json_array_size(m) == 0)
        return api_error_set(e, 400, NULL, "messages", NULL,
                             "'messages' must be a non-empty list of message objects");
    size_t i;
    json_t *msg;
    json_array_foreach(m, i, msg) {
        char param[64];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(msg))
            return api_error_set(e, 400, NULL, param, NULL, "'%s' must be an object", param);
        const char *role = json_string_value(json_object_get(msg, "role"));
        size_t k;
        for (k = 0; role && k < sizeof roles / sizeof roles[0]; k++)
            if (!strcmp(role, roles[k]))
                break;
        if (!role || k == sizeof roles / sizeof roles[0]) {
            snprintf(param, sizeof param, "messages[%zu].role", i);
            return api_error_set(e, 400, NULL, param, NULL,
                                 "'%s' must be one of system, developer, user, assistant, tool",
                                 param);
        }
        json_t *c = json_object_get(msg, "content");
        snprintf(param, sizeof param, "messages[%zu].content", i);
        if (json_is_array(c)) {
            size_t j;
            json_t *part;
            json_array_foreach(c, j, part) {
                const char *type = json_string_value(json_object_get(part, "type"));
                if (!json_is_object(part) || !type || strcmp(type, "text") ||
                    !json_is_string(json_object_get(part, "text")))
                    return api_error_set(e, 400, NULL, param, NULL,
                                         "'%s' parts must be {\"type\": \"text\", \"text\": ...}",
                                         param);
            }
        } else if (!json_is_string(c) && !json_is_null(c) && c) {
            return api_error_set(e, 400, NULL, param, NULL,
                                 "'%s' must be a string or a list of text parts", param);
        } else if (!json_is_string(c) && strcmp(role, "assistant")) {
            return api_error_set(e, 400, NULL, param, NULL, "'%s' is required", param);
        }
        json_t *tc = json_object_get(msg, "tool_calls");
        if (tc && !json_is_null(tc) && !json_is_array(tc)) {
            snprintf(param, sizeof param, "messages[%zu].tool_calls", i);
            return api_error_set(e, 400, NULL, param, NULL, "'%s' must be a list", param);
        }
    }
    r->messages = m;
    return 0;
}

static int parse_tools(struct api_gen_request *r, struct api_error *e)
{
    json_t *t = opt(r->root, "tools");
    if (t) {
        if (!json_is_array(t))
            return bad_type(e, "tools", "a list of tools");
        size_t i;
        json_t *tool;
        json_array_foreach(t, i, tool) {
            json_t *fn = json_object_get(tool, "function");
            const char *type = json_string_value(json_object_get(tool, "type"));
            char param[48];
            snprintf(param, sizeof param, "tools[%zu]", i);
            if (!json_is_object(tool) || (type && strcmp(type, "function")) ||
                !json_is_object(fn) || !json_is_string(json_object_get(fn, "name")))
                return api_error_set(e, 400, NULL, param, NULL,
                                     "'%s' must be {\"type\": \"function\", \"function\": "
                                     "{\"name\": ..., \"parameters\": ...}}",
                                     param);
            json_t *params = json_object_get(fn, "parameters");
            if (params && !json_is_null(params) && !json_is_object(params))
                return api_error_set(e, 400, NULL, param, NULL,
                                     "'%s.function.parameters' must be an object", param);
        }
        if (json_array_size(t) > 0)
            r->tools = t;
    }
    json_t *tc = opt(r->root, "tool_choice");
    if (tc) {
        const char *s = json_string_value(tc);
        if (s) {
            if (strcmp(s, "none") && strcmp(s, "auto") && strcmp(s, "required"))
                return api_error_set(e, 400, NULL, "tool_choice", NULL,
                                     "'tool_choice' must be none, auto, required or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}");
            r->tool_choice_none = !strcmp(s, "none");
            /* forcing a call needs constrained decoding, which the engine does not have yet:
             * refuse rather than accept and not enforce */
            if (!strcmp(s, "required"))
                return api_error_set(e, 400, NULL, "tool_choice", NULL,
                                     "tool_choice 'required' is not supported yet; use 'auto'");
        } else if (!json_is_object(tc) ||
                   !json_is_string(json_object_get(json_object_get(tc, "function"), "name"))) {
            return api_error_set(e, 400, NULL, "tool_choice", NULL,
                                 "'tool_choice' must be none, auto, required or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}");
        } else {
            return api_error_set(e, 400, NULL, "tool_choice", NULL,
                                 "a named 'tool_choice' is not supported yet; use 'auto'");
        }
    }
    return 0;
}

const char *api_effort_canonical(const char *s)
{
    static const char *const map[][2] = {
        {"none", "none"},   {"minimal", "low"}, {"low", "low"},   {"medium", "high"},
        {"high", "high"},   {"xhigh", "high"},  {"max", "max"},   {"ultra", "max"},
    };
    for (size_t i = 0; s && i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(s, map[i][0]))
            return map[i][1];
    return NULL;
}

/* thinking {"type": "enabled"|"disabled"} (DeepSeek API) or a boolean; reasoning_effort;
 * chat_template_kwargs.thinking / enable_thinking (vLLM). The explicit fields win. */
static int parse_reasoning(struct api_gen_request *r, struct api_error *e)
{
    json_t *kw = opt(r->root, "chat_template_kwargs");
    if (kw && !json_is_object(kw))
        return bad_type(e, "chat_template_kwargs", "an object");
    json_t *kt = kw ? json_object_get(kw, "thinking") : NULL;
    if (!kt && kw)
        kt = json_object_get(kw, "enable_thinking");
    if (json_is_boolean(kt))
        r->thinking = json_is_true(kt) ? API_THINKING_ON : API_THINKING_OFF;

    int rc = get_str(r->root, "reasoning_effort", &r->reasoning_effort, e);
    if (rc < 0)
        return rc;
    if (r->reasoning_effort) {
        const char *c = api_effort_canonical(r->reasoning_effort);
        if (!c)
            return api_error_set(e, 400, NULL, "reasoning_effort", NULL,
                                 "'reasoning_effort' must be one of none, minimal, low, medium, "
                                 "high, xhigh, max");
        r->thinking = strcmp(c, "none") ? API_THINKING_ON : API_THINKING_OFF;
    }
    json_t *t = opt(r->root, "thinking");
    if (t) {
        const char *type = json_string_value(json_object_get(t, "type"));
        if (json_is_boolean(t))
            r->thinking = json_is_true(t) ? API_THINKING_ON : API_THINKING_OFF;
        else if (json_is_object(t) && type && !strcmp(type, "enabled"))
            r->thinking = API_THINKING_ON;
        else if (json_is_object(t) && type && !strcmp(type, "disabled"))
            r->thinking = API_THINKING_OFF;
        else
            return api_error_set(e, 400, NULL, "thinking", NULL,
                                 "'thinking' must be {\"type\": \"enabled\"} or {\"type\": "
                                 "\"disabled\"}");
    }
    return 0;
}

/* ---- shared fields ---- */

static int parse_stop(struct api_gen_request *r, struct api_error *e)
{
    json_t *s = opt(r->root, "stop");
    if (s) {
        if (json_is_string(s)) {
            if (json_string_length(s) == 0)
                return api_error_set(e, 400, NULL, "stop", NULL, "'stop' must not be empty");
            r->stop[r->n_stop++] = json_string_value(s);
        } else if (json_is_array(s)) {
            if (json_array_size(s) > ENGINE_MAX_STOP)
                return api_error_set(e, 400, NULL, "stop", NULL,
                                     "'stop' may hold at most %d strings", ENGINE_MAX_STOP);
            size_t i;
            json_t *x;
            json_array_foreach(s, i, x) {
                if (!json_is_string(x) || json_string_length(x) == 0)
                    return api_error_set(e, 400, NULL, "stop", NULL,
                                         "'stop' must be a string or a list of non-empty "
                                         "strings");
                r->stop[r->n_stop++] = json_string_value(x);
            }
        } else {
            return bad_type(e, "stop", "a string or a list of strings");
        }
    }
    json_t *ids = opt(r->root, "stop_token_ids");
    if (ids) {
        if (!json_is_array(ids) || json_array_size(ids) > API_MAX_STOP_IDS)
            return bad_type(e, "stop_token_ids", "a list of at most 64 token ids");
        size_t n = json_array_size(ids);
        if (n) {
            r->stop_ids = malloc(n * sizeof *r->stop_ids);
            if (!r->stop_ids)
                return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
            for (size_t i = 0; i < n; i++)
                if (token_id(json_array_get(ids, i), &r->stop_ids[i]) < 0)
                    return bad_type(e, "stop_token_ids", "a list of token ids");
            r->n_stop_ids = (int)n;
        }
    }
    return 0;
}

static int parse_logit_bias(struct api_gen_request *r, struct api_error *e)
{
    json_t *lb = opt(r->root, "logit_bias");
    if (!lb)
        return 0;
    if (!json_is_object(lb))
        return bad_type(e, "logit_bias", "an object mapping token ids to numbers");
    size_t n = json_object_size(lb);
    if (n > API_MAX_LOGIT_BIAS)
        return api_error_set(e, 400, NULL, "logit_bias", NULL,
                             "'logit_bias' may hold at most %d entries", API_MAX_LOGIT_BIAS);
    if (n == 0)
        return 0;
    r->logit_bias = calloc(n, sizeof *r->logit_bias);
    if (!r->logit_bias)
        return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
    const char *key;
    json_t *v;
    int k = 0;
    json_object_foreach(lb, key, v) {
        char *end;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || id > INT32_MAX)
            return api_error_set(e, 400, NULL, "logit_bias", NULL,
                                 "'logit_bias' keys must be token ids, got \"%.40s\"", key);
        if (!json_is_number(v) || json_number_value(v) < -100 || json_number_value(v) > 100)
            return api_error_set(e, 400, NULL, "logit_bias", NULL,
                                 "'logit_bias' values must be numbers in [-100, 100]");
        r->logit_bias[k].token = (int32_t)id;
        r->logit_bias[k].bias = (float)json_number_value(v);
        k++;
    }
    r->sampling.logit_bias = r->logit_bias;
    r->sampling.n_logit_bias = k;
    return 0;
}

static int parse_sampling(struct api_gen_request *r, struct api_error *e)
{
    struct engine_sampling *s = &r->sampling;
    long long x;
    int rc;
    s->temperature = 1.0f;
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
    if ((rc = get_num(r->root, "temperature", 0, 2, 0, &s->temperature, e)) < 0 ||
        (rc = get_num(r->root, "top_p", 0, 1, 1, &s->top_p, e)) < 0 ||
        (rc = get_num(r->root, "min_p", 0, 1, 0, &s->min_p, e)) < 0 ||
        (rc = get_num(r->root, "presence_penalty", -2, 2, 0, &s->presence_penalty, e)) < 0 ||
        (rc = get_num(r->root, "frequency_penalty", -2, 2, 0, &s->frequency_penalty, e)) < 0 ||
        (rc = get_num(r->root, "repetition_penalty", 0, 2, 1, &s->repetition_penalty, e)) < 0)
        return rc;
    x = -1;
    if ((rc = get_int(r->root, "top_k", -1, 1 << 30, &x, e)) < 0)
        return rc;
    s->top_k = x > 0 ? (int)x : 0;
    json_t *seed = opt(r->root, "seed");
    if (seed) {
        if (!json_is_integer(seed))
            return bad_type(e, "seed", "an integer");
        s->seed = (uint64_t)json_integer_value(seed);
        s->has_seed = 1;
    }
    return parse_logit_bias(r, e);
}

static int parse_common(struct api_gen_request *r, struct api_error *e)
{
    long long x;
    int rc;
    if ((rc = get_str(r->root, "model", &r->model, e)) < 0 ||
        (rc = get_str(r->root, "user", &r->user, e)) < 0)
        return rc;
    x = -1;
    if ((rc = get_int(r->root, "max_tokens", 1, INT32_MAX, &x, e)) < 0 ||
        (rc = get_int(r->root, "max_completion_tokens", 1, INT32_MAX, &x, e)) < 0)
        return rc;
    r->max_tokens = (int)x;
    x = 1;
    if ((rc = get_int(r->root, "n", 1, API_MAX_N, &x, e)) < 0)
        return rc;
    r->n = (int)x;
    if ((rc = get_bool(r->root, "stream", &r->stream, e)) < 0 ||
        (rc = get_bool(r->root, "ignore_eos", &r->ignore_eos, e)) < 0 ||
        (rc = get_bool(r->root, "skip_special_tokens", &r->skip_special_tokens, e)) < 0)
        return rc;
    json_t *so = opt(r->root, "stream_options");
    if (so) {
        if (!json_is_object(so))
            return bad_type(e, "stream_options", "an object");
        if (!r->stream)
            return api_error_set(e, 400, NULL, "stream_options", NULL,
                                 "'stream_options' is only allowed when 'stream' is true");
        if ((rc = get_bool(so, "include_usage", &r->include_usage, e)) < 0) {
            snprintf(e->param, sizeof e->param, "stream_options.include_usage");
            return rc;
        }
    }
    if ((rc = parse_sampling(r, e)) < 0 || (rc = parse_stop(r, e)) < 0)
        return rc;

    /* logprobs: an integer for completions, a boolean (+ top_logprobs) for chat */
    r->logprobs = -1;
    if (r->kind == API_KIND_COMPLETION) {
        x = -1;
        if ((rc = get_int(r->root, "logprobs", 0, ENGINE_MAX_TOP_LOGPROBS, &x, e)) < 0)
            return rc;
        r->logprobs = (int)x;
        return get_bool(r->root, "echo", &r->echo, e);
    }
    int lp = 0;
    x = 0;
    if ((rc = get_bool(r->root, "logprobs", &lp, e)) < 0 ||
        (rc = get_int(r->root, "top_logprobs", 0, ENGINE_MAX_TOP_LOGPROBS, &x, e)) < 0)
        return rc;
    if (opt(r->root, "top_logprobs") && !lp)
        return api_error_set(e, 400, NULL, "top_logprobs", NULL,
                             "'top_logprobs' needs 'logprobs' to be true");
    r->top_logprobs = (int)x;
    r->logprobs = lp ? (int)x : -1;
    return 0;
}

json_t *api_parse_object(const char *body, size_t len, struct api_error *err)
{
    json_error_t jerr;
    json_t *root = json_loadb(body ? body : "", len, 0, &jerr);
    if (!root) {
        api_error_set(err, 400, NULL, NULL, NULL, "invalid JSON body: %s (line %d, column %d)",
                      jerr.text, jerr.line, jerr.column);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        api_error_set(err, 400, NULL, NULL, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

int api_parse_gen(enum api_kind kind, const char *body, size_t len, struct api_gen_request *out,
                  struct api_error *err)
{
    memset(out, 0, sizeof *out);
    out->kind = kind;
    out->thinking = API_THINKING_DEFAULT;
    out->skip_special_tokens = 1;
    out->root = api_parse_object(body, len, err);
    if (!out->root)
        return ERR_INVAL;
    int rc = parse_common(out, err);
    if (rc == 0 && kind == API_KIND_COMPLETION)
        rc = parse_prompts(out, err);
    if (rc == 0 && kind == API_KIND_CHAT) {
        if ((rc = parse_messages(out, err)) == 0 && (rc = parse_tools(out, err)) == 0)
            rc = parse_reasoning(out, err);
    }
    if (rc < 0)
        api_gen_request_free(out);
    return rc;
}

void api_gen_request_free(struct api_gen_request *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_prompts; i++)
        free(r->prompts[i].ids);
    free(r->prompts);
    free(r->logit_bias);
    free(r->stop_ids);
    json_decref(r->root);
    memset(r, 0, sizeof *r);
}
