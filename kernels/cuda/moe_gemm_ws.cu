/*
 * moe_gemm_ws.cu - the MoE GEMMs (and the dense FP8 linears) with many tokens per weight
 * matrix: warp-specialised wgmma, both operands in shared memory (sm_90a).
 *
 * Block = 3 warpgroups over WS_BM = 128 weight rows x one tile of <= 256 tokens:
 *   warpgroup 0, the producer: streams each 64-column k-block of its 128 rows from global
 *     memory into registers (WS_AHEAD k-blocks ahead), decodes it (NVFP4 or FP8 -> BF16: the
 *     decoders of the mma.sync path, exact) and stores it with stmatrix as the A tile (K-major,
 *     128-byte swizzle). Its thread 0 also loads the tile's activation rows as the B tile through
 *     the tensor memory accelerator (TMA: boxes of WS_BOX rows, kernel-parameter tensor maps,
 *     the copy engine applying the same swizzle). A tile's rows are consecutive: GEMM1's routed
 *     tiles read x gathered into grouped order beforehand (moe_nvfp4.cu, moe_gather), since a
 *     box takes consecutive rows and a copy per row costs its issuing thread a serialised loop.
 *   warpgroups 1 and 2, the consumers: only wgmma, 64 weight rows each x N tokens (N = the
 *     tile's token count rounded up to 32, one instantiation per N), then ws_epilogue (the
 *     other paths' arithmetic: SwiGLU and routing weight -> h, or y).
 * Stages: a ring of WS_STAGES (A 16 KB, B 32 KB) with two mbarriers each: `full` (the 128
 * producer threads arrive once their part of A is written and fenced for the async proxy, plus
 * one arrival with the byte count of the B copies, which complete on it) and `empty` (the 256
 * consumer threads arrive once the wgmmas that read it are done). Producer iteration kb: wait
 * empty(kb - WS_STAGES); thread 0 issues B(kb) (B(0 .. WS_STAGES - 1) at the start, into the
 * empty ring); decode and store A(kb), fence, arrive full. So the issuing thread never waits
 * on anything but the wait all producer threads make (waiting further ahead for B's stage held
 * up producer warp 0, and every `full` barrier waits for it: RESULTS.md, thirteenth session).
 * The weights' first loads are issued before the block's barrier, the consumers meanwhile
 * stage the tile's output rows and routing weights in shared memory for the epilogue.
 *
 * Why: the register-A kernel (moe_nvfp4.cu, moe_gemm_wg) decodes in the warps that issue the
 * wgmmas and so serialises decode, barrier and MMA per warp (kernels/cuda/RESULTS.md, fifth
 * session: 37 % of issue slots busy, tensor pipe half idle at T = 8192). Where this one
 * stands and what limits it: RESULTS.md, eighth and twelfth sessions (the eighth session's
 * producer, which also gathered B with cp.async and stored A 4 bytes at a time, issued ~400
 * instructions per k-block at ~0.2 per cycle, one warp per scheduler, and set the pace).
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/cuda/moe_gemm.cuh"
#include "kernels/cuda/wgmma_ss.cuh"

#include <cudaTypedefs.h>
#include <string.h>

#define WS_BM     128 /* weight rows per block */
#define WS_BT     256 /* tokens per tile, at most */
#define WS_STAGES 4
#define WS_AHEAD  3 /* k-blocks of weights in flight in registers ahead of the decoded one */
/* rows of a B box: one copy instruction per 128 rows (64 or 256 rows: Flash T = 8192 6.78 /
 * 6.51 ms against 6.72; Pro 19.7 / 20.5 ms against 19.6; 32: 7.0 ms) */
#define WS_BOX         128
#define WS_NPROD       128 /* producer threads (one warpgroup) */
#define WS_RBT         2   /* 16-row blocks per producer thread */
#define WS_THREADS     (WS_NPROD + 256)
#define WS_A_BYTES     (WS_BM * 128)
#define WS_STAGE_BYTES (WS_A_BYTES + WS_BT * 128)

/* One k-block of the raw weights of a producer thread's two 16-row blocks. */
template <int WF> struct ws_raw;
template <> struct ws_raw<WF_NVFP4> {
    uint4 d[WS_RBT];
    uint2 s[WS_RBT]; /* the 256-column scale group that holds the k-block */
};
template <> struct ws_raw<WF_FP8> {
    uint4 d[WS_RBT][2];
    uint32_t f[WS_RBT];
};

/* The producer's view of its weights: 16-row blocks rb0 .. rb0 + WS_RBT - 1, its lane. */
template <int WF> struct ws_weights {
    const uint4 *wd[WS_RBT];
    const uint2 *wsc[WS_RBT];    /* NVFP4 */
    const uint32_t *fac[WS_RBT]; /* FP8 */

    __device__ __forceinline__ void init(const gemm_args &a, int e, int rb0, int lane)
    {
        const int K = a.Kd, nkb = K / 64;
#pragma unroll
        for (int it = 0; it < WS_RBT; it++) {
            const int rb = rb0 + it;
            if constexpr (WF == WF_NVFP4) {
                wd[it] =
                    (const uint4 *)(a.w + (size_t)e * a.w_estride) + (size_t)rb * nkb * 32 + lane;
                wsc[it] = (const uint2 *)(a.ws + (size_t)e * a.ws_estride) +
                          (size_t)rb * (K / 256) * 32 + lane;
            } else {
                wd[it] = (const uint4 *)a.w + (size_t)rb * nkb * 64 + lane;
                fac[it] = (const uint32_t *)(a.fac + (size_t)rb * (K / 128) * 2);
            }
        }
    }

    __device__ __forceinline__ void load(int kb, ws_raw<WF> &r) const
    {
#pragma unroll
        for (int it = 0; it < WS_RBT; it++) {
            if constexpr (WF == WF_NVFP4) {
                r.d[it] = kern__ld_stream(wd[it] + (size_t)kb * 32);
                r.s[it] = __ldg(wsc[it] + (size_t)(kb >> 2) * 32);
            } else {
                r.d[it][0] = kern__ld_stream(wd[it] + (size_t)kb * 64);
                r.d[it][1] = kern__ld_stream(wd[it] + (size_t)kb * 64 + 32);
                r.f[it] = __ldg(fac[it] + kb / 2);
            }
        }
    }
};

/* Decode k-block kb of both row blocks into the A tile: the fragment registers i of mma k-step
 * s (row g + 8 (i & 1), k 16 s + 2 c + 8 (i >> 1) of the 16-row block) are the 8x8 matrices i
 * of one stmatrix.x4; lane l gives the address of row l & 7 of matrix l >> 3 (sto: ws_produce),
 * row block `it` 2048 bytes further. */
template <int WF>
__device__ __forceinline__ void ws_decode(const ws_raw<WF> &r, int kb, uint32_t stage,
                                          const uint32_t (&sto)[4])
{
    uint32_t af[WS_RBT][4][4];
#pragma unroll
    for (int it = 0; it < WS_RBT; it++) {
        if constexpr (WF == WF_NVFP4) {
            const int b = kb & 3;
            uint32_t sw = b < 2 ? r.s[it].x : r.s[it].y;
            uint32_t sh = (b & 1) ? sw >> 16 : sw;
            uint32_t sg = nvfp4_scale_bf16x2(sh & 0xffu),
                     sg8 = nvfp4_scale_bf16x2((sh >> 8) & 0xffu);
#pragma unroll
            for (int s = 0; s < 4; s++)
                dequant_nvfp4(word_of(r.d[it], s), sg, sg8, af[it][s]);
        } else {
            const uint32_t f = r.f[it];
            uint32_t fg = (f & 0xffffu) * 0x10001u, fg8 = (f >> 16) * 0x10001u;
#pragma unroll
            for (int s = 0; s < 4; s++) {
                const uint4 &v = r.d[it][s >> 1];
                dequant_fp8(word_of(v, (s & 1) * 2), word_of(v, (s & 1) * 2 + 1), fg, fg8,
                            af[it][s]);
            }
        }
    }
#pragma unroll
    for (int it = 0; it < WS_RBT; it++)
#pragma unroll
        for (int s = 0; s < 4; s++)
            asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                             stage + sto[s] + 2048 * it),
                         "r"(af[it][s][0]), "r"(af[it][s][1]), "r"(af[it][s][2]), "r"(af[it][s][3])
                         : "memory");
}

/* All the block's threads meet (named barrier 1: the producer and the consumers reach it from
 * their own code, each warp whole). */
__device__ __forceinline__ void ws_sync_all(void)
{
    asm volatile("bar.sync 1, %0;\n" ::"n"(WS_THREADS) : "memory");
}

/* One TMA copy of a box of the 3-D map tm at (column c0, row c1, group c2) into shared memory,
 * completing on bar. */
__device__ __forceinline__ void ws_tma_load(uint32_t dst, const CUtensorMap *tm, int c0, int c1,
                                            int c2, uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                 "l"(tm), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                 : "memory");
}

/* B of k-block kb (one thread): one arrival with the byte count, then the boxes of WS_BOX rows
 * from row0 (the tile's rows; rows past its count are whatever the map holds there, zeros past
 * its end: their columns are discarded). */
__device__ __forceinline__ void ws_issue_b(const CUtensorMap *tm, int kb, uint32_t sb, uint32_t bar,
                                           int nbox, int row0, int grp)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(nbox * WS_BOX * 128)
                 : "memory");
    for (int i = 0; i < nbox; i++)
        ws_tma_load(sb + i * WS_BOX * 128, tm, kb * 64, row0 + i * WS_BOX, grp, bar);
}

template <int STAGE, int WF>
__device__ __forceinline__ void ws_produce(const gemm_args &a, const CUtensorMap *tm, int e,
                                           int start, int cnt, char *smem, uint64_t *full,
                                           uint64_t *empty)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nkb = a.Kd / 64;

    ws_weights<WF> W;
    W.init(a, e, blockIdx.x * (WS_BM / 16) + WS_RBT * warp, lane);
    ws_raw<WF> rw[WS_AHEAD + 1];
#pragma unroll
    for (int i = 0; i < WS_AHEAD; i++)
        if (i < nkb)
            W.load(i, rw[i]);
    ws_sync_all(); /* the barriers are initialised; the loads above stay in flight */

    const uint32_t s0 = (uint32_t)__cvta_generic_to_shared(smem);
    const uint32_t sb = s0 + WS_A_BYTES, f0 = (uint32_t)__cvta_generic_to_shared(full);
    const int nbox = (cnt + WS_BOX - 1) / WS_BOX;
    const bool loader = threadIdx.x == 0;
    if (loader)
        for (int kb = 0; kb < WS_STAGES && kb < nkb; kb++)
            ws_issue_b(tm, kb, sb + kb * WS_STAGE_BYTES, f0 + 8 * kb, nbox, start, blockIdx.z);
    /* stmatrix row addresses (ws_decode): row 8 ((l >> 3) & 1) + (l & 7) of the warp's first
     * 16-row block, 16-byte unit 2 s + (l >> 4), swizzled by the row */
    const int r8 = 8 * ((lane >> 3) & 1) + (lane & 7);
    uint32_t sto[4];
#pragma unroll
    for (int s = 0; s < 4; s++)
        sto[s] = s0 + (WS_RBT * warp * 16 + r8) * 128 + (((2 * s + (lane >> 4)) ^ (lane & 7)) << 4);
    /* the register ring is indexed statically (unrolled by its length; nkb % 4 == 0): a ring
     * rotated by moves would wait for each new load at the move */
    static_assert(WS_AHEAD + 1 == 4 && WS_STAGES == 4, "nkb is a multiple of 4, not of these");
    for (int kb0 = 0; kb0 < nkb; kb0 += WS_AHEAD + 1) {
#pragma unroll
        for (int j = 0; j <= WS_AHEAD; j++) {
            const int kb = kb0 + j, s = j;
            if (kb + WS_AHEAD < nkb)
                W.load(kb + WS_AHEAD, rw[(j + WS_AHEAD) % (WS_AHEAD + 1)]);
            if (kb >= WS_STAGES) { /* the consumers are done with the stage's previous k-block */
                kern__mbar_wait(&empty[s], ((kb / WS_STAGES) - 1) & 1);
                /* B first, so that its copy overlaps the decode */
                if (loader)
                    ws_issue_b(tm, kb, sb + s * WS_STAGE_BYTES, f0 + 8 * s, nbox, start,
                               blockIdx.z);
            }
            ws_decode<WF>(rw[j], kb, s * WS_STAGE_BYTES, sto);
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            kern__mbar_arrive(&full[s]);
        }
    }
}

/* What a consumer's epilogue writes with, for the tile's kind (routed or shared / dense). */
struct ws_out {
    float a0, a1;        /* alpha: gate and up (GEMM1) or down (GEMM2) */
    float limit;         /* GEMM1: SwiGLU clamp */
    int I;               /* GEMM1: h row length */
    __nv_bfloat16 *hout; /* GEMM1 */
    float *yout;         /* GEMM2 */
    int ldout;           /* GEMM2 */
};

/*
 * Epilogue of one consumer warp's 16 weight rows (16-row block rb) x NG token groups of 8:
 * acc[4n + i] is the wgmma m64nN accumulator of the warp, laid out as the mma.m16n8k16 C
 * fragment of group n (rows g, g+8; tokens 2c, 2c+1). GEMM1: rows g / g+8 are the gate / up
 * rows of channel 8 rb + g, placed at perm64 of it (the wgmma paths' activation order);
 * clamped SwiGLU times the routing weight -> h in BF16. GEMM2: -> y in FP32 (routed: by slot).
 * meta (shared memory): per token j of the tile, x = its output row (GEMM2) and y = the bits of
 * its routing weight (GEMM1). The mma.sync and register-A kernels (moe_nvfp4.cu) keep the same
 * arithmetic inline: sharing one function changed moe_gemm_wg's schedule and cost 12 % there
 * (kernels/cuda/RESULTS.md, eighth session).
 */
template <int STAGE, int NG>
__device__ __forceinline__ void ws_epilogue(const ws_out &o, const float *acc, int rb, int lane,
                                            int start, int cnt, const int2 *meta)
{
    const int g = lane >> 2, c = lane & 3;
    if (STAGE == STAGE_GATEUP) {
        const int ch = perm64(rb * 8 + g);
#pragma unroll
        for (int n = 0; n < NG; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                float wr = __int_as_float(meta[j].y);
                float gv = fminf(acc[4 * n + h] * o.a0, o.limit);
                float uv = fminf(fmaxf(acc[4 * n + 2 + h] * o.a1, -o.limit), o.limit);
                float hv = wr * (gv / (1.0f + expf(-gv))) * uv;
                o.hout[(size_t)(start + j) * o.I + ch] = __float2bfloat16_rn(hv);
            }
    } else {
        const int o0 = rb * 16 + g;
#pragma unroll
        for (int n = 0; n < NG; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int dst = meta[j].x;
                o.yout[(size_t)dst * o.ldout + o0] = acc[4 * n + h] * o.a0;
                o.yout[(size_t)dst * o.ldout + o0 + 8] = acc[4 * n + 2 + h] * o.a0;
            }
    }
}

/* A consumer warpgroup: the MMAs of its 64 weight rows, then the epilogue. */
template <int STAGE, int N>
__device__ __forceinline__ void ws_consume(const ws_out &o, int nkb, int start, int cnt, char *smem,
                                           uint64_t *full, uint64_t *empty, const int2 *meta)
{
    const int wg = (threadIdx.x - WS_NPROD) >> 7, warp = (threadIdx.x >> 5) & 3,
              lane = threadIdx.x & 31;
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; i++)
        acc[i] = 0.0f;
    for (int kb = 0; kb < nkb; kb++) {
        const int s = kb % WS_STAGES;
        kern__mbar_wait(&full[s], (kb / WS_STAGES) & 1);
        char *st = smem + s * WS_STAGE_BYTES;
        const uint64_t da = kern__desc_sw128(st + wg * 64 * 128),
                       db = kern__desc_sw128(st + WS_A_BYTES);
        kern__wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; k++)
            kern__wgmma_ss<N>(acc, da + 2 * k, db + 2 * k);
        kern__wgmma_commit();
        kern__wgmma_wait<1>();
        if (kb > 0)
            kern__mbar_arrive(&empty[(kb - 1) % WS_STAGES]);
    }
    kern__wgmma_wait<0>();
    const int rb = blockIdx.x * (WS_BM / 16) + 4 * wg + warp;
    ws_epilogue<STAGE, N / 8>(o, acc, rb, lane, start, cnt, meta);
}

/*
 * Shared-expert / dense tiles (FP8) in blockIdx.y < sh_tiles, routed tiles (NVFP4) after;
 * ta / tsh: the tensor maps of a.in / sh.in (ws_map). The consumers' code is the same for both
 * kinds of tile (ws_out carries the difference).
 */
template <int STAGE>
__global__ void __launch_bounds__(WS_THREADS, 1)
    moe_gemm_ws(const gemm_args a, const gemm_args sh, int sh_tiles,
                const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tsh)
{
    extern __shared__ char smem_raw[];
    char *smem = (char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    kern__pdl_wait();
    kern__pdl_launch();
    const bool routed = (int)blockIdx.y >= sh_tiles;
    int e = 0, start, cnt;
    if (routed) {
        const int tile = blockIdx.y - sh_tiles;
        if (tile >= *a.ntiles)
            return;
        const int4 tl = a.tiles[tile];
        e = tl.x;
        start = tl.y;
        cnt = tl.z;
    } else {
        start = blockIdx.y * WS_BT;
        if (start >= sh.T)
            return;
        cnt = min(WS_BT, sh.T - start);
    }
    uint64_t *full = (uint64_t *)(smem + WS_STAGES * WS_STAGE_BYTES), *empty = full + WS_STAGES;
    int2 *meta = (int2 *)(empty + WS_STAGES); /* [WS_BT]: see ws_epilogue */
    if (threadIdx.x == 0) {
        for (int s = 0; s < WS_STAGES; s++) {
            kern__mbar_init(&full[s], WS_NPROD + 1); /* + the arrival with B's byte count */
            kern__mbar_init(&empty[s], 256);
        }
        /* the copy engine completes transactions on these barriers */
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if (threadIdx.x < WS_NPROD) { /* (ws_produce meets the consumers at ws_sync_all) */
        if (routed)
            ws_produce<STAGE, WF_NVFP4>(a, &ta, e, start, cnt, smem, full, empty);
        else
            ws_produce<STAGE, WF_FP8>(group_args(sh, blockIdx.z), &tsh, 0, start, cnt, smem, full,
                                      empty);
        return;
    }
    /* the consumers stage the tile's rows for the epilogue while the producer's first weight
     * loads are in flight */
    for (int j = threadIdx.x - WS_NPROD; j < cnt; j += WS_THREADS - WS_NPROD) {
        int slot = routed ? a.sorted[start + j] : start + j;
        float w = routed && STAGE == STAGE_GATEUP ? a.route_w[slot] : 1.0f;
        meta[j] = make_int2(slot, __float_as_int(w));
    }
    ws_sync_all();
    ws_out o;
    o.a0 = routed ? a.alpha[STAGE == STAGE_GATEUP ? 2 * e : e] : sh.alpha_c0;
    o.a1 = routed ? (STAGE == STAGE_GATEUP ? a.alpha[2 * e + 1] : 0.0f) : sh.alpha_c1;
    o.limit = a.limit;
    o.I = a.N / 2;
    o.hout = routed ? a.hout : sh.hout;
    o.yout = routed ? a.yout : sh.yout + (size_t)blockIdx.z * sh.out_goff;
    o.ldout = routed ? a.ldout : sh.ldout;
    const int nkb = a.Kd / 64;
    switch ((cnt + 31) >> 5) {
#define WS_CASE(n)                                                                                 \
    case n:                                                                                        \
        ws_consume<STAGE, 32 * n>(o, nkb, start, cnt, smem, full, empty, meta);                    \
        break
        WS_CASE(1);
        WS_CASE(2);
        WS_CASE(3);
        WS_CASE(4);
        WS_CASE(5);
        WS_CASE(6);
        WS_CASE(7);
        WS_CASE(8);
#undef WS_CASE
    }
}

static const size_t ws_smem =
    (size_t)WS_STAGES * WS_STAGE_BYTES + 2 * WS_STAGES * 8 + WS_BT * 8 + 1024;

static PFN_cuTensorMapEncodeTiled_v12000 ws_encode; /* the driver's, from moe__ws_prepare */

int moe__ws_prepare(void)
{
    static int done; /* benign race: idempotent */
    if (done)
        return 0;
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_ws<STAGE_GATEUP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ws_smem));
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_ws<STAGE_DOWN>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ws_smem));
    void *fn = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || !fn)
        return ERR_CUDA;
    ws_encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    done = 1;
    return 0;
}

/*
 * Tensor map of the activations `in` (BF16) of a launch: columns (Kd, contiguous) x rows x
 * groups (dense launches: group z starts in_goff elements further), rows ldin elements apart,
 * box 64 columns x WS_BOX rows x 1 group, 128-byte swizzle (kern__desc_sw128's layout), zeros
 * past the ends. 0 or ERR_UNSUPPORTED (alignment) / ERR_CUDA.
 */
static int ws_map(CUtensorMap *m, const gemm_args &g, long rows, int groups)
{
    const size_t row_b = (size_t)g.ldin * 2, grp_b = groups > 1 ? g.in_goff * 2 : rows * row_b;
    if ((uintptr_t)g.in % 16 || row_b % 16 || grp_b % 16 || rows < 1)
        return ERR_UNSUPPORTED;
    const cuuint64_t dim[3] = {(cuuint64_t)g.Kd, (cuuint64_t)rows, (cuuint64_t)groups};
    const cuuint64_t stride[2] = {row_b, grp_b};
    const cuuint32_t box[3] = {64, WS_BOX, 1}, estride[3] = {1, 1, 1};
    return ws_encode(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void *)g.in, dim, stride, box,
                     estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                     CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS
               ? 0
               : ERR_CUDA;
}

int moe__launch_ws(int stage, const gemm_args &a, const gemm_args &sh, int rt_tiles, int sh_tiles,
                   cudaStream_t st, int groups)
{
    int rc;
    if (a.N % WS_BM || a.Kd % 256)
        return ERR_UNSUPPORTED;
    if ((rc = moe__ws_prepare()))
        return rc;
    /* routed: x (GEMM1, gathered) or h (GEMM2) by grouped position, T K rows; shared / dense:
     * T rows */
    CUtensorMap ta, tsh;
    memset(&ta, 0, sizeof ta);
    memset(&tsh, 0, sizeof tsh);
    if (rt_tiles && (rc = ws_map(&ta, a, (long)a.T * a.topk, 1)))
        return rc;
    if (sh_tiles && (rc = ws_map(&tsh, sh, sh.T, groups)))
        return rc;
    dim3 grid(a.N / WS_BM, rt_tiles + sh_tiles, groups);
    return stage == STAGE_GATEUP ? kern__launch(moe_gemm_ws<STAGE_GATEUP>, grid, dim3(WS_THREADS),
                                                ws_smem, st, 1, a, sh, sh_tiles, ta, tsh)
                                 : kern__launch(moe_gemm_ws<STAGE_DOWN>, grid, dim3(WS_THREADS),
                                                ws_smem, st, 1, a, sh, sh_tiles, ta, tsh);
}
