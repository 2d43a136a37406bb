/*
 * model.h - a loaded DSV4 model and its CPU forward pass over a batch of sequences.
 *
 * The walk follows the schedule once for every layer:
 *   mhc_pre -> attention (SWA / CSA / HCA) -> mhc_post -> mhc_pre -> MoE (hash / dense) -> mhc_post
 * then hc_head -> final norm -> head for the rows whose logits are wanted.
 *
 * A batch mixes sequences of different lengths, each contributing a contiguous chunk of tokens
 * at its next positions (a whole prompt, a prefill chunk, or one decode token). The result for a
 * sequence does not depend on what else is in the batch or on how its tokens were chunked: every
 * op is row-independent and the per-sequence state (window ring, compressor state, compressed
 * entries) is advanced token by token in position order.
 *
 * THREAD SAFETY: a model is immutable after open and may be shared; a forward call mutates the
 * states of its sequences, which must not be used concurrently by another call. Forward is
 * internally parallel (OpenMP).
 */
#ifndef DSV4_MODEL_H
#define DSV4_MODEL_H

#include <stdint.h>

#include "engine/config.h"
#include "engine/kvcache.h"
#include "engine/safetensors.h"
#include "engine/schedule.h"
#include "engine/weights.h"

enum dsv4_numerics {
    DSV4_NUMERICS_EXACT, /* FP32 on dequantised weights: what the float reference computes */
    DSV4_NUMERICS_MODEL, /* + the quantisation steps of the model definition (spec §7) */
};

struct dsv4_model {
    struct dsv4_config cfg;
    struct dsv4_schedule sched;
    struct dsv4_weights w;
    struct st_set *st; /* owned: the checkpoint mapping the weights view */
    enum dsv4_numerics numerics;
    float inv_freq_main[64];     /* rope_dim/2: SWA layers (rope_theta, no YaRN) */
    float inv_freq_compress[64]; /* compressed layers (compress_rope_theta, YaRN) */
    char name[256];
};

/*
 * Open a model: a checkpoint directory (config.json + safetensors, official layout) or
 * "builtin:tiny-flash" / "builtin:tiny-pro". Every tensor is checked before use. Caller frees
 * with dsv4_model_free.
 */
int dsv4_model_open(struct dsv4_model **out, const char *spec);

/* Open a model over a checkpoint set already built (takes ownership of st, even on failure). */
int dsv4_model_open_set(struct dsv4_model **out, const struct dsv4_config *cfg, struct st_set *st,
                        const char *name);
void dsv4_model_free(struct dsv4_model *m);

/* ---- per-sequence state ---- */

/* The fixed-size state of one layer of one sequence. */
struct dsv4_layer_state {
    float *win;                 /* (n_win, c) ring of KV latents, slot = pos % n_win */
    float *comp_kv, *comp_sc;   /* compressor state (coff*ratio, coff*c) */
    float *icomp_kv, *icomp_sc; /* indexer compressor state (CSA) */
    long n_entries;             /* compressed entries produced so far (= pos / ratio) */
};

/*
 * A sequence: its fixed state (one slot's worth) and its block table into a kv pool. The pool is
 * borrowed (the engine's), or private and growable when the state was made with pool == NULL.
 */
struct dsv4_seq_state {
    long pos;     /* tokens processed so far = position of the next token */
    long mtp_pos; /* rows processed so far by the MTP block */
    int n_layers;
    struct dsv4_layer_state *layers; /* n_layers + n_mtp */
    struct dsv4_kv_pool *pool;
    int own_pool;
    int32_t *blocks; /* block table (n_blocks) */
    int n_blocks, cap_blocks;
};

int dsv4_seq_state_new(const struct dsv4_model *m, struct dsv4_kv_pool *pool,
                       struct dsv4_seq_state **out);
void dsv4_seq_state_free(struct dsv4_seq_state *s);
/* Bytes of one sequence's fixed state (window rings + compressor states, all layers). */
size_t dsv4_seq_state_bytes(const struct dsv4_model *m);
/* Forget everything (position 0): blocks go back to the pool, the fixed state is cleared. */
void dsv4_seq_state_reset(const struct dsv4_model *m, struct dsv4_seq_state *s);
/* Have blocks for `tokens` tokens; ERR_BUSY (nothing changed) when the pool is short. */
int dsv4_seq_reserve(struct dsv4_seq_state *s, long tokens);
/* Make dst a copy of src (n > 1 choices sharing a prompt): fixed state copied, full blocks
 * shared by reference, a partially filled last block copied. dst is reset first. */
int dsv4_seq_state_fork(const struct dsv4_model *m, struct dsv4_seq_state *dst,
                        const struct dsv4_seq_state *src);

/* ---- forward ---- */

struct dsv4_batch_seq {
    struct dsv4_seq_state *state; /* advanced by n */
    const int32_t *tokens;        /* (n) at positions state->pos .. state->pos + n - 1 */
    int n;
    int all_logits;               /* logits for every token (else only the last) */
};

/*
 * Run one step. logits receives, for each sequence in order, n rows (all_logits) or 1 row of
 * vocab_size floats (NULL: skip the head). hidden (optional, may be NULL) receives the same rows' final residual
 * streams (hc_mult, d) before hc_head, which the MTP block consumes.
 * On error no state has been advanced past a consistent point only if the error is detected
 * before the walk (bad token id, position past max_position_embeddings, out of memory).
 */
int dsv4_forward(struct dsv4_model *m, struct dsv4_batch_seq *seqs, int nseq, float *logits,
                 float *hidden);

/*
 * The MTP block (depth 1) of one sequence: for each of n rows, the main model's streams
 * hidden (n, hc_mult, d) of the tokens at positions state->mtp_pos.. and the tokens that follow
 * them, next (n), give logits (n, vocab) for the token after next. Uses and advances the MTP
 * layer's own window state (state->mtp_pos += n).
 */
int dsv4_mtp_forward(struct dsv4_model *m, struct dsv4_seq_state *state, const float *hidden,
                     const int32_t *next, int n, float *logits);

#endif
