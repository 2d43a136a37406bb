/* kvcache.c - the compressed-KV block pool (see kvcache.h). */
#include "engine/kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "engine/err.h"

static size_t layout(struct dsv4_kv_pool *p, const struct dsv4_config *c,
                     const struct dsv4_schedule *s)
{
    size_t off = 0;
    for (int l = 0; l < s->n_layers + s->n_mtp; l++) {
        int r = s->layers[l].ratio;
        p->layer_ratio[l] = r ? r : 1;
        p->layer_off[l] = off;
        if (!r)
            continue;
        int per_block = DSV4_BLOCK_TOKENS / r;
        off += (size_t)per_block * (size_t)c->head_dim;
        p->layer_ioff[l] = off;
        if (s->layers[l].attn == DSV4_ATTN_CSA)
            off += (size_t)per_block * (size_t)c->index_head_dim;
    }
    return off;
}

size_t dsv4_kv_block_bytes(const struct dsv4_config *c, const struct dsv4_schedule *s)
{
    struct dsv4_kv_pool tmp;
    return layout(&tmp, c, s) * sizeof(float);
}

int dsv4_kv_pool_new(struct dsv4_kv_pool **out, const struct dsv4_config *c,
                     const struct dsv4_schedule *s, int n_blocks)
{
    struct dsv4_kv_pool *p = calloc(1, sizeof *p);
    if (!p)
        return err_setf(ERR_NOMEM, "kv cache: out of memory");
    p->n_blocks = n_blocks;
    p->head_dim = c->head_dim;
    p->index_dim = c->index_head_dim;
    p->block_floats = layout(p, c, s);
    if (p->block_floats == 0)
        p->block_floats = 1; /* an all-SWA model still gets (empty) blocks for accounting */
    p->data = malloc(sizeof(float) * p->block_floats * (size_t)(n_blocks ? n_blocks : 1));
    p->refs = calloc((size_t)(n_blocks ? n_blocks : 1), sizeof *p->refs);
    p->free_list = malloc(sizeof *p->free_list * (size_t)(n_blocks ? n_blocks : 1));
    if (!p->data || !p->refs || !p->free_list) {
        dsv4_kv_pool_free(p);
        return err_setf(ERR_NOMEM, "kv cache: cannot allocate %d blocks of %zu bytes", n_blocks,
                        p->block_floats * sizeof(float));
    }
    for (int i = 0; i < n_blocks; i++)
        p->free_list[i] = n_blocks - 1 - i; /* pop gives block 0 first */
    p->n_free = n_blocks;
    *out = p;
    return 0;
}

int dsv4_kv_pool_grow(struct dsv4_kv_pool *p, int n_blocks)
{
    if (n_blocks <= p->n_blocks)
        return 0;
    float *d = realloc(p->data, sizeof(float) * p->block_floats * (size_t)n_blocks);
    if (!d)
        return err_setf(ERR_NOMEM, "kv cache: cannot grow to %d blocks", n_blocks);
    p->data = d;
    int32_t *r = realloc(p->refs, sizeof *r * (size_t)n_blocks);
    if (!r)
        return err_setf(ERR_NOMEM, "kv cache: cannot grow to %d blocks", n_blocks);
    p->refs = r;
    int32_t *f = realloc(p->free_list, sizeof *f * (size_t)n_blocks);
    if (!f)
        return err_setf(ERR_NOMEM, "kv cache: cannot grow to %d blocks", n_blocks);
    p->free_list = f;
    for (int i = n_blocks - 1; i >= p->n_blocks; i--) {
        p->refs[i] = 0;
        p->free_list[p->n_free++] = i;
    }
    p->n_blocks = n_blocks;
    return 0;
}

void dsv4_kv_pool_free(struct dsv4_kv_pool *p)
{
    if (!p)
        return;
    free(p->data);
    free(p->refs);
    free(p->free_list);
    free(p);
}

int dsv4_kv_block_alloc(struct dsv4_kv_pool *p, int32_t *out)
{
    if (!p->n_free)
        return err_setf(ERR_BUSY, "kv cache: all %d blocks in use", p->n_blocks);
    int32_t b = p->free_list[--p->n_free];
    p->refs[b] = 1;
    *out = b;
    return 0;
}

void dsv4_kv_block_ref(struct dsv4_kv_pool *p, int32_t b)
{
    p->refs[b]++;
}

void dsv4_kv_block_unref(struct dsv4_kv_pool *p, int32_t b)
{
    if (--p->refs[b] == 0)
        p->free_list[p->n_free++] = b;
}

double dsv4_kv_usage(const struct dsv4_kv_pool *p)
{
    return p->n_blocks ? 1.0 - (double)p->n_free / p->n_blocks : 0.0;
}
