#!/usr/bin/env python3
"""engine_summary.py OUTDIR - the tables of tests/gpu/ENGINE_RESULTS.md from one run of
tests/gpu/run_flash_device.sh.

Reads OUTDIR/bench.jsonl (bench_gpu_engine --json lines), OUTDIR/stream-<c>.json
(deploy/load/stream_bench.py --json-out) and OUTDIR/phases.txt; prints Markdown. Missing files
give missing tables, never an error. Standard library only.
"""
import glob
import json
import os
import re
import sys


def load_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    return rows


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def engine_tables(rows):
    meta = next((r for r in rows if r.get("kind") == "meta"), None)
    copy = next((r for r in rows if r.get("kind") == "copy"), None)
    out = []
    if meta:
        out.append(f"GPU: {meta['gpu']}; model {meta['model']}: {meta['layers']} layers "
                   f"({meta['schedule']}), d {meta['hidden']}, E {meta['experts']}, "
                   f"K {meta['experts_per_token']}, {meta['numerics']} numerics; load: open "
                   f"{meta['open_s']:.1f} s + backend {meta['backend_s']:.1f} s; weights "
                   f"{meta['weights_device_bytes'] / 2**30:.2f} GiB as stored; KV entry "
                   f"{meta['kv_entry_bytes']:.0f} B, indexer key {meta['idx_key_bytes']:.0f} B "
                   f"({meta['kv_source']})")
    if copy:
        out.append(f"D2D copy: {copy['rw_gbps']:.0f} GB/s read+write ({copy['read_gbps']:.0f} "
                   f"GB/s read) over {copy['bytes'] / 2**30:.2f} GiB")
    pre = [r for r in rows if r.get("kind") == "prefill"]
    if pre:
        out.append(table(["prefill tokens", "chunk", "time to first logits (ms)", "tokens/s"],
                         [[r["tokens"], r["chunk"], f"{r['ttft_ms']:.1f}", f"{r['tok_s']:.0f}"]
                          for r in pre]))
    dec = [r for r in rows if r.get("kind") == "decode"]
    if dec:
        out.append(table(
            ["batch", "pos", "step ms (median)", "step ms (mean)", "tokens/s", "weights MB",
             "experts/layer hash, dense (est.)", "experts MB", "KV MB", "bytes/step MB",
             "floor ms", "fraction of floor", "logits", "fill"],
            [[r["batch"], f"{r['pos_mean']:.0f}", f"{r['step_ms_median']:.3f}",
              f"{r['step_ms_mean']:.3f}", f"{r['tok_s']:.1f}", f"{r['bytes_weights'] / 1e6:.0f}",
              f"{r['experts_per_hash_layer']:.1f}, {r['experts_per_dense_layer_est']:.1f}",
              f"{r['bytes_experts'] / 1e6:.0f}", f"{r['bytes_kv'] / 1e6:.1f}",
              f"{r['bytes_total'] / 1e6:.0f}", f"{r['floor_ms']:.3f}",
              f"{100 * r['fraction']:.1f}%", r.get("logits", ""), r["fill"]] for r in dec]))
    skipped = [r["what"] for r in rows if r.get("kind") == "skipped"]
    if skipped:
        out.append("skipped (time budget): " + ", ".join(skipped))
    return out


def stream_table(outdir):
    rows = []
    files = glob.glob(os.path.join(outdir, "stream-*.json"))
    for path in sorted(files, key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)) or 0)):
        with open(path) as f:
            r = json.load(f)
        t, i, p = r["ttft_ms"], r["itl_ms"], r["tpot_ms"]
        rows.append([r["max_concurrency"], f"{r['completed']}/{r['num_prompts']}",
                     f"{r['output_throughput']:.1f}", f"{t['median']:.1f}", f"{t.get('p99', 0):.1f}",
                     f"{i['median']:.2f}", f"{i.get('p99', 0):.2f}", f"{p['median']:.2f}",
                     f"{r['duration_s']:.1f}"])
    if not rows:
        return []
    return [table(["streams", "completed", "output tok/s", "TTFT median ms", "TTFT p99 ms",
                   "ITL median ms", "ITL p99 ms", "TPOT median ms", "duration s"], rows)]


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().split("\n")[0], file=sys.stderr)
        return 2
    d = sys.argv[1]
    parts = []
    for name, title in (("bench.jsonl", "Engine (bench_gpu_engine)"),
                        ("bench-tiny.txt", "Smoke: builtin:tiny-flash")):
        t = engine_tables(load_jsonl(os.path.join(d, name)))
        if t:
            parts.append(f"### {title}\n\n" + "\n\n".join(t))
    s = stream_table(d)
    if s:
        parts.append("### HTTP (dsv4d serve --device cuda + stream_bench.py)\n\n" + s[0])
    ph = os.path.join(d, "phases.txt")
    if os.path.exists(ph):
        with open(ph) as f:
            parts.append("### Phases\n\n```\n" + f.read().rstrip() + "\n```")
    print("\n\n".join(parts) if parts else "no results under " + d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
