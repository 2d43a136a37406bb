/*
 * nvfp4.h - NVFP4 expert weights on the host: the canonical format, its three sources
 * (exact conversion of the official MXFP4 experts, ModelOpt and compressed-tensors NVFP4
 * checkpoints, BF16/FP32 quantised with the ModelOpt rule) and the CPU reference of the NVFP4
 * MoE expert computation (the oracle of kernels/cuda/moe_nvfp4.cu).
 *
 * Canonical NVFP4 matrix W (rows = out, cols = in), cols % 16 == 0:
 *   q  (rows, cols/2) uint8: two E2M1 codes per byte, element 2i in the low nibble;
 *   s  (rows, cols/16) uint8: one E4M3 (sign 0, "UE4M3") block scale per 16 consecutive cols;
 *   s2 float: per-matrix decode multiplier (ModelOpt `weight_scale_2` convention).
 *   W[r][c] = e2m1(q[r][c]) * e4m3(s[r][c/16]) * s2   (exact in FP32 and FP64).
 * Global-scale conventions (spec nvfp4-moe-on-hopper §1.3): ModelOpt stores s2 as a
 * multiplier; compressed-tensors stores its reciprocal (a divisor), converted here once.
 * Gate and up keep separate s2 (no shared fused scale; spec §5.4).
 *
 * THREAD SAFETY: all functions are reentrant; nvfp4_moe_ref is OpenMP-parallel.
 */
#ifndef DSV4_KERNELS_NVFP4_H
#define DSV4_KERNELS_NVFP4_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cpu/cpu.h"

/* An NVFP4 matrix in canonical layout. Owns q and s (nvfp4_mat_free). */
struct nvfp4_mat {
    int rows, cols;
    uint8_t *q; /* (rows, cols/2) */
    uint8_t *s; /* (rows, cols/16) E4M3 */
    float s2;
};

/* Allocate q and s for rows x cols (cols % 16 == 0), s2 = 1. 0 or ERR_NOMEM / ERR_INVAL. */
int nvfp4_mat_init(struct nvfp4_mat *m, int rows, int cols);
/* Free q and s; NULL-safe and idempotent. */
void nvfp4_mat_free(struct nvfp4_mat *m);
/* Dequantise row r into out (cols), FP32 (exact). */
void nvfp4_mat_row(const struct nvfp4_mat *m, int r, float *out);
/* Element (r, c), exact. */
float nvfp4_mat_at(const struct nvfp4_mat *m, int r, int c);

/* Load report of the MXFP4 -> NVFP4 conversion, accumulated over matrices. */
struct nvfp4_report {
    long n_mats;      /* matrices converted */
    long n_exact;     /* converted without error */
    long n_inexact;   /* exponent span did not fit E4M3: least-error conversion */
    double worst_rel; /* worst ||W_nvfp4 - W_mxfp4|| / ||W_mxfp4|| over inexact matrices */
    int worst_span;   /* exponent span (binades) of that matrix */
};

/*
 * (1) Official MXFP4 expert -> NVFP4. q (rows, cols/2) packed E2M1 as NVFP4; e8m0 (rows,
 * cols/32). Exact whenever the spread of E8M0 exponents over the matrix's non-zero blocks
 * spans <= 17 binades (each 2^e per 32 becomes two E4M3 scales 2^(e-g) per 16 under
 * s2 = 2^g); otherwise the window g of least total squared error is chosen, the blocks outside
 * it are requantised (RNE) and the matrix is counted in rep (which may be NULL).
 * out must be initialised with nvfp4_mat_init(out, rows, cols). Returns 0 or ERR_FORMAT
 * (NaN scale 0xFF) / ERR_INVAL (shape).
 */
int nvfp4_from_mxfp4(const uint8_t *q, const uint8_t *e8m0, struct nvfp4_mat *out,
                     struct nvfp4_report *rep);

/*
 * (2) ModelOpt NVFP4 tensors: weight (rows, cols/2) U8, weight_scale (rows, cols/16) F8_E4M3,
 * weight_scale_2 (a multiplier). Copies into out (initialised to rows x cols). A block scale
 * with the sign bit set is folded into the signs of its 16 elements (exact); NaN scales
 * (0x7F/0xFF) give ERR_FORMAT. For a fused w13 tensor pass each half with its own
 * weight_scale_2 (gate = column 0, up = column 1).
 */
int nvfp4_from_modelopt(const uint8_t *weight, const uint8_t *weight_scale, float weight_scale_2,
                        struct nvfp4_mat *out);
/*
 * compressed-tensors NVFP4: weight_packed, weight_scale as above; weight_global_scale is a
 * DIVISOR (dequant = q * scale / global), so s2 = 1 / weight_global_scale (rounded once to
 * FP32). ERR_FORMAT when the global scale is not finite and > 0.
 */
int nvfp4_from_ctensors(const uint8_t *weight_packed, const uint8_t *weight_scale,
                        float weight_global_scale, struct nvfp4_mat *out);

/*
 * (3) Quantise a dense matrix with the ModelOpt rule (NVFP4QTensor): s2 = amax / (6*448);
 * block scale e4m3(amax_b / (6*s2)), clamped to [2^-9, 448] (0 -> 1); codes
 * rne_e2m1(x / (scale * s2)). x is FP32 (bf16 == NULL) or BF16 (x == NULL), (rows, cols).
 * An all-zero matrix gets s2 = 1 and zero codes.
 */
int nvfp4_quantize(const float *x, const uint16_t *bf16, struct nvfp4_mat *out);

/* ---- CPU reference of the routed + shared expert computation ---- */

/* Host weights of one MoE layer for the reference. Borrowed views. */
struct nvfp4_moe_host {
    int d, I, E;
    const struct nvfp4_mat *w1, *w3, *w2;         /* E each: (I, d) gate, (I, d) up, (d, I) down */
    const struct cpu_qmat *sh_w1, *sh_w3, *sh_w2; /* FP8 shared expert, or all NULL */
};

/*
 * out (nr, d), FP64: for each listed row t = rows[i] (0 <= t < T):
 *   out = sum_{j<K, idx[t][j] in [0,E)} W2_e . (w_tj * silu(min(W1_e x, L)) * clamp(W3_e x, -L, L))
 *         + shared(x)      (shared: same SwiGLU with weight 1, FP8 weights, when present)
 * with the weights dequantised exactly and FP64 accumulation. emulate_bf16 rounds x and the
 * SwiGLU output h to BF16 first, as the GPU kernel's activations are (a tighter check of the
 * kernel's arithmetic; 0 gives the pure reference). x (T, d); idx, wts (T, K).
 * Returns 0 or ERR_NOMEM.
 */
int nvfp4_moe_ref(const struct nvfp4_moe_host *m, const float *x, const int *rows, int nr,
                  const int *idx, const float *wts, int K, float limit, int emulate_bf16,
                  double *out);

#endif
