/*
 * common.cuh - shared helpers of the CUDA kernels: error mapping, launch checks, small PTX
 * wrappers. Internal to kernels/cuda (not part of the C API).
 */
#ifndef DSV4_KERNELS_CUDA_COMMON_CUH
#define DSV4_KERNELS_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "engine/err.h"

/* After a launch: the launch error (not a device sync), mapped to ERR_CUDA. */
#define KERN_LAUNCH_CHECK()                                                                        \
    do {                                                                                           \
        if (cudaPeekAtLastError() != cudaSuccess)                                                  \
            return ERR_CUDA;                                                                       \
    } while (0)

#define KERN_CHECK(call)                                                                           \
    do {                                                                                           \
        if ((call) != cudaSuccess)                                                                 \
            return ERR_CUDA;                                                                       \
    } while (0)

static inline size_t kern__align(size_t n)
{
    return (n + 255) & ~(size_t)255;
}

/* d = a * b on two packed BF16 (round to nearest; subnormal inputs are kept). */
__device__ __forceinline__ uint32_t kern__bf16x2_mul(uint32_t a, uint32_t b)
{
    uint32_t d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

/* acc (16x8 FP32 fragment) += A (16x16 BF16, 4 regs) . B (16x8 BF16, 2 regs) */
__device__ __forceinline__ void kern__mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* 16-byte streaming load that skips L1 allocation (weights are read once). */
__device__ __forceinline__ uint4 kern__ld_stream(const uint4 *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 kern__ld_stream2(const uint2 *p)
{
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p));
    return v;
}

/*
 * Programmatic dependent launch (sm_90). Rule used by every kernel here: wait for the
 * predecessor grid before touching what it wrote, and signal dependents only after that wait;
 * both are no-ops when a kernel was launched without the attribute.
 */
__device__ __forceinline__ void kern__pdl_wait(void)
{
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void kern__pdl_launch(void)
{
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

/* 0 when DSV4_CUDA_PDL=0 or DSV4_CUDA_TRACE is set (read once): every launch then plain, for
 * A/B timing (runtime.cu). */
int kern__pdl_on(void);
/* Multiprocessors of device 0 (read once; 132 if the query fails): for sizing grids. */
int kern__sm_count(void);
/* DSV4_CUDA_TRACE: events around every kern__launch (kern_trace_report() prints them). */
int kern__trace_on(void);
void kern__trace(const void *fn, cudaStream_t st, int after);

/* Launch `kern` with programmatic stream serialization (pdl != 0) or plainly. Every kernel so
 * launched starts with kern__pdl_wait() before it touches what a predecessor wrote (the MoE
 * kernels prefetch static weights first) and signals with kern__pdl_launch() after it, so the
 * next kernel's blocks are resident when this one ends: in a CUDA graph of short kernels this
 * hides most of the launch gap. */
template <typename... P, typename... A>
static int kern__launch(void (*kern)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                        int pdl, A... args)
{
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[1];
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl && kern__pdl_on() ? 1 : 0;
    const int trace = kern__trace_on();
    if (trace)
        kern__trace((const void *)kern, st, 0);
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kern, args...);
    if (trace)
        kern__trace((const void *)kern, st, 1);
    return e == cudaSuccess ? 0 : ERR_CUDA;
}

/* Sum of v over the block in a fixed tree (warp xor-shuffles, then the warp sums): every thread
 * gets it, the same for any batch; sm: 32 floats. */
__device__ __forceinline__ float kern__block_sum(float v, float *sm)
{
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads(); /* sm may still be read by a previous call */
    if (lane == 0)
        sm[w] = v;
    __syncthreads();
    v = lane < nw ? sm[lane] : 0.0f;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Position of element i (of a row) in the permuted activation layout of the wgmma path
 * (kern_act_bf16 with perm; kernels/cuda/moe_nvfp4.cu) */
__device__ __forceinline__ int perm64(int i)
{
    int q = i & 63, w = q >> 1;
    int c = w >> 3, s = (w >> 1) & 3, h = w & 1;
    return (i & ~63) | ((8 * s + 4 * h + c) << 1) | (q & 1);
}

/* ---- wgmma (sm_90a) ---- */

__device__ __forceinline__ void kern__wgmma_fence(void)
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void kern__wgmma_commit(void)
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ void kern__wgmma_wait(void)
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/*
 * Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes
 * (64 BF16), 8-row atoms 1024 bytes apart; base 1024-byte aligned.
 */
__device__ __forceinline__ uint64_t kern__desc_sw128(const void *smem)
{
    uint64_t a = (uint64_t)__cvta_generic_to_shared(smem);
    return ((a & 0x3ffff) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

/* D (64 x 64, FP32 fragments) += A (64 x 16 BF16, registers, mma.m16n8k16 A layout per warp)
 * . B (16 x 64 BF16, K-major shared memory, descriptor). */
__device__ __forceinline__ void kern__wgmma_m64n64k16_rs(float (&d)[32], uint32_t a0, uint32_t a1,
                                                         uint32_t a2, uint32_t a3, uint64_t desc_b)
{
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
                 "}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n"
                 "}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                   "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
                   "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
                   "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                   "+f"(d[30]), "+f"(d[31])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

/* D (64 x 128, FP32 fragments) += A (64 x 16 BF16, registers, mma.m16n8k16 A layout per warp)
 * . B (16 x 128 BF16, K-major shared memory, descriptor). */
__device__ __forceinline__ void kern__wgmma_m64n128k16_rs(float (&d)[64], uint32_t a0, uint32_t a1,
                                                          uint32_t a2, uint32_t a3, uint64_t desc_b)
{
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 "{"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
                 "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
                 "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
                 "}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n"
                 "}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
                   "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
                   "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),
                   "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                   "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
                   "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
                   "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),
                   "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
                   "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1));
}

/* ---- mbarriers (shared memory, CTA scope) ---- */

__device__ __forceinline__ void kern__mbar_init(uint64_t *bar, int count)
{
    asm volatile(
        "mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
        "r"(count)
        : "memory");
}

/* Arrive (release): this thread's earlier shared-memory writes are visible to a waiter. */
__device__ __forceinline__ void kern__mbar_arrive(uint64_t *bar)
{
    asm volatile(
        "mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar))
        : "memory");
}

/* Wait (acquire) until the phase of parity `parity` has completed. */
__device__ __forceinline__ void kern__mbar_wait(uint64_t *bar, uint32_t parity)
{
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(bar);
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(a), "r"(parity)
                     : "memory");
    } while (!done);
}

#endif
