/*
 * exact.cuh - device helpers of the engine kernels (dense.cu, linear.cu, attention.cu,
 * compressor.cu, indexer.cu, moe_ref.cu) that reproduce the CPU oracle's arithmetic
 * (kernels/cpu/) operation for operation. Internal to kernels/cuda.
 *
 * Why: the CPU engine is the oracle, and the model numerics contain FP8/FP4 round trips whose
 * rounding decisions amplify one-ulp differences into one-quantum ones. These kernels therefore
 * use the CPU's summation orders and no FMA contraction (the library is built with -fmad=false),
 * and evaluate expf/sinf/cosf/log1pf as the correctly rounded double result, which is what glibc's
 * float functions return in all but rare cases. Later, faster kernels may trade this for a stated
 * tolerance; the engine test states the bound it checks.
 *
 * The 8-lane dot product of cpu_dot(): lane k sums elements k, k+8, k+16, ... in order and the
 * lanes combine as ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)).
 */
#ifndef DSV4_KERNELS_CUDA_EXACT_CUH
#define DSV4_KERNELS_CUDA_EXACT_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "engine/err.h"
#include "kernels/kernels.h"
#include "kernels/cuda/common.cuh"

#define EX_LAUNCH_CHECK()                                                                          \
    do {                                                                                           \
        if (cudaPeekAtLastError() != cudaSuccess)                                                  \
            return ERR_CUDA;                                                                       \
    } while (0)

/* ---- transcendental functions as glibc's float versions round them ---- */

__device__ __forceinline__ float ex_expf(float x)
{
    return (float)exp((double)x);
}

__device__ __forceinline__ float ex_sinf(float x)
{
    return (float)sin((double)x);
}

__device__ __forceinline__ float ex_cosf(float x)
{
    return (float)cos((double)x);
}

__device__ __forceinline__ float ex_sigmoid(float x)
{
    return 1.0f / (1.0f + ex_expf(-x));
}

/* cpu_sqrt_softplus */
__device__ __forceinline__ float ex_sqrt_softplus(float x)
{
    float sp = x > 20.0f ? x : (float)log1p((double)ex_expf(x));
    return sqrtf(sp);
}

/* ---- number formats (kernels/cpu/numfmt.c) ---- */

__device__ __forceinline__ float ex_e4m3(uint8_t b)
{
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7)
        return __int_as_float(0x7fc00000);
    if (e == 0)
        v = (float)m * (1.0f / 512.0f);
    else
        v = __int_as_float(((e - 7 + 127) << 23) | (m << 20));
    return s ? -v : v;
}

__device__ __forceinline__ float ex_e8m0(uint8_t b)
{
    if (b == 255)
        return __int_as_float(0x7fc00000);
    if (b == 0)
        return ldexpf(1.0f, -127);
    return __int_as_float((int)b << 23);
}

__device__ __forceinline__ float ex_e2m1(uint8_t code)
{
    const float v[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float a = v[code & 7];
    return (code & 8) ? -a : a;
}

/* round_format of numfmt.c: a >= 0 to mbits mantissa bits, min normal exponent emin, max maxv */
__device__ __forceinline__ float ex_round_format(float a, int mbits, int emin, float maxv)
{
    if (!(a > 0.0f))
        return 0.0f;
    if (a >= maxv)
        return maxv;
    int e;
    frexpf(a, &e);
    int E = e - 1 < emin ? emin : e - 1;
    float quantum = ldexpf(1.0f, E - mbits);
    float q = rintf(a / quantum) * quantum;
    return q > maxv ? maxv : q;
}

/* cpu_pow2_scale */
__device__ __forceinline__ float ex_pow2_scale(float amax, float qmax)
{
    float x = amax / qmax;
    int e;
    float f = frexpf(x, &e);
    return ldexpf(1.0f, f == 0.5f ? e - 1 : e);
}

/* One element of an FP8 (E4M3, scale s) round trip. */
__device__ __forceinline__ float ex_fp8_rt(float x, float s)
{
    float v = x / s;
    return copysignf(ex_round_format(fabsf(v), 3, -6, 448.0f), v) * s;
}

/*
 * A warp's 128-column block (lane l: columns 4 l .. 4 l + 3, in o) through the FP8 round trip of
 * act_quant_bf16_k (the scale from the block's |max|, floor 1e-4; exact in any order), written as
 * 4 BF16 at dst (8-byte aligned). All 32 lanes call it.
 */
__device__ __forceinline__ void ex_fp8_bf16_warp4(float4 o, __nv_bfloat16 *dst)
{
    float a = fmaxf(fmaxf(fabsf(o.x), fabsf(o.y)), fmaxf(fabsf(o.z), fabsf(o.w)));
    for (int m = 16; m; m >>= 1)
        a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, m));
    const float s = ex_pow2_scale(fmaxf(1e-4f, a), 448.0f);
    ((__nv_bfloat162 *)dst)[0] = __floats2bfloat162_rn(ex_fp8_rt(o.x, s), ex_fp8_rt(o.y, s));
    ((__nv_bfloat162 *)dst)[1] = __floats2bfloat162_rn(ex_fp8_rt(o.z, s), ex_fp8_rt(o.w, s));
}

/* One element of an FP4 (E2M1, scale s) round trip. */
__device__ __forceinline__ float ex_fp4_rt(float x, float s)
{
    float v = x / s;
    return copysignf(ex_round_format(fabsf(v), 1, 0, 6.0f), v) * s;
}

/* ---- weights ---- */

/* Element (r, c) of a stored matrix, dequantised exactly as cpu_qmat_row does. */
template <int FMT> __device__ __forceinline__ float ex_w(const struct kern_qmat &m, int r, int c)
{
    if (FMT == KERN_W_F32)
        return ((const float *)m.w)[(size_t)r * m.cols + c];
    if (FMT == KERN_W_BF16)
        return __int_as_float(
            (int)((uint32_t)((const uint16_t *)m.w)[(size_t)r * m.cols + c] << 16));
    if (FMT == KERN_W_FP8) {
        int ncb = (m.cols + 127) / 128;
        size_t si = (size_t)(r / 128) * (size_t)ncb + (size_t)(c / 128);
        float s =
            m.scale_f32 ? ((const float *)m.scale)[si] : ex_e8m0(((const uint8_t *)m.scale)[si]);
        return ex_e4m3(((const uint8_t *)m.w)[(size_t)r * m.cols + c]) * s;
    }
    /* MXFP4 */
    uint8_t b = ((const uint8_t *)m.w)[(size_t)r * (m.cols / 2) + c / 2];
    float s = ex_e8m0(((const uint8_t *)m.scale)[(size_t)r * (m.cols / 32) + c / 32]);
    return ex_e2m1((c & 1) ? b >> 4 : b & 15) * s;
}

/* ---- dot products in cpu_dot's order ---- */

/* Combine the 8 lanes of an 8-thread group (lane = threadIdx.x & 7); the result is in lane 0. */
__device__ __forceinline__ float ex_dot8_combine(float v)
{
    v = v + __shfl_down_sync(0xffffffffu, v, 4, 8);
    v = v + __shfl_down_sync(0xffffffffu, v, 1, 8);
    v = v + __shfl_down_sync(0xffffffffu, v, 2, 8);
    return v;
}

/* Partial of lane k (0..7) of cpu_dot(a, b, n) (a, b in any memory). */
__device__ __forceinline__ float ex_dot8_lane(const float *a, const float *b, int n, int k)
{
    float acc = 0.0f;
    for (int i = k; i < n; i += 8)
        acc = acc + a[i] * b[i];
    return acc;
}

/* cpu_dot(a, b, n) by one thread. */
__device__ __forceinline__ float ex_dot_seq(const float *a, const float *b, int n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
#pragma unroll
        for (int k = 0; k < 8; k++)
            acc[k] = acc[k] + a[i + k] * b[i + k];
    }
    for (; i < n; i++) {
        float p = a[i] * b[i];
        switch (i & 7) { /* constant register indices */
        case 0:
            acc[0] = acc[0] + p;
            break;
        case 1:
            acc[1] = acc[1] + p;
            break;
        case 2:
            acc[2] = acc[2] + p;
            break;
        case 3:
            acc[3] = acc[3] + p;
            break;
        case 4:
            acc[4] = acc[4] + p;
            break;
        case 5:
            acc[5] = acc[5] + p;
            break;
        case 6:
            acc[6] = acc[6] + p;
            break;
        default:
            acc[7] = acc[7] + p;
            break;
        }
    }
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Sequential sum of squares (cpu_rmsnorm / hc_mix order). */
__device__ __forceinline__ float ex_sumsq_seq(const float *x, int n)
{
    float ss = 0.0f;
    for (int i = 0; i < n; i++)
        ss = ss + x[i] * x[i];
    return ss;
}

/*
 * The mHC gates of one row (cpu_hc_gates), computed by the whole block: thread i < n makes pre[i]
 * and post[i], thread j*n + k < n*n owns comb[j][k] (shared memory). Every element gets the same
 * operations in the same order as the CPU's loops (each row and column sum is added in index
 * order by every thread that needs it), so the results are bit-identical; only the n*n
 * independent chains run side by side instead of one after the other (the 20 Sinkhorn iterations
 * of a single thread took ~70 us per row). Call from every thread of the block (barriers);
 * n*n <= blockDim.x. With n*n <= 32 (DSV4: n = 4) warp 0 alone runs it, the sums gathered by
 * shuffles in the same index order (no block barrier per half-iteration; with a wider
 * hcf_finish_k this took the fast path's mHC finish from 26 to 16 us per row on an H200).
 */
__device__ __forceinline__ void ex_hc_gates_warp(const float *mix, int n, const float *base,
                                                 const float *scale, int iters, float hc_eps,
                                                 float *pre, float *post, float *comb,
                                                 float *comb_out)
{
    const unsigned all = 0xffffffffu;
    const int t = threadIdx.x, j = t / n, k = t % n, own = t < n * n;
    if (t < n) {
        pre[t] = ex_sigmoid(mix[t] * scale[0] + base[t]) + hc_eps;
        post[t] = 2.0f * ex_sigmoid(mix[n + t] * scale[1] + base[n + t]);
    }
    /* every lane runs every shuffle; lanes past n*n compute values nobody reads */
    float v = own ? mix[2 * n + t] * scale[2] + base[2 * n + t] : 0.0f;
    float mx = -INFINITY;
    for (int q = 0; q < n; q++)
        mx = fmaxf(mx, __shfl_sync(all, v, j * n + q));
    v = ex_expf(v - mx);
    float sum = 0;
    for (int q = 0; q < n; q++)
        sum += __shfl_sync(all, v, j * n + q);
    v = v / sum + hc_eps;
    for (int it = 0; it < iters; it++) {
        float s = 0;
        if (it > 0) { /* rows */
            for (int q = 0; q < n; q++)
                s += __shfl_sync(all, v, j * n + q);
            v /= s + hc_eps;
            s = 0;
        }
        for (int q = 0; q < n; q++) /* columns */
            s += __shfl_sync(all, v, q * n + k);
        v /= s + hc_eps;
    }
    if (own) {
        comb[t] = v;
        comb_out[t] = v;
    }
}

__device__ __forceinline__ void ex_hc_gates(const float *mix, int n, const float *base,
                                            const float *scale, int iters, float hc_eps, float *pre,
                                            float *post, float *comb, float *comb_out)
{
    if (n * n <= 32) {
        if (threadIdx.x < 32)
            ex_hc_gates_warp(mix, n, base, scale, iters, hc_eps, pre, post, comb, comb_out);
        __syncthreads();
        return;
    }
    const int t = threadIdx.x, j = t / n, k = t % n, own = t < n * n;
    if (t < n) {
        pre[t] = ex_sigmoid(mix[t] * scale[0] + base[t]) + hc_eps;
        post[t] = 2.0f * ex_sigmoid(mix[n + t] * scale[1] + base[n + t]);
    }
    float v = 0.0f;
    if (own)
        comb[t] = mix[2 * n + t] * scale[2] + base[2 * n + t];
    __syncthreads();
    if (own) { /* softmax of row j */
        float mx = -INFINITY;
        for (int q = 0; q < n; q++)
            mx = fmaxf(mx, comb[j * n + q]);
        v = ex_expf(comb[t] - mx);
    }
    __syncthreads();
    if (own)
        comb[t] = v;
    __syncthreads();
    if (own) {
        float sum = 0;
        for (int q = 0; q < n; q++)
            sum += comb[j * n + q];
        v = v / sum + hc_eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) { /* rows */
            __syncthreads();
            if (own)
                comb[t] = v;
            __syncthreads();
            if (own) {
                float s = 0;
                for (int q = 0; q < n; q++)
                    s += comb[j * n + q];
                v /= s + hc_eps;
            }
        }
        __syncthreads(); /* columns */
        if (own)
            comb[t] = v;
        __syncthreads();
        if (own) {
            float s = 0;
            for (int q = 0; q < n; q++)
                s += comb[q * n + k];
            v /= s + hc_eps;
        }
    }
    __syncthreads();
    if (own) {
        comb[t] = v;
        comb_out[t] = v;
    }
    __syncthreads();
}

/*
 * Block-wide: the indices of the k best of sc (n scores; higher first, ties to the lower index)
 * in ascending order into sel (k). rank: (n) workspace. Starts and ends with the block in step.
 */
__device__ __forceinline__ void ex_topk_select(const float *sc, int *rank, int n, int k,
                                               int32_t *sel)
{
    if (n <= k) { /* all of them */
        for (int j = threadIdx.x; j < n; j += blockDim.x)
            sel[j] = j;
        return;
    }
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        int r = 0;
        for (int j2 = 0; j2 < n && r < k; j2++)
            r += sc[j2] > sc[j] || (sc[j2] == sc[j] && j2 < j);
        rank[j] = r;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        if (rank[j] >= k)
            continue;
        int at = 0;
        for (int j2 = 0; j2 < j; j2++)
            at += rank[j2] < k;
        sel[at] = j;
    }
}

/* The cos and sin of pair i's RoPE angle pos * inv_freq[i], as cpu_rope makes them. */
__device__ __forceinline__ float2 ex_rope_cs(const float *inv_freq, int i, long pos)
{
    const float ang = (float)pos * inv_freq[i];
    return make_float2(ex_cosf(ang), ex_sinf(ang));
}

/* Rotate pair i of x (interleaved) by pos * inv_freq[i], as cpu_rope. */
__device__ __forceinline__ void ex_rope_pair(float *x, int i, const float *inv_freq, long pos,
                                             int inverse)
{
    const float2 cs = ex_rope_cs(inv_freq, i, pos);
    const float c = cs.x, s = inverse ? -cs.y : cs.y;
    float a = x[2 * i], b = x[2 * i + 1];
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = b * c + a * s;
}

/*
 * Block-cooperative helpers on a vector in shared memory (all threads of the block call them;
 * they end with __syncthreads()).
 */

/* In-place FP8 (fp4 == 0, cpu_fp8_roundtrip) or FP4 (cpu_fp4_roundtrip) round trip of x (n)
 * per `block` elements; scales: shared scratch of ceil(n / block) floats. The block maxima are
 * exact in any order: warp w takes blocks w, w + nw, ..., its lanes every 32nd element, then a
 * butterfly (blockDim.x a multiple of 32). */
__device__ __forceinline__ void ex_block_rt(float *x, int n, int block, int fp4, float *scales)
{
    const int nb = (n + block - 1) / block, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int b = threadIdx.x >> 5; b < nb; b += nw) {
        int len = n - b * block < block ? n - b * block : block;
        float amax = fp4 ? 6.0f * ldexpf(1.0f, -126) : 1e-4f;
        for (int j = lane; j < len; j += 32)
            amax = fmaxf(amax, fabsf(x[b * block + j]));
        for (int o = 16; o; o >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (lane == 0)
            scales[b] = ex_pow2_scale(amax, fp4 ? 6.0f : 448.0f);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        x[i] = fp4 ? ex_fp4_rt(x[i], scales[i / block]) : ex_fp8_rt(x[i], scales[i / block]);
    __syncthreads();
}

/* In-place cpu_hadamard(x, n), n a power of two. */
__device__ __forceinline__ void ex_block_hadamard(float *x, int n)
{
    for (int h = 1; h < n; h *= 2) {
        for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
            int j = (p / h) * 2 * h + p % h;
            float a = x[j], b = x[j + h];
            x[j] = a + b;
            x[j + h] = a - b;
        }
        __syncthreads();
    }
    float s = 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        x[i] = x[i] * s;
    __syncthreads();
}

/* In-place cpu_rmsnorm(x, w, n, eps, x) (w may be NULL); red: one shared float. */
__device__ __forceinline__ void ex_block_rmsnorm(float *x, const float *w, int n, float eps,
                                                 float *red)
{
    __syncthreads();
    if (threadIdx.x == 0)
        *red = 1.0f / sqrtf(ex_sumsq_seq(x, n) / (float)n + eps);
    __syncthreads();
    float r = *red;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        x[i] = w ? w[i] * (x[i] * r) : x[i] * r;
    __syncthreads();
}

/*
 * v[0..n) (shared) = src[0..n) (global) by the whole block, four loads in flight per thread
 * before any store (a store to shared memory between the loads of a generic pointer keeps them
 * one round trip each). Visible to the block after its next barrier.
 */
__device__ __forceinline__ void blk_load(float *v, const float *__restrict__ src, int n)
{
    for (int i0 = 0; i0 < n; i0 += 4 * (int)blockDim.x) {
        float r[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + (int)threadIdx.x + u * (int)blockDim.x;
            r[u] = i < n ? src[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + (int)threadIdx.x + u * (int)blockDim.x;
            if (i < n)
                v[i] = r[u];
        }
    }
}

/*
 * RMSNorm(w) of x (n floats in shared memory) by the whole block: the exact path's (the CPU's
 * sequential sum of squares, on one thread) or, fast, the sum over kern__block_sum's fixed tree
 * (FP32 rounding apart the same; 0.5-1 us per row for n = 512..1024 instead of 2-6 us).
 */
__device__ __forceinline__ void blk_rmsnorm(float *x, const float *w, int n, float eps, int fast,
                                            float *red /* shared, 32 floats */)
{
    if (!fast) {
        ex_block_rmsnorm(x, w, n, eps, red);
        return;
    }
    __syncthreads(); /* x was written by the whole block */
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(kern__block_sum(ss, red) / (float)n + eps);
    for (int i0 = 0; i0 < n; i0 += 4 * (int)blockDim.x) { /* the weights' loads together */
        float g[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + (int)threadIdx.x + u * (int)blockDim.x;
            g[u] = w && i < n ? w[i] : 1.0f;
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + (int)threadIdx.x + u * (int)blockDim.x;
            if (i < n)
                x[i] = w ? g[u] * (x[i] * r) : x[i] * r;
        }
    }
    __syncthreads();
}

/* The weights of blk_rmsnorm_w4 (g[u] = w[threadIdx.x + u blockDim.x], ones where absent),
 * loadable before a kernel's dependency wait. */
__device__ __forceinline__ void blk_norm_w4(float (&g)[4], const float *w, int n)
{
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const int i = (int)threadIdx.x + u * (int)blockDim.x;
        g[u] = w && i < n ? w[i] : 1.0f;
    }
}

/* blk_rmsnorm's fast path with its weights already in registers (blk_norm_w4; weighted: w was
 * not NULL), n <= 4 blockDim.x: the same arithmetic in the same order. */
__device__ __forceinline__ void blk_rmsnorm_w4(float *x, const float (&g)[4], bool weighted, int n,
                                               float eps, float *red /* shared, 32 floats */)
{
    __syncthreads(); /* x was written by the whole block */
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(kern__block_sum(ss, red) / (float)n + eps);
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const int i = (int)threadIdx.x + u * (int)blockDim.x;
        if (i < n)
            x[i] = weighted ? g[u] * (x[i] * r) : x[i] * r;
    }
    __syncthreads();
}

/* ex_rope_pair's cos and sin of pair threadIdx.x at pos (identity past rope_dim / 2): needs
 * only the position, so a kernel can make it before its dependency wait. */
__device__ __forceinline__ float2 blk_rope_cs(const float *inv_freq, int rope_dim, long pos)
{
    const int i = threadIdx.x;
    return i < rope_dim / 2 ? ex_rope_cs(inv_freq, i, pos) : make_float2(1.0f, 0.0f);
}

/* ex_block_rope(x, rope_dim, inv_freq, pos, 0) with the thread's rotation cs = blk_rope_cs(
 * inv_freq, rope_dim, pos), made earlier (rope_dim / 2 <= blockDim.x). */
__device__ __forceinline__ void blk_rope_with(float *x, int rope_dim, float2 cs)
{
    const int i = threadIdx.x;
    if (i < rope_dim / 2) {
        const float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs.x - b * cs.y;
        x[2 * i + 1] = b * cs.x + a * cs.y;
    }
    __syncthreads();
}

/* Rotate (or un-rotate) the rope_dim trailing dims starting at x (interleaved pairs). */
__device__ __forceinline__ void ex_block_rope(float *x, int rope_dim, const float *inv_freq,
                                              long pos, int inverse)
{
    for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x)
        ex_rope_pair(x, i, inv_freq, pos, inverse);
    __syncthreads();
}

#endif
