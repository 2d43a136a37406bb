/*
 * test_nvfp4_load.c - NVFP4 re-quantised checkpoints on the CPU engine (cmocka): the built-in
 * tiny-flash with its MXFP4 experts converted exactly to NVFP4 and stored as ModelOpt and as
 * compressed-tensors write them (tests/common/nvfp4_ckpt.h) must give logits bit-identical to the
 * MXFP4 original (the dequantised values are the same floats); a NaN block scale and a missing
 * global scale are refused with the tensor's name; expert_dtype "nvfp4" round-trips through
 * config.json.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/backend.h"
#include "engine/config.h"
#include "engine/err.h"
#include "engine/model.h"
#include "engine/tiny.h"
#include "tests/common/nvfp4_ckpt.h"

#define PROMPT 40

/* The logits of the last of PROMPT tokens on the CPU backend. */
static void logits_of(struct dsv4_model *m, float *out)
{
    struct backend *be = NULL;
    int32_t tok[PROMPT];
    for (int i = 0; i < PROMPT; i++)
        tok[i] = (int32_t)((i * 7919 + 13) % m->cfg.vocab_size);
    assert_int_equal(backend_cpu_new(&be, m, 1, 4), 0);
    struct backend_seq s = {0, tok, PROMPT, 1, NULL};
    assert_int_equal(be->ops->step(be, &s, 1, out), 0);
    be->ops->destroy(be);
}

static void test_nvfp4_bit_identical(void **state)
{
    (void)state;
    struct dsv4_config cfg;
    struct st_set *st = NULL, *mo = NULL, *ct = NULL;
    assert_int_equal(dsv4_tiny_build(DSV4_VARIANT_FLASH, &cfg, &st), 0);
    assert_int_equal(nvc_convert(st, 0, 0, &mo), 0);
    assert_int_equal(nvc_convert(st, 1, 0, &ct), 0);
    assert_non_null(st_set_find(mo, "layers.3.ffn.experts.0.w1.weight_scale_2"));
    assert_non_null(st_set_find(ct, "layers.3.ffn.experts.0.w2.weight_global_scale"));
    struct dsv4_config nv = cfg;
    nv.expert_fmt = DSV4_WFMT_NVFP4;
    struct dsv4_model *a = NULL, *b = NULL, *c = NULL;
    assert_int_equal(dsv4_model_open_set(&a, &cfg, st, "mxfp4"), 0);
    assert_int_equal(dsv4_model_open_set(&b, &nv, mo, "nvfp4-modelopt"), 0);
    assert_int_equal(dsv4_model_open_set(&c, &nv, ct, "nvfp4-compressed-tensors"), 0);
    const int V = cfg.vocab_size;
    float *la = malloc(sizeof(float) * (size_t)V * 3), *lb = la + V, *lc = lb + V;
    assert_non_null(la);
    logits_of(a, la);
    logits_of(b, lb);
    logits_of(c, lc);
    assert_memory_equal(la, lb, sizeof(float) * (size_t)V);
    assert_memory_equal(la, lc, sizeof(float) * (size_t)V);
    free(la);
    dsv4_model_free(a);
    dsv4_model_free(b);
    dsv4_model_free(c);
}

static void test_nvfp4_refused(void **state)
{
    (void)state;
    struct dsv4_config cfg;
    struct st_set *st = NULL, *bad = NULL;
    struct dsv4_model *m = NULL;
    assert_int_equal(dsv4_tiny_build(DSV4_VARIANT_FLASH, &cfg, &st), 0);
    cfg.expert_fmt = DSV4_WFMT_NVFP4;
    assert_int_equal(nvc_convert(st, 0, NVC_NAN_SCALE, &bad), 0);
    assert_int_equal(dsv4_model_open_set(&m, &cfg, bad, "nan"), ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "weight_scale: NaN block scale"));
    assert_int_equal(nvc_convert(st, 1, NVC_NO_GLOBAL, &bad), 0);
    assert_int_equal(dsv4_model_open_set(&m, &cfg, bad, "no-global"), ERR_NOTFOUND);
    assert_non_null(strstr(err_msg(), "weight_global_scale"));
    st_set_free(st);
}

static void test_nvfp4_config(void **state)
{
    (void)state;
    struct dsv4_config cfg, back;
    struct st_set *st = NULL;
    char *json = NULL;
    assert_int_equal(dsv4_tiny_build(DSV4_VARIANT_PRO, &cfg, &st), 0);
    st_set_free(st);
    cfg.expert_fmt = DSV4_WFMT_NVFP4;
    assert_int_equal(dsv4_config_to_json(&cfg, &json), 0);
    assert_non_null(strstr(json, "\"expert_dtype\": \"nvfp4\""));
    assert_int_equal(dsv4_config_parse(&back, json, strlen(json), "config.json"), 0);
    assert_int_equal(back.expert_fmt, DSV4_WFMT_NVFP4);
    free(json);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nvfp4_bit_identical),
        cmocka_unit_test(test_nvfp4_refused),
        cmocka_unit_test(test_nvfp4_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
