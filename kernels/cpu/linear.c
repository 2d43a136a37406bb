/*
 * linear.c - weight matrices as stored (F32, BF16, FP8 block-scaled, MXFP4) and the CPU linear
 * layer y = x W^T. Weights are dequantised a tile of rows at a time into a per-thread buffer and
 * used for every token of the call, so the weight bytes are read once per call.
 *
 * Determinism: each output element is one cpu_dot() over the dequantised row, whose summation
 * order depends only on `cols`, so results do not depend on T or on the thread count.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define LIN_TILE 16 /* rows dequantised together */

/* AVX2 clones picked at load time by an ifunc resolver. ThreadSanitizer instruments the resolver,
 * which then runs before its runtime is up and crashes, so TSan builds use the default path. */
#if defined(__SANITIZE_THREAD__) || defined(DSV4_NO_TARGET_CLONES)
#define CPU_CLONES
#else
#define CPU_CLONES __attribute__((target_clones("avx2", "default")))
#endif

/* Runtime-dispatched AVX2 clone where the CPU has it. Each of the 8 lanes sums its own
 * elements in order, so every clone returns the same bits. */
CPU_CLONES float cpu_dot(const float *a, const float *b, int n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
    for (; i < n; i++)
        acc[i & 7] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static float fp8_block_scale(const struct cpu_qmat *m, int r, int cb)
{
    int ncb = (m->cols + 127) / 128;
    size_t i = (size_t)(r / 128) * (size_t)ncb + (size_t)cb;
    if (m->scale_f32)
        return ((const float *)m->scale)[i];
    return cpu_e8m0_to_f32(((const uint8_t *)m->scale)[i]);
}

/* (byte) -> its two E2M1 values, low nibble first */
static float fp4_pairs[256][2];
static pthread_once_t fp4_once = PTHREAD_ONCE_INIT;

static void fp4_pairs_init(void)
{
    for (int b = 0; b < 256; b++) {
        fp4_pairs[b][0] = cpu_e2m1_to_f32((uint8_t)(b & 15));
        fp4_pairs[b][1] = cpu_e2m1_to_f32((uint8_t)(b >> 4));
    }
}

CPU_CLONES static void bf16_row(const uint16_t *restrict w, int C, float *restrict out)
{
    for (int c = 0; c < C; c++) {
        uint32_t u = (uint32_t)w[c] << 16;
        memcpy(&out[c], &u, sizeof u);
    }
}

void cpu_qmat_row(const struct cpu_qmat *m, int r, float *out)
{
    const int C = m->cols;
    switch (m->fmt) {
    case CPU_W_F32:
        memcpy(out, (const float *)m->w + (size_t)r * C, sizeof(float) * (size_t)C);
        break;
    case CPU_W_BF16:
        bf16_row((const uint16_t *)m->w + (size_t)r * C, C, out);
        break;
    case CPU_W_FP8: {
        const uint8_t *w = (const uint8_t *)m->w + (size_t)r * C;
        const float *lut = cpu_e4m3_lut();
        for (int cb = 0; cb * 128 < C; cb++) {
            float s = fp8_block_scale(m, r, cb);
            int end = (cb + 1) * 128 < C ? (cb + 1) * 128 : C;
            for (int c = cb * 128; c < end; c++)
                out[c] = lut[w[c]] * s;
        }
        break;
    }
    case CPU_W_MXFP4: {
        const uint8_t *w = (const uint8_t *)m->w + (size_t)r * (C / 2);
        const uint8_t *sc = (const uint8_t *)m->scale + (size_t)r * (C / 32);
        pthread_once(&fp4_once, fp4_pairs_init);
        for (int g = 0; g < C / 32; g++) {
            float s = cpu_e8m0_to_f32(sc[g]);
            for (int j = 0; j < 16; j++) {
                const float *p = fp4_pairs[w[g * 16 + j]];
                out[g * 32 + 2 * j] = p[0] * s;
                out[g * 32 + 2 * j + 1] = p[1] * s;
            }
        }
        break;
    }
    case CPU_W_NVFP4: {
        const uint8_t *w = (const uint8_t *)m->w + (size_t)r * (C / 2);
        const uint8_t *sc = (const uint8_t *)m->scale + (size_t)r * (C / 16);
        pthread_once(&fp4_once, fp4_pairs_init);
        for (int g = 0; g < C / 16; g++) {
            /* block scale times s2, rounded once (exact when s2 is a power of two) */
            float s = cpu_e4m3_to_f32(sc[g]) * m->s2;
            for (int j = 0; j < 8; j++) {
                const float *p = fp4_pairs[w[g * 8 + j]];
                out[g * 16 + 2 * j] = p[0] * s;
                out[g * 16 + 2 * j + 1] = p[1] * s;
            }
        }
        break;
    }
    }
}

float cpu_qmat_at(const struct cpu_qmat *m, int r, int c)
{
    switch (m->fmt) {
    case CPU_W_F32:
        return ((const float *)m->w)[(size_t)r * m->cols + c];
    case CPU_W_BF16:
        return cpu_bf16_to_f32(((const uint16_t *)m->w)[(size_t)r * m->cols + c]);
    case CPU_W_FP8:
        return cpu_e4m3_to_f32(((const uint8_t *)m->w)[(size_t)r * m->cols + c]) *
               fp8_block_scale(m, r, c / 128);
    case CPU_W_MXFP4: {
        uint8_t byte = ((const uint8_t *)m->w)[(size_t)r * (m->cols / 2) + c / 2];
        uint8_t code = (c & 1) ? byte >> 4 : byte & 15;
        return cpu_e2m1_to_f32(code) *
               cpu_e8m0_to_f32(((const uint8_t *)m->scale)[(size_t)r * (m->cols / 32) + c / 32]);
    }
    case CPU_W_NVFP4: {
        uint8_t byte = ((const uint8_t *)m->w)[(size_t)r * (m->cols / 2) + c / 2];
        uint8_t code = (c & 1) ? byte >> 4 : byte & 15;
        return cpu_e2m1_to_f32(code) *
               (cpu_e4m3_to_f32(((const uint8_t *)m->scale)[(size_t)r * (m->cols / 16) + c / 16]) *
                m->s2);
    }
    }
    return NAN;
}

void cpu_linear(const struct cpu_qmat *m, const float *x, int T, float *y)
{
    const int R = m->rows, C = m->cols;
    const int ntiles = (R + LIN_TILE - 1) / LIN_TILE;
#pragma omp parallel if ((long)R * C * (T > 0 ? T : 1) > 32768)
    {
        float *buf = malloc(sizeof(float) * (size_t)LIN_TILE * (size_t)C);
        /* on allocation failure this thread computes row by row from cpu_qmat_at (slow path) */
#pragma omp for schedule(static)
        for (int tile = 0; tile < ntiles; tile++) {
            int r0 = tile * LIN_TILE, r1 = r0 + LIN_TILE < R ? r0 + LIN_TILE : R;
            if (!buf) {
                for (int r = r0; r < r1; r++)
                    for (int t = 0; t < T; t++) {
                        float acc = 0;
                        for (int c = 0; c < C; c++)
                            acc += cpu_qmat_at(m, r, c) * x[(size_t)t * C + c];
                        y[(size_t)t * R + r] = acc;
                    }
                continue;
            }
            for (int r = r0; r < r1; r++)
                cpu_qmat_row(m, r, buf + (size_t)(r - r0) * C);
            for (int t = 0; t < T; t++) {
                const float *xt = x + (size_t)t * C;
                for (int r = r0; r < r1; r++)
                    y[(size_t)t * R + r] = cpu_dot(buf + (size_t)(r - r0) * C, xt, C);
            }
        }
        free(buf);
    }
}

void cpu_act_quant_fp8(float *x, int T, int cols)
{
    for (int t = 0; t < T; t++)
        cpu_fp8_roundtrip(x + (size_t)t * cols, cols, 128);
}
