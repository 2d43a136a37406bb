/*
 * mhc_fast.cu - the mHC collapse of the GPU engine's fast path: hc_pre and hc_head with the
 * 24-way (4-way) projection split over K across many blocks (a deterministic split-K: slices
 * summed by a fixed butterfly), and the row reductions done by the whole block. The gates and
 * the Sinkhorn iterations keep the exact path's order (4 streams: hcf_gates4, with expf and
 * reciprocals; else ex_hc_gates), so results agree with dense.cu to FP32 rounding and do not
 * depend on how many rows a step has.
 *
 * Shapes: X (T, n, d) residual streams; fn (nmix, n*d); part (T, HCF_SLICES, nmix) workspace.
 */
#include "kernels/kernels.h"

#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/mhc_gates.cuh"

#define HCF_THREADS 256
#define HCF_FIN_THREADS                                                                            \
    512 /* hcf_finish_k: one row per block, latency-bound: more loads in flight; one more warp     \
           (HCF_FIN_THREADS + 32 a block) runs the 4-stream Sinkhorn beside the collapse */
#define HCF_MAX    16
#define HCF_SLICES 32 /* K slices of the projection (one per lane in hcf_finish_k) */
#define HCF_ROWS   8  /* rows per block of the projection */
#define HCF_MIXMAX ((2 + HCF_MAX) * HCF_MAX)

/*
 * part (T, HCF_SLICES, nmix): per slice s of the len columns, the dots of the rows of X with the
 * rows of fn. grid (HCF_SLICES, ceil(T / HCF_ROWS)): a block takes HCF_ROWS rows; warp w the mix
 * rows m = w, w + 8, ... (each fn element is loaded once for all the block's rows).
 */
__global__ void __launch_bounds__(HCF_THREADS)
    hcf_mix_part_k(const float *__restrict__ X, int T, int len, const float *__restrict__ fn,
                   int nmix, float *__restrict__ part)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int s = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.y * HCF_ROWS, nr = T - t0 < HCF_ROWS ? T - t0 : HCF_ROWS;
    const int sl = len / HCF_SLICES, k0 = s * sl;
    for (int m0 = warp; m0 < nmix; m0 += 3 * (HCF_THREADS / 32)) {
        float acc[3][HCF_ROWS];
#pragma unroll
        for (int j = 0; j < 3; j++)
#pragma unroll
            for (int r = 0; r < HCF_ROWS; r++)
                acc[j][r] = 0.0f;
#pragma unroll 4
        for (int k = k0 + lane; k < k0 + sl; k += 32) {
            float f[3];
#pragma unroll
            for (int j = 0; j < 3; j++) {
                int m = m0 + j * (HCF_THREADS / 32);
                f[j] = m < nmix ? fn[(size_t)m * len + k] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < HCF_ROWS; r++) {
                float x = r < nr ? X[(size_t)(t0 + r) * len + k] : 0.0f;
#pragma unroll
                for (int j = 0; j < 3; j++)
                    acc[j][r] += f[j] * x;
            }
        }
#pragma unroll
        for (int j = 0; j < 3; j++)
#pragma unroll
            for (int r = 0; r < HCF_ROWS; r++) {
                float v = acc[j][r];
                for (int o = 16; o; o >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, o);
                int m = m0 + j * (HCF_THREADS / 32);
                if (lane == 0 && m < nmix && r < nr)
                    part[((size_t)(t0 + r) * HCF_SLICES + s) * nmix + m] = v;
            }
    }
}

/*
 * hcf_mix_part_k for T <= HCF_SMALL_T rows (decode of one or two sequences), where the
 * projection is pure latency: every load of a thread in flight at once - its fn values (static
 * weights) before the dependency wait, its X values in one batch after it - then the same sums
 * in the same order (lane l: columns k0 + l + 32 i in i order; butterfly), so the results are
 * those of hcf_mix_part_k bit for bit. Slices of a multiple of 32 columns, at most 32
 * HCF_SMALL_PER (Flash 512, Pro 896); nmix <= 24.
 */
#define HCF_SMALL_T   2
#define HCF_SMALL_PER 32
__global__ void __launch_bounds__(HCF_THREADS)
    hcf_mix_small_k(const float *__restrict__ X, int T, int len, const float *__restrict__ fn,
                    int nmix, float *__restrict__ part)
{
    constexpr int NW = HCF_THREADS / 32;
    const int s = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sl = len / HCF_SLICES, k0 = s * sl + lane, per = sl / 32;
    float f[3][HCF_SMALL_PER], x[HCF_SMALL_T][HCF_SMALL_PER];
#pragma unroll
    for (int j = 0; j < 3; j++) {
        const int m = warp + j * NW;
#pragma unroll
        for (int i = 0; i < HCF_SMALL_PER; i++)
            f[j][i] = m < nmix && i < per ? fn[(size_t)m * len + k0 + 32 * i] : 0.0f;
    }
    kern__pdl_wait();
    kern__pdl_launch();
#pragma unroll
    for (int r = 0; r < HCF_SMALL_T; r++)
#pragma unroll
        for (int i = 0; i < HCF_SMALL_PER; i++)
            x[r][i] = r < T && i < per ? X[(size_t)r * len + k0 + 32 * i] : 0.0f;
#pragma unroll
    for (int j = 0; j < 3; j++) {
        const int m = warp + j * NW;
#pragma unroll
        for (int r = 0; r < HCF_SMALL_T; r++) {
            float v = 0.0f;
#pragma unroll
            for (int i = 0; i < HCF_SMALL_PER; i++)
                if (i < per)
                    v += f[j][i] * x[r][i];
            for (int o = 16; o; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && m < nmix && r < T)
                part[((size_t)r * HCF_SLICES + s) * nmix + m] = v;
        }
    }
}

/* kern__block_sum over the first HCF_FIN_THREADS threads only (named barrier 1), so the gates'
 * warp is not waited for; the same order as kern__block_sum over that many threads. */
__device__ __forceinline__ float hcf_fin_sum(float v, float *sm)
{
    constexpr int nw = HCF_FIN_THREADS / 32;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    asm volatile("bar.sync 1, %0;\n" ::"n"(HCF_FIN_THREADS) : "memory");
    if (lane == 0)
        sm[w] = v;
    asm volatile("bar.sync 1, %0;\n" ::"n"(HCF_FIN_THREADS) : "memory");
    v = lane < nw ? sm[lane] : 0.0f;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/*
 * Float4 column c of row i into out, and (xb) its FP8 round trip in BF16 as act_quant_bf16_k
 * makes it: a warp holds 32 consecutive float4 columns (c = 32 w + HCF_FIN_THREADS k), i.e. one
 * 128-column block when d % 128 == 0. Called by every lane of a warp with columns in range.
 */
__device__ __forceinline__ void hcf_put(float *out, __nv_bfloat16 *xb, int i, int d, int c,
                                        float4 o)
{
    ((float4 *)(out + (size_t)i * d))[c] = o;
    if (xb)
        ex_fp8_bf16_warp4(o, xb + (size_t)i * d + 4 * c);
}

/*
 * One row per block: the mix (the slices summed by a butterfly) times the row's rsqrt(mean(X^2)
 * + eps), then the gates (pre, post, comb; head == 0) or the head's pre only (head == 1), then
 * u = sum_k pre[k] X[k] and RMSNorm(w) into out (T, d). float4 loads and stores (d % 4 == 0,
 * rows 16-byte aligned).
 *
 * CJ > 0 (n == 4, d / 4 <= CJ * HCF_FIN_THREADS, CJ <= 3): thread t holds X[k][t + HCF_FIN_THREADS
 * j] (j < CJ, float4 columns) of every stream in registers for both passes, and loads them, with
 * the static parameters (w, scale, base), before the dependency wait. X is not the projection's
 * output: it was written by the kernel before the projection (hc_post, the embedding or the
 * head's gather), and the projection signals its dependents only after its own dependency
 * wait, i.e. after that kernel completed and flushed its writes; the loads go through L2
 * (__ldcg), the coherent level. Only `part` needs the wait. At CJ = 2 (Flash: n 4, d 4096) the
 * sums run in the generic path's order, so the result is the same bit for bit.
 */
template <int CJ>
__global__ void __launch_bounds__(HCF_FIN_THREADS + 32, 1)
    hcf_finish_k(const float *__restrict__ X, int n, int d, const float *__restrict__ part,
                 int nmix, const float *__restrict__ base, const float *__restrict__ scale,
                 int iters, float hc_eps, float norm_eps, const float *__restrict__ w, int head,
                 int raw, float *__restrict__ out, __nv_bfloat16 *__restrict__ xb,
                 float *__restrict__ post_out, float *__restrict__ comb_out)
{
    constexpr int NT = HCF_FIN_THREADS; /* the collapse's threads; warp NT / 32 runs the gates */
    __shared__ float sm[32], mix[HCF_MIXMAX], pre[HCF_MAX], comb[HCF_MAX * HCF_MAX];
    extern __shared__ __align__(16) float u[]; /* (d), CJ == 0 only */
    const int i = blockIdx.x, len = n * d, d4 = d / 4;
    const bool fin = threadIdx.x < NT;
    const float *Xt = X + (size_t)i * len;
    float4 xr[CJ > 0 ? 4 : 1][CJ > 0 ? CJ : 1], wr[CJ > 0 ? CJ : 1];
    float zs = 0.0f, zb = 0.0f; /* thread m < nmix: the scale and base of mix m */
    if (threadIdx.x < nmix) {
        zs = scale[head ? 0 : (threadIdx.x < 4 ? 0 : (threadIdx.x < 8 ? 1 : 2))];
        zb = base[threadIdx.x];
    }
    if (CJ > 0) {
#pragma unroll
        for (int j = 0; j < CJ; j++) {
            const int c = threadIdx.x + NT * j;
            const bool in = fin && c < d4;
            wr[j] = in && w ? ((const float4 *)w)[c] : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
#pragma unroll
            for (int k = 0; k < 4; k++)
                xr[k][j] = in ? __ldcg((const float4 *)(Xt + (size_t)k * d) + c)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
    /* X's sum of squares needs no wait (X was written before the projection, see above) */
    float ss = 0.0f;
    if (CJ > 0) { /* in the order of the loop below at CJ = 2 */
#pragma unroll
        for (int k = 0; k < 4; k++)
#pragma unroll
            for (int j = 0; j < CJ; j++)
                ss += xr[k][j].x * xr[k][j].x + xr[k][j].y * xr[k][j].y + xr[k][j].z * xr[k][j].z +
                      xr[k][j].w * xr[k][j].w;
    } else { /* 16-byte loads, eight in flight per thread (len % 4 == 0) */
#pragma unroll 8
        for (int k = threadIdx.x; fin && k < len / 4; k += NT) {
            const float4 v = ((const float4 *)Xt)[k];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    }
    /* (the gates' warp adds 0: the same sum as over NT threads) */
    const float red = 1.0f / sqrtf(kern__block_sum(ss, sm) / (float)len + norm_eps);
    kern__pdl_wait();
    kern__pdl_launch();
    /* warp w: mixes w, w + NT / 32, ...; lane s loads slice s (n = 4: all 24 in one round
     * trip); the slices are added by a butterfly (fixed order) */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int m0 = warp, m1 = warp + NT / 32;
    const float v0 = fin && m0 < nmix ? part[((size_t)i * HCF_SLICES + lane) * nmix + m0] : 0.0f,
                v1 = fin && m1 < nmix ? part[((size_t)i * HCF_SLICES + lane) * nmix + m1] : 0.0f;
    {
        float a0 = v0, a1 = v1;
#pragma unroll
        for (int o = 16; o; o >>= 1) {
            a0 += __shfl_xor_sync(0xffffffffu, a0, o);
            a1 += __shfl_xor_sync(0xffffffffu, a1, o);
        }
        if (lane == 0 && fin && m0 < nmix)
            mix[m0] = a0 * red;
        if (lane == 0 && fin && m1 < nmix)
            mix[m1] = a1 * red;
        for (int m = m1 + NT / 32; fin && m < nmix; m += NT / 32) {
            float v = part[((size_t)i * HCF_SLICES + lane) * nmix + m];
#pragma unroll
            for (int o = 16; o; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0)
                mix[m] = v * red;
        }
    }
    __syncthreads();
    if (head) {
        if (threadIdx.x < n)
            pre[threadIdx.x] = ex_sigmoid(mix[threadIdx.x] * zs + zb) + hc_eps;
        __syncthreads();
    } else if (n == 4) {
        if (threadIdx.x < nmix) /* the gates' inputs */
            mix[threadIdx.x] = mix[threadIdx.x] * zs + zb;
        __syncthreads();
        if (threadIdx.x == NT) { /* post and comb (Sinkhorn) beside the collapse, or (raw) their
                                  * inputs for kern_hc_post_raw */
            if (raw) {
#pragma unroll
                for (int j = 0; j < 4; j++)
                    post_out[(size_t)i * 4 + j] = mix[4 + j];
#pragma unroll
                for (int j = 0; j < 16; j++)
                    comb_out[(size_t)i * 16 + j] = mix[8 + j];
            } else {
                hcf_gates4(mix, iters, hc_eps, post_out + (size_t)i * n,
                           comb_out + (size_t)i * n * n);
            }
        }
        if (threadIdx.x < 4)
            pre[threadIdx.x] = 1.0f / (1.0f + expf(-mix[threadIdx.x])) + hc_eps;
        if (fin)
            asm volatile("bar.sync 1, %0;\n" ::"n"(NT) : "memory");
    } else {
        ex_hc_gates(mix, n, base, scale, iters, hc_eps, pre, post_out + (size_t)i * n, comb,
                    comb_out + (size_t)i * n * n);
    }
    if (!fin)
        return;
    float us = 0.0f; /* 4 columns per thread and step (d % 4 == 0) */
    if (CJ > 0) {
        float4 acc[CJ > 0 ? CJ : 1];
#pragma unroll
        for (int j = 0; j < CJ; j++) {
            acc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                acc[j].x += pre[k] * xr[k][j].x;
                acc[j].y += pre[k] * xr[k][j].y;
                acc[j].z += pre[k] * xr[k][j].z;
                acc[j].w += pre[k] * xr[k][j].w;
            }
            us += acc[j].x * acc[j].x + acc[j].y * acc[j].y + acc[j].z * acc[j].z +
                  acc[j].w * acc[j].w;
        }
        const float r = 1.0f / sqrtf(hcf_fin_sum(us, sm) / (float)d + norm_eps);
#pragma unroll
        for (int j = 0; j < CJ; j++) {
            const int c = threadIdx.x + NT * j;
            if (c < d4) /* (w: ones where absent) */
                hcf_put(out, xb, i, d, c,
                        make_float4(wr[j].x * (acc[j].x * r), wr[j].y * (acc[j].y * r),
                                    wr[j].z * (acc[j].z * r), wr[j].w * (acc[j].w * r)));
        }
        return;
    }
    float4 *u4 = (float4 *)u;
#pragma unroll 2
    for (int c = threadIdx.x; c < d4; c += NT) {
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int k = 0; k < n; k++) {
            const float4 x = ((const float4 *)(Xt + (size_t)k * d))[c];
            acc.x += pre[k] * x.x;
            acc.y += pre[k] * x.y;
            acc.z += pre[k] * x.z;
            acc.w += pre[k] * x.w;
        }
        u4[c] = acc;
        us += acc.x * acc.x + acc.y * acc.y + acc.z * acc.z + acc.w * acc.w;
    }
    const float r = 1.0f / sqrtf(hcf_fin_sum(us, sm) / (float)d + norm_eps);
    for (int c = threadIdx.x; c < d4; c += NT) {
        const float4 v = u4[c];
        float4 o = make_float4(v.x * r, v.y * r, v.z * r, v.w * r);
        if (w) {
            const float4 g = ((const float4 *)w)[c];
            o = make_float4(g.x * o.x, g.y * o.y, g.z * o.z, g.w * o.w);
        }
        hcf_put(out, xb, i, d, c, o);
    }
}

/* The rows the head reads, gathered: G (nsel, len) = X rows[i]. */
__global__ void hcf_gather_k(const float *__restrict__ X, const int32_t *__restrict__ rows, int len,
                             float *__restrict__ G)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const float *src = X + (size_t)rows[blockIdx.y] * len;
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < len; k += gridDim.x * blockDim.x)
        G[(size_t)blockIdx.y * len + k] = src[k];
}

/* mix projection + finish over T rows of X. */
static int hcf_run(const float *X, int T, int n, int d, const float *fn, int nmix,
                   const float *base, const float *scale, int iters, float hc_eps, float norm_eps,
                   const float *w, int head, int raw, float *part, float *out, uint16_t *xb,
                   float *post, float *comb, cudaStream_t st)
{
    const int len = n * d;
    if (n > HCF_MAX || n < 1 || len % HCF_SLICES || d % 4 ||
        (T + HCF_ROWS - 1) / HCF_ROWS > 65535 || (xb && d % 128))
        return ERR_UNSUPPORTED;
    if (T <= 0)
        return 0;
    const int sl = len / HCF_SLICES;
    const int small = T <= HCF_SMALL_T && nmix <= 3 * (HCF_THREADS / 32) && sl % 32 == 0 &&
                      sl <= 32 * HCF_SMALL_PER;
    if (kern__launch(small ? hcf_mix_small_k : hcf_mix_part_k,
                     dim3(HCF_SLICES, (unsigned)((T + HCF_ROWS - 1) / HCF_ROWS)), HCF_THREADS, 0,
                     st, 1, X, T, len, fn, nmix, part))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    const int cj = n == 4 ? (d / 4 + HCF_FIN_THREADS - 1) / HCF_FIN_THREADS : 0;
    void (*fk)(const float *, int, int, const float *, int, const float *, const float *, int,
               float, float, const float *, int, int, float *, __nv_bfloat16 *, float *, float *) =
        cj == 1   ? hcf_finish_k<1>
        : cj == 2 ? hcf_finish_k<2>
        : cj == 3 ? hcf_finish_k<3>
                  : hcf_finish_k<0>; /* (at 4, 20 bytes of the registers spill) */
    /* (CJ > 0 keeps u in registers, no shared copy) */
    if (kern__launch(fk, T, HCF_FIN_THREADS + 32,
                     cj >= 1 && cj <= 3 ? 0 : sizeof(float) * (size_t)d, st, 1, X, n, d, part, nmix,
                     base, scale, iters, hc_eps, norm_eps, w, head, raw, out, (__nv_bfloat16 *)xb,
                     post, comb))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

extern "C" size_t kern_hc_fast_ws_floats(int T, int n_hc)
{
    return (size_t)T * HCF_SLICES * (2 + n_hc) * n_hc;
}

extern "C" int kern_hc_pre_fast(const float *X, int T, int n_hc, int d, const float *fn,
                                const float *base, const float *scale, int iters, float hc_eps,
                                float norm_eps, const float *norm_w, float *ws, float *x,
                                uint16_t *xb, float *post, float *comb, cudaStream_t st)
{
    return hcf_run(X, T, n_hc, d, fn, (2 + n_hc) * n_hc, base, scale, iters, hc_eps, norm_eps,
                   norm_w, 0, 0, ws, x, xb, post, comb, st);
}

extern "C" int kern_hc_pre_fast_raw(const float *X, int T, int n_hc, int d, const float *fn,
                                    const float *base, const float *scale, float hc_eps,
                                    float norm_eps, const float *norm_w, float *ws, float *x,
                                    uint16_t *xb, float *zpost, float *zcomb, cudaStream_t st)
{
    if (n_hc != 4)
        return ERR_UNSUPPORTED;
    return hcf_run(X, T, n_hc, d, fn, (2 + n_hc) * n_hc, base, scale, 0, hc_eps, norm_eps, norm_w,
                   0, 1, ws, x, xb, zpost, zcomb, st);
}

extern "C" int kern_hc_head_fast(const float *X, const int32_t *rows, int nsel, int n_hc, int d,
                                 const float *fn, const float *base, const float *scale,
                                 float hc_eps, float norm_eps, const float *norm_w,
                                 float *gather_ws, float *ws, float *y, cudaStream_t st)
{
    if (nsel <= 0)
        return 0;
    if (nsel > 65535)
        return ERR_UNSUPPORTED;
    const int len = n_hc * d;
    if (kern__launch(hcf_gather_k, dim3(16, (unsigned)nsel), HCF_THREADS, 0, st, 1, X, rows, len,
                     gather_ws))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return hcf_run(gather_ws, nsel, n_hc, d, fn, n_hc, base, scale, 0, hc_eps, norm_eps, norm_w, 1,
                   0, ws, y, NULL, NULL, NULL, st);
}
