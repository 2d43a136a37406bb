/*
 * weights.c - bind DSV4 tensors by their official checkpoint names (see weights.h).
 */
#include "engine/weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"

struct binder {
    struct dsv4_weights *w;
    const struct st_set *st;
    const struct dsv4_config *c;
};

static int own(struct binder *b, void *p)
{
    struct dsv4_weights *w = b->w;
    if (w->n_owned == w->cap_owned) {
        int cap = w->cap_owned ? w->cap_owned * 2 : 256;
        void **n = realloc(w->owned, sizeof(void *) * (size_t)cap);
        if (!n) {
            free(p);
            return err_setf(ERR_NOMEM, "weights: out of memory");
        }
        w->owned = n;
        w->cap_owned = cap;
    }
    w->owned[w->n_owned++] = p;
    return 0;
}

static void shape_str(char *buf, size_t len, int ndim, const int64_t *shape)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (int i = 0; i < ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
}

/* Find `name` with the given shape and one of the allowed dtypes (mask of 1 << dtype). */
static int find(struct binder *b, const char *name, unsigned dtypes, int ndim, const int64_t *shape,
                const struct st_tensor **out)
{
    const struct st_tensor *t = st_set_find(b->st, name);
    char want[128], got[128];
    if (!t)
        return err_setf(ERR_NOTFOUND, "checkpoint: missing tensor %s", name);
    if (!(dtypes & (1u << t->dtype))) {
        char allowed[128] = "";
        size_t o = 0;
        for (int d = 0; d < ST_DTYPE_COUNT; d++)
            if (dtypes & (1u << d))
                o += (size_t)snprintf(allowed + o, sizeof allowed - o, "%s%s", o ? " or " : "",
                                      st_dtype_name((enum st_dtype)d));
        return err_setf(ERR_FORMAT, "%s: tensor %s: dtype %s expected, found %s", t->file, name,
                        allowed, st_dtype_name(t->dtype));
    }
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = t->shape[i] == shape[i];
    if (!ok) {
        shape_str(want, sizeof want, ndim, shape);
        shape_str(got, sizeof got, t->ndim, t->shape);
        return err_setf(ERR_FORMAT, "%s: tensor %s: shape %s expected, found %s", t->file, name,
                        want, got);
    }
    *out = t;
    return 0;
}

#define DT(x) (1u << (x))

/* An FP32 copy of a BF16/F32/F16 vector or matrix of `n` elements (owned by the weights). */
static int f32_copy(struct binder *b, const char *name, int ndim, const int64_t *shape, float **out)
{
    const struct st_tensor *t;
    int rc = find(b, name, DT(ST_BF16) | DT(ST_F32), ndim, shape, &t);
    if (rc)
        return rc;
    size_t n = t->nbytes / st_dtype_size(t->dtype);
    float *p = malloc(sizeof(float) * (n ? n : 1));
    if (!p)
        return err_setf(ERR_NOMEM, "weights: out of memory for %s", name);
    if (t->dtype == ST_F32)
        memcpy(p, t->data, n * sizeof(float));
    else
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
            p[i] = cpu_bf16_to_f32(h);
        }
    *out = p;
    return own(b, p);
}

static int vec(struct binder *b, const char *name, int64_t n, float **out)
{
    int64_t shape[1] = {n};
    return f32_copy(b, name, 1, shape, out);
}

/*
 * An NVFP4 matrix as ModelOpt writes it (`<prefix>.weight` U8 [rows, cols/2], `.weight_scale`
 * E4M3 [rows, cols/16], `.weight_scale_2` F32 scalar: the multiplier) or as compressed-tensors
 * does (`.weight_packed`, `.weight_scale`, `.weight_global_scale`: a divisor). NaN block scales
 * and a non-finite or non-positive global scale are refused, naming the tensor.
 */
static int qmat_nvfp4(struct binder *b, const char *prefix, int rows, int cols, struct cpu_qmat *m)
{
    char wn[320], sn[320], gn[320];
    const struct st_tensor *wt, *stn, *gt;
    int64_t sh[2] = {rows, cols / 2}, ssh[2] = {rows, cols / 16}, one[1] = {1};
    int rc, ctensors;
    if (cols % 16)
        return err_setf(ERR_FORMAT, "%s: nvfp4 matrix with %d input columns (not a multiple of 16)",
                        prefix, cols);
    snprintf(wn, sizeof wn, "%s.weight_packed", prefix);
    ctensors = st_set_find(b->st, wn) != NULL;
    if (!ctensors)
        snprintf(wn, sizeof wn, "%s.weight", prefix);
    snprintf(sn, sizeof sn, "%s.weight_scale", prefix);
    snprintf(gn, sizeof gn, "%s.%s", prefix, ctensors ? "weight_global_scale" : "weight_scale_2");
    if ((rc = find(b, wn, DT(ST_U8) | DT(ST_I8), 2, sh, &wt)) ||
        (rc = find(b, sn, DT(ST_F8_E4M3), 2, ssh, &stn)))
        return rc;
    gt = st_set_find(b->st, gn);
    if (!gt)
        return err_setf(ERR_NOTFOUND, "checkpoint: missing tensor %s", gn);
    if (gt->dtype != ST_F32 || (gt->ndim != 0 && !(gt->ndim == 1 && gt->shape[0] == one[0])))
        return err_setf(ERR_FORMAT, "%s: tensor %s: an F32 scalar expected, found %s of %d dims",
                        gt->file, gn, st_dtype_name(gt->dtype), gt->ndim);
    float g;
    memcpy(&g, gt->data, sizeof g);
    if (!(g > 0) || !isfinite(g))
        return err_setf(ERR_FORMAT, "%s: tensor %s: the global scale must be finite and > 0 (%g)",
                        gt->file, gn, (double)g);
    const uint8_t *sc = stn->data;
    for (size_t i = 0; i < (size_t)rows * (size_t)(cols / 16); i++)
        if ((sc[i] & 0x7f) == 0x7f)
            return err_setf(ERR_FORMAT, "%s: tensor %s: NaN block scale at index %zu", stn->file,
                            sn, i);
    m->fmt = CPU_W_NVFP4;
    m->w = wt->data;
    m->scale = stn->data;
    m->s2 = ctensors ? 1.0f / g : g; /* compressed-tensors stores the divisor */
    return 0;
}

/* A linear `<prefix>.weight` (+ `.scale`) of logical shape (rows, cols) stored as `fmt`. */
static int qmat(struct binder *b, const char *prefix, int rows, int cols, enum dsv4_wfmt fmt,
                struct cpu_qmat *m)
{
    char wn[320], sn[320];
    const struct st_tensor *wt, *stn;
    int rc;
    snprintf(wn, sizeof wn, "%s.weight", prefix);
    snprintf(sn, sizeof sn, "%s.scale", prefix);
    memset(m, 0, sizeof *m);
    m->rows = rows;
    m->cols = cols;
    switch (fmt) {
    case DSV4_WFMT_BF16: {
        int64_t sh[2] = {rows, cols};
        if ((rc = find(b, wn, DT(ST_BF16) | DT(ST_F32), 2, sh, &wt)))
            return rc;
        m->fmt = wt->dtype == ST_BF16 ? CPU_W_BF16 : CPU_W_F32;
        m->w = wt->data;
        return 0;
    }
    case DSV4_WFMT_FP8_BLOCK: {
        int64_t sh[2] = {rows, cols}, ssh[2] = {(rows + 127) / 128, (cols + 127) / 128};
        if ((rc = find(b, wn, DT(ST_F8_E4M3), 2, sh, &wt)))
            return rc;
        if (!st_set_find(b->st, sn)) /* HF-converted name */
            snprintf(sn, sizeof sn, "%s.weight_scale_inv", prefix);
        if ((rc = find(b, sn, DT(ST_F8_E8M0) | DT(ST_F32), 2, ssh, &stn)))
            return rc;
        m->fmt = CPU_W_FP8;
        m->w = wt->data;
        m->scale = stn->data;
        m->scale_f32 = stn->dtype == ST_F32;
        return 0;
    }
    case DSV4_WFMT_MXFP4: {
        if (cols % 32)
            return err_setf(ERR_FORMAT,
                            "%s: fp4 matrix with %d input columns (not a multiple of 32)", wn,
                            cols);
        int64_t sh[2] = {rows, cols / 2}, ssh[2] = {rows, cols / 32};
        if ((rc = find(b, wn, DT(ST_I8) | DT(ST_U8), 2, sh, &wt)))
            return rc;
        if ((rc = find(b, sn, DT(ST_F8_E8M0) | DT(ST_U8), 2, ssh, &stn)))
            return rc;
        m->fmt = CPU_W_MXFP4;
        m->w = wt->data;
        m->scale = stn->data;
        return 0;
    }
    case DSV4_WFMT_NVFP4:
        return qmat_nvfp4(b, prefix, rows, cols, m);
    }
    return err_setf(ERR_INVAL, "%s: unknown weight format", prefix);
}

static int hc(struct binder *b, const char *prefix, const char *which, int head,
              struct dsv4_hc_w *h)
{
    const struct dsv4_config *c = b->c;
    int n = c->hc_mult, nmix = head ? n : (2 + n) * n;
    char name[256];
    int64_t fsh[2] = {nmix, (int64_t)n * c->hidden_size};
    int64_t bsh[1] = {nmix}, ssh[1] = {head ? 1 : 3};
    int rc;
    snprintf(name, sizeof name, "%s%s_fn", prefix, which);
    if ((rc = f32_copy(b, name, 2, fsh, &h->fn)))
        return rc;
    snprintf(name, sizeof name, "%s%s_base", prefix, which);
    if ((rc = f32_copy(b, name, 1, bsh, &h->base)))
        return rc;
    snprintf(name, sizeof name, "%s%s_scale", prefix, which);
    return f32_copy(b, name, 1, ssh, &h->scale);
}

static int compressor(struct binder *b, const char *prefix, int ratio, int D,
                      struct dsv4_compressor_w *cw)
{
    const struct dsv4_config *c = b->c;
    char name[256];
    int rc;
    cw->ratio = ratio;
    cw->D = D;
    cw->overlap = ratio == 4;
    int width = (cw->overlap ? 2 : 1) * D;
    snprintf(name, sizeof name, "%s.wkv", prefix);
    if ((rc = qmat(b, name, width, c->hidden_size, DSV4_WFMT_BF16, &cw->wkv)))
        return rc;
    snprintf(name, sizeof name, "%s.wgate", prefix);
    if ((rc = qmat(b, name, width, c->hidden_size, DSV4_WFMT_BF16, &cw->wgate)))
        return rc;
    int64_t ash[2] = {ratio, width};
    snprintf(name, sizeof name, "%s.ape", prefix);
    if ((rc = f32_copy(b, name, 2, ash, &cw->ape)))
        return rc;
    snprintf(name, sizeof name, "%s.norm.weight", prefix);
    return vec(b, name, D, &cw->norm);
}

static int layer(struct binder *b, const char *p /* "layers.3." or "mtp.0." */,
                 const struct dsv4_layer_spec *spec, struct dsv4_layer_w *l)
{
    const struct dsv4_config *c = b->c;
    const int d = c->hidden_size, H = c->n_heads, hd = c->head_dim, E = c->n_routed_experts;
    const int I = c->moe_inter;
    char n[256];
    int rc;
#define NAME(...) snprintf(n, sizeof n, __VA_ARGS__)
#define TRY(x)                                                                                     \
    do {                                                                                           \
        if ((rc = (x)))                                                                            \
            return rc;                                                                             \
    } while (0)
    l->spec = spec;
    NAME("%sattn_norm.weight", p);
    TRY(vec(b, n, d, &l->attn_norm));
    NAME("%sffn_norm.weight", p);
    TRY(vec(b, n, d, &l->ffn_norm));
    TRY(hc(b, p, "hc_attn", 0, &l->hc_attn));
    TRY(hc(b, p, "hc_ffn", 0, &l->hc_ffn));
    NAME("%sattn.wq_a", p);
    TRY(qmat(b, n, c->q_lora_rank, d, c->linear_fmt, &l->wq_a));
    NAME("%sattn.q_norm.weight", p);
    TRY(vec(b, n, c->q_lora_rank, &l->q_norm));
    NAME("%sattn.wq_b", p);
    TRY(qmat(b, n, H * hd, c->q_lora_rank, c->linear_fmt, &l->wq_b));
    NAME("%sattn.wkv", p);
    TRY(qmat(b, n, hd, d, c->linear_fmt, &l->wkv));
    NAME("%sattn.kv_norm.weight", p);
    TRY(vec(b, n, hd, &l->kv_norm));
    NAME("%sattn.wo_a", p);
    TRY(qmat(b, n, c->o_groups * c->o_lora_rank, H * hd / c->o_groups, c->linear_fmt, &l->wo_a));
    NAME("%sattn.wo_b", p);
    TRY(qmat(b, n, d, c->o_groups * c->o_lora_rank, c->linear_fmt, &l->wo_b));
    NAME("%sattn.attn_sink", p);
    TRY(vec(b, n, H, &l->attn_sink));
    if (spec->ratio) {
        NAME("%sattn.compressor", p);
        TRY(compressor(b, n, spec->ratio, hd, &l->comp));
    }
    if (spec->attn == DSV4_ATTN_CSA) {
        NAME("%sattn.indexer.compressor", p);
        TRY(compressor(b, n, spec->ratio, c->index_head_dim, &l->icomp));
        NAME("%sattn.indexer.wq_b", p);
        TRY(qmat(b, n, c->index_n_heads * c->index_head_dim, c->q_lora_rank, c->linear_fmt,
                 &l->idx_wq_b));
        NAME("%sattn.indexer.weights_proj", p);
        TRY(qmat(b, n, c->index_n_heads, d, DSV4_WFMT_BF16, &l->idx_wproj));
    }
    NAME("%sffn.gate", p);
    TRY(qmat(b, n, E, d, DSV4_WFMT_BF16, &l->gate));
    if (spec->router == DSV4_ROUTER_HASH) {
        const struct st_tensor *t;
        int64_t sh[2] = {c->vocab_size, c->n_experts_per_tok};
        NAME("%sffn.gate.tid2eid", p);
        TRY(find(b, n, DT(ST_I64) | DT(ST_I32), 2, sh, &t));
        l->tid2eid = t->data;
        l->tid2eid_i32 = t->dtype == ST_I32;
        size_t cnt = (size_t)sh[0] * (size_t)sh[1];
        for (size_t i = 0; i < cnt; i++) {
            int64_t v =
                dsv4_tid2eid(l, (int)(i / (size_t)sh[1]), (int)sh[1], (int)(i % (size_t)sh[1]));
            if (v < 0 || v >= E)
                return err_setf(ERR_FORMAT,
                                "%s: tensor %s: entry %zu = %lld is not an expert id < %d", t->file,
                                n, i, (long long)v, E);
        }
    } else {
        NAME("%sffn.gate.bias", p);
        TRY(vec(b, n, E, &l->gate_bias));
    }
    l->w1 = calloc((size_t)E * 3, sizeof(struct cpu_qmat));
    if (!l->w1)
        return err_setf(ERR_NOMEM, "weights: out of memory");
    TRY(own(b, l->w1));
    l->w2 = l->w1 + E;
    l->w3 = l->w2 + E;
    for (int e = 0; e < E; e++) {
        NAME("%sffn.experts.%d.w1", p, e);
        TRY(qmat(b, n, I, d, c->expert_fmt, &l->w1[e]));
        NAME("%sffn.experts.%d.w2", p, e);
        TRY(qmat(b, n, d, I, c->expert_fmt, &l->w2[e]));
        NAME("%sffn.experts.%d.w3", p, e);
        TRY(qmat(b, n, I, d, c->expert_fmt, &l->w3[e]));
    }
    l->has_shared = c->n_shared_experts > 0;
    if (l->has_shared) {
        NAME("%sffn.shared_experts.w1", p);
        TRY(qmat(b, n, I, d, c->linear_fmt, &l->sh_w1));
        NAME("%sffn.shared_experts.w2", p);
        TRY(qmat(b, n, d, I, c->linear_fmt, &l->sh_w2));
        NAME("%sffn.shared_experts.w3", p);
        TRY(qmat(b, n, I, d, c->linear_fmt, &l->sh_w3));
    }
    if (spec->is_mtp) {
        NAME("%se_proj", p);
        TRY(qmat(b, n, d, d, c->linear_fmt, &l->e_proj));
        NAME("%sh_proj", p);
        TRY(qmat(b, n, d, d, c->linear_fmt, &l->h_proj));
        NAME("%senorm.weight", p);
        TRY(vec(b, n, d, &l->enorm));
        NAME("%shnorm.weight", p);
        TRY(vec(b, n, d, &l->hnorm));
        NAME("%snorm.weight", p);
        TRY(vec(b, n, d, &l->norm));
        TRY(hc(b, p, "hc_head", 1, &l->hc_head));
    }
#undef NAME
#undef TRY
    return 0;
}

int64_t dsv4_tid2eid(const struct dsv4_layer_w *l, int tok, int K, int j)
{
    size_t i = (size_t)tok * (size_t)K + (size_t)j;
    if (l->tid2eid_i32) {
        int32_t v;
        memcpy(&v, (const uint8_t *)l->tid2eid + 4 * i, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, (const uint8_t *)l->tid2eid + 8 * i, 8);
    return v;
}

int dsv4_weights_bind(struct dsv4_weights *w, const struct st_set *st, const struct dsv4_config *c,
                      const struct dsv4_schedule *s)
{
    struct binder b = {w, st, c};
    int rc;
    memset(w, 0, sizeof *w);
    w->n_layers_total = s->n_layers + s->n_mtp;
    w->layers = calloc((size_t)w->n_layers_total, sizeof *w->layers);
    if (!w->layers)
        return err_setf(ERR_NOMEM, "weights: out of memory");
    if ((rc = qmat(&b, "embed", c->vocab_size, c->hidden_size, DSV4_WFMT_BF16, &w->embed)) ||
        (rc = qmat(&b, "head", c->vocab_size, c->hidden_size, DSV4_WFMT_BF16, &w->head)) ||
        (rc = vec(&b, "norm.weight", c->hidden_size, &w->norm)) ||
        (rc = hc(&b, "", "hc_head", 1, &w->hc_head)))
        goto fail;
    for (int i = 0; i < w->n_layers_total; i++) {
        char prefix[64];
        if (i < s->n_layers)
            snprintf(prefix, sizeof prefix, "layers.%d.", i);
        else
            snprintf(prefix, sizeof prefix, "mtp.%d.", i - s->n_layers);
        if ((rc = layer(&b, prefix, &s->layers[i], &w->layers[i])))
            goto fail;
    }
    return 0;
fail:
    dsv4_weights_free(w);
    return rc;
}

void dsv4_weights_free(struct dsv4_weights *w)
{
    if (!w)
        return;
    for (int i = 0; i < w->n_owned; i++)
        free(w->owned[i]);
    free(w->owned);
    free(w->layers);
    memset(w, 0, sizeof *w);
}
