#!/bin/sh
# The committed validation + benchmark sequence (two calls so each stays under 10 minutes):
#   run_final.sh check OUT  -> build, CPU unit test, compute-sanitizer memcheck/racecheck on the
#                              small case, the full GPU correctness matrix
#   run_final.sh bench OUT  -> the benchmark (NVFP4 kernels, D2D copy, cuBLAS) + the BF16
#                              torch._grouped_mm baseline, in the same session
M=$1
O=${2:-${OUT:-/tmp/out}}
mkdir -p "$O"
nvidia-smi -L | tee "$O/gpu.txt"
B=build-gpu/sa
[ -x $B/bench_moe_gpu ] && [ "$M" = bench ] || sh tests/gpu/build_standalone.sh $B > "$O/build.log" 2>&1 || { cat "$O/build.log"; exit 1; }
if [ "$M" = check ]; then
  $B/test_nvfp4_cpu > "$O/nvfp4_cpu.tap" 2>&1; echo "nvfp4_cpu rc=$? ok=$(grep -c '^ok' $O/nvfp4_cpu.tap)"
  $B/test_moe_gpu --small > "$O/small.tap" 2>&1; echo "small rc=$? ok=$(grep -c '^ok' $O/small.tap)"
  compute-sanitizer --tool memcheck --error-exitcode 9 $B/test_moe_gpu --small > "$O/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -1 "$O/memcheck.log"
  compute-sanitizer --tool racecheck --error-exitcode 9 $B/test_moe_gpu --small > "$O/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -1 "$O/racecheck.log"
  $B/test_moe_gpu > "$O/full.tap" 2>&1; echo "full rc=$? ok=$(grep -c '^ok' $O/full.tap) notok=$(grep -c '^not ok' $O/full.tap)"; grep "not ok" "$O/full.tap" | head
fi
if [ "$M" = bench ]; then
  $B/bench_moe_gpu "$O/bench.md" > "$O/bench.log" 2>&1; echo "bench rc=$?"; cat "$O/bench.log"
  python3 tests/gpu/bench_moe_bf16.py "$O/bf16.md" > "$O/bf16.log" 2>&1; echo "bf16 rc=$?"; cat "$O/bf16.log"
fi
