/*
 * config.c - `dsv4d serve` flags and their DSV4D_* environment variables.
 *
 * THREAD SAFETY: main thread only, before the server starts.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/err.h"
#include "server/config.h"

#ifndef DSV4D_DATADIR
#define DSV4D_DATADIR "/usr/local/share/dsv4d"
#endif

enum opt_kind { OPT_STR, OPT_INT, OPT_SIZE, OPT_DOUBLE, OPT_LEVEL, OPT_THINKING };

struct opt {
    const char *flag; /* without the leading dashes */
    enum opt_kind kind;
    size_t off;       /* offsetof the field in struct srv_config */
    size_t size;      /* OPT_STR: buffer size */
    double lo, hi;    /* numeric range */
    const char *help;
};

#define F(field) offsetof(struct srv_config, field)
#define S(field) sizeof(((struct srv_config *)0)->field)

static const struct opt opts[] = {
    {"model", OPT_STR, F(model), S(model), 0, 0,
     "checkpoint directory or builtin:tiny-flash|builtin:tiny-pro (default builtin:tiny-flash)"},
    {"served-model-name", OPT_STR, F(served_model_name), S(served_model_name), 0, 0,
     "the model id clients use (default: the model's base name)"},
    {"tokenizer", OPT_STR, F(tokenizer), S(tokenizer), 0, 0,
     "tokenizer.json (default <model>/tokenizer.json; builtin models: DSV4D_DATA_DIR or the "
     "install's share/dsv4d)"},
    {"host", OPT_STR, F(host), S(host), 0, 0, "address to bind (default 127.0.0.1)"},
    {"port", OPT_INT, F(port), 0, 0, 65535, "port to bind (default 8080; 0 = any free port)"},
    {"api-key", OPT_STR, F(api_key), S(api_key), 0, 0,
     "require Authorization: Bearer KEY on /v1/* and /tokenize, /detokenize"},
    {"max-num-seqs", OPT_INT, F(max_num_seqs), 0, 1, 4096, "sequences running at once (64)"},
    {"max-num-batched-tokens", OPT_INT, F(max_num_batched_tokens), 0, 1, 1 << 20,
     "tokens one engine step may process (decode + prefill chunks; 2048)"},
    {"max-model-len", OPT_INT, F(max_model_len), 0, 16, 1 << 24,
     "prompt + completion tokens per sequence (default: min(model limit, 65536))"},
    {"max-queue", OPT_INT, F(max_queue), 0, 0, 1 << 20,
     "waiting generations before new ones get 503 (1024)"},
    {"max-body-bytes", OPT_SIZE, F(max_body_bytes), 0, 1024, 1024.0 * 1024 * 1024,
     "largest request body; larger ones get 413 (4194304)"},
    {"shutdown-timeout", OPT_DOUBLE, F(shutdown_timeout), 0, 0, 86400,
     "seconds SIGTERM waits for running generations before cancelling them (30)"},
    {"request-timeout", OPT_DOUBLE, F(request_timeout), 0, 0, 86400 * 7,
     "seconds from arrival to the last token; past it the generation ends (600; 0 = none)"},
    {"timeout-keep-alive", OPT_INT, F(timeout_keep_alive), 0, 0, 86400,
     "seconds an idle connection is kept (30; 0 = forever)"},
    {"cors-origins", OPT_STR, F(cors_origins), S(cors_origins), 0, 0,
     "comma-separated allowed origins, or * (default: no CORS headers)"},
    {"log-level", OPT_LEVEL, F(log_level), 0, 0, 0, "debug|info|warning|error (info)"},
    {"device", OPT_STR, F(device), S(device), 0, 0, "cpu|cuda (cpu)"},
    {"gpu-memory-utilization", OPT_DOUBLE, F(gpu_memory_utilization), 0, 0.05, 1,
     "--device cuda: fraction of the GPU's memory for weights, buffers and KV cache (0.9)"},
    {"default-thinking", OPT_THINKING, F(default_thinking), 0, 0, 0,
     "chat reasoning when a request does not say: enabled|disabled (enabled, as DeepSeek's API)"},
    {"max-connections", OPT_INT, F(max_connections), 0, 16, 1 << 20,
     "open sockets at once (4096)"},
    {"heartbeat", OPT_DOUBLE, F(heartbeat), 0, 0.05, 60,
     "seconds between client-disconnect checks and SSE keep-alive comments (1)"},
};

static void defaults(struct srv_config *c)
{
    memset(c, 0, sizeof *c);
    snprintf(c->model, sizeof c->model, "builtin:tiny-flash");
    snprintf(c->host, sizeof c->host, "127.0.0.1");
    snprintf(c->device, sizeof c->device, "cpu");
    c->port = 8080;
    c->max_num_seqs = 64;
    c->max_num_batched_tokens = 2048;
    c->max_model_len = 0; /* resolved against the model after loading */
    c->max_queue = 1024;
    c->max_body_bytes = 4u << 20;
    c->shutdown_timeout = 30;
    c->request_timeout = 600;
    c->timeout_keep_alive = 30;
    c->log_level = LOG_INFO;
    c->default_thinking = 1;
    c->max_connections = 4096;
    c->heartbeat = 1.0;
    c->gpu_memory_utilization = 0.9;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: dsv4d serve [OPTIONS]\n\n"
               "Run the OpenAI-compatible HTTP server. Every option can also be set from the\n"
               "environment as DSV4D_<OPTION> (upper case, dashes as underscores).\n\n");
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
        fprintf(f, "  --%-20s %s\n", opts[i].flag, opts[i].help);
}

/* Set one option from its text value. 0 or ERR_INVAL (message on err). */
static int set_opt(struct srv_config *c, const struct opt *o, const char *val, const char *src,
                   FILE *err)
{
    char *p = (char *)c + o->off;
    char *end;
    switch (o->kind) {
    case OPT_STR:
        if (strlen(val) >= o->size) {
            fprintf(err, "dsv4d serve: %s: value too long\n", src);
            return ERR_INVAL;
        }
        snprintf(p, o->size, "%s", val);
        return 0;
    case OPT_INT:
    case OPT_SIZE:
    case OPT_DOUBLE: {
        errno = 0;
        double x = strtod(val, &end);
        int integral = o->kind != OPT_DOUBLE;
        if (!*val || *end || errno || !isfinite(x) || x < o->lo || x > o->hi ||
            (integral && floor(x) != x)) {
            fprintf(err, "dsv4d serve: %s: expected %s in [%g, %g], got \"%s\"\n", src,
                    integral ? "an integer" : "a number", o->lo, o->hi, val);
            return ERR_INVAL;
        }
        if (o->kind == OPT_INT)
            *(int *)p = (int)x;
        else if (o->kind == OPT_SIZE)
            *(size_t *)p = (size_t)x;
        else
            *(double *)p = x;
        return 0;
    }
    case OPT_LEVEL: {
        static const char *const names[] = {"debug", "info", "warning", "error"};
        for (int i = 0; i < 4; i++)
            if (!strcmp(val, names[i]) || (i == 2 && !strcmp(val, "warn"))) {
                *(enum log_level *)p = (enum log_level)i;
                return 0;
            }
        fprintf(err, "dsv4d serve: %s: expected debug|info|warning|error\n", src);
        return ERR_INVAL;
    }
    case OPT_THINKING:
        if (!strcmp(val, "enabled") || !strcmp(val, "disabled")) {
            *(int *)p = !strcmp(val, "enabled");
            return 0;
        }
        fprintf(err, "dsv4d serve: %s: expected enabled|disabled\n", src);
        return ERR_INVAL;
    }
    return ERR_INVAL;
}

/* DSV4D_MAX_NUM_SEQS for max-num-seqs */
static void env_name(const char *flag, char *buf, size_t size)
{
    size_t k = (size_t)snprintf(buf, size, "DSV4D_");
    for (const char *s = flag; *s && k + 1 < size; s++)
        buf[k++] = *s == '-' ? '_' : (char)(*s >= 'a' && *s <= 'z' ? *s - 32 : *s);
    buf[k] = 0;
}

int srv_config_parse(struct srv_config *c, int argc, char **argv, FILE *out, FILE *err)
{
    const size_t n_opts = sizeof opts / sizeof opts[0];
    defaults(c);
    for (size_t i = 0; i < n_opts; i++) {
        char name[64];
        env_name(opts[i].flag, name, sizeof name);
        const char *v = getenv(name);
        if (v && *v && set_opt(c, &opts[i], v, name, err) < 0)
            return ERR_INVAL;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(out);
            return 1;
        }
        if (strncmp(a, "--", 2)) {
            fprintf(err, "dsv4d serve: unexpected argument \"%s\" (see --help)\n", a);
            return ERR_INVAL;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct opt *o = NULL;
        for (size_t k = 0; k < n_opts; k++)
            if (strlen(opts[k].flag) == nlen && !strncmp(opts[k].flag, name, nlen))
                o = &opts[k];
        if (!o) {
            fprintf(err, "dsv4d serve: unknown option \"%s\" (see --help)\n", a);
            return ERR_INVAL;
        }
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!val) {
            fprintf(err, "dsv4d serve: %s needs a value\n", a);
            return ERR_INVAL;
        }
        if (set_opt(c, o, val, a, err) < 0)
            return ERR_INVAL;
    }
    if (strcmp(c->device, "cpu") && strcmp(c->device, "cuda")) {
        fprintf(err, "dsv4d serve: --device must be cpu or cuda\n");
        return ERR_INVAL;
    }
    if (!c->served_model_name[0]) {
        const char *base = c->model;
        if (strncmp(base, "builtin:", 8)) {
            size_t n = strlen(base);
            while (n > 1 && base[n - 1] == '/')
                n--;
            const char *slash = NULL;
            for (size_t k = 0; k < n; k++)
                if (base[k] == '/')
                    slash = base + k;
            size_t off = slash ? (size_t)(slash - base) + 1 : 0;
            snprintf(c->served_model_name, sizeof c->served_model_name, "%.*s", (int)(n - off),
                     base + off);
        } else {
            snprintf(c->served_model_name, sizeof c->served_model_name, "%s", base + 8);
        }
    }
    return 0;
}

void srv_config_tokenizer(const struct srv_config *c, char *buf, size_t size)
{
    char cand[4][1100];
    int n = 0;
    if (c->tokenizer[0]) {
        snprintf(buf, size, "%s", c->tokenizer);
        return;
    }
    if (strncmp(c->model, "builtin:", 8)) {
        snprintf(buf, size, "%s/tokenizer.json", c->model);
        return;
    }
    const char *dd = getenv("DSV4D_DATA_DIR");
    if (dd && *dd)
        snprintf(cand[n++], sizeof cand[0], "%s/tokenizer.json", dd);
    snprintf(cand[n++], sizeof cand[0], "%s/tokenizer.json", DSV4D_DATADIR);
    snprintf(cand[n++], sizeof cand[0], "/usr/local/share/dsv4d/tokenizer.json");
    snprintf(cand[n++], sizeof cand[0], "/usr/share/dsv4d/tokenizer.json");
    for (int i = 0; i < n; i++)
        if (access(cand[i], R_OK) == 0) {
            snprintf(buf, size, "%s", cand[i]);
            return;
        }
    snprintf(buf, size, "%s", cand[0]);
}
