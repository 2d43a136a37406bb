#!/usr/bin/env bash
# test_cli.sh DSV4D - the model subcommands end to end, TAP output.
set -u
bin=$1
tmp=$(mktemp -d /tmp/dsv4d-cli-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
n=0
fails=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
bad() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $1"; shift; for l in "$@"; do echo "# $l"; done; }
check() { # check NAME EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then ok "$1"; else bad "$1" "expected: $2" "got: $3"; fi
}
# expect_fail NAME PATTERN CMD... : non-zero exit (not a signal) and stderr matching PATTERN
expect_fail() {
  local name=$1 pat=$2; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -q -- "$pat" "$tmp/err"; then ok "$name"
  else bad "$name" "rc=$rc" "stderr: $(head -c 300 "$tmp/err")"; fi
}

want_flash=$'0 swa hash\n1 swa hash\n2 csa hash\n3 hca dense\n4 csa dense\n5 hca dense\nmtp swa dense'
want_pro=$'0 hca hash\n1 hca hash\n2 csa hash\n3 hca dense\n4 csa dense\n5 hca dense\nmtp swa dense'
check "schedule builtin:tiny-flash" "$want_flash" "$("$bin" schedule builtin:tiny-flash)"
check "schedule builtin:tiny-pro" "$want_pro" "$("$bin" schedule builtin:tiny-pro)"

"$bin" export-tiny "$tmp/flash" --variant flash && ok "export-tiny flash" || bad "export-tiny flash"
"$bin" export-tiny "$tmp/pro" --variant pro && ok "export-tiny pro" || bad "export-tiny pro"
check "schedule of exported flash" "$want_flash" "$("$bin" schedule "$tmp/flash")"
check "schedule of exported pro" "$want_pro" "$("$bin" schedule "$tmp/pro")"

for v in flash pro; do
  a=$("$bin" generate --model builtin:tiny-$v --prompt-ids 0,100,200,300 --max-tokens 6)
  b=$("$bin" generate --model "$tmp/$v" --prompt-ids 0,100,200,300 --max-tokens 6)
  if [[ "$a" =~ ^[0-9]+( [0-9]+){5}$ ]]; then ok "generate builtin:tiny-$v prints 6 ids ($a)"
  else bad "generate builtin:tiny-$v" "got: $a"; fi
  check "generate from exported $v == builtin" "$a" "$b"
done

# bad input gets a clear error, never a crash
sed 's/"compress_ratios": \[/"compress_ratios": [4,/' "$tmp/flash/config.json" >"$tmp/c.json"
mkdir -p "$tmp/badcfg" && cp "$tmp/c.json" "$tmp/badcfg/config.json"
expect_fail "schedule rejects an inconsistent compress_ratios" "compress_ratios" "$bin" schedule "$tmp/badcfg"
expect_fail "missing model directory" "$tmp/nope/config.json" "$bin" generate --model "$tmp/nope" --prompt-ids 1
expect_fail "token id past the vocabulary" "out of range" "$bin" generate --model builtin:tiny-flash --prompt-ids 1,999999
expect_fail "malformed --prompt-ids" "prompt-ids" "$bin" generate --prompt-ids 1,,x
expect_fail "unknown built-in" "unknown built-in" "$bin" generate --model builtin:huge --prompt-ids 1
cp -r "$tmp/flash" "$tmp/trunc"
truncate -s 1000000 "$tmp/trunc/model-00002-of-00002.safetensors"
expect_fail "truncated shard" "model-00002-of-00002.safetensors" "$bin" generate --model "$tmp/trunc" --prompt-ids 1
cp -r "$tmp/flash" "$tmp/hdr"
printf '\xff\xff\xff\xff\xff\xff\x00\x00' | dd of="$tmp/hdr/model-00001-of-00002.safetensors" bs=1 count=8 conv=notrunc 2>/dev/null
expect_fail "header length past the end" "model-00001-of-00002.safetensors" "$bin" generate --model "$tmp/hdr" --prompt-ids 1
expect_fail "unknown subcommand" "unknown subcommand" "$bin" frobnicate
for sub in schedule export-tiny generate; do
  "$bin" $sub --help >/dev/null && ok "$sub --help" || bad "$sub --help"
done
echo "1..$n"
[ $fails -eq 0 ]
