/*
 * cli.h - the dsv4d subcommands. Each takes the arguments after the subcommand name
 * (argv[0] is the subcommand) and returns the process exit status; only main.c exits.
 */
#ifndef DSV4_CLI_H
#define DSV4_CLI_H

int cli_serve(int argc, char **argv);
int cli_schedule(int argc, char **argv);
int cli_export_tiny(int argc, char **argv);
int cli_generate(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_detokenize(int argc, char **argv);
int cli_chat_encode(int argc, char **argv);

#endif
