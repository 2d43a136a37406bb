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
    int32_t *pos;       /* (T*K) grouped position of each slot, -1 for a dropped one */
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
    CARVE(pos, int32_t, TK);
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

/* v -> a key with the same order as the floats (and equal keys for equal floats: -0 becomes +0);
 * 0 is below every key of a number, the mark of a taken or absent expert. */
__device__ __forceinline__ uint32_t moe__order_key(float v)
{
    const uint32_t b = __float_as_uint(v + 0.0f);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

/* max (or min) of a[0 .. N) as a tree: log2(N) dependent steps */
template <int N, bool MIN> __device__ __forceinline__ uint32_t moe__tree(const uint32_t *a)
{
    if constexpr (N == 1) {
        return a[0];
    } else {
        const uint32_t l = moe__tree<N / 2, MIN>(a), r = moe__tree<N - N / 2, MIN>(a + N / 2);
        return MIN ? min(l, r) : max(l, r);
    }
}

/*
 * Top-K of one token on one warp: lane l holds in sp[i] the logits of experts l + 32 i
 * (i < per <= P), which become their sqrt(softplus), and in b[i] their biases. Round j takes the
 * largest s + bias, the lowest expert id among equals, with two warp reductions (redux.sync: the
 * largest key, then the lowest id that holds it) and no other dependent step; lane j < K ends with
 * slot j's expert in my_id and its sqrt(softplus) in s. (The argmax of (value, id) pairs by five
 * shuffle rounds per slot that this replaced took ~7 us per token in a Flash layer at T = 1, this
 * ~4 us: kernels/cuda/RESULTS.md, eleventh session.)
 */
template <int P>
__device__ __forceinline__ void moe__topk_dense(int lane, int per, float (&sp)[MOE_MAX_EPL],
                                                const float (&b)[MOE_MAX_EPL], int K, int &my_id,
                                                float &s)
{
    uint32_t key[P];
#pragma unroll
    for (int i = 0; i < P; i++) {
        sp[i] = i < per ? moe__sqrt_softplus(sp[i]) : 0.0f;
        key[i] = i < per ? moe__order_key(sp[i] + b[i]) : 0u;
    }
    for (int j = 0; j < K; j++) {
        const uint32_t top = __reduce_max_sync(0xffffffffu, moe__tree<P, false>(key));
        uint32_t c[P];
#pragma unroll
        for (int i = 0; i < P; i++)
            c[i] = key[i] == top ? (uint32_t)(lane + 32 * i) : 0xffffffffu;
        const uint32_t e = __reduce_min_sync(0xffffffffu, moe__tree<P, true>(c));
#pragma unroll
        for (int i = 0; i < P; i++)
            if (e == (uint32_t)(lane + 32 * i))
                key[i] = 0u;
        if (lane == j)
            my_id = (int)e;
    }
    /* each slot's sqrt(softplus) from the lane that holds it (off the rounds' chain) */
    const int src = my_id >= 0 ? my_id & 31 : 0, at = my_id >= 0 ? my_id >> 5 : -1;
#pragma unroll
    for (int i = 0; i < P; i++) {
        const float o = __shfl_sync(0xffffffffu, sp[i], src);
        if (i == at)
            s = o;
    }
}

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
    const int tok = tokens ? tokens[t] : (tid2eid ? -1 : 0); /* < 0: a padding row, no expert */
    float sp[MOE_MAX_EPL], v[MOE_MAX_EPL];
#pragma unroll
    for (int i = 0; i < MOE_MAX_EPL; i++) {
        sp[i] = i < per ? lg[lane + 32 * i] : 0.0f;
        v[i] = !tid2eid && i < per ? bias[lane + 32 * i] : 0.0f;
    }
    if (tid2eid) {
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
    } else if (tok >= 0) {
        if (per <= 8) /* Flash (E 256), the small test shape (E 64) */
            moe__topk_dense<8>(lane, per, sp, v, K, my_id, s);
        else /* Pro (E 384) */
            moe__topk_dense<MOE_MAX_EPL>(lane, per, sp, v, K, my_id, s);
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
/* xb (T, d): also write x in BF16 when not NULL: in natural order for T <= 64 (the mma.sync
 * experts' order), in the wgmma experts' order (perm64) where moe__logits_long(L, T). */
int moe__logits(const struct kern_moe_layer *L, const float *x, int T, float *logits,
                __nv_bfloat16 *xb, cudaStream_t st);
/* Whether moe__logits runs the long-step kernel for T tokens. */
int moe__logits_long(const struct kern_moe_layer *L, int T);
int moe__topk(const struct kern_moe_layer *L, const float *logits, const int32_t *tokens, int T,
              int32_t *idx, float *w, cudaStream_t st);
/* The long-step logits kernel's shared-memory limit (from kern_moe_prepare). */
int moe__logits_prepare(void);

#endif
