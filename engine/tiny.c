/*
 * tiny.c - random DSV4 checkpoints: the built-in tiny models and synthetic ones at any widths
 * (see tiny.h).
 *
 * A checkpoint is first planned: a list of recipes (one per linear, vector or hash table, each
 * giving one or two safetensors tensors in the official storage format), grouped into shards
 * and laid out with st_layout. It is then generated in work items of rows (about 1 MiB of output
 * each) on all OpenMP threads, in any order, each item written straight to its place: a memory
 * image (builtin:, dsv4_synth_build) or the shard files (pwrite, export). Nothing larger than an
 * item is held, so a 30 GB checkpoint needs a few MiB per thread.
 *
 * Randomness: every tensor has its own stream, splitmix64 seeded by seed ^ FNV-1a(name). Draw k
 * of a stream is a pure function of (seed, name, k) (splitmix64 is a counter hashed), so values
 * do not depend on generation order or thread count, and the sequential generator the tiny models
 * were first made with gives the same bits. Float weights are drawn and then stored the way the
 * official checkpoint stores them (FP8 E4M3 with UE8M0 128x128 block scales, MXFP4 with a UE8M0
 * scale per 32), so the model's true weights are the dequantised values.
 *
 * THREAD SAFETY: every entry point may run on any thread; generation parallelises internally.
 */
#include "engine/tiny.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "engine/err.h"
#include "kernels/cpu/cpu.h"

#define SYNTH_GAMMA      0x9e3779b97f4a7c15ull /* splitmix64's increment */
#define SYNTH_ITEM_BYTES (1u << 20)            /* output bytes of one work item (about) */
#define SYNTH_SHARD_MAX  (4ull << 30)          /* layers are packed into shards up to this size */

/* ---- deterministic random draws ---- */

/* The generation kernels are cloned for AVX-512 / AVX2 (picked at load time; integer hashing and
 * single IEEE operations in a fixed order, so every clone gives the same bits). ThreadSanitizer
 * crashes in the ifunc resolver, so TSan builds use the default path (as kernels/cpu/linear.c). */
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__) && !defined(DSV4_NO_TARGET_CLONES)
#define SYNTH_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SYNTH_CLONES
#endif

static inline uint64_t synth_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The stream of tensor `name`: splitmix64 from state seed ^ FNV-1a(name), advanced once. */
static uint64_t synth_stream(uint64_t seed, const char *name)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ull;
    return (seed ^ h) + SYNTH_GAMMA;
}

/* Draw k (0, 1, ...) of a stream. */
static inline uint64_t synth_draw(uint64_t stream, uint64_t k)
{
    return synth_mix(stream + (k + 1) * SYNTH_GAMMA);
}

/*
 * Draws k0 .. k0+n-1 as floats into w (n): uniform in [-a, a) (24 random bits), times f. The top
 * 24 bits convert to float exactly through int32, which vectorises.
 */
static inline void synth_fill(uint64_t stream, uint64_t k0, int64_t n, float a, float f, float *w)
{
    for (int64_t j = 0; j < n; j++) {
        const int32_t u = (int32_t)(synth_draw(stream, k0 + (uint64_t)j) >> 40);
        w[j] = ((float)u * (1.0f / 16777216.0f) * 2.0f - 1.0f) * a * f;
    }
}

/* max(floor, max |x_j|) over n floats (no NaN): on the bits, since |x| orders like its bits. */
static inline float synth_amax(const float *x, int64_t n, float floor)
{
    uint32_t m, u;
    memcpy(&m, &floor, 4);
    for (int64_t j = 0; j < n; j++) {
        memcpy(&u, &x[j], 4);
        u &= 0x7fffffffu;
        m = u > m ? u : m;
    }
    float r;
    memcpy(&r, &m, 4);
    return r;
}

/* ---- the plan: recipes, tensors, shards ---- */

enum recipe_kind {
    RECIPE_LINEAR, /* (rows, cols) matrix, uniform +-a times a power of two per 32x32 tile */
    RECIPE_VEC,    /* rows * cols floats, uniform center +- a, stored BF16 or F32 */
    RECIPE_HASH,   /* tid2eid: (rows = vocab, cols = K) distinct expert ids < n_experts, I64 */
};

struct recipe {
    enum recipe_kind kind;
    enum dsv4_wfmt fmt; /* LINEAR: how it is stored */
    enum st_dtype dt;   /* VEC */
    int64_t rows, cols; /* LINEAR: logical (out, in); VEC: elements = rows * cols; HASH: (V, K) */
    int n_experts;      /* HASH */
    float center, a;
    uint64_t stream; /* of the weight tensor (LINEAR: "<prefix>.weight") */
    int shard;
    int tw, ts; /* indices of its weight and scale tensors in plan.t (ts = -1: none) */
};

struct plan {
    uint64_t seed;
    struct recipe *r; /* nr */
    int nr, cap_r;
    struct st_write_tensor *t; /* nt; names malloc'd (owned), data unused */
    int nt, cap_t;
    uint64_t *off; /* nt: file offset of each tensor's data in its shard */
    int n_shards;
    uint8_t **hdr; /* n_shards headers (malloc'd) */
    size_t *hdr_len;
    uint64_t *shard_bytes; /* n_shards: file sizes */
};

static void plan_free(struct plan *p)
{
    for (int i = 0; i < p->nt; i++)
        free((char *)p->t[i].name);
    for (int s = 0; p->hdr && s < p->n_shards; s++)
        free(p->hdr[s]);
    free(p->r);
    free(p->t);
    free(p->off);
    free(p->hdr);
    free(p->hdr_len);
    free(p->shard_bytes);
    memset(p, 0, sizeof *p);
}

static size_t tensor_bytes(const struct st_write_tensor *t)
{
    size_t n = st_dtype_size(t->dtype);
    for (int k = 0; k < t->ndim; k++)
        n *= (size_t)t->shape[k];
    return n;
}

/* Append tensor `name` (copied) of dtype dt and shape [d0] (ndim 1) or [d0, d1]; *idx its index. */
static int plan_tensor(struct plan *p, const char *name, enum st_dtype dt, int ndim, int64_t d0,
                       int64_t d1, int *idx)
{
    if (p->nt == p->cap_t) {
        int cap = p->cap_t ? p->cap_t * 2 : 512;
        struct st_write_tensor *t = realloc(p->t, sizeof *t * (size_t)cap);
        if (!t)
            return err_setf(ERR_NOMEM, "synth: out of memory");
        p->t = t;
        p->cap_t = cap;
    }
    struct st_write_tensor *t = &p->t[p->nt];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return err_setf(ERR_NOMEM, "synth: out of memory for %s", name);
    t->dtype = dt;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    *idx = p->nt++;
    return 0;
}

/* Append a recipe whose weight tensor is `wname` (its stream); NULL when out of memory. The
 * pointer is valid until the next plan_recipe. */
static struct recipe *plan_recipe(struct plan *p, enum recipe_kind kind, const char *wname)
{
    if (p->nr == p->cap_r) {
        int cap = p->cap_r ? p->cap_r * 2 : 512;
        struct recipe *r = realloc(p->r, sizeof *r * (size_t)cap);
        if (!r)
            return NULL;
        p->r = r;
        p->cap_r = cap;
    }
    struct recipe *r = &p->r[p->nr++];
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->stream = synth_stream(p->seed, wname);
    r->shard = p->n_shards - 1;
    r->ts = -1;
    return r;
}

/* `<prefix>.weight` (+ `.scale`) of logical shape (rows, cols) stored as fmt, +-sqrt(3/cols). */
static int add_linear(struct plan *p, const char *prefix, int rows, int cols, enum dsv4_wfmt fmt)
{
    char wn[320], sn[320];
    snprintf(wn, sizeof wn, "%s.weight", prefix);
    snprintf(sn, sizeof sn, "%s.scale", prefix);
    struct recipe *r = plan_recipe(p, RECIPE_LINEAR, wn);
    if (!r)
        return err_setf(ERR_NOMEM, "synth: out of memory");
    r->fmt = fmt;
    r->rows = rows;
    r->cols = cols;
    r->a = sqrtf(3.0f / (float)cols);
    int rc;
    if (fmt == DSV4_WFMT_BF16)
        return plan_tensor(p, wn, ST_BF16, 2, rows, cols, &r->tw);
    if (fmt == DSV4_WFMT_FP8_BLOCK) { /* scales per 128x128 block */
        if ((rc = plan_tensor(p, wn, ST_F8_E4M3, 2, rows, cols, &r->tw)))
            return rc;
        return plan_tensor(p, sn, ST_F8_E8M0, 2, (rows + 127) / 128, (cols + 127) / 128, &r->ts);
    }
    /* MXFP4: two E2M1 codes per byte, a UE8M0 scale per 32 inputs */
    if ((rc = plan_tensor(p, wn, ST_I8, 2, rows, cols / 2, &r->tw)))
        return rc;
    return plan_tensor(p, sn, ST_F8_E8M0, 2, rows, cols / 32, &r->ts);
}

/* A float tensor (shape of ndim <= 2), uniform in center +- a, stored as BF16 or F32. */
static int add_vec(struct plan *p, const char *name, int ndim, const int64_t *shape, float center,
                   float a, enum st_dtype dt)
{
    struct recipe *r = plan_recipe(p, RECIPE_VEC, name);
    if (!r)
        return err_setf(ERR_NOMEM, "synth: out of memory");
    r->dt = dt;
    r->rows = shape[0];
    r->cols = ndim == 2 ? shape[1] : 1;
    r->center = center;
    r->a = a;
    return plan_tensor(p, name, dt, ndim, shape[0], ndim == 2 ? shape[1] : 0, &r->tw);
}

/* tid2eid (V, K) I64: K distinct experts < E per token. */
static int add_hash(struct plan *p, const char *name, int V, int K, int E)
{
    struct recipe *r = plan_recipe(p, RECIPE_HASH, name);
    if (!r)
        return err_setf(ERR_NOMEM, "synth: out of memory");
    r->rows = V;
    r->cols = K;
    r->n_experts = E;
    return plan_tensor(p, name, ST_I64, 2, V, K, &r->tw);
}

static int add_hc(struct plan *l, const struct dsv4_config *c, const char *p, const char *which,
                  int head)
{
    char n[256];
    int nmix = head ? c->hc_mult : (2 + c->hc_mult) * c->hc_mult;
    int64_t fsh[2] = {nmix, (int64_t)c->hc_mult * c->hidden_size}, bsh[1] = {nmix},
            ssh[1] = {head ? 1 : 3};
    /* the mixing logits fn . x have the spread of the tiny models' (+-0.05 up to their fan-in of
     * 1536) at any width, like a 1/sqrt(fan_in) matrix: wider, the sigmoids would saturate */
    const float a = 0.05f * fminf(1.0f, sqrtf(1536.0f / (float)fsh[1]));
    int rc;
    snprintf(n, sizeof n, "%s%s_fn", p, which);
    if ((rc = add_vec(l, n, 2, fsh, 0.0f, a, ST_F32)))
        return rc;
    snprintf(n, sizeof n, "%s%s_base", p, which);
    if ((rc = add_vec(l, n, 1, bsh, 0.0f, 0.5f, ST_F32)))
        return rc;
    snprintf(n, sizeof n, "%s%s_scale", p, which);
    return add_vec(l, n, 1, ssh, 1.0f, 0.5f, ST_F32);
}

static int add_compressor(struct plan *l, const struct dsv4_config *c, const char *p, int ratio,
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

/* Every tensor of one layer (p = "layers.3." or "mtp.0."), in the official names and formats;
 * one line per tensor, as in engine/weights.c. */
/* clang-format off */
static int add_layer(struct plan *l, const struct dsv4_config *c, const struct dsv4_layer_spec *s,
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
        NAME("%sffn.gate.tid2eid", p); TRY(add_hash(l, n, c->vocab_size, K, E));
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
/* clang-format on */

/*
 * Plan every tensor of cfg. Shard 0 holds embed, head, the final norm and hc_head; layers follow
 * in shards of up to SYNTH_SHARD_MAX bytes (a layer is never split), or all in shard 0 when
 * one_file. Then each shard is laid out (headers, offsets).
 */
static int plan_build(struct plan *p, const struct dsv4_config *c, uint64_t seed, int one_file)
{
    struct dsv4_schedule s;
    int64_t dsh[1] = {c->hidden_size};
    uint64_t shard_bytes = 0;
    int rc;
    memset(p, 0, sizeof *p);
    p->seed = seed;
    p->n_shards = 1;
    if ((rc = dsv4_schedule_build(&s, c)))
        return rc;
    if ((rc = add_vec(p, "embed.weight", 2, (int64_t[]){c->vocab_size, c->hidden_size}, 0.0f, 1.0f,
                      ST_BF16)) ||
        (rc = add_linear(p, "head", c->vocab_size, c->hidden_size, DSV4_WFMT_BF16)) ||
        (rc = add_vec(p, "norm.weight", 1, dsh, 1.0f, 0.2f, ST_BF16)) ||
        (rc = add_hc(p, c, "", "hc_head", 1)))
        goto fail;
    for (int i = 0; i < c->n_layers + c->n_mtp; i++) {
        char pre[64];
        int r0 = p->nr, t0 = p->nt;
        if (i < c->n_layers)
            snprintf(pre, sizeof pre, "layers.%d.", i);
        else
            snprintf(pre, sizeof pre, "mtp.%d.", i - c->n_layers);
        if (!one_file && (i == 0 || shard_bytes >= SYNTH_SHARD_MAX)) {
            p->n_shards++;
            shard_bytes = 0;
        }
        if ((rc = add_layer(p, c, &s.layers[i], pre)))
            goto fail;
        uint64_t layer_bytes = 0;
        for (int k = t0; k < p->nt; k++)
            layer_bytes += tensor_bytes(&p->t[k]);
        if (!one_file && shard_bytes > 0 && shard_bytes + layer_bytes > SYNTH_SHARD_MAX) {
            p->n_shards++; /* this layer starts the next shard */
            for (int k = r0; k < p->nr; k++)
                p->r[k].shard = p->n_shards - 1;
            shard_bytes = 0;
        }
        shard_bytes += layer_bytes;
    }
    /* lay out each shard: its tensors in plan order, offsets mapped back */
    p->off = calloc((size_t)p->nt, sizeof *p->off);
    p->hdr = calloc((size_t)p->n_shards, sizeof *p->hdr);
    p->hdr_len = calloc((size_t)p->n_shards, sizeof *p->hdr_len);
    p->shard_bytes = calloc((size_t)p->n_shards, sizeof *p->shard_bytes);
    struct st_write_tensor *st = malloc(sizeof *st * (size_t)p->nt);
    int *idx = malloc(sizeof *idx * (size_t)p->nt);
    uint64_t *off = malloc(sizeof *off * (size_t)p->nt);
    if (!p->off || !p->hdr || !p->hdr_len || !p->shard_bytes || !st || !idx || !off) {
        rc = err_setf(ERR_NOMEM, "synth: out of memory");
    } else {
        for (int sh = 0; sh < p->n_shards && !rc; sh++) {
            int n = 0;
            for (int k = 0; k < p->nr; k++) {
                if (p->r[k].shard != sh)
                    continue;
                idx[n] = p->r[k].tw;
                st[n++] = p->t[p->r[k].tw];
                if (p->r[k].ts >= 0) {
                    idx[n] = p->r[k].ts;
                    st[n++] = p->t[p->r[k].ts];
                }
            }
            rc = st_layout(st, n, NULL, 0, &p->hdr[sh], &p->hdr_len[sh], off, &p->shard_bytes[sh]);
            for (int k = 0; !rc && k < n; k++)
                p->off[idx[k]] = off[k];
        }
    }
    free(st);
    free(idx);
    free(off);
    if (!rc)
        return 0;
fail:
    plan_free(p);
    return rc;
}

/* ---- generation ---- */

/* A work item: rows [r0, r1) of a LINEAR or HASH recipe, elements [r0, r1) of a VEC. */
struct item {
    int recipe;
    int64_t r0, r1;
    long rank; /* its position among its shard's items */
};

/* Items in turn from each shard: threads write to several files at once (a file system
 * serialises the writes into one file). */
static int item_cmp(const void *a, const void *b)
{
    const struct item *x = a, *y = b;
    if (x->rank != y->rank)
        return x->rank < y->rank ? -1 : 1;
    return x->recipe < y->recipe ? -1 : x->recipe > y->recipe;
}

/* Per-thread buffers, sized by plan_items for the largest item. */
struct scratch {
    uint8_t *w, *s; /* the item's weight and scale bytes */
    float *f;       /* VEC: the item's floats; LINEAR: a row, FP8: a 128-row block (128, cols) */
    int *perm;      /* HASH: (n_experts) */
};

struct scratch_size {
    size_t w, s;    /* bytes */
    size_t f, perm; /* elements */
};

static void scratch_free(struct scratch *sc)
{
    free(sc->w);
    free(sc->s);
    free(sc->f);
    free(sc->perm);
    memset(sc, 0, sizeof *sc);
}

static int scratch_new(struct scratch *sc, const struct scratch_size *ss)
{
    sc->w = malloc(ss->w + 1);
    sc->s = malloc(ss->s + 1);
    sc->f = malloc(sizeof(float) * (ss->f + 1));
    sc->perm = malloc(sizeof(int) * (ss->perm + 1));
    if (sc->w && sc->s && sc->f && sc->perm)
        return 0;
    scratch_free(sc);
    return err_setf(ERR_NOMEM, "synth: out of memory for the generation buffers");
}

/* Bytes of the weight tensor per row (LINEAR, HASH) or element (VEC). */
static size_t recipe_row_bytes(const struct recipe *r)
{
    if (r->kind == RECIPE_VEC)
        return st_dtype_size(r->dt);
    if (r->kind == RECIPE_HASH)
        return 8 * (size_t)r->cols;
    return r->fmt == DSV4_WFMT_BF16        ? 2 * (size_t)r->cols
           : r->fmt == DSV4_WFMT_FP8_BLOCK ? (size_t)r->cols
                                           : (size_t)r->cols / 2;
}

#define MAXZ(a, b) ((a) = (a) > (b) ? (a) : (b))

/* Cut every recipe into items of about SYNTH_ITEM_BYTES (*out malloc'd, n_out of them). */
static int plan_items(const struct plan *p, struct item **out, long *n_out, struct scratch_size *ss)
{
    long n = 0, cap = 0;
    struct item *it = NULL;
    long *rank = calloc((size_t)p->n_shards, sizeof *rank);
    if (!rank)
        return err_setf(ERR_NOMEM, "synth: out of memory");
    memset(ss, 0, sizeof *ss);
    for (int k = 0; k < p->nr; k++) {
        const struct recipe *r = &p->r[k];
        const int fp8 = r->kind == RECIPE_LINEAR && r->fmt == DSV4_WFMT_FP8_BLOCK;
        const int64_t g = fp8 ? 128 : 1; /* rows that quantise together */
        const int64_t total = r->kind == RECIPE_VEC ? r->rows * r->cols : r->rows;
        const size_t rb = recipe_row_bytes(r);
        int64_t step = (int64_t)(SYNTH_ITEM_BYTES / (rb * (size_t)g)) * g;
        step = step < g ? g : step > total ? total : step;
        for (int64_t r0 = 0; r0 < total; r0 += step) {
            if (n == cap) {
                cap = cap ? cap * 2 : 4096;
                struct item *ni = realloc(it, sizeof *it * (size_t)cap);
                if (!ni) {
                    free(it);
                    free(rank);
                    return err_setf(ERR_NOMEM, "synth: out of memory");
                }
                it = ni;
            }
            it[n++] = (struct item){k, r0, r0 + step < total ? r0 + step : total, rank[r->shard]++};
        }
        MAXZ(ss->w, (size_t)step * rb);
        if (r->kind == RECIPE_VEC)
            MAXZ(ss->f, (size_t)step);
        if (r->kind == RECIPE_LINEAR) {
            MAXZ(ss->f, (size_t)(fp8 ? 128 : 1) * (size_t)r->cols);
            if (fp8)
                MAXZ(ss->s, (size_t)((step + 127) / 128) * (size_t)((r->cols + 127) / 128));
            else if (r->fmt == DSV4_WFMT_MXFP4)
                MAXZ(ss->s, (size_t)step * (size_t)(r->cols / 32));
        }
        if (r->kind == RECIPE_HASH)
            MAXZ(ss->perm, (size_t)r->n_experts);
    }
    free(rank);
    if (p->n_shards > 1)
        qsort(it, (size_t)n, sizeof *it, item_cmp);
    *out = it;
    *n_out = n;
    return 0;
}

/* The UE8M0 byte of a normal power of two: its biased exponent. */
static uint8_t e8m0_of(float pow2)
{
    uint32_t u;
    memcpy(&u, &pow2, 4);
    return (uint8_t)(u >> 23);
}

/*
 * Row i of a LINEAR recipe's float matrix into w (cols): draw tr*tc + i*cols + j, uniform +-a,
 * times the factor 0.5, 1 or 2 of its 32x32 tile (draw ti*tc + tj), so block scales differ.
 */
SYNTH_CLONES static void linear_row(const struct recipe *r, int64_t i, float *w)
{
    static const float f3[3] = {0.5f, 1.0f, 2.0f};
    const int64_t tr = (r->rows + 31) / 32, tc = (r->cols + 31) / 32;
    const uint64_t k0 = (uint64_t)(tr * tc + i * r->cols);
    for (int64_t tj = 0; tj < tc; tj++) {
        const float f = f3[synth_draw(r->stream, (uint64_t)((i / 32) * tc + tj)) % 3];
        const int64_t n = r->cols - tj * 32 < 32 ? r->cols - tj * 32 : 32;
        synth_fill(r->stream, k0 + (uint64_t)(tj * 32), n, r->a, f, w + tj * 32);
    }
}

/*
 * FP8 E4M3 rows [r0, r1) (r0 a multiple of 128): q (r1-r0, cols), scales (ceil((r1-r0)/128), bc).
 * The codes are cpu_f32_to_e4m3(x / s) (|x / s| <= 448 by the choice of s) computed on the bits:
 * from 2^-6 up the float's mantissa rounded to 3 bits (nearest even) and the exponent re-biased;
 * below, the nearest even multiple of 2^-9 (x * 2^9 + 2^23 rounds to an integer). Branch-free,
 * it vectorises. Equal to cpu_f32_to_e4m3 for every float of magnitude <= 448 (checked
 * exhaustively when written); test_synth.c's hash of the built-in models pins it.
 */
SYNTH_CLONES static void gen_fp8(const struct recipe *r, int64_t r0, int64_t r1, struct scratch *sc)
{
    const int64_t cols = r->cols, bc = (cols + 127) / 128;
    for (int64_t b = r0; b < r1; b += 128) {
        const int64_t i1 = b + 128 < r1 ? b + 128 : r1;
        for (int64_t i = b; i < i1; i++)
            linear_row(r, i, sc->f + (i - b) * cols);
        for (int64_t bj = 0; bj < bc; bj++) {
            const int64_t j0 = bj * 128, nj = j0 + 128 < cols ? 128 : cols - j0;
            float amax = 1e-30f;
            for (int64_t i = b; i < i1; i++)
                amax = synth_amax(sc->f + (i - b) * cols + j0, nj, amax);
            const float s = cpu_pow2_scale(amax, 448.0f);
            sc->s[(b - r0) / 128 * bc + bj] = e8m0_of(s);
            for (int64_t i = b; i < i1; i++) {
                const float *x = sc->f + (i - b) * cols + j0;
                uint8_t *q = sc->w + (i - r0) * cols + j0;
                for (int64_t j = 0; j < nj; j++) {
                    const float v = x[j] / s, a = fabsf(v), t = a * 512.0f + 8388608.0f;
                    uint32_t u, tu;
                    memcpy(&u, &a, 4);
                    memcpy(&tu, &t, 4);
                    const uint32_t normal = ((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
                    memcpy(&u, &v, 4);
                    q[j] =
                        (uint8_t)(((u >> 24) & 0x80u) | (a < 0.015625f ? tu & 0x7fffffu : normal));
                }
            }
        }
    }
}

/*
 * MXFP4 rows [r0, r1): q (r1-r0, cols/2) two E2M1 codes per byte (low nibble first), s (.,
 * cols/32). The codes are cpu_f32_to_e2m1(x / s)'s round-to-nearest-even written as comparisons
 * of |x| with the midpoints between the codes (0, 0.5, 1, 1.5, 2, 3, 4, 6) times s (exact: s is a
 * power of two), ties to the even code: branch-free, it vectorises, where the general rounding
 * (58 G calls for 8 Flash layers) does not. Equal to cpu_f32_to_e2m1 for every float of magnitude
 * <= 6 (checked exhaustively when written); test_synth.c's hash of the built-in models pins it.
 */
SYNTH_CLONES static void gen_mxfp4(const struct recipe *r, int64_t r0, int64_t r1,
                                   struct scratch *sc)
{
    const int64_t cols = r->cols, ng = cols / 32;
    for (int64_t i = r0; i < r1; i++) {
        linear_row(r, i, sc->f);
        for (int64_t g = 0; g < ng; g++) {
            const float *x = sc->f + g * 32;
            const float s = cpu_pow2_scale(synth_amax(x, 32, 1e-30f), 6.0f);
            const float t[7] = {0.25f * s, 0.75f * s, 1.25f * s, 1.75f * s,
                                2.5f * s,  3.5f * s,  5.0f * s};
            uint8_t *q = sc->w + (i - r0) * (cols / 2) + g * 16;
            int32_t c[32];
            sc->s[(i - r0) * ng + g] = e8m0_of(s);
            for (int j = 0; j < 32; j++) {
                uint32_t u;
                memcpy(&u, &x[j], 4);
                const float a = fabsf(x[j]);
                c[j] = (int32_t)((u >> 31) << 3) + (a > t[0]) + (a >= t[1]) + (a > t[2]) +
                       (a >= t[3]) + (a > t[4]) + (a >= t[5]) + (a > t[6]);
            }
            for (int j = 0; j < 16; j++)
                q[j] = (uint8_t)(c[2 * j] | (c[2 * j + 1] << 4));
        }
    }
}

/* VEC elements [e0, e1): center +- a, stored as BF16 or F32 into w; f: (e1 - e0) floats. */
static void gen_vec(const struct recipe *r, int64_t e0, int64_t e1, float *f, uint8_t *w)
{
    synth_fill(r->stream, (uint64_t)e0, e1 - e0, r->a, 1.0f, f);
    for (int64_t e = 0; e < e1 - e0; e++) {
        const float v = r->center + f[e];
        if (r->dt == ST_BF16) {
            uint16_t h = cpu_f32_to_bf16(v);
            memcpy(w + 2 * e, &h, 2);
        } else {
            memcpy(w + 4 * e, &v, 4);
        }
    }
}

/*
 * Generate item `it` of recipe r into sc->w (and sc->s). *wlen / *woff: the bytes and their
 * offset inside the weight tensor; *slen / *soff the same for the scale tensor (0 when none).
 */
static void item_generate(const struct recipe *r, const struct item *it, struct scratch *sc,
                          size_t *wlen, size_t *woff, size_t *slen, size_t *soff)
{
    const int64_t cols = r->cols, n = it->r1 - it->r0;
    const size_t rb = recipe_row_bytes(r);
    *wlen = (size_t)n * rb;
    *woff = (size_t)it->r0 * rb;
    *slen = *soff = 0;
    if (r->kind == RECIPE_VEC) {
        gen_vec(r, it->r0, it->r1, sc->f, sc->w);
    } else if (r->kind == RECIPE_HASH) { /* partial Fisher-Yates per token: K distinct experts */
        const int E = r->n_experts, K = (int)cols;
        int64_t *t = (int64_t *)sc->w;
        for (int64_t v = it->r0; v < it->r1; v++) {
            for (int e = 0; e < E; e++)
                sc->perm[e] = e;
            for (int j = 0; j < K; j++) {
                uint64_t d = synth_draw(r->stream, (uint64_t)(v * K + j));
                int k = j + (int)(d % (uint64_t)(E - j));
                int tmp = sc->perm[j];
                sc->perm[j] = sc->perm[k];
                sc->perm[k] = tmp;
                t[(v - it->r0) * K + j] = sc->perm[j];
            }
        }
    } else if (r->fmt == DSV4_WFMT_BF16) {
        for (int64_t i = it->r0; i < it->r1; i++) {
            uint16_t *q = (uint16_t *)sc->w + (i - it->r0) * cols;
            linear_row(r, i, sc->f);
            for (int64_t j = 0; j < cols; j++)
                q[j] = cpu_f32_to_bf16(sc->f[j]);
        }
    } else if (r->fmt == DSV4_WFMT_FP8_BLOCK) {
        const size_t bc = (size_t)(cols + 127) / 128;
        gen_fp8(r, it->r0, it->r1, sc);
        *slen = (size_t)((n + 127) / 128) * bc;
        *soff = (size_t)(it->r0 / 128) * bc;
    } else {
        gen_mxfp4(r, it->r0, it->r1, sc);
        *slen = (size_t)n * (size_t)(cols / 32);
        *soff = (size_t)it->r0 * (size_t)(cols / 32);
    }
}

/* Where items go: a memory image (img), else the shard files (fd[shard], named path[shard]). */
struct sink {
    uint8_t *img;
    const int *fd;
    char *const *path;
};

static int sink_put(const struct sink *o, int shard, uint64_t off, const uint8_t *buf, size_t len)
{
    if (o->img) {
        memcpy(o->img + off, buf, len);
        return 0;
    }
    while (len > 0) {
        ssize_t w = pwrite(o->fd[shard], buf, len, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return err_setf(ERR_IO, "%s: write failed: %s", o->path[shard],
                            w < 0 ? strerror(errno) : "no progress");
        buf += w;
        off += (uint64_t)w;
        len -= (size_t)w;
    }
    return 0;
}

/* Keep the first failure of a parallel generation: its code in *fail, its message in msg. */
static void fail_record(atomic_int *fail, char *msg, size_t len, int rc)
{
#pragma omp critical(synth_fail)
    if (!atomic_load(fail)) {
        snprintf(msg, len, "%s", err_msg());
        atomic_store(fail, rc);
    }
}

/*
 * Generate every tensor of the plan into o, items on all OpenMP threads (dynamic schedule: the
 * output does not depend on which thread makes what). The first error stops the rest and is
 * returned with its message.
 */
static int plan_generate(const struct plan *p, const struct sink *o)
{
    struct item *it = NULL;
    long n = 0;
    struct scratch_size ss;
    int rc = plan_items(p, &it, &n, &ss);
    atomic_int fail = 0;
    char msg[1024] = "";
    if (rc)
        return rc;
#pragma omp parallel
    {
        struct scratch sc;
        int trc = scratch_new(&sc, &ss);
        if (trc)
            fail_record(&fail, msg, sizeof msg, trc);
#pragma omp for schedule(dynamic, 1)
        for (long k = 0; k < n; k++) {
            if (atomic_load_explicit(&fail, memory_order_relaxed))
                continue;
            const struct recipe *r = &p->r[it[k].recipe];
            size_t wl, wo, sl, so;
            item_generate(r, &it[k], &sc, &wl, &wo, &sl, &so);
            trc = sink_put(o, r->shard, p->off[r->tw] + wo, sc.w, wl);
            if (!trc && sl)
                trc = sink_put(o, r->shard, p->off[r->ts] + so, sc.s, sl);
            if (trc)
                fail_record(&fail, msg, sizeof msg, trc);
        }
        scratch_free(&sc);
    }
    free(it);
    rc = atomic_load(&fail);
    return rc ? err_setf(rc, "%s", msg) : 0;
}

/* ---- configs ---- */

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

int dsv4_flash_config(struct dsv4_config *c, int n_layers, int n_experts)
{
    if (n_layers < 1 || n_layers > DSV4_FLASH_LAYERS)
        return err_setf(ERR_INVAL,
                        "flash shape: %d layers: must be 1 to %d (a prefix of the released "
                        "Flash schedule)",
                        n_layers, DSV4_FLASH_LAYERS);
    if (n_experts < 6 || n_experts > 256)
        return err_setf(ERR_INVAL,
                        "flash shape: %d routed experts: must be 6 (the top-k) to 256 (Flash's)",
                        n_experts);
    /* the tiny Flash model already has the released values of everything but the widths */
    dsv4_tiny_config(c, DSV4_VARIANT_FLASH);
    c->hidden_size = 4096;
    c->n_layers = n_layers;
    c->n_mtp = 1;
    c->n_heads = 64;
    c->q_lora_rank = 1024;
    c->o_groups = 8;
    c->o_lora_rank = 1024;
    c->index_n_heads = 64;
    c->index_topk = 512;
    c->n_routed_experts = n_experts;
    c->moe_inter = 2048;
    c->n_hash_layers = n_layers < 3 ? n_layers : 3;
    /* spec §4: layers 0-1 SWA, then CSA (even) / HCA (odd); the MTP layer SWA */
    memset(c->compress_ratios, 0, sizeof c->compress_ratios);
    for (int i = 0; i < n_layers; i++)
        c->compress_ratios[i] = i < 2 ? 0 : i % 2 ? 128 : 4;
    c->compress_ratios[n_layers] = 0;
    return 0;
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

/* ---- in memory ---- */

int dsv4_synth_build(const struct dsv4_config *cfg, const char *label, struct st_set **out)
{
    struct plan p;
    uint8_t *img = NULL;
    size_t len = 0;
    int rc = plan_build(&p, cfg, DSV4_SYNTH_SEED, 1);
    if (rc)
        return rc;
    len = (size_t)p.shard_bytes[0];
    if (!(img = malloc(len))) {
        rc = err_setf(ERR_NOMEM, "synth: out of memory for a %zu-byte checkpoint", len);
    } else {
        struct sink o = {img, NULL, NULL};
        memcpy(img, p.hdr[0], p.hdr_len[0]);
        rc = plan_generate(&p, &o);
    }
    plan_free(&p);
    if (rc) {
        free(img);
        return rc;
    }
    return st_set_open_mem_take(out, label, img, len);
}

int dsv4_tiny_build(enum dsv4_variant v, struct dsv4_config *cfg, struct st_set **out)
{
    dsv4_tiny_config(cfg, v);
    return dsv4_synth_build(cfg, v == DSV4_VARIANT_PRO ? "builtin:tiny-pro" : "builtin:tiny-flash",
                            out);
}

/* ---- export to a directory ---- */

/* Write text to path through path.tmp and a rename. */
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
    if (bad || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return err_setf(ERR_IO, "%s: write failed: %s", path, strerror(e));
    }
    return 0;
}

/* Copy the file src to dst (through dst.tmp and a rename). */
static int copy_file(const char *src, const char *dst)
{
    char tmp[4200];
    int in = -1, out = -1, rc = 0;
    char *buf = malloc(1 << 20);
    snprintf(tmp, sizeof tmp, "%s.tmp", dst);
    if (!buf) {
        rc = err_setf(ERR_NOMEM, "synth: out of memory");
        goto out;
    }
    if ((in = open(src, O_RDONLY | O_CLOEXEC)) < 0) {
        rc = err_setf(ERR_IO, "%s: %s", src, strerror(errno));
        goto out;
    }
    if ((out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0) {
        rc = err_setf(ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    for (;;) {
        ssize_t n = read(in, buf, 1 << 20);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rc = err_setf(ERR_IO, "%s: read failed: %s", src, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        for (ssize_t o = 0; o < n;) {
            ssize_t w = write(out, buf + o, (size_t)(n - o));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                rc = err_setf(ERR_IO, "%s: write failed: %s", dst, strerror(errno));
                goto out;
            }
            o += w;
        }
    }
    int cr = close(out);
    out = -1;
    if (cr != 0 || rename(tmp, dst) != 0)
        rc = err_setf(ERR_IO, "%s: write failed: %s", dst, strerror(errno));
out:
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    if (rc)
        unlink(tmp);
    free(buf);
    return rc;
}

/* Create dir if missing; refuse a path that exists and is not a directory. */
static int export_mkdir(const char *dir)
{
    struct stat st;
    if (mkdir(dir, 0755) == 0)
        return 0;
    if (errno != EEXIST)
        return err_setf(ERR_IO, "%s: cannot create directory: %s", dir, strerror(errno));
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return err_setf(ERR_IO, "%s: exists and is not a directory", dir);
    return 0;
}

static uint64_t file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0;
}

/*
 * Remove the checkpoint that dir may hold: config.json first (so a directory whose export failed
 * or was interrupted has none and cannot be mistaken for a model), the index, and every
 * model-NNNNN-of-NNNNN.safetensors[.tmp] (an earlier export's shards, of any count, and what a
 * killed one left). Other files stay.
 */
static int export_clean(const char *dir, const char *cfg, const char *index)
{
    if ((unlink(cfg) != 0 && errno != ENOENT) || (unlink(index) != 0 && errno != ENOENT))
        return err_setf(ERR_IO, "%s: cannot replace the checkpoint there: %s", dir,
                        strerror(errno));
    DIR *d = opendir(dir);
    if (!d)
        return err_setf(ERR_IO, "%s: %s", dir, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d))) {
        int a, b, len = 0;
        char path[4200];
        if (sscanf(e->d_name, "model-%5d-of-%5d.safetensors%n", &a, &b, &len) != 2 || !len ||
            (e->d_name[len] && strcmp(e->d_name + len, ".tmp")))
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    return 0;
}

/* Refuse early when dir's file system cannot take `need` bytes. */
static int export_space(const char *dir, uint64_t need)
{
    struct statvfs vf;
    if (statvfs(dir, &vf) != 0)
        return 0; /* unknown: the writes will tell */
    uint64_t have = (uint64_t)vf.f_bavail * (uint64_t)vf.f_frsize;
    if (need > have)
        return err_setf(ERR_IO,
                        "%s: not enough disk space: the checkpoint needs %.2f GB, %.2f GB are free",
                        dir, (double)need / 1e9, (double)have / 1e9);
    return 0;
}

/* model.safetensors.index.json: total tensor bytes and tensor -> shard file (malloc'd text). */
static int export_index(const struct plan *p, char *const *shard_name, char **out)
{
    int *tshard = malloc(sizeof(int) * (size_t)(p->nt + 1));
    size_t cap = 128, o = 0, total = 0;
    char *s = NULL;
    if (!tshard)
        return err_setf(ERR_NOMEM, "synth: out of memory");
    for (int k = 0; k < p->nr; k++) {
        tshard[p->r[k].tw] = p->r[k].shard;
        if (p->r[k].ts >= 0)
            tshard[p->r[k].ts] = p->r[k].shard;
    }
    for (int i = 0; i < p->nt; i++) {
        total += tensor_bytes(&p->t[i]);
        cap += strlen(p->t[i].name) + strlen(shard_name[tshard[i]]) + 16;
    }
    if (!(s = malloc(cap))) {
        free(tshard);
        return err_setf(ERR_NOMEM, "synth: out of memory");
    }
    o += (size_t)snprintf(
        s + o, cap - o, "{\n  \"metadata\": {\"total_size\": %zu},\n  \"weight_map\": {\n", total);
    for (int i = 0; i < p->nt; i++)
        o += (size_t)snprintf(s + o, cap - o, "    \"%s\": \"%s\"%s\n", p->t[i].name,
                              shard_name[tshard[i]], i + 1 < p->nt ? "," : "");
    snprintf(s + o, cap - o, "  }\n}\n");
    free(tshard);
    *out = s;
    return 0;
}

int dsv4_synth_export(const char *dir, const struct dsv4_config *cfg, uint64_t seed,
                      const char *tokenizer, uint64_t *bytes)
{
    struct plan p;
    char cfg_path[4096], index_path[4096], tok_path[4096];
    char **path = NULL, **tmp = NULL, **name = NULL; /* n_shards each, owned */
    int *fd = NULL, rc, ns = 0;
    char *cfg_json = NULL, *index = NULL;
    uint64_t need = 0;
    if ((rc = plan_build(&p, cfg, seed, 0)))
        return rc;
    ns = p.n_shards;
    path = calloc((size_t)ns, sizeof *path);
    tmp = calloc((size_t)ns, sizeof *tmp);
    name = calloc((size_t)ns, sizeof *name);
    fd = malloc(sizeof *fd * (size_t)ns);
    if (!path || !tmp || !name || !fd) {
        rc = err_setf(ERR_NOMEM, "synth: out of memory");
        ns = 0;
        goto out;
    }
    for (int s = 0; s < ns; s++)
        fd[s] = -1;
    if ((rc = export_mkdir(dir)))
        goto out;
    if (snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir) >= (int)sizeof cfg_path ||
        snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json", dir) >=
            (int)sizeof index_path ||
        snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", dir) >= (int)sizeof tok_path) {
        rc = err_setf(ERR_INVAL, "%s: path too long", dir);
        goto out;
    }
    for (int s = 0; s < ns; s++) {
        char nm[64];
        snprintf(nm, sizeof nm, "model-%05d-of-%05d.safetensors", s + 1, ns);
        size_t len = strlen(dir) + strlen(nm) + 8;
        name[s] = strdup(nm);
        path[s] = malloc(len);
        tmp[s] = malloc(len);
        if (!name[s] || !path[s] || !tmp[s]) {
            rc = err_setf(ERR_NOMEM, "synth: out of memory");
            goto out;
        }
        snprintf(path[s], len, "%s/%s", dir, nm);
        snprintf(tmp[s], len, "%s/%s.tmp", dir, nm);
        need += p.shard_bytes[s];
    }
    need += (uint64_t)p.nt * 96 + 65536 + (tokenizer ? file_size(tokenizer) : 0);
    if ((rc = export_clean(dir, cfg_path, index_path)) || (rc = export_space(dir, need)))
        goto out;
    struct sink o = {NULL, fd, path};
    for (int s = 0; s < ns && !rc; s++) {
        if ((fd[s] = open(tmp[s], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0)
            rc = err_setf(ERR_IO, "%s: cannot create: %s", tmp[s], strerror(errno));
        else
            rc = sink_put(&o, s, 0, p.hdr[s], p.hdr_len[s]);
    }
    if (rc || (rc = plan_generate(&p, &o)))
        goto out;
    for (int s = 0; s < ns && !rc; s++) {
        int cr = close(fd[s]);
        fd[s] = -1;
        if (cr != 0)
            rc = err_setf(ERR_IO, "%s: write failed: %s", path[s], strerror(errno));
        else if (rename(tmp[s], path[s]) != 0)
            rc = err_setf(ERR_IO, "%s: rename failed: %s", path[s], strerror(errno));
    }
    if (rc || (rc = export_index(&p, name, &index)) || (rc = write_text(index_path, index)))
        goto out;
    if (tokenizer && (rc = copy_file(tokenizer, tok_path)))
        goto out;
    if ((rc = dsv4_config_to_json(cfg, &cfg_json)) || (rc = write_text(cfg_path, cfg_json)))
        goto out;
    if (bytes) {
        *bytes = 0;
        for (int s = 0; s < ns; s++)
            *bytes += p.shard_bytes[s];
    }
out:
    for (int s = 0; s < ns; s++) {
        if (fd[s] >= 0)
            close(fd[s]);
        if (rc && tmp[s])
            unlink(tmp[s]);
        free(path[s]);
        free(tmp[s]);
        free(name[s]);
    }
    free(path);
    free(tmp);
    free(name);
    free(fd);
    free(cfg_json);
    free(index);
    plan_free(&p);
    return rc;
}

int dsv4_tiny_export(const char *dir, enum dsv4_variant v)
{
    struct dsv4_config c;
    dsv4_tiny_config(&c, v);
    return dsv4_synth_export(dir, &c, DSV4_SYNTH_SEED, NULL, NULL);
}
