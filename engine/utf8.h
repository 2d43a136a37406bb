/*
 * utf8.h - UTF-8 validation, decoding and lossy repair.
 *
 * Invalid input is repaired the way Python's bytes.decode("utf-8", "replace"), Rust's
 * String::from_utf8_lossy and the WHATWG decoder do it: each maximal subpart of an ill-formed
 * sequence becomes one U+FFFD. The tokenizer and the detokenizer both use this rule, so what we
 * do with invalid bytes is what HF tokenizers does with the same text after that decode.
 *
 * THREAD SAFETY: pure functions.
 */
#ifndef DSV4_UTF8_H
#define DSV4_UTF8_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tbuf.h"

enum utf8_status {
    UTF8_OK = 0,         /* a complete, valid sequence */
    UTF8_INVALID = 1,    /* an ill-formed maximal subpart (replace it with U+FFFD) */
    UTF8_INCOMPLETE = 2, /* a valid prefix cut by the end of the input */
};

/*
 * Look at the sequence at s[0..n) (n >= 1). Sets *len to the bytes it covers (>= 1) and *cp to
 * the code point (U+FFFD unless UTF8_OK). Returns an enum utf8_status.
 */
int utf8_next(const unsigned char *s, size_t n, size_t *len, uint32_t *cp);

/* Bytes of the longest valid prefix of s[0..n). Equals n when s is valid UTF-8. */
size_t utf8_valid_prefix(const char *s, size_t n);

/* Append s[0..n) to out with each ill-formed subpart (including an incomplete tail) replaced by
 * U+FFFD. 0 or a negative ERR_* from the buffer. */
int utf8_append_lossy(struct tbuf *out, const char *s, size_t n);

/* Append the UTF-8 encoding of cp (must be <= 0x10FFFF). */
int utf8_append_cp(struct tbuf *out, uint32_t cp);

/* Encode cp into buf (4 bytes); returns the length. */
size_t utf8_encode(uint32_t cp, char buf[4]);

#endif
