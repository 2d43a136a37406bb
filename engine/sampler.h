/*
 * sampler.h - token sampling on the logits a backend returns, and logprobs.
 *
 * Processing order (vLLM's): logit_bias, repetition penalty (prompt + generated tokens),
 * presence/frequency penalties (generated tokens), then greedy argmax when temperature == 0,
 * else temperature, top-k, min-p, top-p and one draw from the request's own random stream.
 * A sequence draws exactly one uniform per sampled token from a stream seeded by (seed, choice),
 * so its output does not depend on the batch it runs in.
 *
 * Logprobs are those of the model's distribution (log-softmax of the raw logits), as vLLM
 * reports by default.
 *
 * THREAD SAFETY: reentrant; a struct sampler_rng belongs to one sequence.
 */
#ifndef DSV4_SAMPLER_H
#define DSV4_SAMPLER_H

#include <stdint.h>

#include "engine/engine.h"

struct sampler_rng {
    uint64_t s[4];
};

void sampler_rng_seed(struct sampler_rng *r, uint64_t seed, uint64_t stream);
/* uniform in [0, 1) with 53 random bits */
double sampler_uniform(struct sampler_rng *r);

/* Per-sequence token statistics for penalties (dense arrays over the vocabulary). */
struct sampler_counts {
    int32_t *generated; /* (V) occurrences among generated tokens */
    uint8_t *seen;      /* (V) 1 if in prompt or generated */
};

/*
 * Choose the next token. logits (V) is modified in place; work must hold 2*V floats + V ints'
 * worth of bytes (sampler_work_bytes). counts may have NULL arrays when no penalty is asked.
 */
int32_t sampler_sample(const struct engine_sampling *sp, float *logits, int V,
                       const struct sampler_counts *counts, struct sampler_rng *rng, void *work);
size_t sampler_work_bytes(int V);

/* logprob of `token` and the top-k alternatives (descending) under softmax(raw). */
void sampler_logprobs(const float *raw, int V, int32_t token, int k, float *token_lp,
                      struct engine_logprob *top);

#endif
