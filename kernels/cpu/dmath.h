/*
 * dmath.h - the transcendental functions of the CPU ops, evaluated in double and rounded once to
 * float. glibc's expf/sinf/cosf/log1pf are within an ulp of these but not always equal (and its
 * FMA and non-FMA builds differ); the CUDA kernels compute exactly these (kernels/cuda/exact.cuh),
 * so CPU and GPU share every rounding. That matters in model numerics, where one ulp landing on
 * an FP8 rounding boundary moves a value by a whole FP8 step.
 */
#ifndef DSV4_KERNELS_CPU_DMATH_H
#define DSV4_KERNELS_CPU_DMATH_H

#include <math.h>

static inline float cpu_expf(float x)
{
    return (float)exp((double)x);
}

static inline float cpu_sinf(float x)
{
    return (float)sin((double)x);
}

static inline float cpu_cosf(float x)
{
    return (float)cos((double)x);
}

static inline float cpu_log1pf(float x)
{
    return (float)log1p((double)x);
}

#endif
