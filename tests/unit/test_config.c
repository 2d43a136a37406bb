/*
 * test_config.c - config.json parsing and the layer schedule, on the released Flash and Pro
 * configurations (spec §3.1) and on damaged copies of them; the synthetic Flash-shape config.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <jansson.h>

#include "engine/config.h"
#include "engine/err.h"
#include "engine/schedule.h"
#include "engine/tiny.h"

/* The released config.json of Flash (pro = 0) or Pro (pro = 1), as a jansson object. */
static json_t *release_config(int pro)
{
    int L = pro ? 61 : 43;
    json_t *r = json_pack(
        "{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f,"
        " s:{s:s, s:f, s:i, s:i, s:i}, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:s, s:b,"
        " s:f, s:f, s:i, s:i, s:i, s:f, s:f, s:i, s:i, s:b, s:s, s:{s:s, s:s, s:s, s:s, s:[i,i]},"
        " s:s}",
        "architectures", "DeepseekV4ForCausalLM", "model_type", "deepseek_v4", "vocab_size", 129280,
        "hidden_size", pro ? 7168 : 4096, "num_hidden_layers", L, "num_attention_heads",
        pro ? 128 : 64, "num_key_value_heads", 1, "head_dim", 512, "qk_rope_head_dim", 64,
        "q_lora_rank", pro ? 1536 : 1024, "o_groups", pro ? 16 : 8, "o_lora_rank", 1024,
        "sliding_window", 128, "num_nextn_predict_layers", 1, "rope_theta", 10000.0,
        "compress_rope_theta", 160000.0, "rope_scaling", "type", "yarn", "factor", 16.0,
        "original_max_position_embeddings", 65536, "beta_fast", 32, "beta_slow", 1,
        "max_position_embeddings", 1048576, "index_n_heads", 64, "index_head_dim", 128,
        "index_topk", pro ? 1024 : 512, "n_routed_experts", pro ? 384 : 256, "n_shared_experts",
        1, "num_experts_per_tok", 6, "moe_intermediate_size", pro ? 3072 : 2048, "scoring_func",
        "sqrtsoftplus", "topk_method", "noaux_tc", "norm_topk_prob", 1, "routed_scaling_factor",
        pro ? 2.5 : 1.5, "swiglu_limit", 10.0, "num_hash_layers", 3, "hc_mult", 4,
        "hc_sinkhorn_iters", 20, "hc_eps", 1e-6, "rms_norm_eps", 1e-6, "bos_token_id", 0,
        "eos_token_id", 1, "tie_word_embeddings", 0, "hidden_act", "silu", "quantization_config",
        "activation_scheme", "dynamic", "fmt", "e4m3", "quant_method", "fp8", "scale_fmt",
        "ue8m0", "weight_block_size", 128, 128, "expert_dtype", "fp4");
    json_t *ratios = json_array();
    for (int i = 0; i < L; i++)
        json_array_append_new(ratios, json_integer(i < 2 ? (pro ? 128 : 0) : (i % 2 ? 128 : 4)));
    json_array_append_new(ratios, json_integer(0));
    json_object_set_new(r, "compress_ratios", ratios);
    return r;
}

static int parse(json_t *j, struct dsv4_config *c)
{
    char *txt = json_dumps(j, 0);
    int rc = dsv4_config_parse(c, txt, strlen(txt), "config.json");
    free(txt);
    return rc;
}

static void test_release_configs(void **s)
{
    (void)s;
    for (int pro = 0; pro < 2; pro++) {
        json_t *j = release_config(pro);
        struct dsv4_config c;
        struct dsv4_schedule sc;
        if (parse(j, &c) || dsv4_schedule_build(&sc, &c))
            fail_msg("%s", err_msg());
        assert_int_equal(c.n_layers, pro ? 61 : 43);
        assert_int_equal(c.linear_fmt, DSV4_WFMT_FP8_BLOCK);
        assert_int_equal(c.expert_fmt, DSV4_WFMT_MXFP4);
        assert_int_equal(sc.variant, pro ? DSV4_VARIANT_PRO : DSV4_VARIANT_FLASH);
        int n_swa = 0, n_csa = 0, n_hca = 0;
        for (int i = 0; i < c.n_layers; i++) {
            const struct dsv4_layer_spec *l = &sc.layers[i];
            n_swa += l->attn == DSV4_ATTN_SWA;
            n_csa += l->attn == DSV4_ATTN_CSA;
            n_hca += l->attn == DSV4_ATTN_HCA;
            assert_int_equal(l->router, i < 3 ? DSV4_ROUTER_HASH : DSV4_ROUTER_DENSE);
            assert_int_equal(l->rope, l->attn == DSV4_ATTN_SWA ? DSV4_ROPE_MAIN : DSV4_ROPE_COMPRESS);
        }
        /* spec §4: Flash 2 SWA + 21 CSA + 20 HCA; Pro 0 SWA + 30 CSA + 31 HCA */
        assert_int_equal(n_swa, pro ? 0 : 2);
        assert_int_equal(n_csa, pro ? 30 : 21);
        assert_int_equal(n_hca, pro ? 31 : 20);
        assert_int_equal(sc.layers[c.n_layers - 1].attn, DSV4_ATTN_CSA);
        const struct dsv4_layer_spec *mtp = &sc.layers[c.n_layers];
        assert_true(mtp->is_mtp);
        assert_int_equal(mtp->attn, DSV4_ATTN_SWA);
        assert_int_equal(mtp->router, DSV4_ROUTER_DENSE); /* the MTP layer is never hash */
        json_decref(j);
    }
}

static void expect_error(json_t *j, int want_rc, const char *want_text)
{
    struct dsv4_config c;
    struct dsv4_schedule sc;
    int rc = parse(j, &c);
    if (!rc)
        rc = dsv4_schedule_build(&sc, &c);
    printf("# -> %s\n", err_msg());
    assert_int_equal(rc, want_rc);
    if (!strstr(err_msg(), want_text))
        fail_msg("message \"%s\" does not name \"%s\"", err_msg(), want_text);
    json_decref(j);
}

static void test_missing_keys(void **s)
{
    (void)s;
    static const char *keys[] = {"hidden_size", "num_hidden_layers", "compress_ratios",
                                 "num_hash_layers", "index_topk", "routed_scaling_factor",
                                 "rms_norm_eps", "model_type", "moe_intermediate_size"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        json_t *j = release_config(0);
        json_object_del(j, keys[i]);
        expect_error(j, ERR_CONFIG, keys[i]);
    }
}

static void test_inconsistent(void **s)
{
    (void)s;
    json_t *j = release_config(0);
    json_array_remove(json_object_get(j, "compress_ratios"), 0); /* 43 entries, need 44 */
    expect_error(j, ERR_CONFIG, "compress_ratios has 43 entries");

    j = release_config(0); /* a layer that breaks the Flash pattern */
    json_array_set_new(json_object_get(j, "compress_ratios"), 7, json_integer(4));
    expect_error(j, ERR_CONFIG, "layer 7 is csa");

    j = release_config(1); /* Pro with an SWA layer 1 */
    json_array_set_new(json_object_get(j, "compress_ratios"), 1, json_integer(0));
    expect_error(j, ERR_CONFIG, "layer 1 is swa");

    j = release_config(0); /* MTP layer must be SWA */
    json_array_set_new(json_object_get(j, "compress_ratios"), 43, json_integer(4));
    expect_error(j, ERR_CONFIG, "compress_ratios[43]");

    j = release_config(0);
    json_array_set_new(json_object_get(j, "compress_ratios"), 5, json_integer(16));
    expect_error(j, ERR_CONFIG, "compress_ratios[5]");

    j = release_config(0);
    json_object_set_new(j, "num_experts_per_tok", json_integer(300));
    expect_error(j, ERR_CONFIG, "num_experts_per_tok");

    j = release_config(0);
    json_object_set_new(j, "hidden_size", json_string("4096"));
    expect_error(j, ERR_CONFIG, "hidden_size");

    j = release_config(0);
    json_object_set_new(j, "scoring_func", json_string("sigmoid"));
    expect_error(j, ERR_CONFIG, "scoring_func");

    j = release_config(0);
    json_object_set_new(j, "expert_dtype", json_string("int3"));
    expect_error(j, ERR_CONFIG, "expert_dtype");

    struct dsv4_config c;
    assert_int_equal(dsv4_config_parse(&c, "{\"model_type\": ", 15, "x.json"), ERR_CONFIG);
    assert_non_null(strstr(err_msg(), "x.json: invalid JSON"));
}

/* The tiny configs survive a write/parse round trip and give their documented schedules. */
static void test_tiny_roundtrip(void **s)
{
    (void)s;
    static const char *want[2] = {"swa swa csa hca csa hca swa", "hca hca csa hca csa hca swa"};
    for (int v = 0; v < 2; v++) {
        struct dsv4_config a, b;
        struct dsv4_schedule sc;
        char *txt, got[128] = "";
        dsv4_tiny_config(&a, (enum dsv4_variant)v);
        assert_int_equal(dsv4_config_to_json(&a, &txt), 0);
        if (dsv4_config_parse(&b, txt, strlen(txt), "tiny"))
            fail_msg("%s", err_msg());
        free(txt);
        assert_memory_equal(&a, &b, sizeof a);
        assert_int_equal(dsv4_schedule_build(&sc, &b), 0);
        for (int i = 0; i < b.n_layers + b.n_mtp; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%s", i ? " " : "",
                     dsv4_attn_name(sc.layers[i].attn));
        assert_string_equal(got, want[v]);
    }
}

/*
 * `export-tiny --shape flash --layers N --experts E` writes the released Flash config.json, with
 * num_hidden_layers N, compress_ratios its first N entries + the MTP's, n_routed_experts E and
 * num_hash_layers min(3, N): every other value as released.
 */
static void test_flash_shape_config(void **s)
{
    (void)s;
    static const int layers[] = {43, 8, 4, 2, 1};
    for (size_t k = 0; k < sizeof layers / sizeof layers[0]; k++) {
        const int L = layers[k], E = L == 43 ? 256 : 16;
        json_t *j = release_config(0);
        json_t *ratios = json_object_get(j, "compress_ratios");
        while ((int)json_array_size(ratios) > L + 1)
            json_array_remove(ratios, (size_t)L); /* drop main layers L.., keep the MTP's 0 */
        json_object_set_new(j, "num_hidden_layers", json_integer(L));
        json_object_set_new(j, "num_hash_layers", json_integer(L < 3 ? L : 3));
        json_object_set_new(j, "n_routed_experts", json_integer(E));
        struct dsv4_config want, got;
        struct dsv4_schedule sc;
        if (parse(j, &want))
            fail_msg("%s", err_msg());
        json_decref(j);
        assert_int_equal(dsv4_flash_config(&got, L, E), 0);
        assert_memory_equal(&want, &got, sizeof want);
        assert_int_equal(dsv4_schedule_build(&sc, &got), 0);
    }
    struct dsv4_config c;
    assert_int_equal(dsv4_flash_config(&c, 0, 256), ERR_INVAL);
    assert_non_null(strstr(err_msg(), "0 layers"));
    assert_int_equal(dsv4_flash_config(&c, 44, 256), ERR_INVAL);
    assert_int_equal(dsv4_flash_config(&c, 8, 5), ERR_INVAL);
    assert_non_null(strstr(err_msg(), "5 routed experts"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_release_configs),
        cmocka_unit_test(test_missing_keys),
        cmocka_unit_test(test_inconsistent),
        cmocka_unit_test(test_tiny_roundtrip),
        cmocka_unit_test(test_flash_shape_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
