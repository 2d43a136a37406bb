/*
 * gpu_test.h - what the GPU test programs share (header-only, included once per program): TAP
 * lines with the running counts, and the LCG their random inputs come from (each program sets
 * the state `rs` and prints it when it is time-seeded).
 */
#ifndef DSV4_GPU_TEST_H
#define DSV4_GPU_TEST_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

static int n_test, n_fail;
static uint64_t rs; /* LCG state */

static inline uint32_t rnd(void)
{
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rs >> 33);
}

static inline float frand(void) /* [-1, 1): rnd() has 31 bits */
{
    return (float)rnd() / 1073741824.0f - 1.0f;
}

/* One TAP line, "ok N - ..." or "not ok N - ...", flushed (a crash keeps what came before). */
static inline void tap(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void tap(int ok, const char *fmt, ...)
{
    va_list ap;
    n_test++;
    n_fail += !ok;
    printf("%s %d - ", ok ? "ok" : "not ok", n_test);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

#endif
