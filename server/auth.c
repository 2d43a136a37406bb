/*
 * auth.c - API-key check and CORS origins (see auth.h).
 */
#include <stddef.h>
#include <string.h>
#include <strings.h>

#include "server/auth.h"

/* Compare a and b in time that depends only on max(len): always walks 512 bytes (or the longer
 * string when longer), folding every difference and the length difference into one flag. */
static int ct_equal(const char *a, size_t na, const char *b, size_t nb)
{
    size_t n = na > nb ? na : nb;
    if (n < 512)
        n = 512;
    volatile unsigned char diff = (unsigned char)(na != nb);
    for (size_t i = 0; i < n; i++) {
        unsigned char x = i < na ? (unsigned char)a[i] : 0;
        unsigned char y = i < nb ? (unsigned char)b[i] : 0;
        diff |= (unsigned char)(x ^ y);
    }
    return diff == 0;
}

int auth_bearer_ok(const char *header, const char *key)
{
    if (!key || !*key)
        return 1;
    if (!header || strncasecmp(header, "Bearer ", 7))
        return 0;
    const char *tok = header + 7;
    while (*tok == ' ')
        tok++;
    size_t n = strlen(tok);
    while (n > 0 && (tok[n - 1] == ' ' || tok[n - 1] == '\t'))
        n--;
    return ct_equal(tok, n, key, strlen(key));
}

int auth_origin_ok(const char *list, const char *origin)
{
    if (!list || !*list || !origin || !*origin)
        return 0;
    size_t on = strlen(origin);
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *e = p;
        while (*e && *e != ',')
            e++;
        size_t n = (size_t)(e - p);
        while (n > 0 && p[n - 1] == ' ')
            n--;
        if ((n == 1 && *p == '*') || (n == on && !strncmp(p, origin, n)))
            return 1;
        p = e;
    }
    return 0;
}
