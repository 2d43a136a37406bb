/*
 * safetensors.c - safetensors checkpoint reader (mmap, zero copy) and writer. See safetensors.h.
 *
 * File layout: an 8-byte little-endian header length N, N bytes of JSON header (an object
 * mapping tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional
 * "__metadata__" object of strings; trailing spaces allowed), then the data section. Offsets are
 * relative to the start of the data section.
 *
 * Reading: st_parse() validates one whole header and produces views into the caller's buffer;
 * it only touches the 8 + N header bytes, never tensor data, so opening a mmap'd 4 GB shard
 * costs a page fault or two plus the JSON parse. A struct st_set owns the mappings and all tensor
 * records, sorted by name, with an open-addressing hash table (index + 1, 0 = empty slot) over
 * them for lookups.
 *
 * Writing: st_serialize() emits a header whose tensor keys are sorted by name and a contiguous
 * data section (no gaps: Python's safetensors rejects gaps). Data placement is ordered so that
 * alignment is as good as contiguity allows: the header is padded with spaces so the data
 * section starts at a multiple of 8; tensors whose byte size is a multiple of 8 come first (so
 * each starts 8-byte aligned), then the rest by decreasing element size (each at least aligned
 * to its element size), ties by name.
 */
#include "engine/safetensors.h"
#include "engine/err.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

/* Same limit as the reference implementation: headers above 100 MB are rejected. */
#define ST_MAX_HEADER 100000000ull
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SUFFIX     ".safetensors"
#define ST_META_KEY   "__metadata__"
/* Names in messages are clipped so that a hostile 1 MB name cannot flood the error buffer. */
#define ST_NAME_MAX_MSG 200

static const struct {
    const char *name;
    size_t size;
} st_dtypes[ST_DTYPE_COUNT] = {
    [ST_BF16] = {"BF16", 2}, [ST_F16] = {"F16", 2},         [ST_F32] = {"F32", 4},
    [ST_F64] = {"F64", 8},   [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E8M0] = {"F8_E8M0", 1},
    [ST_I8] = {"I8", 1},     [ST_U8] = {"U8", 1},           [ST_I16] = {"I16", 2},
    [ST_I32] = {"I32", 4},   [ST_I64] = {"I64", 8},         [ST_BOOL] = {"BOOL", 1},
};

/* One file of a set: a read-only private mapping, or a malloc'd image (mapped == 0). */
struct st_file {
    char *path; /* owned; label used in messages and as st_tensor.file */
    uint8_t *base;
    size_t len;
    int mapped;
};

struct st_set {
    char *label; /* owned: the directory or file the set was opened from */
    struct st_file *files;
    int nfiles;
    struct st_tensor *tensors; /* sorted by name; names owned */
    int count;
    int32_t *slots; /* open addressing: tensor index + 1, 0 = empty */
    size_t nslots;  /* power of two, >= 2 * count */
};

size_t st_dtype_size(enum st_dtype dt)
{
    if ((unsigned)dt >= ST_DTYPE_COUNT)
        return 0;
    return st_dtypes[dt].size;
}

const char *st_dtype_name(enum st_dtype dt)
{
    if ((unsigned)dt >= ST_DTYPE_COUNT)
        return "?";
    return st_dtypes[dt].name;
}

int st_dtype_from_name(const char *name, enum st_dtype *out)
{
    if (!name)
        return -1;
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        if (strcmp(name, st_dtypes[i].name) == 0) {
            if (out)
                *out = (enum st_dtype)i;
            return 0;
        }
    }
    return -1;
}

/*
 * Byte size of a tensor of `ndim` dims `shape` and element size `esize`. Returns 0 and sets
 * *nbytes, or -1 if a dim is negative or the product overflows 64 bits / size_t.
 */
static int st_shape_nbytes(int ndim, const int64_t *shape, size_t esize, uint64_t *nbytes)
{
    uint64_t prod = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return -1;
        uint64_t d = (uint64_t)shape[i];
        if (d != 0 && prod > UINT64_MAX / d)
            return -1;
        prod *= d;
    }
    if (esize != 0 && prod > UINT64_MAX / esize)
        return -1;
    prod *= esize;
    if (prod > (uint64_t)SIZE_MAX)
        return -1;
    *nbytes = prod;
    return 0;
}

/* A non-negative JSON integer; -1 if `v` is anything else. */
static int st_json_u64(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v))
        return -1;
    json_int_t x = json_integer_value(v);
    if (x < 0)
        return -1;
    *out = (uint64_t)x;
    return 0;
}

/*
 * Validate one header entry `e` named `name` and fill *t (name not set) and its byte range
 * [*begin, *end) within a data section of `dlen` bytes. Returns 0 or ERR_FORMAT.
 */
static int st_parse_entry(const char *label, const char *name, const json_t *e, uint64_t dlen,
                          struct st_tensor *t, uint64_t *begin, uint64_t *end)
{
    const int nm = ST_NAME_MAX_MSG;
    if (!json_is_object(e))
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: header entry is not an object", label, nm,
                        name);

    const json_t *jd = json_object_get(e, "dtype");
    if (!json_is_string(jd))
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: missing or non-string \"dtype\"", label, nm,
                        name);
    if (st_dtype_from_name(json_string_value(jd), &t->dtype) != 0)
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: unknown dtype \"%.32s\"", label, nm, name,
                        json_string_value(jd));

    const json_t *js = json_object_get(e, "shape");
    if (!json_is_array(js))
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: missing or non-array \"shape\"", label, nm,
                        name);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: %zu dims, at most %d supported", label, nm,
                        name, nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (st_json_u64(json_array_get(js, i), &d) != 0 || d > (uint64_t)INT64_MAX)
            return err_setf(ERR_FORMAT, "%s: tensor %.*s: shape[%zu] is not a non-negative integer",
                            label, nm, name, i);
        t->shape[i] = (int64_t)d;
    }
    for (size_t i = nd; i < ST_MAX_DIMS; i++)
        t->shape[i] = 0;

    const json_t *jo = json_object_get(e, "data_offsets");
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        st_json_u64(json_array_get(jo, 0), begin) != 0 ||
        st_json_u64(json_array_get(jo, 1), end) != 0)
        return err_setf(ERR_FORMAT,
                        "%s: tensor %.*s: \"data_offsets\" must be [begin, end] of non-negative "
                        "integers",
                        label, nm, name);
    if (*begin > *end)
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: data_offsets [%llu, %llu]: begin > end",
                        label, nm, name, (unsigned long long)*begin, (unsigned long long)*end);
    if (*end > dlen)
        return err_setf(ERR_FORMAT,
                        "%s: tensor %.*s: data_offsets [%llu, %llu] past the end of the data "
                        "section (%llu bytes)",
                        label, nm, name, (unsigned long long)*begin, (unsigned long long)*end,
                        (unsigned long long)dlen);

    uint64_t nbytes;
    if (st_shape_nbytes(t->ndim, t->shape, st_dtypes[t->dtype].size, &nbytes) != 0)
        return err_setf(ERR_FORMAT, "%s: tensor %.*s: shape size overflows", label, nm, name);
    if (nbytes != *end - *begin)
        return err_setf(ERR_FORMAT,
                        "%s: tensor %.*s: shape and dtype %s give %llu bytes, data_offsets span "
                        "%llu",
                        label, nm, name, st_dtypes[t->dtype].name, (unsigned long long)nbytes,
                        (unsigned long long)(*end - *begin));
    t->nbytes = (size_t)nbytes;
    return 0;
}

/* "__metadata__" must be an object whose values are all strings. */
static int st_check_meta(const char *label, const json_t *meta)
{
    const char *k;
    const json_t *v;
    if (!json_is_object(meta))
        return err_setf(ERR_FORMAT, "%s: \"%s\" is not an object", label, ST_META_KEY);
    json_object_foreach ((json_t *)meta, k, v) {
        if (!json_is_string(v))
            return err_setf(ERR_FORMAT, "%s: \"%s\": value of %.*s is not a string", label,
                            ST_META_KEY, ST_NAME_MAX_MSG, k);
    }
    return 0;
}

struct st_span {
    uint64_t begin, end;
    int idx;
};

static int st_span_cmp(const void *a, const void *b)
{
    const struct st_span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/*
 * Contract: see safetensors.h. Never reads past buf[len); reads only the 8 + N header bytes.
 * On failure *out and *n are untouched and nothing is left allocated. Tensors come in header order;
 * `file` of each is `label` (borrowed).
 */
int st_parse(const uint8_t *buf, size_t len, const char *label, struct st_tensor **out, int *n)
{
    json_t *root = NULL;
    struct st_tensor *ts = NULL;
    struct st_span *spans = NULL;
    int filled = 0, nspans = 0, rc = 0;

    if (!label)
        label = "<buffer>";
    if ((!buf && len) || !out || !n)
        return err_setf(ERR_INVAL, "%s: st_parse: null argument", label);
    if (len < 8)
        return err_setf(ERR_FORMAT, "%s: file is %zu bytes, shorter than the 8-byte header length",
                        label, len);

    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | buf[i];
    if (hlen > len - 8)
        return err_setf(ERR_FORMAT, "%s: header length %llu past the end of the file (%zu bytes)",
                        label, (unsigned long long)hlen, len);
    if (hlen > ST_MAX_HEADER)
        return err_setf(ERR_FORMAT, "%s: header length %llu is larger than the %llu byte limit",
                        label, (unsigned long long)hlen, ST_MAX_HEADER);
    const uint8_t *data = buf + 8 + hlen;
    uint64_t dlen = (uint64_t)(len - 8 - hlen);

    json_error_t jerr;
    root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        rc = err_setf(ERR_FORMAT, "%s: header is not valid JSON (byte %d of %llu: %s)", label,
                      jerr.position, (unsigned long long)hlen, jerr.text);
        goto done;
    }
    if (!json_is_object(root)) {
        rc = err_setf(ERR_FORMAT, "%s: header is not a JSON object", label);
        goto done;
    }

    size_t count = json_object_size(root);
    const json_t *meta = json_object_get(root, ST_META_KEY);
    if (meta) {
        if ((rc = st_check_meta(label, meta)) != 0)
            goto done;
        count--;
    }
    if (count > (size_t)INT32_MAX / 2) {
        rc = err_setf(ERR_FORMAT, "%s: too many tensors (%zu)", label, count);
        goto done;
    }
    ts = calloc(count ? count : 1, sizeof *ts);
    spans = calloc(count ? count : 1, sizeof *spans);
    if (!ts || !spans) {
        rc = err_setf(ERR_NOMEM, "%s: out of memory for %zu tensors", label, count);
        goto done;
    }

    const char *key;
    json_t *val;
    json_object_foreach (root, key, val) {
        if (strcmp(key, ST_META_KEY) == 0)
            continue;
        struct st_tensor *t = &ts[filled];
        uint64_t b = 0, e = 0;
        if (key[0] == '\0') {
            rc = err_setf(ERR_FORMAT, "%s: tensor with an empty name", label);
            goto done;
        }
        if ((rc = st_parse_entry(label, key, val, dlen, t, &b, &e)) != 0)
            goto done;
        t->name = strdup(key);
        if (!t->name) {
            rc = err_setf(ERR_NOMEM, "%s: out of memory", label);
            goto done;
        }
        filled++;
        t->data = data + b;
        t->file = label;
        if (e > b)
            spans[nspans++] = (struct st_span){b, e, filled - 1};
    }

    /* Empty tensors occupy no bytes and cannot overlap anything; check the others. */
    qsort(spans, (size_t)nspans, sizeof *spans, st_span_cmp);
    for (int i = 1; i < nspans; i++) {
        if (spans[i].begin < spans[i - 1].end) {
            const struct st_tensor *a = &ts[spans[i - 1].idx], *b = &ts[spans[i].idx];
            rc = err_setf(
                ERR_FORMAT, "%s: tensor %.*s: bytes [%llu, %llu) overlap tensor %.*s [%llu, %llu)",
                label, ST_NAME_MAX_MSG, b->name, (unsigned long long)spans[i].begin,
                (unsigned long long)spans[i].end, ST_NAME_MAX_MSG, a->name,
                (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end);
            goto done;
        }
    }

    *out = ts;
    *n = filled;
    ts = NULL;
done:
    if (ts)
        st_tensors_free(ts, filled);
    free(spans);
    json_decref(root);
    return rc;
}

void st_tensors_free(struct st_tensor *t, int n)
{
    if (!t)
        return;
    for (int i = 0; i < n; i++)
        free((void *)t[i].name);
    free(t);
}

/* ---- sets ---- */

/* "dir/name", malloc'd; NULL when out of memory. */
static char *st_join(const char *dir, const char *name)
{
    size_t need = strlen(dir) + 1 + strlen(name) + 1;
    char *p = malloc(need);
    if (p)
        snprintf(p, need, "%s/%s", dir, name);
    return p;
}

/*
 * Map `path` read-only into *f (f->path is set by the caller). Rejects directories, non-regular
 * files and empty files. Returns 0, ERR_NOTFOUND (missing), ERR_IO or ERR_FORMAT (empty).
 */
static int st_map(const char *path, struct st_file *f)
{
    struct stat st;
    int rc = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return err_setf(errno == ENOENT ? ERR_NOTFOUND : ERR_IO, "%s: cannot open: %s", path,
                        strerror(errno));
    if (fstat(fd, &st) != 0) {
        rc = err_setf(ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        rc = err_setf(ERR_IO, "%s: is a directory, not a safetensors file", path);
    } else if (!S_ISREG(st.st_mode)) {
        rc = err_setf(ERR_IO, "%s: not a regular file", path);
    } else if (st.st_size == 0) {
        rc = err_setf(ERR_FORMAT, "%s: empty file (0 bytes)", path);
    } else if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        rc = err_setf(ERR_IO, "%s: too large to map", path);
    } else {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            rc = err_setf(ERR_IO, "%s: mmap of %lld bytes failed: %s", path, (long long)st.st_size,
                          strerror(errno));
        } else {
            f->base = p;
            f->len = (size_t)st.st_size;
            f->mapped = 1;
        }
    }
    close(fd);
    return rc;
}

/*
 * Append a file slot to `s`, taking ownership of `path` (freed here on failure). The slot's
 * base/len are left empty for the caller to fill. Returns 0 or ERR_NOMEM.
 */
static int st_add_slot(struct st_set *s, char *path, struct st_file **slot)
{
    struct st_file *nf = realloc(s->files, ((size_t)s->nfiles + 1) * sizeof *nf);
    if (!nf) {
        free(path);
        return err_setf(ERR_NOMEM, "out of memory");
    }
    s->files = nf;
    nf[s->nfiles] = (struct st_file){path, NULL, 0, 0};
    *slot = &nf[s->nfiles++];
    return 0;
}

/* Parse the header of the last file slot and append its tensors (names move to the set). */
static int st_add_tensors(struct st_set *s)
{
    struct st_file *f = &s->files[s->nfiles - 1];
    struct st_tensor *ts = NULL;
    int n = 0;
    int rc = st_parse(f->base, f->len, f->path, &ts, &n);
    if (rc != 0)
        return rc;
    if (n > INT32_MAX / 2 - s->count) {
        st_tensors_free(ts, n);
        return err_setf(ERR_FORMAT, "%s: too many tensors in the set", f->path);
    }
    struct st_tensor *nt = realloc(s->tensors, ((size_t)s->count + (size_t)n + 1) * sizeof *nt);
    if (!nt) {
        st_tensors_free(ts, n);
        return err_setf(ERR_NOMEM, "%s: out of memory for %d tensors", f->path, n);
    }
    s->tensors = nt;
    memcpy(nt + s->count, ts, (size_t)n * sizeof *ts);
    s->count += n;
    free(ts); /* the array only; names now belong to s->tensors */
    return 0;
}

/* Map `path` (ownership taken) and add its tensors. */
static int st_add_file(struct st_set *s, char *path)
{
    struct st_file *f = NULL;
    int rc = st_add_slot(s, path, &f);
    if (rc == 0)
        rc = st_map(f->path, f);
    if (rc == 0)
        rc = st_add_tensors(s);
    return rc;
}

static int st_tensor_name_cmp(const void *a, const void *b)
{
    const struct st_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static uint64_t st_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* Sort tensors by name, reject a name present in two files, build the hash table. */
static int st_finish(struct st_set *s)
{
    if (s->count > 1)
        qsort(s->tensors, (size_t)s->count, sizeof *s->tensors, st_tensor_name_cmp);
    for (int i = 1; i < s->count; i++) {
        const struct st_tensor *a = &s->tensors[i - 1], *b = &s->tensors[i];
        if (strcmp(a->name, b->name) == 0)
            return err_setf(ERR_FORMAT, "%s: tensor %.*s: present in both %s and %s", s->label,
                            ST_NAME_MAX_MSG, a->name, a->file, b->file);
    }
    size_t cap = 16;
    while (cap < (size_t)s->count * 2)
        cap *= 2;
    s->slots = calloc(cap, sizeof *s->slots);
    if (!s->slots)
        return err_setf(ERR_NOMEM, "%s: out of memory for the tensor index", s->label);
    s->nslots = cap;
    for (int i = 0; i < s->count; i++) {
        size_t j = (size_t)st_hash(s->tensors[i].name) & (cap - 1);
        while (s->slots[j])
            j = (j + 1) & (cap - 1);
        s->slots[j] = i + 1;
    }
    return 0;
}

static int st_set_new(struct st_set **out, const char *label)
{
    struct st_set *s = calloc(1, sizeof *s);
    if (s)
        s->label = strdup(label);
    if (!s || !s->label) {
        free(s);
        return err_setf(ERR_NOMEM, "%s: out of memory", label);
    }
    *out = s;
    return 0;
}

void st_set_free(struct st_set *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->count; i++)
        free((void *)s->tensors[i].name);
    free(s->tensors);
    for (int i = 0; i < s->nfiles; i++) {
        struct st_file *f = &s->files[i];
        if (f->mapped)
            munmap(f->base, f->len);
        else
            free(f->base);
        free(f->path);
    }
    free(s->files);
    free(s->slots);
    free(s->label);
    free(s);
}

int st_set_open_file(struct st_set **out, const char *path)
{
    struct st_set *s = NULL;
    char *p;
    int rc;
    if (!out || !path)
        return err_setf(ERR_INVAL, "st_set_open_file: null argument");
    if ((rc = st_set_new(&s, path)) != 0)
        return rc;
    if (!(p = strdup(path)))
        rc = err_setf(ERR_NOMEM, "%s: out of memory", path);
    if (rc == 0)
        rc = st_add_file(s, p);
    if (rc == 0)
        rc = st_finish(s);
    if (rc != 0) {
        st_set_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* Contract: ownership of `buf` passes to the set in every case; it is freed on failure too. */
int st_set_open_mem_take(struct st_set **out, const char *label, uint8_t *buf, size_t len)
{
    struct st_set *s = NULL;
    struct st_file *f = NULL;
    char *p;
    int rc;
    if (!label)
        label = "<memory>";
    if (!out) {
        free(buf);
        return err_setf(ERR_INVAL, "%s: st_set_open_mem_take: null argument", label);
    }
    if ((rc = st_set_new(&s, label)) != 0) {
        free(buf);
        return rc;
    }
    if (!(p = strdup(label))) {
        free(buf);
        rc = err_setf(ERR_NOMEM, "%s: out of memory", label);
    } else if ((rc = st_add_slot(s, p, &f)) != 0) {
        free(buf);
    } else {
        f->base = buf; /* owned by the set from here on */
        f->len = len;
        rc = st_add_tensors(s);
    }
    if (rc == 0)
        rc = st_finish(s);
    if (rc != 0) {
        st_set_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

static int st_cstr_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A shard name from weight_map must be a plain file name inside the directory. */
static int st_shard_name_ok(const char *s)
{
    return s[0] != '\0' && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/*
 * Open the shards named by the index file `idx` (already known to exist) in `dir`, then check
 * every weight_map entry against the shard it names. Runs st_finish.
 */
static int st_open_index(struct st_set *s, const char *dir, const char *idx)
{
    struct st_file ix = {0};
    json_t *root = NULL;
    const char **shards = NULL;
    size_t nshards = 0;
    int rc;

    if ((rc = st_map(idx, &ix)) != 0)
        return rc;
    json_error_t jerr;
    root = json_loadb((const char *)ix.base, ix.len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        rc = err_setf(ERR_FORMAT, "%s:%d:%d: invalid JSON: %s", idx, jerr.line, jerr.column,
                      jerr.text);
        goto done;
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(root) || !json_is_object(wm)) {
        rc = err_setf(ERR_FORMAT, "%s: missing \"weight_map\" object", idx);
        goto done;
    }
    shards = calloc(json_object_size(wm) + 1, sizeof *shards);
    if (!shards) {
        rc = err_setf(ERR_NOMEM, "%s: out of memory", idx);
        goto done;
    }
    const char *key;
    json_t *val;
    json_object_foreach (wm, key, val) {
        const char *sh = json_string_value(val);
        if (!sh) {
            rc = err_setf(ERR_FORMAT, "%s: weight_map: %.*s: shard name is not a string", idx,
                          ST_NAME_MAX_MSG, key);
            goto done;
        }
        if (!st_shard_name_ok(sh)) {
            rc = err_setf(ERR_FORMAT,
                          "%s: weight_map: %.*s: shard name \"%.*s\" must be a plain file name "
                          "in the checkpoint directory",
                          idx, ST_NAME_MAX_MSG, key, ST_NAME_MAX_MSG, sh);
            goto done;
        }
        shards[nshards++] = sh;
    }
    if (nshards == 0) {
        rc = err_setf(ERR_FORMAT, "%s: \"weight_map\" is empty", idx);
        goto done;
    }
    qsort(shards, nshards, sizeof *shards, st_cstr_cmp);
    for (size_t i = 0; i < nshards; i++) {
        if (i > 0 && strcmp(shards[i], shards[i - 1]) == 0)
            continue;
        char *p = st_join(dir, shards[i]);
        if (!p) {
            rc = err_setf(ERR_NOMEM, "%s: out of memory", idx);
            goto done;
        }
        if ((rc = st_add_file(s, p)) != 0) {
            err_prefix(rc, "%s", idx);
            goto done;
        }
    }
    if ((rc = st_finish(s)) != 0)
        goto done;

    json_object_foreach (wm, key, val) {
        const char *sh = json_string_value(val);
        const struct st_tensor *t = st_set_find(s, key);
        if (!t) {
            rc = err_setf(ERR_NOTFOUND,
                          "%s: tensor %.*s: listed in weight_map for %s, not found "
                          "in that shard",
                          idx, ST_NAME_MAX_MSG, key, sh);
            goto done;
        }
        const char *slash = strrchr(t->file, '/');
        const char *base = slash ? slash + 1 : t->file;
        if (strcmp(base, sh) != 0) {
            rc = err_setf(ERR_FORMAT, "%s: tensor %.*s: listed in weight_map for %s, found in %s",
                          idx, ST_NAME_MAX_MSG, key, sh, t->file);
            goto done;
        }
    }
done:
    free(shards);
    json_decref(root);
    munmap(ix.base, ix.len);
    return rc;
}

/* No index: every non-hidden `*.safetensors` entry of `dir`, in name order (at least one). */
static int st_open_glob(struct st_set *s, const char *dir)
{
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    DIR *d = opendir(dir);
    if (!d)
        return err_setf(ERR_IO, "%s: cannot list directory: %s", dir, strerror(errno));
    const size_t sl = strlen(ST_SUFFIX);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name);
        if (de->d_name[0] == '.' || l <= sl || strcmp(de->d_name + l - sl, ST_SUFFIX) != 0)
            continue;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 16;
            char **nn = realloc(names, nc * sizeof *nn);
            if (!nn) {
                rc = err_setf(ERR_NOMEM, "%s: out of memory", dir);
                goto done;
            }
            names = nn;
            cap = nc;
        }
        if (!(names[n] = strdup(de->d_name))) {
            rc = err_setf(ERR_NOMEM, "%s: out of memory", dir);
            goto done;
        }
        n++;
    }
    if (n == 0) {
        rc = err_setf(ERR_NOTFOUND, "%s: no %s and no *%s files", dir, ST_INDEX_NAME, ST_SUFFIX);
        goto done;
    }
    qsort(names, n, sizeof *names, st_cstr_cmp);
    for (size_t i = 0; i < n && rc == 0; i++) {
        char *p = st_join(dir, names[i]);
        rc = p ? st_add_file(s, p) : err_setf(ERR_NOMEM, "%s: out of memory", dir);
    }
    if (rc == 0)
        rc = st_finish(s);
done:
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return rc;
}

int st_set_open_dir(struct st_set **out, const char *dir)
{
    struct st_set *s = NULL;
    char *idx = NULL;
    struct stat st;
    int rc;
    if (!out || !dir)
        return err_setf(ERR_INVAL, "st_set_open_dir: null argument");
    if (stat(dir, &st) != 0)
        return err_setf(errno == ENOENT ? ERR_NOTFOUND : ERR_IO, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return err_setf(ERR_INVAL, "%s: not a directory", dir);
    if ((rc = st_set_new(&s, dir)) != 0)
        return rc;
    if (!(idx = st_join(dir, ST_INDEX_NAME))) {
        rc = err_setf(ERR_NOMEM, "%s: out of memory", dir);
    } else if (stat(idx, &st) == 0) {
        rc = st_open_index(s, dir, idx);
    } else if (errno == ENOENT) {
        rc = st_open_glob(s, dir);
    } else {
        rc = err_setf(ERR_IO, "%s: %s", idx, strerror(errno));
    }
    free(idx);
    if (rc != 0) {
        st_set_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int st_set_count(const struct st_set *s)
{
    return s ? s->count : 0;
}

const struct st_tensor *st_set_at(const struct st_set *s, int i)
{
    if (!s || i < 0 || i >= s->count)
        return NULL;
    return &s->tensors[i];
}

const struct st_tensor *st_set_find(const struct st_set *s, const char *name)
{
    if (!s || !name || !s->slots)
        return NULL;
    size_t mask = s->nslots - 1;
    for (size_t j = (size_t)st_hash(name) & mask; s->slots[j]; j = (j + 1) & mask) {
        const struct st_tensor *t = &s->tensors[s->slots[j] - 1];
        if (strcmp(t->name, name) == 0)
            return t;
    }
    return NULL;
}

/* "[a, b, c]" into buf (truncated if it does not fit). */
static void st_fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape)
{
    size_t off = 0;
    int w = snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && w >= 0; i++) {
        off += (size_t)w;
        if (off >= cap)
            return;
        w = snprintf(buf + off, cap - off, "%s%lld", i ? ", " : "", (long long)shape[i]);
    }
    if (w >= 0 && (off += (size_t)w) < cap)
        snprintf(buf + off, cap - off, "]");
}

int st_set_expect(const struct st_set *s, const char *name, enum st_dtype dtype, int ndim,
                  const int64_t *shape, const struct st_tensor **out)
{
    if (!s || !name || ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape))
        return err_setf(ERR_INVAL, "st_set_expect: invalid argument");
    const struct st_tensor *t = st_set_find(s, name);
    if (!t)
        return err_setf(ERR_NOTFOUND, "%s: tensor %.*s: not found (%d tensors in the checkpoint)",
                        s->label, ST_NAME_MAX_MSG, name, s->count);
    if (t->dtype != dtype)
        return err_setf(ERR_FORMAT, "%s: %.*s: dtype %s expected, found %s", t->file,
                        ST_NAME_MAX_MSG, name, st_dtype_name(dtype), st_dtype_name(t->dtype));
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[200], got[200];
        st_fmt_shape(want, sizeof want, ndim, shape);
        st_fmt_shape(got, sizeof got, t->ndim, t->shape);
        return err_setf(ERR_FORMAT, "%s: %.*s: shape %s expected, found %s", t->file,
                        ST_NAME_MAX_MSG, name, want, got);
    }
    if (out)
        *out = t;
    return 0;
}

/* ---- writer ---- */

struct st_wslot {
    const struct st_write_tensor *t;
    uint64_t nbytes;
    uint64_t begin;
};

static int st_wslot_name_cmp(const void *a, const void *b)
{
    const struct st_wslot *x = a, *y = b;
    return strcmp(x->t->name, y->t->name);
}

/* Data placement order: 8-byte multiples first, then by decreasing element size, then name. */
static int st_wslot_place_cmp(const void *a, const void *b)
{
    const struct st_wslot *x = *(const struct st_wslot *const *)a;
    const struct st_wslot *y = *(const struct st_wslot *const *)b;
    int xo = (x->nbytes % 8) != 0, yo = (y->nbytes % 8) != 0;
    if (xo != yo)
        return xo - yo;
    size_t xs = st_dtypes[x->t->dtype].size, ys = st_dtypes[y->t->dtype].size;
    if (xs != ys)
        return xs > ys ? -1 : 1;
    return strcmp(x->t->name, y->t->name);
}

/* One header entry {"dtype", "shape", "data_offsets"}; NULL when out of memory. */
static json_t *st_entry_json(const struct st_wslot *w)
{
    json_t *e = json_object(), *shape = json_array(), *offs = json_array();
    int bad = !e || !shape || !offs;
    for (int i = 0; !bad && i < w->t->ndim; i++)
        bad = json_array_append_new(shape, json_integer((json_int_t)w->t->shape[i])) != 0;
    bad = bad || json_array_append_new(offs, json_integer((json_int_t)w->begin)) != 0 ||
          json_array_append_new(offs, json_integer((json_int_t)(w->begin + w->nbytes))) != 0;
    bad = bad || json_object_set_new(e, "dtype", json_string(st_dtypes[w->t->dtype].name)) != 0;
    if (!bad) {
        bad = json_object_set_new(e, "shape", shape) != 0;
        shape = NULL;
    }
    if (!bad) {
        bad = json_object_set_new(e, "data_offsets", offs) != 0;
        offs = NULL;
    }
    json_decref(shape);
    json_decref(offs);
    if (bad) {
        json_decref(e);
        return NULL;
    }
    return e;
}

/* Byte size of a tensor that st_layout accepted (its shape is valid). */
static uint64_t st_layout_nbytes(const struct st_write_tensor *x)
{
    uint64_t nb = 0;
    st_shape_nbytes(x->ndim, x->shape, st_dtypes[x->dtype].size, &nb);
    return nb;
}

/*
 * Contract: see safetensors.h. meta_kv holds 2 * n_meta strings: key0, value0, key1, ...
 * Names must be unique, non-empty, valid UTF-8 and not "__metadata__". On success *hdr is
 * malloc'd (caller frees), *hdr_len its size and offs[i] the file offset of t[i]'s data; on
 * failure nothing is allocated. Data pointers are not read.
 */
int st_layout(const struct st_write_tensor *t, int n, const char *const *meta_kv, int n_meta,
              uint8_t **hdr_out, size_t *hdr_len, uint64_t *offs, uint64_t *total)
{
    struct st_wslot *ws = NULL;
    struct st_wslot **place = NULL;
    json_t *root = NULL, *meta = NULL;
    char *hdr = NULL;
    uint8_t *img = NULL;
    int rc = 0;

    if (!hdr_out || !hdr_len || !total || n < 0 || (n > 0 && (!t || !offs)) || n_meta < 0 ||
        (n_meta > 0 && !meta_kv))
        return err_setf(ERR_INVAL, "st_layout: invalid argument");
    ws = calloc((size_t)n + 1, sizeof *ws);
    place = calloc((size_t)n + 1, sizeof *place);
    root = json_object();
    if (!ws || !place || !root) {
        rc = err_setf(ERR_NOMEM, "st_layout: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const struct st_write_tensor *x = &t[i];
        if (!x->name || !x->name[0] || strcmp(x->name, ST_META_KEY) == 0) {
            rc = err_setf(ERR_INVAL, "st_layout: tensor %d: missing or reserved name", i);
            goto done;
        }
        if ((unsigned)x->dtype >= ST_DTYPE_COUNT || x->ndim < 0 || x->ndim > ST_MAX_DIMS ||
            st_shape_nbytes(x->ndim, x->shape, st_dtypes[x->dtype].size, &ws[i].nbytes) != 0) {
            rc = err_setf(ERR_INVAL, "st_layout: tensor %.*s: invalid dtype or shape",
                          ST_NAME_MAX_MSG, x->name);
            goto done;
        }
        ws[i].t = x;
    }
    if (n > 1)
        qsort(ws, (size_t)n, sizeof *ws, st_wslot_name_cmp);
    for (int i = 0; i < n; i++) {
        if (i > 0 && strcmp(ws[i].t->name, ws[i - 1].t->name) == 0) {
            rc = err_setf(ERR_INVAL, "st_layout: tensor %.*s: duplicate name", ST_NAME_MAX_MSG,
                          ws[i].t->name);
            goto done;
        }
        place[i] = &ws[i];
    }
    if (n > 1)
        qsort(place, (size_t)n, sizeof *place, st_wslot_place_cmp);
    uint64_t dlen = 0;
    for (int i = 0; i < n; i++) {
        place[i]->begin = dlen;
        if (place[i]->nbytes > (uint64_t)INT64_MAX - dlen) {
            rc = err_setf(ERR_INVAL, "st_layout: total size overflows");
            goto done;
        }
        dlen += place[i]->nbytes;
    }

    if (n_meta > 0) {
        meta = json_object();
        if (!meta) {
            rc = err_setf(ERR_NOMEM, "st_layout: out of memory");
            goto done;
        }
        for (int i = 0; i < n_meta; i++) {
            const char *k = meta_kv[2 * i], *v = meta_kv[2 * i + 1];
            if (!k || !v || json_object_set_new(meta, k, json_string(v)) != 0) {
                rc = err_setf(ERR_INVAL, "st_layout: metadata pair %d is not valid UTF-8", i);
                goto done;
            }
        }
        rc = json_object_set_new(root, ST_META_KEY, meta);
        meta = NULL;
        if (rc != 0) {
            rc = err_setf(ERR_NOMEM, "st_layout: out of memory");
            goto done;
        }
    }
    for (int i = 0; i < n; i++) {
        json_t *e = st_entry_json(&ws[i]);
        if (!e || json_object_set_new(root, ws[i].t->name, e) != 0) {
            rc = err_setf(ERR_INVAL, "st_layout: tensor %.*s: name is not valid UTF-8",
                          ST_NAME_MAX_MSG, ws[i].t->name);
            goto done;
        }
    }
    hdr = json_dumps(root, JSON_COMPACT);
    if (!hdr) {
        rc = err_setf(ERR_NOMEM, "st_layout: out of memory");
        goto done;
    }
    size_t hlen = strlen(hdr);
    size_t padded = (hlen + 7) & ~(size_t)7;
    if (dlen > SIZE_MAX - 8 - padded) {
        rc = err_setf(ERR_INVAL, "st_layout: image too large");
        goto done;
    }
    img = malloc(8 + padded);
    if (!img) {
        rc = err_setf(ERR_NOMEM, "st_layout: out of memory");
        goto done;
    }
    for (int i = 0; i < 8; i++)
        img[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(img + 8, hdr, hlen);
    memset(img + 8 + hlen, ' ', padded - hlen);
    for (int i = 0; i < n; i++)
        offs[ws[i].t - t] = 8 + padded + ws[i].begin;
    *hdr_out = img;
    *hdr_len = 8 + padded;
    *total = 8 + padded + dlen;
    img = NULL;
done:
    free(img);
    free(hdr);
    json_decref(meta);
    json_decref(root);
    free(place);
    free(ws);
    return rc;
}

/* st_layout, then the data copied into place. */
int st_serialize(const struct st_write_tensor *t, int n, const char *const *meta_kv, int n_meta,
                 uint8_t **out, size_t *out_len)
{
    uint8_t *hdr = NULL, *img = NULL;
    uint64_t *offs = NULL, total = 0;
    size_t hlen = 0;
    int rc = 0;

    if (!out || !out_len || n < 0 || (n > 0 && !t))
        return err_setf(ERR_INVAL, "st_serialize: invalid argument");
    if (!(offs = calloc((size_t)n + 1, sizeof *offs)))
        return err_setf(ERR_NOMEM, "st_serialize: out of memory");
    if ((rc = st_layout(t, n, meta_kv, n_meta, &hdr, &hlen, offs, &total)) != 0)
        goto done;
    for (int i = 0; i < n; i++)
        if (!t[i].data && st_layout_nbytes(&t[i]) > 0) {
            rc = err_setf(ERR_INVAL, "st_serialize: tensor %.*s: no data", ST_NAME_MAX_MSG,
                          t[i].name);
            goto done;
        }
    if (total > SIZE_MAX || !(img = malloc((size_t)total))) {
        rc = err_setf(ERR_NOMEM, "st_serialize: out of memory for %llu bytes",
                      (unsigned long long)total);
        goto done;
    }
    memcpy(img, hdr, hlen);
    for (int i = 0; i < n; i++)
        if (t[i].data)
            memcpy(img + offs[i], t[i].data, (size_t)st_layout_nbytes(&t[i]));
    *out = img;
    *out_len = (size_t)total;
    img = NULL;
done:
    free(img);
    free(hdr);
    free(offs);
    return rc;
}

/* Write all of buf to fd, retrying short writes and EINTR. */
static int st_write_all(int fd, const uint8_t *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Contract: on failure the target is untouched and the temporary is removed. */
int st_write_file(const char *path, const struct st_write_tensor *t, int n)
{
    uint8_t *img = NULL;
    size_t len = 0;
    char *tmp = NULL;
    int fd = -1, rc;

    if (!path)
        return err_setf(ERR_INVAL, "st_write_file: null path");
    if ((rc = st_serialize(t, n, NULL, 0, &img, &len)) != 0) {
        err_prefix(rc, "%s", path);
        goto done;
    }
    size_t need = strlen(path) + sizeof ".tmp";
    if (!(tmp = malloc(need))) {
        rc = err_setf(ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    snprintf(tmp, need, "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = err_setf(ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        goto done;
    }
    if (st_write_all(fd, img, len) != 0 || fsync(fd) != 0) {
        rc = err_setf(ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
        goto done;
    }
    int cr = close(fd);
    fd = -1;
    if (cr != 0) {
        rc = err_setf(ERR_IO, "%s: close failed: %s", tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, path) != 0) {
        rc = err_setf(ERR_IO, "%s: rename to %s failed: %s", tmp, path, strerror(errno));
        goto done;
    }
done:
    if (fd >= 0)
        close(fd);
    if (rc != 0 && tmp)
        unlink(tmp);
    free(tmp);
    free(img);
    return rc;
}
