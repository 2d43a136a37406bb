#!/usr/bin/env python3
"""Reference logits for the tiny DSV4 models from Hugging Face transformers.

Loads a checkpoint directory in the official DeepSeek-V4 layout (as `dsv4d export-tiny` writes
it) into transformers' DeepseekV4ForCausalLM in float32. The stored formats are dequantised here,
independently of dsv4d's C code: FP8 E4M3 with 128x128 UE8M0 block scales, MXFP4 experts (two
E2M1 codes per byte, low nibble first, a UE8M0 scale per 32 inputs), BF16 and FP32 tensors.

Writes <out>/<name>.json (prompt, positions, greedy continuation, figures) and <out>/<name>.bin
(float32 little-endian logits, one row of vocab_size per position in `positions`).

The prompt is long enough that the 128-token window wraps, HCA layers have two compressed
entries and the CSA indexer selects fewer entries than exist. The greedy continuation is computed
by full-sequence forwards (transformers' incremental decode does not reproduce its own full
forward for DSV4; spec §12.1).

Usage: make_fixtures.py CKPT_DIR OUT_DIR NAME   (needs torch, transformers >= 5.8, safetensors)
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

PROMPT_LEN = 300
POSITIONS = [0, 1, 127, 128, 200, 255, 256, 299]
N_GREEDY = 32


def e4m3_table():
    t = np.zeros(256, np.float64)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        if e == 15 and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        t[b] = -v if s else v
    return t


E4M3 = e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def ue8m0(a):
    return np.exp2(a.astype(np.float64) - 127.0)


def raw_bytes(a):
    return a.view(np.uint8) if a.dtype != np.uint8 else a


def load_tensors(ckpt):
    """All tensors of the checkpoint as numpy arrays (bf16/f8 come back as raw integer views)."""
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else \
        sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    out = {}
    for f in files:
        # safetensors.numpy cannot represent bf16/f8; read through torch and reinterpret
        from safetensors.torch import load_file as tload
        for k, v in tload(os.path.join(ckpt, f)).items():
            if v.dtype == torch.bfloat16:
                out[k] = v.float().numpy().astype(np.float64)
            elif v.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
                out[k] = ("raw", v.view(torch.uint8).numpy())
            else:
                out[k] = v.numpy()
    return out


def dequant(t, prefix, fmt):
    w = t[prefix + ".weight"]
    if fmt == "fp8":
        q = E4M3[w[1]]
        s = t[prefix + ".scale"]
        s = ue8m0(s[1]) if isinstance(s, tuple) else s.astype(np.float64)
        rows, cols = q.shape
        s = np.repeat(np.repeat(s, 128, 0), 128, 1)[:rows, :cols]
        return q * s
    if fmt == "fp4":
        b = raw_bytes(w)
        codes = np.stack([b & 15, b >> 4], -1).reshape(b.shape[0], b.shape[1] * 2)
        s = ue8m0(t[prefix + ".scale"][1])
        return E2M1[codes] * np.repeat(s, 32, 1)
    return w.astype(np.float64)


def hf_state_dict(t, cfg):
    fp8 = "fp8" if cfg.get("quantization_config") else "bf16"
    expert = {"fp4": "fp4", "fp8": "fp8"}.get(cfg.get("expert_dtype"), fp8)
    sd = {}
    T = lambda a: torch.tensor(np.asarray(a, np.float64), dtype=torch.float32)
    sd["model.embed_tokens.weight"] = T(t["embed.weight"])
    sd["lm_head.weight"] = T(dequant(t, "head", "bf16"))
    sd["model.norm.weight"] = T(t["norm.weight"])
    sd["model.hc_head.hc_fn"] = T(t["hc_head_fn"])
    sd["model.hc_head.hc_base"] = T(t["hc_head_base"])
    sd["model.hc_head.hc_scale"] = T(t["hc_head_scale"])
    E = cfg["n_routed_experts"]
    for i in range(cfg["num_hidden_layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        sd[q + "input_layernorm.weight"] = T(t[p + "attn_norm.weight"])
        sd[q + "post_attention_layernorm.weight"] = T(t[p + "ffn_norm.weight"])
        for a, b in (("hc_attn", "attn_hc"), ("hc_ffn", "ffn_hc")):
            for k in ("fn", "base", "scale"):
                sd[q + f"{b}.{k}"] = T(t[p + f"{a}_{k}"])
        a, s = p + "attn.", q + "self_attn."
        for src, dst in (("wq_a", "q_a_proj"), ("wq_b", "q_b_proj"), ("wkv", "kv_proj"),
                         ("wo_a", "o_a_proj"), ("wo_b", "o_b_proj")):
            sd[s + dst + ".weight"] = T(dequant(t, a + src, fp8))
        sd[s + "q_a_norm.weight"] = T(t[a + "q_norm.weight"])
        sd[s + "kv_norm.weight"] = T(t[a + "kv_norm.weight"])
        sd[s + "sinks"] = T(t[a + "attn_sink"])
        ratio = cfg["compress_ratios"][i]
        if ratio:
            c, cd = a + "compressor.", s + "compressor."
            sd[cd + "kv_proj.weight"] = T(t[c + "wkv.weight"])
            sd[cd + "gate_proj.weight"] = T(t[c + "wgate.weight"])
            sd[cd + "position_bias"] = T(t[c + "ape"])
            sd[cd + "kv_norm.weight"] = T(t[c + "norm.weight"])
        if ratio == 4:
            x, xd = a + "indexer.", s + "compressor.indexer."
            sd[xd + "kv_proj.weight"] = T(t[x + "compressor.wkv.weight"])
            sd[xd + "gate_proj.weight"] = T(t[x + "compressor.wgate.weight"])
            sd[xd + "position_bias"] = T(t[x + "compressor.ape"])
            sd[xd + "kv_norm.weight"] = T(t[x + "compressor.norm.weight"])
            sd[xd + "q_b_proj.weight"] = T(dequant(t, x + "wq_b", fp8))
            sd[xd + "scorer.weights_proj.weight"] = T(t[x + "weights_proj.weight"])
        f, m = p + "ffn.", q + "mlp."
        sd[m + "gate.weight"] = T(t[f + "gate.weight"])
        if i < cfg["num_hash_layers"]:
            sd[m + "gate.tid2eid"] = torch.tensor(t[f + "gate.tid2eid"].astype(np.int64))
        else:
            sd[m + "gate.e_score_correction_bias"] = T(t[f + "gate.bias"])
        gu, dn = [], []
        for e in range(E):
            ep = f + f"experts.{e}."
            gu.append(np.concatenate([dequant(t, ep + "w1", expert), dequant(t, ep + "w3", expert)], 0))
            dn.append(dequant(t, ep + "w2", expert))
        sd[m + "experts.gate_up_proj"] = T(np.stack(gu))
        sd[m + "experts.down_proj"] = T(np.stack(dn))
        for src, dst in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sd[m + f"shared_experts.{dst}.weight"] = T(dequant(t, f + "shared_experts." + src, fp8))
    return sd


def main():
    ckpt, out_dir, name = sys.argv[1:4]
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    hf_cfg = DeepseekV4Config.from_pretrained(ckpt)
    hf_cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(hf_cfg).to(torch.float32).eval()
    sd = hf_state_dict(load_tensors(ckpt), cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing[:8]} unexpected {unexpected[:8]}")

    rng = np.random.RandomState(20261126)
    prompt = [0] + rng.randint(2, cfg["vocab_size"], PROMPT_LEN - 1).tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(input_ids=ids, use_cache=False).logits[0].double().numpy()
        rows = logits[POSITIONS]
        seq = list(prompt)
        for _ in range(N_GREEDY):
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(lg)))
    greedy = seq[PROMPT_LEN:]
    os.makedirs(out_dir, exist_ok=True)
    rows.astype("<f4").tofile(os.path.join(out_dir, name + ".bin"))
    top2 = np.sort(rows, axis=1)[:, -2:]
    meta = {
        "checkpoint": f"dsv4d export-tiny --variant {name.split('-')[-1]}",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "vocab_size": cfg["vocab_size"],
        "prompt": prompt,
        "positions": POSITIONS,
        "greedy": greedy,
        "max_abs_logit": float(np.abs(rows).max()),
        "min_top1_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
    }
    json.dump(meta, open(os.path.join(out_dir, name + ".json"), "w"), indent=1)
    print(f"{name}: greedy {greedy[:8]}... max|logit| {meta['max_abs_logit']:.4f} "
          f"min top-2 gap {meta['min_top1_top2_gap']:.5f}")


if __name__ == "__main__":
    main()
