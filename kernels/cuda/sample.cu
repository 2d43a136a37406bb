/*
 * sample.cu - picking tokens on the device (kern_sample_rows), so that only token ids cross to
 * the host: greedy argmax, or one draw u from softmax(logits / temperature) restricted by min-p,
 * top-k and top-p with engine/sampler.c's rules (candidates p >= min_p * p_max; top-k keeps the
 * k most probable, ties to the lower id; top-p keeps the most probable prefix whose mass reaches
 * top_p of the candidates', ties to the lower id). The draw walks the kept tokens in id order
 * (the host walks them in probability order when it sorted): the same distribution, another
 * token for the same u.
 *
 * Greedy rows whose head ran as kern_gemv_bf16_argmax (decode steps of a row or two) take the
 * argmax key that launch left: one word read instead of the row's V logits (a 129280-entry row
 * kept the one block ~7 us).
 *
 * One 1024-thread block per row. The k-th largest probability and the top-p cut are found by
 * bisection over the bit patterns of the (positive) probabilities; ties at a cut are ranked by
 * id with a block-wide scan over contiguous chunks.
 */
#include "kernels/kernels.h"

#include "kernels/cuda/common.cuh"

#define SMP_THREADS 1024
#define SMP_WARPS   (SMP_THREADS / 32)

template <typename T> __device__ __forceinline__ T smp_sum(T v, T *sm)
{
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        sm[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < SMP_WARPS ? sm[threadIdx.x & 31] : (T)0;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float smp_max(float v, float *sm)
{
    for (int o = 16; o; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        sm[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < SMP_WARPS ? sm[threadIdx.x & 31] : -INFINITY;
    for (int o = 16; o; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Exclusive prefix over the block (thread order) of v; every thread gets its prefix. */
__device__ __forceinline__ double smp_scan(double v, double *sm)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    double x = v;
    for (int o = 1; o < 32; o <<= 1) {
        double y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    __syncthreads();
    if (lane == 31)
        sm[w] = x;
    __syncthreads();
    if (w == 0) {
        double s = lane < SMP_WARPS ? sm[lane] : 0.0;
        for (int o = 1; o < 32; o <<= 1) {
            double y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o)
                s += y;
        }
        sm[lane] = s; /* inclusive over warps */
    }
    __syncthreads();
    return (w ? sm[w - 1] : 0.0) + x - v;
}

/* (value, id) maximum over the warp, the lower id on ties; every lane gets it. */
__device__ __forceinline__ void smp_argmax_warp(float *bv, int *bi)
{
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, *bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, *bi, o);
        if (ov > *bv || (ov == *bv && oi < *bi)) {
            *bv = ov;
            *bi = oi;
        }
    }
}

/* id ranges of thread t's contiguous chunk */
__device__ __forceinline__ void smp_chunk(int V, int *j0, int *j1)
{
    const int per = (V + SMP_THREADS - 1) / SMP_THREADS;
    *j0 = threadIdx.x * per < V ? threadIdx.x * per : V;
    *j1 = *j0 + per < V ? *j0 + per : V;
}

/* Keep the probabilities whose key is above `key`, and of those at it the first `ties` in id
 * order (a block-wide scan over contiguous chunks); zero the rest. */
__device__ __forceinline__ void smp_cut(float *p, int V, uint32_t key, int ties, double *smd)
{
    int j0, j1, t = 0;
    smp_chunk(V, &j0, &j1);
    for (int j = j0; j < j1; j++)
        t += __float_as_uint(p[j]) == key;
    int before = (int)smp_scan((double)t, smd);
    __syncthreads();
    for (int j = j0; j < j1; j++) {
        uint32_t k = __float_as_uint(p[j]);
        if (k == key)
            p[j] = before++ < ties ? p[j] : 0.0f;
        else if (k < key)
            p[j] = 0.0f;
    }
    __syncthreads();
}

__global__ void __launch_bounds__(SMP_THREADS)
    sample_rows_k(const float *__restrict__ logits, int V,
                  const struct kern_pick *__restrict__ picks, float *__restrict__ pbuf,
                  unsigned long long *__restrict__ keys, int32_t *__restrict__ out)
{
    kern__pdl_wait();
    kern__pdl_launch();
    __shared__ unsigned long long key;
    __shared__ float smf[SMP_WARPS];
    __shared__ double smd[SMP_WARPS];
    __shared__ int smi[SMP_WARPS];
    const int row = blockIdx.x;
    const float *l = logits + (size_t)row * V;
    float *p = pbuf + (size_t)row * V; /* probabilities (unnormalised, max 1); 0: not a candidate */
    const struct kern_pick P = picks[row];
    if (keys) { /* kern_gemv_bf16_argmax's key, read and reset */
        if (threadIdx.x == 0) {
            key = keys[row];
            keys[row] = 0ull;
        }
        __syncthreads();
    }
    if (!(P.temperature > 0.0f)) { /* greedy */
        if (keys && key) {
            if (threadIdx.x == 0)
                out[row] = (int32_t)(0xffffffffu - (uint32_t)key);
            return;
        }
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        if ((V & 3) == 0 && ((uintptr_t)l & 15) == 0) {
            /* 16-byte loads, eight in flight per thread (one scalar load at a time, their
             * latencies added up: 28.6 us for a 129280-entry row on an H200, ncu); each thread
             * still visits its entries in id order */
            const float4 *l4 = (const float4 *)l;
            const int V4 = V >> 2;
            for (int j0 = threadIdx.x; j0 < V4; j0 += 8 * blockDim.x) {
                float4 v[8];
#pragma unroll
                for (int u = 0; u < 8; u++)
                    if (j0 + u * (int)blockDim.x < V4)
                        v[u] = __ldg(l4 + j0 + u * blockDim.x);
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    const int j = j0 + u * blockDim.x;
                    if (j >= V4)
                        break;
                    const float x[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        if (x[c] > bv || bi == 0x7fffffff) {
                            bv = x[c];
                            bi = 4 * j + c;
                        }
                }
            }
        } else {
            for (int j = threadIdx.x; j < V; j += blockDim.x)
                if (l[j] > bv || bi == 0x7fffffff) {
                    bv = l[j];
                    bi = j;
                }
        }
        smp_argmax_warp(&bv, &bi);
        __shared__ float sv[SMP_WARPS];
        if ((threadIdx.x & 31) == 0) {
            sv[threadIdx.x >> 5] = bv;
            smi[threadIdx.x >> 5] = bi;
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            bv = threadIdx.x < SMP_WARPS ? sv[threadIdx.x] : -INFINITY;
            bi = threadIdx.x < SMP_WARPS ? smi[threadIdx.x] : 0x7fffffff;
            smp_argmax_warp(&bv, &bi);
            if (threadIdx.x == 0)
                out[row] = bi;
        }
        return;
    }
    /* candidates: p = exp((l - max) / T) >= min_p (p_max = 1) */
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        mx = fmaxf(mx, l[j]);
    mx = smp_max(mx, smf);
    const float inv_t = 1.0f / P.temperature, floor_p = P.min_p > 0 ? P.min_p : 0.0f;
    int nc = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float v = expf((l[j] - mx) * inv_t);
        v = v > 0 && v >= floor_p ? v : 0.0f;
        p[j] = v;
        nc += v > 0;
    }
    nc = smp_sum(nc, smi);
    __syncthreads();
    /* top-k: the largest key with at least k candidates at or above it, then k - (those above)
     * of the ties at it, lowest ids first */
    if (P.top_k > 0 && P.top_k < nc) {
        uint32_t lo = 1, hi = __float_as_uint(1.0f); /* keys of positive floats, in order */
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo + 1) / 2;
            int c = 0;
            for (int j = threadIdx.x; j < V; j += blockDim.x)
                c += p[j] > 0 && __float_as_uint(p[j]) >= mid;
            if (smp_sum(c, smi) >= P.top_k)
                lo = mid;
            else
                hi = mid - 1;
        }
        int above = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            above += p[j] > 0 && __float_as_uint(p[j]) > lo;
        above = smp_sum(above, smi);
        smp_cut(p, V, lo, P.top_k - above, smd);
    }
    /* top-p: the largest key whose mass at or above reaches top_p of the candidates', then the
     * ties at it that the host's running sum takes (lowest ids first) */
    if (P.top_p > 0 && P.top_p < 1.0f) {
        double z = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            z += p[j];
        z = smp_sum(z, smd);
        const double target = (double)P.top_p * z;
        uint32_t lo = 1, hi = __float_as_uint(1.0f);
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo + 1) / 2;
            double s = 0;
            for (int j = threadIdx.x; j < V; j += blockDim.x)
                s += p[j] > 0 && __float_as_uint(p[j]) >= mid ? (double)p[j] : 0.0;
            if (smp_sum(s, smd) >= target)
                lo = mid;
            else
                hi = mid - 1;
        }
        double above = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            above += p[j] > 0 && __float_as_uint(p[j]) > lo ? (double)p[j] : 0.0;
        above = smp_sum(above, smd);
        const double v = (double)__uint_as_float(lo);
        /* ties taken until the running sum reaches the target: at least one */
        double need = ceil((target - above) / v);
        smp_cut(p, V, lo, need < 1 ? 1 : (need > 2e9 ? 2000000000 : (int)need), smd);
    }
    /* the draw: the first kept id (id order) whose running mass passes u * mass, else the last */
    int j0, j1;
    smp_chunk(V, &j0, &j1);
    double mine = 0;
    int last = -1;
    for (int j = j0; j < j1; j++) {
        mine += p[j];
        if (p[j] > 0)
            last = j;
    }
    const double before = smp_scan(mine, smd);
    double tot = before + mine;
    __syncthreads();
    if (threadIdx.x == SMP_THREADS - 1)
        smd[0] = tot; /* the row's mass */
    __syncthreads();
    const double target = (double)P.u * smd[0];
    int pick = 0x7fffffff;
    if (before <= target && target < tot) {
        double acc = before;
        for (int j = j0; j < j1; j++) {
            acc += p[j];
            if (p[j] > 0 && acc > target) {
                pick = j;
                break;
            }
        }
    }
    /* the lowest pick over threads; if none (rounding at the very end), the last kept id */
    int best = pick;
    for (int o = 16; o; o >>= 1)
        best = min(best, __shfl_xor_sync(0xffffffffu, best, o));
    int lk = last;
    for (int o = 16; o; o >>= 1)
        lk = max(lk, __shfl_xor_sync(0xffffffffu, lk, o));
    __syncthreads();
    __shared__ int sbest[SMP_WARPS], slast[SMP_WARPS];
    if ((threadIdx.x & 31) == 0) {
        sbest[threadIdx.x >> 5] = best;
        slast[threadIdx.x >> 5] = lk;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int b = 0x7fffffff, la = -1;
        for (int w = 0; w < SMP_WARPS; w++) {
            b = min(b, sbest[w]);
            la = max(la, slast[w]);
        }
        out[row] = b != 0x7fffffff ? b : (la >= 0 ? la : 0); /* nothing kept (NaN row): 0, as
                                                              * the host's argmax */
    }
}

extern "C" int kern_sample_rows(const float *logits, int n, int V, const struct kern_pick *picks,
                                float *pbuf, unsigned long long *keys, int32_t *out,
                                cudaStream_t st)
{
    if (n <= 0)
        return 0;
    if (kern__launch(sample_rows_k, n, SMP_THREADS, 0, st, 1, logits, V, picks, pbuf, keys, out))
        return ERR_CUDA;
    KERN_LAUNCH_CHECK();
    return 0;
}
