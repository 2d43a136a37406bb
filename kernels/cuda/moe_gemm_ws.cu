/*
 * moe_gemm_ws.cu - the MoE GEMMs (and the dense FP8 linears) with many tokens per weight
 * matrix: warp-specialised wgmma, both operands in shared memory (sm_90a).
 *
 * Block = 3 warpgroups over WS_BM = 128 weight rows x one tile of <= 256 tokens:
 *   warpgroup 0, the producer: streams each 64-column k-block of its 128 rows from global
 *     memory into registers (WS_AHEAD k-blocks ahead), decodes it (NVFP4 or FP8 -> BF16: the
 *     decoders of the mma.sync path, exact) and stores it as the A tile (K-major, 128-byte
 *     swizzle); stages the tile's activation rows (gathered by token for GEMM1, in the perm64
 *     order of the wgmma paths) with cp.async as the B tile.
 *   warpgroups 1 and 2, the consumers: only wgmma, 64 weight rows each x N tokens (N = the
 *     tile's token count rounded up to 32, one instantiation per N), then ws_epilogue (the
 *     other paths' arithmetic: SwiGLU and routing weight -> h, or y).
 * Stages: a ring of WS_STAGES (A 16 KB, B 32 KB) with two mbarriers each: `full` (the 128
 * producer threads arrive once their part of the stage is written and fenced for the async
 * proxy) and `empty` (the 256 consumer threads arrive once the wgmmas that read it are done).
 * Producer iteration kb: decode A(kb) -> wait for its own B(kb) copies -> fence, arrive full;
 * then wait empty(kb + WS_BLEAD - WS_STAGES) and issue the copies of B(kb + WS_BLEAD), so the
 * decode of kb + 1 overlaps the MMAs of kb and the producer never waits on the MMA just issued.
 * The tile's output rows and routing weights are staged in shared memory for the epilogue.
 *
 * Why: the register-A kernel (moe_nvfp4.cu, moe_gemm_wg) decodes in the warps that issue the
 * wgmmas and so serialises decode, barrier and MMA per warp (kernels/cuda/RESULTS.md, fifth
 * session: 37 % of issue slots busy, tensor pipe half idle at T = 8192). Where this one
 * stands and what limits it: RESULTS.md, eighth session (the producer's ~400 instructions per
 * k-block at ~0.2 per cycle, one warp per scheduler, set the pace).
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/cuda/moe_gemm.cuh"
#include "kernels/cuda/wgmma_ss.cuh"

#define WS_BM          128 /* weight rows per block */
#define WS_BT          256 /* tokens per tile, at most */
#define WS_STAGES      4
#define WS_AHEAD       3 /* k-blocks of weights in flight in registers ahead of the decoded one */
#define WS_BLEAD       2 /* k-blocks of activations in flight ahead of the decoded one (3: no change) */
#define WS_THREADS     384
#define WS_A_BYTES     (WS_BM * 128)
#define WS_STAGE_BYTES (WS_A_BYTES + WS_BT * 128)

/* One k-block of the raw weights of a producer thread's two 16-row blocks. */
template <int WF> struct ws_raw;
template <> struct ws_raw<WF_NVFP4> {
    uint4 d[2];
    uint2 s[2]; /* the 256-column scale group that holds the k-block */
};
template <> struct ws_raw<WF_FP8> {
    uint4 d[2][2];
    uint32_t f[2];
};

/* The producer's view of its weights: 16-row blocks rb0 and rb0 + 1, its lane. */
template <int WF> struct ws_weights {
    const uint4 *wd[2];
    const uint2 *wsc[2];    /* NVFP4 */
    const uint32_t *fac[2]; /* FP8 */

    __device__ __forceinline__ void init(const gemm_args &a, int e, int rb0, int lane)
    {
        const int K = a.Kd, nkb = K / 64;
#pragma unroll
        for (int it = 0; it < 2; it++) {
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
        for (int it = 0; it < 2; it++) {
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

/* Decode k-block kb of both row blocks into the A tile: fragment register i of mma k-step s
 * (row g + 8 (i & 1), k 16 s + 2 c + 8 (i >> 1) of the block) -> its swizzled place, at
 * base + off[2 s + (i >> 1)] + 1024 (i & 1) + 2048 it (off: ws_offsets). */
template <int WF>
__device__ __forceinline__ void ws_decode(const ws_raw<WF> &r, int kb, uint32_t base,
                                          const uint32_t (&off)[8])
{
    uint32_t af[2][4][4];
#pragma unroll
    for (int it = 0; it < 2; it++) {
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
    for (int u = 0; u < 8; u++) {
        const uint32_t at = base + off[u];
#pragma unroll
        for (int it = 0; it < 2; it++)
#pragma unroll
            for (int rr = 0; rr < 2; rr++)
                asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(at + 1024 * rr + 2048 * it),
                             "r"(af[it][u >> 1][(u & 1) * 2 + rr])
                             : "memory");
    }
}

template <int STAGE, int WF>
__device__ __forceinline__ void ws_produce(const gemm_args &a, int e, int start, int cnt, int npad,
                                           char *smem, uint64_t *full, uint64_t *empty)
{
    constexpr bool gather = STAGE == STAGE_GATEUP && WF == WF_NVFP4;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int nkb = a.Kd / 64, nch = npad / 16; /* 16-byte B chunks per thread per k-block */

    ws_weights<WF> W;
    W.init(a, e, blockIdx.x * (WS_BM / 16) + 2 * warp, lane);
    ws_raw<WF> rw[WS_AHEAD + 1];
#pragma unroll
    for (int i = 0; i < WS_AHEAD; i++)
        if (i < nkb)
            W.load(i, rw[i]);

    /* B: thread t copies 16-byte column t & 7 of rows t / 8 + 16 i (i < npad / 16), so its
     * destinations differ by constants; sources are 32-bit byte offsets from one base (the
     * host keeps the activations under 4 GB); rows past cnt repeat row cnt - 1 (their columns
     * are discarded) */
    const char *bsrc = (const char *)a.in;
    uint32_t boff[WS_BT / 16];
    const int bj = tid & 7, br0 = tid >> 3;
#pragma unroll
    for (int i = 0; i < WS_BT / 16; i++) {
        int pos = start + min(br0 + 16 * i, cnt - 1);
        int row = gather ? a.sorted[pos] / a.topk : pos;
        boff[i] = (uint32_t)row * (uint32_t)a.ldin * 2u + bj * 16u;
    }
    const uint32_t bdst =
        (uint32_t)__cvta_generic_to_shared(smem + WS_A_BYTES) + br0 * 128 + ((bj ^ (br0 & 7)) << 4);
#define WS_ISSUE_B(KB)                                                                             \
    do {                                                                                           \
        const uint32_t d_ = bdst + ((KB) % WS_STAGES) * WS_STAGE_BYTES;                            \
        const char *s_ = bsrc + (size_t)(KB)*128;                                                  \
        _Pragma("unroll") for (int i = 0; i < WS_BT / 16; i++) if (i < nch) asm volatile(          \
            "cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d_ + i * 2048),                    \
            "l"(s_ + boff[i]) : "memory");                                                         \
        asm volatile("cp.async.commit_group;\n" ::: "memory");                                     \
    } while (0)

#pragma unroll
    for (int kb = 0; kb < WS_BLEAD; kb++) {
        if (kb < nkb)
            WS_ISSUE_B(kb);
        else
            asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    const uint32_t a0 = (uint32_t)__cvta_generic_to_shared(smem) + 2 * warp * 16 * 128;
    uint32_t off[8]; /* (s, i >> 1) -> row g, 16-byte unit (2 s + (i >> 1)) ^ g, byte 4 c */
#pragma unroll
    for (int u = 0; u < 8; u++)
        off[u] = (lane >> 2) * 128 + ((u ^ (lane >> 2)) << 4) + 4 * (lane & 3);
    /* the register ring is indexed statically (unrolled by its length; nkb % 4 == 0): a ring
     * rotated by moves would wait for each new load at the move */
    static_assert(WS_AHEAD + 1 == 4, "nkb is a multiple of 4, not of the ring length");
    for (int kb0 = 0; kb0 < nkb; kb0 += WS_AHEAD + 1) {
#pragma unroll
        for (int j = 0; j <= WS_AHEAD; j++) {
            const int kb = kb0 + j, s = kb % WS_STAGES;
            if (kb + WS_AHEAD < nkb)
                W.load(kb + WS_AHEAD, rw[(j + WS_AHEAD) % (WS_AHEAD + 1)]);
            /* A(kb): its stage was released before B(kb) was issued */
            ws_decode<WF>(rw[j], kb, a0 + s * WS_STAGE_BYTES, off);
            asm volatile("cp.async.wait_group %0;\n" ::"n"(WS_BLEAD - 1) : "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            kern__mbar_arrive(&full[s]);
            /* B(kb + BLEAD) into the stage of kb + BLEAD - STAGES, once the consumers are done
             * with it */
            const int nk = kb + WS_BLEAD, ok = nk - WS_STAGES;
            if (nk < nkb) {
                if (ok >= 0)
                    kern__mbar_wait(&empty[ok % WS_STAGES], (ok / WS_STAGES) & 1);
                WS_ISSUE_B(nk);
            } else {
                asm volatile("cp.async.commit_group;\n" ::: "memory");
            }
        }
    }
#undef WS_ISSUE_B
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

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
__device__ __forceinline__ void ws_epilogue(const gemm_args &a, const float *acc, bool routed,
                                            int e, int rb, int lane, int start, int cnt,
                                            const int2 *meta)
{
    const int g = lane >> 2, c = lane & 3;
    if (STAGE == STAGE_GATEUP) {
        const int I = a.N / 2, ch = perm64(rb * 8 + g);
        const float ag = routed ? a.alpha[2 * e] : a.alpha_c0;
        const float au = routed ? a.alpha[2 * e + 1] : a.alpha_c1;
        const float L = a.limit;
#pragma unroll
        for (int n = 0; n < NG; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                float wr = __int_as_float(meta[j].y);
                float gv = fminf(acc[4 * n + h] * ag, L);
                float uv = fminf(fmaxf(acc[4 * n + 2 + h] * au, -L), L);
                float hv = wr * (gv / (1.0f + expf(-gv))) * uv;
                a.hout[(size_t)(start + j) * I + ch] = __float2bfloat16_rn(hv);
            }
    } else {
        const int o0 = rb * 16 + g;
        const float al = routed ? a.alpha[e] : a.alpha_c0;
#pragma unroll
        for (int n = 0; n < NG; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int dst = meta[j].x;
                a.yout[(size_t)dst * a.ldout + o0] = acc[4 * n + h] * al;
                a.yout[(size_t)dst * a.ldout + o0 + 8] = acc[4 * n + 2 + h] * al;
            }
    }
}

template <int STAGE, int N>
__device__ __forceinline__ void ws_consume(const gemm_args &a, bool routed, int e, int start,
                                           int cnt, char *smem, uint64_t *full, uint64_t *empty,
                                           const int2 *meta)
{
    const int wg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int nkb = a.Kd / 64;
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
    ws_epilogue<STAGE, N / 8>(a, acc, routed, e, rb, lane, start, cnt, meta);
}

template <int STAGE, int WF>
__device__ __forceinline__ void ws_body(const gemm_args &a, int tile, char *smem)
{
    constexpr bool routed = WF == WF_NVFP4;
    int e = 0, start, cnt;
    if (routed) {
        if (tile >= *a.ntiles)
            return;
        int4 tl = a.tiles[tile];
        e = tl.x;
        start = tl.y;
        cnt = tl.z;
    } else {
        start = tile * WS_BT;
        if (start >= a.T)
            return;
        cnt = min(WS_BT, a.T - start);
    }
    uint64_t *full = (uint64_t *)(smem + WS_STAGES * WS_STAGE_BYTES), *empty = full + WS_STAGES;
    int2 *meta = (int2 *)(empty + WS_STAGES); /* [WS_BT]: see ws_epilogue */
    if (threadIdx.x == 0)
        for (int s = 0; s < WS_STAGES; s++) {
            kern__mbar_init(&full[s], 128);
            kern__mbar_init(&empty[s], 256);
        }
    for (int j = threadIdx.x; j < cnt; j += WS_THREADS) {
        int slot = routed ? a.sorted[start + j] : start + j;
        float w = routed && STAGE == STAGE_GATEUP ? a.route_w[slot] : 1.0f;
        meta[j] = make_int2(slot, __float_as_int(w));
    }
    __syncthreads();
    const int npad = (cnt + 31) & ~31;
    if (threadIdx.x < 128) {
        ws_produce<STAGE, WF>(a, e, start, cnt, npad, smem, full, empty);
        return;
    }
    switch (npad >> 5) {
#define WS_CASE(n)                                                                                 \
    case n:                                                                                        \
        ws_consume<STAGE, 32 * n>(a, routed, e, start, cnt, smem, full, empty, meta);              \
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

/* Shared-expert / dense tiles (FP8) in blockIdx.y < sh_tiles, routed tiles (NVFP4) after. */
template <int STAGE>
__global__ void __launch_bounds__(WS_THREADS, 1)
    moe_gemm_ws(const gemm_args a, const gemm_args sh, int sh_tiles)
{
    extern __shared__ char smem_raw[];
    char *smem = (char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    kern__pdl_wait();
    kern__pdl_launch();
    if ((int)blockIdx.y < sh_tiles)
        ws_body<STAGE, WF_FP8>(group_args(sh, blockIdx.z), blockIdx.y, smem);
    else
        ws_body<STAGE, WF_NVFP4>(a, blockIdx.y - sh_tiles, smem);
}

static const size_t ws_smem =
    (size_t)WS_STAGES * WS_STAGE_BYTES + 2 * WS_STAGES * 8 + WS_BT * 8 + 1024;

int moe__ws_prepare(void)
{
    static int done; /* benign race: idempotent */
    if (done)
        return 0;
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_ws<STAGE_GATEUP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ws_smem));
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_ws<STAGE_DOWN>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ws_smem));
    done = 1;
    return 0;
}

int moe__launch_ws(int stage, const gemm_args &a, const gemm_args &sh, int rt_tiles, int sh_tiles,
                   cudaStream_t st, int groups)
{
    int rc;
    if (a.N % WS_BM || a.Kd % 256)
        return ERR_UNSUPPORTED;
    if ((rc = moe__ws_prepare()))
        return rc;
    dim3 grid(a.N / WS_BM, rt_tiles + sh_tiles, groups);
    return stage == STAGE_GATEUP ? kern__launch(moe_gemm_ws<STAGE_GATEUP>, grid, dim3(WS_THREADS),
                                                ws_smem, st, 1, a, sh, sh_tiles)
                                 : kern__launch(moe_gemm_ws<STAGE_DOWN>, grid, dim3(WS_THREADS),
                                                ws_smem, st, 1, a, sh, sh_tiles);
}
