/*
 * moe_ref.cu - the MoE router in the CPU oracle's arithmetic (the twin of cpu_route), for the
 * engine's exact MoE path: gate logits come from kern_linear, the routed experts from
 * kern_linear_experts + kern_swiglu, the combine from kern_moe_combine. The fused NVFP4 kernels
 * (moe_route.cu, moe_nvfp4.cu) serve the shapes they support.
 *
 * One thread per row (K and E are small: the selection is the CPU's selection sort).
 */
#include "kernels/cuda/exact.cuh"

#define ROUTE_MAX_K 32

__global__ void route_k(const float *logits, int T, int E, int K, const float *bias,
                        const int32_t *tid2eid, const int32_t *tokens, float route_scale,
                        int32_t *idx_out, float *w_out)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T)
        return;
    if (tokens && tokens[t] < 0) { /* a padding row: no expert */
        for (int j = 0; j < K; j++) {
            idx_out[(size_t)t * K + j] = -1;
            w_out[(size_t)t * K + j] = 0.0f;
        }
        return;
    }
    const float *lg = logits + (size_t)t * E; /* (E) */
    int idx[ROUTE_MAX_K];
    float w[ROUTE_MAX_K];
    if (tid2eid) {
        for (int j = 0; j < K; j++)
            idx[j] = tid2eid[(size_t)tokens[t] * K + j];
    } else {
        for (int j = 0; j < K; j++) {
            int best = -1;
            float bv = -INFINITY;
            for (int e = 0; e < E; e++) {
                int used = 0;
                for (int i = 0; i < j; i++)
                    used |= idx[i] == e;
                if (used)
                    continue;
                float v = ex_sqrt_softplus(lg[e]) + bias[e];
                if (best < 0 || v > bv) {
                    best = e;
                    bv = v;
                }
            }
            idx[j] = best;
        }
    }
    float sum = 0;
    for (int j = 0; j < K; j++) {
        w[j] = ex_sqrt_softplus(lg[idx[j]]);
        sum += w[j];
    }
    for (int j = 0; j < K; j++) {
        idx_out[(size_t)t * K + j] = idx[j];
        w_out[(size_t)t * K + j] = w[j] / sum * route_scale;
    }
}

extern "C" int kern_route_exact(const float *logits, int T, int E, int K, const float *bias,
                                const int32_t *tid2eid, const int32_t *tokens, float route_scale,
                                int32_t *idx, float *w, cudaStream_t st)
{
    if (K < 1 || K > ROUTE_MAX_K || (!tid2eid && !bias) || (tid2eid && !tokens))
        return ERR_UNSUPPORTED;
    if (T <= 0)
        return 0;
    route_k<<<(T + 127) / 128, 128, 0, st>>>(logits, T, E, K, bias, tid2eid, tokens, route_scale,
                                             idx, w);
    EX_LAUNCH_CHECK();
    return 0;
}
