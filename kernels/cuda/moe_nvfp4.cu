/*
 * moe_nvfp4.cu - the routed experts (NVFP4 weights) and the shared expert (FP8 weights) of one
 * DSV4 MoE layer, for T tokens with K experts each.
 *
 * Pipeline (one stream, no host sync, no allocation, no atomics on outputs):
 *   1. x -> BF16 (in the grouping kernel's other blocks, or by the router's logits kernel in
 *      kern_moe_forward at small T and at long T).
 *   2. Grouping (one block): count the (token, slot) pairs per expert, scan, emit a tile list
 *      (expert, first grouped position, count <= BT), the grouped slot order and each slot's
 *      grouped position (the long-step kernel's gather: moe_gather). Slots with an
 *      id outside [0, E) (padding rows) are dropped; duplicate ids in a row are two slots.
 *   3. GEMM1 per (tile, 16-row block of w13): gate and up rows of the same 8 channels in one
 *      mma.sync m16n8k16 tile (weights = A from registers, tokens = N), NVFP4 codes turned
 *      into BF16 with one to three integer operations per pair (moe_gemm.cuh dequant_nvfp4)
 *      and scaled pre-MMA by the block scale (exact); FP32
 *      sums times the per-matrix alpha, clamped SwiGLU, routing weight, BF16 -> h.
 *      The shared expert runs the same kernel with the FP8 decoder over all T tokens.
 *   4. GEMM2 (down) likewise, h -> y per slot (FP32).
 *   5. Combine: out[t] = sum_j y[t*K+j] in slot order + shared[t] (deterministic).
 * The tile grid is sized on the host from an upper bound of the tile count; blocks past the
 * device-side count exit at once.
 *
 * Work split inside a GEMM block: RB warps own 16-row blocks, KS warps split K; the KS partial
 * sums are added in a fixed order through shared memory.
 *
 * THREAD SAFETY: launches only; reentrant.
 */
#include "kernels/cuda/moe_internal.cuh"

#include "kernels/cuda/moe_gemm.cuh"
#include "kernels/cuda/moe_sum.cuh"

/*
 * One GEMM tile. Programmatic dependent launch: a kernel waits (griddepcontrol.wait) for its
 * predecessor before reading what that one wrote, and lets its successor launch only after
 * that wait, so a successor may read, before its own wait, anything written two kernels back:
 * GEMM2 reads the tile list (from the grouping kernel) and starts streaming its first weights
 * while GEMM1 drains; the shared expert (static weights) prefetches before waiting too.
 */
template <int STAGE, int WF, int NT, int RB, int KS>
__device__ __forceinline__ void gemm_body(const gemm_args &a, int tile, float *red)
{
    constexpr bool routed = WF == WF_NVFP4;
    constexpr bool early_wait =
        routed && STAGE == STAGE_GATEUP; /* tiles come from the predecessor */
    if (early_wait) {
        kern__pdl_wait();
        kern__pdl_launch();
    }
    int e = 0, start, cnt;
    if (routed) {
        /* both loads in flight together: the tile bound of the grid is the list's length */
        const int4 tl = a.tiles[tile];
        if ((tile >= *a.ntiles) | (tl.z <= 0)) /* (a listed tile has cnt >= 1) */
            return;
        e = tl.x;
        start = tl.y;
        cnt = tl.z;
    } else {
        start = tile * NT * 8;
        if (start >= a.T)
            return;
        cnt = min(NT * 8, a.T - start);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int rbw = warp % RB, ks = warp / RB;
    const int rb = blockIdx.x * RB + rbw;
    const int K = a.Kd, nkb = K / 64, nkq = K / 256;
    const int kq0 = ks * (nkq / KS), kq1 = kq0 + nkq / KS;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
        acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const uint4 *brow[NT];
    if (WF == WF_NVFP4) {
        const uint4 *wd =
            (const uint4 *)(a.w + (size_t)e * a.w_estride) + (size_t)rb * nkb * 32 + lane;
        const uint2 *wsc =
            (const uint2 *)(a.ws + (size_t)e * a.ws_estride) + (size_t)rb * nkq * 32 + lane;
        /* two 256-column groups in flight ahead of the one being multiplied */
        uint4 cur[4], n1[4];
        uint2 csc = kern__ld_stream2(wsc + (size_t)kq0 * 32), nsc1 = csc;
#pragma unroll
        for (int b = 0; b < 4; b++)
            cur[b] = kern__ld_stream(wd + ((size_t)kq0 * 4 + b) * 32);
        if (kq0 + 1 < kq1) {
            nsc1 = kern__ld_stream2(wsc + (size_t)(kq0 + 1) * 32);
#pragma unroll
            for (int b = 0; b < 4; b++)
                n1[b] = kern__ld_stream(wd + ((size_t)(kq0 + 1) * 4 + b) * 32);
        }
        if (!early_wait) {
            kern__pdl_wait();
            kern__pdl_launch();
        }
        /* B rows: token g of each 8-token group; rows past cnt repeat a valid row (discarded) */
#pragma unroll
        for (int n = 0; n < NT; n++) {
            int j = min(n * 8 + g, cnt - 1), pos = start + j;
            int row = (STAGE == STAGE_GATEUP && routed) ? a.sorted[pos] / a.topk : pos;
            brow[n] = (const uint4 *)(a.in + (size_t)row * a.ldin) + 2 * c;
        }
        for (int kq = kq0; kq < kq1; kq++) {
            uint4 n2[4];
            uint2 nsc2 = nsc1;
            if (kq + 2 < kq1) {
                nsc2 = kern__ld_stream2(wsc + (size_t)(kq + 2) * 32);
#pragma unroll
                for (int b = 0; b < 4; b++)
                    n2[b] = kern__ld_stream(wd + ((size_t)(kq + 2) * 4 + b) * 32);
            }
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const int kb = kq * 4 + b;
                uint4 bx[NT][2];
#pragma unroll
                for (int n = 0; n < NT; n++) {
                    bx[n][0] = __ldg(brow[n] + (size_t)kb * 8);
                    bx[n][1] = __ldg(brow[n] + (size_t)kb * 8 + 1);
                }
                uint32_t sw = b < 2 ? csc.x : csc.y;
                uint32_t sh = (b & 1) ? sw >> 16 : sw;
                uint32_t sg = nvfp4_scale_bf16x2(sh & 0xffu),
                         sg8 = nvfp4_scale_bf16x2((sh >> 8) & 0xffu);
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    uint32_t af[4];
                    dequant_nvfp4(word_of(cur[b], s), sg, sg8, af);
#pragma unroll
                    for (int n = 0; n < NT; n++)
                        kern__mma_bf16(acc[n], af[0], af[1], af[2], af[3],
                                       word_of(bx[n][s >> 1], (s & 1) * 2),
                                       word_of(bx[n][s >> 1], (s & 1) * 2 + 1));
                }
            }
#pragma unroll
            for (int b = 0; b < 4; b++) {
                cur[b] = n1[b];
                n1[b] = n2[b];
            }
            csc = nsc1;
            nsc1 = nsc2;
        }
    } else {
        const uint4 *wd = (const uint4 *)a.w + (size_t)rb * nkb * 64 + lane;
        const uint32_t *fac = (const uint32_t *)(a.fac + (size_t)rb * (K / 128) * 2);
        uint4 nx[4][2];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            nx[b][0] = kern__ld_stream(wd + ((size_t)(kq0 * 4 + b) * 2) * 32);
            nx[b][1] = kern__ld_stream(wd + ((size_t)(kq0 * 4 + b) * 2 + 1) * 32);
        }
        if (!a.late_wait) {
            kern__pdl_wait();
            kern__pdl_launch();
        }
        /* B rows: token g of each 8-token group; rows past cnt repeat a valid row (discarded) */
#pragma unroll
        for (int n = 0; n < NT; n++) {
            int j = min(n * 8 + g, cnt - 1), pos = start + j;
            int row = (STAGE == STAGE_GATEUP && routed) ? a.sorted[pos] / a.topk : pos;
            brow[n] = (const uint4 *)(a.in + (size_t)row * a.ldin) + 2 * c;
        }
        for (int kq = kq0; kq < kq1; kq++) {
            uint4 cur[4][2];
#pragma unroll
            for (int b = 0; b < 4; b++) {
                cur[b][0] = nx[b][0];
                cur[b][1] = nx[b][1];
            }
            if (kq + 1 < kq1) {
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    nx[b][0] = kern__ld_stream(wd + ((size_t)((kq + 1) * 4 + b) * 2) * 32);
                    nx[b][1] = kern__ld_stream(wd + ((size_t)((kq + 1) * 4 + b) * 2 + 1) * 32);
                }
            }
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const int kb = kq * 4 + b;
                uint4 bx[NT][2];
#pragma unroll
                for (int n = 0; n < NT; n++) {
                    bx[n][0] = __ldg(brow[n] + (size_t)kb * 8);
                    bx[n][1] = __ldg(brow[n] + (size_t)kb * 8 + 1);
                }
                uint32_t f = __ldg(fac + kb / 2);
                uint32_t fg = (f & 0xffffu) * 0x10001u, fg8 = (f >> 16) * 0x10001u;
#pragma unroll
                for (int s = 0; s < 4; s++) {
                    uint32_t af[4];
                    const uint4 &v = cur[b][s >> 1];
                    dequant_fp8(word_of(v, (s & 1) * 2), word_of(v, (s & 1) * 2 + 1), fg, fg8, af);
#pragma unroll
                    for (int n = 0; n < NT; n++)
                        kern__mma_bf16(acc[n], af[0], af[1], af[2], af[3],
                                       word_of(bx[n][s >> 1], (s & 1) * 2),
                                       word_of(bx[n][s >> 1], (s & 1) * 2 + 1));
                }
            }
        }
    }

    if (!routed && a.late_wait) { /* every warp of the block, before any exits */
        kern__pdl_wait();
        kern__pdl_launch();
    }
    /* split-K partial sums, added in ks order */
    if (KS > 1) {
        if (ks > 0) {
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    red[((((ks - 1) * RB + rbw) * NT + n) * 4 + i) * 32 + lane] = acc[n][i];
        }
        __syncthreads();
        if (ks > 0)
            return;
        for (int k2 = 1; k2 < KS; k2++)
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    acc[n][i] += red[((((k2 - 1) * RB + rbw) * NT + n) * 4 + i) * 32 + lane];
    }

    if (STAGE == STAGE_GATEUP) {
        const int I = a.N / 2, ch = rb * 8 + g;
        const float ag = routed ? a.alpha[2 * e] : a.alpha_c0;
        const float au = routed ? a.alpha[2 * e + 1] : a.alpha_c1;
        const float L = a.limit;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int pos = start + j;
                float wr = routed ? a.route_w[a.sorted[pos]] : 1.0f;
                float gv = fminf(acc[n][h] * ag, L);
                float uv = fminf(fmaxf(acc[n][2 + h] * au, -L), L);
                float hv = wr * (gv / (1.0f + expf(-gv))) * uv;
                a.hout[(size_t)pos * I + ch] = __float2bfloat16_rn(hv);
            }
    } else {
        const int o0 = rb * 16 + g;
        const float al = routed ? a.alpha[e] : a.alpha_c0;
#pragma unroll
        for (int n = 0; n < NT; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int pos = start + j;
                int dst = routed ? a.sorted[pos] : pos;
                a.yout[(size_t)dst * a.ldout + o0] = acc[n][h] * al;
                a.yout[(size_t)dst * a.ldout + o0 + 8] = acc[n][2 + h] * al;
            }
    }
}

/* Shared-expert tiles (FP8) in blockIdx.y < sh_tiles (scheduled first: they need no routing),
 * routed tiles (NVFP4) after them. */
/* 8-token tiles in 4-warp blocks: five blocks (20 warps) per SM, i.e. at most 96 registers (the
 * one-warp-per-row-block split took 98 and so fit only 16 warps: 96 made the Flash MoE layer at
 * T = 64 902 instead of 988 us on an H200, no spills). Other shapes: ptxas's own choice (an
 * explicit minimum of 1 makes it take up to 128 registers). */
template <int STAGE, int NT, int RB, int KS>
__global__ void __launch_bounds__(RB *KS * 32, NT == 1 && RB * KS == 4 ? 5 : 0)
    moe_gemm(const gemm_args a, const gemm_args sh, int sh_tiles)
{
    __shared__ float red[(KS > 1 ? KS - 1 : 1) * RB * NT * 4 * 32];
    if ((int)blockIdx.y < sh_tiles) {
        /* a pair (sh.pair): group 1 is `a`; a group's blocks past its rows exit (whole blocks:
         * their warps share the row block). Each call takes a kernel parameter (or
         * group_args' copy) directly: selecting the operands into one local copy first
         * (`g = pair && z ? a : group_args(sh, z)`) computed group 0 wrongly with nvcc 13.0,
         * the MoE's shared expert included (test_moe_gpu --small, test_linear_gpu pair). */
        if (sh.pair && blockIdx.z) {
            if ((int)blockIdx.x * RB * 16 < a.N)
                gemm_body<STAGE, WF_FP8, NT, RB, KS>(a, blockIdx.y, red);
        } else if ((int)blockIdx.x * RB * 16 < sh.N) {
            gemm_body<STAGE, WF_FP8, NT, RB, KS>(group_args(sh, blockIdx.z), blockIdx.y, red);
        }
    } else
        gemm_body<STAGE, WF_NVFP4, NT, RB, KS>(a, blockIdx.y - sh_tiles, red);
}

/* ---- large T: wgmma (sm_90a) ----
 *
 * Block = MOE_WGS warpgroups = 64*MOE_WGS weight rows (warp w owns 16-row block w of them) x BN
 * tokens. Weights stream global -> registers (one chunk ahead), are dequantised into the
 * warp's wgmma A fragment (the mma.m16n8k16 A layout, so the NVFP4/FP8 decoders are shared
 * with the small-T kernel) and multiplied with activation tiles that cp.async stages through
 * a 4-deep ring of 128-byte-swizzled K-major shared-memory tiles (64 BF16 of K per row).
 * The A fragment's k order inside each 64-column chunk is the packing's, not the natural one,
 * so this path keeps its activations (x in BF16 and h) in the permuted order perm64() of
 * each 64-element chunk, written that way by moe_prep and the GEMM1 epilogue.
 */
#define WG_STAGES   4 /* activation ring depth */
#define WG_PREFETCH 2 /* chunks in flight ahead: WG_STAGES - 2, see WG_CHUNK */
/* wgmma groups left in flight at the end of a chunk: 1 overlaps the next chunk's dequant with
 * this chunk's MMAs but makes ptxas serialise the wgmmas (C7513: registers of the other A
 * buffer are written inside the pipeline stage); 0 waits. */
#ifndef MOE_WG_INFLIGHT
#define MOE_WG_INFLIGHT 0
#endif
/* warpgroups per block (64 weight rows each): 4 = one 512-thread block per SM sharing each
 * activation tile over 256 rows; 2 = two independent 256-thread blocks per SM */
#ifndef MOE_WGS
#define MOE_WGS 4
#endif
#define WG_THREADS (MOE_WGS * 128)

template <int BN> struct wg_acc;
template <> struct wg_acc<64> {
    __device__ __forceinline__ static void mma(float (&d)[32], const uint32_t (&a)[4], uint64_t b)
    {
        kern__wgmma_m64n64k16_rs(d, a[0], a[1], a[2], a[3], b);
    }
};
template <> struct wg_acc<128> {
    __device__ __forceinline__ static void mma(float (&d)[64], const uint32_t (&a)[4], uint64_t b)
    {
        kern__wgmma_m64n128k16_rs(d, a[0], a[1], a[2], a[3], b);
    }
};

template <int STAGE, int WF, int BN>
__device__ __forceinline__ void wg_body(const gemm_args &a, int tile, char *smem)
{
    constexpr bool routed = WF == WF_NVFP4;
    constexpr bool early_wait = routed && STAGE == STAGE_GATEUP;
    constexpr int CH = BN * 8 / WG_THREADS; /* 16-byte chunks per thread per stage */
    if (early_wait) {
        kern__pdl_wait();
        kern__pdl_launch();
    }
    int e = 0, start, cnt;
    if (routed) {
        /* both loads in flight together: the tile bound of the grid is the list's length */
        const int4 tl = a.tiles[tile];
        if ((tile >= *a.ntiles) | (tl.z <= 0)) /* (a listed tile has cnt >= 1) */
            return;
        e = tl.x;
        start = tl.y;
        cnt = tl.z;
    } else {
        start = tile * BN;
        if (start >= a.T)
            return;
        cnt = min(BN, a.T - start);
    }
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int rb = blockIdx.x * (4 * MOE_WGS) + warp;
    const int K = a.Kd, nkb = K / 64;

    /* weights: this warp's 16 rows, one 64-column chunk ahead in registers */
    const uint4 *wd;
    const uint2 *wsc = NULL;
    const uint32_t *fac = NULL;
    uint4 nw0, nw1 = make_uint4(0, 0, 0, 0), nw2 = make_uint4(0, 0, 0, 0);
    uint2 nsc = make_uint2(0, 0), nsc2 = make_uint2(0, 0);
    uint32_t nf = 0;
    if (routed) { /* NVFP4: data two chunks ahead, scales one 256-column group ahead */
        wd = (const uint4 *)(a.w + (size_t)e * a.w_estride) + (size_t)rb * nkb * 32 + lane;
        wsc = (const uint2 *)(a.ws + (size_t)e * a.ws_estride) + (size_t)rb * (K / 256) * 32 + lane;
        nw0 = kern__ld_stream(wd);
        if (nkb > 1)
            nw2 = kern__ld_stream(wd + 32);
        nsc = kern__ld_stream2(wsc);
        if (nkb > 4)
            nsc2 = kern__ld_stream2(wsc + 32);
    } else {
        wd = (const uint4 *)a.w + (size_t)rb * nkb * 64 + lane;
        fac = (const uint32_t *)(a.fac + (size_t)rb * (K / 128) * 2);
        nw0 = kern__ld_stream(wd);
        nw1 = kern__ld_stream(wd + 32);
        nf = __ldg(fac);
    }
    if (!early_wait) {
        kern__pdl_wait();
        kern__pdl_launch();
    }
    /* activation rows of my cp.async chunks (rows past cnt are zero-filled) */
    const char *src[CH];
    uint32_t dst[CH];
    int sz[CH];
#pragma unroll
    for (int i = 0; i < CH; i++) {
        int q = tid + i * WG_THREADS, r = q >> 3, j = q & 7;
        int pos = start + min(r, cnt - 1);
        int row = (STAGE == STAGE_GATEUP && routed) ? a.sorted[pos] / a.topk : pos;
        src[i] = (const char *)(a.in + (size_t)row * a.ldin) + j * 16;
        dst[i] = r * 128 + ((j ^ (r & 7)) << 4);
        sz[i] = r < cnt ? 16 : 0;
    }
    const int stage_bytes = BN * 128;
#pragma unroll
    for (int st = 0; st < WG_PREFETCH; st++) {
        if (st < nkb)
#pragma unroll
            for (int i = 0; i < CH; i++)
                cp_async16(smem + st * stage_bytes + dst[i], src[i] + (size_t)st * 128, sz[i]);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++)
        acc[i] = 0.0f;

        /* One 64-column chunk: (1) its activations are in (cp.async group complete + barrier);
         * (2) refill the stage of chunk kb-2 (finished by every warpgroup: each waited for its
         * chunk kb-2 wgmmas before the barrier) with chunk kb+2; (3) dequantise into the A buffer
         * of chunk kb-2 (free for the same reason); (4) issue 4 wgmmas and keep one chunk in
         * flight while the next chunk is prepared. */
#define WG_CHUNK(KB, AF)                                                                           \
    do {                                                                                           \
        const int kb_ = (KB);                                                                      \
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_PREFETCH - 1) : "memory");               \
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");                             \
        __syncthreads();                                                                           \
        {                                                                                          \
            int nk = kb_ + WG_PREFETCH;                                                            \
            if (nk < nkb)                                                                          \
                _Pragma("unroll") for (int i = 0; i < CH; i++)                                     \
                    cp_async16(smem + (nk % WG_STAGES) * stage_bytes + dst[i],                     \
                               src[i] + (size_t)nk * 128, sz[i]);                                  \
            asm volatile("cp.async.commit_group;\n" ::: "memory");                                 \
        }                                                                                          \
        uint4 w0 = nw0, w1 = nw1;                                                                  \
        uint32_t f = nf;                                                                           \
        if (routed && kb_ > 0 && (kb_ & 3) == 0) {                                                 \
            nsc = nsc2;                                                                            \
            if (kb_ + 4 < nkb)                                                                     \
                nsc2 = kern__ld_stream2(wsc + (size_t)((kb_ >> 2) + 1) * 32);                      \
        }                                                                                          \
        uint2 sc = nsc;                                                                            \
        if (kb_ + 1 < nkb) {                                                                       \
            if (routed) {                                                                          \
                nw0 = nw2;                                                                         \
                if (kb_ + 2 < nkb)                                                                 \
                    nw2 = kern__ld_stream(wd + (size_t)(kb_ + 2) * 32);                            \
            } else {                                                                               \
                nw0 = kern__ld_stream(wd + (size_t)(kb_ + 1) * 64);                                \
                nw1 = kern__ld_stream(wd + (size_t)(kb_ + 1) * 64 + 32);                           \
                if (((kb_ + 1) & 1) == 0)                                                          \
                    nf = __ldg(fac + (kb_ + 1) / 2);                                               \
            }                                                                                      \
        }                                                                                          \
        if (routed) {                                                                              \
            int b_ = kb_ & 3;                                                                      \
            uint32_t sw = b_ < 2 ? sc.x : sc.y;                                                    \
            uint32_t sh_ = (b_ & 1) ? sw >> 16 : sw;                                               \
            uint32_t sg = nvfp4_scale_bf16x2(sh_ & 0xffu);                                         \
            uint32_t sg8 = nvfp4_scale_bf16x2((sh_ >> 8) & 0xffu);                                 \
            _Pragma("unroll") for (int s = 0; s < 4; s++)                                          \
                dequant_nvfp4(word_of(w0, s), sg, sg8, AF[s]);                                     \
        } else {                                                                                   \
            uint32_t fg = (f & 0xffffu) * 0x10001u, fg8 = (f >> 16) * 0x10001u;                    \
            _Pragma("unroll") for (int s = 0; s < 4; s++)                                          \
            {                                                                                      \
                const uint4 &v = (s >> 1) ? w1 : w0;                                               \
                dequant_fp8(word_of(v, (s & 1) * 2), word_of(v, (s & 1) * 2 + 1), fg, fg8, AF[s]); \
            }                                                                                      \
        }                                                                                          \
        const uint64_t d0 = kern__desc_sw128(smem + (kb_ % WG_STAGES) * stage_bytes);              \
        const uint64_t dsc[4] = {d0, d0 + 2, d0 + 4, d0 + 6};                                      \
        kern__wgmma_fence();                                                                       \
        _Pragma("unroll") for (int s = 0; s < 4; s++) wg_acc<BN>::mma(acc, AF[s], dsc[s]);         \
        kern__wgmma_commit();                                                                      \
        kern__wgmma_wait<MOE_WG_INFLIGHT>();                                                       \
    } while (0)

    uint32_t afa[4][4];
#if MOE_WG_INFLIGHT
    uint32_t afb[4][4];
#else
#define afb afa
#endif
    for (int kb = 0; kb < nkb; kb += 2) {
        WG_CHUNK(kb, afa);
        if (kb + 1 < nkb)
            WG_CHUNK(kb + 1, afb);
    }
#undef afb
#undef WG_CHUNK
    kern__wgmma_wait<0>();
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads(); /* the stage ring is reused by the GEMM1 epilogue */

    /* epilogue: acc[4n + i] is the mma.m16n8k16 C fragment of token group n */
    if (STAGE == STAGE_GATEUP) {
        const int I = a.N / 2, ch = perm64(rb * 8 + g);
        const float ag = routed ? a.alpha[2 * e] : a.alpha_c0;
        const float au = routed ? a.alpha[2 * e + 1] : a.alpha_c1;
        const float L = a.limit;
#pragma unroll
        for (int n = 0; n < BN / 8; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int pos = start + j;
                float wr = routed ? a.route_w[a.sorted[pos]] : 1.0f;
                float gv = fminf(acc[4 * n + h] * ag, L);
                float uv = fminf(fmaxf(acc[4 * n + 2 + h] * au, -L), L);
                float hv = wr * (gv / (1.0f + expf(-gv))) * uv;
                if (MOE_WGS == 2) /* staged: this block owns exactly one 64-channel chunk */
                    ((__nv_bfloat16 *)smem)[j * 64 + (ch & 63)] = __float2bfloat16_rn(hv);
                else
                    a.hout[(size_t)pos * I + ch] = __float2bfloat16_rn(hv);
            }
        if (MOE_WGS == 2) {
            __syncthreads();
            const int c0 = blockIdx.x * 64; /* = perm64 chunk base of this block's channels */
            for (int q = tid; q < cnt * 8; q += WG_THREADS) {
                int j = q >> 3, part = q & 7;
                *(uint4 *)(a.hout + (size_t)(start + j) * I + c0 + part * 8) =
                    *(const uint4 *)(smem + j * 128 + part * 16);
            }
        }
    } else {
        const int o0 = rb * 16 + g;
        const float al = routed ? a.alpha[e] : a.alpha_c0;
#pragma unroll
        for (int n = 0; n < BN / 8; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int j = n * 8 + 2 * c + h;
                if (j >= cnt)
                    continue;
                int pos = start + j;
                int dsti = routed ? a.sorted[pos] : pos;
                a.yout[(size_t)dsti * a.ldout + o0] = acc[4 * n + h] * al;
                a.yout[(size_t)dsti * a.ldout + o0 + 8] = acc[4 * n + 2 + h] * al;
            }
    }
}

template <int STAGE, int BN>
__global__ void __launch_bounds__(WG_THREADS, MOE_WGS == 2 ? 2 : 1)
    moe_gemm_wg(const gemm_args a, const gemm_args sh, int sh_tiles)
{
    extern __shared__ char smem_raw[];
    char *smem = (char *)(((uintptr_t)smem_raw + 1023) & ~(uintptr_t)1023);
    if ((int)blockIdx.y < sh_tiles)
        wg_body<STAGE, WF_FP8, BN>(group_args(sh, blockIdx.z), blockIdx.y, smem);
    else
        wg_body<STAGE, WF_NVFP4, BN>(a, blockIdx.y - sh_tiles, smem);
}

/* ---- grouping ---- */

#define MOE_GROUP_THREADS 1024

/* Block-wide exclusive scan of one int per thread; returns the exclusive prefix, *total. */
__device__ int block_scan(int v, int *total, int *smem /* 33 */)
{
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    if (lane == 31)
        smem[wid] = x;
    __syncthreads();
    if (wid == 0) {
        int s = lane < (int)(blockDim.x / 32) ? smem[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o)
                s += y;
        }
        smem[lane] = s; /* inclusive warp-total prefix */
    }
    __syncthreads();
    int base = wid ? smem[wid - 1] : 0;
    *total = smem[blockDim.x / 32 - 1];
    __syncthreads();
    return base + x - v;
}

/*
 * The grouping of moe_prep for TK <= 32 pairs by one warp (lane i holds pair i): the same
 * tiles, offsets and positions as the block-wide scans (experts in id order, a pair's place
 * inside its expert by lane order, where the block's atomics pick any order: no value depends
 * on it), in a few shuffles instead of a dozen block barriers.
 */
__device__ __forceinline__ void moe__group_warp(const int32_t *idx, int TK, int E, int BT,
                                                int32_t *__restrict__ sorted,
                                                int32_t *__restrict__ pos, int4 *__restrict__ tiles,
                                                int32_t *__restrict__ ntiles)
{
    const int lane = threadIdx.x & 31;
    int e = lane < TK ? idx[lane] : -1;
    e = e >= 0 && e < E ? e : -1; /* -1: no expert (padding rows, lanes past TK) */
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int c = __popc(same), lead = e >= 0 && lane == __ffs(same) - 1;
    const int nt = lead ? (c + BT - 1) / BT : 0; /* the expert's tiles, on its first lane */
    int o = 0, tb = 0, ttot = 0;                 /* pairs and tiles of lower experts; tiles */
    for (int k = 0; k < 32; k++) {
        const int ek = __shfl_sync(0xffffffffu, e, k), ntk = __shfl_sync(0xffffffffu, nt, k);
        o += ek >= 0 && ek < e;
        tb += ek < e ? ntk : 0;
        ttot += ntk;
    }
    if (lane < TK) {
        const int p = e >= 0 ? o + __popc(same & ((1u << lane) - 1u)) : -1;
        if (p >= 0)
            sorted[p] = lane;
        pos[lane] = p;
    }
    for (int i = 0; i < nt; i++)
        tiles[tb + i] = make_int4(e, o + i * BT, min(BT, c - i * BT), 0);
    if (lane == 0)
        *ntiles = ttot;
}

/* Router fused into the grouping block (kern_moe_forward with small T). */
struct prep_route {
    const float *logits; /* (T, E) */
    const float *bias;
    const int32_t *tid2eid, *tokens;
    int vocab, T;
    float route_scale;
    int32_t *idx; /* (T, K) written */
    float *w;     /* (T, K) written */
};

/*
 * Block 0 groups the (token, slot) pairs by expert (after routing the tokens itself when
 * rt.logits is set); blocks 1.. convert x to BF16 (which does not depend on the router, so
 * they run before the dependency wait).
 */
__global__ void __launch_bounds__(MOE_GROUP_THREADS)
    moe_prep(const int32_t *__restrict__ idx,                     /* (TK) */
             int TK, int E, int BT, int32_t *__restrict__ sorted, /* (TK) */
             int32_t *__restrict__ pos,                           /* (TK) */
             int4 *__restrict__ tiles, int32_t *__restrict__ ntiles,
             const float *__restrict__ x, /* (T, d) */
             __nv_bfloat16 *__restrict__ xb, size_t n4, int perm, const prep_route rt)
{
    if (blockIdx.x > 0) {
        for (size_t i = (blockIdx.x - 1) * (size_t)blockDim.x + threadIdx.x; i < n4;
             i += (size_t)(gridDim.x - 1) * blockDim.x) {
            float4 v = __ldg((const float4 *)x + i);
            size_t e0 = 4 * i, e2 = 4 * i + 2;
            if (perm) { /* rows are multiples of 64 long: permute inside the 64-chunk */
                e0 = (e0 & ~(size_t)63) | (size_t)perm64((int)(e0 & 63));
                e2 = (e2 & ~(size_t)63) | (size_t)perm64((int)(e2 & 63));
            }
            *(__nv_bfloat162 *)(xb + e0) = __floats2bfloat162_rn(v.x, v.y);
            *(__nv_bfloat162 *)(xb + e2) = __floats2bfloat162_rn(v.z, v.w);
        }
        kern__pdl_wait();
        kern__pdl_launch();
        return;
    }
    kern__pdl_wait();
    kern__pdl_launch();
    extern __shared__ int sm[]; /* cnt[E], fill[E], off[E], (rt.logits) the ids [TK] */
    __shared__ int scan_tmp[33];
    int *cnt = sm, *fill = sm + E, *off = sm + 2 * E;
    if (rt.logits) {
        /* the ids go to global memory for the later kernels and to shared memory for the
         * grouping below: under a GEMM streaming beside it, each round trip to L2 here costs
         * microseconds on the layer's critical path */
        const int K = TK / rt.T;
        for (int t = threadIdx.x >> 5; t < rt.T; t += blockDim.x >> 5)
            moe__topk_token(t, threadIdx.x & 31, rt.logits, E, K, rt.bias, rt.tid2eid, rt.vocab,
                            rt.tokens, rt.route_scale, rt.idx, rt.w, sm + 3 * E);
        idx = sm + 3 * E;
        if (TK <= 32) {
            if (rt.T > 1)
                __syncthreads(); /* the other tokens' warps' ids */
            else
                __syncwarp(); /* T = 1: warp 0 wrote them */
        }
    }
    if (TK <= 32) { /* decode-sized steps: warp 0 alone, no block barriers */
        if (threadIdx.x < 32)
            moe__group_warp(idx, TK, E, BT, sorted, pos, tiles, ntiles);
        return;
    }
    const int tid = threadIdx.x;
    for (int e = tid; e < E; e += blockDim.x)
        cnt[e] = fill[e] = 0;
    __syncthreads();
    for (int i = tid; i < TK; i += blockDim.x) {
        int e = idx[i];
        if (e >= 0 && e < E)
            atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    /* E <= blockDim.x: one expert per thread */
    int c = tid < E ? cnt[tid] : 0;
    int total;
    int o = block_scan(c, &total, scan_tmp);
    int nt = (c + BT - 1) / BT, ttot;
    int tb = block_scan(nt, &ttot, scan_tmp);
    if (tid < E) {
        off[tid] = o;
        for (int i = 0; i < nt; i++)
            tiles[tb + i] = make_int4(tid, o + i * BT, min(BT, c - i * BT), 0);
    }
    if (tid == 0)
        *ntiles = ttot;
    __syncthreads();
    /* placement; the order inside an expert does not change any value (columns of the
     * GEMMs are independent), so the output stays bit-reproducible */
    for (int i = tid; i < TK; i += blockDim.x) {
        int e = idx[i], p = -1;
        if (e >= 0 && e < E) {
            p = off[e] + atomicAdd(&fill[e], 1);
            sorted[p] = i;
        }
        pos[i] = p;
    }
}

/*
 * The warp-specialised path's routed GEMM1 activations: xg[pos[t K + j]] = xb[t] for every
 * token t and slot j that has a grouped position, so that a tile's rows are consecutive for
 * its TMA boxes (moe_gemm_ws.cu). A warp per token: its row is read once and written K times
 * (by grouped position, rows would be read K times over). Rows of d BF16 (d % 8 == 0).
 */
__global__ void moe_gather(const int32_t *__restrict__ pos,      /* (T, K) */
                           const __nv_bfloat16 *__restrict__ xb, /* (T, d) */
                           int T, int K, int d, __nv_bfloat16 *__restrict__ xg /* (T K, d) */)
{
    kern__pdl_wait();
    kern__pdl_launch();
    const int n16 = d / 8, lane = threadIdx.x & 31;
    const int nw = (gridDim.x * blockDim.x) >> 5;
    for (int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < T; t += nw) {
        const int mine = lane < K ? pos[(size_t)t * K + lane] : -1;
        const uint4 *src = (const uint4 *)(xb + (size_t)t * d);
        for (int i0 = lane; i0 < n16; i0 += 32 * 8) { /* 8 loads in flight a lane */
            uint4 v[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (i0 + 32 * j < n16)
                    v[j] = __ldg(src + i0 + 32 * j);
            for (int k = 0; k < K; k++) {
                const int p = __shfl_sync(0xffffffffu, mine, k);
                if (p < 0)
                    continue;
                uint4 *dst = (uint4 *)(xg + (size_t)p * d);
#pragma unroll
                for (int j = 0; j < 8; j++)
                    if (i0 + 32 * j < n16)
                        dst[i0 + 32 * j] = v[j];
            }
        }
    }
}

__global__ void moe_combine(const struct kern_moe_sum m, int d,
                            float *__restrict__ out /* (T, d) */)
{
    const int t = blockIdx.y, k4 = blockIdx.x * blockDim.x + threadIdx.x;
    kern__pdl_wait();
    kern__pdl_launch();
    if (k4 * 4 >= d)
        return;
    ((float4 *)(out + (size_t)t * d))[k4] = moe__sum_row4(m, t, k4, d);
}

/* ---- host side ---- */

template <int STAGE, int NT, int RB, int KS>
static int launch_gemm(const gemm_args &a, const gemm_args &sh, int rt_tiles, int sh_tiles,
                       cudaStream_t st, int groups = 1)
{
    if ((a.N / 16) % RB || (a.Kd / 256) % KS)
        return ERR_UNSUPPORTED;
    dim3 grid(a.N / 16 / RB, rt_tiles + sh_tiles, groups);
    return kern__launch(moe_gemm<STAGE, NT, RB, KS>, grid, dim3(RB * KS * 32), 0, st, 1, a, sh,
                        sh_tiles);
}

template <int STAGE>
static int launch_nt(int NT, const gemm_args &a, const gemm_args &sh, int rt, int nsh,
                     cudaStream_t st, int groups = 1)
{
    /* NT 2 / 4: split K over 4 / 2 warps when K/256 allows it, else 8 row blocks per block */
    const int kq = a.Kd / 256;
    switch (NT) {
    case 1: {
        /* 8-token tiles: 4 split-K warps per 16-row block while the grid is small (decode of a
         * few tokens), 2 in the middle, 4 row blocks of one warp each once there are many tiles
         * (bench_moe_gpu, H200, layer us at T = 1 / 4 / 16 / 64 / 256, Flash: KS 4: 56.7 / 141 /
         * 418 / 1074 / 1902; KS 2: 58.4 / 138 / 397 / 1021 / 1802; 1 warp: 59.4 / 146 / 407 /
         * 996 / 1756; Pro likewise; measured before the 96-register bound of moe_gemm) */
        const long items = (long)groups * (a.N / 16) * (rt + nsh); /* (16-row block, tile)s */
        if (items >= 60000 && (a.N / 16) % 4 == 0)
            return launch_gemm<STAGE, 1, 4, 1>(a, sh, rt, nsh, st, groups);
        if (items >= 5000 && kq % 2 == 0)
            return launch_gemm<STAGE, 1, 1, 2>(a, sh, rt, nsh, st, groups);
        return kq % 4 == 0 ? launch_gemm<STAGE, 1, 1, 4>(a, sh, rt, nsh, st, groups)
                           : launch_gemm<STAGE, 1, 8, 1>(a, sh, rt, nsh, st, groups);
    }
    case 2:
        return kq % 4 == 0 ? launch_gemm<STAGE, 2, 1, 4>(a, sh, rt, nsh, st, groups)
                           : launch_gemm<STAGE, 2, 8, 1>(a, sh, rt, nsh, st, groups);
    default:
        return kq % 2 == 0 ? launch_gemm<STAGE, 4, 4, 2>(a, sh, rt, nsh, st, groups)
                           : launch_gemm<STAGE, 4, 8, 1>(a, sh, rt, nsh, st, groups);
    }
}

static size_t wg_smem(int BN)
{
    return (size_t)WG_STAGES * BN * 128 + 1024;
}

extern "C" int kern_moe_prepare(void)
{
    static int done; /* benign race: idempotent */
    if (done)
        return 0;
    int rc = moe__ws_prepare();
    if (rc || (rc = moe__logits_prepare()))
        return rc;
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_wg<STAGE_GATEUP, 128>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)wg_smem(128)));
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_wg<STAGE_DOWN, 128>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)wg_smem(128)));
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_wg<STAGE_GATEUP, 64>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem(64)));
    KERN_CHECK(cudaFuncSetAttribute(moe_gemm_wg<STAGE_DOWN, 64>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wg_smem(64)));
    done = 1;
    return 0;
}

template <int STAGE, int BN>
static int launch_wg(const gemm_args &a, const gemm_args &sh, int rt_tiles, int sh_tiles,
                     cudaStream_t st, int groups = 1)
{
    const size_t smem = wg_smem(BN);
    int rc;
    if (a.N % (64 * MOE_WGS))
        return ERR_UNSUPPORTED;
    if ((rc = kern_moe_prepare()))
        return rc;
    dim3 grid(a.N / (64 * MOE_WGS), rt_tiles + sh_tiles, groups);
    return kern__launch(moe_gemm_wg<STAGE, BN>, grid, dim3(WG_THREADS), smem, st, 1, a, sh,
                        sh_tiles);
}

enum { PATH_MMA = 0, PATH_WG = 1, PATH_WS = 2 };

/* DSV4_MOE_WS=0: never the warp-specialised kernel, =1: for every wgmma-sized step (A/B
 * timing); unset: from WS_MIN_M tokens per weight matrix (read once). */
static int ws_mode(void)
{
    static int mode = -2; /* benign race: idempotent */
    if (mode == -2) {
        const char *e = getenv("DSV4_MOE_WS");
        mode = e && e[0] == '0' ? 0 : (e && e[0] == '1' ? 1 : -1);
    }
    return mode;
}
/* MoE: from 128 mean tokens per expert. H100, layer us, register-A -> this kernel, same call
 * (twelfth session, TMA activations): Flash T = 8192 (m 192) 7444, 7524 -> 6733, 6701; Pro
 * T = 8192 (m 128) 21604, 21586 -> 19761, 19502; Flash T = 4096 (m 96) 4092, 4101 -> 4480,
 * 4446 (Pro T = 4096, m 64: 15534, 15559 -> 14781, 14559). Dense FP8 linears: only with
 * DSV4_MOE_WS=1 (engine prefill in 2048-token chunks: 22146 against 22322 tokens/s with the
 * register-A kernel, eighth session). */
#define WS_MIN_M     128
#define WS_MIN_DENSE (1L << 30)

static int use_ws(long m, long min_m)
{
    int mode = ws_mode();
    return mode < 0 ? m >= min_m : mode;
}

/*
 * Path and tile width from the mean tokens per expert m: mma.sync with 8..32-token tiles up
 * to m = 32 (weight-streaming, latency-bound), else wgmma: the warp-specialised kernel with
 * tiles of up to 256 tokens (use_ws), or the register-A one with 64- or 128-token tiles.
 * Returns the tile width BT; *path says which kernel runs.
 */
static int pick_tile(const struct kern_moe_layer *L, int T, int *path)
{
    long m = (long)T * L->K / L->E;
    if (m <= 32) {
        *path = PATH_MMA;
        return m <= 8 ? 8 : (m <= 16 ? 16 : 32);
    }
    if (use_ws(m, WS_MIN_M)) {
        *path = PATH_WS;
        return 256;
    }
    *path = PATH_WG;
    return m >= 96 ? 128 : 64;
}

extern "C" size_t kern_moe_workspace_bytes(const struct kern_moe_layer *L, int T_max)
{
    return moe__ws_layout(L, T_max < 1 ? 1 : T_max, NULL).bytes;
}

static int moe_experts_ws(const struct kern_moe_layer *L, const float *x, const int32_t *idx,
                          const float *w, int T, float *out, struct kern_moe_sum *sum,
                          const struct moe_ws *ws, cudaStream_t st, int pdl_first,
                          const prep_route &rt, int xb_ready)
{
    int rc;
    const int d = L->d, I = L->I, E = L->E, K = L->K;
    if (T <= 0)
        return 0;
    if (d % 256 || I % 256 || E > MOE_GROUP_THREADS || K < 1 || K > 32)
        return ERR_UNSUPPORTED;
    int path;
    const int BT = pick_tile(L, T, &path), NT = BT / 8, wg = path != PATH_MMA;
    const int tiles_max = moe__max_tiles(T, K, E, BT), sh_tiles = (T + BT - 1) / BT;

    /* pdl: the first kernel of a call is launched plainly (a full dependency on whatever
     * ran before on the stream), the rest with programmatic dependent launch */
    /* xb_ready: the router's kernel already wrote x in BF16, in this path's order */
    size_t n4 = xb_ready ? 0 : (size_t)T * d / 4;
    unsigned conv = (unsigned)((n4 + MOE_GROUP_THREADS - 1) / MOE_GROUP_THREADS);
    conv = conv < 64 ? conv : 64;
    const size_t prep_smem = sizeof(int) * (3 * (size_t)E + (rt.logits ? (size_t)T * K : 0));
    if ((rc = kern__launch(moe_prep, dim3(1 + conv), dim3(MOE_GROUP_THREADS), prep_smem, st,
                           pdl_first, (const int32_t *)idx, T * K, E, BT, ws->sorted, ws->pos,
                           ws->tiles, ws->ntiles, x, ws->xb, n4, wg, rt)))
        return rc;

    gemm_args a = {};
    a.tiles = ws->tiles;
    a.ntiles = ws->ntiles;
    a.sorted = ws->sorted;
    a.route_w = w;
    a.topk = K;
    a.T = T;
    a.limit = L->swiglu_limit;

    /* GEMM1: gate/up + SwiGLU (routed tiles, then the shared expert's) */
    a.w = L->w13;
    a.ws = L->w13_s;
    a.w_estride = kern_nvfp4_data_bytes(2 * I, d);
    a.ws_estride = kern_nvfp4_scale_bytes(2 * I, d);
    a.alpha = L->alpha13;
    a.N = 2 * I;
    a.Kd = d;
    a.in = ws->xb;
    a.ldin = d;
    a.hout = ws->h;
    gemm_args s = a;
    if (path == PATH_WS) {
        /* x in grouped order, in the GEMM2 output buffer (written after GEMM1 is done) */
        __nv_bfloat16 *xg = (__nv_bfloat16 *)ws->yslot;
        if ((rc = kern__launch(moe_gather, dim3(4 * kern__sm_count()), dim3(256), 0, st, 1,
                               (const int32_t *)ws->pos, (const __nv_bfloat16 *)ws->xb, T, K, d,
                               xg)))
            return rc;
        a.in = xg;
    }
    s.w = L->sh13;
    s.fac = L->sh13_f;
    s.alpha_c0 = L->sh_alpha13[0];
    s.alpha_c1 = L->sh_alpha13[1];
    s.hout = ws->hsh;
    s.late_wait = xb_ready && !wg;
    const int nsh = L->sh13 ? sh_tiles : 0;
    rc = path == PATH_WS ? moe__launch_ws(STAGE_GATEUP, a, s, tiles_max, nsh, st, 1)
         : wg            ? (BT == 128 ? launch_wg<STAGE_GATEUP, 128>(a, s, tiles_max, nsh, st)
                                      : launch_wg<STAGE_GATEUP, 64>(a, s, tiles_max, nsh, st))
                         : launch_nt<STAGE_GATEUP>(NT, a, s, tiles_max, nsh, st);
    if (rc)
        return rc;
    /* GEMM2: down */
    a.w = L->w2;
    a.ws = L->w2_s;
    a.w_estride = kern_nvfp4_data_bytes(d, I);
    a.ws_estride = kern_nvfp4_scale_bytes(d, I);
    a.alpha = L->alpha2;
    a.N = d;
    a.Kd = I;
    a.in = ws->h;
    a.ldin = I;
    a.yout = ws->yslot;
    a.ldout = d;
    s = a;
    s.w = L->sh2;
    s.fac = L->sh2_f;
    s.alpha_c0 = L->sh_alpha2;
    s.in = ws->hsh;
    s.yout = ws->ysh;
    rc = path == PATH_WS ? moe__launch_ws(STAGE_DOWN, a, s, tiles_max, nsh, st, 1)
         : wg            ? (BT == 128 ? launch_wg<STAGE_DOWN, 128>(a, s, tiles_max, nsh, st)
                                      : launch_wg<STAGE_DOWN, 64>(a, s, tiles_max, nsh, st))
                         : launch_nt<STAGE_DOWN>(NT, a, s, tiles_max, nsh, st);
    if (rc)
        return rc;
    const struct kern_moe_sum m = {ws->yslot, L->sh13 ? ws->ysh : NULL, idx, K, E};
    if (sum) {
        *sum = m;
        return 0;
    }
    return kern_moe_sum_rows(&m, T, d, out, st);
}

extern "C" int kern_moe_sum_rows(const struct kern_moe_sum *m, int T, int d, float *out,
                                 struct CUstream_st *stream)
{
    if (T <= 0)
        return 0;
    if (d % 4 || T > 65535)
        return ERR_UNSUPPORTED;
    return kern__launch(moe_combine, dim3((d / 4 + 255) / 256, T), dim3(256), 0, stream, 1, *m, d,
                        out);
}

extern "C" int kern_moe_experts(const struct kern_moe_layer *L, const float *x, const int32_t *idx,
                                const float *w, int T, float *out, void *ws, size_t ws_bytes,
                                struct CUstream_st *stream)
{
    struct moe_ws lay = moe__ws_layout(L, T, ws);
    if (!ws || ws_bytes < lay.bytes)
        return ERR_INVAL;
    prep_route rt = {};
    return moe_experts_ws(L, x, idx, w, T, out, NULL, &lay, stream, 0, rt, 0);
}

/* Route + experts; the sum into out, or (sum set) its parts described in *sum. */
static int moe_forward(const struct kern_moe_layer *L, const float *x, const int32_t *tokens, int T,
                       float *out, struct kern_moe_sum *sum, void *ws, size_t ws_bytes,
                       cudaStream_t stream)
{
    struct moe_ws lay = moe__ws_layout(L, T, ws);
    if (!ws || ws_bytes < lay.bytes)
        return ERR_INVAL;
    /* T <= 32: top-K runs inside the grouping block (one launch fewer) */
    prep_route rt = {};
    if (T <= 32) {
        if (L->K > 32 || L->E % 32 || L->E > 32 * MOE_MAX_EPL || (!L->tid2eid && !L->gate_bias))
            return ERR_UNSUPPORTED;
        rt.logits = lay.logits;
        rt.bias = L->gate_bias;
        rt.tid2eid = L->tid2eid;
        rt.tokens = tokens;
        rt.vocab = L->vocab;
        rt.T = T;
        rt.route_scale = L->route_scale;
        rt.idx = lay.idx;
        rt.w = lay.w;
    }
    int path;
    (void)pick_tile(L, T, &path);
    /* the small-T logits kernels write xb in the mma.sync order, the long-step one in the
     * wgmma order */
    const int xb_ready =
        (T <= 64 && path == PATH_MMA) || (moe__logits_long(L, T) && path != PATH_MMA);
    int rc = moe__logits(L, x, T, lay.logits, xb_ready ? lay.xb : NULL, stream);
    if (!rc && !rt.logits)
        rc = moe__topk(L, lay.logits, tokens, T, lay.idx, lay.w, stream);
    if (!rc)
        rc = moe_experts_ws(L, x, lay.idx, lay.w, T, out, sum, &lay, stream, 1, rt, xb_ready);
    return rc;
}

extern "C" int kern_moe_forward(const struct kern_moe_layer *L, const float *x,
                                const int32_t *tokens, int T, float *out, void *ws, size_t ws_bytes,
                                struct CUstream_st *stream)
{
    return moe_forward(L, x, tokens, T, out, NULL, ws, ws_bytes, stream);
}

extern "C" int kern_moe_forward_parts(const struct kern_moe_layer *L, const float *x,
                                      const int32_t *tokens, int T, struct kern_moe_sum *sum,
                                      void *ws, size_t ws_bytes, struct CUstream_st *stream)
{
    *sum = (struct kern_moe_sum){};
    return moe_forward(L, x, tokens, T, NULL, sum, ws, ws_bytes, stream);
}

/* ---- dense FP8 linears (the GPU engine's fast path) through the shared-expert GEMM ---- */

/* The wgmma path (blocks of 256 rows x 64 or 128 tokens) for long steps or when it has at least
 * 32 blocks; else 32-token mma.sync tiles over 64-row blocks (16x more blocks, but each tile
 * reads the weights again). Threshold measured on the 8-layer Flash model at batch 64 (H200):
 * 32 blocks 12.31 ms per step, 100: 12.42, 264 (two waves): 12.65, any count: 13.34. */
extern "C" int kern_gemm_fp8_perm(int rows, int groups, int T)
{
    const int BT = T >= 96 ? 128 : 64;
    return T > 32 && rows % (64 * MOE_WGS) == 0 &&
           (T >= 256 || (long)groups * (rows / (64 * MOE_WGS)) * ((T + BT - 1) / BT) >= 32);
}

/* gemm_args of a dense linear W (one group): y (row stride ldy) = W xb (row stride ldx). */
static gemm_args dense_args(const struct kern_fp8_mat *W, const uint16_t *xb, int ldx, int T,
                            float *y, int ldy)
{
    gemm_args s = {};
    s.w = W->data;
    s.fac = W->fac;
    s.alpha_c0 = W->alpha;
    s.N = W->rows;
    s.Kd = W->cols;
    s.T = T;
    s.in = (const __nv_bfloat16 *)xb;
    s.ldin = ldx;
    s.yout = y;
    s.ldout = ldy;
    return s;
}

/*
 * The mma.sync path of dense FP8 linears (8-token tiles): `a` sizes the grid (its rows), `s`
 * holds group 0's operands (gemm_args: groups, pair); rowblocks: the 16-row blocks of all
 * groups. Few 16-row blocks (wq_a, wkv, wo_b at N <= 4096): split K over 8 or 16 warps instead
 * of 4, for ~2048 warps (~16 per SM) and so enough weight loads in flight (measured: batch 1
 * step -33 us on the 8-layer Flash model, H200; fewer, longer warps for wq_b: no change).
 */
static int dense_mma(const gemm_args &a, const gemm_args &s, long rowblocks, int T, int groups,
                     cudaStream_t stream)
{
    const int NT = T <= 8 ? 1 : (T <= 16 ? 2 : 4), ntile = (T + NT * 8 - 1) / (NT * 8);
    const int kq = s.Kd / 256;
    const long warps = rowblocks * ntile * 4;
    if (NT == 1 && kq % 16 == 0 && warps * 2 < 2048) /* (NT 2 would spill at 16) */
        return launch_gemm<STAGE_DOWN, 1, 1, 16>(a, s, 0, ntile, stream, groups);
    if (NT <= 2 && kq % 8 == 0 && warps < 2048)
        return NT == 1 ? launch_gemm<STAGE_DOWN, 1, 1, 8>(a, s, 0, ntile, stream, groups)
                       : launch_gemm<STAGE_DOWN, 2, 1, 8>(a, s, 0, ntile, stream, groups);
    return launch_nt<STAGE_DOWN>(NT, a, s, 0, ntile, stream, groups);
}

extern "C" int kern_gemm_fp8(const struct kern_fp8_mat *W, int groups, const uint16_t *xb, int ldx,
                             size_t x_goff, int T, float *y, int ldy, size_t y_goff,
                             struct CUstream_st *stream)
{
    if (T <= 0 || groups <= 0)
        return 0;
    if (W->rows % 128 || W->cols % 256 || ldx % 8 || x_goff % 8 || groups > 65535)
        return ERR_UNSUPPORTED;
    gemm_args s = dense_args(W, xb, ldx, T, y, ldy);
    s.w_gstride = kern_fp8_data_bytes(W->rows, W->cols);
    s.fac_gstride = kern_fp8_factor_count(W->rows, W->cols);
    s.in_goff = x_goff;
    s.out_goff = y_goff;
    if (kern_gemm_fp8_perm(W->rows, groups, T) && use_ws(T, WS_MIN_DENSE))
        return moe__launch_ws(STAGE_DOWN, s, s, 0, (T + 255) / 256, stream, groups);
    if (kern_gemm_fp8_perm(W->rows, groups, T))
        return T >= 96 ? launch_wg<STAGE_DOWN, 128>(s, s, 0, (T + 127) / 128, stream, groups)
                       : launch_wg<STAGE_DOWN, 64>(s, s, 0, (T + 63) / 64, stream, groups);
    return dense_mma(s, s, (long)groups * (s.N / 16), T, groups, stream);
}

extern "C" int kern_gemm_fp8_pair(const struct kern_fp8_mat *W0, float *y0, int ldy0,
                                  const struct kern_fp8_mat *W1, float *y1, int ldy1,
                                  const uint16_t *xb, int ldx, int T, struct CUstream_st *stream)
{
    if (T <= 0)
        return 0;
    if (T > 8 || W0->cols != W1->cols || W0->rows % 128 || W1->rows % 128 || W0->cols % 256 ||
        ldx % 8)
        return ERR_UNSUPPORTED;
    /* the one with more rows sizes the grid (moe_gemm's `a`, group 1); the other is group 0 */
    const bool big1 = W1->rows >= W0->rows;
    gemm_args a =
        big1 ? dense_args(W1, xb, ldx, T, y1, ldy1) : dense_args(W0, xb, ldx, T, y0, ldy0);
    gemm_args s =
        big1 ? dense_args(W0, xb, ldx, T, y0, ldy0) : dense_args(W1, xb, ldx, T, y1, ldy1);
    s.pair = 1;
    return dense_mma(a, s, (W0->rows + W1->rows) / 16, T, 2, stream);
}
