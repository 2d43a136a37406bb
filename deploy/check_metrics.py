#!/usr/bin/env python3
"""check_metrics.py - every metric that the deploy kit queries must be one dsv4d exports.

    python3 deploy/check_metrics.py [--source ROOT | --metrics-url URL | --metrics-file FILE]
                                    [FILE ...]

The exported names come from the server's source (server/metrics.c: the literal `dsv4d:` names
and the histograms rendered through hist(), each with _bucket/_sum/_count), from a live /metrics
page, or from a saved one. FILEs default to the Grafana dashboard and the autoscaling objects:
deploy/grafana/*.json (every target's expr and every templating query), deploy/k8s/hpa.yaml
(Pods/Object metric names through prometheus-adapter's dsv4d_<name> mapping),
deploy/k8s/autoscaling/*.yaml (KEDA queries and the adapter's series queries).

Checks: the dashboard parses as JSON and has the structure Grafana needs (uid, title, panels
with unique ids, gridPos, targets with refId and expr); every metric name in a PromQL expression
is exported (with the right suffix for histograms); every label used in a matcher or a by()
clause is one the server writes or one Prometheus adds (namespace, pod, ...). Standard library
only. Exit 0 when everything holds, 1 otherwise (each problem on a line).
"""
import argparse
import glob
import json
import os
import re
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMQL_WORDS = {
    # aggregations and keywords
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset",
    # functions
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs",
    "clamp", "clamp_min", "clamp_max", "ceil", "floor", "round", "exp", "ln", "log2", "log10",
    "sqrt", "scalar", "vector", "time", "timestamp", "sort", "sort_desc", "label_replace",
    "label_join", "absent", "absent_over_time", "changes", "resets", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "predict_linear", "histogram_count", "histogram_sum", "histogram_avg",
    "histogram_fraction",
    # Grafana template functions
    "label_values", "query_result", "metrics", "label_names",
}
# labels Prometheus / Kubernetes service discovery add to every scraped series
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "node", "service",
                 "endpoint", "__name__"}


def exported_from_source(root):
    """{name: type} from server/metrics.c."""
    path = os.path.join(root, "server", "metrics.c")
    with open(path) as f:
        src = f.read()
    names = {}
    for m in re.finditer(r"# TYPE dsv4d:([a-z_][a-z0-9_]*) (gauge|counter|histogram)", src):
        names[m.group(1)] = m.group(2)
    for m in re.finditer(r'\bhist\(\s*o\s*,\s*"([a-z_][a-z0-9_]*)"', src):
        names[m.group(1)] = "histogram"
    labels = set(re.findall(r'\b([a-z_]+)=\\"', src))
    if not names:
        raise SystemExit(f"check_metrics: no metric names found in {path}")
    return names, labels


def exported_from_text(text):
    """{name: type} and label names from a Prometheus text page."""
    names, labels = {}, set()
    for line in text.splitlines():
        m = re.match(r"# TYPE dsv4d:([a-zA-Z_][a-zA-Z0-9_]*) (\w+)", line)
        if m:
            names[m.group(1)] = m.group(2)
        elif line.startswith("dsv4d:"):
            m = re.match(r"dsv4d:([a-zA-Z_][a-zA-Z0-9_]*)(\{([^}]*)\})?", line)
            base = m.group(1)
            for suf in ("_bucket", "_sum", "_count"):
                if base.endswith(suf) and base[: -len(suf)] in names:
                    base = base[: -len(suf)]
            names.setdefault(base, "untyped")
            labels |= set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
    return names, labels


def series_names(exported):
    """Every series name a query may use, for {name: type}."""
    out = set()
    for n, t in exported.items():
        if t == "histogram":
            out |= {f"dsv4d:{n}_bucket", f"dsv4d:{n}_sum", f"dsv4d:{n}_count"}
        else:
            out.add(f"dsv4d:{n}")
    return out


_STR = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')


def promql_refs(expr):
    """(metric names, label names) an expression uses."""
    labels = set()
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", expr)
    if m:                                                       # Grafana: label_values(sel, label)
        metrics, lbls = promql_refs(m.group(1))
        return metrics, lbls | {m.group(2)}
    # label matchers inside {...}
    for m in re.finditer(r"\{([^{}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", _STR.sub('""', m.group(1))))
    # grouping clauses
    for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    body = _STR.sub('""', expr)
    body = re.sub(r"\{[^{}]*\}", "", body)                     # matchers
    body = re.sub(r"\[[^\]]*\]", "", body)                     # ranges
    body = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", body)
    body = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", body)  # Grafana variables
    metrics = set()
    for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", body):
        if tok in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", tok):
            continue
        if re.fullmatch(r"(?i)e\d*|inf|nan", tok):               # numbers like 1e9, Inf
            continue
        metrics.add(tok)
    return metrics, labels


def dashboard_exprs(path, problems):
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            problems.append(f"{path}: not JSON: {e}")
            return []
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in d:
            problems.append(f"{path}: no '{key}'")
    exprs, ids = [], set()
    panels = list(d.get("panels", []))
    for p in list(panels):
        panels.extend(p.get("panels", []))                      # collapsed rows
    for p in panels:
        pid = p.get("id")
        if pid in ids:
            problems.append(f"{path}: duplicate panel id {pid}")
        ids.add(pid)
        for key in ("type", "title", "gridPos"):
            if key not in p:
                problems.append(f"{path}: panel {pid}: no '{key}'")
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{path}: panel {pid} ({p.get('title')}): no targets")
        refs = set()
        for t in targets:
            if not t.get("expr"):
                problems.append(f"{path}: panel {pid}: a target without expr")
                continue
            if t.get("refId") in refs:
                problems.append(f"{path}: panel {pid}: duplicate refId {t.get('refId')}")
            refs.add(t.get("refId"))
            exprs.append((f"{path}: panel {pid} ({p.get('title')})", t["expr"]))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            exprs.append((f"{path}: variable {v.get('name')}", q))
    return exprs


def yaml_exprs(path):
    """PromQL-ish strings from the autoscaling objects (without needing a YAML parser)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            s = line.split("#", 1)[0] if not line.lstrip().startswith(("query:", "seriesQuery:")) \
                else line
            m = re.match(r"\s*(?:-\s*)?(query|seriesQuery):\s*(.+?)\s*$", s)
            if m:
                q = m.group(2).strip("'\"")
                if m.group(1) == "seriesQuery":
                    # {__name__=~"dsv4d:a|b",...} or {__name__="dsv4d:x",...}
                    n = re.search(r'__name__\s*(=~|=)\s*"([^"]+)"', q)
                    if n:
                        for name in _expand(n.group(2)):
                            out.append((f"{path}:{i}", name))
                    continue
                out.append((f"{path}:{i}", q))
            m = re.match(r"\s*name:\s*(dsv4d_[a-z0-9_]+)\s*$", s)
            if m:                                             # HPA custom metric (adapter name)
                out.append((f"{path}:{i}", "dsv4d:" + m.group(1)[len("dsv4d_"):]))
    return out


def _expand(pattern):
    """dsv4d:num_requests_(waiting|running) -> both names (the only regex form used here)."""
    m = re.fullmatch(r"(.*)\(([^()]*)\)(.*)", pattern)
    if not m:
        return [pattern]
    return [m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--source", default=None, help="repository root (default: this one)")
    src.add_argument("--metrics-url", help="a live dsv4d's /metrics")
    src.add_argument("--metrics-file", help="a saved /metrics page")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args(argv)

    if a.metrics_url:
        # twice: counters with labels (http_requests_total) have samples only once a request
        # was counted, and the first scrape is one
        for _ in range(2):
            with urllib.request.urlopen(a.metrics_url, timeout=10) as r:
                text = r.read().decode()
        exported, labels = exported_from_text(text)
        origin = a.metrics_url
    elif a.metrics_file:
        with open(a.metrics_file) as f:
            exported, labels = exported_from_text(f.read())
        origin = a.metrics_file
    else:
        root = a.source or ROOT
        exported, labels = exported_from_source(root)
        origin = os.path.join(root, "server/metrics.c")
    known = series_names(exported)
    known_labels = labels | TARGET_LABELS | {"le", "model_name"}

    files = a.files or (sorted(glob.glob(os.path.join(ROOT, "deploy/grafana/*.json"))) +
                        [os.path.join(ROOT, "deploy/k8s/hpa.yaml")] +
                        sorted(glob.glob(os.path.join(ROOT, "deploy/k8s/autoscaling/*.yaml"))))
    problems, exprs = [], []
    for path in files:
        if path.endswith(".json"):
            exprs += dashboard_exprs(path, problems)
        else:
            exprs += yaml_exprs(path)
    used = set()
    for where, expr in exprs:
        metrics, lbls = promql_refs(expr)
        if not metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        for m in metrics:
            used.add(m)
            if m not in known:
                hint = ""
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if base in known:
                    hint = f" ({base[6:]} is not a histogram)"
                elif m + "_bucket" in known:
                    hint = " (a histogram: use _bucket/_sum/_count)"
                problems.append(f"{where}: {m} is not exported by dsv4d{hint}")
        for lb in lbls - known_labels:
            problems.append(f"{where}: label {lb!r} is not on dsv4d's series")
    for p in problems:
        print(p)
    print(f"check_metrics: {len(exprs)} queries over {len(used)} series names checked against "
          f"{len(exported)} metrics from {origin}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
