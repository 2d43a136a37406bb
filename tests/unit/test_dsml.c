/* test_dsml.c - the output parser: reference cases, streaming == finished, malformed input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "engine/dsml.h"
#include "engine/err.h"
#include "engine/tbuf.h"
#include "engine/tokenizer.h"

/* Every event rendered into one transcript string, so two parses compare with strcmp. Adjacent
 * deltas of one kind are merged (chunking must not change the transcript). */
struct transcript {
    struct tbuf t;
    int last; /* last delta kind, -1 after a non-delta event */
};

static int record(void *ud, const struct dsml_event *ev)
{
    struct transcript *tr = ud;
    static const char *const tag[] = {"R", "C", "B", "A", "E"};
    bool delta = ev->kind == DSML_EV_REASONING || ev->kind == DSML_EV_CONTENT ||
                 ev->kind == DSML_EV_TOOL_ARGS;
    if (delta && tr->last == (int)ev->kind)
        return tbuf_add(&tr->t, ev->text, ev->len);
    tbuf_addf(&tr->t, "\n[%s%d]", tag[ev->kind], ev->tool_index);
    if (ev->kind == DSML_EV_TOOL_BEGIN)
        tbuf_addf(&tr->t, "%s %s", ev->id, ev->name);
    if (delta)
        tbuf_add(&tr->t, ev->text, ev->len);
    tr->last = delta ? (int)ev->kind : -1;
    return 0;
}

/* Parse text fed in pieces of at most `chunk` bytes (0: all at once); returns the transcript. */
static char *parse_chunked(const char *text, bool thinking, size_t chunk, unsigned seed)
{
    struct transcript tr = {.last = -1};
    struct dsml_parser *p;
    assert_int_equal(dsml_parser_new(thinking, 42, record, &tr, &p), 0);
    size_t n = strlen(text), i = 0;
    srand(seed);
    while (i < n) {
        size_t k = chunk ? 1 + (size_t)rand() % chunk : n;
        if (k > n - i)
            k = n - i;
        assert_int_equal(dsml_parser_feed(p, text + i, k), 0);
        i += k;
    }
    assert_int_equal(dsml_parser_finish(p), 0);
    dsml_parser_free(p);
    tbuf_add(&tr.t, "", 0);
    return tbuf_take(&tr.t, NULL);
}

static const char *const CASES[] = {
    /* reference fixture 1, first assistant turn */
    "The user wants to know the weather in Beijing. I should use the get_weather tool.</think>\n\n"
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
    "<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n"
    "<｜DSML｜parameter name=\"unit\" string=\"true\">celsius</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>",
    "Got the weather data.</think>The weather is <b>sunny</b>\n\nEnjoy!<｜end▁of▁sentence｜>",
    "r</think>c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\">\n</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"b\">\n<｜DSML｜parameter name=\"n\" string=\"false\">[1, 2.50, "
    "{\"x\": null}]</｜DSML｜parameter>\n<｜DSML｜parameter name=\"s\" string=\"true\">line\n\"q\" "
    "\\ tab\t<tag></｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    "no close of think at all, cut by max tokens",
    "<think>dup open</think>answer</think> with stray tags <think>",
    "r</think>\n\n<｜DSML｜tool_calls>\nGARBAGE here</｜DSML｜tool_calls>after",
    "r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"k\" "
    "string=\"true\">unterminated value",
    "r</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter broken>x"
    "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    "reasoning then tool\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"t\">\n</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls><｜end▁of▁sentence｜>ignored after eos",
    "</think>partial marker at end <｜DSML｜tool_ca",
    "</think>text\n",
    "</think>\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",
    "",
    /* a header without string=, then a well-formed one: the first is malformed on its own */
    "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\">1"
    "</｜DSML｜parameter>\n<｜DSML｜parameter name=\"b\" string=\"true\">2</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    "</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke\n<｜DSML｜invoke "
    "name=\"g\">\n</｜DSML｜invoke>",
};

static void test_reference_case_1(void **state)
{
    (void)state;
    struct dsml_result r;
    assert_int_equal(dsml_parse(CASES[0], strlen(CASES[0]), true, 7, &r), 0);
    assert_string_equal(r.reasoning.s,
                        "The user wants to know the weather in Beijing. I should use the "
                        "get_weather tool.");
    assert_string_equal(r.content.s, "");
    assert_int_equal(json_array_size(r.tool_calls), 1);
    json_t *fn = json_object_get(json_array_get(r.tool_calls, 0), "function");
    assert_string_equal(json_string_value(json_object_get(fn, "name")), "get_weather");
    assert_string_equal(json_string_value(json_object_get(fn, "arguments")),
                        "{\"location\": \"Beijing\", \"unit\": \"celsius\"}");
    const char *id = json_string_value(json_object_get(json_array_get(r.tool_calls, 0), "id"));
    assert_int_equal(strlen(id), 5 + 24);
    assert_memory_equal(id, "call_", 5);
    dsml_result_free(&r);
}

static void test_values_and_content(void **state)
{
    (void)state;
    struct dsml_result r;
    assert_int_equal(dsml_parse(CASES[2], strlen(CASES[2]), true, 7, &r), 0);
    assert_string_equal(r.reasoning.s, "r");
    assert_string_equal(r.content.s, "c");
    assert_int_equal(json_array_size(r.tool_calls), 2);
    json_t *f0 = json_object_get(json_array_get(r.tool_calls, 0), "function");
    json_t *f1 = json_object_get(json_array_get(r.tool_calls, 1), "function");
    assert_string_equal(json_string_value(json_object_get(f0, "arguments")), "{}");
    assert_string_equal(json_string_value(json_object_get(f1, "arguments")),
                        "{\"n\": [1, 2.50, {\"x\": null}], \"s\": \"line\\n\\\"q\\\" \\\\ "
                        "tab\\t<tag>\"}");
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[1], strlen(CASES[1]), false, 7, &r), 0);
    /* chat mode: the stray </think> is dropped, everything is content */
    assert_string_equal(r.reasoning.s, "");
    assert_string_equal(r.content.s, "Got the weather data.The weather is <b>sunny</b>\n\nEnjoy!");
    dsml_result_free(&r);
}

static void test_malformed_degrades(void **state)
{
    (void)state;
    struct dsml_result r;
    assert_int_equal(dsml_parse(CASES[3], strlen(CASES[3]), true, 1, &r), 0);
    assert_string_equal(r.reasoning.s, CASES[3]);
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[5], strlen(CASES[5]), true, 1, &r), 0);
    assert_int_equal(json_array_size(r.tool_calls), 0);
    assert_string_equal(r.content.s,
                        "\n\n<｜DSML｜tool_calls>\nGARBAGE here</｜DSML｜tool_calls>after");
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[6], strlen(CASES[6]), true, 1, &r), 0);
    assert_int_equal(json_array_size(r.tool_calls), 1);
    json_t *fn = json_object_get(json_array_get(r.tool_calls, 0), "function");
    const char *args = json_string_value(json_object_get(fn, "arguments"));
    assert_string_equal(args, "{\"k\": \"unterminated value\"}");
    json_t *parsed = json_loads(args, 0, NULL);
    assert_non_null(parsed);
    json_decref(parsed);
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[7], strlen(CASES[7]), true, 1, &r), 0);
    assert_int_equal(json_array_size(r.tool_calls), 1);
    fn = json_object_get(json_array_get(r.tool_calls, 0), "function");
    assert_string_equal(json_string_value(json_object_get(fn, "arguments")), "{}");
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[9], strlen(CASES[9]), true, 1, &r), 0);
    assert_string_equal(r.content.s, "partial marker at end <｜DSML｜tool_ca");
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[11], strlen(CASES[11]), true, 1, &r), 0);
    assert_string_equal(r.content.s, "");
    assert_int_equal(json_array_size(r.tool_calls), 0);
    dsml_result_free(&r);

    /* the header without string= ends the call with no arguments; the rest is content */
    assert_int_equal(dsml_parse(CASES[13], strlen(CASES[13]), true, 1, &r), 0);
    assert_int_equal(json_array_size(r.tool_calls), 1);
    fn = json_object_get(json_array_get(r.tool_calls, 0), "function");
    assert_string_equal(json_string_value(json_object_get(fn, "arguments")), "{}");
    assert_non_null(strstr(r.content.s, "name=\"a\">1"));
    dsml_result_free(&r);

    assert_int_equal(dsml_parse(CASES[14], strlen(CASES[14]), true, 1, &r), 0);
    assert_int_equal(json_array_size(r.tool_calls), 0);
    assert_non_null(strstr(r.content.s, "<｜DSML｜tool_calls>"));
    dsml_result_free(&r);
}

static void test_streaming_equals_finished(void **state)
{
    (void)state;
    for (size_t c = 0; c < sizeof CASES / sizeof *CASES; c++) {
        for (int thinking = 0; thinking < 2; thinking++) {
            char *whole = parse_chunked(CASES[c], thinking, 0, 0);
            for (unsigned seed = 1; seed < 40; seed++) {
                char *parts = parse_chunked(CASES[c], thinking, 1 + seed % 7, seed);
                if (strcmp(whole, parts) != 0)
                    fail_msg("case %zu thinking %d seed %u:\n%s\n---\n%s", c, thinking, seed, whole,
                             parts);
                free(parts);
            }
            free(whole);
        }
    }
}

/* Deltas never carry a piece of a control sequence. */
static int no_marker_piece(void *ud, const struct dsml_event *ev)
{
    (void)ud;
    if (ev->kind == DSML_EV_CONTENT || ev->kind == DSML_EV_REASONING) {
        if (memmem(ev->text, ev->len, "｜DSML｜", strlen("｜DSML｜")) ||
            memmem(ev->text, ev->len, "</think", 7))
            fail_msg("control text leaked: %.*s", (int)ev->len, ev->text);
        if (ev->len && ev->text[ev->len - 1] == '<')
            fail_msg("a held '<' leaked");
    }
    return 0;
}

static void test_no_leak_byte_by_byte(void **state)
{
    (void)state;
    struct dsml_parser *p;
    assert_int_equal(dsml_parser_new(true, 0, no_marker_piece, NULL, &p), 0);
    const char *t = CASES[0];
    for (size_t i = 0; t[i]; i++)
        assert_int_equal(dsml_parser_feed(p, t + i, 1), 0);
    assert_int_equal(dsml_parser_finish(p), 0);
    assert_int_not_equal(dsml_parser_feed(p, "x", 1), 0);
    dsml_parser_free(p);
}

/* ---- Reference parses (tests/text/parse_cases.jsonl, from gen_parse_cases.py) ---- */

static json_t *load_jsonl(const char *rel)
{
    const char *root = getenv("DSV4_SOURCE_ROOT");
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root ? root : ".", rel);
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("cannot open %s", path);
    json_t *all = json_array();
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *v = json_loads(line, 0, NULL);
        assert_non_null(v);
        json_array_append_new(all, v);
    }
    free(line);
    fclose(f);
    return all;
}

static void test_reference_parses(void **state)
{
    (void)state;
    json_t *cases = load_jsonl("tests/text/parse_cases.jsonl");
    size_t i;
    json_t *c;
    size_t with_tools = 0;
    json_array_foreach(cases, i, c)
    {
        const char *text = json_string_value(json_object_get(c, "text"));
        bool thinking = json_is_true(json_object_get(c, "thinking"));
        struct dsml_result r;
        assert_int_equal(dsml_parse(text, strlen(text), thinking, i, &r), 0);
        if (strcmp(r.reasoning.s, json_string_value(json_object_get(c, "reasoning"))) != 0 ||
            strcmp(r.content.s, json_string_value(json_object_get(c, "content"))) != 0)
            fail_msg("case %zu: reasoning/content differ", i);
        json_t *want = json_object_get(c, "tool_calls");
        assert_int_equal(json_array_size(r.tool_calls), json_array_size(want));
        with_tools += json_array_size(want) > 0;
        for (size_t k = 0; k < json_array_size(want); k++) {
            json_t *w = json_array_get(want, k);
            json_t *g = json_object_get(json_array_get(r.tool_calls, k), "function");
            assert_string_equal(json_string_value(json_object_get(g, "name")),
                                json_string_value(json_object_get(w, "name")));
            if (strcmp(json_string_value(json_object_get(g, "arguments")),
                       json_string_value(json_object_get(w, "arguments"))) != 0)
                fail_msg("case %zu call %zu: arguments %s != %s", i, k,
                         json_string_value(json_object_get(g, "arguments")),
                         json_string_value(json_object_get(w, "arguments")));
        }
        dsml_result_free(&r);
        /* and fed in small chunks */
        char *whole = parse_chunked(text, thinking, 0, 0);
        char *parts = parse_chunked(text, thinking, 5, (unsigned)i);
        assert_string_equal(whole, parts);
        free(whole);
        free(parts);
    }
    assert_true(json_array_size(cases) >= 300 && with_tools >= 100);
    json_decref(cases);
}

/* ---- Token stream -> detokenizer -> parser, with the real tokenizer when present ---- */

static void test_token_stream(void **state)
{
    (void)state;
    const char *path = getenv("DSV4_TOKENIZER");
    const char *root = getenv("DSV4_BUILD_ROOT");
    char buf[4096];
    if (!path || !*path) {
        snprintf(buf, sizeof buf, "%s/tokenizer.json", root ? root : ".");
        path = buf;
    }
    struct tokenizer *t = NULL;
    if (tok_load(path, &t) < 0)
        return; /* no tokenizer.json: nothing to test (see test_tokenizer) */
    json_t *cases = load_jsonl("tests/text/parse_cases.jsonl");
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c)
    {
        if (i % 5)
            continue;
        const char *text = json_string_value(json_object_get(c, "text"));
        bool thinking = json_is_true(json_object_get(c, "thinking"));
        struct tok_ids ids = {0};
        assert_int_equal(tok_encode(t, text, strlen(text), TOK_ENC_ADDED, &ids), 0);
        struct transcript tr = {.last = -1};
        struct dsml_parser *p;
        assert_int_equal(dsml_parser_new(thinking, 42, record, &tr, &p), 0);
        struct tok_stream st;
        struct tbuf delta = {0};
        tok_stream_init(&st);
        for (size_t k = 0; k < ids.n; k++) {
            tbuf_clear(&delta);
            assert_int_equal(tok_stream_feed(t, &st, ids.v[k], 0, &delta), 0);
            assert_int_equal(dsml_parser_feed(p, delta.s ? delta.s : "", delta.len), 0);
        }
        tbuf_clear(&delta);
        assert_int_equal(tok_stream_flush(&st, &delta), 0);
        assert_int_equal(dsml_parser_feed(p, delta.s ? delta.s : "", delta.len), 0);
        assert_int_equal(dsml_parser_finish(p), 0);
        dsml_parser_free(p);
        tbuf_add(&tr.t, "", 0);
        char *whole = parse_chunked(text, thinking, 0, 0);
        assert_string_equal(tr.t.s, whole);
        free(whole);
        tbuf_free(&tr.t);
        tbuf_free(&delta);
        tok_ids_free(&ids);
    }
    json_decref(cases);
    tok_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_case_1),
        cmocka_unit_test(test_values_and_content),
        cmocka_unit_test(test_malformed_degrades),
        cmocka_unit_test(test_streaming_equals_finished),
        cmocka_unit_test(test_no_leak_byte_by_byte),
        cmocka_unit_test(test_reference_parses),
        cmocka_unit_test(test_token_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
