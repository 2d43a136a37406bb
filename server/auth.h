/*
 * auth.h - API-key check (Bearer, constant time) and CORS origin matching.
 *
 * THREAD SAFETY: pure functions.
 */
#ifndef DSV4_SERVER_AUTH_H
#define DSV4_SERVER_AUTH_H

/*
 * 1 when the Authorization header value (may be NULL) is "Bearer <key>" (scheme matched case
 * insensitively), else 0. The comparison takes time independent of where the values differ
 * (and of the key's length up to 512 bytes). An empty key accepts everything.
 */
int auth_bearer_ok(const char *header, const char *key);

/* 1 when origin (may be NULL) is allowed by the comma-separated list (or "*"). */
int auth_origin_ok(const char *list, const char *origin);

#endif
