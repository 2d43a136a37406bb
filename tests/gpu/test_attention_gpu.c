/*
 * test_attention_gpu.c - the fast path's sink attention (kern_sink_attention_fast: at head size
 * 512 the decode kernel over FP8 entries where two blocks per (row, head) fit one wave, else
 * the tensor-core kernel; with DSV4_CUDA_ATTN=tc always the tensor-core kernel, with
 * DSV4_CUDA_ATTN=simt always the CUDA-core one) against the exact
 * kernel (kern_sink_attention, the CPU's twin: bit-identical to the CPU in test_gpu_engine) on
 * the same random cache, batch and queries (TAP, suite 'gpu').
 *
 * Cases: 64 heads (DeepSeek-V4-Flash) and 4 (the tiny models), head size 512 with 64 RoPE dims,
 * window 128; SWA, CSA (ratio 4, top-512 selection) and HCA (ratio 128); FP32 and FP8 cache
 * entries; a step of decode rows of random positions (up to 4000) plus one prefill chunk (its
 * window keys partly this step's latents); with the workspace (key splits on short steps) and
 * without; a lone decode row past the window and two decode rows (the batch-1 and batch-2
 * steps: the decode kernel, or splits whose merge must also write o's BF16 hi + lo rows,
 * checked bit for bit against the host's conversion of o).
 * Fresh random data per run (seed printed), outputs poisoned with NaN before each run.
 *
 * Bound: per (row, head) ||o_fast - o_exact|| / ||o_exact|| <= 1e-4. Both sum in FP32 in
 * different orders; the tensor-core kernel's products carry ~16 significant bits (BF16 hi + lo
 * splits, the lo.lo term dropped: < 2^-16 relative), so logits and weights agree to ~1e-5.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kvcache.h"
#include "kernels/cpu/cpu.h"
#include "kernels/kernels.h"
#include "tests/gpu/gpu_test.h"

#define HD   512
#define ROPE 64
#define WIN  128
#define TOPK 512

/* One random KV entry of the format at e. */
static void fill_entry(uint8_t *e, int fp8)
{
    if (!fp8) {
        float *f = (float *)e;
        for (int i = 0; i < HD; i++)
            f[i] = frand();
        return;
    }
    const int nope = HD - ROPE;
    for (int i = 0; i < nope; i++) {
        uint8_t b = (uint8_t)(rnd() & 0xff);
        e[i] = (b & 0x7f) == 0x7f ? 0 : b; /* no NaN codes */
    }
    for (int i = 0; i < nope / 64; i++)
        e[nope + i] = (uint8_t)(120 + rnd() % 4); /* 2^-7 .. 2^-4: values within ~[-28, 28] */
    uint16_t *r = (uint16_t *)(e + kern_kv_fp8_bytes(HD, ROPE) - 2 * ROPE);
    for (int i = 0; i < ROPE; i++)
        r[i] = cpu_f32_to_bf16(frand());
}

/* The FP32 values of an entry (the exact kernel's format). */
static void entry_f32(const uint8_t *e, int fp8, float *f)
{
    if (!fp8) {
        memcpy(f, e, sizeof(float) * HD);
        return;
    }
    const int nope = HD - ROPE;
    for (int i = 0; i < nope; i++)
        f[i] = ldexpf(cpu_e4m3_to_f32(e[i]), (int)e[nope + i / 64] - 127);
    const uint16_t *r = (const uint16_t *)(e + kern_kv_fp8_bytes(HD, ROPE) - 2 * ROPE);
    for (int i = 0; i < ROPE; i++)
        f[nope + i] = cpu_bf16_to_f32(r[i]);
}

struct dev {
    void *p[16];
    int n;
};

static void *dput(struct dev *d, const void *h, size_t n)
{
    void *p = NULL;
    if (kern_malloc(&p, n ? n : 16) || (n && kern_h2d(p, h, n)))
        return NULL;
    d->p[d->n++] = p;
    return p;
}

/*
 * One step: ndec decode rows (one sequence each) then one chunk of nchunk rows; H heads; layer
 * ratio and format; ws: pass the split workspace. Returns the worst relative error (or -1).
 * *xb_bad: where the kernel also wrote o's BF16 hi + lo rows (the split merge), the elements
 * that differ from kern_act_bf16's conversion of o (on the host); -1 where it did not.
 */
static double run_case(int H, int ratio, int fp8, int ndec, int nchunk, int use_ws, int *nonfinite,
                       int *xb_bad)
{
    const int nseq = ndec + (nchunk > 0), T = ndec + nchunk;
    const size_t ent = fp8 ? kern_kv_fp8_bytes(HD, ROPE) : (size_t)HD * sizeof(float);
    int32_t *row_seq = malloc(sizeof(int32_t) * T), *row_pos = malloc(sizeof(int32_t) * T);
    int32_t *seq_row0 = malloc(sizeof(int32_t) * nseq), *seq_n = malloc(sizeof(int32_t) * nseq);
    int32_t *seq_slot = malloc(sizeof(int32_t) * nseq), *seq_bt = malloc(sizeof(int32_t) * nseq);
    int32_t *bt = malloc(sizeof(int32_t) * nseq * 40), *sel = malloc(sizeof(int32_t) * T * TOPK);
    float *q = malloc(sizeof(float) * (size_t)T * H * HD), *kv = malloc(sizeof(float) * T * HD);
    float *sinks = malloc(sizeof(float) * H), *inv = malloc(sizeof(float) * ROPE / 2);
    float *o1 = malloc(sizeof(float) * (size_t)T * H * HD);
    float *o2 = malloc(sizeof(float) * (size_t)T * H * HD);
    double worst = -1;
    const size_t nxb = 2 * (size_t)T * H * HD;
    uint16_t *xbh = malloc(sizeof(uint16_t) * nxb), *d_xb = NULL;
    int xb_done = 0;
    *xb_bad = -1;
    struct dev d = {{0}, 0};
    int nbt = 0, max_pos = 0, max_n = 1;
    /* sequences: decode rows at random positions, then the chunk */
    for (int s = 0; s < nseq; s++) {
        const int n = s < ndec ? 1 : nchunk;
        /* (one or two decode rows past the window) */
        const int pos0 =
            (int)(rnd() % (s < ndec ? 4000 : 1200)) + (s < ndec ? (T <= 2 ? WIN + 72 : 0) : 100);
        seq_row0[s] = s < ndec ? s : ndec;
        seq_n[s] = n;
        seq_slot[s] = s;
        seq_bt[s] = nbt;
        const int last = pos0 + n - 1, nb = last / DSV4_BLOCK_TOKENS + 1;
        for (int i = 0; i < nb; i++, nbt++)
            bt[nbt] = nbt; /* one block per (sequence, 128 tokens): distinct */
        for (int r = 0; r < n; r++) {
            row_seq[seq_row0[s] + r] = s;
            row_pos[seq_row0[s] + r] = pos0 + r;
        }
        max_pos = last + 1 > max_pos ? last + 1 : max_pos;
        max_n = n > max_n ? n : max_n;
    }
    /* CSA selection: ascending distinct entries below (pos + 1) / 4 */
    for (int t = 0; t < T; t++) {
        const int nvalid = (row_pos[t] + 1) / 4, want = nvalid < TOPK ? nvalid : TOPK;
        int k = 0;
        for (int i = 0; i < nvalid && k < want; i++)
            if ((int)(rnd() % (unsigned)(nvalid - i)) < want - k)
                sel[(size_t)t * TOPK + k++] = i;
        for (; k < TOPK; k++)
            sel[(size_t)t * TOPK + k] = -1;
    }
    for (size_t i = 0; i < (size_t)T * H * HD; i++)
        q[i] = frand();
    for (int i = 0; i < T * HD; i++)
        kv[i] = frand();
    for (int h = 0; h < H; h++)
        sinks[h] = 2.0f * frand();
    for (int i = 0; i < ROPE / 2; i++)
        inv[i] = powf(10000.0f, -2.0f * i / ROPE);
    /* cache: slot state = the window ring; blocks = 128 / ratio entries */
    const size_t slot_bytes = WIN * ent, per_blk = ratio ? DSV4_BLOCK_TOKENS / ratio : 1;
    const size_t block_bytes = per_blk * ent;
    uint8_t *state = malloc(slot_bytes * (nseq + 1)), *blocks = malloc(block_bytes * (nbt + 1));
    for (size_t i = 0; i < (size_t)WIN * (nseq + 1); i++)
        fill_entry(state + i * ent, fp8);
    for (size_t i = 0; i < per_blk * (nbt + 1); i++)
        fill_entry(blocks + i * ent, fp8);
    /* the exact kernel's twin: FP32 entries of the same values */
    const size_t ent32 = sizeof(float) * HD;
    float *state32 = malloc(WIN * ent32 * (nseq + 1)),
          *blocks32 = malloc(per_blk * ent32 * (nbt + 1));
    for (size_t i = 0; i < (size_t)WIN * (nseq + 1); i++)
        entry_f32(state + i * ent, fp8, state32 + i * HD);
    for (size_t i = 0; i < per_blk * (nbt + 1); i++)
        entry_f32(blocks + i * ent, fp8, blocks32 + i * HD);

    struct kern_batch b = {0};
    b.T = T;
    b.nseq = nseq;
    b.max_pos = max_pos;
    b.max_n = max_n;
    struct kern_cache c = {0};
    c.slot_bytes = slot_bytes;
    c.block_bytes = block_bytes;
    struct kern_layer_cache l = {0};
    l.ent = ent;
    l.ratio = ratio;
    l.fp8 = fp8;
    l.rope = ROPE;
    struct kern_cache c32 = {0};
    c32.slot_bytes = WIN * ent32;
    c32.block_bytes = per_blk * ent32;
    struct kern_layer_cache l32 = l;
    l32.ent = ent32;
    l32.fp8 = 0;
    const size_t on = sizeof(float) * (size_t)T * H * HD,
                 wsn = kern_attention_fast_ws_floats(H, HD);
    float *d_o = NULL, *d_ws = NULL;
    if (!(b.row_seq = dput(&d, row_seq, sizeof(int32_t) * T)) ||
        !(b.row_pos = dput(&d, row_pos, sizeof(int32_t) * T)) ||
        !(b.seq_row0 = dput(&d, seq_row0, sizeof(int32_t) * nseq)) ||
        !(b.seq_n = dput(&d, seq_n, sizeof(int32_t) * nseq)) ||
        !(b.seq_slot = dput(&d, seq_slot, sizeof(int32_t) * nseq)) ||
        !(b.seq_bt = dput(&d, seq_bt, sizeof(int32_t) * nseq)) ||
        !(b.bt = dput(&d, bt, sizeof(int32_t) * nbt)) ||
        !(c.state = dput(&d, state, slot_bytes * (nseq + 1))) ||
        !(c.blocks = dput(&d, blocks, block_bytes * (nbt + 1))) ||
        !(c32.state = dput(&d, state32, WIN * ent32 * (nseq + 1))) ||
        !(c32.blocks = dput(&d, blocks32, per_blk * ent32 * (nbt + 1))))
        goto out;
    const int32_t *d_sel = dput(&d, sel, sizeof(int32_t) * T * TOPK);
    const float *d_q = dput(&d, q, sizeof(float) * (size_t)T * H * HD);
    const float *d_kv = dput(&d, kv, sizeof(float) * T * HD);
    const float *d_sinks = dput(&d, sinks, sizeof(float) * H);
    const float *d_inv = dput(&d, inv, sizeof(float) * ROPE / 2);
    if (!d_sel || !d_q || !d_kv || !d_sinks || !d_inv || kern_malloc((void **)&d_o, on) ||
        kern_malloc((void **)&d_ws, sizeof(float) * wsn) ||
        kern_malloc((void **)&d_xb, sizeof(uint16_t) * nxb) || !xbh ||
        kern_memset(d_xb, 0xff, sizeof(uint16_t) * nxb))
        goto out;
    const int32_t *cs = ratio == 4 ? d_sel : NULL;
    if (kern_memset(d_o, 0xff, on) ||
        kern_sink_attention(&b, &c32, &l32, d_q, d_kv, cs, TOPK, d_sinks, H, HD, WIN, ROPE, d_inv,
                            d_o, NULL) ||
        kern_sync() || kern_d2h(o1, d_o, on))
        goto out;
    if (kern_memset(d_o, 0xff, on) ||
        kern_sink_attention_fast(&b, &c, &l, d_q, d_kv, cs, TOPK, d_sinks, H, HD, WIN, ROPE, d_inv,
                                 d_o, use_ws ? d_ws : NULL, d_xb, &xb_done, NULL) ||
        kern_sync() || kern_d2h(o2, d_o, on) ||
        (xb_done && kern_d2h(xbh, d_xb, sizeof(uint16_t) * nxb)))
        goto out;
    if (xb_done) {
        const size_t n = (size_t)T * H * HD;
        *xb_bad = 0;
        for (size_t i = 0; i < n; i++) {
            const uint16_t hi = cpu_f32_to_bf16(o2[i]);
            *xb_bad += xbh[i] != hi || xbh[n + i] != cpu_f32_to_bf16(o2[i] - cpu_bf16_to_f32(hi));
        }
    }
    worst = 0;
    *nonfinite = 0;
    for (int r = 0; r < T * H; r++) {
        double num = 0, den = 0;
        for (int i = 0; i < HD; i++) {
            const double a = o1[(size_t)r * HD + i], f = o2[(size_t)r * HD + i];
            *nonfinite += !isfinite(f);
            num += (f - a) * (f - a);
            den += a * a;
        }
        const double e = sqrt(num / (den > 0 ? den : 1));
        worst = e > worst || e != e ? e : worst;
    }
out:
    if (worst < 0)
        fprintf(stderr, "# CUDA: %s\n", kern_last_error());
    for (int i = 0; i < d.n; i++)
        kern_free(d.p[i]);
    kern_free(d_o), kern_free(d_ws), kern_free(d_xb);
    free(xbh);
    free(row_seq), free(row_pos), free(seq_row0), free(seq_n), free(seq_slot), free(seq_bt);
    free(bt), free(sel), free(q), free(kv), free(sinks), free(inv), free(o1), free(o2);
    free(state), free(blocks), free(state32), free(blocks32);
    return worst;
}

int main(void)
{
    if (kern_device_count() <= 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    const char *ak = getenv("DSV4_CUDA_ATTN");
    rs = (uint64_t)time(NULL);
    printf("# seed %llu, kernel: %s\n", (unsigned long long)rs,
           ak && !strcmp(ak, "simt") ? "CUDA cores (DSV4_CUDA_ATTN=simt)"
           : ak && !strcmp(ak, "tc") ? "tensor cores (DSV4_CUDA_ATTN=tc)"
                                     : "decode kernel at few rows (FP8), else tensor cores");
    static const int heads[] = {64, 4}, ratios[] = {0, 4, 128};
    for (int hi = 0; hi < 2; hi++)
        for (int ri = 0; ri < 3; ri++)
            for (int fp8 = 0; fp8 <= 1; fp8++)
                for (int step = 0; step < 6; step++) {
                    /* 3 decode rows + a 37-row chunk with splits; 24 decode rows without the
                     * workspace; 200 decode rows (long step: no splits); 1 and 2 decode rows
                     * and a 2-row chunk (splits, or the decode kernel) */
                    static const int ndecs[] = {3, 24, 200, 1, 2, 0},
                                     nchunks[] = {37, 0, 0, 0, 0, 2};
                    const int ndec = ndecs[step], nchunk = nchunks[step], use_ws = step != 1;
                    int nonfinite = 0, xb_bad;
                    const double e = run_case(heads[hi], ratios[ri], fp8, ndec, nchunk, use_ws,
                                              &nonfinite, &xb_bad);
                    char msg[240];
                    snprintf(msg, sizeof msg,
                             "H %d ratio %d %s, %d decode rows + %d-row chunk%s: worst rel err "
                             "%.2e (bound 1e-4), %d non-finite; BF16 hi + lo of o: %s %d",
                             heads[hi], ratios[ri], fp8 ? "FP8" : "FP32", ndec, nchunk,
                             use_ws ? ", splits" : "", e, nonfinite,
                             xb_bad < 0 ? "not made" : "made, differing", xb_bad);
                    /* the one and two rows' kernels must also write them */
                    tap(e >= 0 && e <= 1e-4 && nonfinite == 0 &&
                            (xb_bad == 0 || (xb_bad < 0 && step < 3)),
                        "%s", msg);
                }
    printf("1..%d\n", n_test);
    return n_fail ? 1 : 0;
}
