/*
 * weights.h - the DSV4 weights bound from a checkpoint by their official names.
 *
 * dsv4_weights_bind() looks up every tensor the schedule needs, checks its presence, dtype and
 * shape against the config (an error names the tensor, its file, and what was expected), and
 * fills views: quantised matrices (struct cpu_qmat) point into the checkpoint's mmap, used as
 * stored. Small vectors (norm weights, mHC parameters, sinks, ape, biases) are converted to
 * FP32 copies owned by the weights.
 *
 * THREAD SAFETY: immutable after bind.
 */
#ifndef DSV4_WEIGHTS_H
#define DSV4_WEIGHTS_H

#include <stdint.h>

#include "engine/config.h"
#include "engine/safetensors.h"
#include "engine/schedule.h"
#include "kernels/cpu/cpu.h"

struct dsv4_compressor_w {
    int ratio, D, overlap;       /* overlap (CSA): projections are 2D wide */
    struct cpu_qmat wkv, wgate;  /* (coff*D, d) */
    float *ape;                  /* (ratio, coff*D) */
    float *norm;                 /* (D) */
};

struct dsv4_hc_w {
    float *fn;    /* ((2+n)n, n*d) (or (n, n*d) for a head) */
    float *base;  /* ((2+n)n) */
    float *scale; /* (3) (or (1) for a head) */
};

struct dsv4_layer_w {
    const struct dsv4_layer_spec *spec;
    float *attn_norm, *ffn_norm;          /* (d) */
    struct dsv4_hc_w hc_attn, hc_ffn;
    /* attention */
    struct cpu_qmat wq_a;                 /* (q_lora, d) */
    float *q_norm;                        /* (q_lora) */
    struct cpu_qmat wq_b;                 /* (H*c, q_lora) */
    struct cpu_qmat wkv;                  /* (c, d) */
    float *kv_norm;                       /* (c) */
    struct cpu_qmat wo_a;                 /* (g*d_g, H*c/g) */
    struct cpu_qmat wo_b;                 /* (d, g*d_g) */
    float *attn_sink;                     /* (H) */
    struct dsv4_compressor_w comp;        /* ratio > 0 */
    /* lightning indexer (CSA) */
    struct dsv4_compressor_w icomp;       /* D = index_head_dim */
    struct cpu_qmat idx_wq_b;             /* (Hi*Di, q_lora) */
    struct cpu_qmat idx_wproj;            /* (Hi, d) */
    /* MoE */
    struct cpu_qmat gate;                 /* (E, d) */
    float *gate_bias;                     /* (E), dense router */
    const void *tid2eid;                  /* (V, K) I64 or I32, hash router */
    int tid2eid_i32;
    struct cpu_qmat *w1, *w2, *w3;        /* E each: (I, d), (d, I), (I, d) */
    struct cpu_qmat sh_w1, sh_w2, sh_w3;  /* shared expert */
    int has_shared;
    /* MTP block only */
    struct cpu_qmat e_proj, h_proj;       /* (d, d) */
    float *enorm, *hnorm, *norm;          /* (d) */
    struct dsv4_hc_w hc_head;
};

struct dsv4_weights {
    struct cpu_qmat embed;  /* (V, d) */
    struct cpu_qmat head;   /* (V, d) */
    float *norm;            /* (d) */
    struct dsv4_hc_w hc_head;
    int n_layers_total;     /* main + MTP */
    struct dsv4_layer_w *layers;
    /* owned FP32 copies */
    void **owned;
    int n_owned, cap_owned;
};

/* Bind all tensors of `st` (borrowed; must outlive w). Free with dsv4_weights_free. */
int dsv4_weights_bind(struct dsv4_weights *w, const struct st_set *st, const struct dsv4_config *c,
                      const struct dsv4_schedule *s);
void dsv4_weights_free(struct dsv4_weights *w);

/* Expert id of routing slot j for token `tok` in a hash layer. */
int64_t dsv4_tid2eid(const struct dsv4_layer_w *l, int tok, int K, int j);

#endif
