/*
 * tbuf.h - a growable byte buffer for building text (prompts, JSON, decoded output).
 *
 * The buffer is always NUL-terminated after a successful append (b->s[b->len] == 0), so it can be
 * passed to C string functions when the content has no embedded NUL. Every buffer has a hard cap
 * (TBUF_MAX unless set): an append that would pass it fails with ERR_RANGE and leaves the buffer
 * unchanged. A zeroed struct is an empty buffer; tbuf_free() releases it and leaves it empty.
 *
 * THREAD SAFETY: none; a buffer belongs to one thread at a time.
 */
#ifndef DSV4_TBUF_H
#define DSV4_TBUF_H

#include <stddef.h>

#define TBUF_MAX ((size_t)1 << 30)

struct tbuf {
    char *s;    /* NUL-terminated content, NULL while empty and never grown */
    size_t len; /* bytes of content, not counting the NUL */
    size_t cap; /* bytes allocated */
    size_t max; /* hard cap on len; 0 means TBUF_MAX */
};

/* Append n bytes. 0, ERR_NOMEM or ERR_RANGE. */
int tbuf_add(struct tbuf *b, const void *p, size_t n);
/* Append a NUL-terminated string. */
int tbuf_adds(struct tbuf *b, const char *s);
/* Append one byte. */
int tbuf_addc(struct tbuf *b, char c);
/* Append printf-formatted text. */
int tbuf_addf(struct tbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Make room for n more bytes without changing len. */
int tbuf_reserve(struct tbuf *b, size_t n);
/* Drop the content, keep the allocation. */
void tbuf_clear(struct tbuf *b);
/* Take the content out: returns the malloc'd NUL-terminated string (caller frees; never NULL on
 * success: "" is allocated for an empty buffer), or NULL on allocation failure. The buffer is
 * left empty. */
char *tbuf_take(struct tbuf *b, size_t *len);
/* Release the memory; the buffer is empty afterwards. tbuf_free(NULL) is a no-op. */
void tbuf_free(struct tbuf *b);

#endif
