/*
 * model.c - open a DSV4 model and run its forward pass on the CPU (see model.h).
 *
 * Shapes: T rows (tokens of all sequences of the step, concatenated), d = hidden_size,
 * n = hc_mult, H heads of dim c (= head_dim), r = rope dims (the trailing dims of each head),
 * Hi/Di indexer heads/dim, E experts, K experts per token, I = moe_intermediate_size.
 */
#include "engine/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/tiny.h"
#include "kernels/cpu/cpu.h"

/* ---- open / free ---- */

/* Schedule, weights and RoPE tables of a model whose cfg and st are set. */
static int model_finish(struct dsv4_model *m)
{
    const struct dsv4_config *c = &m->cfg;
    int rc;
    if ((rc = dsv4_schedule_build(&m->sched, c)) ||
        (rc = dsv4_weights_bind(&m->w, m->st, c, &m->sched)))
        return rc;
    if (c->rope_dim / 2 > 64)
        return err_setf(ERR_CONFIG, "%s: qk_rope_head_dim %d > 128 unsupported", m->name,
                        c->rope_dim);
    cpu_rope_inv_freq(c->rope_dim, c->rope_theta, 0, 1, 1, 0, 0, m->inv_freq_main);
    cpu_rope_inv_freq(c->rope_dim, c->compress_rope_theta, c->yarn, c->yarn_factor,
                      c->yarn_original_max_pos, c->yarn_beta_fast, c->yarn_beta_slow,
                      m->inv_freq_compress);
    m->numerics = DSV4_NUMERICS_MODEL;
    return 0;
}

int dsv4_model_open_set(struct dsv4_model **out, const struct dsv4_config *cfg, struct st_set *st,
                        const char *name)
{
    struct dsv4_model *m = calloc(1, sizeof *m);
    int rc;
    if (!m) {
        st_set_free(st);
        return err_setf(ERR_NOMEM, "model: out of memory");
    }
    m->cfg = *cfg;
    m->st = st;
    snprintf(m->name, sizeof m->name, "%s", name);
    if ((rc = model_finish(m))) {
        dsv4_model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

int dsv4_model_open(struct dsv4_model **out, const char *spec)
{
    struct dsv4_config cfg;
    struct st_set *st = NULL;
    int rc;
    if (!strncmp(spec, "builtin:", 8)) {
        enum dsv4_variant v;
        if (!strcmp(spec + 8, "tiny-flash"))
            v = DSV4_VARIANT_FLASH;
        else if (!strcmp(spec + 8, "tiny-pro"))
            v = DSV4_VARIANT_PRO;
        else
            return err_setf(ERR_NOTFOUND,
                            "unknown built-in model \"%s\" (builtin:tiny-flash, builtin:tiny-pro)",
                            spec);
        if ((rc = dsv4_tiny_build(v, &cfg, &st)))
            return rc;
    } else if ((rc = dsv4_config_load_dir(&cfg, spec)) || (rc = st_set_open_dir(&st, spec))) {
        return rc;
    }
    return dsv4_model_open_set(out, &cfg, st, spec);
}

void dsv4_model_free(struct dsv4_model *m)
{
    if (!m)
        return;
    dsv4_weights_free(&m->w);
    st_set_free(m->st);
    free(m);
}

/* ---- sequence state ---- */

static size_t comp_state_floats(int ratio, int D)
{
    int coff = ratio == 4 ? 2 : 1;
    return (size_t)coff * ratio * coff * D;
}

size_t dsv4_seq_state_bytes(const struct dsv4_model *m)
{
    const struct dsv4_config *c = &m->cfg;
    size_t n = 0;
    for (int i = 0; i < c->n_layers + c->n_mtp; i++) {
        const struct dsv4_layer_spec *sp = &m->sched.layers[i];
        n += (size_t)c->sliding_window * (size_t)c->head_dim;
        if (sp->ratio)
            n += 2 * comp_state_floats(sp->ratio, c->head_dim);
        if (sp->attn == DSV4_ATTN_CSA)
            n += 2 * comp_state_floats(sp->ratio, c->index_head_dim);
    }
    return n * sizeof(float);
}

static void release_blocks(struct dsv4_seq_state *s)
{
    for (int i = 0; i < s->n_blocks; i++)
        dsv4_kv_block_unref(s->pool, s->blocks[i]);
    s->n_blocks = 0;
}

void dsv4_seq_state_reset(const struct dsv4_model *m, struct dsv4_seq_state *s)
{
    s->pos = 0;
    s->mtp_pos = 0;
    release_blocks(s);
    for (int i = 0; i < s->n_layers; i++) {
        const struct dsv4_layer_spec *sp = &m->sched.layers[i];
        struct dsv4_layer_state *l = &s->layers[i];
        l->n_entries = 0;
        if (sp->ratio)
            cpu_compressor_reset(l->comp_kv, l->comp_sc, sp->ratio, m->cfg.head_dim, sp->ratio == 4);
        if (sp->attn == DSV4_ATTN_CSA)
            cpu_compressor_reset(l->icomp_kv, l->icomp_sc, sp->ratio, m->cfg.index_head_dim, 1);
    }
}

int dsv4_seq_state_new(const struct dsv4_model *m, struct dsv4_kv_pool *pool,
                       struct dsv4_seq_state **out)
{
    const struct dsv4_config *c = &m->cfg;
    struct dsv4_seq_state *s = calloc(1, sizeof *s);
    int rc;
    if (!s)
        return err_setf(ERR_NOMEM, "state: out of memory");
    if (!pool) {
        if ((rc = dsv4_kv_pool_new(&pool, c, &m->sched, 0))) {
            free(s);
            return rc;
        }
        s->own_pool = 1;
    }
    s->pool = pool;
    s->n_layers = c->n_layers + c->n_mtp;
    s->layers = calloc((size_t)s->n_layers, sizeof *s->layers);
    if (!s->layers)
        goto nomem;
    for (int i = 0; i < s->n_layers; i++) {
        const struct dsv4_layer_spec *sp = &m->sched.layers[i];
        struct dsv4_layer_state *l = &s->layers[i];
        l->win = calloc((size_t)c->sliding_window * (size_t)c->head_dim, sizeof(float));
        if (!l->win)
            goto nomem;
        if (sp->ratio) {
            size_t n = comp_state_floats(sp->ratio, c->head_dim);
            l->comp_kv = malloc(n * sizeof(float));
            l->comp_sc = malloc(n * sizeof(float));
            if (!l->comp_kv || !l->comp_sc)
                goto nomem;
        }
        if (sp->attn == DSV4_ATTN_CSA) {
            size_t n = comp_state_floats(sp->ratio, c->index_head_dim);
            l->icomp_kv = malloc(n * sizeof(float));
            l->icomp_sc = malloc(n * sizeof(float));
            if (!l->icomp_kv || !l->icomp_sc)
                goto nomem;
        }
    }
    dsv4_seq_state_reset(m, s);
    *out = s;
    return 0;
nomem:
    dsv4_seq_state_free(s);
    return err_setf(ERR_NOMEM, "state: out of memory");
}

void dsv4_seq_state_free(struct dsv4_seq_state *s)
{
    if (!s)
        return;
    if (s->pool)
        release_blocks(s);
    for (int i = 0; s->layers && i < s->n_layers; i++) {
        struct dsv4_layer_state *l = &s->layers[i];
        free(l->win);
        free(l->comp_kv);
        free(l->comp_sc);
        free(l->icomp_kv);
        free(l->icomp_sc);
    }
    if (s->own_pool)
        dsv4_kv_pool_free(s->pool);
    free(s->blocks);
    free(s->layers);
    free(s);
}

int dsv4_seq_reserve(struct dsv4_seq_state *s, long tokens)
{
    int need = dsv4_kv_blocks_for(tokens);
    if (need <= s->n_blocks)
        return 0;
    if (need > s->cap_blocks) {
        int cap = s->cap_blocks ? s->cap_blocks : 8;
        while (cap < need)
            cap *= 2;
        int32_t *nb = realloc(s->blocks, sizeof *nb * (size_t)cap);
        if (!nb)
            return err_setf(ERR_NOMEM, "state: out of memory for the block table");
        s->blocks = nb;
        s->cap_blocks = cap;
    }
    struct dsv4_kv_pool *p = s->pool;
    if (s->own_pool && p->n_free < need - s->n_blocks) {
        int rc = dsv4_kv_pool_grow(p, p->n_blocks + need - s->n_blocks + p->n_blocks / 2);
        if (rc)
            return rc;
    }
    if (p->n_free < need - s->n_blocks)
        return err_setf(ERR_BUSY, "kv cache: %d blocks needed, %d free", need - s->n_blocks,
                        p->n_free);
    while (s->n_blocks < need)
        dsv4_kv_block_alloc(p, &s->blocks[s->n_blocks++]);
    return 0;
}

int dsv4_seq_state_fork(const struct dsv4_model *m, struct dsv4_seq_state *dst,
                        const struct dsv4_seq_state *src)
{
    const struct dsv4_config *c = &m->cfg;
    if (dst->pool != src->pool)
        return err_setf(ERR_INVAL, "state fork: different kv pools");
    dsv4_seq_state_reset(m, dst);
    int full = (int)(src->pos / DSV4_BLOCK_TOKENS), used = dsv4_kv_blocks_for(src->pos);
    int rc;
    if (used > dst->cap_blocks) {
        int32_t *nb = realloc(dst->blocks, sizeof *nb * (size_t)used);
        if (!nb)
            return err_setf(ERR_NOMEM, "state: out of memory for the block table");
        dst->blocks = nb;
        dst->cap_blocks = used;
    }
    for (int i = 0; i < full; i++) {
        dsv4_kv_block_ref(dst->pool, src->blocks[i]);
        dst->blocks[dst->n_blocks++] = src->blocks[i];
    }
    if (used > full) { /* the partially filled block is written by both: copy it */
        if ((rc = dsv4_seq_reserve(dst, src->pos)))
            return rc;
        struct dsv4_kv_pool *p = dst->pool;
        memcpy(p->data + (size_t)dst->blocks[full] * p->block_floats,
               p->data + (size_t)src->blocks[full] * p->block_floats,
               sizeof(float) * p->block_floats);
    }
    for (int i = 0; i < dst->n_layers; i++) {
        const struct dsv4_layer_spec *sp = &m->sched.layers[i];
        struct dsv4_layer_state *d = &dst->layers[i];
        const struct dsv4_layer_state *s = &src->layers[i];
        memcpy(d->win, s->win, sizeof(float) * (size_t)c->sliding_window * (size_t)c->head_dim);
        if (sp->ratio) {
            size_t n = comp_state_floats(sp->ratio, c->head_dim) * sizeof(float);
            memcpy(d->comp_kv, s->comp_kv, n);
            memcpy(d->comp_sc, s->comp_sc, n);
        }
        if (sp->attn == DSV4_ATTN_CSA) {
            size_t n = comp_state_floats(sp->ratio, c->index_head_dim) * sizeof(float);
            memcpy(d->icomp_kv, s->icomp_kv, n);
            memcpy(d->icomp_sc, s->icomp_sc, n);
        }
        d->n_entries = s->n_entries;
    }
    dst->pos = src->pos;
    dst->mtp_pos = src->mtp_pos;
    return 0;
}

/* ---- the walk ---- */

/* One sequence's chunk of rows in this step. */
struct chunk {
    struct dsv4_seq_state *st;
    long p0;              /* position of its first row */
    int n, row0;          /* rows row0 .. row0+n-1 */
    const int32_t *tokens;
};

/* A view of rows [r0, r0+nrows) of a matrix (r0 a multiple of 128 for FP8 block scales). */
static struct cpu_qmat qmat_rows(const struct cpu_qmat *m, int r0, int nrows)
{
    struct cpu_qmat v = *m;
    v.rows = nrows;
    switch (m->fmt) {
    case CPU_W_F32: v.w = (const float *)m->w + (size_t)r0 * m->cols; break;
    case CPU_W_BF16: v.w = (const uint16_t *)m->w + (size_t)r0 * m->cols; break;
    case CPU_W_FP8:
        v.w = (const uint8_t *)m->w + (size_t)r0 * m->cols;
        v.scale = (const uint8_t *)m->scale +
                  (size_t)(r0 / 128) * (size_t)((m->cols + 127) / 128) * (m->scale_f32 ? 4 : 1);
        break;
    case CPU_W_MXFP4:
        v.w = (const uint8_t *)m->w + (size_t)r0 * (m->cols / 2);
        v.scale = (const uint8_t *)m->scale + (size_t)r0 * (m->cols / 32);
        break;
    case CPU_W_NVFP4:
        v.w = (const uint8_t *)m->w + (size_t)r0 * (m->cols / 2);
        v.scale = (const uint8_t *)m->scale + (size_t)r0 * (m->cols / 16);
        break;
    }
    return v;
}

/* y = W x with the model's activation quantisation when W is an FP8/FP4 linear. */
static void linear_q(const struct dsv4_model *m, const struct cpu_qmat *W, float *x, int T, float *y)
{
    if (m->numerics == DSV4_NUMERICS_MODEL &&
        (W->fmt == CPU_W_FP8 || W->fmt == CPU_W_MXFP4 || W->fmt == CPU_W_NVFP4))
        cpu_act_quant_fp8(x, T, W->cols);
    cpu_linear(W, x, T, y);
}

static void *xalloc(size_t n, int *fail)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        *fail = 1;
    return p;
}

/*
 * The entry of a sub-layer: R (T, n, d) = X (the residual streams kept for hc_post), then per row
 * hc_pre (collapsed input, post gates, Sinkhorn mixing) and the sub-layer's RMSNorm into x (T, d).
 */
static void sublayer_in(const struct dsv4_model *m, const struct dsv4_hc_w *hc, const float *norm,
                        const float *X, int T, float *R, float *x, float *post, float *comb)
{
    const struct dsv4_config *c = &m->cfg;
    const int d = c->hidden_size, n = c->hc_mult;
    const float eps = (float)c->rms_norm_eps;
    memcpy(R, X, sizeof(float) * (size_t)T * n * d);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        cpu_hc_pre(R + (size_t)t * n * d, n, d, hc->fn, hc->base, hc->scale, c->hc_sinkhorn_iters,
                   (float)c->hc_eps, eps, x + (size_t)t * d, post + (size_t)t * n,
                   comb + (size_t)t * n * n);
        cpu_rmsnorm(x + (size_t)t * d, norm, d, eps, x + (size_t)t * d);
    }
}

/* Compress one sequence's chunk through a compressor: a, z (T, coff*D) projections of all rows. */
static int compress_chunk(const struct dsv4_model *m, int li, const struct dsv4_compressor_w *cw,
                          float *kv_state, float *sc_state, const struct chunk *ch, const float *a,
                          float *z, int indexer)
{
    const struct dsv4_config *c = &m->cfg;
    const int D = cw->D, width = (cw->overlap ? 2 : 1) * D, r = c->rope_dim;
    struct dsv4_seq_state *st = ch->st;
    struct dsv4_layer_state *ls = &st->layers[li];
    float pooled[4096];
    for (int i = 0; i < ch->n; i++) {
        long pos = ch->p0 + i;
        const float *ar = a + (size_t)(ch->row0 + i) * width;
        float *zr = z + (size_t)(ch->row0 + i) * width;
        const float *ape = cw->ape + (size_t)(pos % cw->ratio) * width;
        for (int k = 0; k < width; k++)
            zr[k] += ape[k];
        if (!cpu_compressor_push(kv_state, sc_state, cw->ratio, D, cw->overlap, pos, ar, zr,
                                 pooled))
            continue;
        long idx = pos / cw->ratio;
        float *e = indexer ? dsv4_kv_ikey(st->pool, st->blocks, li, idx)
                           : dsv4_kv_entry(st->pool, st->blocks, li, idx);
        cpu_rmsnorm(pooled, cw->norm, D, (float)c->rms_norm_eps, e);
        cpu_rope(e + D - r, r, m->inv_freq_compress, idx * cw->ratio, 0);
        if (m->numerics == DSV4_NUMERICS_MODEL) {
            if (indexer) {
                cpu_hadamard(e, D);
                cpu_fp4_roundtrip(e, D, 32);
            } else {
                cpu_fp8_roundtrip(e, D - r, 64);
            }
        }
        if (!indexer)
            ls->n_entries = idx + 1;
    }
    return 0;
}

/* The attention sub-layer of layer li on rows X (T, n, d) in place (with its mHC). */
static int attention_sublayer(struct dsv4_model *m, int li, float *X, int T,
                              const struct chunk *chunks, int nchunk)
{
    const struct dsv4_config *c = &m->cfg;
    const struct dsv4_layer_w *lw = &m->w.layers[li];
    const struct dsv4_layer_spec *sp = &m->sched.layers[li];
    const int d = c->hidden_size, n = c->hc_mult, H = c->n_heads, hd = c->head_dim;
    const int r = c->rope_dim, nope = hd - r, W = c->sliding_window, ql = c->q_lora_rank;
    const int Hi = c->index_n_heads, Di = c->index_head_dim;
    const float eps = (float)c->rms_norm_eps;
    const float *inv_freq = sp->rope == DSV4_ROPE_MAIN ? m->inv_freq_main : m->inv_freq_compress;
    int fail = 0, rc = 0;
    int width = sp->ratio == 4 ? 2 * hd : hd;
    float *x = xalloc(sizeof(float) * (size_t)T * d, &fail);
    float *post = xalloc(sizeof(float) * (size_t)T * n, &fail);
    float *comb = xalloc(sizeof(float) * (size_t)T * n * n, &fail);
    float *R = xalloc(sizeof(float) * (size_t)T * n * d, &fail);
    float *qlat = xalloc(sizeof(float) * (size_t)T * ql, &fail);
    float *qlat_q = xalloc(sizeof(float) * (size_t)T * ql, &fail);
    float *q = xalloc(sizeof(float) * (size_t)T * H * hd, &fail);
    float *kv = xalloc(sizeof(float) * (size_t)T * hd, &fail);
    float *o = xalloc(sizeof(float) * (size_t)T * H * hd, &fail);
    float *zo = xalloc(sizeof(float) * (size_t)T * c->o_groups * c->o_lora_rank, &fail);
    float *out = xalloc(sizeof(float) * (size_t)T * d, &fail);
    float *ca = NULL, *cz = NULL, *ia = NULL, *iz = NULL, *qi = NULL, *wi = NULL;
    int *sel = NULL;
    if (sp->ratio) {
        ca = xalloc(sizeof(float) * (size_t)T * width, &fail);
        cz = xalloc(sizeof(float) * (size_t)T * width, &fail);
    }
    if (sp->attn == DSV4_ATTN_CSA) {
        ia = xalloc(sizeof(float) * (size_t)T * 2 * Di, &fail);
        iz = xalloc(sizeof(float) * (size_t)T * 2 * Di, &fail);
        qi = xalloc(sizeof(float) * (size_t)T * Hi * Di, &fail);
        wi = xalloc(sizeof(float) * (size_t)T * Hi, &fail);
        sel = xalloc(sizeof(int) * (size_t)T * c->index_topk, &fail);
    }
    if (fail) {
        rc = err_setf(ERR_NOMEM, "forward: out of memory (layer %d, %d rows)", li, T);
        goto out;
    }
    sublayer_in(m, &lw->hc_attn, lw->attn_norm, X, T, R, x, post, comb);
    /* compressor projections use x unquantised (FP32 in the reference) */
    if (sp->ratio) {
        cpu_linear(&lw->comp.wkv, x, T, ca);
        cpu_linear(&lw->comp.wgate, x, T, cz);
    }
    if (sp->attn == DSV4_ATTN_CSA) {
        cpu_linear(&lw->icomp.wkv, x, T, ia);
        cpu_linear(&lw->icomp.wgate, x, T, iz);
        cpu_linear(&lw->idx_wproj, x, T, wi);
    }
    /* q latent, q heads */
    {
        float *xq = out; /* scratch copy of x for activation quantisation */
        memcpy(xq, x, sizeof(float) * (size_t)T * d);
        linear_q(m, &lw->wq_a, xq, T, qlat);
        memcpy(xq, x, sizeof(float) * (size_t)T * d);
        linear_q(m, &lw->wkv, xq, T, kv);
    }
    for (int t = 0; t < T; t++)
        cpu_rmsnorm(qlat + (size_t)t * ql, lw->q_norm, ql, eps, qlat + (size_t)t * ql);
    memcpy(qlat_q, qlat, sizeof(float) * (size_t)T * ql);
    linear_q(m, &lw->wq_b, qlat_q, T, q);
    if (sp->attn == DSV4_ATTN_CSA) {
        memcpy(qlat_q, qlat, sizeof(float) * (size_t)T * ql);
        linear_q(m, &lw->idx_wq_b, qlat_q, T, qi);
    }
    for (int ci = 0; ci < nchunk; ci++)
        for (int i = 0; i < chunks[ci].n; i++) {
            int t = chunks[ci].row0 + i;
            long pos = chunks[ci].p0 + i;
            for (int h = 0; h < H; h++) {
                float *qh = q + ((size_t)t * H + h) * hd;
                cpu_rmsnorm(qh, NULL, hd, eps, qh);
                cpu_rope(qh + nope, r, inv_freq, pos, 0);
            }
            float *kvt = kv + (size_t)t * hd;
            cpu_rmsnorm(kvt, lw->kv_norm, hd, eps, kvt);
            cpu_rope(kvt + nope, r, inv_freq, pos, 0);
            if (m->numerics == DSV4_NUMERICS_MODEL)
                cpu_fp8_roundtrip(kvt, nope, 64);
            if (sp->attn == DSV4_ATTN_CSA) {
                for (int h = 0; h < Hi; h++) {
                    float *qh = qi + ((size_t)t * Hi + h) * Di;
                    cpu_rope(qh + Di - r, r, inv_freq, pos, 0);
                    if (m->numerics == DSV4_NUMERICS_MODEL) {
                        cpu_hadamard(qh, Di);
                        cpu_fp4_roundtrip(qh, Di, 32);
                    }
                }
                float ws = 1.0f / sqrtf((float)Hi);
                for (int h = 0; h < Hi; h++)
                    wi[(size_t)t * Hi + h] *= ws;
            }
        }
    /* compressors, token by token in position order */
    for (int ci = 0; ci < nchunk && !rc; ci++) {
        struct dsv4_layer_state *ls = &chunks[ci].st->layers[li];
        if (sp->ratio)
            rc = compress_chunk(m, li, &lw->comp, ls->comp_kv, ls->comp_sc, &chunks[ci], ca, cz, 0);
        if (!rc && sp->attn == DSV4_ATTN_CSA) {
            /* the indexer's entries share the main compressor's count (same ratio) */
            rc = compress_chunk(m, li, &lw->icomp, ls->icomp_kv, ls->icomp_sc, &chunks[ci], ia, iz, 1);
        }
    }
    if (rc)
        goto out;
    /* indexer top-k (CSA) */
    if (sp->attn == DSV4_ATTN_CSA) {
        for (int ci = 0; ci < nchunk; ci++) {
            const struct dsv4_seq_state *st = chunks[ci].st;
            const struct dsv4_layer_state *ls = &st->layers[li];
#pragma omp parallel
            {
                float *scores = malloc(sizeof(float) * (size_t)(ls->n_entries + 1));
#pragma omp for schedule(dynamic, 4)
                for (int i = 0; i < chunks[ci].n; i++) {
                    int t = chunks[ci].row0 + i;
                    long pos = chunks[ci].p0 + i;
                    int nvalid = (int)((pos + 1) / sp->ratio);
                    int k = nvalid < c->index_topk ? nvalid : c->index_topk;
                    int *out_sel = sel + (size_t)t * c->index_topk;
                    if (!scores) {
                        fail = 1;
                        continue;
                    }
                    /* keys are contiguous within a block (DSV4_BLOCK_TOKENS / ratio of them) */
                    const int per = DSV4_BLOCK_TOKENS / sp->ratio;
                    for (int s0 = 0; s0 < nvalid; s0 += per)
                        cpu_indexer_scores(qi + (size_t)t * Hi * Di, wi + (size_t)t * Hi, Hi, Di,
                                           dsv4_kv_ikey(st->pool, st->blocks, li, s0),
                                           nvalid - s0 < per ? nvalid - s0 : per,
                                           1.0f / sqrtf((float)Di), scores + s0);
                    cpu_topk(scores, nvalid, k, out_sel);
                }
                free(scores);
            }
        }
        if (fail) {
            rc = err_setf(ERR_NOMEM, "forward: out of memory in the indexer (layer %d)", li);
            goto out;
        }
    }
    /* attention over window + compressed entries, then inverse RoPE on the output */
    for (int ci = 0; ci < nchunk; ci++) {
        const struct chunk *ch = &chunks[ci];
        const struct dsv4_seq_state *st = ch->st;
        struct dsv4_layer_state *ls = &st->layers[li];
        int maxk = W + (sp->attn == DSV4_ATTN_CSA ? c->index_topk : ls->n_entries);
#pragma omp parallel
        {
            const float **keys = malloc(sizeof(float *) * (size_t)(maxk + 1));
            float *work = malloc(sizeof(float) * (size_t)(maxk + 1));
#pragma omp for schedule(dynamic, 4)
            for (int i = 0; i < ch->n; i++) {
                int t = ch->row0 + i;
                long pos = ch->p0 + i;
                int nk = 0;
                if (!keys || !work) {
                    fail = 1;
                    continue;
                }
                for (long p = pos - W + 1 < 0 ? 0 : pos - W + 1; p <= pos; p++)
                    keys[nk++] = p >= ch->p0 ? kv + (size_t)(ch->row0 + (p - ch->p0)) * hd
                                             : ls->win + (size_t)(p % W) * hd;
                if (sp->attn == DSV4_ATTN_CSA) {
                    int nvalid = (int)((pos + 1) / sp->ratio);
                    int k = nvalid < c->index_topk ? nvalid : c->index_topk;
                    for (int j = 0; j < k; j++)
                        keys[nk++] = dsv4_kv_entry(st->pool, st->blocks, li,
                                                   sel[(size_t)t * c->index_topk + j]);
                } else if (sp->attn == DSV4_ATTN_HCA) {
                    int nvalid = (int)((pos + 1) / sp->ratio);
                    for (int j = 0; j < nvalid; j++)
                        keys[nk++] = dsv4_kv_entry(st->pool, st->blocks, li, j);
                }
                float *ot = o + (size_t)t * H * hd;
                cpu_sink_attention(q + (size_t)t * H * hd, H, hd, keys, nk, lw->attn_sink,
                                   1.0f / sqrtf((float)hd), ot, work);
                for (int h = 0; h < H; h++)
                    cpu_rope(ot + (size_t)h * hd + nope, r, inv_freq, pos, 1);
            }
            free(keys);
            free(work);
        }
        if (fail) {
            rc = err_setf(ERR_NOMEM, "forward: out of memory in attention (layer %d)", li);
            goto out;
        }
        /* the window ring takes the chunk's latents (the last W of them matter) */
        for (int i = ch->n > W ? ch->n - W : 0; i < ch->n; i++)
            memcpy(ls->win + (size_t)((ch->p0 + i) % W) * hd, kv + (size_t)(ch->row0 + i) * hd,
                   sizeof(float) * (size_t)hd);
    }
    /* grouped output projection: group g's heads -> d_g, then wo_b */
    {
        const int g = c->o_groups, dg = c->o_lora_rank, gin = H * hd / g;
        float *og = xalloc(sizeof(float) * (size_t)T * gin, &fail);
        float *zg = xalloc(sizeof(float) * (size_t)T * dg, &fail);
        if (fail) {
            free(og);
            free(zg);
            rc = err_setf(ERR_NOMEM, "forward: out of memory (layer %d)", li);
            goto out;
        }
        for (int gi = 0; gi < g; gi++) {
            struct cpu_qmat wv = qmat_rows(&lw->wo_a, gi * dg, dg);
            for (int t = 0; t < T; t++)
                memcpy(og + (size_t)t * gin, o + (size_t)t * H * hd + (size_t)gi * gin,
                       sizeof(float) * (size_t)gin);
            cpu_linear(&wv, og, T, zg); /* wo_a runs in BF16/FP32 in the reference */
            for (int t = 0; t < T; t++)
                memcpy(zo + (size_t)t * g * dg + (size_t)gi * dg, zg + (size_t)t * dg,
                       sizeof(float) * (size_t)dg);
        }
        free(og);
        free(zg);
        linear_q(m, &lw->wo_b, zo, T, out);
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++)
        cpu_hc_post(out + (size_t)t * d, R + (size_t)t * n * d, post + (size_t)t * n,
                    comb + (size_t)t * n * n, n, d, X + (size_t)t * n * d);
out:
    free(x), free(post), free(comb), free(R), free(qlat), free(qlat_q), free(q), free(kv);
    free(o), free(zo), free(out), free(ca), free(cz), free(ia), free(iz), free(qi), free(wi);
    free(sel);
    return rc;
}

/* The MoE sub-layer of layer li on rows X (T, n, d) in place (with its mHC). tokens (T). */
static int moe_sublayer(struct dsv4_model *m, int li, float *X, int T, const int32_t *tokens)
{
    const struct dsv4_config *c = &m->cfg;
    const struct dsv4_layer_w *lw = &m->w.layers[li];
    const struct dsv4_layer_spec *sp = &m->sched.layers[li];
    const int d = c->hidden_size, n = c->hc_mult, E = c->n_routed_experts;
    const int K = c->n_experts_per_tok, I = c->moe_inter;
    const float limit = (float)c->swiglu_limit;
    int fail = 0, rc = 0;
    float *x = xalloc(sizeof(float) * (size_t)T * d, &fail);
    float *post = xalloc(sizeof(float) * (size_t)T * n, &fail);
    float *comb = xalloc(sizeof(float) * (size_t)T * n * n, &fail);
    float *R = xalloc(sizeof(float) * (size_t)T * n * d, &fail);
    float *logits = xalloc(sizeof(float) * (size_t)T * E, &fail);
    int *idx = xalloc(sizeof(int) * (size_t)T * K, &fail);
    float *wts = xalloc(sizeof(float) * (size_t)T * K, &fail);
    float *ys = xalloc(sizeof(float) * (size_t)T * K * d, &fail); /* per (row, slot) */
    float *xs = xalloc(sizeof(float) * (size_t)T * K * d, &fail); /* gathered inputs */
    float *g = xalloc(sizeof(float) * (size_t)T * K * I, &fail);
    float *u = xalloc(sizeof(float) * (size_t)T * K * I, &fail);
    float *yo = xalloc(sizeof(float) * (size_t)T * K * d, &fail);
    int *slot = xalloc(sizeof(int) * (size_t)T * K, &fail);
    float *out = xalloc(sizeof(float) * (size_t)T * d, &fail);
    if (fail) {
        rc = err_setf(ERR_NOMEM, "forward: out of memory (moe layer %d, %d rows)", li, T);
        goto out;
    }
    sublayer_in(m, &lw->hc_ffn, lw->ffn_norm, X, T, R, x, post, comb);
    /* router: gate in FP32 */
    cpu_linear(&lw->gate, x, T, logits);
    for (int t = 0; t < T; t++) {
        int64_t hid[64];
        if (sp->router == DSV4_ROUTER_HASH)
            for (int j = 0; j < K; j++)
                hid[j] = dsv4_tid2eid(lw, tokens[t], K, j);
        cpu_route(logits + (size_t)t * E, E, K, sp->router == DSV4_ROUTER_HASH ? NULL : lw->gate_bias,
                  sp->router == DSV4_ROUTER_HASH ? hid : NULL, (float)c->routed_scaling_factor,
                  idx + (size_t)t * K, wts + (size_t)t * K);
    }
    /* routed experts: gather the (row, slot) pairs of each expert, run it, scatter per slot */
    for (int e = 0; e < E; e++) {
        int ne = 0;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < K; j++)
                if (idx[(size_t)t * K + j] == e) {
                    slot[ne] = t * K + j;
                    memcpy(xs + (size_t)ne * d, x + (size_t)t * d, sizeof(float) * (size_t)d);
                    ne++;
                }
        if (!ne)
            continue;
        if (m->numerics == DSV4_NUMERICS_MODEL)
            cpu_act_quant_fp8(xs, ne, d);
        cpu_linear(&lw->w1[e], xs, ne, g);
        cpu_linear(&lw->w3[e], xs, ne, u);
        for (int k = 0; k < ne; k++)
            cpu_swiglu_clamp(g + (size_t)k * I, u + (size_t)k * I, I, limit, wts[slot[k]],
                             g + (size_t)k * I);
        if (m->numerics == DSV4_NUMERICS_MODEL)
            cpu_act_quant_fp8(g, ne, I);
        cpu_linear(&lw->w2[e], g, ne, yo);
        for (int k = 0; k < ne; k++)
            memcpy(ys + (size_t)slot[k] * d, yo + (size_t)k * d, sizeof(float) * (size_t)d);
    }
    /* shared expert */
    if (lw->has_shared) {
        memcpy(xs, x, sizeof(float) * (size_t)T * d);
        linear_q(m, &lw->sh_w1, xs, T, g);
        memcpy(xs, x, sizeof(float) * (size_t)T * d);
        linear_q(m, &lw->sh_w3, xs, T, u);
        for (int t = 0; t < T; t++)
            cpu_swiglu_clamp(g + (size_t)t * I, u + (size_t)t * I, I, limit, 1.0f,
                             g + (size_t)t * I);
        linear_q(m, &lw->sh_w2, g, T, out);
    } else {
        memset(out, 0, sizeof(float) * (size_t)T * d);
    }
    /* combine in slot order (deterministic), then mHC post */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float *f = x + (size_t)t * d;
        for (int k = 0; k < d; k++) {
            float acc = 0;
            for (int j = 0; j < K; j++)
                acc += ys[((size_t)t * K + j) * d + k];
            f[k] = acc + out[(size_t)t * d + k];
        }
        cpu_hc_post(f, R + (size_t)t * n * d, post + (size_t)t * n, comb + (size_t)t * n * n, n, d,
                    X + (size_t)t * n * d);
    }
out:
    free(x), free(post), free(comb), free(R), free(logits), free(idx), free(wts), free(ys);
    free(xs), free(g), free(u), free(yo), free(slot), free(out);
    return rc;
}

/* hc_head -> norm -> head for `nsel` rows of X given by rows[]. */
static int head_rows(struct dsv4_model *m, const float *X, const int *rows, int nsel,
                     const struct dsv4_hc_w *hc, const float *norm, float *logits)
{
    const struct dsv4_config *c = &m->cfg;
    const int d = c->hidden_size, n = c->hc_mult;
    float *y = malloc(sizeof(float) * (size_t)(nsel ? nsel : 1) * d);
    if (!y)
        return err_setf(ERR_NOMEM, "forward: out of memory (head)");
    for (int i = 0; i < nsel; i++) {
        cpu_hc_head(X + (size_t)rows[i] * n * d, n, d, hc->fn, hc->base, hc->scale,
                    (float)c->hc_eps, (float)c->rms_norm_eps, y + (size_t)i * d);
        cpu_rmsnorm(y + (size_t)i * d, norm, d, (float)c->rms_norm_eps, y + (size_t)i * d);
    }
    cpu_linear(&m->w.head, y, nsel, logits);
    free(y);
    return 0;
}

int dsv4_forward(struct dsv4_model *m, struct dsv4_batch_seq *seqs, int nseq, float *logits,
                 float *hidden)
{
    const struct dsv4_config *c = &m->cfg;
    const int d = c->hidden_size, n = c->hc_mult;
    int T = 0, nsel = 0, rc = 0;
    for (int s = 0; s < nseq; s++) {
        if (seqs[s].n <= 0)
            return err_setf(ERR_INVAL, "forward: sequence %d has %d tokens", s, seqs[s].n);
        if (seqs[s].state->pos + seqs[s].n > c->max_position_embeddings)
            return err_setf(ERR_RANGE, "forward: position %ld past max_position_embeddings %ld",
                            seqs[s].state->pos + seqs[s].n - 1, c->max_position_embeddings);
        for (int i = 0; i < seqs[s].n; i++)
            if (seqs[s].tokens[i] < 0 || seqs[s].tokens[i] >= c->vocab_size)
                return err_setf(ERR_RANGE, "forward: token id %d out of range [0, %d)",
                                seqs[s].tokens[i], c->vocab_size);
        T += seqs[s].n;
        nsel += seqs[s].all_logits ? seqs[s].n : 1;
    }
    for (int s = 0; s < nseq; s++)
        if ((rc = dsv4_seq_reserve(seqs[s].state, seqs[s].state->pos + seqs[s].n)))
            return rc;
    struct chunk *chunks = calloc((size_t)nseq, sizeof *chunks);
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t)T);
    int *rows = malloc(sizeof(int) * (size_t)nsel);
    float *X = malloc(sizeof(float) * (size_t)T * n * d);
    if (!chunks || !tokens || !rows || !X) {
        rc = err_setf(ERR_NOMEM, "forward: out of memory (%d rows)", T);
        goto out;
    }
    for (int s = 0, row = 0, sr = 0; s < nseq; s++) {
        chunks[s] = (struct chunk){seqs[s].state, seqs[s].state->pos, seqs[s].n, row, seqs[s].tokens};
        memcpy(tokens + row, seqs[s].tokens, sizeof(int32_t) * (size_t)seqs[s].n);
        for (int i = 0; i < seqs[s].n; i++)
            if (seqs[s].all_logits || i == seqs[s].n - 1)
                rows[sr++] = row + i;
        row += seqs[s].n;
    }
    /* embedding, repeated into the n streams */
    for (int t = 0; t < T; t++) {
        cpu_qmat_row(&m->w.embed, tokens[t], X + (size_t)t * n * d);
        for (int i = 1; i < n; i++)
            memcpy(X + ((size_t)t * n + i) * d, X + (size_t)t * n * d, sizeof(float) * (size_t)d);
    }
    for (int li = 0; li < c->n_layers; li++) {
        if ((rc = attention_sublayer(m, li, X, T, chunks, nseq)) ||
            (rc = moe_sublayer(m, li, X, T, tokens)))
            goto out;
    }
    if (hidden)
        for (int i = 0; i < nsel; i++)
            memcpy(hidden + (size_t)i * n * d, X + (size_t)rows[i] * n * d,
                   sizeof(float) * (size_t)n * d);
    if (logits && (rc = head_rows(m, X, rows, nsel, &m->w.hc_head, m->w.norm, logits)))
        goto out;
    for (int s = 0; s < nseq; s++)
        seqs[s].state->pos += seqs[s].n;
out:
    free(chunks), free(tokens), free(rows), free(X);
    return rc;
}

int dsv4_mtp_forward(struct dsv4_model *m, struct dsv4_seq_state *state, const float *hidden,
                     const int32_t *next, int n, float *logits)
{
    const struct dsv4_config *c = &m->cfg;
    const int d = c->hidden_size, nh = c->hc_mult, li = c->n_layers;
    if (c->n_mtp < 1)
        return err_setf(ERR_UNSUPPORTED, "model has no MTP layer");
    const struct dsv4_layer_w *lw = &m->w.layers[li];
    int rc = 0, fail = 0;
    for (int i = 0; i < n; i++)
        if (next[i] < 0 || next[i] >= c->vocab_size)
            return err_setf(ERR_RANGE, "mtp: token id %d out of range", next[i]);
    float *X = xalloc(sizeof(float) * (size_t)n * nh * d, &fail);
    float *e = xalloc(sizeof(float) * (size_t)n * d, &fail);
    float *ep = xalloc(sizeof(float) * (size_t)n * d, &fail);
    float *h = xalloc(sizeof(float) * (size_t)n * nh * d, &fail);
    int *rows = xalloc(sizeof(int) * (size_t)n, &fail);
    if (fail) {
        rc = err_setf(ERR_NOMEM, "mtp: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        cpu_qmat_row(&m->w.embed, next[i], e + (size_t)i * d);
        cpu_rmsnorm(e + (size_t)i * d, lw->enorm, d, (float)c->rms_norm_eps, e + (size_t)i * d);
        for (int k = 0; k < nh; k++)
            cpu_rmsnorm(hidden + ((size_t)i * nh + k) * d, lw->hnorm, d, (float)c->rms_norm_eps,
                        h + ((size_t)i * nh + k) * d);
        rows[i] = i;
    }
    linear_q(m, &lw->e_proj, e, n, ep);
    linear_q(m, &lw->h_proj, h, n * nh, X);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < nh; k++)
            for (int j = 0; j < d; j++)
                X[((size_t)i * nh + k) * d + j] += ep[(size_t)i * d + j];
    /* the MTP layer's own window state: a chunk at its own positions */
    struct dsv4_seq_state view = *state;
    view.pos = state->mtp_pos;
    struct chunk ch = {&view, state->mtp_pos, n, 0, next};
    if ((rc = attention_sublayer(m, li, X, n, &ch, 1)) || (rc = moe_sublayer(m, li, X, n, next)))
        goto out;
    if ((rc = head_rows(m, X, rows, n, &lw->hc_head, lw->norm, logits)))
        goto out;
    state->mtp_pos += n;
out:
    free(X), free(e), free(ep), free(h), free(rows);
    return rc;
}
