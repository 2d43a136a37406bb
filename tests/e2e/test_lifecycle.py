"""Startup (bind first, /ready 503 until loaded) and shutdown (SIGTERM drain, timeout, SIGINT)."""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx

from conftest import COMMON
from dsv4d_proc import Server


def test_bind_before_ready():
    p = subprocess.Popen([os.environ["DSV4D_BIN"], "serve", "--port", "0", *COMMON,
                          "--log-level", "info"], stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in p.stderr:
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
                break
        assert port
        codes = []
        t_end = time.time() + 60
        while time.time() < t_end:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            codes.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["message"] == "Loading model"
                assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] in ("loading", "ok")
            if r.status_code == 200:
                break
            time.sleep(0.01)
        assert codes[-1] == 200
        assert codes[0] == 503, codes  # answered while loading
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0


def _stream(url, out, max_tokens, idx):
    body = {"prompt": "Tell me a story", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    lines = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
    except httpx.HTTPError as e:
        lines.append(f"EXC {e!r}")
    out[idx] = lines


def _finish_reasons(lines):
    reasons = []
    for l in lines:
        if l.startswith("data: {"):
            c = json.loads(l[6:])["choices"]
            if c and c[0]["finish_reason"]:
                reasons.append(c[0]["finish_reason"])
    return reasons


def test_sigterm_drains_streams():
    s = Server(*COMMON, "--shutdown-timeout", "300")
    out = {}
    ths = [threading.Thread(target=_stream, args=(s.url, out, 12, i)) for i in range(4)]
    for t in ths:
        t.start()
    t_end = time.time() + 30
    while s.metric("num_requests_running") < 4 and time.time() < t_end:
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert s.get("/ready")[0] == 503
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.headers.get("retry-after")
    for t in ths:
        t.join(60)
    for i in range(4):
        assert out[i][-1] == "data: [DONE]", out[i][-3:]
        assert _finish_reasons(out[i]) == ["length"]
    assert s.proc.wait(30) == 0


def test_shutdown_timeout_cancels():
    s = Server(*COMMON, "--shutdown-timeout", "0.5")
    out = {}
    t = threading.Thread(target=_stream, args=(s.url, out, 1000, 0))
    t.start()
    t_end = time.time() + 30
    while s.metric("num_requests_running") < 1 and time.time() < t_end:
        time.sleep(0.02)
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert s.proc.wait(30) == 0
    assert time.time() - t0 < 10
    assert out[0][-1] == "data: [DONE]" and _finish_reasons(out[0]) == ["abort"]


def test_second_sigint_exits_now():
    s = Server(*COMMON, "--shutdown-timeout", "600")
    out = {}
    t = threading.Thread(target=_stream, args=(s.url, out, 1000, 0))
    t.start()
    t_end = time.time() + 30
    while s.metric("num_requests_running") < 1 and time.time() < t_end:
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert s.proc.poll() is None  # draining, up to 600 s
    t0 = time.time()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(10) == 130
    assert time.time() - t0 < 5
    t.join(30)
