/*
 * attention.cu - shared-KV (MQA) attention with a per-head sink over the window and the
 * compressed entries, then the inverse RoPE of the output (the twin of the attention loop of
 * engine/model.c + cpu_sink_attention), and the window-ring write.
 *
 * One block per (row, head). Keys are gathered in the CPU's order: window positions ascending
 * (this step's latents for positions of this chunk, the slot's ring before it), then the
 * compressed entries (CSA: the indexer's selection, ascending; HCA: all valid entries). Logits
 * are 8-lane dots; softmax and the value sum run over keys in order, one thread per channel.
 */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#define ATT_THREADS 256

__global__ void sink_attn_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                            const float *q, const float *kv, const int32_t *sel, int topk,
                            const float *sinks, int H, int hd, int W, int rope_dim,
                            const float *inv_freq, float *o)
{
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ __align__(16) float sm[];
    __shared__ float s_mx, s_inv;
    const int t = blockIdx.x / H, h = blockIdx.x % H;
    const struct att_row a = att_row_of(b, l, t, W, topk);
    const int nk = a.nwin + a.ncomp;
    const int32_t *sel_t = sel ? sel + (size_t)t * topk : NULL;
    float *qs = sm;                                              /* (hd) query, later the output */
    float *work = sm + hd;                                       /* (nk) logits, then weights */
    const float **kp = (const float **)(work + ((nk + 1) & ~1)); /* (nk) key pointers */

    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        qs[i] = q[((size_t)t * H + h) * hd + i];
    for (int j = threadIdx.x; j < nk; j += blockDim.x) { /* FP32 cache (l.fp8 == 0) */
        int fresh;
        kp[j] = (const float *)att_key(b, c, l, a, kv, hd, W, sel_t, j, &fresh);
    }
    __syncthreads();
    const float scale = 1.0f / sqrtf((float)hd);
    const int g = threadIdx.x >> 3, lane = threadIdx.x & 7, ng = blockDim.x >> 3;
    for (int j0 = 0; j0 < nk; j0 += ng) {
        int j = j0 + g;
        float v = ex_dot8_combine(j < nk ? ex_dot8_lane(qs, kp[j], hd, lane) : 0.0f);
        if (j < nk && lane == 0)
            work[j] = scale * v;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float mx = sinks[h];
        for (int j = 0; j < nk; j++)
            mx = fmaxf(mx, work[j]);
        s_mx = mx;
    }
    __syncthreads();
    const float mx = s_mx;
    for (int j = threadIdx.x; j < nk; j += blockDim.x)
        work[j] = ex_expf(work[j] - mx);
    __syncthreads();
    if (threadIdx.x == 0) {
        float den = ex_expf(sinks[h] - mx);
        for (int j = 0; j < nk; j++)
            den += work[j];
        s_inv = 1.0f / den;
    }
    __syncthreads();
    const float inv = s_inv;
    for (int ch = threadIdx.x; ch < hd; ch += blockDim.x) {
        float acc = 0;
        for (int j = 0; j < nk; j++)
            acc += work[j] * kp[j][ch];
        qs[ch] = acc * inv;
    }
    __syncthreads();
    ex_block_rope(qs + hd - rope_dim, rope_dim, inv_freq, a.pos, 1);
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        o[((size_t)t * H + h) * hd + i] = qs[i];
}

extern "C" int kern_sink_attention(const struct kern_batch *b, const struct kern_cache *c,
                                   const struct kern_layer_cache *l, const float *q,
                                   const float *kv, const int32_t *sel, int topk,
                                   const float *sinks, int H, int hd, int W, int rope_dim,
                                   const float *inv_freq, float *o, cudaStream_t st)
{
    if (b->T <= 0)
        return 0;
    if ((l->ratio == 4 && !sel) || l->fp8)
        return ERR_INVAL; /* the exact kernel reads FP32 entries */
    int max_comp = l->ratio == 4 ? topk : (l->ratio ? b->max_pos / l->ratio : 0);
    int nk = W + max_comp;
    size_t smem =
        sizeof(float) * ((size_t)hd + (size_t)((nk + 1) & ~1)) + sizeof(float *) * (size_t)nk;
    static size_t smem_set = 48 * 1024;
    if (smem > smem_set) {
        if (cudaFuncSetAttribute(sink_attn_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem) != cudaSuccess) {
            (void)cudaGetLastError(); /* not a launch failure of a later kernel */
            return ERR_UNSUPPORTED;   /* too many keys for one block: a split-K kernel is needed */
        }
        smem_set = smem;
    }
    if (kern__launch(sink_attn_k, b->T * H, ATT_THREADS, smem, st, 1, *b, *c, *l, q, kv, sel, topk,
                     sinks, H, hd, W, rope_dim, inv_freq, o))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

__global__ void window_write_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                               const float *kv, int hd, int W)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.x, s = b.row_seq[t];
    const int row0 = b.seq_row0[s], n = b.seq_n[s], i = t - row0;
    if (i < n - W)
        return; /* overwritten later in this chunk */
    kvf_put_window(b, c, l, t, kv + (size_t)t * hd, hd, W);
}

extern "C" int kern_window_write(const struct kern_batch *b, const struct kern_cache *c,
                                 const struct kern_layer_cache *l, const float *kv, int hd, int W,
                                 cudaStream_t st)
{
    if (b->T <= 0)
        return 0;
    if (kern__launch(window_write_k, b->T, 128, 0, st, 1, *b, *c, *l, kv, hd, W))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}
