/*
 * compressor.cu - the KV compressors of CSA (ratio 4, overlapping) and HCA (ratio 128) and the
 * indexer's key compressor, the twin of cpu_compressor_push + compress_chunk (engine/model.c):
 * tokens go into the slot's state in position order; a completed block is pooled (per-channel
 * softmax over the candidates, FP32), RMS-normalised, rotated at position entry*ratio, rounded
 * (model numerics) and written to the entry's place in the sequence's blocks.
 *
 * The recurrence is only in the state, so a chunk runs in parallel: one block per entry the
 * chunk completes reads its candidate rows from the chunk's projections or, for positions before
 * the chunk, from the state as the step found it (comp_fetch); a second kernel then writes the
 * state the chunk leaves (per column, read all, then write). Short steps (at most ratio rows
 * a sequence) do both in one block per sequence (compress_seq_k), and decode steps (one row a
 * sequence) in compress_dec_k: a step changes one state row unless it completes an entry, and
 * each column's state is read and written by one thread, so no barrier is needed. Each entry's
 * arithmetic is the CPU's, in its order, so results are bit-identical to the token-by-token
 * recurrence (with `fast`, the fast path's: the RMSNorm's sum of squares over a block tree).
 *
 * State rows (per layer, (coff*ratio, coff*D) values and scores with the positional bias):
 * overlapping (CSA): rows [ratio, 2 ratio) the incomplete group by position % ratio, rows
 * [0, ratio) the group before it (reset values before the first one); otherwise rows
 * [0, ratio) the incomplete group.
 */
#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/kvfmt.cuh"

#include "engine/kvcache.h"

#define COMP_THREADS 256

struct comp_seq {
    const float *a, *z, *ape; /* chunk projections (T, cols), bias (ratio, cols) */
    const float *kvs, *scs;   /* the slot's state as the step found it */
    long p0;                  /* first position of the chunk */
    int row0, n, ratio, cols, overlap;
};

/* Value and score of column col of the token at position tp (tp < 0: before the sequence). */
__device__ __forceinline__ void comp_fetch(const struct comp_seq &q, long tp, int col, float *kv,
                                           float *sc)
{
    if (tp >= q.p0) {
        size_t t = (size_t)(q.row0 + (tp - q.p0)) * q.cols + col;
        *kv = q.a[t];
        *sc = q.z[t] + q.ape[(size_t)(tp % q.ratio) * q.cols + col];
        return;
    }
    const long g0 = q.p0 / q.ratio; /* the group incomplete when the step started */
    int m = (int)(((tp % q.ratio) + q.ratio) % q.ratio);
    int row = (q.overlap && tp >= g0 * q.ratio) ? q.ratio + m : m;
    *kv = q.kvs[(size_t)row * q.cols + col];
    *sc = q.scs[(size_t)row * q.cols + col];
}

__device__ __forceinline__ struct comp_seq
comp_seq_of(const struct kern_batch &b, const struct kern_cache &c,
            const struct kern_layer_cache &l, int s, const float *a, const float *z,
            const float *ape, int D, int overlap, int indexer)
{
    struct comp_seq q;
    const char *slot = c.state + (size_t)b.seq_slot[s] * c.slot_bytes;
    q.a = a;
    q.z = z;
    q.ape = ape;
    q.kvs = (const float *)(slot + (indexer ? l.icomp_kv : l.comp_kv));
    q.scs = (const float *)(slot + (indexer ? l.icomp_sc : l.comp_sc));
    q.row0 = b.seq_row0[s];
    q.n = b.seq_n[s];
    q.p0 = b.row_pos[q.row0];
    q.ratio = l.ratio;
    q.overlap = overlap;
    q.cols = (overlap ? 2 : 1) * D;
    return q;
}

/* The arguments of both compressor kernels. */
struct comp_args {
    const float *a, *z, *ape, *norm, *inv_freq;
    int D, overlap, indexer, rope_dim, quant, fast;
    float eps;
};

/* Entry idx of sequence s from its pooled values e (D floats of shared memory, written by the
 * block): RMSNorm(norm), RoPE at idx * ratio, the rounding (quant), then its place in the
 * sequence's blocks. Called by the whole block. */
__device__ void comp_finish(const struct kern_batch &b, const struct kern_cache &c,
                            const struct kern_layer_cache &l, const struct comp_args &ca, int s,
                            long idx, float *e)
{
    __shared__ float red[32], scales[128];
    const int D = ca.D, indexer = ca.indexer, rope_dim = ca.rope_dim, ratio = l.ratio;
    blk_rmsnorm(e, ca.norm, D, ca.eps, ca.fast, red);
    ex_block_rope(e + D - rope_dim, rope_dim, ca.inv_freq, idx * ratio, 0);
    if (ca.quant) {
        if (indexer) {
            ex_block_hadamard(e, D);
            ex_block_rt(e, D, 32, 1, scales);
        } else {
            ex_block_rt(e, D - rope_dim, 64, 0, scales);
        }
    }
    const long tok = idx * ratio;
    const int blk = b.bt[b.seq_bt[s] + tok / DSV4_BLOCK_TOKENS];
    char *dst = c.blocks + (size_t)blk * c.block_bytes + (indexer ? l.blk_i : l.blk) +
                (size_t)((tok % DSV4_BLOCK_TOKENS) / ratio) * (indexer ? l.ient : l.ent);
    if (l.fp8) { /* exact: the values are on the FP8 (FP4) grid already (kvfmt.cuh) */
        if (indexer)
            kvf_put_blocks(e, D, 32, (uint8_t *)dst, (uint8_t *)dst + D);
        else
            kvf_put_entry(e, D, rope_dim, (uint8_t *)dst);
        return;
    }
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        ((float *)dst)[j] = e[j];
}

/* Entry p0/ratio + k of sequence s, if this chunk completes it (block-uniform); e: D floats of
 * shared memory. */
__device__ void comp_entry(const struct kern_batch &b, const struct kern_cache &c,
                           const struct kern_layer_cache &l, const struct comp_args &ca, int s,
                           int k, float *e)
{
    const int D = ca.D, overlap = ca.overlap, indexer = ca.indexer;
    const struct comp_seq q = comp_seq_of(b, c, l, s, ca.a, ca.z, ca.ape, D, overlap, indexer);
    const int ratio = q.ratio, nrows = (overlap ? 2 : 1) * ratio;
    const long idx = q.p0 / ratio + k;
    if ((idx + 1) * ratio > q.p0 + q.n)
        return; /* not completed in this chunk */
    /* candidate row r: the group before (overlap, r < ratio, first half of the columns) or the
     * entry's own group (second half when overlapping) */
    for (int ch = threadIdx.x; ch < D; ch += blockDim.x) {
        float mx = -INFINITY, kv, sc;
        for (int r = 0; r < nrows; r++) {
            long tp = overlap ? (idx - 1) * ratio + r : idx * ratio + r;
            comp_fetch(q, tp, (overlap && r >= ratio) ? D + ch : ch, &kv, &sc);
            mx = fmaxf(mx, sc);
        }
        float den = 0, num = 0;
        for (int r = 0; r < nrows; r++) {
            long tp = overlap ? (idx - 1) * ratio + r : idx * ratio + r;
            comp_fetch(q, tp, (overlap && r >= ratio) ? D + ch : ch, &kv, &sc);
            float p = ex_expf(sc - mx);
            den += p;
            num += p * kv;
        }
        e[ch] = num / den;
    }
    comp_finish(b, c, l, ca, s, idx, e);
}

/* The state of sequence s after the chunk, one column per thread. */
__device__ void comp_state(const struct kern_batch &b, const struct kern_cache &c,
                           const struct kern_layer_cache &l, const struct comp_args &ca, int s)
{
    const int overlap = ca.overlap;
    const struct comp_seq q =
        comp_seq_of(b, c, l, s, ca.a, ca.z, ca.ape, ca.D, overlap, ca.indexer);
    const int ratio = q.ratio;
    const long last = q.p0 + q.n - 1, gn = (last + 1) / ratio; /* the group now incomplete */
    float *kvs = (float *)q.kvs, *scs = (float *)q.scs;
    for (int k = threadIdx.x; k < q.cols; k += blockDim.x) {
        if (!overlap) { /* rows stay where they are: write the chunk's rows of group gn */
            for (long tp = q.p0 > gn * ratio ? q.p0 : gn * ratio; tp <= last; tp++)
                comp_fetch(q, tp, k, &kvs[(size_t)(tp % ratio) * q.cols + k],
                           &scs[(size_t)(tp % ratio) * q.cols + k]);
            continue;
        }
        float kv[8], sc[8]; /* overlap: ratio 4, rows (gn-1)*4.. and gn*4.. up to `last` */
        for (int r = 0; r < 2 * ratio && r < 8 && (gn - 1) * ratio + r <= last; r++)
            comp_fetch(q, (gn - 1) * ratio + r, k, &kv[r], &sc[r]);
        for (int r = 0; r < 2 * ratio && r < 8; r++) {
            if ((gn - 1) * ratio + r > last)
                break; /* not reached yet: stale, overwritten before use */
            kvs[(size_t)r * q.cols + k] = kv[r];
            scs[(size_t)r * q.cols + k] = sc[r];
        }
    }
}

/* grid (entries, nseq): entry blockIdx.x of sequence blockIdx.y */
__global__ void compress_entries_k(struct kern_batch b, struct kern_cache c,
                                   struct kern_layer_cache l, const struct comp_args ca)
{
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ __align__(16) float e[]; /* (D) the pooled entry */
    comp_entry(b, c, l, ca, blockIdx.y, blockIdx.x, e);
}

/* grid (nseq): the state the chunk leaves, after every entry has read the old one */
__global__ void compress_state_k(struct kern_batch b, struct kern_cache c,
                                 struct kern_layer_cache l, const struct comp_args ca)
{
    kern__pdl_wait();
    kern__pdl_launch();
    comp_state(b, c, l, ca, blockIdx.x);
}

/* grid (nseq), steps of at most `ne` entries per sequence (decode): one block per sequence
 * computes its entries and then writes its state (the entries read only their own slot's
 * state), one launch instead of two. */
__global__ void compress_seq_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                               const struct comp_args ca, int ne)
{
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ __align__(16) float e[]; /* (D) */
    for (int k = 0; k < ne; k++) {
        __syncthreads(); /* the previous entry's reads of e are done */
        comp_entry(b, c, l, ca, blockIdx.x, k, e);
    }
    __syncthreads(); /* every read of the old state is done */
    comp_state(b, c, l, ca, blockIdx.x);
}

/*
 * Decode steps (every sequence one row, at position p): grid (nseq), the columns ch < D split
 * over the threads (thread t: t and t + COMP_THREADS, D <= 2 COMP_THREADS). A step changes one
 * state row, or, when it completes entry p / ratio, pools it from the state rows and the row;
 * each state element is read and written by the thread that owns its column, so no barrier
 * orders them. Same values and sums, in the same order, as compress_seq_k (comp_fetch's
 * candidate r is state row r here, the last one the step's row), so the bits are the same.
 *
 * OV == 4 (CSA, overlapping, ratio 4): the row goes to state row 4 + p % 4; completing, entry
 * candidates are rows 0..3 (columns ch) and 4..6 + the row (columns D + ch), then rows 0..3
 * become the completed group (old rows 4..6 + the row, all 2D columns) and rows 4..7 are
 * stale until overwritten. OV == 0 (any ratio): the row goes to state row p % ratio unless it
 * completes the entry (candidates rows 0..ratio-2 + the row).
 *
 * Nothing read before the dependency wait was written by the last two kernels: the batch
 * description (uploaded before the step), the positional bias and the state (this kernel's
 * previous step); the projections a, z after it.
 */
#define COMP_DEC_CPT 2 /* columns per thread */
template <int OV>
__global__ void __launch_bounds__(COMP_THREADS)
    compress_dec_k(struct kern_batch b, struct kern_cache c, struct kern_layer_cache l,
                   const struct comp_args ca)
{
    extern __shared__ __align__(16) float e[]; /* (D) the pooled entry */
    const int s = blockIdx.x, D = ca.D, ratio = OV ? OV : l.ratio, cols = OV ? 2 * D : D;
    const int row0 = b.seq_row0[s], p = b.row_pos[row0], m = p % ratio;
    const bool done = m == ratio - 1; /* the step completes entry p / ratio (block-uniform) */
    const char *slot = c.state + (size_t)b.seq_slot[s] * c.slot_bytes;
    float *kvs = (float *)(slot + (ca.indexer ? l.icomp_kv : l.comp_kv)),
          *scs = (float *)(slot + (ca.indexer ? l.icomp_sc : l.comp_sc));
    const float *a = ca.a + (size_t)row0 * cols, *z = ca.z + (size_t)row0 * cols,
                *ape = ca.ape + (size_t)m * cols;
    constexpr int NH = OV ? 2 : 1;          /* column halves: ch and (OV) D + ch */
    constexpr int NR = OV ? 2 * OV - 1 : 1; /* state candidates held in registers (OV) */
    /* OV: kv/sc[j][r] = state row r < 2 OV - 1 of column ch (r < OV) or D + ch (r >= OV), and
     * kh/sh[j][r] = state row OV + r of column ch (completing steps only) */
    float fa[COMP_DEC_CPT][NH], fz[COMP_DEC_CPT][NH], kv[COMP_DEC_CPT][NR], sc[COMP_DEC_CPT][NR],
        kh[COMP_DEC_CPT][OV ? OV - 1 : 1], sh[COMP_DEC_CPT][OV ? OV - 1 : 1];
#pragma unroll
    for (int j = 0; j < COMP_DEC_CPT; j++) {
        const int ch = threadIdx.x + COMP_THREADS * j;
        if (ch >= D)
            continue;
#pragma unroll
        for (int h = 0; h < NH; h++)
            fz[j][h] = ape[h * D + ch];
        if (OV && done) {
#pragma unroll
            for (int r = 0; r < NR; r++) {
                const size_t at = (size_t)r * cols + (r < OV ? ch : D + ch);
                kv[j][r] = kvs[at];
                sc[j][r] = scs[at];
            }
#pragma unroll
            for (int r = 0; r < OV - 1; r++) {
                kh[j][r] = kvs[(size_t)(OV + r) * cols + ch];
                sh[j][r] = scs[(size_t)(OV + r) * cols + ch];
            }
        }
    }
    kern__pdl_wait();
    kern__pdl_launch();
#pragma unroll
    for (int j = 0; j < COMP_DEC_CPT; j++) {
        const int ch = threadIdx.x + COMP_THREADS * j;
        if (ch >= D)
            continue;
#pragma unroll
        for (int h = 0; h < NH; h++) {
            fa[j][h] = a[h * D + ch];
            fz[j][h] = z[h * D + ch] + fz[j][h];
        }
    }
#pragma unroll
    for (int j = 0; j < COMP_DEC_CPT; j++) {
        const int ch = threadIdx.x + COMP_THREADS * j;
        if (ch >= D)
            continue;
        if (!done) {
            const size_t row = (size_t)(OV ? OV + m : m) * cols;
#pragma unroll
            for (int h = 0; h < NH; h++) {
                kvs[row + h * D + ch] = fa[j][h];
                scs[row + h * D + ch] = fz[j][h];
            }
            continue;
        }
        /* the entry's column ch: candidates in comp_entry's order, the step's row last */
        float mx = -INFINITY, den = 0.0f, num = 0.0f;
        if (OV) {
#pragma unroll
            for (int r = 0; r < NR; r++)
                mx = fmaxf(mx, sc[j][r]);
            mx = fmaxf(mx, fz[j][NH - 1]);
#pragma unroll
            for (int r = 0; r < NR; r++) {
                const float q = ex_expf(sc[j][r] - mx);
                den += q;
                num += q * kv[j][r];
            }
        } else {
#pragma unroll 8
            for (int r = 0; r < ratio - 1; r++)
                mx = fmaxf(mx, scs[(size_t)r * cols + ch]);
            mx = fmaxf(mx, fz[j][0]);
#pragma unroll 8
            for (int r = 0; r < ratio - 1; r++) {
                const float q = ex_expf(scs[(size_t)r * cols + ch] - mx);
                den += q;
                num += q * kvs[(size_t)r * cols + ch];
            }
        }
        const float q = ex_expf(fz[j][NH - 1] - mx);
        den += q;
        num += q * fa[j][NH - 1];
        e[ch] = num / den;
        if (OV) { /* rows 0..OV-1 <- the completed group: old rows OV.. and the step's row */
#pragma unroll
            for (int r = 0; r < OV - 1; r++) {
                kvs[(size_t)r * cols + ch] = kh[j][r];
                scs[(size_t)r * cols + ch] = sh[j][r];
                kvs[(size_t)r * cols + D + ch] = kv[j][OV + r];
                scs[(size_t)r * cols + D + ch] = sc[j][OV + r];
            }
#pragma unroll
            for (int h = 0; h < NH; h++) {
                kvs[(size_t)(OV - 1) * cols + h * D + ch] = fa[j][h];
                scs[(size_t)(OV - 1) * cols + h * D + ch] = fz[j][h];
            }
        }
    }
    if (done)
        comp_finish(b, c, l, ca, s, p / ratio, e);
}

extern "C" int kern_compress(const struct kern_batch *b, const struct kern_cache *c,
                             const struct kern_layer_cache *l, const float *a, const float *z,
                             const float *ape, const float *norm, int D, int overlap, int indexer,
                             int rope_dim, const float *inv_freq, float eps, int quant, int fast,
                             cudaStream_t st)
{
    if (!l->ratio || D > 128 * 32 || (indexer && (D & (D - 1))) || (overlap && l->ratio > 4))
        return ERR_UNSUPPORTED;
    if (b->nseq <= 0)
        return 0;
    const int max_n = b->max_n > 0 ? b->max_n : b->T;
    const unsigned ne = (unsigned)((max_n + l->ratio - 1) / l->ratio + 1); /* entries per seq */
    const struct comp_args ca = {a,       z,       ape,      norm,  inv_freq, D,
                                 overlap, indexer, rope_dim, quant, fast,     eps};
    const size_t smem = sizeof(float) * (size_t)D;
    if (b->max_n == 1 && D <= COMP_DEC_CPT * COMP_THREADS && (!overlap || l->ratio == 4)) {
        if (overlap ? kern__launch(compress_dec_k<4>, b->nseq, COMP_THREADS, smem, st, 1, *b, *c,
                                   *l, ca)
                    : kern__launch(compress_dec_k<0>, b->nseq, COMP_THREADS, smem, st, 1, *b, *c,
                                   *l, ca))
            return ERR_CUDA;
        EX_LAUNCH_CHECK();
        return 0;
    }
    if (ne <= 2) { /* decode-sized steps */
        if (kern__launch(compress_seq_k, b->nseq, COMP_THREADS, smem, st, 1, *b, *c, *l, ca,
                         (int)ne))
            return ERR_CUDA;
        EX_LAUNCH_CHECK();
        return 0;
    }
    if (kern__launch(compress_entries_k, dim3(ne, (unsigned)b->nseq), COMP_THREADS, smem, st, 1, *b,
                     *c, *l, ca))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    if (kern__launch(compress_state_k, b->nseq, COMP_THREADS, 0, st, 1, *b, *c, *l, ca))
        return ERR_CUDA;
    EX_LAUNCH_CHECK();
    return 0;
}

extern "C" int kern_compressor_reset(const struct kern_cache *c, const struct kern_layer_cache *l,
                                     int slot, int hd, int Di, cudaStream_t st)
{
    if (!l->ratio)
        return 0;
    const int coff = l->ratio == 4 ? 2 : 1;
    char *base = c->state + (size_t)slot * c->slot_bytes;
    size_t n = (size_t)coff * l->ratio * coff * hd;
    int rc;
    if ((rc = kern_fill_f32((float *)(base + l->comp_kv), n, 0.0f, st)) ||
        (rc = kern_fill_f32((float *)(base + l->comp_sc), n, -INFINITY, st)))
        return rc;
    if (l->ratio == 4) {
        size_t ni = (size_t)coff * l->ratio * coff * Di;
        if ((rc = kern_fill_f32((float *)(base + l->icomp_kv), ni, 0.0f, st)) ||
            (rc = kern_fill_f32((float *)(base + l->icomp_sc), ni, -INFINITY, st)))
            return rc;
    }
    return 0;
}
