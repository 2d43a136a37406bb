/*
 * test_moe_gpu.c - the NVFP4 MoE layer on the GPU against the FP64 CPU reference (TAP).
 *
 * For each shape (Flash: d 4096, I 2048, E 256; Pro: d 7168, I 3072, E 384; K 6), router mode
 * (dense / hash, uniform / skewed) and T in {1, 2, 7, 64, 513, 4096} (+16384 on Flash):
 *   - fresh random x and token ids (padding rows in hash mode), seed printed;
 *   - router: ids equal to the CPU router's except at near-ties (|gap| < 1e-4), weights within
 *     1e-5 relative;
 *   - experts: output poisoned (NaN) first, every element written and finite; two runs
 *     bit-identical; kern_moe_forward bit-identical to route + experts, and to
 *     kern_moe_forward_parts + kern_moe_sum_rows; for T <= 64 kern_hc_post_moe of the parts
 *     bit-identical to kern_hc_post of the output (and within 1e-6 of FP64);
 *     ||out - ref|| / ||ref|| <= 1e-2 over sampled rows (all rows when T <= 16), ref in FP64 on
 *     the exactly dequantised weights (BF16 activations imply ~2^-8 relative per element; the
 *     norm error lands near 2e-3); for T <= 2 also against the reference that rounds x and h
 *     to BF16 like the kernel, bound 1e-3;
 *   - hash modes, T = 1: a padding token (id -1, id vocab) through kern_moe_forward_parts on a
 *     poisoned workspace (slot outputs NaN, slot ids 0) + kern_moe_sum_rows, bit-identical to
 *     route + experts and finite (the padding slots are marked and skipped).
 * Without a GPU: "1..0 # SKIP no CUDA device". Flags: --quick (Flash, T <= 64),
 * --small (d 256, I 256, E 128, T up to 4096: the compute-sanitizer case).
 */
#include "engine/err.h"
#include "kernels/kernels.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/nvfp4.h"
#include "tests/gpu/gpu_test.h"
#include "tests/gpu/moe_fixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct bufs {
    float *x;     /* (Tmax, d) device */
    int32_t *tok; /* (Tmax) device */
    int32_t *idx; /* (Tmax, K) device */
    float *w;     /* (Tmax, K) device */
    float *out;   /* (Tmax, d) device */
    float *out2;  /* (Tmax, d) device */
    void *ws;
    size_t ws_bytes;
};

static const char *mode_name[] = {"dense-uniform", "dense-skewed", "hash-uniform", "hash-skewed"};

/* CPU logits of one row in FP64 (then FP32, as the gate runs in FP32). */
static void cpu_logits_row(const struct fx_layer *f, const float *x, float *lg)
{
    for (int e = 0; e < f->E; e++) {
        double acc = 0;
        for (int k = 0; k < f->d; k++)
            acc += (double)cpu_bf16_to_f32(f->gate_h[(size_t)e * f->d + k]) * x[k];
        lg[e] = (float)acc;
    }
}

/*
 * kern_moe_forward_parts: its sum (kern_moe_sum_rows) bit for bit the forward's output `out`
 * (host; b->out holds it on the device too); for T <= 64, kern_hc_post_moe bit for bit
 * kern_hc_post of that output, and both within 1e-6 of hc_post in FP64 on the CPU (random
 * residual streams and gates; outputs poisoned first). h: host scratch of T * d floats.
 */
static int parts_check(struct fx_layer *f, struct bufs *b, int T, const char *shape,
                       const char *mode, const float *out, float *h)
{
    const int d = f->d;
    const size_t nX = (size_t)T * 4 * d;
    struct kern_moe_sum sum;
    float *R = NULL, *gates = NULL, *X1 = NULL, *X2 = NULL; /* device */
    float *Rh = NULL, *gh = NULL, *X1h = NULL, *X2h = NULL;
    int rc;
    if ((rc = kern_memset(b->out2, 0xff, sizeof(float) * (size_t)T * d)) ||
        (rc = kern_moe_forward_parts(&f->L, b->x, b->tok, T, &sum, b->ws, b->ws_bytes, NULL)) ||
        (rc = kern_moe_sum_rows(&sum, T, d, b->out2, NULL)) || (rc = kern_sync()) ||
        (rc = kern_d2h(h, b->out2, sizeof(float) * (size_t)T * d)))
        goto out;
    tap(!memcmp(out, h, sizeof(float) * (size_t)T * d), "%s %s T=%d parts + sum == forward", shape,
        mode, T);
    if (T > 64)
        goto out;
    Rh = malloc(sizeof(float) * nX), gh = malloc(sizeof(float) * (size_t)T * 20);
    X1h = malloc(sizeof(float) * nX), X2h = malloc(sizeof(float) * nX);
    if (!Rh || !gh || !X1h || !X2h) {
        rc = ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < nX; i++)
        Rh[i] = frand();
    for (int i = 0; i < T * 20; i++) /* post (T, 4) then comb (T, 16) */
        gh[i] = 0.5f * frand() + 0.5f;
    if ((rc = kern_malloc((void **)&R, sizeof(float) * nX)) ||
        (rc = kern_malloc((void **)&gates, sizeof(float) * (size_t)T * 20)) ||
        (rc = kern_malloc((void **)&X1, sizeof(float) * nX)) ||
        (rc = kern_malloc((void **)&X2, sizeof(float) * nX)) ||
        (rc = kern_h2d(R, Rh, sizeof(float) * nX)) ||
        (rc = kern_h2d(gates, gh, sizeof(float) * (size_t)T * 20)) ||
        (rc = kern_memset(X1, 0xff, sizeof(float) * nX)) ||
        (rc = kern_memset(X2, 0xff, sizeof(float) * nX)) ||
        (rc = kern_hc_post(b->out, R, gates, gates + 4 * T, T, 4, d, X1, NULL)) ||
        (rc = kern_hc_post_moe(&sum, R, gates, gates + 4 * T, T, 4, d, X2, NULL)) ||
        (rc = kern_sync()) || (rc = kern_d2h(X1h, X1, sizeof(float) * nX)) ||
        (rc = kern_d2h(X2h, X2, sizeof(float) * nX)))
        goto out;
    double num = 0, den = 0;
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 4; k++)
            for (int c = 0; c < d; c++) {
                double r = (double)gh[t * 4 + k] * out[(size_t)t * d + c];
                for (int j = 0; j < 4; j++)
                    r += (double)gh[4 * T + t * 16 + j * 4 + k] * Rh[((size_t)t * 4 + j) * d + c];
                const double o = X2h[((size_t)t * 4 + k) * d + c];
                num += (o - r) * (o - r);
                den += r * r;
            }
    const double rel = sqrt(num / (den > 0 ? den : 1));
    tap(!memcmp(X1h, X2h, sizeof(float) * nX) && rel <= 1e-6,
        "%s %s T=%d hc_post of the parts == hc_post of the sum (bits), rel err %.2e vs FP64", shape,
        mode, T, rel);
out:
    kern_free(R), kern_free(gates), kern_free(X1), kern_free(X2);
    free(Rh), free(gh), free(X1h), free(X2h);
    return rc;
}

static int run_case(struct fx_layer *f, struct bufs *b, enum fx_route mode, int T, uint64_t seed,
                    const char *shape)
{
    const int d = f->d, K = f->K, E = f->E;
    int rc = 0;
    float *x = malloc(sizeof(float) * (size_t)T * d);
    int32_t *tok = malloc(sizeof(int32_t) * T);
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)T * K);
    float *w = malloc(sizeof(float) * (size_t)T * K);
    float *out = malloc(sizeof(float) * (size_t)T * d);
    float *out2 = malloc(sizeof(float) * (size_t)T * d);
    int rows[32], nr = 0;
    double *ref = malloc(sizeof(double) * 32 * d);
    float *lg = malloc(sizeof(float) * E);
    if (!x || !tok || !idx || !w || !out || !out2 || !ref || !lg) {
        rc = -1;
        goto out;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < (size_t)T * d; i++)
        x[i] = fx_unif(seed, i);
    const int hash = mode == FX_HASH_UNIFORM || mode == FX_HASH_SKEWED;
    for (int t = 0; t < T; t++)
        tok[t] = (hash && T > 2 && t % 5 == 3) ? -1 : (int32_t)(fx_mix(seed + 1000 + t) % f->vocab);
    if ((rc = kern_h2d(b->x, x, sizeof(float) * (size_t)T * d)) ||
        (rc = kern_h2d(b->tok, tok, sizeof(int32_t) * T)))
        goto out;
    if ((rc = kern_moe_route(&f->L, b->x, b->tok, T, b->idx, b->w, b->ws, b->ws_bytes, NULL)) ||
        (rc = kern_sync()))
        goto out;
    if ((rc = kern_d2h(idx, b->idx, sizeof(int32_t) * (size_t)T * K)) ||
        (rc = kern_d2h(w, b->w, sizeof(float) * (size_t)T * K)))
        goto out;

    /* rows to check */
    if (T <= 16) {
        for (int t = 0; t < T; t++)
            rows[nr++] = t;
    } else {
        for (int i = 0; i < 11; i++)
            rows[nr++] = (int)(fx_mix(seed + 555 + i) % (uint64_t)T);
        rows[nr++] = T - 1;
    }

    /* router check */
    int bad_id = 0, ties = 0;
    double werr = 0;
    for (int i = 0; i < nr; i++) {
        int t = rows[i], cidx[32];
        float cw[32];
        int64_t hid[32];
        const float *xr = x + (size_t)t * d;
        cpu_logits_row(f, xr, lg);
        if (hash && tok[t] < 0) {
            for (int j = 0; j < K; j++)
                if (idx[(size_t)t * K + j] != -1 || w[(size_t)t * K + j] != 0.0f)
                    bad_id++;
            continue;
        }
        if (hash)
            for (int j = 0; j < K; j++)
                hid[j] = f->tid_h[(size_t)tok[t] * K + j];
        cpu_route(lg, E, K, hash ? NULL : f->bias_h, hash ? hid : NULL, f->L.route_scale, cidx, cw);
        int same = 1;
        for (int j = 0; j < K; j++)
            same &= cidx[j] == idx[(size_t)t * K + j];
        if (!same) {
            /* near-tie: the GPU's choice scores within 1e-4 of the CPU's at that slot */
            int tie = 1;
            for (int j = 0; j < K; j++) {
                int ge = idx[(size_t)t * K + j], ce = cidx[j];
                if (ge < 0 || ge >= E) {
                    tie = 0;
                    break;
                }
                float gv = cpu_sqrt_softplus(lg[ge]) + f->bias_h[ge];
                float cv = cpu_sqrt_softplus(lg[ce]) + f->bias_h[ce];
                if (fabsf(gv - cv) > 1e-4f)
                    tie = 0;
            }
            if (tie)
                ties++;
            else
                bad_id++;
            continue;
        }
        for (int j = 0; j < K; j++) {
            double dlt = fabs((double)cw[j] - w[(size_t)t * K + j]) / (fabs(cw[j]) + 1e-30);
            werr = dlt > werr ? dlt : werr;
        }
    }
    tap(bad_id == 0 && werr <= 1e-5, "%s %s T=%d router: %d bad ids, %d near-ties, weight rel %.2e",
        shape, mode_name[mode], T, bad_id, ties, werr);

    /* experts: poison, run twice, forward once */
    if ((rc = kern_memset(b->out, 0xff, sizeof(float) * (size_t)T * d)) ||
        (rc = kern_moe_experts(&f->L, b->x, b->idx, b->w, T, b->out, b->ws, b->ws_bytes, NULL)) ||
        (rc = kern_sync()) || (rc = kern_d2h(out, b->out, sizeof(float) * (size_t)T * d)))
        goto out;
    size_t nonfinite = 0;
    for (size_t i = 0; i < (size_t)T * d; i++)
        nonfinite += !isfinite(out[i]);
    tap(nonfinite == 0, "%s %s T=%d all outputs written and finite (%zu not)", shape,
        mode_name[mode], T, nonfinite);
    if ((rc = kern_memset(b->out2, 0xff, sizeof(float) * (size_t)T * d)) ||
        (rc = kern_moe_experts(&f->L, b->x, b->idx, b->w, T, b->out2, b->ws, b->ws_bytes, NULL)) ||
        (rc = kern_sync()) || (rc = kern_d2h(out2, b->out2, sizeof(float) * (size_t)T * d)))
        goto out;
    int det = !memcmp(out, out2, sizeof(float) * (size_t)T * d);
    if ((rc = kern_memset(b->out2, 0xff, sizeof(float) * (size_t)T * d)) ||
        (rc = kern_moe_forward(&f->L, b->x, b->tok, T, b->out2, b->ws, b->ws_bytes, NULL)) ||
        (rc = kern_sync()) || (rc = kern_d2h(out2, b->out2, sizeof(float) * (size_t)T * d)))
        goto out;
    int fwd = !memcmp(out, out2, sizeof(float) * (size_t)T * d);
    tap(det && fwd, "%s %s T=%d bit-reproducible (%d), forward == route+experts (%d)", shape,
        mode_name[mode], T, det, fwd);
    if ((rc = parts_check(f, b, T, shape, mode_name[mode], out, out2)))
        goto out;

    /* against the FP64 reference */
    struct nvfp4_moe_host mh = {d, f->I, E, f->w1, f->w3, f->w2, &f->sh1.q, &f->sh3.q, &f->sh2.q};
    for (int emu = 0; emu <= (T <= 2); emu++) {
        if ((rc = nvfp4_moe_ref(&mh, x, rows, nr, idx, w, K, f->L.swiglu_limit, emu, ref)))
            goto out;
        double num = 0, den = 0;
        for (int i = 0; i < nr; i++)
            for (int k = 0; k < d; k++) {
                double r = ref[(size_t)i * d + k], o = out[(size_t)rows[i] * d + k];
                num += (o - r) * (o - r);
                den += r * r;
            }
        double rel = sqrt(num / (den > 0 ? den : 1));
        double bound = emu ? 1e-3 : 1e-2;
        tap(rel <= bound && isfinite(rel),
            "%s %s T=%d %s rel err %.3e (bound %.0e, %d rows, |ref| %.3g)", shape, mode_name[mode],
            T, emu ? "vs BF16-emulating ref" : "vs FP64 ref", rel, bound, nr, sqrt(den / nr / d));
    }
    /* the routed experts alone (no shared expert), so that their error is not hidden */
    {
        struct kern_moe_layer Ln = f->L;
        Ln.sh13 = NULL;
        mh.sh_w1 = mh.sh_w3 = mh.sh_w2 = NULL;
        if ((rc = kern_memset(b->out2, 0xff, sizeof(float) * (size_t)T * d)) ||
            (rc =
                 kern_moe_experts(&Ln, b->x, b->idx, b->w, T, b->out2, b->ws, b->ws_bytes, NULL)) ||
            (rc = kern_sync()) || (rc = kern_d2h(out2, b->out2, sizeof(float) * (size_t)T * d)) ||
            (rc = nvfp4_moe_ref(&mh, x, rows, nr, idx, w, K, f->L.swiglu_limit, 0, ref)))
            goto out;
        double num = 0, den = 0;
        for (int i = 0; i < nr; i++)
            for (int k = 0; k < d; k++) {
                double r = ref[(size_t)i * d + k], o = out2[(size_t)rows[i] * d + k];
                num += (o - r) * (o - r);
                den += r * r;
            }
        double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        tap(rel <= 1e-2 && isfinite(rel), "%s %s T=%d routed only: rel err %.3e (|ref| %.3g)",
            shape, mode_name[mode], T, rel, sqrt(den / nr / d));
    }
    /* one padding token of a hash layer (id < 0, id >= vocab): no expert. The forward must
     * mark its slots (ids -1) for the sum: the workspace is poisoned first (slot outputs NaN,
     * ids 0, a valid expert), so a slot it failed to mark would add NaN. */
    for (int bad = 0; hash && T == 1 && bad < 2; bad++) {
        const int32_t tk = bad ? (int32_t)f->vocab : -1;
        struct kern_moe_sum sum;
        if ((rc = kern_h2d(b->tok, &tk, sizeof tk)) ||
            (rc = kern_moe_route(&f->L, b->x, b->tok, T, b->idx, b->w, b->ws, b->ws_bytes, NULL)) ||
            (rc = kern_memset(b->out, 0xff, sizeof(float) * (size_t)d)) ||
            (rc = kern_moe_experts(&f->L, b->x, b->idx, b->w, T, b->out, b->ws, b->ws_bytes,
                                   NULL)) ||
            (rc = kern_moe_forward_parts(&f->L, b->x, b->tok, T, &sum, b->ws, b->ws_bytes, NULL)) ||
            (rc = kern_memset(b->ws, 0xff, b->ws_bytes)) ||
            (rc = kern_memset((void *)sum.idx, 0, sizeof(int32_t) * (size_t)K)) ||
            (rc = kern_moe_forward_parts(&f->L, b->x, b->tok, T, &sum, b->ws, b->ws_bytes, NULL)) ||
            (rc = kern_memset(b->out2, 0xff, sizeof(float) * (size_t)d)) ||
            (rc = kern_moe_sum_rows(&sum, T, d, b->out2, NULL)) || (rc = kern_sync()) ||
            (rc = kern_d2h(out, b->out, sizeof(float) * (size_t)d)) ||
            (rc = kern_d2h(out2, b->out2, sizeof(float) * (size_t)d)))
            goto out;
        int finite = 1;
        for (int k = 0; k < d; k++)
            finite &= isfinite(out2[k]);
        tap(finite && !memcmp(out, out2, sizeof(float) * (size_t)d),
            "%s %s T=1 token %d (padding): forward == route + experts, all finite", shape,
            mode_name[mode], tk);
    }
out:
    free(x), free(tok), free(idx), free(w), free(out), free(out2), free(ref), free(lg);
    if (rc)
        tap(0, "%s %s T=%d: error %d (%s)", shape, mode_name[mode], T, rc, kern_last_error());
    return rc;
}

int main(int argc, char **argv)
{
    int quick = 0, small = 0;
    for (int i = 1; i < argc; i++) {
        quick |= !strcmp(argv[i], "--quick");
        small |= !strcmp(argv[i], "--small");
    }
    if (kern_device_count() <= 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    if (kern_moe_prepare()) {
        printf("not ok 1 - kern_moe_prepare failed\n1..1\n");
        return 1;
    }
    char name[256];
    if (kern_device_name(name, sizeof name))
        snprintf(name, sizeof name, "?");
    uint64_t seed0 = (uint64_t)time(NULL);
    printf("# device: %s, seed %llu\n", name, (unsigned long long)seed0);

    struct shape {
        const char *name;
        int d, I, E;
        float rs;
    } shapes[] = {{"flash", 4096, 2048, 256, 1.5f}, {"pro", 7168, 3072, 384, 2.5f}};
    struct shape tiny = {"small", 256, 256, 128, 1.5f};
    int nshape = small ? 1 : (quick ? 1 : 2);
    static const int Ts[] = {1, 2, 7, 64, 513, 4096};
    for (int si = 0; si < nshape; si++) {
        const struct shape *sp = small ? &tiny : &shapes[si];
        struct fx_layer f;
        struct timespec c0, c1;
        clock_gettime(CLOCK_MONOTONIC, &c0);
        if (fx_layer_init(&f, sp->d, sp->I, sp->E, 6, sp->rs, 1, seed0 + si)) {
            tap(0, "%s: layer init failed (%s)", sp->name, kern_last_error());
            fx_layer_free(&f);
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &c1);
        printf("# %s layer built in %.1f s\n", sp->name,
               (double)(c1.tv_sec - c0.tv_sec) + 1e-9 * (double)(c1.tv_nsec - c0.tv_nsec));
        int Tmax = (si == 0 && !small && !quick) ? 16384 : 4096;
        struct bufs b = {0};
        b.ws_bytes = kern_moe_workspace_bytes(&f.L, Tmax);
        if (kern_malloc((void **)&b.x, sizeof(float) * (size_t)Tmax * sp->d) ||
            kern_malloc((void **)&b.tok, sizeof(int32_t) * Tmax) ||
            kern_malloc((void **)&b.idx, sizeof(int32_t) * Tmax * 6) ||
            kern_malloc((void **)&b.w, sizeof(float) * Tmax * 6) ||
            kern_malloc((void **)&b.out, sizeof(float) * (size_t)Tmax * sp->d) ||
            kern_malloc((void **)&b.out2, sizeof(float) * (size_t)Tmax * sp->d) ||
            kern_malloc(&b.ws, b.ws_bytes)) {
            tap(0, "%s: device buffers (%s)", sp->name, kern_last_error());
        } else {
            for (int m = 0; m < 4; m++) {
                if (fx_set_router(&f, (enum fx_route)m, seed0 + 7 * m)) {
                    tap(0, "router setup");
                    continue;
                }
                for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
                    if ((quick || small) && Ts[ti] > 64 && !small)
                        continue;
                    run_case(&f, &b, (enum fx_route)m, Ts[ti], seed0 * 131 + 17 * ti + m, sp->name);
                }
                if (Tmax >= 16384 && m == 0)
                    run_case(&f, &b, (enum fx_route)m, 16384, seed0 * 7 + 3, sp->name);
            }
        }
        kern_free(b.x), kern_free(b.tok), kern_free(b.idx), kern_free(b.w);
        kern_free(b.out), kern_free(b.out2), kern_free(b.ws);
        fx_layer_free(&f);
    }
    printf("1..%d\n", n_test);
    return n_fail ? 1 : 0;
}
