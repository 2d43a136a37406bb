/*
 * log.h - leveled log lines on stderr: "2026-01-02T03:04:05.678Z INFO  message".
 *
 * THREAD SAFETY: srv_log may be called from any thread (one fprintf per line); set the level
 * before other threads start.
 */
#ifndef DSV4_SERVER_LOG_H
#define DSV4_SERVER_LOG_H

#include "server/config.h"

void srv_log_set_level(enum log_level level);
int srv_log_enabled(enum log_level level);
void srv_log(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The same line whatever the level (the address lines scripts wait for). */
void srv_log_force(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define LOG_D(...) (srv_log_enabled(LOG_DEBUG) ? srv_log(LOG_DEBUG, __VA_ARGS__) : (void)0)
#define LOG_I(...) srv_log(LOG_INFO, __VA_ARGS__)
#define LOG_W(...) srv_log(LOG_WARNING, __VA_ARGS__)
#define LOG_E(...) srv_log(LOG_ERROR, __VA_ARGS__)

#endif
