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

/*
 * The CUDA backend over a model (borrowed; must outlive the backend) with n_slots sequence
 * slots and n_blocks compressed-KV blocks, on the current device. Uploads the weights (one
 * device allocation) and allocates the cache pool (one device allocation: slot states + blocks,
 * addressed by the same block tables as engine/kvcache.h). Numerics follow m->numerics.
 * ERR_CUDA when there is no device or an allocation fails (the message says which and how much).
 */
int backend_cuda_new(struct backend **out, struct dsv4_model *m, int n_slots, int n_blocks);

#endif
