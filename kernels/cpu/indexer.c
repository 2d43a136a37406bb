/*
 * indexer.c - the lightning indexer's scores and the top-k selection of compressed entries.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>

void cpu_indexer_scores(const float *q, const float *w, int Hi, int Di, const float *keys, int n,
                        float scale, float *scores)
{
    for (int s = 0; s < n; s++) {
        const float *k = keys + (size_t)s * Di;
        float acc = 0;
        for (int h = 0; h < Hi; h++) {
            float dot = cpu_dot(q + (size_t)h * Di, k, Di);
            acc += w[h] * (dot > 0 ? dot * scale : 0.0f);
        }
        scores[s] = acc;
    }
}

/* a ranks before b: larger score, then lower index */
static int ranks_before(const float *sc, int a, int b)
{
    return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
}

/* min-heap (worst at the root) of candidate indices */
static void sift_down(int *h, int n, int i, const float *sc)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && ranks_before(sc, h[w], h[l]))
            w = l;
        if (r < n && ranks_before(sc, h[w], h[r]))
            w = r;
        if (w == i)
            return;
        int t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

static void sort_ints(int *a, int n)
{
    for (int gap = n / 2; gap > 0; gap /= 2)
        for (int i = gap; i < n; i++) {
            int v = a[i], j = i;
            for (; j >= gap && a[j - gap] > v; j -= gap)
                a[j] = a[j - gap];
            a[j] = v;
        }
}

void cpu_topk(const float *scores, int n, int k, int *out)
{
    if (k >= n) {
        for (int i = 0; i < n; i++)
            out[i] = i;
        return;
    }
    if (k <= 0)
        return;
    /* out is a heap with the worst of the best k at its root; a better candidate replaces it */
    for (int i = 0; i < k; i++)
        out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--)
        sift_down(out, k, i, scores);
    for (int i = k; i < n; i++) {
        if (ranks_before(scores, i, out[0])) {
            out[0] = i;
            sift_down(out, k, 0, scores);
        }
    }
    sort_ints(out, k);
}
