/*
 * nvfp4.c - NVFP4 weights on the host: import (MXFP4 exact conversion, ModelOpt,
 * compressed-tensors), ModelOpt-rule quantisation, and the FP64 reference of the NVFP4 MoE.
 * Format and conventions: nvfp4.h.
 */
#include "kernels/cpu/nvfp4.h"
#include "engine/err.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- the matrix ---- */

int nvfp4_mat_init(struct nvfp4_mat *m, int rows, int cols)
{
    memset(m, 0, sizeof *m);
    if (rows <= 0 || cols <= 0 || cols % 16)
        return ERR_INVAL;
    m->rows = rows;
    m->cols = cols;
    m->s2 = 1.0f;
    m->q = calloc((size_t)rows * (cols / 2), 1);
    m->s = calloc((size_t)rows * (cols / 16), 1);
    if (!m->q || !m->s) {
        nvfp4_mat_free(m);
        return ERR_NOMEM;
    }
    return 0;
}

void nvfp4_mat_free(struct nvfp4_mat *m)
{
    if (!m)
        return;
    free(m->q);
    free(m->s);
    m->q = m->s = NULL;
}

/* Row r without s2: e2m1 * e4m3, exact in FP32. */
static void row_unscaled(const struct nvfp4_mat *m, int r, float *out)
{
    const int C = m->cols;
    const uint8_t *q = m->q + (size_t)r * (C / 2);
    const uint8_t *s = m->s + (size_t)r * (C / 16);
    const float *lut = cpu_e4m3_lut();
    for (int g = 0; g < C / 16; g++) {
        float sc = lut[s[g]];
        for (int j = 0; j < 8; j++) {
            uint8_t b = q[g * 8 + j];
            out[g * 16 + 2 * j] = cpu_e2m1_to_f32(b & 15) * sc;
            out[g * 16 + 2 * j + 1] = cpu_e2m1_to_f32(b >> 4) * sc;
        }
    }
}

void nvfp4_mat_row(const struct nvfp4_mat *m, int r, float *out)
{
    const int C = m->cols;
    const uint8_t *q = m->q + (size_t)r * (C / 2);
    const uint8_t *s = m->s + (size_t)r * (C / 16);
    const float *lut = cpu_e4m3_lut();
    for (int g = 0; g < C / 16; g++) {
        /* e2m1 * e4m3 is exact in FP32 (<= 6 significant bits); so is the product with s2
         * unless it underflows, which no real scale does */
        float sc = lut[s[g]] * m->s2;
        for (int j = 0; j < 8; j++) {
            uint8_t b = q[g * 8 + j];
            out[g * 16 + 2 * j] = cpu_e2m1_to_f32(b & 15) * sc;
            out[g * 16 + 2 * j + 1] = cpu_e2m1_to_f32(b >> 4) * sc;
        }
    }
}

float nvfp4_mat_at(const struct nvfp4_mat *m, int r, int c)
{
    uint8_t b = m->q[(size_t)r * (m->cols / 2) + c / 2];
    uint8_t code = (c & 1) ? b >> 4 : b & 15;
    return cpu_e2m1_to_f32(code) * cpu_e4m3_to_f32(m->s[(size_t)r * (m->cols / 16) + c / 16]) *
           m->s2;
}

/* ---- (1) MXFP4 -> NVFP4 ---- */

/* E4M3 byte of 2^k for k in [-9, 8]. */
static uint8_t e4m3_pow2(int k)
{
    if (k >= -6)
        return (uint8_t)((k + 7) << 3);
    return (uint8_t)(1 << (k + 9)); /* subnormal m/8 * 2^-6 */
}

static int block_nonzero(const uint8_t *q16)
{
    for (int j = 0; j < 16; j++)
        if (q16[j] & 0x77)
            return 1;
    return 0;
}

/*
 * Requantise one 16-element half-block of an MXFP4 block (codes q8, 8 bytes, value scale
 * 2^(e-127)) under global s2 with the ModelOpt block rule; writes codes and scale, returns the
 * squared error.
 */
static double requant16(const uint8_t *q8, int e, float s2, uint8_t *oq8, uint8_t *os)
{
    float v[16], amax = 0;
    float sc = ldexpf(1.0f, e - 127);
    for (int j = 0; j < 8; j++) {
        v[2 * j] = cpu_e2m1_to_f32(q8[j] & 15) * sc;
        v[2 * j + 1] = cpu_e2m1_to_f32(q8[j] >> 4) * sc;
    }
    for (int j = 0; j < 16; j++)
        amax = fmaxf(amax, fabsf(v[j]));
    float sb = amax / (6.0f * s2);
    if (sb == 0.0f)
        sb = 1.0f;
    sb = fminf(fmaxf(sb, ldexpf(1.0f, -9)), 448.0f);
    uint8_t sbyte = cpu_f32_to_e4m3(sb);
    float den = cpu_e4m3_to_f32(sbyte) * s2;
    double err = 0;
    for (int j = 0; j < 8; j++) {
        uint8_t lo = cpu_f32_to_e2m1(v[2 * j] / den), hi = cpu_f32_to_e2m1(v[2 * j + 1] / den);
        double d0 = (double)cpu_e2m1_to_f32(lo) * den - v[2 * j];
        double d1 = (double)cpu_e2m1_to_f32(hi) * den - v[2 * j + 1];
        err += d0 * d0 + d1 * d1;
        if (oq8)
            oq8[j] = (uint8_t)(lo | (hi << 4));
    }
    if (os)
        *os = sbyte;
    return err;
}

int nvfp4_from_mxfp4(const uint8_t *q, const uint8_t *e8m0, struct nvfp4_mat *out,
                     struct nvfp4_report *rep)
{
    const int R = out->rows, C = out->cols;
    if (C % 32)
        return ERR_INVAL;
    const size_t nb = (size_t)R * (C / 32);
    int emax = -1, emin = 256;
    for (size_t b = 0; b < nb; b++) {
        if (e8m0[b] == 255)
            return ERR_FORMAT;
        if (!block_nonzero(q + b * 16))
            continue;
        if (e8m0[b] > emax)
            emax = e8m0[b];
        if (e8m0[b] < emin)
            emin = e8m0[b];
    }
    memcpy(out->q, q, (size_t)R * (C / 2));
    if (rep)
        rep->n_mats++;
    if (emax < 0) { /* all zero */
        memset(out->s, 0x38, (size_t)R * (C / 16));
        out->s2 = 1.0f;
        if (rep)
            rep->n_exact++;
        return 0;
    }
    int span = emax - emin;
    int top = emax; /* the MXFP4 exponent that maps to NVFP4 block scale 2^8 */
    if (span > 17) {
        /* least total squared error over the windows [top-17, top] that cover emin or emax */
        double best = INFINITY;
        for (int t = emax; t >= emin + 17; t--) {
            float s2 = ldexpf(1.0f, t - 127 - 8);
            double err = 0;
            for (size_t b = 0; b < nb && err < best; b++) {
                int e = e8m0[b];
                if (!block_nonzero(q + b * 16) || (e <= t && e >= t - 17))
                    continue;
                err += requant16(q + b * 16, e, s2, NULL, NULL);
                err += requant16(q + b * 16 + 8, e, s2, NULL, NULL);
            }
            if (err < best) {
                best = err;
                top = t;
            }
        }
    }
    out->s2 = ldexpf(1.0f, top - 127 - 8);
    double err = 0, norm = 0;
    for (size_t b = 0; b < nb; b++) {
        int e = e8m0[b];
        uint8_t *s = out->s + b * 2;
        if (!block_nonzero(q + b * 16)) {
            s[0] = s[1] = 0x38;
            continue;
        }
        if (e <= top && e >= top - 17) {
            s[0] = s[1] = e4m3_pow2(e - top + 8);
        } else {
            err += requant16(q + b * 16, e, out->s2, out->q + b * 16, &s[0]);
            err += requant16(q + b * 16 + 8, e, out->s2, out->q + b * 16 + 8, &s[1]);
        }
        if (rep && span > 17) {
            float sc = ldexpf(1.0f, e - 127);
            for (int j = 0; j < 16; j++) {
                double a = cpu_e2m1_to_f32(q[b * 16 + j] & 15) * sc;
                double c = cpu_e2m1_to_f32(q[b * 16 + j] >> 4) * sc;
                norm += a * a + c * c;
            }
        }
    }
    if (rep) {
        if (span > 17) {
            double rel = norm > 0 ? sqrt(err / norm) : 0;
            rep->n_inexact++;
            if (rel > rep->worst_rel || rep->worst_span == 0) {
                rep->worst_rel = rel > rep->worst_rel ? rel : rep->worst_rel;
                rep->worst_span = span;
            }
        } else {
            rep->n_exact++;
        }
    }
    return 0;
}

/* ---- (2) ModelOpt / compressed-tensors ---- */

static int import_checked(const uint8_t *w, const uint8_t *sc, float s2, struct nvfp4_mat *out)
{
    const size_t ng = (size_t)out->rows * (out->cols / 16);
    if (!(s2 >= 0.0f) || isinf(s2))
        return ERR_FORMAT;
    memcpy(out->q, w, (size_t)out->rows * (out->cols / 2));
    memcpy(out->s, sc, ng);
    out->s2 = s2;
    for (size_t g = 0; g < ng; g++) {
        uint8_t b = out->s[g];
        if ((b & 0x7f) == 0x7f)
            return ERR_FORMAT; /* NaN */
        if (b & 0x80) {        /* negative scale: fold the sign into the elements */
            out->s[g] = b & 0x7f;
            for (int j = 0; j < 8; j++)
                out->q[g * 8 + j] ^= 0x88;
        }
    }
    return 0;
}

int nvfp4_from_modelopt(const uint8_t *weight, const uint8_t *weight_scale, float weight_scale_2,
                        struct nvfp4_mat *out)
{
    return import_checked(weight, weight_scale, weight_scale_2, out);
}

int nvfp4_from_ctensors(const uint8_t *weight_packed, const uint8_t *weight_scale,
                        float weight_global_scale, struct nvfp4_mat *out)
{
    if (!(weight_global_scale > 0.0f) || isinf(weight_global_scale))
        return ERR_FORMAT;
    return import_checked(weight_packed, weight_scale, (float)(1.0 / (double)weight_global_scale),
                          out);
}

/* ---- (3) ModelOpt quantisation ---- */

int nvfp4_quantize(const float *x, const uint16_t *bf16, struct nvfp4_mat *out)
{
    const int R = out->rows, C = out->cols;
    float amax = 0;
    for (size_t i = 0; i < (size_t)R * C; i++) {
        float v = x ? x[i] : cpu_bf16_to_f32(bf16[i]);
        if (isnan(v) || isinf(v))
            return ERR_FORMAT;
        amax = fmaxf(amax, fabsf(v));
    }
    if (amax == 0.0f) {
        memset(out->q, 0, (size_t)R * (C / 2));
        memset(out->s, 0x38, (size_t)R * (C / 16));
        out->s2 = 1.0f;
        return 0;
    }
    const float s2 = amax / (6.0f * 448.0f);
    out->s2 = s2;
    for (int r = 0; r < R; r++)
        for (int g = 0; g < C / 16; g++) {
            float v[16], bmax = 0;
            for (int j = 0; j < 16; j++) {
                size_t i = (size_t)r * C + g * 16 + j;
                v[j] = x ? x[i] : cpu_bf16_to_f32(bf16[i]);
                bmax = fmaxf(bmax, fabsf(v[j]));
            }
            float sb = bmax / (6.0f * s2);
            if (sb == 0.0f)
                sb = 1.0f;
            sb = fminf(fmaxf(sb, ldexpf(1.0f, -9)), 448.0f);
            uint8_t sbyte = cpu_f32_to_e4m3(sb);
            float den = cpu_e4m3_to_f32(sbyte) * s2;
            out->s[(size_t)r * (C / 16) + g] = sbyte;
            for (int j = 0; j < 8; j++) {
                uint8_t lo = cpu_f32_to_e2m1(v[2 * j] / den);
                uint8_t hi = cpu_f32_to_e2m1(v[2 * j + 1] / den);
                out->q[(size_t)r * (C / 2) + g * 8 + j] = (uint8_t)(lo | (hi << 4));
            }
        }
    return 0;
}

/* ---- FP64 reference of the MoE ---- */

static float bf16_round(float v)
{
    return cpu_bf16_to_f32(cpu_f32_to_bf16(v));
}

/* One SwiGLU expert over n token vectors xs (n, d) with per-token weights; y (n, d) += . */
static int expert_ref(const struct nvfp4_mat *w1, const struct nvfp4_mat *w3,
                      const struct nvfp4_mat *w2, const struct cpu_qmat *q1,
                      const struct cpu_qmat *q3, const struct cpu_qmat *q2, int d, int I,
                      const float *xs, const double *wt, int n, float limit, int emu, double *y)
{
    double *h = malloc(sizeof(double) * (size_t)n * I);
    if (!h)
        return ERR_NOMEM;
    int fail = 0;
#pragma omp parallel
    {
        float *r1 = malloc(sizeof(float) * (size_t)(d > I ? d : I));
        float *r3 = malloc(sizeof(float) * (size_t)(d > I ? d : I));
        if (!r1 || !r3) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp for schedule(static)
        for (int i = 0; i < I; i++) {
            if (!r1 || !r3)
                continue;
            double s1 = 1.0, s3 = 1.0;
            if (w1) {
                row_unscaled(w1, i, r1);
                row_unscaled(w3, i, r3);
                s1 = w1->s2;
                s3 = w3->s2;
            } else {
                cpu_qmat_row(q1, i, r1);
                cpu_qmat_row(q3, i, r3);
            }
            for (int t = 0; t < n; t++) {
                const float *xt = xs + (size_t)t * d;
                double g = 0, u = 0;
                for (int k = 0; k < d; k++) {
                    g += (double)r1[k] * xt[k];
                    u += (double)r3[k] * xt[k];
                }
                g *= s1;
                u *= s3;
                g = g < limit ? g : limit;
                u = u < -limit ? -limit : (u > limit ? limit : u);
                double hv = wt[t] * (g / (1.0 + exp(-g))) * u;
                h[(size_t)t * I + i] = emu ? (double)bf16_round((float)hv) : hv;
            }
        }
#pragma omp for schedule(static)
        for (int o = 0; o < d; o++) {
            if (!r1)
                continue;
            double s2 = 1.0;
            if (w2) {
                row_unscaled(w2, o, r1);
                s2 = w2->s2;
            } else {
                cpu_qmat_row(q2, o, r1);
            }
            for (int t = 0; t < n; t++) {
                const double *ht = h + (size_t)t * I;
                double acc = 0;
                for (int k = 0; k < I; k++)
                    acc += (double)r1[k] * ht[k];
                y[(size_t)t * d + o] = acc * s2;
            }
        }
        free(r1);
        free(r3);
    }
    free(h);
    return fail ? ERR_NOMEM : 0;
}

int nvfp4_moe_ref(const struct nvfp4_moe_host *m, const float *x, const int *rows, int nr,
                  const int *idx, const float *wts, int K, float limit, int emulate_bf16,
                  double *out)
{
    const int d = m->d, I = m->I, E = m->E;
    int rc = 0;
    float *xs = malloc(sizeof(float) * (size_t)(nr ? nr : 1) * K * d);
    double *wt = malloc(sizeof(double) * (size_t)(nr ? nr : 1) * K);
    int *who = malloc(sizeof(int) * (size_t)(nr ? nr : 1) * K);
    double *ys = calloc((size_t)(nr ? nr : 1) * K * d, sizeof(double)); /* (nr, K, d) per slot */
    double *yo = malloc(sizeof(double) * (size_t)(nr ? nr : 1) * K * d);
    if (!xs || !wt || !who || !ys || !yo) {
        rc = ERR_NOMEM;
        goto out;
    }
    for (int e = 0; e < E && !rc; e++) {
        int n = 0;
        for (int i = 0; i < nr; i++)
            for (int j = 0; j < K; j++)
                if (idx[(size_t)rows[i] * K + j] == e) {
                    const float *xr = x + (size_t)rows[i] * d;
                    for (int k = 0; k < d; k++)
                        xs[(size_t)n * d + k] = emulate_bf16 ? bf16_round(xr[k]) : xr[k];
                    wt[n] = wts[(size_t)rows[i] * K + j];
                    who[n++] = i * K + j;
                }
        if (!n)
            continue;
        rc = expert_ref(&m->w1[e], &m->w3[e], &m->w2[e], NULL, NULL, NULL, d, I, xs, wt, n, limit,
                        emulate_bf16, yo);
        for (int t = 0; t < n && !rc; t++)
            memcpy(ys + (size_t)who[t] * d, yo + (size_t)t * d, sizeof(double) * d);
    }
    if (rc)
        goto out;
    /* combine in slot order, then the shared expert */
    for (int i = 0; i < nr; i++)
        for (int k = 0; k < d; k++) {
            double acc = 0;
            for (int j = 0; j < K; j++)
                acc += ys[((size_t)i * K + j) * d + k];
            out[(size_t)i * d + k] = acc;
        }
    if (m->sh_w1) {
        for (int i = 0; i < nr; i++) {
            const float *xr = x + (size_t)rows[i] * d;
            for (int k = 0; k < d; k++)
                xs[(size_t)i * d + k] = emulate_bf16 ? bf16_round(xr[k]) : xr[k];
            wt[i] = 1.0;
        }
        rc = expert_ref(NULL, NULL, NULL, m->sh_w1, m->sh_w3, m->sh_w2, d, I, xs, wt, nr, limit,
                        emulate_bf16, yo);
        for (size_t k = 0; !rc && k < (size_t)nr * d; k++)
            out[k] += yo[k];
    }
out:
    free(xs), free(wt), free(who), free(ys), free(yo);
    return rc;
}
