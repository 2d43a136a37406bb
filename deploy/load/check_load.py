#!/usr/bin/env python3
"""check_load.py DSV4D_BIN - run every load script of deploy/load briefly against a real dsv4d.

Starts `DSV4D_BIN serve` on 127.0.0.1 (a free port) with the built-in tiny model on the CPU,
then, with bounded counts and durations (the tiny model generates a few tokens per second on a
busy 2-core machine):
  - each deploy/load/*.lua with wrk (-t1 -c2 for a few seconds; MAX_TOKENS=1, short prompts):
    wrk must exit 0, complete at least one request and get no non-2xx response;
  - stream_bench.py against /v1/completions and /v1/chat/completions: every request completes
    with exactly --output-len tokens (ignore_eos) and a positive TTFT, ITL for each further token;
  - /metrics afterwards: the queries of the Grafana dashboard and the autoscaling objects use
    only series this live server exports (deploy/check_metrics.py --metrics-url), and the
    counters moved by what was sent;
  - SIGTERM: the server drains and exits 0.
Exit 77 (meson: skipped) when dsv4d cannot serve here: the binary has no `serve`, the
DeepSeek-V4 tokenizer.json is missing (DSV4D_TOKENIZER, <build>/tokenizer.json from
tests/run.sh, DSV4D_DATA_DIR, or the install's share/dsv4d), or the server does not start; a
missing wrk skips only the wrk part. Only loopback traffic.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
failures = []


def log(msg):
    print(msg, flush=True)


def check(cond, msg):
    log(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)
    return cond


def skip(msg):
    log(f"skip: {msg}")
    sys.exit(77)


def find_tokenizer():
    cands = [os.environ.get("DSV4D_TOKENIZER")]
    if os.environ.get("DSV4_BUILD_ROOT"):
        cands.append(os.path.join(os.environ["DSV4_BUILD_ROOT"], "tokenizer.json"))
    for d in (os.environ.get("DSV4D_DATA_DIR"), "/usr/local/share/dsv4d", "/usr/share/dsv4d"):
        if d:
            cands.append(os.path.join(d, "tokenizer.json"))
    return next((c for c in cands if c and os.path.isfile(c)), None)


class Server:
    def __init__(self, binary, tokenizer):
        env = dict(os.environ, DSV4D_TOKENIZER=tokenizer, OMP_NUM_THREADS="2")
        for k in list(env):   # flags from the caller's environment must not change this run
            if k.startswith("DSV4D_") and k not in ("DSV4D_TOKENIZER",):
                del env[k]
        cmd = [binary, "serve", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "128",
               "--max-num-seqs", "8", "--shutdown-timeout", "20"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines, self.port = [], None
        self._ev = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on http://[^ ]*:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ev.set()
        self._ev.set()

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path, timeout=10):
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path, body, timeout=120):
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout):
        if not self._ev.wait(30) or self.port is None:
            return False
        t_end = time.time() + timeout
        while time.time() < t_end and self.proc.poll() is None:
            try:
                if self.get("/ready", timeout=3)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def stop(self, timeout=40):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self):
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            m = re.match(r"(dsv4d:[a-z_]+)(\{[^}]*\})? (\S+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out


def metric_sum(ms, name, **labels):
    tot = 0.0
    for k, v in ms.items():
        if k == name or k.startswith(name + "{"):
            if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()):
                tot += v
    return tot


def run_wrk(srv, script, seconds):
    env = dict(os.environ, MAX_TOKENS="1", PROMPT_LENS="2,6", PROMPT_WEIGHTS="1,1",
               VARIANTS="2", PROMPT="Say hi.")
    cmd = ["wrk", "-t1", "-c2", f"-d{seconds}s", "--timeout", "60s", "--latency", "-s", script,
           srv.url()]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 90)
    out = p.stdout + p.stderr
    m = re.search(r"(\d+) requests in", out)
    return p.returncode, (int(m.group(1)) if m else 0), out


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check_load.py DSV4D_BIN")
    binary = os.path.abspath(sys.argv[1])
    h = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True)
    if h.returncode != 0 or "--port" not in h.stdout + h.stderr:
        skip(f"{binary} has no `serve` subcommand yet")
    tok = find_tokenizer()
    if not tok:
        skip("no DeepSeek-V4 tokenizer.json (DSV4D_TOKENIZER, <build>/tokenizer.json from "
             "tests/run.sh, or deploy/install-deps.sh)")
    srv = Server(binary, tok)
    try:
        if not srv.wait_ready(180):
            srv.stop(10)
            skip("dsv4d serve did not become ready:\n  " + "\n  ".join(srv.lines[-15:]))
        log(f"dsv4d ready on {srv.url()}")
        # warm both endpoints once, so the timed runs do not pay first-use costs
        st, _ = srv.post("/v1/completions", {"prompt": [1000, 2000], "max_tokens": 1})
        check(st == 200, f"warm-up completion: HTTP {st}")
        st, _ = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 1})
        check(st == 200, f"warm-up chat completion: HTTP {st}")
        sent_wrk = 0

        scripts = sorted(f for f in os.listdir(HERE) if f.endswith(".lua"))
        if not shutil.which("wrk"):
            log("skip wrk scripts: wrk not installed (apt-get install wrk)")
        else:
            for s in scripts:
                path = os.path.join(HERE, s)
                rc, n, out = run_wrk(srv, path, 4)
                if rc == 0 and n == 0:      # a very busy machine: give it once more, longer
                    rc, n, out = run_wrk(srv, path, 12)
                ok = check(rc == 0 and n >= 1 and "Non-2xx" not in out and
                           "script error" not in out.lower(),
                           f"wrk {s}: exit {rc}, {n} request(s)")
                if not ok:
                    log("     " + out.replace("\n", "\n     "))
                else:
                    tail = [ln for ln in out.splitlines() if "Requests/sec" in ln or
                            ln.startswith(("responses by status", "prompt tokens"))]
                    log("     " + " | ".join(x.strip() for x in tail))
                sent_wrk += n

        with tempfile.TemporaryDirectory() as tmp:
            for ep, n, out_len in (("/v1/completions", 3, 3), ("/v1/chat/completions", 2, 2)):
                rep_path = os.path.join(tmp, "rep.json")
                cmd = [sys.executable, os.path.join(HERE, "stream_bench.py"), "--base-url",
                       srv.url(), "--endpoint", ep, "--num-prompts", str(n),
                       "--max-concurrency", "2", "--input-len", "4", "--output-len",
                       str(out_len), "--no-thinking", "--timeout", "120", "--json-out", rep_path]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                rep = {}
                if os.path.exists(rep_path):
                    with open(rep_path) as f:
                        rep = json.load(f)
                good = (p.returncode == 0 and rep.get("completed") == n and
                        rep.get("total_output_tokens") == n * out_len and
                        rep["ttft_ms"]["mean"] > 0 and rep["itl_ms"]["mean"] > 0 and
                        rep["e2el_ms"]["mean"] >= rep["ttft_ms"]["mean"])
                if not check(good, f"stream_bench.py {ep}: {rep.get('completed')}/{n} completed, "
                             f"{rep.get('total_output_tokens')} tokens"):
                    log("     " + (p.stdout + p.stderr).replace("\n", "\n     "))
                else:
                    log(f"     TTFT mean {rep['ttft_ms']['mean']:.0f} ms, ITL mean "
                        f"{rep['itl_ms']['mean']:.0f} ms, E2EL mean {rep['e2el_ms']['mean']:.0f} ms,"
                        f" {rep['output_throughput']:.2f} output tok/s")

        p = subprocess.run([sys.executable, os.path.join(DEPLOY, "check_metrics.py"),
                            "--metrics-url", srv.url("/metrics")], capture_output=True, text=True)
        check(p.returncode == 0, "dashboard and autoscaling queries vs the live /metrics: " +
              (p.stdout.strip().splitlines() or ["?"])[-1])
        if p.returncode:
            log(p.stdout + p.stderr)
        ms = srv.metrics()
        streamed = 3 + 2
        check(metric_sum(ms, "dsv4d:num_requests_running") == 0 and
              metric_sum(ms, "dsv4d:num_requests_waiting") == 0,
              "nothing left running or waiting after the load")
        n_ttft = metric_sum(ms, "dsv4d:time_to_first_token_seconds_count")
        check(n_ttft >= streamed,
              f"TTFT histogram counted {n_ttft:g} requests (>= the {streamed} streamed; "
              f"{2 + streamed + sent_wrk} sent in all)")
        check(metric_sum(ms, "dsv4d:generation_tokens_total") >= 2 + 3 * 3 + 2 * 2,
              f"generation_tokens_total {metric_sum(ms, 'dsv4d:generation_tokens_total'):g}")
        check(metric_sum(ms, "dsv4d:http_requests_total", handler="/v1/chat/completions",
                         status="200") >= 1 + 2, "http_requests_total counts the chat requests")
    finally:
        rc = srv.stop()
    check(rc == 0, f"SIGTERM: dsv4d drained and exited {rc}")
    log(f"check_load: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
