/*
 * indexer.cu - the lightning indexer (CSA layers): scores of the valid compressed keys and the
 * top-k selection, the twin of cpu_indexer_scores + cpu_topk: score_s = sum_h w_h relu(q_h.K_s)
 * * Di^-1/2 (heads in order, cpu_dot per head), then the k best in ascending index order, ties
 * to the lower index.
 *
 * One block per row. The selection ranks every candidate against all others (O(n^2) per row):
 * exact and simple for the short contexts tested so far; long contexts need a radix select.
 */
#include "kernels/cuda/exact.cuh"

#include "engine/kvcache.h"

#define IDX_THREADS 256

__global__ void indexer_topk_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                               const float *qi, const float *wi, int Hi, int Di, int topk,
                               float *scores, int ld, int32_t *sel)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.x, s = b.row_seq[t], ratio = l.ratio;
    const long pos = b.row_pos[t];
    const int nvalid = (int)((pos + 1) / ratio), k = nvalid < topk ? nvalid : topk;
    float *sc = scores + (size_t)t * 2 * ld;               /* (nvalid) scores */
    int *rank = (int *)(scores + (size_t)t * 2 * ld + ld); /* (nvalid) */
    const float *q = qi + (size_t)t * Hi * Di;             /* (Hi, Di) */
    const float *w = wi + (size_t)t * Hi;                  /* (Hi) */
    const float scale = 1.0f / sqrtf((float)Di);
    for (int j = threadIdx.x; j < nvalid; j += blockDim.x) {
        long tok = (long)j * ratio;
        int blk = b.bt[b.seq_bt[s] + tok / DSV4_BLOCK_TOKENS];
        const float *key = (const float *)(c.blocks + (size_t)blk * c.block_bytes + l.blk_i +
                                           (size_t)((tok % DSV4_BLOCK_TOKENS) / ratio) * l.ient);
        float acc = 0;
        for (int h = 0; h < Hi; h++) {
            float dot = ex_dot_seq(q + (size_t)h * Di, key, Di);
            acc += w[h] * (dot > 0 ? dot * scale : 0.0f);
        }
        sc[j] = acc;
    }
    __syncthreads();
    ex_topk_select(sc, rank, nvalid, k, sel + (size_t)t * topk);
}

extern "C" int kern_indexer_topk(const struct kern_batch *b, const struct kern_cache *c,
                                 const struct kern_layer_cache *l, const float *qi, const float *wi,
                                 int Hi, int Di, int topk, float *scores, int ld_scores,
                                 int32_t *sel, cudaStream_t st)
{
    if (l->ratio != 4 || l->fp8) /* FP32 keys only */
        return ERR_INVAL;
    if (ld_scores < b->max_pos / l->ratio)
        return ERR_INVAL;
    if (b->T <= 0)
        return 0;
    if (kern__launch(indexer_topk_k, b->T, IDX_THREADS, 0, st, 1, *b, *c, *l, qi, wi, Hi, Di, topk,
                     scores, ld_scores, sel))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}
