/*
 * schedule.h - the per-layer architecture schedule of DSV4 (the seed's build_schedule /
 * validate_schedule, in C). The schedule is data: the model walk reads it, the cache manager
 * sizes state from it, and `dsv4d schedule` prints it.
 *
 * Per layer: attention type (SWA / CSA / HCA, from compress_ratios, which is the truth), FFN type
 * (MoE in every layer), router mode (hash for layers < num_hash_layers; MTP layers never hash),
 * and which RoPE table the layer uses (SWA: rope_theta without YaRN; compressed: YaRN'd
 * compress_rope_theta).
 */
#ifndef DSV4_SCHEDULE_H
#define DSV4_SCHEDULE_H

#include "engine/config.h"

enum dsv4_attn { DSV4_ATTN_SWA = 0, DSV4_ATTN_CSA = 4, DSV4_ATTN_HCA = 128 };
enum dsv4_router { DSV4_ROUTER_HASH, DSV4_ROUTER_DENSE };
enum dsv4_variant { DSV4_VARIANT_FLASH, DSV4_VARIANT_PRO };
enum dsv4_rope_table { DSV4_ROPE_MAIN, DSV4_ROPE_COMPRESS };

struct dsv4_layer_spec {
    int index;          /* 0..n_layers-1 main layers; n_layers.. MTP layers */
    int is_mtp;
    enum dsv4_attn attn;
    int ratio;          /* 0, 4 or 128 */
    enum dsv4_router router;
    enum dsv4_rope_table rope;
};

struct dsv4_schedule {
    enum dsv4_variant variant;
    int n_layers, n_mtp;
    struct dsv4_layer_spec layers[DSV4_MAX_LAYERS]; /* n_layers + n_mtp */
};

/*
 * Build and validate. The variant is read from compress_ratios[0] (0: Flash, 128: Pro); the
 * rest must follow that variant's pattern (layers 0-1 special, then CSA/HCA alternating from
 * CSA at layer 2) or ERR_CONFIG names the first layer that disagrees. Any number of main layers
 * is valid (a truncated model, e.g. `export-tiny --shape flash --layers 8`, is a prefix).
 */
int dsv4_schedule_build(struct dsv4_schedule *s, const struct dsv4_config *cfg);

const char *dsv4_attn_name(enum dsv4_attn a);   /* "swa" | "csa" | "hca" */
const char *dsv4_router_name(enum dsv4_router r); /* "hash" | "dense" */

#endif
