/* backend_cpu.c - the CPU backend: dsv4_forward over slots of struct dsv4_seq_state. */
#include <stdlib.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/kvcache.h"
#include "engine/model.h"

struct cpu_impl {
    struct dsv4_model *m;
    struct dsv4_kv_pool *pool;
    struct dsv4_seq_state **slots;
    struct dsv4_batch_seq *batch;
};

static int cpu_step(struct backend *b, const struct backend_seq *seqs, int nseq, float *logits)
{
    struct cpu_impl *c = b->impl;
    int out = 0, rc = 0;
    /* dsv4_forward returns one row per sequence; rows of sequences without want_logits are
     * computed into a scratch row and dropped (the last token of a prefill chunk that does not
     * end the prompt). Group so that wanted rows land in order. */
    float *scratch = NULL;
    for (int i = 0; i < nseq; i++)
        c->batch[i] = (struct dsv4_batch_seq){c->slots[seqs[i].slot], seqs[i].tokens, seqs[i].n, 0};
    int nwant = 0;
    for (int i = 0; i < nseq; i++)
        nwant += seqs[i].want_logits != 0;
    if (nwant == nseq) {
        rc = dsv4_forward(c->m, c->batch, nseq, logits, NULL);
    } else {
        scratch = malloc(sizeof(float) * (size_t)b->vocab_size * (size_t)nseq);
        if (!scratch)
            return err_setf(ERR_NOMEM, "cpu backend: out of memory");
        rc = dsv4_forward(c->m, c->batch, nseq, nwant ? scratch : NULL, NULL);
        for (int i = 0; !rc && i < nseq; i++)
            if (seqs[i].want_logits) {
                for (int v = 0; v < b->vocab_size; v++)
                    logits[(size_t)out * b->vocab_size + v] = scratch[(size_t)i * b->vocab_size + v];
                out++;
            }
        free(scratch);
    }
    return rc;
}

static void cpu_slot_reset(struct backend *b, int slot)
{
    struct cpu_impl *c = b->impl;
    dsv4_seq_state_reset(c->m, c->slots[slot]);
}

static int cpu_slot_fork(struct backend *b, int dst, int src)
{
    struct cpu_impl *c = b->impl;
    return dsv4_seq_state_fork(c->m, c->slots[dst], c->slots[src]);
}

static int cpu_blocks_free(struct backend *b)
{
    return ((struct cpu_impl *)b->impl)->pool->n_free;
}

static void cpu_destroy(struct backend *b)
{
    if (!b)
        return;
    struct cpu_impl *c = b->impl;
    if (c) {
        for (int i = 0; c->slots && i < b->n_slots; i++)
            dsv4_seq_state_free(c->slots[i]);
        free(c->slots);
        free(c->batch);
        dsv4_kv_pool_free(c->pool);
        free(c);
    }
    free(b);
}

static const struct backend_ops cpu_ops = {cpu_step, cpu_slot_reset, cpu_slot_fork,
                                           cpu_blocks_free, cpu_destroy};

int backend_cpu_new(struct backend **out, struct dsv4_model *m, int n_slots, int n_blocks)
{
    struct backend *b = calloc(1, sizeof *b);
    struct cpu_impl *c = calloc(1, sizeof *c);
    int rc;
    if (!b || !c) {
        free(b);
        free(c);
        return err_setf(ERR_NOMEM, "cpu backend: out of memory");
    }
    b->ops = &cpu_ops;
    b->impl = c;
    b->n_slots = n_slots;
    b->n_blocks = n_blocks;
    b->vocab_size = m->cfg.vocab_size;
    b->eos_token_id = m->cfg.eos_token_id;
    b->block_bytes = dsv4_kv_block_bytes(&m->cfg, &m->sched);
    c->m = m;
    c->slots = calloc((size_t)n_slots, sizeof *c->slots);
    c->batch = calloc((size_t)n_slots, sizeof *c->batch);
    if (!c->slots || !c->batch) {
        rc = err_setf(ERR_NOMEM, "cpu backend: out of memory");
        goto fail;
    }
    if ((rc = dsv4_kv_pool_new(&c->pool, &m->cfg, &m->sched, n_blocks)))
        goto fail;
    for (int i = 0; i < n_slots; i++)
        if ((rc = dsv4_seq_state_new(m, c->pool, &c->slots[i])))
            goto fail;
    b->state_bytes = dsv4_seq_state_bytes(m);
    *out = b;
    return 0;
fail:
    cpu_destroy(b);
    return rc;
}
