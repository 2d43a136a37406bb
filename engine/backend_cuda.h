/*
 * backend_cuda.h - the GPU backend (struct backend of engine/backend.h on one CUDA device).
 *
 * Built only with CUDA (meson's nvcc_found: engine_cuda_src); a build without nvcc has neither
 * this backend nor this header's function.
 *
 * THREAD SAFETY: as engine/backend.h: one engine thread.
 */
#ifndef DSV4_BACKEND_CUDA_H
#define DSV4_BACKEND_CUDA_H

#include "engine/backend.h"

struct dsv4_model;

/* What the server sets (backend_cuda_opts_defaults fills the defaults). */
struct backend_cuda_opts {
    int n_slots;         /* sequence slots */
    int n_blocks;        /* cache blocks wanted (0: as many as fit); capped by what fits */
    int exact_blocks;    /* 1: exactly n_blocks or fail (tests) */
    int max_step_tokens; /* rows of the largest step: the scratch is allocated for it up front */
    int max_model_len;   /* longest sequence (sizes the indexer's workspace up front) */
    double mem_util;     /* fraction of the device's memory this process may hold, (0, 1] */
    int exact;           /* 1: the CPU engine's arithmetic op for op (slow; tests); default 0,
                          * or 1 when the environment has DSV4_CUDA_EXACT=1 */
    int progress;        /* load progress and the memory plan on stderr */
};
void backend_cuda_opts_defaults(struct backend_cuda_opts *o);
/*
 * The CUDA backend over a model (borrowed; must outlive the backend) on the current device: one
 * device allocation for the weights (FP8 linears packed for the tensor cores, MXFP4 experts
 * converted to NVFP4 with a load report), one for the cache pool (o->n_slots fixed states +
 * blocks addressed by the block tables of engine/kvcache.h). Numerics follow m->numerics.
 * The memory plan: weights, per-sequence state, the scratch of the largest step and the logits
 * rows are sized first; the cache pool takes what remains of
 * mem_util x total device memory (minus what other processes hold), capped at o->n_blocks.
 * A model that does not fit (or leaves no block per slot) is refused before any upload, with
 * every number in the message (ERR_NOMEM).
 */
int backend_cuda_new_opts(struct backend **out, struct dsv4_model *m,
                          const struct backend_cuda_opts *o);

#endif
