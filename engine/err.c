/* err.c - see err.h. */
#include "engine/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char err_buf[1024];

int err_setf(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return code;
}

int err_prefix(int code, const char *fmt, ...)
{
    char old[sizeof err_buf];
    char pre[256];
    va_list ap;
    memcpy(old, err_buf, sizeof old);
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    snprintf(err_buf, sizeof err_buf, "%s: %s", pre, old);
    return code;
}

const char *err_msg(void)
{
    return err_buf;
}

const char *err_str(int code)
{
    switch (code) {
    case ERR_OK: return "ok";
    case ERR_NOMEM: return "out of memory";
    case ERR_INVAL: return "invalid argument";
    case ERR_IO: return "i/o error";
    case ERR_FORMAT: return "malformed file";
    case ERR_CONFIG: return "bad config";
    case ERR_NOTFOUND: return "not found";
    case ERR_BUSY: return "busy";
    case ERR_CUDA: return "CUDA error";
    case ERR_RANGE: return "out of range";
    case ERR_UNSUPPORTED: return "unsupported";
    }
    return "unknown error";
}
