/*
 * nvfp4_ckpt.h - tests: an NVFP4 re-quantised copy of a checkpoint in memory. Every routed
 * expert matrix `<p>.weight` (MXFP4) + `<p>.scale` becomes NVFP4 by the exact conversion
 * (nvfp4_from_mxfp4) and is stored as ModelOpt writes it (`<p>.weight` U8, `.weight_scale`
 * F8_E4M3, `.weight_scale_2` F32 [1]: the multiplier) or as compressed-tensors does
 * (`.weight_packed`, `.weight_scale`, `.weight_global_scale` F32 [1]: the divisor, here exactly
 * 1 / multiplier since the multiplier is a power of two); every other tensor is copied.
 * Header-only (static), for the unit and GPU tests.
 */
#ifndef DSV4_TESTS_NVFP4_CKPT_H
#define DSV4_TESTS_NVFP4_CKPT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/safetensors.h"
#include "kernels/cpu/nvfp4.h"

/* 1 when name is `...ffn.experts.<e>.w<k>.weight`; its prefix (without ".weight") in pre. */
static int nvc_expert_weight(const char *name, char *pre, size_t n)
{
    const char *x = strstr(name, "ffn.experts.");
    size_t len = strlen(name);
    if (!x || len < 7 || strcmp(name + len - 7, ".weight") != 0 || len - 7 >= n)
        return 0;
    memcpy(pre, name, len - 7);
    pre[len - 7] = 0;
    return 1;
}

enum { NVC_NAN_SCALE = 1, NVC_NO_GLOBAL = 2 }; /* faults planted in the first expert matrix */

/*
 * *out: a new set holding src's tensors with the experts in NVFP4 (ctensors: the compressed-
 * tensors names, else ModelOpt's), with the faults of `fault` (NVC_*) planted. src is borrowed.
 * 0 or a negative error.
 */
static int nvc_convert(const struct st_set *src, int ctensors, int fault, struct st_set **out)
{
    int first = 1;
    const int n = st_set_count(src);
    struct st_write_tensor *t = calloc((size_t)n * 2 + 1, sizeof *t);
    char **names = calloc((size_t)n * 2 + 1, sizeof *names);
    void **bufs = calloc((size_t)n * 3 + 1, sizeof *bufs);
    int nt = 0, nb = 0, rc = 0;
    if (!t || !names || !bufs) {
        rc = err_setf(ERR_NOMEM, "nvfp4 checkpoint: out of memory");
        goto done;
    }
    for (int i = 0; i < n && !rc; i++) {
        const struct st_tensor *a = st_set_at(src, i);
        char pre[256], sn[300];
        size_t len = strlen(a->name);
        if (len > 6 && !strcmp(a->name + len - 6, ".scale") && strstr(a->name, "ffn.experts."))
            continue; /* the MXFP4 scales: replaced below */
        if (!nvc_expert_weight(a->name, pre, sizeof pre)) {
            t[nt++] = (struct st_write_tensor){a->name, a->dtype, a->ndim,
                                               {a->shape[0], a->shape[1], a->shape[2], a->shape[3]},
                                               a->data};
            continue;
        }
        snprintf(sn, sizeof sn, "%s.scale", pre);
        const struct st_tensor *s = st_set_find(src, sn);
        const int rows = (int)a->shape[0], cols = (int)a->shape[1] * 2;
        struct nvfp4_mat m;
        struct nvfp4_report rep = {0};
        float *g = malloc(sizeof *g);
        if (!s || !g || nvfp4_mat_init(&m, rows, cols)) {
            free(g);
            rc = err_setf(ERR_NOMEM, "nvfp4 checkpoint: %s", s ? "out of memory" : sn);
            break;
        }
        if ((rc = nvfp4_from_mxfp4(a->data, s->data, &m, &rep))) {
            free(g);
            nvfp4_mat_free(&m);
            break;
        }
        *g = ctensors ? 1.0f / m.s2 : m.s2;
        if (first && (fault & NVC_NAN_SCALE))
            m.s[0] = 0x7f;
        bufs[nb++] = m.q, bufs[nb++] = m.s, bufs[nb++] = g;
        const char *suffix[3] = {ctensors ? "weight_packed" : "weight", "weight_scale",
                                 ctensors ? "weight_global_scale" : "weight_scale_2"};
        for (int k = 0; k < (first && (fault & NVC_NO_GLOBAL) ? 2 : 3); k++) {
            size_t l = strlen(pre) + strlen(suffix[k]) + 2;
            names[nt] = malloc(l);
            if (!names[nt]) {
                rc = err_setf(ERR_NOMEM, "nvfp4 checkpoint: out of memory");
                break;
            }
            snprintf(names[nt], l, "%s.%s", pre, suffix[k]);
            t[nt] = (struct st_write_tensor){names[nt], k == 0 ? ST_U8 : (k == 1 ? ST_F8_E4M3 : ST_F32),
                                             k == 2 ? 1 : 2,
                                             {k == 2 ? 1 : rows, k == 0 ? cols / 2 : cols / 16},
                                             k == 0 ? (void *)m.q : (k == 1 ? (void *)m.s : (void *)g)};
            nt++;
        }
        first = 0;
    }
    uint8_t *img = NULL;
    size_t img_len = 0;
    if (!rc && !(rc = st_serialize(t, nt, NULL, 0, &img, &img_len)))
        rc = st_set_open_mem_take(out, "nvfp4-checkpoint", img, img_len);
done:
    for (int i = 0; names && i < nt; i++)
        free(names[i]);
    for (int i = 0; bufs && i < nb; i++)
        free(bufs[i]);
    free(t);
    free(names);
    free(bufs);
    return rc;
}

#endif
