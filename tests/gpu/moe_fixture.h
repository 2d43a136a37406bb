/*
 * moe_fixture.h - random NVFP4 MoE layers for the GPU test and benchmark: host canonical
 * weights (for the CPU reference), packed device weights (for the kernels), router tensors.
 * Header-only (static functions) so the test and the benchmark build without a library.
 *
 * THREAD SAFETY: single-threaded callers; internal loops are OpenMP-parallel.
 */
#ifndef DSV4_TESTS_GPU_MOE_FIXTURE_H
#define DSV4_TESTS_GPU_MOE_FIXTURE_H

#include "kernels/kernels.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/nvfp4.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline uint64_t fx_mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) from a counter */
static inline float fx_unif(uint64_t seed, uint64_t i)
{
    return (float)((fx_mix(seed * 0x100000001b3ull + i) >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static inline void fx_bytes(uint8_t *p, size_t n, uint64_t seed)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n / 8; i++) {
        uint64_t v = fx_mix(seed * 0x100000001b3ull + i);
        memcpy(p + 8 * i, &v, 8);
    }
    for (size_t i = n / 8 * 8; i < n; i++)
        p[i] = (uint8_t)fx_mix(seed + i);
}

/*
 * Random canonical NVFP4 matrix: random codes; E4M3 block scales mostly in [0.25, 4) with
 * a sprinkling of subnormal (2^-9..2^-7) and zero scales; s2 given.
 */
static inline int fx_nvfp4(struct nvfp4_mat *m, int rows, int cols, float s2, uint64_t seed)
{
    int rc = nvfp4_mat_init(m, rows, cols);
    if (rc)
        return rc;
    fx_bytes(m->q, (size_t)rows * cols / 2, seed);
    size_t ns = (size_t)rows * cols / 16;
    fx_bytes(m->s, ns, seed ^ 0x5555);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < ns; i++) {
        unsigned r = m->s[i];
        if (r < 2)
            m->s[i] = 0; /* zero scale */
        else if (r < 6)
            m->s[i] = (uint8_t)(1 + (r & 7) % 7); /* subnormal */
        else
            m->s[i] = (uint8_t)(0x28 + r % 32); /* 2^-2 .. ~2^2 */
    }
    m->s2 = s2;
    return 0;
}

/* Random FP8 block-scaled matrix (rows, cols) with E8M0 scales around 2^-6. Owns w, s. */
struct fx_fp8 {
    struct cpu_qmat q;
    uint8_t *w, *s;
};

static inline int fx_fp8_init(struct fx_fp8 *f, int rows, int cols, uint64_t seed)
{
    size_t n = (size_t)rows * cols, ns = (size_t)((rows + 127) / 128) * ((cols + 127) / 128);
    f->w = malloc(n);
    f->s = malloc(ns);
    if (!f->w || !f->s)
        return -1;
    fx_bytes(f->w, n, seed);
    /* E4M3 values of magnitude 2^-3 .. 2^2 (random sign, mantissa), some subnormal; block
     * scales 2^-9 .. 2^-6: the shared expert's output is of the routed experts' size */
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        unsigned r = f->w[i];
        unsigned ex = (r >> 3) & 15;
        f->w[i] = (uint8_t)((r & 0x87) | ((ex < 2 ? 0 : 4 + ex % 6) << 3));
    }
    for (size_t i = 0; i < ns; i++)
        f->s[i] = (uint8_t)(127 - 9 + fx_mix(seed + 77 + i) % 4);
    f->q.fmt = CPU_W_FP8;
    f->q.rows = rows;
    f->q.cols = cols;
    f->q.w = f->w;
    f->q.scale = f->s;
    f->q.scale_f32 = 0;
    return 0;
}

static inline void fx_fp8_free(struct fx_fp8 *f)
{
    free(f->w);
    free(f->s);
    f->w = f->s = NULL;
}

/* A whole layer: host canonical weights + device packed weights + router tensors. */
struct fx_layer {
    int d, I, E, K, vocab;
    int host;                       /* canonical host copies kept (for the reference) */
    struct nvfp4_mat *w1, *w3, *w2; /* (E) host canonical */
    struct fx_fp8 sh1, sh3, sh2;
    uint16_t *gate_h;        /* (E, d) BF16 */
    float *bias_h;           /* (E) */
    int32_t *tid_h;          /* (vocab, K) */
    struct kern_moe_layer L; /* device */
    float *bias_d;           /* (E) device */
    int32_t *tid_d;          /* (vocab, K) device */
    void *dev[16];
    int ndev;
};

static inline void *fx_dev(struct fx_layer *f, size_t n)
{
    void *p = NULL;
    if (f->ndev >= 16 || kern_malloc(&p, n))
        return NULL;
    f->dev[f->ndev++] = p;
    return p;
}

/*
 * Build a layer with random weights. host != 0 keeps canonical host copies for the reference;
 * otherwise one random expert is packed and copied to all E slots (benchmark).
 */
static inline int fx_layer_init(struct fx_layer *f, int d, int I, int E, int K, float route_scale,
                                int host, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    f->d = d, f->I = I, f->E = E, f->K = K, f->vocab = 4096, f->host = host;
    const size_t b13 = kern_nvfp4_data_bytes(2 * I, d), s13 = kern_nvfp4_scale_bytes(2 * I, d);
    const size_t b2 = kern_nvfp4_data_bytes(d, I), s2b = kern_nvfp4_scale_bytes(d, I);
    uint8_t *d13 = fx_dev(f, b13 * E), *ds13 = fx_dev(f, s13 * E);
    uint8_t *d2 = fx_dev(f, b2 * E), *ds2 = fx_dev(f, s2b * E);
    float *da13 = fx_dev(f, sizeof(float) * 2 * E), *da2 = fx_dev(f, sizeof(float) * E);
    uint8_t *hp13 = malloc(b13), *hps13 = malloc(s13), *hp2 = malloc(b2), *hps2 = malloc(s2b);
    float *a13 = malloc(sizeof(float) * 2 * E), *a2 = malloc(sizeof(float) * E);
    int rc = 0;
    if (!d13 || !ds13 || !d2 || !ds2 || !da13 || !da2 || !hp13 || !hps13 || !hp2 || !hps2 || !a13 ||
        !a2) {
        rc = -1;
        goto out;
    }
    if (host) {
        f->w1 = calloc(E, sizeof *f->w1);
        f->w3 = calloc(E, sizeof *f->w3);
        f->w2 = calloc(E, sizeof *f->w2);
        if (!f->w1 || !f->w3 || !f->w2) {
            rc = -1;
            goto out;
        }
    }
    for (int e = 0; e < E; e++) {
        struct nvfp4_mat g, u, dn;
        if (e == 0 || host) {
            /* gate/up with different global scales (spec §5.4) */
            float sg = 0.004f * (1.0f + 0.5f * fx_unif(seed, 3 * e));
            float su = 0.003f * (1.0f + 0.5f * fx_unif(seed, 3 * e + 1));
            float sd = 0.004f * (1.0f + 0.5f * fx_unif(seed, 3 * e + 2));
            if ((rc = fx_nvfp4(&g, I, d, sg, seed * 1000 + 3 * e)) ||
                (rc = fx_nvfp4(&u, I, d, su, seed * 1000 + 3 * e + 1)) ||
                (rc = fx_nvfp4(&dn, d, I, sd, seed * 1000 + 3 * e + 2)))
                goto out;
            if ((rc = kern_nvfp4_pack_gateup(g.q, g.s, u.q, u.s, I, d, hp13, hps13)) ||
                (rc = kern_nvfp4_pack(dn.q, dn.s, d, I, hp2, hps2)))
                goto out;
            a13[2 * e] = kern_nvfp4_alpha(g.s2);
            a13[2 * e + 1] = kern_nvfp4_alpha(u.s2);
            a2[e] = kern_nvfp4_alpha(dn.s2);
            if (host) {
                f->w1[e] = g, f->w3[e] = u, f->w2[e] = dn;
            } else {
                nvfp4_mat_free(&g), nvfp4_mat_free(&u), nvfp4_mat_free(&dn);
            }
        } else {
            a13[2 * e] = a13[0], a13[2 * e + 1] = a13[1], a2[e] = a2[0];
        }
        if ((rc = kern_h2d(d13 + b13 * e, hp13, b13)) ||
            (rc = kern_h2d(ds13 + s13 * e, hps13, s13)) || (rc = kern_h2d(d2 + b2 * e, hp2, b2)) ||
            (rc = kern_h2d(ds2 + s2b * e, hps2, s2b)))
            goto out;
    }
    if ((rc = kern_h2d(da13, a13, sizeof(float) * 2 * E)) ||
        (rc = kern_h2d(da2, a2, sizeof(float) * E)))
        goto out;
    /* shared expert, FP8 */
    if ((rc = fx_fp8_init(&f->sh1, I, d, seed + 11)) ||
        (rc = fx_fp8_init(&f->sh3, I, d, seed + 12)) ||
        (rc = fx_fp8_init(&f->sh2, d, I, seed + 13)))
        goto out;
    {
        uint8_t *p13 = malloc(kern_fp8_data_bytes(2 * I, d)),
                *p2 = malloc(kern_fp8_data_bytes(d, I));
        uint16_t *f13 = malloc(2 * kern_fp8_factor_count(2 * I, d));
        uint16_t *f2 = malloc(2 * kern_fp8_factor_count(d, I));
        uint8_t *q13 = fx_dev(f, kern_fp8_data_bytes(2 * I, d)),
                *q2 = fx_dev(f, kern_fp8_data_bytes(d, I));
        uint16_t *g13 = fx_dev(f, 2 * kern_fp8_factor_count(2 * I, d));
        uint16_t *g2 = fx_dev(f, 2 * kern_fp8_factor_count(d, I));
        if (!p13 || !p2 || !f13 || !f2 || !q13 || !q2 || !g13 || !g2)
            rc = -1;
        if (!rc)
            rc = kern_fp8_pack_gateup(f->sh1.w, f->sh1.s, f->sh3.w, f->sh3.s, 0, I, d, p13, f13,
                                      f->L.sh_alpha13);
        if (!rc)
            rc = kern_fp8_pack(f->sh2.w, f->sh2.s, 0, d, I, p2, f2, &f->L.sh_alpha2);
        if (!rc)
            rc = kern_h2d(q13, p13, kern_fp8_data_bytes(2 * I, d));
        if (!rc)
            rc = kern_h2d(q2, p2, kern_fp8_data_bytes(d, I));
        if (!rc)
            rc = kern_h2d(g13, f13, 2 * kern_fp8_factor_count(2 * I, d));
        if (!rc)
            rc = kern_h2d(g2, f2, 2 * kern_fp8_factor_count(d, I));
        free(p13), free(p2), free(f13), free(f2);
        if (rc)
            goto out;
        f->L.sh13 = q13, f->L.sh2 = q2, f->L.sh13_f = g13, f->L.sh2_f = g2;
    }
    /* router */
    f->gate_h = malloc(sizeof(uint16_t) * (size_t)E * d);
    f->bias_h = malloc(sizeof(float) * E);
    f->tid_h = malloc(sizeof(int32_t) * (size_t)f->vocab * K);
    uint16_t *dg = fx_dev(f, sizeof(uint16_t) * (size_t)E * d);
    float *db = fx_dev(f, sizeof(float) * E);
    int32_t *dt = fx_dev(f, sizeof(int32_t) * (size_t)f->vocab * K);
    if (!f->gate_h || !f->bias_h || !f->tid_h || !dg || !db || !dt) {
        rc = -1;
        goto out;
    }
    for (size_t i = 0; i < (size_t)E * d; i++)
        f->gate_h[i] = cpu_f32_to_bf16(0.05f * fx_unif(seed + 21, i));
    if ((rc = kern_h2d(dg, f->gate_h, sizeof(uint16_t) * (size_t)E * d)))
        goto out;
    f->L.d = d, f->L.I = I, f->L.E = E, f->L.K = K;
    f->L.route_scale = route_scale;
    f->L.swiglu_limit = 10.0f;
    f->L.gate_w = dg;
    f->L.w13 = d13, f->L.w13_s = ds13, f->L.w2 = d2, f->L.w2_s = ds2;
    f->L.alpha13 = da13, f->L.alpha2 = da2;
    f->L.vocab = f->vocab;
    f->L.gate_bias = db;
    f->L.tid2eid = NULL;
    f->bias_d = db;
    f->tid_d = dt;
out:
    free(hp13), free(hps13), free(hp2), free(hps2), free(a13), free(a2);
    return rc;
}

/*
 * Router modes: dense uniform (small random bias), dense skewed (bias +4 on experts 0..7),
 * hash uniform (random table, a few rows with duplicate ids), hash skewed (ids from 0..7 with
 * duplicates). Uploads bias / table and switches L between dense and hash.
 */
enum fx_route { FX_DENSE_UNIFORM, FX_DENSE_SKEWED, FX_HASH_UNIFORM, FX_HASH_SKEWED };

static inline int fx_set_router(struct fx_layer *f, enum fx_route mode, uint64_t seed)
{
    const int E = f->E, K = f->K;
    int rc;
    for (int e = 0; e < E; e++)
        f->bias_h[e] = 0.01f * fx_unif(seed, e) + (mode == FX_DENSE_SKEWED && e < 8 ? 4.0f : 0.0f);
    for (int v = 0; v < f->vocab; v++)
        for (int j = 0; j < K; j++) {
            uint64_t r = fx_mix(seed * 31 + (uint64_t)v * K + j);
            int id = mode == FX_HASH_SKEWED ? (int)(r % 8) : (int)(r % E);
            if (mode == FX_HASH_UNIFORM && v % 97 == 0 && j == K - 1)
                id = f->tid_h[(size_t)v * K]; /* duplicate of slot 0 */
            f->tid_h[(size_t)v * K + j] = id;
        }
    float *db = f->bias_d;
    if ((rc = kern_h2d(db, f->bias_h, sizeof(float) * E)) ||
        (rc = kern_h2d(f->tid_d, f->tid_h, sizeof(int32_t) * (size_t)f->vocab * K)))
        return rc;
    if (mode == FX_HASH_UNIFORM || mode == FX_HASH_SKEWED) {
        f->L.tid2eid = f->tid_d;
        f->L.gate_bias = NULL;
    } else {
        f->L.tid2eid = NULL;
        f->L.gate_bias = db;
    }
    return 0;
}

static inline void fx_layer_free(struct fx_layer *f)
{
    for (int i = 0; i < f->ndev; i++)
        kern_free(f->dev[i]);
    if (f->host)
        for (int e = 0; e < f->E && f->w1; e++) {
            nvfp4_mat_free(&f->w1[e]);
            nvfp4_mat_free(&f->w3[e]);
            nvfp4_mat_free(&f->w2[e]);
        }
    free(f->w1), free(f->w3), free(f->w2);
    fx_fp8_free(&f->sh1), fx_fp8_free(&f->sh3), fx_fp8_free(&f->sh2);
    free(f->gate_h), free(f->bias_h), free(f->tid_h);
    memset(f, 0, sizeof *f);
}

#endif
