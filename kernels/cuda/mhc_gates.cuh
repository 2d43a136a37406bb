/*
 * mhc_gates.cuh - the post and comb gates of 4 mHC streams on one thread (hcf_gates4), shared
 * by the fast path's finish (mhc_fast.cu), which makes them or leaves their inputs, and hc_post
 * (dense.cu), which makes them from those inputs before its dependency wait. Internal to
 * kernels/cuda.
 */
#ifndef DSV4_KERNELS_CUDA_MHC_GATES_CUH
#define DSV4_KERNELS_CUDA_MHC_GATES_CUH

#include <math.h>

/* 1 / x: the approximate reciprocal (MUFU, 2 ulp) and one Newton step (within an ulp, nearly
 * always the correctly rounded value) - a few cycles, where __frcp_rn and the IEEE division are
 * slow subroutines on the gates' serial chain. */
__device__ __forceinline__ float hcf_rcp(float x)
{
    const float r = __fdividef(1.0f, x);
    return fmaf(r, fmaf(-x, r, 1.0f), r);
}

/*
 * The post and comb gates of 4 streams from z = mix * scale + base (24 values in shared memory),
 * by the calling thread alone: the exact path's operations in its order (sequential row and
 * column sums), in registers, with expf and one reciprocal (hcf_rcp) per row or column sum in
 * place of glibc-rounded exp and 4 IEEE divisions each. The IEEE divisions are what made the gates
 * slow: the exact path's warp version, and this one with __frcp_rn, were each ~7 us of
 * hcf_finish_k's 13-14 at one row; with the bare approximate reciprocal the Flash decode step at
 * batch 1 went 1.855 -> 1.776 ms (H200, bench_gpu_engine, two runs each). Only hc_post reads
 * these: hcf_finish_k runs them on a warp of their own beside the collapse, which needs only
 * the pre gates, or leaves z to hc_post (kern_hc_pre_fast_raw, kern_hc_post_raw).
 */
__device__ __forceinline__ void hcf_gates4(const float *z, int iters, float hc_eps, float *post,
                                           float *comb_out)
{
    float m[4][4];
#pragma unroll
    for (int t = 0; t < 4; t++)
        post[t] = 2.0f * (1.0f / (1.0f + expf(-z[4 + t])));
#pragma unroll
    for (int j = 0; j < 4; j++) { /* softmax of row j, + eps */
        float mx = -INFINITY, sum = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++)
            mx = fmaxf(mx, z[8 + 4 * j + k]);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            m[j][k] = expf(z[8 + 4 * j + k] - mx);
            sum += m[j][k];
        }
        const float r = hcf_rcp(sum);
#pragma unroll
        for (int k = 0; k < 4; k++)
            m[j][k] = m[j][k] * r + hc_eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)
#pragma unroll
            for (int j = 0; j < 4; j++) { /* rows */
                const float r = hcf_rcp(((m[j][0] + m[j][1]) + m[j][2]) + m[j][3] + hc_eps);
#pragma unroll
                for (int k = 0; k < 4; k++)
                    m[j][k] *= r;
            }
#pragma unroll
        for (int k = 0; k < 4; k++) { /* columns */
            const float r = hcf_rcp(((m[0][k] + m[1][k]) + m[2][k]) + m[3][k] + hc_eps);
#pragma unroll
            for (int j = 0; j < 4; j++)
                m[j][k] *= r;
        }
    }
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int k = 0; k < 4; k++)
            comb_out[4 * j + k] = m[j][k];
}

#endif
