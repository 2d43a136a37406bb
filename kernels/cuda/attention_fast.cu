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
 */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#define ATTF_KC   32 /* keys per shared-memory chunk */
#define ATTF_MAXR 16 /* hd <= 512 */
#define ATTF_HPW  2  /* heads per warp (each staged key value is loaded once for them) */
#define ATTF_MAXS 16 /* key splits at most (attf_splits) */

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
    const int nk_all = a.nwin + a.ncomp, S = gridDim.z, z = blockIdx.z;
    /* this block's keys: chunk-aligned split z of S */
    const int nch = (nk_all + ATTF_KC - 1) / ATTF_KC;
    const int jb = (int)((long)nch * z / S) * ATTF_KC;
    const int nk = (int)((long)nch * (z + 1) / S) * ATTF_KC < nk_all
                       ? (int)((long)nch * (z + 1) / S) * ATTF_KC
                       : nk_all;
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

/* One warp per (row, head): merge the S partials, normalise, inverse RoPE. */
__global__ void attn_combine_k(const float *part, int T, int H, int hd, int S, int rope_dim,
                               const float *inv_freq, const int32_t *row_pos, float *o)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int gw = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (gw >= T * H)
        return;
    const int t = gw / H;
    const float *p = part + (size_t)gw * S * (hd + 2);
    /* lane z < S holds split z's max; every weight exp(m_z - M) is computed once (by lane z)
     * and the sums run in split order as before */
    const float mz = lane < S ? p[(size_t)lane * (hd + 2)] : -INFINITY;
    float M = mz;
    for (int o = 16; o; o >>= 1)
        M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float wz = lane < S ? expf(mz - M) : 0.0f;
    const float dz = lane < S ? p[(size_t)lane * (hd + 2) + 1] * wz : 0.0f;
    float wt[ATTF_MAXS], den = 0.0f;
#pragma unroll
    for (int z = 0; z < ATTF_MAXS; z++) {
        wt[z] = __shfl_sync(0xffffffffu, wz, z);
        const float dv = __shfl_sync(0xffffffffu, dz, z);
        if (z < S)
            den += dv;
    }
    float *oh = o + (size_t)gw * hd;
    for (int i = lane; i < hd; i += 32) {
        float v = 0.0f;
#pragma unroll
        for (int z = 0; z < ATTF_MAXS; z++)
            if (z < S)
                v += p[(size_t)z * (hd + 2) + 2 + i] * wt[z];
        oh[i] = v / den;
    }
    __syncwarp();
    for (int i = lane; i < rope_dim / 2; i += 32)
        ex_rope_pair(oh + hd - rope_dim, i, inv_freq, row_pos[t], 1);
}

static int attf_sms(void)
{
    static int sms;
    if (!sms && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess)
        sms = 132;
    return sms;
}

/* Key splits for T rows in `groups` head groups: enough blocks for two waves, at most
 * ATTF_MAXS, at least one chunk each. */
static int attf_splits(int T, int groups, int nk_max)
{
    long want = (2L * attf_sms() + (long)T * groups - 1) / ((long)T * groups);
    int S = want < ATTF_MAXS ? (int)want : ATTF_MAXS, nch = (nk_max + ATTF_KC - 1) / ATTF_KC;
    S = S < nch ? S : nch;
    return S < 1 ? 1 : S;
}

extern "C" size_t kern_attention_fast_ws_floats(int H, int hd)
{
    /* S > 1 only while T * groups < 2 sms, so T * S < 4 sms / groups */
    const int groups = (H + 16 * ATTF_HPW - 1) / (16 * ATTF_HPW);
    return (size_t)(4 * attf_sms() / groups + 16) * H * (hd + 2);
}

extern "C" int kern_sink_attention_fast(const struct kern_batch *b, const struct kern_cache *c,
                                        const struct kern_layer_cache *l, const float *q,
                                        const float *kv, const int32_t *sel, int topk,
                                        const float *sinks, int H, int hd, int W, int rope_dim,
                                        const float *inv_freq, float *o, float *ws, cudaStream_t st)
{
    if (b->T <= 0)
        return 0;
    if ((l->ratio == 4 && !sel) || hd % 128 || hd > 32 * ATTF_MAXR || b->T > 0x7fffffff)
        return l->ratio == 4 && !sel ? ERR_INVAL : ERR_UNSUPPORTED;
    const int hg = H < 16 * ATTF_HPW ? H : 16 * ATTF_HPW; /* heads per block */
    const int nk_max = W + (l->ratio == 4 ? topk : (l->ratio ? b->max_pos / l->ratio : 0));
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
    if (S > 1) {
        const int warps = b->T * H;
        if (kern__launch(attn_combine_k, (warps + 7) / 8, 256, 0, st, 1, ws, b->T, H, hd, S,
                         rope_dim, inv_freq, b->row_pos, o))
            return ERR_CUDA;
        EX_LAUNCH_CHECK();
    }
    return 0;
}
