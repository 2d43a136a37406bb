/*
 * engine.c - the serving core (see engine.h): submit queue, admission, chunked-prefill batching,
 * preemption, sampling, stop handling and per-request event queues.
 *
 * Threads: the engine thread owns everything below "engine thread only"; other threads touch a
 * request only through its event queue (req->mu), its atomics, and the submit list (e->mu).
 * A request is freed when its refcount (consumer + engine) reaches zero.
 */
#include "engine/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/kvcache.h"
#include "engine/sampler.h"
#include "engine/tbuf.h"

enum seq_phase { SEQ_WAITING, SEQ_RUNNING, SEQ_DONE };

struct seq {
    struct engine_req *req;
    int choice;
    int slot;        /* -1 while not holding one */
    int32_t *tokens; /* (cap) prompt + generated */
    int n_tokens, cap;
    long n_computed; /* tokens fed into the slot's cache */
    int generated;
    enum seq_phase phase;
    int fork_pending; /* choice > 0 waiting to copy choice 0's prefill */
    uint64_t admit_order;
    struct sampler_rng rng;
    struct sampler_counts counts;
    struct tok_stream detok;
    struct tbuf held; /* detokenized text held back for stop-string matching */
    int scheduled;    /* tokens fed in the current step */
};

struct engine_req {
    atomic_int refs;
    atomic_int *live; /* the engine's live-request counter */
    atomic_int cancel;
    struct engine *e;
    struct engine_params p; /* pointer fields point at the copies below */
    int32_t *prompt;
    int32_t *stop_ids;
    char **stop;
    struct engine_logit_bias *bias;
    struct seq *seqs; /* (n) */
    double t_submit, t_first_sched;
    uint64_t arrival;
    int finished;       /* choices finished (engine thread) */
    pthread_mutex_t mu; /* guards the event ring and consumer_done */
    struct engine_event *ev;
    int ev_head, ev_count, ev_cap;
    int all_finished;        /* every FINISH event has been queued */
    struct engine_req *next; /* submit list */
};

struct engine {
    const struct tokenizer *tok;
    struct backend *be;
    struct engine_config cfg;
    pthread_t thread;
    int started;
    /* submit side (e->mu) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct engine_req *sub_head, *sub_tail;
    struct engine_req *graveyard; /* engine thread: freed at the end of the loop iteration */
    int stopping;
    atomic_int draining;
    atomic_int n_waiting; /* requests queued or waiting for admission */
    atomic_long queued_tokens;
    uint64_t next_arrival;
    /* engine thread only */
    struct seq **running;
    int n_running;
    struct seq **waiting; /* ordered by (priority, arrival, choice) */
    int n_wait, cap_wait;
    int *free_slots;
    int n_free_slots;
    uint64_t admit_counter;
    float *logits;              /* (max_num_seqs, V) */
    struct backend_pick *picks; /* (max_num_seqs) tokens picked by a device_sampling backend */
    float *raw;                 /* (V) copy for logprobs */
    void *work;
    struct backend_seq *batch;
    struct seq **batch_seq;
    /* stats */
    atomic_int st_running;
    atomic_long st_usage_ppm;
    atomic_long st_prompt_tokens, st_gen_tokens, st_preempt, st_steps;
    atomic_int st_failed;
    atomic_int live; /* requests allocated and not yet freed */
};

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- requests: refcount and events ---- */

static void req_free(struct engine_req *r)
{
    if (r->live)
        atomic_fetch_sub(r->live, 1);
    for (int i = 0; i < r->ev_count; i++)
        engine_event_clear(&r->ev[(r->ev_head + i) % r->ev_cap]);
    free(r->ev);
    for (int i = 0; r->seqs && i < r->p.n; i++) {
        struct seq *s = &r->seqs[i];
        free(s->tokens);
        free(s->counts.generated);
        free(s->counts.seen);
        tbuf_free(&s->held);
    }
    free(r->seqs);
    free(r->prompt);
    free(r->stop_ids);
    for (int i = 0; r->stop && i < r->p.n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->bias);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

static void req_unref(struct engine_req *r)
{
    if (atomic_fetch_sub(&r->refs, 1) == 1)
        req_free(r);
}

void engine_event_clear(struct engine_event *ev)
{
    free(ev->text);
    free(ev->stop_str);
    ev->text = NULL;
    ev->stop_str = NULL;
}

/*
 * Queue an event (takes ownership of its strings) and wake the consumer. If the queue cannot
 * grow (out of memory) a token event is dropped and the request cancelled, so its finish event
 * (which always fits: room for one per choice is kept free) tells the consumer it ended.
 */
static void push_event(struct engine_req *r, struct engine_event *ev, int last)
{
    pthread_mutex_lock(&r->mu);
    int reserve = ev->type == ENGINE_EV_TOKEN ? r->p.n - r->finished : 0;
    if (r->ev_count + reserve >= r->ev_cap) {
        int cap = r->ev_cap * 2 + r->p.n + 8;
        struct engine_event *n = malloc(sizeof *n * (size_t)cap);
        if (!n) {
            pthread_mutex_unlock(&r->mu);
            engine_event_clear(ev);
            atomic_store(&r->cancel, 1);
            return;
        }
        for (int i = 0; i < r->ev_count; i++)
            n[i] = r->ev[(r->ev_head + i) % r->ev_cap];
        free(r->ev);
        r->ev = n;
        r->ev_cap = cap;
        r->ev_head = 0;
    }
    r->ev[(r->ev_head + r->ev_count) % r->ev_cap] = *ev;
    r->ev_count++;
    if (last)
        r->all_finished = 1;
    pthread_mutex_unlock(&r->mu);
    if (r->p.notify)
        r->p.notify(r->p.notify_ud);
}

int engine_poll(struct engine_req *r, struct engine_event *ev)
{
    int got = 0;
    pthread_mutex_lock(&r->mu);
    if (r->ev_count) {
        *ev = r->ev[r->ev_head];
        r->ev_head = (r->ev_head + 1) % r->ev_cap;
        r->ev_count--;
        got = 1;
    }
    pthread_mutex_unlock(&r->mu);
    return got;
}

int engine_req_done(struct engine_req *r)
{
    pthread_mutex_lock(&r->mu);
    int done = r->all_finished && r->ev_count == 0;
    pthread_mutex_unlock(&r->mu);
    return done;
}

static void wake(struct engine *e)
{
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void engine_cancel(struct engine_req *r)
{
    atomic_store(&r->cancel, 1);
    wake(r->e);
}

void engine_req_release(struct engine_req *r)
{
    if (!r)
        return;
    struct engine *e = r->e;
    atomic_store(&r->cancel, 1);
    wake(e);
    req_unref(r);
}

/* ---- submit ---- */

void engine_config_defaults(struct engine_config *c)
{
    memset(c, 0, sizeof *c);
    c->max_num_seqs = 64;
    c->max_model_len = 65536;
    c->max_queue = 1024;
    c->max_queue_tokens = 1L << 22;
    c->max_step_tokens = 2048;
    c->cache_bytes = (size_t)1 << 30;
}

static int validate(const struct engine *e, const struct engine_params *p)
{
    const int V = e->be->vocab_size;
    if (p->n_prompt < 1)
        return err_setf(ERR_INVAL, "the prompt is empty");
    if (p->max_tokens < 1)
        return err_setf(ERR_INVAL, "max_tokens must be at least 1");
    if (p->n < 1 || p->n > 16)
        return err_setf(ERR_INVAL, "n must be in [1, 16]");
    if (p->n > e->cfg.max_num_seqs)
        return err_setf(ERR_INVAL, "n = %d exceeds max_num_seqs = %d", p->n, e->cfg.max_num_seqs);
    if ((long)p->n_prompt + p->max_tokens > e->cfg.max_model_len)
        return err_setf(ERR_RANGE,
                        "this model's maximum context length is %d tokens; the request has %d "
                        "prompt tokens and asks for %d completion tokens",
                        e->cfg.max_model_len, p->n_prompt, p->max_tokens);
    for (int i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= V)
            return err_setf(ERR_RANGE, "prompt token %d is not in the vocabulary [0, %d)",
                            p->prompt[i], V);
    if (p->logprobs > ENGINE_MAX_TOP_LOGPROBS)
        return err_setf(ERR_INVAL, "logprobs must be at most %d", ENGINE_MAX_TOP_LOGPROBS);
    if (p->n_stop > ENGINE_MAX_STOP)
        return err_setf(ERR_INVAL, "at most %d stop strings", ENGINE_MAX_STOP);
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i] || !p->stop[i][0])
            return err_setf(ERR_INVAL, "stop strings must not be empty");
    if ((p->detokenize || p->n_stop) && !e->tok)
        return err_setf(ERR_INVAL, "detokenization needs a tokenizer");
    const struct engine_sampling *s = &p->sampling;
    if (!(s->temperature >= 0) || !(s->top_p > 0 && s->top_p <= 1) ||
        !(s->min_p >= 0 && s->min_p <= 1) || !(s->repetition_penalty > 0))
        return err_setf(ERR_INVAL, "sampling parameters out of range");
    return 0;
}

int engine_submit(struct engine *e, const struct engine_params *p, struct engine_req **out)
{
    int rc = validate(e, p);
    if (rc)
        return rc;
    if (atomic_load(&e->draining))
        return err_setf(ERR_BUSY, "the server is shutting down");
    if (atomic_load(&e->st_failed))
        return err_setf(ERR_CUDA, "the engine has failed");
    if (atomic_load(&e->n_waiting) >= e->cfg.max_queue ||
        atomic_load(&e->queued_tokens) + p->n_prompt > e->cfg.max_queue_tokens)
        return err_setf(ERR_BUSY, "the waiting queue is full");
    struct engine_req *r = calloc(1, sizeof *r);
    if (!r)
        return err_setf(ERR_NOMEM, "out of memory");
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 2);
    atomic_init(&r->cancel, 0);
    r->e = e;
    r->p = *p;
    r->t_submit = now_s();
    r->prompt = malloc(sizeof(int32_t) * (size_t)p->n_prompt);
    r->seqs = calloc((size_t)p->n, sizeof *r->seqs);
    r->ev_cap = 2 * p->n + 14;
    r->ev = malloc(sizeof *r->ev * (size_t)r->ev_cap);
    if (!r->prompt || !r->seqs || !r->ev)
        goto nomem;
    memcpy(r->prompt, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
    r->p.prompt = r->prompt;
    if (p->n_stop_ids) {
        if (!(r->stop_ids = malloc(sizeof(int32_t) * (size_t)p->n_stop_ids)))
            goto nomem;
        memcpy(r->stop_ids, p->stop_ids, sizeof(int32_t) * (size_t)p->n_stop_ids);
    }
    r->p.stop_ids = r->stop_ids;
    if (p->n_stop) {
        if (!(r->stop = calloc((size_t)p->n_stop, sizeof *r->stop)))
            goto nomem;
        for (int i = 0; i < p->n_stop; i++)
            if (!(r->stop[i] = strdup(p->stop[i])))
                goto nomem;
    }
    r->p.stop = (const char *const *)r->stop;
    if (p->sampling.n_logit_bias) {
        size_t nb = sizeof *r->bias * (size_t)p->sampling.n_logit_bias;
        if (!(r->bias = malloc(nb)))
            goto nomem;
        memcpy(r->bias, p->sampling.logit_bias, nb);
    }
    r->p.sampling.logit_bias = r->bias;
    const int V = e->be->vocab_size;
    int need_counts = p->sampling.presence_penalty != 0 || p->sampling.frequency_penalty != 0 ||
                      p->sampling.repetition_penalty != 1.0f;
    uint64_t seed = p->sampling.has_seed ? p->sampling.seed
                                         : (uint64_t)(now_s() * 1e9) ^ (uint64_t)(uintptr_t)r;
    for (int i = 0; i < p->n; i++) {
        struct seq *s = &r->seqs[i];
        s->req = r;
        s->choice = i;
        s->slot = -1;
        s->cap = p->n_prompt + p->max_tokens;
        if (!(s->tokens = malloc(sizeof(int32_t) * (size_t)s->cap)))
            goto nomem;
        memcpy(s->tokens, p->prompt, sizeof(int32_t) * (size_t)p->n_prompt);
        s->n_tokens = p->n_prompt;
        s->fork_pending = i > 0;
        sampler_rng_seed(&s->rng, seed, (uint64_t)i);
        tok_stream_init(&s->detok);
        if (need_counts) {
            s->counts.generated = calloc((size_t)V, sizeof *s->counts.generated);
            s->counts.seen = calloc((size_t)V, 1);
            if (!s->counts.generated || !s->counts.seen)
                goto nomem;
            for (int k = 0; k < p->n_prompt; k++)
                s->counts.seen[p->prompt[k]] = 1;
        }
    }
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        req_free(r);
        return err_setf(ERR_BUSY, "the engine is stopping");
    }
    r->arrival = e->next_arrival++;
    r->live = &e->live;
    atomic_fetch_add(&e->live, 1);
    if (e->sub_tail)
        e->sub_tail->next = r;
    else
        e->sub_head = r;
    e->sub_tail = r;
    atomic_fetch_add(&e->n_waiting, 1);
    atomic_fetch_add(&e->queued_tokens, p->n_prompt);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return 0;
nomem:
    req_free(r);
    return err_setf(ERR_NOMEM, "out of memory");
}

/* ---- engine thread: waiting list ---- */

static int wait_before(const struct seq *a, const struct seq *b)
{
    if (a->req->p.priority != b->req->p.priority)
        return a->req->p.priority < b->req->p.priority;
    if (a->req->arrival != b->req->arrival)
        return a->req->arrival < b->req->arrival;
    return a->choice < b->choice;
}

static int wait_insert(struct engine *e, struct seq *s)
{
    if (e->n_wait == e->cap_wait) {
        int cap = e->cap_wait ? e->cap_wait * 2 : 64;
        struct seq **n = realloc(e->waiting, sizeof *n * (size_t)cap);
        if (!n)
            return err_setf(ERR_NOMEM, "out of memory");
        e->waiting = n;
        e->cap_wait = cap;
    }
    int i = e->n_wait;
    while (i > 0 && wait_before(s, e->waiting[i - 1])) {
        e->waiting[i] = e->waiting[i - 1];
        i--;
    }
    e->waiting[i] = s;
    e->n_wait++;
    s->phase = SEQ_WAITING;
    return 0;
}

static void wait_remove(struct engine *e, struct seq *s)
{
    for (int i = 0; i < e->n_wait; i++)
        if (e->waiting[i] == s) {
            memmove(e->waiting + i, e->waiting + i + 1,
                    sizeof *e->waiting * (size_t)(e->n_wait - i - 1));
            e->n_wait--;
            return;
        }
}

static void running_remove(struct engine *e, struct seq *s)
{
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i] == s) {
            memmove(e->running + i, e->running + i + 1,
                    sizeof *e->running * (size_t)(e->n_running - i - 1));
            e->n_running--;
            return;
        }
}

static void release_slot(struct engine *e, struct seq *s)
{
    if (s->slot < 0)
        return;
    e->be->ops->slot_reset(e->be, s->slot);
    e->free_slots[e->n_free_slots++] = s->slot;
    s->slot = -1;
    s->n_computed = 0;
}

/* ---- finishing ---- */

/* Emit the choice's FINISH event, free its slot. */
static void finish_seq(struct engine *e, struct seq *s, enum engine_finish why, int32_t stop_token,
                       const char *stop_str, int err, const char *msg)
{
    struct engine_req *r = s->req;
    if (s->phase == SEQ_DONE)
        return;
    if (s->phase == SEQ_WAITING)
        wait_remove(e, s);
    else
        running_remove(e, s);
    release_slot(e, s);
    s->phase = SEQ_DONE;
    /* release held text (a stop string ending removed its part already) */
    if (r->p.detokenize && why != ENGINE_FINISH_ABORT && why != ENGINE_FINISH_ERROR) {
        tok_stream_flush(&s->detok, &s->held);
        if (s->held.len) {
            struct engine_event tev = {
                .type = ENGINE_EV_TOKEN, .choice = s->choice, .t = now_s(), .token = -1};
            tev.text = tbuf_take(&s->held, &tev.text_len);
            push_event(r, &tev, 0);
        }
    }
    struct engine_event ev = {.type = err ? ENGINE_EV_ERROR : ENGINE_EV_FINISH,
                              .choice = s->choice,
                              .t = now_s(),
                              .finish = why,
                              .stop_token = stop_token,
                              .prompt_tokens = r->p.n_prompt,
                              .completion_tokens = s->generated,
                              .err = err};
    ev.queue_time = r->t_first_sched > 0 ? r->t_first_sched - r->t_submit : now_s() - r->t_submit;
    if (stop_str)
        ev.stop_str = strdup(stop_str);
    if (msg)
        snprintf(ev.message, sizeof ev.message, "%s", msg);
    r->finished++;
    int last = r->finished == r->p.n;
    push_event(r, &ev, last); /* an ERROR event is also the choice's end */
    /* drop the engine's reference; if it was the last one the request is freed only after the
     * step, since the scheduler may still hold pointers to its other choices */
    if (last && atomic_fetch_sub(&r->refs, 1) == 1) {
        r->next = e->graveyard;
        e->graveyard = r;
    }
}

static void bury(struct engine *e)
{
    while (e->graveyard) {
        struct engine_req *r = e->graveyard;
        e->graveyard = r->next;
        req_free(r);
    }
}

static void finish_req(struct engine *e, struct engine_req *r, enum engine_finish why, int err,
                       const char *msg)
{
    /* once the last choice is finished the consumer may free r at any moment: stop touching it */
    int n = r->p.n, remaining = n - r->finished;
    for (int i = 0; i < n && remaining > 0; i++)
        if (r->seqs[i].phase != SEQ_DONE) {
            remaining--;
            finish_seq(e, &r->seqs[i], why, -1, NULL, err, msg);
        }
}

/* ---- engine thread: one step ---- */

static void take_submitted(struct engine *e)
{
    pthread_mutex_lock(&e->mu);
    struct engine_req *r = e->sub_head;
    e->sub_head = e->sub_tail = NULL;
    pthread_mutex_unlock(&e->mu);
    while (r) {
        struct engine_req *next = r->next;
        r->next = NULL;
        if (wait_insert(e, &r->seqs[0]))
            finish_req(e, r, ENGINE_FINISH_ERROR, ERR_NOMEM, "out of memory");
        r = next;
    }
}

/* End the requests that were cancelled or passed their deadline (waiting or running). */
static void reap(struct engine *e)
{
    double t = now_s();
    for (;;) {
        struct engine_req *hit = NULL;
        for (int pass = 0; pass < 2 && !hit; pass++) {
            struct seq **list = pass ? e->running : e->waiting;
            int n = pass ? e->n_running : e->n_wait;
            for (int i = 0; i < n && !hit; i++) {
                struct engine_req *r = list[i]->req;
                if (atomic_load(&r->cancel) || (r->p.deadline > 0 && t > r->p.deadline))
                    hit = r;
            }
        }
        if (!hit)
            return;
        if (!hit->t_first_sched) {
            hit->t_first_sched = t;
            atomic_fetch_sub(&e->n_waiting, 1);
            atomic_fetch_sub(&e->queued_tokens, hit->p.n_prompt);
        }
        finish_req(e, hit, ENGINE_FINISH_ABORT, 0, NULL);
    }
}

/* Blocks a sequence needs to feed n more tokens. */
static int blocks_needed(const struct seq *s, int n)
{
    return dsv4_kv_blocks_for(s->n_computed + n) - dsv4_kv_blocks_for(s->n_computed);
}

/* Pick the preemption victim: lowest priority (largest value), most recently admitted. */
static struct seq *victim(struct engine *e)
{
    struct seq *v = NULL;
    for (int i = 0; i < e->n_running; i++) {
        struct seq *s = e->running[i];
        if (s->fork_pending)
            continue;
        if (!v || s->req->p.priority > v->req->p.priority ||
            (s->req->p.priority == v->req->p.priority && s->admit_order > v->admit_order))
            v = s;
    }
    return v;
}

static void preempt(struct engine *e, struct seq *s)
{
    running_remove(e, s);
    release_slot(e, s);
    /* siblings still waiting for this prefill go back with it */
    if (s->choice == 0)
        for (int i = 1; i < s->req->p.n; i++) {
            struct seq *sib = &s->req->seqs[i];
            if (sib->fork_pending && sib->phase == SEQ_RUNNING) {
                running_remove(e, sib);
                release_slot(e, sib);
                sib->phase = SEQ_WAITING; /* admitted again together with choice 0 */
            }
        }
    wait_insert(e, s);
    atomic_fetch_add(&e->st_preempt, 1);
}

/* The choices admitted together with waiting sequence s (its pending forks), s first. */
static int admission_unit(struct seq *s, struct seq **unit)
{
    int n = 0;
    unit[n++] = s;
    if (s->choice == 0)
        for (int i = 1; i < s->req->p.n; i++) {
            struct seq *sib = &s->req->seqs[i];
            if (sib->fork_pending && sib->phase != SEQ_DONE)
                unit[n++] = sib;
        }
    return n;
}

/* Admit waiting sequences into the running set while slots, budget and blocks allow. */
static void admit(struct engine *e, int *budget, int *blocks_left)
{
    struct seq *unit[16];
    while (e->n_wait && *budget > 0) {
        struct seq *s = e->waiting[0];
        struct engine_req *r = s->req;
        int nu = admission_unit(s, unit);
        if (e->n_free_slots < nu)
            return;
        int chunk = s->n_tokens - (int)s->n_computed;
        if (chunk > *budget)
            chunk = *budget;
        int need = blocks_needed(s, chunk);
        /* keep one block of headroom per running sequence for its decode */
        if (e->n_running > 0 && need + e->n_running > *blocks_left)
            return;
        if (need > *blocks_left) { /* nothing running and still too big: the cache is too small */
            if (!r->t_first_sched) {
                r->t_first_sched = now_s();
                atomic_fetch_sub(&e->n_waiting, 1);
                atomic_fetch_sub(&e->queued_tokens, r->p.n_prompt);
            }
            finish_req(e, r, ENGINE_FINISH_ERROR, ERR_RANGE,
                       "the request needs more KV cache than the server has");
            continue;
        }
        wait_remove(e, s);
        if (!r->t_first_sched) {
            r->t_first_sched = now_s();
            atomic_fetch_sub(&e->n_waiting, 1);
            atomic_fetch_sub(&e->queued_tokens, r->p.n_prompt);
        }
        for (int i = 0; i < nu; i++) {
            struct seq *u = unit[i];
            u->slot = e->free_slots[--e->n_free_slots];
            u->phase = SEQ_RUNNING;
            u->admit_order = e->admit_counter++;
            u->scheduled = 0;
            e->running[e->n_running++] = u;
        }
        s->scheduled = chunk;
        *budget -= chunk;
        *blocks_left -= need;
    }
}

/* Append a sampled token and its text; check stops. Returns 1 when the choice finished. */
static int accept_token(struct engine *e, struct seq *s, int32_t tok, float lp, int n_top,
                        const struct engine_logprob *top)
{
    struct engine_req *r = s->req;
    const struct engine_params *p = &r->p;
    s->tokens[s->n_tokens++] = tok;
    s->generated++;
    atomic_fetch_add(&e->st_gen_tokens, 1);
    if (s->counts.generated) {
        s->counts.generated[tok]++;
        s->counts.seen[tok] = 1;
    }
    int is_stop_tok = (!p->ignore_eos && tok == e->be->eos_token_id);
    for (int i = 0; i < p->n_stop_ids && !is_stop_tok; i++)
        is_stop_tok = tok == p->stop_ids[i];
    if (is_stop_tok) {
        finish_seq(e, s, ENGINE_FINISH_STOP, tok, NULL, 0, NULL);
        return 1;
    }
    struct engine_event ev = {.type = ENGINE_EV_TOKEN,
                              .choice = s->choice,
                              .t = now_s(),
                              .token = tok,
                              .logprob = lp,
                              .n_top = n_top};
    if (n_top)
        memcpy(ev.top, top, sizeof *top * (size_t)n_top);
    const char *matched = NULL;
    if (p->detokenize) {
        tok_stream_feed(e->tok, &s->detok, tok, p->detok_flags, &s->held);
        size_t release = s->held.len;
        if (p->n_stop) {
            /* earliest complete match wins */
            size_t best = (size_t)-1;
            for (int i = 0; i < p->n_stop; i++) {
                const char *f = s->held.s ? strstr(s->held.s, p->stop[i]) : NULL;
                if (f && (size_t)(f - s->held.s) < best) {
                    best = (size_t)(f - s->held.s);
                    matched = p->stop[i];
                }
            }
            if (matched) {
                release = best;
            } else {
                /* hold back the longest tail that could start a stop string */
                size_t keep = 0;
                for (int i = 0; i < p->n_stop; i++) {
                    size_t sl = strlen(p->stop[i]);
                    for (size_t k = sl - 1; k > keep; k--)
                        if (k <= s->held.len &&
                            !memcmp(s->held.s + s->held.len - k, p->stop[i], k)) {
                            keep = k;
                            break;
                        }
                }
                release = s->held.len - keep;
            }
        }
        ev.text = malloc(release + 1);
        if (ev.text) {
            if (release)
                memcpy(ev.text, s->held.s, release);
            ev.text[release] = 0;
            ev.text_len = release;
        }
        if (matched) {
            tbuf_clear(&s->held);
        } else if (s->held.s) { /* an empty buffer may have no storage yet */
            size_t rest = s->held.len - release;
            memmove(s->held.s, s->held.s + release, rest);
            s->held.len = rest;
            s->held.s[rest] = 0;
        }
    }
    push_event(r, &ev, 0);
    if (matched) {
        tok_stream_init(&s->detok);
        finish_seq(e, s, ENGINE_FINISH_STOP, -1, matched, 0, NULL);
        return 1;
    }
    if (s->generated >= p->max_tokens || s->n_tokens >= e->cfg.max_model_len) {
        finish_seq(e, s, ENGINE_FINISH_LENGTH, -1, NULL, 0, NULL);
        return 1;
    }
    return 0;
}

/* Sample for a sequence from logits row `row` (not modified). */
static void sample_seq(struct engine *e, struct seq *s, const float *row)
{
    const int V = e->be->vocab_size;
    const struct engine_params *p = &s->req->p;
    memcpy(e->raw, row, sizeof(float) * (size_t)V);
    int32_t tok = sampler_sample(&p->sampling, e->raw, V, &s->counts, &s->rng, e->work);
    float lp = 0;
    struct engine_logprob top[ENGINE_MAX_TOP_LOGPROBS];
    int n_top = 0;
    if (p->logprobs >= 0) {
        n_top = p->logprobs;
        sampler_logprobs(row, V, tok, n_top, &lp, top);
    }
    accept_token(e, s, tok, lp, n_top, top);
}

/* Free blocks minus those already promised to this step's scheduled chunks. */
static int blocks_available(struct engine *e)
{
    int left = e->be->ops->blocks_free(e->be);
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->scheduled)
            left -= blocks_needed(e->running[i], e->running[i]->scheduled);
    return left;
}

/*
 * Can the backend pick this sequence's next token itself? When nothing needs the logits row on
 * the host (logit bias, penalties, logprobs, or a prefill that n > 1 choices fork from). Then
 * the sequence's uniform for this token is drawn now (sampler_sample draws one per token too,
 * so the stream stays aligned) and goes with the sampling parameters to the backend.
 */
static struct backend_pick *pick_on_device(struct engine *e, struct seq *s, int i)
{
    const struct engine_params *p = &s->req->p;
    const struct engine_sampling *sp = &p->sampling;
    if (!e->be->device_sampling || sp->n_logit_bias != 0 || sp->presence_penalty != 0 ||
        sp->frequency_penalty != 0 ||
        (sp->repetition_penalty > 0 && sp->repetition_penalty != 1.0f) || p->logprobs >= 0 ||
        (p->n > 1 && s->choice == 0 && s->generated == 0))
        return NULL;
    struct backend_pick *k = &e->picks[i];
    k->temperature = sp->temperature;
    k->top_p = sp->top_p;
    k->min_p = sp->min_p;
    k->top_k = sp->top_k;
    k->u = (float)sampler_uniform(&s->rng);
    k->token = -1;
    return k;
}

static int step(struct engine *e)
{
    const int V = e->be->vocab_size;
    int budget = e->cfg.max_step_tokens, nb = 0;
    struct seq **order = e->batch_seq; /* scratch: snapshot of the running set */
    for (int i = 0; i < e->n_running; i++)
        e->running[i]->scheduled = 0;
    /* 1. decodes, 2. prefill chunks of running sequences, in admission order */
    int blocks_left = e->be->ops->blocks_free(e->be);
    for (int pass = 0; pass < 2; pass++) {
        int n = e->n_running;
        memcpy(order, e->running, sizeof *order * (size_t)n);
        for (int i = 0; i < n && budget > 0; i++) {
            struct seq *s = order[i];
            int remaining = s->n_tokens - (int)s->n_computed;
            if (s->phase != SEQ_RUNNING || s->fork_pending || remaining <= 0 ||
                (pass == 0) != (remaining == 1))
                continue;
            int chunk = remaining < budget ? remaining : budget;
            int need = blocks_needed(s, chunk);
            while (need > blocks_left) {
                /* out of cache: preempt the least important, most recent sequence */
                struct seq *v = victim(e);
                if (!v)
                    break;
                budget += v->scheduled;
                v->scheduled = 0;
                preempt(e, v);
                blocks_left = blocks_available(e);
                if (v == s)
                    break;
            }
            if (s->phase != SEQ_RUNNING)
                continue;
            if (need > blocks_left) {
                finish_req(e, s->req, ENGINE_FINISH_ERROR, ERR_RANGE,
                           "the sequence needs more KV cache than the server has");
                blocks_left = blocks_available(e);
                continue;
            }
            s->scheduled = chunk;
            budget -= chunk;
            blocks_left -= need;
        }
    }
    admit(e, &budget, &blocks_left);
    /* the batch */
    for (int i = 0; i < e->n_running; i++) {
        struct seq *s = e->running[i];
        if (!s->scheduled)
            continue;
        int want = s->n_computed + s->scheduled == s->n_tokens;
        e->batch[nb] = (struct backend_seq){s->slot, s->tokens + s->n_computed, s->scheduled, want,
                                            want ? pick_on_device(e, s, nb) : NULL};
        e->batch_seq[nb++] = s;
    }
    atomic_store(&e->st_running, e->n_running);
    if (!nb)
        return 0;
    int rc = e->be->ops->step(e->be, e->batch, nb, e->logits);
    atomic_fetch_add(&e->st_steps, 1);
    if (rc) {
        /* a backend failure: every running request ends with an error; the engine is failed */
        char msg[256];
        snprintf(msg, sizeof msg, "engine failure: %s", err_msg());
        atomic_store(&e->st_failed, 1);
        while (e->n_running)
            finish_req(e, e->running[0]->req, ENGINE_FINISH_ERROR, rc, msg);
        return rc;
    }
    int row = 0;
    for (int i = 0; i < nb; i++) {
        struct seq *s = e->batch_seq[i];
        int want = e->batch[i].want_logits;
        long prompt_left = s->req->p.n_prompt - s->n_computed;
        if (prompt_left > 0)
            atomic_fetch_add(&e->st_prompt_tokens,
                             prompt_left < s->scheduled ? prompt_left : s->scheduled);
        s->n_computed += s->scheduled;
        s->scheduled = 0;
        if (!want)
            continue;
        const float *lrow = e->logits + (size_t)row++ * V;
        struct engine_req *r = s->req;
        if (e->batch[i].pick) { /* the backend picked it: no logits row */
            accept_token(e, s, e->batch[i].pick->token, 0, 0, NULL);
            continue;
        }
        if (s->choice == 0 && s->generated == 0)
            for (int k = 1; k < r->p.n; k++) { /* fork the prefill into the other choices */
                struct seq *sib = &r->seqs[k];
                if (!sib->fork_pending || sib->phase != SEQ_RUNNING)
                    continue;
                if (e->be->ops->slot_fork(e->be, sib->slot, s->slot)) {
                    finish_seq(e, sib, ENGINE_FINISH_ERROR, -1, NULL, ERR_BUSY,
                               "no cache left to fork this choice");
                    continue;
                }
                sib->fork_pending = 0;
                sib->n_computed = s->n_computed;
                sample_seq(e, sib, lrow);
            }
        sample_seq(e, s, lrow);
    }
    atomic_store(&e->st_running, e->n_running);
    atomic_store(&e->st_usage_ppm,
                 (long)(1e6 * (1.0 - (double)e->be->ops->blocks_free(e->be) /
                                         (e->be->n_blocks ? e->be->n_blocks : 1))));
    return 0;
}

static void *engine_main(void *arg)
{
    struct engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !e->sub_head && e->n_running == 0 && e->n_wait == 0)
            pthread_cond_wait(&e->cv, &e->mu);
        int stopping = e->stopping;
        pthread_mutex_unlock(&e->mu);
        take_submitted(e);
        if (stopping)
            break;
        reap(e);
        bury(e);
        if (atomic_load(&e->st_failed)) {
            while (e->n_wait)
                finish_req(e, e->waiting[0]->req, ENGINE_FINISH_ERROR, ERR_CUDA, "engine failure");
            continue;
        }
        int before = e->n_running + e->n_wait;
        step(e);
        bury(e);
        if (e->n_running == 0 && e->n_wait > 0 && before == e->n_running + e->n_wait) {
            /* nothing could run (no slot or cache for the head of the queue): wait for change */
            pthread_mutex_lock(&e->mu);
            if (!e->stopping && !e->sub_head) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 50 * 1000000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&e->cv, &e->mu, &ts);
            }
            pthread_mutex_unlock(&e->mu);
        }
    }
    /* shutting down: everything ends with ABORT */
    while (e->n_running)
        finish_req(e, e->running[0]->req, ENGINE_FINISH_ABORT, 0, NULL);
    while (e->n_wait)
        finish_req(e, e->waiting[0]->req, ENGINE_FINISH_ABORT, 0, NULL);
    bury(e);
    return NULL;
}

/* ---- lifecycle ---- */

int engine_new_with_backend(struct engine **out, struct backend *be, const struct tokenizer *tok,
                            const struct engine_config *cfg)
{
    struct engine *e = calloc(1, sizeof *e);
    if (!e) {
        be->ops->destroy(be);
        return err_setf(ERR_NOMEM, "engine: out of memory");
    }
    e->be = be;
    e->tok = tok;
    engine_config_defaults(&e->cfg);
    if (cfg)
        e->cfg = *cfg;
    struct engine_config *c = &e->cfg;
    c->max_num_seqs = be->n_slots;
    c->n_blocks = be->n_blocks;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (c->max_model_len < 2 || c->max_step_tokens < 1 || c->max_queue < 1) {
        engine_free(e);
        return err_setf(ERR_INVAL, "engine: invalid configuration");
    }
    const int V = be->vocab_size;
    e->running = calloc((size_t)c->max_num_seqs, sizeof *e->running);
    e->free_slots = malloc(sizeof *e->free_slots * (size_t)c->max_num_seqs);
    e->logits = malloc(sizeof(float) * (size_t)V * (size_t)c->max_num_seqs);
    e->picks = malloc(sizeof *e->picks * (size_t)c->max_num_seqs);
    e->raw = malloc(sizeof(float) * (size_t)V);
    e->work = malloc(sampler_work_bytes(V));
    e->batch = calloc((size_t)c->max_num_seqs, sizeof *e->batch);
    e->batch_seq = calloc((size_t)c->max_num_seqs, sizeof *e->batch_seq);
    if (!e->running || !e->free_slots || !e->logits || !e->picks || !e->raw || !e->work ||
        !e->batch || !e->batch_seq) {
        engine_free(e);
        return err_setf(ERR_NOMEM, "engine: out of memory");
    }
    for (int i = 0; i < c->max_num_seqs; i++)
        e->free_slots[i] = c->max_num_seqs - 1 - i;
    e->n_free_slots = c->max_num_seqs;
    *out = e;
    return 0;
}

int engine_config_resolve(struct engine_config *c, const struct dsv4_model *m)
{
    if (c->max_num_seqs < 1 || c->max_model_len < 2)
        return err_setf(ERR_INVAL, "engine: max_num_seqs and max_model_len must be positive");
    if (c->max_model_len > m->cfg.max_position_embeddings)
        c->max_model_len = (int)m->cfg.max_position_embeddings;
    if (!c->n_blocks) {
        size_t bb = dsv4_kv_block_bytes(&m->cfg, &m->sched);
        long want = (long)c->max_num_seqs * dsv4_kv_blocks_for(c->max_model_len);
        long cap = bb ? (long)(c->cache_bytes / bb) : want;
        c->n_blocks = (int)(want < cap ? want : cap);
        if (c->n_blocks < c->max_num_seqs)
            c->n_blocks = c->max_num_seqs;
    }
    return 0;
}

int engine_new(struct engine **out, struct dsv4_model *m, const struct tokenizer *tok,
               const struct engine_config *cfg)
{
    struct engine_config c;
    struct backend *be;
    int rc;
    engine_config_defaults(&c);
    if (cfg)
        c = *cfg;
    if ((rc = engine_config_resolve(&c, m)) ||
        (rc = backend_cpu_new(&be, m, c.max_num_seqs, c.n_blocks)))
        return rc;
    return engine_new_with_backend(out, be, tok, &c);
}

int engine_start(struct engine *e)
{
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0)
        return err_setf(ERR_NOMEM, "engine: cannot start its thread");
    e->started = 1;
    return 0;
}

void engine_drain(struct engine *e)
{
    atomic_store(&e->draining, 1);
}

void engine_free(struct engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    e->stopping = 1;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started)
        pthread_join(e->thread, NULL);
    else {
        take_submitted(e);
        while (e->n_wait)
            finish_req(e, e->waiting[0]->req, ENGINE_FINISH_ABORT, 0, NULL);
        bury(e);
    }
    if (e->be)
        e->be->ops->destroy(e->be);
    free(e->running);
    free(e->waiting);
    free(e->free_slots);
    free(e->logits);
    free(e->picks);
    free(e->raw);
    free(e->work);
    free(e->batch);
    free(e->batch_seq);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

void engine_get_stats(const struct engine *ec, struct engine_stats *s)
{
    struct engine *e = (struct engine *)ec;
    memset(s, 0, sizeof *s);
    s->running = atomic_load(&e->st_running);
    s->waiting = atomic_load(&e->n_waiting);
    s->cache_usage = (double)atomic_load(&e->st_usage_ppm) / 1e6;
    s->prompt_tokens_total = atomic_load(&e->st_prompt_tokens);
    s->generation_tokens_total = atomic_load(&e->st_gen_tokens);
    s->preemptions_total = atomic_load(&e->st_preempt);
    s->steps_total = atomic_load(&e->st_steps);
    s->failed = atomic_load(&e->st_failed);
    s->live_requests = atomic_load(&e->live);
    s->max_num_seqs = e->cfg.max_num_seqs;
    s->n_blocks = e->cfg.n_blocks;
    s->block_bytes = e->be ? e->be->block_bytes : 0;
    s->state_bytes = e->be ? e->be->state_bytes : 0;
}
