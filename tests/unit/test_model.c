/*
 * test_model.c - the CPU forward pass against itself: prefill == chunked prefill == incremental
 * decode at every position, a sequence's result is the same alone and inside a batch of
 * sequences of different lengths, the MTP block decodes incrementally like in one call, the
 * exported checkpoint loads bit-identical to builtin:, and damaged checkpoints are refused with a
 * message naming the tensor. Both tiny variants, both numerics. Outputs are poisoned before use.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "engine/err.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/tiny.h"

#define LEN 290 /* window wraps, 2 HCA entries, 72 CSA entries (> index_topk) */

static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

static int32_t *make_prompt(int n, unsigned seed)
{
    int32_t *p = malloc(sizeof(int32_t) * (size_t)n);
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (int32_t)((s >> 33) % 129280);
    }
    return p;
}

static struct dsv4_model *open_model(const char *spec, enum dsv4_numerics num)
{
    struct dsv4_model *m;
    if (dsv4_model_open(&m, spec))
        fail_msg("%s", err_msg());
    m->numerics = num;
    return m;
}

/* Run `prompt` through a fresh state in chunks of the given sizes (cycled); hidden (LEN, n*d). */
static void run_chunks(struct dsv4_model *m, const int32_t *prompt, int len, const int *sizes,
                       int nsizes, float *hidden)
{
    const size_t row = (size_t)m->cfg.hc_mult * m->cfg.hidden_size;
    struct dsv4_seq_state *st;
    assert_int_equal(dsv4_seq_state_new(m, NULL, &st), 0);
    poison(hidden, (size_t)len * row);
    for (int done = 0, k = 0; done < len; k++) {
        int n = sizes[k % nsizes];
        if (n > len - done)
            n = len - done;
        struct dsv4_batch_seq b = {st, prompt + done, n, 1};
        if (dsv4_forward(m, &b, 1, NULL, hidden + (size_t)done * row))
            fail_msg("%s", err_msg());
        done += n;
    }
    assert_int_equal(st->pos, len);
    dsv4_seq_state_free(st);
}

static void check_chunking(const char *spec, enum dsv4_numerics num)
{
    struct dsv4_model *m = open_model(spec, num);
    const size_t row = (size_t)m->cfg.hc_mult * m->cfg.hidden_size;
    int32_t *prompt = make_prompt(LEN, 1);
    float *full = malloc(sizeof(float) * LEN * row), *other = malloc(sizeof(float) * LEN * row);
    static const int whole[] = {LEN}, one[] = {1}, mixed[] = {7, 1, 128, 3, 64, 200};
    run_chunks(m, prompt, LEN, whole, 1, full);
    for (size_t i = 0; i < LEN * row; i++)
        assert_false(isnan(full[i]));
    run_chunks(m, prompt, LEN, one, 1, other);
    for (int p = 0; p < LEN; p++)
        if (memcmp(full + p * row, other + p * row, row * sizeof(float)))
            fail_msg("%s: incremental decode differs from prefill at position %d", spec, p);
    run_chunks(m, prompt, LEN, mixed, 6, other);
    for (int p = 0; p < LEN; p++)
        if (memcmp(full + p * row, other + p * row, row * sizeof(float)))
            fail_msg("%s: chunked prefill differs from prefill at position %d", spec, p);
    free(full);
    free(other);
    free(prompt);
    dsv4_model_free(m);
}

static void test_chunking_flash_model(void **s)
{
    (void)s;
    check_chunking("builtin:tiny-flash", DSV4_NUMERICS_MODEL);
}
static void test_chunking_flash_exact(void **s)
{
    (void)s;
    check_chunking("builtin:tiny-flash", DSV4_NUMERICS_EXACT);
}
static void test_chunking_pro_model(void **s)
{
    (void)s;
    check_chunking("builtin:tiny-pro", DSV4_NUMERICS_MODEL);
}

/* Three sequences of different lengths prefill together and then decode together, against each
 * alone: logits identical. */
static void test_batch_invariance(void **s)
{
    (void)s;
    struct dsv4_model *m = open_model("builtin:tiny-flash", DSV4_NUMERICS_MODEL);
    const int V = m->cfg.vocab_size, NS = 3, STEPS = 4;
    const int lens[3] = {5, 140, 260};
    int32_t *prompts[3];
    struct dsv4_seq_state *st[3], *alone;
    float *lb = malloc(sizeof(float) * (size_t)NS * V), *la = malloc(sizeof(float) * (size_t)V);
    float *seqlog[3];
    for (int i = 0; i < NS; i++) {
        prompts[i] = make_prompt(lens[i] + STEPS, 10 + (unsigned)i);
        assert_int_equal(dsv4_seq_state_new(m, NULL, &st[i]), 0);
        seqlog[i] = malloc(sizeof(float) * (size_t)(STEPS + 1) * V);
    }
    /* batched: prefill all, then STEPS decode steps of one token each */
    for (int step = 0; step <= STEPS; step++) {
        struct dsv4_batch_seq b[3];
        for (int i = 0; i < NS; i++)
            b[i] = (struct dsv4_batch_seq){st[i], step ? prompts[i] + lens[i] + step - 1 : prompts[i],
                                           step ? 1 : lens[i], 0};
        poison(lb, (size_t)NS * V);
        if (dsv4_forward(m, b, NS, lb, NULL))
            fail_msg("%s", err_msg());
        for (int i = 0; i < NS; i++)
            memcpy(seqlog[i] + (size_t)step * V, lb + (size_t)i * V, sizeof(float) * (size_t)V);
    }
    for (int i = 0; i < NS; i++) {
        assert_int_equal(dsv4_seq_state_new(m, NULL, &alone), 0);
        for (int step = 0; step <= STEPS; step++) {
            struct dsv4_batch_seq b = {alone, step ? prompts[i] + lens[i] + step - 1 : prompts[i],
                                       step ? 1 : lens[i], 0};
            poison(la, (size_t)V);
            if (dsv4_forward(m, &b, 1, la, NULL))
                fail_msg("%s", err_msg());
            if (memcmp(la, seqlog[i] + (size_t)step * V, sizeof(float) * (size_t)V))
                fail_msg("sequence %d step %d: batched logits differ from alone", i, step);
        }
        dsv4_seq_state_free(alone);
        dsv4_seq_state_free(st[i]);
        free(prompts[i]);
        free(seqlog[i]);
    }
    free(lb);
    free(la);
    dsv4_model_free(m);
}

/* MTP: rows fed one by one == all at once; logits finite and not constant. */
static void test_mtp_incremental(void **s)
{
    (void)s;
    struct dsv4_model *m = open_model("builtin:tiny-pro", DSV4_NUMERICS_MODEL);
    const int V = m->cfg.vocab_size, N = 140;
    const size_t row = (size_t)m->cfg.hc_mult * m->cfg.hidden_size;
    int32_t *prompt = make_prompt(N + 1, 3);
    float *hidden = malloc(sizeof(float) * N * row);
    static const int whole[] = {N};
    run_chunks(m, prompt, N, whole, 1, hidden);
    float *all = malloc(sizeof(float) * (size_t)N * V), *one = malloc(sizeof(float) * (size_t)V);
    struct dsv4_seq_state *st;
    assert_int_equal(dsv4_seq_state_new(m, NULL, &st), 0);
    poison(all, (size_t)N * V);
    if (dsv4_mtp_forward(m, st, hidden, prompt + 1, N, all))
        fail_msg("%s", err_msg());
    dsv4_seq_state_reset(m, st);
    for (int i = 0; i < N; i++) {
        poison(one, (size_t)V);
        if (dsv4_mtp_forward(m, st, hidden + (size_t)i * row, prompt + 1 + i, 1, one))
            fail_msg("%s", err_msg());
        if (memcmp(one, all + (size_t)i * V, sizeof(float) * (size_t)V))
            fail_msg("MTP row %d differs between incremental and one call", i);
    }
    assert_true(isfinite(all[0]) && all[0] != all[1]);
    dsv4_seq_state_free(st);
    free(all), free(one), free(hidden), free(prompt);
    dsv4_model_free(m);
}

static char tmpdir[64];

static void export_tmp(const char *variant)
{
    enum dsv4_variant v;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv4d-test-XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    assert_int_equal(dsv4_variant_parse(variant, &v), 0);
    if (dsv4_tiny_export(tmpdir, v))
        fail_msg("%s", err_msg());
}

static void rm_tmp(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    assert_int_equal(system(cmd), 0);
}

/* export-tiny + load == builtin:, bit for bit. */
static void test_export_roundtrip(void **s)
{
    (void)s;
    static const char *variants[2] = {"flash", "pro"};
    for (int k = 0; k < 2; k++) {
        char spec[64];
        export_tmp(variants[k]);
        snprintf(spec, sizeof spec, "builtin:tiny-%s", variants[k]);
        struct dsv4_model *a = open_model(spec, DSV4_NUMERICS_MODEL);
        struct dsv4_model *b = open_model(tmpdir, DSV4_NUMERICS_MODEL);
        const int V = a->cfg.vocab_size;
        int32_t *prompt = make_prompt(40, 5);
        float *la = malloc(sizeof(float) * (size_t)V), *lb = malloc(sizeof(float) * (size_t)V);
        struct dsv4_seq_state *sa, *sb;
        assert_int_equal(dsv4_seq_state_new(a, NULL, &sa), 0);
        assert_int_equal(dsv4_seq_state_new(b, NULL, &sb), 0);
        struct dsv4_batch_seq ba = {sa, prompt, 40, 0}, bb = {sb, prompt, 40, 0};
        poison(la, (size_t)V);
        poison(lb, (size_t)V);
        assert_int_equal(dsv4_forward(a, &ba, 1, la, NULL), 0);
        assert_int_equal(dsv4_forward(b, &bb, 1, lb, NULL), 0);
        assert_memory_equal(la, lb, sizeof(float) * (size_t)V);
        dsv4_seq_state_free(sa), dsv4_seq_state_free(sb);
        free(la), free(lb), free(prompt);
        dsv4_model_free(a), dsv4_model_free(b);
        rm_tmp();
    }
}

/*
 * Rewrite shard 2 of an exported model with tensor `name` dropped (new_shape NULL) or given a
 * new first dimension / dtype, then expect dsv4_model_open to fail naming it.
 */
static void damaged(const char *name, int drop, int64_t new_dim0, int new_dtype, int want_rc,
                    const char *want_text)
{
    export_tmp("flash");
    char shard[160], spec[160];
    snprintf(shard, sizeof shard, "%s/model-00002-of-00002.safetensors", tmpdir);
    struct st_set *set;
    if (st_set_open_file(&set, shard))
        fail_msg("%s", err_msg());
    int n = st_set_count(set), k = 0;
    struct st_write_tensor *w = calloc((size_t)n, sizeof *w);
    uint8_t *junk = calloc(1, 1 << 20);
    for (int i = 0; i < n; i++) {
        const struct st_tensor *t = st_set_at(set, i);
        if (!strcmp(t->name, name) && drop)
            continue;
        w[k].name = t->name;
        w[k].dtype = t->dtype;
        w[k].ndim = t->ndim;
        memcpy(w[k].shape, t->shape, sizeof t->shape);
        w[k].data = t->data;
        if (!strcmp(t->name, name)) {
            if (new_dim0)
                w[k].shape[0] = new_dim0;
            if (new_dtype >= 0)
                w[k].dtype = (enum st_dtype)new_dtype;
            w[k].data = junk; /* big enough for any of the small tensors used here */
        }
        k++;
    }
    char tmp[200];
    snprintf(tmp, sizeof tmp, "%s.new", shard);
    assert_int_equal(st_write_file(tmp, w, k), 0);
    st_set_free(set);
    assert_int_equal(rename(tmp, shard), 0);
    if (drop) { /* also drop it from the index so the set itself opens */
        char cmd[512];
        snprintf(cmd, sizeof cmd, "sed -i '/\"%s\"/d' %s/model.safetensors.index.json", name, tmpdir);
        assert_int_equal(system(cmd), 0);
    }
    snprintf(spec, sizeof spec, "%s", tmpdir);
    struct dsv4_model *m = NULL;
    int rc = dsv4_model_open(&m, spec);
    printf("# %s -> %s\n", name, err_msg());
    assert_int_equal(rc, want_rc);
    assert_non_null(strstr(err_msg(), name));
    assert_non_null(strstr(err_msg(), want_text));
    free(w);
    free(junk);
    rm_tmp();
}

static void test_missing_tensor(void **s)
{
    (void)s;
    damaged("layers.2.attn.indexer.compressor.ape", 1, 0, -1, ERR_NOTFOUND, "missing");
}

static void test_wrong_shape(void **s)
{
    (void)s;
    damaged("layers.3.attn.kv_norm.weight", 0, 511, -1, ERR_FORMAT, "shape [512] expected");
}

static void test_wrong_dtype(void **s)
{
    (void)s;
    damaged("layers.4.ffn.gate.bias", 0, 0, ST_I32, ERR_FORMAT, "dtype");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunking_flash_model), cmocka_unit_test(test_chunking_flash_exact),
        cmocka_unit_test(test_chunking_pro_model),   cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_mtp_incremental),      cmocka_unit_test(test_export_roundtrip),
        cmocka_unit_test(test_missing_tensor),       cmocka_unit_test(test_wrong_shape),
        cmocka_unit_test(test_wrong_dtype),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
