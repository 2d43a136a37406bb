#!/usr/bin/env python3
"""stream_bench.py - streaming load client for dsv4d (or any OpenAI-compatible server).

Sends --num-prompts streaming requests to /v1/completions or /v1/chat/completions, arriving as
a Poisson process at --request-rate (gamma-distributed gaps with --burstiness != 1; all at once
with inf), at most --max-concurrency in flight, and reports what `vllm bench serve` reports,
with its definitions:

  TTFT   time to first token: request sent -> first chunk that carries generated text
  ITL    inter-token latency: every gap between consecutive text-carrying chunks
  TPOT   time per output token: (E2EL - TTFT) / (output tokens - 1), per request
  E2EL   end-to-end latency: request sent -> last byte of the stream

  request throughput = completed / duration, output token throughput = generated tokens /
  duration, total token throughput = (prompt + generated tokens) / duration; mean, median,
  std and percentiles of each latency; goodput with --goodput (requests within every SLO).

Token counts come from the server's usage chunk (stream_options.include_usage), so they are
exact; dsv4d sends one chunk per token, so ITL is per token. Prompts are random token ids of
--input-len (completions: exact length) or a sentence repeated to about that many tokens (chat),
from --seed. Only the Python standard library (asyncio, raw HTTP/1.1 + SSE); talks plain HTTP.

  python3 deploy/load/stream_bench.py --base-url http://127.0.0.1:8080 --num-prompts 200 \\
      --request-rate 4 --max-concurrency 32 --input-len 512 --output-len 128
"""
import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
import urllib.parse


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 + SSE over asyncio streams

class HTTPError(Exception):
    pass


async def _read_chunked(reader):
    """Yield the body of a chunked response piece by piece as it arrives."""
    while True:
        line = await reader.readline()
        if not line:
            raise HTTPError("connection closed inside a chunked body")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def _read_body(reader, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        async for piece in _read_chunked(reader):
            yield piece
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while True:
            piece = await reader.read(65536)
            if not piece:
                return
            yield piece


async def post_stream(url, body, headers, timeout):
    """POST; return (status, headers, async iterator of body pieces, writer to close)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise HTTPError("only http:// URLs are supported")
    port = u.port or 80
    reader, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, port), timeout)
    data = json.dumps(body).encode()
    head = [f"POST {u.path or '/'} HTTP/1.1", f"Host: {u.hostname}:{port}",
            "Content-Type: application/json", "Accept: text/event-stream",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout)
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        writer.close()
        raise HTTPError(f"bad status line {status_line!r}")
    status = int(parts[1])
    hdrs = {}
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, _read_body(reader, hdrs), writer


async def sse_events(pieces):
    """Yield (arrival time, data string) for each SSE event's data."""
    buf = b""
    async for piece in pieces:
        t = time.perf_counter()
        buf += piece
        while True:
            i = buf.find(b"\n\n")
            if i < 0:
                break
            event, buf = buf[:i], buf[i + 2:]
            data = [ln[5:].lstrip() for ln in event.replace(b"\r", b"").split(b"\n")
                    if ln.startswith(b"data:")]
            if data:
                yield t, b"\n".join(data).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# one request

class Result:
    __slots__ = ("ok", "error", "ttft", "itl", "e2el", "prompt_tokens", "output_tokens", "start")

    def __init__(self):
        self.ok, self.error = False, ""
        self.ttft, self.e2el, self.itl = 0.0, 0.0, []
        self.prompt_tokens = self.output_tokens = 0
        self.start = 0.0


def _text_of(chunk, chat):
    out = ""
    for ch in chunk.get("choices") or []:
        if chat:
            d = ch.get("delta") or {}
            out += (d.get("content") or "") + (d.get("reasoning_content") or "")
            if d.get("tool_calls"):
                out += "\0"  # generated, though not text
        else:
            out += ch.get("text") or ""
    return out


async def one_request(a, url, body, headers):
    r = Result()
    r.start = st = time.perf_counter()
    last = None
    try:
        status, hdrs, pieces, writer = await post_stream(url, body, headers, a.timeout)
        try:
            if status != 200:
                text = b"".join([p async for p in pieces]).decode("utf-8", "replace")
                r.error = f"HTTP {status}: {text[:200]}"
                return r
            async for t, data in sse_events(pieces):
                if data == "[DONE]":
                    r.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    break
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    r.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if _text_of(chunk, a.endpoint.endswith("chat/completions")) == "" and \
                        not any(c.get("logprobs") for c in chunk.get("choices") or []):
                    continue
                if last is None:
                    r.ttft = t - st
                else:
                    r.itl.append(t - last)
                last = t
            r.e2el = time.perf_counter() - st
            if r.ok and r.output_tokens == 0:
                r.output_tokens = len(r.itl) + (1 if last is not None else 0)
            if r.ok and last is None:
                r.ok, r.error = False, "no token in the stream"
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HTTPError,
            ValueError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


# ---------------------------------------------------------------------------------------------
# workload

WORDS = ("the quick brown fox jumps over the lazy dog while a patient engineer measures "
         "latency and throughput of a streaming inference server").split()


def make_bodies(a):
    rng = random.Random(a.seed)
    chat = a.endpoint.endswith("chat/completions")
    bodies = []
    for _ in range(a.num_prompts):
        n_in = max(1, int(a.input_len * (1 + rng.uniform(-a.range_ratio, a.range_ratio))))
        n_out = max(1, int(a.output_len * (1 + rng.uniform(-a.range_ratio, a.range_ratio))))
        b = {"max_tokens": n_out, "stream": True, "stream_options": {"include_usage": True},
             "temperature": a.temperature}
        if a.ignore_eos:
            b["ignore_eos"] = True
        if a.model:
            b["model"] = a.model
        if chat:
            words = [rng.choice(WORDS) for _ in range(n_in)]
            b["messages"] = [{"role": "user", "content": " ".join(words)}]
            if a.no_thinking:
                b["thinking"] = {"type": "disabled"}
        else:
            b["prompt"] = [rng.randrange(1000, 100000) for _ in range(n_in)]
        bodies.append(b)
    return bodies


async def run(a):
    url = a.base_url.rstrip("/") + a.endpoint
    headers = {}
    key = a.api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    bodies = make_bodies(a)
    rng = random.Random(a.seed + 1)
    sem = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else None
    inflight = [0, 0]  # now, peak

    async def limited(body):
        if sem:
            async with sem:
                return await tracked(body)
        return await tracked(body)

    async def tracked(body):
        inflight[0] += 1
        inflight[1] = max(inflight[1], inflight[0])
        try:
            return await one_request(a, url, body, headers)
        finally:
            inflight[0] -= 1

    t0 = time.perf_counter()
    tasks = []
    for i, b in enumerate(bodies):
        tasks.append(asyncio.create_task(limited(b)))
        if a.request_rate != math.inf and i + 1 < len(bodies):
            # gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate; 1 = Poisson
            theta = 1.0 / (a.request_rate * a.burstiness)
            await asyncio.sleep(rng.gammavariate(a.burstiness, theta))
        if a.duration and time.perf_counter() - t0 > a.duration:
            break
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0, inflight[1]


# ---------------------------------------------------------------------------------------------
# report

def _stats(xs, pcts):
    if not xs:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p:g}": 0.0 for p in pcts}}
    s = sorted(xs)

    def pct(p):  # linear interpolation, as numpy.percentile (what vllm bench serve uses)
        k = (len(s) - 1) * p / 100
        f = math.floor(k)
        c = min(f + 1, len(s) - 1)
        return s[f] + (s[c] - s[f]) * (k - f)
    return {"mean": statistics.fmean(s), "median": statistics.median(s),
            "std": statistics.pstdev(s), **{f"p{p:g}": pct(p) for p in pcts}}


def summarize(a, results, duration, peak):
    ok = [r for r in results if r.ok]
    pcts = [float(p) for p in a.percentiles.split(",") if p]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    rep = {
        "endpoint": a.endpoint, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "duration_s": duration,
        "request_rate": "inf" if a.request_rate == math.inf else a.request_rate,
        "max_concurrency": a.max_concurrency, "peak_concurrency": peak,
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tok / duration if duration else 0.0,
        "total_token_throughput": (in_tok + out_tok) / duration if duration else 0.0,
        "ttft_ms": {k: v * 1e3 for k, v in _stats([r.ttft for r in ok], pcts).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _stats(tpot, pcts).items()},
        "itl_ms": {k: v * 1e3 for k, v in _stats([x for r in ok for x in r.itl], pcts).items()},
        "e2el_ms": {k: v * 1e3 for k, v in _stats([r.e2el for r in ok], pcts).items()},
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if a.goodput:
        slo = dict(kv.split(":") for kv in a.goodput.split())
        good = 0
        for r in ok:
            t = (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            if (r.ttft * 1e3 <= float(slo.get("ttft", "inf")) and
                    t * 1e3 <= float(slo.get("tpot", "inf")) and
                    r.e2el * 1e3 <= float(slo.get("e2el", "inf"))):
                good += 1
        rep["goodput"] = good / duration if duration else 0.0
    return rep


def print_report(rep):
    w = 50
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Successful requests:", rep["completed"]), ("Failed requests:", rep["failed"]),
            ("Maximum request concurrency:", rep["max_concurrency"] or "none"),
            ("Peak concurrency:", rep["peak_concurrency"]),
            ("Benchmark duration (s):", f"{rep['duration_s']:.2f}"),
            ("Total input tokens:", rep["total_input_tokens"]),
            ("Total generated tokens:", rep["total_output_tokens"]),
            ("Request throughput (req/s):", f"{rep['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{rep['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{rep['total_token_throughput']:.2f}")]
    if "goodput" in rep:
        rows.append(("Request goodput (req/s):", f"{rep['goodput']:.2f}"))
    for k, v in rows:
        print(f"{k:<40}{v:<10}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        print("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        short = key.split("_")[0].upper()
        for stat, v in rep[key].items():
            label = {"mean": "Mean", "median": "Median", "std": "Std"}.get(stat, stat.upper())
            print(f"{label + ' ' + short + ' (ms):':<40}{v:<10.2f}")
    print("=" * w)
    for e in rep["errors"]:
        print(f"error: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--endpoint", default="/v1/completions",
                    choices=["/v1/completions", "/v1/chat/completions"])
    ap.add_argument("--model", default="", help="model name to send (default: none; dsv4d "
                    "then uses the one it serves)")
    ap.add_argument("--api-key", default="", help="Bearer key (default $OPENAI_API_KEY)")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests per second (default inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the arrival gaps; 1 = Poisson")
    ap.add_argument("--max-concurrency", type=int, default=0, help="0 = unbounded")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.0,
                    help="lengths uniform in [len*(1-r), len*(1+r)]")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let EOS end generations early (default: ignore_eos, fixed lengths)")
    ap.add_argument("--no-thinking", action="store_true",
                    help="chat: send thinking {type: disabled}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--percentiles", default="50,90,99")
    ap.add_argument("--goodput", default="",
                    help='SLOs in ms, e.g. "ttft:500 tpot:50 e2el:10000"')
    ap.add_argument("--duration", type=float, default=0,
                    help="stop sending new requests after this many seconds (0 = no limit)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per connect/headers")
    ap.add_argument("--json-out", help="also write the report as JSON here")
    ap.add_argument("--min-completed", type=int, default=-1,
                    help="exit 1 unless at least this many requests completed (default: all)")
    a = ap.parse_args(argv)
    if a.num_prompts < 1 or a.input_len < 1 or a.output_len < 1 or a.request_rate <= 0 \
            or a.burstiness <= 0:
        ap.error("counts, lengths, rate and burstiness must be positive")
    results, duration, peak = asyncio.run(run(a))
    rep = summarize(a, results, duration, peak)
    print_report(rep)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rep, f, indent=1)
    need = len(results) if a.min_completed < 0 else a.min_completed
    return 0 if rep["completed"] >= need else 1


if __name__ == "__main__":
    sys.exit(main())
