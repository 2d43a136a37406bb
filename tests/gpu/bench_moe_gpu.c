/*
 * bench_moe_gpu.c - the NVFP4 MoE layer benchmark (issue 6): for Flash and Pro layer shapes
 * and T in {1, 4, 16, 64, 256, 1024, 8192}, in one run:
 *   - the MoE layer time (kern_moe_forward: router + grouping + routed + shared experts +
 *     combine), captured in a CUDA graph, median of replays timed with events;
 *   - the active expert bytes (distinct routed experts actually chosen, NVFP4 data + scales,
 *     plus the FP8 shared expert) over that time, against a device-to-device copy measured in
 *     the same run ((read + write) bytes / time);
 *   - the useful FLOP rate (2 * T * (K + 1) * 3 * d * I) against cuBLAS BF16 GEMM
 *     (8192^3, FP32 accumulate) measured in the same run.
 * The BF16 baseline (torch._grouped_mm) is tests/gpu/bench_moe_bf16.py, run after this.
 * Weights: one random expert packed and copied to all E slots (timing only; distinct
 * addresses, so no cache reuse between experts); dense router with random gate weights.
 * Usage: bench_moe_gpu [--quick] [results.md]. Without a GPU it prints a SKIP line, exits 0.
 */
#include "kernels/kernels.h"
#include "tests/gpu/moe_fixture.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(x)                                                                                      \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)

static int cmp_f(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float median(float *v, int n)
{
    qsort(v, n, sizeof *v, cmp_f);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

/* (read + write) GB/s of a 1 GiB device-to-device copy */
static int bench_copy(double *gbs)
{
    size_t n = (size_t)1 << 30;
    void *a, *b;
    cudaEvent_t e0, e1;
    float t[20];
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 0x5a, n));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 23; i++) {
        CK(cudaEventRecord(e0, 0));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0));
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        if (i >= 3)
            CK(cudaEventElapsedTime(&t[i - 3], e0, e1));
    }
    *gbs = 2.0 * n / (median(t, 20) * 1e-3) / 1e9;
    cudaFree(a), cudaFree(b), cudaEventDestroy(e0), cudaEventDestroy(e1);
    return 0;
}

/* TFLOP/s of an n^3 BF16 GEMM through cuBLAS (random data) */
static int bench_cublas(int n, double *tflops)
{
    size_t el = (size_t)n * n;
    uint16_t *h = malloc(el * 2);
    void *A, *B, *C;
    if (!h)
        return -1;
    for (size_t i = 0; i < el; i++)
        h[i] = cpu_f32_to_bf16(fx_unif(3, i));
    CK(cudaMalloc(&A, el * 2));
    CK(cudaMalloc(&B, el * 2));
    CK(cudaMalloc(&C, el * 2));
    CK(cudaMemcpy(A, h, el * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B, h, el * 2, cudaMemcpyHostToDevice));
    free(h);
    cublasHandle_t hd;
    if (cublasCreate(&hd) != CUBLAS_STATUS_SUCCESS)
        return -1;
    float alpha = 1, beta = 0, t[10];
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 13; i++) {
        CK(cudaEventRecord(e0, 0));
        if (cublasGemmEx(hd, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, CUDA_R_16BF, n, B,
                         CUDA_R_16BF, n, &beta, C, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
            return -1;
        CK(cudaEventRecord(e1, 0));
        CK(cudaEventSynchronize(e1));
        if (i >= 3)
            CK(cudaEventElapsedTime(&t[i - 3], e0, e1));
    }
    *tflops = 2.0 * n * n * (double)n / (median(t, 10) * 1e-3) / 1e12;
    cublasDestroy(hd);
    cudaFree(A), cudaFree(B), cudaFree(C);
    return 0;
}

/* median ms of `what` (0 forward, 1 experts only) captured in a graph */
static int time_graph(struct fx_layer *f, int what, float *x, int32_t *tok, int32_t *idx, float *w,
                      float *out, void *ws, size_t wsb, int T, int reps, float *ms)
{
    cudaStream_t st;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    cudaEvent_t e0, e1;
    float t[64];
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    int rc = what == 0 ? kern_moe_forward(&f->L, x, tok, T, out, ws, wsb, st)
                       : kern_moe_experts(&f->L, x, idx, w, T, out, ws, wsb, st);
    CK(cudaStreamEndCapture(st, &g));
    if (rc)
        return rc;
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < reps + 3; i++) {
        CK(cudaEventRecord(e0, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        if (i >= 3)
            CK(cudaEventElapsedTime(&t[i - 3], e0, e1));
    }
    *ms = median(t, reps);
    cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaEventDestroy(e0), cudaEventDestroy(e1);
    cudaStreamDestroy(st);
    return 0;
}

int main(int argc, char **argv)
{
    int quick = 0, only_T = 0, profile = 0;
    const char *path = NULL, *only_shape = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            quick = 1;
        else if (!strcmp(argv[i], "--profile"))
            profile = 1; /* plain launches, no graph, no baselines: for ncu */
        else if (!strcmp(argv[i], "--T") && i + 1 < argc)
            only_T = (int)strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--shape") && i + 1 < argc)
            only_shape = argv[++i];
        else
            path = argv[i];
    }
    if (kern_device_count() <= 0) {
        printf("SKIP: no CUDA device\n");
        return 0;
    }
    if (kern_moe_prepare()) {
        fprintf(stderr, "kern_moe_prepare failed\n");
        return 1;
    }
    char name[256];
    kern_device_name(name, sizeof name);
    double copy_gbs = 1, blas = 1;
    if (!profile && (bench_copy(&copy_gbs) || bench_cublas(8192, &blas))) {
        fprintf(stderr, "baseline measurements failed\n");
        return 1;
    }
    FILE *fo = path ? fopen(path, "w") : NULL;
    char line[512];
#define EMIT(...)                                                                                  \
    do {                                                                                           \
        snprintf(line, sizeof line, __VA_ARGS__);                                                  \
        fputs(line, stdout);                                                                       \
        if (fo)                                                                                    \
            fputs(line, fo);                                                                       \
        fflush(stdout);                                                                            \
    } while (0)
    EMIT("GPU: %s\n\nD2D copy: %.0f GB/s (read+write); cuBLAS BF16 8192^3: %.0f TFLOP/s\n\n", name,
         copy_gbs, blas);
    EMIT("| shape | T | layer us | experts-only us | active experts | expert MB | GB/s | %% of "
         "copy | "
         "useful TFLOP/s | x cuBLAS |\n|---|---|---|---|---|---|---|---|---|---|\n");

    struct shape {
        const char *name;
        int d, I, E;
        float rs;
    } shapes[] = {{"flash", 4096, 2048, 256, 1.5f}, {"pro", 7168, 3072, 384, 2.5f}};
    static const int Ts[] = {1, 4, 16, 64, 256, 1024, 4096, 8192};
    const int K = 6;
    for (int si = 0; si < 2; si++) {
        const struct shape *sp = &shapes[si];
        if (only_shape && strcmp(only_shape, sp->name))
            continue;
        struct fx_layer f;
        if (fx_layer_init(&f, sp->d, sp->I, sp->E, K, sp->rs, 0, 42 + si) ||
            fx_set_router(&f, FX_DENSE_UNIFORM, 7)) {
            fprintf(stderr, "layer init failed: %s\n", kern_last_error());
            return 1;
        }
        const int Tmax = 8192, d = sp->d, I = sp->I;
        size_t wsb = kern_moe_workspace_bytes(&f.L, Tmax);
        float *x, *out, *w;
        int32_t *tok, *idx;
        void *ws;
        CK(cudaMalloc((void **)&x, sizeof(float) * (size_t)Tmax * d));
        CK(cudaMalloc((void **)&out, sizeof(float) * (size_t)Tmax * d));
        CK(cudaMalloc((void **)&tok, sizeof(int32_t) * Tmax));
        CK(cudaMalloc((void **)&idx, sizeof(int32_t) * Tmax * K));
        CK(cudaMalloc((void **)&w, sizeof(float) * Tmax * K));
        CK(cudaMalloc(&ws, wsb));
        float *xh = malloc(sizeof(float) * (size_t)Tmax * d);
        int32_t *ih = malloc(sizeof(int32_t) * Tmax * K);
        for (size_t i = 0; i < (size_t)Tmax * d; i++)
            xh[i] = fx_unif(99, i);
        CK(cudaMemcpy(x, xh, sizeof(float) * (size_t)Tmax * d, cudaMemcpyHostToDevice));
        const double per_expert = (double)kern_nvfp4_data_bytes(2 * I, d) +
                                  kern_nvfp4_scale_bytes(2 * I, d) + kern_nvfp4_data_bytes(d, I) +
                                  kern_nvfp4_scale_bytes(d, I);
        const double shared = (double)kern_fp8_data_bytes(2 * I, d) + kern_fp8_data_bytes(d, I) +
                              2.0 * (kern_fp8_factor_count(2 * I, d) + kern_fp8_factor_count(d, I));
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            int T = Ts[ti];
            if ((quick && T > 64) || (only_T && T != only_T))
                continue;
            if (profile) {
                for (int r = 0; r < 3; r++)
                    if (kern_moe_forward(&f.L, x, tok, T, out, ws, wsb, NULL) || kern_sync()) {
                        fprintf(stderr, "forward failed\n");
                        return 1;
                    }
                printf("profiled %s T=%d\n", sp->name, T);
                continue;
            }
            int reps = T >= 1024 ? 10 : 40;
            float ms = 0, ms_e = 0;
            if (kern_moe_route(&f.L, x, tok, T, idx, w, ws, wsb, NULL) || kern_sync()) {
                fprintf(stderr, "route failed\n");
                return 1;
            }
            CK(cudaMemcpy(ih, idx, sizeof(int32_t) * T * K, cudaMemcpyDeviceToHost));
            int act = 0;
            char seen[1024] = {0};
            for (int i = 0; i < T * K; i++)
                if (ih[i] >= 0 && ih[i] < sp->E && !seen[ih[i]]) {
                    seen[ih[i]] = 1;
                    act++;
                }
            if (time_graph(&f, 0, x, tok, idx, w, out, ws, wsb, T, reps, &ms) ||
                time_graph(&f, 1, x, tok, idx, w, out, ws, wsb, T, reps, &ms_e)) {
                fprintf(stderr, "timing failed: %s\n", kern_last_error());
                return 1;
            }
            double bytes = act * per_expert + shared;
            double gbs = bytes / (ms * 1e-3) / 1e9;
            double flops = 2.0 * T * (K + 1) * 3.0 * d * I;
            double tf = flops / (ms * 1e-3) / 1e12;
            EMIT("| %s | %d | %.1f | %.1f | %d | %.1f | %.0f | %.1f%% | %.1f | %.2f |\n", sp->name,
                 T, ms * 1e3, ms_e * 1e3, act, bytes / 1e6, gbs, 100.0 * gbs / copy_gbs, tf,
                 tf / blas);
        }
        cudaFree(x), cudaFree(out), cudaFree(tok), cudaFree(idx), cudaFree(w), cudaFree(ws);
        free(xh), free(ih);
        fx_layer_free(&f);
    }
    if (fo)
        fclose(fo);
    return 0;
}
