#!/bin/sh
# The GPU engine test (issue 8) on the device machine, from a build made on a machine with
# jansson (the GPU machine has no jansson headers, so meson cannot configure there).
# Here:  sh tests/gpu/run_engine_device.sh --pack   (builds build-cuda, packs build-cuda/carry:
#        the test binary + the shared libraries it needs that the GPU machine may lack)
# There: sh tests/gpu/run_engine_device.sh [OUTDIR] (with build-cuda/carry carried)
# Runs the test, the per-layer diagnosis when something fails, and compute-sanitizer memcheck
# on the --quick case. Logs under OUTDIR.
D=build-cuda/carry
if [ "$1" = --pack ]; then
    set -e
    [ -d build-cuda ] || meson setup build-cuda -Dcuda=enabled
    ninja -C build-cuda -j2 tests/gpu/test_gpu_engine
    mkdir -p $D
    cp build-cuda/tests/gpu/test_gpu_engine $D/
    for lib in libjansson.so.4 libcudart.so.13 libonig.so.5; do
        p=$(ldd build-cuda/tests/gpu/test_gpu_engine | awk -v l=$lib '$1 == l { print $3 }')
        [ -n "$p" ] && cp -L "$p" $D/
    done
    ls -la $D
    exit 0
fi
O=${1:-${OUT:-/tmp/out}}
mkdir -p "$O"
export LD_LIBRARY_PATH="$PWD/$D${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi -L
for t in test_gpu_engine; do
    timeout 150 $D/$t > "$O/$t.tap" 2>&1; echo "$t rc=$?"
    cat "$O/$t.tap"
done
if grep -q "^not ok" "$O/test_gpu_engine.tap"; then
    timeout 100 $D/test_gpu_engine --diag > "$O/diag.tap" 2>&1; echo "diag rc=$?"
    grep "^# diag" "$O/diag.tap"
fi
if [ "$SANITIZE" != 0 ]; then
    timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 $D/test_gpu_engine --quick \
        > "$O/memcheck.log" 2>&1; echo "memcheck rc=$?"
    tail -4 "$O/memcheck.log"
fi
