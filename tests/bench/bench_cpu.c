/*
 * bench_cpu.c - CPU engine throughput: prefill and decode tokens/s of the built-in tiny models,
 * and of a model of Flash width (d 4096, 64 heads, q_lora 1024, 8x1024 output groups, indexer
 * 64x128 top-512, experts 2048 wide, top-6) with three layers (SWA hash, SWA dense, CSA dense).
 * The Flash-width model has 8 routed experts instead of 256: a token's work is the same (6
 * routed + 1 shared) and generating 256 experts' random weights would dominate the run.
 *
 * Usage: bench_cpu [--quick] [--numerics model|exact]      (threads: OMP_NUM_THREADS)
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/err.h"
#include "engine/model.h"
#include "engine/tiny.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int bench(struct dsv4_model *m, const char *label, int prompt_len, int decode_steps,
                 int batch)
{
    const int V = m->cfg.vocab_size;
    struct dsv4_seq_state **st = calloc((size_t)batch, sizeof *st);
    struct dsv4_batch_seq *b = calloc((size_t)batch, sizeof *b);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)prompt_len * batch);
    float *logits = malloc(sizeof(float) * (size_t)V * batch);
    int rc = 0;
    for (int i = 0; i < prompt_len * batch; i++)
        ids[i] = (int32_t)((i * 7919u + 13u) % (unsigned)V);
    for (int s = 0; s < batch && !rc; s++)
        rc = dsv4_seq_state_new(m, NULL, &st[s]);
    if (rc)
        goto out;
    /* prefill: one sequence */
    double t0 = now();
    struct dsv4_batch_seq p = {st[0], ids, prompt_len, 0};
    if ((rc = dsv4_forward(m, &p, 1, logits, NULL)))
        goto out;
    double tp = now() - t0;
    for (int s = 1; s < batch && !rc; s++) {
        struct dsv4_batch_seq q = {st[s], ids + (size_t)s * prompt_len, prompt_len, 0};
        rc = dsv4_forward(m, &q, 1, logits, NULL);
    }
    if (rc)
        goto out;
    /* decode: `batch` sequences, one token each per step */
    t0 = now();
    for (int step = 0; step < decode_steps && !rc; step++) {
        for (int s = 0; s < batch; s++)
            b[s] = (struct dsv4_batch_seq){st[s], ids + (size_t)s * prompt_len + step % prompt_len,
                                           1, 0};
        rc = dsv4_forward(m, b, batch, logits, NULL);
    }
    double td = now() - t0;
    if (!rc)
        printf("%-28s threads %d  prefill %4d tok: %8.1f tok/s   decode batch %2d: %8.1f tok/s "
               "(%.2f ms/step)\n",
               label, omp_get_max_threads(), prompt_len, prompt_len / tp, batch,
               decode_steps * batch / td, 1e3 * td / decode_steps);
out:
    for (int s = 0; s < batch; s++)
        dsv4_seq_state_free(st[s]);
    free(st), free(b), free(ids), free(logits);
    return rc;
}

static void flash_width_config(struct dsv4_config *c)
{
    dsv4_flash_config(c, 3, 8); /* swa swa csa + the MTP layer, 8 experts */
    c->vocab_size = 4096;       /* the head is not part of a layer's cost */
    c->n_hash_layers = 1;
}

int main(int argc, char **argv)
{
    int quick = 0;
    enum dsv4_numerics num = DSV4_NUMERICS_MODEL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--numerics") && i + 1 < argc)
            num = strcmp(argv[++i], "exact") ? DSV4_NUMERICS_MODEL : DSV4_NUMERICS_EXACT;
        else {
            fprintf(stderr, "usage: bench_cpu [--quick] [--numerics model|exact]\n");
            return 2;
        }
    }
    static const char *tiny[2] = {"builtin:tiny-flash", "builtin:tiny-pro"};
    for (int k = 0; k < 2; k++) {
        struct dsv4_model *m;
        if (dsv4_model_open(&m, tiny[k])) {
            fprintf(stderr, "%s\n", err_msg());
            return 1;
        }
        m->numerics = num;
        int rc = bench(m, tiny[k], quick ? 128 : 512, quick ? 8 : 32, 1);
        if (!rc)
            rc = bench(m, tiny[k], quick ? 64 : 256, quick ? 4 : 16, 8);
        dsv4_model_free(m);
        if (rc) {
            fprintf(stderr, "%s\n", err_msg());
            return 1;
        }
    }
    struct dsv4_config c;
    struct st_set *st;
    struct dsv4_model *m;
    flash_width_config(&c);
    double t0 = now();
    if (dsv4_synth_build(&c, "synthetic:flash-width", &st) ||
        dsv4_model_open_set(&m, &c, st, "synthetic:flash-width")) {
        fprintf(stderr, "%s\n", err_msg());
        return 1;
    }
    fprintf(stderr, "(flash-width weights generated in %.1f s)\n", now() - t0);
    m->numerics = num;
    int rc = bench(m, "flash-width, 3 layers", quick ? 32 : 128, quick ? 2 : 8, 1);
    if (!rc)
        rc = bench(m, "flash-width, 3 layers", quick ? 16 : 64, quick ? 2 : 4, 8);
    dsv4_model_free(m);
    if (rc) {
        fprintf(stderr, "%s\n", err_msg());
        return 1;
    }
    return 0;
}
