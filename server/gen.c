/*
 * gen.c - generation requests: prompt building, engine submission, event handling, and the
 * non-streaming and SSE responses of /v1/completions and /v1/chat/completions.
 *
 * Life of a generation (all on the loop thread):
 *   gen_start      parse + validate (400), model name (404), admission (503), tokenize or
 *                  chat-encode, length check (400), take a wake slot, submit one engine request
 *                  per prompt (n choices each), suspend the connection.
 *   gen_on_wake    the engine signalled: poll every dirty generation's events; turn them into
 *                  SSE bytes (stream) or accumulate them (non-stream); resume the connection
 *                  when there is something for MHD to do.
 *   gen_resumed    MHD re-entered the access handler: queue the error (the first event was an
 *                  error), the SSE response (headers only after the first event, so early
 *                  failures get a real status) or the finished JSON.
 *   sse_read       MHD's content reader: copy pending bytes, end the stream after [DONE], or
 *                  suspend until more arrive.
 *   gen_heartbeat  every --heartbeat seconds: a peer that closed its socket is noticed (peek)
 *                  even while the prompt is processed, its engine requests are cancelled and the
 *                  connection closed; idle streams get an SSE comment; deadlines are enforced.
 *   gen_free       NOTIFY_COMPLETED: release the engine requests (cancelling what still runs)
 *                  and free everything.
 *
 * Stream order (serving-conventions §3.1): a role chunk per choice (chat) or the echo chunk
 * (completions with echo), deltas, a finish chunk with an empty delta per choice, the usage
 * chunk with "choices": [] when stream_options.include_usage, then data: [DONE]. A mid-stream
 * engine error sends data: {"error": ...} then data: [DONE] (vLLM / SGLang).
 *
 * Chat output goes through the DSML parser: reasoning_content, content and tool_calls; a
 * finish with tool calls reports finish_reason "tool_calls". Every choice also carries vLLM's
 * stop_reason (the matched stop string or token id, null for EOS / length).
 *
 * THREAD SAFETY: loop thread only, except srv_wake_notify (engine thread).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/chat.h"
#include "engine/dsml.h"
#include "engine/err.h"
#include "server/log.h"
#include "server/srv.h"

#define GEN_MAX_BACKLOG (16u << 20) /* unsent SSE bytes per stream before we give up on it */

struct gen_choice {
    struct gen *g;
    int index;
    struct tbuf text;          /* non-stream: the generated text */
    json_t *lp;                /* non-stream: the logprobs accumulator */
    struct dsml_parser *dp;    /* chat stream: the incremental output parser */
    struct tbuf d_reason, d_content; /* chat stream: this token's deltas */
    json_t *d_tools;           /* chat stream: this token's tool-call deltas (array) or NULL */
    json_t *d_lp;              /* stream: logprobs not yet attached to a chunk */
    int has_tools;
    int finished;
    enum engine_finish finish;
    int32_t stop_token;
    char *stop_str;            /* owned */
    int n_tokens;
    long text_offset;          /* completions logprobs: offset of the next token's text */
    double t_last;
};

struct gen_sub {
    struct engine_req *r;
    int n_prompt;
    int done;
    int counted;               /* its prompt tokens are in the usage */
    char *echo;                /* echo text (owned) or NULL */
    size_t echo_len;
    int32_t *prompt_ids;       /* echo + logprobs: the prompt ids (owned) */
};

struct gen {
    struct srv *srv;
    struct http_req *hr;
    int slot;
    struct gen *prev, *next;
    struct api_gen_request req;
    int thinking;
    char id[64];
    long long created;
    struct gen_sub *subs;
    int n_subs;
    struct gen_choice *choices;
    int n_choices, n_finished;
    int got_event;
    int failed;                /* an error ended it; err says what */
    struct api_error err;
    int headers_sent;
    int finished_all;          /* [DONE] (stream) is in out, or the JSON can be built */
    struct tbuf out;           /* stream: SSE bytes not yet handed to MHD */
    size_t out_off;
    double t_arrival, deadline, t_last_write;
    int prompt_tokens, completion_tokens;
};

/* ---- wake slots (engine thread -> loop thread) ---- */

int srv_wake_init(struct srv_wake *w, int cap, struct srv *s)
{
    memset(w, 0, sizeof *w);
    w->slots = calloc((size_t)cap, sizeof *w->slots);
    w->scratch = calloc((size_t)cap, sizeof *w->scratch);
    if (!w->slots || !w->scratch) {
        free(w->slots);
        free(w->scratch);
        return ERR_NOMEM;
    }
    pthread_mutex_init(&w->mu, NULL);
    w->cap = cap;
    for (int i = 0; i < cap; i++) {
        w->slots[i].srv = s;
        w->slots[i].next_free = i + 1 < cap ? i + 1 : -1;
    }
    w->free_head = 0;
    w->dirty_head = -1;
    return 0;
}

void srv_wake_free(struct srv_wake *w)
{
    if (!w->slots)
        return;
    pthread_mutex_destroy(&w->mu);
    free(w->slots);
    free(w->scratch);
    memset(w, 0, sizeof *w);
}

void srv_wake_notify(void *ud)
{
    struct wake_slot *slot = ud;
    struct srv *s = slot->srv;
    pthread_mutex_lock(&s->wake.mu);
    if (!slot->dirty) {
        slot->dirty = 1;
        slot->next_dirty = s->wake.dirty_head;
        s->wake.dirty_head = (int)(slot - s->wake.slots);
    }
    pthread_mutex_unlock(&s->wake.mu);
    uv_async_send(&s->wake_async);
}

/* ---- output helpers ---- */

static const char *token_text(void *ud, int32_t id, size_t *len)
{
    return tok_id_bytes(ud, id, len);
}

/* token_text as the completion's text has it with skip_special_tokens: special tokens are "" */
static const char *token_text_skip(void *ud, int32_t id, size_t *len)
{
    if (tok_id_kind(ud, id) == 2) {
        *len = 0;
        return "";
    }
    return tok_id_bytes(ud, id, len);
}

static int out_add(struct gen *g, const char *s, size_t n)
{
    if (g->out.len - g->out_off + n > GEN_MAX_BACKLOG)
        return ERR_RANGE;
    return tbuf_add(&g->out, s, n);
}

/* data: <json>\n\n (steals v) */
static int sse_event(struct gen *g, json_t *v)
{
    size_t n = 0;
    char *s = api_dump(v, &n);
    if (!s)
        return ERR_NOMEM;
    int rc = out_add(g, "data: ", 6);
    if (rc == 0)
        rc = out_add(g, s, n);
    if (rc == 0)
        rc = out_add(g, "\n\n", 2);
    free(s);
    return rc;
}

/* A chunk with one choice (steals choice). */
static int emit_choice(struct gen *g, json_t *choice)
{
    const char *object = g->req.kind == API_KIND_CHAT ? "chat.completion.chunk"
                                                        : "text_completion";
    json_t *choices = json_array();
    if (!choices || json_array_append_new(choices, choice)) {
        json_decref(choices);
        return ERR_NOMEM;
    }
    return sse_event(g, api_envelope(object, g->id, g->created, g->srv->cfg.served_model_name,
                                     choices));
}

static json_t *stop_reason(const struct gen_choice *c)
{
    if (c->stop_str)
        return api_string_lossy(c->stop_str, strlen(c->stop_str));
    if (c->stop_token >= 0 && c->finish == ENGINE_FINISH_STOP)
        return json_integer(c->stop_token);
    return json_null();
}

static const char *finish_reason(const struct gen_choice *c)
{
    if (c->finish == ENGINE_FINISH_STOP && c->has_tools)
        return "tool_calls";
    return api_finish_reason(c->finish);
}

/* ---- chat streaming: DSML events -> one delta per token ---- */

static int on_dsml(void *ud, const struct dsml_event *ev)
{
    struct gen_choice *c = ud;
    switch (ev->kind) {
    case DSML_EV_REASONING: return tbuf_add(&c->d_reason, ev->text, ev->len);
    case DSML_EV_CONTENT: return tbuf_add(&c->d_content, ev->text, ev->len);
    default: break;
    }
    if (!c->d_tools && !(c->d_tools = json_array()))
        return ERR_NOMEM;
    json_t *d = NULL;
    if (ev->kind == DSML_EV_TOOL_BEGIN) {
        c->has_tools = 1;
        d = json_pack("{s:i, s:s, s:s, s:{s:s, s:s}}", "index", ev->tool_index, "id", ev->id,
                      "type", "function", "function", "name", ev->name, "arguments", "");
    } else if (ev->kind == DSML_EV_TOOL_ARGS && ev->len) {
        d = json_pack("{s:i, s:{s:o}}", "index", ev->tool_index, "function", "arguments",
                      api_string_lossy(ev->text, ev->len));
    } else {
        return 0;
    }
    return d && json_array_append_new(c->d_tools, d) == 0 ? 0 : ERR_NOMEM;
}

/* Emit what the parser produced for this token (if anything) as one chunk. */
static int chat_flush_delta(struct gen *g, struct gen_choice *c)
{
    if (!c->d_reason.len && !c->d_content.len && !c->d_tools)
        return 0;
    json_t *delta = json_object();
    if (!delta)
        return ERR_NOMEM;
    if (c->d_reason.len)
        json_object_set_new(delta, "reasoning_content",
                            api_string_lossy(c->d_reason.s, c->d_reason.len));
    if (c->d_content.len)
        json_object_set_new(delta, "content", api_string_lossy(c->d_content.s, c->d_content.len));
    if (c->d_tools)
        json_object_set_new(delta, "tool_calls", c->d_tools);
    c->d_tools = NULL;
    tbuf_clear(&c->d_reason);
    tbuf_clear(&c->d_content);
    json_t *lp = c->d_lp ? c->d_lp : json_null();
    c->d_lp = NULL;
    return emit_choice(g, json_pack("{s:i, s:o, s:o, s:n}", "index", c->index, "delta", delta,
                                    "logprobs", lp, "finish_reason"));
}

/* ---- events ---- */

static void gen_fail(struct gen *g, int status, const char *code, const char *msg)
{
    if (g->failed)
        return;
    g->failed = 1;
    api_error_set(&g->err, status, NULL, NULL, code, "%s", msg);
    for (int i = 0; i < g->n_subs; i++)
        if (g->subs[i].r)
            engine_cancel(g->subs[i].r);
    if (g->headers_sent) {
        size_t n = 0;
        char *e = api_error_json(&g->err, &n);
        if (e) {
            out_add(g, "data: ", 6);
            out_add(g, e, n);
            out_add(g, "\n\ndata: [DONE]\n\n", 16);
            free(e);
        }
    }
    g->finished_all = 1;
}

static void on_token(struct gen *g, struct gen_choice *c, const struct engine_event *ev)
{
    struct srv *s = g->srv;
    struct api_gen_request *q = &g->req;
    const char *text = ev->text ? ev->text : "";
    size_t tlen = ev->text ? ev->text_len : 0;
    /* token < 0: text held back at the end, no token: no latency sample, no logprobs entry */
    const int is_token = ev->token >= 0;
    if (is_token) {
        if (c->n_tokens == 0)
            metrics_observe(&s->metrics.ttft, ev->t - g->t_arrival);
        else
            metrics_observe(&s->metrics.itl, ev->t - c->t_last);
        c->t_last = ev->t;
        c->n_tokens++;
    }
    int rc = 0;
    int want_lp = q->logprobs >= 0;
    int n_top = ev->n_top < q->logprobs ? ev->n_top : q->logprobs;

    if (q->kind == API_KIND_COMPLETION) {
        json_t *lp = NULL;
        if (want_lp) {
            lp = q->stream ? api_logprobs_completion_new() : c->lp;
            /* the tokens' strings as the text has them (it drops special tokens when asked) */
            api_token_text_fn fn = q->skip_special_tokens ? token_text_skip : token_text;
            if (!lp || (is_token && api_logprobs_completion_add(lp, fn, s->tok, ev->token,
                                                                &ev->logprob, ev->top, n_top,
                                                                c->text_offset) < 0))
                rc = ERR_NOMEM;
        }
        c->text_offset += (long)tlen;
        if (q->stream && rc == 0)
            rc = emit_choice(g, json_pack("{s:i, s:o, s:o, s:n}", "index", c->index, "text",
                                          api_string_lossy(text, tlen), "logprobs",
                                          lp ? lp : json_null(), "finish_reason"));
        else if (q->stream)
            json_decref(lp);
        if (!q->stream && rc == 0)
            rc = tbuf_add(&c->text, text, tlen);
    } else {
        if (want_lp) {
            if (q->stream && !c->d_lp)
                c->d_lp = api_logprobs_chat_new();
            json_t *lp = q->stream ? c->d_lp : c->lp;
            if (!lp || (is_token && api_logprobs_chat_add(lp, token_text, s->tok, ev->token,
                                                          ev->logprob, ev->top, n_top) < 0))
                rc = ERR_NOMEM;
        }
        if (q->stream) {
            if (rc == 0)
                rc = dsml_parser_feed(c->dp, text, tlen);
            if (rc == 0)
                rc = chat_flush_delta(g, c);
        } else if (rc == 0) {
            rc = tbuf_add(&c->text, text, tlen);
        }
    }
    if (rc < 0)
        gen_fail(g, 500, "internal_error",
                 rc == ERR_RANGE ? "the client reads too slowly" : "out of memory");
}

static void on_finish(struct gen *g, int sub, struct gen_choice *c, struct engine_event *ev)
{
    struct srv *s = g->srv;
    struct api_gen_request *q = &g->req;
    if (c->finished)
        return;
    c->finished = 1;
    c->finish = ev->finish;
    c->stop_token = ev->stop_token;
    c->stop_str = ev->stop_str; /* take it */
    ev->stop_str = NULL;
    g->n_finished++;
    g->completion_tokens += ev->completion_tokens;
    if (!g->subs[sub].counted) {
        g->subs[sub].counted = 1;
        g->prompt_tokens += ev->prompt_tokens;
        metrics_observe(&s->metrics.prompt_tokens, ev->prompt_tokens);
    }
    if ((unsigned)ev->finish < 4)
        s->metrics.success[ev->finish]++;
    metrics_observe(&s->metrics.e2e, ev->t - g->t_arrival);
    metrics_observe(&s->metrics.queue, ev->queue_time);
    metrics_observe(&s->metrics.gen_tokens, ev->completion_tokens);
    if (ev->finish == ENGINE_FINISH_ERROR) {
        gen_fail(g, 500, "engine_error", "the engine failed while generating");
        return;
    }
    if (q->stream) {
        int rc = 0;
        if (q->kind == API_KIND_CHAT) {
            rc = dsml_parser_finish(c->dp);
            if (rc == 0)
                rc = chat_flush_delta(g, c);
            json_t *lp = c->d_lp ? c->d_lp : json_null();
            c->d_lp = NULL;
            if (rc == 0)
                rc = emit_choice(g, json_pack("{s:i, s:{}, s:o, s:s, s:o}", "index", c->index,
                                              "delta", "logprobs", lp, "finish_reason",
                                              finish_reason(c), "stop_reason", stop_reason(c)));
            else
                json_decref(lp);
        } else {
            rc = emit_choice(g, json_pack("{s:i, s:s, s:n, s:s, s:o}", "index", c->index, "text",
                                          "", "logprobs", "finish_reason", finish_reason(c),
                                          "stop_reason", stop_reason(c)));
        }
        if (rc < 0) {
            gen_fail(g, 500, "internal_error", "out of memory");
            return;
        }
    }
    if (g->n_finished < g->n_choices)
        return;
    if (q->stream) {
        int rc = 0;
        if (q->include_usage) {
            const char *object = q->kind == API_KIND_CHAT ? "chat.completion.chunk"
                                                            : "text_completion";
            json_t *u = api_envelope(object, g->id, g->created, s->cfg.served_model_name,
                                     json_array());
            if (!u || json_object_set_new(u, "usage",
                                          api_usage(g->prompt_tokens, g->completion_tokens)))
                rc = ERR_NOMEM;
            if (rc == 0)
                rc = sse_event(g, u);
            else
                json_decref(u);
        }
        if (rc == 0)
            rc = out_add(g, "data: [DONE]\n\n", 14);
        if (rc < 0) {
            gen_fail(g, 500, "internal_error", "out of memory");
            return;
        }
    }
    g->finished_all = 1;
}

static void gen_event(struct gen *g, int sub, struct engine_event *ev)
{
    g->got_event = 1;
    if (g->failed)
        return;
    int idx = sub * g->req.n + ev->choice;
    if (ev->choice < 0 || ev->choice >= g->req.n) {
        gen_fail(g, 500, "internal_error", "the engine reported an unknown choice");
        return;
    }
    struct gen_choice *c = &g->choices[idx];
    switch (ev->type) {
    case ENGINE_EV_TOKEN:
        if (!c->finished)
            on_token(g, c, ev);
        break;
    case ENGINE_EV_FINISH:
        on_finish(g, sub, c, ev);
        break;
    case ENGINE_EV_ERROR: {
        char msg[300];
        snprintf(msg, sizeof msg, "engine error: %s", ev->message);
        gen_fail(g, ev->err == ERR_BUSY ? 503 : 500, "engine_error", msg);
        break;
    }
    }
}

/* Poll every event the engine has for g, then let MHD continue if there is something to do. */
static void gen_pump(struct gen *g)
{
    for (int i = 0; i < g->n_subs; i++) {
        struct gen_sub *sub = &g->subs[i];
        struct engine_event ev;
        if (!sub->r || sub->done)
            continue;
        while (engine_poll(sub->r, &ev) == 1) {
            gen_event(g, i, &ev);
            engine_event_clear(&ev);
        }
        if (engine_req_done(sub->r))
            sub->done = 1;
    }
    struct http_req *hr = g->hr;
    if (!hr->suspended)
        return;
    if (!g->headers_sent) {
        if (g->failed || g->finished_all || (g->req.stream && g->got_event))
            http_resume(hr);
    } else if (g->out.len > g->out_off || g->finished_all) {
        http_resume(hr);
    }
}

void gen_on_wake(uv_async_t *a)
{
    struct srv *s = a->data;
    struct srv_wake *w = &s->wake;
    int n = 0;
    pthread_mutex_lock(&w->mu);
    for (int i = w->dirty_head; i >= 0; i = w->slots[i].next_dirty) {
        w->slots[i].dirty = 0;
        w->scratch[n++] = i;
    }
    w->dirty_head = -1;
    pthread_mutex_unlock(&w->mu);
    /* nothing below frees a generation (that happens in MHD callbacks, inside http_drive) */
    for (int k = n - 1; k >= 0; k--) {
        struct gen *g = w->slots[w->scratch[k]].g;
        if (g)
            gen_pump(g);
    }
    http_drive(s);
}

/* ---- SSE content reader ---- */

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct http_req *hr = cls;
    struct gen *g = hr->gen;
    (void)pos;
    if (!g || hr->closing)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    size_t avail = g->out.len - g->out_off;
    if (avail) {
        size_t n = avail < max ? avail : max;
        memcpy(buf, g->out.s + g->out_off, n);
        g->out_off += n;
        if (g->out_off == g->out.len) {
            tbuf_clear(&g->out);
            g->out_off = 0;
        }
        g->t_last_write = srv_now();
        return (ssize_t)n;
    }
    if (g->finished_all)
        return MHD_CONTENT_READER_END_OF_STREAM;
    http_suspend(hr);
    return 0;
}

/* ---- prompts ---- */

int gen_prompt_chat(struct srv *s, const struct api_gen_request *r, struct tok_ids *ids,
                    int *thinking, struct api_error *e)
{
    struct chat_opts o;
    struct chat_prompt p = {0};
    chat_opts_init(&o);
    *thinking = r->thinking == API_THINKING_DEFAULT ? s->cfg.default_thinking
                                                    : r->thinking == API_THINKING_ON;
    o.mode = *thinking ? CHAT_MODE_THINKING : CHAT_MODE_CHAT;
    if (r->reasoning_effort && *thinking) {
        enum chat_effort eff;
        if (chat_effort_parse(api_effort_canonical(r->reasoning_effort), &eff) == 0)
            o.effort = eff;
    }
    const json_t *tools = r->tool_choice_none ? NULL : r->tools;
    int rc = chat_encode(r->messages, tools, NULL, &o, &p);
    if (rc < 0) {
        api_error_set(e, 400, NULL, "messages", NULL, "%s", err_msg());
        chat_prompt_free(&p);
        return rc;
    }
    ids->max = API_MAX_PROMPT_IDS;
    rc = chat_prompt_tokenize(s->tok, &p, true, ids);
    chat_prompt_free(&p);
    if (rc < 0)
        return api_error_set(e, 400, NULL, "messages", NULL, "cannot tokenize the prompt: %s",
                             err_msg());
    return 0;
}

/* Prompt ids of completions prompt i into ids; echo text into sub. */
static int completion_prompt(struct gen *g, int i, struct tok_ids *ids, struct api_error *e)
{
    struct srv *s = g->srv;
    const struct api_prompt *p = &g->req.prompts[i];
    struct gen_sub *sub = &g->subs[i];
    ids->max = API_MAX_PROMPT_IDS;
    if (p->text) {
        if (tok_encode(s->tok, p->text, p->len, TOK_ENC_ADDED, ids) < 0)
            return api_error_set(e, 400, NULL, "prompt", NULL, "cannot tokenize: %s",
                                 err_msg());
    } else {
        for (int k = 0; k < p->n_ids; k++)
            if (p->ids[k] >= s->vocab_size)
                return api_error_set(e, 400, NULL, "prompt", NULL,
                                     "token id %d is out of the vocabulary [0, %d)", p->ids[k],
                                     s->vocab_size);
        if (tok_ids_add(ids, p->ids, (size_t)p->n_ids) < 0)
            return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
    }
    if (ids->n == 0)
        return api_error_set(e, 400, NULL, "prompt", NULL, "the prompt is empty");
    if (g->req.echo) {
        struct tbuf t = {0};
        int rc = p->text ? tbuf_add(&t, p->text, p->len)
                         : tok_decode(s->tok, ids->v, ids->n, 0, &t);
        if (rc == 0 && !t.s)
            rc = tbuf_add(&t, "", 0);
        if (rc < 0) {
            tbuf_free(&t);
            return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
        }
        sub->echo = tbuf_take(&t, &sub->echo_len);
        if (g->req.logprobs >= 0) {
            sub->prompt_ids = malloc(ids->n * sizeof *ids->v);
            if (!sub->prompt_ids)
                return api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
            memcpy(sub->prompt_ids, ids->v, ids->n * sizeof *ids->v);
        }
    }
    return 0;
}

/* Echo: the prompt's text (and null-logprob entries for its tokens) ahead of the output. */
static int echo_prefix(struct gen *g, int sub, struct gen_choice *c, json_t *lp)
{
    struct gen_sub *sb = &g->subs[sub];
    for (int k = 0; lp && sb->prompt_ids && k < sb->n_prompt; k++) {
        size_t n = 0;
        tok_id_bytes(g->srv->tok, sb->prompt_ids[k], &n);
        if (api_logprobs_completion_add(lp, token_text, g->srv->tok, sb->prompt_ids[k], NULL,
                                        NULL, 0, c->text_offset) < 0)
            return ERR_NOMEM;
        c->text_offset += (long)n;
    }
    c->text_offset = (long)sb->echo_len;
    return 0;
}

/* ---- start ---- */

static void gen_unlink(struct gen *g)
{
    struct srv *s = g->srv;
    if (g->prev)
        g->prev->next = g->next;
    else if (s->gens == g)
        s->gens = g->next;
    if (g->next)
        g->next->prev = g->prev;
    g->prev = g->next = NULL;
}

static int submit_error(struct api_error *e, int rc)
{
    if (rc == ERR_BUSY)
        return api_error_set(e, 503, NULL, NULL, "overloaded",
                             "the server is at capacity (queue full or draining); retry later");
    if (rc == ERR_INVAL || rc == ERR_RANGE)
        return api_error_set(e, 400, NULL, NULL, NULL, "%s", err_msg());
    return api_error_set(e, 500, NULL, NULL, NULL, "the engine refused the request: %s",
                         err_msg());
}

static int gen_setup(struct gen *g, struct api_error *e)
{
    struct srv *s = g->srv;
    struct api_gen_request *q = &g->req;
    struct tok_ids *ids = NULL;
    int n_prompts = q->kind == API_KIND_COMPLETION ? q->n_prompts : 1;
    int rc = 0;

    if (q->model && strcmp(q->model, s->cfg.served_model_name) && strcmp(q->model, s->cfg.model))
        return api_error_set(e, 404, NULL, "model", "model_not_found",
                             "The model `%s` does not exist.", q->model);
    if (s->state != SRV_READY)
        return api_error_set(e, 503, NULL, NULL, "draining", "the server is shutting down");
    struct engine_stats st;
    engine_get_stats(s->engine, &st);
    if (st.failed)
        return api_error_set(e, 500, NULL, NULL, "engine_failed", "the engine failed");
    if (st.waiting >= s->cfg.max_queue)
        return api_error_set(e, 503, NULL, NULL, "overloaded",
                             "the queue is full (%d waiting); retry later", st.waiting);

    g->subs = calloc((size_t)n_prompts, sizeof *g->subs);
    g->n_subs = n_prompts;
    g->n_choices = n_prompts * q->n;
    g->choices = calloc((size_t)g->n_choices, sizeof *g->choices);
    ids = calloc((size_t)n_prompts, sizeof *ids);
    if (!g->subs || !g->choices || !ids) {
        rc = api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
        goto out;
    }

    /* prompts */
    for (int i = 0; i < n_prompts && rc == 0; i++) {
        if (q->kind == API_KIND_CHAT)
            rc = gen_prompt_chat(s, q, &ids[i], &g->thinking, e);
        else
            rc = completion_prompt(g, i, &ids[i], e);
        g->subs[i].n_prompt = (int)ids[i].n;
    }
    if (rc < 0)
        goto out;

    /* lengths (vLLM's wording) */
    int longest = 0;
    for (int i = 0; i < n_prompts; i++)
        if (g->subs[i].n_prompt > longest)
            longest = g->subs[i].n_prompt;
    const char *pparam = q->kind == API_KIND_CHAT ? "messages" : "prompt";
    if (longest >= s->max_model_len) {
        rc = api_error_set(e, 400, NULL, pparam, "context_length_exceeded",
                           "This model's maximum context length is %d tokens. However, your "
                           "request has %d input tokens. Please reduce the length of the input.",
                           s->max_model_len, longest);
        goto out;
    }
    int max_tokens = q->max_tokens;
    if (max_tokens < 0)
        max_tokens = q->kind == API_KIND_COMPLETION ? 16 : s->max_model_len - longest;
    if (max_tokens > s->max_model_len - longest) {
        rc = api_error_set(e, 400, NULL, "max_tokens", "context_length_exceeded",
                           "This model's maximum context length is %d tokens. However, you "
                           "requested %lld tokens (%d in the input, %d for the completion). "
                           "Please reduce the length of the input or the completion.",
                           s->max_model_len, (long long)longest + max_tokens, longest,
                           max_tokens);
        goto out;
    }

    /* choices */
    for (int i = 0; i < g->n_choices; i++) {
        struct gen_choice *c = &g->choices[i];
        c->g = g;
        c->index = i;
        c->stop_token = -1;
        int sub = i / q->n;
        if (q->kind == API_KIND_CHAT && q->stream &&
            dsml_parser_new(g->thinking, (uint64_t)time(NULL) ^ (s->id_counter << 20) ^
                                             (uint64_t)i * 0x9e3779b97f4a7c15ull,
                            on_dsml, c, &c->dp) < 0) {
            rc = api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
            goto out;
        }
        if (!q->stream && q->logprobs >= 0) {
            c->lp = q->kind == API_KIND_CHAT ? api_logprobs_chat_new()
                                             : api_logprobs_completion_new();
            if (!c->lp) {
                rc = api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
                goto out;
            }
        }
        /* what goes before the first token: the role chunk (chat) or the echo (completions) */
        if (q->kind == API_KIND_COMPLETION && q->echo) {
            json_t *lp = q->logprobs >= 0 ? (q->stream ? api_logprobs_completion_new() : c->lp)
                                          : NULL;
            if (echo_prefix(g, sub, c, lp) < 0)
                rc = ERR_NOMEM;
            if (q->stream && rc == 0)
                rc = emit_choice(g, json_pack("{s:i, s:o, s:o, s:n}", "index", i, "text",
                                              api_string_lossy(g->subs[sub].echo,
                                                               g->subs[sub].echo_len),
                                              "logprobs", lp ? lp : json_null(),
                                              "finish_reason"));
            else if (q->stream)
                json_decref(lp);
            if (!q->stream && rc == 0)
                rc = tbuf_add(&c->text, g->subs[sub].echo, g->subs[sub].echo_len);
        } else if (q->kind == API_KIND_CHAT && q->stream) {
            rc = emit_choice(g, json_pack("{s:i, s:{s:s, s:s}, s:n, s:n}", "index", i, "delta",
                                          "role", "assistant", "content", "", "logprobs",
                                          "finish_reason"));
        }
        if (rc < 0) {
            rc = api_error_set(e, 500, NULL, NULL, NULL, "out of memory");
            goto out;
        }
    }

    /* submit */
    for (int i = 0; i < n_prompts; i++) {
        struct engine_params p = {0};
        p.prompt = ids[i].v;
        p.n_prompt = (int)ids[i].n;
        p.max_tokens = max_tokens;
        p.n = q->n;
        p.sampling = q->sampling;
        p.logprobs = q->logprobs;
        p.ignore_eos = q->ignore_eos;
        p.stop_ids = q->stop_ids;
        p.n_stop_ids = q->n_stop_ids;
        p.stop = q->stop;
        p.n_stop = q->n_stop;
        p.detokenize = 1;
        /* chat output is parsed for control text (</think>, DSML), so keep special tokens */
        p.detok_flags = q->kind == API_KIND_COMPLETION && q->skip_special_tokens
                            ? TOK_DEC_SKIP_SPECIAL
                            : 0;
        p.deadline = g->deadline;
        p.notify = srv_wake_notify;
        p.notify_ud = &s->wake.slots[g->slot];
        int src = engine_submit(s->engine, &p, &g->subs[i].r);
        if (src < 0) {
            g->subs[i].r = NULL;
            rc = submit_error(e, src);
            goto out;
        }
    }
out:
    for (int i = 0; ids && i < n_prompts; i++)
        tok_ids_free(&ids[i]);
    free(ids);
    return rc;
}

enum MHD_Result gen_start(struct http_req *hr, enum api_kind kind)
{
    struct srv *s = hr->srv;
    struct api_error e = {0};
    struct gen *g = calloc(1, sizeof *g);
    if (!g)
        return http_error(hr, 500, NULL, NULL, "out of memory");
    g->srv = s;
    g->hr = hr;
    g->slot = -1;
    g->t_arrival = srv_now();
    g->deadline = s->cfg.request_timeout > 0 ? g->t_arrival + s->cfg.request_timeout : 0;
    g->t_last_write = g->t_arrival;
    g->created = (long long)time(NULL);
    s->id_counter++;
    snprintf(g->id, sizeof g->id, "%s-%llx%08llx", kind == API_KIND_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)s->created, (unsigned long long)s->id_counter);
    hr->gen = g; /* owned by hr from here: gen_free runs at NOTIFY_COMPLETED */

    if (api_parse_gen(kind, hr->body.s, hr->body.len, &g->req, &e) < 0)
        return http_respond_error(hr, &e);
    /* a wake slot first: the engine may notify before engine_submit returns */
    if (s->wake.free_head < 0)
        return http_error(hr, 503, NULL, "overloaded", "too many requests in flight; retry");
    g->slot = s->wake.free_head;
    s->wake.free_head = s->wake.slots[g->slot].next_free;
    s->wake.slots[g->slot].g = g;
    g->next = s->gens;
    if (s->gens)
        s->gens->prev = g;
    s->gens = g;
    s->n_gens++;

    if (gen_setup(g, &e) < 0)
        return http_respond_error(hr, &e);
    hr->state = HR_WAITING;
    http_suspend(hr);
    return MHD_YES;
}

/* ---- responses ---- */

static json_t *final_json(struct gen *g)
{
    struct srv *s = g->srv;
    struct api_gen_request *q = &g->req;
    json_t *choices = json_array();
    for (int i = 0; choices && i < g->n_choices; i++) {
        struct gen_choice *c = &g->choices[i];
        json_t *lp = c->lp ? json_incref(c->lp) : json_null();
        json_t *ch;
        if (q->kind == API_KIND_COMPLETION) {
            ch = json_pack("{s:i, s:o, s:o, s:s, s:o}", "index", i, "text",
                           api_string_lossy(c->text.s ? c->text.s : "", c->text.len), "logprobs",
                           lp, "finish_reason", finish_reason(c), "stop_reason", stop_reason(c));
        } else {
            struct dsml_result res = {0};
            if (dsml_parse(c->text.s ? c->text.s : "", c->text.len, g->thinking,
                           (uint64_t)time(NULL) ^ (s->id_counter << 20) ^ (uint64_t)i, &res) < 0) {
                json_decref(lp);
                json_decref(choices);
                return NULL;
            }
            int tools = json_array_size(res.tool_calls) > 0;
            c->has_tools = tools;
            json_t *msg = json_pack("{s:s}", "role", "assistant");
            if (msg) {
                json_object_set_new(msg, "content",
                                    tools && !res.content.len
                                        ? json_null()
                                        : api_string_lossy(res.content.s ? res.content.s : "",
                                                           res.content.len));
                if (g->thinking)
                    json_object_set_new(msg, "reasoning_content",
                                        api_string_lossy(res.reasoning.s ? res.reasoning.s : "",
                                                         res.reasoning.len));
                if (tools)
                    json_object_set(msg, "tool_calls", res.tool_calls);
            }
            dsml_result_free(&res);
            ch = json_pack("{s:i, s:o, s:o, s:s, s:o}", "index", i, "message", msg, "logprobs",
                           lp, "finish_reason", finish_reason(c), "stop_reason", stop_reason(c));
        }
        if (!ch || json_array_append_new(choices, ch)) {
            json_decref(choices);
            return NULL;
        }
    }
    json_t *env = api_envelope(q->kind == API_KIND_CHAT ? "chat.completion" : "text_completion",
                               g->id, g->created, s->cfg.served_model_name, choices);
    if (env)
        json_object_set_new(env, "usage", api_usage(g->prompt_tokens, g->completion_tokens));
    return env;
}

enum MHD_Result gen_resumed(struct http_req *hr)
{
    struct gen *g = hr->gen;
    if (g->failed && !g->headers_sent)
        return http_respond_error(hr, &g->err);
    if (g->req.stream) {
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, sse_read, hr, NULL);
        if (!r)
            return MHD_NO;
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        http_add_common_headers(hr, r);
        g->headers_sent = 1;
        enum MHD_Result ret = MHD_queue_response(hr->conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        hr->status = 200;
        hr->state = HR_RESPONDED;
        metrics_http(&hr->srv->metrics, hr->route, hr->is_post, 200);
        return ret;
    }
    if (g->finished_all) {
        json_t *v = final_json(g);
        if (!v)
            return http_error(hr, 500, NULL, NULL, "out of memory");
        return http_respond_json(hr, 200, v);
    }
    http_suspend(hr); /* woken early: wait on */
    return MHD_YES;
}

/* ---- heartbeat, cancel, free ---- */

void gen_heartbeat(struct srv *s, double now)
{
    for (struct gen *g = s->gens; g; g = g->next) {
        struct http_req *hr = g->hr;
        if (hr->closing)
            continue;
        if (g->deadline > 0 && now > g->deadline + 5 && !g->finished_all) {
            /* the engine should have ended it at the deadline; do not wait on it forever */
            gen_fail(g, 504, "timeout", "the request timed out");
            http_resume(hr);
            continue;
        }
        if (hr->suspended && http_peer_gone(hr)) {
            LOG_D("%s: client went away; cancelling", g->id);
            for (int i = 0; i < g->n_subs; i++)
                if (g->subs[i].r)
                    engine_cancel(g->subs[i].r);
            hr->closing = 1;
            http_resume(hr);
            continue;
        }
        if (g->req.stream && g->headers_sent && !g->finished_all &&
            now - g->t_last_write >= s->cfg.heartbeat && g->out.len == g->out_off) {
            /* a comment line: SSE clients ignore it; a dead peer makes the write fail */
            if (out_add(g, ": ping\n\n", 8) == 0) {
                g->t_last_write = now;
                http_resume(hr);
            }
        }
    }
}

void gen_cancel_all(struct srv *s, const char *why)
{
    for (struct gen *g = s->gens; g; g = g->next) {
        for (int i = 0; i < g->n_subs; i++)
            if (g->subs[i].r)
                engine_cancel(g->subs[i].r);
        if (!why) {
            g->hr->closing = 1;
            http_resume(g->hr);
        }
    }
    if (why && s->gens)
        LOG_W("cancelling %d running request(s): %s", s->n_gens, why);
}

void gen_free(struct gen *g, int completed_ok)
{
    struct srv *s = g->srv;
    (void)completed_ok;
    for (int i = 0; i < g->n_subs; i++) {
        if (g->subs[i].r)
            engine_req_release(g->subs[i].r); /* cancels it if still running */
        free(g->subs[i].echo);
        free(g->subs[i].prompt_ids);
    }
    for (int i = 0; g->choices && i < g->n_choices; i++) {
        struct gen_choice *c = &g->choices[i];
        tbuf_free(&c->text);
        tbuf_free(&c->d_reason);
        tbuf_free(&c->d_content);
        json_decref(c->lp);
        json_decref(c->d_tools);
        json_decref(c->d_lp);
        dsml_parser_free(c->dp);
        free(c->stop_str);
    }
    if (g->slot >= 0) {
        s->wake.slots[g->slot].g = NULL;
        s->wake.slots[g->slot].next_free = s->wake.free_head;
        s->wake.free_head = g->slot;
        gen_unlink(g);
        s->n_gens--;
    }
    free(g->subs);
    free(g->choices);
    tbuf_free(&g->out);
    api_gen_request_free(&g->req);
    free(g);
}
