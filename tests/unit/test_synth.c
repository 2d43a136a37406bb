/*
 * test_synth.c - synthetic checkpoints (engine/tiny.c).
 *
 * - The built-in tiny models are pinned bit for bit: a hash of every tensor's name, dtype, shape
 *   and bytes, recorded from the generator that made tests/fixtures/oracle.
 * - A Flash-width export (`export-tiny --shape flash`, here 4 layers x 16 experts: SWA, CSA, HCA,
 *   hash and dense routing, MTP) has exactly the tensors of spec §5.1 under their official names,
 *   dtypes and shapes (the table below is written from the spec, not from the generator); a
 *   smaller export on one thread has the same bytes in every tensor they share (the output
 *   depends on the seed only); it loads with the CPU engine and a forward pass gives finite,
 *   spread logits, and a dense layer's router spreads tokens over many experts.
 * - Export errors name the path; a failed export leaves no config.json.
 *
 * The export goes to /dev/shm when it has room (the test measures the generator, not the disk),
 * else to $TMPDIR or /tmp.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/err.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/tiny.h"
#include "kernels/cpu/cpu.h"

#define FLASH_LAYERS  4
#define FLASH_EXPERTS 16

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void set_threads(int n)
{
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* ---- the built-in models, bit for bit ---- */

static void test_tiny_bits(void **s)
{
    (void)s;
    /* recorded from the sequential generator that produced tests/fixtures/oracle */
    static const uint64_t want_hash[2] = {0x203a0dce8b14e500ull, 0x1a0ffea0a47b300cull};
    static const int want_count[2] = {921, 1265};
    for (int v = 0; v < 2; v++) {
        struct dsv4_config c;
        struct st_set *st;
        if (dsv4_tiny_build((enum dsv4_variant)v, &c, &st))
            fail_msg("%s", err_msg());
        uint64_t h = 1469598103934665603ull;
        for (int i = 0; i < st_set_count(st); i++) {
            const struct st_tensor *t = st_set_at(st, i);
            int dt = t->dtype;
            h = fnv(h, t->name, strlen(t->name) + 1);
            h = fnv(h, &dt, sizeof dt);
            h = fnv(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
            h = fnv(h, t->data, t->nbytes);
        }
        assert_int_equal(st_set_count(st), want_count[v]);
        if (h != want_hash[v])
            fail_msg("builtin:tiny-%s changed: hash 0x%016llx, want 0x%016llx", v ? "pro" : "flash",
                     (unsigned long long)h, (unsigned long long)want_hash[v]);
        st_set_free(st);
    }
}

/* ---- the tensors of spec §5.1 ---- */

struct want {
    char name[96];
    enum st_dtype dt;
    int ndim;
    int64_t shape[2];
};

static struct want *wants;
static int n_wants, cap_wants;

/* Expect tensor (printf name) of dtype dt and shape [d0] (d1 < 0) or [d0, d1]. */
static void want(enum st_dtype dt, int64_t d0, int64_t d1, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void want(enum st_dtype dt, int64_t d0, int64_t d1, const char *fmt, ...)
{
    if (n_wants == cap_wants) {
        cap_wants = cap_wants ? 2 * cap_wants : 1024;
        wants = realloc(wants, sizeof *wants * (size_t)cap_wants);
        assert_non_null(wants);
    }
    struct want *w = &wants[n_wants++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->name, sizeof w->name, fmt, ap);
    va_end(ap);
    w->dt = dt;
    w->ndim = d1 < 0 ? 1 : 2;
    w->shape[0] = d0;
    w->shape[1] = d1;
}

/* An FP8 linear: weight [out, in] F8_E4M3 + scale [s0, s1] F8_E8M0 (spec §5.1's numbers). */
static void want_fp8(const char *p, const char *n, int64_t out, int64_t in, int64_t s0, int64_t s1)
{
    want(ST_F8_E4M3, out, in, "%s%s.weight", p, n);
    want(ST_F8_E8M0, s0, s1, "%s%s.scale", p, n);
}

enum { SWA, CSA, HCA };

static void want_layer(const char *p, int attn, int hash, int mtp, int E)
{
    want(ST_BF16, 4096, -1, "%sattn_norm.weight", p);
    want(ST_BF16, 4096, -1, "%sffn_norm.weight", p);
    want(ST_F32, 24, 16384, "%shc_attn_fn", p);
    want(ST_F32, 24, 16384, "%shc_ffn_fn", p);
    want(ST_F32, 24, -1, "%shc_attn_base", p);
    want(ST_F32, 24, -1, "%shc_ffn_base", p);
    want(ST_F32, 3, -1, "%shc_attn_scale", p);
    want(ST_F32, 3, -1, "%shc_ffn_scale", p);
    want_fp8(p, "attn.wq_a", 1024, 4096, 8, 32);
    want(ST_BF16, 1024, -1, "%sattn.q_norm.weight", p);
    want_fp8(p, "attn.wq_b", 32768, 1024, 256, 8);
    want_fp8(p, "attn.wkv", 512, 4096, 4, 32);
    want(ST_BF16, 512, -1, "%sattn.kv_norm.weight", p);
    want_fp8(p, "attn.wo_a", 8192, 4096, 64, 32);
    want_fp8(p, "attn.wo_b", 4096, 8192, 32, 64);
    want(ST_F32, 64, -1, "%sattn.attn_sink", p);
    if (attn == CSA) {
        want(ST_BF16, 1024, 4096, "%sattn.compressor.wkv.weight", p);
        want(ST_BF16, 1024, 4096, "%sattn.compressor.wgate.weight", p);
        want(ST_F32, 4, 1024, "%sattn.compressor.ape", p);
        want(ST_BF16, 512, -1, "%sattn.compressor.norm.weight", p);
        want_fp8(p, "attn.indexer.wq_b", 8192, 1024, 64, 8);
        want(ST_BF16, 64, 4096, "%sattn.indexer.weights_proj.weight", p);
        want(ST_BF16, 256, 4096, "%sattn.indexer.compressor.wkv.weight", p);
        want(ST_BF16, 256, 4096, "%sattn.indexer.compressor.wgate.weight", p);
        want(ST_F32, 4, 256, "%sattn.indexer.compressor.ape", p);
        want(ST_BF16, 128, -1, "%sattn.indexer.compressor.norm.weight", p);
    } else if (attn == HCA) {
        want(ST_BF16, 512, 4096, "%sattn.compressor.wkv.weight", p);
        want(ST_BF16, 512, 4096, "%sattn.compressor.wgate.weight", p);
        want(ST_F32, 128, 512, "%sattn.compressor.ape", p);
        want(ST_BF16, 512, -1, "%sattn.compressor.norm.weight", p);
    }
    want(ST_BF16, E, 4096, "%sffn.gate.weight", p);
    if (hash)
        want(ST_I64, 129280, 6, "%sffn.gate.tid2eid", p);
    else
        want(ST_F32, E, -1, "%sffn.gate.bias", p);
    for (int e = 0; e < E; e++) { /* MXFP4: I8 [out, in/2] + E8M0 [out, in/32] */
        want(ST_I8, 2048, 2048, "%sffn.experts.%d.w1.weight", p, e);
        want(ST_F8_E8M0, 2048, 128, "%sffn.experts.%d.w1.scale", p, e);
        want(ST_I8, 2048, 2048, "%sffn.experts.%d.w3.weight", p, e);
        want(ST_F8_E8M0, 2048, 128, "%sffn.experts.%d.w3.scale", p, e);
        want(ST_I8, 4096, 1024, "%sffn.experts.%d.w2.weight", p, e);
        want(ST_F8_E8M0, 4096, 64, "%sffn.experts.%d.w2.scale", p, e);
    }
    want_fp8(p, "ffn.shared_experts.w1", 2048, 4096, 16, 32);
    want_fp8(p, "ffn.shared_experts.w3", 2048, 4096, 16, 32);
    want_fp8(p, "ffn.shared_experts.w2", 4096, 2048, 32, 16);
    if (mtp) { /* spec §9 */
        want_fp8(p, "e_proj", 4096, 4096, 32, 32);
        want_fp8(p, "h_proj", 4096, 4096, 32, 32);
        want(ST_BF16, 4096, -1, "%senorm.weight", p);
        want(ST_BF16, 4096, -1, "%shnorm.weight", p);
        want(ST_BF16, 4096, -1, "%snorm.weight", p);
        want(ST_F32, 4, 16384, "%shc_head_fn", p);
        want(ST_F32, 4, -1, "%shc_head_base", p);
        want(ST_F32, 1, -1, "%shc_head_scale", p);
    }
}

/* Every tensor of a Flash checkpoint of L layers, E experts, 1 MTP layer. */
static void want_flash(int L, int E)
{
    n_wants = 0;
    want(ST_BF16, 129280, 4096, "embed.weight");
    want(ST_BF16, 129280, 4096, "head.weight");
    want(ST_BF16, 4096, -1, "norm.weight");
    want(ST_F32, 4, 16384, "hc_head_fn");
    want(ST_F32, 4, -1, "hc_head_base");
    want(ST_F32, 1, -1, "hc_head_scale");
    for (int i = 0; i < L; i++) {
        char p[32];
        snprintf(p, sizeof p, "layers.%d.", i);
        want_layer(p, i < 2 ? SWA : i % 2 ? HCA : CSA, i < 3, 0, E);
    }
    want_layer("mtp.0.", SWA, 0, 1, E);
}

/* ---- a Flash-width export ---- */

/* The main export, and the directories of single tests (removed at the end even when a test
 * fails half-way: a Flash-width export in /dev/shm holds gigabytes of memory). */
static char flash_dir[256], small_dir[256], err_dir[256];

/* A fresh directory under /dev/shm when it has `need` bytes to spare, else $TMPDIR or /tmp. */
static void make_dir(char *dir, size_t len, uint64_t need)
{
    struct statvfs vf;
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    if (statvfs("/dev/shm", &vf) == 0 && (uint64_t)vf.f_bavail * vf.f_frsize > need)
        base = "/dev/shm";
    snprintf(dir, len, "%s/dsv4d-synth-XXXXXX", base);
    assert_non_null(mkdtemp(dir));
}

static void rm_dir(const char *dir)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (dir[0] && system(cmd) != 0)
        printf("# could not remove %s\n", dir);
}

static int flash_setup(void **s)
{
    (void)s;
    struct dsv4_config c;
    uint64_t bytes = 0;
    if (dsv4_flash_config(&c, FLASH_LAYERS, FLASH_EXPERTS))
        return -1;
    make_dir(flash_dir, sizeof flash_dir, 10ull << 30);
    set_threads(max_threads());
    double t0 = now();
    if (dsv4_synth_export(flash_dir, &c, DSV4_SYNTH_SEED, NULL, &bytes)) {
        printf("# export: %s\n", err_msg());
        rm_dir(flash_dir);
        return -1;
    }
    double dt = now() - t0;
    printf("# export-tiny --shape flash --layers %d --experts %d to %s: %.2f GB in %.1f s "
           "(%.0f MB/s, %d threads)\n",
           FLASH_LAYERS, FLASH_EXPERTS, flash_dir, (double)bytes / 1e9, dt, bytes / 1e6 / dt,
           max_threads());
    return 0;
}

static int flash_teardown(void **s)
{
    (void)s;
    rm_dir(flash_dir);
    rm_dir(small_dir);
    rm_dir(err_dir);
    free(wants);
    wants = NULL;
    n_wants = cap_wants = 0;
    return 0;
}

/* Every tensor under its official name, dtype and shape; nothing else; the index and the
 * config agree. */
static void test_flash_tensors(void **s)
{
    (void)s;
    struct st_set *st;
    struct dsv4_config c;
    if (st_set_open_dir(&st, flash_dir) || dsv4_config_load_dir(&c, flash_dir))
        fail_msg("%s", err_msg());
    want_flash(FLASH_LAYERS, FLASH_EXPERTS);
    for (int i = 0; i < n_wants; i++)
        if (st_set_expect(st, wants[i].name, wants[i].dt, wants[i].ndim, wants[i].shape, NULL))
            fail_msg("%s", err_msg());
    assert_int_equal(st_set_count(st), n_wants);
    assert_int_equal(c.n_layers, FLASH_LAYERS);
    assert_int_equal(c.n_routed_experts, FLASH_EXPERTS);
    assert_int_equal(c.hidden_size, 4096);
    /* tid2eid: K distinct experts < E per token */
    const struct st_tensor *t = st_set_find(st, "layers.0.ffn.gate.tid2eid");
    const int64_t *ids = t->data;
    for (int v = 0; v < 129280; v++)
        for (int j = 0; j < 6; j++) {
            assert_true(ids[v * 6 + j] >= 0 && ids[v * 6 + j] < FLASH_EXPERTS);
            for (int k = 0; k < j; k++)
                assert_true(ids[v * 6 + j] != ids[v * 6 + k]);
        }
    st_set_free(st);
}

/*
 * Same seed, same bytes, whatever the thread count: a smaller export (1 layer, 6 experts) on one
 * thread has every tensor that it shares with the big one (same name, dtype and shape: embed,
 * head, attention, experts 0-5, ...) byte for byte equal. Values depend on (seed, name, index)
 * only, so widths elsewhere do not matter; item boundaries and thread order differ.
 */
static void test_flash_deterministic(void **s)
{
    (void)s;
    struct dsv4_config c;
    struct st_set *big, *small;
    uint64_t same = 0;
    int n_same = 0;
    assert_int_equal(dsv4_flash_config(&c, 1, 6), 0);
    make_dir(small_dir, sizeof small_dir, 4ull << 30);
    set_threads(1);
    double t0 = now();
    if (dsv4_synth_export(small_dir, &c, DSV4_SYNTH_SEED, NULL, NULL))
        fail_msg("%s", err_msg());
    set_threads(max_threads());
    printf("# export-tiny --shape flash --layers 1 --experts 6 on 1 thread: %.1f s\n", now() - t0);
    if (st_set_open_dir(&big, flash_dir) || st_set_open_dir(&small, small_dir))
        fail_msg("%s", err_msg());
    for (int i = 0; i < st_set_count(small); i++) {
        const struct st_tensor *a = st_set_at(small, i), *b = st_set_find(big, a->name);
        if (!b || a->dtype != b->dtype || a->nbytes != b->nbytes ||
            memcmp(a->shape, b->shape, sizeof a->shape) || strstr(a->name, "tid2eid"))
            continue; /* tid2eid draws among E experts: same shape, other values */
        if (memcmp(a->data, b->data, a->nbytes))
            fail_msg("%s differs between the two exports", a->name);
        same += a->nbytes;
        n_same++;
    }
    printf("# %d tensors, %.2f GB identical\n", n_same, (double)same / 1e9);
    assert_true(n_same > 100 && same > (2ull << 30));
    st_set_free(big);
    st_set_free(small);
    rm_dir(small_dir);
    small_dir[0] = 0;
}

static int32_t prompt[8] = {0, 100, 2000, 30000, 65000, 100000, 129000, 7};

/* Load with the CPU engine: finite, non-degenerate logits; the MTP block runs; a dense layer's
 * router spreads the tokens over more experts than one token uses. */
static void test_flash_forward(void **s)
{
    (void)s;
    enum { T = 8 };
    struct dsv4_model *m;
    struct dsv4_seq_state *st;
    if (dsv4_model_open(&m, flash_dir) || dsv4_seq_state_new(m, NULL, &st))
        fail_msg("%s", err_msg());
    const struct dsv4_config *c = &m->cfg;
    const int V = c->vocab_size, d = c->hidden_size, n = c->hc_mult, E = c->n_routed_experts;
    const int K = c->n_experts_per_tok;
    float *logits = malloc(sizeof(float) * (size_t)T * V);
    float *hidden = malloc(sizeof(float) * (size_t)T * n * d);
    float *mtp = malloc(sizeof(float) * (size_t)T * V);
    float *x = malloc(sizeof(float) * (size_t)n * d), *gl = malloc(sizeof(float) * (size_t)E);
    assert_true(logits && hidden && mtp && x && gl);
    for (size_t i = 0; i < (size_t)T * V; i++)
        logits[i] = mtp[i] = NAN;
    struct dsv4_batch_seq b = {st, prompt, T, 1};
    double t0 = now();
    if (dsv4_forward(m, &b, 1, logits, hidden) ||
        dsv4_mtp_forward(m, st, hidden, prompt + 1, T - 1, mtp))
        fail_msg("%s", err_msg());
    printf("# forward of %d tokens + MTP: %.1f s\n", T, now() - t0);
    int distinct_argmax = 0, argmax[T];
    for (int t = 0; t < T; t++) {
        const float *l = logits + (size_t)t * V;
        double sum = 0, sq = 0;
        argmax[t] = 0;
        for (int v = 0; v < V; v++) {
            if (!isfinite(l[v]) || (t < T - 1 && !isfinite(mtp[(size_t)t * V + v])))
                fail_msg("token %d: logit %d is not finite", t, v);
            assert_true(fabsf(l[v]) < 100.0f);
            sum += l[v];
            sq += (double)l[v] * l[v];
            argmax[t] = l[v] > l[argmax[t]] ? v : argmax[t];
        }
        double sd = sqrt(sq / V - (sum / V) * (sum / V));
        if (!(sd > 0.1))
            fail_msg("token %d: logits have sd %g", t, sd);
        int seen = 0;
        for (int u = 0; u < t; u++)
            seen |= argmax[u] == argmax[t];
        distinct_argmax += !seen;
    }
    assert_true(distinct_argmax > 1);
    for (size_t i = 0; i < (size_t)T * n * d; i++)
        assert_true(isfinite(hidden[i]));
    /* layer 3's router (dense: sqrt-softplus + bias, top-6) on the model's hidden streams */
    const struct dsv4_layer_w *lw = &m->w.layers[3];
    int used[256] = {0}, distinct = 0;
    assert_int_equal(m->sched.layers[3].router, DSV4_ROUTER_DENSE);
    for (int t = 0; t < T; t++) {
        float post[16], comb[256], w[64], wsum = 0;
        int idx[64];
        memcpy(x, hidden + (size_t)t * n * d, sizeof(float) * (size_t)n * d);
        cpu_hc_pre(x, n, d, lw->hc_ffn.fn, lw->hc_ffn.base, lw->hc_ffn.scale, c->hc_sinkhorn_iters,
                   (float)c->hc_eps, (float)c->rms_norm_eps, x, post, comb);
        cpu_rmsnorm(x, lw->ffn_norm, d, (float)c->rms_norm_eps, x);
        cpu_linear(&lw->gate, x, 1, gl);
        cpu_route(gl, E, K, lw->gate_bias, NULL, (float)c->routed_scaling_factor, idx, w);
        for (int j = 0; j < K; j++) {
            distinct += !used[idx[j]];
            used[idx[j]] = 1;
            wsum += w[j];
            assert_true(w[j] > 0);
        }
        assert_true(fabsf(wsum - (float)c->routed_scaling_factor) < 1e-3f);
    }
    printf("# layer 3's router: %d of %d experts over %d tokens; %d distinct greedy tokens\n",
           distinct, E, T, distinct_argmax);
    assert_true(distinct > K);
    free(logits), free(hidden), free(mtp), free(x), free(gl);
    dsv4_seq_state_free(st);
    dsv4_model_free(m);
}

/* ---- errors ---- */

static void expect_export_error(const char *dir, const char *tokenizer, const char *text)
{
    struct dsv4_config c;
    dsv4_tiny_config(&c, DSV4_VARIANT_FLASH);
    int rc = dsv4_synth_export(dir, &c, DSV4_SYNTH_SEED, tokenizer, NULL);
    printf("# -> %s\n", err_msg());
    assert_int_equal(rc, ERR_IO);
    if (!strstr(err_msg(), text))
        fail_msg("message \"%s\" does not name \"%s\"", err_msg(), text);
}

static void test_export_errors(void **s)
{
    (void)s;
    char path[300], path2[400];
    make_dir(err_dir, sizeof err_dir, 1ull << 30);
    snprintf(path, sizeof path, "%s/file", err_dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fclose(f);
    expect_export_error(path, NULL, path); /* exists, not a directory */
    snprintf(path2, sizeof path2, "%s/sub", path);
    expect_export_error(path2, NULL, path2); /* cannot be created */
    snprintf(path, sizeof path, "%s/out", err_dir);
    snprintf(path2, sizeof path2, "%s/no-tokenizer.json", err_dir);
    expect_export_error(path, path2, path2); /* the tokenizer to copy is missing */
    snprintf(path2, sizeof path2, "%s/config.json", path);
    struct stat sb;
    assert_int_not_equal(stat(path2, &sb), 0); /* a failed export leaves no config.json */
    rm_dir(err_dir);
    err_dir[0] = 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_bits),     cmocka_unit_test(test_export_errors),
        cmocka_unit_test(test_flash_tensors), cmocka_unit_test(test_flash_deterministic),
        cmocka_unit_test(test_flash_forward),
    };
    return cmocka_run_group_tests(tests, flash_setup, flash_teardown);
}
