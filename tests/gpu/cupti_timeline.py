#!/usr/bin/env python3
"""Where a CUDA graph replay's time goes, from a cupti_trace.c trace (see its header).

    python3 tests/gpu/cupti_timeline.py trace.tsv [--graph ID] [--last N] [--list]

Takes the graph replayed most often (or --graph), its last N replays (default 16), and per kernel
of the replay (in launch order: the graph's node order is the same every replay) reports the
median of
  dur   its own run time (start to end)
  adv   how far it moved the replay's end: its end minus the latest end of every kernel that
        started before it (0 if it ended inside another's run); the advances sum to the span.
Then the same summed by kernel name. Names are demangled with c++filt where it exists.
"""
import argparse
import collections
import shutil
import statistics
import subprocess
import sys


def demangle(names):
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short(name, width):
    """The demangled name without its return type and argument list, at most width long."""
    base = name.replace("(anonymous namespace)::", "").replace("void ", "").split("(")[0]
    return base if len(base) <= width else base[: width - 1] + "~"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--graph", type=int, default=None)
    ap.add_argument("--last", type=int, default=16)
    ap.add_argument("--list", action="store_true", help="every kernel of the replay, in order")
    ap.add_argument("--width", type=int, default=60)
    a = ap.parse_args()

    replays = collections.defaultdict(list)  # (graph, correlation) -> kernels
    with open(a.trace) as f:
        for line in f:
            p = line.split(" ", 9)
            if len(p) < 10:
                continue
            s, e, stream, graph, corr = (int(x) for x in p[:5])
            if graph == 0:
                continue
            replays[(graph, corr)].append((s, e, stream, tuple(int(x) for x in p[5:9]), p[9].strip()))
    if not replays:
        sys.exit("no graph replays in the trace")
    per_graph = collections.Counter(g for g, _ in replays)
    graph = a.graph if a.graph is not None else per_graph.most_common(1)[0][0]
    reps = sorted((k for k in replays if k[0] == graph), key=lambda k: min(r[0] for r in replays[k]))
    reps = reps[-a.last:]
    print(f"graph {graph}: {per_graph[graph]} replays, using the last {len(reps)}; "
          f"graphs seen: {dict(per_graph)}")

    rows = None
    spans = []
    for k in reps:
        ks = sorted(replays[k], key=lambda r: (r[0], r[1]))
        t0 = ks[0][0]
        spans.append(max(r[1] for r in ks) - t0)
        latest = t0
        cur = []
        for s, e, stream, grid, name in ks:
            adv = max(0, e - latest)
            latest = max(latest, e)
            cur.append((name, stream, grid, s - t0, e - s, adv))
        if rows is None:
            rows = [[c] for c in cur]
        elif len(cur) == len(rows):
            for r, c in zip(rows, cur):
                r.append(c)
    names = demangle(sorted({r[0][0] for r in rows}))
    med = lambda v: statistics.median(v) / 1000.0  # us
    span = med(spans)
    print(f"span median {span:.1f} us over {len(spans)} replays, {len(rows)} kernels each")

    if a.list:
        print(f"{'#':>4} {'start':>8} {'dur':>7} {'adv':>7} {'strm':>4} {'grid':>14} name")
        for i, r in enumerate(rows):
            name, stream, grid = r[0][0], r[0][1], r[0][2]
            print(f"{i:4d} {med([c[3] for c in r]):8.1f} {med([c[4] for c in r]):7.1f} "
                  f"{med([c[5] for c in r]):7.1f} {stream:4d} {'x'.join(map(str, grid[:3])):>14} "
                  f"{short(names[name], a.width)}")

    agg = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for r in rows:
        g = agg[short(names[r[0][0]], a.width)]
        g[0] += 1
        g[1] += med([c[4] for c in r])
        g[2] += med([c[5] for c in r])
    print(f"\n{'count':>5} {'sum dur':>9} {'sum adv':>9} {'adv %':>6} name")
    for n, (cnt, d, adv) in sorted(agg.items(), key=lambda kv: -kv[1][2]):
        print(f"{cnt:5d} {d:9.1f} {adv:9.1f} {100 * adv / span:6.1f} {n}")


if __name__ == "__main__":
    main()
