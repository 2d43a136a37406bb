/*
 * dsml.c - the output parser (see dsml.h).
 *
 * The parser keeps the not-yet-decided text in buf[pos..len). Text states (reasoning, content,
 * a parameter value) emit everything up to the earliest complete marker, or, when none is
 * complete, everything except the longest tail that is a prefix of a marker. Structural states
 * (inside <｜DSML｜tool_calls>) wait until the next structural token is complete and either
 * advance, ask for more text, or declare the block malformed. `final` (set by finish) turns
 * "ask for more" into "malformed" and releases every held tail.
 */
#include "engine/dsml.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/json_py.h"

static const char TC[] = "<｜DSML｜tool_calls>";
static const char TC_NL[] = "\n\n<｜DSML｜tool_calls>";
static const char TC_END[] = "</｜DSML｜tool_calls>";
static const char INVOKE[] = "<｜DSML｜invoke";
static const char INVOKE_END[] = "</｜DSML｜invoke>";
static const char PARAM[] = "<｜DSML｜parameter";
static const char PARAM_END[] = "</｜DSML｜parameter>";
static const char THINK_S[] = "<think>";
static const char THINK_E[] = "</think>";
static const char EOS[] = "<｜end▁of▁sentence｜>";

#define HEAD_MAX 4096 /* longest tool name / parameter header we wait for */

enum dsml_state {
    ST_REASONING,
    ST_CONTENT,
    ST_INVOKE, /* expecting <｜DSML｜invoke or </｜DSML｜tool_calls> */
    ST_NAME,   /* expecting  name="...">  */
    ST_PARAMS, /* expecting <｜DSML｜parameter or </｜DSML｜invoke> */
    ST_PHEAD,  /* expecting  name="..." string="true|false">  */
    ST_PVALUE, /* inside a parameter value */
    ST_DONE,   /* after EOS */
};

enum step { STEP_NEED = 0, STEP_PROGRESS = 1, STEP_BAD = 2 };

struct dsml_parser {
    enum dsml_state st;
    struct tbuf buf;
    size_t pos;
    bool final;
    dsml_emit_fn fn;
    void *ud;
    uint64_t seed;
    int n_tools;     /* tool calls begun */
    bool in_tool;    /* a TOOL_BEGIN without its TOOL_END */
    int n_params;    /* parameters of the open call */
    bool param_str;  /* the open parameter is string="true" */
    struct tbuf raw; /* the block's text while no call of it has begun (for degrading) */
    bool raw_live;
    struct tbuf scratch;
};

/* ---- Emitting ---- */

static int emit_text(struct dsml_parser *p, enum dsml_event_kind k, const char *s, size_t n)
{
    if (n == 0)
        return 0;
    struct dsml_event ev = {.kind = k, .text = s, .len = n, .tool_index = p->n_tools - 1};
    return p->fn(p->ud, &ev);
}

static int emit_args(struct dsml_parser *p, const char *s, size_t n)
{
    return emit_text(p, DSML_EV_TOOL_ARGS, s, n);
}

/* A value chunk: JSON-escaped when the parameter is a string. */
static int emit_value(struct dsml_parser *p, const char *s, size_t n)
{
    if (!p->param_str || n == 0)
        return emit_args(p, s, n);
    tbuf_clear(&p->scratch);
    int rc = jpy_escape(&p->scratch, s, n);
    return rc < 0 ? rc : emit_args(p, p->scratch.s, p->scratch.len);
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int begin_tool(struct dsml_parser *p, const char *name, size_t n)
{
    char id[32];
    uint64_t x = p->seed ^ ((uint64_t)(p->n_tools + 1) * 0xd1b54a32d192ed03ull);
    uint64_t a = splitmix64(&x), b = splitmix64(&x);
    snprintf(id, sizeof id, "call_%016llx%08llx", (unsigned long long)a,
             (unsigned long long)(b & 0xffffffffu));
    tbuf_clear(&p->scratch);
    int rc = tbuf_add(&p->scratch, name, n);
    if (rc < 0)
        return rc;
    p->n_tools++;
    p->in_tool = true;
    p->n_params = 0;
    p->raw_live = false;
    tbuf_clear(&p->raw);
    struct dsml_event ev = {
        .kind = DSML_EV_TOOL_BEGIN, .tool_index = p->n_tools - 1, .id = id, .name = p->scratch.s};
    return p->fn(p->ud, &ev);
}

static int end_tool(struct dsml_parser *p)
{
    int rc = p->n_params ? emit_args(p, "}", 1) : emit_args(p, "{}", 2);
    if (rc != 0)
        return rc;
    p->in_tool = false;
    struct dsml_event ev = {.kind = DSML_EV_TOOL_END, .tool_index = p->n_tools - 1};
    return p->fn(p->ud, &ev);
}

/* Malformed DSML: close what is open with valid JSON, give unclaimed text back to content. */
static int degrade(struct dsml_parser *p)
{
    int rc;
    if (p->in_tool) {
        if (p->st == ST_PVALUE && p->param_str && (rc = emit_args(p, "\"", 1)) != 0)
            return rc;
        if ((rc = end_tool(p)) != 0)
            return rc;
    }
    if (p->raw_live && (rc = emit_text(p, DSML_EV_CONTENT, p->raw.s, p->raw.len)) != 0)
        return rc;
    p->raw_live = false;
    tbuf_clear(&p->raw);
    p->st = ST_CONTENT;
    return 0;
}

/* ---- The buffer ---- */

static const char *rem(const struct dsml_parser *p, size_t *n)
{
    *n = p->buf.len - p->pos;
    return p->buf.s ? p->buf.s + p->pos : "";
}

static int consume(struct dsml_parser *p, size_t n)
{
    if (p->raw_live) {
        int rc = tbuf_add(&p->raw, p->buf.s + p->pos, n);
        if (rc < 0)
            return rc;
    }
    p->pos += n;
    return 0;
}

enum lit { LIT_NO, LIT_PREFIX, LIT_YES };

/* Does the pending text start with lit? LIT_PREFIX: it is a proper prefix of lit. */
static enum lit starts(const struct dsml_parser *p, const char *lit)
{
    size_t n, l = strlen(lit);
    const char *s = rem(p, &n);
    if (n >= l)
        return memcmp(s, lit, l) == 0 ? LIT_YES : LIT_NO;
    return memcmp(s, lit, n) == 0 ? LIT_PREFIX : LIT_NO;
}

static int skip_ws(struct dsml_parser *p)
{
    size_t n, k = 0;
    const char *s = rem(p, &n);
    while (k < n && (s[k] == ' ' || s[k] == '\n' || s[k] == '\t' || s[k] == '\r'))
        k++;
    return consume(p, k);
}

/* ---- Text states ---- */

struct marker {
    const char *s;
    int action;
};

enum { ACT_DROP, ACT_TO_CONTENT, ACT_TO_TOOLS, ACT_DONE, ACT_PARAM_END, ACT_BAD };

/*
 * Earliest complete marker in s[0..n): returns its index and sets *at; or -1 and sets *safe to
 * the bytes that can be emitted now (all of them when final).
 */
static int scan(const char *s, size_t n, const struct marker *m, size_t nm, bool final, size_t *at,
                size_t *safe)
{
    int best = -1;
    size_t best_at = n;
    for (size_t k = 0; k < nm; k++) {
        const char *f = memmem(s, n, m[k].s, strlen(m[k].s));
        if (f && (size_t)(f - s) < best_at) {
            best_at = (size_t)(f - s);
            best = (int)k;
        }
    }
    if (best >= 0) {
        *at = best_at;
        return best;
    }
    size_t hold = 0;
    if (!final) {
        for (size_t k = 0; k < nm; k++) {
            size_t ml = strlen(m[k].s);
            for (size_t l = ml - 1 < n ? ml - 1 : n; l > hold; l--)
                if (memcmp(s + n - l, m[k].s, l) == 0) {
                    hold = l;
                    break;
                }
        }
    }
    *safe = n - hold;
    return -1;
}

static const struct marker REASONING_MARKERS[] = {
    {THINK_E, ACT_TO_CONTENT}, {TC_NL, ACT_TO_TOOLS}, {TC, ACT_TO_TOOLS},
    {THINK_S, ACT_DROP},       {EOS, ACT_DONE},
};
static const struct marker CONTENT_MARKERS[] = {
    {TC_NL, ACT_TO_TOOLS}, {TC, ACT_TO_TOOLS}, {THINK_E, ACT_DROP},
    {THINK_S, ACT_DROP},   {EOS, ACT_DONE},
};
static const struct marker VALUE_MARKERS[] = {{PARAM_END, ACT_PARAM_END}, {EOS, ACT_BAD}};

static int step_text(struct dsml_parser *p)
{
    const struct marker *m;
    size_t nm;
    enum dsml_event_kind kind = DSML_EV_CONTENT;
    if (p->st == ST_REASONING) {
        m = REASONING_MARKERS;
        nm = sizeof REASONING_MARKERS / sizeof *m;
        kind = DSML_EV_REASONING;
    } else if (p->st == ST_CONTENT) {
        m = CONTENT_MARKERS;
        nm = sizeof CONTENT_MARKERS / sizeof *m;
    } else {
        m = VALUE_MARKERS;
        nm = sizeof VALUE_MARKERS / sizeof *m;
    }
    size_t n, at = 0, safe = 0;
    const char *s = rem(p, &n);
    int k = scan(s, n, m, nm, p->final, &at, &safe);
    int rc;
    if (k < 0) {
        rc = p->st == ST_PVALUE ? emit_value(p, s, safe) : emit_text(p, kind, s, safe);
        if (rc != 0)
            return rc;
        p->pos += safe;
        return STEP_NEED;
    }
    rc = p->st == ST_PVALUE ? emit_value(p, s, at) : emit_text(p, kind, s, at);
    if (rc != 0)
        return rc;
    p->pos += at;
    size_t ml = strlen(m[k].s);
    switch (m[k].action) {
    case ACT_DROP:
        p->pos += ml;
        break;
    case ACT_TO_CONTENT:
        p->pos += ml;
        p->st = ST_CONTENT;
        break;
    case ACT_TO_TOOLS:
        p->raw_live = true;
        tbuf_clear(&p->raw);
        if ((rc = consume(p, ml)) < 0)
            return rc;
        p->st = ST_INVOKE;
        break;
    case ACT_DONE:
        p->pos = p->buf.len;
        p->st = ST_DONE;
        break;
    case ACT_PARAM_END:
        p->pos += ml;
        if (p->param_str && (rc = emit_args(p, "\"", 1)) != 0)
            return rc;
        p->st = ST_PARAMS;
        break;
    case ACT_BAD:
        return STEP_BAD;
    }
    return STEP_PROGRESS;
}

/* ---- Structural states ---- */

static int need_or_bad(const struct dsml_parser *p)
{
    return p->final ? STEP_BAD : STEP_NEED;
}

/* Pending text up to (not including) the first `">`; *q = its offset, or false. */
static bool find_close(const struct dsml_parser *p, size_t *q)
{
    size_t n;
    const char *s = rem(p, &n);
    const char *f = memmem(s, n, "\">", 2);
    if (!f)
        return false;
    *q = (size_t)(f - s);
    return true;
}

static size_t skip_sp(const char *s, size_t i, size_t n)
{
    while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r'))
        i++;
    return i;
}

static int step_tools(struct dsml_parser *p)
{
    int rc;
    size_t n, q;
    const char *s;
    enum lit a, b;
    switch (p->st) {
    case ST_INVOKE:
        if ((rc = skip_ws(p)) < 0)
            return rc;
        a = starts(p, INVOKE);
        b = starts(p, TC_END);
        if (a == LIT_YES) {
            if ((rc = consume(p, strlen(INVOKE))) < 0)
                return rc;
            p->st = ST_NAME;
            return STEP_PROGRESS;
        }
        if (b == LIT_YES) {
            p->pos += strlen(TC_END);
            p->raw_live = false; /* an empty block vanishes */
            tbuf_clear(&p->raw);
            p->st = ST_CONTENT;
            return STEP_PROGRESS;
        }
        s = rem(p, &n);
        if (n == 0 || a == LIT_PREFIX || b == LIT_PREFIX)
            return need_or_bad(p);
        return STEP_BAD;
    case ST_NAME:
        s = rem(p, &n);
        if (!find_close(p, &q)) {
            /* the name chunk ends before the next DSML tag, as the reference reads it */
            if (n > HEAD_MAX || memmem(s, n, "｜DSML｜", strlen("｜DSML｜")))
                return STEP_BAD;
            return need_or_bad(p);
        }
        {
            size_t i = skip_sp(s, 0, q);
            if (q - i < 6 || memcmp(s + i, "name=\"", 6) != 0 ||
                memmem(s, q, "｜DSML｜", strlen("｜DSML｜")))
                return STEP_BAD;
            i += 6;
            if ((rc = begin_tool(p, s + i, q - i)) != 0)
                return rc;
            p->pos += q + 2;
            p->st = ST_PARAMS;
        }
        return STEP_PROGRESS;
    case ST_PARAMS:
        if ((rc = skip_ws(p)) < 0)
            return rc;
        a = starts(p, PARAM);
        b = starts(p, INVOKE_END);
        if (a == LIT_YES) {
            p->pos += strlen(PARAM);
            p->st = ST_PHEAD;
            return STEP_PROGRESS;
        }
        if (b == LIT_YES) {
            p->pos += strlen(INVOKE_END);
            if ((rc = end_tool(p)) != 0)
                return rc;
            p->st = ST_INVOKE;
            return STEP_PROGRESS;
        }
        s = rem(p, &n);
        if (n == 0 || a == LIT_PREFIX || b == LIT_PREFIX)
            return need_or_bad(p);
        return STEP_BAD;
    case ST_PHEAD: {
        s = rem(p, &n);
        const char *t = memmem(s, n, "string=\"true\">", 14);
        const char *f = memmem(s, n, "string=\"false\">", 15);
        const char *e = t && (!f || t < f) ? t : f;
        /* the header ends before the value's closing tag, as the reference reads it */
        const char *close = memmem(s, n, PARAM_END, strlen(PARAM_END));
        if (close && (!e || e > close))
            return STEP_BAD;
        if (!e)
            return n > HEAD_MAX ? STEP_BAD : need_or_bad(p);
        bool is_str = e == t;
        size_t hend = (size_t)(e - s); /* header text before string= */
        size_t i = skip_sp(s, 0, hend), j = hend;
        while (j > i && (s[j - 1] == ' ' || s[j - 1] == '\t' || s[j - 1] == '\n'))
            j--;
        if (j - i < 7 || memcmp(s + i, "name=\"", 6) != 0 || s[j - 1] != '"')
            return STEP_BAD;
        tbuf_clear(&p->scratch);
        if ((rc = tbuf_add(&p->scratch, p->n_params ? ", " : "{", p->n_params ? 2 : 1)) < 0 ||
            (rc = jpy_dump_str(&p->scratch, s + i + 6, j - 1 - (i + 6))) < 0 ||
            (rc = tbuf_add(&p->scratch, is_str ? ": \"" : ": ", is_str ? 3 : 2)) < 0)
            return rc;
        if ((rc = emit_args(p, p->scratch.s, p->scratch.len)) != 0)
            return rc;
        p->n_params++;
        p->param_str = is_str;
        p->pos += hend + (is_str ? 14 : 15);
        p->st = ST_PVALUE;
        return STEP_PROGRESS;
    }
    default:
        return STEP_NEED;
    }
}

/* ---- Driver ---- */

static int run(struct dsml_parser *p)
{
    for (;;) {
        int r;
        if (p->st == ST_DONE) {
            p->pos = p->buf.len;
            break;
        }
        if (p->st == ST_REASONING || p->st == ST_CONTENT || p->st == ST_PVALUE)
            r = step_text(p);
        else
            r = step_tools(p);
        if (r < 0)
            return r; /* an error, or the callback's code */
        if (r == STEP_BAD) {
            if ((r = degrade(p)) != 0)
                return r;
            continue;
        }
        if (r == STEP_NEED)
            break;
    }
    /* Compact the buffer. */
    size_t n = p->buf.len - p->pos;
    if (p->pos && n)
        memmove(p->buf.s, p->buf.s + p->pos, n);
    p->buf.len = n;
    p->pos = 0;
    return 0;
}

int dsml_parser_new(bool thinking, uint64_t id_seed, dsml_emit_fn fn, void *ud,
                    struct dsml_parser **out)
{
    struct dsml_parser *p = calloc(1, sizeof *p);
    if (!p)
        return err_setf(ERR_NOMEM, "dsml parser");
    p->st = thinking ? ST_REASONING : ST_CONTENT;
    p->fn = fn;
    p->ud = ud;
    p->seed = id_seed;
    *out = p;
    return 0;
}

int dsml_parser_feed(struct dsml_parser *p, const char *text, size_t len)
{
    if (p->final)
        return err_setf(ERR_INVAL, "dsml parser: feed after finish");
    if (p->st == ST_DONE || len == 0)
        return 0;
    int rc = tbuf_add(&p->buf, text, len);
    return rc < 0 ? rc : run(p);
}

int dsml_parser_finish(struct dsml_parser *p)
{
    if (p->final)
        return 0;
    p->final = true;
    int rc = run(p);
    if (rc == 0 && p->in_tool)
        rc = degrade(p);
    return rc;
}

void dsml_parser_free(struct dsml_parser *p)
{
    if (!p)
        return;
    tbuf_free(&p->buf);
    tbuf_free(&p->raw);
    tbuf_free(&p->scratch);
    free(p);
}

/* ---- Finished text ---- */

struct collect {
    struct dsml_result *r;
    struct tbuf args;
    json_t *call; /* the open call */
};

static int collect_event(void *ud, const struct dsml_event *ev)
{
    struct collect *c = ud;
    switch (ev->kind) {
    case DSML_EV_REASONING:
        return tbuf_add(&c->r->reasoning, ev->text, ev->len);
    case DSML_EV_CONTENT:
        return tbuf_add(&c->r->content, ev->text, ev->len);
    case DSML_EV_TOOL_ARGS:
        return tbuf_add(&c->args, ev->text, ev->len);
    case DSML_EV_TOOL_BEGIN:
        tbuf_clear(&c->args);
        c->call = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", ev->id, "type", "function",
                            "function", "name", ev->name, "arguments", "");
        if (!c->call || json_array_append_new(c->r->tool_calls, c->call))
            return err_setf(ERR_NOMEM, "dsml: tool call");
        return 0;
    case DSML_EV_TOOL_END: {
        json_t *fn = json_object_get(c->call, "function");
        json_t *a = json_stringn(c->args.s ? c->args.s : "", c->args.len);
        if (!a || json_object_set_new(fn, "arguments", a))
            return err_setf(ERR_NOMEM, "dsml: tool call");
        return 0;
    }
    }
    return 0;
}

int dsml_parse(const char *text, size_t len, bool thinking, uint64_t id_seed,
               struct dsml_result *out)
{
    struct dsml_parser *p = NULL;
    struct collect c = {.r = out};
    int rc;
    memset(out, 0, sizeof *out);
    out->tool_calls = json_array();
    if (!out->tool_calls)
        return err_setf(ERR_NOMEM, "dsml: result");
    if ((rc = dsml_parser_new(thinking, id_seed, collect_event, &c, &p)) < 0)
        goto out;
    if ((rc = dsml_parser_feed(p, text, len)) != 0 || (rc = dsml_parser_finish(p)) != 0)
        goto out;
    /* Make both strings non-NULL for callers. */
    if ((rc = tbuf_add(&out->reasoning, "", 0)) < 0 || (rc = tbuf_add(&out->content, "", 0)) < 0)
        goto out;
out:
    dsml_parser_free(p);
    tbuf_free(&c.args);
    if (rc != 0)
        dsml_result_free(out);
    return rc;
}

void dsml_result_free(struct dsml_result *r)
{
    if (!r)
        return;
    tbuf_free(&r->reasoning);
    tbuf_free(&r->content);
    json_decref(r->tool_calls);
    r->tool_calls = NULL;
}
