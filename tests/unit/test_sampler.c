/*
 * test_sampler.c - sampling and logprobs against independent references: greedy, the empirical
 * distribution of temperature sampling (chi-square), top-k / top-p / min-p supports, penalties,
 * logit bias, seeded reproducibility, and logprobs against a double log-softmax.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "engine/sampler.h"

#define V 50

static struct engine_sampling base(void)
{
    struct engine_sampling s;
    memset(&s, 0, sizeof s);
    s.temperature = 1.0f;
    s.top_p = 1.0f;
    s.repetition_penalty = 1.0f;
    return s;
}

static void make_logits(float *l, unsigned seed)
{
    for (int i = 0; i < V; i++) {
        seed = seed * 1103515245u + 12345u;
        l[i] = (float)((seed >> 8) % 1000) / 250.0f - 2.0f;
    }
}

/* Draw n samples; counts (V). */
static void draw(const struct engine_sampling *sp, const float *logits, int n, int *counts,
                 uint64_t seed)
{
    struct sampler_rng rng;
    float l[V];
    void *work = malloc(sampler_work_bytes(V));
    sampler_rng_seed(&rng, seed, 0);
    memset(counts, 0, sizeof(int) * V);
    for (int i = 0; i < n; i++) {
        memcpy(l, logits, sizeof l);
        int32_t t = sampler_sample(sp, l, V, NULL, &rng, work);
        assert_true(t >= 0 && t < V);
        counts[t]++;
    }
    free(work);
}

static void test_greedy(void **state)
{
    (void)state;
    float l[V];
    make_logits(l, 1);
    int best = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[best])
            best = i;
    struct engine_sampling s = base();
    s.temperature = 0;
    int counts[V];
    draw(&s, l, 20, counts, 7);
    assert_int_equal(counts[best], 20);
}

/* Temperature sampling matches softmax(l / T) (chi-square over 20000 draws). */
static void test_temperature_distribution(void **state)
{
    (void)state;
    float l[V];
    make_logits(l, 2);
    for (int k = 0; k < 2; k++) {
        struct engine_sampling s = base();
        s.temperature = k ? 0.5f : 1.3f;
        double p[V], z = 0, mx = -1e9, chi = 0;
        for (int i = 0; i < V; i++)
            mx = fmax(mx, l[i] / s.temperature);
        for (int i = 0; i < V; i++)
            z += (p[i] = exp(l[i] / s.temperature - mx));
        int counts[V], n = 20000, dof = -1;
        draw(&s, l, n, counts, 11 + (uint64_t)k);
        for (int i = 0; i < V; i++) {
            double e = n * p[i] / z;
            if (e >= 5) {
                chi += (counts[i] - e) * (counts[i] - e) / e;
                dof++;
            }
        }
        /* chi-square 99.9% quantile for ~50 dof is ~86; allow margin */
        printf("# T=%.1f chi2 %.1f (dof %d)\n", s.temperature, chi, dof);
        assert_true(chi < 2.0 * dof + 40);
    }
}

static void test_top_k_top_p_min_p_support(void **state)
{
    (void)state;
    float l[V];
    make_logits(l, 3);
    int idx[V];
    for (int i = 0; i < V; i++)
        idx[i] = i;
    for (int i = 0; i < V; i++) /* sort ids by descending logit (reference order) */
        for (int j = i + 1; j < V; j++)
            if (l[idx[j]] > l[idx[i]] || (l[idx[j]] == l[idx[i]] && idx[j] < idx[i])) {
                int t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
            }
    int counts[V];
    struct engine_sampling s = base();
    s.top_k = 5;
    draw(&s, l, 5000, counts, 5);
    for (int r = 0; r < V; r++)
        if (r >= 5)
            assert_int_equal(counts[idx[r]], 0);
        else
            assert_true(counts[idx[r]] > 0);
    /* top-p: the smallest prefix whose mass reaches p */
    s = base();
    s.top_p = 0.5f;
    double z = 0, acc = 0;
    for (int i = 0; i < V; i++)
        z += exp(l[i]);
    int keep = 0;
    while (acc < 0.5 * z)
        acc += exp(l[idx[keep++]]);
    draw(&s, l, 5000, counts, 6);
    for (int r = 0; r < V; r++)
        if (r >= keep)
            assert_int_equal(counts[idx[r]], 0);
    assert_true(counts[idx[0]] > 0 && counts[idx[keep - 1]] > 0);
    /* min-p: tokens with p < min_p * p_max never appear */
    s = base();
    s.min_p = 0.3f;
    draw(&s, l, 5000, counts, 8);
    for (int i = 0; i < V; i++)
        if (exp(l[i] - l[idx[0]]) < 0.3)
            assert_int_equal(counts[i], 0);
}

static void test_penalties_and_bias(void **state)
{
    (void)state;
    float l[V], work_l[V];
    make_logits(l, 4);
    void *work = malloc(sampler_work_bytes(V));
    struct sampler_rng rng;
    sampler_rng_seed(&rng, 1, 0);
    int32_t gen[V] = {0};
    uint8_t seen[V] = {0};
    gen[7] = 3;
    seen[7] = 1;
    seen[9] = 1; /* in the prompt only */
    struct sampler_counts counts = {gen, seen};
    struct engine_sampling s = base();
    s.temperature = 0;
    s.presence_penalty = 0.5f;
    s.frequency_penalty = 0.25f;
    s.repetition_penalty = 2.0f;
    struct engine_logit_bias b = {13, 100.0f};
    memcpy(work_l, l, sizeof l);
    sampler_sample(&s, work_l, V, &counts, &rng, work);
    float r7 = l[7] > 0 ? l[7] / 2 : l[7] * 2;
    assert_float_equal(work_l[7], r7 - 0.5f - 0.75f, 1e-6);
    assert_float_equal(work_l[9], l[9] > 0 ? l[9] / 2 : l[9] * 2, 1e-6);
    assert_float_equal(work_l[8], l[8], 0);
    s.logit_bias = &b;
    s.n_logit_bias = 1;
    memcpy(work_l, l, sizeof l);
    assert_int_equal(sampler_sample(&s, work_l, V, &counts, &rng, work), 13);
    free(work);
}

static void test_seed_reproducible(void **state)
{
    (void)state;
    float l[V];
    make_logits(l, 5);
    struct engine_sampling s = base();
    int a[V], b[V], c[V];
    draw(&s, l, 300, a, 99);
    draw(&s, l, 300, b, 99);
    draw(&s, l, 300, c, 100);
    assert_memory_equal(a, b, sizeof a);
    assert_memory_not_equal(a, c, sizeof a);
}

static void test_logprobs(void **state)
{
    (void)state;
    float l[V];
    make_logits(l, 6);
    l[17] = l[3]; /* a tie: lower id first */
    double z = 0, mx = -1e9;
    for (int i = 0; i < V; i++)
        mx = fmax(mx, l[i]);
    for (int i = 0; i < V; i++)
        z += exp(l[i] - mx);
    float lp;
    struct engine_logprob top[5];
    sampler_logprobs(l, V, 17, 5, &lp, top);
    assert_float_equal(lp, l[17] - mx - log(z), 1e-5);
    for (int j = 0; j < 5; j++) {
        int rank = 0; /* number of ids strictly better (or equal with a lower id) */
        for (int i = 0; i < V; i++)
            rank += l[i] > l[top[j].token] || (l[i] == l[top[j].token] && i < top[j].token);
        assert_int_equal(rank, j);
        assert_float_equal(top[j].logprob, l[top[j].token] - mx - log(z), 1e-5);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_temperature_distribution),
        cmocka_unit_test(test_top_k_top_p_min_p_support),
        cmocka_unit_test(test_penalties_and_bias),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_logprobs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
