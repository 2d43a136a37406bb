/*
 * attention_fast.cu - the sink attention of the GPU engine's fast path: the same keys in the
 * same order as attention.cu (attention.cuh; FP32 or FP8 entries, kvfmt.cuh), but one block per
 * (row, group of up to 32 heads): the keys (the values too: one shared latent per token) are staged
 * in shared memory 32 at a time and used by every head of the group, one warp per head, with an
 * online softmax (running maximum, starting from the sink) in FP32. Then each head's inverse RoPE.
 * Summation orders differ from the exact kernel; nothing else does.
 *
 * A warp's heads: q and the output accumulators in registers, element lane + 32 r (r < hd / 32);
 * each key element is read from shared memory once for both heads.
 *
 * Short steps (few rows x head groups for the multiprocessors) also split each row's keys over
 * gridDim.z blocks (flash-decoding): each writes its running maximum, denominator and unnormalised
 * output, and attn_combine_k merges them (the sink counted once, by split 0).
 *
 * sink_attn_tc_k (hd 512, the DSV4 models' head size) does the same on the tensor cores: per
 * block 16 * MT heads of one row, keys staged 32 at a time; logits S = Q K^T and the output
 * O += P V as BF16 mma.sync m16n8k16 with FP32 accumulators, each operand split into a BF16
 * high part and a BF16 remainder (x = hi + lo, |lo| <= 2^-9 |x|) and three products
 * hi.hi + hi.lo + lo.hi, so the sums keep ~16 bits of every product (the dropped lo.lo term is
 * below 2^-16 relative): FP32-level numerics at tensor-core speed. Warps 4m..4m+3 own heads
 * 16m..16m+15: for the logits each takes 8 of the 32 keys, for the output a quarter of hd; the
 * online softmax (per chunk: the running maximum, starting from the sink) is computed by each
 * of the four identically, from the chunk's logits in shared memory.
 */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#include <stdlib.h>
#include <string.h>

#define ATTF_KC   32 /* keys per shared-memory chunk */
#define ATTF_MAXR 16 /* hd <= 512 */
#define ATTF_HPW  2  /* heads per warp (each staged key value is loaded once for them) */
#define ATTF_MAXS 32 /* key splits at most */

/* Keys [*jb, *nk) of a row's nk_all: split z of S, chunk-aligned. */
__device__ __forceinline__ void attf_split(int nk_all, int z, int S, int *jb, int *nk)
{
    const int nch = (nk_all + ATTF_KC - 1) / ATTF_KC,
              end = (int)((long)nch * (z + 1) / S) * ATTF_KC;
    *jb = (int)((long)nch * z / S) * ATTF_KC;
    *nk = end < nk_all ? end : nk_all;
}

__global__ void __launch_bounds__(512)
    sink_attn_fast_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                     const float *q, const float *kv, const int32_t *sel, int topk,
                     const float *sinks, int H, int hd, int W, int rope_dim, const float *inv_freq,
                     float *o, float *part)
{
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ __align__(16) float keys[]; /* (ATTF_KC, hd) */
    const int t = blockIdx.x, nw = blockDim.x >> 5, warp = threadIdx.x >> 5,
              lane = threadIdx.x & 31;
    const int h0 = (blockIdx.y * nw + warp) * ATTF_HPW, R = hd >> 5;
    const struct att_row a = att_row_of(b, l, t, W, topk);
    const int S = gridDim.z, z = blockIdx.z;
    int jb, nk; /* this block's keys */
    attf_split(a.nwin + a.ncomp, z, S, &jb, &nk);
    const int32_t *sel_t = sel ? sel + (size_t)t * topk : NULL;
    const bool live = h0 < H;
    /* the warp's heads h0 + u (u < ATTF_HPW; heads past H compute on head h0, unused) */
    float qr[ATTF_HPW][ATTF_MAXR], acc[ATTF_HPW][ATTF_MAXR], m[ATTF_HPW], den[ATTF_HPW];
#pragma unroll
    for (int u = 0; u < ATTF_HPW; u++) {
        const int h = live && h0 + u < H ? h0 + u : (live ? h0 : 0);
        const float *qh = q + ((size_t)t * H + h) * hd;
#pragma unroll
        for (int r = 0; r < ATTF_MAXR; r++) {
            qr[u][r] = r < R ? qh[lane + 32 * r] : 0.0f;
            acc[u][r] = 0.0f;
        }
        /* the sink (split 0): exp(sink - m) = 1 */
        m[u] = z == 0 && live ? sinks[h] : -INFINITY;
        den[u] = z == 0 ? 1.0f : 0.0f;
    }
    const float scale = 1.0f / sqrtf((float)hd);
    for (int j0 = jb; j0 < nk; j0 += ATTF_KC) {
        const int nc = nk - j0 < ATTF_KC ? nk - j0 : ATTF_KC;
        __syncthreads(); /* the previous chunk is used up */
        for (int e = threadIdx.x; e < nc * (hd >> 2); e += blockDim.x) {
            int j = e / (hd >> 2), i4 = e % (hd >> 2), fresh;
            const char *kp = att_key(b, c, l, a, kv, hd, W, sel_t, j0 + j, &fresh);
            float4 v;
            if (fresh || !l.fp8) {
                v = ((const float4 *)kp)[i4];
            } else {
                const uint8_t *u = (const uint8_t *)kp;
                v = make_float4(kvf_get(u, 4 * i4, hd, l.rope), kvf_get(u, 4 * i4 + 1, hd, l.rope),
                                kvf_get(u, 4 * i4 + 2, hd, l.rope),
                                kvf_get(u, 4 * i4 + 3, hd, l.rope));
            }
            ((float4 *)(keys + (size_t)j * hd))[i4] = v;
        }
        __syncthreads();
        if (!live)
            continue;
        for (int j = 0; j < nc; j++) {
            float kr[ATTF_MAXR], d[ATTF_HPW];
#pragma unroll
            for (int r = 0; r < ATTF_MAXR; r++)
                kr[r] = r < R ? keys[(size_t)j * hd + lane + 32 * r] : 0.0f;
#pragma unroll
            for (int u = 0; u < ATTF_HPW; u++) {
                d[u] = 0.0f;
#pragma unroll
                for (int r = 0; r < ATTF_MAXR; r++)
                    d[u] += qr[u][r] * kr[r];
            }
#pragma unroll
            for (int off = 16; off; off >>= 1)
#pragma unroll
                for (int u = 0; u < ATTF_HPW; u++)
                    d[u] += __shfl_xor_sync(0xffffffffu, d[u], off);
#pragma unroll
            for (int u = 0; u < ATTF_HPW; u++) {
                const float lg = scale * d[u];
                if (lg > m[u]) { /* rescale what was summed under the old maximum */
                    const float f = expf(m[u] - lg);
                    den[u] *= f;
#pragma unroll
                    for (int r = 0; r < ATTF_MAXR; r++)
                        acc[u][r] *= f;
                    m[u] = lg;
                }
                const float p = expf(lg - m[u]);
                den[u] += p;
#pragma unroll
                for (int r = 0; r < ATTF_MAXR; r++)
                    acc[u][r] += p * kr[r];
            }
        }
    }
    if (!live)
        return;
#pragma unroll
    for (int u = 0; u < ATTF_HPW; u++) {
        const int h = h0 + u;
        if (h >= H)
            break;
        if (S > 1) { /* a partial: (m, den, acc[hd]) */
            float *p = part + (((size_t)t * H + h) * S + z) * (hd + 2);
            if (lane == 0) {
                p[0] = m[u];
                p[1] = den[u];
            }
#pragma unroll
            for (int r = 0; r < ATTF_MAXR; r++)
                if (r < R)
                    p[2 + lane + 32 * r] = acc[u][r];
            continue;
        }
        float *oh = o + ((size_t)t * H + h) * hd;
        const float inv = 1.0f / den[u];
#pragma unroll
        for (int r = 0; r < ATTF_MAXR; r++)
            if (r < R)
                oh[lane + 32 * r] = acc[u][r] * inv;
        __syncwarp();
        for (int i = lane; i < rope_dim / 2; i += 32)
            ex_rope_pair(oh + hd - rope_dim, i, inv_freq, a.pos, 1);
    }
}

/* The inverse rotation (ex_rope_pair(.., 1)) of RoPE pair i at pos: (cos, -sin). */
__device__ __forceinline__ float2 atc_rope_cs(const float *inv_freq, int i, long pos)
{
    const float2 cs = ex_rope_cs(inv_freq, i, pos);
    return make_float2(cs.x, -cs.y);
}

/* One block per (row, head), a thread per pair of columns: merge the S partials (weights
 * exp(m_z - M), sums in split order), normalise, inverse RoPE of the pair if it is a RoPE one.
 * xb (NULL: not written): o also as BF16 hi (rows 0..T) and lo (rows T..2T) of H hd columns,
 * as kern_act_bf16 (split, unpermuted) makes them. */
__global__ void attn_combine_k(const float *part, int hd, int S, int H, int rope_dim,
                               const float *inv_freq, const int32_t *row_pos, float *o, int T,
                               __nv_bfloat16 *xb)
{
    __shared__ float wz[ATTF_MAXS], dz[ATTF_MAXS]; /* each split's weight and denominator */
    const int i2 = threadIdx.x, t = blockIdx.x / H;
    const int j = 2 * i2 - (hd - rope_dim); /* its place among the RoPE dims */
    /* a RoPE pair's rotation before the dependency wait (the position is the batch's) */
    const float2 cs = j >= 0 ? atc_rope_cs(inv_freq, j / 2, row_pos[t]) : make_float2(1.f, 0.f);
    kern__pdl_wait();
    kern__pdl_launch();
    const float *p = part + (size_t)blockIdx.x * S * (hd + 2);
    /* the first 8 splits' values loaded together with the splits' maxima (warp 0), then the
     * same sums in the same order as one split after another: one memory round trip for S <= 8
     * instead of one a split */
    float2 x0[8];
#pragma unroll
    for (int z = 0; z < 8; z++)
        if (z < S)
            x0[z] = *(const float2 *)(p + (size_t)z * (hd + 2) + 2 + 2 * i2);
    if (threadIdx.x < 32) {
        const int z = threadIdx.x;
        const float m = z < S ? p[(size_t)z * (hd + 2)] : -INFINITY;
        const float dd = z < S ? p[(size_t)z * (hd + 2) + 1] : 0.0f;
        float M = m;
        for (int sh = 16; sh; sh >>= 1) /* max: exact in any order */
            M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, sh));
        wz[z] = z < S ? expf(m - M) : 0.0f;
        dz[z] = dd;
    }
    __syncthreads();
    float den = 0.0f;
    float2 v = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int z = 0; z < 8; z++)
        if (z < S) {
            den += dz[z] * wz[z];
            v.x += x0[z].x * wz[z];
            v.y += x0[z].y * wz[z];
        }
    for (int z = 8; z < S; z++) {
        const float2 x = *(const float2 *)(p + (size_t)z * (hd + 2) + 2 + 2 * i2);
        den += dz[z] * wz[z];
        v.x += x.x * wz[z];
        v.y += x.y * wz[z];
    }
    float r[2] = {v.x / den, v.y / den};
    if (j >= 0) { /* ex_rope_pair's arithmetic */
        const float a = r[0], c = r[1];
        r[0] = a * cs.x - c * cs.y;
        r[1] = c * cs.x + a * cs.y;
    }
    *(float2 *)(o + (size_t)blockIdx.x * hd + 2 * i2) = make_float2(r[0], r[1]);
    if (xb) {
        const __nv_bfloat162 hi = __floats2bfloat162_rn(r[0], r[1]);
        const float2 hf = __bfloat1622float2(hi);
        const size_t at = (size_t)blockIdx.x * hd + 2 * i2;
        *(__nv_bfloat162 *)(xb + at) = hi;
        *(__nv_bfloat162 *)(xb + (size_t)T * H * hd + at) =
            __floats2bfloat162_rn(r[0] - hf.x, r[1] - hf.y);
    }
}

static int attn_combine(const float *ws, int T, int H, int hd, int S, int rope_dim,
                        const float *inv_freq, const int32_t *row_pos, float *o, uint16_t *xb,
                        int *xb_done, cudaStream_t st)
{
    if (kern__launch(attn_combine_k, T * H, hd / 2, 0, st, 1, ws, hd, S, H, rope_dim, inv_freq,
                     row_pos, o, T, (__nv_bfloat16 *)xb))
        return ERR_CUDA;
    if (xb_done)
        *xb_done = xb != NULL;
    EX_LAUNCH_CHECK();
    return 0;
}

/* ---- tensor cores ---- */

#define ATC_HD  512          /* head size of the tensor-core kernel */
#define ATC_LD  (ATC_HD + 8) /* BF16 row stride in shared memory (conflict-free ldmatrix) */
#define ATC_SLD (ATTF_KC + 1)

__device__ __forceinline__ void atc_ldsm_x4(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((uint32_t)__cvta_generic_to_shared(p)));
}
__device__ __forceinline__ void atc_ldsm_x4_t(uint32_t (&r)[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((uint32_t)__cvta_generic_to_shared(p)));
}
__device__ __forceinline__ void atc_ldsm_x2(uint32_t (&r)[2], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"((uint32_t)__cvta_generic_to_shared(p)));
}

/* x -> BF16 hi + BF16 lo (x - hi, rounded), for two values: (hi pair, lo pair). */
__device__ __forceinline__ void atc_split2(float x0, float x1, uint32_t &hi, uint32_t &lo)
{
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
    hi = *(const uint32_t *)&h;
    lo = *(const uint32_t *)&l;
}

/* Four values -> hi / lo rows of shared memory at element offset i (a multiple of 4). */
__device__ __forceinline__ void atc_put4(__nv_bfloat16 *hi, __nv_bfloat16 *lo, size_t i, float4 v)
{
    uint2 h, l;
    atc_split2(v.x, v.y, h.x, l.x);
    atc_split2(v.z, v.w, h.y, l.y);
    *(uint2 *)(hi + i) = h;
    *(uint2 *)(lo + i) = l;
}

/*
 * Elements 4 i4 .. 4 i4 + 3 of a key (kp: a cache entry in the layer's format or, fresh / FP32
 * layer, hd floats; NULL: zeros), in two steps so that a thread issues all its loads of a chunk
 * before it waits for any: atc_key_raw loads the bytes, atc_key_val decodes them.
 */
__device__ __forceinline__ uint4 atc_key_raw(const char *kp, int f32, int i4, int nope)
{
    if (!kp)
        return make_uint4(0u, 0u, 0u, 0u);
    if (f32)
        return __ldg((const uint4 *)kp + i4);
    const uint8_t *e = (const uint8_t *)kp;
    if (4 * i4 < nope) /* codes, scale byte */
        return make_uint4(__ldg((const uint32_t *)(e + 4 * i4)), __ldg(e + nope + 4 * i4 / 64), 0u,
                          0u);
    const uint2 r = __ldg((const uint2 *)(e + kvf_rope_at(nope) + 2 * (4 * i4 - nope)));
    return make_uint4(r.x, r.y, 0u, 0u); /* four BF16 */
}

__device__ __forceinline__ float4 atc_key_val(uint4 r, int f32, int i4, int nope)
{
    if (f32)
        return make_float4(__uint_as_float(r.x), __uint_as_float(r.y), __uint_as_float(r.z),
                           __uint_as_float(r.w));
    if (4 * i4 < nope) {
        const float sc = kvf_scale((uint8_t)r.y);
        const float2 fa = __half22float2(
            __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(r.x & 0xffffu), __NV_E4M3)));
        const float2 fb = __half22float2(
            __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(r.x >> 16), __NV_E4M3)));
        return make_float4(fa.x * sc, fa.y * sc, fb.x * sc, fb.y * sc);
    }
    return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u),
                       __uint_as_float(r.y << 16), __uint_as_float(r.y & 0xffff0000u));
}

__device__ __forceinline__ void atc_mma3(float (&d)[4], const uint32_t (&ah)[4],
                                         const uint32_t (&al)[4], uint32_t bh0, uint32_t bh1,
                                         uint32_t bl0, uint32_t bl1)
{
    kern__mma_bf16(d, ah[0], ah[1], ah[2], ah[3], bh0, bh1);
    kern__mma_bf16(d, ah[0], ah[1], ah[2], ah[3], bl0, bl1);
    kern__mma_bf16(d, al[0], al[1], al[2], al[3], bh0, bh1);
}

template <int MT, int SW>
__global__ void __launch_bounds__(MT * 128 * SW, 1)
    sink_attn_tc_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                   const float *q, const float *kv, const int32_t *sel, int topk,
                   const float *sinks, int H, int W, int rope_dim, const float *inv_freq, float *o,
                   float *part)
{
    kern__pdl_wait();
    kern__pdl_launch();
    constexpr int HD = ATC_HD, LD = ATC_LD, NQ = MT * 16, NTW = HD / 32;
    extern __shared__ __align__(16) unsigned char atc_sm[];
    __nv_bfloat16 *qh = (__nv_bfloat16 *)atc_sm, *ql = qh + NQ * LD; /* (NQ, LD) */
    __nv_bfloat16 *kh = ql + NQ * LD, *kl = kh + ATTF_KC * LD;       /* (KC, LD) */
    float *ss = (float *)(kl + ATTF_KC * LD);                        /* (NQ, SLD) logits */
    const char **kp = (const char **)(ss + NQ * ATC_SLD); /* (2, KC) key addresses by parity */
    int *kf32 = (int *)(kp + 2 * ATTF_KC);                /* (2, KC) FP32 key (fresh or layer) */
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, c4 = lane & 3, mt = warp >> 2, qw = warp & 3;
    const bool mma = warp < 4 * MT; /* the others (SW > 1) only stage queries and keys */
    const int h0 = blockIdx.y * NQ;
    const struct att_row a = att_row_of(b, l, t, W, topk);
    const int S = gridDim.z, z = blockIdx.z;
    int jb, nk; /* this block's keys */
    attf_split(a.nwin + a.ncomp, z, S, &jb, &nk);
    const int32_t *sel_t = sel ? sel + (size_t)t * topk : NULL;

    /* the block's queries, split: 16 float4 per thread, loaded 8 at a time before any is used
     * (one at a time, their latencies added up: 18.0 -> 16.2 us per call at one row, 49.6 ->
     * 47.0 at 64, H200, ncu) */
    {
        constexpr int QPER = NQ * HD / 4 / (MT * 128 * SW), QB = 8;
        static_assert(QPER % QB == 0, "queries per thread");
#pragma unroll
        for (int u0 = 0; u0 < QPER; u0 += QB) {
            float4 v[QB];
#pragma unroll
            for (int u = 0; u < QB; u++) {
                const int i = threadIdx.x + (u0 + u) * MT * 128 * SW, h = h0 + i / (HD / 4);
                v[u] = h < H ? ((const float4 *)(q + ((size_t)t * H + h) * HD))[i % (HD / 4)]
                             : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < QB; u++) {
                const int i = threadIdx.x + (u0 + u) * MT * 128 * SW;
                atc_put4(qh, ql, (size_t)(i / (HD / 4)) * LD + 4 * (i % (HD / 4)), v[u]);
            }
        }
    }
    /* rows g, g+8 of this warp's 16 heads: running maximum and denominator (the sink in split 0) */
    const int hA = h0 + mt * 16 + g, hB = hA + 8;
    float mA = z == 0 && hA < H ? sinks[hA] : -INFINITY,
          mB = z == 0 && hB < H ? sinks[hB] : -INFINITY;
    float lA = z == 0 ? 1.0f : 0.0f, lB = lA;
    float acc[NTW][4];
#pragma unroll
    for (int n = 0; n < NTW; n++)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const float scale = 1.0f / sqrtf((float)HD);
    const int col0 = qw * (HD / 4); /* this warp's output columns */

    /* the key addresses of chunk j0 into buffer (j0 / KC) & 1 (warp 0; chunk j0 + KC's are made
     * while chunk j0 is multiplied) */
    auto key_addrs = [&](int j0) {
        if (threadIdx.x < ATTF_KC && j0 < nk) {
            const int j = j0 + threadIdx.x, buf = ((j0 - jb) / ATTF_KC) & 1;
            int fr = 0;
            kp[buf * ATTF_KC + threadIdx.x] =
                j < nk ? att_key(b, c, l, a, kv, HD, W, sel_t, j, &fr) : NULL;
            kf32[buf * ATTF_KC + threadIdx.x] = fr || !l.fp8;
        }
    };
    key_addrs(jb);
    /* loads in flight per thread: 8, or 4 where the 512-thread block caps registers at 128 */
    constexpr int NT = MT * 128 * SW, PER = ATTF_KC * HD / 4 / NT,
                  BATCH = MT == 4 ? 4 : (PER < 8 ? PER : 8);
    const int i4 = threadIdx.x % (HD / 4), nope = HD - l.rope; /* the same column every item */
    for (int j0 = jb; j0 < nk; j0 += ATTF_KC) {
        const int nc = nk - j0 < ATTF_KC ? nk - j0 : ATTF_KC, buf = ((j0 - jb) / ATTF_KC) & 1;
        __syncthreads(); /* the previous chunk's keys and logits are used up; addresses made */
        /* thread item u: key threadIdx.x / (HD / 4) + u (NT / (HD / 4)), columns 4 i4.. */
#pragma unroll
        for (int u0 = 0; u0 < PER; u0 += BATCH) {
            uint4 raw[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const int j = (int)threadIdx.x / (HD / 4) + (u0 + u) * (NT / (HD / 4));
                raw[u] = atc_key_raw(kp[buf * ATTF_KC + j], kf32[buf * ATTF_KC + j], i4, nope);
            }
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const int j = (int)threadIdx.x / (HD / 4) + (u0 + u) * (NT / (HD / 4));
                atc_put4(kh, kl, (size_t)j * LD + 4 * i4,
                         atc_key_val(raw[u], kf32[buf * ATTF_KC + j], i4, nope));
            }
        }
        __syncthreads();
        if (warp == 0)
            key_addrs(j0 + ATTF_KC);
        /* logits of heads 16 mt.. and keys 8 qw.. */
        if (mma) {
            /* NA independent accumulators (k-steps mod NA): chains of 96 / NA MMAs; 2 where the
             * 512-thread block caps registers at 128 */
            constexpr int NA = MT == 4 ? 2 : 4;
            float s4[4][4] = {};
            const size_t qoff = (size_t)(mt * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
            const size_t koff = (size_t)(qw * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll 2
            for (int k4 = 0; k4 < HD / 16; k4 += NA)
#pragma unroll
                for (int u = 0; u < NA; u++) {
                    const int ks = k4 + u;
                    uint32_t ah[4], al[4], bh[2], bl[2];
                    atc_ldsm_x4(ah, qh + qoff + ks * 16);
                    atc_ldsm_x4(al, ql + qoff + ks * 16);
                    atc_ldsm_x2(bh, kh + koff + ks * 16);
                    atc_ldsm_x2(bl, kl + koff + ks * 16);
                    atc_mma3(s4[u], ah, al, bh[0], bh[1], bl[0], bl[1]);
                }
            float sacc[4];
#pragma unroll
            for (int i = 0; i < 4; i++)
                sacc[i] = (s4[0][i] + s4[1][i]) + (s4[2][i] + s4[3][i]);
            const int k0 = qw * 8 + 2 * c4;
            float *sr = ss + (size_t)(mt * 16 + g) * ATC_SLD;
            sr[k0] = k0 < nc ? scale * sacc[0] : -INFINITY;
            sr[k0 + 1] = k0 + 1 < nc ? scale * sacc[1] : -INFINITY;
            sr[8 * ATC_SLD + k0] = k0 < nc ? scale * sacc[2] : -INFINITY;
            sr[8 * ATC_SLD + k0 + 1] = k0 + 1 < nc ? scale * sacc[3] : -INFINITY;
        }
        __syncthreads();
        if (!mma)
            continue;
        /* online softmax of rows g, g+8 over this chunk; P as A fragments (keys 16ks + ..) */
        uint32_t ph[2][4], pl[2][4];
        {
            const float *rA = ss + (size_t)(mt * 16 + g) * ATC_SLD, *rB = rA + 8 * ATC_SLD;
            float vA[8], vB[8], xA = -INFINITY, xB = -INFINITY;
#pragma unroll
            for (int u = 0; u < 4; u++) {
                vA[2 * u] = rA[8 * u + 2 * c4];
                vA[2 * u + 1] = rA[8 * u + 2 * c4 + 1];
                vB[2 * u] = rB[8 * u + 2 * c4];
                vB[2 * u + 1] = rB[8 * u + 2 * c4 + 1];
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                xA = fmaxf(xA, vA[u]);
                xB = fmaxf(xB, vB[u]);
            }
#pragma unroll
            for (int m = 1; m < 4; m <<= 1) {
                xA = fmaxf(xA, __shfl_xor_sync(0xffffffffu, xA, m));
                xB = fmaxf(xB, __shfl_xor_sync(0xffffffffu, xB, m));
            }
            const float nA = fmaxf(mA, xA), nB = fmaxf(mB, xB);
            const float fA = expf(mA - nA), fB = expf(mB - nB);
            float sA = 0.0f, sB = 0.0f;
#pragma unroll
            for (int u = 0; u < 8; u++) {
                vA[u] = expf(vA[u] - nA);
                vB[u] = expf(vB[u] - nB);
                sA += vA[u];
                sB += vB[u];
            }
#pragma unroll
            for (int m = 1; m < 4; m <<= 1) {
                sA += __shfl_xor_sync(0xffffffffu, sA, m);
                sB += __shfl_xor_sync(0xffffffffu, sB, m);
            }
            lA = lA * fA + sA;
            lB = lB * fB + sB;
            mA = nA;
            mB = nB;
#pragma unroll
            for (int n = 0; n < NTW; n++) {
                acc[n][0] *= fA;
                acc[n][1] *= fA;
                acc[n][2] *= fB;
                acc[n][3] *= fB;
            }
            /* k-step s: a0 = (g, 16s + 2c), a1 = (g+8, ..), a2 = (g, 16s + 8 + 2c), a3 = (g+8, ..)
             */
#pragma unroll
            for (int s2 = 0; s2 < 2; s2++) {
                atc_split2(vA[4 * s2], vA[4 * s2 + 1], ph[s2][0], pl[s2][0]);
                atc_split2(vB[4 * s2], vB[4 * s2 + 1], ph[s2][1], pl[s2][1]);
                atc_split2(vA[4 * s2 + 2], vA[4 * s2 + 3], ph[s2][2], pl[s2][2]);
                atc_split2(vB[4 * s2 + 2], vB[4 * s2 + 3], ph[s2][3], pl[s2][3]);
            }
        }
        /* O (16 heads x this warp's HD/4 columns) += P V */
#pragma unroll
        for (int n = 0; n < NTW; n++) {
            uint32_t vh[4], vl[4]; /* keys 0-7, 8-15, 16-23, 24-31 of columns col0 + 8n.. */
            atc_ldsm_x4_t(vh, kh + (size_t)lane * LD + col0 + 8 * n);
            atc_ldsm_x4_t(vl, kl + (size_t)lane * LD + col0 + 8 * n);
#pragma unroll
            for (int s2 = 0; s2 < 2; s2++)
                atc_mma3(acc[n], ph[s2], pl[s2], vh[2 * s2], vh[2 * s2 + 1], vl[2 * s2],
                         vl[2 * s2 + 1]);
        }
    }

    if (!mma)
        return;
        /* acc[n][0..1]: head hA, columns col0 + 8n + 2c (+1); acc[n][2..3]: head hB */
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int h = r ? hB : hA;
        if (h >= H)
            continue;
        const float m = r ? mB : mA, den = r ? lB : lA;
        if (S > 1) { /* a partial: (m, den, acc[hd]) */
            float *p = part + (((size_t)t * H + h) * S + z) * (HD + 2);
            if (qw == 0 && c4 == 0) {
                p[0] = m;
                p[1] = den;
            }
#pragma unroll
            for (int n = 0; n < NTW; n++)
                *(float2 *)(p + 2 + col0 + 8 * n + 2 * c4) =
                    make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
        } else {
            float *oh = o + ((size_t)t * H + h) * HD;
            const float inv = 1.0f / den;
#pragma unroll
            for (int n = 0; n < NTW; n++)
                *(float2 *)(oh + col0 + 8 * n + 2 * c4) =
                    make_float2(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        }
    }
    if (S > 1 || col0 + HD / 4 < HD)
        return; /* the last quarter's warps hold the RoPE dims (rope_dim <= HD / 4) */
    /* the rotations once per lane (pairs lane, lane + 32: rope_dim <= 128), not once per head
     * and pair (double-precision sin and cos: 16 of them in a row per lane), then handed by
     * shuffles to the lanes that apply them; ex_rope_pair's arithmetic */
    const int np = rope_dim / 2;
    const float2 c0 = lane < np ? atc_rope_cs(inv_freq, lane, a.pos) : make_float2(1.f, 0.f),
                 c1 = lane + 32 < np ? atc_rope_cs(inv_freq, lane + 32, a.pos)
                                     : make_float2(1.f, 0.f);
    __syncwarp();
    for (int i0 = 0; i0 < 16 * np; i0 += 32) { /* warp-uniform trips (the shuffles) */
        const int i = i0 + lane, h = h0 + mt * 16 + i / np, pi = i % np;
        const float x0 = __shfl_sync(0xffffffffu, c0.x, pi & 31),
                    y0 = __shfl_sync(0xffffffffu, c0.y, pi & 31),
                    x1 = __shfl_sync(0xffffffffu, c1.x, pi & 31),
                    y1 = __shfl_sync(0xffffffffu, c1.y, pi & 31);
        const float cx = pi < 32 ? x0 : x1, sy = pi < 32 ? y0 : y1;
        if (i < 16 * np && h < H) {
            float2 *x = (float2 *)(o + ((size_t)t * H + h) * HD + HD - rope_dim) + pi;
            const float2 v = *x;
            *x = make_float2(v.x * cx - v.y * sy, v.y * cx + v.x * sy);
        }
    }
}

static size_t atc_smem(int MT)
{
    return sizeof(__nv_bfloat16) * (size_t)(2 * MT * 16 + 2 * ATTF_KC) * ATC_LD +
           sizeof(float) * (size_t)MT * 16 * ATC_SLD + (sizeof(char *) + sizeof(int)) * 2 * ATTF_KC;
}

/* DSV4_CUDA_ATTN=simt: the CUDA-core kernel for every head size (A/B timing). */
static int atc_enabled(void)
{
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("DSV4_CUDA_ATTN");
        on = !(e && !strcmp(e, "simt"));
    }
    return on;
}

/* Key splits for T rows in `groups` head groups: enough blocks for two waves, at most
 * ATTF_MAXS, at least one chunk each. */
static int attf_splits(int T, int groups, int nk_max)
{
    long want = (2L * kern__sm_count() + (long)T * groups - 1) / ((long)T * groups);
    int S = want < ATTF_MAXS ? (int)want : ATTF_MAXS, nch = (nk_max + ATTF_KC - 1) / ATTF_KC;
    S = S < nch ? S : nch;
    return S < 1 ? 1 : S;
}

extern "C" size_t kern_attention_fast_ws_floats(int H, int hd)
{
    /* S > 1 only while T * groups < 2 sms, so T * S < 4 sms / groups */
    const int groups = (H + 16 * ATTF_HPW - 1) / (16 * ATTF_HPW);
    return (size_t)(4 * kern__sm_count() / groups + 16) * H * (hd + 2);
}

/* Shared memory of sink_attn_tc_k<MT, SW> allowed (once); 0 or ERR_UNSUPPORTED. */
template <int MT, int SW> static int atc_smem_ok(void)
{
    static int ok; /* 1 set, -1 refused; benign race: idempotent */
    if (!ok) {
        ok = cudaFuncSetAttribute(sink_attn_tc_k<MT, SW>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  (int)atc_smem(MT)) == cudaSuccess
                 ? 1
                 : -1;
        if (ok < 0)
            (void)cudaGetLastError(); /* not a launch failure of a later kernel */
    }
    return ok > 0 ? 0 : ERR_UNSUPPORTED;
}

/* The tensor-core kernel with 16 MT heads per block; key splits for about one wave (one
 * block per multiprocessor at 64 heads), within the workspace kern_attention_fast_ws_floats
 * sized. ERR_UNSUPPORTED: the caller falls back to the CUDA-core kernel. */
template <int MT>
static int attention_tc_mt(const struct kern_batch *b, const struct kern_cache *c,
                           const struct kern_layer_cache *l, const float *q, const float *kv,
                           const int32_t *sel, int topk, const float *sinks, int H, int W,
                           int rope_dim, const float *inv_freq, float *o, float *ws, int nk_max,
                           uint16_t *xb, int *xb_done, cudaStream_t st)
{
    const size_t smem = atc_smem(MT);
    const int groups = (H + 16 * MT - 1) / (16 * MT);
    int S = 1;
    if (ws) {
        const long cap =
            (4L * kern__sm_count() / ((H + 16 * ATTF_HPW - 1) / (16 * ATTF_HPW)) + 16) /
            b->T; /* rows x splits the workspace holds, per row */
        /* one wave: 1 block per multiprocessor at 64 heads, 2 at 16 (shared memory); a second,
         * partial wave would cost a whole block time */
        const long want = (long)kern__sm_count() * (MT == 4 ? 1 : 2) / ((long)b->T * groups);
        const int nch = (nk_max + ATTF_KC - 1) / ATTF_KC;
        S = (int)(want < cap ? want : cap);
        S = S < ATTF_MAXS ? S : ATTF_MAXS;
        S = S < nch ? S : nch;
        S = S < 1 ? 1 : S;
    }
    dim3 grid((unsigned)b->T, (unsigned)groups, (unsigned)S);
    int rc;
    /* at most one block per multiprocessor (a decode step of a few rows): twice the warps,
     * the second four only staging queries and keys, which take ~60 % of a block's
     * instructions (ncu, batch 1: 4.4K instructions a warp at 6.7 cycles each, one warp a
     * scheduler) */
    constexpr int SW = MT == 1 ? 2 : 1;
    if (SW > 1 && (long)b->T * groups * S <= kern__sm_count()) {
        if ((rc = atc_smem_ok<MT, SW>()))
            return rc;
        rc = kern__launch(sink_attn_tc_k<MT, SW>, grid, MT * 128 * SW, smem, st, 1, *b, *c, *l, q,
                          kv, sel, topk, sinks, H, W, rope_dim, inv_freq, o, ws);
    } else {
        if ((rc = atc_smem_ok<MT, 1>()))
            return rc;
        rc = kern__launch(sink_attn_tc_k<MT, 1>, grid, MT * 128, smem, st, 1, *b, *c, *l, q, kv,
                          sel, topk, sinks, H, W, rope_dim, inv_freq, o, ws);
    }
    if (rc)
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return S > 1 ? attn_combine(ws, b->T, H, ATC_HD, S, rope_dim, inv_freq, b->row_pos, o, xb,
                                xb_done, st)
                 : 0;
}

static int attention_tc(const struct kern_batch *b, const struct kern_cache *c,
                        const struct kern_layer_cache *l, const float *q, const float *kv,
                        const int32_t *sel, int topk, const float *sinks, int H, int W,
                        int rope_dim, const float *inv_freq, float *o, float *ws, int nk_max,
                        uint16_t *xb, int *xb_done, cudaStream_t st)
{
    /* 64 heads per block once the rows alone fill the multiprocessors, else 16 (more blocks) */
    if (H >= 64 && b->T >= kern__sm_count() / 3)
        return attention_tc_mt<4>(b, c, l, q, kv, sel, topk, sinks, H, W, rope_dim, inv_freq, o, ws,
                                  nk_max, xb, xb_done, st);
    return attention_tc_mt<1>(b, c, l, q, kv, sel, topk, sinks, H, W, rope_dim, inv_freq, o, ws,
                              nk_max, xb, xb_done, st);
}

extern "C" int kern_sink_attention_fast(const struct kern_batch *b, const struct kern_cache *c,
                                        const struct kern_layer_cache *l, const float *q,
                                        const float *kv, const int32_t *sel, int topk,
                                        const float *sinks, int H, int hd, int W, int rope_dim,
                                        const float *inv_freq, float *o, float *ws, uint16_t *xb,
                                        int *xb_done, cudaStream_t st)
{
    if (xb_done)
        *xb_done = 0;
    if (b->T <= 0)
        return 0;
    if ((l->ratio == 4 && !sel) || hd % 128 || hd > 32 * ATTF_MAXR || b->T > 0x7fffffff)
        return l->ratio == 4 && !sel ? ERR_INVAL : ERR_UNSUPPORTED;
    const int nk_max = W + (l->ratio == 4 ? topk : (l->ratio ? b->max_pos / l->ratio : 0));
    {
        const int rc = attn_dec(b, c, l, q, kv, sel, topk, sinks, H, hd, W, rope_dim, inv_freq, o,
                                nk_max, xb, xb_done, st);
        if (rc != ERR_UNSUPPORTED)
            return rc;
    }
    if (atc_enabled() && hd == ATC_HD && rope_dim <= hd / 4 && rope_dim % 2 == 0) {
        int rc = attention_tc(b, c, l, q, kv, sel, topk, sinks, H, W, rope_dim, inv_freq, o, ws,
                              nk_max, xb, xb_done, st);
        if (rc != ERR_UNSUPPORTED)
            return rc;
    }
    const int hg = H < 16 * ATTF_HPW ? H : 16 * ATTF_HPW; /* heads per block */
    const size_t smem = sizeof(float) * ATTF_KC * (size_t)hd;
    static size_t smem_set = 48 * 1024;
    if (smem > smem_set) {
        if (cudaFuncSetAttribute(sink_attn_fast_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem) != cudaSuccess) {
            (void)cudaGetLastError(); /* not a launch failure of a later kernel */
            return ERR_UNSUPPORTED;
        }
        smem_set = smem;
    }
    const int S = ws ? attf_splits(b->T, (H + hg - 1) / hg, nk_max) : 1;
    dim3 grid((unsigned)b->T, (unsigned)((H + hg - 1) / hg), (unsigned)S);
    if (kern__launch(sink_attn_fast_k, grid, 32 * ((hg + ATTF_HPW - 1) / ATTF_HPW), smem, st, 1, *b,
                     *c, *l, q, kv, sel, topk, sinks, H, hd, W, rope_dim, inv_freq, o, ws))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return S > 1 ? attn_combine(ws, b->T, H, hd, S, rope_dim, inv_freq, b->row_pos, o, xb, xb_done,
                                st)
                 : 0;
}
