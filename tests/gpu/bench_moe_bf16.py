"""BF16 baseline of the same MoE (issue 6): tokens grouped by expert, two torch._grouped_mm,
clamped SwiGLU, weighted index_add. Random weights and uniform top-6 routing; the routing itself
is not timed. Prints a markdown table (median of CUDA-event-timed runs)."""
import sys
import torch
import torch.nn.functional as F

K = 6
SHAPES = [("flash", 4096, 2048, 256), ("pro", 7168, 3072, 384)]
TS = [1, 4, 16, 64, 256, 1024, 8192]


def bench(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    quick = "--quick" in sys.argv
    out = [a for a in sys.argv[1:] if not a.startswith("--")]
    lines = [f"BF16 baseline (torch {torch.__version__}, {torch.cuda.get_device_name()})\n\n",
             "| shape | T | bf16 grouped_mm ms |\n|---|---|---|\n"]
    print("".join(lines), end="", flush=True)
    for name, d, I, E in SHAPES:
        w13 = torch.randn(E, 2 * I, d, device="cuda", dtype=torch.bfloat16).mul_(0.02)
        w2 = torch.randn(E, d, I, device="cuda", dtype=torch.bfloat16).mul_(0.02)
        b13, b2 = w13.transpose(1, 2), w2.transpose(1, 2)  # (E, d, 2I), (E, I, d), column-major
        for T in TS:
            if quick and T > 64:
                continue
            x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(T, E, device="cuda")
            topw, topi = logits.topk(K, dim=-1)
            topw = torch.softmax(topw, -1)

            def moe():
                flat = topi.flatten()
                order = flat.argsort(stable=True)
                tok = order // K
                counts = torch.bincount(flat, minlength=E)
                offs = counts.cumsum(0).to(torch.int32)
                h = torch._grouped_mm(x[tok], b13, offs=offs)
                g, u = h[:, :I].float().clamp(max=10.0), h[:, I:].float().clamp(-10.0, 10.0)
                a = (F.silu(g) * u * topw.flatten()[order, None]).to(torch.bfloat16)
                y = torch._grouped_mm(a, b2, offs=offs)
                return torch.zeros(T, d, device="cuda").index_add_(0, tok, y.float())

            ms = bench(moe, 10 if T >= 1024 else 30)
            line = f"| {name} | {T} | {ms:.3f} |\n"
            lines.append(line)
            print(line, end="", flush=True)
        del w13, w2, b13, b2
        torch.cuda.empty_cache()
    if out:
        with open(out[0], "w") as f:
            f.write("".join(lines))


if __name__ == "__main__":
    main()
