/*
 * attention_dec.cu - the fast path's sink attention for decode steps of a few rows (batch 1 at
 * 64 heads) over FP8 cache entries at head size 512: a cluster of two blocks per (row, head),
 * no merge launch. The tensor-core kernel (attention_fast.cu) needs 16 heads of a row per block
 * and, at one row, splits the keys over 4-20 blocks and merges them in a second launch
 * (batch 1: 13.5 us of the step in an SWA layer, 16 in a CSA one; this kernel 7.5 and 12.5,
 * tests/gpu/ENGINE_RESULTS.md). Here each block of a head's pair walks half of the row's keys
 * (window + selected / compressed entries, the same keys as attention.cu) on the CUDA cores in
 * FP32, and the two exchange maxima, sums and outputs through distributed shared memory:
 *
 *   0. before the dependency wait: the window entries' addresses and scale bytes (entries of
 *      earlier steps: this step's entry goes to a slot outside the window, or is written after
 *      the attention) and their lines into L1;
 *   1. the compressed entries' addresses (a thread per key) in list order: the FP8 entries
 *      first, then this step's FP32 latents; each entry's scale bytes into shared memory;
 *   2. the logits: a warp per key, a lane per 16 code dims (their scale applied to the partial
 *      dot) and 2 BF16 RoPE dims, every lane on the same path; 8 keys' loads in flight, then
 *      the 8 partial dots summed over the lanes in one transposing shuffle tree (9 shuffles);
 *   3. the softmax with the sink, in a fixed order (the cluster's maximum, exp, sums by warp in
 *      order), and a table of weight x scale per (key, scale group);
 *   4. the output: a thread per 4 code columns (or 2 RoPE columns) and a share of the keys
 *      (the entries are L1 hits by now), the shares summed in order through shared memory,
 *      then the two blocks' sums (block 0's + block 1's) by the block that writes the column
 *      pair: normalised, the inverse RoPE of the rotated dims, written as FP32 and as wo_a's
 *      BF16 hi + lo input.
 *
 * Numerics: FP32 products and sums throughout (orders differ from the exact kernel; nothing
 * else does): the same bound as the other fast kernels (test_attention_gpu, 1e-4 relative).
 */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#include <cooperative_groups.h>

#include <stdlib.h>
#include <string.h>

#define ADEC_HD   512            /* head size */
#define ADEC_NT   512            /* threads a block */
#define ADEC_NW   (ADEC_NT / 32) /* warps a block */
#define ADEC_KB   8              /* keys a warp loads before it uses any (logits) */
#define ADEC_VB   8              /* keys a thread loads before it uses any (output) */
#define ADEC_MAXK 768            /* keys a row at most (shared memory) */
#define ADEC_NG   8              /* FP8 scale groups of an entry at most (nope <= 448) */

/* 2^(b - 127), the UE8M0 scale byte b (kvf_scale without the libm call) */
__device__ __forceinline__ float adec_scale(uint32_t b)
{
    return b ? __uint_as_float(b << 23) : __uint_as_float(0x00400000u);
}

/* Two E4M3 codes (the low 16 bits of w) as floats. */
__device__ __forceinline__ float2 adec_e4m3x2(uint32_t w)
{
    return __half22float2(
        __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w & 0xffffu), __NV_E4M3)));
}

/* Two BF16 (a word) as floats. */
__device__ __forceinline__ float2 adec_bf16x2(uint32_t w)
{
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

/*
 * The sums over the warp's lanes of 8 values v[u] (one per key u), in a transposing tree: after
 * it, lane l holds the sum of v[l >> 2] (the same in its group of 4 lanes). 9 shuffles for 8
 * sums instead of 40.
 */
__device__ __forceinline__ float adec_sum8(const float (&v)[8], int lane)
{
    float e[4], f[2];
    const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
    for (int k = 0; k < 4; k++) { /* keep keys 4 b4 + k, send the others */
        const float keep = b4 ? v[k + 4] : v[k], send = b4 ? v[k] : v[k + 4];
        e[k] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
#pragma unroll
    for (int k = 0; k < 2; k++) { /* keys 4 b4 + 2 b3 + k */
        const float keep = b3 ? e[k + 2] : e[k], send = b3 ? e[k] : e[k + 2];
        f[k] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    const float keep = b2 ? f[1] : f[0], send = b2 ? f[0] : f[1]; /* key lane >> 2 */
    float g = keep + __shfl_xor_sync(0xffffffffu, send, 4);
    g += __shfl_xor_sync(0xffffffffu, g, 2);
    return g + __shfl_xor_sync(0xffffffffu, g, 1);
}

/*
 * grid (2, H, T) in clusters of 2 (2, 1, 1), ADEC_NT threads. q (T, H, 512) FP32; kv (T, 512)
 * this step's latents; o (T, H, 512) FP32; xb (NULL: not written) o as BF16 hi (rows 0..T) and
 * lo (rows T..2T) of H * 512 columns, as kern_act_bf16 (split, unpermuted) makes them. The
 * launch guarantees: FP8 entries with 448 codes and 64 BF16 RoPE dims (2 per lane, and 2 per
 * thread of the output's last two warps), nk <= ADEC_MAXK.
 *
 * Keys in list order: the row's FP8 entries (window ones, then compressed ones) at 0..nk8, then
 * this step's latents (the window's last nf positions) at nk8..nk. The cluster's block r takes
 * half r of the FP8 entries (block 1 also the latents, block 0 the sink); the blocks exchange
 * their maxima, then their sums and outputs through distributed shared memory, and block r
 * writes the columns of half r. Sums run in list order (block 0's part + block 1's).
 */
__global__ void __launch_bounds__(ADEC_NT, 1)
    attn_dec_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l, const float *q,
               const float *kv, const int32_t *sel, int topk, const float *sinks, int H, int W,
               int rope_dim, const float *inv_freq, float *o, __nv_bfloat16 *xb)
{
    namespace cg = cooperative_groups;
    constexpr int HD = ADEC_HD, NOPE = 448;
    __shared__ const char *kp[ADEC_MAXK];     /* key addresses (this block's list) */
    __shared__ float wsc[ADEC_MAXK][ADEC_NG]; /* weight x scale of group g; [7]: weight */
    __shared__ __align__(16) unsigned char buf[ADEC_MAXK * 12]; /* scb + s, then red */
    __shared__ float wm[ADEC_NW], wsum[ADEC_NW];
    __shared__ float xm, xden;                 /* the peer's maximum, denominator */
    __shared__ float2 xacc[HD / 4];            /* the peer's output pairs of our half */
    uint2 *scb = (uint2 *)buf;                 /* (n8) an entry's 7 scale bytes + pad */
    float *s = (float *)(buf + ADEC_MAXK * 8); /* (nl) logits */
    float(*red)[HD] = (float(*)[HD])buf;       /* (4, HD) the key groups' outputs */
    cg::cluster_group cl = cg::this_cluster();
    const int rank = (int)cl.block_rank(), h = blockIdx.y, t = blockIdx.z, tid = threadIdx.x,
              warp = tid >> 5, lane = tid & 31;
    /* before the dependency wait: the batch (written before the step), the sink, the output
     * pair's inverse rotation */
    const struct att_row a = att_row_of(b, l, t, W, topk);
    const int nk = a.nwin + a.ncomp;
    const long f0 = a.p0 > a.lo ? a.p0 : a.lo; /* first window position that is this step's */
    const int nf = (int)(a.pos - f0 + 1), nw8 = a.nwin - nf, nk8 = nk - nf;
    const int h8 = (nk8 + 1) >> 1, b8 = rank ? h8 : 0, n8 = rank ? nk8 - h8 : h8,
              nl = n8 + (rank ? nf : 0); /* this block's FP8 keys b8.., their count, all keys */
    const float sink = sinks[h];
    /* threads of pairs rank * HD / 4 .. end them: pair tid, its place among the RoPE dims */
    const bool ends = tid / (HD / 4) == rank;
    const int jr = 2 * tid - (HD - rope_dim);
    float2 cs = make_float2(1.0f, 0.0f);
    if (ends && jr >= 0) {
        cs = ex_rope_cs(inv_freq, jr / 2, a.pos);
        cs.y = -cs.y;
    }
    /* the window keys too: entries of earlier steps (this step's go to a slot outside the
     * window, or after the attention) and this step's latents' addresses; their lines into L1 */
    const int32_t *sel_t = sel ? sel + (size_t)t * topk : NULL;
    for (int li = tid; li < nl; li += ADEC_NT) {
        const int i = li < n8 ? b8 + li : nk8 + li - n8; /* in the row's list */
        if (i >= nw8 && i < nk8)
            continue; /* compressed: after the wait */
        int fr;
        const char *p = att_key(b, c, l, a, kv, HD, W, sel_t, i < nk8 ? i : i - nk8 + nw8, &fr);
        kp[li] = p;
        if (li < n8) {
            scb[li] = __ldg((const uint2 *)(p + NOPE));
#pragma unroll
            for (int k = 0; k < 5; k++) /* 584 bytes */
                asm volatile("prefetch.global.L1 [%0];" ::"l"(p + 128 * k));
        }
    }
    kern__pdl_wait();
    kern__pdl_launch();
    /* lane's q: dims 16 lane.. of the codes (zeros past them), RoPE dims NOPE + 2 lane, +1 */
    float qv[16];
    float2 qr;
    {
        const float *qh = q + ((size_t)t * H + h) * HD;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float4 v = 16 * lane < NOPE ? __ldg((const float4 *)(qh + 16 * lane) + k)
                                              : make_float4(0.f, 0.f, 0.f, 0.f);
            qv[4 * k] = v.x, qv[4 * k + 1] = v.y, qv[4 * k + 2] = v.z, qv[4 * k + 3] = v.w;
        }
        qr = __ldg((const float2 *)(qh + NOPE) + lane);
    }
    for (int li = tid; li < n8; li += ADEC_NT) {
        const int i = b8 + li; /* in the row's list */
        if (i < nw8)
            continue;
        int fr;
        const char *p = att_key(b, c, l, a, kv, HD, W, sel_t, i + nf, &fr);
        kp[li] = p;
        scb[li] = __ldg((const uint2 *)(p + NOPE));
    }
    __syncthreads();

    /* logits: warp w takes FP8 keys ADEC_KB w.. (ADEC_KB at a time, the last batch clamped to
     * key n8 - 1, not stored); lanes 28.. read lane 27's codes with q = 0 */
    const float scale = 1.0f / sqrtf((float)HD);
    const int cl16 = (16 * lane < NOPE ? 16 * lane : NOPE - 16), g = cl16 / 64;
    for (int i0 = warp * ADEC_KB; i0 < n8; i0 += ADEC_NW * ADEC_KB) {
        uint2 r0[ADEC_KB], r1[ADEC_KB];
        uint32_t rr[ADEC_KB];
#pragma unroll
        for (int u = 0; u < ADEC_KB; u++) {
            const uint8_t *e = (const uint8_t *)kp[min(i0 + u, n8 - 1)];
            r0[u] = __ldg((const uint2 *)(e + cl16));
            r1[u] = __ldg((const uint2 *)(e + cl16 + 8));
            rr[u] = __ldg((const uint32_t *)(e + kvf_rope_at(NOPE)) + lane);
        }
        float d[ADEC_KB];
#pragma unroll
        for (int u = 0; u < ADEC_KB; u++) {
            const uint2 sb2 = scb[min(i0 + u, n8 - 1)];
            const uint32_t w[4] = {r0[u].x, r0[u].y, r1[u].x, r1[u].y};
            float x = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 lo = adec_e4m3x2(w[k]), hi = adec_e4m3x2(w[k] >> 16);
                x = fmaf(qv[4 * k], lo.x, x);
                x = fmaf(qv[4 * k + 1], lo.y, x);
                x = fmaf(qv[4 * k + 2], hi.x, x);
                x = fmaf(qv[4 * k + 3], hi.y, x);
            }
            const uint32_t sb = (g < 4 ? sb2.x >> (8 * g) : sb2.y >> (8 * (g - 4))) & 0xffu;
            const float2 rv = adec_bf16x2(rr[u]);
            d[u] = fmaf(qr.x, rv.x, fmaf(qr.y, rv.y, x * adec_scale(sb)));
        }
        const float sum = adec_sum8(d, lane);
        const int i = i0 + (lane >> 2);
        if ((lane & 3) == 0 && i < n8)
            s[i] = scale * sum;
    }
    /* this step's latents (FP32): a warp each */
    for (int li = n8 + warp; li < nl; li += ADEC_NW) {
        const float *k = (const float *)kp[li];
        float x = 0.0f;
        if (16 * lane < NOPE) {
#pragma unroll
            for (int k4 = 0; k4 < 4; k4++) {
                const float4 v = __ldg((const float4 *)(k + 16 * lane) + k4);
                x = fmaf(qv[4 * k4], v.x, x);
                x = fmaf(qv[4 * k4 + 1], v.y, x);
                x = fmaf(qv[4 * k4 + 2], v.z, x);
                x = fmaf(qv[4 * k4 + 3], v.w, x);
            }
        }
        const float2 rv = __ldg((const float2 *)(k + NOPE) + lane);
        x = fmaf(qr.x, rv.x, fmaf(qr.y, rv.y, x));
        for (int sh = 16; sh; sh >>= 1)
            x += __shfl_xor_sync(0xffffffffu, x, sh);
        if (lane == 0)
            s[li] = scale * x;
    }
    __syncthreads();

    /* softmax with the sink: the cluster's maximum, weights exp(s - M) (and x each group's
     * scale, for the output), their sum by warps in order */
    float mx = rank ? -INFINITY : sink;
    for (int i = tid; i < nl; i += ADEC_NT)
        mx = fmaxf(mx, s[i]);
    for (int sh = 16; sh; sh >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, sh));
    if (lane == 0)
        wm[warp] = mx;
    __syncthreads();
    float M = wm[0];
#pragma unroll
    for (int w = 1; w < ADEC_NW; w++)
        M = fmaxf(M, wm[w]);
    if (tid == 0)
        *cl.map_shared_rank(&xm, rank ^ 1) = M;
    cl.sync(); /* the maxima exchanged */
    M = fmaxf(M, xm);
    float sum = 0.0f;
    for (int i = tid; i < nl; i += ADEC_NT) {
        const float p = expf(s[i] - M);
        sum += p;
        const uint2 sb = i < n8 ? scb[i] : make_uint2(0u, 0u);
#pragma unroll
        for (int k = 0; k < ADEC_NG - 1; k++)
            wsc[i][k] = p * adec_scale(((k < 4 ? sb.x >> (8 * k) : sb.y >> (8 * (k - 4)))) & 0xffu);
        wsc[i][ADEC_NG - 1] = p;
    }
    for (int sh = 16; sh; sh >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, sh);
    if (lane == 0)
        wsum[warp] = sum;
    __syncthreads(); /* also: the table wsc; scb and s are free (red) */
    float den = rank ? 0.0f : expf(sink - M);
#pragma unroll
    for (int w = 0; w < ADEC_NW; w++)
        den += wsum[w];

    /* output. Threads 0..447: 4 groups of 112, a thread 4 code columns; threads 448..511: 2
     * groups of 32, a thread 2 RoPE columns. A group takes keys grp, grp + ng, ... */
    if (tid < NOPE) {
        const int kg = tid / (NOPE / 4), c4 = tid % (NOPE / 4), col = 4 * c4, gs = col / 64;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int i0 = kg; i0 < n8; i0 += 4 * ADEC_VB) {
            uint32_t r[ADEC_VB];
#pragma unroll
            for (int u = 0; u < ADEC_VB; u++)
                r[u] = __ldg((const uint32_t *)(kp[min(i0 + 4 * u, n8 - 1)] + col));
#pragma unroll
            for (int u = 0; u < ADEC_VB; u++) {
                const int i = i0 + 4 * u;
                const float w = i < n8 ? wsc[i][gs] : 0.0f;
                const float2 lo = adec_e4m3x2(r[u]), hi = adec_e4m3x2(r[u] >> 16);
                acc.x = fmaf(w, lo.x, acc.x);
                acc.y = fmaf(w, lo.y, acc.y);
                acc.z = fmaf(w, hi.x, acc.z);
                acc.w = fmaf(w, hi.y, acc.w);
            }
        }
        for (int li = n8 + kg; li < nl; li += 4) {
            const float w = wsc[li][ADEC_NG - 1];
            const float4 v = __ldg((const float4 *)((const float *)kp[li] + col));
            acc.x = fmaf(w, v.x, acc.x);
            acc.y = fmaf(w, v.y, acc.y);
            acc.z = fmaf(w, v.z, acc.z);
            acc.w = fmaf(w, v.w, acc.w);
        }
        *(float4 *)&red[kg][col] = acc;
    } else {
        const int kg = (tid - NOPE) / 32, col = NOPE + 2 * lane;
        float2 acc = make_float2(0.f, 0.f);
        for (int i0 = kg; i0 < n8; i0 += 2 * ADEC_VB) {
            uint32_t r[ADEC_VB];
#pragma unroll
            for (int u = 0; u < ADEC_VB; u++)
                r[u] = __ldg((const uint32_t *)(kp[min(i0 + 2 * u, n8 - 1)] + kvf_rope_at(NOPE)) +
                             lane);
#pragma unroll
            for (int u = 0; u < ADEC_VB; u++) {
                const int i = i0 + 2 * u;
                const float w = i < n8 ? wsc[i][ADEC_NG - 1] : 0.0f;
                const float2 v = adec_bf16x2(r[u]);
                acc.x = fmaf(w, v.x, acc.x);
                acc.y = fmaf(w, v.y, acc.y);
            }
        }
        for (int li = n8 + kg; li < nl; li += 2) {
            const float w = wsc[li][ADEC_NG - 1];
            const float2 v = __ldg((const float2 *)((const float *)kp[li] + col));
            acc.x = fmaf(w, v.x, acc.x);
            acc.y = fmaf(w, v.y, acc.y);
        }
        *(float2 *)&red[kg][col] = acc;
    }
    __syncthreads();
    /* this block's sums of pair tid (groups in order); the peer's half goes to the peer */
    float2 v = make_float2(0.f, 0.f);
    if (tid < HD / 2) {
        const int i = 2 * tid, ng = i < NOPE ? 4 : 2;
        v = *(const float2 *)&red[0][i];
        for (int k = 1; k < ng; k++) {
            const float2 x = *(const float2 *)&red[k][i];
            v.x += x.x;
            v.y += x.y;
        }
        if (!ends)
            cl.map_shared_rank(xacc, rank ^ 1)[tid & (HD / 4 - 1)] = v;
    }
    if (tid == 0)
        *cl.map_shared_rank(&xden, rank ^ 1) = den;
    cl.sync(); /* the peer's sums of our half are here */
    if (!ends)
        return;
    /* block 0's part + block 1's, in that order */
    const float2 x = xacc[tid & (HD / 4 - 1)];
    const float d = rank ? xden + den : den + xden;
    float r0 = (rank ? x.x + v.x : v.x + x.x) / d, r1 = (rank ? x.y + v.y : v.y + x.y) / d;
    if (jr >= 0) { /* ex_rope_pair's arithmetic (inverse) */
        const float x0 = r0, x1 = r1;
        r0 = x0 * cs.x - x1 * cs.y;
        r1 = x1 * cs.x + x0 * cs.y;
    }
    const size_t at = ((size_t)t * H + h) * HD + 2 * tid;
    *(float2 *)(o + at) = make_float2(r0, r1);
    if (xb) {
        const __nv_bfloat162 hi = __floats2bfloat162_rn(r0, r1);
        const float2 hf = __bfloat1622float2(hi);
        *(__nv_bfloat162 *)(xb + at) = hi;
        *(__nv_bfloat162 *)(xb + (size_t)b.T * H * HD + at) =
            __floats2bfloat162_rn(r0 - hf.x, r1 - hf.y);
    }
}

/* DSV4_CUDA_ATTN=tc or simt: not this kernel (A/B timing, and the other kernels' tests). */
static int adec_enabled(void)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("DSV4_CUDA_ATTN");
        on = !(e && (!strcmp(e, "tc") || !strcmp(e, "simt")));
    }
    return on;
}

int attn_dec(const struct kern_batch *b, const struct kern_cache *c,
             const struct kern_layer_cache *l, const float *q, const float *kv, const int32_t *sel,
             int topk, const float *sinks, int H, int hd, int W, int rope_dim,
             const float *inv_freq, float *o, int nk_max, uint16_t *xb, int *xb_done,
             cudaStream_t st)
{
    if (!adec_enabled() || !l->fp8 || hd != ADEC_HD || l->rope != 64 || rope_dim % 2 ||
        rope_dim > hd || nk_max > ADEC_MAXK || W > ADEC_MAXK || 2L * b->T * H > kern__sm_count() ||
        b->T > 65535)
        return ERR_UNSUPPORTED;
    /* clusters of 2 blocks and programmatic dependent launch (kern__launch has only the
     * latter) */
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[2];
    cfg.gridDim = dim3(2, (unsigned)H, (unsigned)b->T);
    cfg.blockDim = dim3(ADEC_NT);
    cfg.stream = st;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = 2;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = kern__pdl_on() ? 2 : 1;
    const int trace = kern__trace_on();
    if (trace)
        kern__trace((const void *)attn_dec_k, st, 0);
    const cudaError_t e = cudaLaunchKernelEx(&cfg, attn_dec_k, *b, *c, *l, q, kv, sel, topk, sinks,
                                             H, W, rope_dim, inv_freq, o, (__nv_bfloat16 *)xb);
    if (trace)
        kern__trace((const void *)attn_dec_k, st, 1);
    if (e != cudaSuccess)
        return ERR_CUDA;
    if (xb_done)
        *xb_done = xb != NULL;
    EX_LAUNCH_CHECK();
    return 0;
}
