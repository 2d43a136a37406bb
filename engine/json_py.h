/*
 * json_py.h - JSON text exactly as Python's json.dumps(v, ensure_ascii=False) writes it.
 *
 * The DSV4 chat encoder puts json.dumps output into the prompt (tool schemas, non-string tool
 * arguments, response_format), so these bytes are part of what the model was trained on:
 *   - separators ", " and ": ", keys in the object's own (insertion) order, no sorting;
 *   - strings: \" \\ \n \r \t \b \f escaped, other C0 controls as \u00XX, everything else
 *     (DEL, all non-ASCII, U+2028/9) raw UTF-8;
 *   - integers in decimal; reals as Python repr(float): shortest round-trip digits, "1.0",
 *     "1e-05", "1e+16", "-0.0"; true / false / null.
 * jansson keeps object keys in insertion order, which is what Python's dict does.
 *
 * THREAD SAFETY: pure functions.
 */
#ifndef DSV4_JSON_PY_H
#define DSV4_JSON_PY_H

#include <jansson.h>
#include <stddef.h>

#include "engine/tbuf.h"

/* Append json.dumps(v, ensure_ascii=False). 0 or a negative ERR_*. */
int jpy_dump(struct tbuf *out, const json_t *v);
/* Append the escaped body of the JSON string literal of s[0..n) (no quotes). */
int jpy_escape(struct tbuf *out, const char *s, size_t n);
/* Append the JSON string literal of s[0..n) (with the quotes). */
int jpy_dump_str(struct tbuf *out, const char *s, size_t n);
/* Append Python's repr() of a finite double. */
int jpy_dump_real(struct tbuf *out, double d);

#endif
