#!/bin/sh
# `dsv4d serve --device cuda` end to end on a GPU machine (issue 8), from a build made here (the
# GPU machine has no libmicrohttpd/libuv/jansson headers).
# Here:  sh tests/gpu/run_serve_device.sh --pack   (builds build-cuda/server/dsv4d and packs
#        build-cuda/serve-carry: the binary, the shared libraries the GPU machine may lack, the
#        DeepSeek-V4 tokenizer.json)
# There: sh tests/gpu/run_serve_device.sh [OUTDIR]  (with build-cuda/serve-carry carried)
# Starts the tiny model on the GPU with the exact kernels (DSV4_CUDA_EXACT=1: bit-identical to the
# CPU backend) and on the CPU, sends the same greedy requests to both (the texts must be equal),
# then measures streaming TTFT / ITL and throughput on the GPU server with
# deploy/load/stream_bench.py. Loopback only. (The fast path at the real widths is measured by
# run_flash_device.sh; its agreement with the CPU is tested by test_gpu_engine.)
set -u
D=build-cuda/serve-carry
if [ "${1:-}" = --pack ]; then
    set -e
    [ -d build-cuda ] || meson setup build-cuda -Dcuda=enabled
    . tests/gpu/cuda_fresh.sh
    ninja -C build-cuda -j2 server/dsv4d
    cuda_fresh_done
    mkdir -p $D
    cp build-cuda/server/dsv4d $D/
    for lib in libjansson.so.4 libcudart.so.13 libonig.so.5 libmicrohttpd.so.12 libuv.so.1; do
        p=$(ldd build-cuda/server/dsv4d | awk -v l=$lib '$1 == l { print $3 }')
        [ -n "$p" ] && cp -L "$p" $D/
    done
    cp /usr/local/share/dsv4d/tokenizer.json $D/
    ls -la $D
    exit 0
fi
O=${1:-${OUT:-/tmp/out}}
mkdir -p "$O"
export LD_LIBRARY_PATH="$PWD/$D${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DSV4D_TOKENIZER="$PWD/$D/tokenizer.json"
nvidia-smi -L
fail=0
for m in flash pro; do
    DSV4_CUDA_EXACT=1 $D/dsv4d serve --model builtin:tiny-$m --device cuda --port 18180 --max-num-seqs 64 \
        > "$O/serve-cuda-$m.log" 2>&1 &
    GPU=$!
    $D/dsv4d serve --model builtin:tiny-$m --device cpu --port 18181 --max-num-seqs 8 \
        > "$O/serve-cpu-$m.log" 2>&1 &
    CPU=$!
    for port in 18180 18181; do
        for i in $(seq 1 120); do
            curl -sf http://127.0.0.1:$port/ready >/dev/null && break
            sleep 0.5
        done
    done
    grep -E "kv cache|ready" "$O/serve-cuda-$m.log"
    same=0; total=0
    for p in "The capital of France is" "def fibonacci(n):" "一二三四五六七八九十" "Once upon a time, in a land far away"; do
        body="{\"prompt\": \"$p\", \"max_tokens\": 48, \"temperature\": 0, \"ignore_eos\": true}"
        a=$(curl -s http://127.0.0.1:18180/v1/completions -H 'Content-Type: application/json' -d "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])')
        b=$(curl -s http://127.0.0.1:18181/v1/completions -H 'Content-Type: application/json' -d "$body" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])')
        total=$((total + 1))
        [ -n "$a" ] && [ "$a" = "$b" ] && same=$((same + 1))
    done
    echo "tiny-$m: greedy completions over HTTP identical on cuda and cpu: $same/$total"
    [ $same -eq $total ] || fail=1
    kill -TERM $CPU
    for c in 1 16 64; do
        echo "== tiny-$m on the GPU server: stream_bench concurrency $c"
        timeout 120 python3 deploy/load/stream_bench.py --base-url http://127.0.0.1:18180 \
            --num-prompts $((c * 4)) --max-concurrency $c --input-len 256 --output-len 64 \
            > "$O/bench-$m-$c.txt" 2>&1
        grep -E "Request throughput|Output token throughput|Median TTFT|P99 TTFT|Median ITL|P99 ITL" "$O/bench-$m-$c.txt"
    done
    kill -TERM $GPU
    wait $GPU; echo "cuda server exit $?"
    wait $CPU 2>/dev/null
done
exit $fail
