/*
 * cupti_trace.c - a kernel timeline of any CUDA program, CUDA graph replays included, for
 * finding where a decode step's time goes (a diagnostic, not part of the server).
 *
 *   LD_PRELOAD=libdsv4_cupti_trace.so DSV4_CUPTI_OUT=trace.tsv ./bench_gpu_engine ...
 *   python3 tests/gpu/cupti_timeline.py trace.tsv
 *
 * At load it enables CUPTI's concurrent-kernel activity records (start and end of every kernel
 * on the GPU's own clock, with the graph and the launch it came from); at exit it flushes them
 * and writes one line per kernel to DSV4_CUPTI_OUT:
 *   start_ns end_ns stream graph_id correlation_id grid_x grid_y grid_z block_x name
 * Without DSV4_CUPTI_OUT it does nothing. Ownership: the activity buffers are malloc'd here and
 * handed to CUPTI, which returns each one to buf_done (freed there).
 */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpedantic" /* cupti_activity.h: enumerators past int */
#include <cupti.h>
#pragma GCC diagnostic pop
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define TRACE_BUF (8u << 20)

static FILE *trace_out;

static void trace_buf_new(uint8_t **buf, size_t *size, size_t *max_records)
{
    /* CUPTI wants 8-byte alignment */
    *buf = aligned_alloc(8, TRACE_BUF);
    *size = *buf ? TRACE_BUF : 0;
    *max_records = 0;
}

static void trace_buf_done(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *rec = NULL;
    while (trace_out && cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
            rec->kind != CUPTI_ACTIVITY_KIND_KERNEL)
            continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
        fprintf(trace_out, "%llu %llu %u %u %u %d %d %d %d %s\n", (unsigned long long)k->start,
                (unsigned long long)k->end, k->streamId, k->graphId, k->correlationId, k->gridX,
                k->gridY, k->gridZ, k->blockX, k->name ? k->name : "?");
    }
    free(buf);
}

__attribute__((constructor)) static void trace_start(void)
{
    const char *path = getenv("DSV4_CUPTI_OUT");
    if (!path || !*path)
        return;
    trace_out = fopen(path, "w");
    if (!trace_out) {
        perror(path);
        return;
    }
    if (cuptiActivityRegisterCallbacks(trace_buf_new, trace_buf_done) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "cupti_trace: CUPTI activity could not be enabled\n");
        fclose(trace_out);
        trace_out = NULL;
    }
}

__attribute__((destructor)) static void trace_stop(void)
{
    if (!trace_out)
        return;
    cuptiActivityFlushAll(1);
    fclose(trace_out);
    trace_out = NULL;
}
