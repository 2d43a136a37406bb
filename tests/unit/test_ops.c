/*
 * test_ops.c - the CPU reference ops (kernels/cpu/cpu.h) against independent references written
 * here: hand-computed constants for small cases, brute-force nearest-value searches for the
 * number formats, and straightforward double-precision re-implementations of the formulas of
 * shared/spec/dsv4-model.md (§5.3 storage formats, §6.1 mHC, §6.2 RoPE/YaRN, §6.3 compressor,
 * §6.4 indexer, §6.5 sink attention, §6.6 MoE, §7 numerics). Inputs come from a seeded PRNG;
 * outputs are poisoned (NaN) before every call, so an op that leaves an element unwritten fails.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kernels/cpu/cpu.h"

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static uint64_t rng_state;

static void rng_seed(uint64_t s)
{
    rng_state = s * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
}

static uint64_t rng_u64(void) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unit(void) /* [0, 1) */
{
    return (double)(rng_u64() >> 11) * 0x1p-53;
}

static int rng_int(int n) /* [0, n) */
{
    return (int)(rng_u64() % (uint64_t)n);
}

static float rng_f(double lo, double hi)
{
    return (float)(lo + (hi - lo) * rng_unit());
}

static void rng_fill(float *x, size_t n, double lo, double hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rng_f(lo, hi);
}

static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    assert_non_null(p);
    return p;
}

/* |got - want| <= atol + rtol*|want|; NaN never passes. */
static void check_close(const char *what, int i, double got, double want, double atol,
                        double rtol)
{
    double err = fabs(got - want);
    if (!(err <= atol + rtol * fabs(want)))
        fail_msg("%s[%d]: got %.9g, want %.9g (err %.3g, tol %.3g)", what, i, got, want, err,
                 atol + rtol * fabs(want));
}

static void check_bits(const char *what, int i, float got, float want)
{
    if (memcmp(&got, &want, sizeof got) != 0)
        fail_msg("%s[%d]: got %.9g (%a), want %.9g (%a)", what, i, (double)got, (double)got,
                 (double)want, (double)want);
}

/* smallest power of two >= r (r > 0), by search (independent of frexp tricks) */
static double ref_pow2_ceil(double r)
{
    double s = 1.0;
    while (s < r)
        s *= 2.0;
    while (s / 2.0 >= r)
        s /= 2.0;
    return s;
}

static double ref_sigmoid(double x)
{
    return 1.0 / (1.0 + exp(-x));
}

/* ------------------------------------------------------------------------------------------ */
/* reference number formats (spec §5.3)                                                        */
/* ------------------------------------------------------------------------------------------ */

/* float8_e4m3fn: bias 7, subnormals m*2^-9, S.1111.111 = NaN, no infinities */
static double ref_e4m3(uint8_t b)
{
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7)
        return NAN;
    double v = e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
    return s ? -v : v;
}

/* nearest of the positive codes 0..0x7e (monotonic in value); ties to the even code; saturating */
static uint8_t ref_to_e4m3(float x)
{
    if (isnan(x))
        return 0x7f;
    uint8_t sign = signbit(x) ? 0x80 : 0;
    double a = fabs((double)x);
    if (a >= 448.0)
        return (uint8_t)(sign | 0x7e);
    int best = 0;
    double bd = INFINITY;
    for (int c = 0; c <= 0x7e; c++) {
        double d = fabs(ref_e4m3((uint8_t)c) - a);
        if (d < bd || (d == bd && !(c & 1))) {
            best = c;
            bd = d;
        }
    }
    return (uint8_t)(sign | best);
}

static const double E2M1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};

static uint8_t ref_to_e2m1(float x)
{
    uint8_t sign = signbit(x) ? 8 : 0;
    double a = fabs((double)x);
    if (a >= 6.0)
        return (uint8_t)(sign | 7);
    int best = 0;
    double bd = INFINITY;
    for (int c = 0; c < 8; c++) {
        double d = fabs(E2M1[c] - a);
        if (d < bd || (d == bd && !(c & 1))) {
            best = c;
            bd = d;
        }
    }
    return (uint8_t)(sign | best);
}

static double ref_bf16(uint16_t h)
{
    int s = h >> 15, e = (h >> 7) & 0xff, m = h & 0x7f;
    double v;
    if (e == 0xff)
        v = m ? NAN : INFINITY;
    else if (e == 0)
        v = ldexp(m, -133);
    else
        v = ldexp(128 + m, e - 134);
    return s ? -v : v;
}

/* nearest of the two bf16 neighbours (truncation and next magnitude), ties to even */
static uint16_t ref_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    double dl = fabs(ref_bf16(lo) - (double)f), dh = fabs(ref_bf16(hi) - (double)f);
    if (dl < dh)
        return lo;
    if (dh < dl)
        return hi;
    return (lo & 1) ? hi : lo;
}

/* §7 fp8_roundtrip: amax = max(|x_blk|, 1e-4), s = 2^ceil(log2(amax/448)), e4m3(x/s)*s */
static void ref_fp8_roundtrip(const float *x, int n, int block, float *out)
{
    for (int b = 0; b < n; b += block) {
        int len = n - b < block ? n - b : block;
        double amax = 1e-4;
        for (int i = 0; i < len; i++)
            amax = fmax(amax, fabs((double)x[b + i]));
        double s = ref_pow2_ceil((double)(float)((float)amax / 448.0f));
        for (int i = 0; i < len; i++)
            out[b + i] = (float)(ref_e4m3(ref_to_e4m3((float)(x[b + i] / s))) * s);
    }
}

/* §7 fp4_roundtrip: amax floor 6*2^-126, s = 2^ceil(log2(amax/6)), e2m1(x/s)*s */
static void ref_fp4_roundtrip(const float *x, int n, int block, float *out)
{
    for (int b = 0; b < n; b += block) {
        int len = n - b < block ? n - b : block;
        double amax = 6.0 * ldexp(1.0, -126);
        for (int i = 0; i < len; i++)
            amax = fmax(amax, fabs((double)x[b + i]));
        double s = ref_pow2_ceil((double)((float)amax / 6.0f));
        for (int i = 0; i < len; i++)
            out[b + i] = (float)(E2M1[ref_to_e2m1((float)(x[b + i] / s))] * s);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 1. formats                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void test_e4m3_decode(void **state)
{
    (void)state;
    assert_true(cpu_e4m3_to_f32(0x00) == 0.0f && !signbit(cpu_e4m3_to_f32(0x00)));
    assert_true(cpu_e4m3_to_f32(0x80) == 0.0f && signbit(cpu_e4m3_to_f32(0x80)));
    assert_true(cpu_e4m3_to_f32(0x01) == 0x1p-9f);
    assert_true(cpu_e4m3_to_f32(0x07) == 7 * 0x1p-9f);
    assert_true(cpu_e4m3_to_f32(0x08) == 0x1p-6f);
    assert_true(cpu_e4m3_to_f32(0x38) == 1.0f);
    assert_true(cpu_e4m3_to_f32(0x39) == 1.125f);
    assert_true(cpu_e4m3_to_f32(0x40) == 2.0f);
    assert_true(cpu_e4m3_to_f32(0x7e) == 448.0f);
    assert_true(cpu_e4m3_to_f32(0xfe) == -448.0f);
    assert_true(cpu_e4m3_to_f32(0xb8) == -1.0f);
    assert_true(isnan(cpu_e4m3_to_f32(0x7f)));
    assert_true(isnan(cpu_e4m3_to_f32(0xff)));
    /* all 256 codes vs the reference decoder, and the LUT */
    const float *lut = cpu_e4m3_lut();
    assert_non_null(lut);
    for (int b = 0; b < 256; b++) {
        double want = ref_e4m3((uint8_t)b);
        float got = cpu_e4m3_to_f32((uint8_t)b);
        if (isnan(want)) {
            assert_true(isnan(got) && isnan(lut[b]));
            continue;
        }
        check_bits("e4m3", b, got, (float)want);
        check_bits("e4m3_lut", b, lut[b], (float)want);
    }
}

static void test_e4m3_encode(void **state)
{
    (void)state;
    /* hand-picked */
    assert_int_equal(cpu_f32_to_e4m3(0.0f), 0x00);
    assert_int_equal(cpu_f32_to_e4m3(1.0f), 0x38);
    assert_int_equal(cpu_f32_to_e4m3(1.0625f), 0x38); /* tie 1.0 | 1.125 -> even (1.0) */
    assert_int_equal(cpu_f32_to_e4m3(1.1875f), 0x3a); /* tie 1.125 | 1.25 -> even (1.25) */
    assert_int_equal(cpu_f32_to_e4m3(-1.1875f), 0xba);
    assert_int_equal(cpu_f32_to_e4m3(1.07f), 0x39);   /* above the tie -> up */
    assert_int_equal(cpu_f32_to_e4m3(1000.0f), 0x7e); /* saturation */
    assert_int_equal(cpu_f32_to_e4m3(-1000.0f), 0xfe);
    assert_int_equal(cpu_f32_to_e4m3(450.0f), 0x7e);
    assert_int_equal(cpu_f32_to_e4m3(464.0f), 0x7e);
    assert_int_equal(cpu_f32_to_e4m3(INFINITY), 0x7e);
    assert_int_equal(cpu_f32_to_e4m3(-INFINITY), 0xfe);
    assert_int_equal(cpu_f32_to_e4m3(416.0f), 0x7d); /* exact */
    assert_int_equal(cpu_f32_to_e4m3(432.0f), 0x7e); /* tie 416 | 448 -> even (448) */
    assert_int_equal(cpu_f32_to_e4m3(400.0f), 0x7c); /* tie 384 | 416 -> even (384) */
    assert_int_equal(cpu_f32_to_e4m3(0x1p-9f), 0x01);  /* smallest subnormal */
    assert_int_equal(cpu_f32_to_e4m3(0x1p-10f), 0x00); /* tie 0 | 2^-9 -> 0 */
    assert_int_equal(cpu_f32_to_e4m3(0x1.8p-9f), 0x02); /* tie 2^-9 | 2^-8 -> 2^-8 */
    assert_int_equal(cpu_f32_to_e4m3(0x1.4p-9f), 0x01);
    assert_int_equal(cpu_f32_to_e4m3(7.5f * 0x1p-9f), 0x08); /* tie 7*2^-9 | 2^-6 -> 2^-6 */
    assert_int_equal(cpu_f32_to_e4m3(6.5f * 0x1p-9f), 0x06);
    assert_int_equal(cpu_f32_to_e4m3(-5.0f * 0x1p-9f), 0x85);
    assert_int_equal(cpu_f32_to_e4m3(0x1p-12f), 0x00);
    assert_true(isnan(cpu_e4m3_to_f32(cpu_f32_to_e4m3(NAN))));
    /* round trip of the 254 non-NaN codes (0x7f and 0xff are the NaNs) */
    for (int b = 0; b < 256; b++) {
        if ((b & 0x7f) == 0x7f)
            continue;
        if (cpu_f32_to_e4m3(cpu_e4m3_to_f32((uint8_t)b)) != b)
            fail_msg("round trip of 0x%02x gave 0x%02x", b,
                     cpu_f32_to_e4m3(cpu_e4m3_to_f32((uint8_t)b)));
    }
    /* every midpoint between neighbouring codes (a tie), and just either side of it */
    for (int c = 0; c < 0x7e; c++) {
        float mid = (float)((ref_e4m3((uint8_t)c) + ref_e4m3((uint8_t)(c + 1))) / 2);
        float probes[3] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, INFINITY)};
        for (int p = 0; p < 3; p++)
            for (int sg = 0; sg < 2; sg++) {
                float x = sg ? -probes[p] : probes[p];
                if (cpu_f32_to_e4m3(x) != ref_to_e4m3(x))
                    fail_msg("e4m3(%a): got 0x%02x want 0x%02x", (double)x, cpu_f32_to_e4m3(x),
                             ref_to_e4m3(x));
            }
    }
    /* random values, log-uniform over [2^-13, 2^10] */
    rng_seed(11);
    for (int i = 0; i < 20000; i++) {
        float x = (float)ldexp(1.0 + rng_unit(), rng_int(23) - 13);
        if (rng_u64() & 1)
            x = -x;
        if (cpu_f32_to_e4m3(x) != ref_to_e4m3(x))
            fail_msg("e4m3(%a): got 0x%02x want 0x%02x", (double)x, cpu_f32_to_e4m3(x),
                     ref_to_e4m3(x));
    }
}

static void test_e8m0_e2m1(void **state)
{
    (void)state;
    assert_true(cpu_e8m0_to_f32(127) == 1.0f);
    assert_true(cpu_e8m0_to_f32(130) == 8.0f);
    assert_true(cpu_e8m0_to_f32(120) == 0x1p-7f);
    assert_true((double)cpu_e8m0_to_f32(0) == ldexp(1.0, -127));
    assert_true((double)cpu_e8m0_to_f32(254) == ldexp(1.0, 127));
    assert_true(isnan(cpu_e8m0_to_f32(255))); /* float8_e8m0fnu: 0xff is NaN */
    for (int b = 0; b < 255; b++)
        assert_true((double)cpu_e8m0_to_f32((uint8_t)b) == ldexp(1.0, b - 127));

    /* E2M1 code table */
    for (int c = 0; c < 16; c++) {
        float v = cpu_e2m1_to_f32((uint8_t)c);
        check_bits("e2m1", c, v, (float)E2M1[c]);
    }
    assert_true(signbit(cpu_e2m1_to_f32(8)));
    /* encode: ties to even */
    assert_int_equal(cpu_f32_to_e2m1(2.5f), 4);  /* -> 2 */
    assert_int_equal(cpu_f32_to_e2m1(5.0f), 6);  /* -> 4 */
    assert_int_equal(cpu_f32_to_e2m1(0.25f), 0); /* -> 0 */
    assert_int_equal(cpu_f32_to_e2m1(0.75f), 2); /* -> 1 */
    assert_int_equal(cpu_f32_to_e2m1(1.25f), 2); /* -> 1 */
    assert_int_equal(cpu_f32_to_e2m1(1.75f), 4); /* -> 2 */
    assert_int_equal(cpu_f32_to_e2m1(3.5f), 6);  /* -> 4 */
    assert_int_equal(cpu_f32_to_e2m1(5.01f), 7); /* -> 6 */
    assert_int_equal(cpu_f32_to_e2m1(2.6f), 5);  /* -> 3 */
    assert_int_equal(cpu_f32_to_e2m1(7.0f), 7);  /* saturating */
    assert_int_equal(cpu_f32_to_e2m1(100.0f), 7);
    assert_int_equal(cpu_f32_to_e2m1(-5.0f), 14);
    assert_int_equal(cpu_f32_to_e2m1(-0.75f), 10);
    assert_int_equal(cpu_f32_to_e2m1(-6.0f), 15);
    assert_int_equal(cpu_f32_to_e2m1(0.0f), 0);
    for (int c = 0; c < 16; c++) /* round trip, -0 included */
        if (cpu_f32_to_e2m1((float)E2M1[c]) != c)
            fail_msg("e2m1 round trip of code %d gave %d", c, cpu_f32_to_e2m1((float)E2M1[c]));
    for (int c = 0; c < 7; c++) {
        float mid = (float)((E2M1[c] + E2M1[c + 1]) / 2);
        float probes[3] = {mid, nextafterf(mid, 0.0f), nextafterf(mid, INFINITY)};
        for (int p = 0; p < 3; p++)
            for (int sg = 0; sg < 2; sg++) {
                float x = sg ? -probes[p] : probes[p];
                assert_int_equal(cpu_f32_to_e2m1(x), ref_to_e2m1(x));
            }
    }
    rng_seed(12);
    for (int i = 0; i < 5000; i++) {
        float x = rng_f(-8, 8);
        if (cpu_f32_to_e2m1(x) != ref_to_e2m1(x))
            fail_msg("e2m1(%a): got %d want %d", (double)x, cpu_f32_to_e2m1(x), ref_to_e2m1(x));
    }
}

static void test_bf16(void **state)
{
    (void)state;
    assert_true(cpu_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(cpu_bf16_to_f32(0xc000) == -2.0f);
    assert_true(cpu_bf16_to_f32(0x3fc0) == 1.5f);
    assert_true(isinf(cpu_bf16_to_f32(0x7f80)));
    assert_int_equal(cpu_f32_to_bf16(1.0f), 0x3f80);
    assert_int_equal(cpu_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);       /* tie -> even (1.0) */
    assert_int_equal(cpu_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);   /* tie -> even (1+2^-6) */
    assert_int_equal(cpu_f32_to_bf16(1.0f + 0x1.2p-8f), 0x3f81);     /* above tie -> up */
    assert_int_equal(cpu_f32_to_bf16(-(1.0f + 0x1p-8f)), 0xbf80);
    assert_true(isnan(cpu_bf16_to_f32(cpu_f32_to_bf16(NAN))));
    const uint32_t nan_bits[3] = {0x7f800001u, 0xff800001u, 0x7fffffffu}; /* NaN, not inf */
    for (int i = 0; i < 3; i++) {
        float f;
        memcpy(&f, &nan_bits[i], sizeof f);
        assert_true(isnan(cpu_bf16_to_f32(cpu_f32_to_bf16(f))));
    }
    assert_int_equal(cpu_f32_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(cpu_f32_to_bf16(-INFINITY), 0xff80);
    for (int h = 0; h < 65536; h++) { /* decode every pattern */
        double want = ref_bf16((uint16_t)h);
        float got = cpu_bf16_to_f32((uint16_t)h);
        if (isnan(want))
            assert_true(isnan(got));
        else if ((double)got != want)
            fail_msg("bf16 0x%04x: got %a want %a", h, (double)got, want);
    }
    rng_seed(13);
    for (int i = 0; i < 50000; i++) {
        float f = (float)ldexp(1.0 + rng_unit(), rng_int(200) - 100);
        if (i % 3 == 0) { /* exact tie: only bit 15 of the low half set */
            uint32_t u;
            memcpy(&u, &f, sizeof u);
            u = (u & 0xffff0000u) | 0x8000u;
            memcpy(&f, &u, sizeof u);
        }
        if (rng_u64() & 1)
            f = -f;
        if (cpu_f32_to_bf16(f) != ref_to_bf16(f))
            fail_msg("bf16(%a): got 0x%04x want 0x%04x", (double)f, cpu_f32_to_bf16(f),
                     ref_to_bf16(f));
    }
}

static void test_pow2_scale(void **state)
{
    (void)state;
    assert_true(cpu_pow2_scale(448.0f, 448.0f) == 1.0f);
    assert_true(cpu_pow2_scale(449.0f, 448.0f) == 2.0f);
    assert_true(cpu_pow2_scale(224.0f, 448.0f) == 0.5f);
    assert_true(cpu_pow2_scale(225.0f, 448.0f) == 1.0f);
    assert_true(cpu_pow2_scale(6.0f, 6.0f) == 1.0f);
    assert_true(cpu_pow2_scale(12.0f, 6.0f) == 2.0f);
    assert_true(cpu_pow2_scale(12.5f, 6.0f) == 4.0f);
    assert_true(cpu_pow2_scale(1e-4f, 448.0f) == 0x1p-22f);
    for (int k = -30; k <= 30; k++) { /* exact at 448*2^k, the next float up doubles */
        float a = ldexpf(448.0f, k);
        assert_true(cpu_pow2_scale(a, 448.0f) == ldexpf(1.0f, k));
        assert_true(cpu_pow2_scale(nextafterf(a, INFINITY), 448.0f) == ldexpf(1.0f, k + 1));
        assert_true(cpu_pow2_scale(nextafterf(a, 0.0f), 448.0f) == ldexpf(1.0f, k));
    }
    rng_seed(14);
    for (int i = 0; i < 10000; i++) {
        float a = (float)ldexp(1.0 + rng_unit(), rng_int(60) - 30);
        float q = (i & 1) ? 448.0f : 6.0f;
        double want = ref_pow2_ceil((double)(a / q));
        if ((double)cpu_pow2_scale(a, q) != want)
            fail_msg("pow2_scale(%a, %g): got %a want %a", (double)a, (double)q,
                     (double)cpu_pow2_scale(a, q), want);
    }
}

static void test_fp8_roundtrip(void **state)
{
    (void)state;
    /* hand-computed: block 4, n = 10 (partial last block of 2) */
    float x[10] = {1000.0f, 1.0f, -3.3f, 0.0f, /* amax 1000 -> s = 4 */
                   1e-6f, 1e-9f, -3e-9f, 0.0f, /* amax floor 1e-4 -> s = 2^-22 (subnormals) */
                   0.75f, -0.1f};              /* amax 0.75 -> s = 2^-9 */
    const float want[10] = {1024.0f, 1.0f, -3.25f, 0.0f, 0x1p-20f, 0x1p-30f, -6 * 0x1p-31f, 0.0f,
                            0.75f, -52 * 0x1p-9f};
    cpu_fp8_roundtrip(x, 10, 4);
    for (int i = 0; i < 10; i++)
        check_bits("fp8_roundtrip(hand)", i, x[i], want[i]);

    /* random blocks of varied magnitudes vs the reference */
    rng_seed(15);
    enum { N = 200 };
    float *y = xmalloc(sizeof(float) * N), *ref = xmalloc(sizeof(float) * N);
    for (int trial = 0; trial < 20; trial++) {
        int block = trial % 2 ? 64 : 32;
        for (int i = 0; i < N; i++)
            y[i] = rng_f(-1, 1) * ldexpf(1.0f, (i / block) * 3 - 12 + trial % 5);
        if (trial == 3)
            y[7] = 1e30f; /* huge outlier */
        ref_fp8_roundtrip(y, N, block, ref);
        cpu_fp8_roundtrip(y, N, block);
        for (int i = 0; i < N; i++)
            check_bits("fp8_roundtrip", i, y[i], ref[i]);
    }
    /* cpu_act_quant_fp8: per row, per 128 columns (partial last block 44) */
    enum { T = 3, C = 300 };
    float *a = xmalloc(sizeof(float) * T * C), *aref = xmalloc(sizeof(float) * T * C);
    for (int i = 0; i < T * C; i++)
        a[i] = rng_f(-1, 1) * ldexpf(1.0f, (i / 128) % 7 - 3);
    for (int t = 0; t < T; t++)
        ref_fp8_roundtrip(a + t * C, C, 128, aref + t * C);
    cpu_act_quant_fp8(a, T, C);
    for (int i = 0; i < T * C; i++)
        check_bits("act_quant_fp8", i, a[i], aref[i]);
    free(y);
    free(ref);
    free(a);
    free(aref);
}

static void test_fp4_roundtrip(void **state)
{
    (void)state;
    /* hand-computed: block 4, n = 14 */
    float x[14] = {6.0f, 1.25f, -0.7f, 2.5f, /* s = 1: tie 1.25 -> 1, 2.5 -> 2 */
                   12.0f, 5.0f, -2.9f, 0.1f, /* s = 2: 2.5 -> 2, -1.45 -> -1.5, 0.05 -> 0 */
                   1e-6f, -3e-7f, 0.0f, 0.0f, /* s = 2^-22 (below the fp8 floor): 4.19 -> 4, 1.26 -> 1.5 */
                   0.3f, 0.1f};              /* s = 1/16: 4.8 -> 4, 1.6 -> 1.5 */
    const float want[14] = {6.0f, 1.0f, -0.5f, 2.0f, 12.0f, 4.0f, -3.0f, 0.0f,
                            0x1p-20f, -0x1.8p-22f, 0.0f, 0.0f, 0.25f, 0.09375f};
    cpu_fp4_roundtrip(x, 14, 4);
    for (int i = 0; i < 14; i++)
        check_bits("fp4_roundtrip(hand)", i, x[i], want[i]);

    rng_seed(16);
    enum { N = 160 };
    float *y = xmalloc(sizeof(float) * N), *ref = xmalloc(sizeof(float) * N);
    for (int trial = 0; trial < 20; trial++) {
        for (int i = 0; i < N; i++)
            y[i] = rng_f(-1, 1) * ldexpf(1.0f, (i / 32) * 2 - 5 + trial % 3 - (trial % 4 == 3) * 40);
        if (trial == 1)
            for (int i = 32; i < 64; i++)
                y[i] = 0.0f; /* all-zero block: scale from the amax floor */
        ref_fp4_roundtrip(y, N, 32, ref);
        cpu_fp4_roundtrip(y, N, 32);
        for (int i = 0; i < N; i++)
            check_bits("fp4_roundtrip", i, y[i], ref[i]);
    }
    free(y);
    free(ref);
}

static int popcount(unsigned v)
{
    int c = 0;
    for (; v; v &= v - 1)
        c++;
    return c;
}

static void test_hadamard(void **state)
{
    (void)state;
    float x1[1] = {3.5f};
    cpu_hadamard(x1, 1);
    assert_true(x1[0] == 3.5f);
    float x2[2] = {3.0f, 1.0f};
    cpu_hadamard(x2, 2);
    check_close("h2", 0, x2[0], 4.0 / sqrt(2.0), 1e-6, 0);
    check_close("h2", 1, x2[1], 2.0 / sqrt(2.0), 1e-6, 0);
    /* n = 4, Sylvester order: rows ++++, +-+-, ++--, +--+ (halved) */
    float x4[4] = {1.0f, 2.0f, 4.0f, 8.0f};
    const float want4[4] = {7.5f, -2.5f, -4.5f, 1.5f};
    cpu_hadamard(x4, 4);
    for (int i = 0; i < 4; i++)
        check_close("h4", i, x4[i], want4[i], 1e-6, 0);

    /* n = 128 vs the explicit matrix H_ij = (-1)^popcount(i&j) / sqrt(n); H.H = I; norm kept */
    enum { N = 128 };
    rng_seed(17);
    float x[N], y[N];
    for (int trial = 0; trial < 4; trial++) {
        rng_fill(x, N, -2, 2);
        memcpy(y, x, sizeof x);
        cpu_hadamard(y, N);
        double n0 = 0, n1 = 0;
        for (int i = 0; i < N; i++) {
            double acc = 0;
            for (int j = 0; j < N; j++)
                acc += (popcount((unsigned)(i & j)) & 1 ? -1.0 : 1.0) * x[j];
            acc /= sqrt((double)N);
            check_close("hadamard128", i, y[i], acc, 2e-5, 1e-5);
            n0 += (double)x[i] * x[i];
            n1 += (double)y[i] * y[i];
        }
        check_close("hadamard norm", trial, sqrt(n1), sqrt(n0), 0, 1e-5);
        cpu_hadamard(y, N);
        for (int i = 0; i < N; i++)
            check_close("hadamard involution", i, y[i], x[i], 2e-6, 1e-5);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 2. weight matrices and linear                                                              */
/* ------------------------------------------------------------------------------------------ */

/* qmat_row / qmat_at bitwise vs W (rows*cols, the exact dequantised values); cpu_linear with
 * T = 5 bitwise equal to T = 1 row by row and within 1e-5 * sum|w*x| of the double reference. */
static void check_qmat(const char *what, const struct cpu_qmat *m, const float *W)
{
    const int R = m->rows, C = m->cols, T = 5;
    float *row = xmalloc(sizeof(float) * (size_t)C);
    for (int r = 0; r < R; r++) {
        poison(row, (size_t)C);
        cpu_qmat_row(m, r, row);
        for (int c = 0; c < C; c++) {
            if (memcmp(&row[c], &W[(size_t)r * C + c], sizeof(float)) != 0)
                fail_msg("%s qmat_row(%d)[%d]: got %a want %a", what, r, c, (double)row[c],
                         (double)W[(size_t)r * C + c]);
            float at = cpu_qmat_at(m, r, c);
            if (memcmp(&at, &W[(size_t)r * C + c], sizeof(float)) != 0)
                fail_msg("%s qmat_at(%d,%d): got %a want %a", what, r, c, (double)at,
                         (double)W[(size_t)r * C + c]);
        }
    }
    float *x = xmalloc(sizeof(float) * (size_t)T * C);
    float *y = xmalloc(sizeof(float) * (size_t)T * R), *y1 = xmalloc(sizeof(float) * (size_t)R);
    rng_fill(x, (size_t)T * C, -1, 1);
    poison(y, (size_t)T * R);
    cpu_linear(m, x, T, y);
    for (int t = 0; t < T; t++) {
        poison(y1, (size_t)R);
        cpu_linear(m, x + (size_t)t * C, 1, y1);
        for (int r = 0; r < R; r++) {
            if (memcmp(&y1[r], &y[(size_t)t * R + r], sizeof(float)) != 0)
                fail_msg("%s linear T=1 vs T=5 (t %d, r %d): %a vs %a", what, t, r, (double)y1[r],
                         (double)y[(size_t)t * R + r]);
            double acc = 0, mag = 0;
            for (int c = 0; c < C; c++) {
                double p = (double)W[(size_t)r * C + c] * x[(size_t)t * C + c];
                acc += p;
                mag += fabs(p);
            }
            double err = fabs(y[(size_t)t * R + r] - acc);
            if (!(err <= 1e-5 * mag))
                fail_msg("%s linear (t %d, r %d): got %.9g want %.9g (err %.3g, sum|wx| %.3g)",
                         what, t, r, (double)y[(size_t)t * R + r], acc, err, mag);
        }
    }
    free(row);
    free(x);
    free(y);
    free(y1);
}

static void test_qmat_f32_bf16(void **state)
{
    (void)state;
    rng_seed(21);
    enum { R1 = 33, C1 = 70 };
    float *w = xmalloc(sizeof(float) * R1 * C1);
    rng_fill(w, R1 * C1, -1, 1);
    struct cpu_qmat m = {CPU_W_F32, R1, C1, w, NULL, 0, 0};
    check_qmat("f32", &m, w);
    free(w);

    enum { R2 = 40, C2 = 96 };
    uint16_t *h = xmalloc(sizeof(uint16_t) * R2 * C2);
    float *W = xmalloc(sizeof(float) * R2 * C2);
    for (int i = 0; i < R2 * C2; i++) {
        int s = rng_int(2), e = 120 + rng_int(15), mant = rng_int(128);
        h[i] = (uint16_t)(s << 15 | e << 7 | mant);
        W[i] = (float)((s ? -1 : 1) * ldexp(1.0 + mant / 128.0, e - 127));
    }
    struct cpu_qmat mb = {CPU_W_BF16, R2, C2, h, NULL, 0, 0};
    check_qmat("bf16", &mb, W);
    free(h);
    free(W);
}

static void test_qmat_fp8(void **state)
{
    (void)state;
    rng_seed(22);
    /* 200 x 192: 2 x 2 scale blocks, the last row block 72 rows, the last column block 64 */
    enum { R = 200, C = 192, RB = 2, CB = 2 };
    uint8_t *q = xmalloc((size_t)R * C);
    float *W = xmalloc(sizeof(float) * R * C);
    for (int i = 0; i < R * C; i++) {
        uint8_t b;
        do
            b = (uint8_t)rng_u64();
        while ((b & 0x7f) == 0x7f);
        q[i] = b;
    }
    const uint8_t s8[RB * CB] = {125, 128, 131, 122};
    const float s32[RB * CB] = {0.3712f, 1.9031f, 0.0075f, 12.5f};
    for (int pass = 0; pass < 2; pass++) {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) {
                int sb = (r / 128) * CB + c / 128;
                double s = pass ? (double)s32[sb] : ldexp(1.0, s8[sb] - 127);
                W[r * C + c] = (float)(ref_e4m3(q[r * C + c]) * s);
            }
        struct cpu_qmat m = {CPU_W_FP8, R, C, q, pass ? (const void *)s32 : (const void *)s8, pass, 0};
        check_qmat(pass ? "fp8/f32-scale" : "fp8/e8m0-scale", &m, W);
    }
    /* a single partial block: 5 x 40 */
    enum { R2 = 5, C2 = 40 };
    const uint8_t s1[1] = {129};
    for (int r = 0; r < R2; r++)
        for (int c = 0; c < C2; c++)
            W[r * C2 + c] = (float)(ref_e4m3(q[r * C2 + c]) * 4.0);
    struct cpu_qmat m2 = {CPU_W_FP8, R2, C2, q, s1, 0, 0};
    check_qmat("fp8/small", &m2, W);
    free(q);
    free(W);
}

static void test_qmat_mxfp4(void **state)
{
    (void)state;
    rng_seed(23);
    enum { R = 24, C = 96 };
    uint8_t *q = xmalloc((size_t)R * C / 2), *sc = xmalloc((size_t)R * C / 32);
    float *W = xmalloc(sizeof(float) * R * C);
    for (int i = 0; i < R * C / 2; i++)
        q[i] = (uint8_t)rng_u64();
    for (int i = 0; i < R * C / 32; i++)
        sc[i] = (uint8_t)(120 + rng_int(15));
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            uint8_t byte = q[r * (C / 2) + c / 2];
            int code = c % 2 == 0 ? byte & 15 : byte >> 4; /* low nibble = even element */
            W[r * C + c] = (float)(E2M1[code] * ldexp(1.0, sc[r * (C / 32) + c / 32] - 127));
        }
    struct cpu_qmat m = {CPU_W_MXFP4, R, C, q, sc, 0, 0};
    check_qmat("mxfp4", &m, W);
    /* a hand-checked element: byte 0x9b = low 0xb (-1.5), high 0x9 (-0.5); scale 2^2 */
    q[0] = 0x9b;
    sc[0] = 129;
    assert_true(cpu_qmat_at(&m, 0, 0) == -6.0f);
    assert_true(cpu_qmat_at(&m, 0, 1) == -2.0f);
    free(q);
    free(sc);
    free(W);
}

/* ------------------------------------------------------------------------------------------ */
/* 3. rmsnorm                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void test_rmsnorm(void **state)
{
    (void)state;
    rng_seed(31);
    enum { N = 100 };
    float x[N], w[N], out[N];
    for (int trial = 0; trial < 6; trial++) {
        double mag = trial % 3 == 0 ? 1e-3 : trial % 3 == 1 ? 1.0 : 50.0; /* eps matters at 1e-3 */
        rng_fill(x, N, -mag, mag);
        rng_fill(w, N, -2, 2);
        const float eps = 1e-6f;
        double ss = 0;
        for (int i = 0; i < N; i++)
            ss += (double)x[i] * x[i];
        double r = 1.0 / sqrt(ss / N + eps);
        int weighted = trial & 1;
        poison(out, N);
        cpu_rmsnorm(x, weighted ? w : NULL, N, eps, out);
        for (int i = 0; i < N; i++)
            check_close("rmsnorm", i, out[i], (weighted ? w[i] : 1.0) * x[i] * r, 1e-6, 2e-6);
        /* in place */
        float y[N];
        memcpy(y, x, sizeof y);
        cpu_rmsnorm(y, weighted ? w : NULL, N, eps, y);
        for (int i = 0; i < N; i++)
            check_close("rmsnorm in place", i, y[i], (weighted ? w[i] : 1.0) * x[i] * r, 1e-6,
                        2e-6);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 4. RoPE / YaRN                                                                             */
/* ------------------------------------------------------------------------------------------ */

static void test_rope_inv_freq(void **state)
{
    (void)state;
    float f[32];
    poison(f, 32);
    cpu_rope_inv_freq(64, 10000.0, 0, 16.0, 65536, 32.0, 1.0, f);
    for (int i = 0; i < 32; i++)
        check_close("inv_freq(10000)", i, f[i], pow(10000.0, -2.0 * i / 64), 0, 1e-6);

    /* YaRN, base 160000: corr(n) = 64 ln(65536/(2 pi n)) / (2 ln base) */
    const double base = 160000.0;
    double clo = 64 * log(65536 / (32 * 2 * M_PI)) / (2 * log(base));
    double chi = 64 * log(65536 / (1 * 2 * M_PI)) / (2 * log(base));
    double lo = fmax(floor(clo), 0), hi = fmin(ceil(chi), 63);
    assert_true(lo == 15.0 && hi == 25.0); /* the spec's numbers */
    poison(f, 32);
    cpu_rope_inv_freq(64, base, 1, 16.0, 65536, 32.0, 1.0, f);
    for (int i = 0; i < 32; i++) {
        double theta = pow(base, -2.0 * i / 64);
        double ramp = fmin(fmax((i - lo) / (hi - lo), 0), 1), s = 1 - ramp;
        double want = theta / 16 * (1 - s) + theta * s;
        check_close("inv_freq(yarn)", i, f[i], want, 0, 1e-6);
        if (i <= 15)
            check_close("inv_freq(yarn) kept", i, f[i], theta, 0, 1e-6);
        if (i >= 25)
            check_close("inv_freq(yarn) /16", i, f[i], theta / 16, 0, 1e-6);
    }
    check_close("inv_freq(yarn) mid", 20, f[20], pow(base, -40.0 / 64) * (0.5 + 0.5 / 16), 0, 1e-6);
    /* the same call without yarn on base 160000 leaves all 32 unchanged */
    cpu_rope_inv_freq(64, base, 0, 16.0, 65536, 32.0, 1.0, f);
    for (int i = 0; i < 32; i++)
        check_close("inv_freq(160000)", i, f[i], pow(base, -2.0 * i / 64), 0, 1e-6);
}

static void test_rope(void **state)
{
    (void)state;
    enum { DIM = 64 };
    float inv[DIM / 2], x[DIM], y[DIM];
    for (int i = 0; i < DIM / 2; i++)
        inv[i] = (float)pow(10000.0, -2.0 * i / DIM);
    rng_seed(41);
    const long positions[] = {0, 1, 7, 1000, 65535, 1000003};
    for (size_t p = 0; p < sizeof positions / sizeof *positions; p++) {
        long pos = positions[p];
        rng_fill(x, DIM, -1, 1);
        for (int inverse = 0; inverse < 2; inverse++) {
            memcpy(y, x, sizeof x);
            cpu_rope(y, DIM, inv, pos, inverse);
            for (int i = 0; i < DIM / 2; i++) {
                double ang = (double)((float)pos * inv[i]); /* FP32 angle, as the reference */
                if (inverse)
                    ang = -ang;
                double a = x[2 * i], b = x[2 * i + 1];
                check_close("rope re", 2 * i, y[2 * i], a * cos(ang) - b * sin(ang), 2e-6, 0);
                check_close("rope im", 2 * i + 1, y[2 * i + 1], b * cos(ang) + a * sin(ang), 2e-6,
                            0);
            }
            if (pos == 0)
                for (int i = 0; i < DIM; i++)
                    check_bits("rope pos 0", i, y[i], x[i]);
            if (!inverse) { /* the inverse undoes it */
                cpu_rope(y, DIM, inv, pos, 1);
                for (int i = 0; i < DIM; i++)
                    check_close("rope inverse", i, y[i], x[i], 2e-6, 0);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 5. mHC                                                                                     */
/* ------------------------------------------------------------------------------------------ */

enum { HC_N = 4, HC_D = 16, HC_LEN = HC_N * HC_D, HC_MIX = (2 + HC_N) * HC_N };

/* §6.1 hc_pre in double */
static void ref_hc_pre(const float *X, const float *fn, const float *base, const float *scale,
                       int iters, double eps, double neps, double *u, double *post, double *M)
{
    const int n = HC_N, d = HC_D;
    double ss = 0, mu[HC_MIX], pre[HC_N];
    for (int i = 0; i < HC_LEN; i++)
        ss += (double)X[i] * X[i];
    double rho = 1.0 / sqrt(ss / HC_LEN + neps);
    for (int m = 0; m < HC_MIX; m++) {
        double acc = 0;
        for (int i = 0; i < HC_LEN; i++)
            acc += (double)fn[m * HC_LEN + i] * X[i];
        mu[m] = rho * acc;
    }
    for (int i = 0; i < n; i++) {
        pre[i] = ref_sigmoid(mu[i] * scale[0] + base[i]) + eps;
        post[i] = 2 * ref_sigmoid(mu[n + i] * scale[1] + base[n + i]);
    }
    for (int j = 0; j < n; j++) {
        double mx = -INFINITY, sum = 0;
        for (int k = 0; k < n; k++) {
            M[j * n + k] = mu[2 * n + j * n + k] * scale[2] + base[2 * n + j * n + k];
            mx = fmax(mx, M[j * n + k]);
        }
        for (int k = 0; k < n; k++)
            sum += (M[j * n + k] = exp(M[j * n + k] - mx));
        for (int k = 0; k < n; k++)
            M[j * n + k] = M[j * n + k] / sum + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int j = 0; j < n; j++) { /* rows */
                double s = 0;
                for (int k = 0; k < n; k++)
                    s += M[j * n + k];
                for (int k = 0; k < n; k++)
                    M[j * n + k] /= s + eps;
            }
        for (int k = 0; k < n; k++) { /* columns */
            double s = 0;
            for (int j = 0; j < n; j++)
                s += M[j * n + k];
            for (int j = 0; j < n; j++)
                M[j * n + k] /= s + eps;
        }
    }
    for (int c = 0; c < d; c++) {
        double acc = 0;
        for (int i = 0; i < n; i++)
            acc += pre[i] * X[i * d + c];
        u[c] = acc;
    }
}

static void test_hc_pre(void **state)
{
    (void)state;
    rng_seed(51);
    float X[HC_LEN], fn[HC_MIX * HC_LEN], base[HC_MIX], u[HC_D], post[HC_N], comb[HC_N * HC_N];
    /* scale2 3 gives a skewed comb (far from doubly stochastic before Sinkhorn, so the
     * iteration count and order show); scale2 1 a milder one that 20 iterations converge */
    const float scales[2][3] = {{0.8f, 1.3f, 3.0f}, {0.8f, 1.3f, 1.0f}};
    double ru[HC_D], rpost[HC_N], rM[HC_N * HC_N];
    const int iters_list[] = {1, 2, 3, 20};
    for (int trial = 0; trial < 8; trial++) {
        const float *scale = scales[trial % 2];
        /* trials 6, 7: large eps, so where each eps enters shows */
        const float eps = trial >= 6 ? 0.05f : 1e-6f, neps = trial >= 6 ? 0.5f : 1e-6f;
        rng_fill(X, HC_LEN, -2, 2);
        rng_fill(fn, HC_MIX * HC_LEN, -0.3, 0.3);
        rng_fill(base, HC_MIX, -1, 1);
        for (size_t t = 0; t < sizeof iters_list / sizeof *iters_list; t++) {
            int iters = iters_list[t];
            poison(u, HC_D);
            poison(post, HC_N);
            poison(comb, HC_N * HC_N);
            cpu_hc_pre(X, HC_N, HC_D, fn, base, scale, iters, eps, neps, u, post, comb);
            ref_hc_pre(X, fn, base, scale, iters, eps, neps, ru, rpost, rM);
            for (int c = 0; c < HC_D; c++)
                check_close("hc_pre u", c, u[c], ru[c], 1e-6, 1e-5);
            for (int i = 0; i < HC_N; i++)
                check_close("hc_pre post", i, post[i], rpost[i], 1e-6, 1e-6);
            for (int i = 0; i < HC_N * HC_N; i++)
                check_close("hc_pre comb", i, comb[i], rM[i], 2e-6, 2e-5);
            if (iters == 20 && trial % 2 && trial < 6) /* ~doubly stochastic */
                for (int a = 0; a < HC_N; a++) {
                    double rs = 0, cs = 0;
                    for (int b = 0; b < HC_N; b++) {
                        rs += comb[a * HC_N + b];
                        cs += comb[b * HC_N + a];
                    }
                    check_close("comb row sum", a, rs, 1.0, 1e-3, 0);
                    check_close("comb col sum", a, cs, 1.0, 1e-5, 0);
                }
        }
    }
}

static void test_hc_post(void **state)
{
    (void)state;
    rng_seed(52);
    enum { D = 8 };
    float f[D], R[HC_N * D], post[HC_N], comb[HC_N * HC_N], out[HC_N * D];
    rng_fill(f, D, -1, 1);
    rng_fill(R, HC_N * D, -1, 1);
    rng_fill(post, HC_N, 0, 2);
    rng_fill(comb, HC_N * HC_N, 0, 1); /* non-symmetric */
    poison(out, HC_N * D);
    cpu_hc_post(f, R, post, comb, HC_N, D, out);
    double maxdiff = 0;
    for (int k = 0; k < HC_N; k++)
        for (int c = 0; c < D; c++) {
            double want = (double)post[k] * f[c], wrong = want;
            for (int j = 0; j < HC_N; j++) {
                want += (double)comb[j * HC_N + k] * R[j * D + c]; /* comb[src j][dst k] */
                wrong += (double)comb[k * HC_N + j] * R[j * D + c];
            }
            check_close("hc_post", k * D + c, out[k * D + c], want, 1e-6, 1e-6);
            maxdiff = fmax(maxdiff, fabs(want - wrong));
        }
    assert_true(maxdiff > 0.1); /* the test tells comb from its transpose */
}

static void test_hc_head(void **state)
{
    (void)state;
    rng_seed(53);
    float X[HC_LEN], fn[HC_N * HC_LEN], base[HC_N], y[HC_D];
    const float scale[1] = {1.7f};
    for (int trial = 0; trial < 3; trial++) {
        const double eps = trial == 2 ? 0.05 : 1e-6, neps = trial == 2 ? 0.5 : 1e-6;
        rng_fill(X, HC_LEN, -3, 3);
        rng_fill(fn, HC_N * HC_LEN, -0.3, 0.3);
        rng_fill(base, HC_N, -1, 1);
        double ss = 0, pre[HC_N];
        for (int i = 0; i < HC_LEN; i++)
            ss += (double)X[i] * X[i];
        double rho = 1.0 / sqrt(ss / HC_LEN + neps);
        for (int i = 0; i < HC_N; i++) {
            double acc = 0;
            for (int j = 0; j < HC_LEN; j++)
                acc += (double)fn[i * HC_LEN + j] * X[j];
            pre[i] = ref_sigmoid(rho * acc * scale[0] + base[i]) + eps;
        }
        poison(y, HC_D);
        cpu_hc_head(X, HC_N, HC_D, fn, base, scale, (float)eps, (float)neps, y);
        for (int c = 0; c < HC_D; c++) {
            double want = 0;
            for (int i = 0; i < HC_N; i++)
                want += pre[i] * X[i * HC_D + c];
            check_close("hc_head", c, y[c], want, 1e-6, 1e-5);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 6. sink attention                                                                          */
/* ------------------------------------------------------------------------------------------ */

enum { AT_H = 3, AT_D = 16, AT_NK = 7 };

static void ref_sink_attention(const float *q, const float *const *keys, const float *sinks,
                               double scale, double *out)
{
    for (int h = 0; h < AT_H; h++) {
        double l[AT_NK], m = sinks[h];
        for (int j = 0; j < AT_NK; j++) {
            double acc = 0;
            for (int c = 0; c < AT_D; c++)
                acc += (double)q[h * AT_D + c] * keys[j][c];
            l[j] = scale * acc;
            m = fmax(m, l[j]);
        }
        double den = exp((double)sinks[h] - m);
        for (int c = 0; c < AT_D; c++)
            out[h * AT_D + c] = 0;
        for (int j = 0; j < AT_NK; j++) {
            double p = exp(l[j] - m);
            den += p;
            for (int c = 0; c < AT_D; c++)
                out[h * AT_D + c] += p * keys[j][c];
        }
        for (int c = 0; c < AT_D; c++)
            out[h * AT_D + c] /= den;
    }
}

static void test_sink_attention(void **state)
{
    (void)state;
    rng_seed(61);
    float q[AT_H * AT_D], kbuf[AT_NK * AT_D], out[AT_H * AT_D], work[AT_NK], sinks[AT_H];
    const float *keys[AT_NK];
    double ref[AT_H * AT_D];
    for (int j = 0; j < AT_NK; j++) /* pointers in a scrambled order */
        keys[j] = kbuf + (size_t)((j * 3) % AT_NK) * AT_D;
    for (int trial = 0; trial < 4; trial++) {
        rng_fill(q, AT_H * AT_D, -1, 1);
        rng_fill(kbuf, AT_NK * AT_D, -1, 1);
        rng_fill(sinks, AT_H, -2, 2);
        float scale = trial == 3 ? 40.0f : 0.25f; /* trial 3: logits ~ 100s (needs max shift) */
        poison(out, AT_H * AT_D);
        poison(work, AT_NK);
        cpu_sink_attention(q, AT_H, AT_D, keys, AT_NK, sinks, scale, out, work);
        ref_sink_attention(q, keys, sinks, scale, ref);
        for (int i = 0; i < AT_H * AT_D; i++)
            check_close("sink_attention", i, out[i], ref[i], 1e-5, 1e-4);
    }
    /* sink -inf: plain softmax; check against a softmax written without the sink */
    const float nosink[AT_H] = {-INFINITY, -INFINITY, -INFINITY};
    poison(out, AT_H * AT_D);
    cpu_sink_attention(q, AT_H, AT_D, keys, AT_NK, nosink, 0.25f, out, work);
    for (int h = 0; h < AT_H; h++) {
        double l[AT_NK], den = 0;
        for (int j = 0; j < AT_NK; j++) {
            double acc = 0;
            for (int c = 0; c < AT_D; c++)
                acc += (double)q[h * AT_D + c] * keys[j][c];
            den += (l[j] = exp(0.25 * acc));
        }
        for (int c = 0; c < AT_D; c++) {
            double want = 0;
            for (int j = 0; j < AT_NK; j++)
                want += l[j] / den * keys[j][c];
            check_close("attention(sink -inf)", h * AT_D + c, out[h * AT_D + c], want, 1e-6, 1e-5);
        }
    }
    /* huge sink: output ~0; a sink equal to ln(sum e^l) halves it */
    const float huge[AT_H] = {80.0f, 1e4f, 200.0f};
    poison(out, AT_H * AT_D);
    cpu_sink_attention(q, AT_H, AT_D, keys, AT_NK, huge, 0.25f, out, work);
    for (int i = 0; i < AT_H * AT_D; i++)
        if (!(fabsf(out[i]) < 1e-30f))
            fail_msg("attention(huge sink)[%d] = %g", i, (double)out[i]);
    float half[AT_H];
    float plain[AT_H * AT_D];
    cpu_sink_attention(q, AT_H, AT_D, keys, AT_NK, nosink, 0.25f, plain, work);
    for (int h = 0; h < AT_H; h++) {
        double den = 0;
        for (int j = 0; j < AT_NK; j++) {
            double acc = 0;
            for (int c = 0; c < AT_D; c++)
                acc += (double)q[h * AT_D + c] * keys[j][c];
            den += exp(0.25 * acc);
        }
        half[h] = (float)log(den);
    }
    poison(out, AT_H * AT_D);
    cpu_sink_attention(q, AT_H, AT_D, keys, AT_NK, half, 0.25f, out, work);
    for (int i = 0; i < AT_H * AT_D; i++)
        check_close("attention(sink = lse)", i, out[i], 0.5 * plain[i], 1e-6, 1e-5);
}

/* ------------------------------------------------------------------------------------------ */
/* 7. compressor                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* pooled[c] = sum_t softmax_t(z[t][col]) * a[t][col] over candidates (t, col) */
static double ref_pool(int ncand, const float *const *za, const float *const *aa)
{
    double mx = -INFINITY, den = 0, num = 0;
    for (int i = 0; i < ncand; i++)
        mx = fmax(mx, *za[i]);
    for (int i = 0; i < ncand; i++) {
        double p = exp(*za[i] - mx);
        den += p;
        num += p * *aa[i];
    }
    return num / den;
}

static void run_hca(int ratio, int D, int npos)
{
    const int cols = D, rows = ratio;
    float *kv = xmalloc(sizeof(float) * (size_t)rows * cols);
    float *sc = xmalloc(sizeof(float) * (size_t)rows * cols);
    float *A = xmalloc(sizeof(float) * (size_t)npos * cols), *Z = xmalloc(sizeof(float) *
                                                                            (size_t)npos * cols);
    float *pooled = xmalloc(sizeof(float) * (size_t)D);
    const float *za[64], *aa[64];
    poison(kv, (size_t)rows * cols);
    poison(sc, (size_t)rows * cols);
    cpu_compressor_reset(kv, sc, ratio, D, 0);
    rng_fill(A, (size_t)npos * cols, -1, 1);
    rng_fill(Z, (size_t)npos * cols, -3, 3);
    int entries = 0;
    for (long pos = 0; pos < npos; pos++) {
        poison(pooled, (size_t)D);
        int r = cpu_compressor_push(kv, sc, ratio, D, 0, pos, A + pos * cols, Z + pos * cols,
                                    pooled);
        assert_int_equal(r, (pos + 1) % ratio == 0);
        if (!r)
            continue;
        entries++;
        for (int c = 0; c < D; c++) {
            for (int t = 0; t < ratio; t++) {
                long tp = pos + 1 - ratio + t;
                za[t] = Z + tp * cols + c;
                aa[t] = A + tp * cols + c;
            }
            check_close("hca pooled", c, pooled[c], ref_pool(ratio, za, aa), 1e-6, 1e-5);
        }
    }
    assert_int_equal(entries, npos / ratio);
    free(kv);
    free(sc);
    free(A);
    free(Z);
    free(pooled);
}

static void test_compressor_hca(void **state)
{
    (void)state;
    rng_seed(71);
    run_hca(4, 3, 14);
    run_hca(3, 5, 10);
    run_hca(16, 2, 40);
}

static void test_compressor_csa(void **state)
{
    (void)state;
    rng_seed(72);
    enum { RATIO = 4, D = 3, COLS = 2 * D, ROWS = 2 * RATIO, NPOS = 18 };
    float kv[ROWS * COLS + 4], sc[ROWS * COLS + 4], A[NPOS * COLS], Z[NPOS * COLS], pooled[D];
    const float *za[2 * RATIO], *aa[2 * RATIO];
    /* reset: kv 0, score -inf over the whole (2 ratio, 2 D) state, nothing beyond */
    poison(kv, ROWS * COLS + 4);
    poison(sc, ROWS * COLS + 4);
    cpu_compressor_reset(kv, sc, RATIO, D, 1);
    for (int i = 0; i < ROWS * COLS; i++) {
        assert_true(kv[i] == 0.0f);
        assert_true(isinf(sc[i]) && sc[i] < 0);
    }
    for (int i = ROWS * COLS; i < ROWS * COLS + 4; i++)
        assert_true(isnan(kv[i]) && isnan(sc[i]));
    for (int seq = 0; seq < 2; seq++) {
        int npos = seq ? 6 : NPOS;
        rng_fill(A, NPOS * COLS, -1, 1);
        rng_fill(Z, NPOS * COLS, -3, 3);
        if (seq) /* after a reset, the previous sequence's state must not leak in */
            cpu_compressor_reset(kv, sc, RATIO, D, 1);
        for (long pos = 0; pos < npos; pos++) {
            poison(pooled, D);
            int r = cpu_compressor_push(kv, sc, RATIO, D, 1, pos, A + pos * COLS, Z + pos * COLS,
                                        pooled);
            assert_int_equal(r, (pos + 1) % RATIO == 0);
            if (!r)
                continue;
            long blk = pos / RATIO;
            for (int c = 0; c < D; c++) {
                int n = 0;
                if (blk > 0)
                    for (int t = 0; t < RATIO; t++) { /* previous block, first half */
                        long tp = (blk - 1) * RATIO + t;
                        za[n] = Z + tp * COLS + c;
                        aa[n++] = A + tp * COLS + c;
                    }
                for (int t = 0; t < RATIO; t++) { /* current block, second half */
                    long tp = blk * RATIO + t;
                    za[n] = Z + tp * COLS + D + c;
                    aa[n++] = A + tp * COLS + D + c;
                }
                assert_int_equal(n, blk > 0 ? 8 : 4);
                check_close("csa pooled", (int)blk * D + c, pooled[c], ref_pool(n, za, aa), 1e-6,
                            1e-5);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 8. indexer                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void test_indexer_scores(void **state)
{
    (void)state;
    rng_seed(81);
    enum { HI = 4, DI = 8, N = 20 };
    float q[HI * DI], w[HI], keys[N * DI], scores[N];
    const float scale = 0.3f;
    int npos = 0, nneg = 0;
    for (int trial = 0; trial < 3; trial++) {
        rng_fill(q, HI * DI, -1, 1);
        rng_fill(w, HI, -1, 1); /* negative weights too: relu is on the dot, not the product */
        w[0] = -fabsf(w[0]);
        w[1] = fabsf(w[1]);
        rng_fill(keys, N * DI, -1, 1);
        poison(scores, N);
        cpu_indexer_scores(q, w, HI, DI, keys, N, scale, scores);
        for (int s = 0; s < N; s++) {
            double want = 0;
            for (int h = 0; h < HI; h++) {
                double dot = 0;
                for (int c = 0; c < DI; c++)
                    dot += (double)q[h * DI + c] * keys[s * DI + c];
                want += w[h] * fmax(dot, 0.0) * scale;
                npos += dot > 0;
                nneg += dot < 0;
            }
            check_close("indexer_scores", s, scores[s], want, 1e-6, 1e-5);
        }
    }
    assert_true(npos > 20 && nneg > 20); /* both sides of the relu exercised */
}

/* reference top-k: k passes of "largest unselected, lowest index on ties" */
static void ref_topk(const float *s, int n, int k, int *out)
{
    char *sel = calloc((size_t)n, 1);
    assert_non_null(sel);
    for (int j = 0; j < k && j < n; j++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!sel[i] && (best < 0 || s[i] > s[best]))
                best = i;
        sel[best] = 1;
    }
    int m = 0;
    for (int i = 0; i < n; i++)
        if (sel[i])
            out[m++] = i;
    free(sel);
}

static void check_topk(const float *s, int n, int k)
{
    int m = k < n ? k : n;
    int *got = xmalloc(sizeof(int) * (size_t)(k > n ? k : n) + sizeof(int));
    int *want = xmalloc(sizeof(int) * (size_t)n + sizeof(int));
    for (int i = 0; i < (k > n ? k : n); i++)
        got[i] = -7;
    cpu_topk(s, n, k, got);
    ref_topk(s, n, k, want);
    for (int i = 0; i < m; i++)
        if (got[i] != want[i])
            fail_msg("topk(n %d, k %d)[%d]: got %d want %d", n, k, i, got[i], want[i]);
    free(got);
    free(want);
}

static void test_topk(void **state)
{
    (void)state;
    rng_seed(82);
    /* hand case: ties prefer the lower index; output ascending */
    const float s[8] = {1, 5, 3, 5, 5, -1, 3, 0};
    int out[8];
    cpu_topk(s, 8, 3, out);
    assert_int_equal(out[0], 1);
    assert_int_equal(out[1], 3);
    assert_int_equal(out[2], 4);
    cpu_topk(s, 8, 4, out);
    assert_int_equal(out[0], 1);
    assert_int_equal(out[1], 2);
    assert_int_equal(out[2], 3);
    assert_int_equal(out[3], 4);
    cpu_topk(s, 8, 1, out);
    assert_int_equal(out[0], 1);
    const float z[6] = {0, 0, 0, 0, 0, 0};
    cpu_topk(z, 6, 2, out);
    assert_int_equal(out[0], 0);
    assert_int_equal(out[1], 1);
    /* k >= n: all, ascending */
    for (int k = 8; k <= 9; k++) {
        for (int i = 0; i < 8; i++)
            out[i] = -1;
        cpu_topk(s, 8, k, out);
        for (int i = 0; i < 8; i++)
            assert_int_equal(out[i], i);
    }
    /* random, continuous and heavily tied, with -inf */
    float *sc = xmalloc(sizeof(float) * 600);
    for (int trial = 0; trial < 400; trial++) {
        int n = 1 + rng_int(trial < 200 ? 40 : 600);
        int k = 1 + rng_int(n);
        int mode = trial % 3;
        for (int i = 0; i < n; i++)
            sc[i] = mode == 0 ? rng_f(-1, 1) : mode == 1 ? (float)rng_int(3) : (float)-rng_int(2);
        if (trial % 7 == 0)
            sc[rng_int(n)] = -INFINITY;
        check_topk(sc, n, k);
        if (trial % 10 == 0) {
            check_topk(sc, n, 1);
            check_topk(sc, n, n);
        }
    }
    free(sc);
}

/* ------------------------------------------------------------------------------------------ */
/* 9. MoE                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static double ref_sqrt_softplus(double x)
{
    return sqrt(x > 20 ? x : log1p(exp(x)));
}

static void test_sqrt_softplus(void **state)
{
    (void)state;
    const float xs[] = {-30, -5, -0.5f, 0, 0.7f, 3, 19.9f, 20, 20.5f, 25, 89, 100, 1000, 1e30f};
    for (size_t i = 0; i < sizeof xs / sizeof *xs; i++)
        check_close("sqrt_softplus", (int)i, cpu_sqrt_softplus(xs[i]), ref_sqrt_softplus(xs[i]), 0,
                    1e-6);
    check_close("sqrt_softplus(0)", 0, cpu_sqrt_softplus(0), sqrt(log(2.0)), 0, 1e-6);
    assert_true(cpu_sqrt_softplus(100.0f) == 10.0f);
}

/* idx (K) must be a permutation of want (K) with w[i] = s[idx]/sum s * route_scale */
static void check_route(const float *logits, int K, const int *want, const int *idx,
                        const float *w, double route_scale)
{
    double sum = 0, wsum = 0;
    for (int j = 0; j < K; j++)
        sum += ref_sqrt_softplus(logits[want[j]]);
    char used[64] = {0};
    for (int j = 0; j < K; j++) {
        int found = -1;
        for (int i = 0; i < K; i++)
            if (idx[i] == want[j] && !used[i]) {
                found = i;
                break;
            }
        if (found < 0)
            fail_msg("route: expert %d not selected", want[j]);
        used[found] = 1;
        check_close("route w", j, w[found], ref_sqrt_softplus(logits[want[j]]) / sum * route_scale,
                    0, 2e-6);
        wsum += w[found];
    }
    check_close("route w sum", 0, wsum, route_scale, 0, 1e-5);
}

static void test_route(void **state)
{
    (void)state;
    /* dense, hand case: the bias removes expert 2 and adds expert 7 */
    const float logits[8] = {2.0f, -1.0f, 3.0f, 0.5f, -2.0f, 1.0f, 4.0f, 0.0f};
    const float bias[8] = {0, 0, -5.0f, 0, 0, 0, 0, 3.0f};
    int idx[8];
    float w[8];
    for (int i = 0; i < 8; i++)
        idx[i] = -1;
    poison(w, 8);
    cpu_route(logits, 8, 3, bias, NULL, 1.5f, idx, w);
    const int want[3] = {7, 6, 0};
    check_route(logits, 3, want, idx, w, 1.5);
    /* and with a zero bias: the plain top-3 {6, 2, 0} */
    const float zero[8] = {0};
    const int want0[3] = {6, 2, 0};
    poison(w, 8);
    cpu_route(logits, 8, 3, zero, NULL, 1.5f, idx, w);
    check_route(logits, 3, want0, idx, w, 1.5);

    /* dense, equal s + bias: ties go to the lower expert id (moe.c's rule) */
    const float flat[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    const int wantt[3] = {0, 1, 2};
    poison(w, 8);
    cpu_route(flat, 8, 3, zero, NULL, 1.0f, idx, w);
    check_route(flat, 3, wantt, idx, w, 1.0);

    /* dense, random: E 64, K 6 vs a double top-K of s + bias */
    rng_seed(91);
    enum { E = 64, K = 6 };
    float lg[E], b[E];
    int id[K], wantr[K];
    float wr[K];
    for (int trial = 0; trial < 50; trial++) {
        rng_fill(lg, E, -4, 4);
        rng_fill(b, E, -0.5, 0.5);
        double v[E];
        char sel[E] = {0};
        for (int e = 0; e < E; e++)
            v[e] = ref_sqrt_softplus(lg[e]) + b[e];
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (!sel[e] && (best < 0 || v[e] > v[best]))
                    best = e;
            sel[best] = 1;
            wantr[j] = best;
        }
        poison(wr, K);
        cpu_route(lg, E, K, b, NULL, 2.5f, id, wr);
        check_route(lg, K, wantr, id, wr, 2.5);
    }

    /* hash: ids in the given order, duplicates allowed, weights from s (bias unused) */
    const int64_t hash[4] = {5, 2, 5, 0};
    const int wanth[4] = {5, 2, 5, 0};
    poison(w, 8);
    for (int i = 0; i < 8; i++)
        idx[i] = -1;
    cpu_route(logits, 8, 4, NULL, hash, 1.5f, idx, w);
    for (int j = 0; j < 4; j++)
        assert_int_equal(idx[j], wanth[j]);
    double sum = 0;
    for (int j = 0; j < 4; j++)
        sum += ref_sqrt_softplus(logits[wanth[j]]);
    for (int j = 0; j < 4; j++)
        check_close("hash route w", j, w[j], ref_sqrt_softplus(logits[wanth[j]]) / sum * 1.5, 0,
                    2e-6);
}

static void test_swiglu_clamp(void **state)
{
    (void)state;
    enum { N = 12 };
    const float g[N] = {-15, -10.5f, -3, 0, 2, 9.9f, 10, 15, 50, 0.3f, -0.7f, 12};
    const float u[N] = {10, -20, -3, 5, 10.5f, 30, -10, -12, 0.5f, -9.9f, 2, -100};
    const float L = 10.0f, wt = 0.7f;
    float h[N], g2[N];
    for (int pass = 0; pass < 2; pass++) {
        poison(h, N);
        memcpy(g2, g, sizeof g);
        float *dst = pass ? g2 : h; /* pass 1: h aliases g */
        cpu_swiglu_clamp(pass ? g2 : g, u, N, L, wt, dst);
        for (int i = 0; i < N; i++) {
            double gi = fmin(g[i], L), ui = fmin(fmax(u[i], -L), L);
            double want = wt * gi * ref_sigmoid(gi) * ui;
            check_close(pass ? "swiglu_clamp(alias)" : "swiglu_clamp", i, dst[i], want, 1e-12,
                        1e-5);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_decode),    cmocka_unit_test(test_e4m3_encode),
        cmocka_unit_test(test_e8m0_e2m1),      cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_pow2_scale),     cmocka_unit_test(test_fp8_roundtrip),
        cmocka_unit_test(test_fp4_roundtrip),  cmocka_unit_test(test_hadamard),
        cmocka_unit_test(test_qmat_f32_bf16),  cmocka_unit_test(test_qmat_fp8),
        cmocka_unit_test(test_qmat_mxfp4),     cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope_inv_freq),  cmocka_unit_test(test_rope),
        cmocka_unit_test(test_hc_pre),         cmocka_unit_test(test_hc_post),
        cmocka_unit_test(test_hc_head),        cmocka_unit_test(test_sink_attention),
        cmocka_unit_test(test_compressor_hca), cmocka_unit_test(test_compressor_csa),
        cmocka_unit_test(test_indexer_scores), cmocka_unit_test(test_topk),
        cmocka_unit_test(test_sqrt_softplus),  cmocka_unit_test(test_route),
        cmocka_unit_test(test_swiglu_clamp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
