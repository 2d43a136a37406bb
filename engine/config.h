/*
 * config.h - the DeepSeek-V4 model configuration (Hugging Face config.json).
 *
 * dsv4_config_parse() reads the keys of spec §3.1 and checks them for presence, type, range and
 * consistency (e.g. len(compress_ratios) == num_hidden_layers + num_nextn_predict_layers). A
 * missing or inconsistent key is an ERR_CONFIG whose message names the key.
 *
 * THREAD SAFETY: a parsed config is immutable; share it freely.
 */
#ifndef DSV4_CONFIG_H
#define DSV4_CONFIG_H

#include <stddef.h>

#define DSV4_MAX_LAYERS 256

/* How a family of weights is stored. */
enum dsv4_wfmt {
    DSV4_WFMT_BF16 = 0,  /* plain BF16 (or F32) */
    DSV4_WFMT_FP8_BLOCK, /* F8_E4M3 + 128x128 block scales (UE8M0, or F32 in -Base checkpoints) */
    DSV4_WFMT_MXFP4,     /* packed E2M1 (I8 [out, in/2]) + UE8M0 scale per 32 inputs */
    DSV4_WFMT_NVFP4,     /* packed E2M1 + E4M3 scale per 16 inputs + FP32 per-matrix scale (ModelOpt
                          * weight/weight_scale/weight_scale_2, or compressed-tensors
                          * weight_packed/weight_scale/weight_global_scale) */
};

struct dsv4_config {
    int vocab_size;
    int hidden_size;       /* d */
    int n_layers;          /* num_hidden_layers (main layers, MTP excluded) */
    int n_mtp;             /* num_nextn_predict_layers */
    int n_heads;           /* num_attention_heads */
    int head_dim;          /* c = 512 */
    int rope_dim;          /* qk_rope_head_dim = 64 (trailing dims of each head) */
    int q_lora_rank;       /* d_c */
    int o_groups;          /* g */
    int o_lora_rank;       /* d_g */
    int sliding_window;    /* n_win = 128 */
    int compress_ratios[DSV4_MAX_LAYERS]; /* n_layers + n_mtp entries: 0 (SWA), 4 (CSA), 128 (HCA) */
    double rope_theta;          /* SWA layers (no YaRN) */
    double compress_rope_theta; /* compressed layers (with YaRN) */
    int yarn;                   /* rope_scaling.type == "yarn" */
    double yarn_factor;
    int yarn_original_max_pos;
    double yarn_beta_fast, yarn_beta_slow;
    long max_position_embeddings;
    int index_n_heads, index_head_dim, index_topk;
    int n_routed_experts, n_shared_experts, n_experts_per_tok;
    int moe_inter;              /* moe_intermediate_size */
    double routed_scaling_factor;
    double swiglu_limit;
    int n_hash_layers;
    int hc_mult, hc_sinkhorn_iters;
    double hc_eps, rms_norm_eps;
    int bos_token_id, eos_token_id;
    enum dsv4_wfmt linear_fmt;  /* from quantization_config: FP8_BLOCK, or BF16 when absent */
    enum dsv4_wfmt expert_fmt;  /* expert_dtype: "fp4" -> MXFP4, "nvfp4" -> NVFP4, "fp8" -> FP8_BLOCK,
                                 * else linear_fmt */
};

/* Parse config.json text (`len` bytes). `label` names the file in messages. */
int dsv4_config_parse(struct dsv4_config *cfg, const char *text, size_t len, const char *label);

/* Read and parse `<dir>/config.json`. */
int dsv4_config_load_dir(struct dsv4_config *cfg, const char *dir);

/* Serialise to config.json text in the official layout (malloc'd, caller frees). */
int dsv4_config_to_json(const struct dsv4_config *cfg, char **out);

#endif
