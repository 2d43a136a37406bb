/*
 * bench_tokenizer.c - encode throughput of the tokenizer, one thread.
 *
 *   bench_tokenizer TOKENIZER_JSON CORPUS_JSONL [SECONDS]
 *
 * Encodes every "text" of the corpus (tests/text/corpus.jsonl) with added-token matching, over
 * and over for at least SECONDS (default 3), and prints MB/s of UTF-8 input and tokens/s. The
 * piece cache is warm after the first pass, as it is in a serving process.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/err.h"
#include "engine/tokenizer.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER_JSON CORPUS_JSONL [SECONDS]\n");
        return 2;
    }
    double min_s = argc > 3 ? strtod(argv[3], NULL) : 3.0;
    struct tokenizer *tok;
    if (tok_load(argv[1], &tok) < 0) {
        fprintf(stderr, "bench_tokenizer: %s\n", err_msg());
        return 1;
    }
    FILE *f = fopen(argv[2], "r");
    if (!f) {
        fprintf(stderr, "bench_tokenizer: cannot open %s\n", argv[2]);
        tok_free(tok);
        return 1;
    }
    json_t *texts = json_array();
    char *line = NULL;
    size_t cap = 0, bytes = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *it = json_loads(line, JSON_ALLOW_NUL, NULL);
        json_t *t = json_object_get(it, "text");
        if (json_is_string(t)) {
            json_array_append(texts, t);
            bytes += json_string_length(t);
        }
        json_decref(it);
    }
    free(line);
    fclose(f);

    struct tok_ids ids = {0};
    size_t passes = 0, tokens = 0;
    double t0 = now(), t;
    do {
        size_t i;
        json_t *v;
        json_array_foreach(texts, i, v)
        {
            ids.n = 0;
            if (tok_encode(tok, json_string_value(v), json_string_length(v), TOK_ENC_ADDED, &ids) <
                0) {
                fprintf(stderr, "bench_tokenizer: %s\n", err_msg());
                return 1;
            }
            tokens += ids.n;
        }
        passes++;
        t = now();
    } while (t - t0 < min_s);
    double secs = t - t0;
    printf("ours: %.2f MB/s, %.0f tokens/s (%zu texts, %zu bytes, %zu passes, %.2f s)\n",
           (double)bytes * (double)passes / secs / 1e6, (double)tokens / secs,
           json_array_size(texts), bytes, passes, secs);
    tok_ids_free(&ids);
    json_decref(texts);
    tok_free(tok);
    return 0;
}
