/* norm.c - RMSNorm (weighted or weightless), FP32. */
#include "kernels/cpu/cpu.h"

#include <math.h>

void cpu_rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    float ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (w)
        for (int i = 0; i < n; i++)
            out[i] = w[i] * (x[i] * r);
    else
        for (int i = 0; i < n; i++)
            out[i] = x[i] * r;
}
