/*
 * nvfp4_pack.c - host-side packing of NVFP4 and FP8 expert weights into the layouts the CUDA
 * MoE kernels read (described in kernels/kernels.h). Plain C, built with or without CUDA.
 * Packing is exact: the packed matrix dequantises to the same values as the canonical one.
 *
 * THREAD SAFETY: reentrant; the pack loops are OpenMP-parallel over row blocks.
 */
#include "kernels/kernels.h"
#include "kernels/cpu/cpu.h"
#include "engine/err.h"

#include <math.h>
#include <string.h>

size_t kern_nvfp4_data_bytes(int rows, int cols)
{
    return (size_t)rows * (size_t)cols / 2;
}

size_t kern_nvfp4_scale_bytes(int rows, int cols)
{
    return (size_t)rows * (size_t)cols / 16;
}

float kern_nvfp4_alpha(float s2)
{
    return s2 * 256.0f;
}

/* E4M3 byte (sign 0, not NaN, not 0) -> kernel "UE5M3" byte. */
static uint8_t e4m3_to_ue5m3(uint8_t b)
{
    int E = b >> 3, m = b & 7, ex, mant;
    if (E >= 1) {
        ex = E - 7;
        mant = m;
    } else { /* subnormal m * 2^-9, normalised */
        int p = m >= 4 ? 2 : (m >= 2 ? 1 : 0);
        ex = p - 9;
        mant = (m << (3 - p)) & 7;
    }
    return (uint8_t)(((ex + 10) << 3) | mant);
}

static int check_scales(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] & 0x80 || s[i] == 0x7f)
            return ERR_FORMAT;
    return 0;
}

/* code of element e of a canonical row, zero when its group's scale is zero */
static inline unsigned code_at(const uint8_t *q, const uint8_t *s, int e)
{
    if (!s[e / 16])
        return 0;
    uint8_t b = q[e / 2];
    return (e & 1) ? b >> 4 : b & 15u;
}

/*
 * Where the 4 bits (m, e0, e1, sign from bit 0 up) of each code of a data word go, by A fragment
 * register r (0: row g elements 4s, 4s+1; 1: row g+8, same; 2: row g, 4s+2, 4s+3; 3: row g+8,
 * same) and half h (the first or second element of the pair). Chosen so that the kernel's decode
 * (moe_gemm.cuh dequant_nvfp4) needs one mask for register 0, a rotation and a mask for
 * registers 1 and 2, and a mask, a multiply and a mask for register 3.
 */
static const uint8_t nvfp4_bitpos[4][2][4] = {
    {{6, 7, 8, 15}, {22, 23, 24, 31}},
    {{9, 10, 11, 18}, {25, 26, 27, 2}},
    {{12, 13, 14, 21}, {28, 29, 30, 5}},
    {{4, 0, 1, 3}, {20, 16, 17, 19}},
};

/*
 * Pack 16-row block rb whose rows g and g+8 come from canonical rows (qlo[g], slo[g]) and
 * (qhi[g], shi[g]).
 */
static void pack_block(const uint8_t *const *qlo, const uint8_t *const *slo,
                       const uint8_t *const *qhi, const uint8_t *const *shi, int rb, int cols,
                       uint8_t *data, uint8_t *scales)
{
    const int nkb = cols / 64;
    for (int kb = 0; kb < nkb; kb++)
        for (int lane = 0; lane < 32; lane++) {
            const int g = lane >> 2, c = lane & 3, e0 = kb * 64 + 16 * c;
            uint8_t *dst = data + (((size_t)rb * nkb + kb) * 32 + lane) * 16;
            for (int s = 0; s < 4; s++) {
                uint32_t w = 0;
                for (int r = 0; r < 4; r++)
                    for (int h = 0; h < 2; h++) {
                        const int e = e0 + 4 * s + 2 * (r >> 1) + h;
                        unsigned code =
                            (r & 1) ? code_at(qhi[g], shi[g], e) : code_at(qlo[g], slo[g], e);
                        for (int b = 0; b < 4; b++)
                            w |= (uint32_t)((code >> b) & 1) << nvfp4_bitpos[r][h][b];
                    }
                memcpy(dst + 4 * s, &w, 4); /* little endian, as the device reads it */
            }
            uint8_t *sd = scales + (((size_t)rb * (cols / 256) + kb / 4) * 32 + lane) * 8;
            uint8_t a = slo[g][kb * 4 + c], b = shi[g][kb * 4 + c];
            sd[2 * (kb % 4)] = a ? e4m3_to_ue5m3(a) : 0;
            sd[2 * (kb % 4) + 1] = b ? e4m3_to_ue5m3(b) : 0;
        }
}

int kern_nvfp4_pack(const uint8_t *q, const uint8_t *s, int rows, int cols, uint8_t *data,
                    uint8_t *scales)
{
    if (rows <= 0 || rows % 16 || cols <= 0 || cols % 256)
        return ERR_UNSUPPORTED;
    if (check_scales(s, kern_nvfp4_scale_bytes(rows, cols)))
        return ERR_FORMAT;
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < rows / 16; rb++) {
        const uint8_t *ql[8], *sl[8], *qh[8], *sh[8];
        for (int g = 0; g < 8; g++) {
            int r0 = rb * 16 + g, r1 = r0 + 8;
            ql[g] = q + (size_t)r0 * (cols / 2);
            sl[g] = s + (size_t)r0 * (cols / 16);
            qh[g] = q + (size_t)r1 * (cols / 2);
            sh[g] = s + (size_t)r1 * (cols / 16);
        }
        pack_block(ql, sl, qh, sh, rb, cols, data, scales);
    }
    return 0;
}

int kern_nvfp4_pack_gateup(const uint8_t *gq, const uint8_t *gs, const uint8_t *uq,
                           const uint8_t *us, int I, int d, uint8_t *data, uint8_t *scales)
{
    if (I <= 0 || I % 8 || d <= 0 || d % 256)
        return ERR_UNSUPPORTED;
    if (check_scales(gs, kern_nvfp4_scale_bytes(I, d)) ||
        check_scales(us, kern_nvfp4_scale_bytes(I, d)))
        return ERR_FORMAT;
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < I / 8; rb++) {
        const uint8_t *ql[8], *sl[8], *qh[8], *sh[8];
        for (int g = 0; g < 8; g++) {
            int r = rb * 8 + g;
            ql[g] = gq + (size_t)r * (d / 2);
            sl[g] = gs + (size_t)r * (d / 16);
            qh[g] = uq + (size_t)r * (d / 2);
            sh[g] = us + (size_t)r * (d / 16);
        }
        pack_block(ql, sl, qh, sh, rb, d, data, scales);
    }
    return 0;
}

void kern_nvfp4_unpack_at(const uint8_t *data, const uint8_t *scales, int rows, int cols, int r,
                          int c, uint8_t *code, uint8_t *scale_e4m3)
{
    (void)rows;
    const int rb = r / 16, rr = r % 16, g = rr % 8, hi = rr >= 8, kb = c / 64, cc = c % 64;
    const int lane = 4 * g + cc / 16, i = cc % 16, s = i / 4, j = i % 4;
    uint32_t w;
    memcpy(&w, data + (((size_t)rb * (cols / 64) + kb) * 32 + lane) * 16 + 4 * s, 4);
    const int reg = 2 * (j >> 1) + hi, h = j & 1;
    unsigned bits = 0;
    for (int b = 0; b < 4; b++)
        bits |= ((w >> nvfp4_bitpos[reg][h][b]) & 1u) << b;
    *code = (uint8_t)bits;
    uint8_t ks = scales[(((size_t)rb * (cols / 256) + kb / 4) * 32 + lane) * 8 + 2 * (kb % 4) + hi];
    if (!ks) {
        *scale_e4m3 = 0;
        return;
    }
    /* UE5M3 -> E4M3 */
    int ex = (ks >> 3) - 10, mant = ks & 7;
    float v = ldexpf(1.0f + mant / 8.0f, ex);
    *scale_e4m3 = cpu_f32_to_e4m3(v);
}

/* ---- FP8 ---- */

size_t kern_fp8_data_bytes(int rows, int cols)
{
    return (size_t)rows * (size_t)cols;
}

size_t kern_fp8_factor_count(int rows, int cols)
{
    return (size_t)(rows / 16) * (size_t)(cols / 128) * 2;
}

/* Exponent byte (UE8M0 convention) of block scale (rb128, cb); -1 for zero, -2 for bad. */
static int fp8_scale_exp(const void *scales, int scale_f32, int cols, int rb128, int cb)
{
    const int ncb = (cols + 127) / 128;
    if (!scale_f32) {
        uint8_t b = ((const uint8_t *)scales)[(size_t)rb128 * ncb + cb];
        return b == 255 ? -2 : b;
    }
    float f = ((const float *)scales)[(size_t)rb128 * ncb + cb];
    if (f == 0.0f)
        return -1;
    if (!(f > 0.0f) || isinf(f))
        return -2;
    int e;
    float m = frexpf(f, &e); /* f = m * 2^e, m in [0.5, 1) */
    if (m != 0.5f || e - 1 + 127 < 0 || e - 1 + 127 > 254)
        return -2;
    return e - 1 + 127;
}

static int fp8_emax(const void *scales, int scale_f32, int rows, int cols, int *emax, int *emin)
{
    *emax = -1;
    *emin = 1000;
    for (int rb = 0; rb < (rows + 127) / 128; rb++)
        for (int cb = 0; cb < (cols + 127) / 128; cb++) {
            int e = fp8_scale_exp(scales, scale_f32, cols, rb, cb);
            if (e == -2)
                return ERR_FORMAT;
            if (e < 0)
                continue;
            *emax = e > *emax ? e : *emax;
            *emin = e < *emin ? e : *emin;
        }
    if (*emax >= 0 && *emax - *emin > 100)
        return ERR_UNSUPPORTED;
    return 0;
}

static uint16_t fp8_factor(const void *scales, int scale_f32, int cols, int row, int cb, int emax)
{
    int e = fp8_scale_exp(scales, scale_f32, cols, row / 128, cb);
    if (e < 0)
        return 0;
    return (uint16_t)((e - emax + 120 + 127) << 7);
}

static void fp8_pack_block(const uint8_t *const *rlo, const uint8_t *const *rhi, int rb, int cols,
                           uint8_t *data)
{
    const int nkb = cols / 64;
    for (int kb = 0; kb < nkb; kb++)
        for (int p = 0; p < 2; p++)
            for (int lane = 0; lane < 32; lane++) {
                const int g = lane >> 2, c = lane & 3, e0 = kb * 64 + 16 * c;
                uint8_t *dst = data + ((((size_t)rb * nkb + kb) * 2 + p) * 32 + lane) * 16;
                for (int ss = 0; ss < 2; ss++) {
                    int s = 2 * p + ss;
                    uint8_t *o = dst + 8 * ss;
                    o[0] = rlo[g][e0 + 4 * s];
                    o[1] = rlo[g][e0 + 4 * s + 1];
                    o[2] = rhi[g][e0 + 4 * s];
                    o[3] = rhi[g][e0 + 4 * s + 1];
                    o[4] = rlo[g][e0 + 4 * s + 2];
                    o[5] = rlo[g][e0 + 4 * s + 3];
                    o[6] = rhi[g][e0 + 4 * s + 2];
                    o[7] = rhi[g][e0 + 4 * s + 3];
                }
            }
}

static int fp8_check_nan(const uint8_t *w, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((w[i] & 0x7f) == 0x7f)
            return ERR_FORMAT;
    return 0;
}

int kern_fp8_pack(const uint8_t *w, const void *scales, int scale_f32, int rows, int cols,
                  uint8_t *data, uint16_t *factors, float *alpha)
{
    int emax, emin, rc;
    if (rows <= 0 || rows % 16 || cols <= 0 || cols % 256)
        return ERR_UNSUPPORTED;
    if ((rc = fp8_check_nan(w, (size_t)rows * cols)) ||
        (rc = fp8_emax(scales, scale_f32, rows, cols, &emax, &emin)))
        return rc;
    if (emax < 0)
        emax = 127;
    *alpha = ldexpf(1.0f, emax - 127);
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < rows / 16; rb++) {
        const uint8_t *lo[8], *hi[8];
        for (int g = 0; g < 8; g++) {
            lo[g] = w + (size_t)(rb * 16 + g) * cols;
            hi[g] = w + (size_t)(rb * 16 + g + 8) * cols;
        }
        fp8_pack_block(lo, hi, rb, cols, data);
        for (int cb = 0; cb < cols / 128; cb++) {
            uint16_t *f = factors + ((size_t)rb * (cols / 128) + cb) * 2;
            f[0] = fp8_factor(scales, scale_f32, cols, rb * 16, cb, emax);
            f[1] = fp8_factor(scales, scale_f32, cols, rb * 16 + 8, cb, emax);
        }
    }
    return 0;
}

int kern_fp8_pack_gateup(const uint8_t *gw, const void *gs, const uint8_t *uw, const void *us,
                         int scale_f32, int I, int d, uint8_t *data, uint16_t *factors,
                         float alpha[2])
{
    int ge, gmin, ue, umin, rc;
    if (I <= 0 || I % 8 || d <= 0 || d % 256)
        return ERR_UNSUPPORTED;
    if ((rc = fp8_check_nan(gw, (size_t)I * d)) || (rc = fp8_check_nan(uw, (size_t)I * d)) ||
        (rc = fp8_emax(gs, scale_f32, I, d, &ge, &gmin)) ||
        (rc = fp8_emax(us, scale_f32, I, d, &ue, &umin)))
        return rc;
    if (ge < 0)
        ge = 127;
    if (ue < 0)
        ue = 127;
    alpha[0] = ldexpf(1.0f, ge - 127);
    alpha[1] = ldexpf(1.0f, ue - 127);
#pragma omp parallel for schedule(static)
    for (int rb = 0; rb < I / 8; rb++) {
        const uint8_t *lo[8], *hi[8];
        for (int g = 0; g < 8; g++) {
            lo[g] = gw + (size_t)(rb * 8 + g) * d;
            hi[g] = uw + (size_t)(rb * 8 + g) * d;
        }
        fp8_pack_block(lo, hi, rb, d, data);
        for (int cb = 0; cb < d / 128; cb++) {
            uint16_t *f = factors + ((size_t)rb * (d / 128) + cb) * 2;
            f[0] = fp8_factor(gs, scale_f32, d, rb * 8, cb, ge);
            f[1] = fp8_factor(us, scale_f32, d, rb * 8, cb, ue);
        }
    }
    return 0;
}
