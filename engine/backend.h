/*
 * backend.h - what the engine needs from a model backend (CPU now, CUDA later).
 *
 * A backend owns n_slots sequence slots (each the fixed state of one sequence) and a pool of
 * compressed-KV blocks of DSV4_BLOCK_TOKENS tokens. A slot holding `pos` tokens holds
 * dsv4_kv_blocks_for(pos) blocks (full ones possibly shared after a fork), so the engine can
 * account for blocks from positions alone: a step that takes a slot from pos to pos + n needs
 * blocks_for(pos + n) - blocks_for(pos) free blocks.
 *
 * THREAD SAFETY: called from the engine thread only.
 */
#ifndef DSV4_BACKEND_H
#define DSV4_BACKEND_H

#include <stddef.h>
#include <stdint.h>

/*
 * A token a backend with device_sampling picks itself, so the caller needs no logits row:
 * temperature <= 0: the argmax (the lowest id among equal maxima); else the draw u in [0, 1)
 * from softmax(logits / temperature) restricted by min_p, top_k and top_p with the rules of
 * engine/sampler.h (the draw may walk the kept tokens in another order than the host sampler:
 * the same distribution).
 */
struct backend_pick {
    float temperature, top_p, min_p, u;
    int top_k;     /* <= 0: off */
    int32_t token; /* out */
};

struct backend_seq {
    int slot;
    const int32_t *tokens; /* (n) at the slot's next positions */
    int n;
    int want_logits; /* a logits row for the last token */
    /* Backends with device_sampling: when non-NULL (with want_logits) the backend picks the
     * token (pick->token) and may leave the row's place in logits unwritten. Others ignore it. */
    struct backend_pick *pick;
};

struct backend;

struct backend_ops {
    /*
     * Run one step over nseq slots (each at most once). logits gets one row of vocab floats per
     * sequence with want_logits, in order. ERR_BUSY: not enough free blocks (nothing advanced);
     * other errors are backend failures.
     */
    int (*step)(struct backend *b, const struct backend_seq *seqs, int nseq, float *logits);
    /* Forget a slot's sequence and free its blocks. */
    void (*slot_reset)(struct backend *b, int slot);
    /* Make slot dst a copy of slot src (shares src's full blocks). */
    int (*slot_fork)(struct backend *b, int dst, int src);
    int (*blocks_free)(struct backend *b);
    void (*destroy)(struct backend *b);
};

struct backend {
    const struct backend_ops *ops;
    int n_slots;
    int n_blocks;
    int vocab_size;
    int eos_token_id;
    size_t block_bytes;  /* bytes of one block */
    size_t state_bytes;  /* bytes of one slot's fixed state */
    int device_sampling; /* honours backend_seq.pick */
    void *impl;
};

struct dsv4_model;

/* The CPU backend over a model (borrowed). */
int backend_cpu_new(struct backend **out, struct dsv4_model *m, int n_slots, int n_blocks);

#endif
