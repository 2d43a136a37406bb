/* json_py.c - see json_py.h. */
#include "engine/json_py.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"

int jpy_dump_str(struct tbuf *out, const char *s, size_t n)
{
    int rc;
    if ((rc = tbuf_addc(out, '"')) < 0 || (rc = jpy_escape(out, s, n)) < 0)
        return rc;
    return tbuf_addc(out, '"');
}

int jpy_escape(struct tbuf *out, const char *s, size_t n)
{
    int rc;
    size_t run = 0; /* start of the pending run of bytes that need no escape */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char ubuf[8];
        switch (c) {
        case '"':
            esc = "\\\"";
            break;
        case '\\':
            esc = "\\\\";
            break;
        case '\n':
            esc = "\\n";
            break;
        case '\r':
            esc = "\\r";
            break;
        case '\t':
            esc = "\\t";
            break;
        case '\b':
            esc = "\\b";
            break;
        case '\f':
            esc = "\\f";
            break;
        default:
            if (c < 0x20) {
                snprintf(ubuf, sizeof ubuf, "\\u%04x", c);
                esc = ubuf;
            }
        }
        if (!esc)
            continue;
        if ((rc = tbuf_add(out, s + run, i - run)) < 0 || (rc = tbuf_adds(out, esc)) < 0)
            return rc;
        run = i + 1;
    }
    return tbuf_add(out, s + run, n - run);
}

int jpy_dump_real(struct tbuf *out, double d)
{
    if (isnan(d))
        return tbuf_adds(out, "NaN");
    if (isinf(d))
        return tbuf_adds(out, d < 0 ? "-Infinity" : "Infinity");
    if (d == 0)
        return tbuf_adds(out, signbit(d) ? "-0.0" : "0.0");
    /* Shortest %.Ne that reads back as d: the digits Python's repr uses. */
    char e[40];
    for (int prec = 0; prec < 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec, d);
        if (strtod(e, NULL) == d)
            break;
    }
    /* e is "[-]D[.DDD]e[+-]XX": collect digits and the decimal exponent. */
    char digits[24] = {0};
    size_t nd = 0;
    const char *p = e;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < sizeof digits - 1)
            digits[nd++] = *p;
    long exp10 = strtol(p + 1, NULL, 10);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    long decpt = exp10 + 1; /* value = 0.DIGITS * 10^decpt */
    char buf[64];
    size_t o = 0;
    if (neg)
        buf[o++] = '-';
    if (decpt <= -4 || decpt > 16) {
        buf[o++] = digits[0];
        if (nd > 1) {
            buf[o++] = '.';
            memcpy(buf + o, digits + 1, nd - 1);
            o += nd - 1;
        }
        o += (size_t)snprintf(buf + o, sizeof buf - o, "e%c%02ld", exp10 < 0 ? '-' : '+',
                              exp10 < 0 ? -exp10 : exp10);
    } else if (decpt <= 0) {
        buf[o++] = '0';
        buf[o++] = '.';
        for (long k = 0; k < -decpt; k++)
            buf[o++] = '0';
        memcpy(buf + o, digits, nd);
        o += nd;
    } else if ((size_t)decpt >= nd) {
        memcpy(buf + o, digits, nd);
        o += nd;
        for (long k = (long)nd; k < decpt; k++)
            buf[o++] = '0';
        buf[o++] = '.';
        buf[o++] = '0';
    } else {
        memcpy(buf + o, digits, (size_t)decpt);
        o += (size_t)decpt;
        buf[o++] = '.';
        memcpy(buf + o, digits + decpt, nd - (size_t)decpt);
        o += nd - (size_t)decpt;
    }
    return tbuf_add(out, buf, o);
}

int jpy_dump(struct tbuf *out, const json_t *v)
{
    int rc = 0;
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *key;
        json_t *val;
        bool first = true;
        if ((rc = tbuf_addc(out, '{')) < 0)
            return rc;
        json_object_foreach((json_t *)v, key, val)
        {
            if (!first && (rc = tbuf_add(out, ", ", 2)) < 0)
                return rc;
            first = false;
            if ((rc = jpy_dump_str(out, key, strlen(key))) < 0 ||
                (rc = tbuf_add(out, ": ", 2)) < 0 || (rc = jpy_dump(out, val)) < 0)
                return rc;
        }
        return tbuf_addc(out, '}');
    }
    case JSON_ARRAY: {
        size_t i;
        json_t *val;
        if ((rc = tbuf_addc(out, '[')) < 0)
            return rc;
        json_array_foreach(v, i, val)
        {
            if (i && (rc = tbuf_add(out, ", ", 2)) < 0)
                return rc;
            if ((rc = jpy_dump(out, val)) < 0)
                return rc;
        }
        return tbuf_addc(out, ']');
    }
    case JSON_STRING:
        return jpy_dump_str(out, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        return tbuf_addf(out, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    case JSON_REAL:
        return jpy_dump_real(out, json_real_value(v));
    case JSON_TRUE:
        return tbuf_add(out, "true", 4);
    case JSON_FALSE:
        return tbuf_add(out, "false", 5);
    case JSON_NULL:
        return tbuf_add(out, "null", 4);
    }
    return err_setf(ERR_INVAL, "json: unknown value type");
}
