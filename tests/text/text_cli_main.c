/* text_cli_main.c - a test driver exposing the text subcommands without the server binary:
 * text_cli tokenize|detokenize|chat-encode ARGS... (same arguments as dsv4d). */
#include <stdio.h>
#include <string.h>

#include "server/cli.h"

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: text_cli tokenize|detokenize|chat-encode ...\n");
        return 2;
    }
    if (strcmp(argv[1], "tokenize") == 0)
        return cli_tokenize(argc - 1, argv + 1);
    if (strcmp(argv[1], "detokenize") == 0)
        return cli_detokenize(argc - 1, argv + 1);
    if (strcmp(argv[1], "chat-encode") == 0)
        return cli_chat_encode(argc - 1, argv + 1);
    fprintf(stderr, "text_cli: unknown subcommand %s\n", argv[1]);
    return 2;
}
