/* utf8.c - see utf8.h. */
#include "engine/utf8.h"

#include <string.h>

int utf8_next(const unsigned char *s, size_t n, size_t *len, uint32_t *cp)
{
    unsigned c = s[0];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    uint32_t v;
    if (c < 0x80) {
        *len = 1;
        *cp = c;
        return UTF8_OK;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
        v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        v = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        v = c & 0x07;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        *len = 1;
        *cp = 0xFFFD;
        return UTF8_INVALID;
    }
    for (size_t k = 1; k < need; k++) {
        if (k >= n) {
            *len = k;
            *cp = 0xFFFD;
            return UTF8_INCOMPLETE;
        }
        unsigned b = s[k];
        if (b < lo || b > hi) {
            *len = k;
            *cp = 0xFFFD;
            return UTF8_INVALID;
        }
        lo = 0x80;
        hi = 0xBF;
        v = (v << 6) | (b & 0x3F);
    }
    *len = need;
    *cp = v;
    return UTF8_OK;
}

size_t utf8_valid_prefix(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time. */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (w & 0x8080808080808080ull)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (utf8_next(p + i, n - i, &len, &cp) != UTF8_OK)
            return i;
        i += len;
    }
    return n;
}

size_t utf8_encode(uint32_t cp, char buf[4])
{
    if (cp < 0x80) {
        buf[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        buf[0] = (char)(0xC0 | (cp >> 6));
        buf[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        buf[0] = (char)(0xE0 | (cp >> 12));
        buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    buf[0] = (char)(0xF0 | (cp >> 18));
    buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    buf[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

int utf8_append_cp(struct tbuf *out, uint32_t cp)
{
    char buf[4];
    return tbuf_add(out, buf, utf8_encode(cp, buf));
}

int utf8_append_lossy(struct tbuf *out, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t ok = utf8_valid_prefix(s + i, n - i);
        int rc = tbuf_add(out, s + i, ok);
        if (rc < 0)
            return rc;
        i += ok;
        if (i >= n)
            break;
        size_t len;
        uint32_t cp;
        utf8_next(p + i, n - i, &len, &cp);
        rc = tbuf_add(out, "\xEF\xBF\xBD", 3);
        if (rc < 0)
            return rc;
        i += len;
    }
    return 0;
}
