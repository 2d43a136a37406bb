/*
 * test_engine.c - the serving core with a deterministic fake backend (admission, queue limits,
 * chunked-prefill interleave, preemption and resume, cancellation, deadlines, fairness, n > 1,
 * stop tokens, a multi-threaded submit/cancel stress) and with the real tiny model (a request's
 * greedy output is the same alone and inside a batch of 16 mixed-length requests; seeds
 * reproduce).
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "engine/kvcache.h"
#include "engine/model.h"

/* ---- the fake backend ----
 * Logits favour one token, a function of the last token fed and its position, so a sequence's
 * output depends only on its own tokens (like a real model) and recomputation after preemption
 * reproduces it. Blocks are counted from positions like the real pool. */

#define FV 1000

struct fake {
    long pos[64];
    int blocks_used;
    int steps;
    int max_tokens_in_step;
    int decode_steps_with_prefill; /* steps that had a 1-token row and a multi-token row */
    int step_us;                   /* simulated step time */
    atomic_int calls;
    int picks; /* rows whose token the fake picked (device_sampling) */
    int bad_u; /* picks with u outside [0, 1) */
};

static int fake_next(int32_t tok, long pos)
{
    return (int)((tok * 31 + pos * 17 + 7) % (FV - 2)) + 2; /* never 0 or 1 (eos) */
}

static int fake_step(struct backend *b, const struct backend_seq *seqs, int n, float *logits)
{
    struct fake *f = b->impl;
    int need = 0, row = 0, total = 0, has1 = 0, hasmany = 0;
    for (int i = 0; i < n; i++)
        need += dsv4_kv_blocks_for(f->pos[seqs[i].slot] + seqs[i].n) -
                dsv4_kv_blocks_for(f->pos[seqs[i].slot]);
    if (f->blocks_used + need > b->n_blocks)
        return err_setf(ERR_BUSY, "fake: out of blocks");
    f->blocks_used += need;
    for (int i = 0; i < n; i++) {
        const struct backend_seq *s = &seqs[i];
        f->pos[s->slot] += s->n;
        total += s->n;
        has1 |= s->n == 1;
        hasmany |= s->n > 1;
        if (s->want_logits && s->pick && b->device_sampling) {
            /* as a device sampler: the top token, or with temperature > 0 its neighbour for
             * u >= 0.5; the row is left as NaN (the engine must not read it) */
            float *l = logits + (size_t)row++ * FV;
            int top = fake_next(s->tokens[s->n - 1], f->pos[s->slot] - 1);
            for (int v = 0; v < FV; v++)
                l[v] = NAN;
            f->picks++;
            f->bad_u += !(s->pick->u >= 0 && s->pick->u < 1);
            s->pick->token =
                s->pick->temperature > 0 && s->pick->u >= 0.5f ? top % (FV - 2) + 2 : top;
        } else if (s->want_logits) {
            float *l = logits + (size_t)row++ * FV;
            for (int v = 0; v < FV; v++)
                l[v] = (float)((v * 7) % 13) * 0.01f;
            l[fake_next(s->tokens[s->n - 1], f->pos[s->slot] - 1)] = 10.0f;
        }
    }
    f->steps++;
    if (f->step_us)
        usleep((useconds_t)f->step_us);
    if (total > f->max_tokens_in_step)
        f->max_tokens_in_step = total;
    f->decode_steps_with_prefill += has1 && hasmany;
    return 0;
}

static void fake_reset(struct backend *b, int slot)
{
    struct fake *f = b->impl;
    f->blocks_used -= dsv4_kv_blocks_for(f->pos[slot]);
    f->pos[slot] = 0;
}

static int fake_fork(struct backend *b, int dst, int src)
{
    struct fake *f = b->impl;
    int need = dsv4_kv_blocks_for(f->pos[src]);
    if (f->blocks_used + need > b->n_blocks)
        return err_setf(ERR_BUSY, "fake: out of blocks");
    fake_reset(b, dst);
    f->pos[dst] = f->pos[src];
    f->blocks_used += need; /* no sharing in the fake: simpler, conservative */
    return 0;
}

static int fake_free_blocks(struct backend *b)
{
    return b->n_blocks - ((struct fake *)b->impl)->blocks_used;
}

static void fake_destroy(struct backend *b)
{
    free(b->impl);
    free(b);
}

static const struct backend_ops fake_ops = {fake_step, fake_reset, fake_fork, fake_free_blocks,
                                            fake_destroy};

static int fake_device_sampling; /* the next fake backend picks tokens itself */

static struct engine *fake_engine(int slots, int blocks, int step_tokens, int max_queue,
                                  struct fake **fout)
{
    struct backend *b = calloc(1, sizeof *b);
    struct fake *f = calloc(1, sizeof *f);
    b->ops = &fake_ops;
    b->impl = f;
    b->n_slots = slots;
    b->n_blocks = blocks;
    b->vocab_size = FV;
    b->eos_token_id = 1;
    b->device_sampling = fake_device_sampling;
    struct engine_config c;
    engine_config_defaults(&c);
    c.max_step_tokens = step_tokens;
    c.max_queue = max_queue;
    c.max_model_len = 4096;
    struct engine *e;
    if (engine_new_with_backend(&e, b, NULL, &c))
        fail_msg("%s", err_msg());
    if (fout)
        *fout = f;
    return e;
}

static struct engine_params params(const int32_t *prompt, int n, int max_tokens)
{
    struct engine_params p;
    memset(&p, 0, sizeof p);
    p.prompt = prompt;
    p.n_prompt = n;
    p.max_tokens = max_tokens;
    p.n = 1;
    p.sampling.top_p = 1;
    p.sampling.repetition_penalty = 1;
    p.logprobs = -1;
    return p;
}

/* Wait until the request is done; collect choice 0's tokens; return the finish reason. */
static int collect(struct engine_req *r, int32_t *toks, int *ntok, int choice)
{
    struct engine_event ev;
    int finish = -1;
    *ntok = 0;
    for (int spins = 0; !engine_req_done(r); spins++) {
        if (!engine_poll(r, &ev)) {
            usleep(200);
            assert_true(spins < 1500000); /* 300 s: sanitizer builds are slow */
            continue;
        }
        if (ev.type == ENGINE_EV_TOKEN && ev.choice == choice && ev.token >= 0)
            toks[(*ntok)++] = ev.token;
        if (ev.type != ENGINE_EV_TOKEN && ev.choice == choice)
            finish = ev.type == ENGINE_EV_ERROR ? 100 + ev.err : (int)ev.finish;
        engine_event_clear(&ev);
    }
    return finish;
}

/* What the fake model generates greedily after prompt. */
static void expected(const int32_t *prompt, int n, int max_tokens, int32_t *out)
{
    int32_t last = prompt[n - 1];
    long pos = n - 1;
    for (int i = 0; i < max_tokens; i++) {
        out[i] = fake_next(last, pos);
        last = out[i];
        pos++;
    }
}

static void test_basic_and_usage(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(4, 64, 256, 16, &f);
    assert_int_equal(engine_start(e), 0);
    int32_t prompt[10] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14}, got[64], want[64];
    struct engine_params p = params(prompt, 10, 7);
    p.logprobs = 3;
    struct engine_req *r;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    struct engine_event ev;
    int ntok = 0, finish = -1, prompt_tokens = 0, completion = 0;
    while (!engine_req_done(r)) {
        if (!engine_poll(r, &ev)) {
            usleep(100);
            continue;
        }
        if (ev.type == ENGINE_EV_TOKEN) {
            got[ntok++] = ev.token;
            assert_int_equal(ev.n_top, 3);
            assert_int_equal(ev.top[0].token, ev.token); /* greedy picks the top logprob */
            assert_true(ev.logprob <= 0 && ev.top[0].logprob >= ev.top[1].logprob);
        } else {
            finish = ev.finish;
            prompt_tokens = ev.prompt_tokens;
            completion = ev.completion_tokens;
        }
        engine_event_clear(&ev);
    }
    expected(prompt, 10, 7, want);
    assert_int_equal(ntok, 7);
    assert_memory_equal(got, want, sizeof(int32_t) * 7);
    assert_int_equal(finish, ENGINE_FINISH_LENGTH);
    assert_int_equal(prompt_tokens, 10);
    assert_int_equal(completion, 7);
    engine_req_release(r);
    engine_free(e);
}

/* A backend that picks tokens itself (backend.device_sampling): greedy requests get the same
 * tokens without any logits row; requests that need the row (logprobs) still get it; seeded
 * draws pass the sequence's uniforms, so a seed reproduces its output. */
static void test_device_picks(void **state)
{
    (void)state;
    struct fake *f;
    fake_device_sampling = 1;
    struct engine *e = fake_engine(4, 64, 256, 16, &f);
    fake_device_sampling = 0;
    assert_int_equal(engine_start(e), 0);
    int32_t prompt[6] = {5, 6, 7, 8, 9, 10}, got[32], want[32], again[32];
    int n;
    struct engine_params p = params(prompt, 6, 9);
    struct engine_req *r;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    assert_int_equal(collect(r, got, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    expected(prompt, 6, 9, want);
    assert_int_equal(n, 9);
    assert_memory_equal(got, want, sizeof(int32_t) * 9);
    const int picks_greedy = f->picks;
    assert_true(picks_greedy >= 9);
    p.logprobs = 2; /* needs the row: host sampling */
    assert_int_equal(engine_submit(e, &p, &r), 0);
    assert_int_equal(collect(r, got, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    assert_memory_equal(got, want, sizeof(int32_t) * 9);
    assert_int_equal(f->picks, picks_greedy);
    p.logprobs = -1;
    p.sampling.temperature = 1.0f;
    p.sampling.has_seed = 1;
    p.sampling.seed = 1234;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    assert_int_equal(collect(r, got, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    assert_int_equal(engine_submit(e, &p, &r), 0);
    assert_int_equal(collect(r, again, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    assert_memory_equal(got, again, sizeof(int32_t) * 9); /* the seed's uniforms */
    assert_true(f->picks >= picks_greedy + 18);
    assert_int_equal(f->bad_u, 0);
    engine_free(e);
}

static void test_queue_limits_and_validation(void **state)
{
    (void)state;
    struct engine *e = fake_engine(2, 64, 256, 2, NULL); /* not started: requests stay queued */
    int32_t prompt[4] = {2, 3, 4, 5};
    struct engine_params p = params(prompt, 4, 4);
    struct engine_req *r[3];
    assert_int_equal(engine_submit(e, &p, &r[0]), 0);
    assert_int_equal(engine_submit(e, &p, &r[1]), 0);
    assert_int_equal(engine_submit(e, &p, &r[2]), ERR_BUSY);
    struct engine_stats st;
    engine_get_stats(e, &st);
    assert_int_equal(st.waiting, 2);
    p.max_tokens = 5000; /* prompt + max_tokens > max_model_len */
    assert_int_equal(engine_submit(e, &p, &r[2]), ERR_RANGE);
    assert_non_null(strstr(err_msg(), "maximum context length"));
    p.max_tokens = 4;
    int32_t bad[2] = {3, FV + 5};
    p.prompt = bad;
    p.n_prompt = 2;
    assert_int_equal(engine_submit(e, &p, &r[2]), ERR_RANGE);
    engine_drain(e);
    p.prompt = prompt;
    p.n_prompt = 4;
    assert_int_equal(engine_submit(e, &p, &r[2]), ERR_BUSY);
    engine_free(e); /* queued requests end with ABORT; handles stay valid */
    int32_t toks[8];
    int n;
    assert_int_equal(collect(r[0], toks, &n, 0), ENGINE_FINISH_ABORT);
    assert_int_equal(collect(r[1], toks, &n, 0), ENGINE_FINISH_ABORT);
    engine_req_release(r[0]);
    engine_req_release(r[1]);
}

/* A long prompt is prefilled in chunks while a running sequence keeps decoding. */
static void test_chunked_prefill_interleave(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(4, 64, 32, 16, &f);
    assert_int_equal(engine_start(e), 0);
    int32_t a[3] = {4, 5, 6}, b[300], got[64], want[64];
    for (int i = 0; i < 300; i++)
        b[i] = 2 + (i * 7) % 900;
    struct engine_params pa = params(a, 3, 40), pb = params(b, 300, 5);
    struct engine_req *ra, *rb;
    assert_int_equal(engine_submit(e, &pa, &ra), 0);
    assert_int_equal(engine_submit(e, &pb, &rb), 0);
    int n;
    assert_int_equal(collect(rb, got, &n, 0), ENGINE_FINISH_LENGTH);
    expected(b, 300, 5, want);
    assert_memory_equal(got, want, sizeof(int32_t) * 5);
    assert_int_equal(collect(ra, got, &n, 0), ENGINE_FINISH_LENGTH);
    expected(a, 3, 40, want);
    assert_memory_equal(got, want, sizeof(int32_t) * 40);
    assert_true(f->max_tokens_in_step <= 32);
    assert_true(f->decode_steps_with_prefill >= 5); /* decodes ran inside prefill steps */
    engine_req_release(ra);
    engine_req_release(rb);
    engine_free(e);
}

/* With too few blocks, sequences are preempted and recomputed; outputs do not change. */
static void test_preemption_resume(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(4, 6, 512, 16, &f); /* 6 blocks of 128 tokens */
    assert_int_equal(engine_start(e), 0);
    int32_t pr[3][100];
    struct engine_req *r[3];
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 100; i++)
            pr[k][i] = 2 + (i * 13 + k * 101) % 900;
        struct engine_params p = params(pr[k], 100, 200); /* each grows to 300 tokens: 3 blocks */
        assert_int_equal(engine_submit(e, &p, &r[k]), 0);
    }
    for (int k = 0; k < 3; k++) {
        int32_t got[256], want[256];
        int n;
        assert_int_equal(collect(r[k], got, &n, 0), ENGINE_FINISH_LENGTH);
        expected(pr[k], 100, 200, want);
        assert_int_equal(n, 200);
        assert_memory_equal(got, want, sizeof(int32_t) * 200);
        engine_req_release(r[k]);
    }
    struct engine_stats st;
    engine_get_stats(e, &st);
    assert_true(st.preemptions_total > 0);
    assert_int_equal(f->blocks_used, 0);
    engine_free(e);
}

static void test_cancel_and_deadline(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(1, 64, 256, 16, &f); /* one slot: d waits behind r */
    f->step_us = 300;
    assert_int_equal(engine_start(e), 0);
    int32_t prompt[200];
    for (int i = 0; i < 200; i++)
        prompt[i] = 2 + i;
    struct engine_params p = params(prompt, 200, 4000 - 200);
    struct engine_req *r, *d;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    p.deadline = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec + 0.003;
    assert_int_equal(engine_submit(e, &p, &d), 0);
    struct engine_event ev;
    for (int got = 0; !got;) { /* cancel once r is running */
        if (engine_poll(r, &ev)) {
            got = ev.type == ENGINE_EV_TOKEN;
            engine_event_clear(&ev);
        } else {
            usleep(100);
        }
    }
    engine_cancel(r);
    int32_t toks[4096];
    int n;
    assert_int_equal(collect(r, toks, &n, 0), ENGINE_FINISH_ABORT);
    assert_int_equal(collect(d, toks, &n, 0), ENGINE_FINISH_ABORT);
    engine_req_release(r);
    engine_req_release(d);
    usleep(20000);
    assert_int_equal(f->blocks_used, 0); /* everything freed */
    struct engine_stats st;
    engine_get_stats(e, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.waiting, 0);
    engine_free(e);
}

/* One slot: requests run strictly in arrival order within a priority; lower priority first. */
static void test_fairness(void **state)
{
    (void)state;
    static atomic_int order_counter;
    struct engine *e = fake_engine(1, 64, 256, 16, NULL);
    int32_t prompt[3] = {2, 3, 4};
    struct engine_req *r[5];
    for (int k = 0; k < 5; k++) {
        struct engine_params p = params(prompt, 3, 3);
        p.priority = k == 4 ? -1 : 0; /* the last submitted has the highest priority */
        assert_int_equal(engine_submit(e, &p, &r[k]), 0);
    }
    assert_int_equal(engine_start(e), 0);
    double done_at[5];
    int pending = 5;
    atomic_store(&order_counter, 0);
    while (pending) {
        for (int k = 0; k < 5; k++) {
            struct engine_event ev;
            while (r[k] && engine_poll(r[k], &ev)) {
                if (ev.type == ENGINE_EV_FINISH)
                    done_at[k] = ev.t;
                engine_event_clear(&ev);
            }
            if (r[k] && engine_req_done(r[k])) {
                engine_req_release(r[k]);
                r[k] = NULL;
                pending--;
            }
        }
        usleep(100);
    }
    assert_true(done_at[4] < done_at[0]);
    for (int k = 0; k + 1 < 4; k++)
        assert_true(done_at[k] < done_at[k + 1]);
    engine_free(e);
}

static void test_n_choices_and_stops(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(8, 64, 256, 16, &f);
    assert_int_equal(engine_start(e), 0);
    int32_t prompt[20], want[32], got[32];
    for (int i = 0; i < 20; i++)
        prompt[i] = 2 + i * 3;
    expected(prompt, 20, 10, want);
    struct engine_params p = params(prompt, 20, 10);
    p.n = 3;
    struct engine_req *r;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    int counts[3] = {0, 0, 0}, finishes = 0;
    struct engine_event ev;
    while (!engine_req_done(r)) {
        if (!engine_poll(r, &ev)) {
            usleep(100);
            continue;
        }
        if (ev.type == ENGINE_EV_TOKEN)
            assert_int_equal(ev.token, want[counts[ev.choice]++]); /* greedy: all choices equal */
        else
            finishes++;
        engine_event_clear(&ev);
    }
    assert_int_equal(finishes, 3);
    for (int c = 0; c < 3; c++)
        assert_int_equal(counts[c], 10);
    engine_req_release(r);
    /* a stop token id ends the choice with STOP and is not emitted */
    p.n = 1;
    p.stop_ids = &want[4];
    p.n_stop_ids = 1;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    int n;
    assert_int_equal(collect(r, got, &n, 0), ENGINE_FINISH_STOP);
    assert_int_equal(n, 4);
    engine_req_release(r);
    engine_free(e);
}

/* Several threads submit and cancel at random; afterwards nothing is left allocated. */
struct stress_arg {
    struct engine *e;
    unsigned seed;
    atomic_int *ok;
};

static void *stress_thread(void *arg)
{
    struct stress_arg *a = arg;
    unsigned s = a->seed;
    int32_t prompt[300];
    for (int i = 0; i < 300; i++)
        prompt[i] = 2 + i;
    for (int it = 0; it < 400; it++) {
        s = s * 1103515245u + 12345u;
        struct engine_params p = params(prompt, 1 + (int)(s >> 8) % 299, 1 + (int)(s >> 4) % 40);
        p.n = 1 + (int)(s >> 20) % 3;
        struct engine_req *r;
        int rc = engine_submit(a->e, &p, &r);
        if (rc) {
            if (rc != ERR_BUSY)
                return NULL;
            continue;
        }
        int mode = (int)(s >> 12) % 4;
        if (mode == 0) {
            engine_req_release(r); /* walk away at once */
        } else {
            if (mode == 1)
                engine_cancel(r);
            struct engine_event ev;
            for (int spins = 0; !engine_req_done(r) && spins < 1000000; spins++) {
                if (mode == 2 && spins == 3)
                    engine_cancel(r);
                if (engine_poll(r, &ev))
                    engine_event_clear(&ev);
                else
                    usleep(50);
            }
            engine_req_release(r);
        }
    }
    atomic_fetch_add(a->ok, 1);
    return NULL;
}

static void test_stress_threads(void **state)
{
    (void)state;
    struct fake *f;
    struct engine *e = fake_engine(16, 24, 128, 64, &f);
    assert_int_equal(engine_start(e), 0);
    atomic_int ok;
    atomic_init(&ok, 0);
    pthread_t th[4];
    struct stress_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct stress_arg){e, 1234u + (unsigned)i * 77u, &ok};
        pthread_create(&th[i], NULL, stress_thread, &args[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&ok), 4);
    for (int spins = 0; spins < 2000; spins++) { /* released handles are reaped at the next step */
        struct engine_stats st;
        engine_get_stats(e, &st);
        if (st.running == 0 && st.waiting == 0 && f->blocks_used == 0 && st.live_requests == 0)
            break;
        usleep(1000);
    }
    struct engine_stats st;
    engine_get_stats(e, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(f->blocks_used, 0);
    assert_int_equal(st.live_requests, 0); /* every handle freed exactly once */
    engine_free(e);
}

/* ---- the real tiny model ---- */

static void test_tiny_batch_invariance_and_seeds(void **state)
{
    (void)state;
    struct dsv4_model *m;
    if (dsv4_model_open(&m, "builtin:tiny-flash"))
        fail_msg("%s", err_msg());
    struct engine_config c;
    engine_config_defaults(&c);
    c.max_num_seqs = 16;
    c.max_model_len = 1024;
    c.max_step_tokens = 256;
    struct engine *e;
    if (engine_new(&e, m, NULL, &c) || engine_start(e))
        fail_msg("%s", err_msg());
    enum { N = 16, GEN = 8 };
    int32_t *pr[N];
    int len[N];
    for (int k = 0; k < N; k++) {
        len[k] = 3 + (k * 37) % 150;
        pr[k] = malloc(sizeof(int32_t) * (size_t)len[k]);
        for (int i = 0; i < len[k]; i++)
            pr[k][i] = (int32_t)((i * 7919 + k * 104729 + 1) % 129280);
    }
    /* request 5 alone, greedy and seeded */
    int32_t alone[GEN], alone_s[GEN], got[GEN];
    int n;
    struct engine_req *r;
    struct engine_params p = params(pr[5], len[5], GEN);
    assert_int_equal(engine_submit(e, &p, &r), 0);
    assert_int_equal(collect(r, alone, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    struct engine_params ps = p;
    ps.sampling.temperature = 1.0f;
    ps.sampling.seed = 42;
    ps.sampling.has_seed = 1;
    assert_int_equal(engine_submit(e, &ps, &r), 0);
    assert_int_equal(collect(r, alone_s, &n, 0), ENGINE_FINISH_LENGTH);
    engine_req_release(r);
    /* all 16 at once (request 5 greedy), then the seeded one inside another batch */
    struct engine_req *rs[N];
    for (int k = 0; k < N; k++) {
        struct engine_params q = params(pr[k], len[k], GEN);
        if (k % 3 == 1) {
            q.sampling.temperature = 0.8f;
            q.sampling.top_p = 0.9f;
        }
        assert_int_equal(engine_submit(e, &q, &rs[k]), 0);
    }
    assert_int_equal(collect(rs[5], got, &n, 0), ENGINE_FINISH_LENGTH);
    assert_memory_equal(got, alone, sizeof got);
    for (int k = 0; k < N; k++) {
        int32_t t[GEN];
        collect(rs[k], t, &n, 0);
        engine_req_release(rs[k]);
    }
    struct engine_req *busy[4];
    for (int k = 0; k < 4; k++) {
        struct engine_params q = params(pr[k], len[k], GEN);
        assert_int_equal(engine_submit(e, &q, &busy[k]), 0);
    }
    assert_int_equal(engine_submit(e, &ps, &r), 0);
    assert_int_equal(collect(r, got, &n, 0), ENGINE_FINISH_LENGTH);
    assert_memory_equal(got, alone_s, sizeof got); /* same seed, same output, in a batch */
    engine_req_release(r);
    for (int k = 0; k < 4; k++) {
        int32_t t[GEN];
        collect(busy[k], t, &n, 0);
        engine_req_release(busy[k]);
    }
    engine_free(e);
    for (int k = 0; k < N; k++)
        free(pr[k]);
    dsv4_model_free(m);
}

/* Stop strings that straddle a token boundary are caught, and no part of them leaks. */
static int utf8_start(unsigned char c)
{
    return (c & 0xc0) != 0x80;
}

static void test_tiny_stop_strings(void **state)
{
    (void)state;
    char path[4096];
    const char *env = getenv("DSV4_TOKENIZER"), *build = getenv("DSV4_BUILD_ROOT");
    snprintf(path, sizeof path, "%s", env ? env : "");
    if (!env)
        snprintf(path, sizeof path, "%s/tokenizer.json", build ? build : ".");
    if (access(path, R_OK) != 0) {
        printf("# no tokenizer at %s (tests/text/fetch_tokenizer.sh fetches it)\n", path);
        skip();
    }
    struct tokenizer *tok;
    struct dsv4_model *m;
    if (tok_load(path, &tok) || dsv4_model_open(&m, "builtin:tiny-pro"))
        fail_msg("%s", err_msg());
    struct engine *e;
    struct engine_config c;
    engine_config_defaults(&c);
    c.max_num_seqs = 4;
    c.max_model_len = 512;
    if (engine_new(&e, m, tok, &c) || engine_start(e))
        fail_msg("%s", err_msg());
    int32_t prompt[6] = {0, 1000, 2000, 3000, 4000, 5000};
    struct engine_params p = params(prompt, 6, 24);
    p.detokenize = 1;
    struct engine_req *r;
    struct engine_event ev;
    char full[4096] = "";
    size_t bounds[64];
    int nb = 0;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    while (!engine_req_done(r)) {
        if (!engine_poll(r, &ev)) {
            usleep(200);
            continue;
        }
        if (ev.type == ENGINE_EV_TOKEN && ev.token >= 0) {
            strncat(full, ev.text, sizeof full - strlen(full) - 1);
            bounds[nb++] = strlen(full);
        }
        engine_event_clear(&ev);
    }
    engine_req_release(r);
    /* a boundary with at least one character on each side, away from the start */
    int found = 0;
    char stop[64];
    size_t at = 0;
    for (int k = 2; k + 1 < nb && !found; k++) {
        size_t b = bounds[k];
        if (b == 0 || b >= strlen(full) || bounds[k - 1] == b || bounds[k + 1] == b)
            continue;
        size_t lo = b - 1, hi = b + 1;
        while (lo > 0 && !utf8_start((unsigned char)full[lo]))
            lo--;
        while (full[hi] && !utf8_start((unsigned char)full[hi]))
            hi++;
        if (hi - lo < sizeof stop && lo > 0) {
            memcpy(stop, full + lo, hi - lo);
            stop[hi - lo] = 0;
            char *first = strstr(full, stop);
            if (first && (size_t)(first - full) == lo) {
                at = lo;
                found = 1;
            }
        }
    }
    if (!found)
        fail_msg("no usable token boundary in \"%s\"", full);
    const char *stops[1] = {stop};
    p.stop = stops;
    p.n_stop = 1;
    assert_int_equal(engine_submit(e, &p, &r), 0);
    char out[4096] = "";
    int finish = -1;
    char matched[64] = "";
    while (!engine_req_done(r)) {
        if (!engine_poll(r, &ev)) {
            usleep(200);
            continue;
        }
        if (ev.type == ENGINE_EV_TOKEN) {
            strncat(out, ev.text, sizeof out - strlen(out) - 1);
            assert_null(strstr(out, stop)); /* never leaks, even partially at the end */
        } else {
            finish = ev.finish;
            if (ev.stop_str)
                snprintf(matched, sizeof matched, "%s", ev.stop_str);
        }
        engine_event_clear(&ev);
    }
    engine_req_release(r);
    printf("# stop \"%s\" at byte %zu of \"%s\"\n", stop, at, full);
    assert_int_equal(finish, ENGINE_FINISH_STOP);
    assert_string_equal(matched, stop);
    assert_int_equal(strlen(out), at);
    assert_memory_equal(out, full, at);
    engine_free(e);
    dsv4_model_free(m);
    tok_free(tok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic_and_usage),
        cmocka_unit_test(test_queue_limits_and_validation),
        cmocka_unit_test(test_device_picks),
        cmocka_unit_test(test_chunked_prefill_interleave),
        cmocka_unit_test(test_preemption_resume),
        cmocka_unit_test(test_cancel_and_deadline),
        cmocka_unit_test(test_fairness),
        cmocka_unit_test(test_n_choices_and_stops),
        cmocka_unit_test(test_stress_threads),
        cmocka_unit_test(test_tiny_batch_invariance_and_seeds),
        cmocka_unit_test(test_tiny_stop_strings),
    };
    const char *filter = getenv("DSV4_TEST_FILTER"); /* e.g. the TSan run: the stress test */
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
