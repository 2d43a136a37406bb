/*
 * bench_engine.c - the serving core's own cost and the tiny model's throughput through it.
 *   1. scheduler overhead per step (us) with 256 running sequences and a no-op backend
 *      (vocabulary 16, so sampling costs nearly nothing);
 *   2. generated tokens/s of builtin:tiny-flash on the CPU backend at batch 1, 8 and 32.
 * Usage: bench_engine [--quick]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "engine/kvcache.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

struct noop {
    long pos[512];
    long steps;
};

static int noop_step(struct backend *b, const struct backend_seq *s, int n, float *logits)
{
    struct noop *o = b->impl;
    int row = 0;
    for (int i = 0; i < n; i++) {
        o->pos[s[i].slot] += s[i].n;
        if (s[i].want_logits) {
            float *l = logits + (size_t)row++ * b->vocab_size;
            for (int v = 0; v < b->vocab_size; v++)
                l[v] = (float)v;
        }
    }
    o->steps++;
    return 0;
}
static void noop_reset(struct backend *b, int slot)
{
    ((struct noop *)b->impl)->pos[slot] = 0;
}
static int noop_fork(struct backend *b, int d, int s)
{
    struct noop *o = b->impl;
    o->pos[d] = o->pos[s];
    return 0;
}
static int noop_free(struct backend *b)
{
    (void)b;
    return 1 << 20;
}
static void noop_destroy(struct backend *b)
{
    free(b->impl);
    free(b);
}
static const struct backend_ops noop_ops = {noop_step, noop_reset, noop_fork, noop_free,
                                            noop_destroy};

/* Run `batch` requests to completion; returns generated tokens per second of wall time. The
 * engine is started (if not yet) once all requests are queued, so every step sees all of them. */
static double run_batch(struct engine *e, int batch, int prompt_len, int gen, int vocab,
                        int start)
{
    struct engine_req **r = calloc((size_t)batch, sizeof *r);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)prompt_len);
    for (int i = 0; i < prompt_len; i++)
        prompt[i] = (int32_t)((i * 7919 + 13) % vocab);
    struct engine_params p;
    memset(&p, 0, sizeof p);
    p.prompt = prompt;
    p.n_prompt = prompt_len;
    p.max_tokens = gen;
    p.n = 1;
    p.ignore_eos = 1;
    p.logprobs = -1;
    p.sampling.top_p = 1;
    p.sampling.repetition_penalty = 1;
    double t0 = now();
    for (int i = 0; i < batch; i++)
        if (engine_submit(e, &p, &r[i])) {
            fprintf(stderr, "%s\n", err_msg());
            return -1;
        }
    if (start && engine_start(e)) {
        fprintf(stderr, "%s\n", err_msg());
        return -1;
    }
    long toks = 0;
    for (int done = 0; done < batch;) {
        done = 0;
        for (int i = 0; i < batch; i++) {
            struct engine_event ev;
            while (engine_poll(r[i], &ev)) {
                toks += ev.type == ENGINE_EV_TOKEN && ev.token >= 0; /* not a text-only flush */
                engine_event_clear(&ev);
            }
            done += engine_req_done(r[i]);
        }
        usleep(200);
    }
    double dt = now() - t0;
    for (int i = 0; i < batch; i++)
        engine_req_release(r[i]);
    free(r);
    free(prompt);
    return (double)toks / dt;
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    /* 1. scheduler overhead */
    struct backend *b = calloc(1, sizeof *b);
    b->ops = &noop_ops;
    b->impl = calloc(1, sizeof(struct noop));
    b->n_slots = 256;
    b->n_blocks = 1 << 20;
    b->vocab_size = 16;
    b->eos_token_id = 1;
    struct engine_config c;
    engine_config_defaults(&c);
    c.max_step_tokens = 256;
    c.max_model_len = 4096;
    struct engine *e;
    if (engine_new_with_backend(&e, b, NULL, &c)) {
        fprintf(stderr, "%s\n", err_msg());
        return 1;
    }
    int gen = quick ? 100 : 400;
    struct noop *o = b->impl;
    long s0 = o->steps;
    double t0 = now();
    double tps = run_batch(e, 256, 1, gen, 16, 1);
    double dt = now() - t0;
    long steps = o->steps - s0;
    printf("scheduler: 256 running sequences, no-op backend: %.1f us/step over %ld steps "
           "(%.0f tokens/s)\n", 1e6 * dt / (double)steps, steps, tps);
    engine_free(e);
    /* 2. the tiny model */
    struct dsv4_model *m;
    if (dsv4_model_open(&m, "builtin:tiny-flash")) {
        fprintf(stderr, "%s\n", err_msg());
        return 1;
    }
    static const int batches[3] = {1, 8, 32};
    for (int k = 0; k < 3; k++) {
        engine_config_defaults(&c);
        c.max_num_seqs = batches[k];
        c.max_model_len = 1024;
        if (engine_new(&e, m, NULL, &c) || engine_start(e)) {
            fprintf(stderr, "%s\n", err_msg());
            return 1;
        }
        double r = run_batch(e, batches[k], 32, quick ? 8 : 32, m->cfg.vocab_size, 0);
        printf("builtin:tiny-flash CPU backend, batch %2d: %.1f generated tokens/s (prompt 32, "
               "%d generated each, prefill included)\n", batches[k], r, quick ? 8 : 32);
        engine_free(e);
    }
    dsv4_model_free(m);
    return 0;
}
