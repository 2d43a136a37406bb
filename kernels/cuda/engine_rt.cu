/*
 * engine_rt.cu - the runtime pieces the GPU backend needs beyond runtime.cu: a stream, pinned
 * host buffers and asynchronous copies, so engine/backend_cuda.c needs no CUDA headers.
 */
#include "kernels/kernels.h"

#include <cuda_runtime.h>

#include "engine/err.h"

int kern__map_error(cudaError_t e); /* runtime.cu: records e for kern_last_error */

static int rt_map(cudaError_t e)
{
    return kern__map_error(e);
}

extern "C" int kern_stream_new(struct CUstream_st **out)
{
    cudaStream_t s = NULL;
    int rc = rt_map(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *out = rc ? NULL : s;
    return rc;
}

extern "C" void kern_stream_free(struct CUstream_st *s)
{
    if (s)
        cudaStreamDestroy(s);
}

extern "C" int kern_stream_sync(struct CUstream_st *s)
{
    int rc = rt_map(cudaStreamSynchronize(s));
    return rc ? rc : rt_map(cudaGetLastError());
}

extern "C" int kern_event_new(struct CUevent_st **out)
{
    cudaEvent_t e = NULL;
    int rc = rt_map(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    *out = rc ? NULL : e;
    return rc;
}

extern "C" void kern_event_free(struct CUevent_st *e)
{
    if (e)
        cudaEventDestroy(e);
}

extern "C" int kern_event_record(struct CUevent_st *ev, struct CUstream_st *s)
{
    return rt_map(cudaEventRecord(ev, s));
}

extern "C" int kern_stream_wait(struct CUstream_st *s, struct CUevent_st *ev)
{
    return rt_map(cudaStreamWaitEvent(s, ev, 0));
}

extern "C" int kern_host_alloc(void **p, size_t n)
{
    *p = NULL;
    return rt_map(cudaMallocHost(p, n ? n : 1));
}

extern "C" void kern_host_free(void *p)
{
    if (p)
        cudaFreeHost(p);
}

extern "C" int kern_h2d_async(void *dst, const void *src, size_t n, struct CUstream_st *s)
{
    return n ? rt_map(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s)) : 0;
}

extern "C" int kern_d2h_async(void *dst, const void *src, size_t n, struct CUstream_st *s)
{
    return n ? rt_map(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s)) : 0;
}

extern "C" int kern_d2d_async(void *dst, const void *src, size_t n, struct CUstream_st *s)
{
    return n ? rt_map(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s)) : 0;
}

extern "C" int kern_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    return rt_map(cudaMemGetInfo(free_bytes, total_bytes));
}

extern "C" const char *kern_rt_error(void)
{
    return cudaGetErrorString(cudaGetLastError());
}

/* ---- CUDA graphs of whole steps ---- */

extern "C" int kern_graph_begin(struct CUstream_st *s)
{
    /* relaxed: the launches may call cudaFuncSetAttribute while capturing */
    return rt_map(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
}

extern "C" int kern_graph_end(struct CUstream_st *s, void **exec)
{
    cudaGraph_t g = NULL;
    cudaGraphExec_t e = NULL;
    *exec = NULL;
    int rc = rt_map(cudaStreamEndCapture(s, &g));
    if (!rc)
        rc = rt_map(cudaGraphInstantiate(&e, g, 0));
    if (g)
        cudaGraphDestroy(g);
    if (!rc)
        *exec = e;
    (void)cudaGetLastError(); /* a failed capture leaves a non-sticky error */
    return rc;
}

extern "C" int kern_graph_launch(void *exec, struct CUstream_st *s)
{
    return rt_map(cudaGraphLaunch((cudaGraphExec_t)exec, s));
}

extern "C" void kern_graph_free(void *exec)
{
    if (exec)
        cudaGraphExecDestroy((cudaGraphExec_t)exec);
}
