/*
 * linear_fast.cu - the tensor-core linears of the GPU engine's fast path (engine/backend_cuda.c):
 * activations to BF16 for the GEMMs, the hi + lo sum of split activations, and BF16-weight GEMMs
 * through cuBLAS. (FP8 weights run through kern_gemm_fp8, moe_nvfp4.cu.)
 *
 * Numerics. The products stay exact: FP8 weights and FP8-rounded activations (the model's
 * power-of-two-scaled round trip) are exact in BF16; where the model keeps FP32 activations
 * (wo_a, the compressors, weights_proj, the head) x is split into hi = bf16(x) and
 * lo = bf16(x - hi) (16 significant bits), both rows go through one GEMM (the weights are read
 * once) and the two results are added. Sums are FP32 on the tensor cores; only the summation
 * order differs from the CPU engine.
 */
#include "kernels/kernels.h"

#include <cublas_v2.h>
#include <stdlib.h>
#include <cuda_bf16.h>

#include "kernels/cuda/exact.cuh"
#include "kernels/cuda/moe_internal.cuh"

__global__ void act_bf16_k(const float *__restrict__ x, int ldx, int T, int C, int split, int perm,
                           __nv_bfloat16 *__restrict__ xb)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y;
    const float *xt = x + (size_t)t * ldx;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < C; i += gridDim.x * blockDim.x) {
        float v = xt[i];
        __nv_bfloat16 hi = __float2bfloat16_rn(v);
        int at = perm ? (i & ~63) | perm64(i & 63) : i;
        xb[(size_t)t * C + at] = hi;
        if (split)
            xb[(size_t)(T + t) * C + at] = __float2bfloat16_rn(v - __bfloat162float(hi));
    }
}

extern "C" int kern_act_bf16(const float *x, int ldx, int T, int C, int split, int perm,
                             uint16_t *xb, cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if ((perm && C % 64) || T > 65535)
        return ERR_UNSUPPORTED;
    /* about two waves of blocks, at least 8 per row: a decode row of wo_a's 32768 columns
     * takes 128 (2.2 instead of 5.1 us, H200, ncu) */
    const int waves2 = 2 * kern__sm_count();
    const int per_row = (C + 255) / 256, cap = (waves2 + T - 1) / T > 8 ? (waves2 + T - 1) / T : 8;
    dim3 grid((unsigned)(per_row < cap ? per_row : cap), (unsigned)T);
    if (kern__launch(act_bf16_k, grid, 256, 0, st, 1, x, ldx, T, C, split, perm,
                     (__nv_bfloat16 *)xb))
        return ERR_CUDA;
    KERN_LAUNCH_CHECK();
    return 0;
}

__global__ void add_split_k(const float *__restrict__ a, int T, int n, float *__restrict__ y,
                            int ldy)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x)
        y[(size_t)t * ldy + j] = a[(size_t)t * n + j] + a[(size_t)(T + t) * n + j];
}

/* add_split_k by float4, a warp per 128 columns, that also writes act_quant_bf16_k's BF16 of y
 * (perm 0) into xb (T, n) */
__global__ void add_split_xb_k(const float *__restrict__ a, int T, int n, float *__restrict__ y,
                               int ldy, __nv_bfloat16 *__restrict__ xb)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x; /* float4 column */
    if (4 * c >= n) /* (whole warps: n % 128 == 0) */
        return;
    const float4 h = ((const float4 *)(a + (size_t)t * n))[c],
                 l = ((const float4 *)(a + (size_t)(T + t) * n))[c];
    const float4 v = make_float4(h.x + l.x, h.y + l.y, h.z + l.z, h.w + l.w);
    ((float4 *)(y + (size_t)t * ldy))[c] = v;
    ex_fp8_bf16_warp4(v, xb + (size_t)t * n + 4 * c);
}

extern "C" int kern_add_split(const float *a, int T, int n, float *y, int ldy, uint16_t *xb,
                              cudaStream_t st)
{
    if (T <= 0)
        return 0;
    if (T > 65535 || (xb && (n % 128 || ldy % 4 || (uintptr_t)y % 16)))
        return ERR_UNSUPPORTED;
    if (xb) {
        if (kern__launch(add_split_xb_k, dim3((unsigned)(n / 4 + 127) / 128, (unsigned)T), 128, 0,
                         st, 1, a, T, n, y, ldy, (__nv_bfloat16 *)xb))
            return ERR_CUDA;
        KERN_LAUNCH_CHECK();
        return 0;
    }
    unsigned gx = (unsigned)((n + 255) / 256);
    if (kern__launch(add_split_k, dim3(gx < 64 ? gx : 64, (unsigned)T), 256, 0, st, 1, a, T, n, y,
                     ldy))
        return ERR_CUDA;
    KERN_LAUNCH_CHECK();
    return 0;
}

/* ---- cuBLAS ---- */

struct kern_blas {
    cublasHandle_t h;
};

extern "C" int kern_blas_new(struct kern_blas **out, cudaStream_t st, void *ws, size_t ws_bytes)
{
    struct kern_blas *b = (struct kern_blas *)calloc(1, sizeof *b);
    *out = NULL;
    if (!b)
        return ERR_NOMEM;
    if (cublasCreate(&b->h) != CUBLAS_STATUS_SUCCESS) {
        free(b);
        return ERR_CUDA;
    }
    /* a caller-owned workspace: no allocation inside a call (CUDA graph capture) */
    if (cublasSetStream(b->h, st) != CUBLAS_STATUS_SUCCESS ||
        (ws && cublasSetWorkspace(b->h, ws, ws_bytes) != CUBLAS_STATUS_SUCCESS) ||
        cublasSetMathMode(b->h, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(b->h);
        free(b);
        return ERR_CUDA;
    }
    *out = b;
    return 0;
}

extern "C" void kern_blas_free(struct kern_blas *b)
{
    if (!b)
        return;
    cublasDestroy(b->h);
    free(b);
}

extern "C" int kern_blas_gemm_bf16(struct kern_blas *b, const uint16_t *W, int rows, int cols,
                                   const uint16_t *xb, int ldx, int T, float *y, int ldy)
{
    if (T <= 0)
        return 0;
    const float one = 1.0f, zero = 0.0f;
    /* column-major view: y^T (rows, T) = W^T^T . xb^T, W stored (rows, cols) row-major */
    cublasStatus_t s = cublasGemmEx(b->h, CUBLAS_OP_T, CUBLAS_OP_N, rows, T, cols, &one, W,
                                    CUDA_R_16BF, cols, xb, CUDA_R_16BF, ldx, &zero, y, CUDA_R_32F,
                                    ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return s == CUBLAS_STATUS_SUCCESS ? 0 : ERR_CUDA;
}
