/*
 * fuzz_dsml.c - libFuzzer target for the DSML / reasoning output parser.
 *
 * Input: byte 0 = flags (bit 0: thinking mode; bits 1..7: chunking seed), the rest = model
 * output text. The text is parsed once whole and once fed in pseudo-random chunks (down to one
 * byte); the event transcripts must be identical (trap otherwise), and every tool call must be
 * closed (BEGIN, ARGS..., END) by the end. Also linked with replay_main.c into a plain program
 * that replays the committed corpus in every test run.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine/dsml.h"
#include "engine/tbuf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x))                                                                                  \
            __builtin_trap();                                                                      \
    } while (0)

struct rec {
    struct tbuf t;
    int last;
    int open; /* a TOOL_BEGIN without its TOOL_END */
};

static int record(void *ud, const struct dsml_event *ev)
{
    struct rec *r = ud;
    bool delta = ev->kind == DSML_EV_REASONING || ev->kind == DSML_EV_CONTENT ||
                 ev->kind == DSML_EV_TOOL_ARGS;
    if (ev->kind == DSML_EV_TOOL_BEGIN) {
        CHECK(!r->open);
        r->open = 1;
    } else if (ev->kind == DSML_EV_TOOL_END) {
        CHECK(r->open);
        r->open = 0;
    } else if (ev->kind == DSML_EV_TOOL_ARGS) {
        CHECK(r->open);
    }
    if (delta && r->last == (int)ev->kind)
        return tbuf_add(&r->t, ev->text, ev->len);
    tbuf_addf(&r->t, "\n[%d:%d]", (int)ev->kind, ev->tool_index);
    if (ev->kind == DSML_EV_TOOL_BEGIN)
        tbuf_addf(&r->t, "%s %s", ev->id, ev->name);
    if (delta)
        tbuf_add(&r->t, ev->text, ev->len);
    r->last = delta ? (int)ev->kind : -1;
    return 0;
}

static void run(const char *text, size_t len, bool thinking, unsigned seed, struct rec *r)
{
    struct dsml_parser *p = NULL;
    CHECK(dsml_parser_new(thinking, 1, record, r, &p) == 0);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len;) {
        size_t k = len - i;
        if (seed) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            k = 1 + x % 16;
            if (k > len - i)
                k = len - i;
        }
        CHECK(dsml_parser_feed(p, text + i, k) == 0);
        i += k;
    }
    CHECK(dsml_parser_finish(p) == 0);
    CHECK(!r->open);
    dsml_parser_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    bool thinking = data[0] & 1;
    unsigned seed = (data[0] >> 1) + 1;
    const char *text = (const char *)data + 1;
    struct rec whole = {.last = -1}, parts = {.last = -1};
    run(text, size - 1, thinking, 0, &whole);
    run(text, size - 1, thinking, seed, &parts);
    CHECK(whole.t.len == parts.t.len &&
          (whole.t.len == 0 || memcmp(whole.t.s, parts.t.s, whole.t.len) == 0));
    tbuf_free(&whole.t);
    tbuf_free(&parts.t);
    return 0;
}
