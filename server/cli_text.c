/*
 * cli_text.c - the text subcommands: tokenize, detokenize, chat-encode.
 *
 *   dsv4d tokenize --tokenizer PATH [--special] [--json-lines] [--pieces]
 *       Reads UTF-8 lines on stdin (the newline is not part of the text) and prints the ids of
 *       each line, space-separated, one output line per input line. --special recognises
 *       added tokens (<｜User｜>, <think>, ...) in the text; without it they are plain text.
 *       --json-lines: each input line is a JSON string literal (so texts may hold newlines).
 *       --pieces: print the pre-tokenized pieces of each line (a JSON array of strings; an
 *       added token is one piece) instead of ids.
 *   dsv4d detokenize --tokenizer PATH [--skip-special] [--json-lines]
 *       Reads lines of space-separated ids and prints the decoded text of each line followed
 *       by a newline (--json-lines: as a JSON string literal, so the text may hold newlines).
 *   dsv4d chat-encode [--tokenizer PATH] [--mode thinking|chat] [--reasoning-effort E]
 *                     [--encoder original|0731] [--keep-thinking] [--ids] [--special]
 *       Reads an OpenAI-shaped chat request ({"messages": [...], "tools": [...]}, or a bare
 *       message list; an optional "context" list is the reference encoder's context) on stdin and
 * prints the DSV4 prompt text exactly (no newline added), or with --ids its token ids (needs
 * --tokenizer). See chat.h for the rendering rules.
 *
 * Each function returns the process exit status (0 ok, 1 failure, 2 usage); only main.c exits.
 */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"
#include "engine/err.h"
#include "engine/json_py.h"
#include "engine/tbuf.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

/* ---- Shared helpers ---- */

/* Read one line (without its '\n') into line. Returns 1 for a line, 0 at EOF, <0 on error. */
static int read_line(FILE *f, struct tbuf *line)
{
    tbuf_clear(line);
    int c, got = 0;
    while ((c = getc(f)) != EOF) {
        got = 1;
        if (c == '\n')
            return 1;
        int rc = tbuf_addc(line, (char)c);
        if (rc < 0)
            return rc;
    }
    if (ferror(f))
        return err_setf(ERR_IO, "stdin: %s", strerror(errno));
    return got;
}

static int read_all(FILE *f, struct tbuf *out)
{
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        int rc = tbuf_add(out, buf, n);
        if (rc < 0)
            return rc;
    }
    if (ferror(f))
        return err_setf(ERR_IO, "stdin: %s", strerror(errno));
    return 0;
}

static int fail(const char *cmd, int rc)
{
    fprintf(stderr, "dsv4d %s: %s (%s)\n", cmd, err_msg(), err_str(rc));
    return 1;
}

static const char *tokenizer_default(void)
{
    const char *p = getenv("DSV4_TOKENIZER");
    return p && *p ? p : NULL;
}

/* Decode a JSON string literal line into out. */
static int json_line_text(const struct tbuf *line, struct tbuf *out)
{
    json_error_t jerr;
    json_t *v =
        json_loadb(line->s ? line->s : "", line->len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!json_is_string(v)) {
        json_decref(v);
        return err_setf(ERR_INVAL, "input line is not a JSON string: %s", v ? "" : jerr.text);
    }
    tbuf_clear(out);
    int rc = tbuf_add(out, json_string_value(v), json_string_length(v));
    json_decref(v);
    return rc;
}

/* ---- tokenize ---- */

/* --pieces: one JSON array of strings per line. */
static int print_piece(void *ud, const char *piece, size_t n, int32_t added_id)
{
    struct tbuf *out = ud;
    int rc;
    if (out->len > 1 && (rc = tbuf_add(out, ", ", 2)) < 0)
        return rc;
    (void)added_id;
    return jpy_dump_str(out, piece, n);
}

int cli_tokenize(int argc, char **argv)
{
    const char *path = tokenizer_default();
    unsigned flags = 0;
    bool json_lines = false, pieces = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--tokenizer") == 0 && i + 1 < argc)
            path = argv[++i];
        else if (strcmp(argv[i], "--special") == 0)
            flags |= TOK_ENC_ADDED;
        else if (strcmp(argv[i], "--json-lines") == 0)
            json_lines = true;
        else if (strcmp(argv[i], "--pieces") == 0)
            pieces = true;
        else {
            fprintf(stderr, "usage: dsv4d tokenize --tokenizer PATH [--special] [--json-lines] "
                            "[--pieces] < lines\n");
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "dsv4d tokenize: --tokenizer PATH is required (or DSV4_TOKENIZER)\n");
        return 2;
    }
    struct tokenizer *tok = NULL;
    struct tbuf line = {0}, text = {0}, out = {0};
    struct tok_ids ids = {0};
    int rc = tok_load(path, &tok);
    if (rc < 0)
        goto out;
    while ((rc = read_line(stdin, &line)) > 0) {
        const struct tbuf *src = &line;
        if (json_lines) {
            if ((rc = json_line_text(&line, &text)) < 0)
                goto out;
            src = &text;
        }
        tbuf_clear(&out);
        ids.n = 0;
        if (pieces) {
            if ((rc = tbuf_addc(&out, '[')) == 0 &&
                (rc = tok_split(tok, src->s ? src->s : "", src->len, flags, print_piece, &out)) ==
                    0)
                rc = tbuf_addc(&out, ']');
        } else {
            rc = tok_encode(tok, src->s ? src->s : "", src->len, flags, &ids);
            for (size_t k = 0; rc == 0 && k < ids.n; k++)
                rc = tbuf_addf(&out, k ? " %d" : "%d", (int)ids.v[k]);
        }
        if (rc < 0 || (rc = tbuf_addc(&out, '\n')) < 0)
            goto out;
        fwrite(out.s, 1, out.len, stdout);
    }
out:
    fflush(stdout);
    tok_free(tok);
    tbuf_free(&line);
    tbuf_free(&text);
    tbuf_free(&out);
    tok_ids_free(&ids);
    return rc < 0 ? fail("tokenize", rc) : 0;
}

/* ---- detokenize ---- */

static int parse_ids(const struct tbuf *line, struct tok_ids *ids)
{
    const char *p = line->s ? line->s : "";
    ids->n = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == ',')
            p++;
        if (!*p)
            return 0;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX)
            return err_setf(ERR_INVAL, "bad token id near \"%.20s\"", p);
        int rc = tok_ids_push(ids, (int32_t)v);
        if (rc < 0)
            return rc;
        p = end;
    }
}

int cli_detokenize(int argc, char **argv)
{
    const char *path = tokenizer_default();
    unsigned flags = 0;
    bool json_lines = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--tokenizer") == 0 && i + 1 < argc)
            path = argv[++i];
        else if (strcmp(argv[i], "--skip-special") == 0)
            flags |= TOK_DEC_SKIP_SPECIAL;
        else if (strcmp(argv[i], "--json-lines") == 0)
            json_lines = true;
        else {
            fprintf(stderr, "usage: dsv4d detokenize --tokenizer PATH [--skip-special] "
                            "[--json-lines] < id-lines\n");
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "dsv4d detokenize: --tokenizer PATH is required (or DSV4_TOKENIZER)\n");
        return 2;
    }
    struct tokenizer *tok = NULL;
    struct tbuf line = {0}, text = {0}, out = {0};
    struct tok_ids ids = {0};
    int rc = tok_load(path, &tok);
    if (rc < 0)
        goto out;
    while ((rc = read_line(stdin, &line)) > 0) {
        tbuf_clear(&text);
        tbuf_clear(&out);
        if ((rc = parse_ids(&line, &ids)) < 0 ||
            (rc = tok_decode(tok, ids.v, ids.n, flags, &text)) < 0)
            goto out;
        if (json_lines)
            rc = jpy_dump_str(&out, text.s ? text.s : "", text.len);
        else
            rc = tbuf_add(&out, text.s ? text.s : "", text.len);
        if (rc < 0 || (rc = tbuf_addc(&out, '\n')) < 0)
            goto out;
        fwrite(out.s, 1, out.len, stdout);
    }
out:
    fflush(stdout);
    tok_free(tok);
    tbuf_free(&line);
    tbuf_free(&text);
    tbuf_free(&out);
    tok_ids_free(&ids);
    return rc < 0 ? fail("detokenize", rc) : 0;
}

/* ---- chat-encode ---- */

static int usage_chat(void)
{
    fprintf(stderr, "usage: dsv4d chat-encode [--tokenizer PATH] [--mode thinking|chat]\n"
                    "                         [--reasoning-effort none|low|high|max] "
                    "[--encoder original|0731]\n"
                    "                         [--keep-thinking] [--no-bos] [--ids [--special]] < "
                    "request.json\n");
    return 2;
}

int cli_chat_encode(int argc, char **argv)
{
    const char *path = tokenizer_default();
    struct chat_opts o;
    bool want_ids = false, special = false;
    chat_opts_init(&o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--tokenizer") == 0 && v) {
            path = v;
            i++;
        } else if (strcmp(a, "--mode") == 0 && v) {
            if (strcmp(v, "thinking") == 0)
                o.mode = CHAT_MODE_THINKING;
            else if (strcmp(v, "chat") == 0)
                o.mode = CHAT_MODE_CHAT;
            else
                return usage_chat();
            i++;
        } else if (strcmp(a, "--reasoning-effort") == 0 && v) {
            if (chat_effort_parse(v, &o.effort) < 0) {
                fprintf(stderr, "dsv4d chat-encode: %s\n", err_msg());
                return 2;
            }
            i++;
        } else if (strcmp(a, "--encoder") == 0 && v) {
            if (strcmp(v, "original") == 0)
                o.revision = CHAT_REV_ORIGINAL;
            else if (strcmp(v, "0731") == 0)
                o.revision = CHAT_REV_0731;
            else
                return usage_chat();
            i++;
        } else if (strcmp(a, "--keep-thinking") == 0) {
            o.drop_thinking = false;
        } else if (strcmp(a, "--no-bos") == 0) {
            o.add_bos = false;
        } else if (strcmp(a, "--ids") == 0) {
            want_ids = true;
        } else if (strcmp(a, "--special") == 0) {
            special = true;
        } else {
            return usage_chat();
        }
    }
    if (want_ids && !path) {
        fprintf(stderr, "dsv4d chat-encode: --ids needs --tokenizer PATH (or DSV4_TOKENIZER)\n");
        return 2;
    }
    struct tbuf in = {0}, out = {0};
    struct chat_prompt prompt = {0};
    struct tokenizer *tok = NULL;
    struct tok_ids ids = {0};
    json_t *req = NULL;
    json_error_t jerr;
    int rc = read_all(stdin, &in);
    if (rc < 0)
        goto out;
    req = json_loadb(in.s ? in.s : "", in.len, JSON_ALLOW_NUL, &jerr);
    if (!req) {
        rc = err_setf(ERR_INVAL, "stdin: line %d: %s", jerr.line, jerr.text);
        goto out;
    }
    const json_t *messages = req, *tools = NULL, *context = NULL;
    if (json_is_object(req)) {
        messages = json_object_get(req, "messages");
        tools = json_object_get(req, "tools");
        context = json_object_get(req, "context");
    }
    if ((rc = chat_encode(messages, tools, context, &o, &prompt)) < 0)
        goto out;
    if (!want_ids) {
        fwrite(prompt.text.s, 1, prompt.text.len, stdout);
        goto out;
    }
    if ((rc = tok_load(path, &tok)) < 0 ||
        (rc = chat_prompt_tokenize(tok, &prompt, !special, &ids)) < 0)
        goto out;
    for (size_t k = 0; rc == 0 && k < ids.n; k++)
        rc = tbuf_addf(&out, k ? " %d" : "%d", (int)ids.v[k]);
    if (rc == 0 && (rc = tbuf_addc(&out, '\n')) == 0)
        fwrite(out.s, 1, out.len, stdout);
out:
    fflush(stdout);
    json_decref(req);
    chat_prompt_free(&prompt);
    tok_free(tok);
    tok_ids_free(&ids);
    tbuf_free(&in);
    tbuf_free(&out);
    return rc < 0 ? fail("chat-encode", rc) : 0;
}
