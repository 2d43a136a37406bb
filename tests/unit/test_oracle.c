/*
 * test_oracle.c - the CPU engine (exact numerics) against Hugging Face transformers'
 * DeepseekV4ForCausalLM on the built-in tiny models.
 *
 * Fixtures (tests/fixtures/oracle/tiny-{flash,pro}.{json,bin}) were produced by
 * tests/oracle/make_fixtures.py from `dsv4d export-tiny` checkpoints: reference logits at
 * several positions of a 300-token prompt (window wrap, two HCA entries, indexer selecting 8 of
 * up to 75 CSA entries) and a 32-token greedy continuation.
 *
 * Checks: max |dlogit| / max |logit| <= 1e-4 at every fixture position, with the prompt fed in
 * chunks that end at those positions (prefill and chunked prefill), and identical greedy tokens
 * with incremental decode. Output buffers are poisoned (NaN) before every run.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <jansson.h>

#include "engine/err.h"
#include "engine/model.h"

#define TOL 1e-4

static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

static void run_variant(const char *name, const char *model_spec)
{
    char path[4096];
    const char *root = getenv("DSV4_SOURCE_ROOT");
    snprintf(path, sizeof path, "%s/tests/fixtures/oracle/%s.json", root ? root : ".", name);
    json_error_t jerr;
    json_t *meta = json_load_file(path, 0, &jerr);
    if (!meta)
        fail_msg("%s: %s", path, jerr.text);
    int V = (int)json_integer_value(json_object_get(meta, "vocab_size"));
    json_t *jp = json_object_get(meta, "prompt"), *jpos = json_object_get(meta, "positions");
    json_t *jg = json_object_get(meta, "greedy");
    int np = (int)json_array_size(jp), npos = (int)json_array_size(jpos), ng = (int)json_array_size(jg);
    assert_true(np > 0 && npos > 0 && ng > 0);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)np);
    for (int i = 0; i < np; i++)
        prompt[i] = (int32_t)json_integer_value(json_array_get(jp, (size_t)i));
    float *ref = malloc(sizeof(float) * (size_t)npos * V);
    snprintf(path, sizeof path, "%s/tests/fixtures/oracle/%s.bin", root ? root : ".", name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(ref, sizeof(float), (size_t)npos * V, f), (size_t)npos * V);
    fclose(f);

    struct dsv4_model *m;
    struct dsv4_seq_state *st;
    if (dsv4_model_open(&m, model_spec) || dsv4_seq_state_new(m, NULL, &st))
        fail_msg("%s", err_msg());
    m->numerics = DSV4_NUMERICS_EXACT;
    assert_int_equal(m->cfg.vocab_size, V);
    float *logits = malloc(sizeof(float) * (size_t)V);

    /* prefill in chunks ending at each fixture position */
    long done = 0;
    double worst = 0;
    for (int k = 0; k < npos; k++) {
        int p = (int)json_integer_value(json_array_get(jpos, (size_t)k));
        struct dsv4_batch_seq b = {st, prompt + done, (int)(p + 1 - done), 0};
        poison(logits, (size_t)V);
        if (dsv4_forward(m, &b, 1, logits, NULL))
            fail_msg("%s", err_msg());
        done = p + 1;
        const float *r = ref + (size_t)k * V;
        double maxref = 0, maxd = 0;
        for (int i = 0; i < V; i++) {
            maxref = fmax(maxref, fabs(r[i]));
            double dd = fabs((double)logits[i] - r[i]);
            maxd = isnan(logits[i]) ? INFINITY : fmax(maxd, dd);
        }
        double rel = maxd / maxref;
        worst = fmax(worst, rel);
        printf("# %s position %d: max|dlogit|/max|logit| = %.3g\n", name, p, rel);
        assert_true(rel <= TOL);
    }
    assert_int_equal(done, np);
    /* greedy continuation by incremental decode */
    int mismatch = -1;
    int32_t tok;
    for (int i = 0; i < ng; i++) {
        int best = 0;
        if (i > 0) {
            struct dsv4_batch_seq b = {st, &tok, 1, 0};
            poison(logits, (size_t)V);
            if (dsv4_forward(m, &b, 1, logits, NULL))
                fail_msg("%s", err_msg());
        }
        for (int j = 1; j < V; j++)
            if (logits[j] > logits[best])
                best = j;
        tok = best;
        if (mismatch < 0 && best != (int)json_integer_value(json_array_get(jg, (size_t)i)))
            mismatch = i;
    }
    printf("# %s: worst relative logit error %.3g over %d positions; greedy %d/%d tokens equal\n",
           name, worst, npos, mismatch < 0 ? ng : mismatch, ng);
    assert_int_equal(mismatch, -1);
    free(logits);
    dsv4_seq_state_free(st);
    dsv4_model_free(m);
    free(ref);
    free(prompt);
    json_decref(meta);
}

static void test_flash(void **state)
{
    (void)state;
    run_variant("tiny-flash", "builtin:tiny-flash");
}

static void test_pro(void **state)
{
    (void)state;
    run_variant("tiny-pro", "builtin:tiny-pro");
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_flash), cmocka_unit_test(test_pro)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
