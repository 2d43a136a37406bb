/*
 * config.h - `dsv4d serve` settings: flags in the vLLM style, each also settable from the
 * environment (DSV4D_<FLAG> with dashes as underscores, e.g. DSV4D_MAX_NUM_SEQS=8). A flag on
 * the command line wins over the environment, which wins over the default.
 *
 * THREAD SAFETY: filled once by the main thread before anything else starts; read-only after.
 */
#ifndef DSV4_SERVER_CONFIG_H
#define DSV4_SERVER_CONFIG_H

#include <stddef.h>
#include <stdio.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERROR };

struct srv_config {
    char model[1024];             /* --model: a checkpoint dir or builtin:tiny-flash|tiny-pro */
    char served_model_name[256];  /* --served-model-name (default: the model's base name) */
    char tokenizer[1024];         /* --tokenizer: "" = resolved by srv_config_tokenizer() */
    char host[256];               /* --host */
    int port;                     /* --port; 0 = any free port (printed when ready) */
    char api_key[512];            /* --api-key ("" = open) */
    int max_num_seqs;             /* --max-num-seqs */
    int max_num_batched_tokens;   /* --max-num-batched-tokens: tokens per engine step */
    int max_model_len;            /* --max-model-len */
    int max_queue;                /* --max-queue: waiting generations before 503 */
    size_t max_body_bytes;        /* --max-body-bytes: request bodies above it get 413 */
    double shutdown_timeout;      /* --shutdown-timeout seconds of drain after SIGTERM */
    double request_timeout;       /* --request-timeout seconds from arrival to the last token */
    int timeout_keep_alive;       /* --timeout-keep-alive: idle connection timeout, seconds */
    char cors_origins[1024];      /* --cors-origins: comma list or "*"; "" = no CORS */
    enum log_level log_level;     /* --log-level debug|info|warning|error */
    char device[16];              /* --device cpu|cuda */
    double gpu_memory_utilization; /* --gpu-memory-utilization: device memory fraction (0.9) */
    int default_thinking;         /* --default-thinking enabled|disabled (DeepSeek: enabled) */
    int max_connections;          /* --max-connections: sockets MHD accepts at once */
    double heartbeat;             /* --heartbeat seconds between disconnect checks / pings */
};

/*
 * Fill *c from defaults, then the environment, then argv (argv[0] is the subcommand name).
 * Returns 0, 1 when --help was printed to out, or ERR_INVAL after printing the problem to err.
 */
int srv_config_parse(struct srv_config *c, int argc, char **argv, FILE *out, FILE *err);

/*
 * The tokenizer.json to load, in this order: --tokenizer / DSV4D_TOKENIZER; for a checkpoint
 * directory <model>/tokenizer.json; for a builtin model $DSV4D_DATA_DIR/tokenizer.json, then
 * <datadir>/dsv4d/tokenizer.json of the install prefix, then /usr/local/share/dsv4d and
 * /usr/share/dsv4d (deploy/install-deps.sh fetches the real DeepSeek-V4 file there). Writes the
 * first existing candidate (or the first candidate when none exists) into buf.
 */
void srv_config_tokenizer(const struct srv_config *c, char *buf, size_t size);

#endif
