/*
 * gemv_bf16.cu - BF16-weight linears of a few rows (decode steps) on the CUDA cores, for the
 * GPU engine's fast path: the compressor and indexer projections of x, several matrices that
 * read the same x in one launch.
 *
 * Why not cuBLAS there: at 1-16 rows the cuBLAS route (x split into BF16 hi + lo rows, a
 * split-K GEMM, its reduction kernel, the hi + lo add) is four launches per matrix of a few
 * microseconds each for 0.5-8 MB of weights (H200, 8-layer Flash model, batch 1, ncu: ~0.23 ms
 * of kernel time per 2.0 ms step; this kernel: ~0.05 ms). Here x stays FP32 (no hi + lo split):
 * each product W[r][c] x[t][c] enters an FP32 FMA unrounded, the sums are FP32 in an order fixed by
 * (r, c) alone, so a row's result does not depend on T or on the other matrices of the launch
 * (batch invariance).
 *
 * Work split: a block = GV_ROWS weight rows x TT token rows (TT = 1, 2, 4 or 8 by T: fewer
 * registers for fewer rows, 62 at 1 for four blocks per SM, 128 at 8 for two; blockIdx.y: the
 * next TT rows);
 * its 8 warps split the columns (8-column vectors j, warp (j / 32) % 8, lane j % 32), each lane
 * sums its vectors in order, the warp adds its lanes by a butterfly, the block adds its warps in
 * warp order. None of that depends on TT.
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/kernels.h"

#include "kernels/cuda/common.cuh"

#define GV_ROWS    4 /* weight rows per block */
#define GV_WARPS   8
#define GV_THREADS (GV_WARPS * 32)

struct gv_args {
    const uint16_t *w[KERN_GEMV_MAX]; /* (rows_i, cols) BF16 */
    float *y[KERN_GEMV_MAX];          /* (T, ldy_i) */
    int ldy[KERN_GEMV_MAX], rows[KERN_GEMV_MAX];
    int rb0[KERN_GEMV_MAX + 1]; /* first block of matrix i; rb0[n] = blocks */
    int n;
    const float *x; /* (T, ldx) */
    int ldx, cols, T;
    unsigned long long *best; /* NULL, or (T) argmax keys (kern_gemv_bf16_argmax; one matrix) */
};

/* The argmax key of output v of row id: larger keys for larger values, for equal values the
 * lower id; -0 as +0; NaN 0 (never picked, "no key"). */
__device__ __forceinline__ unsigned long long gv_key(float v, int id)
{
    if (v != v)
        return 0ull;
    uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xffffffffu - (uint32_t)id);
}

/* sum_k w[k] x[k] over the 8 BF16 weights of v and the 8 floats x0, x1 (in k order) */
__device__ __forceinline__ float gv_dot8(const uint4 &v, const float4 &x0, const float4 &x1,
                                         float acc)
{
    acc = fmaf(__uint_as_float(v.x << 16), x0.x, acc);
    acc = fmaf(__uint_as_float(v.x & 0xffff0000u), x0.y, acc);
    acc = fmaf(__uint_as_float(v.y << 16), x0.z, acc);
    acc = fmaf(__uint_as_float(v.y & 0xffff0000u), x0.w, acc);
    acc = fmaf(__uint_as_float(v.z << 16), x1.x, acc);
    acc = fmaf(__uint_as_float(v.z & 0xffff0000u), x1.y, acc);
    acc = fmaf(__uint_as_float(v.w << 16), x1.z, acc);
    return fmaf(__uint_as_float(v.w & 0xffff0000u), x1.w, acc);
}

template <int GV_TT>
__global__ void __launch_bounds__(GV_THREADS, GV_TT <= 2 ? 4 : 2) gemv_bf16_k(const gv_args a)
{
    __shared__ float red[GV_WARPS][GV_ROWS * GV_TT];
    int i = 0;
    while (i + 1 < a.n && (int)blockIdx.x >= a.rb0[i + 1])
        i++;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = ((int)blockIdx.x - a.rb0[i]) * GV_ROWS, t0 = blockIdx.y * GV_TT;
    const int nr = min(GV_ROWS, a.rows[i] - r0), nt = min(GV_TT, a.T - t0), nv = a.cols / 8;
    /* rows past nr repeat row r0 (their sums are not stored) */
    const uint4 *w[GV_ROWS];
#pragma unroll
    for (int r = 0; r < GV_ROWS; r++)
        w[r] = (const uint4 *)(a.w[i] + (size_t)(r0 + (r < nr ? r : 0)) * a.cols);
    float acc[GV_ROWS][GV_TT];
#pragma unroll
    for (int r = 0; r < GV_ROWS; r++)
#pragma unroll
        for (int t = 0; t < GV_TT; t++)
            acc[r][t] = 0.0f;
    /* the weights are static: the first vectors load before the wait for x */
    int j = warp * 32 + lane;
    uint4 nx[GV_ROWS];
#pragma unroll
    for (int r = 0; r < GV_ROWS; r++)
        nx[r] = j < nv ? kern__ld_stream(w[r] + j) : make_uint4(0, 0, 0, 0);
    kern__pdl_wait();
    kern__pdl_launch();
    for (; j < nv; j += GV_THREADS) {
        uint4 cur[GV_ROWS];
#pragma unroll
        for (int r = 0; r < GV_ROWS; r++) {
            cur[r] = nx[r];
            if (j + GV_THREADS < nv)
                nx[r] = kern__ld_stream(w[r] + j + GV_THREADS);
        }
#pragma unroll
        for (int t = 0; t < GV_TT; t++) {
            if (t < nt) {
                const float4 *xt = (const float4 *)(a.x + (size_t)(t0 + t) * a.ldx) + 2 * j;
                const float4 x0 = __ldg(xt), x1 = __ldg(xt + 1);
#pragma unroll
                for (int r = 0; r < GV_ROWS; r++)
                    acc[r][t] = gv_dot8(cur[r], x0, x1, acc[r][t]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GV_ROWS; r++)
#pragma unroll
        for (int t = 0; t < GV_TT; t++) {
            float v = acc[r][t];
#pragma unroll
            for (int o = 16; o; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0)
                red[warp][r * GV_TT + t] = v;
        }
    __syncthreads();
    if (warp == 0) { /* lane = r * GV_TT + t */
        const int r = lane / GV_TT, t = lane % GV_TT;
        const bool mine = lane < GV_ROWS * GV_TT && r < nr && t < nt;
        float v = 0.0f;
        if (mine) {
            v = red[0][lane];
#pragma unroll
            for (int k = 1; k < GV_WARPS; k++)
                v += red[k][lane];
            a.y[i][(size_t)(t0 + t) * a.ldy[i] + r0 + r] = v;
        }
        if (a.best) { /* the block's best row per t, then one atomic where it may win */
            unsigned long long k = mine ? gv_key(v, r0 + r) : 0ull;
#pragma unroll
            for (int o = GV_TT; o < GV_ROWS * GV_TT; o <<= 1) {
                const unsigned long long ko = __shfl_xor_sync(0xffffffffu, k, o);
                k = ko > k ? ko : k;
            }
            if (lane < GV_TT && t < nt && k > *(volatile unsigned long long *)(a.best + t0 + t))
                atomicMax(a.best + t0 + t, k);
        }
    }
}

static int gemv_run(const struct kern_gemv_mat *m, int n, const float *x, int ldx, int cols, int T,
                    unsigned long long *best, struct CUstream_st *stream)
{
    if (T <= 0 || n <= 0)
        return 0;
    if (n > KERN_GEMV_MAX || T > KERN_GEMV_MAX_T || cols <= 0 || cols % 8 || ldx % 4 ||
        ((uintptr_t)x & 15))
        return ERR_UNSUPPORTED;
    gv_args a = {};
    a.n = n;
    a.x = x;
    a.ldx = ldx;
    a.cols = cols;
    a.T = T;
    a.best = best;
    for (int i = 0; i < n; i++) {
        if (m[i].rows <= 0 || m[i].ldy < m[i].rows || ((uintptr_t)m[i].w & 15))
            return ERR_UNSUPPORTED;
        a.w[i] = m[i].w;
        a.y[i] = m[i].y;
        a.ldy[i] = m[i].ldy;
        a.rows[i] = m[i].rows;
        a.rb0[i + 1] = a.rb0[i] + (m[i].rows + GV_ROWS - 1) / GV_ROWS;
    }
    const int TT = T == 1 ? 1 : (T == 2 ? 2 : (T <= 4 ? 4 : 8));
    dim3 grid((unsigned)a.rb0[n], (unsigned)((T + TT - 1) / TT));
    int rc = TT == 1   ? kern__launch(gemv_bf16_k<1>, grid, dim3(GV_THREADS), 0, stream, 1, a)
             : TT == 2 ? kern__launch(gemv_bf16_k<2>, grid, dim3(GV_THREADS), 0, stream, 1, a)
             : TT == 4 ? kern__launch(gemv_bf16_k<4>, grid, dim3(GV_THREADS), 0, stream, 1, a)
                       : kern__launch(gemv_bf16_k<8>, grid, dim3(GV_THREADS), 0, stream, 1, a);
    if (rc)
        return ERR_CUDA;
    KERN_LAUNCH_CHECK();
    return 0;
}

extern "C" int kern_gemv_bf16(const struct kern_gemv_mat *m, int n, const float *x, int ldx,
                              int cols, int T, struct CUstream_st *stream)
{
    return gemv_run(m, n, x, ldx, cols, T, NULL, stream);
}

extern "C" int kern_gemv_bf16_argmax(const struct kern_gemv_mat *m, const float *x, int ldx,
                                     int cols, int T, unsigned long long *best,
                                     struct CUstream_st *stream)
{
    return best ? gemv_run(m, 1, x, ldx, cols, T, best, stream) : ERR_INVAL;
}
