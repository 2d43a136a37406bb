/*
 * engine.h - the serving core: continuous batching of generation requests over a backend.
 *
 * One engine thread runs steps; every other thread talks to it through this API:
 *   engine_submit()  from any thread: queue a request, get a handle (or fail fast: ERR_BUSY when
 *                    the waiting queue is full or the engine drains, ERR_INVAL / ERR_RANGE for a
 *                    request that can never run, e.g. prompt + max_tokens > max_model_len).
 *   engine_poll()    from the consumer's thread: take the handle's next event (tokens with their
 *                    text delta, logprobs, finish with reason and usage, error). Events are never
 *                    lost or duplicated. The engine calls params.notify (from the engine thread)
 *                    whenever it appends events; notify must be cheap and thread safe (the server
 *                    uses uv_async_send, which coalesces: after a wakeup, poll until empty).
 *   engine_cancel()  from any thread: the request stops at the next step and its cache is free
 *                    by the end of that step; a finish event with reason ABORT follows.
 *   engine_req_release()  the consumer is done with the handle (cancels it if still running).
 *                    The handle is freed exactly once, when both the consumer and the engine
 *                    have released it.
 *
 * Each step mixes the decode tokens of running sequences with chunks of pending prefills under
 * a per-step token budget (chunked prefill), admits waiting requests FCFS within priority while
 * state slots and cache blocks allow, and preempts (frees, then recomputes later) the most
 * recently admitted sequence when the cache runs out mid-generation.
 *
 * THREAD SAFETY: as stated per function above. struct engine_stats fields are atomics-backed
 * snapshots safe to read from any thread without taking the engine's step lock.
 */
#ifndef DSV4_ENGINE_H
#define DSV4_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "engine/tokenizer.h"

#define ENGINE_MAX_TOP_LOGPROBS 20
#define ENGINE_MAX_STOP 16

struct engine;
struct engine_req;

struct engine_config {
    int max_num_seqs;        /* sequences running at once (state slots); default 64 */
    int max_model_len;       /* prompt + completion tokens per sequence; default 65536 */
    int max_queue;           /* waiting requests before submit fails with ERR_BUSY; default 1024 */
    long max_queue_tokens;   /* waiting prompt tokens before ERR_BUSY; default 1 << 22 */
    int max_step_tokens;     /* token budget of one step (decode + prefill chunks); default 2048 */
    int n_blocks;            /* compressed-KV blocks of 128 tokens; 0: enough for max_num_seqs x
                                max_model_len capped at cache_bytes */
    size_t cache_bytes;      /* cap on the block pool when n_blocks is 0; default 1 GiB */
};

struct engine_logit_bias {
    int32_t token;
    float bias;
};

struct engine_sampling {
    float temperature;        /* 0: greedy */
    float top_p;              /* (0, 1]; 1: off */
    int top_k;                /* <= 0: off */
    float min_p;              /* [0, 1]; 0: off */
    float presence_penalty;   /* OpenAI semantics, over generated tokens */
    float frequency_penalty;
    float repetition_penalty; /* > 0; 1: off (vLLM semantics, over prompt + generated) */
    uint64_t seed;            /* with has_seed: output depends only on (seed, choice index) */
    int has_seed;
    const struct engine_logit_bias *logit_bias; /* copied at submit */
    int n_logit_bias;
};

struct engine_params {
    const int32_t *prompt;   /* (n_prompt), copied at submit */
    int n_prompt;
    int max_tokens;          /* completion tokens per choice (>= 1) */
    int n;                   /* choices sharing the prompt's prefill (1..16) */
    struct engine_sampling sampling;
    int logprobs;            /* -1: none; 0..ENGINE_MAX_TOP_LOGPROBS alternatives per token */
    int ignore_eos;
    const int32_t *stop_ids; /* extra stop token ids, copied */
    int n_stop_ids;
    const char *const *stop; /* stop strings (matched on the detokenized text), copied */
    int n_stop;
    int detokenize;          /* produce text deltas (needs the engine's tokenizer) */
    unsigned detok_flags;    /* tok_decode flags (e.g. skip special tokens) */
    double deadline;         /* CLOCK_MONOTONIC seconds; 0: none. Past it: finish ABORT */
    int priority;            /* lower runs first; FCFS within a priority */
    void (*notify)(void *ud);
    void *notify_ud;
};

enum engine_event_type { ENGINE_EV_TOKEN = 1, ENGINE_EV_FINISH, ENGINE_EV_ERROR };
enum engine_finish { ENGINE_FINISH_STOP, ENGINE_FINISH_LENGTH, ENGINE_FINISH_ABORT,
                     ENGINE_FINISH_ERROR };

struct engine_logprob {
    int32_t token;
    float logprob;
};

struct engine_event {
    enum engine_event_type type;
    int choice;                 /* 0 .. n-1 */
    double t;                   /* CLOCK_MONOTONIC seconds when the event was made */
    /* TOKEN */
    int32_t token;              /* -1: no new token, only the text the detokenizer held back
                                   (an unfinished UTF-8 sequence), released at the choice's end */
    float logprob;              /* of the sampled token under the model's distribution */
    int n_top;                  /* top alternatives (descending logprob), when asked */
    struct engine_logprob top[ENGINE_MAX_TOP_LOGPROBS];
    char *text;                 /* text released with this token (malloc'd, may be ""; NULL when
                                   not detokenizing); stop-string prefixes are held back */
    size_t text_len;
    /* FINISH (one per choice) */
    enum engine_finish finish;
    int32_t stop_token;         /* the stop token id that ended it, or -1 */
    char *stop_str;             /* the stop string matched (malloc'd) or NULL */
    int prompt_tokens, completion_tokens;
    double queue_time;          /* submit -> first scheduled, seconds */
    /* ERROR */
    int err;
    char message[256];
};

/* Free an event's owned strings (text, stop_str); the struct itself is the caller's. */
void engine_event_clear(struct engine_event *ev);

/* ---- lifecycle ---- */

void engine_config_defaults(struct engine_config *c);
/*
 * A new engine over a model (borrowed; must outlive the engine) and a tokenizer (borrowed, may
 * be NULL: then requests may not ask for detokenize or stop strings). Allocates the state slots
 * and the block pool; prints nothing. Start the thread with engine_start.
 */
int engine_new(struct engine **out, struct dsv4_model *m, const struct tokenizer *tok,
               const struct engine_config *cfg);
/*
 * Fill in what a config leaves to the model: cap max_model_len at the model's positions and,
 * when n_blocks is 0, size the block pool (max_num_seqs x max_model_len, capped by cache_bytes).
 * For callers that build their own backend (the CUDA one) with engine_new_with_backend.
 */
int engine_config_resolve(struct engine_config *c, const struct dsv4_model *m);
/* The same over any backend (takes ownership of be, even on failure); max_num_seqs and
 * n_blocks come from the backend. Used by tests with a fake backend and by the GPU backend. */
struct backend;
int engine_new_with_backend(struct engine **out, struct backend *be, const struct tokenizer *tok,
                            const struct engine_config *cfg);
int engine_start(struct engine *e);
/* Stop admitting new requests (submit fails with ERR_BUSY); running ones continue. */
void engine_drain(struct engine *e);
/* Cancel everything, join the thread, free. Handles still held by consumers stay valid until
 * released (their final events are delivered). */
void engine_free(struct engine *e);

/* ---- requests ---- */

int engine_submit(struct engine *e, const struct engine_params *p, struct engine_req **out);
void engine_cancel(struct engine_req *r);
/* 1: *ev filled (clear it with engine_event_clear); 0: nothing pending now. */
int engine_poll(struct engine_req *r, struct engine_event *ev);
/* All choices have finished and every event has been polled. */
int engine_req_done(struct engine_req *r);
void engine_req_release(struct engine_req *r);

/* ---- observability ---- */

struct engine_stats {
    int running;                /* sequences in the running set */
    int waiting;                /* requests waiting for admission */
    double cache_usage;         /* fraction of blocks in use */
    long prompt_tokens_total;   /* prompt tokens processed (prefill, counting recomputation) */
    long generation_tokens_total;
    long preemptions_total;
    long steps_total;
    int failed;                 /* the backend failed; the engine refuses new work */
    int live_requests;          /* request handles not yet freed (consumer or engine holds one) */
    int max_num_seqs, n_blocks;
    size_t block_bytes;         /* bytes of one 128-token block */
    size_t state_bytes;         /* bytes of one sequence's fixed state */
};
void engine_get_stats(const struct engine *e, struct engine_stats *s);

#endif
