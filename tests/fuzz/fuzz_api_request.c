/*
 * fuzz_api_request.c - libFuzzer target for the OpenAI request parser (api/request.c) and the
 * error / response JSON built from what it returns (api/response.c).
 *
 * The first byte picks the route (completions, chat, or a bare object as /tokenize reads);
 * the rest is the body. Any input must give a filled request or a 4xx/5xx api_error with a
 * non-empty message and a valid error JSON, never a crash or a leak. A parsed request's
 * borrowed strings and owned arrays are all read, so ASan flags a dangling one.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile size_t fuzz_sink;

static void touch(const struct api_gen_request *r)
{
    size_t acc = 0;
    for (int i = 0; i < r->n_prompts; i++) {
        const struct api_prompt *p = &r->prompts[i];
        if (p->text)
            acc += p->len ? (unsigned char)p->text[p->len - 1] : 0;
        for (int k = 0; k < p->n_ids; k++)
            acc += (size_t)p->ids[k];
    }
    for (int i = 0; i < r->n_stop; i++)
        acc += strlen(r->stop[i]);
    for (int i = 0; i < r->n_stop_ids; i++)
        acc += (size_t)r->stop_ids[i];
    for (int i = 0; i < r->sampling.n_logit_bias; i++)
        acc += (size_t)r->sampling.logit_bias[i].token;
    if (r->model)
        acc += strlen(r->model);
    if (r->reasoning_effort)
        acc += strlen(api_effort_canonical(r->reasoning_effort));
    acc += json_array_size(r->messages) + json_array_size(r->tools);
    fuzz_sink = acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    int route = data[0] % 3;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    struct api_error e;
    memset(&e, 0, sizeof e);
    if (route == 2) {
        json_t *o = api_parse_object(body, len, &e);
        if (!o && (e.status != 400 || !e.message[0]))
            abort();
        json_decref(o);
    } else {
        struct api_gen_request r;
        int rc = api_parse_gen(route == 0 ? API_KIND_COMPLETION : API_KIND_CHAT, body, len, &r,
                               &e);
        if (rc == 0) {
            touch(&r);
            if (r.n < 1 || r.n > API_MAX_N || r.n_stop > ENGINE_MAX_STOP)
                abort();
            api_gen_request_free(&r);
        } else if (e.status < 400 || !e.message[0]) {
            abort();
        }
    }
    if (e.status) {
        size_t n = 0;
        char *j = api_error_json(&e, &n);
        json_t *back = j ? json_loadb(j, n, 0, NULL) : NULL;
        if (j && !back)
            abort(); /* our own error JSON must parse */
        json_decref(back);
        free(j);
    }
    return 0;
}
