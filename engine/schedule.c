/* schedule.c - build and validate the DSV4 layer schedule (see schedule.h). */
#include "engine/schedule.h"

#include <string.h>

#include "engine/err.h"

const char *dsv4_attn_name(enum dsv4_attn a)
{
    return a == DSV4_ATTN_SWA ? "swa" : a == DSV4_ATTN_CSA ? "csa" : "hca";
}

const char *dsv4_router_name(enum dsv4_router r)
{
    return r == DSV4_ROUTER_HASH ? "hash" : "dense";
}

/* The attention type that the variant's pattern puts at main layer i. */
static enum dsv4_attn expected_attn(enum dsv4_variant v, int i)
{
    if (i < 2)
        return v == DSV4_VARIANT_FLASH ? DSV4_ATTN_SWA : DSV4_ATTN_HCA;
    return (i - 2) % 2 == 0 ? DSV4_ATTN_CSA : DSV4_ATTN_HCA;
}

int dsv4_schedule_build(struct dsv4_schedule *s, const struct dsv4_config *cfg)
{
    memset(s, 0, sizeof *s);
    s->n_layers = cfg->n_layers;
    s->n_mtp = cfg->n_mtp;
    if (cfg->compress_ratios[0] == 0)
        s->variant = DSV4_VARIANT_FLASH;
    else if (cfg->compress_ratios[0] == 128)
        s->variant = DSV4_VARIANT_PRO;
    else
        return err_setf(ERR_CONFIG,
                        "schedule: compress_ratios[0] = %d matches neither Flash (0, SWA) nor Pro "
                        "(128, HCA)",
                        cfg->compress_ratios[0]);
    for (int i = 0; i < cfg->n_layers + cfg->n_mtp; i++) {
        struct dsv4_layer_spec *l = &s->layers[i];
        l->index = i;
        l->is_mtp = i >= cfg->n_layers;
        l->ratio = cfg->compress_ratios[i];
        l->attn = (enum dsv4_attn)l->ratio;
        /* hash = layer_id < n_hash_layers; the MTP layer's id is n_layers, so never hash */
        l->router = (!l->is_mtp && i < cfg->n_hash_layers) ? DSV4_ROUTER_HASH : DSV4_ROUTER_DENSE;
        l->rope = l->ratio ? DSV4_ROPE_COMPRESS : DSV4_ROPE_MAIN;
        if (l->is_mtp) {
            if (l->attn != DSV4_ATTN_SWA)
                return err_setf(ERR_CONFIG, "schedule: MTP layer %d must be swa, config says %s", i,
                                dsv4_attn_name(l->attn));
            continue;
        }
        /* any number of layers is accepted: a truncated model follows a prefix of the pattern */
        enum dsv4_attn want = expected_attn(s->variant, i);
        if (l->attn != want)
            return err_setf(
                ERR_CONFIG,
                "schedule: layer %d is %s in compress_ratios but the %s pattern (%s, "
                "then csa, hca alternating; any number of layers of it) puts %s there "
                "(a wrong schedule is silent garbage; refusing)",
                i, dsv4_attn_name(l->attn), s->variant == DSV4_VARIANT_FLASH ? "Flash" : "Pro",
                s->variant == DSV4_VARIANT_FLASH ? "swa swa" : "hca hca", dsv4_attn_name(want));
    }
    return 0;
}
