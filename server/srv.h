/*
 * srv.h - the server's shared state and the functions the server/ files call on each other.
 *
 * Threads:
 *   loop thread    runs the libuv loop, which owns libmicrohttpd (external epoll mode, driven by
 *                  one uv_poll on MHD's epoll fd plus a uv_timer for MHD's timeouts), every HTTP
 *                  callback, every struct http_req / struct gen, the metrics, the heartbeat,
 *                  signals and the drain. Nothing below is locked unless said otherwise.
 *   engine thread  calls srv_wake_notify (engine_params.notify) after it appends events; that
 *                  only marks a wake slot dirty under wake.mu and calls uv_async_send.
 *   load thread    (libuv's pool, once) opens the model and tokenizer, starts the engine and
 *                  runs a warm-up generation; the loop learns the result in its after-work
 *                  callback.
 *
 * Wakeups (uv_async_send coalesces): each live generation owns one slot of a fixed table that
 * is allocated once and never moves, so the engine's notify_ud (a slot pointer) stays valid for
 * the server's life whatever the engine's timing; a slot reused by a later generation can at
 * worst receive a spurious wakeup, which is harmless (poll returns nothing).
 */
#ifndef DSV4_SERVER_SRV_H
#define DSV4_SERVER_SRV_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdint.h>
#include <uv.h>

#include "api/api.h"
#include "engine/engine.h"
#include "engine/model.h"
#include "engine/tbuf.h"
#include "engine/tokenizer.h"
#include "server/config.h"
#include "server/metrics.h"

struct gen;

enum srv_state {
    SRV_LOADING,  /* bound; /ready 503 until the model is loaded and warmed */
    SRV_READY,
    SRV_DRAINING, /* SIGTERM: /ready 503, new generations 503, running ones finish */
    SRV_FAILED,   /* loading or the engine failed: /health 500 */
    SRV_STOPPING, /* tearing down */
};

struct wake_slot {
    struct srv *srv;  /* constant */
    struct gen *g;    /* loop thread only; NULL when free */
    int next_free;    /* loop thread only */
    int dirty;        /* under wake.mu */
    int next_dirty;   /* under wake.mu */
};

struct srv_wake {
    pthread_mutex_t mu;
    struct wake_slot *slots; /* fixed (cap), never reallocated */
    int *scratch;            /* (cap) loop thread: the dirty slots taken in one wakeup */
    int cap;
    int free_head;  /* loop thread only */
    int dirty_head; /* under mu */
};

struct srv {
    struct srv_config cfg;
    uv_loop_t loop;
    struct MHD_Daemon *mhd;
    uv_poll_t mhd_poll;
    uv_timer_t mhd_timer, heartbeat, drain_timer;
    uv_async_t wake_async;
    uv_signal_t sig_term, sig_int;
    uv_work_t load_work;
    int load_done; /* the load work's after-callback ran */
    int abandon;   /* second SIGINT while loading: return without cleanup */

    enum srv_state state;
    int sigint_count;
    double drain_start;
    int drain_cancelled;

    /* set by the load thread, read by the loop only after the load's after-callback */
    struct dsv4_model *model;
    struct tokenizer *tok;
    struct engine *engine;
    int load_rc;
    char load_err[512];
    int max_model_len;
    int vocab_size;
    int eos_token;

    struct srv_wake wake;
    struct gen *gens; /* live generations (doubly linked) */
    int n_gens;

    struct srv_metrics metrics;
    struct MHD_Response *resp_health, *resp_health_loading; /* shared static responses */
    long long created;      /* unix time at start (model cards) */
    unsigned short port;    /* the bound port */
    uint64_t id_counter;
    int exit_code;
};

/* ---- http.c: MHD <-> libuv glue (loop thread) ---- */

enum http_state { HR_READING, HR_WAITING, HR_RESPONDED };

/* One HTTP request. Created on MHD's first access-handler call, freed at NOTIFY_COMPLETED. */
struct http_req {
    struct srv *srv;
    struct MHD_Connection *conn;
    enum metrics_route route;
    int is_post, is_get, is_options;
    const char *url;        /* borrowed from MHD; valid until completion */
    char model_id[256];     /* /v1/models/{id} */
    struct tbuf body;       /* capped at cfg.max_body_bytes */
    int too_large;
    enum http_state state;
    int suspended;          /* MHD_suspend_connection is in effect */
    int status;             /* the status queued */
    int closing;            /* the client left or the server gave up: close on resume */
    char origin[256];       /* the allowed Origin to echo, "" for none */
    struct gen *gen;        /* owned */
};

int http_start(struct srv *s);
/* Resume every suspended connection and stop MHD (NOTIFY_COMPLETED runs for every request). */
void http_stop(struct srv *s);
/* Run MHD and re-arm its timer. Call after anything that resumed a connection. */
void http_drive(struct srv *s);
void http_suspend(struct http_req *hr);
void http_resume(struct http_req *hr);

/* Queue a response (takes ownership of body, a malloc'd buffer, even on failure). */
enum MHD_Result http_respond(struct http_req *hr, int status, const char *content_type,
                             char *body, size_t len);
enum MHD_Result http_respond_json(struct http_req *hr, int status, json_t *v);
enum MHD_Result http_respond_error(struct http_req *hr, const struct api_error *e);
/* Shorthand: an error with a printf message and the default type for the status. */
enum MHD_Result http_error(struct http_req *hr, int status, const char *param, const char *code,
                           const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Add the CORS headers this request earned (if any) to a response. */
void http_add_common_headers(struct http_req *hr, struct MHD_Response *r);
/* Nonzero when the peer has closed its socket (peek without consuming). */
int http_peer_gone(struct http_req *hr);

/* ---- routes.c ---- */

/* Route the request once its body is complete (hr->state == HR_READING). */
enum MHD_Result routes_dispatch(struct http_req *hr);
/* First call (headers only): resolve the route; queue 404/405/401/413/415 early. Returns
 * MHD_YES with hr->status set when a response was queued, MHD_YES otherwise. */
enum MHD_Result routes_early(struct http_req *hr, const char *method);

/* ---- gen.c: generations ---- */

/* Start a completion or chat generation for hr (body complete). Queues an error response, or
 * submits to the engine and suspends the connection. */
enum MHD_Result gen_start(struct http_req *hr, enum api_kind kind);
/* The access handler was called again after a resume (hr->state == HR_WAITING). */
enum MHD_Result gen_resumed(struct http_req *hr);
/* Render and tokenize a chat request's prompt (shared with /tokenize). *thinking: the mode
 * used. 0 or ERR_* with *e filled (400 for messages the encoder refuses). */
int gen_prompt_chat(struct srv *s, const struct api_gen_request *r, struct tok_ids *ids,
                    int *thinking, struct api_error *e);
/* The request is over (NOTIFY_COMPLETED): cancel what runs, release, free. */
void gen_free(struct gen *g, int completed_ok);
/* Engine -> loop: drain the dirty list (uv_async callback). */
void gen_on_wake(uv_async_t *a);
/* The engine's notify callback (engine thread). */
void srv_wake_notify(void *ud);
/* Heartbeat: disconnect checks, SSE keep-alive comments, deadlines. */
void gen_heartbeat(struct srv *s, double now);
/* Cancel every live generation (drain timeout, second signal). */
void gen_cancel_all(struct srv *s, const char *why);
int srv_wake_init(struct srv_wake *w, int cap, struct srv *s);
void srv_wake_free(struct srv_wake *w);

/* ---- serve.c ---- */

double srv_now(void); /* CLOCK_MONOTONIC seconds (the engine's clock) */

#endif
