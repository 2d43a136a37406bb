/*
 * linear.cu - y = x W^T over weights as stored (F32, BF16, FP8 block-scaled, MXFP4), the twin of
 * cpu_linear: each output element is cpu_dot(W row, x row) in its 8-lane order, weights
 * dequantised exactly on the fly. One 8-thread group per output element; groups of a block take
 * consecutive rows of one token so x is shared through L1.
 *
 * This is the correctness baseline; the fast paths (FP8 tensor-core GEMM for prefill, a
 * bandwidth-bound GEMV for decode) replace it later and are checked against it.
 */
#include "kernels/cuda/exact.cuh"

#define LIN_THREADS 256
#define LIN_GROUPS  (LIN_THREADS / 8)

template <int FMT>
__global__ void linear_k(struct kern_qmat W, const float *x, int ldx, int T, float *y, int ldy,
                         int grp_rows, int grp_xoff)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int lane = threadIdx.x & 7;
    const long long o = (long long)blockIdx.x * LIN_GROUPS + (threadIdx.x >> 3);
    const int R = W.rows, C = W.cols;
    const bool live = o < (long long)T * R;
    const int t = live ? (int)(o / R) : 0, r = live ? (int)(o % R) : 0;
    const float *xt = x + (size_t)t * ldx + (grp_rows ? (size_t)(r / grp_rows) * grp_xoff : 0);
    float acc = 0.0f;
    if (live)
        for (int c = lane; c < C; c += 8)
            acc = acc + ex_w<FMT>(W, r, c) * xt[c];
    acc = ex_dot8_combine(acc);
    if (live && lane == 0)
        y[(size_t)t * ldy + r] = acc;
}

extern "C" int kern_linear(const struct kern_qmat *W, const float *x, int ldx, int T, float *y,
                           int ldy, int grp_rows, int grp_xoff, cudaStream_t st)
{
    if (T <= 0 || W->rows <= 0)
        return 0;
    long long n = (long long)T * W->rows;
    unsigned blocks = (unsigned)((n + LIN_GROUPS - 1) / LIN_GROUPS);
    switch (W->fmt) {
    case KERN_W_F32:
        if (kern__launch(linear_k<KERN_W_F32>, blocks, LIN_THREADS, 0, st, 1, *W, x, ldx, T, y, ldy,
                         grp_rows, grp_xoff))
            return ERR_CUDA;
        break;
    case KERN_W_BF16:
        if (kern__launch(linear_k<KERN_W_BF16>, blocks, LIN_THREADS, 0, st, 1, *W, x, ldx, T, y,
                         ldy, grp_rows, grp_xoff))
            return ERR_CUDA;
        break;
    case KERN_W_FP8:
        if (kern__launch(linear_k<KERN_W_FP8>, blocks, LIN_THREADS, 0, st, 1, *W, x, ldx, T, y, ldy,
                         grp_rows, grp_xoff))
            return ERR_CUDA;
        break;
    case KERN_W_MXFP4:
        if (W->cols % 32)
            return ERR_UNSUPPORTED;
        if (kern__launch(linear_k<KERN_W_MXFP4>, blocks, LIN_THREADS, 0, st, 1, *W, x, ldx, T, y,
                         ldy, grp_rows, grp_xoff))
            return ERR_CUDA;
        break;
    default:
        return ERR_UNSUPPORTED;
    }
    EX_LAUNCH_CHECK();
    return 0;
}

template <int FMT>
__global__ void linear_experts_k(const struct kern_qmat *Ws, int E, int rows, int cols,
                                 const int32_t *idx, int P, int x_div, const float *x, int ldx,
                                 float *y, int ldy)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int lane = threadIdx.x & 7;
    const long long o = (long long)blockIdx.x * LIN_GROUPS + (threadIdx.x >> 3);
    const bool live = o < (long long)P * rows;
    const int p = live ? (int)(o / rows) : 0, r = live ? (int)(o % rows) : 0;
    const int e = live ? idx[p] : -1;
    float acc = 0.0f;
    if (live && e >= 0 && e < E) {
        const struct kern_qmat W = Ws[e];
        const float *xt = x + (size_t)(p / x_div) * ldx;
        for (int c = lane; c < cols; c += 8)
            acc = acc + ex_w<FMT>(W, r, c) * xt[c];
    }
    acc = ex_dot8_combine(acc);
    if (live && lane == 0)
        y[(size_t)p * ldy + r] = acc;
}

extern "C" int kern_linear_experts(const struct kern_qmat *Ws, int E, int fmt, int rows, int cols,
                                   const int32_t *idx, int P, int x_div, const float *x, int ldx,
                                   float *y, int ldy, cudaStream_t st)
{
    if (P <= 0 || rows <= 0)
        return 0;
    if (x_div < 1)
        return ERR_INVAL;
    long long n = (long long)P * rows;
    unsigned blocks = (unsigned)((n + LIN_GROUPS - 1) / LIN_GROUPS);
#define LIN_EXP(F)                                                                                 \
    if (kern__launch(linear_experts_k<F>, blocks, LIN_THREADS, 0, st, 1, Ws, E, rows, cols, idx,   \
                     P, x_div, x, ldx, y, ldy))                                                    \
    return ERR_CUDA
    switch (fmt) {
    case KERN_W_F32:
        LIN_EXP(KERN_W_F32);
        break;
    case KERN_W_BF16:
        LIN_EXP(KERN_W_BF16);
        break;
    case KERN_W_FP8:
        LIN_EXP(KERN_W_FP8);
        break;
    case KERN_W_MXFP4:
        if (cols % 32)
            return ERR_UNSUPPORTED;
        LIN_EXP(KERN_W_MXFP4);
        break;
    default:
        return ERR_UNSUPPORTED;
    }
#undef LIN_EXP
    EX_LAUNCH_CHECK();
    return 0;
}
