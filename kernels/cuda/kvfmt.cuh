/*
 * kvfmt.cuh - the FP8 formats of the cache's KV entries and indexer keys (kernels.h, struct
 * kern_layer_cache): element decode, and block-cooperative encode.
 *
 * The encoder takes values that are already rounded to E4M3 (or E2M1) with one power-of-two
 * scale per block (the model numerics' round trips) and stores them exactly: the block's scale
 * is recomputed from the rounded values' maximum, 2^ceil(log2(amax / 448)); it can only be
 * smaller than the one they were rounded with, which keeps every value on the E4M3 grid (3
 * mantissa bits, and doubling a value keeps it there). The RoPE dims are rounded to BF16.
 */
#ifndef DSV4_KERNELS_CUDA_KVFMT_CUH
#define DSV4_KERNELS_CUDA_KVFMT_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "kernels/kernels.h"

__device__ __forceinline__ float kvf_e4m3(uint8_t b)
{
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    return __half2float(__half(h));
}

__device__ __forceinline__ float kvf_scale(uint8_t s)
{
    return ldexpf(1.0f, (int)s - 127);
}

/* Offset of the BF16 RoPE dims in an FP8 KV entry of nope = hd - rope codes. */
__device__ __forceinline__ int kvf_rope_at(int nope)
{
    return nope + ((nope / 64 + 7) & ~7);
}

/* Element i of an FP8 KV entry e. */
__device__ __forceinline__ float kvf_get(const uint8_t *e, int i, int hd, int rope)
{
    const int nope = hd - rope;
    if (i < nope)
        return kvf_e4m3(e[i]) * kvf_scale(e[nope + i / 64]);
    const __nv_bfloat16 *r = (const __nv_bfloat16 *)(e + kvf_rope_at(nope));
    return __bfloat162float(r[i - nope]);
}

/* Element i of an FP8 indexer key k of Di dims. */
__device__ __forceinline__ float kvf_ikey_get(const uint8_t *k, int i, int Di)
{
    return kvf_e4m3(k[i]) * kvf_scale(k[Di + i / 32]);
}

/*
 * Block-cooperative: v (n) -> codes (n) E4M3 and one UE8M0 scale per blk (<= 64) elements,
 * a warp per block of elements. v may be in shared or global memory (written before the call
 * and visible to the block).
 */
__device__ __forceinline__ void kvf_put_blocks(const float *v, int n, int blk, uint8_t *codes,
                                               uint8_t *scales)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int b0 = warp * blk; b0 < n; b0 += nw * blk) {
        const int len = n - b0 < blk ? n - b0 : blk;
        const float x0 = lane < len ? v[b0 + lane] : 0.0f;
        const float x1 = lane + 32 < len ? v[b0 + lane + 32] : 0.0f;
        float amax = fmaxf(fabsf(x0), fabsf(x1));
        for (int o = 16; o; o >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        int e = 0;
        if (amax > 0.0f) {
            int k;
            float f = frexpf(amax / 448.0f, &k);
            e = f == 0.5f ? k - 1 : k;
            e = e < -127 ? -127 : (e > 127 ? 127 : e);
        }
        const float inv = ldexpf(1.0f, -e);
        if (lane < len)
            codes[b0 + lane] = __nv_cvt_float_to_fp8(x0 * inv, __NV_SATFINITE, __NV_E4M3);
        if (lane + 32 < len)
            codes[b0 + lane + 32] = __nv_cvt_float_to_fp8(x1 * inv, __NV_SATFINITE, __NV_E4M3);
        if (lane == 0)
            scales[b0 / blk] = (uint8_t)(e + 127);
    }
}

/* Block-cooperative: the FP8 KV entry of e (hd floats) at dst. */
__device__ __forceinline__ void kvf_put_entry(const float *e, int hd, int rope, uint8_t *dst)
{
    const int nope = hd - rope;
    kvf_put_blocks(e, nope, 64, dst, dst + nope);
    __nv_bfloat16 *r = (__nv_bfloat16 *)(dst + kvf_rope_at(nope));
    for (int i = threadIdx.x; i < rope; i += blockDim.x)
        r[i] = __float2bfloat16_rn(e[nope + i]);
}

/*
 * Block-cooperative: the window entry of row t (its position's ring slot, in the layer's
 * format) from e (hd floats; shared or global memory, written before and visible to the block).
 */
__device__ __forceinline__ void kvf_put_window(const struct kern_batch &b,
                                               const struct kern_cache &c,
                                               const struct kern_layer_cache &l, int t,
                                               const float *e, int hd, int W)
{
    const long pos = b.row_pos[t];
    char *dst = c.state + (size_t)b.seq_slot[b.row_seq[t]] * c.slot_bytes + l.win +
                (size_t)(pos % W) * l.ent;
    if (l.fp8) {
        kvf_put_entry(e, hd, l.rope, (uint8_t *)dst);
        return;
    }
    for (int k = threadIdx.x; k < hd; k += blockDim.x)
        ((float *)dst)[k] = e[k];
}

#endif
