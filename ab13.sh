#!/bin/sh
D=build-gpu/ab
echo "== test L small"; $D/L/test_moe_gpu --small > $OUT/test_small.log 2>&1; echo "rc=$?"; tail -1 $OUT/test_small.log; grep "not ok" $OUT/test_small.log | head -5
for r in 1 2 3; do for v in A L; do
  $D/$v/bench_moe_gpu --quick > $OUT/bench_${v}_$r.log 2>&1
  echo "== $v run $r"; grep -E "^\| (flash|pro)" $OUT/bench_${v}_$r.log | awk -F'|' '{printf "%s T=%s %s/%s;", $2,$3,$4,$5}'; echo
done; done
echo "== test L full"; $D/L/test_moe_gpu > $OUT/testfull.log 2>&1; echo "rc=$?"; grep -c "^ok" $OUT/testfull.log; grep "^not ok" $OUT/testfull.log | head
