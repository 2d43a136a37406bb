/*
 * cli_model.c - the model subcommands: schedule,
 * export-tiny, generate. Each returns the exit status.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/config.h"
#include "engine/err.h"
#include "engine/model.h"
#include "engine/schedule.h"
#include "engine/tiny.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

/* Load only the config of MODEL (a directory or builtin:...). */
static int load_config(const char *model, struct dsv4_config *c)
{
    if (!strcmp(model, "builtin:tiny-flash")) {
        dsv4_tiny_config(c, DSV4_VARIANT_FLASH);
        return 0;
    }
    if (!strcmp(model, "builtin:tiny-pro")) {
        dsv4_tiny_config(c, DSV4_VARIANT_PRO);
        return 0;
    }
    if (!strncmp(model, "builtin:", 8))
        return err_setf(ERR_NOTFOUND, "unknown built-in model \"%s\"", model);
    return dsv4_config_load_dir(c, model);
}

int cli_schedule(int argc, char **argv)
{
    if (argc != 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc == 2 ? stdout : stderr,
                "usage: dsv4d schedule MODEL\n"
                "Print the layer schedule from MODEL's config.json: one line per layer\n"
                "`<index> <swa|csa|hca> <hash|dense>`, then `mtp <swa|csa|hca> <hash|dense>` per\n"
                "MTP layer.\n");
        return argc == 2 ? 0 : 2;
    }
    struct dsv4_config c;
    struct dsv4_schedule s;
    int rc = load_config(argv[1], &c);
    if (!rc)
        rc = dsv4_schedule_build(&s, &c);
    if (rc) {
        fprintf(stderr, "dsv4d schedule: %s\n", err_msg());
        return 1;
    }
    for (int i = 0; i < s.n_layers + s.n_mtp; i++) {
        const struct dsv4_layer_spec *l = &s.layers[i];
        if (l->is_mtp)
            printf("mtp %s %s\n", dsv4_attn_name(l->attn), dsv4_router_name(l->router));
        else
            printf("%d %s %s\n", i, dsv4_attn_name(l->attn), dsv4_router_name(l->router));
    }
    return 0;
}

static double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cli_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static const char export_usage[] =
    "usage: dsv4d export-tiny DIR [--variant flash|pro] [--seed S] [--tokenizer PATH]\n"
    "       dsv4d export-tiny DIR --shape flash --layers N [--experts E] [--seed S]\n"
    "                         [--tokenizer PATH]\n"
    "Write a random DSV4 checkpoint as a directory in the official Hugging Face layout\n"
    "(config.json, model-NNNNN-of-NNNNN.safetensors shards, model.safetensors.index.json;\n"
    "FP8 linears, MXFP4 experts, BF16/F32 vectors, I64 tid2eid).\n"
    "  --shape tiny       (default) the built-in tiny model of --variant (default flash):\n"
    "                     the same bytes builtin:tiny-<variant> loads\n"
    "  --shape flash      the real DeepSeek-V4-Flash widths (d 4096, 64 heads x 512, 256\n"
    "                     experts of 2048, vocab 129280, ...) with N main layers + the MTP layer\n"
    "  --layers N         flash: main layers, 1..43, the released schedule truncated\n"
    "                     (swa swa csa hca csa ...; hash routing in layers 0-2)\n"
    "  --experts E        flash: routed experts per layer, 6..256 (default 256)\n"
    "  --seed S           seed of the random weights (default 0x44535634, the built-in one);\n"
    "                     the output depends on the seed only, not on the thread count\n"
    "  --tokenizer PATH   copy this tokenizer.json into DIR (serve --model DIR finds it)\n"
    "Size: 2.1 GB + 3.6 GB per layer at 256 experts (the MTP layer counts as one; 8 layers:\n"
    "34.3 GB). Threads: OMP_NUM_THREADS.\n";

/* Parse an integer option in [lo, hi] into *out; 0 or ERR_INVAL naming the option. */
static int parse_long(const char *opt, const char *s, long long lo, long long hi, long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end || v < lo || v > hi)
        return err_setf(ERR_INVAL, "%s \"%s\": must be an integer in [%lld, %lld]", opt, s, lo, hi);
    *out = v;
    return 0;
}

int cli_export_tiny(int argc, char **argv)
{
    static const struct option opts[] = {
        {"variant", required_argument, NULL, 'v'}, {"shape", required_argument, NULL, 's'},
        {"layers", required_argument, NULL, 'l'},  {"experts", required_argument, NULL, 'e'},
        {"seed", required_argument, NULL, 'S'},    {"tokenizer", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},          {0, 0, 0, 0}};
    enum dsv4_variant v = DSV4_VARIANT_FLASH;
    const char *shape = "tiny", *tokenizer = NULL, *variant = NULL;
    long long layers = 0, experts = 256, seed = (long long)DSV4_SYNTH_SEED;
    int o, rc = 0, have_layers = 0, have_experts = 0;
    optind = 1;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case 'v':
            variant = optarg;
            rc = dsv4_variant_parse(optarg, &v);
            break;
        case 's':
            shape = optarg;
            break;
        case 'l':
            rc = parse_long("--layers", optarg, 1, DSV4_FLASH_LAYERS, &layers);
            have_layers = 1;
            break;
        case 'e':
            rc = parse_long("--experts", optarg, 6, 256, &experts);
            have_experts = 1;
            break;
        case 'S':
            rc = parse_long("--seed", optarg, 0, LLONG_MAX, &seed);
            break;
        case 't':
            tokenizer = optarg;
            break;
        case 'h':
            fputs(export_usage, stdout);
            return 0;
        default:
            fputs(export_usage, stderr);
            return 2;
        }
        if (rc) {
            fprintf(stderr, "dsv4d export-tiny: %s\n", err_msg());
            return 2;
        }
    }
    const int flash = !strcmp(shape, "flash");
    const char *bad = optind != argc - 1                ? "exactly one DIR is required"
                      : strcmp(shape, "tiny") && !flash ? "--shape must be tiny or flash"
                      : flash && !have_layers           ? "--shape flash needs --layers N (1..43)"
                      : flash && variant                ? "--variant applies to --shape tiny only"
                      : !flash && (have_layers || have_experts)
                          ? "--layers and --experts apply to --shape flash only"
                          : NULL;
    if (bad) {
        fprintf(stderr, "dsv4d export-tiny: %s (see --help)\n", bad);
        return 2;
    }
    struct dsv4_config c;
    struct tokenizer *tok = NULL;
    uint64_t bytes = 0;
    const char *dir = argv[optind];
    double t0 = cli_now();
    if (flash)
        rc = dsv4_flash_config(&c, (int)layers, (int)experts);
    else
        dsv4_tiny_config(&c, v);
    /* a tokenizer that does not load is refused before minutes of generation, not after */
    if (!rc && tokenizer) {
        if ((rc = tok_load(tokenizer, &tok)))
            err_prefix(rc, "--tokenizer");
        tok_free(tok);
    }
    if (!rc)
        rc = dsv4_synth_export(dir, &c, (uint64_t)seed, tokenizer, &bytes);
    if (rc) {
        fprintf(stderr, "dsv4d export-tiny: %s\n", err_msg());
        return 1;
    }
    double dt = cli_now() - t0;
    fprintf(stderr, "dsv4d export-tiny: wrote %s: %.2f GB in %.1f s (%.0f MB/s, %d threads)\n", dir,
            (double)bytes / 1e9, dt, (double)bytes / 1e6 / (dt > 0 ? dt : 1e-9), cli_threads());
    return 0;
}

/* Parse "1,2,3" into a malloc'd array. */
static int parse_ids(const char *s, int32_t **out, int *n)
{
    int cap = 16, cnt = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    const char *p = s;
    if (!ids)
        return err_setf(ERR_NOMEM, "out of memory");
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 0x7fffffff || (*end && *end != ',')) {
            free(ids);
            return err_setf(ERR_INVAL, "--prompt-ids: \"%s\" is not a comma-separated id list", s);
        }
        if (cnt == cap) {
            int32_t *nids = realloc(ids, sizeof(int32_t) * (size_t)(cap *= 2));
            if (!nids) {
                free(ids);
                return err_setf(ERR_NOMEM, "out of memory");
            }
            ids = nids;
        }
        ids[cnt++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!cnt) {
        free(ids);
        return err_setf(ERR_INVAL, "--prompt-ids: empty");
    }
    *out = ids;
    *n = cnt;
    return 0;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

int cli_generate(int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, NULL, 'm'},
                                         {"prompt-ids", required_argument, NULL, 'p'},
                                         {"max-tokens", required_argument, NULL, 'n'},
                                         {"numerics", required_argument, NULL, 'x'},
                                         {"help", no_argument, NULL, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = "builtin:tiny-flash", *ids_arg = NULL, *numerics = "model";
    long max_tokens = 16;
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        char *end = NULL;
        switch (o) {
        case 'm': model = optarg; break;
        case 'p': ids_arg = optarg; break;
        case 'x': numerics = optarg; break;
        case 'n':
            max_tokens = strtol(optarg, &end, 10);
            if (*end || max_tokens < 1 || max_tokens > 1000000) {
                fprintf(stderr, "dsv4d generate: --max-tokens must be an integer in [1, 1000000]\n");
                return 2;
            }
            break;
        default: {
            FILE *f = o == 'h' ? stdout : stderr;
            fprintf(f, "usage: dsv4d generate --model MODEL --prompt-ids 1,2,3 --max-tokens N\n"
                       "                      [--numerics model|exact]\n"
                       "Greedy generation on the CPU engine; prints the generated ids on one line.\n"
                       "Stops early at the model's eos token. --numerics exact runs FP32 on the\n"
                       "dequantised weights (the float reference); model (default) adds the\n"
                       "quantisation steps of the model definition.\n");
            return o == 'h' ? 0 : 2;
        }
        }
    }
    if (!ids_arg || optind != argc) {
        fprintf(stderr, "dsv4d generate: --prompt-ids is required (see --help)\n");
        return 2;
    }
    if (strcmp(numerics, "model") && strcmp(numerics, "exact")) {
        fprintf(stderr, "dsv4d generate: --numerics must be model or exact\n");
        return 2;
    }
    int32_t *ids = NULL;
    int n = 0, status = 1;
    struct dsv4_model *m = NULL;
    struct dsv4_seq_state *st = NULL;
    float *logits = NULL;
    if (parse_ids(ids_arg, &ids, &n) || dsv4_model_open(&m, model) ||
        dsv4_seq_state_new(m, NULL, &st)) {
        fprintf(stderr, "dsv4d generate: %s\n", err_msg());
        goto out;
    }
    m->numerics = strcmp(numerics, "exact") ? DSV4_NUMERICS_MODEL : DSV4_NUMERICS_EXACT;
    logits = malloc(sizeof(float) * (size_t)m->cfg.vocab_size);
    if (!logits) {
        fprintf(stderr, "dsv4d generate: out of memory\n");
        goto out;
    }
    struct dsv4_batch_seq b = {st, ids, n, 0};
    for (long i = 0; i < max_tokens; i++) {
        if (dsv4_forward(m, &b, 1, logits, NULL)) {
            fprintf(stderr, "\ndsv4d generate: %s\n", err_msg());
            goto out;
        }
        int32_t tok = argmax(logits, m->cfg.vocab_size);
        printf("%s%d", i ? " " : "", tok);
        fflush(stdout);
        if (tok == m->cfg.eos_token_id)
            break;
        ids[0] = tok;
        b.tokens = ids;
        b.n = 1;
    }
    printf("\n");
    status = 0;
out:
    free(logits);
    free(ids);
    dsv4_seq_state_free(st);
    dsv4_model_free(m);
    return status;
}
