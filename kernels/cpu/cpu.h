/*
 * cpu.h - the CPU reference ops of the DSV4 forward pass (also the CPU backend).
 *
 * Every op here is the oracle for its CUDA twin. Conventions:
 *   - FP32 math throughout; shapes in comments use T (tokens), d (hidden), H (heads),
 *     D (head dim), E (experts), K (experts per token).
 *   - Ops are deterministic and row-independent: a row's result does not depend on how many
 *     other rows are in the call (batch invariance), so prefill, chunked prefill and decode
 *     produce bit-identical values.
 *   - Ops that are internally parallel (OpenMP) say so; the rest are called per row from
 *     parallel loops and never allocate.
 *
 * THREAD SAFETY: all functions are reentrant.
 */
#ifndef DSV4_KERNELS_CPU_H
#define DSV4_KERNELS_CPU_H

#include <stddef.h>
#include <stdint.h>

/* ---- numeric formats (numfmt.c) ---- */

float cpu_bf16_to_f32(uint16_t h);
uint16_t cpu_f32_to_bf16(float f);           /* round to nearest even */
float cpu_e4m3_to_f32(uint8_t b);            /* float8_e4m3fn */
uint8_t cpu_f32_to_e4m3(float x);            /* RNE, saturating to +-448 */
float cpu_e8m0_to_f32(uint8_t b);            /* 2^(b-127) */
float cpu_e2m1_to_f32(uint8_t code);         /* 4-bit code, sign bit 3 */
uint8_t cpu_f32_to_e2m1(float x);            /* RNE, saturating to +-6 */
const float *cpu_e4m3_lut(void);             /* 256 entries */
/* 2^ceil(log2(amax / qmax)), exact (the UE8M0 scale rule of the reference). */
float cpu_pow2_scale(float amax, float qmax);
/* In-place FP8 E4M3 round trip per `block` elements with a UE8M0 scale (amax floor 1e-4). */
void cpu_fp8_roundtrip(float *x, int n, int block);
/* In-place FP4 E2M1 round trip per `block` elements with a UE8M0 scale (amax floor 6*2^-126). */
void cpu_fp4_roundtrip(float *x, int n, int block);
/* In-place orthonormal Walsh-Hadamard transform (Sylvester order, scaled by n^-1/2); n = 2^k. */
void cpu_hadamard(float *x, int n);

/* ---- weight matrices and linear layers (linear.c) ---- */

enum cpu_wfmt {
    CPU_W_F32,
    CPU_W_BF16,
    CPU_W_FP8,   /* E4M3 [rows, cols] + block scales [ceil(rows/128), ceil(cols/128)] */
    CPU_W_MXFP4, /* packed E2M1 [rows, cols/2] (low nibble = even col) + E8M0 [rows, cols/32] */
    CPU_W_NVFP4, /* packed E2M1 [rows, cols/2] + E4M3 [rows, cols/16], times s2 */
};

/* A weight matrix [rows = out, cols = in] as stored; views, owned by the checkpoint. */
struct cpu_qmat {
    enum cpu_wfmt fmt;
    int rows, cols;
    const void *w;
    const void *scale; /* FP8: E8M0 bytes, or float when scale_f32; MXFP4: E8M0 bytes; NVFP4:
                        * E4M3 bytes (a set sign bit negates the block, as ModelOpt's) */
    int scale_f32;
    float s2; /* NVFP4: the per-matrix multiplier */
};

/* Dequantise row r into out (cols). */
void cpu_qmat_row(const struct cpu_qmat *m, int r, float *out);
/* Element (r, c), dequantised (slow; for tests). */
float cpu_qmat_at(const struct cpu_qmat *m, int r, int c);
/*
 * y (T, rows) = x (T, cols) . W^T, FP32 accumulation in a fixed order per output element.
 * OpenMP-parallel over output rows.
 */
void cpu_linear(const struct cpu_qmat *m, const float *x, int T, float *y);
/* In-place dynamic FP8 activation quantisation round trip per 128 columns (model numerics). */
void cpu_act_quant_fp8(float *x, int T, int cols);
/* Dot product of n floats (fixed summation order). */
float cpu_dot(const float *a, const float *b, int n);

/* ---- norms (norm.c) ---- */

/* out = w * x * rsqrt(mean(x^2) + eps); w may be NULL (weightless). out may alias x. */
void cpu_rmsnorm(const float *x, const float *w, int n, float eps, float *out);

/* ---- RoPE (rope.c) ---- */

/* inv_freq (rope_dim/2) for base, with YaRN correction when yarn != 0. */
void cpu_rope_inv_freq(int rope_dim, double base, int yarn, double factor, int orig_max,
                       double beta_fast, double beta_slow, float *inv_freq);
/* Rotate interleaved pairs (x[2i], x[2i+1]) of x (rope_dim) by pos*inv_freq[i] (conjugate
 * when inverse). */
void cpu_rope(float *x, int rope_dim, const float *inv_freq, long pos, int inverse);

/* ---- mHC (mhc.c) ---- */

/*
 * hc_pre for one token: X (n_hc, d) streams; fn ((2+n_hc)*n_hc, n_hc*d); base ((2+n_hc)*n_hc);
 * scale (3). Outputs u (d) = sum_i pre_i X_i, post (n_hc), comb (n_hc, n_hc) [src j][dst k],
 * Sinkhorn-normalised over `iters` iterations.
 */
void cpu_hc_pre(const float *X, int n_hc, int d, const float *fn, const float *base,
                const float *scale, int iters, float hc_eps, float norm_eps, float *u, float *post,
                float *comb);
/* Xout (n_hc, d): Xout_k = post_k * f + sum_j comb[j][k] * R_j. Xout must not alias R. */
void cpu_hc_post(const float *f, const float *R, const float *post, const float *comb, int n_hc,
                 int d, float *Xout);
/* hc_head: y (d) = sum_i (sigmoid(mu_i*scale + base_i) + eps) X_i; fn (n_hc, n_hc*d). */
void cpu_hc_head(const float *X, int n_hc, int d, const float *fn, const float *base,
                 const float *scale, float hc_eps, float norm_eps, float *y);

/* ---- attention (attention.c) ---- */

/*
 * One query token, H heads of dim D over nk shared keys (K = V, MQA):
 * out_h = sum_j e^{l_j - m} K_j / (sum_j e^{l_j - m} + e^{sink_h - m}), l_j = scale * q_h.K_j.
 * q (H, D); keys: nk pointers to (D); sinks (H); out (H, D); work: >= nk floats.
 */
void cpu_sink_attention(const float *q, int H, int D, const float *const *keys, int nk,
                        const float *sinks, float scale, float *out, float *work);

/* ---- compressor (compressor.c) ---- */

/*
 * Feed one token into a compressor state and pool a block when it completes.
 * State (rows = coff*ratio, cols = coff*D), coff = 2 when overlap (CSA), else 1:
 *   HCA: row t%ratio holds (a_t, z_t); the block pools rows 0..ratio-1.
 *   CSA: rows 0..ratio-1 = previous block, rows ratio..2ratio-1 = current; candidates are the
 *        previous rows' first D columns and the current rows' last D columns; after pooling the
 *        current rows become the previous ones.
 * a, z (coff*D): the token's kv and gate projections, z with ape[pos % ratio] already added.
 * Returns 1 and writes pooled (D) = sum softmax_rows(score) * kv when (pos+1) % ratio == 0.
 */
int cpu_compressor_push(float *kv_state, float *score_state, int ratio, int D, int overlap,
                        long pos, const float *a, const float *z, float *pooled);
/* Reset a state (kv 0, score -inf) for a new sequence. */
void cpu_compressor_reset(float *kv_state, float *score_state, int ratio, int D, int overlap);

/* ---- lightning indexer (indexer.c) ---- */

/*
 * scores[s] = sum_h w[h] * relu(q_h . K_s) * scale for s < n.
 * q (Hi, Di); w (Hi); keys (n, Di) contiguous.
 */
void cpu_indexer_scores(const float *q, const float *w, int Hi, int Di, const float *keys, int n,
                        float scale, float *scores);
/*
 * Indices of the k largest of scores[0..n) (k <= n), returned in ascending index order; equal
 * scores prefer the lower index. O(n log k).
 */
void cpu_topk(const float *scores, int n, int k, int *out);

/* ---- MoE routing and SwiGLU (moe.c) ---- */

/* s = sqrt(softplus(x)) (softplus with torch's threshold 20). */
float cpu_sqrt_softplus(float x);
/*
 * Route one token. logits (E) of the gate (FP32). Hash layers pass hash_ids (K expert ids from
 * tid2eid) and bias NULL; dense layers pass bias (E) and hash_ids NULL: top-K of s + bias.
 * Weights w_j = s[idx_j] / sum_k s[idx_k] * route_scale (unbiased s). idx, w: (K).
 */
void cpu_route(const float *logits, int E, int K, const float *bias, const int64_t *hash_ids,
               float route_scale, int *idx, float *w);
/* h (n) = w * silu(min(g, limit)) * clamp(u, -limit, limit). h may alias g. */
void cpu_swiglu_clamp(const float *g, const float *u, int n, float limit, float w, float *h);

#endif
