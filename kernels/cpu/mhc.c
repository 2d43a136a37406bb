/*
 * mhc.c - manifold-constrained hyper-connections: hc_pre (the (2+n)n-way projection, sigmoid
 * gates and the Sinkhorn-normalised n x n mixing matrix), hc_post, and the final hc_head.
 * All FP32 (the reference computes mHC in FP32).
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dmath.h"

#include <math.h>

#define HC_MAX 16

static float sigmoidf(float x)
{
    return 1.0f / (1.0f + cpu_expf(-x));
}

/* mix (nmix) = fn (nmix, n*d) . rmsnorm(X) */
static void hc_mix(const float *X, int n, int d, const float *fn, int nmix, float norm_eps,
                   float *mix)
{
    int len = n * d;
    float ss = 0;
    for (int i = 0; i < len; i++)
        ss += X[i] * X[i];
    float r = 1.0f / sqrtf(ss / (float)len + norm_eps);
    for (int m = 0; m < nmix; m++)
        mix[m] = cpu_dot(fn + (size_t)m * len, X, len) * r;
}

void cpu_hc_pre(const float *X, int n, int d, const float *fn, const float *base,
                const float *scale, int iters, float hc_eps, float norm_eps, float *u, float *post,
                float *comb)
{
    float mix[(2 + HC_MAX) * HC_MAX], pre[HC_MAX];
    int nmix = (2 + n) * n;
    hc_mix(X, n, d, fn, nmix, norm_eps, mix);
    for (int i = 0; i < n; i++) {
        pre[i] = sigmoidf(mix[i] * scale[0] + base[i]) + hc_eps;
        post[i] = 2.0f * sigmoidf(mix[n + i] * scale[1] + base[n + i]);
    }
    /* comb[j][k]: row softmax over k, + eps */
    for (int j = 0; j < n; j++) {
        float *row = comb + j * n;
        float mx = -INFINITY, sum = 0;
        for (int k = 0; k < n; k++) {
            row[k] = mix[2 * n + j * n + k] * scale[2] + base[2 * n + j * n + k];
            mx = fmaxf(mx, row[k]);
        }
        for (int k = 0; k < n; k++) {
            row[k] = cpu_expf(row[k] - mx);
            sum += row[k];
        }
        for (int k = 0; k < n; k++)
            row[k] = row[k] / sum + hc_eps;
    }
    /* Sinkhorn: column normalise, then (iters-1) x (row, column) */
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int j = 0; j < n; j++) {
                float s = 0;
                for (int k = 0; k < n; k++)
                    s += comb[j * n + k];
                for (int k = 0; k < n; k++)
                    comb[j * n + k] /= s + hc_eps;
            }
        for (int k = 0; k < n; k++) {
            float s = 0;
            for (int j = 0; j < n; j++)
                s += comb[j * n + k];
            for (int j = 0; j < n; j++)
                comb[j * n + k] /= s + hc_eps;
        }
    }
    for (int c = 0; c < d; c++) {
        float acc = 0;
        for (int i = 0; i < n; i++)
            acc += pre[i] * X[(size_t)i * d + c];
        u[c] = acc;
    }
}

void cpu_hc_post(const float *f, const float *R, const float *post, const float *comb, int n,
                 int d, float *Xout)
{
    for (int k = 0; k < n; k++)
        for (int c = 0; c < d; c++) {
            float acc = post[k] * f[c];
            for (int j = 0; j < n; j++)
                acc += comb[j * n + k] * R[(size_t)j * d + c];
            Xout[(size_t)k * d + c] = acc;
        }
}

void cpu_hc_head(const float *X, int n, int d, const float *fn, const float *base,
                 const float *scale, float hc_eps, float norm_eps, float *y)
{
    float mix[HC_MAX], pre[HC_MAX];
    hc_mix(X, n, d, fn, n, norm_eps, mix);
    for (int i = 0; i < n; i++)
        pre[i] = sigmoidf(mix[i] * scale[0] + base[i]) + hc_eps;
    for (int c = 0; c < d; c++) {
        float acc = 0;
        for (int i = 0; i < n; i++)
            acc += pre[i] * X[(size_t)i * d + c];
        y[c] = acc;
    }
}
