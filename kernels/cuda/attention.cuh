/*
 * attention.cuh - what the two attention kernels share (attention.cu: the exact twin of the CPU;
 * attention_fast.cu: the fast path): a row's window and compressed-entry bounds and the address
 * of its j-th key in the CPU's key order.
 */
#ifndef DSV4_KERNELS_CUDA_ATTENTION_CUH
#define DSV4_KERNELS_CUDA_ATTENTION_CUH

#include "kernels/kernels.h"

#include "engine/kvcache.h"

struct att_row {
    int s, slot, row0, p0, nwin, ncomp;
    long pos, lo;
};

/*
 * The j-th key of a row in the CPU's order: this step's FP32 latent (*fresh = 1) or a cache
 * entry in the layer's format (l.fp8: kvfmt.cuh; else hd floats).
 */
__device__ __forceinline__ const char *att_key(const struct kern_batch &b,
                                               const struct kern_cache &c,
                                               const struct kern_layer_cache &l,
                                               const struct att_row &a, const float *kv, int hd,
                                               int W, const int32_t *sel_t, int j, int *fresh)
{
    *fresh = 0;
    if (j < a.nwin) {
        long p = a.lo + j;
        if (p >= a.p0) {
            *fresh = 1;
            return (const char *)(kv + (size_t)(a.row0 + (p - a.p0)) * hd);
        }
        return c.state + (size_t)a.slot * c.slot_bytes + l.win + (size_t)(p % W) * l.ent;
    }
    long i = l.ratio == 4 ? sel_t[j - a.nwin] : j - a.nwin;
    long tok = i * l.ratio;
    int blk = b.bt[b.seq_bt[a.s] + tok / DSV4_BLOCK_TOKENS];
    return c.blocks + (size_t)blk * c.block_bytes + l.blk +
           (size_t)((tok % DSV4_BLOCK_TOKENS) / l.ratio) * l.ent;
}

/* The bounds of row t: window positions lo..pos (this step's rows from p0), then ncomp entries. */
__device__ __forceinline__ struct att_row att_row_of(const struct kern_batch &b,
                                                     const struct kern_layer_cache &l, int t,
                                                     int W, int topk)
{
    struct att_row a;
    a.s = b.row_seq[t];
    a.pos = b.row_pos[t];
    a.row0 = b.seq_row0[a.s];
    a.p0 = b.row_pos[a.row0];
    a.slot = b.seq_slot[a.s];
    a.lo = a.pos - W + 1 < 0 ? 0 : a.pos - W + 1;
    a.nwin = (int)(a.pos - a.lo + 1);
    int nvalid = l.ratio ? (int)((a.pos + 1) / l.ratio) : 0;
    a.ncomp = l.ratio == 4 ? (nvalid < topk ? nvalid : topk) : nvalid;
    return a;
}

/*
 * attention_dec.cu: the decode kernel for steps of a few rows over FP8 entries at head size
 * 512 (a cluster of two blocks per (row, head), no merge launch; writes o and, xb != NULL, its
 * BF16 hi + lo rows). ERR_UNSUPPORTED where it does not apply (or DSV4_CUDA_ATTN=tc / simt): the caller
 * takes the other kernels.
 */
int attn_dec(const struct kern_batch *b, const struct kern_cache *c,
             const struct kern_layer_cache *l, const float *q, const float *kv, const int32_t *sel,
             int topk, const float *sinks, int H, int hd, int W, int rope_dim,
             const float *inv_freq, float *o, int nk_max, uint16_t *xb, int *xb_done,
             cudaStream_t st);

#endif
