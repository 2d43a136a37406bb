/*
 * config.c - parse and write the DeepSeek-V4 config.json (see config.h).
 */
#include "engine/config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"

/* ---- typed getters: each names the key on failure ---- */

static int get_int(json_t *root, const char *label, const char *key, int required, int dflt,
                   long lo, long hi, int *out)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required)
            return err_setf(ERR_CONFIG, "%s: missing key \"%s\"", label, key);
        *out = dflt;
        return 0;
    }
    if (!json_is_integer(v))
        return err_setf(ERR_CONFIG, "%s: key \"%s\" must be an integer", label, key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return err_setf(ERR_CONFIG, "%s: key \"%s\" = %lld out of range [%ld, %ld]", label, key,
                        (long long)x, lo, hi);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *root, const char *label, const char *key, int required, double dflt,
                   double lo, double hi, double *out)
{
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) {
        if (required)
            return err_setf(ERR_CONFIG, "%s: missing key \"%s\"", label, key);
        *out = dflt;
        return 0;
    }
    if (!json_is_number(v))
        return err_setf(ERR_CONFIG, "%s: key \"%s\" must be a number", label, key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return err_setf(ERR_CONFIG, "%s: key \"%s\" = %g out of range [%g, %g]", label, key, x, lo,
                        hi);
    *out = x;
    return 0;
}

static const char *get_str(json_t *root, const char *key)
{
    json_t *v = json_object_get(root, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* ---- sections ---- */

static int parse_rope_scaling(struct dsv4_config *c, json_t *root, const char *label)
{
    json_t *rs = json_object_get(root, "rope_scaling");
    c->yarn = 0;
    if (!rs || json_is_null(rs))
        return 0;
    if (!json_is_object(rs))
        return err_setf(ERR_CONFIG, "%s: key \"rope_scaling\" must be an object", label);
    const char *type = get_str(rs, "type");
    if (!type)
        type = get_str(rs, "rope_type");
    if (!type)
        return err_setf(ERR_CONFIG, "%s: missing key \"rope_scaling.type\"", label);
    if (strcmp(type, "yarn") != 0)
        return err_setf(ERR_CONFIG, "%s: rope_scaling.type \"%s\" unsupported (expected \"yarn\")",
                        label, type);
    c->yarn = 1;
    int rc = get_num(rs, label, "factor", 1, 0, 1.0, 1e6, &c->yarn_factor);
    if (!rc)
        rc = get_int(rs, label, "original_max_position_embeddings", 1, 0, 1, 1L << 30,
                     &c->yarn_original_max_pos);
    if (!rc)
        rc = get_num(rs, label, "beta_fast", 0, 32, 0, 1e6, &c->yarn_beta_fast);
    if (!rc)
        rc = get_num(rs, label, "beta_slow", 0, 1, 0, 1e6, &c->yarn_beta_slow);
    if (rc)
        return err_prefix(rc, "rope_scaling");
    return 0;
}

static int parse_quant(struct dsv4_config *c, json_t *root, const char *label)
{
    json_t *q = json_object_get(root, "quantization_config");
    c->linear_fmt = DSV4_WFMT_BF16;
    if (q && !json_is_null(q)) {
        if (!json_is_object(q))
            return err_setf(ERR_CONFIG, "%s: key \"quantization_config\" must be an object", label);
        const char *method = get_str(q, "quant_method");
        if (!method || strcmp(method, "fp8") != 0)
            return err_setf(
                ERR_CONFIG,
                "%s: quantization_config.quant_method \"%s\" unsupported (expected \"fp8\")", label,
                method ? method : "(missing)");
        const char *fmt = get_str(q, "fmt");
        if (fmt && strcmp(fmt, "e4m3") != 0)
            return err_setf(ERR_CONFIG, "%s: quantization_config.fmt \"%s\" unsupported", label,
                            fmt);
        json_t *bs = json_object_get(q, "weight_block_size");
        if (!json_is_array(bs) || json_array_size(bs) != 2 ||
            json_integer_value(json_array_get(bs, 0)) != 128 ||
            json_integer_value(json_array_get(bs, 1)) != 128)
            return err_setf(ERR_CONFIG,
                            "%s: quantization_config.weight_block_size must be [128, 128]", label);
        c->linear_fmt = DSV4_WFMT_FP8_BLOCK;
    }
    const char *ed = get_str(root, "expert_dtype");
    if (!ed && q && json_is_object(q))
        ed = get_str(q, "expert_dtype");
    if (!ed)
        c->expert_fmt = c->linear_fmt;
    else if (!strcmp(ed, "fp4"))
        c->expert_fmt = DSV4_WFMT_MXFP4;
    else if (!strcmp(ed, "nvfp4"))
        c->expert_fmt = DSV4_WFMT_NVFP4;
    else if (!strcmp(ed, "fp8"))
        c->expert_fmt = DSV4_WFMT_FP8_BLOCK;
    else if (!strcmp(ed, "bf16"))
        c->expert_fmt = DSV4_WFMT_BF16;
    else
        return err_setf(ERR_CONFIG, "%s: expert_dtype \"%s\" unsupported (fp4, nvfp4, fp8, bf16)",
                        label, ed);
    return 0;
}

static int parse_ratios(struct dsv4_config *c, json_t *root, const char *label)
{
    json_t *a = json_object_get(root, "compress_ratios");
    int n = c->n_layers + c->n_mtp;
    if (!a)
        return err_setf(ERR_CONFIG, "%s: missing key \"compress_ratios\"", label);
    if (!json_is_array(a))
        return err_setf(ERR_CONFIG, "%s: key \"compress_ratios\" must be an array", label);
    if ((int)json_array_size(a) != n)
        return err_setf(ERR_CONFIG,
                        "%s: compress_ratios has %zu entries, expected num_hidden_layers (%d) + "
                        "num_nextn_predict_layers (%d) = %d",
                        label, json_array_size(a), c->n_layers, c->n_mtp, n);
    for (int i = 0; i < n; i++) {
        json_t *v = json_array_get(a, (size_t)i);
        json_int_t r = json_is_integer(v) ? json_integer_value(v) : -1;
        if (r != 0 && r != 4 && r != 128)
            return err_setf(ERR_CONFIG, "%s: compress_ratios[%d] must be 0, 4 or 128", label, i);
        c->compress_ratios[i] = (int)r;
    }
    return 0;
}

int dsv4_config_parse(struct dsv4_config *c, const char *text, size_t len, const char *label)
{
    json_error_t jerr;
    int rc = 0;
    memset(c, 0, sizeof *c);
    json_t *root = json_loadb(text, len, 0, &jerr);
    if (!root)
        return err_setf(ERR_CONFIG, "%s: invalid JSON at line %d: %s", label, jerr.line, jerr.text);
    if (!json_is_object(root)) {
        rc = err_setf(ERR_CONFIG, "%s: top level must be a JSON object", label);
        goto out;
    }
    const char *mt = get_str(root, "model_type");
    if (!mt || strcmp(mt, "deepseek_v4") != 0) {
        rc = err_setf(ERR_CONFIG, "%s: key \"model_type\" must be \"deepseek_v4\" (found %s%s%s)",
                      label, mt ? "\"" : "", mt ? mt : "none", mt ? "\"" : "");
        goto out;
    }
    /* clang-format off */
    struct { const char *key; int *dst; int required; int dflt; long lo, hi; } ints[] = {
        {"vocab_size", &c->vocab_size, 1, 0, 1, 1L << 24},
        {"hidden_size", &c->hidden_size, 1, 0, 1, 1L << 16},
        {"num_hidden_layers", &c->n_layers, 1, 0, 1, DSV4_MAX_LAYERS - 8},
        {"num_nextn_predict_layers", &c->n_mtp, 0, 0, 0, 4},
        {"num_attention_heads", &c->n_heads, 1, 0, 1, 1024},
        {"head_dim", &c->head_dim, 1, 0, 1, 4096},
        {"qk_rope_head_dim", &c->rope_dim, 1, 0, 2, 4096},
        {"q_lora_rank", &c->q_lora_rank, 1, 0, 1, 1L << 16},
        {"o_groups", &c->o_groups, 1, 0, 1, 1024},
        {"o_lora_rank", &c->o_lora_rank, 1, 0, 1, 1L << 16},
        {"sliding_window", &c->sliding_window, 1, 0, 1, 1L << 20},
        {"index_n_heads", &c->index_n_heads, 1, 0, 1, 1024},
        {"index_head_dim", &c->index_head_dim, 1, 0, 1, 4096},
        {"index_topk", &c->index_topk, 1, 0, 1, 1L << 20},
        {"n_routed_experts", &c->n_routed_experts, 1, 0, 1, 4096},
        {"n_shared_experts", &c->n_shared_experts, 1, 0, 0, 1},
        {"num_experts_per_tok", &c->n_experts_per_tok, 1, 0, 1, 64},
        {"moe_intermediate_size", &c->moe_inter, 1, 0, 1, 1L << 20},
        {"num_hash_layers", &c->n_hash_layers, 1, 0, 0, DSV4_MAX_LAYERS},
        {"hc_mult", &c->hc_mult, 1, 0, 1, 16},
        {"hc_sinkhorn_iters", &c->hc_sinkhorn_iters, 1, 0, 1, 1000},
        {"bos_token_id", &c->bos_token_id, 0, 0, 0, 1L << 24},
        {"eos_token_id", &c->eos_token_id, 0, 1, 0, 1L << 24},
    };
    struct { const char *key; double *dst; int required; double dflt, lo, hi; } nums[] = {
        {"rope_theta", &c->rope_theta, 1, 0, 1, 1e12},
        {"compress_rope_theta", &c->compress_rope_theta, 1, 0, 1, 1e12},
        {"routed_scaling_factor", &c->routed_scaling_factor, 1, 0, 0, 1e6},
        {"swiglu_limit", &c->swiglu_limit, 1, 0, 0, 1e9},
        {"hc_eps", &c->hc_eps, 0, 1e-6, 0, 1},
        {"rms_norm_eps", &c->rms_norm_eps, 1, 0, 0, 1},
    };
    /* clang-format on */
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !rc; i++)
        rc = get_int(root, label, ints[i].key, ints[i].required, ints[i].dflt, ints[i].lo,
                     ints[i].hi, ints[i].dst);
    for (size_t i = 0; i < sizeof nums / sizeof nums[0] && !rc; i++)
        rc = get_num(root, label, nums[i].key, nums[i].required, nums[i].dflt, nums[i].lo,
                     nums[i].hi, nums[i].dst);
    if (rc)
        goto out;
    {
        double mpe = 0;
        rc = get_num(root, label, "max_position_embeddings", 1, 0, 1, 1e12, &mpe);
        if (rc)
            goto out;
        c->max_position_embeddings = (long)mpe;
    }
    if ((rc = parse_rope_scaling(c, root, label)) || (rc = parse_quant(c, root, label)) ||
        (rc = parse_ratios(c, root, label)))
        goto out;

    /* ---- fixed choices of the architecture that this engine implements ---- */
    const char *sf = get_str(root, "scoring_func");
    if (!sf || strcmp(sf, "sqrtsoftplus") != 0) {
        rc = err_setf(ERR_CONFIG, "%s: key \"scoring_func\" must be \"sqrtsoftplus\"", label);
        goto out;
    }
    json_t *ntp = json_object_get(root, "norm_topk_prob");
    if (ntp && !json_is_true(ntp)) {
        rc = err_setf(ERR_CONFIG, "%s: key \"norm_topk_prob\" must be true", label);
        goto out;
    }
    json_t *kvh = json_object_get(root, "num_key_value_heads");
    if (kvh && json_integer_value(kvh) != 1) {
        rc = err_setf(ERR_CONFIG, "%s: key \"num_key_value_heads\" must be 1 (shared-KV MQA)",
                      label);
        goto out;
    }
    json_t *tie = json_object_get(root, "tie_word_embeddings");
    if (tie && json_is_true(tie)) {
        rc = err_setf(ERR_CONFIG, "%s: key \"tie_word_embeddings\" must be false", label);
        goto out;
    }

    /* ---- consistency ---- */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            rc = err_setf(ERR_CONFIG, __VA_ARGS__);                                                \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)
    CHECK(c->rope_dim % 2 == 0 && c->rope_dim <= c->head_dim && c->rope_dim <= c->index_head_dim,
          "%s: qk_rope_head_dim (%d) must be even and <= head_dim and index_head_dim", label,
          c->rope_dim);
    CHECK(c->n_heads % c->o_groups == 0,
          "%s: num_attention_heads (%d) must be a multiple of o_groups (%d)", label, c->n_heads,
          c->o_groups);
    CHECK(c->n_experts_per_tok <= c->n_routed_experts,
          "%s: num_experts_per_tok (%d) exceeds n_routed_experts (%d)", label, c->n_experts_per_tok,
          c->n_routed_experts);
    CHECK(c->n_hash_layers <= c->n_layers,
          "%s: num_hash_layers (%d) exceeds num_hidden_layers (%d)", label, c->n_hash_layers,
          c->n_layers);
    CHECK(c->eos_token_id < c->vocab_size && c->bos_token_id < c->vocab_size,
          "%s: bos_token_id/eos_token_id must be < vocab_size", label);
    CHECK(c->linear_fmt != DSV4_WFMT_FP8_BLOCK || (c->head_dim - c->rope_dim) % 64 == 0,
          "%s: head_dim - qk_rope_head_dim must be a multiple of 64 (FP8 KV blocks)", label);
    CHECK(c->expert_fmt != DSV4_WFMT_MXFP4 || (c->hidden_size % 32 == 0 && c->moe_inter % 32 == 0),
          "%s: hidden_size and moe_intermediate_size must be multiples of 32 for fp4 experts",
          label);
    CHECK(c->expert_fmt != DSV4_WFMT_NVFP4 || (c->hidden_size % 16 == 0 && c->moe_inter % 16 == 0),
          "%s: hidden_size and moe_intermediate_size must be multiples of 16 for nvfp4 experts",
          label);
    CHECK(c->index_head_dim % 32 == 0 && (c->index_head_dim & (c->index_head_dim - 1)) == 0,
          "%s: index_head_dim (%d) must be a power of two >= 32 (Hadamard, FP4 blocks)", label,
          c->index_head_dim);
    for (int i = c->n_layers; i < c->n_layers + c->n_mtp; i++)
        CHECK(c->compress_ratios[i] == 0, "%s: compress_ratios[%d] (MTP layer) must be 0", label,
              i);
#undef CHECK
out:
    json_decref(root);
    return rc;
}

int dsv4_config_load_dir(struct dsv4_config *cfg, const char *dir)
{
    char path[4096];
    int rc;
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_setf(ERR_IO, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 65536;
            if (cap > (16u << 20)) {
                rc = err_setf(ERR_CONFIG, "%s: larger than 16 MiB", path);
                goto out;
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                rc = err_setf(ERR_NOMEM, "%s: out of memory", path);
                goto out;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        rc = err_setf(ERR_IO, "%s: read error", path);
        goto out;
    }
    rc = dsv4_config_parse(cfg, buf, n, path);
out:
    free(buf);
    fclose(f);
    return rc;
}

int dsv4_config_to_json(const struct dsv4_config *c, char **out)
{
    json_t *r = json_object();
    json_t *ratios = json_array();
    if (!r || !ratios) {
        json_decref(r);
        json_decref(ratios);
        return err_setf(ERR_NOMEM, "config: out of memory");
    }
    json_object_set_new(r, "architectures", json_pack("[s]", "DeepseekV4ForCausalLM"));
    json_object_set_new(r, "model_type", json_string("deepseek_v4"));
    json_object_set_new(r, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(r, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(r, "num_hidden_layers", json_integer(c->n_layers));
    json_object_set_new(r, "num_nextn_predict_layers", json_integer(c->n_mtp));
    json_object_set_new(r, "num_attention_heads", json_integer(c->n_heads));
    json_object_set_new(r, "num_key_value_heads", json_integer(1));
    json_object_set_new(r, "head_dim", json_integer(c->head_dim));
    json_object_set_new(r, "qk_rope_head_dim", json_integer(c->rope_dim));
    json_object_set_new(r, "q_lora_rank", json_integer(c->q_lora_rank));
    json_object_set_new(r, "o_groups", json_integer(c->o_groups));
    json_object_set_new(r, "o_lora_rank", json_integer(c->o_lora_rank));
    json_object_set_new(r, "sliding_window", json_integer(c->sliding_window));
    for (int i = 0; i < c->n_layers + c->n_mtp; i++)
        json_array_append_new(ratios, json_integer(c->compress_ratios[i]));
    json_object_set_new(r, "compress_ratios", ratios);
    json_object_set_new(r, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(r, "compress_rope_theta", json_real(c->compress_rope_theta));
    if (c->yarn)
        json_object_set_new(r, "rope_scaling",
                            json_pack("{s:s, s:f, s:i, s:f, s:f}", "type", "yarn", "factor",
                                      c->yarn_factor, "original_max_position_embeddings",
                                      c->yarn_original_max_pos, "beta_fast", c->yarn_beta_fast,
                                      "beta_slow", c->yarn_beta_slow));
    json_object_set_new(r, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(r, "index_n_heads", json_integer(c->index_n_heads));
    json_object_set_new(r, "index_head_dim", json_integer(c->index_head_dim));
    json_object_set_new(r, "index_topk", json_integer(c->index_topk));
    json_object_set_new(r, "n_routed_experts", json_integer(c->n_routed_experts));
    json_object_set_new(r, "n_shared_experts", json_integer(c->n_shared_experts));
    json_object_set_new(r, "num_experts_per_tok", json_integer(c->n_experts_per_tok));
    json_object_set_new(r, "moe_intermediate_size", json_integer(c->moe_inter));
    json_object_set_new(r, "scoring_func", json_string("sqrtsoftplus"));
    json_object_set_new(r, "topk_method", json_string("noaux_tc"));
    json_object_set_new(r, "norm_topk_prob", json_true());
    json_object_set_new(r, "routed_scaling_factor", json_real(c->routed_scaling_factor));
    json_object_set_new(r, "swiglu_limit", json_real(c->swiglu_limit));
    json_object_set_new(r, "num_hash_layers", json_integer(c->n_hash_layers));
    json_object_set_new(r, "hc_mult", json_integer(c->hc_mult));
    json_object_set_new(r, "hc_sinkhorn_iters", json_integer(c->hc_sinkhorn_iters));
    json_object_set_new(r, "hc_eps", json_real(c->hc_eps));
    json_object_set_new(r, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(r, "bos_token_id", json_integer(c->bos_token_id));
    json_object_set_new(r, "eos_token_id", json_integer(c->eos_token_id));
    json_object_set_new(r, "tie_word_embeddings", json_false());
    json_object_set_new(r, "hidden_act", json_string("silu"));
    json_object_set_new(r, "torch_dtype", json_string("bfloat16"));
    if (c->linear_fmt == DSV4_WFMT_FP8_BLOCK)
        json_object_set_new(r, "quantization_config",
                            json_pack("{s:s, s:s, s:s, s:s, s:[i,i]}", "activation_scheme",
                                      "dynamic", "fmt", "e4m3", "quant_method", "fp8", "scale_fmt",
                                      "ue8m0", "weight_block_size", 128, 128));
    const char *ed = c->expert_fmt == DSV4_WFMT_MXFP4       ? "fp4"
                     : c->expert_fmt == DSV4_WFMT_NVFP4     ? "nvfp4"
                     : c->expert_fmt == DSV4_WFMT_FP8_BLOCK ? "fp8"
                                                            : "bf16";
    json_object_set_new(r, "expert_dtype", json_string(ed));
    *out = json_dumps(r, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(r);
    if (!*out)
        return err_setf(ERR_NOMEM, "config: out of memory");
    return 0;
}
