#!/bin/sh
# Issue 8's end-to-end GPU benchmark on a random checkpoint with the real DeepSeek-V4-Flash widths
# (8 layers by default) on one GPU: the engine benchmark (tests/gpu/bench_gpu_engine.c: copy
# bandwidth, 8k prefill, decode at batch 1..256 against the bytes-per-step floor), then
# `dsv4d serve --device cuda` on the same checkpoint under deploy/load/stream_bench.py at 16 and
# 64 concurrent streams (TTFT, ITL). What the numbers mean: tests/gpu/ENGINE_RESULTS.md.
#
# Here:  sh tests/gpu/run_flash_device.sh --pack
#        builds dsv4d and bench_gpu_engine in build-cuda (-Dcuda=enabled, release) and packs
#        build-cuda/flash-carry: both binaries, the shared libraries the GPU machine lacks
#        (jansson, libmicrohttpd, libuv, oniguruma, cudart) and the DeepSeek-V4 tokenizer.json
#        (and, where CUPTI was found, the timeline tracer with libcupti).
#        cuBLAS is too large to carry: the device side finds the machine's own.
# There: sh tests/gpu/run_flash_device.sh [OUTDIR]        (carry build-cuda/flash-carry)
#        1. a smoke run of the benchmark on builtin:tiny-flash (SMOKE=0 skips it);
#        2. export-tiny --shape flash --layers $LAYERS into $FLASH_DIR, kept between calls on a
#           warm machine (skipped when a complete export with the same arguments is there);
#        3. bench_gpu_engine on it; with TRACE=1 then a kernel timeline of the batch-1 step
#           (libdsv4_cupti_trace.so, tests/gpu/cupti_timeline.py: OUTDIR/timeline-b1.txt);
#        4. dsv4d serve --device cuda on it; stream_bench.py at each of $CONC; /metrics; stop.
#        Each step runs under timeout; the whole call stays within $TOTAL seconds (steps that no
#        longer fit are skipped with a message: run again, the export is kept). Every phase's
#        time goes to OUTDIR/phases.txt and the log; all output lands under OUTDIR.
#
# Environment (defaults):
#   BENCH_ONLY=1 / SERVE_ONLY=1   only the engine benchmark / only the HTTP part (+ export)
#   LAYERS (8)  EXPERTS (unset: the real 256; export's --experts E)  FLASH_DIR (build-cuda/flash8)
#   BATCHES (1,8,64,256) PROMPT (512) STEPS (32) PREFILL (8192) CHUNK (2048) FILL (auto)
#   LOGITS (auto)  CONC ("16 64") INPUT_LEN (256) OUTPUT_LEN (64) WAVES (2: requests per
#   concurrency level = WAVES x concurrency)  PORT (18190)
#   TOTAL (530 s for the whole call) T_EXPORT (420) T_BENCH (300) T_LOAD (300) T_STREAM (120)
#   SERVE_RESERVE (200: seconds kept for the HTTP part when the benchmark runs first)
set -u
D=build-cuda/flash-carry
if [ "${1:-}" = --pack ]; then
    set -e
    [ -d build-cuda ] || meson setup build-cuda -Dcuda=enabled --buildtype=release
    . tests/gpu/cuda_fresh.sh
    ninja -C build-cuda -j2 server/dsv4d tests/gpu/bench_gpu_engine
    ninja -C build-cuda -j2 tests/gpu/libdsv4_cupti_trace.so 2>/dev/null || true
    cuda_fresh_done
    rm -rf $D
    mkdir -p $D
    cp build-cuda/server/dsv4d build-cuda/tests/gpu/bench_gpu_engine $D/
    # the kernel-timeline tracer (TRACE=1) where it was built, with CUPTI
    if [ -f build-cuda/tests/gpu/libdsv4_cupti_trace.so ]; then
        cp build-cuda/tests/gpu/libdsv4_cupti_trace.so tests/gpu/cupti_timeline.py $D/
        p=$(ldd build-cuda/tests/gpu/libdsv4_cupti_trace.so | awk '$1 ~ /^libcupti/ { print $3 }')
        [ -n "$p" ] && cp -L "$p" $D/
    fi
    for lib in libjansson.so.4 libcudart.so.13 libonig.so.5 libmicrohttpd.so.12 libuv.so.1; do
        p=$(ldd build-cuda/server/dsv4d build-cuda/tests/gpu/bench_gpu_engine |
            awk -v l=$lib '$1 == l { print $3; exit }')
        [ -n "$p" ] && cp -L "$p" $D/
    done
    cp /usr/local/share/dsv4d/tokenizer.json $D/
    # what the binaries need beyond the carried libraries and glibc (found on the device)
    ldd build-cuda/server/dsv4d build-cuda/tests/gpu/bench_gpu_engine |
        awk '$2 == "=>" { print $1 }' | sort -u | while read -r l; do
        [ -e "$D/$l" ] || echo "$l"
    done > $D/needs.txt
    ls -la $D
    total=$(du -cb $D | tail -1 | cut -f1)
    echo "carry: $D, $((total / 1048576)) MiB (limit 60)"
    [ "$total" -le $((60 * 1048576)) ] || { echo "carry too large"; exit 1; }
    exit 0
fi

O=${1:-${OUT:-/tmp/out}}
mkdir -p "$O"
T0=$(date +%s)
TOTAL=${TOTAL:-530}
LAYERS=${LAYERS:-8}
EXPERTS=${EXPERTS:-}
MD=${FLASH_DIR:-build-cuda/flash$LAYERS${EXPERTS:+-e$EXPERTS}}
BATCHES=${BATCHES:-1,8,64,256}
PROMPT=${PROMPT:-512}
STEPS=${STEPS:-32}
PREFILL=${PREFILL:-8192}
CHUNK=${CHUNK:-2048}
FILL=${FILL:-auto}
LOGITS=${LOGITS:-auto}
CONC=${CONC:-16 64}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-64}
WAVES=${WAVES:-2}
PORT=${PORT:-18190}
T_EXPORT=${T_EXPORT:-420}
T_BENCH=${T_BENCH:-300}
T_LOAD=${T_LOAD:-300}
T_STREAM=${T_STREAM:-120}
SERVE_RESERVE=${SERVE_RESERVE:-200}
BENCH_ONLY=${BENCH_ONLY:-0}
SERVE_ONLY=${SERVE_ONLY:-0}
SMOKE=${SMOKE:-1}
[ "$SERVE_ONLY" = 1 ] && SMOKE=0
SRV=
fail=0

left() { echo $((T0 + TOTAL - $(date +%s))); }
# min(limit $1, time left - reserve $2)
lim() {
    l=$(($(left) - $2))
    if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}
phase_begin() {
    PH=$1
    PT=$(date +%s.%N)
    echo "== $PH ($(left) s left of the call)"
}
phase_end() {
    awk -v a="$PT" -v b="$(date +%s.%N)" -v p="$PH" -v r="$1" \
        'BEGIN { printf "== %-28s %7.1f s  (%s)\n", p, b - a, r }' | tee -a "$O/phases.txt"
}
http_code() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$PORT$1"
    else
        python3 -c 'import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)' "http://127.0.0.1:$PORT$1"
    fi
}
stop_server() {
    [ -n "$SRV" ] || return 0
    kill -TERM "$SRV" 2>/dev/null
    i=0
    while kill -0 "$SRV" 2>/dev/null && [ $i -lt 40 ]; do
        sleep 0.5
        i=$((i + 1))
    done
    if kill -0 "$SRV" 2>/dev/null; then
        echo "server $SRV did not stop in 20 s: SIGKILL"
        kill -KILL "$SRV" 2>/dev/null
    fi
    wait "$SRV" 2>/dev/null
    echo "server exit $?"
    SRV=
}
trap 'stop_server' EXIT
trap 'exit 130' INT TERM

# ---- libraries: the carried ones, then the machine's for the rest (cuBLAS) ----
export LD_LIBRARY_PATH="$PWD/$D${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing() { ldd $D/dsv4d $D/bench_gpu_engine 2>/dev/null | awk '/not found/ { print $1 }' | sort -u; }
for lib in $(missing); do
    found=
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
        /usr/local/cuda-*/lib64 /usr/local/cuda-*/lib /usr/lib/x86_64-linux-gnu; do
        [ -e "$dir/$lib" ] && found=$dir && break
    done
    if [ -z "$found" ]; then # pip wheels (torch's nvidia-* packages)
        for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
            f=$(find "$sp/nvidia" "$sp/torch/lib" -maxdepth 4 -name "$lib" 2>/dev/null | head -1)
            [ -n "$f" ] && found=$(dirname "$f") && break
        done
    fi
    if [ -n "$found" ]; then
        echo "library $lib from $found"
        LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$found"
    fi
done
if [ -n "$(missing)" ]; then
    echo "missing shared libraries: $(missing | tr '\n' ' ')"
    ldd $D/dsv4d $D/bench_gpu_engine > "$O/ldd.txt" 2>&1
    exit 1
fi
nvidia-smi -L | tee "$O/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv >> "$O/gpu.txt" 2>&1
nproc >> "$O/gpu.txt"
: > "$O/phases.txt"

# ---- 1. smoke: the benchmark on the built-in tiny model (catches a broken binary in seconds) ----
if [ "$SMOKE" = 1 ]; then
    phase_begin "smoke (builtin:tiny-flash)"
    timeout -k 5 "$(lim 90 60)" $D/bench_gpu_engine --model builtin:tiny-flash --batches 1,8,64 \
        --prompt 256 --steps 8 --prefill 2048 --chunk 512 --copy-mib 256 --json \
        > "$O/bench-tiny.txt" 2>&1
    rc=$?
    phase_end "rc $rc"
    grep -v '^{' "$O/bench-tiny.txt" | tail -12
    [ $rc -eq 0 ] || fail=1
fi

# ---- 2. export the Flash-width checkpoint (kept between calls) ----
EXPORT_ARGS="--shape flash --layers $LAYERS${EXPERTS:+ --experts $EXPERTS}"
if [ -f "$MD/.export-ok" ] && [ "$(cat "$MD/.export-ok")" = "$EXPORT_ARGS" ]; then
    echo "== export: reusing $MD ($EXPORT_ARGS; $(du -sh "$MD" | cut -f1))"
else
    rm -rf "$MD"
    for old in build-cuda/flash*/.export-ok; do # other exports of this script: free their disk
        [ -f "$old" ] && [ "$(dirname "$old")" != "$MD" ] && echo "removing $(dirname "$old")" &&
            rm -rf "$(dirname "$old")"
    done
    mkdir -p "$(dirname "$MD")"
    df -h "$(dirname "$MD")" | tail -1
    phase_begin "export ($EXPORT_ARGS)"
    t=$(lim "$T_EXPORT" 20)
    # shellcheck disable=SC2086
    timeout -k 10 "$t" $D/dsv4d export-tiny "$MD" $EXPORT_ARGS --tokenizer "$PWD/$D/tokenizer.json" \
        > "$O/export.log" 2>&1
    rc=$?
    phase_end "rc $rc, limit $t s"
    tail -5 "$O/export.log"
    if [ $rc -ne 0 ]; then
        echo "export failed (rc $rc; 124 = timed out after $t s): run again with more T_EXPORT, or EXPERTS=64"
        rm -rf "$MD"
        exit 1
    fi
    echo "$EXPORT_ARGS" > "$MD/.export-ok"
    du -sh "$MD"
fi

# ---- 3. the engine benchmark ----
if [ "$SERVE_ONLY" != 1 ]; then
    reserve=20
    [ "$BENCH_ONLY" = 1 ] || reserve=$((SERVE_RESERVE + 10))
    t=$(lim "$T_BENCH" "$reserve")
    if [ "$t" -lt 90 ]; then
        echo "== bench skipped: $t s left for it (run again: BENCH_ONLY=1)" | tee -a "$O/phases.txt"
    else
        phase_begin "bench ($MD)"
        # --budget: the benchmark skips what is left (and says so) before the timeout kills it
        timeout -k 10 "$t" $D/bench_gpu_engine --model "$MD" --batches "$BATCHES" --prompt "$PROMPT" \
            --steps "$STEPS" --prefill "$PREFILL" --chunk "$CHUNK" --fill "$FILL" \
            --logits "$LOGITS" --budget $((t - 15)) --json > "$O/bench.txt" 2>&1
        rc=$?
        phase_end "rc $rc, limit $t s"
        grep -v '^{' "$O/bench.txt" | grep -v 'loading weights: [0-9]' | tail -25
        grep '^{' "$O/bench.txt" > "$O/bench.jsonl"
        [ $rc -eq 0 ] || fail=1
    fi
fi

# ---- 3b. TRACE=1: a kernel timeline of the batch-1 decode step (cupti_trace.c) ----
if [ "${TRACE:-0}" = 1 ] && [ -f $D/libdsv4_cupti_trace.so ] && [ "$(lim 60 30)" -ge 60 ]; then
    phase_begin "trace (batch 1)"
    DSV4_CUPTI_OUT="$O/trace-b1.tsv" LD_PRELOAD="$PWD/$D/libdsv4_cupti_trace.so" \
        timeout -k 5 "$(lim 90 30)" $D/bench_gpu_engine --model "$MD" --batches 1 \
        --prompt "$PROMPT" --steps "$STEPS" --prefill 0 > "$O/trace-bench.txt" 2>&1
    rc=$?
    python3 $D/cupti_timeline.py "$O/trace-b1.tsv" --list > "$O/timeline-b1.txt" 2>&1
    phase_end "rc $rc"
    tail -25 "$O/timeline-b1.txt"
    gzip -f "$O/trace-b1.tsv"
fi

# ---- 4. serve + stream_bench ----
if [ "$BENCH_ONLY" != 1 ]; then
    t=$(lim "$T_LOAD" 60)
    if [ "$t" -lt 60 ]; then
        echo "== serve skipped: $t s left for loading (run again: SERVE_ONLY=1)" | tee -a "$O/phases.txt"
    else
        phase_begin "serve load ($MD)"
        $D/dsv4d serve --device cuda --model "$MD" --tokenizer "$PWD/$D/tokenizer.json" \
            --port "$PORT" --max-num-seqs 64 --max-model-len $((INPUT_LEN + OUTPUT_LEN + 64)) \
            --shutdown-timeout 5 > "$O/serve.log" 2>&1 &
        SRV=$!
        end=$(($(date +%s) + t))
        ready=0
        while [ "$(date +%s)" -lt $end ]; do
            kill -0 "$SRV" 2>/dev/null || break
            [ "$(http_code /ready)" = 200 ] && ready=1 && break
            [ "$(http_code /health)" = 500 ] && break # loading failed
            sleep 1
        done
        phase_end "ready $ready, limit $t s"
        if [ $ready = 1 ]; then
            grep -E "loaded|kv cache|cuda backend:|warm-up|ready" "$O/serve.log" |
                grep -v 'loading weights: [0-9]' | tail -12
            for c in $CONC; do
                t=$(lim "$T_STREAM" 25)
                if [ "$t" -lt 30 ]; then
                    echo "== stream $c skipped: $t s left (run again: SERVE_ONLY=1)" | tee -a "$O/phases.txt"
                    continue
                fi
                phase_begin "stream_bench concurrency $c"
                timeout -k 5 "$t" python3 deploy/load/stream_bench.py \
                    --base-url "http://127.0.0.1:$PORT" --num-prompts $((c * WAVES)) \
                    --max-concurrency "$c" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
                    --timeout 60 --json-out "$O/stream-$c.json" > "$O/stream-$c.txt" 2>&1
                rc=$?
                phase_end "rc $rc, limit $t s"
                [ $rc -eq 0 ] || fail=1
                grep -E "Successful|Failed|Output token throughput|Mean TTFT|Median TTFT|P99 TTFT|Mean ITL|Median ITL|P99 ITL|^error" \
                    "$O/stream-$c.txt"
            done
            if command -v curl >/dev/null 2>&1; then
                curl -s --max-time 5 "http://127.0.0.1:$PORT/metrics" > "$O/metrics.txt"
            fi
        else
            fail=1
            tail -20 "$O/serve.log"
        fi
        phase_begin "serve stop"
        stop_server
        phase_end "done"
    fi
fi

# the tables of tests/gpu/ENGINE_RESULTS.md (and the phase times)
python3 tests/gpu/engine_summary.py "$O" | tee "$O/summary.md"
echo "== total $(($(date +%s) - T0)) s; results under $O; status $fail"
exit $fail
