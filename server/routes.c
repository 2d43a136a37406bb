/*
 * routes.c - the route table and the handlers that answer at once (models, tokenize,
 * detokenize, health, ready, metrics); generations go to gen.c.
 *
 *   POST /v1/completions, /v1/chat/completions        gen.c
 *   GET  /v1/models, /v1/models/{id}                   model cards (404 for another id)
 *   POST /tokenize, /detokenize (also under /v1/)      vLLM's shapes
 *   GET  /health    liveness: 200 while the process works (also while loading), 500 once the
 *                   model failed to load or the engine failed
 *   GET  /ready     readiness: 200 only when loaded, warmed and not draining; else 503
 *   GET  /metrics   Prometheus text
 *
 * Auth (--api-key) covers everything but /health, /ready and /metrics. CORS (--cors-origins)
 * echoes an allowed Origin and answers preflights (OPTIONS) with 204.
 *
 * THREAD SAFETY: loop thread only.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/err.h"
#include "server/auth.h"
#include "server/log.h"
#include "server/srv.h"

/* ---- route table ---- */

static enum metrics_route resolve(const char *url, char *model_id, size_t size)
{
    static const struct {
        const char *path;
        enum metrics_route r;
    } table[] = {
        {"/v1/completions", MR_COMPLETIONS}, {"/v1/chat/completions", MR_CHAT},
        {"/v1/models", MR_MODELS},           {"/tokenize", MR_TOKENIZE},
        {"/v1/tokenize", MR_TOKENIZE},       {"/detokenize", MR_DETOKENIZE},
        {"/v1/detokenize", MR_DETOKENIZE},   {"/health", MR_HEALTH},
        {"/ready", MR_READY},                {"/metrics", MR_METRICS},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(url, table[i].path))
            return table[i].r;
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        snprintf(model_id, size, "%s", url + 11);
        return MR_MODEL;
    }
    return MR_OTHER;
}

static int route_is_post(enum metrics_route r)
{
    return r == MR_COMPLETIONS || r == MR_CHAT || r == MR_TOKENIZE || r == MR_DETOKENIZE;
}

static int route_is_open(enum metrics_route r)
{
    return r == MR_HEALTH || r == MR_READY || r == MR_METRICS;
}

/* "application/json" or "application/json; charset=utf-8" (any case); also +json types. */
static int is_json_type(const char *ct)
{
    size_t n = strcspn(ct, ";");
    while (n && (ct[n - 1] == ' ' || ct[n - 1] == '\t'))
        n--;
    while (n && *ct == ' ')
        ct++, n--;
    if (n == 16 && !strncasecmp(ct, "application/json", 16))
        return 1;
    return n > 5 && !strncasecmp(ct + n - 5, "+json", 5);
}

/* ---- simple handlers ---- */

static enum MHD_Result respond_static(struct http_req *hr, int status, struct MHD_Response *r)
{
    enum MHD_Result ret = MHD_queue_response(hr->conn, (unsigned)status, r);
    hr->status = status;
    hr->state = HR_RESPONDED;
    metrics_http(&hr->srv->metrics, hr->route, hr->is_post, status);
    return ret;
}

static enum MHD_Result handle_health(struct http_req *hr)
{
    struct srv *s = hr->srv;
    struct engine_stats st;
    if (s->engine) {
        engine_get_stats(s->engine, &st);
        if (st.failed)
            return http_error(hr, 500, NULL, "engine_failed", "the engine failed");
    }
    if (s->state == SRV_FAILED)
        return http_error(hr, 500, NULL, "load_failed", "the model failed to load: %s",
                          s->load_err);
    if (hr->origin[0]) { /* per-request headers: cannot use the shared response */
        const char *body = s->state == SRV_LOADING ? "{\"status\":\"loading\"}"
                                                   : "{\"status\":\"ok\"}";
        return http_respond(hr, 200, "application/json", strdup(body), strlen(body));
    }
    return respond_static(hr, 200,
                          s->state == SRV_LOADING ? s->resp_health_loading : s->resp_health);
}

static enum MHD_Result handle_ready(struct http_req *hr)
{
    struct srv *s = hr->srv;
    switch (s->state) {
    case SRV_READY: {
        struct engine_stats st;
        engine_get_stats(s->engine, &st);
        if (st.failed)
            return http_error(hr, 503, NULL, "engine_failed", "the engine failed");
        const char *body = "{\"status\":\"ready\"}";
        return http_respond(hr, 200, "application/json", strdup(body), strlen(body));
    }
    case SRV_LOADING:
        return http_error(hr, 503, NULL, "loading", "Loading model");
    case SRV_FAILED:
        return http_error(hr, 503, NULL, "load_failed", "the model failed to load: %s",
                          s->load_err);
    default:
        return http_error(hr, 503, NULL, "draining", "the server is shutting down");
    }
}

static enum MHD_Result handle_metrics(struct http_req *hr)
{
    struct srv *s = hr->srv;
    struct tbuf out = {0};
    struct engine_stats st;
    int healthy = s->state != SRV_FAILED;
    if (s->engine) {
        engine_get_stats(s->engine, &st);
        healthy = healthy && !st.failed;
    }
    if (metrics_render(&s->metrics, s->engine ? &st : NULL, healthy, s->cfg.served_model_name,
                       &out) < 0) {
        tbuf_free(&out);
        return http_error(hr, 500, NULL, NULL, "out of memory");
    }
    size_t len = 0;
    char *body = tbuf_take(&out, &len);
    return http_respond(hr, 200, "text/plain; version=0.0.4; charset=utf-8", body, len);
}

static json_t *model_card(struct srv *s)
{
    return api_model_card(s->cfg.served_model_name, s->cfg.model, s->created,
                          s->max_model_len ? s->max_model_len : s->cfg.max_model_len);
}

static enum MHD_Result handle_models(struct http_req *hr)
{
    json_t *card = model_card(hr->srv);
    return http_respond_json(hr, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", card));
}

static enum MHD_Result handle_model(struct http_req *hr)
{
    struct srv *s = hr->srv;
    if (strcmp(hr->model_id, s->cfg.served_model_name))
        return http_error(hr, 404, "model", "model_not_found", "The model `%s` does not exist.",
                          hr->model_id);
    return http_respond_json(hr, 200, model_card(s));
}

static const char *token_text(void *ud, int32_t id, size_t *len)
{
    return tok_id_bytes(ud, id, len);
}

static enum MHD_Result handle_tokenize(struct http_req *hr)
{
    struct srv *s = hr->srv;
    struct api_error e = {0};
    struct tok_ids ids = {0};
    json_t *root = api_parse_object(hr->body.s, hr->body.len, &e);
    if (!root)
        return http_respond_error(hr, &e);
    json_t *prompt = json_object_get(root, "prompt");
    json_t *messages = json_object_get(root, "messages");
    json_t *strs = json_object_get(root, "return_token_strs");
    int rc = 0;
    if (strs && !json_is_boolean(strs) && !json_is_null(strs)) {
        rc = api_error_set(&e, 400, NULL, "return_token_strs", NULL,
                           "'return_token_strs' must be a boolean");
    } else if (json_is_string(prompt)) {
        rc = tok_encode(s->tok, json_string_value(prompt), json_string_length(prompt),
                        TOK_ENC_ADDED, &ids);
        if (rc < 0)
            api_error_set(&e, 400, NULL, "prompt", NULL, "cannot tokenize: %s", err_msg());
    } else if (json_is_array(messages)) {
        struct api_gen_request req;
        int thinking = 0;
        rc = api_parse_gen(API_KIND_CHAT, hr->body.s, hr->body.len, &req, &e);
        if (rc == 0) {
            rc = gen_prompt_chat(s, &req, &ids, &thinking, &e);
            api_gen_request_free(&req);
        }
    } else {
        rc = api_error_set(&e, 400, NULL, "prompt", NULL,
                           "'prompt' (a string) or 'messages' (a list) is required");
    }
    if (rc < 0) {
        json_decref(root);
        tok_ids_free(&ids);
        return http_respond_error(hr, &e);
    }
    json_t *toks = json_array();
    json_t *tstrs = json_is_true(strs) ? json_array() : NULL;
    for (size_t i = 0; i < ids.n; i++) {
        json_array_append_new(toks, json_integer(ids.v[i]));
        if (tstrs) {
            size_t n = 0;
            const char *p = token_text(s->tok, ids.v[i], &n);
            json_array_append_new(tstrs, api_string_lossy(p ? p : "", p ? n : 0));
        }
    }
    json_t *out = json_pack("{s:i, s:i, s:o}", "count", (int)ids.n, "max_model_len",
                            s->max_model_len, "tokens", toks);
    if (out && tstrs)
        json_object_set_new(out, "token_strs", tstrs);
    else
        json_decref(tstrs);
    json_decref(root);
    tok_ids_free(&ids);
    return http_respond_json(hr, 200, out);
}

static enum MHD_Result handle_detokenize(struct http_req *hr)
{
    struct srv *s = hr->srv;
    struct api_error e = {0};
    json_t *root = api_parse_object(hr->body.s, hr->body.len, &e);
    if (!root)
        return http_respond_error(hr, &e);
    json_t *toks = json_object_get(root, "tokens");
    size_t n = json_array_size(toks);
    int32_t *ids = n ? malloc(n * sizeof *ids) : NULL;
    if (!json_is_array(toks) || (n && !ids)) {
        free(ids);
        json_decref(root);
        return http_error(hr, 400, "tokens", NULL, "'tokens' must be a list of token ids");
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(toks, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= s->vocab_size) {
            free(ids);
            json_decref(root);
            return http_error(hr, 400, "tokens", NULL,
                              "'tokens' must hold token ids in [0, %d); element %zu is not",
                              s->vocab_size, i);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    struct tbuf text = {0};
    int rc = tok_decode(s->tok, ids, n, 0, &text);
    free(ids);
    json_decref(root);
    if (rc < 0) {
        tbuf_free(&text);
        return http_error(hr, 400, "tokens", NULL, "cannot detokenize: %s", err_msg());
    }
    json_t *out = json_pack("{s:o}", "prompt", api_string_lossy(text.s ? text.s : "", text.len));
    tbuf_free(&text);
    return http_respond_json(hr, 200, out);
}

/* ---- dispatch ---- */

enum MHD_Result routes_early(struct http_req *hr, const char *method)
{
    struct srv *s = hr->srv;
    hr->is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    hr->is_post = !strcmp(method, "POST");
    hr->is_options = !strcmp(method, "OPTIONS");
    hr->route = resolve(hr->url, hr->model_id, sizeof hr->model_id);

    const char *origin = MHD_lookup_connection_value(hr->conn, MHD_HEADER_KIND, "Origin");
    if (s->cfg.cors_origins[0] && auth_origin_ok(s->cfg.cors_origins, origin))
        snprintf(hr->origin, sizeof hr->origin, "%s",
                 strcmp(s->cfg.cors_origins, "*") ? origin : "*");

    if (hr->route == MR_OTHER)
        return http_error(hr, 404, NULL, "not_found", "no route for %s %s", method, hr->url);
    if (hr->is_options) {
        struct MHD_Response *r = MHD_create_response_from_buffer(0, (void *)"",
                                                                 MHD_RESPMEM_PERSISTENT);
        if (!r)
            return MHD_NO;
        http_add_common_headers(hr, r);
        MHD_add_response_header(r, "Allow", route_is_post(hr->route) ? "POST, OPTIONS"
                                                                     : "GET, HEAD, OPTIONS");
        if (hr->origin[0]) {
            MHD_add_response_header(r, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
            MHD_add_response_header(r, "Access-Control-Allow-Headers",
                                    "Authorization, Content-Type");
            MHD_add_response_header(r, "Access-Control-Max-Age", "600");
        }
        enum MHD_Result ret = respond_static(hr, 204, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (route_is_post(hr->route) ? !hr->is_post : !hr->is_get)
        return http_error(hr, 405, NULL, "method_not_allowed", "%s is not allowed on %s", method,
                          hr->url);
    if (!route_is_open(hr->route) &&
        !auth_bearer_ok(MHD_lookup_connection_value(hr->conn, MHD_HEADER_KIND, "Authorization"),
                        s->cfg.api_key))
        return http_error(hr, 401, NULL, "invalid_api_key",
                          "Incorrect API key provided (send Authorization: Bearer <key>)");
    if (hr->is_post) {
        const char *cl = MHD_lookup_connection_value(hr->conn, MHD_HEADER_KIND,
                                                     "Content-Length");
        if (cl) {
            char *end;
            unsigned long long n = strtoull(cl, &end, 10);
            if (end != cl && n > s->cfg.max_body_bytes)
                return http_error(hr, 413, NULL, "body_too_large",
                                  "request body of %llu bytes is larger than %zu", n,
                                  s->cfg.max_body_bytes);
        }
        const char *ct = MHD_lookup_connection_value(hr->conn, MHD_HEADER_KIND, "Content-Type");
        if (ct && !is_json_type(ct))
            return http_error(hr, 415, NULL, "unsupported_media_type",
                              "Content-Type must be application/json, got \"%.100s\"", ct);
        return MHD_YES;
    }
    /* GET routes carry no body, but answer on the next call, once MHD has seen the (empty)
     * request to its end: a response queued on the first call counts as an early response to a
     * request not fully read, and MHD then closes the connection instead of keeping it alive. */
    return MHD_YES;
}

enum MHD_Result routes_dispatch(struct http_req *hr)
{
    struct srv *s = hr->srv;
    switch (hr->route) {
    case MR_HEALTH: return handle_health(hr);
    case MR_READY: return handle_ready(hr);
    case MR_METRICS: return handle_metrics(hr);
    case MR_MODELS: return handle_models(hr);
    case MR_MODEL: return handle_model(hr);
    default: break;
    }
    if (s->state != SRV_READY && s->state != SRV_DRAINING)
        return http_error(hr, 503, NULL, s->state == SRV_LOADING ? "loading" : "unavailable",
                          s->state == SRV_LOADING ? "Loading model" : "the server is not ready");
    switch (hr->route) {
    case MR_TOKENIZE: return handle_tokenize(hr);
    case MR_DETOKENIZE: return handle_detokenize(hr);
    case MR_COMPLETIONS: return gen_start(hr, API_KIND_COMPLETION);
    case MR_CHAT: return gen_start(hr, API_KIND_CHAT);
    default: return http_error(hr, 404, NULL, "not_found", "no route for %s", hr->url);
    }
}
