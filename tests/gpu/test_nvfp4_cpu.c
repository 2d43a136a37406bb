/*
 * test_nvfp4_cpu.c - NVFP4 weights on the host (TAP, no GPU needed): ModelOpt quantisation,
 * exact MXFP4 -> NVFP4 conversion and its load report, ModelOpt / compressed-tensors import,
 * and the kernel packing (NVFP4 and FP8) checked element by element against the canonical
 * matrices.
 */
#include "kernels/kernels.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/nvfp4.h"
#include "engine/err.h"
#include "tests/gpu/moe_fixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int n_test, n_fail;

static void ok(int cond, const char *what)
{
    n_test++;
    n_fail += !cond;
    printf("%s %d - %s\n", cond ? "ok" : "not ok", n_test, what);
}

static void test_quantize(void)
{
    /* values on the E2M1 grid with amax 6: s2 = 6/2688, every block scale 448*s2 = 1: exact */
    enum { R = 16, C = 64 };
    static const float grid[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
    float x[R * C];
    uint16_t xb[R * C];
    for (int i = 0; i < R * C; i++) {
        x[i] = grid[fx_mix(i) % 8] * ((fx_mix(i + 99) & 1) ? -1.0f : 1.0f);
        if (i % 16 == 0)
            x[i] = 6.0f;
        xb[i] = cpu_f32_to_bf16(x[i]);
    }
    struct nvfp4_mat m, mb;
    int rc = nvfp4_mat_init(&m, R, C) || nvfp4_mat_init(&mb, R, C);
    rc = rc || nvfp4_quantize(x, NULL, &m) || nvfp4_quantize(NULL, xb, &mb);
    int exact = !rc;
    for (int r = 0; r < R && exact; r++)
        for (int c = 0; c < C; c++)
            exact &= fabsf(nvfp4_mat_at(&m, r, c) - x[r * C + c]) <= 1e-6f * fabsf(x[r * C + c]) &&
                     nvfp4_mat_at(&m, r, c) == nvfp4_mat_at(&mb, r, c) &&
                     m.s[(r * C + c) / 16] == 0x7e; /* 448 */
    ok(exact && m.s2 == 6.0f / (6.0f * 448.0f),
       "quantize: E2M1-grid matrix keeps its codes, block scale 448 (FP32 and BF16 input)");
    /* random data: relative error of NVFP4 quantisation */
    float *y = malloc(sizeof(float) * 128 * 512);
    struct nvfp4_mat q;
    rc = nvfp4_mat_init(&q, 128, 512);
    double num = 0, den = 0;
    for (int i = 0; i < 128 * 512; i++)
        y[i] = fx_unif(5, i) * (i % 512 < 256 ? 1.0f : 1e-3f);
    rc = rc || nvfp4_quantize(y, NULL, &q);
    for (int r = 0; r < 128; r++)
        for (int c = 0; c < 512; c++) {
            double dlt = nvfp4_mat_at(&q, r, c) - y[r * 512 + c];
            num += dlt * dlt;
            den += (double)y[r * 512 + c] * y[r * 512 + c];
        }
    ok(!rc && sqrt(num / den) < 0.12, "quantize: random matrix rel err < 0.12 (ModelOpt rule)");
    /* the zero-block rule: scale 1.0 */
    memset(y, 0, sizeof(float) * 16);
    y[16] = 1.0f;
    struct nvfp4_mat z;
    rc = nvfp4_mat_init(&z, 1, 32) || nvfp4_quantize(y, NULL, &z);
    ok(!rc && z.s[0] == 0x38 && nvfp4_mat_at(&z, 0, 16) == 1.0f,
       "quantize: zero block gets scale 1.0");
    nvfp4_mat_free(&m), nvfp4_mat_free(&mb), nvfp4_mat_free(&q), nvfp4_mat_free(&z);
    free(y);
}

static void test_mxfp4(void)
{
    enum { R = 32, C = 256 };
    uint8_t q[R * C / 2], s[R * C / 32];
    fx_bytes(q, sizeof q, 7);
    for (int i = 0; i < R * C / 32; i++)
        s[i] = (uint8_t)(110 + fx_mix(i) % 18); /* span 17: exact */
    struct cpu_qmat mx = {CPU_W_MXFP4, R, C, q, s, 0, 0};
    struct nvfp4_mat m;
    struct nvfp4_report rep = {0};
    int rc = nvfp4_mat_init(&m, R, C) || nvfp4_from_mxfp4(q, s, &m, &rep);
    int exact = !rc;
    for (int r = 0; r < R && exact; r++)
        for (int c = 0; c < C; c++)
            exact &= nvfp4_mat_at(&m, r, c) == cpu_qmat_at(&mx, r, c);
    ok(exact && rep.n_exact == 1 && rep.n_inexact == 0, "mxfp4 -> nvfp4: span 17 converts exactly");
    /* span 30: inexact, counted, in-window blocks still exact */
    for (int i = 0; i < R * C / 32; i++)
        s[i] = (uint8_t)(i == 0 ? 90 : 120 + fx_mix(i) % 4);
    rc = nvfp4_from_mxfp4(q, s, &m, &rep);
    int inwin = !rc;
    for (int r = 1; r < R && inwin; r++)
        for (int c = 0; c < C; c++)
            inwin &= nvfp4_mat_at(&m, r, c) == cpu_qmat_at(&mx, r, c);
    printf("# load report: %ld matrices, %ld exact, %ld inexact, worst rel %.3e (span %d)\n",
           rep.n_mats, rep.n_exact, rep.n_inexact, rep.worst_rel, rep.worst_span);
    ok(!rc && rep.n_inexact == 1 && rep.worst_rel < 1.0 && rep.worst_span == 33 && inwin,
       "mxfp4 -> nvfp4: span 33 counted in the report, other blocks exact");
    s[3] = 255;
    ok(nvfp4_from_mxfp4(q, s, &m, &rep) == ERR_FORMAT, "mxfp4 -> nvfp4: NaN scale rejected");
    nvfp4_mat_free(&m);
}

static void test_import(void)
{
    enum { R = 16, C = 64 };
    uint8_t q[R * C / 2], s[R * C / 16];
    fx_bytes(q, sizeof q, 9);
    for (int i = 0; i < R * C / 16; i++)
        s[i] = (uint8_t)(0x30 + i % 16);
    struct nvfp4_mat a, b, c;
    int rc = nvfp4_mat_init(&a, R, C) || nvfp4_mat_init(&b, R, C) || nvfp4_mat_init(&c, R, C);
    rc = rc || nvfp4_from_modelopt(q, s, 0.25f, &a);
    uint8_t sn[R * C / 16];
    memcpy(sn, s, sizeof s);
    sn[5] |= 0x80;
    rc = rc || nvfp4_from_modelopt(q, sn, 0.25f, &b) || nvfp4_from_ctensors(q, s, 4.0f, &c);
    int good = !rc;
    for (int r = 0; r < R && good; r++)
        for (int k = 0; k < C; k++) {
            float va = nvfp4_mat_at(&a, r, k), vb = nvfp4_mat_at(&b, r, k),
                  vc = nvfp4_mat_at(&c, r, k);
            int neg = (r * C + k) / 16 == 5;
            good &= vb == (neg ? -va : va) && vc == va;
        }
    ok(good, "modelopt import (negative scale folded) and compressed-tensors divisor agree");
    sn[6] = 0x7f;
    ok(nvfp4_from_modelopt(q, sn, 1.0f, &b) == ERR_FORMAT &&
           nvfp4_from_ctensors(q, s, 0.0f, &c) == ERR_FORMAT,
       "import: NaN scale and zero global scale rejected");
    nvfp4_mat_free(&a), nvfp4_mat_free(&b), nvfp4_mat_free(&c);
}

static void test_pack(void)
{
    enum { R = 32, C = 512 };
    struct nvfp4_mat g, u;
    int rc = fx_nvfp4(&g, R, C, 1.0f, 11) || fx_nvfp4(&u, R, C, 1.0f, 12);
    uint8_t *d = malloc(kern_nvfp4_data_bytes(R, C)), *sc = malloc(kern_nvfp4_scale_bytes(R, C));
    uint8_t *d2 = malloc(kern_nvfp4_data_bytes(2 * R, C)),
            *sc2 = malloc(kern_nvfp4_scale_bytes(2 * R, C));
    rc = rc || kern_nvfp4_pack(g.q, g.s, R, C, d, sc) ||
         kern_nvfp4_pack_gateup(g.q, g.s, u.q, u.s, R, C, d2, sc2);
    int good = !rc;
    for (int r = 0; r < R && good; r++)
        for (int c = 0; c < C; c++) {
            uint8_t code, s8;
            kern_nvfp4_unpack_at(d, sc, R, C, r, c, &code, &s8);
            float v = cpu_e2m1_to_f32(code) * cpu_e4m3_to_f32(s8);
            good &= v == nvfp4_mat_at(&g, r, c);
            /* interleaved: block b rows 0..7 gate 8b.., rows 8..15 up 8b.. */
            int pr = (r / 8) * 16 + r % 8;
            kern_nvfp4_unpack_at(d2, sc2, 2 * R, C, pr, c, &code, &s8);
            good &= cpu_e2m1_to_f32(code) * cpu_e4m3_to_f32(s8) == nvfp4_mat_at(&g, r, c);
            kern_nvfp4_unpack_at(d2, sc2, 2 * R, C, pr + 8, c, &code, &s8);
            good &= cpu_e2m1_to_f32(code) * cpu_e4m3_to_f32(s8) == nvfp4_mat_at(&u, r, c);
        }
    ok(good, "nvfp4 pack / gate-up interleave: every element (incl. zero and subnormal scales)");
    /* FP8 placement */
    struct fx_fp8 f;
    rc = fx_fp8_init(&f, 32, 256, 3);
    uint8_t *fd = malloc(kern_fp8_data_bytes(32, 256));
    uint16_t *ff = malloc(2 * kern_fp8_factor_count(32, 256));
    float alpha = 0;
    rc = rc || kern_fp8_pack(f.w, f.s, 0, 32, 256, fd, ff, &alpha);
    good = !rc;
    static const int pos_lo[4] = {0, 1, 4, 5}, pos_hi[4] = {2, 3, 6, 7};
    for (int r = 0; r < 32 && good; r++)
        for (int c = 0; c < 256; c++) {
            int rb = r / 16, g8 = r % 16 >= 8, gg = r % 8, kb = c / 64, cc = c % 64;
            int lane = 4 * gg + cc / 16, i = cc % 16, s = i / 4, jj = i % 4;
            size_t off = ((((size_t)rb * 4 + kb) * 2 + s / 2) * 32 + lane) * 16 + 8 * (s % 2) +
                         (g8 ? pos_hi[jj] : pos_lo[jj]);
            good &= fd[off] == f.w[r * 256 + c];
            uint16_t fac = ff[((size_t)rb * 2 + c / 128) * 2 + g8];
            float fv = cpu_bf16_to_f32(fac) * ldexpf(1.0f, -120) * alpha;
            good &= fv == cpu_e8m0_to_f32(f.s[c / 128]);
        }
    ok(good, "fp8 pack: byte placement and block factors * alpha == scale");
    nvfp4_mat_free(&g), nvfp4_mat_free(&u), fx_fp8_free(&f);
    free(d), free(sc), free(d2), free(sc2), free(fd), free(ff);
}

static void test_ref(void)
{
    /* the reference against a direct FP64 evaluation of one token through one expert */
    enum { d = 256, I = 256, E = 4, K = 2 };
    struct nvfp4_mat w1[E], w3[E], w2[E];
    int rc = 0;
    for (int e = 0; e < E && !rc; e++)
        rc = fx_nvfp4(&w1[e], I, d, 0.01f, 100 + e) || fx_nvfp4(&w3[e], I, d, 0.01f, 200 + e) ||
             fx_nvfp4(&w2[e], d, I, 0.01f, 300 + e);
    float x[d];
    for (int k = 0; k < d; k++)
        x[k] = fx_unif(1, k);
    int idx[K] = {2, 2}, rows[1] = {0};
    float wt[K] = {0.25f, 0.5f};
    double out[d];
    struct nvfp4_moe_host mh = {d, I, E, w1, w3, w2, NULL, NULL, NULL};
    rc = rc || nvfp4_moe_ref(&mh, x, rows, 1, idx, wt, K, 10.0f, 0, out);
    double num = 0, den = 0;
    for (int o = 0; o < d && !rc; o++) {
        double acc = 0;
        for (int i = 0; i < I; i++) {
            double g = 0, u = 0;
            for (int k = 0; k < d; k++) {
                g += (double)nvfp4_mat_at(&w1[2], i, k) * x[k];
                u += (double)nvfp4_mat_at(&w3[2], i, k) * x[k];
            }
            g = fmin(g, 10.0);
            u = fmax(fmin(u, 10.0), -10.0);
            acc += nvfp4_mat_at(&w2[2], o, i) * 0.75 * g / (1 + exp(-g)) * u;
        }
        num += (acc - out[o]) * (acc - out[o]);
        den += acc * acc;
    }
    double err = sqrt(num / den);
    printf("# reference max rel err %.3e\n", err);
    ok(!rc && err < 1e-6, "reference: duplicate expert ids = sum of both weights (FP64)");
    for (int e = 0; e < E; e++)
        nvfp4_mat_free(&w1[e]), nvfp4_mat_free(&w3[e]), nvfp4_mat_free(&w2[e]);
}

int main(void)
{
    test_quantize();
    test_mxfp4();
    test_import();
    test_pack();
    test_ref();
    printf("1..%d\n", n_test);
    return n_fail ? 1 : 0;
}
