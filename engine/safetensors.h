/*
 * safetensors.h - read (mmap, zero copy) and write safetensors checkpoints.
 *
 * A checkpoint is a set of files: a single `model.safetensors`, or shards listed by
 * `model.safetensors.index.json` ("weight_map": tensor name -> shard file). Every file is
 * mmap'd read-only; tensors are views into the mapping (no copy), valid until st_set_free().
 *
 * Every header is validated before any tensor is exposed: header length within the file,
 * valid JSON object, known dtype, shape product * dtype size == byte range, ranges inside the
 * data section, no two tensors overlapping. A failure returns ERR_FORMAT/ERR_IO/ERR_NOTFOUND with
 * an err_msg() that names the file and the tensor.
 *
 * THREAD SAFETY: a struct st_set is immutable after open; lookups may run on any thread.
 */
#ifndef DSV4_SAFETENSORS_H
#define DSV4_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

enum st_dtype {
    ST_BF16,
    ST_F16,
    ST_F32,
    ST_F64,
    ST_F8_E4M3, /* "F8_E4M3" (float8_e4m3fn) */
    ST_F8_E8M0, /* "F8_E8M0" (float8_e8m0fnu: 2^(b-127)) */
    ST_I8,      /* also packed FP4 (two E2M1 per byte) */
    ST_U8,
    ST_I16,
    ST_I32,
    ST_I64,
    ST_BOOL,
    ST_DTYPE_COUNT
};

struct st_tensor {
    const char *name; /* owned by the set */
    enum st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* borrowed view into the mmap (or memory buffer) */
    size_t nbytes;
    const char *file; /* path (or label) of the file holding it; owned by the set */
};

struct st_set;

/* Size in bytes of one element; "F8_E4M3" style name; parse a name (returns -1 if unknown). */
size_t st_dtype_size(enum st_dtype dt);
const char *st_dtype_name(enum st_dtype dt);
int st_dtype_from_name(const char *name, enum st_dtype *out);

/*
 * Parse one safetensors header. `buf`/`len` is the whole file (8-byte little-endian header
 * length, JSON header, data). `label` names the file in messages. On success *out is a
 * malloc'd array of *n tensors whose `data` point into buf and whose names are malloc'd
 * (free with st_tensors_free). This is the libFuzzer entry point.
 */
int st_parse(const uint8_t *buf, size_t len, const char *label, struct st_tensor **out, int *n);
void st_tensors_free(struct st_tensor *t, int n);

/*
 * Open a checkpoint directory: `model.safetensors.index.json` if present (every shard it
 * names is opened; every tensor of weight_map must be found in its shard), else every
 * `*.safetensors` file in the directory (at least one). Tensor names must be unique across
 * files. Caller frees with st_set_free.
 */
int st_set_open_dir(struct st_set **out, const char *dir);

/* Open a single .safetensors file. */
int st_set_open_file(struct st_set **out, const char *path);

/*
 * A set over an in-memory file image (the built-in model). Takes ownership of `buf`
 * (malloc'd), freed by st_set_free. `label` is used in messages.
 */
int st_set_open_mem_take(struct st_set **out, const char *label, uint8_t *buf, size_t len);

void st_set_free(struct st_set *s);

/* Number of tensors, and the i-th (0 <= i < count) in a stable order. */
int st_set_count(const struct st_set *s);
const struct st_tensor *st_set_at(const struct st_set *s, int i);

/* Find by exact name (hash lookup); NULL if absent. */
const struct st_tensor *st_set_find(const struct st_set *s, const char *name);

/*
 * Find a tensor and check it: present, dtype == `dtype`, ndim and shape equal. On failure
 * returns ERR_NOTFOUND/ERR_FORMAT with a message naming the tensor, the file, and what was
 * expected vs found (e.g. "model-00003.safetensors: layers.4.attn.wkv.weight: shape [512, 4096]
 * expected, found [512, 4095]").
 */
int st_set_expect(const struct st_set *s, const char *name, enum st_dtype dtype, int ndim,
                  const int64_t *shape, const struct st_tensor **out);

/*
 * Serialise tensors to a safetensors image in memory (names sorted, data 8-byte aligned,
 * optional "__metadata__" string map given as key/value pairs, may be NULL/0). *out is
 * malloc'd; caller frees.
 */
struct st_write_tensor {
    const char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* borrowed */
};
int st_serialize(const struct st_write_tensor *t, int n, const char *const *meta_kv, int n_meta,
                 uint8_t **out, size_t *out_len);

/*
 * The layout st_serialize gives, without the data (for writers that stream tensors too large to
 * hold at once): *hdr (malloc'd, caller frees) is the file's first *hdr_len bytes (length + padded
 * JSON header), offs[i] (caller's array of n) the file offset of t[i]'s data, *total the file
 * size. The data section has no gaps: the offsets and sizes tile [*hdr_len, *total). t[i].data is
 * not read.
 */
int st_layout(const struct st_write_tensor *t, int n, const char *const *meta_kv, int n_meta,
              uint8_t **hdr, size_t *hdr_len, uint64_t *offs, uint64_t *total);

/* Write a safetensors file (st_serialize + atomic write via a temporary and rename). */
int st_write_file(const char *path, const struct st_write_tensor *t, int n);

#endif
