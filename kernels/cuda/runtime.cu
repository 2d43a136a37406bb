/*
 * runtime.cu - thin wrappers over the CUDA runtime so that C code (tests, benchmarks, the
 * engine) needs no CUDA headers. Synchronous helpers are for setup and tests, never for the
 * token path.
 */
#include "kernels/kernels.h"
#include "kernels/cuda/common.cuh"

#include <cuda_profiler_api.h>
#include <stdio.h>
#include <stdlib.h>

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

int kern__trace_on(void)
{
    static int on = -1; /* benign race: idempotent */
    if (on < 0)
        on = getenv("DSV4_CUDA_TRACE") != NULL;
    return on;
}

int kern__pdl_on(void)
{
    static int on = -1; /* benign race: idempotent */
    if (on < 0) {
        const char *e = getenv("DSV4_CUDA_PDL");
        on = !(e && e[0] == '0') && !kern__trace_on();
    }
    return on;
}

int kern__sm_count(void)
{
    static int sms; /* benign race: idempotent */
    if (!sms && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess)
        sms = 132; /* an H100 SXM */
    return sms;
}

/* ---- DSV4_CUDA_TRACE: a pair of events around each launch (diagnosis; one thread) ---- */

#define TRACE_MAX 8192
static struct trace_ent {
    const void *fn;
    cudaEvent_t a, b;
} trace_ev[TRACE_MAX];
static int trace_n, trace_made, trace_open, trace_dropped;

/* A failed trace call must not surface as a later launch's error (cudaPeekAtLastError). */
static int trace_fail(void)
{
    (void)cudaGetLastError();
    trace_dropped++;
    return 0;
}

void kern__trace(const void *fn, cudaStream_t st, int after)
{
    cudaStreamCaptureStatus cs;
    if (cudaStreamIsCapturing(st, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) {
        (void)cudaGetLastError(); /* inside a capture: events would time the capture, skip */
        return;
    }
    if (after) {
        if (trace_open && cudaEventRecord(trace_ev[trace_n].b, st) == cudaSuccess)
            trace_n++;
        else if (trace_open)
            trace_fail();
        trace_open = 0;
        return;
    }
    trace_open = 0;
    if (trace_n >= TRACE_MAX) { /* full until kern_trace_report() */
        trace_dropped++;
        return;
    }
    struct trace_ent *t = &trace_ev[trace_n];
    if (trace_n >= trace_made) {
        if (cudaEventCreate(&t->a) != cudaSuccess)
            return (void)trace_fail();
        if (cudaEventCreate(&t->b) != cudaSuccess) {
            cudaEventDestroy(t->a);
            return (void)trace_fail();
        }
        trace_made++;
    }
    t->fn = fn;
    if (cudaEventRecord(t->a, st) != cudaSuccess)
        return (void)trace_fail();
    trace_open = 1;
}

extern "C" void kern_trace_report(const char *label)
{
    if (!kern__trace_on())
        return;
    if (!trace_n || !label) { /* nothing, or discard */
        if (label)
            fprintf(stderr, "cuda trace %s: no launches (%d not traced)\n", label, trace_dropped);
        (void)cudaDeviceSynchronize();
        trace_n = trace_dropped = 0;
        return;
    }
    struct agg {
        const void *fn;
        double ms;
        int n;
    } ag[256];
    int na = 0;
    double sum = 0, span = 0;
    float ms;
    (void)cudaDeviceSynchronize();
    if (cudaEventElapsedTime(&ms, trace_ev[0].a, trace_ev[trace_n - 1].b) == cudaSuccess)
        span = ms;
    else
        (void)cudaGetLastError();
    for (int i = 0; i < trace_n; i++) {
        if (cudaEventElapsedTime(&ms, trace_ev[i].a, trace_ev[i].b) != cudaSuccess) {
            (void)cudaGetLastError();
            continue;
        }
        int j = 0;
        while (j < na && ag[j].fn != trace_ev[i].fn)
            j++;
        if (j == na && na < 256)
            ag[na++] = (struct agg){trace_ev[i].fn, 0, 0};
        if (j < na) {
            ag[j].ms += ms;
            ag[j].n++;
        }
        sum += ms;
    }
    for (int i = 1; i < na; i++) /* by time, largest first */
        for (int j = i; j > 0 && ag[j].ms > ag[j - 1].ms; j--) {
            struct agg t = ag[j];
            ag[j] = ag[j - 1];
            ag[j - 1] = t;
        }
    fprintf(stderr,
            "cuda trace %s: %d launches, %.3f ms in them, %.3f ms from first to last (the "
            "rest: cuBLAS, copies, gaps); %d launches not traced\n",
            label, trace_n, sum, span, trace_dropped);
    for (int i = 0; i < na; i++) {
        const char *name = "?";
        if (cudaFuncGetName(&name, ag[i].fn) != cudaSuccess) {
            (void)cudaGetLastError();
            name = "?";
        }
        fprintf(stderr, "  %8.3f ms %5d x %7.2f us  %.90s\n", ag[i].ms, ag[i].n,
                1e3 * ag[i].ms / ag[i].n, name);
    }
    trace_n = trace_dropped = 0;
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

extern "C" void kern_profile_range(int on)
{
    /* cudaErrorProfilerDisabled etc. without a profiler: not an error of the caller's work */
    if ((on ? cudaProfilerStart() : cudaProfilerStop()) != cudaSuccess)
        (void)cudaGetLastError();
}
