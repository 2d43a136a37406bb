/*
 * compressor.cu - the KV compressors of CSA (ratio 4, overlapping) and HCA (ratio 128) and the
 * indexer's key compressor, the twin of cpu_compressor_push + compress_chunk (engine/model.c):
 * tokens go into the slot's state in position order; a completed block is pooled (per-channel
 * softmax over the candidates, FP32), RMS-normalised, rotated at position entry*ratio, rounded
 * (model numerics) and written to the entry's place in the sequence's blocks.
 *
 * One block per sequence walks its chunk's tokens in order (the state is a recurrence); threads
 * split the columns.
 */
#include "kernels/cuda/exact.cuh"

#include "engine/kvcache.h"

#define COMP_THREADS 256

__global__ void compress_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                           const float *a, const float *z, const float *ape, const float *norm,
                           int D, int overlap, int indexer, int rope_dim, const float *inv_freq,
                           float eps, int quant)
{
    extern __shared__ __align__(16) float e[]; /* (D) the pooled entry */
    __shared__ float red, scales[128];
    const int s = blockIdx.x, ratio = l.ratio;
    const int row0 = b.seq_row0[s], n = b.seq_n[s];
    const long p0 = b.row_pos[row0];
    const int coff = overlap ? 2 : 1, cols = coff * D, nrows = coff * ratio;
    float *slot = c.state + (size_t)b.seq_slot[s] * c.slot_floats;
    float *kvs = slot + (indexer ? l.icomp_kv : l.comp_kv); /* (nrows, cols) */
    float *scs = slot + (indexer ? l.icomp_sc : l.comp_sc); /* (nrows, cols) */
    for (int i = 0; i < n; i++) {
        const long pos = p0 + i;
        const int t = row0 + i, row = (int)(pos % ratio) + (overlap ? ratio : 0);
        const float *ap = ape + (size_t)(pos % ratio) * cols;
        for (int k = threadIdx.x; k < cols; k += blockDim.x) {
            kvs[(size_t)row * cols + k] = a[(size_t)t * cols + k];
            scs[(size_t)row * cols + k] = z[(size_t)t * cols + k] + ap[k];
        }
        __syncthreads();
        if ((pos + 1) % ratio != 0)
            continue;
        for (int ch = threadIdx.x; ch < D; ch += blockDim.x) {
            float mx = -INFINITY;
            for (int r = 0; r < nrows; r++) {
                int col = (overlap && r >= ratio) ? D + ch : ch;
                mx = fmaxf(mx, scs[(size_t)r * cols + col]);
            }
            float den = 0, num = 0;
            for (int r = 0; r < nrows; r++) {
                int col = (overlap && r >= ratio) ? D + ch : ch;
                float p = ex_expf(scs[(size_t)r * cols + col] - mx);
                den += p;
                num += p * kvs[(size_t)r * cols + col];
            }
            e[ch] = num / den;
        }
        ex_block_rmsnorm(e, norm, D, eps, &red);
        const long idx = pos / ratio;
        ex_block_rope(e + D - rope_dim, rope_dim, inv_freq, idx * ratio, 0);
        if (quant) {
            if (indexer) {
                ex_block_hadamard(e, D);
                ex_block_rt(e, D, 32, 1, scales);
            } else {
                ex_block_rt(e, D - rope_dim, 64, 0, scales);
            }
        }
        const long tok = idx * ratio;
        const int blk = b.bt[b.seq_bt[s] + tok / DSV4_BLOCK_TOKENS];
        float *dst = c.blocks + (size_t)blk * c.block_floats + (indexer ? l.blk_i : l.blk) +
                     (size_t)((tok % DSV4_BLOCK_TOKENS) / ratio) * D;
        for (int k = threadIdx.x; k < D; k += blockDim.x)
            dst[k] = e[k];
        if (overlap) { /* the current rows become the previous ones */
            for (int k = threadIdx.x; k < ratio * cols; k += blockDim.x) {
                kvs[k] = kvs[(size_t)ratio * cols + k];
                scs[k] = scs[(size_t)ratio * cols + k];
            }
        }
        __syncthreads();
    }
}

extern "C" int kern_compress(const struct kern_batch *b, const struct kern_cache *c,
                             const struct kern_layer_cache *l, const float *a, const float *z,
                             const float *ape, const float *norm, int D, int overlap, int indexer,
                             int rope_dim, const float *inv_freq, float eps, int quant,
                             cudaStream_t st)
{
    if (!l->ratio || D > 128 * 32 || (indexer && (D & (D - 1))))
        return ERR_UNSUPPORTED;
    if (b->nseq <= 0)
        return 0;
    compress_k<<<b->nseq, COMP_THREADS, sizeof(float) * (size_t)D, st>>>(
        *b, *c, *l, a, z, ape, norm, D, overlap, indexer, rope_dim, inv_freq, eps, quant);
    EX_LAUNCH_CHECK();
    return 0;
}

extern "C" int kern_compressor_reset(const struct kern_cache *c, const struct kern_layer_cache *l,
                                     int slot, int hd, int Di, cudaStream_t st)
{
    if (!l->ratio)
        return 0;
    const int coff = l->ratio == 4 ? 2 : 1;
    float *base = c->state + (size_t)slot * c->slot_floats;
    size_t n = (size_t)coff * l->ratio * coff * hd;
    int rc;
    if ((rc = kern_fill_f32(base + l->comp_kv, n, 0.0f, st)) ||
        (rc = kern_fill_f32(base + l->comp_sc, n, -INFINITY, st)))
        return rc;
    if (l->ratio == 4) {
        size_t ni = (size_t)coff * l->ratio * coff * Di;
        if ((rc = kern_fill_f32(base + l->icomp_kv, ni, 0.0f, st)) ||
            (rc = kern_fill_f32(base + l->icomp_sc, ni, -INFINITY, st)))
            return rc;
    }
    return 0;
}
