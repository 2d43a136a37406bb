/*
 * moe_route.cu - the MoE router on the GPU: gate GEMM in FP32 (logits = x . W_gate^T, BF16
 * weights widened exactly), s = sqrt(softplus(logits)), then per token either the hash lookup
 * (tid2eid) or the top-K of s + bias, and the weights s[id] / sum s * route_scale (applied
 * once, here only). Matches kernels/cpu/moe.c cpu_route up to FP32 summation order.
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/cuda/moe_internal.cuh"

#include <math.h>

/* ---- logits ---- */

/*
 * Small T: two warps per expert (each over half of d, all of a lane's weight loads issued
 * before the first use), 4 experts and 8 tokens per block; W read once per 8 tokens.
 */
__global__ void __launch_bounds__(256)
    moe_logits_warp(const float *__restrict__ x,                     /* (T, d) */
                    const uint16_t *__restrict__ W,                  /* (E, d) */
                    int T, int d, int E, float *__restrict__ logits, /* (T, E) */
                    __nv_bfloat16 *__restrict__ xb /* (T, d) or NULL */)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float part[4][8];
    if (xb && blockIdx.x == 0) { /* the BF16 copy of this block's 8 rows for the experts */
        const int t0b = blockIdx.y * 8, nt = min(8, T - t0b);
        for (int i = threadIdx.x; i < nt * d / 4; i += blockDim.x) {
            float4 v = __ldg((const float4 *)(x + (size_t)t0b * d) + i);
            __nv_bfloat162 *o = (__nv_bfloat162 *)(xb + (size_t)t0b * d) + 2 * i;
            o[0] = __floats2bfloat162_rn(v.x, v.y);
            o[1] = __floats2bfloat162_rn(v.z, v.w);
        }
    }
    const int wi = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int el = wi >> 1, half = wi & 1, e = blockIdx.x * 4 + el;
    const int t0 = blockIdx.y * 8;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
        acc[i] = 0.0f;
    const int n8 = d / 16; /* uint4 (8 BF16) per half row; d % 256 == 0 */
    const uint4 *wr = (const uint4 *)(W + (size_t)e * d) + half * n8;
    for (int base = 0; base < n8; base += 8 * 32) {
        uint4 wv[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k8 = base + u * 32 + lane;
            wv[u] = (e < E && k8 < n8) ? __ldg(wr + k8) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int k8 = base + u * 32 + lane;
            if (k8 >= n8)
                break;
            float wf[8];
            uint32_t uu[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                wf[2 * i] = __uint_as_float(uu[i] << 16);
                wf[2 * i + 1] = __uint_as_float(uu[i] & 0xffff0000u);
            }
#pragma unroll
            for (int t = 0; t < 8; t++) {
                if (t0 + t >= T)
                    break;
                const float4 *xr =
                    (const float4 *)(x + (size_t)(t0 + t) * d + (size_t)half * n8 * 8) + 2 * k8;
                float4 a = __ldg(xr), b = __ldg(xr + 1);
                acc[t] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x +
                          wf[5] * b.y + wf[6] * b.z + wf[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[t] = v;
    }
    if (half == 1 && lane == 0)
#pragma unroll
        for (int t = 0; t < 8; t++)
            part[el][t] = acc[t];
    __syncthreads();
    if (half == 0 && lane == 0 && e < E)
#pragma unroll
        for (int t = 0; t < 8; t++)
            if (t0 + t < T)
                logits[(size_t)(t0 + t) * E + e] = acc[t] + part[el][t];
}

/* Large T: 64 tokens x 64 experts per block, 4x4 per thread, K chunks of 16 through smem. */
__global__ void __launch_bounds__(256)
    moe_logits_tiled(const float *__restrict__ x,    /* (T, d) */
                     const uint16_t *__restrict__ W, /* (E, d) */
                     int T, int d, int E, float *__restrict__ logits /* (T, E) */)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float xs[16][68];
    __shared__ float ws[16][68];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int t0 = blockIdx.y * 64, e0 = blockIdx.x * 64;
    float acc[4][4] = {};
    const int lr = tid >> 2, lk = (tid & 3) * 4; /* loader: row lr, k lk..lk+3 */
    const int xt = min(t0 + lr, T - 1);
    for (int k0 = 0; k0 < d; k0 += 16) {
        float4 xv = __ldg((const float4 *)(x + (size_t)xt * d + k0 + lk));
        uint2 wv = __ldg((const uint2 *)(W + (size_t)(e0 + lr) * d + k0 + lk));
        xs[lk + 0][lr] = xv.x;
        xs[lk + 1][lr] = xv.y;
        xs[lk + 2][lr] = xv.z;
        xs[lk + 3][lr] = xv.w;
        ws[lk + 0][lr] = __uint_as_float(wv.x << 16);
        ws[lk + 1][lr] = __uint_as_float(wv.x & 0xffff0000u);
        ws[lk + 2][lr] = __uint_as_float(wv.y << 16);
        ws[lk + 3][lr] = __uint_as_float(wv.y & 0xffff0000u);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 16; kk++) {
            float4 a = *(const float4 *)&xs[kk][ty * 4];
            float4 b = *(const float4 *)&ws[kk][tx * 4];
            float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = t0 + ty * 4 + i;
        if (t < T)
            *(float4 *)(logits + (size_t)t * E + e0 + tx * 4) =
                make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
}

int moe__logits(const struct kern_moe_layer *L, const float *x, int T, float *logits,
                __nv_bfloat16 *xb, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (L->d % 256 || L->E % 64)
        return ERR_UNSUPPORTED;
    if (T <= 64) {
        dim3 grid((L->E + 3) / 4, (T + 7) / 8);
        if (kern__launch(moe_logits_warp, grid, 256, 0, st, 1, x, L->gate_w, T, L->d, L->E, logits,
                         xb))
            return ERR_CUDA;
    } else {
        dim3 grid(L->E / 64, (T + 63) / 64);
        if (kern__launch(moe_logits_tiled, grid, 256, 0, st, 1, x, L->gate_w, T, L->d, L->E,
                         logits))
            return ERR_CUDA;
    }
    KERN_LAUNCH_CHECK();
    return 0;
}

/* ---- top-K / hash ---- */

/* One warp per token. */
__global__ void __launch_bounds__(256)
    moe_topk(const float *__restrict__ logits,                    /* (T, E) */
             int T, int E, int K, const float *__restrict__ bias, /* (E) or NULL */
             const int32_t *__restrict__ tid2eid,                 /* (V, K) */
             int vocab, const int32_t *__restrict__ tokens,       /* (T) */
             float route_scale, int32_t *__restrict__ idx,        /* (T, K) */
             float *__restrict__ w /* (T, K) */)
{
    const int t = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    kern__pdl_wait();
    kern__pdl_launch();
    if (t >= T)
        return;
    moe__topk_token(t, lane, logits, E, K, bias, tid2eid, vocab, tokens, route_scale, idx, w);
}

int moe__topk(const struct kern_moe_layer *L, const float *logits, const int32_t *tokens, int T,
              int32_t *idx, float *w, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (L->K > 32 || L->E % 32 || L->E > 32 * MOE_MAX_EPL || (!L->tid2eid && !L->gate_bias))
        return ERR_UNSUPPORTED;
    return kern__launch(moe_topk, dim3((T + 7) / 8), dim3(256), 0, st, 1, logits, T, L->E, L->K,
                        L->gate_bias, L->tid2eid, L->vocab, tokens, L->route_scale, idx, w);
}

extern "C" int kern_moe_route(const struct kern_moe_layer *L, const float *x, const int32_t *tokens,
                              int T, int32_t *idx, float *w, void *ws, size_t ws_bytes,
                              struct CUstream_st *stream)
{
    struct moe_ws lay = moe__ws_layout(L, T, ws);
    if (!ws || ws_bytes < lay.bytes)
        return ERR_INVAL;
    int rc = moe__logits(L, x, T, lay.logits, NULL, stream);
    return rc ? rc : moe__topk(L, lay.logits, tokens, T, idx, w, stream);
}
