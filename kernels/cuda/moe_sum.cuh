/*
 * moe_sum.cuh - a row of the MoE output from its parts (struct kern_moe_sum), shared by the
 * MoE's own sum kernel (moe_nvfp4.cu) and the mHC post that takes the parts directly (dense.cu),
 * so both add in the same order and give the same bits.
 */
#ifndef DSV4_KERNELS_CUDA_MOE_SUM_CUH
#define DSV4_KERNELS_CUDA_MOE_SUM_CUH

#include "kernels/kernels.h"

/*
 * float4 column k4 of row t: the slots' outputs in slot order (an unused slot, id outside
 * [0, E), is read and discarded), then the shared expert's. Reads what the down GEMM wrote:
 * call after the dependency wait. The ids and outputs of 8 slots are loaded together (one
 * memory round trip, not one for the id and then one for the output).
 */
__device__ __forceinline__ float4 moe__sum_row4(const struct kern_moe_sum &m, int t, int k4, int d)
{
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 sh = m.ysh ? __ldg((const float4 *)(m.ysh + (size_t)t * d) + k4) : acc;
    for (int j0 = 0; j0 < m.K; j0 += 8) {
        int e[8];
        float4 v[8];
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j0 + j < m.K) {
                e[j] = m.idx[(size_t)t * m.K + j0 + j];
                v[j] = __ldg((const float4 *)(m.yslot + ((size_t)t * m.K + j0 + j) * d) + k4);
            }
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j0 + j < m.K && e[j] >= 0 && e[j] < m.E) {
                acc.x += v[j].x;
                acc.y += v[j].y;
                acc.z += v[j].z;
                acc.w += v[j].w;
            }
    }
    if (m.ysh) {
        acc.x += sh.x;
        acc.y += sh.y;
        acc.z += sh.z;
        acc.w += sh.w;
    }
    return acc;
}

#endif
