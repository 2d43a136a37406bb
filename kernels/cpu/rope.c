/*
 * rope.c - rotary position embedding, interleaved (GPT-J) pairs, with the YaRN frequency
 * correction of the compressed layers (no attention-temperature factor: DSV4 applies none).
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/dmath.h"

#include <math.h>

static double yarn_corr_dim(double rotations, int dim, double base, int orig_max)
{
    return dim * log(orig_max / (rotations * 2.0 * M_PI)) / (2.0 * log(base));
}

void cpu_rope_inv_freq(int rope_dim, double base, int yarn, double factor, int orig_max,
                       double beta_fast, double beta_slow, float *inv_freq)
{
    int half = rope_dim / 2;
    double lo = 0, hi = 0;
    if (yarn) {
        lo = floor(yarn_corr_dim(beta_fast, rope_dim, base, orig_max));
        hi = ceil(yarn_corr_dim(beta_slow, rope_dim, base, orig_max));
        if (lo < 0)
            lo = 0;
        if (hi > rope_dim - 1)
            hi = rope_dim - 1;
        if (lo == hi)
            hi += 0.001;
    }
    for (int i = 0; i < half; i++) {
        /* the reference computes base^(2i/dim) in FP32 */
        float f = (float)(1.0 / (double)powf((float)base, (float)(2 * i) / (float)rope_dim));
        if (yarn) {
            double ramp = ((double)i - lo) / (hi - lo);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            double smooth = 1.0 - ramp; /* 1: keep (extrapolate), 0: interpolate (divide) */
            f = (float)((double)f / factor * (1.0 - smooth) + (double)f * smooth);
        }
        inv_freq[i] = f;
    }
}

void cpu_rope(float *x, int rope_dim, const float *inv_freq, long pos, int inverse)
{
    for (int i = 0; i < rope_dim / 2; i++) {
        float ang = (float)pos * inv_freq[i]; /* FP32 like the reference */
        float c = cpu_cosf(ang), s = cpu_sinf(ang);
        if (inverse)
            s = -s;
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = b * c + a * s;
    }
}
