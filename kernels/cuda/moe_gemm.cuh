/*
 * moe_gemm.cuh - what the MoE GEMM kernels share (moe_nvfp4.cu: mma.sync and register-A wgmma;
 * moe_gemm_ws.cu: warp-specialised wgmma): the launch arguments, the NVFP4 / FP8 weight decoders
 * (kernels.h describes the packed layouts). Internal to kernels/cuda.
 */
#ifndef DSV4_KERNELS_CUDA_MOE_GEMM_CUH
#define DSV4_KERNELS_CUDA_MOE_GEMM_CUH

#include "kernels/cuda/moe_internal.cuh"

enum { WF_NVFP4 = 0, WF_FP8 = 1 };
enum { STAGE_GATEUP = 1, STAGE_DOWN = 2 };

struct gemm_args {
    const uint8_t *w;             /* packed weights (expert 0) */
    const uint8_t *ws;            /* NVFP4 packed scales (expert 0) */
    const uint16_t *fac;          /* FP8 factors */
    size_t w_estride, ws_estride; /* bytes per expert */
    const float *alpha;           /* routed: (E, 2) gate/up or (E) down */
    float alpha_c0, alpha_c1;     /* shared: gate/up or down */
    int N, Kd;                    /* weight rows, reduction length */
    const int4 *tiles;            /* routed tile list */
    const int32_t *ntiles;        /* routed tile count (device) */
    int T;                        /* shared: tokens */
    const int32_t *sorted;        /* routed: slot of each grouped position */
    const float *route_w;         /* routed: (T*K) */
    int topk;
    const __nv_bfloat16 *in; /* GEMM1: x (T, d) by token; GEMM2: h (pos, I) */
    int ldin;                /* elements between rows of `in` (a multiple of 8) */
    int ldout;               /* STAGE_DOWN: elements between rows of `yout` */
    int late_wait;           /* shared GEMM1 only: `in` was written two kernels back, so the
                              * whole product runs before the dependency wait */
    __nv_bfloat16 *hout;     /* GEMM1: (pos, I) */
    float *yout;             /* GEMM2: routed (slot, d), shared (t, d) */
    float limit;
    /* dense linears in groups (blockIdx.z = group g): the operands of group g start at
     * w + g w_gstride, fac + g fac_gstride, in + g in_goff, yout + g out_goff */
    size_t w_gstride, fac_gstride, in_goff, out_goff;
    /* a pair of dense linears of one input (moe_gemm's `sh` only): group 1 takes the operands
     * of moe_gemm's `a` instead, and each group's blocks past its own rows exit */
    int pair;
};

/* The operands of group z of a dense launch (a copy; z == 0: unchanged). */
__device__ __forceinline__ gemm_args group_args(const gemm_args &a, unsigned z)
{
    gemm_args g = a;
    g.w += z * g.w_gstride;
    g.fac += z * g.fac_gstride;
    g.in += z * g.in_goff;
    g.yout += z * g.out_goff;
    return g;
}

/* NVFP4 code word (kernels.h layout) + two scale bytes -> one A fragment. Each register's codes
 * land with e1 e0 m on BF16 bits 8..6 and the sign on bit 15 (of each half), i.e. the BF16 of
 * value * 2^-126 exactly: a mask (register 0), a rotation and a mask (1, 2), or a mask, a
 * multiply that moves three bit groups at once and a mask (3). */
__device__ __forceinline__ void dequant_nvfp4(uint32_t q, uint32_t sg, uint32_t sg8,
                                              uint32_t (&a)[4])
{
    constexpr uint32_t M = 0x81c081c0u;
    a[0] = kern__bf16x2_mul(q & M, sg);
    a[1] = kern__bf16x2_mul(__funnelshift_r(q, q, 3) & M, sg8);
    a[2] = kern__bf16x2_mul(__funnelshift_r(q, q, 6) & M, sg);
    a[3] = kern__bf16x2_mul(((q & 0x001b001bu) * 0x1084u) & M, sg8);
}

/* "UE5M3" scale byte -> BF16 of (scale * 2^118), broadcast to both halves. */
__device__ __forceinline__ uint32_t nvfp4_scale_bf16x2(uint32_t ks)
{
    return ((ks << 4) + 0x7580u) * 0x10001u;
}

/* Two E4M3 bytes (byte pair `hi` of w) -> BF16x2 of value * 2^-120 (exact). */
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t w, int hi)
{
    uint32_t t = __byte_perm(w, 0u, hi ? 0x3424 : 0x1404);
    return (t & 0x80008000u) | ((t & 0x7f007f00u) >> 4);
}

__device__ __forceinline__ void dequant_fp8(uint32_t w0, uint32_t w1, uint32_t fg, uint32_t fg8,
                                            uint32_t (&a)[4])
{
    a[0] = kern__bf16x2_mul(e4m3x2_to_bf16x2(w0, 0), fg);
    a[1] = kern__bf16x2_mul(e4m3x2_to_bf16x2(w0, 1), fg8);
    a[2] = kern__bf16x2_mul(e4m3x2_to_bf16x2(w1, 0), fg);
    a[3] = kern__bf16x2_mul(e4m3x2_to_bf16x2(w1, 1), fg8);
}

__device__ __forceinline__ uint32_t word_of(const uint4 &v, int i)
{
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(bytes)
                 : "memory");
}

/* The warp-specialised wgmma GEMM (moe_gemm_ws.cu): grid (a.N / 128, rt_tiles + sh_tiles, groups),
 * tiles of up to 256 tokens (routed tiles from the grouping with that width). */
int moe__launch_ws(int stage, const gemm_args &a, const gemm_args &sh, int rt_tiles, int sh_tiles,
                   cudaStream_t st, int groups);
int moe__ws_prepare(void);

#endif
