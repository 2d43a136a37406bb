#!/usr/bin/env bash
# deploy/check.sh [DSV4D_BIN] - offline validation of the container image and the deploy kit.
#
# No Docker engine and no Kubernetes cluster run on the project's machines, so the image and the
# manifests are checked without them:
#   hadolint             the Dockerfile (deploy/hadolint.yaml)
#   yamllint             every YAML file under deploy/ (deploy/yamllint.yaml, strict)
#   kubernetes-validate  the manifests against the Kubernetes OpenAPI schemas, strict (unknown
#                        fields are errors), for the oldest and newest versions it ships schemas for
#                        that we support (1.29, 1.37); the CRD objects (KEDA, Prometheus operator)
#                        have no schema there and are checked by check_consistency.py instead
#   check_consistency.py the Dockerfile and manifests against each other and against the server
#                        (flags, routes, drain timing, ports, labels, runtime libraries of
#                        DSV4D_BIN, and the Dockerfile's `meson setup` line on this tree)
#   check_metrics.py     the Grafana dashboard and the autoscaling queries use only metrics
#                        server/metrics.c exports
#   sizing.py            its weight formula equals the tensor bytes of `dsv4d export-tiny`
#                        checkpoints (Flash and Pro), when DSV4D_BIN is given
# The tools come from deploy/install-deps.sh (a virtualenv in /opt/dsv4d-deploy); without them
# this exits 77, which meson reports as skipped. Exit 0 when everything passes, 1 otherwise.
set -uo pipefail
BIN=${1:-}
[ -n "$BIN" ] && BIN=$(realpath "$BIN")   # meson runs tests in the build directory
cd "$(dirname "$0")/.."
VENV=${DSV4D_DEPLOY_VENV:-/opt/dsv4d-deploy}
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python3"
[ -x "$PY" ] || PY=python3

missing=()
for t in hadolint yamllint kubernetes-validate; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
"$PY" -c 'import yaml' 2>/dev/null || missing+=("PyYAML")
if [ ${#missing[@]} -gt 0 ]; then
  echo "skip: missing ${missing[*]} (bash deploy/install-deps.sh installs them into $VENV)"
  exit 77
fi

pass=0
fail=0
step() { # step NAME COMMAND...: run, report, count
  local name=$1 out rc
  shift
  out=$("$@" 2>&1)
  rc=$?
  if [ $rc -eq 0 ]; then
    pass=$((pass + 1))
    echo "ok   $name"
  else
    fail=$((fail + 1))
    echo "FAIL $name (exit $rc)"
  fi
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/     /'
  return 0
}

echo "tools: $(hadolint --version 2>&1 | head -1); $(yamllint --version 2>&1);" \
  "kubernetes-validate $(kubernetes-validate --version 2>&1 | head -1)"

step "hadolint Dockerfile" hadolint --no-color --config deploy/hadolint.yaml Dockerfile

mapfile -t yamls < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
step "yamllint (${#yamls[@]} files)" yamllint -s -c deploy/yamllint.yaml "${yamls[@]}"

manifests=()
for f in deploy/k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
for v in 1.29.0 1.37.0; do
  step "kubernetes-validate --strict -k $v (${#manifests[@]} manifests)" \
    kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}"
done

cc_args=(--meson-setup)
[ -n "$BIN" ] && cc_args+=(--bin "$BIN")
step "check_consistency.py" "$PY" deploy/check_consistency.py "${cc_args[@]}"
step "check_metrics.py (server/metrics.c)" "$PY" deploy/check_metrics.py
py_syntax() {
  "$PY" -c 'import ast, sys
for p in sys.argv[1:]:
    ast.parse(open(p).read(), p)' deploy/*.py deploy/load/*.py
}
step "python syntax (deploy/*.py, deploy/load/*.py)" py_syntax

if [ -n "$BIN" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  sizing_vs_export() {
    local v
    for v in flash pro; do
      "$BIN" export-tiny "$tmp/$v" --variant "$v" >/dev/null || return 1
      "$PY" deploy/sizing.py "$tmp/$v" --check || return 1
      rm -rf "${tmp:?}/$v"
    done
  }
  step "sizing.py weights = export-tiny tensor bytes" sizing_vs_export
fi

echo "deploy check: $pass passed, $fail failed"
[ $fail -eq 0 ]
