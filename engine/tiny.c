/*
 * tiny.c - generate the built-in tiny DSV4 checkpoints (see tiny.h).
 *
 * Every tensor is drawn from its own deterministic stream (splitmix64 seeded by a fixed seed and
 * the tensor's name), so a tensor's values do not depend on generation order. Float weights are
 * drawn first and then stored the way the official checkpoint stores them (FP8 E4M3 with UE8M0
 * 128x128 block scales, MXFP4 with a UE8M0 scale per 32), so the model's true weights are the
 * dequantised values.
 */
#include "engine/tiny.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/err.h"
#include "kernels/cpu/cpu.h"

#define TINY_SEED 0x44535634ull /* "DSV4" */

/* ---- deterministic random streams ---- */

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-a, a) */
static float rng_sym(struct rng *r, float a)
{
    return ((float)(rng_next(r) >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a;
}

static struct rng rng_for(const char *name)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ull;
    struct rng r = {TINY_SEED ^ h};
    rng_next(&r);
    return r;
}

/* ---- the tensor list ---- */

struct tlist {
    struct st_write_tensor *t;
    char **names;
    void **bufs;
    int n, cap;
};

static void tlist_free(struct tlist *l)
{
    for (int i = 0; i < l->n; i++) {
        free(l->names[i]);
        free(l->bufs[i]);
    }
    free(l->t);
    free(l->names);
    free(l->bufs);
    memset(l, 0, sizeof *l);
}

/* Append a tensor; takes ownership of buf (freed on failure too). */
static int tlist_add(struct tlist *l, const char *name, enum st_dtype dt, int ndim,
                     const int64_t *shape, void *buf)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 512;
        struct st_write_tensor *t = realloc(l->t, sizeof *t * (size_t)cap);
        if (t)
            l->t = t;
        char **nm = t ? realloc(l->names, sizeof *nm * (size_t)cap) : NULL;
        if (nm)
            l->names = nm;
        void **b = nm ? realloc(l->bufs, sizeof *b * (size_t)cap) : NULL;
        if (!b) {
            free(buf);
            return err_setf(ERR_NOMEM, "tiny: out of memory");
        }
        l->bufs = b;
        l->cap = cap;
    }
    char *nm = strdup(name);
    if (!nm || !buf) {
        free(nm);
        free(buf);
        return err_setf(ERR_NOMEM, "tiny: out of memory for %s", name);
    }
    struct st_write_tensor *t = &l->t[l->n];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = dt;
    t->ndim = ndim;
    memcpy(t->shape, shape, sizeof(int64_t) * (size_t)ndim);
    t->data = buf;
    l->names[l->n] = nm;
    l->bufs[l->n] = buf;
    l->n++;
    return 0;
}

static uint8_t e8m0_of(float pow2)
{
    int e;
    frexpf(pow2, &e); /* pow2 = 0.5 * 2^e */
    return (uint8_t)(e - 1 + 127);
}

/* Draw a (rows, cols) float matrix, uniform +-a with a random power-of-two factor per 32x32
 * tile (so block scales differ), into a malloc'd buffer. */
static float *draw_matrix(const char *name, int rows, int cols, float a)
{
    float *w = malloc(sizeof(float) * (size_t)rows * (size_t)cols);
    if (!w)
        return NULL;
    struct rng r = rng_for(name);
    int tr = (rows + 31) / 32, tc = (cols + 31) / 32;
    float *f = malloc(sizeof(float) * (size_t)tr * (size_t)tc);
    if (!f) {
        free(w);
        return NULL;
    }
    for (int i = 0; i < tr * tc; i++)
        f[i] = ldexpf(1.0f, (int)(rng_next(&r) % 3) - 1); /* 0.5, 1, 2 */
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            w[(size_t)i * cols + j] = rng_sym(&r, a) * f[(i / 32) * tc + j / 32];
    free(f);
    return w;
}

/* Add `<prefix>.weight` (+ `.scale`) stored as fmt. */
static int add_linear(struct tlist *l, const char *prefix, int rows, int cols, enum dsv4_wfmt fmt)
{
    char wn[320], sn[320];
    snprintf(wn, sizeof wn, "%s.weight", prefix);
    snprintf(sn, sizeof sn, "%s.scale", prefix);
    float *w = draw_matrix(wn, rows, cols, sqrtf(3.0f / (float)cols));
    int rc;
    if (!w)
        return err_setf(ERR_NOMEM, "tiny: out of memory for %s", wn);
    if (fmt == DSV4_WFMT_BF16) {
        uint16_t *q = malloc(2 * (size_t)rows * (size_t)cols);
        for (size_t i = 0; q && i < (size_t)rows * cols; i++)
            q[i] = cpu_f32_to_bf16(w[i]);
        int64_t sh[2] = {rows, cols};
        rc = tlist_add(l, wn, ST_BF16, 2, sh, q);
    } else if (fmt == DSV4_WFMT_FP8_BLOCK) {
        int br = (rows + 127) / 128, bc = (cols + 127) / 128;
        uint8_t *q = malloc((size_t)rows * (size_t)cols);
        uint8_t *s = malloc((size_t)br * (size_t)bc);
        for (int bi = 0; q && s && bi < br; bi++)
            for (int bj = 0; bj < bc; bj++) {
                float amax = 1e-30f;
                for (int i = bi * 128; i < rows && i < (bi + 1) * 128; i++)
                    for (int j = bj * 128; j < cols && j < (bj + 1) * 128; j++)
                        amax = fmaxf(amax, fabsf(w[(size_t)i * cols + j]));
                float sc = cpu_pow2_scale(amax, 448.0f);
                s[bi * bc + bj] = e8m0_of(sc);
                for (int i = bi * 128; i < rows && i < (bi + 1) * 128; i++)
                    for (int j = bj * 128; j < cols && j < (bj + 1) * 128; j++)
                        q[(size_t)i * cols + j] = cpu_f32_to_e4m3(w[(size_t)i * cols + j] / sc);
            }
        int64_t sh[2] = {rows, cols}, ssh[2] = {br, bc};
        rc = tlist_add(l, wn, ST_F8_E4M3, 2, sh, q);
        if (!rc)
            rc = tlist_add(l, sn, ST_F8_E8M0, 2, ssh, s);
        else
            free(s);
    } else {
        uint8_t *q = malloc((size_t)rows * (size_t)cols / 2);
        uint8_t *s = malloc((size_t)rows * (size_t)cols / 32);
        for (int i = 0; q && s && i < rows; i++)
            for (int g = 0; g < cols / 32; g++) {
                const float *x = w + (size_t)i * cols + g * 32;
                float amax = 1e-30f;
                for (int j = 0; j < 32; j++)
                    amax = fmaxf(amax, fabsf(x[j]));
                float sc = cpu_pow2_scale(amax, 6.0f);
                s[(size_t)i * (cols / 32) + g] = e8m0_of(sc);
                for (int j = 0; j < 16; j++) {
                    uint8_t lo = cpu_f32_to_e2m1(x[2 * j] / sc);
                    uint8_t hi = cpu_f32_to_e2m1(x[2 * j + 1] / sc);
                    q[(size_t)i * (cols / 2) + g * 16 + j] = (uint8_t)(lo | (hi << 4));
                }
            }
        int64_t sh[2] = {rows, cols / 2}, ssh[2] = {rows, cols / 32};
        rc = tlist_add(l, wn, ST_I8, 2, sh, q);
        if (!rc)
            rc = tlist_add(l, sn, ST_F8_E8M0, 2, ssh, s);
        else
            free(s);
    }
    free(w);
    return rc;
}

/* A float tensor of n elements, uniform in center +- a, stored as BF16 or F32. */
static int add_vec(struct tlist *l, const char *name, int ndim, const int64_t *shape, float center,
                   float a, enum st_dtype dt)
{
    size_t n = 1;
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    struct rng r = rng_for(name);
    void *buf = malloc(n * (dt == ST_BF16 ? 2 : 4));
    for (size_t i = 0; buf && i < n; i++) {
        float v = center + rng_sym(&r, a);
        if (dt == ST_BF16)
            ((uint16_t *)buf)[i] = cpu_f32_to_bf16(v);
        else
            ((float *)buf)[i] = v;
    }
    return tlist_add(l, name, dt, ndim, shape, buf);
}

static int add_hc(struct tlist *l, const struct dsv4_config *c, const char *p, const char *which,
                  int head)
{
    char n[256];
    int nmix = head ? c->hc_mult : (2 + c->hc_mult) * c->hc_mult;
    int64_t fsh[2] = {nmix, (int64_t)c->hc_mult * c->hidden_size}, bsh[1] = {nmix},
            ssh[1] = {head ? 1 : 3};
    int rc;
    snprintf(n, sizeof n, "%s%s_fn", p, which);
    if ((rc = add_vec(l, n, 2, fsh, 0.0f, 0.05f, ST_F32)))
        return rc;
    snprintf(n, sizeof n, "%s%s_base", p, which);
    if ((rc = add_vec(l, n, 1, bsh, 0.0f, 0.5f, ST_F32)))
        return rc;
    snprintf(n, sizeof n, "%s%s_scale", p, which);
    return add_vec(l, n, 1, ssh, 1.0f, 0.5f, ST_F32);
}

static int add_compressor(struct tlist *l, const struct dsv4_config *c, const char *p, int ratio,
                          int D)
{
    char n[256];
    int width = (ratio == 4 ? 2 : 1) * D, rc;
    snprintf(n, sizeof n, "%s.wkv", p);
    if ((rc = add_linear(l, n, width, c->hidden_size, DSV4_WFMT_BF16)))
        return rc;
    snprintf(n, sizeof n, "%s.wgate", p);
    if ((rc = add_linear(l, n, width, c->hidden_size, DSV4_WFMT_BF16)))
        return rc;
    int64_t ash[2] = {ratio, width}, nsh[1] = {D};
    snprintf(n, sizeof n, "%s.ape", p);
    if ((rc = add_vec(l, n, 2, ash, 0.0f, 0.5f, ST_F32)))
        return rc;
    snprintf(n, sizeof n, "%s.norm.weight", p);
    return add_vec(l, n, 1, nsh, 1.0f, 0.2f, ST_BF16);
}

static int add_layer(struct tlist *l, const struct dsv4_config *c, const struct dsv4_layer_spec *s,
                     const char *p)
{
    const int d = c->hidden_size, H = c->n_heads, hd = c->head_dim, E = c->n_routed_experts;
    const int I = c->moe_inter, K = c->n_experts_per_tok;
    char n[256];
    int rc;
    int64_t dsh[1] = {d};
#define NAME(...) snprintf(n, sizeof n, __VA_ARGS__)
#define TRY(x)                                                                                     \
    do {                                                                                           \
        if ((rc = (x)))                                                                            \
            return rc;                                                                             \
    } while (0)
    NAME("%sattn_norm.weight", p); TRY(add_vec(l, n, 1, dsh, 1.0f, 0.2f, ST_BF16));
    NAME("%sffn_norm.weight", p); TRY(add_vec(l, n, 1, dsh, 1.0f, 0.2f, ST_BF16));
    TRY(add_hc(l, c, p, "hc_attn", 0));
    TRY(add_hc(l, c, p, "hc_ffn", 0));
    NAME("%sattn.wq_a", p); TRY(add_linear(l, n, c->q_lora_rank, d, c->linear_fmt));
    int64_t qsh[1] = {c->q_lora_rank}, csh[1] = {hd}, hsh[1] = {H}, esh[1] = {E};
    NAME("%sattn.q_norm.weight", p); TRY(add_vec(l, n, 1, qsh, 1.0f, 0.2f, ST_BF16));
    NAME("%sattn.wq_b", p); TRY(add_linear(l, n, H * hd, c->q_lora_rank, c->linear_fmt));
    NAME("%sattn.wkv", p); TRY(add_linear(l, n, hd, d, c->linear_fmt));
    NAME("%sattn.kv_norm.weight", p); TRY(add_vec(l, n, 1, csh, 1.0f, 0.2f, ST_BF16));
    NAME("%sattn.wo_a", p);
        TRY(add_linear(l, n, c->o_groups * c->o_lora_rank, H * hd / c->o_groups, c->linear_fmt));
    NAME("%sattn.wo_b", p); TRY(add_linear(l, n, d, c->o_groups * c->o_lora_rank, c->linear_fmt));
    NAME("%sattn.attn_sink", p); TRY(add_vec(l, n, 1, hsh, 0.0f, 1.0f, ST_F32));
    if (s->ratio) {
        NAME("%sattn.compressor", p); TRY(add_compressor(l, c, n, s->ratio, hd));
    }
    if (s->attn == DSV4_ATTN_CSA) {
        NAME("%sattn.indexer.compressor", p);
            TRY(add_compressor(l, c, n, s->ratio, c->index_head_dim));
        NAME("%sattn.indexer.wq_b", p);
            TRY(add_linear(l, n, c->index_n_heads * c->index_head_dim, c->q_lora_rank,
                           c->linear_fmt));
        NAME("%sattn.indexer.weights_proj", p);
            TRY(add_linear(l, n, c->index_n_heads, d, DSV4_WFMT_BF16));
    }
    NAME("%sffn.gate", p); TRY(add_linear(l, n, E, d, DSV4_WFMT_BF16));
    if (s->router == DSV4_ROUTER_HASH) {
        NAME("%sffn.gate.tid2eid", p);
        int64_t *t = malloc(sizeof(int64_t) * (size_t)c->vocab_size * (size_t)K);
        int perm[4096];
        struct rng r = rng_for(n);
        for (int v = 0; t && v < c->vocab_size; v++) {
            for (int e = 0; e < E; e++)
                perm[e] = e;
            for (int j = 0; j < K; j++) { /* partial Fisher-Yates: K distinct experts */
                int k = j + (int)(rng_next(&r) % (uint64_t)(E - j));
                int tmp = perm[j];
                perm[j] = perm[k];
                perm[k] = tmp;
                t[(size_t)v * K + j] = perm[j];
            }
        }
        int64_t sh[2] = {c->vocab_size, K};
        TRY(tlist_add(l, n, ST_I64, 2, sh, t));
    } else {
        NAME("%sffn.gate.bias", p); TRY(add_vec(l, n, 1, esh, 0.0f, 0.1f, ST_F32));
    }
    for (int e = 0; e < E; e++) {
        NAME("%sffn.experts.%d.w1", p, e); TRY(add_linear(l, n, I, d, c->expert_fmt));
        NAME("%sffn.experts.%d.w2", p, e); TRY(add_linear(l, n, d, I, c->expert_fmt));
        NAME("%sffn.experts.%d.w3", p, e); TRY(add_linear(l, n, I, d, c->expert_fmt));
    }
    NAME("%sffn.shared_experts.w1", p); TRY(add_linear(l, n, I, d, c->linear_fmt));
    NAME("%sffn.shared_experts.w2", p); TRY(add_linear(l, n, d, I, c->linear_fmt));
    NAME("%sffn.shared_experts.w3", p); TRY(add_linear(l, n, I, d, c->linear_fmt));
    if (s->is_mtp) {
        NAME("%se_proj", p); TRY(add_linear(l, n, d, d, c->linear_fmt));
        NAME("%sh_proj", p); TRY(add_linear(l, n, d, d, c->linear_fmt));
        NAME("%senorm.weight", p); TRY(add_vec(l, n, 1, dsh, 1.0f, 0.2f, ST_BF16));
        NAME("%shnorm.weight", p); TRY(add_vec(l, n, 1, dsh, 1.0f, 0.2f, ST_BF16));
        NAME("%snorm.weight", p); TRY(add_vec(l, n, 1, dsh, 1.0f, 0.2f, ST_BF16));
        TRY(add_hc(l, c, p, "hc_head", 1));
    }
#undef NAME
#undef TRY
    return 0;
}

void dsv4_tiny_config(struct dsv4_config *c, enum dsv4_variant v)
{
    static const int flash_ratios[] = {0, 0, 4, 128, 4, 128, 0};
    static const int pro_ratios[] = {128, 128, 4, 128, 4, 128, 0};
    const int pro = v == DSV4_VARIANT_PRO;
    memset(c, 0, sizeof *c);
    c->vocab_size = 129280;
    c->hidden_size = pro ? 384 : 256;
    c->n_layers = 6;
    c->n_mtp = 1;
    c->n_heads = pro ? 8 : 4;
    c->head_dim = 512;
    c->rope_dim = 64;
    c->q_lora_rank = pro ? 192 : 128; /* pro: a partial 128-block in FP8 scales */
    c->o_groups = pro ? 4 : 2;
    c->o_lora_rank = 128;
    c->sliding_window = 128;
    memcpy(c->compress_ratios, pro ? pro_ratios : flash_ratios, sizeof flash_ratios);
    c->rope_theta = 10000;
    c->compress_rope_theta = 160000;
    c->yarn = 1;
    c->yarn_factor = 16;
    c->yarn_original_max_pos = 65536;
    c->yarn_beta_fast = 32;
    c->yarn_beta_slow = 1;
    c->max_position_embeddings = 1048576;
    c->index_n_heads = 16;
    c->index_head_dim = 128;
    c->index_topk = pro ? 12 : 8;
    c->n_routed_experts = pro ? 24 : 16;
    c->n_shared_experts = 1;
    c->n_experts_per_tok = 6;
    c->moe_inter = 128;
    c->routed_scaling_factor = pro ? 2.5 : 1.5;
    c->swiglu_limit = 10.0;
    c->n_hash_layers = 3;
    c->hc_mult = 4;
    c->hc_sinkhorn_iters = 20;
    c->hc_eps = 1e-6;
    c->rms_norm_eps = 1e-6;
    c->bos_token_id = 0;
    c->eos_token_id = 1;
    c->linear_fmt = DSV4_WFMT_FP8_BLOCK;
    c->expert_fmt = DSV4_WFMT_MXFP4;
}

/* All tensors; those of shard 1 (embed, head, final norm, hc_head) come first: *n_first. */
static int tiny_tensors(const struct dsv4_config *c, struct tlist *l, int *n_first)
{
    struct dsv4_schedule s;
    int64_t dsh[1] = {c->hidden_size};
    int rc;
    memset(l, 0, sizeof *l);
    if ((rc = dsv4_schedule_build(&s, c)))
        return rc;
    if ((rc = add_vec(l, "embed.weight", 2, (int64_t[]){c->vocab_size, c->hidden_size}, 0.0f, 1.0f,
                      ST_BF16)) ||
        (rc = add_linear(l, "head", c->vocab_size, c->hidden_size, DSV4_WFMT_BF16)) ||
        (rc = add_vec(l, "norm.weight", 1, dsh, 1.0f, 0.2f, ST_BF16)) ||
        (rc = add_hc(l, c, "", "hc_head", 1)))
        goto fail;
    *n_first = l->n;
    for (int i = 0; i < c->n_layers + c->n_mtp; i++) {
        char p[64];
        if (i < c->n_layers)
            snprintf(p, sizeof p, "layers.%d.", i);
        else
            snprintf(p, sizeof p, "mtp.%d.", i - c->n_layers);
        if ((rc = add_layer(l, c, &s.layers[i], p)))
            goto fail;
    }
    return 0;
fail:
    tlist_free(l);
    return rc;
}

int dsv4_variant_parse(const char *s, enum dsv4_variant *v)
{
    if (!strcmp(s, "flash"))
        *v = DSV4_VARIANT_FLASH;
    else if (!strcmp(s, "pro"))
        *v = DSV4_VARIANT_PRO;
    else
        return err_setf(ERR_INVAL, "unknown variant \"%s\" (flash or pro)", s);
    return 0;
}

int dsv4_synth_build(const struct dsv4_config *cfg, const char *label, struct st_set **out)
{
    struct tlist l;
    int n_first, rc;
    uint8_t *img = NULL;
    size_t len = 0;
    if ((rc = tiny_tensors(cfg, &l, &n_first)))
        return rc;
    rc = st_serialize(l.t, l.n, NULL, 0, &img, &len);
    tlist_free(&l);
    if (rc)
        return rc;
    return st_set_open_mem_take(out, label, img, len);
}

int dsv4_tiny_build(enum dsv4_variant v, struct dsv4_config *cfg, struct st_set **out)
{
    dsv4_tiny_config(cfg, v);
    return dsv4_synth_build(cfg, v == DSV4_VARIANT_PRO ? "builtin:tiny-pro" : "builtin:tiny-flash",
                            out);
}

static int write_text(const char *path, const char *text)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return err_setf(ERR_IO, "%s: %s", tmp, strerror(errno));
    size_t n = strlen(text);
    int bad = fwrite(text, 1, n, f) != n;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0)
        return err_setf(ERR_IO, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

int dsv4_tiny_export(const char *dir, enum dsv4_variant v)
{
    struct dsv4_config c;
    struct tlist l;
    int n_first, rc;
    char path[4096];
    char *cfg_json = NULL, *index = NULL;
    size_t total = 0;
    dsv4_tiny_config(&c, v);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return err_setf(ERR_IO, "%s: %s", dir, strerror(errno));
    if ((rc = tiny_tensors(&c, &l, &n_first)))
        return rc;
    static const char *shard[2] = {"model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors"};
    snprintf(path, sizeof path, "%s/%s", dir, shard[0]);
    if ((rc = st_write_file(path, l.t, n_first)))
        goto out;
    snprintf(path, sizeof path, "%s/%s", dir, shard[1]);
    if ((rc = st_write_file(path, l.t + n_first, l.n - n_first)))
        goto out;
    /* model.safetensors.index.json */
    size_t cap = 64 + (size_t)l.n * 96, o = 0;
    index = malloc(cap);
    if (!index) {
        rc = err_setf(ERR_NOMEM, "tiny: out of memory");
        goto out;
    }
    for (int i = 0; i < l.n; i++) {
        size_t nb = st_dtype_size(l.t[i].dtype);
        for (int k = 0; k < l.t[i].ndim; k++)
            nb *= (size_t)l.t[i].shape[k];
        total += nb;
    }
    o += (size_t)snprintf(index + o, cap - o, "{\n  \"metadata\": {\"total_size\": %zu},\n  \"weight_map\": {\n", total);
    for (int i = 0; i < l.n && o < cap; i++)
        o += (size_t)snprintf(index + o, cap - o, "    \"%s\": \"%s\"%s\n", l.t[i].name,
                              shard[i >= n_first], i + 1 < l.n ? "," : "");
    if (o + 8 >= cap) {
        rc = err_setf(ERR_NOMEM, "tiny: index buffer too small");
        goto out;
    }
    snprintf(index + o, cap - o, "  }\n}\n");
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if ((rc = write_text(path, index)))
        goto out;
    if ((rc = dsv4_config_to_json(&c, &cfg_json)))
        goto out;
    snprintf(path, sizeof path, "%s/config.json", dir);
    rc = write_text(path, cfg_json);
out:
    free(cfg_json);
    free(index);
    tlist_free(&l);
    return rc;
}
