/*
 * replay_main.c - run a libFuzzer target over corpus files without libFuzzer.
 *
 * Usage: replay DIR_OR_FILE... Each regular file (directories are read one level, in name
 * order) is passed to LLVMFuzzerTestOneInput once. Exit 0 when every input ran; a crash is the
 * failure mode this guards against (plus ASan/UBSan when the build enables them). Exit 1 when an
 * input cannot be read or no input was found at all.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Run one file; 0 on success, -1 if it cannot be read. */
static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = -1;
    if (!f) {
        fprintf(stderr, "%s: cannot open\n", path);
        return -1;
    }
    for (;;) {
        if (len == cap) {
            size_t nc = cap ? cap * 2 : 4096;
            uint8_t *nb = realloc(buf, nc);
            if (!nb)
                goto done;
            buf = nb;
            cap = nc;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0)
            break;
    }
    if (ferror(f))
        goto done;
    LLVMFuzzerTestOneInput(buf, len);
    rc = 0;
done:
    if (rc != 0)
        fprintf(stderr, "%s: read failed\n", path);
    free(buf);
    fclose(f);
    return rc;
}

static int replay_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Run every regular file of `dir` in name order; returns files run, or -1 on error. */
static int replay_dir(const char *dir)
{
    DIR *d = opendir(dir);
    char **names = NULL;
    size_t n = 0, cap = 0;
    int ran = 0;
    struct dirent *de;
    if (!d) {
        fprintf(stderr, "%s: cannot open directory\n", dir);
        return -1;
    }
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 64;
            char **nn = realloc(names, nc * sizeof *nn);
            if (!nn) {
                ran = -1;
                break;
            }
            names = nn;
            cap = nc;
        }
        size_t need = strlen(dir) + strlen(de->d_name) + 2;
        if (!(names[n] = malloc(need))) {
            ran = -1;
            break;
        }
        snprintf(names[n++], need, "%s/%s", dir, de->d_name);
    }
    closedir(d);
    if (ran == 0 && n > 1)
        qsort(names, n, sizeof *names, replay_cmp);
    for (size_t i = 0; i < n && ran >= 0; i++) {
        struct stat st;
        if (stat(names[i], &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        ran = replay_file(names[i]) == 0 ? ran + 1 : -1;
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return ran;
}

int main(int argc, char **argv)
{
    int total = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        int r;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "%s: not found\n", argv[i]);
            return 1;
        }
        r = S_ISDIR(st.st_mode) ? replay_dir(argv[i]) : (replay_file(argv[i]) == 0 ? 1 : -1);
        if (r < 0)
            return 1;
        total += r;
    }
    printf("replayed %d inputs\n", total);
    return total > 0 ? 0 : 1;
}
