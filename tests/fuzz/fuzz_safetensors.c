/*
 * fuzz_safetensors.c - libFuzzer target for st_parse (and the in-memory set built on it).
 *
 * Any input must give 0 or a negative ERR_* code with a message, never a crash, a leak, or a
 * read outside the input. On success every tensor's first and last data byte is read, so ASan
 * flags a view that escapes the buffer. Also linked with replay_main.c into a plain program
 * that replays the committed corpus in every test run.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Read every tensor's first and last byte; returns a value so the reads are not optimised out. */
static unsigned fuzz_touch(const struct st_tensor *t, int n)
{
    unsigned acc = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *p = t[i].data;
        if (t[i].nbytes)
            acc += p[0] + p[t[i].nbytes - 1];
        acc += (unsigned)strlen(t[i].name) + (unsigned)st_dtype_size(t[i].dtype);
    }
    return acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct st_tensor *t = NULL;
    int n = 0;
    volatile unsigned sink = 0;

    if (st_parse(data, size, "fuzz", &t, &n) == 0) {
        sink += fuzz_touch(t, n);
        st_tensors_free(t, n);

        /* The same image as an owned in-memory set: lookups must find every tensor. */
        uint8_t *copy = malloc(size ? size : 1);
        struct st_set *s = NULL;
        if (copy) {
            memcpy(copy, data, size);
            if (st_set_open_mem_take(&s, "fuzz", copy, size) == 0) {
                for (int i = 0; i < st_set_count(s); i++) {
                    const struct st_tensor *x = st_set_at(s, i);
                    const struct st_tensor *y = NULL;
                    if (st_set_find(s, x->name) != x ||
                        st_set_expect(s, x->name, x->dtype, x->ndim, x->shape, &y) != 0 || y != x)
                        abort(); /* fuzzing oracle: a parsed tensor must be found */
                    sink += fuzz_touch(x, 1);
                }
                st_set_free(s);
            }
        }
    } else {
        sink += (unsigned)strlen(err_msg());
    }
    (void)sink;
    return 0;
}
