/*
 * dense.cu - the row-wise ops of the DSV4 walk: embedding, mHC pre/post/head, RMSNorm, RoPE of
 * queries and KV latents, FP8/FP4 activation round trips, clamped SwiGLU and the MoE combine.
 * Twins of kernels/cpu/{mhc,norm,rope,numfmt,moe}.c with the CPU's arithmetic (exact.cuh).
 * One block per row (or per row and head; the embedding per row and 256 columns); reductions
 * that the CPU does sequentially are done sequentially by thread 0 in the same order.
 */
#include <cuda_bf16.h>

#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"
#include "kernels/cuda/mhc_gates.cuh"
#include "kernels/cuda/moe_sum.cuh"

#define HC_MAX        16
#define DENSE_THREADS 256

/* ---- embedding ---- */

/* grid (T, column blocks): column c of row t, one load then the n_hc stores (a block per row
 * looping over the columns waited for each load before its stores: 8.8 us at one row) */
template <int FMT>
__global__ void embed_k(struct kern_qmat E, const int32_t *tokens, int n_hc, float *X)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.x, d = E.cols, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= d)
        return;
    const int tok = tokens[t];
    const float v = tok >= 0 ? ex_w<FMT>(E, tok, c) : 0.0f; /* < 0: a padding row */
    float *Xt = X + (size_t)t * n_hc * d;                   /* (n_hc, d) */
    for (int i = 0; i < n_hc; i++)
        Xt[(size_t)i * d + c] = v;
}

extern "C" int kern_embed(const struct kern_qmat *E, const int32_t *tokens, int T, int n_hc,
                          float *X, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    const dim3 grid((unsigned)T, (unsigned)((E->cols + DENSE_THREADS - 1) / DENSE_THREADS));
    if (grid.y > 65535)
        return ERR_UNSUPPORTED;
    switch (E->fmt) {
    case KERN_W_F32:
        if (kern__launch(embed_k<KERN_W_F32>, grid, DENSE_THREADS, 0, st, 1, *E, tokens, n_hc, X))
            return ERR_CUDA;
        break;
    case KERN_W_BF16:
        if (kern__launch(embed_k<KERN_W_BF16>, grid, DENSE_THREADS, 0, st, 1, *E, tokens, n_hc, X))
            return ERR_CUDA;
        break;
    case KERN_W_FP8:
        if (kern__launch(embed_k<KERN_W_FP8>, grid, DENSE_THREADS, 0, st, 1, *E, tokens, n_hc, X))
            return ERR_CUDA;
        break;
    default:
        return ERR_UNSUPPORTED;
    }
    EX_LAUNCH_CHECK();
    return 0;
}

/* ---- mHC ---- */

/*
 * mix (nmix) = fn (nmix, n*d) . X * rsqrt(mean(X^2) + eps) (hc_mix of mhc.c). Block-cooperative;
 * X (n*d) in global memory; red: one shared float. Ends with __syncthreads().
 */
__device__ void hc_mix_block(const float *X, int len, const float *fn, int nmix, float norm_eps,
                             float *mix, float *red)
{
    if (threadIdx.x == 0)
        *red = 1.0f / sqrtf(ex_sumsq_seq(X, len) / (float)len + norm_eps);
    const int g = threadIdx.x >> 3, lane = threadIdx.x & 7, ng = blockDim.x >> 3;
    /* every thread runs the same number of rounds: the shuffles need whole warps */
    for (int m0 = 0; m0 < nmix; m0 += ng) {
        int m = m0 + g;
        float v =
            ex_dot8_combine(m < nmix ? ex_dot8_lane(fn + (size_t)m * len, X, len, lane) : 0.0f);
        if (m < nmix && lane == 0)
            mix[m] = v;
    }
    __syncthreads();
    for (int m = threadIdx.x; m < nmix; m += blockDim.x)
        mix[m] = mix[m] * *red;
    __syncthreads();
}

__global__ void hc_pre_k(const float *X, int n, int d, const float *fn, const float *base,
                         const float *scale, int iters, float hc_eps, float norm_eps,
                         const float *norm_w, float *x, float *post_out, float *comb_out)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float mix[(2 + HC_MAX) * HC_MAX], pre[HC_MAX], comb[HC_MAX * HC_MAX], red;
    extern __shared__ __align__(16) float u[]; /* (d) */
    const int t = blockIdx.x, nmix = (2 + n) * n;
    const float *Xt = X + (size_t)t * n * d; /* (n, d) */
    hc_mix_block(Xt, n * d, fn, nmix, norm_eps, mix, &red);
    ex_hc_gates(mix, n, base, scale, iters, hc_eps, pre, post_out + (size_t)t * n, comb,
                comb_out + (size_t)t * n * n);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0;
        for (int i = 0; i < n; i++)
            acc += pre[i] * Xt[(size_t)i * d + c];
        u[c] = acc;
    }
    ex_block_rmsnorm(u, norm_w, d, norm_eps, &red);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        x[(size_t)t * d + c] = u[c];
}

extern "C" int kern_hc_pre(const float *X, int T, int n_hc, int d, const float *fn,
                           const float *base, const float *scale, int iters, float hc_eps,
                           float norm_eps, const float *norm_w, float *x, float *post, float *comb,
                           cudaStream_t st)
{
    if (n_hc > HC_MAX || n_hc < 1)
        return ERR_UNSUPPORTED;
    if (T <= 0)
        return 0;
    if (kern__launch(hc_pre_k, T, DENSE_THREADS, sizeof(float) * (size_t)d, st, 1, X, n_hc, d, fn,
                     base, scale, iters, hc_eps, norm_eps, norm_w, x, post, comb))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

__global__ void hc_post_k(const float *f, const float *R, const float *post, const float *comb,
                          int n, int d, float *Xout)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y;
    const float *ft = f + (size_t)t * d, *Rt = R + (size_t)t * n * d;
    const float *pt = post + (size_t)t * n, *ct = comb + (size_t)t * n * n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n * d; i += gridDim.x * blockDim.x) {
        int k = i / d, c = i % d;
        float acc = pt[k] * ft[c];
        for (int j = 0; j < n; j++)
            acc += ct[j * n + k] * Rt[(size_t)j * d + c];
        Xout[(size_t)t * n * d + i] = acc;
    }
}

/*
 * hc_post_k for 4 streams (d % 4 == 0): thread (c, t) computes float4 column c of the 4 output
 * streams of row t, in hc_post_k's order (the same bits). R and the gates are loaded before the
 * dependency wait: they were written before the sub-layer (hc_post / the embedding; the mHC
 * finish), and the kernel before this one signals its dependents only after its own dependency
 * wait, i.e. after those writers completed; through L2 (__ldcg), the coherent level. Only f, the
 * sub-layer's output, needs the wait.
 *
 * RAW (kern_hc_post_raw): post and comb hold the gates' inputs (kern_hc_pre_fast_raw); thread 0
 * of each block makes the gates (hcf_gates4) before the wait, where the block is resident
 * beside the sub-layer's last kernel, instead of the finish making them on its critical path.
 */
#define HCP4_THREADS 128
template <bool MOE, bool RAW>
__global__ void __launch_bounds__(HCP4_THREADS)
    hc_post4_k(const float *__restrict__ f, const struct kern_moe_sum m,
               const float *__restrict__ R, const float *__restrict__ post,
               const float *__restrict__ comb, int iters, float hc_eps, int d,
               float *__restrict__ Xout)
{
    __shared__ float gates[20]; /* RAW: post (4), comb (16) */
    const int t = blockIdx.y, c = blockIdx.x * HCP4_THREADS + threadIdx.x;
    const bool in = c < d / 4;
    float4 r[4];
    float p[4], cm[16];
#pragma unroll
    for (int j = 0; j < 4; j++)
        r[j] = in ? __ldcg((const float4 *)(R + ((size_t)t * 4 + j) * d) + c)
                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (RAW) {
        if (threadIdx.x == 0) {
            float z[24];
#pragma unroll
            for (int k = 0; k < 4; k++)
                z[4 + k] = __ldcg(post + (size_t)t * 4 + k);
#pragma unroll
            for (int q = 0; q < 16; q++)
                z[8 + q] = __ldcg(comb + (size_t)t * 16 + q);
            hcf_gates4(z, iters, hc_eps, gates, gates + 4);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; k++)
            p[k] = __ldcg(post + (size_t)t * 4 + k);
#pragma unroll
        for (int q = 0; q < 16; q++)
            cm[q] = __ldcg(comb + (size_t)t * 16 + q);
    }
    kern__pdl_wait();
    kern__pdl_launch();
    if (RAW) {
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 4; k++)
            p[k] = gates[k];
#pragma unroll
        for (int q = 0; q < 16; q++)
            cm[q] = gates[4 + q];
    }
    if (!in)
        return;
    /* MOE: f is the MoE output, summed here from its parts */
    const float4 fv = MOE ? moe__sum_row4(m, t, c, d) : ((const float4 *)(f + (size_t)t * d))[c];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float4 a = make_float4(p[k] * fv.x, p[k] * fv.y, p[k] * fv.z, p[k] * fv.w);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            a.x += cm[j * 4 + k] * r[j].x;
            a.y += cm[j * 4 + k] * r[j].y;
            a.z += cm[j * 4 + k] * r[j].z;
            a.w += cm[j * 4 + k] * r[j].w;
        }
        ((float4 *)(Xout + ((size_t)t * 4 + k) * d))[c] = a;
    }
}

/* iters < 0: post and comb are the gates; else their inputs (RAW) */
static int hc_post4(const float *f, const struct kern_moe_sum *m, const float *R, const float *post,
                    const float *comb, int iters, float hc_eps, int T, int d, float *Xout,
                    cudaStream_t st)
{
    const dim3 grid((unsigned)((d / 4 + HCP4_THREADS - 1) / HCP4_THREADS), (unsigned)T);
    const struct kern_moe_sum none = {}, mm = m ? *m : none;
    void (*k)(const float *, const struct kern_moe_sum, const float *, const float *, const float *,
              int, float, int, float *) =
        m ? (iters < 0 ? hc_post4_k<true, false> : hc_post4_k<true, true>)
          : (iters < 0 ? hc_post4_k<false, false> : hc_post4_k<false, true>);
    if (kern__launch(k, grid, HCP4_THREADS, 0, st, 1, f, mm, R, post, comb, iters, hc_eps, d, Xout))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

extern "C" int kern_hc_post_moe(const struct kern_moe_sum *m, const float *R, const float *post,
                                const float *comb, int T, int n_hc, int d, float *Xout,
                                cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (T > 65535 || n_hc != 4 || d % 4)
        return ERR_UNSUPPORTED;
    return hc_post4(NULL, m, R, post, comb, -1, 0.0f, T, d, Xout, st);
}

extern "C" int kern_hc_post_raw(const float *f, const struct kern_moe_sum *m, const float *R,
                                const float *zpost, const float *zcomb, int iters, float hc_eps,
                                int T, int d, float *Xout, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (T > 65535 || d % 4 || (!f && !m) || iters < 0)
        return ERR_UNSUPPORTED;
    return hc_post4(m ? NULL : f, m, R, zpost, zcomb, iters, hc_eps, T, d, Xout, st);
}

extern "C" int kern_hc_post(const float *f, const float *R, const float *post, const float *comb,
                            int T, int n_hc, int d, float *Xout, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (T > 65535)
        return ERR_UNSUPPORTED;
    if (n_hc == 4 && d % 4 == 0)
        return hc_post4(f, NULL, R, post, comb, -1, 0.0f, T, d, Xout, st);
    unsigned gx = (unsigned)((n_hc * d + DENSE_THREADS * 4 - 1) / (DENSE_THREADS * 4));
    if (kern__launch(hc_post_k, dim3(gx, (unsigned)T), DENSE_THREADS, 0, st, 1, f, R, post, comb,
                     n_hc, d, Xout))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

__global__ void hc_head_k(const float *X, const int32_t *rows, int n, int d, const float *fn,
                          const float *base, const float *scale, float hc_eps, float norm_eps,
                          const float *norm_w, float *y)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float mix[HC_MAX], pre[HC_MAX], red;
    extern __shared__ __align__(16) float u[]; /* (d) */
    const int i = blockIdx.x;
    const float *Xt = X + (size_t)rows[i] * n * d; /* (n, d) */
    hc_mix_block(Xt, n * d, fn, n, norm_eps, mix, &red);
    if (threadIdx.x == 0)
        for (int k = 0; k < n; k++)
            pre[k] = ex_sigmoid(mix[k] * scale[0] + base[k]) + hc_eps;
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0;
        for (int k = 0; k < n; k++)
            acc += pre[k] * Xt[(size_t)k * d + c];
        u[c] = acc;
    }
    ex_block_rmsnorm(u, norm_w, d, norm_eps, &red);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        y[(size_t)i * d + c] = u[c];
}

extern "C" int kern_hc_head(const float *X, const int32_t *rows, int nsel, int n_hc, int d,
                            const float *fn, const float *base, const float *scale, float hc_eps,
                            float norm_eps, const float *norm_w, float *y, cudaStream_t st)
{
    if (n_hc > HC_MAX || n_hc < 1)
        return ERR_UNSUPPORTED;
    if (nsel <= 0)
        return 0;
    if (kern__launch(hc_head_k, nsel, DENSE_THREADS, sizeof(float) * (size_t)d, st, 1, X, rows,
                     n_hc, d, fn, base, scale, hc_eps, norm_eps, norm_w, y))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

/* ---- norms and round trips ---- */

__global__ void rmsnorm_k(const float *x, const float *w, int n, float eps, int fast, float *out,
                          __nv_bfloat16 *xb)
{
    /* the fast path's weights before the dependency wait (static data) */
    const bool pre = fast && n <= 4 * (int)blockDim.x;
    float g[4];
    if (pre)
        blk_norm_w4(g, w, n);
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float red[32];
    extern __shared__ __align__(16) float v[]; /* (n) */
    const int t = blockIdx.x;
    blk_load(v, x + (size_t)t * n, n);
    if (pre)
        blk_rmsnorm_w4(v, g, w != NULL, n, eps, red);
    else
        blk_rmsnorm(v, w, n, eps, fast, red);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[(size_t)t * n + i] = v[i];
    if (xb) /* n % 128 == 0: a warp's 32 float4 are one 128-column block */
        for (int c = threadIdx.x; c < n / 4; c += blockDim.x)
            ex_fp8_bf16_warp4(((const float4 *)v)[c], xb + (size_t)t * n + 4 * c);
}

extern "C" int kern_rmsnorm(const float *x, const float *w, int T, int n, float eps, int fast,
                            float *out, uint16_t *xb, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (xb && n % 128)
        return ERR_UNSUPPORTED;
    if (kern__launch(rmsnorm_k, T, DENSE_THREADS, sizeof(float) * (size_t)n, st, 1, x, w, n, eps,
                     fast, out, (__nv_bfloat16 *)xb))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

/* The scale of cpu_fp8_roundtrip for the 128-column block this 128-thread block holds (thread i
 * holds v, column i of it; len columns are real). */
__device__ __forceinline__ float act_scale128(float v, int len)
{
    __shared__ float amax_w[4];
    float a = threadIdx.x < len ? fabsf(v) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) /* max is exact in any order */
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if ((threadIdx.x & 31) == 0)
        amax_w[threadIdx.x >> 5] = a;
    __syncthreads();
    float amax = fmaxf(fmaxf(fmaxf(1e-4f, amax_w[0]), amax_w[1]), fmaxf(amax_w[2], amax_w[3]));
    return ex_pow2_scale(amax, 448.0f);
}

/* one block per (row, 128-column block): the FP8 round trip of cpu_fp8_roundtrip(x, n, 128) */
__global__ void act_quant_k(const float *x, int cols, float *out)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y, b0 = blockIdx.x * 128, c = b0 + threadIdx.x;
    const int len = cols - b0 < 128 ? cols - b0 : 128;
    const float v = c < cols ? x[(size_t)t * cols + c] : 0.0f;
    const float s = act_scale128(v, len);
    if (threadIdx.x < len)
        out[(size_t)t * cols + c] = ex_fp8_rt(v, s);
}

extern "C" int kern_act_quant_fp8(const float *x, int T, int cols, float *out, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (kern__launch(act_quant_k, dim3((cols + 127) / 128, T), 128, 0, st, 1, x, cols, out))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

/* act_quant_k's round trip written as BF16 (exact: an E4M3 value times a power of two) in the
 * layout of kern_act_bf16 (row t of xb at t * cols, permuted when perm): one kernel where the
 * tensor-core linears took two. */
__global__ void act_quant_bf16_k(const float *x, int ldx, int cols, int perm, __nv_bfloat16 *xb)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y, b0 = blockIdx.x * 128, c = b0 + threadIdx.x;
    const int len = cols - b0 < 128 ? cols - b0 : 128;
    const float v = c < cols ? x[(size_t)t * ldx + c] : 0.0f;
    const float s = act_scale128(v, len);
    if (threadIdx.x < len)
        xb[(size_t)t * cols + (perm ? (c & ~63) | perm64(c & 63) : c)] =
            __float2bfloat16_rn(ex_fp8_rt(v, s));
}

extern "C" int kern_act_quant_bf16(const float *x, int ldx, int T, int cols, int perm, uint16_t *xb,
                                   cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if ((perm && cols % 64) || T > 65535)
        return ERR_UNSUPPORTED;
    if (kern__launch(act_quant_bf16_k, dim3((cols + 127) / 128, T), 128, 0, st, 1, x, ldx, cols,
                     perm, (__nv_bfloat16 *)xb))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

/* ---- queries and latents ---- */

/*
 * What attn_prep_k's blocks make before their dependency wait, from static data and the batch
 * (written before the step): the RoPE rotation of the thread's pair (blk_rope_cs; cs_ok: every
 * pair has a thread) and, fast path, the KV norm's weights (g; pre).
 */
struct prep_pre {
    float2 cs;
    float g[4];
    bool cs_ok, pre;
};

/* RoPE of the rope_dim dims at x, row position pos: with p's rotation where it has one. */
__device__ __forceinline__ void prep_rope(float *x, int rope_dim, const float *inv_freq, long pos,
                                          const struct prep_pre &p)
{
    if (p.cs_ok)
        blk_rope_with(x, rope_dim, p.cs);
    else
        ex_block_rope(x, rope_dim, inv_freq, pos, 0);
}

/* q head (t, h): weightless RMSNorm over hd, RoPE of the trailing dims (v: hd floats) */
__device__ __forceinline__ void q_head(float *q, const int32_t *row_pos, int t, int h, int H,
                                       int hd, int rope_dim, const float *inv_freq, float eps,
                                       int fast, float *v, float *red, const struct prep_pre &p)
{
    float *qh = q + ((size_t)t * H + h) * hd;
    blk_load(v, qh, hd);
    blk_rmsnorm(v, NULL, hd, eps, fast, red);
    prep_rope(v + hd - rope_dim, rope_dim, inv_freq, row_pos[t], p);
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        qh[i] = v[i];
}

/* KV latent of row t: RMSNorm(w), RoPE, (quant) the FP8 round trip of the nope dims; returns
 * it in v (shared) as well */
__device__ __forceinline__ void kv_row(float *kv, const int32_t *row_pos, int t, int hd,
                                       const float *w, int rope_dim, const float *inv_freq,
                                       float eps, int quant, int fast, float *v, float *red,
                                       float *scales, const struct prep_pre &p)
{
    float *kt = kv + (size_t)t * hd;
    blk_load(v, kt, hd);
    if (p.pre)
        blk_rmsnorm_w4(v, p.g, w != NULL, hd, eps, red);
    else
        blk_rmsnorm(v, w, hd, eps, fast, red);
    prep_rope(v + hd - rope_dim, rope_dim, inv_freq, row_pos[t], p);
    if (quant)
        ex_block_rt(v, hd - rope_dim, 64, 0, scales);
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        kt[i] = v[i];
}

/* indexer query head (t, h): RoPE, (quant) Hadamard + FP4 round trip; its weight / sqrt(Hi) */
__device__ __forceinline__ void iq_head(float *qi, float *wi, const int32_t *row_pos, int t, int h,
                                        int Hi, int Di, int rope_dim, const float *inv_freq,
                                        int quant, float *v, float *scales,
                                        const struct prep_pre &p)
{
    float *qh = qi + ((size_t)t * Hi + h) * Di;
    blk_load(v, qh, Di);
    __syncthreads();
    prep_rope(v + Di - rope_dim, rope_dim, inv_freq, row_pos[t], p);
    if (quant) {
        ex_block_hadamard(v, Di);
        ex_block_rt(v, Di, 32, 1, scales);
    }
    for (int i = threadIdx.x; i < Di; i += blockDim.x)
        qh[i] = v[i];
    if (threadIdx.x == 0)
        wi[(size_t)t * Hi + h] *= 1.0f / sqrtf((float)Hi);
}

struct attn_prep_args {
    float *q, *kv, *qi, *wi;
    const int32_t *row_pos;
    const float *kv_w, *inv_freq;
    int T, H, hd, Hi, Di, rope_dim, quant, fast;
    float eps;
    /* win: each KV row's window entry too (kern_window_write's store) */
    struct kern_batch b;
    struct kern_cache c;
    struct kern_layer_cache l;
    int W, win;
};

/* One launch for the three: blocks [0, T H) the q heads, [T H, T H + T) the KV rows, then the
 * T Hi indexer heads. */
__global__ void attn_prep_k(const struct attn_prep_args a)
{
    __shared__ float red[32], scales[128];
    extern __shared__ __align__(16) float v[]; /* (max(hd, Di)) */
    const long i = blockIdx.x, nq = (long)a.T * a.H;
    const int kind = i < nq ? 0 : (i < nq + a.T ? 1 : 2); /* q head, KV row, indexer head */
    const int t =
        kind == 0 ? (int)(i / a.H) : (kind == 1 ? (int)(i - nq) : (int)((i - nq - a.T) / a.Hi));
    struct prep_pre p;
    p.cs_ok = a.rope_dim / 2 <= (int)blockDim.x;
    p.cs = p.cs_ok ? blk_rope_cs(a.inv_freq, a.rope_dim, a.row_pos[t]) : make_float2(1.0f, 0.0f);
    p.pre = kind == 1 && a.fast && a.hd <= 4 * (int)blockDim.x;
    if (p.pre)
        blk_norm_w4(p.g, a.kv_w, a.hd);
    kern__pdl_wait();
    kern__pdl_launch();
    if (kind == 0)
        q_head(a.q, a.row_pos, t, (int)(i % a.H), a.H, a.hd, a.rope_dim, a.inv_freq, a.eps, a.fast,
               v, red, p);
    else if (kind == 1) {
        kv_row(a.kv, a.row_pos, t, a.hd, a.kv_w, a.rope_dim, a.inv_freq, a.eps, a.quant, a.fast, v,
               red, scales, p);
        if (a.win)
            kvf_put_window(a.b, a.c, a.l, t, v, a.hd, a.W);
    } else {
        const long j = i - nq - a.T;
        iq_head(a.qi, a.wi, a.row_pos, t, (int)(j % a.Hi), a.Hi, a.Di, a.rope_dim, a.inv_freq,
                a.quant, v, scales, p);
    }
}

extern "C" int kern_attn_prep(float *q, float *kv, float *qi, float *wi, const struct kern_batch *b,
                              int H, int hd, const float *kv_w, int Hi, int Di, int rope_dim,
                              const float *inv_freq, float eps, int quant, int fast,
                              const struct kern_cache *c, const struct kern_layer_cache *l, int W,
                              cudaStream_t st)
{
    if (hd > 64 * 64 || (Hi && (Di > 128 * 32 || (Di & (Di - 1)))))
        return ERR_UNSUPPORTED;
    if (b->T <= 0)
        return 0;
    if (c && b->max_n != 1)
        return ERR_INVAL; /* a later row of a sequence may still need the entry overwritten */
    struct attn_prep_args a = {};
    a.b = *b, a.win = c != NULL, a.W = W;
    if (c)
        a.c = *c, a.l = *l;
    a.q = q, a.kv = kv, a.qi = qi, a.wi = wi;
    a.row_pos = b->row_pos, a.kv_w = kv_w, a.inv_freq = inv_freq;
    a.T = b->T, a.H = H, a.hd = hd, a.Hi = Hi, a.Di = Hi ? Di : 0;
    a.rope_dim = rope_dim, a.quant = quant, a.fast = fast, a.eps = eps;
    const long blocks = (long)b->T * (H + 1 + Hi);
    const int vmax = Hi && Di > hd ? Di : hd;
    if (blocks > 0x7fffffffL)
        return ERR_UNSUPPORTED;
    if (kern__launch(attn_prep_k, (unsigned)blocks, 128, sizeof(float) * (size_t)vmax, st, 1, a))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

/* ---- MoE elementwise ---- */

__global__ void swiglu_k(const float *g, const float *u, int I, float limit, const float *w,
                         int quant, float *h)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float scales[64];
    extern __shared__ __align__(16) float v[]; /* (I) */
    const int p = blockIdx.x;
    const float wp = w ? w[p] : 1.0f;
    for (int i = threadIdx.x; i < I; i += blockDim.x) {
        float gi = fminf(g[(size_t)p * I + i], limit);
        float ui = fminf(fmaxf(u[(size_t)p * I + i], -limit), limit);
        v[i] = wp * (gi / (1.0f + ex_expf(-gi))) * ui;
    }
    __syncthreads();
    if (quant)
        ex_block_rt(v, I, 128, 0, scales);
    for (int i = threadIdx.x; i < I; i += blockDim.x)
        h[(size_t)p * I + i] = v[i];
}

extern "C" int kern_swiglu(const float *g, const float *u, int P, int I, float limit,
                           const float *w, int quant, float *h, cudaStream_t st)
{
    if (I > 64 * 128)
        return ERR_UNSUPPORTED;
    if (P <= 0)
        return 0;
    if (kern__launch(swiglu_k, P, DENSE_THREADS, sizeof(float) * (size_t)I, st, 1, g, u, I, limit,
                     w, quant, h))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

__global__ void moe_combine_k(const float *ys, const float *sh, int T, int K, int d, float *f)
{
    kern__pdl_wait();
    kern__pdl_launch();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * d)
        return;
    size_t t = i / d, k = i % d;
    float acc = 0;
    for (int j = 0; j < K; j++)
        acc += ys[(t * K + j) * d + k];
    f[i] = acc + (sh ? sh[i] : 0.0f);
}

extern "C" int kern_moe_combine(const float *ys, const float *sh, int T, int K, int d, float *f,
                                cudaStream_t st)
{
    size_t n = (size_t)T * d;
    if (!n)
        return 0;
    if (kern__launch(moe_combine_k, (unsigned)((n + 255) / 256), 256, 0, st, 1, ys, sh, T, K, d, f))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

__global__ void fill_k(float *p, size_t n, float v)
{
    kern__pdl_wait();
    kern__pdl_launch();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = v;
}

extern "C" int kern_fill_f32(float *p, size_t n, float v, cudaStream_t st)
{
    if (!n)
        return 0;
    size_t blocks = (n + 255) / 256;
    if (kern__launch(fill_k, (unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, st, 1, p, n, v))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}
