/*
 * metrics.c - Prometheus text for /metrics (see metrics.h for the list and the threading).
 */
#include <stdio.h>
#include <string.h>

#include "server/metrics.h"

/* vLLM's buckets (vllm/v1/metrics/loggers.py) */
static const double ttft_le[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                 0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                 20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double itl_le[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double latency_le[] = {0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,
                                    5.0,  10.0, 15.0, 20.0, 30.0,  40.0,  50.0,
                                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
/* build_1_2_5_buckets up to 1M tokens */
static const double tokens_le[] = {1,     2,     5,     10,     20,     50,     100,
                                   200,   500,   1000,  2000,   5000,   10000,  20000,
                                   50000, 100000, 200000, 500000, 1000000};

static const int status_codes[METRICS_N_STATUS] = {200, 204, 400, 401, 404, 405, 413,
                                                   415, 429, 500, 501, 503, 504, 0};
static const char *const route_names[MR__COUNT] = {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}", "/tokenize",
    "/detokenize", "/health", "/ready", "/metrics", "other"};

#define N(a) ((int)(sizeof(a) / sizeof((a)[0])))

void metrics_init(struct srv_metrics *m)
{
    memset(m, 0, sizeof *m);
    m->ttft.le = ttft_le, m->ttft.n = N(ttft_le);
    m->itl.le = itl_le, m->itl.n = N(itl_le);
    m->e2e.le = latency_le, m->e2e.n = N(latency_le);
    m->queue.le = latency_le, m->queue.n = N(latency_le);
    m->prompt_tokens.le = tokens_le, m->prompt_tokens.n = N(tokens_le);
    m->gen_tokens.le = tokens_le, m->gen_tokens.n = N(tokens_le);
}

void metrics_observe(struct metrics_hist *h, double v)
{
    int i = 0;
    while (i < h->n && v > h->le[i])
        i++;
    h->count[i]++;
    h->sum += v;
}

void metrics_http(struct srv_metrics *m, enum metrics_route r, int is_post, int status)
{
    int k = 0;
    while (k < METRICS_N_STATUS - 1 && status_codes[k] != status)
        k++;
    m->http[r][is_post ? 1 : 0][k]++;
}

static int hist(struct tbuf *o, const char *name, const char *help, const struct metrics_hist *h,
                const char *label)
{
    int rc = tbuf_addf(o, "# HELP dsv4d:%s %s\n# TYPE dsv4d:%s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; rc == 0 && i < h->n; i++) {
        cum += h->count[i];
        rc = tbuf_addf(o, "dsv4d:%s_bucket{%s,le=\"%g\"} %llu\n", name, label, h->le[i],
                       (unsigned long long)cum);
    }
    cum += h->count[h->n];
    if (rc == 0)
        rc = tbuf_addf(o,
                       "dsv4d:%s_bucket{%s,le=\"+Inf\"} %llu\n"
                       "dsv4d:%s_sum{%s} %.9g\ndsv4d:%s_count{%s} %llu\n",
                       name, label, (unsigned long long)cum, name, label, h->sum, name, label,
                       (unsigned long long)cum);
    return rc;
}

int metrics_render(const struct srv_metrics *m, const struct engine_stats *s, int healthy,
                   const char *model_name, struct tbuf *o)
{
    char label[320];
    /* model names are ours (served-model-name); escape the two characters that matter */
    size_t k = (size_t)snprintf(label, sizeof label, "model_name=\"");
    for (const char *p = model_name; *p && k + 4 < sizeof label; p++) {
        if (*p == '"' || *p == '\\')
            label[k++] = '\\';
        label[k++] = *p == '\n' ? ' ' : *p;
    }
    label[k++] = '"';
    label[k] = 0;

    int rc = tbuf_addf(
        o,
        "# HELP dsv4d:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE dsv4d:num_requests_running gauge\ndsv4d:num_requests_running{%s} %d\n"
        "# HELP dsv4d:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE dsv4d:num_requests_waiting gauge\ndsv4d:num_requests_waiting{%s} %d\n"
        "# HELP dsv4d:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE dsv4d:kv_cache_usage_perc gauge\ndsv4d:kv_cache_usage_perc{%s} %.6g\n"
        "# HELP dsv4d:engine_healthy 1 while the engine works, 0 once it failed.\n"
        "# TYPE dsv4d:engine_healthy gauge\ndsv4d:engine_healthy{%s} %d\n"
        "# HELP dsv4d:prompt_tokens_total Number of prefill tokens processed.\n"
        "# TYPE dsv4d:prompt_tokens_total counter\ndsv4d:prompt_tokens_total{%s} %ld\n"
        "# HELP dsv4d:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE dsv4d:generation_tokens_total counter\ndsv4d:generation_tokens_total{%s} %ld\n"
        "# HELP dsv4d:num_preemptions_total Cumulative number of preemptions.\n"
        "# TYPE dsv4d:num_preemptions_total counter\ndsv4d:num_preemptions_total{%s} %ld\n",
        label, s ? s->running : 0, label, s ? s->waiting : 0, label, s ? s->cache_usage : 0.0,
        label, healthy, label, s ? s->prompt_tokens_total : 0L, label,
        s ? s->generation_tokens_total : 0L, label, s ? s->preemptions_total : 0L);
    static const char *const reasons[4] = {"stop", "length", "abort", "error"};
    if (rc == 0)
        rc = tbuf_addf(o, "# HELP dsv4d:request_success_total Count of successfully processed "
                          "requests.\n# TYPE dsv4d:request_success_total counter\n");
    for (int i = 0; rc == 0 && i < 4; i++)
        rc = tbuf_addf(o, "dsv4d:request_success_total{%s,finished_reason=\"%s\"} %llu\n", label,
                       reasons[i], (unsigned long long)m->success[i]);
    if (rc == 0)
        rc = hist(o, "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                  &m->ttft, label);
    if (rc == 0)
        rc = hist(o, "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                  &m->itl, label);
    if (rc == 0)
        rc = hist(o, "e2e_request_latency_seconds",
                  "Histogram of e2e request latency in seconds.", &m->e2e, label);
    if (rc == 0)
        rc = hist(o, "request_queue_time_seconds",
                  "Histogram of time spent in WAITING phase for request.", &m->queue, label);
    if (rc == 0)
        rc = hist(o, "request_prompt_tokens", "Number of prefill tokens processed.",
                  &m->prompt_tokens, label);
    if (rc == 0)
        rc = hist(o, "request_generation_tokens", "Number of generation tokens processed.",
                  &m->gen_tokens, label);
    if (rc == 0)
        rc = tbuf_addf(o, "# HELP dsv4d:http_requests_total HTTP requests by handler, method and "
                          "status.\n# TYPE dsv4d:http_requests_total counter\n");
    for (int r = 0; rc == 0 && r < MR__COUNT; r++)
        for (int p = 0; rc == 0 && p < 2; p++)
            for (int st = 0; rc == 0 && st < METRICS_N_STATUS; st++) {
                if (!m->http[r][p][st])
                    continue;
                char code[8];
                if (status_codes[st])
                    snprintf(code, sizeof code, "%d", status_codes[st]);
                else
                    snprintf(code, sizeof code, "other");
                rc = tbuf_addf(o,
                               "dsv4d:http_requests_total{handler=\"%s\",method=\"%s\","
                               "status=\"%s\"} %llu\n",
                               route_names[r], p ? "POST" : "GET", code,
                               (unsigned long long)m->http[r][p][st]);
            }
    return rc;
}
