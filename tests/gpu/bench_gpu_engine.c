/*
 * bench_gpu_engine.c - the end-to-end GPU engine benchmark (issue 8).
 *
 * Opens a model the way the server does (dsv4_model_open: a checkpoint directory or builtin:NAME),
 * creates the CUDA backend with the server's memory plan (backend_cuda_new_opts: exactly the
 * slots and blocks the largest measurement needs, the scratch of the largest step allocated up
 * front; refused before any upload, with the numbers, when it does not fit), and measures in one
 * run, on one GPU:
 *   copy     device-to-device copy bandwidth (kern_d2d_async of >= 1 GiB; (read + write) bytes
 *            per second, and the read bytes alone per second);
 *   prefill  one sequence of --prefill tokens in chunks of --chunk: the time to its first logits
 *            (every chunk's step, back to back) and tokens/s;
 *   decode   for each B of --batches: B sequences prefilled with --prompt random tokens, --warmup
 *            untimed steps, then --steps timed steps of one random token per sequence, each
 *            wanting its next token (--logits: the argmax ids from the device when the backend
 *            offers it, as the server at temperature 0, or every logits row): median / mean / min
 *            step time, tokens/s = B / median step time;
 *   bytes    per decode step, the bytes that must be read (weights touched + KV cache read) over
 *            the copy's (read + write) bandwidth = the floor time; floor / median step time = the
 *            fraction of the memory-bandwidth bound the step reaches. The model (ENGINE_RESULTS.md
 *            describes every term):
 *              weights  every non-expert weight of every main layer as the checkpoint stores it
 *                       (FP8 1 B/elt + UE8M0 or FP32 128x128 block scales, BF16 2 B, F32 4 B;
 *                       norms, mHC, sinks, ape, biases are FP32 on the device) + the head and
 *                       hc_head (all of it) + one embedding row and one tid2eid row per token;
 *              experts  routed experts touched x bytes per expert (MXFP4 checkpoints: NVFP4 as
 *                       the backend converts them, 0.5 B/elt + one E4M3 scale per 16 elts);
 *                       hash layers: the real distinct ids of the step's tokens (tid2eid, on the
 *                       host); dense layers: the expectation E (1 - (1 - K/E)^B) for uniformly
 *                       random routing (an estimate: the ids are on the device);
 *              kv       per sequence and main layer, the window min(pos, 128) entries; CSA: the
 *                       min(pos/4, index_topk) selected entries + all pos/4 indexer keys; HCA: all
 *                       pos/128 entries; bytes per entry derived from the backend's block_bytes
 *                       (or --kv-entry-bytes / --idx-key-bytes).
 * Output: a human table on stdout; with --json also one JSON object per line per measurement
 * (lines starting with '{', each with the GPU name), flushed as soon as it is measured, so a
 * timeout keeps what was done.
 *
 * Times are host wall-clock times of backend->ops->step, which returns after the step's stream
 * has synchronised (what the engine thread sees).
 *
 * Without a CUDA device: "1..0 # SKIP no CUDA device", exit 0. Exit 1 when the model cannot be
 * opened, the cache would not fit, or a step fails (the message says which); 2 on bad flags.
 */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend.h"
#include "engine/backend_cuda.h"
#include "engine/err.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "kernels/kernels.h"

#define BENCH_MAX_BATCHES 16
#define BENCH_MAX_STEPS   4096

enum bench_fill { BENCH_FILL_AUTO, BENCH_FILL_PREFILL, BENCH_FILL_FORK };
enum bench_logits { BENCH_LOGITS_AUTO, BENCH_LOGITS_FULL, BENCH_LOGITS_GREEDY };

struct bench_opts {
    const char *model;
    int batches[BENCH_MAX_BATCHES];
    int n_batches;
    int prompt, steps, warmup, prefill, chunk;
    size_t copy_bytes;
    double budget; /* seconds from the start; 0 = none */
    enum bench_fill fill;
    enum bench_logits logits;
    double kv_entry, idx_key; /* bytes per KV entry / indexer key; 0 = derive from the backend */
    int exact, json;
};

/* Per-model constants of the bytes model (bytes as stored on the GPU). */
struct bench_bytes {
    double layer_fixed[DSV4_MAX_LAYERS]; /* non-expert weights of main layer l */
    double expert;                       /* one routed expert: w1 + w2 + w3 */
    int expert_nvfp4;                    /* experts counted as NVFP4 (MXFP4 checkpoint) */
    double head;                         /* head + final norm + hc_head */
    double embed_row;                    /* one embedding row */
    double tid2eid_row;                  /* K int32 ids (hash layers, per token) */
    double device_total;                 /* every weight the backend uploads (estimate) */
    double kv_entry, idx_key;            /* bytes of one KV entry / one indexer key */
    char kv_source[200];                 /* how kv_entry / idx_key were obtained */
};

/* One decode step's bytes, averaged over the timed steps. */
struct bench_step_bytes {
    double weights;        /* non-expert weights + head + embedding and tid2eid rows */
    double experts;        /* routed experts touched */
    double kv;             /* KV cache read */
    double hash_distinct;  /* mean distinct experts per hash layer (real ids) */
    double dense_distinct; /* distinct experts per dense layer (estimate) */
};

struct bench_ctx {
    const struct bench_opts *o;
    struct dsv4_model *m; /* owned */
    struct backend *bk;   /* owned */
    struct bench_bytes bb;
    char gpu[256];
    char jhead[2048]; /* the common start of every JSON line */
    double t0;        /* program start (monotonic seconds) */
    double copy_rw_gbps, copy_read_gbps, prefill_tok_s;
    int max_batch;
    float *logits; /* (max_batch, V) host rows, owned */
    int32_t *toks; /* (max_batch, tok_stride) host token ids, owned */
    size_t tok_stride;
    uint64_t rng;
};

/* ---- small helpers ---- */

static double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t bench_rand(struct bench_ctx *c)
{
    c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(c->rng >> 33);
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v (n >= 1; sorts v). */
static double bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, bench_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* s as a JSON string body (quotes, backslashes and control characters escaped) into buf. */
static void bench_json_str(char *buf, size_t n, const char *s)
{
    size_t k = 0;
    for (; *s && k + 7 < n; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            buf[k++] = '\\';
            buf[k++] = (char)ch;
        } else if (ch < 0x20) {
            k += (size_t)snprintf(buf + k, n - k, "\\u%04x", ch);
        } else {
            buf[k++] = (char)ch;
        }
    }
    buf[k] = 0;
}

/* Seconds left of --budget (a large number when there is none). */
static double bench_left(const struct bench_ctx *c)
{
    return c->o->budget > 0 ? c->o->budget - (bench_now() - c->t0) : 1e30;
}

/* ---- the bytes model ---- */

/* A matrix as the checkpoint stores it (0 when absent). */
static double bench_qmat_bytes(const struct cpu_qmat *q)
{
    if (!q->w)
        return 0;
    const double n = (double)q->rows * (double)q->cols;
    switch (q->fmt) {
    case CPU_W_F32:
        return 4 * n;
    case CPU_W_BF16:
        return 2 * n;
    case CPU_W_FP8:
        return n + (double)((q->rows + 127) / 128) * (double)((q->cols + 127) / 128) *
                       (q->scale_f32 ? 4 : 1);
    case CPU_W_MXFP4:
        return n / 2 + n / 32;
    case CPU_W_NVFP4:
        return n / 2 + n / 16 + 4;
    }
    return 0;
}

/* mHC parameters: fn (nmix, n*d), base (nmix), scale (nscale), FP32. */
static double bench_hc_bytes(int nmix, int n, int d, int nscale)
{
    return 4.0 * ((double)nmix * n * d + nmix + nscale);
}

static double bench_comp_bytes(const struct dsv4_compressor_w *cw)
{
    const int width = (cw->overlap ? 2 : 1) * cw->D;
    return bench_qmat_bytes(&cw->wkv) + bench_qmat_bytes(&cw->wgate) +
           4.0 * ((double)cw->ratio * width + cw->D);
}

/* One NVFP4 matrix: 0.5 B/elt + one E4M3 scale per 16 elts (+ its FP32 alpha). */
static double bench_nvfp4_bytes(int rows, int cols)
{
    const double n = (double)rows * (double)cols;
    return n / 2 + n / 16 + 4;
}

/* Fill the per-model constants from the model's tensors (the entry sizes come later). */
static void bench_bytes_init(const struct dsv4_model *m, struct bench_bytes *bb)
{
    const struct dsv4_config *c = &m->cfg;
    const struct dsv4_weights *w = &m->w;
    const int d = c->hidden_size, n = c->hc_mult, E = c->n_routed_experts, K = c->n_experts_per_tok;
    memset(bb, 0, sizeof *bb);
    const struct dsv4_layer_w *l0 = &w->layers[0];
    bb->expert_nvfp4 = c->expert_fmt == DSV4_WFMT_MXFP4;
    if (bb->expert_nvfp4)
        bb->expert = 2 * bench_nvfp4_bytes(c->moe_inter, d) + bench_nvfp4_bytes(d, c->moe_inter);
    else
        bb->expert = bench_qmat_bytes(&l0->w1[0]) + bench_qmat_bytes(&l0->w2[0]) +
                     bench_qmat_bytes(&l0->w3[0]);
    bb->head = bench_qmat_bytes(&w->head) + 4.0 * d + bench_hc_bytes(n, n, d, 1);
    bb->embed_row = bench_qmat_bytes(&w->embed) / (double)c->vocab_size;
    bb->tid2eid_row = 4.0 * K;
    bb->device_total = bb->head + bench_qmat_bytes(&w->embed);
    for (int li = 0; li < c->n_layers; li++) {
        const struct dsv4_layer_w *l = &w->layers[li];
        const struct dsv4_layer_spec *sp = &m->sched.layers[li];
        double b = 4.0 * 2 * d + 2 * bench_hc_bytes((2 + n) * n, n, d, 3);
        b += bench_qmat_bytes(&l->wq_a) + 4.0 * c->q_lora_rank + bench_qmat_bytes(&l->wq_b);
        b += bench_qmat_bytes(&l->wkv) + 4.0 * c->head_dim;
        b += bench_qmat_bytes(&l->wo_a) + bench_qmat_bytes(&l->wo_b) + 4.0 * c->n_heads;
        if (sp->ratio)
            b += bench_comp_bytes(&l->comp);
        if (sp->attn == DSV4_ATTN_CSA)
            b += bench_comp_bytes(&l->icomp) + bench_qmat_bytes(&l->idx_wq_b) +
                 bench_qmat_bytes(&l->idx_wproj);
        b += bench_qmat_bytes(&l->gate);
        if (sp->router == DSV4_ROUTER_DENSE)
            b += 4.0 * E;
        if (l->has_shared)
            b += bench_qmat_bytes(&l->sh_w1) + bench_qmat_bytes(&l->sh_w2) +
                 bench_qmat_bytes(&l->sh_w3);
        bb->layer_fixed[li] = b;
        bb->device_total += b + (double)E * bb->expert;
        if (sp->router == DSV4_ROUTER_HASH)
            bb->device_total += bb->tid2eid_row * c->vocab_size;
    }
}

/*
 * Bytes per KV entry and per indexer key. The backend reports only block_bytes (all compressed
 * layers' entries of 128 tokens); with F = the floats of that block in the FP32 layout
 * (sum over compressed layers of 128/ratio entries of head_dim, + CSA 32 keys of index_head_dim)
 * the assumption is one storage cost per element, s = block_bytes / F, for KV entries and
 * indexer keys alike, and window entries cost what compressed entries cost.
 */
static void bench_entry_bytes(const struct bench_ctx *c, struct bench_bytes *bb)
{
    const struct dsv4_config *cf = &c->m->cfg;
    double F = 0;
    for (int li = 0; li < cf->n_layers; li++) {
        const struct dsv4_layer_spec *sp = &c->m->sched.layers[li];
        if (!sp->ratio)
            continue;
        F += (double)(DSV4_BLOCK_TOKENS / sp->ratio) * cf->head_dim;
        if (sp->attn == DSV4_ATTN_CSA)
            F += (double)(DSV4_BLOCK_TOKENS / sp->ratio) * cf->index_head_dim;
    }
    double s = F > 0 && c->bk->block_bytes > 1 ? (double)c->bk->block_bytes / F : 4.0;
    bb->kv_entry = c->o->kv_entry > 0 ? c->o->kv_entry : s * cf->head_dim;
    bb->idx_key = c->o->idx_key > 0 ? c->o->idx_key : s * cf->index_head_dim;
    if (c->o->kv_entry > 0 || c->o->idx_key > 0)
        snprintf(bb->kv_source, sizeof bb->kv_source, "flags (--kv-entry-bytes/--idx-key-bytes)");
    else if (F > 0)
        snprintf(bb->kv_source, sizeof bb->kv_source,
                 "backend block_bytes %zu / %.0f FP32-layout elements = %.3f B/elt, uniform",
                 c->bk->block_bytes, F, s);
    else
        snprintf(bb->kv_source, sizeof bb->kv_source, "no compressed layer: FP32 assumed");
}

/* Expected distinct experts when B tokens each pick K of E uniformly. */
static double bench_expected_distinct(int E, int K, int B)
{
    return (double)E * (1.0 - pow(1.0 - (double)K / E, (double)B));
}

/*
 * The bytes one decode step reads: B sequences, each holding pos tokens before the step, with
 * input tokens tok (B). Adds to *sb (the caller averages).
 */
static void bench_step_bytes(const struct bench_ctx *c, const int32_t *tok, int B, long pos,
                             struct bench_step_bytes *sb)
{
    const struct dsv4_model *m = c->m;
    const struct dsv4_config *cf = &m->cfg;
    const struct bench_bytes *bb = &c->bb;
    const int E = cf->n_routed_experts, K = cf->n_experts_per_tok;
    unsigned char seen[1024];
    int n_hash = 0, n_dense = 0;
    double hash_sum = 0, wts = bb->head + B * bb->embed_row, kv = 0, experts = 0;
    const double dense = bench_expected_distinct(E, K, B);
    for (int li = 0; li < cf->n_layers; li++) {
        const struct dsv4_layer_spec *sp = &m->sched.layers[li];
        wts += bb->layer_fixed[li];
        if (sp->router == DSV4_ROUTER_HASH && E <= (int)sizeof seen) {
            int distinct = 0;
            memset(seen, 0, (size_t)E);
            for (int b = 0; b < B; b++)
                for (int j = 0; j < K; j++) {
                    int64_t e = dsv4_tid2eid(&m->w.layers[li], tok[b], K, j);
                    if (e >= 0 && e < E && !seen[e]) {
                        seen[e] = 1;
                        distinct++;
                    }
                }
            wts += B * bb->tid2eid_row;
            experts += distinct * bb->expert;
            hash_sum += distinct;
            n_hash++;
        } else {
            experts += dense * bb->expert;
            n_dense++;
        }
        /* KV read by one sequence at this layer */
        long win = pos < cf->sliding_window ? pos : cf->sliding_window;
        double per = (double)win * bb->kv_entry;
        if (sp->attn == DSV4_ATTN_CSA) {
            long ne = pos / 4, sel = ne < cf->index_topk ? ne : cf->index_topk;
            per += (double)sel * bb->kv_entry + (double)ne * bb->idx_key;
        } else if (sp->attn == DSV4_ATTN_HCA) {
            per += (double)(pos / 128) * bb->kv_entry;
        }
        kv += per * B;
    }
    sb->weights += wts;
    sb->experts += experts;
    sb->kv += kv;
    sb->hash_distinct += n_hash ? hash_sum / n_hash : 0;
    sb->dense_distinct += n_dense ? dense : 0;
}

/* ---- measurements ---- */

/* Device-to-device copy: 2 warm-up copies, then 7 rounds of 8 back-to-back copies, each round
 * timed on the host from the first enqueue to one stream sync; the median round. Halves the size
 * while the two buffers cannot be allocated (down to 64 MiB). */
static int bench_copy(struct bench_ctx *c)
{
    size_t n = c->o->copy_bytes;
    void *a = NULL, *b = NULL;
    struct CUstream_st *st = NULL;
    double t[7];
    int rc = 0;
    for (; n >= ((size_t)64 << 20); n /= 2) {
        if (!kern_malloc(&a, n) && !kern_malloc(&b, n))
            break;
        kern_free(a);
        kern_free(b);
        a = b = NULL;
        (void)kern_rt_error(); /* clear the allocation error */
    }
    if (!a) {
        rc = err_setf(ERR_CUDA, "copy: cannot allocate two buffers of 64 MiB");
        goto out;
    }
    if ((rc = kern_memset(a, 0x5a, n)) || (rc = kern_memset(b, 0, n)) ||
        (rc = kern_stream_new(&st))) {
        rc = err_setf(ERR_CUDA, "copy: setup: %s", kern_last_error());
        goto out;
    }
    for (int r = -1; r < 7 && !rc; r++) {
        const int reps = r < 0 ? 2 : 8;
        double t0 = bench_now();
        for (int i = 0; i < reps && !rc; i++)
            rc = kern_d2d_async(b, a, n, st);
        if (!rc)
            rc = kern_stream_sync(st);
        if (r >= 0)
            t[r] = (bench_now() - t0) / reps;
    }
    if (rc) {
        rc = err_setf(ERR_CUDA, "copy: %s", kern_last_error());
        goto out;
    }
    double sec = bench_median(t, 7);
    c->copy_rw_gbps = 2.0 * (double)n / sec / 1e9;
    c->copy_read_gbps = (double)n / sec / 1e9;
    printf("copy     %.2f GiB device to device: %.3f ms; %.0f GB/s read+write (the floor's "
           "bandwidth), %.0f GB/s read\n",
           (double)n / (1 << 30), sec * 1e3, c->copy_rw_gbps, c->copy_read_gbps);
    if (c->o->json)
        printf(
            "%s\"kind\":\"copy\",\"bytes\":%zu,\"ms\":%.4f,\"rw_gbps\":%.1f,\"read_gbps\":%.1f}\n",
            c->jhead, n, sec * 1e3, c->copy_rw_gbps, c->copy_read_gbps);
    fflush(stdout);
out:
    if (st)
        kern_stream_free(st);
    kern_free(a);
    kern_free(b);
    return rc;
}

static int bench_step1(struct backend *bk, int slot, const int32_t *tok, int n, int want,
                       float *logits)
{
    struct backend_seq s = {slot, tok, n, want, NULL};
    return bk->ops->step(bk, &s, 1, logits);
}

static void bench_random_tokens(struct bench_ctx *c, int32_t *t, size_t n)
{
    const uint32_t V = (uint32_t)c->m->cfg.vocab_size;
    for (size_t i = 0; i < n; i++)
        t[i] = (int32_t)(bench_rand(c) % V);
}

/* Prefill: one sequence of --prefill tokens in --chunk chunks (slot 0), after one untimed chunk
 * that grows the backend's scratch. */
static int bench_prefill(struct bench_ctx *c)
{
    const int N = c->o->prefill, C = c->o->chunk;
    struct backend *bk = c->bk;
    int32_t *tok = c->toks;
    double *ct = NULL;
    int nch = (N + C - 1) / C, rc;
    if (!(ct = malloc(sizeof *ct * (size_t)nch)))
        return err_setf(ERR_NOMEM, "out of memory");
    bench_random_tokens(c, tok, (size_t)N);
    bk->ops->slot_reset(bk, 0);
    rc = bench_step1(bk, 0, tok, C < N ? C : N, 1, c->logits);
    bk->ops->slot_reset(bk, 0);
    if (rc) {
        err_prefix(rc, "prefill warm-up");
        goto out;
    }
    kern_trace_report(NULL);
    double t0 = bench_now();
    for (int k = 0; k < nch; k++) {
        int at = k * C, len = N - at < C ? N - at : C;
        double ts = bench_now();
        if ((rc = bench_step1(bk, 0, tok + at, len, k == nch - 1, c->logits))) {
            err_prefix(rc, "prefill chunk %d", k);
            goto out;
        }
        ct[k] = bench_now() - ts;
    }
    double ttft = bench_now() - t0;
    kern_trace_report("prefill");
    c->prefill_tok_s = N / ttft;
    printf("prefill  %d tokens in chunks of %d: first logits after %.1f ms, %.0f tokens/s "
           "(chunks ms:",
           N, C, ttft * 1e3, c->prefill_tok_s);
    for (int k = 0; k < nch; k++)
        printf(" %.1f", ct[k] * 1e3);
    printf(")\n");
    if (c->o->json) {
        printf("%s\"kind\":\"prefill\",\"tokens\":%d,\"chunk\":%d,\"ttft_ms\":%.3f,\"tok_s\":%.1f,"
               "\"chunk_ms\":[",
               c->jhead, N, C, ttft * 1e3, c->prefill_tok_s);
        for (int k = 0; k < nch; k++)
            printf("%s%.3f", k ? "," : "", ct[k] * 1e3);
        printf("]}\n");
    }
    fflush(stdout);
out:
    bk->ops->slot_reset(bk, 0);
    free(ct);
    return rc;
}

/*
 * Put B sequences (slots 0..B-1) at --prompt tokens. prefill: distinct random prompts, batched
 * into steps of at most --chunk tokens (each sequence at most once per step, long prompts in
 * pieces); fork: one prompt prefilled in slot 0 and forked to the others (full blocks shared,
 * so their compressed entries are read from the same memory). *how names what was done.
 */
static int bench_fill(struct bench_ctx *c, int B, const char **how)
{
    const int P = c->o->prompt, C = c->o->chunk;
    struct backend *bk = c->bk;
    struct backend_seq *seqs = malloc(sizeof *seqs * (size_t)B);
    int *done = calloc((size_t)B, sizeof *done);
    int rc = 0, fork = c->o->fill == BENCH_FILL_FORK;
    if (!seqs || !done) {
        rc = err_setf(ERR_NOMEM, "out of memory");
        goto out;
    }
    if (c->o->fill == BENCH_FILL_AUTO && B > 1 && c->o->budget > 0) {
        /* distinct prompts unless their prefill would take over half of what is left */
        double need = c->prefill_tok_s > 0 ? (double)B * P / c->prefill_tok_s : 0;
        fork = need > 0.5 * bench_left(c);
    }
    *how = fork && B > 1 ? "fork" : "prefill";
    for (int i = 0; i < B; i++)
        bk->ops->slot_reset(bk, i);
    for (int i = 0; i < (fork ? 1 : B); i++)
        bench_random_tokens(c, c->toks + (size_t)i * c->tok_stride, (size_t)P);
    for (;;) {
        int ns = 0, budget = C;
        for (int i = 0; i < (fork ? 1 : B) && budget > 0; i++) {
            if (done[i] == P)
                continue;
            int len = P - done[i] < budget ? P - done[i] : budget;
            seqs[ns++] = (struct backend_seq){i, c->toks + (size_t)i * c->tok_stride + done[i], len,
                                              0, NULL};
            done[i] += len;
            budget -= len;
        }
        if (!ns)
            break;
        if ((rc = bk->ops->step(bk, seqs, ns, NULL))) {
            err_prefix(rc, "filling %d sequences", B);
            goto out;
        }
    }
    for (int i = 1; fork && i < B; i++)
        if ((rc = bk->ops->slot_fork(bk, i, 0))) {
            err_prefix(rc, "fork to slot %d", i);
            goto out;
        }
out:
    free(seqs);
    free(done);
    return rc;
}

/* Decode at batch B: fill, warm up, time --steps steps; one table row and one JSON line. */
static int bench_decode(struct bench_ctx *c, int B)
{
    const struct bench_opts *o = c->o;
    struct backend *bk = c->bk;
    const int S = o->steps;
    struct backend_seq *seqs = malloc(sizeof *seqs * (size_t)B);
    int32_t *tok = malloc(sizeof *tok * (size_t)B);
    struct backend_pick *picked = calloc((size_t)B, sizeof *picked); /* temperature 0: argmax */
    double *st = malloc(sizeof *st * (size_t)S);
    struct bench_step_bytes sb = {0};
    const char *how = "prefill";
    int rc;
    if (!seqs || !tok || !picked || !st) {
        rc = err_setf(ERR_NOMEM, "out of memory");
        goto out;
    }
    double tf = bench_now();
    if ((rc = bench_fill(c, B, &how)))
        goto out;
    tf = bench_now() - tf;
    /* greedy: the backend takes each row's argmax on the device and returns only the ids (what
     * the server does for temperature-0 requests); full: every logits row comes back */
    const int greedy =
        o->logits == BENCH_LOGITS_GREEDY || (o->logits == BENCH_LOGITS_AUTO && bk->device_sampling);
    for (int i = 0; i < B; i++)
        seqs[i] = (struct backend_seq){i, &tok[i], 1, 1, greedy ? &picked[i] : NULL};
    double sum = 0;
    for (int k = -o->warmup; k < S; k++) {
        bench_random_tokens(c, tok, (size_t)B);
        if (k == 0) {
            kern_trace_report(NULL); /* DSV4_CUDA_TRACE: only the timed steps */
            kern_profile_range(1);   /* ncu --profile-from-start off: likewise */
        }
        double t0 = bench_now();
        if ((rc = bk->ops->step(bk, seqs, B, c->logits))) {
            err_prefix(rc, "decode batch %d step %d", B, k);
            goto out;
        }
        double dt = bench_now() - t0;
        if (k >= 0) {
            st[k] = dt;
            sum += dt;
            /* each sequence held prompt + warmup + k tokens before this step */
            bench_step_bytes(c, tok, B, (long)o->prompt + o->warmup + k, &sb);
        }
    }
    kern_profile_range(0);
    {
        char what[64];
        snprintf(what, sizeof what, "decode batch %d, %d steps", B, S);
        kern_trace_report(what);
    }
    double mean = sum / S, med = bench_median(st, S), mn = st[0];
    sb.weights /= S, sb.experts /= S, sb.kv /= S, sb.hash_distinct /= S, sb.dense_distinct /= S;
    const double total = sb.weights + sb.experts + sb.kv;
    const double floor_s = total / (c->copy_rw_gbps * 1e9);
    const double pos = o->prompt + o->warmup + 0.5 * (S - 1);
    printf(
        "%6d %7.1f %10.3f %10.3f %10.3f %10.1f %9.1f %6.1f/%-6.1f %9.1f %8.1f %9.1f %8.3f %7.1f%%"
        "  %-6s %s %.1fs\n",
        B, pos, med * 1e3, mean * 1e3, mn * 1e3, B / med, sb.weights / 1e6, sb.hash_distinct,
        sb.dense_distinct, sb.experts / 1e6, sb.kv / 1e6, total / 1e6, floor_s * 1e3,
        100 * floor_s / med, greedy ? "greedy" : "full", how, tf);
    if (o->json)
        printf("%s\"kind\":\"decode\",\"batch\":%d,\"prompt\":%d,\"warmup\":%d,\"steps\":%d,"
               "\"pos_mean\":%.1f,\"logits\":\"%s\",\"fill\":\"%s\",\"fill_s\":%.3f,\"step_ms_"
               "median\":%.4f,"
               "\"step_ms_mean\":%.4f,\"step_ms_min\":%.4f,\"tok_s\":%.1f,\"bytes_weights\":%.0f,"
               "\"bytes_experts\":%.0f,\"bytes_kv\":%.0f,\"bytes_total\":%.0f,"
               "\"experts_per_hash_layer\":%.2f,\"experts_per_dense_layer_est\":%.2f,"
               "\"copy_rw_gbps\":%.1f,\"floor_ms\":%.4f,\"fraction\":%.4f}\n",
               c->jhead, B, o->prompt, o->warmup, S, pos, greedy ? "greedy" : "full", how, tf,
               med * 1e3, mean * 1e3, mn * 1e3, B / med, sb.weights, sb.experts, sb.kv, total,
               sb.hash_distinct, sb.dense_distinct, c->copy_rw_gbps, floor_s * 1e3, floor_s / med);
    fflush(stdout);
out:
    for (int i = 0; i < B; i++)
        bk->ops->slot_reset(bk, i);
    free(seqs);
    free(tok);
    free(picked);
    free(st);
    return rc;
}

/* ---- set-up ---- */

static int bench_usage(FILE *f)
{
    fprintf(f,
            "usage: bench_gpu_engine [--model PATH|builtin:NAME] [--batches 1,8,64,256]\n"
            "         [--prompt P] [--steps S] [--warmup W] [--prefill N] [--chunk C]\n"
            "         [--fill auto|prefill|fork] [--logits auto|full|greedy] [--copy-mib M]\n"
            "         [--budget SEC]\n"
            "         [--kv-entry-bytes X] [--idx-key-bytes Y] [--numerics model|exact] [--json]\n"
            "The GPU engine end to end (issue 8): copy bandwidth, prefill of N tokens, decode at\n"
            "each batch with the bytes-per-step model. Defaults: builtin:tiny-flash, batches\n"
            "1,8,64,256, prompt 512, steps 32, warmup 3, prefill 8192, chunk 2048, fill auto\n"
            "(distinct prompts unless --budget would run out: then forks), logits auto (greedy\n"
            "ids from the device when the backend can, as the server at temperature 0; else full\n"
            "rows), copy 1024 MiB, no budget. --budget: skip what is left once SEC seconds have\n"
            "passed since the start.\n");
    return 2;
}

static int bench_parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi)
        return ERR_INVAL;
    *out = (int)v;
    return 0;
}

static int bench_parse_double(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= 0) || v > 1e12)
        return ERR_INVAL;
    *out = v;
    return 0;
}

static int bench_parse_batches(const char *s, struct bench_opts *o)
{
    o->n_batches = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > 4096 || (*end && *end != ',') ||
            o->n_batches == BENCH_MAX_BATCHES)
            return ERR_INVAL;
        o->batches[o->n_batches++] = (int)v;
        s = *end ? end + 1 : end;
    }
    return o->n_batches ? 0 : ERR_INVAL;
}

/* 0, or 2 (usage printed) on a bad flag, or 1 for --help. */
static int bench_parse(int argc, char **argv, struct bench_opts *o)
{
    static const struct option opts[] = {{"model", required_argument, NULL, 'm'},
                                         {"batches", required_argument, NULL, 'b'},
                                         {"prompt", required_argument, NULL, 'p'},
                                         {"steps", required_argument, NULL, 's'},
                                         {"warmup", required_argument, NULL, 'w'},
                                         {"prefill", required_argument, NULL, 'n'},
                                         {"chunk", required_argument, NULL, 'c'},
                                         {"fill", required_argument, NULL, 'f'},
                                         {"logits", required_argument, NULL, 'l'},
                                         {"copy-mib", required_argument, NULL, 'y'},
                                         {"budget", required_argument, NULL, 'B'},
                                         {"kv-entry-bytes", required_argument, NULL, 'k'},
                                         {"idx-key-bytes", required_argument, NULL, 'i'},
                                         {"numerics", required_argument, NULL, 'N'},
                                         {"json", no_argument, NULL, 'j'},
                                         {"help", no_argument, NULL, 'h'},
                                         {0, 0, 0, 0}};
    int ch, mib = 1024, bad = 0;
    memset(o, 0, sizeof *o);
    o->model = "builtin:tiny-flash";
    bench_parse_batches("1,8,64,256", o);
    o->prompt = 512, o->steps = 32, o->warmup = 3, o->prefill = 8192, o->chunk = 2048;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            o->model = optarg;
            break;
        case 'b':
            bad |= bench_parse_batches(optarg, o) != 0;
            break;
        case 'p':
            bad |= bench_parse_int(optarg, 1, 1 << 22, &o->prompt) != 0;
            break;
        case 's':
            bad |= bench_parse_int(optarg, 1, BENCH_MAX_STEPS, &o->steps) != 0;
            break;
        case 'w':
            bad |= bench_parse_int(optarg, 0, 1000, &o->warmup) != 0;
            break;
        case 'n':
            bad |= bench_parse_int(optarg, 0, 1 << 22, &o->prefill) != 0;
            break;
        case 'c':
            bad |= bench_parse_int(optarg, 1, 1 << 20, &o->chunk) != 0;
            break;
        case 'y':
            bad |= bench_parse_int(optarg, 64, 1 << 16, &mib) != 0;
            break;
        case 'f':
            if (!strcmp(optarg, "auto"))
                o->fill = BENCH_FILL_AUTO;
            else if (!strcmp(optarg, "prefill"))
                o->fill = BENCH_FILL_PREFILL;
            else if (!strcmp(optarg, "fork"))
                o->fill = BENCH_FILL_FORK;
            else
                bad = 1;
            break;
        case 'l':
            if (!strcmp(optarg, "auto"))
                o->logits = BENCH_LOGITS_AUTO;
            else if (!strcmp(optarg, "full"))
                o->logits = BENCH_LOGITS_FULL;
            else if (!strcmp(optarg, "greedy"))
                o->logits = BENCH_LOGITS_GREEDY;
            else
                bad = 1;
            break;
        case 'B':
            bad |= bench_parse_double(optarg, &o->budget) != 0;
            break;
        case 'k':
            bad |= bench_parse_double(optarg, &o->kv_entry) != 0;
            break;
        case 'i':
            bad |= bench_parse_double(optarg, &o->idx_key) != 0;
            break;
        case 'N':
            if (strcmp(optarg, "model") && strcmp(optarg, "exact"))
                bad = 1;
            o->exact = !strcmp(optarg, "exact");
            break;
        case 'j':
            o->json = 1;
            break;
        case 'h':
            bench_usage(stdout);
            return 1;
        default:
            bad = 1;
            break;
        }
    }
    if (bad || optind != argc) {
        fprintf(stderr, "bench_gpu_engine: bad arguments\n");
        return bench_usage(stderr);
    }
    o->copy_bytes = (size_t)mib << 20;
    return 0;
}

/* The header: model, schedule, bytes-model constants. */
static void bench_header(struct bench_ctx *c, double t_open, double t_backend)
{
    const struct dsv4_config *cf = &c->m->cfg;
    char sched[DSV4_MAX_LAYERS * 6 + 1] = "", esc[600];
    size_t k = 0;
    for (int li = 0; li < cf->n_layers && k + 6 < sizeof sched; li++)
        k += (size_t)snprintf(sched + k, sizeof sched - k, "%s%s", li ? " " : "",
                              dsv4_attn_name(c->m->sched.layers[li].attn));
    printf("# device: %s\n# model: %s: %d layers (%s), d %d, %d heads, E %d, K %d, I %d, vocab "
           "%d, %s numerics\n",
           c->gpu, c->o->model, cf->n_layers, sched, cf->hidden_size, cf->n_heads,
           cf->n_routed_experts, cf->n_experts_per_tok, cf->moe_inter, cf->vocab_size,
           c->o->exact ? "exact" : "model");
    printf("# open %.1f s, backend (upload) %.1f s; weights on the GPU about %.2f GiB (experts "
           "counted as %s, %.2f MB each)\n",
           t_open, t_backend, c->bb.device_total / 1073741824.0,
           c->bb.expert_nvfp4 ? "NVFP4" : "stored", c->bb.expert / 1e6);
    printf("# backend: %d slots, %d blocks of %zu B, %zu B fixed state per slot; KV entry %.1f B, "
           "indexer key %.1f B (%s)\n",
           c->bk->n_slots, c->bk->n_blocks, c->bk->block_bytes, c->bk->state_bytes, c->bb.kv_entry,
           c->bb.idx_key, c->bb.kv_source);
    if (c->o->json) {
        bench_json_str(esc, sizeof esc, c->bb.kv_source);
        printf("%s\"kind\":\"meta\",\"layers\":%d,\"schedule\":\"%s\",\"hidden\":%d,\"experts\":%d,"
               "\"experts_per_token\":%d,\"numerics\":\"%s\",\"open_s\":%.2f,\"backend_s\":%.2f,"
               "\"weights_device_bytes\":%.0f,\"expert_bytes\":%.0f,\"head_bytes\":%.0f,"
               "\"block_bytes\":%zu,\"state_bytes\":%zu,\"kv_entry_bytes\":%.2f,"
               "\"idx_key_bytes\":%.2f,\"kv_source\":\"%s\"}\n",
               c->jhead, cf->n_layers, sched, cf->hidden_size, cf->n_routed_experts,
               cf->n_experts_per_tok, c->o->exact ? "exact" : "model", t_open, t_backend,
               c->bb.device_total, c->bb.expert, c->bb.head, c->bk->block_bytes, c->bk->state_bytes,
               c->bb.kv_entry, c->bb.idx_key, esc);
    }
    fflush(stdout);
}

static void bench_skip(const struct bench_ctx *c, const char *what)
{
    printf("# skipped %s: --budget of %.1f s used up\n", what, c->o->budget);
    if (c->o->json)
        printf("%s\"kind\":\"skipped\",\"what\":\"%s\"}\n", c->jhead, what);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    struct bench_opts o;
    struct bench_ctx c;
    char esc_gpu[600], esc_model[1200];
    int rc = bench_parse(argc, argv, &o), status = 1;
    if (rc)
        return rc == 1 ? 0 : 2;
    memset(&c, 0, sizeof c);
    c.o = &o;
    c.t0 = bench_now();
    c.rng = 0x9e3779b97f4a7c15ull;
    if (kern_device_count() < 1) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    kern_device_name(c.gpu, sizeof c.gpu);
    bench_json_str(esc_gpu, sizeof esc_gpu, c.gpu);
    bench_json_str(esc_model, sizeof esc_model, o.model);
    snprintf(c.jhead, sizeof c.jhead, "{\"bench\":\"gpu_engine\",\"gpu\":\"%s\",\"model\":\"%s\",",
             esc_gpu, esc_model);
    double t = bench_now();
    if ((rc = dsv4_model_open(&c.m, o.model))) {
        fprintf(stderr, "bench_gpu_engine: %s: %s\n", o.model, err_msg());
        goto out;
    }
    double t_open = bench_now() - t;
    if (o.exact)
        c.m->numerics = DSV4_NUMERICS_EXACT;
    const struct dsv4_config *cf = &c.m->cfg;
    const long seq_max = (long)o.prompt + o.warmup + o.steps;
    if (seq_max > cf->max_position_embeddings || o.prefill > cf->max_position_embeddings) {
        fprintf(stderr,
                "bench_gpu_engine: %ld tokens per sequence is past the model's %ld "
                "positions\n",
                seq_max > o.prefill ? seq_max : o.prefill, cf->max_position_embeddings);
        goto out;
    }
    if (cf->n_routed_experts > 1024) {
        fprintf(stderr, "bench_gpu_engine: %d experts: the bytes model counts up to 1024\n",
                cf->n_routed_experts);
        goto out;
    }
    for (int i = 0; i < o.n_batches; i++)
        c.max_batch = o.batches[i] > c.max_batch ? o.batches[i] : c.max_batch;
    /* slots: the largest batch; blocks: the largest of the decode batches and the prefill, + one
     * per slot for the partial block a fork copies */
    const int n_slots = c.max_batch;
    long nb_dec = (long)c.max_batch * dsv4_kv_blocks_for(seq_max);
    long nb_pre = dsv4_kv_blocks_for(o.prefill);
    long n_blocks = (nb_dec > nb_pre ? nb_dec : nb_pre) + n_slots;
    if (n_blocks > (1L << 30)) {
        fprintf(stderr, "bench_gpu_engine: %ld blocks: too many\n", n_blocks);
        goto out;
    }
    bench_bytes_init(c.m, &c.bb);
    c.tok_stride = (size_t)(o.prompt > o.prefill ? o.prompt : o.prefill);
    c.logits = malloc(sizeof(float) * (size_t)cf->vocab_size * (size_t)c.max_batch);
    c.toks = malloc(sizeof(int32_t) * c.tok_stride * (size_t)c.max_batch);
    if (!c.logits || !c.toks) {
        fprintf(stderr, "bench_gpu_engine: out of memory\n");
        goto out;
    }
    /* the server's memory plan (refused before any upload when it does not fit), with exactly
     * n_blocks blocks and the scratch of the largest step and position allocated up front, so no
     * timed step grows a buffer */
    struct backend_cuda_opts bo;
    backend_cuda_opts_defaults(&bo);
    bo.n_slots = n_slots;
    bo.n_blocks = (int)n_blocks;
    bo.exact_blocks = 1;
    bo.max_step_tokens = o.chunk > c.max_batch ? o.chunk : c.max_batch;
    bo.max_model_len = (int)(seq_max > o.prefill ? seq_max : o.prefill);
    bo.mem_util = 1.0;
    bo.progress = 1;
    t = bench_now();
    if ((rc = backend_cuda_new_opts(&c.bk, c.m, &bo))) {
        fprintf(
            stderr,
            "bench_gpu_engine: %s\n(the cache needs %d slots and %ld blocks: smaller --batches, "
            "--prompt, --prefill or --chunk need less)\n",
            err_msg(), n_slots, n_blocks);
        goto out;
    }
    double t_backend = bench_now() - t;
    bench_entry_bytes(&c, &c.bb);
    bench_header(&c, t_open, t_backend);
    if ((rc = bench_copy(&c))) {
        fprintf(stderr, "bench_gpu_engine: %s\n", err_msg());
        goto out;
    }
    if (o.prefill > 0 && bench_left(&c) <= 0) {
        bench_skip(&c, "prefill");
    } else if (o.prefill > 0 && (rc = bench_prefill(&c))) {
        fprintf(stderr, "bench_gpu_engine: %s\n", err_msg());
        goto out;
    }
    printf("%6s %7s %10s %10s %10s %10s %9s %13s %9s %8s %9s %8s %8s  %-6s %s\n", "batch", "pos",
           "step_ms", "mean_ms", "min_ms", "tok/s", "weight_MB", "exp/lyr h/d", "expert_MB",
           "kv_MB", "total_MB", "floor_ms", "of_floor", "logits", "fill");
    for (int i = 0; i < o.n_batches; i++) {
        char what[64];
        snprintf(what, sizeof what, "decode batch %d", o.batches[i]);
        if (bench_left(&c) <= 0) {
            bench_skip(&c, what);
            continue;
        }
        if ((rc = bench_decode(&c, o.batches[i]))) {
            fprintf(stderr, "bench_gpu_engine: %s\n", err_msg());
            goto out;
        }
    }
    printf("# done in %.1f s\n", bench_now() - c.t0);
    status = 0;
out:
    if (c.bk)
        c.bk->ops->destroy(c.bk);
    dsv4_model_free(c.m);
    free(c.logits);
    free(c.toks);
    return status;
}
