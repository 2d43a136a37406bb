/*
 * indexer_fast.cu - the lightning indexer of the GPU engine's fast path: the same scores and
 * selection as indexer.cu (score_s = sum_h w_h relu(q_h . K_s) Di^-1/2, the k best in ascending
 * index order, ties to the lower index: ex_topk_select), with the score of each key computed by
 * a whole warp (lanes split the heads, the queries transposed in shared memory) instead of one
 * thread in the CPU's order. Only FP32 summation orders differ from indexer.cu.
 *
 * One block per row; shared memory: the row's queries (Di, Hi) transposed + one key per warp.
 */
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#include "engine/kvcache.h"

#define IDXF_THREADS 256
#define IDXF_WARPS   (IDXF_THREADS / 32)

__global__ void __launch_bounds__(IDXF_THREADS)
    indexer_fast_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                   const float *qi, const float *wi, int Hi, int Di, int topk, float *scores,
                   int ld, int32_t *sel)
{
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ __align__(16) float sm[];
    float *qT = sm;                     /* (Di, Hi): qT[i * Hi + h] = q_h[i] */
    float *keys = sm + (size_t)Di * Hi; /* (IDXF_WARPS, Di) */
    const int t = blockIdx.x, s = b.row_seq[t], ratio = l.ratio;
    const long pos = b.row_pos[t];
    const int nvalid = (int)((pos + 1) / ratio), k = nvalid < topk ? nvalid : topk;
    float *sc = scores + (size_t)t * 2 * ld;               /* (nvalid) scores */
    int *rank = (int *)(scores + (size_t)t * 2 * ld + ld); /* (nvalid) */
    const float *q = qi + (size_t)t * Hi * Di;             /* (Hi, Di) */
    const float *w = wi + (size_t)t * Hi;                  /* (Hi) */
    const float scale = 1.0f / sqrtf((float)Di);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (nvalid > topk) { /* the scores matter only when there is something to select */
        for (int e = threadIdx.x; e < Hi * Di; e += blockDim.x)
            qT[(size_t)(e % Di) * Hi + e / Di] = q[e];
        __syncthreads();
        float *key = keys + (size_t)warp * Di;
        for (int j = warp; j < nvalid; j += IDXF_WARPS) {
            long tok = (long)j * ratio;
            int blk = b.bt[b.seq_bt[s] + tok / DSV4_BLOCK_TOKENS];
            const char *kg = c.blocks + (size_t)blk * c.block_bytes + l.blk_i +
                             (size_t)((tok % DSV4_BLOCK_TOKENS) / ratio) * l.ient;
            for (int i = lane; i < Di; i += 32)
                key[i] = l.fp8 ? kvf_ikey_get((const uint8_t *)kg, i, Di) : ((const float *)kg)[i];
            __syncwarp();
            float acc = 0.0f;
            for (int h = lane; h < Hi; h += 32) {
                float dot = 0.0f;
                for (int i = 0; i < Di; i++)
                    dot += qT[(size_t)i * Hi + h] * key[i];
                acc += w[h] * (dot > 0 ? dot * scale : 0.0f);
            }
            for (int o = 16; o; o >>= 1)
                acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0)
                sc[j] = acc;
            __syncwarp();
        }
    }
    __syncthreads();
    ex_topk_select(sc, rank, nvalid, k, sel + (size_t)t * topk);
}

extern "C" int kern_indexer_topk_fast(const struct kern_batch *b, const struct kern_cache *c,
                                      const struct kern_layer_cache *l, const float *qi,
                                      const float *wi, int Hi, int Di, int topk, float *scores,
                                      int ld_scores, int32_t *sel, cudaStream_t st)
{
    if (l->ratio != 4 || ld_scores < b->max_pos / l->ratio)
        return ERR_INVAL;
    if (b->T <= 0)
        return 0;
    size_t smem = sizeof(float) * ((size_t)Di * Hi + (size_t)IDXF_WARPS * Di);
    static size_t smem_set = 48 * 1024;
    if (smem > smem_set) {
        if (cudaFuncSetAttribute(indexer_fast_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem) != cudaSuccess) {
            (void)cudaGetLastError(); /* not a launch failure of a later kernel */
            return ERR_UNSUPPORTED;
        }
        smem_set = smem;
    }
    if (kern__launch(indexer_fast_k, b->T, IDXF_THREADS, smem, st, 1, *b, *c, *l, qi, wi, Hi, Di,
                     topk, scores, ld_scores, sel))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}
