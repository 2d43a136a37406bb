/*
 * test_safetensors.c - safetensors reader/writer: round trips, corrupt images (built with
 * st_serialize, then edited), st_set_expect messages, files and sharded directories in a mkdtemp
 * directory, and the files Python's safetensors wrote (tests/fixtures/safetensors/).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "engine/err.h"
#include "engine/safetensors.h"

#define LABEL "img.safetensors"

static const float w_data[4] = {1.0f, 2.0f, 3.0f, 4.0f};
static const uint16_t b_data[3] = {0x3f80, 0xc000, 0x3f00};
static const int8_t x_data[5] = {-1, 2, -3, 4, -5};

/* The base image: w F32 [2,2] at [0,16), b BF16 [3] at [16,22), x I8 [5] at [22,27). */
static void base_tensors(struct st_write_tensor t[3])
{
    memset(t, 0, 3 * sizeof *t);
    t[0] = (struct st_write_tensor){.name = "w", .dtype = ST_F32, .ndim = 2, .data = w_data};
    t[0].shape[0] = 2;
    t[0].shape[1] = 2;
    t[1] = (struct st_write_tensor){.name = "b", .dtype = ST_BF16, .ndim = 1, .data = b_data};
    t[1].shape[0] = 3;
    t[2] = (struct st_write_tensor){.name = "x", .dtype = ST_I8, .ndim = 1, .data = x_data};
    t[2].shape[0] = 5;
}

static uint8_t *base_image(size_t *len)
{
    struct st_write_tensor t[3];
    const char *meta[] = {"format", "pt"};
    uint8_t *img = NULL;
    base_tensors(t);
    assert_int_equal(st_serialize(t, 3, meta, 1, &img, len), 0);
    return img;
}

static uint64_t header_len(const uint8_t *img)
{
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--)
        h = (h << 8) | img[i];
    return h;
}

/* A new image: `hdr` as the header, then the data section of `img` (or dlen zero bytes). */
static uint8_t *with_header(const char *hdr, const uint8_t *data, size_t dlen, size_t *len)
{
    size_t hl = strlen(hdr);
    uint8_t *out = calloc(1, 8 + hl + dlen + 1);
    assert_non_null(out);
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(out + 8, hdr, hl);
    if (data && dlen)
        memcpy(out + 8 + hl, data, dlen);
    *len = 8 + hl + dlen;
    return out;
}

/* The base image with the first `from` in its header replaced by `to` (asserts it occurs). */
static uint8_t *edit_base(const char *from, const char *to, size_t *len)
{
    size_t blen;
    uint8_t *img = base_image(&blen);
    size_t hl = (size_t)header_len(img);
    char hdr[2048];
    assert_true(hl < sizeof hdr);
    memcpy(hdr, img + 8, hl);
    hdr[hl] = '\0';
    char *p = strstr(hdr, from);
    assert_non_null(p);
    char edited[4096];
    snprintf(edited, sizeof edited, "%.*s%s%s", (int)(p - hdr), hdr, to, p + strlen(from));
    uint8_t *out = with_header(edited, img + 8 + hl, blen - 8 - hl, len);
    free(img);
    return out;
}

/* Parse and assert failure with `code` and a message containing LABEL, s1 and s2 (if given). */
static void assert_parse_fails(const uint8_t *img, size_t len, int code, const char *s1,
                               const char *s2)
{
    struct st_tensor *t = NULL;
    int n = -1;
    int rc = st_parse(img, len, LABEL, &t, &n);
    if (rc != code || !strstr(err_msg(), LABEL) || (s1 && !strstr(err_msg(), s1)) ||
        (s2 && !strstr(err_msg(), s2)))
        print_error("rc %d, message: %s (want %s / %s)\n", rc, err_msg(), s1 ? s1 : "",
                    s2 ? s2 : "");
    assert_int_equal(rc, code);
    assert_non_null(strstr(err_msg(), LABEL));
    if (s1)
        assert_non_null(strstr(err_msg(), s1));
    if (s2)
        assert_non_null(strstr(err_msg(), s2));
    assert_null(t);
    assert_int_equal(n, -1);
}

static void edit_fails(const char *from, const char *to, const char *s1, const char *s2)
{
    size_t len;
    uint8_t *img = edit_base(from, to, &len);
    assert_parse_fails(img, len, ERR_FORMAT, s1, s2);
    free(img);
}

static void header_fails(const char *hdr, size_t dlen, const char *s1, const char *s2)
{
    size_t len;
    uint8_t *img = with_header(hdr, NULL, dlen, &len);
    assert_parse_fails(img, len, ERR_FORMAT, s1, s2);
    free(img);
}

static void test_dtypes(void **state)
{
    (void)state;
    static const size_t sizes[ST_DTYPE_COUNT] = {2, 2, 4, 8, 1, 1, 1, 1, 2, 4, 8, 1};
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        enum st_dtype d;
        assert_int_equal(st_dtype_size((enum st_dtype)i), sizes[i]);
        assert_int_equal(st_dtype_from_name(st_dtype_name((enum st_dtype)i), &d), 0);
        assert_int_equal(d, i);
    }
    assert_string_equal(st_dtype_name(ST_F8_E4M3), "F8_E4M3");
    assert_string_equal(st_dtype_name(ST_F8_E8M0), "F8_E8M0");
    assert_int_equal(st_dtype_from_name("F8_E5M2", NULL), -1);
    assert_int_equal(st_dtype_from_name("bf16", NULL), -1);
    assert_int_equal(st_dtype_size(ST_DTYPE_COUNT), 0);
}

static void test_roundtrip(void **state)
{
    (void)state;
    size_t len;
    uint8_t *img = base_image(&len);
    uint64_t hl = header_len(img);
    assert_int_equal((8 + hl) % 8, 0);
    assert_int_equal(len, 8 + hl + 27);
    assert_int_equal(img[8], '{');
    /* Keys sorted by name, metadata present. */
    char *hdr = strndup((const char *)img + 8, (size_t)hl);
    assert_non_null(hdr);
    char *pm = strstr(hdr, "\"__metadata__\":{\"format\":\"pt\"}");
    char *pb = strstr(hdr, "\"b\":"), *pw = strstr(hdr, "\"w\":"), *px = strstr(hdr, "\"x\":");
    assert_true(pm && pb && pw && px && pb < pw && pw < px);
    free(hdr);

    struct st_tensor *t = NULL;
    int n = 0;
    assert_int_equal(st_parse(img, len, LABEL, &t, &n), 0);
    assert_int_equal(n, 3);
    const uint8_t *data = img + 8 + hl;
    for (int i = 0; i < n; i++) {
        assert_string_equal(t[i].file, LABEL);
        if (strcmp(t[i].name, "w") == 0) {
            assert_int_equal(t[i].dtype, ST_F32);
            assert_int_equal(t[i].ndim, 2);
            assert_int_equal(t[i].shape[0], 2);
            assert_int_equal(t[i].shape[1], 2);
            assert_int_equal(t[i].nbytes, 16);
            assert_ptr_equal(t[i].data, data);
            assert_memory_equal(t[i].data, w_data, 16);
        } else if (strcmp(t[i].name, "b") == 0) {
            assert_int_equal(t[i].dtype, ST_BF16);
            assert_ptr_equal(t[i].data, data + 16);
            assert_memory_equal(t[i].data, b_data, 6);
        } else {
            assert_string_equal(t[i].name, "x");
            assert_int_equal(t[i].nbytes, 5);
            assert_ptr_equal(t[i].data, data + 22);
            assert_memory_equal(t[i].data, x_data, 5);
        }
    }
    st_tensors_free(t, n);
    free(img);

    /* No tensors at all is a valid image. */
    assert_int_equal(st_serialize(NULL, 0, NULL, 0, &img, &len), 0);
    assert_int_equal(st_parse(img, len, LABEL, &t, &n), 0);
    assert_int_equal(n, 0);
    st_tensors_free(t, n);
    free(img);
}

static void test_serialize_alignment(void **state)
{
    (void)state;
    /* Odd-sized tensors go last: everything with a multiple-of-8 size starts 8-aligned. */
    static const uint8_t bytes[64];
    struct st_write_tensor t[5];
    memset(t, 0, sizeof t);
    const char *names[5] = {"a", "b", "c", "d", "e"};
    const enum st_dtype dts[5] = {ST_I8, ST_F32, ST_F64, ST_BF16, ST_I8};
    const int64_t dims[5] = {3, 4, 2, 5, 8};
    for (int i = 0; i < 5; i++) {
        t[i].name = names[i];
        t[i].dtype = dts[i];
        t[i].ndim = 1;
        t[i].shape[0] = dims[i];
        t[i].data = bytes;
    }
    uint8_t *img;
    size_t len;
    assert_int_equal(st_serialize(t, 5, NULL, 0, &img, &len), 0);
    struct st_tensor *p;
    int n;
    assert_int_equal(st_parse(img, len, LABEL, &p, &n), 0);
    const uint8_t *data = img + 8 + header_len(img);
    for (int i = 0; i < n; i++) {
        size_t off = (size_t)((const uint8_t *)p[i].data - data);
        assert_int_equal(off % st_dtype_size(p[i].dtype), 0);
        if (p[i].nbytes % 8 == 0)
            assert_int_equal(off % 8, 0);
    }
    st_tensors_free(p, n);
    free(img);

    /* Bad input to the writer. */
    base_tensors(t);
    t[1].name = "w";
    assert_int_equal(st_serialize(t, 3, NULL, 0, &img, &len), ERR_INVAL);
    assert_non_null(strstr(err_msg(), "duplicate"));
    base_tensors(t);
    t[0].dtype = ST_DTYPE_COUNT;
    assert_int_equal(st_serialize(t, 3, NULL, 0, &img, &len), ERR_INVAL);
    base_tensors(t);
    t[0].name = "__metadata__";
    assert_int_equal(st_serialize(t, 3, NULL, 0, &img, &len), ERR_INVAL);
    base_tensors(t);
    t[0].shape[1] = -1;
    assert_int_equal(st_serialize(t, 3, NULL, 0, &img, &len), ERR_INVAL);
}

static void test_truncated(void **state)
{
    (void)state;
    size_t len;
    uint8_t *img = base_image(&len);
    uint64_t hl = header_len(img);
    assert_parse_fails(img, 0, ERR_FORMAT, "shorter", NULL);
    assert_parse_fails(img, 7, ERR_FORMAT, "shorter", NULL);
    assert_parse_fails(img, 8, ERR_FORMAT, "past the end of the file", NULL);
    assert_parse_fails(img, 8 + (size_t)hl - 1, ERR_FORMAT, "past the end of the file", NULL);
    /* Data section one byte short: the last tensor (x, at [22,27)) no longer fits. */
    assert_parse_fails(img, len - 1, ERR_FORMAT, "tensor x:", "past the end of the data");
    /* Data section empty. */
    assert_parse_fails(img, 8 + (size_t)hl, ERR_FORMAT, "past the end of the data", NULL);
    /* Header length fields past the end, absurd, and zero. */
    uint8_t *bad = malloc(len);
    assert_non_null(bad);
    memcpy(bad, img, len);
    memset(bad, 0xff, 8);
    assert_parse_fails(bad, len, ERR_FORMAT, "past the end of the file", NULL);
    memset(bad, 0, 8);
    bad[4] = 1;
    assert_parse_fails(bad, len, ERR_FORMAT, "header length", NULL);
    memset(bad, 0, 8);
    assert_parse_fails(bad, len, ERR_FORMAT, "not valid JSON", NULL);
    free(bad);
    free(img);
}

static void test_bad_json(void **state)
{
    (void)state;
    header_fails("{\"w\":", 0, "not valid JSON", NULL);
    header_fails("[1, 2]", 0, "not a JSON object", NULL);
    header_fails("\"x\"", 0, "not valid JSON", NULL);
    header_fails("{\"w\":[1,2]}", 0, "tensor w:", "not an object");
    header_fails("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                 8, "duplicate", NULL);
    header_fails("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "empty name",
                 NULL);
    /* Trailing spaces after the object are allowed. */
    size_t len;
    uint8_t *img = with_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}  ",
                               NULL, 4, &len);
    struct st_tensor *t;
    int n;
    assert_int_equal(st_parse(img, len, LABEL, &t, &n), 0);
    assert_int_equal(n, 1);
    st_tensors_free(t, n);
    free(img);
    /* An embedded NUL inside the header makes it invalid, whatever follows. */
    img = with_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", NULL, 4,
                      &len);
    img[8 + 10] = '\0';
    assert_parse_fails(img, len, ERR_FORMAT, "not valid JSON", NULL);
    free(img);
}

static void test_bad_entries(void **state)
{
    (void)state;
    edit_fails("\"F32\"", "\"F31\"", "tensor w:", "unknown dtype \"F31\"");
    edit_fails("\"F32\"", "32", "tensor w:", "dtype");
    edit_fails("\"dtype\":\"F32\",", "", "tensor w:", "dtype");
    edit_fails("\"shape\":[2,2],", "", "tensor w:", "shape");
    edit_fails("[2,2]", "{}", "tensor w:", "shape");
    edit_fails("[2,2]", "[2,3]", "tensor w:", "24 bytes");
    edit_fails("[2,2]", "[2,-2]", "tensor w:", "shape[1]");
    edit_fails("[2,2]", "[2,2.0]", "tensor w:", "shape[1]");
    edit_fails("[2,2]", "[2,\"2\"]", "tensor w:", "shape[1]");
    edit_fails("[2,2]", "[1,1,1,1,1,1,1,1,2,2]", "tensor w:", "dims");
    edit_fails("[2,2]", "[4294967296,4294967296,4]", "tensor w:", "overflow");
    edit_fails("[2,2]", "[9223372036854775807,9223372036854775807]", "tensor w:", "overflow");
    edit_fails("[2,2]", "[99999999999999999999,1]", NULL, "JSON");
    edit_fails("\"data_offsets\":[0,16]", "\"data_offsets\":[16,0]", "tensor w:", "begin > end");
    edit_fails("\"data_offsets\":[0,16]", "\"data_offsets\":[0]", "tensor w:", "data_offsets");
    edit_fails("\"data_offsets\":[0,16]", "\"data_offsets\":[0,16,3]", "tensor w:", "data_offsets");
    edit_fails("\"data_offsets\":[0,16]", "\"data_offsets\":[-1,15]", "tensor w:", "data_offsets");
    edit_fails("\"data_offsets\":[0,16]", "\"data_offsets\":[0,16.5]", "tensor w:", "data_offsets");
    edit_fails(",\"data_offsets\":[0,16]", "", "tensor w:", "data_offsets");
    edit_fails("\"data_offsets\":[16,22]", "\"data_offsets\":[30,36]",
               "tensor b:", "past the end of the data section");
    edit_fails("\"data_offsets\":[16,22]", "\"data_offsets\":[10,16]",
               "tensor b:", "overlap tensor w");
    edit_fails("\"data_offsets\":[16,22]", "\"data_offsets\":[0,6]", "overlap", NULL);
    edit_fails("\"data_offsets\":[22,27]", "\"data_offsets\":[21,26]", "tensor x:", "overlap");
    edit_fails("{\"format\":\"pt\"}", "{\"format\":1}", "__metadata__", "format");
    edit_fails("{\"format\":\"pt\"}", "\"pt\"", "__metadata__", "not an object");

    /* Gaps and empty tensors anywhere are fine. */
    size_t len;
    uint8_t *img = edit_base("\"data_offsets\":[22,27]}",
                             "\"data_offsets\":[22,27]},\"z\":{\"dtype\":\"BF16\",\"shape\":[0,3],"
                             "\"data_offsets\":[4,4]}",
                             &len);
    struct st_tensor *t;
    int n;
    assert_int_equal(st_parse(img, len, LABEL, &t, &n), 0);
    assert_int_equal(n, 4);
    st_tensors_free(t, n);
    free(img);
}

/* ---- sets ---- */

static struct st_set *base_set(void)
{
    size_t len;
    uint8_t *img = base_image(&len);
    struct st_set *s = NULL;
    assert_int_equal(st_set_open_mem_take(&s, "builtin", img, len), 0);
    return s;
}

static void test_set_lookup(void **state)
{
    (void)state;
    struct st_set *s = base_set();
    assert_int_equal(st_set_count(s), 3);
    assert_string_equal(st_set_at(s, 0)->name, "b");
    assert_string_equal(st_set_at(s, 1)->name, "w");
    assert_string_equal(st_set_at(s, 2)->name, "x");
    assert_null(st_set_at(s, 3));
    assert_null(st_set_at(s, -1));
    const struct st_tensor *w = st_set_find(s, "w");
    assert_non_null(w);
    assert_string_equal(w->file, "builtin");
    assert_memory_equal(w->data, w_data, sizeof w_data);
    assert_null(st_set_find(s, "W"));
    assert_null(st_set_find(s, ""));
    st_set_free(s);

    /* A failing image is freed by open_mem_take (ASan/valgrind would flag a leak). */
    uint8_t *junk = malloc(4);
    assert_non_null(junk);
    assert_int_equal(st_set_open_mem_take(&s, "junk", junk, 4), ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "junk"));
}

static void test_set_expect(void **state)
{
    (void)state;
    struct st_set *s = base_set();
    const struct st_tensor *t = NULL;
    const int64_t ok[2] = {2, 2}, wrong[2] = {2, 3};
    assert_int_equal(st_set_expect(s, "w", ST_F32, 2, ok, &t), 0);
    assert_string_equal(t->name, "w");

    assert_int_equal(st_set_expect(s, "layers.0.missing", ST_F32, 2, ok, &t), ERR_NOTFOUND);
    assert_non_null(strstr(err_msg(), "builtin"));
    assert_non_null(strstr(err_msg(), "layers.0.missing"));
    assert_non_null(strstr(err_msg(), "not found"));

    assert_int_equal(st_set_expect(s, "w", ST_BF16, 2, ok, &t), ERR_FORMAT);
    assert_string_equal(err_msg(), "builtin: w: dtype BF16 expected, found F32");

    assert_int_equal(st_set_expect(s, "w", ST_F32, 2, wrong, &t), ERR_FORMAT);
    assert_string_equal(err_msg(), "builtin: w: shape [2, 3] expected, found [2, 2]");

    assert_int_equal(st_set_expect(s, "w", ST_F32, 1, ok, NULL), ERR_FORMAT);
    assert_string_equal(err_msg(), "builtin: w: shape [2] expected, found [2, 2]");

    assert_int_equal(st_set_expect(s, "w", ST_F32, 9, ok, NULL), ERR_INVAL);
    st_set_free(s);
}

/* ---- files ---- */

static char tmpdir[64];

static int make_tmpdir(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_safetensors.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

/* Remove `dir` and everything in it (two levels deep at most, as the tests create). */
static void rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    char p[512];
    if (!d)
        return;
    while ((de = readdir(d)) != NULL) {
        struct stat st;
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static int remove_tmpdir(void **state)
{
    (void)state;
    rm_tree(tmpdir);
    return 0;
}

/* A fresh empty directory tmpdir/<name>; returns its path in a static buffer. */
static const char *subdir(const char *name)
{
    static char p[256];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    rm_tree(p);
    assert_int_equal(mkdir(p, 0755), 0);
    return p;
}

static void write_bytes(const char *dir, const char *name, const char *bytes, size_t len)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *dir, const char *name, const char *text)
{
    write_bytes(dir, name, text, strlen(text));
}

/* Write one tensor `name` (F32 [2,2]) into dir/file. */
static void write_one(const char *dir, const char *file, const char *name)
{
    char p[512];
    struct st_write_tensor t[3];
    base_tensors(t);
    t[0].name = name;
    snprintf(p, sizeof p, "%s/%s", dir, file);
    assert_int_equal(st_write_file(p, t, 1), 0);
}

static void open_dir_fails(const char *dir, int code, const char *s1, const char *s2)
{
    struct st_set *s = NULL;
    int rc = st_set_open_dir(&s, dir);
    if (rc != code || (s1 && !strstr(err_msg(), s1)) || (s2 && !strstr(err_msg(), s2)))
        print_error("rc %d, message: %s\n", rc, err_msg());
    assert_int_equal(rc, code);
    if (s1)
        assert_non_null(strstr(err_msg(), s1));
    if (s2)
        assert_non_null(strstr(err_msg(), s2));
    assert_null(s);
}

static void test_write_and_open_file(void **state)
{
    (void)state;
    const char *d = subdir("single");
    char p[512], tmp[520];
    struct st_write_tensor t[3];
    base_tensors(t);
    snprintf(p, sizeof p, "%s/model.safetensors", d);
    assert_int_equal(st_write_file(p, t, 3), 0);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    assert_int_not_equal(access(tmp, F_OK), 0);

    struct st_set *s = NULL;
    assert_int_equal(st_set_open_file(&s, p), 0);
    assert_int_equal(st_set_count(s), 3);
    const struct st_tensor *x = st_set_find(s, "x");
    assert_non_null(x);
    assert_string_equal(x->file, p);
    assert_memory_equal(x->data, x_data, sizeof x_data);
    st_set_free(s);

    /* Opening the directory finds the single file too. */
    s = NULL;
    assert_int_equal(st_set_open_dir(&s, d), 0);
    assert_int_equal(st_set_count(s), 3);
    st_set_free(s);

    /* Errors: missing, a directory, an empty file, a short file. */
    snprintf(p, sizeof p, "%s/nope.safetensors", d);
    assert_int_equal(st_set_open_file(&s, p), ERR_NOTFOUND);
    assert_non_null(strstr(err_msg(), "nope.safetensors"));
    assert_int_equal(st_set_open_file(&s, d), ERR_IO);
    assert_non_null(strstr(err_msg(), "directory"));
    write_text(d, "empty.safetensors", "");
    snprintf(p, sizeof p, "%s/empty.safetensors", d);
    assert_int_equal(st_set_open_file(&s, p), ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "empty file"));
    write_text(d, "short.bin", "abc");
    snprintf(p, sizeof p, "%s/short.bin", d);
    assert_int_equal(st_set_open_file(&s, p), ERR_FORMAT);
    assert_non_null(strstr(err_msg(), "short.bin"));
    if (geteuid() != 0) {
        snprintf(p, sizeof p, "%s/model.safetensors", d);
        assert_int_equal(chmod(p, 0), 0);
        assert_int_equal(st_set_open_file(&s, p), ERR_IO);
        assert_non_null(strstr(err_msg(), "model.safetensors"));
        chmod(p, 0644);
    }
    /* A failed write leaves no temporary behind and reports the path. */
    snprintf(p, sizeof p, "%s/no/such/dir.safetensors", d);
    assert_int_equal(st_write_file(p, t, 3), ERR_IO);
    assert_non_null(strstr(err_msg(), "dir.safetensors.tmp"));
}

static void test_dir_glob(void **state)
{
    (void)state;
    const char *d = subdir("glob");
    char dir[256];
    snprintf(dir, sizeof dir, "%s", d);
    write_one(dir, "model-00002-of-00002.safetensors", "layers.1.w");
    write_one(dir, "model-00001-of-00002.safetensors", "layers.0.w");
    write_text(dir, "config.json", "{}");
    write_text(dir, ".hidden.safetensors", "garbage");

    struct st_set *s = NULL;
    assert_int_equal(st_set_open_dir(&s, dir), 0);
    assert_int_equal(st_set_count(s), 2);
    const struct st_tensor *t = st_set_find(s, "layers.1.w");
    assert_non_null(t);
    assert_non_null(strstr(t->file, "model-00002-of-00002.safetensors"));
    st_set_free(s);

    /* The same name in two files. */
    write_one(dir, "model-00003.safetensors", "layers.0.w");
    open_dir_fails(dir, ERR_FORMAT, "layers.0.w", "model-00003.safetensors");

    /* A directory that looks like a shard. */
    d = subdir("glob2");
    snprintf(dir, sizeof dir, "%s", d);
    write_one(dir, "a.safetensors", "w");
    char p[512];
    snprintf(p, sizeof p, "%s/b.safetensors", dir);
    assert_int_equal(mkdir(p, 0755), 0);
    open_dir_fails(dir, ERR_IO, "b.safetensors", "directory");

    /* A corrupt shard names the shard. */
    d = subdir("glob3");
    snprintf(dir, sizeof dir, "%s", d);
    write_one(dir, "a.safetensors", "w");
    static const char bad[] = "\x10\0\0\0\0\0\0\0{\"t\":{}}        ";
    write_bytes(dir, "b.safetensors", bad, sizeof bad - 1);
    open_dir_fails(dir, ERR_FORMAT, "b.safetensors", "tensor t");

    /* Empty, missing, not a directory. */
    d = subdir("empty");
    open_dir_fails(d, ERR_NOTFOUND, "no model.safetensors.index.json", NULL);
    snprintf(p, sizeof p, "%s/missing", tmpdir);
    open_dir_fails(p, ERR_NOTFOUND, "missing", NULL);
    snprintf(p, sizeof p, "%s/a.safetensors", dir);
    open_dir_fails(p, ERR_INVAL, "not a directory", NULL);
}

static void test_dir_index(void **state)
{
    (void)state;
    char dir[256];
    snprintf(dir, sizeof dir, "%s", subdir("index"));
    write_one(dir, "s1.safetensors", "a");
    write_one(dir, "s2.safetensors", "b");
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\":{},\"weight_map\":{\"a\":\"s1.safetensors\","
               "\"b\":\"s2.safetensors\"}}");
    /* Not in the index, so not opened. */
    write_text(dir, "stray.safetensors", "junk");

    struct st_set *s = NULL;
    assert_int_equal(st_set_open_dir(&s, dir), 0);
    assert_int_equal(st_set_count(s), 2);
    assert_non_null(strstr(st_set_find(s, "b")->file, "s2.safetensors"));
    st_set_free(s);

    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"c\":\"s2.safetensors\"}}");
    open_dir_fails(dir, ERR_NOTFOUND, "tensor c", "s2.safetensors");

    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s2.safetensors\",\"b\":\"s2.safetensors\"}}");
    open_dir_fails(dir, ERR_NOTFOUND, "tensor a", "s2.safetensors");

    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s1.safetensors\"}}");
    open_dir_fails(dir, ERR_NOTFOUND, "tensor b", "s1.safetensors");

    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s2.safetensors\",\"b\":\"s1.safetensors\"}}");
    open_dir_fails(dir, ERR_FORMAT, "tensor a", "found in");

    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"../index/s1.safetensors\"}}");
    open_dir_fails(dir, ERR_FORMAT, "plain file name", "../index/s1.safetensors");
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a\":\"..\"}}");
    open_dir_fails(dir, ERR_FORMAT, "plain file name", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a\":\"\"}}");
    open_dir_fails(dir, ERR_FORMAT, "plain file name", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a\":3}}");
    open_dir_fails(dir, ERR_FORMAT, "not a string", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"a\":\"s9.safetensors\"}}");
    open_dir_fails(dir, ERR_NOTFOUND, "s9.safetensors", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":[]}");
    open_dir_fails(dir, ERR_FORMAT, "weight_map", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{}}");
    open_dir_fails(dir, ERR_FORMAT, "empty", NULL);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":");
    open_dir_fails(dir, ERR_FORMAT, "model.safetensors.index.json", "invalid JSON");
    write_text(dir, "model.safetensors.index.json", "");
    open_dir_fails(dir, ERR_FORMAT, "model.safetensors.index.json", "empty");

    /* A tensor present in two listed shards. */
    write_one(dir, "s3.safetensors", "a");
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"a\":\"s1.safetensors\",\"b\":\"s3.safetensors\"}}");
    open_dir_fails(dir, ERR_FORMAT, "tensor a", "present in both");
}

/* ---- files written by Python's safetensors ---- */

static const char *fixture(const char *rel)
{
    static char p[1024];
    const char *root = getenv("DSV4_SOURCE_ROOT");
    snprintf(p, sizeof p, "%s/tests/fixtures/safetensors/%s", root ? root : ".", rel);
    return p;
}

static void check_python_tensors(const struct st_set *s)
{
    const struct st_tensor *t;
    static const int64_t s3[1] = {3}, s12[2] = {1, 2}, s2[1] = {2}, s23[2] = {2, 3},
                         s04[2] = {0, 4};
    assert_int_equal(st_set_count(s), 14);
    assert_int_equal(st_set_expect(s, "a.bf16", ST_BF16, 1, s3, &t), 0);
    const uint16_t bf[3] = {0x3f80, 0xc000, 0x3f00};
    assert_memory_equal(t->data, bf, sizeof bf);
    assert_int_equal(st_set_expect(s, "b.f8", ST_F8_E4M3, 2, s12, &t), 0);
    assert_int_equal(((const uint8_t *)t->data)[0], 0x38);
    assert_int_equal(((const uint8_t *)t->data)[1], 0xc0);
    assert_int_equal(st_set_expect(s, "c.e8m0", ST_F8_E8M0, 1, s2, &t), 0);
    assert_int_equal(((const uint8_t *)t->data)[0], 0x7f);
    assert_int_equal(((const uint8_t *)t->data)[1], 0x81);
    assert_int_equal(st_set_expect(s, "d.i8", ST_I8, 1, s3, &t), 0);
    assert_int_equal(((const int8_t *)t->data)[0], -1);
    assert_int_equal(st_set_expect(s, "e.i64", ST_I64, 2, s23, &t), 0);
    for (int i = 0; i < 6; i++) {
        int64_t v;
        memcpy(&v, (const uint8_t *)t->data + 8 * i, 8);
        assert_int_equal(v, i);
    }
    assert_int_equal(st_set_expect(s, "f.f32", ST_F32, 1, s3, &t), ERR_FORMAT);
    assert_int_equal(st_set_expect(s, "m.scalar", ST_F32, 0, NULL, &t), 0);
    float f;
    memcpy(&f, t->data, 4);
    assert_true(f == 3.0f);
    assert_int_equal(st_set_expect(s, "n.empty", ST_BF16, 2, s04, &t), 0);
    assert_int_equal(t->nbytes, 0);
    assert_non_null(st_set_find(s, "l.bool"));
    assert_int_equal(st_set_find(s, "l.bool")->dtype, ST_BOOL);
    assert_int_equal(st_set_find(s, "h.f64")->dtype, ST_F64);
    assert_int_equal(st_set_find(s, "j.i16")->dtype, ST_I16);
    assert_int_equal(st_set_find(s, "k.i32")->dtype, ST_I32);
    assert_int_equal(st_set_find(s, "i.u8")->dtype, ST_U8);
    assert_int_equal(st_set_find(s, "g.f16")->dtype, ST_F16);
}

static void test_python_files(void **state)
{
    (void)state;
    struct st_set *s = NULL;
    assert_int_equal(st_set_open_file(&s, fixture("py_single.safetensors")), 0);
    check_python_tensors(s);
    st_set_free(s);

    s = NULL;
    int rc = st_set_open_dir(&s, fixture("py_sharded"));
    if (rc != 0)
        print_error("%s\n", err_msg());
    assert_int_equal(rc, 0);
    check_python_tensors(s);
    assert_non_null(strstr(st_set_find(s, "a.bf16")->file, "model-00001-of-00002.safetensors"));
    assert_non_null(strstr(st_set_find(s, "n.empty")->file, "model-00002-of-00002.safetensors"));
    st_set_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_serialize_alignment),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_bad_entries),
        cmocka_unit_test(test_set_lookup),
        cmocka_unit_test(test_set_expect),
        cmocka_unit_test(test_write_and_open_file),
        cmocka_unit_test(test_dir_glob),
        cmocka_unit_test(test_dir_index),
        cmocka_unit_test(test_python_files),
    };
    return cmocka_run_group_tests(tests, make_tmpdir, remove_tmpdir);
}
