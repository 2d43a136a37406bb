/*
 * tokenizer.c - byte-level BPE over a Hugging Face tokenizer.json (see tokenizer.h).
 *
 * Data layout (all built once at load, read-only afterwards):
 *   - tok->ids[id]: the decoded bytes of every id (offset into tok->bytes) and its kind;
 *   - vocab: an open-addressing hash from the vocab's byte-level string ("Ġthe") to its id,
 *     used to resolve merges at load and for ignore_merges;
 *   - merges: an open-addressing hash from the id pair (left << 32 | right) to (rank, new id);
 *   - two byte tries of added tokens (non-normalized, normalized) for leftmost-longest matching;
 *   - the pre-tokenizer passes: one compiled Oniguruma regex (or literal) per Split.
 * The only mutable state is the piece cache (direct-mapped, mutex-guarded, trylock only).
 *
 * Encoding one text: repair UTF-8 -> split on added tokens -> recursive Split passes (each pass
 * re-splits every piece of the previous one, matches and gaps both kept: "Isolated") -> BPE per
 * piece (cache, then a linear merge loop for short pieces or a heap for long ones).
 */
#include "engine/tokenizer.h"

#include <jansson.h>
#include <oniguruma.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/utf8.h"

#include "engine/tok_unicode_fix.h"

/* ---- Small helpers ---- */

static uint64_t hash_bytes(const void *p, size_t n)
{
    /* FNV-1a, finished with a multiply-xorshift so the low bits mix well. */
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

int tok_ids_push(struct tok_ids *a, int32_t id)
{
    return tok_ids_add(a, &id, 1);
}

int tok_ids_add(struct tok_ids *a, const int32_t *ids, size_t n)
{
    size_t max = a->max ? a->max : TOK_IDS_MAX;
    if (n > max || a->n > max - n)
        return err_setf(ERR_RANGE, "token list over its cap of %zu ids", max);
    if (n == 0)
        return 0;
    if (a->n + n > a->cap) {
        size_t cap = a->cap ? a->cap : 64;
        while (cap < a->n + n)
            cap *= 2;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v)
            return err_setf(ERR_NOMEM, "token list: cannot grow to %zu ids", cap);
        a->v = v;
        a->cap = cap;
    }
    memcpy(a->v + a->n, ids, n * sizeof *ids);
    a->n += n;
    return 0;
}

void tok_ids_free(struct tok_ids *a)
{
    if (!a)
        return;
    free(a->v);
    a->v = NULL;
    a->n = a->cap = 0;
}

/* ---- The GPT-2 byte <-> code point table of ByteLevel ---- */

static uint32_t byte_to_cp[256];
static int16_t cp_to_byte[324]; /* the table's code points are all < 0x144 */
static pthread_once_t byte_table_once = PTHREAD_ONCE_INIT;

static void byte_table_init(void)
{
    /* Oniguruma's one-time setup, here so that concurrent first loads cannot race on it. */
    OnigEncoding enc = ONIG_ENCODING_UTF8;
    onig_initialize(&enc, 1);
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_to_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 324; i++)
        cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++)
        cp_to_byte[byte_to_cp[b]] = (int16_t)b;
}

/*
 * ByteLevel decoding of one token string: every char mapped back to its byte, or, when any char
 * is outside the table (e.g. "<｜User｜>"), the string's own UTF-8 bytes (as HF's decoder).
 * Writes at most n bytes to out; returns the length.
 */
static size_t bytelevel_decode(const char *s, size_t n, char *out)
{
    size_t i = 0, o = 0;
    while (i < n) {
        size_t len;
        uint32_t cp;
        if (utf8_next((const unsigned char *)s + i, n - i, &len, &cp) != UTF8_OK || cp >= 324 ||
            cp_to_byte[cp] < 0) {
            memcpy(out, s, n);
            return n;
        }
        out[o++] = (char)cp_to_byte[cp];
        i += len;
    }
    return o;
}

/* ---- Tries of added tokens ---- */

struct trie_node {
    int32_t child;   /* first child node, -1 if none */
    int32_t sibling; /* next sibling, -1 if none */
    int32_t id;      /* token id ending here, -1 if none */
    uint8_t byte;
};

struct trie {
    struct trie_node *nodes;
    size_t n, cap;
    int32_t root[256]; /* depth-1 node per first byte, -1 if none */
    bool empty;
};

static void trie_init(struct trie *tr)
{
    memset(tr, 0, sizeof *tr);
    for (int i = 0; i < 256; i++)
        tr->root[i] = -1;
    tr->empty = true;
}

static int trie_new_node(struct trie *tr, uint8_t byte, int32_t *out)
{
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? tr->cap * 2 : 1024;
        struct trie_node *nn = realloc(tr->nodes, cap * sizeof *nn);
        if (!nn)
            return err_setf(ERR_NOMEM, "tokenizer: added-token trie");
        tr->nodes = nn;
        tr->cap = cap;
    }
    tr->nodes[tr->n] = (struct trie_node){.child = -1, .sibling = -1, .id = -1, .byte = byte};
    *out = (int32_t)tr->n++;
    return 0;
}

static int trie_insert(struct trie *tr, const unsigned char *s, size_t n, int32_t id)
{
    int rc;
    int32_t node = tr->root[s[0]];
    if (node < 0) {
        if ((rc = trie_new_node(tr, s[0], &node)) < 0)
            return rc;
        tr->root[s[0]] = node;
    }
    for (size_t i = 1; i < n; i++) {
        int32_t c = tr->nodes[node].child;
        while (c >= 0 && tr->nodes[c].byte != s[i])
            c = tr->nodes[c].sibling;
        if (c < 0) {
            if ((rc = trie_new_node(tr, s[i], &c)) < 0)
                return rc;
            tr->nodes[c].sibling = tr->nodes[node].child;
            tr->nodes[node].child = c;
        }
        node = c;
    }
    if (tr->nodes[node].id < 0) /* the first entry with a given content wins */
        tr->nodes[node].id = id;
    tr->empty = false;
    return 0;
}

/*
 * Leftmost-longest match in s[lo..hi): the first position where any token starts, and the
 * longest token there. Returns true and sets *mb, *me, *id, or false.
 */
static bool trie_find(const struct trie *tr, const unsigned char *s, size_t lo, size_t hi,
                      size_t *mb, size_t *me, int32_t *id)
{
    if (tr->empty)
        return false;
    for (size_t i = lo; i < hi; i++) {
        int32_t node = tr->root[s[i]];
        if (node < 0)
            continue;
        size_t best_end = 0;
        int32_t best_id = -1;
        size_t j = i + 1;
        for (;;) {
            if (tr->nodes[node].id >= 0) {
                best_end = j;
                best_id = tr->nodes[node].id;
            }
            if (j >= hi)
                break;
            int32_t c = tr->nodes[node].child;
            while (c >= 0 && tr->nodes[c].byte != s[j])
                c = tr->nodes[c].sibling;
            if (c < 0)
                break;
            node = c;
            j++;
        }
        if (best_id >= 0) {
            *mb = i;
            *me = best_end;
            *id = best_id;
            return true;
        }
    }
    return false;
}

/* ---- The tokenizer ---- */

struct tok_entry {
    uint32_t off; /* decoded bytes at tok->bytes + off */
    uint32_t len;
    uint8_t kind; /* 0 absent, 1 vocab, 2 added, 3 added+special */
};

struct vocab_slot {
    uint32_t off, len; /* key at tok->keys + off; len == UINT32_MAX marks empty */
    int32_t id;
};

struct merge_slot {
    uint64_t key; /* left << 32 | right; UINT64_MAX marks empty */
    uint32_t rank;
    int32_t id;
};

struct tok_pass {
    regex_t *re;   /* Split(Regex) */
    char *literal; /* Split(String) */
    size_t literal_len;
};

#define CACHE_KEY   22
#define CACHE_IDS   8
#define CACHE_SLOTS (1u << 16)

struct cache_entry {
    uint64_t h;
    uint8_t len, nids;
    char key[CACHE_KEY];
    int32_t ids[CACHE_IDS];
};

struct tok_cache {
    pthread_mutex_t lock;
    struct cache_entry e[CACHE_SLOTS];
};

struct tokenizer {
    struct tok_entry *ids;
    int32_t n_ids;
    char *bytes; /* decoded token bytes */
    size_t bytes_len;
    char *keys; /* vocab byte-level strings */
    size_t keys_len;

    struct vocab_slot *vocab;
    size_t vocab_mask;
    struct merge_slot *merges;
    size_t merges_mask;
    int32_t byte_id[256]; /* id of each byte's symbol, -1 if the vocab lacks it */
    bool ignore_merges;

    struct trie added_raw;  /* non-normalized added tokens */
    struct trie added_norm; /* normalized added tokens */

    struct tok_pass *passes;
    size_t n_passes;

    struct tok_cache *cache; /* the one mutable part; see the file comment */
};

static const struct tok_entry *tok_entry_get(const struct tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_ids || !t->ids[id].kind)
        return NULL;
    return &t->ids[id];
}

int32_t tok_n_ids(const struct tokenizer *t)
{
    return t->n_ids;
}

int tok_id_kind(const struct tokenizer *t, int32_t id)
{
    const struct tok_entry *e = tok_entry_get(t, id);
    if (!e || e->kind == 1)
        return 0;
    return e->kind == 3 ? 2 : 1;
}

const char *tok_id_bytes(const struct tokenizer *t, int32_t id, size_t *len)
{
    const struct tok_entry *e = tok_entry_get(t, id);
    if (!e)
        return NULL;
    *len = e->len;
    return t->bytes + e->off;
}

static int32_t vocab_get(const struct tokenizer *t, const char *s, size_t n)
{
    size_t i = hash_bytes(s, n) & t->vocab_mask;
    for (;;) {
        const struct vocab_slot *sl = &t->vocab[i];
        if (sl->len == UINT32_MAX)
            return -1;
        if (sl->len == n && memcmp(t->keys + sl->off, s, n) == 0)
            return sl->id;
        i = (i + 1) & t->vocab_mask;
    }
}

static inline bool merge_get(const struct tokenizer *t, int32_t a, int32_t b, uint32_t *rank,
                             int32_t *id)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t i = hash_u64(key) & t->merges_mask;
    for (;;) {
        const struct merge_slot *sl = &t->merges[i];
        if (sl->key == key) {
            *rank = sl->rank;
            *id = sl->id;
            return true;
        }
        if (sl->key == UINT64_MAX)
            return false;
        i = (i + 1) & t->merges_mask;
    }
}

/* Byte-level form of raw bytes (each byte -> its code point's UTF-8), into out (4*n bytes). */
static size_t bytelevel_encode(const unsigned char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++)
        o += utf8_encode(byte_to_cp[s[i]], out + o);
    return o;
}

int32_t tok_vocab_id(const struct tokenizer *t, const char *s, size_t n)
{
    if (n == 0 || n > 4096)
        return -1;
    char *buf = malloc(4 * n);
    if (!buf)
        return -1;
    size_t m = bytelevel_encode((const unsigned char *)s, n, buf);
    int32_t id = vocab_get(t, buf, m);
    free(buf);
    return id;
}

int32_t tok_added_id(const struct tokenizer *t, const char *s, size_t n)
{
    size_t mb, me;
    int32_t id;
    const struct trie *tries[2] = {&t->added_raw, &t->added_norm};
    if (n == 0)
        return -1;
    for (int k = 0; k < 2; k++)
        if (trie_find(tries[k], (const unsigned char *)s, 0, n, &mb, &me, &id) && mb == 0 &&
            me == n)
            return id;
    return -1;
}

void tok_free(struct tokenizer *t)
{
    if (!t)
        return;
    free(t->ids);
    free(t->bytes);
    free(t->keys);
    free(t->vocab);
    free(t->merges);
    free(t->added_raw.nodes);
    free(t->added_norm.nodes);
    for (size_t i = 0; i < t->n_passes; i++) {
        if (t->passes[i].re)
            onig_free(t->passes[i].re);
        free(t->passes[i].literal);
    }
    free(t->passes);
    if (t->cache) {
        pthread_mutex_destroy(&t->cache->lock);
        free(t->cache);
    }
    free(t);
}

/* ---- Loading ---- */

struct arena {
    char *p;
    size_t len, cap;
};

static int arena_add(struct arena *a, const char *s, size_t n, uint32_t *off)
{
    if (a->len + n > UINT32_MAX)
        return err_setf(ERR_RANGE, "tokenizer: strings too large");
    if (a->len + n > a->cap) {
        size_t cap = a->cap ? a->cap : 1 << 20;
        while (cap < a->len + n)
            cap *= 2;
        char *p = realloc(a->p, cap);
        if (!p)
            return err_setf(ERR_NOMEM, "tokenizer: string arena");
        a->p = p;
        a->cap = cap;
    }
    memcpy(a->p + a->len, s, n);
    *off = (uint32_t)a->len;
    a->len += n;
    return 0;
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* Set the decoded bytes of id (growing the id table as needed). */
static int set_id(struct tokenizer *t, struct arena *bytes, int32_t id, const char *s, size_t n,
                  uint8_t kind, size_t *cap)
{
    if (id < 0 || id > (1 << 24))
        return err_setf(ERR_FORMAT, "token id %d out of range", (int)id);
    if ((size_t)id >= *cap) {
        size_t nc = *cap ? *cap : 1024;
        while (nc <= (size_t)id)
            nc *= 2;
        struct tok_entry *e = realloc(t->ids, nc * sizeof *e);
        if (!e)
            return err_setf(ERR_NOMEM, "tokenizer: id table");
        memset(e + *cap, 0, (nc - *cap) * sizeof *e);
        t->ids = e;
        *cap = nc;
    }
    char small[256];
    char *buf = n <= sizeof small ? small : malloc(n);
    if (!buf)
        return err_setf(ERR_NOMEM, "tokenizer: token bytes");
    size_t m = bytelevel_decode(s, n, buf);
    uint32_t off = 0;
    int rc = arena_add(bytes, buf, m, &off);
    if (buf != small)
        free(buf);
    if (rc < 0)
        return rc;
    t->ids[id] = (struct tok_entry){.off = off, .len = (uint32_t)m, .kind = kind};
    if (id >= t->n_ids)
        t->n_ids = id + 1;
    return 0;
}

static int load_vocab(struct tokenizer *t, json_t *vocab, struct arena *bytes, struct arena *keys,
                      size_t *idcap)
{
    size_t n = json_object_size(vocab);
    t->vocab_mask = pow2_at_least(n * 2 + 16) - 1;
    t->vocab = malloc((t->vocab_mask + 1) * sizeof *t->vocab);
    if (!t->vocab)
        return err_setf(ERR_NOMEM, "tokenizer: vocab table");
    for (size_t i = 0; i <= t->vocab_mask; i++)
        t->vocab[i].len = UINT32_MAX;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val)
    {
        if (!json_is_integer(val))
            return err_setf(ERR_FORMAT, "vocab entry \"%s\" is not an integer", key);
        int32_t id = (int32_t)json_integer_value(val);
        size_t klen = strlen(key);
        int rc = set_id(t, bytes, id, key, klen, 1, idcap);
        if (rc < 0)
            return rc;
        uint32_t off = 0;
        if ((rc = arena_add(keys, key, klen, &off)) < 0)
            return rc;
        size_t h = hash_bytes(key, klen) & t->vocab_mask;
        while (t->vocab[h].len != UINT32_MAX)
            h = (h + 1) & t->vocab_mask;
        t->vocab[h] = (struct vocab_slot){.off = off, .len = (uint32_t)klen, .id = id};
    }
    return 0;
}

/* vocab_get before t->keys is final: look keys up in the arena being built. */
static int32_t vocab_get_arena(const struct tokenizer *t, const struct arena *keys, const char *s,
                               size_t n)
{
    size_t i = hash_bytes(s, n) & t->vocab_mask;
    for (;;) {
        const struct vocab_slot *sl = &t->vocab[i];
        if (sl->len == UINT32_MAX)
            return -1;
        if (sl->len == n && memcmp(keys->p + sl->off, s, n) == 0)
            return sl->id;
        i = (i + 1) & t->vocab_mask;
    }
}

static int load_merges(struct tokenizer *t, json_t *merges, const struct arena *keys)
{
    size_t n = json_array_size(merges);
    t->merges_mask = pow2_at_least(n * 2 + 16) - 1;
    t->merges = malloc((t->merges_mask + 1) * sizeof *t->merges);
    if (!t->merges)
        return err_setf(ERR_NOMEM, "tokenizer: merge table");
    for (size_t i = 0; i <= t->merges_mask; i++)
        t->merges[i].key = UINT64_MAX;
    char *cat = NULL;
    size_t catcap = 0;
    int rc = 0;
    for (size_t r = 0; r < n; r++) {
        json_t *m = json_array_get(merges, r);
        const char *a, *b;
        size_t alen, blen;
        if (json_is_string(m)) {
            const char *s = json_string_value(m);
            const char *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = err_setf(ERR_FORMAT, "merge %zu \"%s\" is not two tokens", r, s);
                goto out;
            }
            a = s;
            alen = (size_t)(sp - s);
            b = sp + 1;
            blen = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            alen = strlen(a);
            blen = strlen(b);
        } else {
            rc = err_setf(ERR_FORMAT, "merge %zu is neither \"a b\" nor [a, b]", r);
            goto out;
        }
        int32_t ia = vocab_get_arena(t, keys, a, alen);
        int32_t ib = vocab_get_arena(t, keys, b, blen);
        if (alen + blen > catcap) {
            catcap = 2 * (alen + blen) + 64;
            char *nc = realloc(cat, catcap);
            if (!nc) {
                rc = err_setf(ERR_NOMEM, "tokenizer: merges");
                goto out;
            }
            cat = nc;
        }
        memcpy(cat, a, alen);
        memcpy(cat + alen, b, blen);
        int32_t inew = vocab_get_arena(t, keys, cat, alen + blen);
        if (ia < 0 || ib < 0 || inew < 0) {
            rc = err_setf(ERR_FORMAT, "merge %zu: token not in the vocab", r);
            goto out;
        }
        uint64_t key = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        size_t h = hash_u64(key) & t->merges_mask;
        while (t->merges[h].key != UINT64_MAX && t->merges[h].key != key)
            h = (h + 1) & t->merges_mask;
        if (t->merges[h].key == key)
            continue; /* a repeated pair keeps its first (lowest) rank */
        t->merges[h] = (struct merge_slot){.key = key, .rank = (uint32_t)r, .id = inew};
    }
out:
    free(cat);
    return rc;
}

static int load_added(struct tokenizer *t, json_t *added, struct arena *bytes, size_t *idcap)
{
    size_t i;
    json_t *a;
    json_array_foreach(added, i, a)
    {
        json_t *jid = json_object_get(a, "id"), *jc = json_object_get(a, "content");
        if (!json_is_integer(jid) || !json_is_string(jc) || json_string_length(jc) == 0)
            return err_setf(ERR_FORMAT, "added_tokens[%zu]: needs an id and a content", i);
        static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
        for (size_t k = 0; k < 3; k++)
            if (json_is_true(json_object_get(a, unsupported[k])))
                return err_setf(ERR_UNSUPPORTED, "added_tokens[%zu]: %s=true is not supported", i,
                                unsupported[k]);
        bool special = json_is_true(json_object_get(a, "special"));
        json_t *jn = json_object_get(a, "normalized");
        bool normalized = jn ? json_is_true(jn) : !special; /* HF default: !special */
        int32_t id = (int32_t)json_integer_value(jid);
        const char *c = json_string_value(jc);
        size_t clen = json_string_length(jc);
        int rc = set_id(t, bytes, id, c, clen, special ? 3 : 2, idcap);
        if (rc < 0)
            return rc;
        rc = trie_insert(normalized ? &t->added_norm : &t->added_raw, (const unsigned char *)c,
                         clen, id);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int add_regex_pass(struct tokenizer *t, const char *pat, size_t len)
{
    struct tok_pass *p = &t->passes[t->n_passes];
    OnigErrorInfo einfo;
    int r = onig_new(&p->re, (const OnigUChar *)pat, (const OnigUChar *)pat + len, ONIG_OPTION_NONE,
                     ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &einfo);
    if (r != ONIG_NORMAL) {
        OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
        onig_error_code_to_str(msg, r, &einfo);
        p->re = NULL;
        return err_setf(ERR_FORMAT, "pre_tokenizer regex /%.*s/: %s", (int)len, pat, msg);
    }
    t->n_passes++;
    return 0;
}

static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretok_one(struct tokenizer *t, json_t *pt)
{
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type)
        return err_setf(ERR_FORMAT, "pre_tokenizer without a type");
    if (strcmp(type, "Split") == 0) {
        const char *beh = json_string_value(json_object_get(pt, "behavior"));
        if (!beh || strcmp(beh, "Isolated") != 0 || json_is_true(json_object_get(pt, "invert")))
            return err_setf(ERR_UNSUPPORTED, "Split: only behavior Isolated, invert false");
        json_t *pat = json_object_get(pt, "pattern");
        json_t *re = json_object_get(pat, "Regex"), *lit = json_object_get(pat, "String");
        if (json_is_string(re))
            return add_regex_pass(t, json_string_value(re), json_string_length(re));
        if (json_is_string(lit) && json_string_length(lit) > 0) {
            struct tok_pass *p = &t->passes[t->n_passes];
            p->literal_len = json_string_length(lit);
            p->literal = malloc(p->literal_len);
            if (!p->literal)
                return err_setf(ERR_NOMEM, "tokenizer: split literal");
            memcpy(p->literal, json_string_value(lit), p->literal_len);
            t->n_passes++;
            return 0;
        }
        return err_setf(ERR_FORMAT, "Split without a Regex or String pattern");
    }
    if (strcmp(type, "ByteLevel") == 0) {
        if (json_is_true(json_object_get(pt, "add_prefix_space")))
            return err_setf(ERR_UNSUPPORTED, "ByteLevel add_prefix_space=true");
        json_t *ur = json_object_get(pt, "use_regex");
        if (!ur || json_is_true(ur))
            return add_regex_pass(t, GPT2_PATTERN, sizeof GPT2_PATTERN - 1);
        return 0; /* the byte mapping itself happens in BPE */
    }
    return err_setf(ERR_UNSUPPORTED, "pre_tokenizer type %s", type);
}

static int load_pretok(struct tokenizer *t, json_t *pt)
{
    bool has_bytelevel = false;
    json_t *list = NULL;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (type && strcmp(type, "Sequence") == 0)
        list = json_object_get(pt, "pretokenizers");
    size_t n = list ? json_array_size(list) : 1;
    t->passes = calloc(n + 1, sizeof *t->passes);
    if (!t->passes)
        return err_setf(ERR_NOMEM, "tokenizer: passes");
    for (size_t i = 0; i < n; i++) {
        json_t *one = list ? json_array_get(list, i) : pt;
        const char *ty = json_string_value(json_object_get(one, "type"));
        if (ty && strcmp(ty, "ByteLevel") == 0)
            has_bytelevel = true;
        int rc = load_pretok_one(t, one);
        if (rc < 0)
            return rc;
    }
    if (!has_bytelevel)
        return err_setf(ERR_UNSUPPORTED, "pre_tokenizer without ByteLevel");
    return 0;
}

static int load_root(struct tokenizer *t, json_t *root)
{
    int rc;
    struct arena bytes = {0}, keys = {0};
    size_t idcap = 0;

    json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm)) {
        const char *ty = json_string_value(json_object_get(norm, "type"));
        json_t *list = json_object_get(norm, "normalizers");
        if (!ty || strcmp(ty, "Sequence") != 0 || json_array_size(list) != 0) {
            rc = err_setf(ERR_UNSUPPORTED, "normalizer %s (only none or an empty Sequence)",
                          ty ? ty : "?");
            goto out;
        }
    }
    json_t *model = json_object_get(root, "model");
    const char *mtype = json_string_value(json_object_get(model, "type"));
    if (!model || (mtype && strcmp(mtype, "BPE") != 0)) {
        rc = err_setf(ERR_UNSUPPORTED, "model type %s (only BPE)", mtype ? mtype : "?");
        goto out;
    }
    if (json_is_true(json_object_get(model, "byte_fallback")) ||
        json_is_string(json_object_get(model, "continuing_subword_prefix")) ||
        json_is_string(json_object_get(model, "end_of_word_suffix"))) {
        rc = err_setf(ERR_UNSUPPORTED, "BPE byte_fallback / subword prefix / suffix");
        goto out;
    }
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        rc = err_setf(ERR_FORMAT, "model without vocab object / merges array");
        goto out;
    }
    if ((rc = load_vocab(t, vocab, &bytes, &keys, &idcap)) < 0)
        goto out;
    if ((rc = load_merges(t, merges, &keys)) < 0)
        goto out;
    for (int b = 0; b < 256; b++) {
        char s[4];
        size_t n = utf8_encode(byte_to_cp[b], s);
        t->byte_id[b] = vocab_get_arena(t, &keys, s, n);
    }
    trie_init(&t->added_raw);
    trie_init(&t->added_norm);
    json_t *added = json_object_get(root, "added_tokens");
    if (added && (rc = load_added(t, added, &bytes, &idcap)) < 0)
        goto out;
    json_t *pt = json_object_get(root, "pre_tokenizer");
    if (!pt || json_is_null(pt)) {
        rc = err_setf(ERR_UNSUPPORTED, "no pre_tokenizer (a byte-level BPE needs ByteLevel)");
        goto out;
    }
    if ((rc = load_pretok(t, pt)) < 0)
        goto out;
    t->bytes = bytes.p;
    t->bytes_len = bytes.len;
    t->keys = keys.p;
    t->keys_len = keys.len;
    bytes.p = keys.p = NULL;
    t->cache = calloc(1, sizeof *t->cache);
    if (!t->cache) {
        rc = err_setf(ERR_NOMEM, "tokenizer: cache");
        goto out;
    }
    pthread_mutex_init(&t->cache->lock, NULL);
    rc = 0;
out:
    free(bytes.p);
    free(keys.p);
    return rc;
}

static int load_json(json_t *root, const char *name, struct tokenizer **out)
{
    pthread_once(&byte_table_once, byte_table_init);
    struct tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return err_setf(ERR_NOMEM, "%s: tokenizer", name);
    int rc = load_root(t, root);
    if (rc < 0) {
        tok_free(t);
        return err_prefix(rc, "%s", name);
    }
    *out = t;
    return 0;
}

int tok_load_mem(const char *json, size_t len, const char *name, struct tokenizer **out)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, 0, &jerr);
    if (!root)
        return err_setf(ERR_FORMAT, "%s: line %d: %s", name, jerr.line, jerr.text);
    int rc = load_json(root, name, out);
    json_decref(root);
    return rc;
}

int tok_load(const char *path, struct tokenizer **out)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        int code = strstr(jerr.text, "unable to open") ? ERR_IO : ERR_FORMAT;
        return err_setf(code, "%s: line %d: %s", path, jerr.line, jerr.text);
    }
    int rc = load_json(root, path, out);
    json_decref(root);
    return rc;
}

/* ---- BPE ---- */

#define BPE_SMALL 48

/* Linear merge loop for short words: O(n) per merge, no allocation. */
static int bpe_small(const struct tokenizer *t, const int32_t *in, size_t n, int32_t *sym,
                     size_t *nout)
{
    uint32_t rank[BPE_SMALL];
    int32_t nid[BPE_SMALL];
    size_t m = n;
    memcpy(sym, in, n * sizeof *sym);
    for (size_t i = 0; i + 1 < m; i++)
        if (!merge_get(t, sym[i], sym[i + 1], &rank[i], &nid[i]))
            rank[i] = UINT32_MAX;
    while (m > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < m; i++)
            if (rank[i] < rank[best])
                best = i;
        if (rank[best] == UINT32_MAX)
            break;
        sym[best] = nid[best];
        size_t tail = m - best - 2; /* symbols after best+1 */
        memmove(sym + best + 1, sym + best + 2, tail * sizeof *sym);
        if (tail) {
            memmove(rank + best + 1, rank + best + 2, (tail - 1) * sizeof *rank);
            memmove(nid + best + 1, nid + best + 2, (tail - 1) * sizeof *nid);
        }
        m--;
        if (best + 1 < m && !merge_get(t, sym[best], sym[best + 1], &rank[best], &nid[best]))
            rank[best] = UINT32_MAX;
        if (best > 0 && !merge_get(t, sym[best - 1], sym[best], &rank[best - 1], &nid[best - 1]))
            rank[best - 1] = UINT32_MAX;
    }
    *nout = m;
    return 0;
}

struct bpe_merge {
    uint32_t rank;
    uint32_t pos;
    int32_t id;
};

static bool merge_less(const struct bpe_merge *a, const struct bpe_merge *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(struct bpe_merge *h, size_t *n, struct bpe_merge m)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!merge_less(&m, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

static struct bpe_merge heap_pop(struct bpe_merge *h, size_t *n)
{
    struct bpe_merge top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && merge_less(&h[c + 1], &h[c]))
            c++;
        if (!merge_less(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (*n)
        h[i] = last;
    return top;
}

/* Heap-driven merges for long words (HF's Word::merge_all): O(n log n). */
static int bpe_large(const struct tokenizer *t, const int32_t *in, size_t n, int32_t *sym,
                     size_t *nout)
{
    int rc = 0;
    int32_t *next = malloc(n * sizeof *next);
    int32_t *prev = malloc(n * sizeof *prev);
    int32_t *id = malloc(n * sizeof *id);
    struct bpe_merge *heap = malloc(2 * n * sizeof *heap + sizeof *heap);
    size_t hn = 0, hcap = 2 * n + 1;
    if (!next || !prev || !id || !heap) {
        rc = err_setf(ERR_NOMEM, "tokenizer: BPE of a %zu-byte piece", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        id[i] = in[i];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        struct bpe_merge m = {.pos = (uint32_t)i};
        if (merge_get(t, id[i], id[i + 1], &m.rank, &m.id))
            heap_push(heap, &hn, m);
    }
    while (hn) {
        struct bpe_merge m = heap_pop(heap, &hn);
        int32_t p = (int32_t)m.pos;
        if (id[p] < 0 || next[p] < 0)
            continue;
        int32_t q = next[p];
        uint32_t r;
        int32_t nid;
        if (!merge_get(t, id[p], id[q], &r, &nid) || nid != m.id)
            continue;
        id[p] = nid;
        id[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0)
            prev[next[q]] = p;
        /* Each merge adds at most two entries and removes one symbol; the cap holds. */
        if (hn + 2 > hcap) {
            rc = err_setf(ERR_RANGE, "tokenizer: BPE heap overflow");
            goto out;
        }
        if (prev[p] >= 0) {
            struct bpe_merge nm = {.pos = (uint32_t)prev[p]};
            if (merge_get(t, id[prev[p]], id[p], &nm.rank, &nm.id))
                heap_push(heap, &hn, nm);
        }
        if (next[p] >= 0) {
            struct bpe_merge nm = {.pos = (uint32_t)p};
            if (merge_get(t, id[p], id[next[p]], &nm.rank, &nm.id))
                heap_push(heap, &hn, nm);
        }
    }
    size_t m = 0;
    for (int32_t i = 0; i >= 0; i = next[i])
        sym[m++] = id[i];
    *nout = m;
out:
    free(next);
    free(prev);
    free(id);
    free(heap);
    return rc;
}

/* BPE one pre-tokenized piece and append its ids. */
static int bpe_piece(const struct tokenizer *t, const unsigned char *p, size_t n,
                     struct tok_ids *out)
{
    int rc;
    if (n == 1 && t->byte_id[p[0]] >= 0)
        return tok_ids_push(out, t->byte_id[p[0]]);

    uint64_t h = 0;
    struct cache_entry *ce = NULL;
    if (n <= CACHE_KEY) {
        h = hash_bytes(p, n);
        ce = &t->cache->e[h & (CACHE_SLOTS - 1)];
        if (pthread_mutex_trylock(&t->cache->lock) == 0) {
            if (ce->h == h && ce->len == n && ce->nids && memcmp(ce->key, p, n) == 0) {
                int32_t ids[CACHE_IDS];
                size_t k = ce->nids;
                memcpy(ids, ce->ids, k * sizeof *ids);
                pthread_mutex_unlock(&t->cache->lock);
                return tok_ids_add(out, ids, k);
            }
            pthread_mutex_unlock(&t->cache->lock);
        }
    }

    if (t->ignore_merges) {
        char small[4 * BPE_SMALL];
        if (n <= BPE_SMALL) {
            size_t m = bytelevel_encode(p, n, small);
            int32_t id = vocab_get(t, small, m);
            if (id >= 0)
                return tok_ids_push(out, id);
        }
    }

    int32_t small_in[BPE_SMALL], small_sym[BPE_SMALL];
    int32_t *in = small_in, *sym = small_sym;
    if (n > BPE_SMALL) {
        in = malloc(n * sizeof *in);
        sym = malloc(n * sizeof *sym);
        if (!in || !sym) {
            rc = err_setf(ERR_NOMEM, "tokenizer: BPE of a %zu-byte piece", n);
            goto out;
        }
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (t->byte_id[p[i]] >= 0) /* a byte missing from the vocab is dropped, as HF does */
            in[k++] = t->byte_id[p[i]];
    size_t m = 0;
    rc = k <= BPE_SMALL ? bpe_small(t, in, k, sym, &m) : bpe_large(t, in, k, sym, &m);
    if (rc < 0)
        goto out;
    rc = tok_ids_add(out, sym, m);
    if (rc == 0 && ce && m <= CACHE_IDS && m > 0 && pthread_mutex_trylock(&t->cache->lock) == 0) {
        ce->h = h;
        ce->len = (uint8_t)n;
        ce->nids = (uint8_t)m;
        memcpy(ce->key, p, n);
        memcpy(ce->ids, sym, m * sizeof *sym);
        pthread_mutex_unlock(&t->cache->lock);
    }
out:
    if (in != small_in)
        free(in);
    if (sym != small_sym)
        free(sym);
    return rc;
}

/* ---- Pre-tokenization ---- */

struct split_ctx {
    const struct tokenizer *t;
    OnigRegion *region;
    const unsigned char *orig;      /* the whole (valid UTF-8) text: added tokens, BPE, spans */
    const unsigned char *rx;        /* the same text as the regexes see it (see ucd_fix) */
    const struct tok_span *trusted; /* NULL: every added-token match counts */
    size_t n_trusted;
    tok_piece_fn fn; /* NULL: BPE into out */
    void *ud;
    struct tok_ids *out;
};

/* p is inside c->rx; the piece's bytes are taken from the original text. */
static int emit_piece(struct split_ctx *c, const unsigned char *p, size_t n)
{
    p = c->orig + (p - c->rx);
    if (c->fn)
        return c->fn(c->ud, (const char *)p, n, -1);
    return bpe_piece(c->t, p, n, c->out);
}

static int split_pass(struct split_ctx *c, size_t pass, const unsigned char *s, size_t n);

/* Emit s[0..n) to the next pass (or to BPE after the last). */
static int split_down(struct split_ctx *c, size_t pass, const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    if (pass + 1 >= c->t->n_passes)
        return emit_piece(c, s, n);
    return split_pass(c, pass + 1, s, n);
}

/* Split(Isolated): every match and every gap between matches becomes a piece. */
static int split_pass(struct split_ctx *c, size_t pass, const unsigned char *s, size_t n)
{
    const struct tok_pass *tp = &c->t->passes[pass];
    size_t last = 0, pos = 0;
    int rc;
    while (pos <= n) {
        size_t mb, me;
        if (tp->re) {
            int r = onig_search(tp->re, s, s + n, s + pos, s + n, c->region, ONIG_OPTION_NONE);
            if (r == ONIG_MISMATCH)
                break;
            if (r < 0)
                return err_setf(ERR_INVAL, "tokenizer: regex search failed (%d)", r);
            mb = (size_t)c->region->beg[0];
            me = (size_t)c->region->end[0];
        } else {
            const unsigned char *f = memmem(s + pos, n - pos, tp->literal, tp->literal_len);
            if (!f)
                break;
            mb = (size_t)(f - s);
            me = mb + tp->literal_len;
        }
        if (me == mb) {
            /* An empty match splits nothing: step over one character. */
            size_t len = 1;
            uint32_t cp;
            if (mb < n)
                utf8_next(s + mb, n - mb, &len, &cp);
            pos = mb + len;
            continue;
        }
        if ((rc = split_down(c, pass, s + last, mb - last)) != 0 ||
            (rc = split_down(c, pass, s + mb, me - mb)) != 0)
            return rc;
        last = pos = me;
    }
    return split_down(c, pass, s + last, n - last);
}

/* s is inside c->orig. */
static int pretok(struct split_ctx *c, const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    s = c->rx + (s - c->orig);
    if (c->t->n_passes == 0)
        return emit_piece(c, s, n);
    return split_pass(c, 0, s, n);
}

static int emit_added(struct split_ctx *c, int32_t id)
{
    if (c->fn) {
        size_t len = 0;
        const char *b = tok_id_bytes(c->t, id, &len);
        return c->fn(c->ud, b, len, id);
    }
    return tok_ids_push(c->out, id);
}

/* Is the match s[mb..me) (s inside c->orig) wholly inside one trusted span? */
static bool match_allowed(const struct split_ctx *c, const unsigned char *s, size_t mb, size_t me)
{
    if (!c->trusted)
        return true;
    size_t a = (size_t)(s - c->orig) + mb, b = (size_t)(s - c->orig) + me;
    size_t lo = 0, hi = c->n_trusted;
    while (lo < hi) { /* the last span starting at or before a */
        size_t mid = (lo + hi) / 2;
        if (c->trusted[mid].off <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return false;
    const struct tok_span *sp = &c->trusted[lo - 1];
    return b <= sp->off + sp->len;
}

/* The next allowed added-token match in s[from..n). */
static bool find_added(const struct split_ctx *c, const struct trie *tr, const unsigned char *s,
                       size_t from, size_t n, size_t *mb, size_t *me, int32_t *id)
{
    while (trie_find(tr, s, from, n, mb, me, id)) {
        if (match_allowed(c, s, *mb, *me))
            return true;
        from = *mb + 1;
    }
    return false;
}

/* Second added-token pass (normalized tokens) over a gap of the first. */
static int split_norm(struct split_ctx *c, const unsigned char *s, size_t n)
{
    size_t pos = 0, mb, me;
    int32_t id;
    int rc;
    while (find_added(c, &c->t->added_norm, s, pos, n, &mb, &me, &id)) {
        if ((rc = pretok(c, s + pos, mb - pos)) != 0 || (rc = emit_added(c, id)) != 0)
            return rc;
        pos = me;
    }
    return pretok(c, s + pos, n - pos);
}

static int run_split(struct split_ctx *c, const unsigned char *s, size_t n, unsigned flags)
{
    int rc;
    if (!(flags & TOK_ENC_ADDED))
        return pretok(c, s, n);
    size_t pos = 0, mb, me;
    int32_t id;
    while (find_added(c, &c->t->added_raw, s, pos, n, &mb, &me, &id)) {
        if ((rc = split_norm(c, s + pos, mb - pos)) != 0 || (rc = emit_added(c, id)) != 0)
            return rc;
        pos = me;
    }
    return split_norm(c, s + pos, n - pos);
}

/* ---- Unicode-version skew ---- */

/*
 * The local Oniguruma may have older Unicode tables than the one inside HF tokenizers, so code
 * points assigned later (CJK Ext. H/I, Kawi, ...) would fall in no \p{..} class here and split
 * differently. tok_unicode_fix.h lists them with HF's class; before the regexes run, each such
 * character is replaced by a long-assigned character of the same class and the same UTF-8
 * length. Offsets are unchanged, and BPE still reads the original bytes.
 */
static const char *ucd_representative(char cls, size_t len)
{
    /* [class][len - 2]: 2-, 3- and 4-byte characters whose class every Unicode version agrees
     * on, outside every range the DeepSeek patterns spell out. */
    static const char *const rep[][3] = {
        {"\xC4\x80", "\xE0\xA4\x85", "\xF0\x90\x80\x80"}, /* L: U+0100 U+0905 U+10000 */
        {"\xCC\x80", "\xE0\xA4\x81", "\xF0\x90\x87\xBD"}, /* M: U+0300 U+0901 U+101FD */
        {"\xC2\xB2", "\xE0\xA5\xA6", "\xF0\x90\x84\x87"}, /* N: U+00B2 U+0966 U+10107 */
        {"\xC2\xA1", "\xE2\x80\x90", "\xF0\x90\x84\x80"}, /* P: U+00A1 U+2010 U+10100 */
        {"\xC2\xA2", "\xE2\x86\x90", "\xF0\x9D\x84\x80"}, /* S: U+00A2 U+2190 U+1D100 */
        {"\xCD\xB8", "\xEF\xBF\xBF", "\xF4\x8F\xBF\xBF"}, /* none: U+0378 U+FFFF U+10FFFF */
    };
    static const char classes[] = "LMNPS-";
    const char *k = strchr(classes, cls);
    if (!k || len < 2 || len > 4)
        return NULL;
    return rep[k - classes][len - 2];
}

static char ucd_fix_class(uint32_t cp)
{
    size_t lo = 0, hi = sizeof TOK_UCD_FIX / sizeof *TOK_UCD_FIX;
    if (cp < TOK_UCD_FIX[0].lo)
        return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp > TOK_UCD_FIX[mid].hi)
            lo = mid + 1;
        else if (cp < TOK_UCD_FIX[mid].lo)
            hi = mid;
        else
            return TOK_UCD_FIX[mid].cls;
    }
    return 0;
}

/* If s (valid UTF-8) holds a listed code point, fill out with the substituted copy. */
static int ucd_fix(const char *s, size_t len, struct tbuf *out)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        if (p[i] < 0xC2) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp;
        utf8_next(p + i, len - i, &n, &cp);
        char cls = ucd_fix_class(cp);
        const char *rep = cls ? ucd_representative(cls, n) : NULL;
        if (rep) {
            int rc;
            if (!out->s && (rc = tbuf_add(out, s, len)) < 0)
                return rc;
            memcpy(out->s + i, rep, n);
        }
        i += n;
    }
    return 0;
}

static int tok_run(const struct tokenizer *t, const char *text, size_t len, unsigned flags,
                   const struct tok_span *trusted, size_t n_trusted, tok_piece_fn fn, void *ud,
                   struct tok_ids *out)
{
    int rc;
    struct tbuf fixed = {0}, rxbuf = {0};
    const char *s = text;
    if (utf8_valid_prefix(text, len) != len) {
        if (trusted)
            return err_setf(ERR_INVAL, "tokenizer: text with trusted spans is not valid UTF-8");
        if ((rc = utf8_append_lossy(&fixed, text, len)) < 0)
            goto out;
        s = fixed.s;
        len = fixed.len;
    }
    if ((rc = ucd_fix(s, len, &rxbuf)) < 0)
        goto out;
    struct split_ctx c = {.t = t,
                          .orig = (const unsigned char *)s,
                          .rx = (const unsigned char *)(rxbuf.s ? rxbuf.s : s),
                          .trusted = trusted,
                          .n_trusted = n_trusted,
                          .fn = fn,
                          .ud = ud,
                          .out = out};
    c.region = onig_region_new();
    if (!c.region) {
        rc = err_setf(ERR_NOMEM, "tokenizer: regex region");
        goto out;
    }
    rc = run_split(&c, (const unsigned char *)s, len, flags);
    onig_region_free(c.region, 1);
out:
    tbuf_free(&fixed);
    tbuf_free(&rxbuf);
    return rc;
}

int tok_encode(const struct tokenizer *t, const char *text, size_t len, unsigned flags,
               struct tok_ids *out)
{
    return tok_run(t, text, len, flags, NULL, 0, NULL, NULL, out);
}

int tok_encode_trusted(const struct tokenizer *t, const char *text, size_t len,
                       const struct tok_span *trusted, size_t n_trusted, struct tok_ids *out)
{
    static const struct tok_span none = {0, 0};
    return tok_run(t, text, len, TOK_ENC_ADDED, n_trusted ? trusted : &none, n_trusted, NULL, NULL,
                   out);
}

int tok_split(const struct tokenizer *t, const char *text, size_t len, unsigned flags,
              tok_piece_fn fn, void *ud)
{
    return tok_run(t, text, len, flags, NULL, 0, fn, ud, NULL);
}

/* ---- Decoding ---- */

int tok_decode(const struct tokenizer *t, const int32_t *ids, size_t n, unsigned flags,
               struct tbuf *out)
{
    struct tbuf raw = {0};
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        const struct tok_entry *e = tok_entry_get(t, ids[i]);
        if (!e) {
            rc = err_setf(ERR_RANGE, "token id %d is not in the vocabulary", (int)ids[i]);
            goto out;
        }
        if ((flags & TOK_DEC_SKIP_SPECIAL) && e->kind == 3)
            continue;
        if ((rc = tbuf_add(&raw, t->bytes + e->off, e->len)) < 0)
            goto out;
    }
    rc = utf8_append_lossy(out, raw.s ? raw.s : "", raw.len);
out:
    tbuf_free(&raw);
    return rc;
}

void tok_stream_init(struct tok_stream *s)
{
    s->npend = 0;
}

/* Emit the complete part of b[0..n), hold an incomplete valid tail in s->pend. */
static int stream_emit(struct tok_stream *s, const unsigned char *b, size_t n, struct tbuf *out)
{
    size_t i = 0;
    int rc;
    s->npend = 0;
    while (i < n) {
        size_t ok = utf8_valid_prefix((const char *)b + i, n - i);
        if ((rc = tbuf_add(out, b + i, ok)) < 0)
            return rc;
        i += ok;
        if (i >= n)
            break;
        size_t len;
        uint32_t cp;
        if (utf8_next(b + i, n - i, &len, &cp) == UTF8_INCOMPLETE) {
            memcpy(s->pend, b + i, len);
            s->npend = (unsigned)len;
            return 0;
        }
        if ((rc = tbuf_add(out, "\xEF\xBF\xBD", 3)) < 0)
            return rc;
        i += len;
    }
    return 0;
}

int tok_stream_feed(const struct tokenizer *t, struct tok_stream *s, int32_t id, unsigned flags,
                    struct tbuf *out)
{
    const struct tok_entry *e = tok_entry_get(t, id);
    if (!e)
        return err_setf(ERR_RANGE, "token id %d is not in the vocabulary", (int)id);
    if ((flags & TOK_DEC_SKIP_SPECIAL) && e->kind == 3)
        return 0;
    const unsigned char *b = (const unsigned char *)t->bytes + e->off;
    if (s->npend == 0)
        return stream_emit(s, b, e->len, out);
    unsigned char small[64];
    size_t n = s->npend + e->len;
    unsigned char *buf = n <= sizeof small ? small : malloc(n);
    if (!buf)
        return err_setf(ERR_NOMEM, "detokenizer");
    memcpy(buf, s->pend, s->npend);
    memcpy(buf + s->npend, b, e->len);
    int rc = stream_emit(s, buf, n, out);
    if (buf != small)
        free(buf);
    return rc;
}

int tok_stream_flush(struct tok_stream *s, struct tbuf *out)
{
    if (s->npend == 0)
        return 0;
    s->npend = 0;
    return tbuf_add(out, "\xEF\xBF\xBD", 3);
}
