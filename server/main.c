/*
 * main.c - the dsv4d binary: dispatch to a subcommand. The only place that exits.
 */
#include <stdio.h>
#include <string.h>

#include "server/cli.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsv4d [SUBCOMMAND] [OPTIONS]\n"
            "\n"
            "DeepSeek-V4 (Flash, Pro) inference server.\n"
            "\n"
            "subcommands:\n"
            "  serve         run the OpenAI-compatible HTTP server (the default)\n"
            "  schedule      print a model's layer schedule (reads only config.json)\n"
            "  export-tiny   write a built-in tiny model as a checkpoint directory\n"
            "  generate      greedy generation from token ids, on the CPU engine\n"
            "  tokenize      text lines on stdin -> token ids\n"
            "  detokenize    token id lines on stdin -> text\n"
            "  chat-encode   an OpenAI chat request on stdin -> the DSV4 prompt\n"
            "\n"
            "MODEL is a checkpoint directory (Hugging Face layout) or builtin:tiny-flash /\n"
            "builtin:tiny-pro. Run `dsv4d SUBCOMMAND --help` for its options.\n");
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {
        {"serve", cli_serve},
        {"schedule", cli_schedule},
        {"export-tiny", cli_export_tiny},
        {"generate", cli_generate},
        {"tokenize", cli_tokenize},
        {"detokenize", cli_detokenize},
        {"chat-encode", cli_chat_encode},
    };
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
                      !strcmp(argv[1], "help"))) {
        usage(stdout);
        return 0;
    }
    if (argc < 2 || argv[1][0] == '-')
        return cli_serve(argc, argv); /* serve is the default; its options follow */
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(argv[1], cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "dsv4d: unknown subcommand \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
