/*
 * moe_route.cu - the MoE router on the GPU: gate GEMM to FP32 accuracy (logits = x . W_gate^T,
 * BF16 weights exact; small T on the CUDA cores in FP32, larger T on the tensor cores with x in
 * three BF16 terms), s = sqrt(softplus(logits)), then per token either the hash lookup
 * (tid2eid) or the top-K of s + bias, and the weights s[id] / sum s * route_scale (applied
 * once, here only). Matches kernels/cpu/moe.c cpu_route up to FP32 summation order.
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/cuda/moe_internal.cuh"

#include "kernels/cuda/moe_gemm.cuh"

#include <math.h>

/* ---- logits ---- */

/* xb rows t0 .. t0 + nt = x's in BF16 (the experts' input for small T), shared by the blocks
 * of one grid row (this one does every gridDim.x-th 4-column piece): on one block alone, its
 * serial loop had set the kernel's length (Flash T = 4: ~16 rounds of memory latency). */
__device__ __forceinline__ void x_to_bf16(const float *__restrict__ x, int t0, int nt, int d,
                                          __nv_bfloat16 *__restrict__ xb)
{
    const int n = nt * d / 4, step = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const float4 v = __ldg((const float4 *)(x + (size_t)t0 * d) + i);
        __nv_bfloat162 *o = (__nv_bfloat162 *)(xb + (size_t)t0 * d) + 2 * i;
        o[0] = __floats2bfloat162_rn(v.x, v.y);
        o[1] = __floats2bfloat162_rn(v.z, v.w);
    }
}

/*
 * Small T: one expert per block, its 8 warps each over d / 8 (all of a lane's weight loads
 * issued before the first use: 2 (Flash) or 4 (Pro) 16-byte loads; with two warps per expert
 * and 4 experts per block, ptxas had interleaved a lane's 8-14 weight loads with their uses,
 * round trip after round trip), TT <= 8 tokens per block; W read once per TT tokens; the 8
 * partial sums added in warp order.
 */
template <int TT>
__global__ void __launch_bounds__(256)
    moe_logits_warp(const float *__restrict__ x,                     /* (T, d) */
                    const uint16_t *__restrict__ W,                  /* (E, d) */
                    int T, int d, int E, float *__restrict__ logits, /* (T, E) */
                    __nv_bfloat16 *__restrict__ xb /* (T, d) or NULL */)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float part[8][TT];
    if (xb) /* the BF16 copy of this grid row's tokens for the experts */
        x_to_bf16(x, blockIdx.y * TT, min(TT, T - (int)blockIdx.y * TT), d, xb);
    const int wi = threadIdx.x >> 5, lane = threadIdx.x & 31, e = blockIdx.x;
    const int t0 = blockIdx.y * TT;
    float acc[TT];
#pragma unroll
    for (int i = 0; i < TT; i++)
        acc[i] = 0.0f;
    const int n8 = d / 64; /* uint4 (8 BF16) per warp's eighth of a row; d % 256 == 0 */
    const uint4 *wr = (const uint4 *)(W + (size_t)e * d) + wi * n8;
    const float *xw = x + (size_t)wi * n8 * 8;
    for (int base = 0; base < n8; base += 4 * 32) {
        /* columns past the warp's part read a valid element (discarded): no load is predicated.
         * No early exits below either: every x load is independent of the others, so they are
         * all issued together (rows past T read a valid row, discarded); with a break per token
         * they were issued token by token (bench_moe_gpu, H100, 4 runs each, layer us: Flash
         * T = 4 / 16 154.9 / 446.5 -> 153.1 / 444.0, Pro 354.9 / 1089.3 -> 351.9 / 1084.1) */
        uint4 wv[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
            wv[u] = __ldg(wr + min(base + u * 32 + lane, n8 - 1));
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int k8 = base + u * 32 + lane, k8c = min(k8, n8 - 1);
            float wf[8];
            uint32_t uu[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                wf[2 * i] = __uint_as_float(uu[i] << 16);
                wf[2 * i + 1] = __uint_as_float(uu[i] & 0xffff0000u);
            }
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float4 *xr = (const float4 *)(xw + (size_t)min(t0 + t, T - 1) * d) + 2 * k8c;
                float4 a = __ldg(xr), b = __ldg(xr + 1);
                float s = wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x +
                          wf[5] * b.y + wf[6] * b.z + wf[7] * b.w;
                if (k8 < n8)
                    acc[t] += s;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float v = acc[t];
#pragma unroll
        for (int o = 16; o; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0)
            part[wi][t] = v;
    }
    __syncthreads();
    if (threadIdx.x < TT && t0 + (int)threadIdx.x < T) {
        const int t = threadIdx.x;
        float v = part[0][t];
#pragma unroll
        for (int w = 1; w < 8; w++)
            v += part[w][t];
        logits[(size_t)(t0 + t) * E + e] = v;
    }
}

/* x (two FP32 values) -> three BF16x2 terms hi + mid + lo that sum to x to ~24 bits. */
__device__ __forceinline__ void split3(float x0, float x1, uint32_t &h, uint32_t &m, uint32_t &l)
{
    const __nv_bfloat162 hb = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(hb);
    const float r0 = x0 - hf.x, r1 = x1 - hf.y;
    const __nv_bfloat162 mb = __floats2bfloat162_rn(r0, r1);
    const float2 mf = __bfloat1622float2(mb);
    const __nv_bfloat162 lb = __floats2bfloat162_rn(r0 - mf.x, r1 - mf.y);
    h = *(const uint32_t *)&hb;
    m = *(const uint32_t *)&mb;
    l = *(const uint32_t *)&lb;
}

/*
 * Gate logits on the tensor cores: logits (T, E) = x (T, d) . W^T. W is BF16 (an exact MMA
 * operand); x is split into three BF16 terms (hi + mid + lo: x to ~24 bits), three mma.sync
 * m16n8k16 per k-step, FP32 sums: FP32 accuracy in another summation order than the CPU's.
 * Block: 16 experts x 8 NTT tokens, 8 warps each over d / 8 (a lane's k-slots 2c, 2c+1, 2c+8,
 * 2c+9 are the columns 4c..4c+3 of a 16-column step, so A and B come in 8- and 16-byte loads);
 * the warps' sums are added in warp order (deterministic). With xb (small T), the blocks of
 * each token group also write its x in BF16 for the experts (x_to_bf16).
 */
template <int NTT>
__global__ void __launch_bounds__(256)
    moe_logits_mma(const float *__restrict__ x,                     /* (T, d) */
                   const uint16_t *__restrict__ W,                  /* (E, d) */
                   int T, int d, int E, float *__restrict__ logits, /* (T, E) */
                   __nv_bfloat16 *__restrict__ xb /* (T, d) or NULL */)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ float red[7][NTT][4][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int e0 = blockIdx.x * 16, t0 = blockIdx.y * 8 * NTT;
    if (xb) /* the BF16 copy of this grid row's tokens for the experts */
        x_to_bf16(x, t0, min(8 * NTT, T - t0), d, xb);
    const int kper = d / 8, kb = warp * kper;
    const uint16_t *wa = W + (size_t)(e0 + g) * d + kb + 4 * c, *wb = wa + (size_t)8 * d;
    const float *xr[NTT];
    float acc[NTT][4];
#pragma unroll
    for (int n = 0; n < NTT; n++) {
        xr[n] = x + (size_t)min(t0 + 8 * n + g, T - 1) * d + kb + 4 * c;
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    }
#pragma unroll 2
    for (int k = 0; k < kper; k += 16) {
        const uint2 a0 = __ldg((const uint2 *)(wa + k)), a1 = __ldg((const uint2 *)(wb + k));
#pragma unroll
        for (int n = 0; n < NTT; n++) {
            const float4 v = __ldg((const float4 *)(xr[n] + k));
            uint32_t h0, m0, l0, h1, m1, l1;
            split3(v.x, v.y, h0, m0, l0);
            split3(v.z, v.w, h1, m1, l1);
            kern__mma_bf16(acc[n], a0.x, a1.x, a0.y, a1.y, h0, h1);
            kern__mma_bf16(acc[n], a0.x, a1.x, a0.y, a1.y, m0, m1);
            kern__mma_bf16(acc[n], a0.x, a1.x, a0.y, a1.y, l0, l1);
        }
    }
    if (warp > 0)
#pragma unroll
        for (int n = 0; n < NTT; n++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                red[warp - 1][n][i][lane] = acc[n][i];
    __syncthreads();
    if (warp > 0)
        return;
#pragma unroll
    for (int n = 0; n < NTT; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float v = acc[n][i];
            for (int w = 0; w < 7; w++)
                v += red[w][n][i][lane];
            /* C fragment: (expert e0 + g (+8 for i >= 2), token t0 + 8n + 2c + (i & 1)) */
            const int t = t0 + 8 * n + 2 * c + (i & 1), e = e0 + g + (i >= 2 ? 8 : 0);
            if (t < T)
                logits[(size_t)t * E + e] = v;
        }
}

/*
 * Gate logits for long steps (T >= LG_LONG_T): block = 64 tokens x 128 experts (blockIdx.x: which
 * 128, so the blocks of one token group run together and share its x in L2); warp w = tokens
 * 32 (w >> 2) .. + 31 x experts 32 (w & 3) .. + 31, each over all of d. Per 64-column chunk the
 * block splits its x rows into the three BF16 terms once, into shared memory (moe_logits_mma
 * splits and reads every x element once per 16 experts), and W's chunk comes by cp.async one
 * chunk ahead. A chunk's 12 MMAs per logit (4 k-steps, hi, mid and lo) go to a fresh
 * accumulator that is then added to the FP32 sum: one tensor-core accumulator over all of d
 * (768 MMAs at Flash) had 3-5x the weight error of the tile kernel (router weights 1.3-2.8e-5
 * relative against the FP64 reference at T = 4096, H100). Shared rows are LG_ROWB = 160 bytes
 * (128 of data), so a warp's 8-byte fragment loads (8 rows x 4 column quads) hit distinct banks.
 */
#define LG_ROWB   160
#define LG_E      128 /* experts a block */
#define LG_LONG_T 4096

static const size_t lg_smem = (size_t)(3 * 64 + 2 * LG_E) * LG_ROWB;

__global__ void __launch_bounds__(256)
    moe_logits_long(const float *__restrict__ x,                     /* (T, d) */
                    const uint16_t *__restrict__ W,                  /* (E, d) */
                    int T, int d, int E, float *__restrict__ logits, /* (T, E) */
                    __nv_bfloat16 *__restrict__ xb /* (T, d) perm64 order, or NULL */)
{
    extern __shared__ __align__(16) char lg_sm[];
    char *xs = lg_sm;                     /* [3 terms][64 tokens][LG_ROWB] */
    char *wsm = lg_sm + 3 * 64 * LG_ROWB; /* [2 chunks][LG_E][LG_ROWB] */
    kern__pdl_wait();
    kern__pdl_launch();
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int t0 = blockIdx.y * 64, e0 = blockIdx.x * LG_E, nch = d / 64;
    /* staging: thread -> token tid >> 2 (rows past T repeat the last; not stored), columns
     * 16 (tid & 3) .. + 15 of the chunk */
    const int st_tok = tid >> 2, st_col = 16 * (tid & 3);
    const float *xsrc = x + (size_t)min(t0 + st_tok, T - 1) * d + st_col;
    const uint16_t *wsrc = W + (size_t)e0 * d;
    __nv_bfloat16 *xbrow =
        xb && blockIdx.x == 0 && t0 + st_tok < T ? xb + (size_t)(t0 + st_tok) * d : NULL;
    float4 xr[4];
    auto load = [&](int ch) {
        char *dst = wsm + (ch & 1) * LG_E * LG_ROWB;
#pragma unroll
        for (int i = tid; i < LG_E * 8; i += 256)
            cp_async16(dst + (i >> 3) * LG_ROWB + (i & 7) * 16,
                       wsrc + (size_t)(i >> 3) * d + ch * 64 + (i & 7) * 8, 16);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < 4; i++)
            xr[i] = __ldg((const float4 *)(xsrc + ch * 64) + i);
    };
    const int tb = 32 * (warp >> 2), eb = 32 * (warp & 3);
    float sum[2][4][4] = {};
    load(0);
    for (int ch = 0; ch < nch; ch++) {
        { /* this chunk's x terms (the previous chunk's readers are past the last barrier) */
            uint32_t t[3][8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                split3(xr[i].x, xr[i].y, t[0][2 * i], t[1][2 * i], t[2][2 * i]);
                split3(xr[i].z, xr[i].w, t[0][2 * i + 1], t[1][2 * i + 1], t[2][2 * i + 1]);
            }
#pragma unroll
            for (int j = 0; j < 3; j++) {
                uint4 *row = (uint4 *)(xs + (j * 64 + st_tok) * LG_ROWB + st_col * 2);
                row[0] = make_uint4(t[j][0], t[j][1], t[j][2], t[j][3]);
                row[1] = make_uint4(t[j][4], t[j][5], t[j][6], t[j][7]);
            }
            if (xbrow) /* hi = x rounded to BF16: the experts' copy, pairs placed by perm64 */
#pragma unroll
                for (int i = 0; i < 8; i++)
                    *(uint32_t *)(xbrow + perm64(ch * 64 + st_col + 2 * i)) = t[0][i];
        }
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();
        if (ch + 1 < nch)
            load(ch + 1);
        const char *wb = wsm + (ch & 1) * LG_E * LG_ROWB;
        float acc[2][4][4] = {};
#pragma unroll
        for (int s = 0; s < 4; s++) {
            uint2 a[2][2];
#pragma unroll
            for (int m = 0; m < 2; m++) {
                const char *r = wb + (eb + 16 * m + g) * LG_ROWB + 32 * s + 8 * c;
                a[m][0] = *(const uint2 *)r;
                a[m][1] = *(const uint2 *)(r + 8 * LG_ROWB);
            }
#pragma unroll
            for (int j = 0; j < 3; j++) {
                uint2 b[4];
#pragma unroll
                for (int n = 0; n < 4; n++)
                    b[n] =
                        *(const uint2 *)(xs + (j * 64 + tb + 8 * n + g) * LG_ROWB + 32 * s + 8 * c);
#pragma unroll
                for (int m = 0; m < 2; m++)
#pragma unroll
                    for (int n = 0; n < 4; n++)
                        kern__mma_bf16(acc[m][n], a[m][0].x, a[m][1].x, a[m][0].y, a[m][1].y,
                                       b[n].x, b[n].y);
            }
        }
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    sum[m][n][i] += acc[m][n][i];
        __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                /* C fragment: (expert + g (+8 for i >= 2), token + 2c + (i & 1)) */
                const int t = t0 + tb + 8 * n + 2 * c + (i & 1),
                          e = e0 + eb + 16 * m + g + (i & 2) * 4;
                if (t < T)
                    logits[(size_t)t * E + e] = sum[m][n][i];
            }
}

int moe__logits_prepare(void)
{
    KERN_CHECK(cudaFuncSetAttribute(moe_logits_long, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)lg_smem));
    return 0;
}

int moe__logits_long(const struct kern_moe_layer *L, int T)
{
    return T >= LG_LONG_T && L->E % LG_E == 0;
}

int moe__logits(const struct kern_moe_layer *L, const float *x, int T, float *logits,
                __nv_bfloat16 *xb, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (L->d % 256 || L->E % 64)
        return ERR_UNSUPPORTED;
    /* T <= 32: the CUDA-core kernel (more blocks: the MMA kernel has E / 16 per 8 tokens and
     * was 5 us slower at T = 1, H100); then 8-token MMA tiles while they fill the GPU (and for
     * xb, written per tile), else 32 (bench_moe_gpu, H100, Flash layer at T = 64 / 256 / 8192:
     * 1056 / 1769 / 8829 us with the CUDA-core kernels, 1045 / 1561 / 8680 with these) */
    int r;
    if (T <= 32) { /* TT = the block's tokens (its x loads, all in flight at once) */
        void (*k)(const float *, const uint16_t *, int, int, int, float *, __nv_bfloat16 *) =
            T == 1 ? moe_logits_warp<1>
                   : (T == 2 ? moe_logits_warp<2>
                             : (T <= 4 ? moe_logits_warp<4> : moe_logits_warp<8>));
        r = kern__launch(k, dim3(L->E, (T + 7) / 8), 256, 0, st, 1, x, L->gate_w, T, L->d, L->E,
                         logits, xb);
    } else if (moe__logits_long(L, T)) {
        if ((r = kern_moe_prepare()))
            return r;
        r = kern__launch(moe_logits_long, dim3(L->E / LG_E, (T + 63) / 64), 256, lg_smem, st, 1, x,
                         L->gate_w, T, L->d, L->E, logits, xb);
    } else if (xb || T <= 256)
        r = kern__launch(moe_logits_mma<1>, dim3(L->E / 16, (T + 7) / 8), 256, 0, st, 1, x,
                         L->gate_w, T, L->d, L->E, logits, xb);
    else
        r = kern__launch(moe_logits_mma<4>, dim3(L->E / 16, (T + 31) / 32), 256, 0, st, 1, x,
                         L->gate_w, T, L->d, L->E, logits, (__nv_bfloat16 *)NULL);
    if (r)
        return ERR_CUDA;
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
