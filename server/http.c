/*
 * http.c - libmicrohttpd in external epoll mode, driven by the libuv loop (c-engineering §2.3).
 *
 * One uv_poll watches MHD's epoll fd and one uv_timer follows MHD_get_timeout; both call
 * http_drive(), which runs MHD and re-arms the timer. Every MHD callback therefore runs on the
 * loop thread. A request lives in a struct http_req from the first access-handler call to
 * NOTIFY_COMPLETED. Generation requests suspend their connection while the engine works and
 * are resumed (then driven) from the wakeup and heartbeat callbacks.
 *
 * Body limits: a Content-Length above --max-body-bytes is refused with 413 on the first call,
 * before the body is read; a chunked upload is counted and refused with 413 at its end.
 *
 * THREAD SAFETY: loop thread only.
 */
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "engine/err.h"
#include "server/log.h"
#include "server/srv.h"

/* ---- driving MHD from libuv ---- */

static void on_mhd_timer(uv_timer_t *t)
{
    http_drive(t->data);
}

static void on_mhd_poll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    http_drive(p->data);
}

void http_drive(struct srv *s)
{
    MHD_UNSIGNED_LONG_LONG to;
    if (!s->mhd)
        return;
    MHD_run(s->mhd);
    if (MHD_get_timeout(s->mhd, &to) == MHD_YES)
        uv_timer_start(&s->mhd_timer, on_mhd_timer, to, 0);
    else
        uv_timer_stop(&s->mhd_timer);
}

void http_suspend(struct http_req *hr)
{
    if (!hr->suspended) {
        hr->suspended = 1;
        MHD_suspend_connection(hr->conn);
    }
}

void http_resume(struct http_req *hr)
{
    if (hr->suspended) {
        hr->suspended = 0;
        MHD_resume_connection(hr->conn);
    }
}

int http_peer_gone(struct http_req *hr)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(hr->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return 1;
    char b;
    ssize_t n = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0)
        return 1; /* FIN: the client closed (or shut down its side: it will not read us) */
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
        return 1;
    return 0;
}

/* ---- responses ---- */

void http_add_common_headers(struct http_req *hr, struct MHD_Response *r)
{
    if (hr->origin[0]) {
        MHD_add_response_header(r, "Access-Control-Allow-Origin", hr->origin);
        if (strcmp(hr->origin, "*"))
            MHD_add_response_header(r, "Vary", "Origin");
    }
}

static void count(struct http_req *hr, int status)
{
    hr->status = status;
    hr->state = HR_RESPONDED;
    metrics_http(&hr->srv->metrics, hr->route, hr->is_post, status);
    LOG_D("%s %s -> %d", hr->is_post ? "POST" : hr->is_get ? "GET" : "OTHER", hr->url, status);
}

enum MHD_Result http_respond(struct http_req *hr, int status, const char *content_type,
                             char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, body ? body : (char *)"",
                                        body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    if (content_type)
        MHD_add_response_header(r, "Content-Type", content_type);
    if (status == 503 || status == 429)
        MHD_add_response_header(r, "Retry-After", "1");
    if (status == 405)
        MHD_add_response_header(r, "Allow", hr->route == MR_COMPLETIONS ||
                                                    hr->route == MR_CHAT ||
                                                    hr->route == MR_TOKENIZE ||
                                                    hr->route == MR_DETOKENIZE
                                                ? "POST, OPTIONS"
                                                : "GET, HEAD, OPTIONS");
    http_add_common_headers(hr, r);
    enum MHD_Result ret = MHD_queue_response(hr->conn, (unsigned)status, r);
    MHD_destroy_response(r);
    count(hr, status);
    return ret;
}

enum MHD_Result http_respond_json(struct http_req *hr, int status, json_t *v)
{
    size_t len = 0;
    char *s = api_dump(v, &len);
    if (!s)
        return MHD_NO;
    return http_respond(hr, status, "application/json", s, len);
}

enum MHD_Result http_respond_error(struct http_req *hr, const struct api_error *e)
{
    size_t len = 0;
    char *s = api_error_json(e, &len);
    if (!s)
        return MHD_NO;
    if (e->status >= 500 && e->status != 503)
        LOG_W("%s %s -> %d: %s", hr->is_post ? "POST" : "GET", hr->url, e->status, e->message);
    return http_respond(hr, e->status, "application/json", s, len);
}

enum MHD_Result http_error(struct http_req *hr, int status, const char *param, const char *code,
                           const char *fmt, ...)
{
    struct api_error e = {0};
    va_list ap;
    e.status = status;
    e.type = api_error_type(status);
    e.code = code;
    snprintf(e.param, sizeof e.param, "%s", param ? param : "");
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    return http_respond_error(hr, &e);
}

/* ---- MHD callbacks ---- */

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload_data, size_t *upload_data_size,
                                 void **con_cls)
{
    struct srv *s = cls;
    struct http_req *hr = *con_cls;
    (void)version;
    if (!hr) {
        hr = calloc(1, sizeof *hr);
        if (!hr)
            return MHD_NO;
        hr->srv = s;
        hr->conn = conn;
        hr->url = url;
        hr->body.max = s->cfg.max_body_bytes;
        *con_cls = hr;
        return routes_early(hr, method);
    }
    switch (hr->state) {
    case HR_READING:
        if (*upload_data_size) {
            if (!hr->too_large && tbuf_add(&hr->body, upload_data, *upload_data_size) < 0)
                hr->too_large = 1; /* keep reading (and dropping) to answer at the end */
            *upload_data_size = 0;
            return MHD_YES;
        }
        if (hr->too_large)
            return http_error(hr, 413, NULL, NULL, "request body is larger than %zu bytes",
                              s->cfg.max_body_bytes);
        return routes_dispatch(hr);
    case HR_WAITING:
        if (hr->closing)
            return MHD_NO; /* the client left (or the server gave up): just close */
        return gen_resumed(hr);
    case HR_RESPONDED:
        *upload_data_size = 0; /* a response went out early; drop the rest of the body */
        return MHD_YES;
    }
    return MHD_NO;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct http_req *hr = *con_cls;
    (void)cls;
    (void)conn;
    if (!hr)
        return;
    if (hr->state != HR_RESPONDED)
        metrics_http(&hr->srv->metrics, hr->route, hr->is_post, 499); /* counted as "other" */
    if (hr->gen)
        gen_free(hr->gen, toe == MHD_REQUEST_TERMINATED_COMPLETED_OK);
    hr->gen = NULL;
    tbuf_free(&hr->body);
    free(hr);
    *con_cls = NULL;
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    (void)cls;
    if (!srv_log_enabled(LOG_DEBUG))
        return;
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && line[n - 1] == '\n')
        line[--n] = 0;
    srv_log(LOG_DEBUG, "mhd: %s", line);
}

/* ---- start / stop ---- */

int http_start(struct srv *s)
{
    struct addrinfo hints = {0}, *ai = NULL;
    char port[16];
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(port, sizeof port, "%d", s->cfg.port);
    int gai = getaddrinfo(s->cfg.host[0] ? s->cfg.host : NULL, port, &hints, &ai);
    if (gai != 0)
        return err_setf(ERR_INVAL, "cannot resolve --host %s: %s", s->cfg.host,
                        gai_strerror(gai));
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | MHD_USE_TURBO;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    s->mhd = MHD_start_daemon(
        flags, (uint16_t)s->cfg.port, NULL, NULL, on_access, s, MHD_OPTION_SOCK_ADDR,
        ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)s->cfg.timeout_keep_alive,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->cfg.max_connections,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024), MHD_OPTION_LISTEN_BACKLOG_SIZE,
        (unsigned)1024, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s,
        MHD_OPTION_SIGPIPE_HANDLED_BY_APP, 1, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s->mhd)
        return err_setf(ERR_IO, "cannot listen on %s:%d (address in use, or not permitted?)",
                        s->cfg.host, s->cfg.port);
    const union MHD_DaemonInfo *pi = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = pi ? pi->port : (unsigned short)s->cfg.port;
    const union MHD_DaemonInfo *ei = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!ei) {
        MHD_stop_daemon(s->mhd);
        s->mhd = NULL;
        return err_setf(ERR_IO, "libmicrohttpd has no epoll fd");
    }
    uv_timer_init(&s->loop, &s->mhd_timer);
    s->mhd_timer.data = s;
    uv_poll_init(&s->loop, &s->mhd_poll, ei->epoll_fd);
    s->mhd_poll.data = s;
    uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
    http_drive(s);
    return 0;
}

void http_stop(struct srv *s)
{
    if (!s->mhd)
        return;
    /* MHD_stop_daemon must not see suspended connections: gen_cancel_all(s, NULL) cancels the
     * engine work, marks every request closing and resumes it; MHD then processes the
     * resumptions (each handler just closes) before it stops. */
    gen_cancel_all(s, NULL);
    for (int i = 0; i < 4; i++)
        MHD_run(s->mhd);
    uv_poll_stop(&s->mhd_poll);
    uv_timer_stop(&s->mhd_timer);
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
}
