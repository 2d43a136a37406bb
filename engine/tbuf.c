/* tbuf.c - see tbuf.h. */
#include "engine/tbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"

int tbuf_reserve(struct tbuf *b, size_t n)
{
    size_t max = b->max ? b->max : TBUF_MAX;
    if (n > max || b->len > max - n)
        return err_setf(ERR_RANGE, "text buffer over its cap of %zu bytes", max);
    size_t need = b->len + n + 1;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *s = realloc(b->s, cap);
    if (!s)
        return err_setf(ERR_NOMEM, "text buffer: cannot grow to %zu bytes", cap);
    b->s = s;
    b->cap = cap;
    return 0;
}

int tbuf_add(struct tbuf *b, const void *p, size_t n)
{
    int rc = tbuf_reserve(b, n);
    if (rc < 0)
        return rc;
    if (n)
        memcpy(b->s + b->len, p, n);
    b->len += n;
    b->s[b->len] = 0;
    return 0;
}

int tbuf_adds(struct tbuf *b, const char *s)
{
    return tbuf_add(b, s, strlen(s));
}

int tbuf_addc(struct tbuf *b, char c)
{
    return tbuf_add(b, &c, 1);
}

int tbuf_addf(struct tbuf *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return err_setf(ERR_INVAL, "text buffer: bad format");
    if ((size_t)n < sizeof small)
        return tbuf_add(b, small, (size_t)n);
    int rc = tbuf_reserve(b, (size_t)n);
    if (rc < 0)
        return rc;
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void tbuf_clear(struct tbuf *b)
{
    b->len = 0;
    if (b->s)
        b->s[0] = 0;
}

char *tbuf_take(struct tbuf *b, size_t *len)
{
    char *s = b->s;
    if (!s) {
        s = malloc(1);
        if (!s)
            return NULL;
        s[0] = 0;
    }
    if (len)
        *len = b->len;
    b->s = NULL;
    b->len = b->cap = 0;
    return s;
}

void tbuf_free(struct tbuf *b)
{
    if (!b)
        return;
    free(b->s);
    b->s = NULL;
    b->len = b->cap = 0;
}
