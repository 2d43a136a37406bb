/*
 * tokenizer.h - a byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json.
 *
 * Semantics are those of HF `tokenizers` (Tokenizer.encode(text, add_special_tokens=False) and
 * Tokenizer.decode): added tokens are matched first (leftmost-longest; the non-normalized ones
 * over the whole text, then the normalized ones over what is left), the rest is pre-tokenized by
 * the file's Sequence of Split(Isolated) regexes (Oniguruma, the engine HF uses) and ByteLevel,
 * and each piece is merged by BPE (lowest merge rank first, leftmost on ties). Nothing is
 * specific to one vocabulary: DeepSeek-V3 and -V4 files both load. The tokenizer never adds BOS.
 *
 * Invalid UTF-8 input is repaired first (each ill-formed subpart becomes U+FFFD, as Python's
 * bytes.decode("utf-8", "replace")), so the ids are those HF gives for the repaired text.
 *
 * Added tokens and user text: without TOK_ENC_ADDED nothing in the text is matched as an added
 * token, so a user who types "<｜User｜>" gets the BPE pieces of that text, never the control id.
 * With it, every added token (special or not) is recognised, as the reference stacks do when
 * they tokenize a rendered prompt.
 *
 * THREAD SAFETY: after tok_load*() returns, a tokenizer is read-only except for an internal
 * piece cache guarded by a mutex (taken with trylock; a busy cache is bypassed, never waited
 * on). All functions may be called from any thread concurrently; tok_free() must not race them.
 */
#ifndef DSV4_TOKENIZER_H
#define DSV4_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tbuf.h"

struct tokenizer;

/* A growable array of token ids. A zeroed struct is empty; max (0 = TOK_IDS_MAX) caps n. */
struct tok_ids {
    int32_t *v;
    size_t n, cap, max;
};
#define TOK_IDS_MAX ((size_t)1 << 28)

int tok_ids_push(struct tok_ids *a, int32_t id);
int tok_ids_add(struct tok_ids *a, const int32_t *ids, size_t n);
void tok_ids_free(struct tok_ids *a);

enum tok_encode_flags {
    TOK_ENC_ADDED = 1u << 0, /* recognise added tokens (control / special strings) in the text */
};

enum tok_decode_flags {
    TOK_DEC_SKIP_SPECIAL =
        1u << 0, /* drop added tokens flagged "special" (HF skip_special_tokens) */
};

/* Load tokenizer.json from a file. On success *out is the new tokenizer (free with tok_free). */
int tok_load(const char *path, struct tokenizer **out);
/* Load from memory (len bytes of JSON); name is used in error messages. */
int tok_load_mem(const char *json, size_t len, const char *name, struct tokenizer **out);
void tok_free(struct tokenizer *t);

/* One more than the largest id (vocab and added tokens). */
int32_t tok_n_ids(const struct tokenizer *t);

/* The id of the added token whose content is exactly s[0..n), or -1. */
int32_t tok_added_id(const struct tokenizer *t, const char *s, size_t n);

/* The id of the vocab token whose decoded bytes are exactly s[0..n) (BPE vocab only), or -1. */
int32_t tok_vocab_id(const struct tokenizer *t, const char *s, size_t n);

/* 1 when id is an added token, 2 when it is an added token flagged special, 0 otherwise. */
int tok_id_kind(const struct tokenizer *t, int32_t id);

/* The decoded bytes of one token (not necessarily valid UTF-8 alone), or NULL for an unknown
 * id. Borrowed; valid until tok_free. */
const char *tok_id_bytes(const struct tokenizer *t, int32_t id, size_t *len);

/*
 * Encode text[0..len) and append the ids to out. flags: enum tok_encode_flags. 0 or a negative
 * ERR_* (ERR_NOMEM, ERR_RANGE when out would pass its cap).
 */
int tok_encode(const struct tokenizer *t, const char *text, size_t len, unsigned flags,
               struct tok_ids *out);

/* A byte range of a text. */
struct tok_span {
    size_t off, len;
};

/*
 * Encode with added tokens recognised only inside trusted spans (sorted, disjoint): a match is
 * kept when it lies wholly inside one span, otherwise that text is plain. Matching is otherwise
 * the same leftmost-longest scan over the whole text, so when the untrusted text holds no
 * added-token string the ids equal tok_encode(..., TOK_ENC_ADDED). The text must be valid
 * UTF-8 (ERR_INVAL otherwise: repair would move the spans).
 */
int tok_encode_trusted(const struct tokenizer *t, const char *text, size_t len,
                       const struct tok_span *trusted, size_t n_trusted, struct tok_ids *out);

/*
 * The pieces BPE sees, for tests: calls fn once per piece in order with the piece's bytes
 * (after UTF-8 repair and the added-token split and pre-tokenizer), and added_id >= 0 for a
 * matched added token. Returns 0, a negative ERR_*, or the first non-zero value fn returns.
 */
typedef int (*tok_piece_fn)(void *ud, const char *piece, size_t n, int32_t added_id);
int tok_split(const struct tokenizer *t, const char *text, size_t len, unsigned flags,
              tok_piece_fn fn, void *ud);

/*
 * Decode ids to text, appended to out: the tokens' bytes concatenated, then repaired to valid
 * UTF-8 (HF decode with clean_up_tokenization_spaces=false). ERR_RANGE for an unknown id.
 */
int tok_decode(const struct tokenizer *t, const int32_t *ids, size_t n, unsigned flags,
               struct tbuf *out);

/*
 * Incremental detokenizer for streaming. Feed ids one at a time; each call appends to out the
 * text that is now complete. It never emits part of a UTF-8 sequence: an incomplete tail (at
 * most 3 bytes) is held until the next token completes it, and each byte is emitted exactly
 * once. Ill-formed bytes become U+FFFD as soon as they are known to be ill-formed, so the
 * concatenated output equals tok_decode() of all the ids once tok_stream_flush() has run.
 */
struct tok_stream {
    unsigned char pend[4];
    unsigned npend;
};
void tok_stream_init(struct tok_stream *s);
int tok_stream_feed(const struct tokenizer *t, struct tok_stream *s, int32_t id, unsigned flags,
                    struct tbuf *out);
/* End of stream: an incomplete held tail becomes U+FFFD. */
int tok_stream_flush(struct tok_stream *s, struct tbuf *out);

#endif
