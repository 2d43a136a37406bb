/* sampler.c - see sampler.h. */
#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void sampler_rng_seed(struct sampler_rng *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xd1b54a32d192ed03ull);
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix(&x);
}

double sampler_uniform(struct sampler_rng *r)
{
    uint64_t *s = r->s; /* xoshiro256** */
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(out >> 11) * (1.0 / 9007199254740992.0);
}

size_t sampler_work_bytes(int V)
{
    return (size_t)V * (sizeof(float) + sizeof(int32_t));
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* sort candidate ids by descending prob, ties by id (deterministic) */
static const float *sort_key;
static int by_prob_desc(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    float px = sort_key[x], py = sort_key[y];
    if (px != py)
        return px > py ? -1 : 1;
    return x < y ? -1 : x > y;
}

int32_t sampler_sample(const struct engine_sampling *sp, float *logits, int V,
                       const struct sampler_counts *counts, struct sampler_rng *rng, void *work)
{
    for (int i = 0; i < sp->n_logit_bias; i++) {
        int32_t t = sp->logit_bias[i].token;
        if (t >= 0 && t < V)
            logits[t] += sp->logit_bias[i].bias;
    }
    if (counts && counts->seen && sp->repetition_penalty > 0 && sp->repetition_penalty != 1.0f)
        for (int t = 0; t < V; t++)
            if (counts->seen[t])
                logits[t] = logits[t] > 0 ? logits[t] / sp->repetition_penalty
                                          : logits[t] * sp->repetition_penalty;
    if (counts && counts->generated && (sp->presence_penalty != 0 || sp->frequency_penalty != 0))
        for (int t = 0; t < V; t++)
            if (counts->generated[t])
                logits[t] -=
                    sp->presence_penalty + sp->frequency_penalty * (float)counts->generated[t];
    /* one draw per token whatever the mode, so the stream stays aligned */
    double u = sampler_uniform(rng);
    if (sp->temperature <= 0.0f)
        return argmax(logits, V);
    float *p = work;                    /* (V) probabilities, unnormalised */
    int32_t *cand = (int32_t *)(p + V); /* (V) candidate ids */
    float mx = logits[argmax(logits, V)];
    float inv_t = 1.0f / sp->temperature;
    for (int t = 0; t < V; t++)
        p[t] = expf((logits[t] - mx) * inv_t);        /* p[max] = 1 */
    float floor_p = sp->min_p > 0 ? sp->min_p : 0.0f; /* min-p relative to the top token */
    int nc = 0;
    for (int t = 0; t < V; t++)
        if (p[t] > 0 && p[t] >= floor_p)
            cand[nc++] = t;
    if (nc == 0) /* no finite probability (a NaN row): the argmax, as greedy would */
        return argmax(logits, V);
    int need_sort = (sp->top_k > 0 && sp->top_k < nc) || (sp->top_p > 0 && sp->top_p < 1.0f);
    if (need_sort) {
        sort_key = p; /* engine thread only: qsort has no context argument in C11 */
        qsort(cand, (size_t)nc, sizeof *cand, by_prob_desc);
        if (sp->top_k > 0 && sp->top_k < nc)
            nc = sp->top_k;
        if (sp->top_p > 0 && sp->top_p < 1.0f) {
            double z = 0, acc = 0;
            for (int i = 0; i < nc; i++)
                z += p[cand[i]];
            for (int i = 0; i < nc; i++) {
                acc += p[cand[i]];
                if (acc >= sp->top_p * z) {
                    nc = i + 1;
                    break;
                }
            }
        }
    }
    double z = 0;
    for (int i = 0; i < nc; i++)
        z += p[cand[i]];
    double target = u * z, acc = 0;
    for (int i = 0; i < nc; i++) {
        acc += p[cand[i]];
        if (acc > target)
            return cand[i];
    }
    return cand[nc - 1];
}

void sampler_logprobs(const float *raw, int V, int32_t token, int k, float *token_lp,
                      struct engine_logprob *top)
{
    float mx = raw[argmax(raw, V)];
    double z = 0;
    for (int t = 0; t < V; t++)
        z += exp((double)(raw[t] - mx));
    double lz = log(z) + mx;
    *token_lp = (float)(raw[token] - lz);
    /* top-k by insertion into a sorted array (k <= 20); ties keep the lower id first */
    int n = 0;
    for (int t = 0; t < V && k > 0; t++) {
        if (n == k && raw[t] <= top[k - 1].logprob)
            continue;
        int i = n < k ? n++ : k - 1;
        while (i > 0 && top[i - 1].logprob < raw[t]) {
            top[i] = top[i - 1];
            i--;
        }
        top[i].token = t;
        top[i].logprob = raw[t];
    }
    for (int i = 0; i < n; i++)
        top[i].logprob = (float)(top[i].logprob - lz);
}
