/*
 * moe.c - MoE routing (sqrt(softplus) scores; hash routing through tid2eid, or top-k on
 * score + bias) and the clamped SwiGLU with the routing weight applied before the down
 * projection, as the reference defines it.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dmath.h"

#include <math.h>

float cpu_sqrt_softplus(float x)
{
    float sp = x > 20.0f ? x : cpu_log1pf(cpu_expf(x));
    return sqrtf(sp);
}

void cpu_route(const float *logits, int E, int K, const float *bias, const int64_t *hash_ids,
               float route_scale, int *idx, float *w)
{
    if (hash_ids) {
        for (int j = 0; j < K; j++)
            idx[j] = (int)hash_ids[j];
    } else {
        /* top-K of s + bias, ties to the lower expert id; K is small (6), selection sort */
        int taken = 0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            float bv = -INFINITY;
            for (int e = 0; e < E; e++) {
                int used = 0;
                for (int i = 0; i < taken; i++)
                    used |= idx[i] == e;
                if (used)
                    continue;
                float v = cpu_sqrt_softplus(logits[e]) + bias[e];
                if (best < 0 || v > bv) {
                    best = e;
                    bv = v;
                }
            }
            idx[taken++] = best;
        }
    }
    float sum = 0;
    for (int j = 0; j < K; j++) {
        w[j] = cpu_sqrt_softplus(logits[idx[j]]);
        sum += w[j];
    }
    for (int j = 0; j < K; j++)
        w[j] = w[j] / sum * route_scale;
}

void cpu_swiglu_clamp(const float *g, const float *u, int n, float limit, float w, float *h)
{
    for (int i = 0; i < n; i++) {
        float gi = fminf(g[i], limit);
        float ui = fminf(fmaxf(u[i], -limit), limit);
        h[i] = w * (gi / (1.0f + cpu_expf(-gi))) * ui;
    }
}
