/*
 * err.h - error codes and the last-error message.
 *
 * Functions that can fail return int: 0 on success, a negative ERR_* code on failure (libuv
 * style). The code says what kind of failure; the message (err_msg()) says which file, tensor,
 * key or value and what was expected. err_setf() formats the message and returns the code, so a
 * failure site reads `return err_setf(ERR_FORMAT, "%s: tensor %s: ...", path, name);`.
 *
 * THREAD SAFETY: the message buffer is thread-local; each thread sees its own last error.
 */
#ifndef DSV4_ERR_H
#define DSV4_ERR_H

enum err {
    ERR_OK = 0,
    ERR_NOMEM = -1,    /* allocation failed */
    ERR_INVAL = -2,    /* invalid argument or request */
    ERR_IO = -3,       /* open/read/mmap/write failed */
    ERR_FORMAT = -4,   /* a file is malformed (header, offsets, dtype, shape) */
    ERR_CONFIG = -5,   /* config.json missing/inconsistent key */
    ERR_NOTFOUND = -6, /* missing file or tensor */
    ERR_BUSY = -7,     /* over capacity; retry later */
    ERR_CUDA = -8,     /* CUDA runtime error */
    ERR_RANGE = -9,    /* value out of range (position, token id) */
    ERR_UNSUPPORTED = -10,
};

/* Set the thread's last-error message (printf format) and return `code`. */
int err_setf(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefix the current message with "<prefix>: " (adds context as an error propagates up). */
int err_prefix(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The thread's last-error message ("" when none). Borrowed; valid until the next err_* call. */
const char *err_msg(void);

/* A short fixed name for a code ("out of memory", ...). */
const char *err_str(int code);

#endif
