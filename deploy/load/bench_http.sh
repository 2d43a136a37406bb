#!/usr/bin/env bash
# bench_http.sh [DSV4D] - the HTTP server's figures, on this machine, in one run:
#   1. wrk on dsv4d's GET /health and on nginx (Debian) serving a static file of the same body,
#      same wrk settings, one after the other (the goal: dsv4d >= half of nginx's rate with its
#      one loop thread; nginx runs with worker_processes auto);
#   2. wrk on non-streaming /v1/completions with max_tokens 1 and 16 (built-in tiny model, CPU);
#   3. streaming time to first token and inter-token latency (stream_bench.py).
# Needs wrk and nginx (apt-get install wrk nginx-light). Every load is bounded in time and goes
# to 127.0.0.1 only. Environment: DUR (10s), CONNS (64), THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-build/server/dsv4d}
DUR=${DUR:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
PORT=18480
NGX_PORT=18481
TMP=$(mktemp -d /tmp/dsv4d-bench-XXXXXX)
cleanup() {
  [ -n "${SRV:-}" ] && kill -TERM "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null
  [ -f "$TMP/nginx.pid" ] && kill -QUIT "$(cat "$TMP/nginx.pid")" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
command -v wrk >/dev/null || { echo "bench_http: needs wrk (apt-get install wrk)"; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "bench_http: needs nginx (apt-get install nginx-light)"; exit 1; }

echo "== machine: $(nproc) cores, $(uname -r); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN" serve --port "$PORT" --log-level warning --max-num-seqs 64 >"$TMP/dsv4d.log" 2>&1 &
SRV=$!
for _ in $(seq 200); do curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done

chmod 755 "$TMP"
mkdir -p "$TMP/www"
printf '{"status":"ok"}' >"$TMP/www/health"
chmod -R a+rX "$TMP/www"
cat >"$TMP/nginx.conf" <<NGX
worker_processes auto;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  default_type application/json;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$NGX_PORT; root $TMP/www; }
}
NGX
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP"
sleep 0.3

echo "== GET /health: dsv4d (one loop thread) vs nginx static file; wrk -t$THREADS -c$CONNS -d$DUR"
echo "-- dsv4d"
wrk -t"$THREADS" -c"$CONNS" -d"$DUR" --latency -s deploy/load/health.lua "http://127.0.0.1:$PORT" | grep -E "Requests/sec|50%|99%|Non-2xx|requests/s"
echo "-- nginx $("$NGINX" -v 2>&1 | cut -d/ -f2)"
wrk -t"$THREADS" -c"$CONNS" -d"$DUR" --latency "http://127.0.0.1:$NGX_PORT/health" | grep -E "Requests/sec|50%|99%|Non-2xx"

for mt in 1 16; do
  echo "== POST /v1/completions max_tokens $mt (non-streaming; wrk -t2 -c16 -d$DUR)"
  MAX_TOKENS=$mt wrk -t2 -c16 -d"$DUR" --latency --timeout 60s -s deploy/load/completions.lua \
    "http://127.0.0.1:$PORT" | grep -E "Requests/sec|50%|99%|max_tokens"
done

if [ -f deploy/load/stream_bench.py ]; then
  echo "== streaming TTFT / ITL (stream_bench.py: 64 requests, concurrency 8, 64 in / 32 out)"
  python3 deploy/load/stream_bench.py --base-url "http://127.0.0.1:$PORT" --num-prompts 64 \
    --max-concurrency 8 --input-len 64 --output-len 32 2>&1 | tail -25
fi
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
