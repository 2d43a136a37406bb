/*
 * kvcache.h - the pool of compressed-KV blocks shared by all sequences.
 *
 * DSV4 keeps two kinds of per-sequence cache (spec §8.1, paper §3.5):
 *   - fixed state, the same size for every sequence: the 128-entry window of KV latents and the
 *     compressor/indexer pooling state of each layer (struct dsv4_seq_state, one per slot);
 *   - growing compressed entries: per CSA layer one KV entry and one indexer key per 4 tokens,
 *     per HCA layer one KV entry per 128 tokens. These live here, in fixed-size blocks of
 *     DSV4_BLOCK_TOKENS = lcm(4, 128) = 128 tokens of one sequence: a block holds, for every
 *     compressed layer, the entries produced by those 128 tokens (32 CSA entries + keys, or 1
 *     HCA entry). A sequence owns a block table; entry i of a layer with ratio r lives in block
 *     (i*r)/128 at slot ((i*r) % 128)/r.
 *
 * The block table is backend-neutral: the CPU backend stores FP32 entries, the GPU backend stores
 * the same blocks in its own layout (FP8 KV entries of 584 bytes, reduced-precision indexer keys)
 * indexed by the same tables, so the scheduler's accounting and preemption do not change.
 *
 * Prefix caching (design note, not built yet): a full block's entries are a pure function of the
 * token prefix up to the block's end, and entries are append-only, so full blocks can be shared
 * read-only between sequences with the same prefix through the per-block refcount here, keyed by
 * a chained hash of the block's 128 token ids and its predecessor's hash. What is not in blocks
 * is the fixed state at the block boundary (window + compressor state): a cache hit restores it
 * from a snapshot stored with the block, or recomputes it from the last n_win tokens of each layer
 * (the paper's "recompute from the last n_win*L tokens" option). Nothing in the layout needs to
 * change for that: blocks are already refcounted and never written once full.
 *
 * THREAD SAFETY: none. The pool belongs to the engine thread (or to one caller at a time).
 */
#ifndef DSV4_KVCACHE_H
#define DSV4_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/config.h"
#include "engine/schedule.h"

#define DSV4_BLOCK_TOKENS 128

struct dsv4_kv_pool {
    int n_blocks;
    size_t block_floats;                  /* floats per block */
    size_t layer_off[DSV4_MAX_LAYERS];    /* float offset of each layer's area in a block */
    size_t layer_ioff[DSV4_MAX_LAYERS];   /* offset of its indexer keys (CSA) */
    int layer_ratio[DSV4_MAX_LAYERS];
    int head_dim, index_dim;
    float *data;                          /* (n_blocks, block_floats) */
    int32_t *refs;                        /* (n_blocks) 0 = free */
    int32_t *free_list;                   /* stack of free block ids */
    int n_free;
};

/* Bytes one block takes for this model (FP32 CPU layout). */
size_t dsv4_kv_block_bytes(const struct dsv4_config *c, const struct dsv4_schedule *s);

/* A pool of n_blocks blocks. */
int dsv4_kv_pool_new(struct dsv4_kv_pool **out, const struct dsv4_config *c,
                     const struct dsv4_schedule *s, int n_blocks);
void dsv4_kv_pool_free(struct dsv4_kv_pool *p);
/* Grow a private pool to n_blocks (entry addresses are recomputed from tables on every use, so
 * moving the data is safe). Not for a pool shared with a GPU backend. */
int dsv4_kv_pool_grow(struct dsv4_kv_pool *p, int n_blocks);

/* Take a free block (refcount 1); ERR_BUSY when none is left. */
int dsv4_kv_block_alloc(struct dsv4_kv_pool *p, int32_t *out);
/* Add a reference (sharing) / drop one (freed at zero). */
void dsv4_kv_block_ref(struct dsv4_kv_pool *p, int32_t b);
void dsv4_kv_block_unref(struct dsv4_kv_pool *p, int32_t b);
/* Fraction of blocks in use, 0..1. */
double dsv4_kv_usage(const struct dsv4_kv_pool *p);

/* Blocks a sequence of `tokens` tokens needs. */
static inline int dsv4_kv_blocks_for(long tokens)
{
    return (int)((tokens + DSV4_BLOCK_TOKENS - 1) / DSV4_BLOCK_TOKENS);
}

/* Address of entry i of layer l in a sequence's table (KV: head_dim floats). */
static inline float *dsv4_kv_entry(const struct dsv4_kv_pool *p, const int32_t *table, int l,
                                   long i)
{
    long tok = i * p->layer_ratio[l];
    return p->data + (size_t)table[tok / DSV4_BLOCK_TOKENS] * p->block_floats + p->layer_off[l] +
           (size_t)((tok % DSV4_BLOCK_TOKENS) / p->layer_ratio[l]) * (size_t)p->head_dim;
}

/* Address of indexer key i of CSA layer l (index_dim floats). */
static inline float *dsv4_kv_ikey(const struct dsv4_kv_pool *p, const int32_t *table, int l, long i)
{
    long tok = i * p->layer_ratio[l];
    return p->data + (size_t)table[tok / DSV4_BLOCK_TOKENS] * p->block_floats + p->layer_ioff[l] +
           (size_t)((tok % DSV4_BLOCK_TOKENS) / p->layer_ratio[l]) * (size_t)p->index_dim;
}

#endif
