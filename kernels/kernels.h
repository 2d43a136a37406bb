/*
 * kernels.h - the one C header of the CUDA kernels (kernels/cuda/, one op family per .cu file),
 * plus the host-side packing of weights into the layouts those kernels read
 * (kernels/cpu/nvfp4_pack.c, plain C, built with or without nvcc).
 *
 * Conventions:
 *   - Every device entry point takes a stream and returns 0 or a negative enum err
 *     (ERR_CUDA, ERR_INVAL, ERR_UNSUPPORTED; engine/err.h). No entry point allocates or
 *     synchronises: the caller passes a device workspace sized by the matching *_bytes query.
 *     So each call is capturable in a CUDA graph.
 *   - Pointers marked (device) are device memory; shapes in parentheses, row-major.
 *   - Dimension names: T tokens, d hidden size, I expert intermediate size, E routed experts,
 *     K experts per token (top-k).
 *
 * THREAD SAFETY: entry points are reentrant; calls on one stream are ordered by the stream.
 * The device functions exist only in builds with CUDA (meson's nvcc_found); the pack functions
 * always.
 */
#ifndef DSV4_KERNELS_H
#define DSV4_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st; /* cudaStream_t without the CUDA headers */
struct CUevent_st;  /* cudaEvent_t */
struct kern_blas;   /* a cuBLAS handle bound to a stream and a workspace (linear_fast.cu) */

/* ---- weight layouts read by the MoE kernels (packed once at load, on the host) ----
 *
 * NVFP4 matrix (rows, cols), rows % 16 == 0, cols % 256 == 0, packed as row blocks of 16 rows
 * and k-blocks of 64 cols, in the order the kernel's mma.sync.m16n8k16 A fragments want:
 *   data   [rows/16][cols/64][32 lanes][16 B]: lane = 4*g + c holds the 16 elements
 *          cols 16c..16c+15 (one NVFP4 group) of rows g and g+8 of the block, as 4 words;
 *          word s holds the 8 codes of mma k-step s, the bits of each code scattered so
 *          that the kernel decodes a BF16 pair in one to three operations: pair r (0: row g
 *          elements 4s, 4s+1; 1: row g+8, same; 2: row g, 4s+2, 4s+3; 3: row g+8, same) puts
 *          the bits m, e0, e1, sign of its first / second code at word bits
 *          r0: 6 7 8 15 / 22 23 24 31;  r1: 9 10 11 18 / 25 26 27 2;
 *          r2: 12 13 14 21 / 28 29 30 5; r3: 4 0 1 3 / 20 16 17 19.
 *   scales [rows/16][cols/256][32 lanes][8 B]: byte 2*b + h = the block scale of group c of
 *          k-block b (of the 4 in this 256-col chunk) for row g (h = 0) or g+8 (h = 1), in a
 *          kernel encoding "UE5M3" = ((exp + 10) << 3) | mant3 of the exact E4M3 value
 *          2^exp * (1 + mant3/8), exp in [-9, 8] (E4M3 subnormals become normal).
 *          Zero-scale groups are stored with zero codes.
 *   The per-matrix factor the kernel applies to its FP32 sums is alpha = s2 * 2^8
 *   (kern_nvfp4_alpha).
 * Gate/up: the w13 matrix of an expert is (2I, d) with 16-row block b holding gate rows
 * 8b..8b+7 (rows 0..7 of the block) then up rows 8b..8b+7, so one thread's accumulators hold
 * gate and up of the same channel: the clamped SwiGLU needs no data exchange.
 *
 * FP8 matrix (shared expert, E4M3 with 128x128 block scales as stored in the checkpoint),
 * rows % 16 == 0, cols % 256 == 0:
 *   data    [rows/16][cols/64][2 halves][32 lanes][16 B]: half p holds k-steps 2p, 2p+1;
 *           per step two words: w0 = bytes (g:4s, g:4s+1, g+8:4s, g+8:4s+1),
 *           w1 = (g:4s+2, g:4s+3, g+8:4s+2, g+8:4s+3), element index relative to 16c.
 *   factors [rows/16][cols/128][2] BF16: for each 16-row block and 128-col block, the factor
 *           of its rows g (0..7) and of its rows g+8, = 2^(e_blk - e_max + 120) (exact
 *           powers of two; 0 for a zero scale), e_blk the block's UE8M0 byte (or the exponent
 *           of an FP32 scale, which must be a power of two), e_max the matrix's largest;
 *           alpha = 2^(e_max - 127). (Two halves, so gate/up interleaving works as above.)
 */

size_t kern_nvfp4_data_bytes(int rows, int cols);
size_t kern_nvfp4_scale_bytes(int rows, int cols);
/* alpha of a matrix with decode multiplier s2 (FP32): s2 * 2^8. */
float kern_nvfp4_alpha(float s2);
/*
 * Pack a canonical NVFP4 matrix (q (rows, cols/2), s (rows, cols/16) E4M3; see
 * kernels/cpu/nvfp4.h) into data/scales (host buffers of the sizes above). Returns 0, or
 * ERR_UNSUPPORTED (shape) / ERR_FORMAT (NaN or negative scale).
 */
int kern_nvfp4_pack(const uint8_t *q, const uint8_t *s, int rows, int cols, uint8_t *data,
                    uint8_t *scales);
/* Pack gate (I, d) and up (I, d) as the interleaved w13 (2I, d) described above. */
int kern_nvfp4_pack_gateup(const uint8_t *gq, const uint8_t *gs, const uint8_t *uq,
                           const uint8_t *us, int I, int d, uint8_t *data, uint8_t *scales);
/* Unpack element (r, c) of a packed matrix back to (code, E4M3 scale byte) (tests). */
void kern_nvfp4_unpack_at(const uint8_t *data, const uint8_t *scales, int rows, int cols, int r,
                          int c, uint8_t *code, uint8_t *scale_e4m3);

size_t kern_fp8_data_bytes(int rows, int cols);
size_t kern_fp8_factor_count(int rows, int cols); /* BF16 entries: rows/16 * cols/128 * 2 */
/*
 * Pack an FP8 block-scaled matrix: w (rows, cols) E4M3; scales (ceil(rows/128),
 * ceil(cols/128)) as UE8M0 bytes (scale_f32 == 0) or FP32 powers of two (scale_f32 != 0).
 * Writes data, factors (BF16 bits) and *alpha. ERR_FORMAT on NaN weights or scales,
 * ERR_UNSUPPORTED on shape or a scale span over 100 binades.
 */
int kern_fp8_pack(const uint8_t *w, const void *scales, int scale_f32, int rows, int cols,
                  uint8_t *data, uint16_t *factors, float *alpha);
/* gate/up interleaved like kern_nvfp4_pack_gateup; alpha[0] gate, alpha[1] up. */
int kern_fp8_pack_gateup(const uint8_t *gw, const void *gs, const uint8_t *uw, const void *us,
                         int scale_f32, int I, int d, uint8_t *data, uint16_t *factors,
                         float alpha[2]);

/* ---- one MoE layer (kernels/cuda/moe_route.cu, moe_nvfp4.cu) ---- */

/* Device pointers of one layer's MoE weights; borrowed, valid while calls run. */
struct kern_moe_layer {
    int d, I, E, K;
    float route_scale, swiglu_limit;
    /* router */
    const uint16_t *gate_w; /* (E, d) BF16 (device) */
    const float *gate_bias; /* (E) (device): dense top-K on score + bias; NULL in hash layers */
    const int32_t *tid2eid; /* (vocab, K) (device): hash layers; NULL in dense layers */
    int vocab;
    /* routed experts, packed NVFP4, expert e at e * (per-expert bytes) */
    const uint8_t *w13, *w13_s; /* (E, data/scale bytes of (2I, d)) (device) */
    const uint8_t *w2, *w2_s;   /* (E, data/scale bytes of (d, I)) (device) */
    const float *alpha13;       /* (E, 2) gate, up (device) */
    const float *alpha2;        /* (E) (device) */
    /* shared expert, packed FP8; sh13 == NULL when the layer has none */
    const uint8_t *sh13, *sh2;      /* (device) */
    const uint16_t *sh13_f, *sh2_f; /* BF16 factors (device) */
    float sh_alpha13[2], sh_alpha2;
};

/*
 * One-time setup of the MoE kernels on the current device (shared-memory limits). Call once
 * before capturing kern_moe_* into a CUDA graph; the entry points also call it lazily.
 */
int kern_moe_prepare(void);

/* Device workspace bytes of kern_moe_forward / kern_moe_experts for up to T_max tokens. */
size_t kern_moe_workspace_bytes(const struct kern_moe_layer *L, int T_max);

/*
 * Router: logits = x . gate_w^T in FP32, s = sqrt(softplus(logits)); hash layers take the K
 * ids from tid2eid[tokens[t]] (token id < 0 or >= vocab: a padding row, ids -1), dense layers
 * the top-K of s + bias (ties to the lower id; tokens may be NULL, else id < 0 is padding); w =
 * s[id] / sum s[ids] * route_scale, applied exactly once. x (T, d) FP32 (device); tokens (T)
 * (device; hash layers only, else NULL); idx (T, K) int32, w (T, K) FP32 (device, written). ws: the
 * workspace.
 */
int kern_moe_route(const struct kern_moe_layer *L, const float *x, const int32_t *tokens, int T,
                   int32_t *idx, float *w, void *ws, size_t ws_bytes, struct CUstream_st *stream);
/*
 * Experts: out (T, d) FP32 (device) = sum_j expert_{idx[t][j]}(x_t, w[t][j]) (j in slot order;
 * ids outside [0, E) contribute nothing) + shared(x_t). Activations run in BF16 (x and the
 * SwiGLU output are rounded to BF16), weights exactly, sums in FP32; no atomics anywhere, so
 * the output is bit-reproducible. Token grouping happens on the device (no host sync).
 */
int kern_moe_experts(const struct kern_moe_layer *L, const float *x, const int32_t *idx,
                     const float *w, int T, float *out, void *ws, size_t ws_bytes,
                     struct CUstream_st *stream);
/* Route + experts. tokens as for kern_moe_route. */
int kern_moe_forward(const struct kern_moe_layer *L, const float *x, const int32_t *tokens, int T,
                     float *out, void *ws, size_t ws_bytes, struct CUstream_st *stream);
/*
 * The MoE output before its last sum: out (T, d) = the sum over slots j, in slot order, of
 * yslot[t*K + j] (a slot whose id idx[t][j] is outside [0, E) adds nothing), + ysh[t] (NULL:
 * + 0). Device pointers into a kern_moe_forward workspace, valid until its next use.
 */
struct kern_moe_sum {
    const float *yslot; /* (T*K, d) */
    const float *ysh;   /* (T, d) or NULL */
    const int32_t *idx; /* (T, K) */
    int K, E;
};
/* kern_moe_forward but for the sum: *sum says where its parts are (kern_moe_sum_rows adds them,
 * kern_hc_post_moe takes them directly). */
int kern_moe_forward_parts(const struct kern_moe_layer *L, const float *x, const int32_t *tokens,
                           int T, struct kern_moe_sum *sum, void *ws, size_t ws_bytes,
                           struct CUstream_st *stream);
/* out (T, d) = the sum m describes (d % 4 == 0). */
int kern_moe_sum_rows(const struct kern_moe_sum *m, int T, int d, float *out,
                      struct CUstream_st *stream);

/* ---- dense FP8 linears through the same GEMM (the GPU engine's fast path) ---- */

/* A matrix packed by kern_fp8_pack (device pointers; rows r0.. of a packed matrix, r0 % 16 == 0,
 * are themselves one: data + kern_fp8_data_bytes(r0, cols), fac + kern_fp8_factor_count(r0,
 * cols)). rows % 128 == 0, cols % 256 == 0. */
struct kern_fp8_mat {
    int rows, cols;
    const uint8_t *data;
    const uint16_t *fac;
    float alpha;
};
/* 1 when kern_gemm_fp8 runs its wgmma path for these shapes: then xb must hold each row in the
 * permuted order of kern_act_bf16(perm = 1). */
int kern_gemm_fp8_perm(int rows, int groups, int T);
/*
 * For each group g < groups (one launch): y[g*y_goff + t*ldy + r] = sum_c W_g[r][c]
 * xb[g*x_goff + t*ldx + c] (FP32 sums, exact products), t < T, r < W->rows, where W_g is rows
 * [g*rows, (g+1)*rows) of the packed matrix W points into (W->rows = rows per group). xb BF16
 * (device), ldx and x_goff multiples of 8. ERR_UNSUPPORTED on shapes outside the limits above.
 */
int kern_gemm_fp8(const struct kern_fp8_mat *W, int groups, const uint16_t *xb, int ldx,
                  size_t x_goff, int T, float *y, int ldy, size_t y_goff,
                  struct CUstream_st *stream);

/* y0 = W0 xb and y1 = W1 xb in one launch (two linears of one input, T <= 8 rows, the same
 * cols; row strides ldy0, ldy1); ERR_UNSUPPORTED outside those limits. */
int kern_gemm_fp8_pair(const struct kern_fp8_mat *W0, float *y0, int ldy0,
                       const struct kern_fp8_mat *W1, float *y1, int ldy1, const uint16_t *xb,
                       int ldx, int T, struct CUstream_st *stream);

/* ---- thin runtime helpers, so C code needs no CUDA headers (kernels/cuda/runtime.cu) ---- */

int kern_device_count(void);                        /* 0 when no device or no driver */
int kern_device_name(char *buf, size_t n);          /* of the current device */
int kern_malloc(void **p, size_t n);                /* ERR_CUDA on failure */
void kern_free(void *p);                            /* NULL-safe */
int kern_h2d(void *dst, const void *src, size_t n); /* synchronous */
int kern_d2h(void *dst, const void *src, size_t n); /* synchronous */
int kern_memset(void *dst, int byte, size_t n);     /* synchronous */
int kern_sync(void);                                /* device sync + last error */
const char *kern_last_error(void);                  /* the last CUDA error string */
/* DSV4_CUDA_TRACE set: time per kernel of the launches since the last report, on stderr
 * (diagnosis: every launch between two events, no PDL; run without CUDA graphs); label NULL
 * drops them. */
void kern_trace_report(const char *label);
/* Opens (on != 0) or closes the range a profiler started with --profile-from-start off records
 * (cudaProfilerStart/Stop); no effect without a profiler. */
void kern_profile_range(int on);

/* ==== the DSV4 forward pass on the GPU (issue 8; engine/backend_cuda.c) ====
 *
 * Kernels of every op of the walk in engine/model.c, each the twin of a kernels/cpu op
 * (dense.cu, linear.cu, attention.cu, compressor.cu, indexer.cu, moe_ref.cu; runtime helpers in
 * engine_rt.cu). This first version reproduces the CPU oracle's arithmetic operation for
 * operation (summation orders, no FMA contraction, transcendental functions rounded like glibc;
 * kernels/cuda/exact.cuh): correct and deterministic, not yet fast. Every row's result is
 * independent of the other rows of the call (batch invariance).
 * Conventions of this section: all pointers are device memory unless marked (host); launches
 * are asynchronous on `stream`; entry points return 0 or ERR_CUDA / ERR_INVAL / ERR_UNSUPPORTED.
 */

/* A weight matrix (rows = out, cols = in) as stored in the checkpoint (see struct cpu_qmat);
 * fmt takes the enum cpu_wfmt values. */
enum { KERN_W_F32 = 0, KERN_W_BF16 = 1, KERN_W_FP8 = 2, KERN_W_MXFP4 = 3 };
struct kern_qmat {
    int fmt, rows, cols;
    int scale_f32;     /* FP8: scales are FP32 (else UE8M0 bytes) */
    const void *w;     /* (device) */
    const void *scale; /* (device) FP8: (ceil(rows/128), ceil(cols/128)); MXFP4: (rows, cols/32) */
};

/*
 * One step's batch: T rows = the chunks of nseq sequences, concatenated. Device arrays, plus
 * host-side maxima that size the launches.
 */
struct kern_batch {
    int T, nseq;
    const int32_t *tokens;   /* (T) */
    const int32_t *row_seq;  /* (T) the sequence of each row */
    const int32_t *row_pos;  /* (T) the position of each row */
    const int32_t *seq_row0; /* (nseq) first row of each sequence */
    const int32_t *seq_n;    /* (nseq) rows of each sequence */
    const int32_t *seq_slot; /* (nseq) state slot of each sequence */
    const int32_t *seq_bt;   /* (nseq) offset of each sequence's block table in bt */
    const int32_t *bt;       /* block ids, DSV4_BLOCK_TOKENS tokens each */
    int max_pos;             /* (host) 1 + the largest position in the batch */
    int max_n;               /* (host) the longest chunk (0: up to T) */
};

/* The cache pool: per-slot fixed state and compressed-entry blocks (byte addressed). */
struct kern_cache {
    char *state; /* (n_slots + 1, slot_bytes) */
    size_t slot_bytes;
    char *blocks; /* (n_blocks + 1, block_bytes) */
    size_t block_bytes;
};

/*
 * Where one layer's parts live, in bytes from the start of a slot / a block, and the format of
 * its KV entries (the window ring and the compressed entries) and indexer keys:
 *   FP32 (fp8 == 0): hd (Di) floats;
 *   FP8 (fp8 == 1; the fast path in model numerics, whose values are already FP8/FP4-rounded
 *   with power-of-two block scales, so the encoding is exact except for the RoPE dims):
 *   KV entry = [hd - rope E4M3 codes][one UE8M0 scale per 64 of them, padded to 8 bytes]
 *   [rope dims BF16] (512 dims, rope 64: 448 + 8 + 128 = 584 bytes); indexer key =
 *   [Di E4M3 codes][one UE8M0 scale per 32] (128 dims: 132 bytes).
 */
struct kern_layer_cache {
    size_t win;                /* window ring (W entries), entry = pos % W */
    size_t comp_kv, comp_sc;   /* compressor state (coff*ratio, coff*hd) floats x 2 */
    size_t icomp_kv, icomp_sc; /* indexer compressor state (CSA) (coff*ratio, coff*Di) floats x 2 */
    size_t blk, blk_i;         /* entries (128/ratio) and indexer keys (128/ratio) */
    size_t ent, ient;          /* bytes of one KV entry and of one indexer key */
    int ratio;                 /* 0 (SWA), 4 (CSA), 128 (HCA) */
    int fp8;                   /* entry and key format (above) */
    int rope;                  /* RoPE dims at the end of a KV entry */
};
/* Bytes of one KV entry / indexer key in the FP8 formats above. */
static inline size_t kern_kv_fp8_bytes(int hd, int rope)
{
    return (size_t)(hd - rope) + (size_t)(((hd - rope) / 64 + 7) & ~7) + 2 * (size_t)rope;
}
static inline size_t kern_ikey_fp8_bytes(int Di)
{
    return (size_t)Di + (size_t)(Di / 32);
}

/* -- dense.cu -- */
/* X (T, n_hc, d) = embedding rows of tokens, repeated into the n_hc streams (token id < 0: a
 * padding row, zeros; the routers give padding rows no expert). E: (host) struct. */
int kern_embed(const struct kern_qmat *E, const int32_t *tokens, int T, int n_hc, float *X,
               struct CUstream_st *stream);
/* hc_pre + RMSNorm(norm_w) per row: X (T, n_hc, d) -> x (T, d), post (T, n_hc),
 * comb (T, n_hc, n_hc); fn ((2+n)n, n*d), base ((2+n)n), scale (3). */
int kern_hc_pre(const float *X, int T, int n_hc, int d, const float *fn, const float *base,
                const float *scale, int iters, float hc_eps, float norm_eps, const float *norm_w,
                float *x, float *post, float *comb, struct CUstream_st *stream);
/* Xout (T, n_hc, d) = hc_post(f (T, d), R (T, n_hc, d), post, comb); Xout must not alias R. */
int kern_hc_post(const float *f, const float *R, const float *post, const float *comb, int T,
                 int n_hc, int d, float *Xout, struct CUstream_st *stream);
/* kern_hc_post with f = the MoE output m describes, summed inside the same kernel (the same
 * bits as kern_moe_sum_rows then kern_hc_post); n_hc == 4 and d % 4 == 0, else ERR_UNSUPPORTED. */
int kern_hc_post_moe(const struct kern_moe_sum *m, const float *R, const float *post,
                     const float *comb, int T, int n_hc, int d, float *Xout,
                     struct CUstream_st *stream);
/* kern_hc_post (f; or, f NULL, the MoE output m describes) for 4 streams whose post and comb
 * gates are given as their inputs zpost (T, 4), zcomb (T, 16) from kern_hc_pre_fast_raw: the
 * kernel makes the gates (the finish's Sinkhorn, iters rounds) before its dependency wait. */
int kern_hc_post_raw(const float *f, const struct kern_moe_sum *m, const float *R,
                     const float *zpost, const float *zcomb, int iters, float hc_eps, int T, int d,
                     float *Xout, struct CUstream_st *stream);
/* y (nsel, d) = RMSNorm(norm_w)(hc_head(X row rows[i])); fn (n, n*d), base (n), scale (1). */
int kern_hc_head(const float *X, const int32_t *rows, int nsel, int n_hc, int d, const float *fn,
                 const float *base, const float *scale, float hc_eps, float norm_eps,
                 const float *norm_w, float *y, struct CUstream_st *stream);
/* out (T, n) = RMSNorm(w)(x (T, n)); w may be NULL; out may alias x. fast = 0: the CPU's
 * arithmetic (sequential sum of squares); 1: the sum over a fixed block tree (the fast path:
 * FP32 rounding apart, batch-invariant). xb: NULL, or (T, n) BF16 also written as
 * kern_act_quant_bf16 (perm 0) would make it from out (n % 128 == 0). */
int kern_rmsnorm(const float *x, const float *w, int T, int n, float eps, int fast, float *out,
                 uint16_t *xb, struct CUstream_st *stream);
/* out (T, cols) = FP8 round trip of x per 128 columns (cpu_act_quant_fp8); out may alias x. */
int kern_act_quant_fp8(const float *x, int T, int cols, float *out, struct CUstream_st *stream);
/* xb (T, cols) BF16 = that round trip of x (row stride ldx), in kern_act_bf16's layout (perm:
 * its permuted order); exact, as FP8 values are BF16 values. */
int kern_act_quant_bf16(const float *x, int ldx, int T, int cols, int perm, uint16_t *xb,
                        struct CUstream_st *stream);
/* One launch, in place: q (T, H, hd) weightless RMSNorm per head and RoPE of the trailing
 * rope_dim dims; kv (T, hd) RMSNorm(kv_w), RoPE and (quant) the FP8 round trip of the nope dims;
 * when Hi > 0 the indexer queries qi (T, Hi, Di): RoPE and (quant) Hadamard + FP4 round trip,
 * and wi (T, Hi) *= 1/sqrt(Hi). fast as for kern_rmsnorm. With c (and l, W) set, also the
 * window entries kern_window_write would store; only for batches of one row per sequence
 * (b->max_n == 1, else ERR_INVAL), where no row of the step reads the entry a row overwrites. */
int kern_attn_prep(float *q, float *kv, float *qi, float *wi, const struct kern_batch *b, int H,
                   int hd, const float *kv_w, int Hi, int Di, int rope_dim, const float *inv_freq,
                   float eps, int quant, int fast, const struct kern_cache *c,
                   const struct kern_layer_cache *l, int W, struct CUstream_st *stream);
/* h (P, I) = w[p] * silu(min(g, limit)) * clamp(u, +-limit) (w NULL: 1), then (quant) the FP8
 * round trip per 128 columns. h may alias g. */
int kern_swiglu(const float *g, const float *u, int P, int I, float limit, const float *w,
                int quant, float *h, struct CUstream_st *stream);
/* f (T, d) = sum_j ys (T, K, d) in slot order + sh (T, d) (sh NULL: + 0). */
int kern_moe_combine(const float *ys, const float *sh, int T, int K, int d, float *f,
                     struct CUstream_st *stream);
/* p[0..n) = v. */
int kern_fill_f32(float *p, size_t n, float v, struct CUstream_st *stream);

/* -- linear.cu -- */
/*
 * y[t*ldy + r] = W[r] . x[t*ldx + (grp_rows ? r / grp_rows * grp_xoff : 0) + 0 .. cols), in
 * cpu_dot's order, for t < T, r < W->rows. grp_rows/grp_xoff express the grouped output
 * projection (each group of rows reads its own slice of x). W: (host) struct.
 */
int kern_linear(const struct kern_qmat *W, const float *x, int ldx, int T, float *y, int ldy,
                int grp_rows, int grp_xoff, struct CUstream_st *stream);
/*
 * Experts: for pair p < P (row p / x_div of x), y[p*ldy + r] = Ws[idx[p]][r] . x row; pairs
 * with idx outside [0, E) write zeros. Ws: (device) array of E matrices of one format and shape.
 */
int kern_linear_experts(const struct kern_qmat *Ws, int E, int fmt, int rows, int cols,
                        const int32_t *idx, int P, int x_div, const float *x, int ldx, float *y,
                        int ldy, struct CUstream_st *stream);

/* -- attention.cu -- */
/*
 * Sink attention of every row over its window (positions pos-W+1..pos: this step's kv rows and
 * the slot's ring) and its compressed entries (CSA: the topk selected in sel (T, topk), HCA: all
 * (pos+1)/ratio), then inverse RoPE of each head's output. q (T, H, hd), kv (T, hd) this step's
 * latents, sinks (H), o (T, H, hd).
 */
int kern_sink_attention(const struct kern_batch *b, const struct kern_cache *c,
                        const struct kern_layer_cache *l, const float *q, const float *kv,
                        const int32_t *sel, int topk, const float *sinks, int H, int hd, int W,
                        int rope_dim, const float *inv_freq, float *o, struct CUstream_st *stream);
/* The same on the fast path (attention_fast.cu): heads share each staged key, online softmax,
 * short steps split the keys over blocks (ws: kern_attention_fast_ws_floats(H, hd) floats, or
 * NULL: no split); FP32 summation order differs, and at hd 512 the products run on the tensor
 * cores as BF16 hi + lo splits (~16 significant bits each; DSV4_CUDA_ATTN=simt: CUDA cores).
 * Where two blocks per (row, head) fit one wave (batch 1 at 64 heads) over FP8 entries at hd
 * 512, the decode kernel (attention_dec.cu: FP32 on the CUDA cores, no splits) runs instead
 * (DSV4_CUDA_ATTN=tc: not). hd % 128 == 0, hd <= 512. xb (NULL: none; else 2T rows of H hd
 * BF16): where the splits' merge or the decode kernel runs, it also writes o there as
 * kern_act_bf16 (split, unpermuted) would, and sets *xb_done (else 0; xb_done may be NULL). */
size_t kern_attention_fast_ws_floats(int H, int hd);
int kern_sink_attention_fast(const struct kern_batch *b, const struct kern_cache *c,
                             const struct kern_layer_cache *l, const float *q, const float *kv,
                             const int32_t *sel, int topk, const float *sinks, int H, int hd, int W,
                             int rope_dim, const float *inv_freq, float *o, float *ws, uint16_t *xb,
                             int *xb_done, struct CUstream_st *stream);
/* Write the last min(n, W) latents of each chunk into its slot's window ring. */
int kern_window_write(const struct kern_batch *b, const struct kern_cache *c,
                      const struct kern_layer_cache *l, const float *kv, int hd, int W,
                      struct CUstream_st *stream);

/* -- compressor.cu -- */
/*
 * Feed each sequence's rows, in position order, through a compressor (main: indexer == 0, D = hd;
 * indexer: D = Di) and write every completed entry (RMSNorm(norm), RoPE at entry*ratio, and with
 * quant the FP8 round trip of the nope dims, or Hadamard + FP4 for indexer keys) into the
 * sequence's blocks. a, z (T, coff*D) projections (z without ape); ape (ratio, coff*D). fast: the
 * RMSNorm's sum of squares over a block tree (as kern_rmsnorm's), not the CPU's order.
 */
int kern_compress(const struct kern_batch *b, const struct kern_cache *c,
                  const struct kern_layer_cache *l, const float *a, const float *z,
                  const float *ape, const float *norm, int D, int overlap, int indexer,
                  int rope_dim, const float *inv_freq, float eps, int quant, int fast,
                  struct CUstream_st *stream);
/* Reset one slot's compressor states of one layer (kv 0, scores -inf). */
int kern_compressor_reset(const struct kern_cache *c, const struct kern_layer_cache *l, int slot,
                          int hd, int Di, struct CUstream_st *stream);

/* -- indexer.cu -- */
/*
 * Lightning indexer: per row, scores of the (pos+1)/ratio indexer keys, then the indices of the
 * top min(nvalid, topk) in ascending order (ties to the lower index) into sel (T, topk).
 * qi (T, Hi, Di), wi (T, Hi); scores: workspace (T, 2 * ld_scores) floats, ld_scores >=
 * max_pos / ratio.
 */
int kern_indexer_topk(const struct kern_batch *b, const struct kern_cache *c,
                      const struct kern_layer_cache *l, const float *qi, const float *wi, int Hi,
                      int Di, int topk, float *scores, int ld_scores, int32_t *sel,
                      struct CUstream_st *stream);

/* The same selection with the scores computed warp-parallel (indexer_fast.cu, the fast path;
 * FP32 summation order differs; scores are skipped when all valid keys are selected). */
int kern_indexer_topk_fast(const struct kern_batch *b, const struct kern_cache *c,
                           const struct kern_layer_cache *l, const float *qi, const float *wi,
                           int Hi, int Di, int topk, float *scores, int ld_scores, int32_t *sel,
                           struct CUstream_st *stream);

/* -- moe_ref.cu -- */
/*
 * The router of cpu_route over FP32 gate logits (T, E): hash layers (tid2eid (vocab, K) int32,
 * tokens (T)) or dense top-K of sqrt(softplus) + bias (E). idx, w (T, K); rows whose token id is
 * < 0 (tokens may be NULL in dense layers) are padding: ids -1, weights 0.
 */
int kern_route_exact(const float *logits, int T, int E, int K, const float *bias,
                     const int32_t *tid2eid, const int32_t *tokens, float route_scale, int32_t *idx,
                     float *w, struct CUstream_st *stream);

/* -- linear_fast.cu: activations for the tensor-core linears, BF16 GEMMs (cuBLAS) -- */
/*
 * xb (T or 2T, C) BF16 from x (T, C) with row stride ldx: rows [0, T) = bf16(x); with split also
 * rows [T, 2T) = bf16(x - bf16(x)). perm: each 64-element chunk in the order kern_gemm_fp8's
 * wgmma path reads (C % 64 == 0).
 */
int kern_act_bf16(const float *x, int ldx, int T, int C, int split, int perm, uint16_t *xb,
                  struct CUstream_st *stream);
/* y[t*ldy + j] = a[t*n + j] + a[(T+t)*n + j] for t < T, j < n (the hi + lo halves). xb: NULL,
 * or (T, n) also written as kern_act_quant_bf16 (perm 0) would make it from y (n % 128 == 0,
 * ldy % 4 == 0, y 16-byte aligned; else ERR_UNSUPPORTED). */
int kern_add_split(const float *a, int T, int n, float *y, int ldy, uint16_t *xb,
                   struct CUstream_st *stream);
/* -- gemv_bf16.cu: BF16-weight linears of at most KERN_GEMV_MAX_T rows on the CUDA cores -- */
#define KERN_GEMV_MAX   6  /* matrices per launch */
#define KERN_GEMV_MAX_T 16 /* rows of x */
struct kern_gemv_mat {
    const uint16_t *w; /* (rows, cols) BF16, 16-byte aligned */
    int rows;
    float *y; /* (T, ldy), ldy >= rows */
    int ldy;
};
/* For each of the n matrices: y[t*ldy + r] = sum_c w[r][c] x[t*ldx + c] (t < T, r < rows), x
 * FP32 (T, cols) with row stride ldx (a multiple of 4, 16-byte aligned), cols % 8 == 0; FP32
 * FMAs in an order that depends only on (r, c). ERR_UNSUPPORTED outside these limits. */
int kern_gemv_bf16(const struct kern_gemv_mat *m, int n, const float *x, int ldx, int cols, int T,
                   struct CUstream_st *stream);
/* kern_gemv_bf16 of one matrix (the head at decode) that also folds each row t's largest output
 * into best[t] (T keys; the lowest row of equal outputs; NaN never), for kern_sample_rows to
 * pick greedy rows from without reading the logits: best[t] must be 0 before the launch, and
 * kern_sample_rows resets it to 0. */
int kern_gemv_bf16_argmax(const struct kern_gemv_mat *m, const float *x, int ldx, int cols, int T,
                          unsigned long long *best, struct CUstream_st *stream);
/* -- mhc_fast.cu: kern_hc_pre / kern_hc_head of the fast path: the projection as a
 * deterministic split-K over many blocks, block-wide reductions (FP32 rounding differs from
 * the exact kernels, not between row counts). ws: kern_hc_fast_ws_floats(T, n_hc) floats;
 * gather_ws: (nsel, n*d) floats. -- */
size_t kern_hc_fast_ws_floats(int T, int n_hc);
/* xb: NULL, or (T, d) also written as kern_act_quant_bf16 (perm 0) would make it from x (d % 128
 * == 0; else ERR_UNSUPPORTED) */
int kern_hc_pre_fast(const float *X, int T, int n_hc, int d, const float *fn, const float *base,
                     const float *scale, int iters, float hc_eps, float norm_eps,
                     const float *norm_w, float *ws, float *x, uint16_t *xb, float *post,
                     float *comb, struct CUstream_st *stream);
/* kern_hc_pre_fast for 4 streams (else ERR_UNSUPPORTED) that leaves in zpost (T, 4), zcomb
 * (T, 16) the post and comb gates' inputs for kern_hc_post_raw, so that their 20 serial
 * Sinkhorn rounds run beside the sub-layer, not on its critical path. */
int kern_hc_pre_fast_raw(const float *X, int T, int n_hc, int d, const float *fn, const float *base,
                         const float *scale, float hc_eps, float norm_eps, const float *norm_w,
                         float *ws, float *x, uint16_t *xb, float *zpost, float *zcomb,
                         struct CUstream_st *stream);
int kern_hc_head_fast(const float *X, const int32_t *rows, int nsel, int n_hc, int d,
                      const float *fn, const float *base, const float *scale, float hc_eps,
                      float norm_eps, const float *norm_w, float *gather_ws, float *ws, float *y,
                      struct CUstream_st *stream);
/* ws: device workspace (ws_bytes, e.g. 32 MiB) owned by the caller, or NULL for cuBLAS's own. */
int kern_blas_new(struct kern_blas **out, struct CUstream_st *stream, void *ws, size_t ws_bytes);
void kern_blas_free(struct kern_blas *b); /* NULL-safe */
/* y[t*ldy + r] = sum_c W[r][c] xb[t*ldx + c], W (rows, cols) BF16, FP32 sums (cuBLAS). */
int kern_blas_gemm_bf16(struct kern_blas *b, const uint16_t *W, int rows, int cols,
                        const uint16_t *xb, int ldx, int T, float *y, int ldy);

/* -- sample.cu: picking tokens on the device -- */
/* A row's sampling (engine/backend.h struct backend_pick): temperature <= 0: argmax. */
struct kern_pick {
    float temperature, top_p, min_p, u;
    int32_t top_k;
};
/* out[i] = the token picked from logits row i (n rows of V) under picks[i] (device array);
 * pbuf: (n, V) floats workspace. keys: NULL, or (n) keys of kern_gemv_bf16_argmax: greedy rows
 * take the argmax from there (a row's logits are read only where its key is 0), and every
 * row's key is reset to 0. */
int kern_sample_rows(const float *logits, int n, int V, const struct kern_pick *picks, float *pbuf,
                     unsigned long long *keys, int32_t *out, struct CUstream_st *stream);

/* -- engine_rt.cu: streams, pinned host memory, asynchronous copies -- */
int kern_stream_new(struct CUstream_st **out);
void kern_stream_free(struct CUstream_st *s);
int kern_stream_sync(struct CUstream_st *s);
/* Events for ordering two streams: s waits (kern_stream_wait) for what was enqueued before the
 * latest kern_event_record of ev (one event may be reused call after call). Inside a graph
 * capture this forks a second stream into the graph, or joins it back. */
int kern_event_new(struct CUevent_st **out);
void kern_event_free(struct CUevent_st *e); /* NULL-safe */
int kern_event_record(struct CUevent_st *ev, struct CUstream_st *s);
int kern_stream_wait(struct CUstream_st *s, struct CUevent_st *ev);
int kern_host_alloc(void **p, size_t n); /* pinned */
void kern_host_free(void *p);
int kern_h2d_async(void *dst, const void *src, size_t n, struct CUstream_st *s);
int kern_d2h_async(void *dst, const void *src, size_t n, struct CUstream_st *s);
int kern_d2d_async(void *dst, const void *src, size_t n, struct CUstream_st *s);
int kern_mem_info(size_t *free_bytes, size_t *total_bytes);
/* Capture what is enqueued on s between begin and end into an instantiated graph (*exec,
 * owned by the caller: kern_graph_free); replay it with kern_graph_launch. */
int kern_graph_begin(struct CUstream_st *s);
int kern_graph_end(struct CUstream_st *s, void **exec);
int kern_graph_launch(void *exec, struct CUstream_st *s);
void kern_graph_free(void *exec); /* NULL-safe */
/* The runtime's last error string (cudaGetLastError; clears a non-sticky error). */
const char *kern_rt_error(void);

#ifdef __cplusplus
}
#endif

#endif
