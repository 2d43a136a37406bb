/*
 * moe_internal.cuh - what moe_route.cu and moe_nvfp4.cu share: the workspace layout.
 */
#ifndef DSV4_KERNELS_CUDA_MOE_INTERNAL_CUH
#define DSV4_KERNELS_CUDA_MOE_INTERNAL_CUH

#include "kernels/kernels.h"
#include "kernels/cuda/common.cuh"

#include <cuda_bf16.h>

/* Carved from the caller's workspace; every part 256-byte aligned. */
struct moe_ws {
    __nv_bfloat16 *xb;  /* (T, d) x rounded to BF16 */
    float *logits;      /* (T, E) router logits */
    int32_t *idx;       /* (T, K) kern_moe_forward's routing */
    float *w;           /* (T, K) */
    int32_t *sorted;    /* (T*K) slot t*K+j of each grouped position */
    int4 *tiles;        /* (max_tiles) expert, start position, count, 0 */
    int32_t *ntiles;    /* (1) */
    __nv_bfloat16 *h;   /* (T*K, I) routed SwiGLU outputs, grouped order */
    __nv_bfloat16 *hsh; /* (T, I) shared expert SwiGLU outputs */
    float *yslot;       /* (T*K, d) routed expert outputs by slot */
    float *ysh;         /* (T, d) shared expert outputs */
    size_t bytes;
};

/* Upper bound of the tiles of BT tokens over all experts: sum ceil(n_e/BT) <= TK/BT + min(E,TK). */
static inline int moe__max_tiles(int T, int K, int E, int BT)
{
    long tk = (long)T * K;
    return (int)(tk / BT + (tk < E ? tk : E));
}

/* Lay out ws for T tokens (base may be NULL to size it). */
static inline struct moe_ws moe__ws_layout(const struct kern_moe_layer *L, int T, void *base)
{
    struct moe_ws w;
    size_t off = 0;
    char *b = (char *)base;
    const size_t TK = (size_t)T * L->K;
#define CARVE(field, type, count)                                                                  \
    w.field = (type *)(b ? b + off : NULL);                                                        \
    off += kern__align(sizeof(type) * (size_t)(count) + 16)
    CARVE(xb, __nv_bfloat16, (size_t)T * L->d);
    CARVE(logits, float, (size_t)T * L->E);
    CARVE(idx, int32_t, TK);
    CARVE(w, float, TK);
    CARVE(sorted, int32_t, TK);
    CARVE(tiles, int4, moe__max_tiles(T, L->K, L->E, 8));
    CARVE(ntiles, int32_t, 1);
    CARVE(h, __nv_bfloat16, TK * L->I);
    CARVE(hsh, __nv_bfloat16, (size_t)T * L->I);
    CARVE(yslot, float, TK * L->d);
    CARVE(ysh, float, (size_t)T * L->d);
#undef CARVE
    w.bytes = off;
    return w;
}

__device__ __forceinline__ float moe__sqrt_softplus(float v)
{
    float sp = v > 20.0f ? v : log1pf(expf(v));
    return sqrtf(sp);
}

#define MOE_MAX_EPL 16 /* experts per lane: E <= 512 */

/* Route token t with one warp (all 32 lanes call it). */
__device__ __forceinline__ void moe__topk_token(int t, int lane, const float *__restrict__ logits,
                                                int E, int K, const float *__restrict__ bias,
                                                const int32_t *__restrict__ tid2eid, int vocab,
                                                const int32_t *__restrict__ tokens,
                                                float route_scale, int32_t *__restrict__ idx,
                                                float *__restrict__ w, int32_t *sidx = nullptr)
{
    const float *lg = logits + (size_t)t * E;
    int my_id = -1; /* lane j < K ends holding slot j's expert */
    float s = 0.0f; /* lane j < K: sqrt(softplus) of slot j's logit */
    /* the token id, the logits (and the bias) are loaded together: each memory latency here
     * is on the layer's critical path */
    const int per = E / 32;
    float sp[MOE_MAX_EPL], v[MOE_MAX_EPL];
#pragma unroll
    for (int i = 0; i < MOE_MAX_EPL; i++)
        if (i < per) {
            sp[i] = lg[lane + 32 * i];
            v[i] = tid2eid ? 0.0f : bias[lane + 32 * i];
        }
    if (tid2eid) {
        int tok = tokens ? tokens[t] : -1;
        if (lane < K && tok >= 0 && tok < vocab) {
            int e = tid2eid[(size_t)tok * K + lane];
            my_id = (e >= 0 && e < E) ? e : -1;
        }
        /* the logit of my_id, held by lane my_id % 32 at index my_id / 32 */
        const int src = my_id >= 0 ? my_id & 31 : 0, at = my_id >= 0 ? my_id >> 5 : -1;
#pragma unroll
        for (int i = 0; i < MOE_MAX_EPL; i++)
            if (i < per) {
                float o = __shfl_sync(0xffffffffu, sp[i], src);
                if (i == at)
                    s = moe__sqrt_softplus(o);
            }
    } else {
        const int tok = tokens ? tokens[t] : 0;
#pragma unroll
        for (int i = 0; i < MOE_MAX_EPL; i++) {
            sp[i] = i < per ? moe__sqrt_softplus(sp[i]) : 0.0f;
            v[i] = i < per ? sp[i] + v[i] : -INFINITY;
        }
        uint32_t taken = 0;
        for (int j = 0; j < K && tok >= 0; j++) { /* token id < 0: a padding row, no expert */
            float bv = -INFINITY;
            int be = 0x7fffffff;
#pragma unroll
            for (int i = 0; i < MOE_MAX_EPL; i++) {
                int e = lane + 32 * i;
                if (i < per && !((taken >> i) & 1) && (be == 0x7fffffff || v[i] > bv)) {
                    bv = v[i];
                    be = e;
                }
            }
#pragma unroll
            for (int o = 16; o; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oe = __shfl_xor_sync(0xffffffffu, be, o);
                if (oe != 0x7fffffff && (be == 0x7fffffff || ov > bv || (ov == bv && oe < be))) {
                    bv = ov;
                    be = oe;
                }
            }
            /* be is the same on every lane: its sqrt(softplus) from the lane that holds it */
            float bs = 0.0f;
#pragma unroll
            for (int i = 0; i < MOE_MAX_EPL; i++)
                if (i == (be >> 5))
                    bs = sp[i];
            bs = __shfl_sync(0xffffffffu, bs, be & 31);
            if ((be & 31) == lane)
                taken |= 1u << (be >> 5);
            if (lane == j) {
                my_id = be;
                s = bs;
            }
        }
    }
    /* the sum in slot order on every lane, as the CPU reference sums */
    float sum = 0.0f;
    for (int j = 0; j < K; j++)
        sum += __shfl_sync(0xffffffffu, s, j);
    if (lane < K) {
        idx[(size_t)t * K + lane] = my_id;
        if (sidx) /* a copy for the caller's block (shared memory) */
            sidx[t * K + lane] = my_id;
        w[(size_t)t * K + lane] = (my_id >= 0 && sum > 0.0f) ? s / sum * route_scale : 0.0f;
    }
}

/* Router internals (moe_route.cu). */
/* xb (T, d): also write x in BF16 (natural order) when not NULL; only for T <= 64. */
int moe__logits(const struct kern_moe_layer *L, const float *x, int T, float *logits,
                __nv_bfloat16 *xb, cudaStream_t st);
int moe__topk(const struct kern_moe_layer *L, const float *logits, const int32_t *tokens, int T,
              int32_t *idx, float *w, cudaStream_t st);

#endif
