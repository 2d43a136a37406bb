/*
 * backend_cuda.c - the GPU backend: the walk of engine/model.c over the CUDA kernels of
 * kernels/kernels.h, on one stream.
 *
 * Memory (all device allocations are made at creation, except the step scratch, which grows):
 *   - weights: one allocation holding every tensor the main layers use, uploaded as stored
 *     (FP8 + block scales, BF16, MXFP4, FP32 vectors; tid2eid as int32), and the per-expert
 *     matrix descriptors;
 *   - cache pool: one allocation: n_slots fixed states (per layer: the window ring and the
 *     compressor states, FP32) followed by n_blocks blocks of DSV4_BLOCK_TOKENS tokens (per
 *     compressed layer its entries and indexer keys, FP32, the layout of engine/kvcache.c);
 *     blocks are addressed through per-sequence block tables kept on the host and sent with
 *     each step;
 *   - scratch: the activations of one step (sized for the step's rows) and the logits rows.
 * A step sends its batch description (one host-to-device copy from pinned memory), enqueues
 * every kernel, copies the wanted logits rows back and synchronises once.
 *
 * The MTP block is not run by the backend interface and is not uploaded. Sampling stays on the
 * host (the engine samples from the returned logits).
 */
#include "engine/backend_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/err.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "kernels/cpu/nvfp4.h"
#include "kernels/kernels.h"

/* ---- device weights ---- */

struct dev_hc {
    const float *fn, *base, *scale; /* ((2+n)n, n*d), ((2+n)n), (3); head: (n, n*d), (n), (1) */
};

/* A linear's weights on the device: as stored (the exact kernels, and BF16 weights for cuBLAS)
 * and/or packed for the FP8 tensor-core GEMM (kern_gemm_fp8); q.w is NULL when only the packed
 * form was uploaded, p.data NULL when the matrix is not packed. */
struct dev_lin {
    struct kern_qmat q;
    struct kern_fp8_mat p;
};

struct dev_comp {
    struct dev_lin wkv, wgate; /* (coff*D, d) */
    const float *ape;          /* (ratio, coff*D) */
    const float *norm;         /* (D) */
    int D, overlap;
};

struct dev_layer {
    const struct dsv4_layer_spec *spec;
    const float *attn_norm, *ffn_norm; /* (d) */
    struct dev_hc hc_attn, hc_ffn;
    struct dev_lin wq_a, wq_b, wkv, wo_a, wo_b;
    const float *q_norm;    /* (q_lora) */
    const float *kv_norm;   /* (hd) */
    const float *attn_sink; /* (H) */
    struct dev_comp comp, icomp;
    struct dev_lin idx_wq_b, idx_wproj;
    struct kern_qmat gate;
    const float *gate_bias;               /* (E) dense router, else NULL */
    const int32_t *tid2eid;               /* (V, K) hash router, else NULL */
    const struct kern_qmat *w1, *w2, *w3; /* (E) descriptors (device) */
    int exp_fmt;
    struct dev_lin sh_w1, sh_w2, sh_w3;
    int has_shared;
    struct kern_moe_layer moe; /* the fused NVFP4 MoE (cuda_impl.nvfp4), device pointers */
    struct kern_layer_cache cache;
};

/* ---- host-side block accounting (the same rules as engine/kvcache.c) ---- */

struct cuda_slot {
    long pos;
    int32_t *blocks; /* block table (n_blocks), owned */
    int n_blocks, cap;
};

/* ---- step scratch (device), carved for T rows ---- */

struct scratch {
    float *X, *X2;        /* (T, n, d) residual streams (current, next) */
    float *x, *xq;        /* (T, d) normed input, its FP8 round trip */
    float *post, *comb;   /* (T, n), (T, n, n) */
    float *qlat, *qlat_q; /* (T, ql) */
    float *q, *o;         /* (T, H, hd) */
    float *kv;            /* (T, hd) */
    float *zo, *zo_q;     /* (T, g*dg) */
    float *out;           /* (T, d) sub-layer output */
    float *ca, *cz;       /* (T, 2hd) compressor projections */
    float *ia, *iz;       /* (T, 2Di) indexer compressor projections */
    float *qi;            /* (T, Hi, Di) */
    float *wi;            /* (T, Hi) */
    int32_t *sel;         /* (T, topk) */
    float *scores;        /* (T, 2 * ld) indexer workspace */
    float *mlog;          /* (T, E) router logits */
    int32_t *idx;         /* (T, K) */
    float *wts;           /* (T, K) */
    float *g, *u;         /* (T*K, I) */
    float *ys;            /* (T*K, d) */
    float *sg, *su;       /* (T, I) shared expert */
    float *so;            /* (T, d) shared expert output */
    float *y;             /* (T, d) head input */
    void *moe_ws;         /* kern_moe_forward workspace (nvfp4 path) */
    uint16_t *xb;         /* (2T, max cols) BF16 activations of the tensor-core linears */
    float *ysplit;        /* (2T, max split rows) hi and lo results of split linears */
    float *mix;           /* fast mHC projections (kern_hc_fast_ws_floats) */
    float *att_ws;        /* fast attention's key-split partials */
};

/* DSV4_CUDA_PROFILE buckets (prof_mark) */
enum {
    PR_HC,
    PR_PROJ16,
    PR_PROJ,
    PR_PREP,
    PR_COMP,
    PR_INDEX,
    PR_ATTN,
    PR_OUT,
    PR_MOE,
    PR_HEAD,
    PR_N
};

/* The side stream's events: the fork, and the compressor branch's two results */
enum { EV_FORK, EV_WI, EV_COMP, EV_N };

/* A captured decode step: B rows, launch sizes for positions up to PB. */
struct cuda_graph {
    int B, PB, logits; /* logits: the graph copies the logits rows (else only picked tokens) */
    void *exec;        /* owned (kern_graph_free) */
};
#define CUDA_MAX_GRAPHS 64

struct cuda_impl {
    struct dsv4_model *m; /* borrowed */
    struct CUstream_st *stream;
    /* A second stream, forked into the step and joined back (fast path only): the compressor
     * branch of an attention sub-layer runs there beside the q/kv projections. NULL: one. */
    struct CUstream_st *side;    /* owned */
    struct CUevent_st *ev[EV_N]; /* fork / join points, owned */
    int quant;                   /* model numerics: the FP8/FP4 round trips */
    int exact;                   /* the CPU's arithmetic op for op; else tensor-core linears */
    int fp8_kv;   /* KV entries and indexer keys in FP8 (fast path, model numerics) */
    int progress; /* load progress on stderr */
    int n_slots;  /* sequence slots (the spare one for padding rows is n_slots) */
    int max_len;  /* longest sequence the memory plan sized the indexer workspace for */
    int prof;     /* DSV4_CUDA_PROFILE: per op group times on stderr */
    /* BF16 linears of at most this many rows run on the CUDA cores (gemv_bf16.cu), the head
     * included (DSV4_CUDA_GEMV_ROWS; 0: cuBLAS for all) */
    int gemv_rows;
    /* fast path, 4 streams: s->post / comb hold the gates' inputs and hc_post makes the gates
     * before its dependency wait (kern_hc_pre_fast_raw, kern_hc_post_raw; DSV4_CUDA_HC_RAW=0:
     * the finish makes them) */
    int hc_raw;
    double prof_t, prof_acc[PR_N];
    struct kern_blas *blas;  /* cuBLAS (BF16-weight linears of the fast path), owned */
    void *blas_ws;           /* its workspace (device), owned */
    int nvfp4;               /* MoE through kern_moe_forward (experts converted to NVFP4) */
    struct nvfp4_report rep; /* the MXFP4 -> NVFP4 conversion report */
    /* weights */
    void *wmem; /* owned device allocation */
    size_t wbytes;
    struct kern_qmat embed;
    struct dev_lin head;
    const float *norm; /* (d) */
    struct dev_hc hc_head;
    const float *inv_main, *inv_comp; /* (rope_dim/2) */
    struct dev_layer *layers;         /* (n_layers), owned */
    /* cache pool */
    void *cmem; /* owned device allocation */
    size_t cbytes;
    struct kern_cache cache;
    int32_t *refs, *free_list; /* (n_blocks) owned */
    int n_free;
    struct cuda_slot *slots; /* (n_slots) owned */
    /* step */
    void *meta_h, *meta_d; /* pinned host / device batch description, owned */
    size_t meta_cap;
    void *smem; /* owned scratch */
    size_t smem_bytes, moe_ws_bytes;
    int T_cap, ld_cap;
    struct scratch s;
    float *logits_d;            /* (n_slots, V) owned */
    float *logits_split;        /* (2 n_slots, V) hi/lo head results (fast path), owned */
    float *out_h;               /* (n_slots, V) pinned host: the logits of graph steps, owned */
    int32_t *tok_d, *tok_h;     /* (n_slots) picked tokens: device, pinned host; owned */
    unsigned long long *best_d; /* (n_slots) argmax keys from the head (kern_gemv_bf16_argmax), 0
                                 * between steps; owned */
    int graphs;                 /* decode steps replay CUDA graphs (DSV4_CUDA_GRAPHS=0: off) */
    struct cuda_graph graph[CUDA_MAX_GRAPHS];
    int n_graphs;
    /* what s->xb holds (act_to_xb): source, rows, columns, round trip, split, permuted */
    const float *xb_src;
    int xb_T, xb_w, xb_fp8, xb_split, xb_perm;
    int split_rows; /* widest output of a split linear (scratch ysplit) */
    int max_cols;   /* widest input of a linear (scratch xb) */
};

/* ---- the weight uploader: pass 0 sizes, pass 1 copies ---- */

struct uploader {
    int pass;
    char *base; /* device (pass 1) */
    size_t off;
    int rc;
};

static const void *up(struct uploader *u, const void *host, size_t n)
{
    size_t at = u->off;
    u->off += (n + 255) & ~(size_t)255;
    if (u->pass == 0 || u->rc || !n)
        return NULL;
    if ((u->rc = kern_h2d(u->base + at, host, n)))
        err_setf(ERR_CUDA, "cuda backend: upload of %zu bytes failed: %s", n, kern_last_error());
    return u->base + at;
}

/* Reserve n bytes (device address in pass 1, NULL in pass 0); fill with up_at. */
static void *up_reserve(struct uploader *u, size_t n)
{
    size_t at = u->off;
    u->off += (n + 255) & ~(size_t)255;
    return u->pass == 0 ? NULL : u->base + at;
}

static void up_at(struct uploader *u, void *dev, const void *host, size_t n)
{
    if (u->pass == 0 || u->rc || !n)
        return;
    if ((u->rc = kern_h2d(dev, host, n)))
        err_setf(ERR_CUDA, "cuda backend: upload of %zu bytes failed: %s", n, kern_last_error());
}

static const float *up_f32(struct uploader *u, const float *v, size_t n)
{
    return v ? up(u, v, n * sizeof(float)) : NULL;
}

static size_t qmat_wbytes(const struct cpu_qmat *q)
{
    size_t n = (size_t)q->rows * (size_t)q->cols;
    switch (q->fmt) {
    case CPU_W_F32:
        return n * 4;
    case CPU_W_BF16:
        return n * 2;
    case CPU_W_FP8:
        return n;
    case CPU_W_MXFP4:
    case CPU_W_NVFP4:
        return n / 2;
    }
    return 0;
}

static size_t qmat_sbytes(const struct cpu_qmat *q)
{
    if (q->fmt == CPU_W_FP8)
        return (size_t)((q->rows + 127) / 128) * (size_t)((q->cols + 127) / 128) *
               (q->scale_f32 ? 4 : 1);
    if (q->fmt == CPU_W_MXFP4)
        return (size_t)q->rows * (size_t)(q->cols / 32);
    if (q->fmt == CPU_W_NVFP4)
        return (size_t)q->rows * (size_t)(q->cols / 16);
    return 0;
}

static struct kern_qmat up_qmat(struct uploader *u, const struct cpu_qmat *q)
{
    struct kern_qmat k = {(int)q->fmt, q->rows, q->cols, q->scale_f32, NULL, NULL};
    if (!q->w)
        return k;
    k.w = up(u, q->w, qmat_wbytes(q));
    if (qmat_sbytes(q))
        k.scale = up(u, q->scale, qmat_sbytes(q));
    return k;
}

/*
 * A linear: FP8 matrices the tensor-core GEMM can take (rows % 128, cols % 256; group views of
 * grp_rows rows each also % 128) are uploaded packed only (kern_fp8_pack), everything else as
 * stored. In exact mode everything is uploaded as stored.
 */
static struct dev_lin up_lin(const struct cuda_impl *ci, struct uploader *u,
                             const struct cpu_qmat *q, int grp_rows)
{
    struct dev_lin l;
    memset(&l, 0, sizeof l);
    if (ci->exact || !q->w || q->fmt != CPU_W_FP8 || q->rows % 128 || q->cols % 256 ||
        (grp_rows && grp_rows % 128)) {
        l.q = up_qmat(u, q);
        return l;
    }
    const size_t nd = kern_fp8_data_bytes(q->rows, q->cols);
    const size_t nf = kern_fp8_factor_count(q->rows, q->cols);
    l.q = (struct kern_qmat){(int)q->fmt, q->rows, q->cols, q->scale_f32, NULL, NULL};
    l.p.rows = q->rows;
    l.p.cols = q->cols;
    l.p.data = up_reserve(u, nd);
    l.p.fac = up_reserve(u, nf * 2);
    if (u->pass == 0 || u->rc)
        return l;
    uint8_t *hd = malloc(nd);
    uint16_t *hf = malloc(nf * 2);
    int rc = hd && hf
                 ? kern_fp8_pack(q->w, q->scale, q->scale_f32, q->rows, q->cols, hd, hf, &l.p.alpha)
                 : ERR_NOMEM;
    if (rc)
        u->rc = err_setf(rc, "cuda backend: packing a (%d, %d) FP8 matrix failed (%s)", q->rows,
                         q->cols, err_str(rc));
    up_at(u, (void *)l.p.data, hd, nd);
    up_at(u, (void *)l.p.fac, hf, nf * 2);
    free(hd);
    free(hf);
    return l;
}

static struct dev_hc up_hc(struct uploader *u, const struct dsv4_hc_w *h, int nmix, int n, int d,
                           int nscale)
{
    struct dev_hc r;
    r.fn = up_f32(u, h->fn, (size_t)nmix * n * d);
    r.base = up_f32(u, h->base, (size_t)nmix);
    r.scale = up_f32(u, h->scale, (size_t)nscale);
    return r;
}

static struct dev_comp up_comp(const struct cuda_impl *ci, struct uploader *u,
                               const struct dsv4_compressor_w *cw)
{
    struct dev_comp r;
    int width = (cw->overlap ? 2 : 1) * cw->D;
    r.wkv = up_lin(ci, u, &cw->wkv, 0);
    r.wgate = up_lin(ci, u, &cw->wgate, 0);
    r.ape = up_f32(u, cw->ape, (size_t)cw->ratio * width);
    r.norm = up_f32(u, cw->norm, (size_t)cw->D);
    r.D = cw->D;
    r.overlap = cw->overlap;
    return r;
}

/* E expert matrices and their descriptor array. */
static const struct kern_qmat *up_experts(struct uploader *u, const struct cpu_qmat *w, int E,
                                          struct kern_qmat *tmp)
{
    for (int e = 0; e < E; e++)
        tmp[e] = up_qmat(u, &w[e]);
    return up(u, tmp, sizeof(struct kern_qmat) * (size_t)E);
}

/*
 * Can the fused NVFP4 MoE kernels serve this model? MXFP4 experts (converted exactly, or with the
 * least-error window, at load), a BF16 gate, FP8 (or no) shared expert, and the kernels' shape
 * limits (moe_route.cu / moe_nvfp4.cu). DSV4_CUDA_MOE=exact forces the exact path.
 */
static int nvfp4_usable(const struct dsv4_model *m)
{
    const struct dsv4_config *c = &m->cfg;
    const char *env = getenv("DSV4_CUDA_MOE");
    if (env && !strcmp(env, "exact"))
        return 0;
    if ((c->expert_fmt != DSV4_WFMT_MXFP4 && c->expert_fmt != DSV4_WFMT_NVFP4) ||
        c->hidden_size % 256 || c->moe_inter % 256 || c->n_routed_experts % 64 ||
        c->n_routed_experts > 512 || c->n_experts_per_tok > 32)
        return 0;
    if (c->n_shared_experts > 0 && c->linear_fmt != DSV4_WFMT_FP8_BLOCK)
        return 0;
    return 1;
}

/* An expert matrix as NVFP4: converted from MXFP4 (with the load report) or copied from an
 * NVFP4 checkpoint (negative block scales folded into the signs). */
static int expert_nvfp4(const struct cpu_qmat *q, struct nvfp4_mat *out, struct nvfp4_report *rep)
{
    if (q->fmt == CPU_W_NVFP4)
        return nvfp4_from_modelopt(q->w, q->scale, q->s2, out);
    return nvfp4_from_mxfp4(q->w, q->scale, out, rep);
}

/* One layer's MoE for kern_moe_forward: experts as NVFP4, packed; shared expert packed FP8;
 * router views into the already uploaded gate / bias / tid2eid. */
static int up_moe_nvfp4(struct cuda_impl *ci, struct uploader *u, const struct dsv4_layer_w *lw,
                        struct dev_layer *L)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const int d = c->hidden_size, I = c->moe_inter, E = c->n_routed_experts;
    const size_t b13 = kern_nvfp4_data_bytes(2 * I, d), s13 = kern_nvfp4_scale_bytes(2 * I, d);
    const size_t b2 = kern_nvfp4_data_bytes(d, I), s2b = kern_nvfp4_scale_bytes(d, I);
    struct kern_moe_layer *M = &L->moe;
    uint8_t *d13 = up_reserve(u, b13 * E), *ds13 = up_reserve(u, s13 * E);
    uint8_t *d2 = up_reserve(u, b2 * E), *ds2 = up_reserve(u, s2b * E);
    float *da13 = up_reserve(u, sizeof(float) * 2 * E), *da2 = up_reserve(u, sizeof(float) * E);
    const size_t f13n = kern_fp8_factor_count(2 * I, d), f2n = kern_fp8_factor_count(d, I);
    uint8_t *q13 = NULL, *q2 = NULL;
    uint16_t *g13 = NULL, *g2 = NULL;
    if (lw->has_shared) {
        q13 = up_reserve(u, kern_fp8_data_bytes(2 * I, d));
        q2 = up_reserve(u, kern_fp8_data_bytes(d, I));
        g13 = up_reserve(u, 2 * f13n);
        g2 = up_reserve(u, 2 * f2n);
    }
    memset(M, 0, sizeof *M);
    M->d = d, M->I = I, M->E = E, M->K = c->n_experts_per_tok;
    M->route_scale = (float)c->routed_scaling_factor;
    M->swiglu_limit = (float)c->swiglu_limit;
    M->gate_w = L->gate.w;
    M->gate_bias = L->gate_bias;
    M->tid2eid = L->tid2eid;
    M->vocab = c->vocab_size;
    M->w13 = d13, M->w13_s = ds13, M->w2 = d2, M->w2_s = ds2, M->alpha13 = da13, M->alpha2 = da2;
    M->sh13 = q13, M->sh2 = q2, M->sh13_f = g13, M->sh2_f = g2;
    if (u->pass == 0)
        return 0;
    int rc = 0;
    char msg[256] = "";
    float *a13 = malloc(sizeof(float) * 2 * E), *a2 = malloc(sizeof(float) * E);
    if (!a13 || !a2) {
        free(a13), free(a2);
        return err_setf(ERR_NOMEM, "cuda backend: out of memory converting experts");
    }
    /* experts in parallel, each thread with its own buffers and report (merged below); the
     * error message is thread-local (err.h), so a worker's failure is carried in msg */
#pragma omp parallel
    {
        struct nvfp4_mat g = {0}, up_ = {0}, dn = {0};
        struct nvfp4_report rep = {0};
        uint8_t *h13 = malloc(b13), *hs13 = malloc(s13), *h2 = malloc(b2), *hs2 = malloc(s2b);
        int trc = 0;
        if (!h13 || !hs13 || !h2 || !hs2 || nvfp4_mat_init(&g, I, d) ||
            nvfp4_mat_init(&up_, I, d) || nvfp4_mat_init(&dn, d, I)) {
            trc = ERR_NOMEM;
            snprintf(msg, sizeof msg, "cuda backend: out of memory converting experts");
        }
#pragma omp for schedule(dynamic)
        for (int e = 0; e < E; e++) {
            if (trc)
                continue;
            int r;
            if ((r = expert_nvfp4(&lw->w1[e], &g, &rep)) ||
                (r = expert_nvfp4(&lw->w3[e], &up_, &rep)) ||
                (r = expert_nvfp4(&lw->w2[e], &dn, &rep)) ||
                (r = kern_nvfp4_pack_gateup(g.q, g.s, up_.q, up_.s, I, d, h13, hs13)) ||
                (r = kern_nvfp4_pack(dn.q, dn.s, d, I, h2, hs2))) {
                trc = r;
#pragma omp critical(dsv4_cuda_msg)
                snprintf(msg, sizeof msg, "cuda backend: expert %d: NVFP4 conversion failed (%s)",
                         e, err_str(r));
                continue;
            }
            a13[2 * e] = kern_nvfp4_alpha(g.s2);
            a13[2 * e + 1] = kern_nvfp4_alpha(up_.s2);
            a2[e] = kern_nvfp4_alpha(dn.s2);
            if ((r = kern_h2d(d13 + b13 * e, h13, b13)) ||
                (r = kern_h2d(ds13 + s13 * e, hs13, s13)) || (r = kern_h2d(d2 + b2 * e, h2, b2)) ||
                (r = kern_h2d(ds2 + s2b * e, hs2, s2b))) {
                trc = r;
#pragma omp critical(dsv4_cuda_msg)
                snprintf(msg, sizeof msg, "cuda backend: expert %d: upload failed: %s", e,
                         kern_last_error());
            }
        }
#pragma omp critical(dsv4_cuda_rep)
        {
            if (trc && !rc)
                rc = trc;
            ci->rep.n_mats += rep.n_mats;
            ci->rep.n_exact += rep.n_exact;
            ci->rep.n_inexact += rep.n_inexact;
            if (rep.worst_rel > ci->rep.worst_rel) {
                ci->rep.worst_rel = rep.worst_rel;
                ci->rep.worst_span = rep.worst_span;
            }
        }
        nvfp4_mat_free(&g), nvfp4_mat_free(&up_), nvfp4_mat_free(&dn);
        free(h13), free(hs13), free(h2), free(hs2);
    }
    if (rc) {
        free(a13), free(a2);
        return err_setf(rc, "%s", msg);
    }
    up_at(u, da13, a13, sizeof(float) * 2 * E);
    up_at(u, da2, a2, sizeof(float) * E);
    if (!rc && lw->has_shared) {
        uint8_t *p13 = malloc(kern_fp8_data_bytes(2 * I, d)),
                *p2 = malloc(kern_fp8_data_bytes(d, I));
        uint16_t *f13 = malloc(2 * f13n), *f2 = malloc(2 * f2n);
        if (!p13 || !p2 || !f13 || !f2)
            rc = err_setf(ERR_NOMEM, "cuda backend: out of memory packing the shared expert");
        if (!rc &&
            ((rc = kern_fp8_pack_gateup(lw->sh_w1.w, lw->sh_w1.scale, lw->sh_w3.w, lw->sh_w3.scale,
                                        lw->sh_w1.scale_f32, I, d, p13, f13, M->sh_alpha13)) ||
             (rc = kern_fp8_pack(lw->sh_w2.w, lw->sh_w2.scale, lw->sh_w2.scale_f32, d, I, p2, f2,
                                 &M->sh_alpha2))))
            rc = err_setf(rc, "cuda backend: shared expert: FP8 packing failed (%s)", err_str(rc));
        if (!rc) {
            up_at(u, q13, p13, kern_fp8_data_bytes(2 * I, d));
            up_at(u, q2, p2, kern_fp8_data_bytes(d, I));
            up_at(u, g13, f13, 2 * f13n);
            up_at(u, g2, f2, 2 * f2n);
        }
        free(p13), free(p2), free(f13), free(f2);
    }
    free(a13), free(a2);
    return rc ? rc : u->rc;
}

/* One line per layer on stderr (rewritten in place on a terminal) while weights upload. */
static void upload_progress(const struct cuda_impl *ci, const struct uploader *u, int done, int n)
{
    if (!ci->progress || u->pass == 0)
        return;
    int tty = isatty(2);
    fprintf(stderr, "%scuda backend: loading weights: %d/%d layers, %.2f of %.2f GiB%s",
            tty ? "\r" : "", done, n, (double)u->off / (1 << 30), (double)ci->wbytes / (1 << 30),
            tty && done < n ? "" : "\n");
    fflush(stderr);
}

static int upload_weights(struct cuda_impl *ci, struct uploader *u)
{
    const struct dsv4_model *m = ci->m;
    const struct dsv4_config *c = &m->cfg;
    const struct dsv4_weights *w = &m->w;
    const int d = c->hidden_size, n = c->hc_mult, E = c->n_routed_experts;
    const int K = c->n_experts_per_tok, nmix = (2 + n) * n;
    struct kern_qmat *tmp = malloc(sizeof *tmp * (size_t)E);
    int32_t *t2e = NULL;
    if (!tmp)
        return err_setf(ERR_NOMEM, "cuda backend: out of memory");
    ci->embed = up_qmat(u, &w->embed);
    ci->head = up_lin(ci, u, &w->head, 0);
    ci->norm = up_f32(u, w->norm, (size_t)d);
    ci->hc_head = up_hc(u, &w->hc_head, n, n, d, 1);
    ci->inv_main = up_f32(u, m->inv_freq_main, (size_t)c->rope_dim / 2);
    ci->inv_comp = up_f32(u, m->inv_freq_compress, (size_t)c->rope_dim / 2);
    for (int li = 0; li < c->n_layers && !u->rc; li++) {
        upload_progress(ci, u, li, c->n_layers);
        const struct dsv4_layer_w *lw = &w->layers[li];
        const struct dsv4_layer_spec *sp = &m->sched.layers[li];
        struct dev_layer *L = &ci->layers[li];
        L->spec = sp;
        L->attn_norm = up_f32(u, lw->attn_norm, (size_t)d);
        L->ffn_norm = up_f32(u, lw->ffn_norm, (size_t)d);
        L->hc_attn = up_hc(u, &lw->hc_attn, nmix, n, d, 3);
        L->hc_ffn = up_hc(u, &lw->hc_ffn, nmix, n, d, 3);
        L->wq_a = up_lin(ci, u, &lw->wq_a, 0);
        L->q_norm = up_f32(u, lw->q_norm, (size_t)c->q_lora_rank);
        L->wq_b = up_lin(ci, u, &lw->wq_b, 0);
        L->wkv = up_lin(ci, u, &lw->wkv, 0);
        L->kv_norm = up_f32(u, lw->kv_norm, (size_t)c->head_dim);
        L->wo_a = up_lin(ci, u, &lw->wo_a, c->o_lora_rank);
        L->wo_b = up_lin(ci, u, &lw->wo_b, 0);
        L->attn_sink = up_f32(u, lw->attn_sink, (size_t)c->n_heads);
        if (sp->ratio)
            L->comp = up_comp(ci, u, &lw->comp);
        if (sp->attn == DSV4_ATTN_CSA) {
            L->icomp = up_comp(ci, u, &lw->icomp);
            L->idx_wq_b = up_lin(ci, u, &lw->idx_wq_b, 0);
            L->idx_wproj = up_lin(ci, u, &lw->idx_wproj, 0);
        }
        L->gate = up_qmat(u, &lw->gate);
        L->gate_bias = NULL;
        L->tid2eid = NULL;
        if (sp->router == DSV4_ROUTER_HASH) {
            if (!t2e && !(t2e = malloc(sizeof *t2e * (size_t)c->vocab_size * (size_t)K))) {
                free(tmp);
                return err_setf(ERR_NOMEM, "cuda backend: out of memory");
            }
            if (u->pass)
                for (int v = 0; v < c->vocab_size; v++)
                    for (int j = 0; j < K; j++)
                        t2e[(size_t)v * K + j] = (int32_t)dsv4_tid2eid(lw, v, K, j);
            L->tid2eid = up(u, t2e, sizeof *t2e * (size_t)c->vocab_size * (size_t)K);
        } else {
            L->gate_bias = up_f32(u, lw->gate_bias, (size_t)E);
        }
        L->exp_fmt = (int)lw->w1[0].fmt;
        L->has_shared = lw->has_shared;
        if (ci->nvfp4) {
            int rc = up_moe_nvfp4(ci, u, lw, L);
            if (rc) {
                free(tmp);
                free(t2e);
                return rc;
            }
            continue;
        }
        L->w1 = up_experts(u, lw->w1, E, tmp);
        L->w2 = up_experts(u, lw->w2, E, tmp);
        L->w3 = up_experts(u, lw->w3, E, tmp);
        if (lw->has_shared) {
            L->sh_w1 = up_lin(ci, u, &lw->sh_w1, 0);
            L->sh_w2 = up_lin(ci, u, &lw->sh_w2, 0);
            L->sh_w3 = up_lin(ci, u, &lw->sh_w3, 0);
        }
    }
    free(tmp);
    free(t2e);
    if (!u->rc)
        upload_progress(ci, u, c->n_layers, c->n_layers);
    return u->rc;
}

/* ---- cache layout ---- */

static size_t comp_state_floats(int ratio, int D)
{
    int coff = ratio == 4 ? 2 : 1;
    return (size_t)coff * ratio * coff * D;
}

/* Round a byte offset up to 16 (the float4 loads of the fast kernels). */
static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/*
 * Fill each layer's cache offsets (bytes) and formats; returns bytes per slot and per block. The
 * fast path in model numerics keeps KV entries and indexer keys in their FP8 formats
 * (kernels.h: 584 and 132 bytes at the real widths); otherwise FP32.
 */
static void cache_layout(struct cuda_impl *ci, size_t *slot_bytes, size_t *block_bytes)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const int fp8 = ci->fp8_kv, hd = c->head_dim, Di = c->index_head_dim;
    const size_t ent = fp8 ? kern_kv_fp8_bytes(hd, c->rope_dim) : sizeof(float) * (size_t)hd;
    const size_t ient = fp8 ? kern_ikey_fp8_bytes(Di) : sizeof(float) * (size_t)Di;
    size_t so = 0, bo = 0;
    for (int li = 0; li < c->n_layers; li++) {
        const struct dsv4_layer_spec *sp = &ci->m->sched.layers[li];
        struct kern_layer_cache *l = &ci->layers[li].cache;
        memset(l, 0, sizeof *l);
        l->ratio = sp->ratio;
        l->fp8 = fp8;
        l->rope = c->rope_dim;
        l->ent = ent;
        l->ient = ient;
        l->win = so;
        so = align16(so + (size_t)c->sliding_window * ent);
        if (sp->ratio) {
            size_t nc = sizeof(float) * comp_state_floats(sp->ratio, hd);
            l->comp_kv = so;
            l->comp_sc = so + nc;
            so += 2 * nc;
            int per = DSV4_BLOCK_TOKENS / sp->ratio;
            l->blk = bo;
            bo = align16(bo + (size_t)per * ent);
            if (sp->attn == DSV4_ATTN_CSA) {
                size_t ni = sizeof(float) * comp_state_floats(sp->ratio, Di);
                l->icomp_kv = so;
                l->icomp_sc = so + ni;
                so += 2 * ni;
                l->blk_i = bo;
                bo = align16(bo + (size_t)per * ient);
            }
        }
    }
    *slot_bytes = so;
    *block_bytes = bo ? bo : 16;
}

/* ---- captured steps ---- */

static void graphs_clear(struct cuda_impl *ci)
{
    for (int i = 0; i < ci->n_graphs; i++)
        kern_graph_free(ci->graph[i].exec);
    ci->n_graphs = 0;
}

/* ---- scratch ---- */

static size_t carve(char **p, size_t *off, size_t bytes)
{
    size_t at = *off;
    *off += (bytes + 255) & ~(size_t)255;
    if (p)
        *p = NULL;
    return at;
}

/* Lay the scratch out for T rows and indexer width ld; base NULL: only size it. */
static size_t scratch_layout(const struct cuda_impl *ci, int T, int ld, char *base,
                             struct scratch *s)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const size_t t = (size_t)T, d = c->hidden_size, n = c->hc_mult, H = c->n_heads;
    const size_t hd = c->head_dim, ql = c->q_lora_rank, go = (size_t)c->o_groups * c->o_lora_rank;
    const size_t Hi = c->index_n_heads, Di = c->index_head_dim, K = c->n_experts_per_tok;
    const size_t I = c->moe_inter, E = c->n_routed_experts, F = sizeof(float);
    size_t off = 0;
#define CARVE(field, bytes)                                                                        \
    do {                                                                                           \
        size_t at_ = carve(NULL, &off, (bytes));                                                   \
        if (base)                                                                                  \
            s->field = (void *)(base + at_);                                                       \
    } while (0)
    CARVE(X, t * n * d * F);
    CARVE(X2, t * n * d * F);
    CARVE(x, t * d * F);
    CARVE(xq, t * d * F);
    CARVE(post, t * n * F);
    CARVE(comb, t * n * n * F);
    CARVE(qlat, t * ql * F);
    CARVE(qlat_q, t * ql * F);
    CARVE(q, t * H * hd * F);
    CARVE(o, t * H * hd * F);
    CARVE(kv, t * hd * F);
    CARVE(zo, t * go * F);
    CARVE(zo_q, t * go * F);
    CARVE(out, t * d * F);
    CARVE(ca, t * 2 * hd * F);
    CARVE(cz, t * 2 * hd * F);
    CARVE(ia, t * 2 * Di * F);
    CARVE(iz, t * 2 * Di * F);
    CARVE(qi, t * Hi * Di * F);
    CARVE(wi, t * Hi * F);
    CARVE(sel, t * (size_t)(c->index_topk > 0 ? c->index_topk : 1) * 4);
    CARVE(scores, t * 2 * (size_t)ld * F);
    CARVE(mlog, t * E * F);
    CARVE(idx, t * K * 4);
    CARVE(wts, t * K * F);
    CARVE(g, t * K * I * F);
    CARVE(u, t * K * I * F);
    CARVE(ys, t * K * d * F);
    CARVE(sg, t * I * F);
    CARVE(su, t * I * F);
    CARVE(so, t * d * F);
    CARVE(y, t * d * F);
    if (ci->nvfp4)
        CARVE(moe_ws, kern_moe_workspace_bytes(&ci->layers[0].moe, T));
    if (!ci->exact) {
        CARVE(xb, 2 * t * (size_t)ci->max_cols * 2);
        CARVE(ysplit, 2 * t * (size_t)ci->split_rows * F);
        CARVE(mix, kern_hc_fast_ws_floats(T, (int)n) * F);
        CARVE(att_ws, kern_attention_fast_ws_floats((int)H, (int)hd) * F);
    }
#undef CARVE
    return off;
}

static int scratch_reserve(struct cuda_impl *ci, int T, int ld)
{
    if (T <= ci->T_cap && ld <= ci->ld_cap)
        return 0;
    int nT = T > ci->T_cap ? (T > 2 * ci->T_cap ? T : 2 * ci->T_cap) : ci->T_cap;
    int nld = ld > ci->ld_cap ? (ld > 2 * ci->ld_cap ? ld : 2 * ci->ld_cap) : ci->ld_cap;
    size_t bytes = scratch_layout(ci, nT, nld, NULL, NULL);
    void *p = NULL;
    /* the old scratch may still be read by the previous step's kernels; freed before the new
     * one is allocated (no moment holding both) */
    int rc = kern_stream_sync(ci->stream);
    graphs_clear(ci); /* they address the old scratch */
    kern_free(ci->smem);
    ci->smem = NULL;
    ci->T_cap = ci->ld_cap = 0;
    if (!rc)
        rc = kern_malloc(&p, bytes);
    if (rc)
        return err_setf(ERR_CUDA,
                        "cuda backend: cannot allocate %zu bytes of scratch for %d rows: %s", bytes,
                        nT, kern_last_error());
    ci->smem = p;
    ci->smem_bytes = bytes;
    ci->moe_ws_bytes = ci->nvfp4 ? kern_moe_workspace_bytes(&ci->layers[0].moe, nT) : 0;
    ci->T_cap = nT;
    ci->ld_cap = nld;
    scratch_layout(ci, nT, nld, p, &ci->s);
    return 0;
}

/* ---- block accounting ---- */

static void slot_release(struct cuda_impl *ci, struct cuda_slot *s)
{
    for (int i = 0; i < s->n_blocks; i++)
        if (--ci->refs[s->blocks[i]] == 0)
            ci->free_list[ci->n_free++] = s->blocks[i];
    s->n_blocks = 0;
}

static int slot_grow_table(struct cuda_slot *s, int need)
{
    if (need <= s->cap)
        return 0;
    int cap = s->cap ? s->cap : 8;
    while (cap < need)
        cap *= 2;
    int32_t *nb = realloc(s->blocks, sizeof *nb * (size_t)cap);
    if (!nb)
        return err_setf(ERR_NOMEM, "cuda backend: out of memory for a block table");
    s->blocks = nb;
    s->cap = cap;
    return 0;
}

static int32_t block_take(struct cuda_impl *ci)
{
    int32_t b = ci->free_list[--ci->n_free];
    ci->refs[b] = 1;
    return b;
}

/* ---- DSV4_CUDA_PROFILE=1: time per op group (each mark synchronises; for diagnosis only) ---- */

static const char *const pr_names[PR_N] = {"mHC pre/post",
                                           "compressor/indexer projections",
                                           "q/kv projections",
                                           "q/kv norm+rope",
                                           "compressors",
                                           "indexer",
                                           "attention+window",
                                           "output projection",
                                           "MoE",
                                           "embed+head"};

static void prof_mark(struct cuda_impl *ci, int bucket)
{
    if (!ci->prof)
        return;
    (void)kern_stream_sync(ci->stream);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double t = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    if (bucket >= 0 && ci->prof_t)
        ci->prof_acc[bucket] += t - ci->prof_t;
    ci->prof_t = t;
}

static void prof_report(struct cuda_impl *ci, int T)
{
    if (!ci->prof)
        return;
    double tot = 0;
    for (int i = 0; i < PR_N; i++)
        tot += ci->prof_acc[i];
    fprintf(stderr, "cuda profile: step of %d rows: %.3f ms:", T, 1e3 * tot);
    for (int i = 0; i < PR_N; i++)
        fprintf(stderr, " %s %.3f;", pr_names[i], 1e3 * ci->prof_acc[i]);
    fprintf(stderr, "\n");
    memset(ci->prof_acc, 0, sizeof ci->prof_acc);
}

/* An integer from the environment, or def when unset or not a number. */
static int env_int(const char *name, int def)
{
    const char *e = getenv(name);
    char *end;
    long v = e ? strtol(e, &end, 0) : 0;
    return e && *e && !*end ? (int)v : def;
}

/* ---- the walk ---- */

#define TRY(call)                                                                                  \
    do {                                                                                           \
        if ((rc = (call)))                                                                         \
            goto fail;                                                                             \
    } while (0)

/* The message of a failed launch (kernel entry points return codes without messages). */
static int kfail(int rc, const char *what, int li, int T)
{
    if (rc == ERR_BUSY || rc == ERR_NOMEM)
        return rc; /* the message is set */
    char layer[32] = "";
    if (li >= 0)
        snprintf(layer, sizeof layer, " of layer %d", li);
    return err_setf(rc, "cuda backend: %s%s (%d rows): %s (%s)", what, layer, T, err_str(rc),
                    kern_rt_error());
}

static int quantizable(const struct kern_qmat *W)
{
    return W->fmt == KERN_W_FP8 || W->fmt == KERN_W_MXFP4;
}

/* s->xb now holds act_to_xb's result for these arguments */
static void xb_made(struct cuda_impl *ci, const float *x, int T, int w, int fp8, int split,
                    int perm)
{
    ci->xb_src = x, ci->xb_T = T, ci->xb_w = w, ci->xb_fp8 = fp8;
    ci->xb_split = split, ci->xb_perm = perm;
}

/*
 * 1 when each linear of use[0..n) takes, from a w-column x of T rows, act_to_xb's FP8 round
 * trip unsplit and unpermuted (lin_grouped's choice for an FP8 linear): then the kernel that
 * makes x can write it too (xb_made), one act_quant launch fewer.
 */
static int xb_fusable(const struct cuda_impl *ci, const struct dev_lin *const *use, int n, int w,
                      int T)
{
    int ok = n > 0 && !ci->exact && ci->quant && w % 128 == 0;
    for (int i = 0; i < n && ok; i++)
        ok = use[i]->p.data && quantizable(&use[i]->q) && use[i]->q.cols == w &&
             !kern_gemm_fp8_perm(use[i]->q.rows, 1, T);
    return ok;
}

/*
 * hc_pre of a sub-layer: x (T, d) normed input, post, comb; on the fast path also the BF16
 * input of the linears `use` (n of them) where xb_fusable.
 */
static int hc_pre(struct cuda_impl *ci, const struct dev_hc *h, const float *norm, int T,
                  const struct dev_lin *const *use, int nuse)
{
    const struct dsv4_config *c = &ci->m->cfg;
    struct scratch *s = &ci->s;
    const int n = c->hc_mult, d = c->hidden_size;
    const float eps = (float)c->rms_norm_eps;
    if (ci->exact)
        return kern_hc_pre(s->X, T, n, d, h->fn, h->base, h->scale, c->hc_sinkhorn_iters,
                           (float)c->hc_eps, eps, norm, s->x, s->post, s->comb, ci->stream);
    const int xb = xb_fusable(ci, use, nuse, d, T);
    int rc = ci->hc_raw
                 ? kern_hc_pre_fast_raw(s->X, T, n, d, h->fn, h->base, h->scale, (float)c->hc_eps,
                                        eps, norm, s->mix, s->x, xb ? s->xb : NULL, s->post,
                                        s->comb, ci->stream)
                 : kern_hc_pre_fast(s->X, T, n, d, h->fn, h->base, h->scale, c->hc_sinkhorn_iters,
                                    (float)c->hc_eps, eps, norm, s->mix, s->x, xb ? s->xb : NULL,
                                    s->post, s->comb, ci->stream);
    if (!rc && xb)
        xb_made(ci, s->x, T, d, 1, 0, 0);
    return rc;
}

/* After hc_post: X2 (the next residual streams) becomes X. */
static void hc_swap(struct cuda_impl *ci)
{
    struct scratch *s = &ci->s;
    prof_mark(ci, PR_HC);
    float *tmp = s->X;
    s->X = s->X2;
    s->X2 = tmp;
}

/* hc_post of a sub-layer: the next residual streams from s->out into X2, which becomes X. */
static int hc_post(struct cuda_impl *ci, int T)
{
    const struct dsv4_config *c = &ci->m->cfg;
    struct scratch *s = &ci->s;
    int rc = ci->hc_raw
                 ? kern_hc_post_raw(s->out, NULL, s->X, s->post, s->comb, c->hc_sinkhorn_iters,
                                    (float)c->hc_eps, T, c->hidden_size, s->X2, ci->stream)
                 : kern_hc_post(s->out, s->X, s->post, s->comb, T, c->hc_mult, c->hidden_size,
                                s->X2, ci->stream);
    if (!rc)
        hc_swap(ci);
    return rc;
}

/* 1 when lin_grouped runs W (ungrouped) for T rows on the CUDA cores (kern_gemv_bf16) */
static int gemv_rows(const struct cuda_impl *ci, const struct dev_lin *W, int T)
{
    return !ci->exact && W->q.fmt == KERN_W_BF16 && T <= ci->gemv_rows && T <= KERN_GEMV_MAX_T;
}

/* The activations of a linear: as computed, a linear_q's FP8 round trip to apply first, or
 * already FP8-rounded (by kern_swiglu). The round trips happen only in model numerics. */
enum { ACT_F32 = 0, ACT_QUANT = 1, ACT_QUANTIZED = 2 };

/*
 * y (T, rows; row stride ldy) = W x (T, cols; row stride ldx). act: ACT_*; with ACT_QUANT and
 * FP8/FP4 weights the round trip lands in xq_buf (T, cols). Packed FP8 weights run on the tensor
 * cores, BF16 weights through cuBLAS (x split into hi + lo where it is not FP8-rounded:
 * linear_fast.cu), the rest on the exact kernels. grp_rows/grp_xoff: the grouped output projection
 * (row group i reads x + i * grp_xoff).
 */
/*
 * s->xb as the tensor-core linears read it: BF16 of x (T rows, w columns, the FP8 round trip
 * first when fp8, hi + lo rows when split, permuted when perm). Linears that share their input
 * (the compressor, indexer and q/kv projections of x; wq_b and the indexer's wq_b of q_lat)
 * convert it once: ci->xb_* remembers the last conversion until clear_xb (each sub-layer start,
 * where the inputs are rewritten).
 */
static int act_to_xb(struct cuda_impl *ci, const float *x, int ldx, int T, int w, int fp8,
                     float *xq_buf, int split, int perm)
{
    struct scratch *s = &ci->s;
    int rc;
    if (ci->xb_src == x && ci->xb_T == T && ci->xb_w == w && ci->xb_fp8 == fp8 &&
        ci->xb_split == split && ci->xb_perm == perm)
        return 0;
    ci->xb_src = NULL;
    if (fp8 && !split)
        rc = kern_act_quant_bf16(x, ldx, T, w, perm, s->xb, ci->stream);
    else if (fp8 && (rc = kern_act_quant_fp8(x, T, w, xq_buf, ci->stream)) == 0)
        rc = kern_act_bf16(xq_buf, w, T, w, split, perm, s->xb, ci->stream);
    else if (!fp8)
        rc = kern_act_bf16(x, ldx, T, w, split, perm, s->xb, ci->stream);
    if (rc)
        return rc;
    xb_made(ci, x, T, w, fp8, split, perm);
    return 0;
}

static void clear_xb(struct cuda_impl *ci)
{
    ci->xb_src = NULL;
}

/* next: NULL, or the linear that reads y next (T rows, ldy == its columns): where xb_fusable,
 * the hi + lo sum of an FP8 linear with split activations also makes its BF16 input */
static int lin_grouped(struct cuda_impl *ci, const struct dev_lin *W, const float *x, int ldx,
                       int T, int act, float *xq_buf, float *y, int ldy, int grp_rows, int grp_xoff,
                       const struct dev_lin *next)
{
    struct scratch *s = &ci->s;
    struct CUstream_st *st = ci->stream;
    const int rows = W->q.rows, cols = W->q.cols;
    int rc;
    const int fp8_act = act != ACT_F32 && ci->quant && quantizable(&W->q);
    const int groups = grp_rows ? rows / grp_rows : 1, gr = grp_rows ? grp_rows : rows;
    const int xw = grp_rows ? (groups - 1) * grp_xoff + cols : cols; /* x columns read */
    const int split = !fp8_act, R = split ? 2 * T : T; /* FP8 values are exact in BF16 */
    if (W->p.data) { /* groups in one launch: group g's rows read x + g * grp_xoff */
        const int perm = kern_gemm_fp8_perm(gr, groups, R);
        struct kern_fp8_mat v = W->p;
        v.rows = gr;
        if ((rc = act_to_xb(ci, x, ldx, T, xw, act == ACT_QUANT && fp8_act, xq_buf, split, perm)) ||
            (rc = kern_gemm_fp8(&v, groups, s->xb, xw, grp_rows ? (size_t)grp_xoff : 0, R,
                                split ? s->ysplit : y, split ? rows : ldy, (size_t)gr, st)))
            return rc;
        if (!split)
            return 0;
        const int xb =
            next && ldy == rows && (uintptr_t)y % 16 == 0 && xb_fusable(ci, &next, 1, rows, T);
        if ((rc = kern_add_split(s->ysplit, T, rows, y, ldy, xb ? s->xb : NULL, st)))
            return rc;
        if (xb)
            xb_made(ci, y, T, rows, 1, 0, 0);
        return 0;
    }
    if (!grp_rows && gemv_rows(ci, W, T)) {
        /* a row or two (the head at decode): x as is on the CUDA cores, one launch (no hi + lo
         * rows, no split GEMM, no sum); H100: the head read at 3.2 TB/s, through cuBLAS 2.8 */
        const struct kern_gemv_mat m = {W->q.w, rows, y, ldy};
        return kern_gemv_bf16(&m, 1, x, ldx, cols, T, st);
    }
    if (!ci->exact && W->q.fmt == KERN_W_BF16 && !grp_rows) {
        /* the head's halves go to logits_split (2 n_slots rows), the others' to ysplit */
        if (split && (W == &ci->head ? R > 2 * ci->n_slots : rows > ci->split_rows))
            return ERR_INVAL;
        float *yo = split ? (W == &ci->head ? ci->logits_split : s->ysplit) : y;
        if ((rc = act_to_xb(ci, x, ldx, T, cols, 0, NULL, split, 0)) ||
            (rc = kern_blas_gemm_bf16(ci->blas, W->q.w, rows, cols, s->xb, cols, R, yo,
                                      split ? rows : ldy)))
            return rc;
        return split ? kern_add_split(yo, T, rows, y, ldy, NULL, st) : 0;
    }
    if (act == ACT_QUANT && fp8_act) {
        if ((rc = kern_act_quant_fp8(x, T, cols, xq_buf, st)))
            return rc;
        x = xq_buf;
        ldx = cols;
    }
    return kern_linear(&W->q, x, ldx, T, y, ldy, grp_rows, grp_xoff, st);
}

static int lin(struct cuda_impl *ci, const struct dev_lin *W, const float *x, int T, int act,
               float *xq_buf, float *y)
{
    return lin_grouped(ci, W, x, W->q.cols, T, act, xq_buf, y, W->q.rows, 0, 0, NULL);
}

/*
 * Y0 = W0 x and Y1 = W1 x (ACT_QUANT) for two linears of one input: one launch where both are
 * packed FP8 on the small-step path (kern_gemm_fp8_pair), else lin() each.
 */
static int lin_pair(struct cuda_impl *ci, const struct dev_lin *W0, float *y0,
                    const struct dev_lin *W1, float *y1, const float *x, int T, float *xq_buf)
{
    const struct dev_lin *use[2] = {W0, W1};
    const int cols = W0->q.cols;
    int rc;
    if (T <= 8 && xb_fusable(ci, use, 2, cols, T)) {
        if ((rc = act_to_xb(ci, x, cols, T, cols, 1, xq_buf, 0, 0)))
            return rc;
        rc = kern_gemm_fp8_pair(&W0->p, y0, W0->q.rows, &W1->p, y1, W1->q.rows, ci->s.xb, cols, T,
                                ci->stream);
        if (rc != ERR_UNSUPPORTED)
            return rc;
    }
    if ((rc = lin(ci, W0, x, T, ACT_QUANT, xq_buf, y0)))
        return rc;
    return lin(ci, W1, x, T, ACT_QUANT, xq_buf, y1);
}

/* 1 when lin_shared_x runs W[0..n) as one CUDA-core launch (gemv_bf16.cu): the fast path,
 * BF16 weights of one input width, at most KERN_GEMV_MAX_T rows. */
static int shared_x_fused(const struct cuda_impl *ci, const struct dev_lin *const *W, int n, int T)
{
    int fused = !ci->exact && n > 0 && T <= KERN_GEMV_MAX_T && n <= KERN_GEMV_MAX;
    for (int i = 0; i < n && fused; i++)
        fused = W[i]->q.fmt == KERN_W_BF16 && !W[i]->p.data && W[i]->q.cols == W[0]->q.cols;
    return fused;
}

/*
 * Y[i] (T, rows_i) = W[i] x (T, d) for linears of x as is (FP32 activations): one launch on st
 * where shared_x_fused, else one lin() each (on ci->stream: then st must be it).
 */
static int lin_shared_x(struct cuda_impl *ci, const struct dev_lin *const *W, float *const *Y,
                        int n, const float *x, int T, struct CUstream_st *st)
{
    if (shared_x_fused(ci, W, n, T)) {
        struct kern_gemv_mat m[KERN_GEMV_MAX];
        for (int i = 0; i < n; i++)
            m[i] = (struct kern_gemv_mat){W[i]->q.w, W[i]->q.rows, Y[i], W[i]->q.rows};
        return kern_gemv_bf16(m, n, x, W[0]->q.cols, W[0]->q.cols, T, st);
    }
    for (int i = 0; i < n; i++) {
        int rc = lin(ci, W[i], x, T, ACT_F32, NULL, Y[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* The side stream waits for what ci->stream has enqueued so far. */
static int side_fork(struct cuda_impl *ci)
{
    int rc = kern_event_record(ci->ev[EV_FORK], ci->stream);
    return rc ? rc : kern_stream_wait(ci->side, ci->ev[EV_FORK]);
}

static int attention_sublayer(struct cuda_impl *ci, int li, const struct kern_batch *b)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const struct dev_layer *L = &ci->layers[li];
    const struct dsv4_layer_spec *sp = L->spec;
    struct scratch *s = &ci->s;
    struct CUstream_st *st = ci->stream;
    const int T = b->T, H = c->n_heads, hd = c->head_dim;
    const int r = c->rope_dim, ql = c->q_lora_rank, Hi = c->index_n_heads, Di = c->index_head_dim;
    const float eps = (float)c->rms_norm_eps;
    const float *inv = sp->rope == DSV4_ROPE_MAIN ? ci->inv_main : ci->inv_comp;
    const int csa = sp->attn == DSV4_ATTN_CSA;
    int rc;
    clear_xb(ci);
    {
        const struct dev_lin *use[2] = {&L->wq_a, &L->wkv};
        TRY(hc_pre(ci, &L->hc_attn, L->attn_norm, T, use, 2));
    }
    prof_mark(ci, PR_HC);
    /* The compressor branch: the compressor and indexer projections of x as is, then the
     * compressors (their entries land in the blocks). With the side stream and a fused
     * projection it runs there, beside the q/kv projections, and joins before attn_prep
     * (which reads wi: EV_WI) and before the indexer / attention (EV_COMP; at decode both
     * before attn_prep). */
    struct CUstream_st *cst = st;
    {
        const struct dev_lin *W[5];
        float *Y[5];
        int nw = 0;
        if (sp->ratio) {
            W[nw] = &L->comp.wkv, Y[nw++] = s->ca;
            W[nw] = &L->comp.wgate, Y[nw++] = s->cz;
        }
        if (csa) {
            W[nw] = &L->icomp.wkv, Y[nw++] = s->ia;
            W[nw] = &L->icomp.wgate, Y[nw++] = s->iz;
            W[nw] = &L->idx_wproj, Y[nw++] = s->wi;
        }
        if (ci->side && shared_x_fused(ci, W, nw, T)) {
            TRY(side_fork(ci));
            cst = ci->side;
        }
        TRY(lin_shared_x(ci, W, Y, nw, s->x, T, cst));
    }
    if (cst != st)
        TRY(kern_event_record(ci->ev[EV_WI], cst));
    prof_mark(ci, PR_PROJ16);
    if (sp->ratio)
        TRY(kern_compress(b, &ci->cache, &L->cache, s->ca, s->cz, L->comp.ape, L->comp.norm,
                          L->comp.D, L->comp.overlap, 0, r, ci->inv_comp, eps, ci->quant,
                          !ci->exact, cst));
    if (csa)
        TRY(kern_compress(b, &ci->cache, &L->cache, s->ia, s->iz, L->icomp.ape, L->icomp.norm,
                          L->icomp.D, L->icomp.overlap, 1, r, ci->inv_comp, eps, ci->quant,
                          !ci->exact, cst));
    if (cst != st)
        TRY(kern_event_record(ci->ev[EV_COMP], cst));
    prof_mark(ci, PR_COMP);
    TRY(lin_pair(ci, &L->wq_a, s->qlat, &L->wkv, s->kv, s->x, T, s->xq));
    {
        /* the norm also makes wq_b's (and the indexer's wq_b's) BF16 input where it can */
        const struct dev_lin *use[2] = {&L->wq_b, &L->idx_wq_b};
        const int xb = xb_fusable(ci, use, csa ? 2 : 1, ql, T);
        TRY(kern_rmsnorm(s->qlat, L->q_norm, T, ql, eps, !ci->exact, s->qlat, xb ? s->xb : NULL,
                         st));
        if (xb)
            xb_made(ci, s->qlat, T, ql, 1, 0, 0);
    }
    if (csa) /* both read the normed q latent: one launch where lin_pair can */
        TRY(lin_pair(ci, &L->wq_b, s->q, &L->idx_wq_b, s->qi, s->qlat, T, s->qlat_q));
    else
        TRY(lin(ci, &L->wq_b, s->qlat, T, ACT_QUANT, s->qlat_q, s->q));
    prof_mark(ci, PR_PROJ);
    /* one row per sequence (decode): the window entries are written here, not after the
     * attention (the attention reads a row's own latent from s->kv). The compressors of such a
     * step are short and done by now: joined before attn_prep, so that the attention stays
     * attn_prep's programmatic dependent (joined right before it, the attention lost its early
     * launch: batch 1, HCA layers, the attention's adv 10.6 -> 8.8 us) */
    const int win_early = b->max_n == 1;
    if (cst != st)
        TRY(kern_stream_wait(st, ci->ev[win_early ? EV_COMP : EV_WI]));
    TRY(kern_attn_prep(s->q, s->kv, s->qi, s->wi, b, H, hd, L->kv_norm, csa ? Hi : 0, Di, r, inv,
                       eps, ci->quant, !ci->exact, win_early ? &ci->cache : NULL, &L->cache,
                       c->sliding_window, st));
    prof_mark(ci, PR_PREP);
    if (cst != st && !win_early)
        TRY(kern_stream_wait(st, ci->ev[EV_COMP]));
    if (csa) {
        TRY((ci->exact ? kern_indexer_topk
                       : kern_indexer_topk_fast)(b, &ci->cache, &L->cache, s->qi, s->wi, Hi, Di,
                                                 c->index_topk, s->scores, ci->ld_cap, s->sel, st));
        prof_mark(ci, PR_INDEX);
    }
    if (ci->exact)
        TRY(kern_sink_attention(b, &ci->cache, &L->cache, s->q, s->kv, csa ? s->sel : NULL,
                                c->index_topk, L->attn_sink, H, hd, c->sliding_window, r, inv, s->o,
                                st));
    else {
        /* wo_a's input as lin_grouped makes it (BF16 hi + lo, unpermuted) from the splits'
         * merge, where it runs: one launch fewer */
        const int g = c->o_groups,
                  xb = L->wo_a.p.data && !kern_gemm_fp8_perm(c->o_lora_rank, g, 2 * T);
        int made = 0;
        TRY(kern_sink_attention_fast(b, &ci->cache, &L->cache, s->q, s->kv, csa ? s->sel : NULL,
                                     c->index_topk, L->attn_sink, H, hd, c->sliding_window, r, inv,
                                     s->o, s->att_ws, xb ? s->xb : NULL, &made, st));
        if (made)
            xb_made(ci, s->o, T, H * hd, 0, 1, 0);
    }
    if (!win_early)
        TRY(kern_window_write(b, &ci->cache, &L->cache, s->kv, hd, c->sliding_window, st));
    prof_mark(ci, PR_ATTN);
    /* grouped output projection: group g's rows of wo_a read group g's slice of o */
    {
        const int g = c->o_groups, dg = c->o_lora_rank;
        TRY(lin_grouped(ci, &L->wo_a, s->o, H * hd, T, ACT_F32, NULL, s->zo, g * dg, dg, H * hd / g,
                        &L->wo_b));
        TRY(lin(ci, &L->wo_b, s->zo, T, ACT_QUANT, s->zo_q, s->out));
    }
    prof_mark(ci, PR_OUT);
    TRY(hc_post(ci, T));
    return 0;
fail:
    return kfail(rc, "attention", li, T);
}

static int moe_sublayer(struct cuda_impl *ci, int li, const struct kern_batch *b)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const struct dev_layer *L = &ci->layers[li];
    struct scratch *s = &ci->s;
    struct CUstream_st *st = ci->stream;
    const int T = b->T, d = c->hidden_size, E = c->n_routed_experts;
    const int K = c->n_experts_per_tok, I = c->moe_inter, P = T * K;
    const float limit = (float)c->swiglu_limit;
    int rc;
    clear_xb(ci);
    TRY(hc_pre(ci, &L->hc_ffn, L->ffn_norm, T, NULL, 0));
    prof_mark(ci, PR_HC);
    if (ci->nvfp4) { /* route + routed experts + shared expert, BF16 activations */
        /* their sum inside hc_post's kernel where it takes it (one launch fewer) */
        struct kern_moe_sum sum;
        TRY(kern_moe_forward_parts(&L->moe, s->x, b->tokens, T, &sum, s->moe_ws, ci->moe_ws_bytes,
                                   st));
        prof_mark(ci, PR_MOE);
        rc = ci->hc_raw
                 ? kern_hc_post_raw(NULL, &sum, s->X, s->post, s->comb, c->hc_sinkhorn_iters,
                                    (float)c->hc_eps, T, d, s->X2, st)
                 : kern_hc_post_moe(&sum, s->X, s->post, s->comb, T, c->hc_mult, d, s->X2, st);
        if (!rc) {
            hc_swap(ci);
            return 0;
        }
        if (rc != ERR_UNSUPPORTED)
            goto fail;
        TRY(kern_moe_sum_rows(&sum, T, d, s->out, st));
        goto post;
    }
    TRY(kern_linear(&L->gate, s->x, d, T, s->mlog, E, 0, 0, st));
    TRY(kern_route_exact(s->mlog, T, E, K, L->gate_bias, L->tid2eid, b->tokens,
                         (float)c->routed_scaling_factor, s->idx, s->wts, st));
    /* routed experts: (token, slot) pairs */
    const float *xe = s->x;
    if (ci->quant) {
        TRY(kern_act_quant_fp8(s->x, T, d, s->xq, st));
        xe = s->xq;
    }
    TRY(kern_linear_experts(L->w1, E, L->exp_fmt, I, d, s->idx, P, K, xe, d, s->g, I, st));
    TRY(kern_linear_experts(L->w3, E, L->exp_fmt, I, d, s->idx, P, K, xe, d, s->u, I, st));
    TRY(kern_swiglu(s->g, s->u, P, I, limit, s->wts, ci->quant, s->g, st));
    TRY(kern_linear_experts(L->w2, E, L->exp_fmt, d, I, s->idx, P, 1, s->g, I, s->ys, d, st));
    if (L->has_shared) {
        TRY(lin(ci, &L->sh_w1, s->x, T, ACT_QUANT, s->xq, s->sg));
        TRY(lin(ci, &L->sh_w3, s->x, T, ACT_QUANT, s->xq, s->su));
        TRY(kern_swiglu(s->sg, s->su, T, I, limit, NULL, ci->quant && quantizable(&L->sh_w2.q),
                        s->sg, st));
        TRY(lin(ci, &L->sh_w2, s->sg, T, ACT_QUANTIZED, NULL, s->so));
    }
    TRY(kern_moe_combine(s->ys, L->has_shared ? s->so : NULL, T, K, d, s->out, st));
post:
    prof_mark(ci, PR_MOE);
    TRY(hc_post(ci, T));
    return 0;
fail:
    return kfail(rc, "MoE", li, T);
}

/* ---- struct backend ---- */

/* Grow the batch-description buffers (pinned host + device) to hold `ints` int32s. */
static int meta_reserve(struct cuda_impl *ci, size_t ints)
{
    if (ints * 4 <= ci->meta_cap)
        return 0;
    size_t cap = ints * 4 * 2;
    void *h = NULL, *dv = NULL;
    int rc;
    if ((rc = kern_stream_sync(ci->stream)) || (rc = kern_host_alloc(&h, cap)) ||
        (rc = kern_malloc(&dv, cap))) {
        kern_host_free(h);
        return err_setf(ERR_CUDA, "cuda backend: cannot allocate %zu bytes for a batch: %s", cap,
                        kern_last_error());
    }
    graphs_clear(ci); /* they copy from and read the old buffers */
    kern_host_free(ci->meta_h);
    kern_free(ci->meta_d);
    ci->meta_h = h;
    ci->meta_d = dv;
    ci->meta_cap = cap;
    return 0;
}

/*
 * Enqueue one step: the batch description (meta_ints int32s from pinned memory), the walk,
 * and (nsel > 0) the head of the rows listed in rows_d, whose logits land in out (host; NULL:
 * not copied) and, with picks (device: one struct kern_pick per row), whose picked tokens land
 * in tok_h.
 */
static int enqueue_step(struct cuda_impl *ci, const struct kern_batch *b, size_t meta_ints,
                        int nsel, const int32_t *rows_d, float *out, const struct kern_pick *picks)
{
    const struct dsv4_config *c = &ci->m->cfg;
    struct scratch *s = &ci->s;
    const int d = c->hidden_size, n = c->hc_mult;
    int rc;
    prof_mark(ci, -1);
    clear_xb(ci);
    TRY(kern_h2d_async(ci->meta_d, ci->meta_h, meta_ints * 4, ci->stream));
    TRY(kern_embed(&ci->embed, b->tokens, b->T, n, s->X, ci->stream));
    prof_mark(ci, PR_HEAD);
    for (int li = 0; li < c->n_layers; li++)
        if ((rc = attention_sublayer(ci, li, b)) || (rc = moe_sublayer(ci, li, b)))
            return rc;
    if (nsel) {
        if (ci->exact)
            TRY(kern_hc_head(s->X, rows_d, nsel, n, d, ci->hc_head.fn, ci->hc_head.base,
                             ci->hc_head.scale, (float)c->hc_eps, (float)c->rms_norm_eps, ci->norm,
                             s->y, ci->stream));
        else /* the gathered rows go to X2 (free between sub-layers) */
            TRY(kern_hc_head_fast(s->X, rows_d, nsel, n, d, ci->hc_head.fn, ci->hc_head.base,
                                  ci->hc_head.scale, (float)c->hc_eps, (float)c->rms_norm_eps,
                                  ci->norm, s->X2, s->mix, s->y, ci->stream));
        clear_xb(ci);
        /* a row or two with picks: the head's launch also leaves each row's argmax (greedy
         * rows then read one word, not V logits) */
        const int keys = picks && gemv_rows(ci, &ci->head, nsel);
        if (keys) {
            const struct dev_lin *W = &ci->head;
            const struct kern_gemv_mat m = {W->q.w, W->q.rows, ci->logits_d, W->q.rows};
            TRY(kern_gemv_bf16_argmax(&m, s->y, W->q.cols, W->q.cols, nsel, ci->best_d,
                                      ci->stream));
        } else
            TRY(lin(ci, &ci->head, s->y, nsel, ACT_F32, NULL, ci->logits_d));
        if (picks) {
            TRY(kern_sample_rows(ci->logits_d, nsel, c->vocab_size, picks, ci->logits_split,
                                 keys ? ci->best_d : NULL, ci->tok_d, ci->stream));
            TRY(kern_d2h_async(ci->tok_h, ci->tok_d, sizeof(int32_t) * (size_t)nsel, ci->stream));
        }
        if (out)
            TRY(kern_d2h_async(out, ci->logits_d, sizeof(float) * (size_t)nsel * c->vocab_size,
                               ci->stream));
    }
    return 0;
fail:
    return kfail(rc, "step", -1, b->T);
}

/* The graph bucket of a decode batch of nseq rows (powers of two, then n_slots), or 0. */
static int graph_bucket(const struct cuda_impl *ci, int nseq, int n_slots)
{
    int B = 1;
    while (B < nseq)
        B *= 2;
    return B <= n_slots ? B : (nseq <= n_slots ? n_slots : 0);
}

static int cuda_step(struct backend *bk, const struct backend_seq *seqs, int nseq, float *logits)
{
    struct cuda_impl *ci = bk->impl;
    const struct dsv4_config *c = &ci->m->cfg;
    int T = 0, nsel = 0, need = 0, max_pos = 0, max_n = 0, total_bt = 0, decode = 1, picked = 0;
    int rows_lg = 0;
    int rc;
    if (nseq <= 0)
        return 0;
    if (nseq > bk->n_slots)
        return err_setf(ERR_INVAL, "cuda backend: %d sequences for %d slots", nseq, bk->n_slots);
    for (int i = 0; i < nseq; i++) {
        const struct backend_seq *q = &seqs[i];
        if (q->slot < 0 || q->slot >= bk->n_slots || q->n <= 0)
            return err_setf(ERR_INVAL, "cuda backend: sequence %d: slot %d, %d tokens", i, q->slot,
                            q->n);
        for (int j = 0; j < i; j++)
            if (seqs[j].slot == q->slot)
                return err_setf(ERR_INVAL, "cuda backend: slot %d twice in one step", q->slot);
        const struct cuda_slot *sl = &ci->slots[q->slot];
        if (sl->pos + q->n > c->max_position_embeddings)
            return err_setf(ERR_RANGE, "forward: position %ld past max_position_embeddings %ld",
                            sl->pos + q->n - 1, c->max_position_embeddings);
        for (int j = 0; j < q->n; j++)
            if (q->tokens[j] < 0 || q->tokens[j] >= c->vocab_size)
                return err_setf(ERR_RANGE, "forward: token id %d out of range [0, %d)",
                                q->tokens[j], c->vocab_size);
        int nb = dsv4_kv_blocks_for(sl->pos + q->n);
        need += nb - sl->n_blocks;
        total_bt += nb;
        T += q->n;
        max_n = q->n > max_n ? q->n : max_n;
        nsel += q->want_logits != 0;
        picked |= q->want_logits && q->pick;
        rows_lg |= q->want_logits && !q->pick;
        decode &= q->n == 1 && q->want_logits;
        if (sl->pos + q->n > max_pos)
            max_pos = (int)(sl->pos + q->n);
    }
    if (need > ci->n_free)
        return err_setf(ERR_BUSY, "kv cache: %d blocks needed, %d free", need, ci->n_free);
    for (int i = 0; i < nseq; i++) {
        struct cuda_slot *sl = &ci->slots[seqs[i].slot];
        int nb = dsv4_kv_blocks_for(sl->pos + seqs[i].n);
        if ((rc = slot_grow_table(sl, nb)))
            return rc;
        while (sl->n_blocks < nb)
            sl->blocks[sl->n_blocks++] = block_take(ci);
    }
    /*
     * A decode step (one token and its logits per sequence) replays a CUDA graph captured for
     * its bucket: B rows (the batch padded with rows of token -1 on the spare slot and block,
     * which no kernel lets touch the real rows), launch sizes for positions up to PB. Other
     * steps launch kernel by kernel.
     */
    const int B = decode && ci->graphs ? graph_bucket(ci, nseq, bk->n_slots) : 0;
    int PB = 0;
    if (B) {
        PB = 256;
        while (PB < max_pos)
            PB *= 2;
        if (PB > c->max_position_embeddings)
            PB = (int)c->max_position_embeddings;
        if (PB > ci->max_len) /* stay inside the planned workspace when the plan covers it */
            PB = ci->max_len > max_pos ? ci->max_len : max_pos;
        T = nsel = B;
        total_bt = B * dsv4_kv_blocks_for(PB) + 1;
        max_pos = PB;
    }
    /* the batch description; in a graph bucket the offsets depend on B only (bt last) */
    const int NS = B ? B : nseq;
    const size_t PK = sizeof(struct kern_pick) / 4; /* int32 words per pick */
    size_t meta_ints = (size_t)3 * T + (size_t)4 * NS + (size_t)nsel * (1 + PK) + (size_t)total_bt;
    if ((rc = meta_reserve(ci, meta_ints)) || (rc = scratch_reserve(ci, T, max_pos / 4 + 1)))
        return rc;
    int32_t *mh = ci->meta_h, *md = ci->meta_d;
    int32_t *tok = mh, *rseq = tok + T, *rpos = rseq + T, *srow0 = rpos + T, *sn = srow0 + NS;
    int32_t *sslot = sn + NS, *sbt = sslot + NS, *rows = sbt + NS, *pkw = rows + nsel;
    int32_t *bt = pkw + (size_t)nsel * PK;
    struct kern_pick *pk = (struct kern_pick *)pkw; /* (nsel) rows without a pick: argmax */
    int row = 0, bo = 0, ns = 0;
    for (int i = 0; i < nseq; i++) {
        const struct backend_seq *q = &seqs[i];
        const struct cuda_slot *sl = &ci->slots[q->slot];
        srow0[i] = row;
        sn[i] = q->n;
        sslot[i] = q->slot;
        sbt[i] = bo;
        memcpy(bt + bo, sl->blocks, sizeof *bt * (size_t)sl->n_blocks);
        bo += sl->n_blocks;
        for (int j = 0; j < q->n; j++, row++) {
            tok[row] = q->tokens[j];
            rseq[row] = i;
            rpos[row] = (int32_t)(sl->pos + j);
        }
        if (q->want_logits) {
            const struct backend_pick *k = q->pick;
            pk[ns] = k ? (struct kern_pick){k->temperature, k->top_p, k->min_p, k->u, k->top_k}
                       : (struct kern_pick){0, 1, 0, 0, 0};
            rows[ns++] = row - 1;
        }
    }
    if (B) { /* padding rows: the spare slot (n_slots) and the spare block (n_blocks) */
        bt[bo] = bk->n_blocks;
        for (int i = nseq; i < B; i++, row++) {
            srow0[i] = row;
            sn[i] = 1;
            sslot[i] = bk->n_slots;
            sbt[i] = bo;
            tok[row] = -1;
            rseq[row] = i;
            rpos[row] = 0;
            pk[ns] = (struct kern_pick){0, 1, 0, 0, 0};
            rows[ns++] = row;
        }
    }
    struct kern_batch b = {T,
                           NS,
                           md,
                           md + (rseq - mh),
                           md + (rpos - mh),
                           md + (srow0 - mh),
                           md + (sn - mh),
                           md + (sslot - mh),
                           md + (sbt - mh),
                           md + (bt - mh),
                           max_pos,
                           max_n};
    const int32_t *rows_d = md + (rows - mh);
    const struct kern_pick *picks_d = (const struct kern_pick *)(md + (pkw - mh));
    if (B) {
        struct cuda_graph *g = NULL;
        for (int i = 0; i < ci->n_graphs && !g; i++)
            if (ci->graph[i].B == B && ci->graph[i].PB == PB && ci->graph[i].logits == rows_lg)
                g = &ci->graph[i];
        if (!g) {
            if (ci->n_graphs == CUDA_MAX_GRAPHS)
                graphs_clear(ci);
            g = &ci->graph[ci->n_graphs];
            if ((rc = kern_graph_begin(ci->stream)))
                return err_setf(ERR_CUDA, "cuda backend: graph capture: %s",
                                kern_last_error()); /* the graph always picks tokens; it copies
                                                       logits rows if any row wants them */
            rc = enqueue_step(ci, &b, meta_ints, nsel, rows_d, rows_lg ? ci->out_h : NULL, picks_d);
            void *exec = NULL;
            int rc2 = kern_graph_end(ci->stream, &exec);
            if (rc) {
                kern_graph_free(exec); /* a partial capture, if it was instantiated */
                return rc;
            }
            if (rc2)
                return err_setf(ERR_CUDA, "cuda backend: graph capture of a %d-row step: %s", B,
                                kern_last_error());
            *g = (struct cuda_graph){B, PB, rows_lg, exec};
            ci->n_graphs++;
        }
        if ((rc = kern_graph_launch(g->exec, ci->stream)) || (rc = kern_stream_sync(ci->stream)))
            return err_setf(ERR_CUDA, "cuda backend: step (graph of %d rows): %s", B,
                            kern_last_error());
        for (int i = 0; i < nseq && rows_lg; i++) /* the rows without a pick */
            if (!seqs[i].pick)
                memcpy(logits + (size_t)i * c->vocab_size, ci->out_h + (size_t)i * c->vocab_size,
                       sizeof(float) * (size_t)c->vocab_size);
    } else {
        if ((rc = enqueue_step(ci, &b, meta_ints, nsel, rows_d, rows_lg ? logits : NULL,
                               picked ? picks_d : NULL)))
            return rc;
        if ((rc = kern_stream_sync(ci->stream)))
            return kfail(rc, "step", -1, T);
        prof_mark(ci, PR_HEAD);
        prof_report(ci, T);
    }
    for (int i = 0, r = 0; i < nseq; i++) {
        ci->slots[seqs[i].slot].pos += seqs[i].n;
        if (seqs[i].want_logits && seqs[i].pick)
            seqs[i].pick->token = ci->tok_h[r];
        r += seqs[i].want_logits != 0;
    }
    return 0;
}

static int slot_clear_state(struct cuda_impl *ci, int slot)
{
    const struct dsv4_config *c = &ci->m->cfg;
    for (int li = 0; li < c->n_layers; li++) {
        int rc = kern_compressor_reset(&ci->cache, &ci->layers[li].cache, slot, c->head_dim,
                                       c->index_head_dim, ci->stream);
        if (rc)
            return rc;
    }
    return 0;
}

static void cuda_slot_reset(struct backend *bk, int slot)
{
    struct cuda_impl *ci = bk->impl;
    struct cuda_slot *sl = &ci->slots[slot];
    slot_release(ci, sl);
    sl->pos = 0;
    /* an enqueue failure surfaces at the next step's synchronisation */
    (void)slot_clear_state(ci, slot);
}

static int cuda_slot_fork(struct backend *bk, int dst, int src)
{
    struct cuda_impl *ci = bk->impl;
    struct cuda_slot *sd = &ci->slots[dst];
    const struct cuda_slot *ss = &ci->slots[src];
    int full = (int)(ss->pos / DSV4_BLOCK_TOKENS), used = dsv4_kv_blocks_for(ss->pos), rc;
    if (dst == src)
        return 0;
    slot_release(ci, sd);
    sd->pos = 0;
    if ((rc = slot_grow_table(sd, used)))
        return rc;
    if (used > full && ci->n_free < 1) {
        (void)slot_clear_state(ci, dst);
        return err_setf(ERR_BUSY, "kv cache: 1 block needed, 0 free");
    }
    for (int i = 0; i < full; i++) {
        ci->refs[ss->blocks[i]]++;
        sd->blocks[sd->n_blocks++] = ss->blocks[i];
    }
    const size_t bb = ci->cache.block_bytes;
    if (used > full) { /* the partially filled block is written by both: copy it */
        int32_t nb = block_take(ci);
        sd->blocks[sd->n_blocks++] = nb;
        if ((rc = kern_d2d_async(ci->cache.blocks + (size_t)nb * bb,
                                 ci->cache.blocks + (size_t)ss->blocks[full] * bb, bb, ci->stream)))
            return err_setf(ERR_CUDA, "cuda backend: fork copy: %s", kern_last_error());
    }
    const size_t sb = ci->cache.slot_bytes;
    if ((rc = kern_d2d_async(ci->cache.state + (size_t)dst * sb, ci->cache.state + (size_t)src * sb,
                             sb, ci->stream)))
        return err_setf(ERR_CUDA, "cuda backend: fork copy: %s", kern_last_error());
    sd->pos = ss->pos;
    return 0;
}

static int cuda_blocks_free(struct backend *bk)
{
    return ((struct cuda_impl *)bk->impl)->n_free;
}

static void cuda_destroy(struct backend *bk)
{
    if (!bk)
        return;
    struct cuda_impl *ci = bk->impl;
    if (ci) {
        if (ci->stream)
            (void)kern_stream_sync(ci->stream);
        if (ci->side) /* joined into the stream in every step; after a failed one, maybe not */
            (void)kern_stream_sync(ci->side);
        for (int i = 0; ci->slots && i < bk->n_slots; i++)
            free(ci->slots[i].blocks);
        free(ci->slots);
        free(ci->refs);
        free(ci->free_list);
        free(ci->layers);
        kern_free(ci->wmem);
        kern_free(ci->cmem);
        kern_free(ci->smem);
        kern_free(ci->logits_d);
        kern_free(ci->logits_split);
        kern_host_free(ci->out_h);
        kern_host_free(ci->tok_h);
        kern_free(ci->tok_d);
        kern_free(ci->best_d);
        graphs_clear(ci);
        kern_blas_free(ci->blas);
        kern_free(ci->blas_ws);
        kern_free(ci->meta_d);
        kern_host_free(ci->meta_h);
        for (int i = 0; i < EV_N; i++)
            kern_event_free(ci->ev[i]);
        kern_stream_free(ci->side);
        kern_stream_free(ci->stream);
        free(ci);
    }
    free(bk);
}

static const struct backend_ops cuda_ops = {cuda_step, cuda_slot_reset, cuda_slot_fork,
                                            cuda_blocks_free, cuda_destroy};

void backend_cuda_opts_defaults(struct backend_cuda_opts *o)
{
    const char *e = getenv("DSV4_CUDA_EXACT");
    memset(o, 0, sizeof *o);
    o->n_slots = 1;
    o->max_step_tokens = 256;
    o->max_model_len = 4096;
    o->mem_util = 0.9;
    o->exact = e && *e && strcmp(e, "0");
}

#define GIB(x) ((double)(x) / (1 << 30))

/* Widest input of any linear and widest output of one whose activations are split (hi + lo);
 * with model numerics only the FP32-activation linears split (see lin_grouped). */
static void lin_widths(struct cuda_impl *ci)
{
    const struct dsv4_config *c = &ci->m->cfg;
    const int H = c->n_heads, hd = c->head_dim, go = c->o_groups * c->o_lora_rank;
    int mc = c->hidden_size, sr = c->hidden_size;
#define MAXI(a, b) ((a) = (b) > (a) ? (b) : (a))
    MAXI(mc, c->q_lora_rank);
    MAXI(mc, H * hd);
    MAXI(mc, go);
    MAXI(mc, c->moe_inter);
    MAXI(sr, go);
    MAXI(sr, 2 * hd);
    MAXI(sr, 2 * c->index_head_dim);
    MAXI(sr, c->index_n_heads);
    if (!ci->quant || c->linear_fmt != DSV4_WFMT_FP8_BLOCK) { /* every linear splits */
        MAXI(sr, H * hd);
        MAXI(sr, c->index_n_heads * c->index_head_dim);
        MAXI(sr, c->q_lora_rank);
        MAXI(sr, c->moe_inter);
        MAXI(sr, c->n_routed_experts); /* the exact path's router gate */
    }
#undef MAXI
    ci->max_cols = mc;
    ci->split_rows = sr;
}

int backend_cuda_new_opts(struct backend **out, struct dsv4_model *m,
                          const struct backend_cuda_opts *o)
{
    const struct dsv4_config *c = &m->cfg;
    const int n_slots = o->n_slots;
    struct backend *bk = calloc(1, sizeof *bk);
    struct cuda_impl *ci = calloc(1, sizeof *ci);
    int rc, n_blocks;
    if (!bk || !ci) {
        free(bk);
        free(ci);
        return err_setf(ERR_NOMEM, "cuda backend: out of memory");
    }
    bk->ops = &cuda_ops;
    bk->impl = ci;
    bk->n_slots = n_slots;
    bk->vocab_size = c->vocab_size;
    bk->eos_token_id = c->eos_token_id;
    bk->device_sampling = 1;
    ci->m = m;
    ci->quant = m->numerics == DSV4_NUMERICS_MODEL;
    ci->exact = o->exact;
    ci->progress = o->progress;
    ci->n_slots = n_slots;
    ci->max_len = o->max_model_len;
    ci->prof = getenv("DSV4_CUDA_PROFILE") != NULL;
    {
        const char *g = getenv("DSV4_CUDA_GRAPHS");
        ci->graphs = !ci->prof && !(g && !strcmp(g, "0"));
    }
    /* the side stream (DSV4_CUDA_FORK=0: off) on the fast path; DSV4_CUDA_PROFILE times op
     * groups on one stream */
    const int use_side = !ci->exact && !ci->prof && env_int("DSV4_CUDA_FORK", 1);
    /* the head at 1 / 2 rows: 1.597 -> 1.553 / 1.862 -> 1.825 ms per step; at 4 rows cuBLAS is
     * faster (2.416 against 2.452), at 8 much faster (3.35 against 3.61): 8-layer Flash model,
     * bench_gpu_engine, H100 */
    ci->gemv_rows = env_int("DSV4_CUDA_GEMV_ROWS", 2);
    ci->hc_raw =
        !ci->exact && c->hc_mult == 4 && c->hidden_size % 4 == 0 && env_int("DSV4_CUDA_HC_RAW", 1);
    ci->nvfp4 = !ci->exact && nvfp4_usable(m);
    if (c->expert_fmt == DSV4_WFMT_NVFP4 && !ci->nvfp4) {
        rc = err_setf(ERR_UNSUPPORTED,
                      "cuda backend: NVFP4 experts run only in the fused MoE kernels (not with "
                      "DSV4_CUDA_EXACT / DSV4_CUDA_MOE=exact; hidden size and expert width "
                      "multiples of 256, experts a multiple of 64); use --device cpu");
        goto fail;
    }
    ci->fp8_kv = !ci->exact && ci->quant && c->rope_dim < c->head_dim &&
                 (c->head_dim - c->rope_dim) % 64 == 0 && c->index_head_dim % 32 == 0;
    lin_widths(ci);
    if (o->max_step_tokens > 65535) {
        rc = err_setf(ERR_INVAL,
                      "cuda backend: at most 65535 tokens per step (the kernels' grid "
                      "rows); --max-num-batched-tokens is %d",
                      o->max_step_tokens);
        goto fail;
    }
    if (n_slots < 1 || o->n_blocks < 0 || o->max_step_tokens < 1 || !(o->mem_util > 0) ||
        o->mem_util > 1 || o->max_model_len < 1) {
        rc = err_setf(ERR_INVAL,
                      "cuda backend: %d slots, %d blocks, %d step tokens, memory "
                      "fraction %g",
                      n_slots, o->n_blocks, o->max_step_tokens, o->mem_util);
        goto fail;
    }
    if (kern_device_count() < 1) {
        rc = err_setf(ERR_CUDA, "cuda backend: no CUDA device");
        goto fail;
    }
    ci->layers = calloc((size_t)c->n_layers, sizeof *ci->layers);
    ci->slots = calloc((size_t)n_slots, sizeof *ci->slots);
    if (!ci->layers || !ci->slots) {
        rc = err_setf(ERR_NOMEM, "cuda backend: out of memory");
        goto fail;
    }
    if ((rc = kern_stream_new(&ci->stream))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot create a stream: %s", kern_last_error());
        goto fail;
    }
    if (use_side) {
        rc = kern_stream_new(&ci->side);
        for (int i = 0; i < EV_N && !rc; i++)
            rc = kern_event_new(&ci->ev[i]);
        if (rc) {
            rc = err_setf(ERR_CUDA, "cuda backend: cannot create a stream or event: %s",
                          kern_last_error());
            goto fail;
        }
    }

    /* sizes first: weights (pass 0 of the uploader), fixed state, scratch for the largest
     * step, logits rows; then the cache blocks that fit the memory budget */
    struct uploader u = {0, NULL, 0, 0};
    if ((rc = upload_weights(ci, &u)))
        goto fail;
    ci->wbytes = u.off;
    size_t slot_b, block_b;
    cache_layout(ci, &slot_b, &block_b);
    const size_t V = (size_t)c->vocab_size, F = sizeof(float);
    const int ld0 = o->max_model_len / 4 + 1;
    /* the largest step: a prefill budget or a decode step of every slot (a graph bucket) */
    const int plan_T = o->max_step_tokens > n_slots ? o->max_step_tokens : n_slots;
    const size_t scratch = scratch_layout(ci, plan_T, ld0, NULL, NULL);
    /* rows, hi/lo halves (also the sampler's workspace); + a pinned host copy */
    const size_t logits = F * V * (size_t)n_slots * 3;
    const size_t blas_ws = ci->exact ? 0 : (size_t)32 << 20;
    /* one spare slot and block beyond those counted: the padding rows of graph steps */
    const size_t state = slot_b * (size_t)(n_slots + 1);
    const size_t margin = (size_t)512 << 20; /* context growth, cuBLAS, graphs, batch buffers */
    const size_t fixed = ci->wbytes + state + scratch + logits + blas_ws + margin;
    size_t free_b = 0, total_b = 0;
    if ((rc = kern_mem_info(&free_b, &total_b))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot query device memory: %s", kern_last_error());
        goto fail;
    }
    const double budget = o->mem_util * (double)total_b - (double)(total_b - free_b);
    if ((double)fixed + (double)block_b * (n_slots + 1) > budget) {
        rc = err_setf(ERR_NOMEM,
                      "cuda backend: the model does not fit: it needs %.2f GiB (weights %.2f, "
                      "per-sequence state %.2f for %d sequences, step scratch %.2f for %d tokens, "
                      "logits %.2f, reserve %.2f) plus %.1f MiB per cache block, but %.2f GiB may "
                      "be used (%.2f of %.2f GiB with --gpu-memory-utilization %.2f; %.2f GiB "
                      "already in use)",
                      GIB(fixed), GIB(ci->wbytes), GIB(state), n_slots, GIB(scratch),
                      o->max_step_tokens, GIB(logits), GIB(margin + blas_ws),
                      (double)block_b / (1 << 20), budget > 0 ? GIB(budget) : 0.0,
                      o->mem_util * GIB(total_b), GIB(total_b), o->mem_util, GIB(total_b - free_b));
        goto fail;
    }
    {
        double fit = (budget - (double)fixed) / (double)block_b - 1;
        if (fit > (double)(1 << 30))
            fit = (double)(1 << 30);
        long want = o->n_blocks ? o->n_blocks : (long)fit;
        if (o->exact_blocks && want > fit) {
            rc = err_setf(ERR_NOMEM,
                          "cuda backend: %ld cache blocks of %.1f MiB do not fit: "
                          "%.0f fit beside %.2f GiB of weights and buffers",
                          want, (double)block_b / (1 << 20), fit, GIB(fixed));
            goto fail;
        }
        n_blocks = (int)(want < fit ? want : fit);
        if (n_blocks > (1 << 30))
            n_blocks = 1 << 30;
    }
    bk->n_blocks = n_blocks;
    ci->refs = calloc((size_t)(n_blocks ? n_blocks : 1), sizeof *ci->refs);
    ci->free_list = malloc(sizeof *ci->free_list * (size_t)(n_blocks ? n_blocks : 1));
    if (!ci->refs || !ci->free_list) {
        rc = err_setf(ERR_NOMEM, "cuda backend: out of memory");
        goto fail;
    }
    for (int i = 0; i < n_blocks; i++)
        ci->free_list[i] = n_blocks - 1 - i; /* pop gives block 0 first */
    ci->n_free = n_blocks;

    /* weights: allocate once, upload */
    if ((rc = kern_malloc(&ci->wmem, ci->wbytes))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot allocate %zu bytes for the weights: %s",
                      ci->wbytes, kern_last_error());
        goto fail;
    }
    u = (struct uploader){1, ci->wmem, 0, 0};
    if ((rc = upload_weights(ci, &u)))
        goto fail;
    if (ci->nvfp4 && (rc = kern_moe_prepare())) {
        rc = err_setf(rc, "cuda backend: MoE kernel setup failed: %s", kern_last_error());
        goto fail;
    }
    if (ci->nvfp4 && (o->progress || getenv("DSV4_CUDA_VERBOSE")))
        fprintf(stderr,
                "cuda backend: experts MXFP4 -> NVFP4: %ld matrices, %ld exact, %ld inexact "
                "(worst rel err %.3g, span %d binades)\n",
                ci->rep.n_mats, ci->rep.n_exact, ci->rep.n_inexact, ci->rep.worst_rel,
                ci->rep.worst_span);
    if (!ci->exact && ((rc = kern_malloc(&ci->blas_ws, blas_ws)) ||
                       (rc = kern_blas_new(&ci->blas, ci->stream, ci->blas_ws, blas_ws)))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot set up cuBLAS: %s", kern_last_error());
        goto fail;
    }
    /* cache pool: slot states, then blocks */
    ci->cbytes = state + block_b * (size_t)(n_blocks + 1);
    if ((rc = kern_malloc(&ci->cmem, ci->cbytes))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot allocate %zu bytes for the cache pool: %s",
                      ci->cbytes, kern_last_error());
        goto fail;
    }
    ci->cache.state = ci->cmem;
    ci->cache.slot_bytes = slot_b;
    ci->cache.blocks = (char *)ci->cmem + state;
    ci->cache.block_bytes = block_b;
    bk->block_bytes = block_b;
    bk->state_bytes = slot_b;
    if ((rc = kern_memset(ci->cmem, 0, ci->cbytes))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot clear the cache pool: %s", kern_last_error());
        goto fail;
    }
    for (int i = 0; i <= n_slots; i++)
        if ((rc = slot_clear_state(ci, i)))
            goto fail;
    if ((rc = kern_malloc((void **)&ci->logits_d, F * (size_t)n_slots * V)) ||
        (rc = kern_malloc((void **)&ci->logits_split, 2 * F * (size_t)n_slots * V)) ||
        (rc = kern_host_alloc((void **)&ci->out_h, F * (size_t)n_slots * V)) ||
        (rc = kern_host_alloc((void **)&ci->tok_h, sizeof(int32_t) * (size_t)n_slots)) ||
        (rc = kern_malloc((void **)&ci->tok_d, sizeof(int32_t) * (size_t)n_slots)) ||
        (rc = kern_malloc((void **)&ci->best_d, sizeof(*ci->best_d) * (size_t)n_slots)) ||
        (rc = kern_memset(ci->best_d, 0, sizeof(*ci->best_d) * (size_t)n_slots))) {
        rc = err_setf(ERR_CUDA, "cuda backend: cannot allocate the logits rows: %s",
                      kern_last_error());
        goto fail;
    }
    if ((rc = scratch_reserve(ci, plan_T, ld0)) ||
        (rc = meta_reserve(ci, (size_t)8 * n_slots +
                                   (size_t)n_slots * dsv4_kv_blocks_for(o->max_model_len) + 1)))
        goto fail;
    if ((rc = kern_stream_sync(ci->stream))) {
        rc = err_setf(ERR_CUDA, "cuda backend: setup failed: %s", kern_last_error());
        goto fail;
    }
    if (o->progress)
        fprintf(stderr,
                "cuda backend: %s linears; weights %.2f GiB, cache pool %.2f GiB (%d blocks of "
                "%.2f MiB + %d sequence states of %.2f MiB), scratch %.2f GiB\n",
                ci->exact ? "exact" : "tensor-core", GIB(ci->wbytes), GIB(ci->cbytes), n_blocks,
                (double)block_b / (1 << 20), n_slots, (double)slot_b / (1 << 20),
                GIB(ci->smem_bytes));
    *out = bk;
    return 0;
fail:
    cuda_destroy(bk);
    return rc;
}
