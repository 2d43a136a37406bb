/*
 * tiny.h - the built-in tiny DSV4 models (builtin:tiny-flash, builtin:tiny-pro).
 *
 * Deterministic from a fixed seed: the real vocabulary (129280, so the real tokenizer and chat
 * format apply), small widths that respect the storage block sizes, 6 main layers (+1 MTP) so
 * SWA (flash), CSA, HCA, hash and dense routing all occur, a handful of experts, an index_topk
 * small enough that the indexer selects, and every tensor in its official storage format (FP8
 * block-scaled linears, MXFP4 experts, BF16 norms/embeddings/compressor projections, FP32
 * mHC/sink/ape/bias, I64 tid2eid with distinct experts per row).
 *
 * The built-in model is the same safetensors bytes as the exported one, parsed by the same
 * reader, so `export-tiny` + load gives bit-identical results to `builtin:`.
 */
#ifndef DSV4_TINY_H
#define DSV4_TINY_H

#include "engine/config.h"
#include "engine/safetensors.h"
#include "engine/schedule.h"

/* The tiny config of a variant. */
void dsv4_tiny_config(struct dsv4_config *c, enum dsv4_variant v);

/*
 * Build a synthetic checkpoint for any config (random weights drawn and stored the same way as
 * the tiny models'; used by benchmarks at real widths). Caller frees with st_set_free.
 */
int dsv4_synth_build(const struct dsv4_config *cfg, const char *label, struct st_set **out);

/* Build the tiny checkpoint in memory as a safetensors set (caller frees with st_set_free). */
int dsv4_tiny_build(enum dsv4_variant v, struct dsv4_config *cfg, struct st_set **out);

/*
 * Write the tiny checkpoint to `dir` (created if missing) in the official layout: config.json,
 * two shards model-0000{1,2}-of-00002.safetensors and model.safetensors.index.json.
 */
int dsv4_tiny_export(const char *dir, enum dsv4_variant v);

/* Parse "flash"/"pro"; returns 0 or ERR_INVAL. */
int dsv4_variant_parse(const char *s, enum dsv4_variant *v);

#endif
