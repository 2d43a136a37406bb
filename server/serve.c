/*
 * serve.c - `dsv4d serve`: configuration, the loop, loading, signals and the drain.
 *
 * Lifecycle:
 *   1. parse flags/env; bind the socket first (so probes get answers while the model loads);
 *      /health 200 {"status":"loading"}, /ready 503 "Loading model", generations 503.
 *   2. a pool thread opens the model and the tokenizer, starts the engine and runs a one-token
 *      warm-up; then /ready turns 200 and the address is logged.
 *   3. SIGTERM (or a first SIGINT): /ready 503 at once, new generations 503 (engine_drain),
 *      running ones continue for up to --shutdown-timeout, then are cancelled (their streams end
 *      with finish_reason "abort"); once none is left the server stops and cli_serve returns 0.
 *      A second SIGINT cancels everything and returns at once (status 130).
 *
 * THREAD SAFETY: the loop thread runs everything here except load_run (a libuv pool thread),
 * which touches only s->model/tok/engine/load_* until its after-callback runs on the loop.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/err.h"
#ifdef DSV4_HAVE_CUDA
#include "engine/backend_cuda.h"
#include "engine/kvcache.h"
#endif
#include "server/cli.h"
#include "server/log.h"
#include "server/srv.h"

double srv_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void srv_begin_stop(struct srv *s);

/* ---- loading (pool thread) ---- */

static void warm_notify(void *ud)
{
    (void)ud;
}

static int warm_up(struct srv *s)
{
    int32_t prompt[2] = {0, 1};
    struct engine_params p = {0};
    struct engine_req *r = NULL;
    p.prompt = prompt;
    p.n_prompt = 2;
    p.max_tokens = 1;
    p.n = 1;
    p.sampling.temperature = 0;
    p.sampling.top_p = 1;
    p.sampling.repetition_penalty = 1;
    p.logprobs = -1;
    p.ignore_eos = 1;
    p.detokenize = 1;
    p.notify = warm_notify;
    int rc = engine_submit(s->engine, &p, &r);
    if (rc < 0)
        return rc;
    double t_end = srv_now() + 600;
    struct engine_event ev;
    int failed = 0;
    while (!engine_req_done(r) && srv_now() < t_end) {
        while (engine_poll(r, &ev) == 1) {
            if (ev.type == ENGINE_EV_ERROR ||
                (ev.type == ENGINE_EV_FINISH && ev.finish == ENGINE_FINISH_ERROR)) {
                err_setf(ev.err ? ev.err : ERR_INVAL, "warm-up failed: %s", ev.message);
                failed = 1;
            }
            engine_event_clear(&ev);
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    while (engine_poll(r, &ev) == 1)
        engine_event_clear(&ev);
    int done = engine_req_done(r);
    engine_req_release(r);
    if (failed)
        return ERR_INVAL;
    return done ? 0 : err_setf(ERR_BUSY, "warm-up did not finish in 600 s");
}

static void load_run(uv_work_t *w)
{
    struct srv *s = w->data;
    char tok_path[1200];
    double t0 = srv_now();
    int rc;
    LOG_I("loading model %s (device %s)", s->cfg.model, s->cfg.device);
#ifndef DSV4_HAVE_CUDA
    if (!strcmp(s->cfg.device, "cuda")) {
        rc = err_setf(ERR_UNSUPPORTED, "--device cuda: this dsv4d was built without CUDA "
                                       "(meson -Dcuda=enabled with nvcc)");
        goto fail;
    }
#endif
    if ((rc = dsv4_model_open(&s->model, s->cfg.model)) < 0)
        goto fail;
    LOG_I("model loaded in %.2f s: %d layers, vocab %d, max positions %ld", srv_now() - t0,
          s->model->cfg.n_layers, s->model->cfg.vocab_size,
          s->model->cfg.max_position_embeddings);
    srv_config_tokenizer(&s->cfg, tok_path, sizeof tok_path);
    LOG_I("loading tokenizer %s", tok_path);
    if ((rc = tok_load(tok_path, &s->tok)) < 0) {
        err_prefix(rc, "tokenizer (set --tokenizer or DSV4D_TOKENIZER; deploy/install-deps.sh "
                       "installs the DeepSeek-V4 one)");
        goto fail;
    }
    if (tok_n_ids(s->tok) > s->model->cfg.vocab_size)
        LOG_W("the tokenizer has %d ids but the model only %d", tok_n_ids(s->tok),
              s->model->cfg.vocab_size);
    s->vocab_size = s->model->cfg.vocab_size;
    s->eos_token = s->model->cfg.eos_token_id;

    struct engine_config ec;
    engine_config_defaults(&ec);
    ec.max_num_seqs = s->cfg.max_num_seqs;
    ec.max_step_tokens = s->cfg.max_num_batched_tokens;
    if (s->cfg.max_model_len > 0)
        ec.max_model_len = s->cfg.max_model_len;
    if (ec.max_model_len > s->model->cfg.max_position_embeddings)
        ec.max_model_len = (int)s->model->cfg.max_position_embeddings;
    ec.max_queue = s->cfg.max_queue > 0 ? s->cfg.max_queue : 1;
    s->max_model_len = ec.max_model_len;
    LOG_I("starting the engine: max_num_seqs %d, max_model_len %d, max_queue %d",
          ec.max_num_seqs, ec.max_model_len, ec.max_queue);
    if (!strcmp(s->cfg.device, "cuda")) {
#ifdef DSV4_HAVE_CUDA
        struct backend *be;
        struct backend_cuda_opts bo;
        backend_cuda_opts_defaults(&bo);
        bo.n_slots = ec.max_num_seqs;
        /* the cache pool takes what the memory budget leaves, up to every sequence at full
         * length */
        long want = (long)ec.max_num_seqs * dsv4_kv_blocks_for(ec.max_model_len);
        bo.n_blocks = want < (1L << 30) ? (int)want : 1 << 30;
        bo.max_step_tokens = ec.max_step_tokens;
        bo.max_model_len = ec.max_model_len;
        bo.mem_util = s->cfg.gpu_memory_utilization;
        bo.progress = 1;
        LOG_I("loading the weights onto the GPU (--gpu-memory-utilization %.2f%s)",
              bo.mem_util, bo.exact ? ", exact kernels: DSV4_CUDA_EXACT" : "");
        if ((rc = backend_cuda_new_opts(&be, s->model, &bo)) < 0 ||
            (rc = engine_new_with_backend(&s->engine, be, s->tok, &ec)) < 0)
            goto fail;
#endif
    } else if ((rc = engine_new(&s->engine, s->model, s->tok, &ec)) < 0) {
        goto fail;
    }
    if ((rc = engine_start(s->engine)) < 0)
        goto fail;
    {
        /* cache sizing: compressed entries per 128-token block + fixed state per sequence */
        struct engine_stats st;
        engine_get_stats(s->engine, &st);
        LOG_I("kv cache: %.1f bytes per token (compressed entries, %zu bytes per %d-token block), "
              "%.2f MiB fixed state per sequence (windows + compressor state); %d blocks = "
              "%.1f MiB for %d sequences",
              (double)st.block_bytes / DSV4_BLOCK_TOKENS, st.block_bytes, DSV4_BLOCK_TOKENS,
              (double)st.state_bytes / (1 << 20), st.n_blocks,
              (double)st.block_bytes * st.n_blocks / (1 << 20), st.max_num_seqs);
    }
    double t1 = srv_now();
    LOG_I("warming up");
    if ((rc = warm_up(s)) < 0)
        goto fail;
    LOG_I("warm-up done in %.2f s (%.2f s since start of loading)", srv_now() - t1,
          srv_now() - t0);
    s->load_rc = 0;
    return;
fail:
    s->load_rc = rc;
    snprintf(s->load_err, sizeof s->load_err, "%s (%s)", err_msg(), err_str(rc));
}

static void load_after(uv_work_t *w, int status)
{
    struct srv *s = w->data;
    (void)status;
    s->load_done = 1;
    if (s->state == SRV_STOPPING || s->state == SRV_DRAINING) {
        srv_begin_stop(s);
        return;
    }
    if (s->load_rc < 0) {
        s->state = SRV_FAILED;
        LOG_E("loading failed: %s; /health now answers 500 (stop with SIGTERM)", s->load_err);
        return;
    }
    s->state = SRV_READY;
    srv_log_force(LOG_INFO, "ready: serving %s at http://%s:%u (OpenAI API under /v1)", s->cfg.served_model_name,
          s->cfg.host, s->port);
}

/* ---- shutdown ---- */

static void on_closed(uv_handle_t *h)
{
    (void)h;
}

static void close_if(uv_handle_t *h)
{
    if (h->loop && !uv_is_closing(h))
        uv_close(h, on_closed);
}

/* Stop everything; the loop then ends. Needs the load work to have finished (it frees the
 * engine and model the work made). */
static void srv_begin_stop(struct srv *s)
{
    s->state = SRV_STOPPING;
    if (!s->load_done)
        return; /* load_after calls us again */
    uv_timer_stop(&s->drain_timer);
    uv_timer_stop(&s->heartbeat);
    http_stop(s);
    if (s->engine) {
        engine_free(s->engine); /* joins the engine thread: no notify after this */
        s->engine = NULL;
    }
    close_if((uv_handle_t *)&s->wake_async);
    close_if((uv_handle_t *)&s->heartbeat);
    close_if((uv_handle_t *)&s->drain_timer);
    close_if((uv_handle_t *)&s->sig_term);
    close_if((uv_handle_t *)&s->sig_int);
    close_if((uv_handle_t *)&s->mhd_poll);
    close_if((uv_handle_t *)&s->mhd_timer);
}

static void on_drain_tick(uv_timer_t *t)
{
    struct srv *s = t->data;
    double waited = srv_now() - s->drain_start;
    if (s->n_gens == 0) {
        LOG_I("drained; stopping");
        srv_begin_stop(s);
        return;
    }
    if (!s->drain_cancelled && waited >= s->cfg.shutdown_timeout) {
        s->drain_cancelled = 1;
        gen_cancel_all(s, "--shutdown-timeout reached");
        return;
    }
    if (s->drain_cancelled && waited >= s->cfg.shutdown_timeout + 5) {
        LOG_W("%d request(s) did not end after cancelling; closing them", s->n_gens);
        srv_begin_stop(s);
    }
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct srv *s = h->data;
    if (signum == SIGINT && ++s->sigint_count >= 2) {
        LOG_W("second SIGINT: exiting now");
        s->exit_code = 130;
        if (!s->load_done) {
            /* the pool thread is still loading and cannot be interrupted: leave it (and s)
             * to the process exit */
            s->abandon = 1;
            uv_stop(&s->loop);
            return;
        }
        srv_begin_stop(s);
        return;
    }
    if (s->state == SRV_DRAINING || s->state == SRV_STOPPING)
        return;
    LOG_I("%s: draining (up to %.0f s for %d running request(s)); /ready now answers 503",
          signum == SIGTERM ? "SIGTERM" : "SIGINT", s->cfg.shutdown_timeout, s->n_gens);
    int was_loading = !s->load_done;
    s->state = SRV_DRAINING;
    if (s->engine)
        engine_drain(s->engine);
    if (was_loading) {
        srv_begin_stop(s);
        return;
    }
    s->drain_start = srv_now();
    uv_timer_start(&s->drain_timer, on_drain_tick, 0, 50);
}

static void on_heartbeat(uv_timer_t *t)
{
    struct srv *s = t->data;
    gen_heartbeat(s, srv_now());
    http_drive(s);
}

/* ---- entry ---- */

static struct MHD_Response *static_json(const char *body)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_PERSISTENT);
    if (r)
        MHD_add_response_header(r, "Content-Type", "application/json");
    return r;
}

int cli_serve(int argc, char **argv)
{
    struct srv *s = calloc(1, sizeof *s);
    int rc;
    if (!s)
        return 1;
    rc = srv_config_parse(&s->cfg, argc, argv, stdout, stderr);
    if (rc != 0) {
        free(s);
        return rc == 1 ? 0 : 2;
    }
    srv_log_set_level(s->cfg.log_level);
    signal(SIGPIPE, SIG_IGN);
    s->created = (long long)time(NULL);
    s->state = SRV_LOADING;
    s->max_model_len = s->cfg.max_model_len;
    metrics_init(&s->metrics);
    uv_loop_init(&s->loop);
    long cap = (long)s->cfg.max_queue + s->cfg.max_num_seqs + s->cfg.max_connections;
    if (cap > (1 << 20))
        cap = 1 << 20;
    s->resp_health = static_json("{\"status\":\"ok\"}");
    s->resp_health_loading = static_json("{\"status\":\"loading\"}");
    if (!s->resp_health || !s->resp_health_loading ||
        srv_wake_init(&s->wake, (int)cap, s) < 0) {
        LOG_E("out of memory");
        rc = 1;
        goto out;
    }
    uv_async_init(&s->loop, &s->wake_async, gen_on_wake);
    s->wake_async.data = s;
    uv_timer_init(&s->loop, &s->heartbeat);
    s->heartbeat.data = s;
    uv_timer_init(&s->loop, &s->drain_timer);
    s->drain_timer.data = s;
    uv_signal_init(&s->loop, &s->sig_term);
    s->sig_term.data = s;
    uv_signal_init(&s->loop, &s->sig_int);
    s->sig_int.data = s;

    if ((rc = http_start(s)) < 0) {
        LOG_E("%s", err_msg());
        s->load_done = 1;
        srv_begin_stop(s);
        uv_run(&s->loop, UV_RUN_DEFAULT);
        rc = 1;
        goto out;
    }
    srv_log_force(LOG_INFO, "dsv4d listening on http://%s:%u (loading; /ready answers 503 until done)", s->cfg.host,
          s->port);
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_signal, SIGINT);
    uint64_t hb = (uint64_t)(s->cfg.heartbeat * 1000);
    uv_timer_start(&s->heartbeat, on_heartbeat, hb, hb);
    s->load_work.data = s;
    uv_queue_work(&s->loop, &s->load_work, load_run, load_after);

    uv_run(&s->loop, UV_RUN_DEFAULT);
    rc = s->exit_code;
    if (s->abandon)
        return rc;
    LOG_I("stopped");
out:
    if (uv_loop_close(&s->loop) != 0)
        LOG_W("the event loop still had open handles at exit");
    if (s->engine)
        engine_free(s->engine);
    tok_free(s->tok);
    dsv4_model_free(s->model);
    if (s->resp_health)
        MHD_destroy_response(s->resp_health);
    if (s->resp_health_loading)
        MHD_destroy_response(s->resp_health_loading);
    srv_wake_free(&s->wake);
    free(s);
    return rc;
}
