/*
 * compressor.c - the KV compressor state machine shared by CSA (ratio 4, overlapping: each
 * entry pools 8 candidate tokens, the previous block's first-half projections and the current
 * block's second-half ones) and HCA (ratio 128, non-overlapping). Pooling is a per-channel
 * softmax over the block's gate scores, FP32.
 *
 * The same push() runs in prefill and decode, so a sequence's entries are bit-identical however
 * its tokens were batched.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dmath.h"

#include <math.h>
#include <string.h>

void cpu_compressor_reset(float *kv, float *score, int ratio, int D, int overlap)
{
    int coff = overlap ? 2 : 1;
    size_t n = (size_t)coff * ratio * coff * D;
    memset(kv, 0, n * sizeof *kv);
    for (size_t i = 0; i < n; i++)
        score[i] = -INFINITY;
}

int cpu_compressor_push(float *kv, float *score, int ratio, int D, int overlap, long pos,
                        const float *a, const float *z, float *pooled)
{
    int coff = overlap ? 2 : 1;
    int cols = coff * D;
    int row = (int)(pos % ratio) + (overlap ? ratio : 0);
    memcpy(kv + (size_t)row * cols, a, sizeof(float) * (size_t)cols);
    memcpy(score + (size_t)row * cols, z, sizeof(float) * (size_t)cols);
    if ((pos + 1) % ratio != 0)
        return 0;
    int nrows = coff * ratio;
    for (int c = 0; c < D; c++) {
        /* candidate r: previous rows read columns [0, D), current rows columns [D, 2D) */
        float mx = -INFINITY;
        for (int r = 0; r < nrows; r++) {
            int col = (overlap && r >= ratio) ? D + c : c;
            mx = fmaxf(mx, score[(size_t)r * cols + col]);
        }
        float den = 0, num = 0;
        for (int r = 0; r < nrows; r++) {
            int col = (overlap && r >= ratio) ? D + c : c;
            float p = cpu_expf(score[(size_t)r * cols + col] - mx);
            den += p;
            num += p * kv[(size_t)r * cols + col];
        }
        pooled[c] = num / den;
    }
    if (overlap) {
        memcpy(kv, kv + (size_t)ratio * cols, sizeof(float) * (size_t)ratio * cols);
        memcpy(score, score + (size_t)ratio * cols, sizeof(float) * (size_t)ratio * cols);
    }
    return 1;
}
