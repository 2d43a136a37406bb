/*
 * log.c - leveled log lines on stderr.
 *
 * THREAD SAFETY: see log.h; the level is an atomic so reading it is race-free.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

#include "server/log.h"

static atomic_int log_level = LOG_INFO;

void srv_log_set_level(enum log_level level)
{
    atomic_store(&log_level, (int)level);
}

int srv_log_enabled(enum log_level level)
{
    return (int)level >= atomic_load(&log_level);
}

static void vlog(enum log_level level, const char *fmt, va_list ap)
{
    static const char *const names[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
    char line[2048], ts[32];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    vsnprintf(line, sizeof line, fmt, ap);
    fprintf(stderr, "%s.%03dZ %s %s\n", ts, (int)(tv.tv_usec / 1000), names[level], line);
}

void srv_log(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    if (!srv_log_enabled(level))
        return;
    va_start(ap, fmt);
    vlog(level, fmt, ap);
    va_end(ap);
}

void srv_log_force(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, fmt, ap);
    va_end(ap);
}
