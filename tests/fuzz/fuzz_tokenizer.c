/*
 * fuzz_tokenizer.c - libFuzzer target for the tokenizer (encode, split, decode, streaming).
 *
 * Input: byte 0 picks the mode, the rest is the text (any bytes, invalid UTF-8 included).
 *   mode & 3 == 0: plain; 1: added tokens on; 2: added tokens only inside a trusted span
 *   [0, len/2) (skipped for invalid UTF-8, which the trusted API rejects by contract);
 *   mode == 0xFF: the rest is a tokenizer.json to load (the loader must reject junk cleanly).
 * Invariants checked (trap on violation): encode never fails except on memory; the pieces of
 * tok_split concatenate back to the repaired text; decode(encode(x)) equals the repaired text;
 * the streaming detokenizer's output equals decode's.
 * The tokenizer is $DSV4_TOKENIZER when set (the real DeepSeek-V4 file), else a small
 * synthetic byte-level BPE built here, so the target runs with no files. Also linked with
 * replay_main.c into a plain program that replays the committed corpus in every test run.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tbuf.h"
#include "engine/tokenizer.h"
#include "engine/utf8.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x)                                                                                   \
    do {                                                                                           \
        if (!(x))                                                                                  \
            __builtin_trap();                                                                      \
    } while (0)

static void json_key(struct tbuf *j, uint32_t cp)
{
    char u[4];
    size_t l = utf8_encode(cp, u);
    tbuf_addc(j, '"');
    if (cp == '"' || cp == '\\')
        tbuf_addc(j, '\\');
    tbuf_add(j, u, l);
    tbuf_addc(j, '"');
}

/* 256 byte symbols, a few merges, special and normal added tokens, a GPT-2-like split. */
static struct tokenizer *synthetic(void)
{
    struct tbuf j = {0};
    struct tokenizer *t = NULL;
    tbuf_adds(&j, "{\"added_tokens\": [{\"id\": 262, \"content\": \"<|s|>\", \"special\": true,"
                  " \"normalized\": false}, {\"id\": 263, \"content\": \"<think>\", \"special\":"
                  " false, \"normalized\": true}, {\"id\": 264, \"content\": \"\\uff5cD\\uff5c\","
                  " \"special\": false, \"normalized\": true}],"
                  " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
                  "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\p{N}{1,3}\"}, \"behavior\":"
                  " \"Isolated\", \"invert\": false},"
                  "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}]},"
                  " \"model\": {\"type\": \"BPE\", \"vocab\": {");
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        if (b)
            tbuf_add(&j, ", ", 2);
        json_key(&j, printable ? (uint32_t)b : (uint32_t)(256 + n++));
        tbuf_addf(&j, ": %d", b);
    }
    tbuf_adds(&j, ", \"\\u0120t\": 256, \"he\": 257, \"\\u0120the\": 258, \"in\": 259,"
                  " \"ing\": 260, \"\\u00c3\\u00a9\": 261}, \"merges\": [\"\\u0120 t\", \"h e\","
                  " \"\\u0120t he\", \"i n\", \"in g\", \"\\u00c3 \\u00a9\"]}}");
    if (tok_load_mem(j.s, j.len, "synthetic", &t) < 0)
        t = NULL;
    tbuf_free(&j);
    return t;
}

static struct tokenizer *tok;

static bool same(const struct tbuf *a, const struct tbuf *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->s, b->s, a->len) == 0);
}

static int collect_piece(void *ud, const char *p, size_t n, int32_t id)
{
    (void)id;
    return tbuf_add(ud, p, n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!tok) {
        const char *path = getenv("DSV4_TOKENIZER");
        if (!path || tok_load(path, &tok) < 0)
            tok = synthetic();
        CHECK(tok);
    }
    if (size == 0)
        return 0;
    uint8_t mode = data[0];
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    if (mode == 0xFF) {
        struct tokenizer *t2 = NULL;
        if (tok_load_mem(text, len, "fuzz", &t2) == 0) {
            struct tok_ids ids = {0};
            CHECK(tok_encode(t2, "hello <b> 123", 13, TOK_ENC_ADDED, &ids) == 0);
            tok_ids_free(&ids);
            tok_free(t2);
        }
        return 0;
    }
    struct tbuf fixed = {0}, pieces = {0}, dec = {0}, streamed = {0};
    struct tok_ids ids = {0};
    CHECK(utf8_append_lossy(&fixed, text, len) == 0);
    bool valid = utf8_valid_prefix(text, len) == len;
    unsigned flags = (mode & 3) == 1 ? TOK_ENC_ADDED : 0;
    if ((mode & 3) == 2 && valid) {
        struct tok_span sp = {0, len / 2};
        CHECK(tok_encode_trusted(tok, text, len, &sp, 1, &ids) == 0);
    } else {
        CHECK(tok_encode(tok, text, len, flags, &ids) == 0);
        CHECK(tok_split(tok, text, len, flags, collect_piece, &pieces) == 0);
        CHECK(same(&pieces, &fixed));
    }
    CHECK(tok_decode(tok, ids.v, ids.n, 0, &dec) == 0);
    CHECK(same(&dec, &fixed));
    struct tok_stream st;
    tok_stream_init(&st);
    for (size_t i = 0; i < ids.n; i++)
        CHECK(tok_stream_feed(tok, &st, ids.v[i], 0, &streamed) == 0);
    CHECK(tok_stream_flush(&st, &streamed) == 0);
    CHECK(same(&streamed, &dec));
    tbuf_free(&fixed);
    tbuf_free(&pieces);
    tbuf_free(&dec);
    tbuf_free(&streamed);
    tok_ids_free(&ids);
    return 0;
}
