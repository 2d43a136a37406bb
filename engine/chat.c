/*
 * chat.c - the DSV4 chat encoder (see chat.h), a line-by-line port of encode_messages() in the
 * reference encoding_dsv4.py. The messages are handled as jansson objects, exactly as the Python
 * handles dicts, so the quirks carry over: Python truthiness (an empty tools list is no tools),
 * `None` printed as "None" by str.format in latest_reminder and tool results, key order kept by
 * json.dumps. Every string the template itself writes is recorded as a trusted span.
 */
#include "engine/chat.h"

#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/json_py.h"

/* ---- Constants of the reference encoder ---- */

static const char BOS[] = "<｜begin▁of▁sentence｜>";
static const char EOS[] = "<｜end▁of▁sentence｜>";
static const char THINK_START[] = "<think>";
static const char THINK_END[] = "</think>";
static const char USER_SP[] = "<｜User｜>";
static const char ASSISTANT_SP[] = "<｜Assistant｜>";
static const char LATEST_REMINDER_SP[] = "<｜latest_reminder｜>";

static const struct {
    const char *name, *token;
} TASKS[] = {
    {"action", "<｜action｜>"}, {"query", "<｜query｜>"}, {"authority", "<｜authority｜>"},
    {"domain", "<｜domain｜>"}, {"title", "<｜title｜>"}, {"read_url", "<｜read_url｜>"},
};

/* Original "max" == 0731 "high". */
static const char EFFORT_TEXT_A[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is "
    "left unchecked.\n\n";

/* 0731 "max". */
static const char EFFORT_TEXT_B[] =
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: "
    "exhaustively decompose the problem into its most fundamental components, trace every "
    "causal chain to its root, and resolve the underlying cause rather than any surface "
    "symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple "
    "angles and are certain that no assumption remains unchecked and no error remains "
    "undiscovered.\n\n";

static const char TOOLS_HEAD[] =
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools "
    "by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
    "</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types "
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";

static const char TOOLS_TAIL[] = "\n\nYou MUST strictly follow the above defined tool name and "
                                 "parameter schemas to invoke tool calls.\n";

static const char RESPONSE_FORMAT_HEAD[] =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

/* ---- Options ---- */

void chat_opts_init(struct chat_opts *o)
{
    *o = (struct chat_opts){.mode = CHAT_MODE_THINKING,
                            .effort = CHAT_EFFORT_NONE,
                            .revision = CHAT_REV_ORIGINAL,
                            .drop_thinking = true,
                            .add_bos = true};
}

int chat_effort_parse(const char *s, enum chat_effort *out)
{
    if (strcmp(s, "none") == 0)
        *out = CHAT_EFFORT_NONE;
    else if (strcmp(s, "low") == 0 || strcmp(s, "minimal") == 0 || strcmp(s, "medium") == 0)
        *out = CHAT_EFFORT_LOW;
    else if (strcmp(s, "high") == 0)
        *out = CHAT_EFFORT_HIGH;
    else if (strcmp(s, "max") == 0)
        *out = CHAT_EFFORT_MAX;
    else
        return err_setf(ERR_INVAL, "reasoning effort \"%s\" (none, low, high or max)", s);
    return 0;
}

/* ---- Output with trusted spans ---- */

void chat_prompt_free(struct chat_prompt *p)
{
    if (!p)
        return;
    tbuf_free(&p->text);
    free(p->ctrl);
    p->ctrl = NULL;
    p->n_ctrl = p->cap_ctrl = 0;
}

/* Caller-supplied text: never a control token in safe tokenization. */
static int put_text(struct chat_prompt *p, const char *s, size_t n)
{
    return tbuf_add(&p->text, s, n);
}

/* Template text: trusted. Adjacent trusted pieces share one span. */
static int put_tmpl(struct chat_prompt *p, const char *s)
{
    size_t n = strlen(s), off = p->text.len;
    int rc = tbuf_add(&p->text, s, n);
    if (rc < 0 || n == 0)
        return rc;
    if (p->n_ctrl && p->ctrl[p->n_ctrl - 1].off + p->ctrl[p->n_ctrl - 1].len == off) {
        p->ctrl[p->n_ctrl - 1].len += n;
        return 0;
    }
    if (p->n_ctrl == p->cap_ctrl) {
        size_t cap = p->cap_ctrl ? 2 * p->cap_ctrl : 16;
        struct tok_span *c = realloc(p->ctrl, cap * sizeof *c);
        if (!c)
            return err_setf(ERR_NOMEM, "chat: spans");
        p->ctrl = c;
        p->cap_ctrl = cap;
    }
    p->ctrl[p->n_ctrl++] = (struct tok_span){.off = off, .len = n};
    return 0;
}

/* ---- Python-like helpers over jansson values ---- */

static bool py_truthy(const json_t *v)
{
    if (!v)
        return false;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return json_object_size(v) > 0;
    case JSON_ARRAY:
        return json_array_size(v) > 0;
    case JSON_STRING:
        return json_string_length(v) > 0;
    case JSON_INTEGER:
        return json_integer_value(v) != 0;
    case JSON_REAL:
        return json_real_value(v) != 0.0;
    case JSON_TRUE:
        return true;
    case JSON_FALSE:
    case JSON_NULL:
        return false;
    }
    return false;
}

static const char *role_of(const json_t *m)
{
    return json_string_value(json_object_get(m, "role"));
}

static bool role_is(const json_t *m, const char *r)
{
    const char *s = role_of(m);
    return s && strcmp(s, r) == 0;
}

/* Python `x is not None` for an optional key. */
static bool has_value(const json_t *m, const char *key)
{
    json_t *v = json_object_get(m, key);
    return v && !json_is_null(v);
}

/*
 * Append str(v) as str.format would for the values we accept: a string as is; null as "None"
 * when none_text (str(None)) or "" otherwise. Anything else is rejected.
 */
static int put_value(struct chat_prompt *p, const json_t *v, bool none_text, const char *what,
                     size_t idx)
{
    if (!v || json_is_null(v))
        return none_text ? put_text(p, "None", 4) : 0;
    if (json_is_string(v))
        return put_text(p, json_string_value(v), json_string_length(v));
    return err_setf(ERR_INVAL, "messages[%zu]: %s must be a string", idx, what);
}

/* ---- Input normalization (serving-layer conventions, chat.h) ---- */

/* A content list of text parts -> one string (parts joined by "\n\n"). */
static int join_text_parts(const json_t *list, size_t idx, json_t **out)
{
    struct tbuf b = {0};
    size_t i;
    json_t *part;
    int rc = 0;
    json_array_foreach(list, i, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        if (!type || strcmp(type, "text") != 0 || !json_is_string(text)) {
            rc = err_setf(ERR_UNSUPPORTED, "messages[%zu]: content part %zu of type %s", idx, i,
                          type ? type : "?");
            goto out;
        }
        if ((i && (rc = tbuf_add(&b, "\n\n", 2)) < 0) ||
            (rc = tbuf_add(&b, json_string_value(text), json_string_length(text))) < 0)
            goto out;
    }
    *out = json_stringn(b.s ? b.s : "", b.len);
    if (!*out)
        rc = err_setf(ERR_NOMEM, "chat: content");
out:
    tbuf_free(&b);
    return rc;
}

/* A shallow copy of one input message with the accepted aliases folded in. */
static int normalize_message(const json_t *m, size_t idx, json_t **out)
{
    if (!json_is_object(m))
        return err_setf(ERR_INVAL, "messages[%zu] is not an object", idx);
    if (!json_is_string(json_object_get(m, "role")))
        return err_setf(ERR_INVAL, "messages[%zu] has no role", idx);
    json_t *c = json_copy((json_t *)m);
    if (!c)
        return err_setf(ERR_NOMEM, "chat: message copy");
    int rc = 0;
    if (!json_object_get(c, "reasoning_content") && json_object_get(c, "reasoning"))
        rc = json_object_set(c, "reasoning_content", json_object_get(c, "reasoning"));
    if (rc == 0 && json_is_true(json_object_get(c, "prefix")))
        rc = json_object_set_new(c, "wo_eos", json_true());
    if (rc != 0) {
        json_decref(c);
        return err_setf(ERR_NOMEM, "chat: message copy");
    }
    json_t *content = json_object_get(c, "content");
    if (json_is_array(content) && !role_is(c, "tool")) {
        json_t *s = NULL;
        if ((rc = join_text_parts(content, idx, &s)) < 0) {
            json_decref(c);
            return rc;
        }
        json_object_set_new(c, "content", s);
    }
    *out = c;
    return 0;
}

static int normalize_list(const json_t *in, json_t **out)
{
    json_t *a = json_array();
    if (!a)
        return err_setf(ERR_NOMEM, "chat: messages");
    size_t i;
    json_t *m;
    json_array_foreach(in, i, m)
    {
        json_t *c = NULL;
        int rc = normalize_message(m, i, &c);
        if (rc < 0) {
            json_decref(a);
            return rc;
        }
        json_array_append_new(a, c);
    }
    *out = a;
    return 0;
}

/* Request-level tools go onto the first system message, or a new one at index 0. */
static int attach_tools(json_t *msgs, const json_t *tools)
{
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m)
    {
        if (role_is(m, "system"))
            return json_object_set(m, "tools", (json_t *)tools) ? err_setf(ERR_NOMEM, "chat") : 0;
    }
    json_t *sys = json_pack("{s:s, s:O}", "role", "system", "tools", tools);
    if (!sys || json_array_insert_new(msgs, 0, sys))
        return err_setf(ERR_NOMEM, "chat: system message");
    return 0;
}

/* ---- merge_tool_messages / sort_tool_results_by_call_order / _drop_thinking_messages ---- */

static json_t *merge_tool_messages(const json_t *msgs)
{
    json_t *merged = json_array();
    size_t i;
    json_t *src;
    if (!merged)
        return NULL;
    json_array_foreach(msgs, i, src)
    {
        json_t *msg = json_deep_copy(src);
        if (!msg)
            goto fail;
        size_t n = json_array_size(merged);
        json_t *last = n ? json_array_get(merged, n - 1) : NULL;
        bool last_user_blocks =
            last && role_is(last, "user") && json_object_get(last, "content_blocks");
        if (role_is(msg, "tool")) {
            json_t *id = json_object_get(msg, "tool_call_id");
            json_t *content = json_object_get(msg, "content");
            json_t *block = json_pack("{s:s, s:o, s:o}", "type", "tool_result", "tool_use_id",
                                      id ? json_incref(id) : json_string(""), "content",
                                      content ? json_incref(content) : json_string(""));
            json_decref(msg);
            if (!block)
                goto fail;
            if (last_user_blocks) {
                json_array_append_new(json_object_get(last, "content_blocks"), block);
            } else {
                json_t *u = json_pack("{s:s, s:[o]}", "role", "user", "content_blocks", block);
                if (!u)
                    goto fail;
                json_array_append_new(merged, u);
            }
        } else if (role_is(msg, "user")) {
            json_t *content = json_object_get(msg, "content");
            json_t *block = json_pack("{s:s, s:o}", "type", "text", "text",
                                      content ? json_incref(content) : json_string(""));
            if (!block) {
                json_decref(msg);
                goto fail;
            }
            if (last_user_blocks && !has_value(last, "task")) {
                json_array_append_new(json_object_get(last, "content_blocks"), block);
            } else {
                json_t *u = json_pack("{s:s, s:O, s:[o]}", "role", "user", "content",
                                      json_object_get(block, "text"), "content_blocks", block);
                if (!u) {
                    json_decref(msg);
                    goto fail;
                }
                static const char *const keep[] = {"task", "wo_eos", "mask"};
                for (size_t k = 0; k < 3; k++)
                    if (json_object_get(msg, keep[k]))
                        json_object_set(u, keep[k], json_object_get(msg, keep[k]));
                json_array_append_new(merged, u);
            }
            json_decref(msg);
        } else {
            json_array_append_new(merged, msg);
        }
    }
    return merged;
fail:
    json_decref(merged);
    return NULL;
}

static const char *call_id_of(const json_t *tc)
{
    json_t *id = json_object_get(tc, "id");
    if (py_truthy(id) && json_is_string(id))
        return json_string_value(id);
    const char *fid = json_string_value(json_object_get(json_object_get(tc, "function"), "id"));
    return fid ? fid : "";
}

/* Mutates the user messages of msgs in place (msgs holds our own copies). */
static int sort_tool_results(json_t *msgs)
{
    json_t *order = json_object(); /* call id -> position */
    size_t i;
    json_t *msg;
    int rc = 0;
    if (!order)
        return err_setf(ERR_NOMEM, "chat");
    json_array_foreach(msgs, i, msg)
    {
        json_t *tcs = json_object_get(msg, "tool_calls");
        json_t *blocks = json_object_get(msg, "content_blocks");
        if (role_is(msg, "assistant") && py_truthy(tcs) && json_is_array(tcs)) {
            json_object_clear(order);
            size_t k;
            json_t *tc;
            json_array_foreach(tcs, k, tc)
            {
                const char *id = call_id_of(tc);
                if (*id)
                    json_object_set_new(order, id, json_integer((json_int_t)k));
            }
        } else if (role_is(msg, "user") && py_truthy(blocks) && json_is_array(blocks)) {
            size_t nb = json_array_size(blocks), nt = 0;
            for (size_t k = 0; k < nb; k++) {
                const char *ty =
                    json_string_value(json_object_get(json_array_get(blocks, k), "type"));
                if (ty && strcmp(ty, "tool_result") == 0)
                    nt++;
            }
            if (nt <= 1 || json_object_size(order) == 0)
                continue;
            /* Stable insertion sort of the tool blocks by call position (missing -> 0). */
            json_t **tb = malloc(nt * sizeof *tb);
            json_int_t *key = malloc(nt * sizeof *key);
            if (!tb || !key) {
                free(tb);
                free(key);
                rc = err_setf(ERR_NOMEM, "chat");
                goto out;
            }
            size_t m = 0;
            for (size_t k = 0; k < nb; k++) {
                json_t *b = json_array_get(blocks, k);
                const char *ty = json_string_value(json_object_get(b, "type"));
                if (!ty || strcmp(ty, "tool_result") != 0)
                    continue;
                const char *uid = json_string_value(json_object_get(b, "tool_use_id"));
                json_t *pos = uid ? json_object_get(order, uid) : NULL;
                json_int_t kk = pos ? json_integer_value(pos) : 0;
                size_t j = m++;
                while (j > 0 && key[j - 1] > kk) {
                    tb[j] = tb[j - 1];
                    key[j] = key[j - 1];
                    j--;
                }
                tb[j] = json_incref(b);
                key[j] = kk;
            }
            size_t s = 0;
            for (size_t k = 0; k < nb; k++) {
                const char *ty =
                    json_string_value(json_object_get(json_array_get(blocks, k), "type"));
                if (ty && strcmp(ty, "tool_result") == 0)
                    json_array_set_new(blocks, k, tb[s++]);
            }
            free(tb);
            free(key);
        }
    }
out:
    json_decref(order);
    return rc;
}

static const char *const KEEP_ROLES[] = {"user", "system", "tool", "latest_reminder",
                                         "direct_search_results"};

static long last_user_index(const json_t *msgs)
{
    for (size_t i = json_array_size(msgs); i-- > 0;) {
        json_t *m = json_array_get(msgs, i);
        if (role_is(m, "user") || role_is(m, "developer"))
            return (long)i;
    }
    return -1;
}

static json_t *drop_thinking_messages(const json_t *msgs)
{
    long last = last_user_index(msgs);
    json_t *out = json_array();
    size_t i;
    json_t *m;
    if (!out)
        return NULL;
    json_array_foreach(msgs, i, m)
    {
        bool keep = (long)i >= last;
        for (size_t k = 0; !keep && k < sizeof KEEP_ROLES / sizeof *KEEP_ROLES; k++)
            keep = role_is(m, KEEP_ROLES[k]);
        if (keep) {
            json_array_append(out, m);
        } else if (role_is(m, "assistant")) {
            json_t *c = json_copy(m);
            if (!c) {
                json_decref(out);
                return NULL;
            }
            json_object_del(c, "reasoning_content");
            json_array_append_new(out, c);
        }
    }
    return out;
}

/* ---- Rendering ---- */

static int render_tools(struct chat_prompt *p, const json_t *tools, size_t idx)
{
    struct tbuf j = {0};
    int rc = put_tmpl(p, TOOLS_HEAD);
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t)
    {
        json_t *fn = json_object_get(t, "function");
        if (!fn) {
            rc = err_setf(ERR_INVAL, "messages[%zu]: tools[%zu] has no \"function\"", idx, i);
            goto out;
        }
        tbuf_clear(&j);
        if (rc < 0 || (i && (rc = put_tmpl(p, "\n")) < 0) || (rc = jpy_dump(&j, fn)) < 0 ||
            (rc = put_text(p, j.s, j.len)) < 0)
            goto out;
    }
    rc = put_tmpl(p, TOOLS_TAIL);
out:
    tbuf_free(&j);
    return rc;
}

static int render_suffixes(struct chat_prompt *p, const json_t *msg, size_t idx)
{
    int rc = 0;
    json_t *tools = json_object_get(msg, "tools");
    json_t *rf = json_object_get(msg, "response_format");
    if (py_truthy(tools)) {
        if (!json_is_array(tools))
            return err_setf(ERR_INVAL, "messages[%zu]: tools must be a list", idx);
        if ((rc = put_tmpl(p, "\n\n")) < 0 || (rc = render_tools(p, tools, idx)) < 0)
            return rc;
    }
    if (py_truthy(rf)) {
        struct tbuf j = {0};
        if ((rc = put_tmpl(p, "\n\n")) == 0 && (rc = put_tmpl(p, RESPONSE_FORMAT_HEAD)) == 0 &&
            (rc = jpy_dump(&j, rf)) == 0)
            rc = put_text(p, j.s, j.len);
        tbuf_free(&j);
    }
    return rc;
}

/* encode_arguments_to_dsml */
static int render_arguments(struct chat_prompt *p, const json_t *args)
{
    json_t *obj = NULL;
    int rc = 0;
    if (json_is_object(args)) {
        obj = json_incref((json_t *)args);
    } else {
        if (json_is_string(args))
            obj = json_loadb(json_string_value(args), json_string_length(args),
                             JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (!json_is_object(obj)) {
            /* json.loads failed (or gave a non-object): {"arguments": raw} */
            json_decref(obj);
            obj = json_pack("{s:O}", "arguments", args ? args : json_null());
            if (!obj)
                return err_setf(ERR_NOMEM, "chat");
        }
    }
    const char *k;
    json_t *v;
    bool first = true;
    struct tbuf j = {0};
    json_object_foreach(obj, k, v)
    {
        bool is_str = json_is_string(v);
        if ((!first && (rc = put_tmpl(p, "\n")) < 0) ||
            (rc = put_tmpl(p, "<｜DSML｜parameter name=\"")) < 0 ||
            (rc = put_text(p, k, strlen(k))) < 0 ||
            (rc = put_tmpl(p, is_str ? "\" string=\"true\">" : "\" string=\"false\">")) < 0)
            goto out;
        first = false;
        if (is_str) {
            rc = put_text(p, json_string_value(v), json_string_length(v));
        } else {
            tbuf_clear(&j);
            if ((rc = jpy_dump(&j, v)) == 0)
                rc = put_text(p, j.s, j.len);
        }
        if (rc < 0 || (rc = put_tmpl(p, "</｜DSML｜parameter>")) < 0)
            goto out;
    }
out:
    tbuf_free(&j);
    json_decref(obj);
    return rc;
}

static int render_tool_calls(struct chat_prompt *p, const json_t *tcs, size_t idx)
{
    int rc;
    size_t i;
    json_t *tc;
    if (!json_is_array(tcs))
        return err_setf(ERR_INVAL, "messages[%zu]: tool_calls must be a list", idx);
    if ((rc = put_tmpl(p, "\n\n<｜DSML｜tool_calls>\n")) < 0)
        return rc;
    json_array_foreach(tcs, i, tc)
    {
        json_t *fn = json_object_get(tc, "function");
        json_t *name = json_object_get(fn, "name");
        if (!json_is_object(fn) || !json_is_string(name))
            return err_setf(ERR_INVAL, "messages[%zu]: tool_calls[%zu] needs function.name", idx,
                            i);
        if ((i && (rc = put_tmpl(p, "\n")) < 0) ||
            (rc = put_tmpl(p, "<｜DSML｜invoke name=\"")) < 0 ||
            (rc = put_text(p, json_string_value(name), json_string_length(name))) < 0 ||
            (rc = put_tmpl(p, "\">\n")) < 0 ||
            (rc = render_arguments(p, json_object_get(fn, "arguments"))) < 0 ||
            (rc = put_tmpl(p, "\n</｜DSML｜invoke>")) < 0)
            return rc;
    }
    return put_tmpl(p, "\n</｜DSML｜tool_calls>");
}

static int render_user_blocks(struct chat_prompt *p, const json_t *blocks, size_t idx)
{
    size_t i;
    json_t *b;
    int rc = 0;
    json_array_foreach(blocks, i, b)
    {
        const char *type = json_string_value(json_object_get(b, "type"));
        if (i && (rc = put_tmpl(p, "\n\n")) < 0)
            return rc;
        if (type && strcmp(type, "text") == 0) {
            rc = put_value(p, json_object_get(b, "text"), false, "content", idx);
        } else if (type && strcmp(type, "tool_result") == 0) {
            json_t *c = json_object_get(b, "content");
            if ((rc = put_tmpl(p, "<tool_result>")) < 0)
                return rc;
            if (json_is_array(c)) {
                size_t k;
                json_t *part;
                json_array_foreach(c, k, part)
                {
                    const char *pt = json_string_value(json_object_get(part, "type"));
                    if (k && (rc = put_tmpl(p, "\n\n")) < 0)
                        return rc;
                    if (pt && strcmp(pt, "text") == 0) {
                        json_t *txt = json_object_get(part, "text");
                        rc = put_value(p, txt ? txt : json_string(""), false, "text", idx);
                    } else {
                        rc = put_tmpl(p, "[Unsupported ");
                        if (rc == 0)
                            rc = pt ? put_text(p, pt, strlen(pt)) : put_text(p, "None", 4);
                        if (rc == 0)
                            rc = put_tmpl(p, "]");
                    }
                    if (rc < 0)
                        return rc;
                }
            } else if ((rc = put_value(p, c, true, "tool content", idx)) < 0) {
                return rc;
            }
            rc = put_tmpl(p, "</tool_result>");
        } else {
            rc = put_tmpl(p, "[Unsupported ");
            if (rc == 0)
                rc = type ? put_text(p, type, strlen(type)) : put_text(p, "None", 4);
            if (rc == 0)
                rc = put_tmpl(p, "]");
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}

static const char *task_token(const char *task)
{
    for (size_t i = 0; i < sizeof TASKS / sizeof *TASKS; i++)
        if (strcmp(TASKS[i].name, task) == 0)
            return TASKS[i].token;
    return NULL;
}

static int render_message(struct chat_prompt *p, size_t index, const json_t *msgs,
                          const struct chat_opts *o, bool drop_thinking)
{
    const json_t *msg = json_array_get(msgs, index);
    long last_user = last_user_index(msgs);
    bool thinking = o->mode == CHAT_MODE_THINKING;
    const char *role = role_of(msg);
    json_t *content = json_object_get(msg, "content");
    int rc = 0;

    if (index == 0 && thinking) {
        const char *prefix = NULL;
        if (o->revision == CHAT_REV_ORIGINAL && o->effort == CHAT_EFFORT_MAX)
            prefix = EFFORT_TEXT_A;
        else if (o->revision == CHAT_REV_0731 && o->effort == CHAT_EFFORT_HIGH)
            prefix = EFFORT_TEXT_A;
        else if (o->revision == CHAT_REV_0731 && o->effort == CHAT_EFFORT_MAX)
            prefix = EFFORT_TEXT_B;
        if (prefix && (rc = put_tmpl(p, prefix)) < 0)
            return rc;
    }

    if (!role)
        return err_setf(ERR_INVAL, "messages[%zu] has no role", index);
    if (strcmp(role, "system") == 0) {
        if (py_truthy(content) && (rc = put_value(p, content, false, "content", index)) < 0)
            return rc;
        if ((rc = render_suffixes(p, msg, index)) < 0)
            return rc;
    } else if (strcmp(role, "developer") == 0) {
        if (!py_truthy(content))
            return err_setf(ERR_INVAL, "messages[%zu]: a developer message needs content", index);
        if ((rc = put_tmpl(p, USER_SP)) < 0 ||
            (rc = put_value(p, content, false, "content", index)) < 0 ||
            (rc = render_suffixes(p, msg, index)) < 0)
            return rc;
    } else if (strcmp(role, "user") == 0) {
        json_t *blocks = json_object_get(msg, "content_blocks");
        if ((rc = put_tmpl(p, USER_SP)) < 0)
            return rc;
        if (py_truthy(blocks))
            rc = render_user_blocks(p, blocks, index);
        else if (py_truthy(content))
            rc = put_value(p, content, false, "content", index);
        if (rc < 0)
            return rc;
    } else if (strcmp(role, "latest_reminder") == 0) {
        if ((rc = put_tmpl(p, LATEST_REMINDER_SP)) < 0 ||
            (rc = put_value(p, content, true, "content", index)) < 0)
            return rc;
    } else if (strcmp(role, "assistant") == 0) {
        json_t *tcs = json_object_get(msg, "tool_calls");
        json_t *rc_text = json_object_get(msg, "reasoning_content");
        bool prev_has_task = index > 0 && has_value(json_array_get(msgs, index - 1), "task");
        if (thinking && !prev_has_task && (!drop_thinking || (long)index > last_user)) {
            if (py_truthy(rc_text) &&
                (rc = put_value(p, rc_text, false, "reasoning_content", index)) < 0)
                return rc;
            if ((rc = put_tmpl(p, THINK_END)) < 0)
                return rc;
        }
        if (py_truthy(content) && (rc = put_value(p, content, false, "content", index)) < 0)
            return rc;
        if (py_truthy(tcs) && (rc = render_tool_calls(p, tcs, index)) < 0)
            return rc;
        if (!py_truthy(json_object_get(msg, "wo_eos")) && (rc = put_tmpl(p, EOS)) < 0)
            return rc;
    } else if (strcmp(role, "tool") == 0) {
        return err_setf(ERR_INVAL, "messages[%zu]: tool messages must be merged first", index);
    } else {
        return err_setf(ERR_INVAL, "messages[%zu]: unknown role \"%s\"", index, role);
    }

    /* Transition to what follows. */
    if (index + 1 < json_array_size(msgs)) {
        const json_t *next = json_array_get(msgs, index + 1);
        if (!role_is(next, "assistant") && !role_is(next, "latest_reminder"))
            return 0;
    }
    json_t *task = json_object_get(msg, "task");
    if (task && !json_is_null(task)) {
        const char *tok = json_is_string(task) ? task_token(json_string_value(task)) : NULL;
        if (!tok)
            return err_setf(ERR_INVAL, "messages[%zu]: invalid task", index);
        if (strcmp(json_string_value(task), "action") != 0)
            return put_tmpl(p, tok);
        if ((rc = put_tmpl(p, ASSISTANT_SP)) < 0 ||
            (rc = put_tmpl(p, thinking ? THINK_START : THINK_END)) < 0)
            return rc;
        return put_tmpl(p, tok);
    }
    if (strcmp(role, "user") == 0 || strcmp(role, "developer") == 0) {
        if ((rc = put_tmpl(p, ASSISTANT_SP)) < 0)
            return rc;
        bool open =
            (!drop_thinking && thinking) || (drop_thinking && thinking && (long)index >= last_user);
        return put_tmpl(p, open ? THINK_START : THINK_END);
    }
    return 0;
}

/* ---- encode_messages ---- */

static json_t *concat(const json_t *a, const json_t *b)
{
    json_t *c = json_array();
    if (!c || json_array_extend(c, (json_t *)a) || json_array_extend(c, (json_t *)b)) {
        json_decref(c);
        return NULL;
    }
    return c;
}

int chat_encode(const json_t *messages, const json_t *tools, const json_t *context,
                const struct chat_opts *o, struct chat_prompt *out)
{
    json_t *msgs = NULL, *ctx = NULL, *merged = NULL, *cmerged = NULL, *all = NULL;
    json_t *full = NULL, *dropped_ctx = NULL;
    int rc;
    memset(out, 0, sizeof *out);
    if (!json_is_array(messages))
        return err_setf(ERR_INVAL, "messages must be a list");
    if (context && !json_is_null(context) && !json_is_array(context))
        return err_setf(ERR_INVAL, "context must be a list");

    if ((rc = normalize_list(messages, &msgs)) < 0)
        goto out;
    if (py_truthy(tools)) {
        if (!json_is_array(tools)) {
            rc = err_setf(ERR_INVAL, "tools must be a list");
            goto out;
        }
        if ((rc = attach_tools(msgs, tools)) < 0)
            goto out;
    }
    if (context && json_is_array(context))
        rc = normalize_list(context, &ctx);
    else if (!(ctx = json_array()))
        rc = err_setf(ERR_NOMEM, "chat: context");
    if (rc < 0)
        goto out;
    size_t n_ctx = json_array_size(ctx);

    /* messages = sort(context + merge(messages))[len(context):]; context = sort(merge(context)) */
    rc = ERR_NOMEM;
    if (!(merged = merge_tool_messages(msgs)) || !(all = concat(ctx, merged)))
        goto nomem;
    if ((rc = sort_tool_results(all)) < 0)
        goto out;
    json_decref(merged);
    merged = json_array();
    if (!merged)
        goto nomem;
    for (size_t i = n_ctx; i < json_array_size(all); i++)
        json_array_append(merged, json_array_get(all, i));
    if (n_ctx) {
        if (!(cmerged = merge_tool_messages(ctx)))
            goto nomem;
        if ((rc = sort_tool_results(cmerged)) < 0)
            goto out;
    } else if (!(cmerged = json_array())) {
        goto nomem;
    }
    n_ctx = json_array_size(cmerged);
    if (!(full = concat(cmerged, merged)))
        goto nomem;

    if (o->add_bos && n_ctx == 0 && (rc = put_tmpl(out, BOS)) < 0)
        goto out;

    bool drop = o->drop_thinking;
    size_t i;
    json_t *m;
    json_array_foreach(full, i, m)
    {
        if (py_truthy(json_object_get(m, "tools")))
            drop = false;
    }
    size_t n_render, ctx_len;
    if (o->mode == CHAT_MODE_THINKING && drop) {
        json_t *d = drop_thinking_messages(full);
        if (!d || !(dropped_ctx = drop_thinking_messages(cmerged))) {
            json_decref(d);
            goto nomem;
        }
        json_decref(full);
        full = d;
        n_render = json_array_size(full) - json_array_size(dropped_ctx);
        ctx_len = json_array_size(full) - n_render;
    } else {
        n_render = json_array_size(merged);
        ctx_len = n_ctx;
    }
    for (size_t k = 0; k < n_render; k++)
        if ((rc = render_message(out, k + ctx_len, full, o, drop)) < 0)
            goto out;
    rc = 0;
    if (!out->text.s && (rc = tbuf_add(&out->text, "", 0)) < 0)
        goto out;
    goto out;
nomem:
    rc = err_setf(ERR_NOMEM, "chat: out of memory");
out:
    json_decref(msgs);
    json_decref(ctx);
    json_decref(merged);
    json_decref(cmerged);
    json_decref(all);
    json_decref(full);
    json_decref(dropped_ctx);
    if (rc < 0)
        chat_prompt_free(out);
    return rc;
}

int chat_prompt_tokenize(const struct tokenizer *t, const struct chat_prompt *p, bool safe,
                         struct tok_ids *ids)
{
    const char *s = p->text.s ? p->text.s : "";
    if (!safe)
        return tok_encode(t, s, p->text.len, TOK_ENC_ADDED, ids);
    return tok_encode_trusted(t, s, p->text.len, p->ctrl, p->n_ctrl, ids);
}
