#!/bin/sh
# The GPU engine test (issue 8) on the device machine, from a build made on a machine with
# jansson (the GPU machine has no jansson headers, so meson cannot configure there).
# Here:  sh tests/gpu/run_engine_device.sh --pack   (builds build-cuda, packs build-cuda/carry:
#        the test binary + the shared libraries it needs that the GPU machine may lack)
# There: sh tests/gpu/run_engine_device.sh [OUTDIR] (with build-cuda/carry carried)
# Runs the tests (the attention test on each of its three kernels), the per-layer diagnosis
# when something fails, and compute-sanitizer memcheck on the --quick case. Logs under OUTDIR.
D=build-cuda/carry
if [ "$1" = --pack ]; then
    set -e
    [ -d build-cuda ] || meson setup build-cuda -Dcuda=enabled
    . tests/gpu/cuda_fresh.sh
    ninja -C build-cuda -j2 tests/gpu/test_gpu_engine tests/gpu/test_linear_gpu tests/gpu/test_moe_gpu \
        tests/gpu/test_attention_gpu
    cuda_fresh_done
    mkdir -p $D
    cp build-cuda/tests/gpu/test_gpu_engine build-cuda/tests/gpu/test_linear_gpu \
        build-cuda/tests/gpu/test_moe_gpu build-cuda/tests/gpu/test_attention_gpu $D/
    for lib in libjansson.so.4 libcudart.so.13 libonig.so.5; do
        p=$(ldd build-cuda/tests/gpu/test_gpu_engine | awk -v l=$lib '$1 == l { print $3 }')
        [ -n "$p" ] && cp -L "$p" $D/
    done
    ls -la $D
    exit 0
fi
O=${1:-${OUT:-/tmp/out}}
mkdir -p "$O"
# cuBLAS comes from the machine's CUDA toolkit (too large to carry)
export LD_LIBRARY_PATH="$PWD/$D:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi -L
for t in test_attention_gpu "DSV4_CUDA_ATTN=tc test_attention_gpu" \
    "DSV4_CUDA_ATTN=simt test_attention_gpu" test_linear_gpu test_gpu_engine "test_moe_gpu --small"; do
    f=$(echo "$t" | tr -d ' -=')
    case "$t" in
    DSV4_CUDA_ATTN=*) a=${t%% *}; DSV4_CUDA_ATTN=${a#*=} timeout 300 $D/${t#* } > "$O/$f.tap" 2>&1 ;;
    *) timeout 300 $D/$t > "$O/$f.tap" 2>&1 ;;
    esac
    echo "$t rc=$?"
    grep -v "^ok" "$O/$f.tap"; echo "$(grep -c '^ok' "$O/$f.tap") ok"
done
if grep -q "^not ok" "$O/test_gpu_engine.tap"; then
    timeout 100 $D/test_gpu_engine --diag > "$O/diag.tap" 2>&1; echo "diag rc=$?"
    grep "^# diag" "$O/diag.tap"
fi
if [ "$SANITIZE" != 0 ]; then
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 $D/test_gpu_engine --quick \
        > "$O/memcheck.log" 2>&1; echo "memcheck rc=$?"
    tail -4 "$O/memcheck.log"
fi
