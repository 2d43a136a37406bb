#!/usr/bin/env python3
"""sizing.py - memory needed to serve a DeepSeek-V4 checkpoint with dsv4d.

    python3 deploy/sizing.py flash|pro|CONFIG.json|CHECKPOINT_DIR [--max-model-len N]
                             [--max-num-seqs N] [--gpu-gib G] [--json]

Prints, from the model's config.json (or the published Flash / Pro configs built in here):
  - weight bytes as stored in the checkpoint (FP8 linears + 128x128 UE8M0 scales, MXFP4 experts,
    BF16 norms/embeddings, FP32 mHC/sink/ape/bias, I64 tid2eid), computed from the tensor shapes;
    for a checkpoint directory also the bytes actually on disk;
  - the compressed-KV cache per token and the fixed state per sequence, in two layouts:
      cpu  what the CPU engine allocates today (FP32 entries: engine/kvcache.c
           dsv4_kv_block_bytes / 128 and engine/model.c dsv4_seq_state_bytes);
      gpu  the GPU layout of the spec (FP8 "MODEL1" KV entries of 584 B, 132 B indexer keys,
           FP32 compressor state), what the CUDA backend is to print at start-up;
  - the weights on the GPU once the experts are converted to NVFP4 at load;
  - for --gpu-gib, how many sequences of --max-model-len fit next to those weights (activations,
    CUDA graphs and the runtime also take some GiB: leave a margin).

Standard library only. The shape formulas are checked against `dsv4d export-tiny` checkpoints by
deploy/check.sh (sum of the safetensors headers' tensor sizes must match exactly).
"""
import argparse
import json
import os
import struct
import sys

BLOCK_TOKENS = 128
GPU_KV_ENTRY = 584       # 448 E4M3 + 64 BF16 rope + 7 UE8M0 scales + 1 pad (spec section 8.2)
GPU_INDEXER_KEY = 132    # 128 FP8 + one FP32 scale

# The published configs (HF config.json of deepseek-ai/DeepSeek-V4-Flash and -Pro), only the
# keys used here.
_COMMON = {"vocab_size": 129280, "head_dim": 512, "qk_rope_head_dim": 64, "num_key_value_heads": 1,
           "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128,
           "n_shared_experts": 1, "num_experts_per_tok": 6, "num_hash_layers": 3,
           "num_nextn_predict_layers": 1, "hc_mult": 4, "o_lora_rank": 1024,
           "max_position_embeddings": 1048576}
PUBLISHED = {
    "flash": dict(_COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
                  q_lora_rank=1024, o_groups=8, n_routed_experts=256, moe_intermediate_size=2048,
                  compress_ratios=[0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 42)] + [4, 0]),
    "pro": dict(_COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                q_lora_rank=1536, o_groups=16, n_routed_experts=384, moe_intermediate_size=3072,
                compress_ratios=[128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 60)] + [4, 0]),
}


def cdiv(a, b):
    return -(-a // b)


def fp8(out, inp):
    """An FP8 E4M3 linear with its 128x128 UE8M0 block scales."""
    return out * inp + cdiv(out, 128) * cdiv(inp, 128)


def mxfp4(out, inp):
    """An MXFP4 expert matrix: two E2M1 codes per byte + one UE8M0 scale per 32 inputs."""
    return out * (inp // 2) + out * (inp // 32)


def layer_bytes(c, ratio, hash_layer, mtp):
    d, nh, hd = c["hidden_size"], c["num_attention_heads"], c["head_dim"]
    dc, g, dg = c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    ih, idim = c["index_n_heads"], c["index_head_dim"]
    E, I, ns, K = (c["n_routed_experts"], c["moe_intermediate_size"], c["n_shared_experts"],
                   c["num_experts_per_tok"])
    hc = c["hc_mult"]
    b = 2 * d * 2                                          # attn_norm, ffn_norm (BF16)
    b += 2 * ((2 + hc) * hc * hc * d * 4 + (2 + hc) * hc * 4 + 3 * 4)  # hc_attn_*, hc_ffn_*
    b += fp8(dc, d) + dc * 2 + fp8(nh * hd, dc)            # wq_a, q_norm, wq_b
    b += fp8(hd, d) + hd * 2                               # wkv, kv_norm
    b += fp8(g * dg, nh * hd // g) + fp8(d, g * dg)        # wo_a, wo_b
    b += nh * 4                                            # attn_sink
    if ratio == 4:                                         # CSA: overlapping compressor + indexer
        b += 2 * (2 * hd * d * 2) + 4 * 2 * hd * 4 + hd * 2
        b += fp8(ih * idim, dc) + ih * d * 2
        b += 2 * (2 * idim * d * 2) + 4 * 2 * idim * 4 + idim * 2
    elif ratio:                                            # HCA
        b += 2 * (hd * d * 2) + ratio * hd * 4 + hd * 2
    b += E * d * 2                                         # gate.weight
    b += c["vocab_size"] * K * 8 if hash_layer else E * 4  # tid2eid (I64) or bias (F32)
    b += E * (2 * mxfp4(I, d) + mxfp4(d, I))               # routed experts w1, w3, w2
    b += 2 * fp8(I * ns, d) + fp8(d, I * ns)               # shared expert
    if mtp:
        b += 2 * fp8(d, d) + 3 * d * 2                     # e_proj, h_proj, enorm/hnorm/norm
        b += hc * hc * d * 4 + hc * 4 + 4                  # hc_head_*
    return b


def nvfp4_extra_bytes(c):
    """Extra bytes once the routed experts are converted from MXFP4 (a UE8M0 scale per 32) to
    NVFP4 (an E4M3 scale per 16, plus an FP32 scale per matrix) at load, as the GPU backend plans."""
    d, E, I = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    n = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 1)
    return n * E * 3 * (d * I // 32 + 4)


def weight_bytes(c):
    d, V, hc = c["hidden_size"], c["vocab_size"], c["hc_mult"]
    L, n_mtp = c["num_hidden_layers"], c.get("num_nextn_predict_layers", 1)
    r = c["compress_ratios"]
    total = 2 * V * d * 2 + d * 2 + hc * hc * d * 4 + hc * 4 + 4  # embed, head, norm, hc_head
    for i in range(L + n_mtp):
        total += layer_bytes(c, r[i], i < L and i < c["num_hash_layers"], i >= L)
    return total


def _comp_state_floats(ratio, D):
    coff = 2 if ratio == 4 else 1
    return coff * ratio * coff * D


def cache(c):
    """(cpu_per_token, cpu_per_seq, gpu_per_token, gpu_per_seq) in bytes."""
    hd, idim, win = c["head_dim"], c["index_head_dim"], c["sliding_window"]
    n = c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 1)
    block_floats, state_floats, comp_floats = 0, 0, 0
    gpu_tok = 0.0
    for ratio in c["compress_ratios"][:n]:
        state_floats += win * hd
        if ratio:
            block_floats += (BLOCK_TOKENS // ratio) * hd
            comp_floats += 2 * _comp_state_floats(ratio, hd)
            gpu_tok += GPU_KV_ENTRY / ratio
        if ratio == 4:
            block_floats += (BLOCK_TOKENS // ratio) * idim
            comp_floats += 2 * _comp_state_floats(ratio, idim)
            gpu_tok += GPU_INDEXER_KEY / ratio
    cpu_tok = block_floats * 4 / BLOCK_TOKENS
    cpu_seq = (state_floats + comp_floats) * 4
    gpu_seq = n * win * GPU_KV_ENTRY + comp_floats * 4
    return cpu_tok, cpu_seq, gpu_tok, gpu_seq


def safetensors_data_bytes(path):
    """Sum of the tensors' byte sizes in a checkpoint directory's safetensors headers."""
    total = 0
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(path, name), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            hdr = json.loads(f.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                total += v["data_offsets"][1] - v["data_offsets"][0]
    return total


def load(spec):
    if spec in PUBLISHED:
        return spec, PUBLISHED[spec], None
    path = spec
    ckpt = None
    if os.path.isdir(spec):
        ckpt, path = spec, os.path.join(spec, "config.json")
    with open(path) as f:
        return os.path.basename(os.path.normpath(spec)), json.load(f), ckpt


def gib(x):
    return x / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="flash, pro, a config.json or a checkpoint directory")
    ap.add_argument("--max-model-len", type=int, default=65536)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gpu-gib", type=float, default=0, help="GPU memory, GiB (e.g. 79.6 H100, 139.8 H200)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="for a checkpoint directory: exit 1 unless the formula equals the "
                         "tensor bytes in its safetensors headers")
    a = ap.parse_args(argv)
    name, c, ckpt = load(a.model)
    w = weight_bytes(c)
    if a.check:
        if not ckpt:
            ap.error("--check needs a checkpoint directory")
        have = safetensors_data_bytes(ckpt)
        print(f"{name}: formula {w} B, checkpoint tensors {have} B: "
              f"{'equal' if w == have else 'DIFFERENT'}")
        return 0 if w == have else 1
    cpu_tok, cpu_seq, gpu_tok, gpu_seq = cache(c)
    T = min(a.max_model_len, c.get("max_position_embeddings", a.max_model_len))
    blocks = cdiv(T, BLOCK_TOKENS)
    out = {"model": name, "weight_bytes": w, "gpu_weight_bytes_nvfp4": w + nvfp4_extra_bytes(c),
           "max_model_len": T,
           "cpu": {"cache_bytes_per_token": cpu_tok, "state_bytes_per_seq": cpu_seq,
                   "bytes_per_full_seq": cpu_seq + blocks * BLOCK_TOKENS * cpu_tok},
           "gpu": {"cache_bytes_per_token": gpu_tok, "state_bytes_per_seq": gpu_seq,
                   "bytes_per_full_seq": gpu_seq + blocks * BLOCK_TOKENS * gpu_tok}}
    if ckpt:
        out["checkpoint_tensor_bytes"] = safetensors_data_bytes(ckpt)
    if a.gpu_gib:
        free = a.gpu_gib * 2**30 - out["gpu_weight_bytes_nvfp4"]
        out["gpu"]["fits_weights"] = free > 0
        out["gpu"]["full_length_seqs_that_fit"] = max(0, int(free // out["gpu"]["bytes_per_full_seq"]))
    if a.json:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    print(f"{name}: weights {w / 1e9:.2f} GB ({gib(w):.2f} GiB) as stored (FP8 + MXFP4 + BF16)")
    wg = out["gpu_weight_bytes_nvfp4"]
    print(f"  on the GPU with NVFP4 experts: {wg / 1e9:.2f} GB ({gib(wg):.2f} GiB)")
    if ckpt:
        print(f"  checkpoint tensors on disk: {out['checkpoint_tensor_bytes'] / 1e9:.2f} GB")
    for k, label in (("gpu", "GPU layout (FP8 KV, spec 8.2)"), ("cpu", "CPU engine today (FP32)")):
        o = out[k]
        print(f"  {label}: {o['cache_bytes_per_token']:.1f} B/token compressed KV, "
              f"{o['state_bytes_per_seq'] / 2**20:.2f} MiB fixed state per sequence; "
              f"one {T}-token sequence {o['bytes_per_full_seq'] / 2**20:.1f} MiB, "
              f"{a.max_num_seqs} of them {gib(o['bytes_per_full_seq'] * a.max_num_seqs):.2f} GiB")
    if a.gpu_gib:
        o = out["gpu"]
        if not o["fits_weights"]:
            print(f"  {a.gpu_gib} GiB GPU: the weights alone do not fit (need {gib(wg):.1f} GiB)")
        else:
            print(f"  {a.gpu_gib} GiB GPU: {gib(a.gpu_gib * 2**30 - wg):.1f} GiB left after the weights: "
                  f"{o['full_length_seqs_that_fit']} sequences of {T} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
