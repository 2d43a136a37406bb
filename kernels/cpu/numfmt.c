/*
 * numfmt.c - the number formats of DSV4 checkpoints and of its quantisation-aware numerics:
 * BF16, FP8 E4M3 (float8_e4m3fn), UE8M0 scales, FP4 E2M1, power-of-two block scales, and the
 * Hadamard rotation used before FP4 on the indexer path.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

float cpu_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uint16_t cpu_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float cpu_e4m3_to_f32(uint8_t b)
{
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7)
        return NAN;
    if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return s ? -v : v;
}

float cpu_e8m0_to_f32(uint8_t b)
{
    if (b == 255)
        return NAN;
    return ldexpf(1.0f, (int)b - 127);
}

static const float e2m1_values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

float cpu_e2m1_to_f32(uint8_t code)
{
    float v = e2m1_values[code & 7];
    return (code & 8) ? -v : v;
}

/*
 * Round a >= 0 to a float format with `mbits` mantissa bits, minimum normal exponent `emin`
 * (subnormals below it) and largest finite value `maxv`; ties to even, saturating.
 */
static float round_format(float a, int mbits, int emin, float maxv)
{
    if (!(a > 0.0f))
        return 0.0f;
    if (a >= maxv)
        return maxv;
    int e;
    frexpf(a, &e);
    int E = e - 1 < emin ? emin : e - 1;
    float quantum = ldexpf(1.0f, E - mbits);
    float q = rintf(a / quantum) * quantum;
    return q > maxv ? maxv : q;
}

uint8_t cpu_f32_to_e4m3(float x)
{
    uint8_t sign = (signbit(x) && !isnan(x)) ? 0x80 : 0;
    if (isnan(x))
        return 0x7f;
    float q = round_format(fabsf(x), 3, -6, 448.0f);
    if (q == 0.0f)
        return sign;
    if (q < ldexpf(1.0f, -6))
        return (uint8_t)(sign | (uint8_t)(q * 512.0f));
    int e;
    float f = frexpf(q, &e); /* q = f * 2^e, f in [0.5, 1) */
    int E = e - 1;
    int m = (int)((f * 2.0f - 1.0f) * 8.0f);
    return (uint8_t)(sign | (uint8_t)((E + 7) << 3) | (uint8_t)m);
}

uint8_t cpu_f32_to_e2m1(float x)
{
    uint8_t sign = signbit(x) ? 8 : 0;
    float q = round_format(fabsf(x), 1, 0, 6.0f);
    for (uint8_t c = 0; c < 8; c++)
        if (e2m1_values[c] == q)
            return (uint8_t)(sign | c);
    return sign; /* unreachable: q is always representable */
}

static float e4m3_lut[256];
static pthread_once_t e4m3_once = PTHREAD_ONCE_INIT;

static void e4m3_lut_init(void)
{
    for (int i = 0; i < 256; i++)
        e4m3_lut[i] = cpu_e4m3_to_f32((uint8_t)i);
}

const float *cpu_e4m3_lut(void)
{
    pthread_once(&e4m3_once, e4m3_lut_init);
    return e4m3_lut;
}

float cpu_pow2_scale(float amax, float qmax)
{
    float x = amax / qmax;
    int e;
    float f = frexpf(x, &e); /* x = f * 2^e, f in [0.5, 1) */
    return ldexpf(1.0f, f == 0.5f ? e - 1 : e);
}

void cpu_fp8_roundtrip(float *x, int n, int block)
{
    for (int b = 0; b < n; b += block) {
        int len = n - b < block ? n - b : block;
        float amax = 1e-4f;
        for (int i = 0; i < len; i++)
            amax = fmaxf(amax, fabsf(x[b + i]));
        float s = cpu_pow2_scale(amax, 448.0f);
        for (int i = 0; i < len; i++) {
            float v = x[b + i] / s;
            x[b + i] = copysignf(round_format(fabsf(v), 3, -6, 448.0f), v) * s;
        }
    }
}

void cpu_fp4_roundtrip(float *x, int n, int block)
{
    const float floor_amax = 6.0f * ldexpf(1.0f, -126);
    for (int b = 0; b < n; b += block) {
        int len = n - b < block ? n - b : block;
        float amax = floor_amax;
        for (int i = 0; i < len; i++)
            amax = fmaxf(amax, fabsf(x[b + i]));
        float s = cpu_pow2_scale(amax, 6.0f);
        for (int i = 0; i < len; i++) {
            float v = x[b + i] / s;
            x[b + i] = copysignf(round_format(fabsf(v), 1, 0, 6.0f), v) * s;
        }
    }
}

void cpu_hadamard(float *x, int n)
{
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    float s = 1.0f / sqrtf((float)n);
    for (int i = 0; i < n; i++)
        x[i] *= s;
}
