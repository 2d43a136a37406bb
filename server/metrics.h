/*
 * metrics.h - the /metrics page: Prometheus text format (version 0.0.4), vLLM's metric names
 * and histogram buckets under the `dsv4d:` prefix, each with a model_name label.
 *
 *   gauges      dsv4d:num_requests_running, dsv4d:num_requests_waiting, dsv4d:kv_cache_usage_perc,
 *               dsv4d:engine_healthy
 *   counters    dsv4d:prompt_tokens_total, dsv4d:generation_tokens_total,
 *               dsv4d:num_preemptions_total, dsv4d:request_success_total{finished_reason},
 *               dsv4d:http_requests_total{handler,method,status}
 *   histograms  dsv4d:time_to_first_token_seconds, dsv4d:inter_token_latency_seconds,
 *               dsv4d:e2e_request_latency_seconds, dsv4d:request_queue_time_seconds,
 *               dsv4d:request_prompt_tokens, dsv4d:request_generation_tokens
 *
 * The gauges and token counters come from engine_get_stats (atomics: no lock shared with the
 * engine's step). Everything else is written and read on the HTTP loop thread only.
 *
 * THREAD SAFETY: loop thread only.
 */
#ifndef DSV4_SERVER_METRICS_H
#define DSV4_SERVER_METRICS_H

#include <stdint.h>

#include "engine/engine.h"
#include "engine/tbuf.h"

#define METRICS_MAX_BUCKETS 24

struct metrics_hist {
    const double *le; /* upper bounds (n) */
    int n;
    uint64_t count[METRICS_MAX_BUCKETS + 1]; /* per bucket, not cumulative; [n] is +Inf */
    double sum;
};

enum metrics_route {
    MR_COMPLETIONS, MR_CHAT, MR_MODELS, MR_MODEL, MR_TOKENIZE, MR_DETOKENIZE, MR_HEALTH,
    MR_READY, MR_METRICS, MR_OTHER, MR__COUNT
};

#define METRICS_N_STATUS 14

struct srv_metrics {
    struct metrics_hist ttft, itl, e2e, queue, prompt_tokens, gen_tokens;
    uint64_t success[4];                                  /* by enum engine_finish */
    uint64_t http[MR__COUNT][2][METRICS_N_STATUS];        /* route x (GET, POST) x status */
};

void metrics_init(struct srv_metrics *m);
void metrics_observe(struct metrics_hist *h, double v);
void metrics_http(struct srv_metrics *m, enum metrics_route r, int is_post, int status);

/* Append the page. stats may be NULL while the model loads. */
int metrics_render(const struct srv_metrics *m, const struct engine_stats *stats, int healthy,
                   const char *model_name, struct tbuf *out);

#endif
