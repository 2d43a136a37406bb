/*
 * attention.c - shared-KV (MQA) attention of one query token with a per-head attention sink:
 * one softmax over the given keys plus the sink, which adds only to the denominator.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dmath.h"

#include <math.h>

void cpu_sink_attention(const float *q, int H, int D, const float *const *keys, int nk,
                        const float *sinks, float scale, float *out, float *work)
{
    for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * D;
        float *oh = out + (size_t)h * D;
        float mx = sinks[h];
        for (int j = 0; j < nk; j++) {
            work[j] = scale * cpu_dot(qh, keys[j], D);
            mx = fmaxf(mx, work[j]);
        }
        float den = cpu_expf(sinks[h] - mx);
        for (int c = 0; c < D; c++)
            oh[c] = 0;
        for (int j = 0; j < nk; j++) {
            float p = cpu_expf(work[j] - mx);
            den += p;
            const float *k = keys[j];
            for (int c = 0; c < D; c++)
                oh[c] += p * k[c];
        }
        float inv = 1.0f / den;
        for (int c = 0; c < D; c++)
            oh[c] *= inv;
    }
}
