/*
 * runtime.cu - thin wrappers over the CUDA runtime so that C code (tests, benchmarks, the
 * engine) needs no CUDA headers. Synchronous helpers are for setup and tests, never for the
 * token path.
 */
#include "kernels/kernels.h"
#include "kernels/cuda/common.cuh"

#include <stdio.h>

static thread_local cudaError_t kern_last = cudaSuccess;

static int map(cudaError_t e)
{
    if (e == cudaSuccess)
        return 0;
    kern_last = e;
    return ERR_CUDA;
}

/* The other runtime wrappers (engine_rt.cu) record their failures for kern_last_error too. */
int kern__map_error(cudaError_t e)
{
    return map(e);
}

extern "C" int kern_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" int kern_device_name(char *buf, size_t n)
{
    cudaDeviceProp p;
    int dev = 0;
    int rc = map(cudaGetDevice(&dev));
    if (!rc)
        rc = map(cudaGetDeviceProperties(&p, dev));
    if (rc)
        return rc;
    if (n)
        snprintf(buf, n, "%s", p.name);
    return 0;
}

extern "C" int kern_malloc(void **p, size_t n)
{
    *p = NULL;
    return map(cudaMalloc(p, n ? n : 1));
}

extern "C" void kern_free(void *p)
{
    if (p)
        cudaFree(p);
}

extern "C" int kern_h2d(void *dst, const void *src, size_t n)
{
    return map(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice));
}

extern "C" int kern_d2h(void *dst, const void *src, size_t n)
{
    return map(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost));
}

extern "C" int kern_memset(void *dst, int byte, size_t n)
{
    return map(cudaMemset(dst, byte, n));
}

extern "C" int kern_sync(void)
{
    int rc = map(cudaDeviceSynchronize());
    return rc ? rc : map(cudaGetLastError());
}

extern "C" const char *kern_last_error(void)
{
    return cudaGetErrorString(kern_last);
}
