#!/usr/bin/env bash
# Offline checks of everything pgbranch ships for Kubernetes: no cluster, no
# helm binary, no network. Tools come from scripts/setup.sh (.venv, pinned:
# scripts/requirements-ci.txt; kubectl with kustomize; lua5.1). When run as
# root, the tools run in a fresh network namespace (unshare -n) to prove they
# need no network.
#
# Prints one line per check and a final `N passed, N failed` line; exits
# non-zero when any check fails. Rendered manifests land in target/manifests/.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
KUBECTL=.venv/bin/kubectl
OUT=target/manifests
# Kubernetes versions validated against: the chart's oldest (kubeVersion) and
# the newest we test on.
KUBE_VERSIONS="1.30.0 1.36.0"
mkdir -p "$OUT"
rm -f "$OUT"/*.yaml

OFFLINE=()
if [ "$(id -u)" -eq 0 ] && unshare -n true 2>/dev/null; then
  OFFLINE=(unshare -n)
fi

passed=0
failed=0
failures=()
# check NAME COMMAND...: runs COMMAND, prints PASS/FAIL and, on failure, its output.
check() {
  local name="$1"
  shift
  local log
  log="$(mktemp)"
  if "$@" >"$log" 2>&1; then
    echo "PASS $name"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    sed 's/^/    /' "$log" | tail -n 60
    failed=$((failed + 1))
    failures+=("$name")
  fi
  rm -f "$log"
}
offline() { "${OFFLINE[@]}" "$@"; }
# check_or_skip NAME COMMAND...: like check, but exit code 77 prints SKIP.
check_or_skip() {
  local name="$1" rc
  shift
  local log
  log="$(mktemp)"
  "$@" >"$log" 2>&1
  rc=$?
  if [ $rc -eq 77 ]; then
    echo "SKIP $name"
    sed 's/^/    /' "$log"
    rm -f "$log"
    return 0
  fi
  rm -f "$log"
  check "$name" "$@"
}

tools_present() {
  local ok=0
  [ -x "$PY" ] || { echo ".venv missing: run scripts/setup.sh"; ok=1; }
  [ -x "$KUBECTL" ] || { echo "$KUBECTL missing: run scripts/setup.sh"; ok=1; }
  command -v lua5.1 >/dev/null || { echo "lua5.1 missing: run scripts/setup.sh"; ok=1; }
  return $ok
}
check "tools installed (.venv, kubectl $($KUBECTL version --client 2>/dev/null | sed -n 's/Kustomize Version: //p'), lua5.1)" tools_present
if [ "$failed" -ne 0 ]; then
  echo "check-manifests: $passed passed, $failed failed"
  exit 1
fi

# --- YAML style -------------------------------------------------------------
check "yamllint (config/ argo/ charts values tests/chart-values)" \
  offline .venv/bin/yamllint --strict -c scripts/yamllint.yaml \
  config argo tests/chart-values charts/pgbranch/Chart.yaml charts/pgbranch/values.yaml

# --- CRD copies ---------------------------------------------------------------
same_dir() { # same_dir A B: same file names, byte-identical contents
  local a="$1" b="$2" rc=0
  [ -n "$(ls "$a"/*.yaml 2>/dev/null)" ] || { echo "$a has no YAML files"; return 1; }
  diff <(cd "$a" && ls ./*.yaml) <(cd "$b" && ls ./*.yaml) || rc=1
  for f in "$a"/*.yaml; do
    cmp "$f" "$b/$(basename "$f")" || rc=1
  done
  [ $rc -eq 0 ] || echo "drift: run scripts/sync-crds.sh"
  return $rc
}
check "crds/ exists (pgbranch crd --out-dir crds)" test -n "$(ls crds/*.yaml 2>/dev/null)"
check "chart CRDs byte-identical to crds/ (charts/pgbranch/files/crds)" same_dir crds charts/pgbranch/files/crds
check "kustomize CRDs byte-identical to crds/ (config/crd/bases)" same_dir crds config/crd/bases
crd_list_matches() {
  diff <(ls crds/*.yaml | xargs -n1 basename | sed 's|^|bases/|' | sort) \
       <(sed -n 's/^  - //p' config/crd/kustomization.yaml | sort)
}
check "config/crd/kustomization.yaml lists every CRD" crd_list_matches
if [ -s config/admission/protected-branch.yaml ]; then
  check "chart admission policy byte-identical to config/admission" \
    cmp config/admission/protected-branch.yaml charts/pgbranch/files/admission/protected-branch.yaml
  check "config/default installs the admission policy" grep -q '^  - ../admission$' config/default/kustomization.yaml
else
  echo "SKIP admission policy: config/admission/protected-branch.yaml not written yet"
fi

# --- kustomize ----------------------------------------------------------------
check "kustomize config/default renders" \
  bash -c "${OFFLINE[*]} $KUBECTL kustomize config/default > $OUT/kustomize-default.yaml"
for kv in $KUBE_VERSIONS; do
  check "config/default validates against Kubernetes $kv schemas (strict)" \
    offline .venv/bin/kubernetes-validate --strict --quiet -k "$kv" "$OUT/kustomize-default.yaml"
done
check "config/default pods meet PodSecurity restricted" \
  offline "$PY" scripts/manifest_checks.py pod-security "$OUT/kustomize-default.yaml"
check "kustomize config/networkpolicy renders" \
  bash -c "${OFFLINE[*]} $KUBECTL kustomize config/networkpolicy > $OUT/kustomize-networkpolicy.yaml"
for kv in $KUBE_VERSIONS; do
  check "config/networkpolicy validates against Kubernetes $kv schemas (strict)" \
    offline .venv/bin/kubernetes-validate --strict --quiet -k "$kv" "$OUT/kustomize-networkpolicy.yaml"
done
check "config/networkpolicy: only the operator reaches the storage API" \
  offline "$PY" scripts/manifest_checks.py storage-netpol "$OUT/kustomize-default.yaml" "$OUT/kustomize-networkpolicy.yaml"

# --- Helm chart -----------------------------------------------------------------
for values in tests/chart-values/*.yaml; do
  v="$(basename "$values" .yaml)"
  rendered="$OUT/chart-$v.yaml"
  check "chart lints and renders with $values" \
    offline "$PY" scripts/render_chart.py charts/pgbranch "$values" "$rendered"
  [ -s "$rendered" ] || continue
  for kv in $KUBE_VERSIONS; do
    check "chart ($v) validates against Kubernetes $kv schemas (strict)" \
      offline .venv/bin/kubernetes-validate --strict --quiet -k "$kv" "$rendered"
  done
  check "chart ($v) pods meet PodSecurity restricted" \
    offline "$PY" scripts/manifest_checks.py pod-security "$rendered"
  if sed -n '/^networkPolicy:/,/^[a-z]/p' "$values" | grep -q '^  enabled: true' &&
    ! sed -n '/^storage:/,/^[a-z]/p' "$values" | grep -q '^  enabled: false'; then
    check "chart ($v) NetworkPolicy: only the operator reaches the storage API" \
      offline "$PY" scripts/manifest_checks.py storage-netpol "$rendered"
  fi
  if grep -q '^  create: false' "$values"; then
    check "chart ($v) renders no CRDs" offline "$PY" scripts/manifest_checks.py no-crds "$rendered"
  elif [ -n "$(ls crds/*.yaml 2>/dev/null)" ]; then
    check "chart ($v) CRDs equal crds/ plus resource-policy keep" \
      offline "$PY" scripts/manifest_checks.py crds-match crds "$rendered"
  fi
done
rejects_invalid_values() {
  local f rc=0
  for f in tests/chart-values-invalid/*.yaml; do
    if "${OFFLINE[@]}" "$PY" scripts/render_chart.py charts/pgbranch "$f" /dev/null >/dev/null 2>&1; then
      echo "accepted invalid values: $f"
      rc=1
    fi
  done
  return $rc
}
check "chart refuses invalid values (tests/chart-values-invalid)" rejects_invalid_values
if [ -s "$OUT/chart-defaults.yaml" ] && [ -s "$OUT/kustomize-default.yaml" ]; then
  check "chart and config/ grant the operator the same RBAC" \
    offline "$PY" scripts/manifest_checks.py rbac-match "$OUT/chart-defaults.yaml" "$OUT/kustomize-default.yaml"
fi

# The flags the manifests pass exist in the binary they run (built by
# `cargo test` / `cargo build`; skipped when there is no binary yet).
BIN=target/debug/pgbranch
if [ -x "$BIN" ]; then
  check_or_skip "chart and config/ pass only flags that pgbranch accepts ($BIN)" \
    offline "$PY" scripts/manifest_checks.py flags-exist "$BIN" "$OUT"/chart-*.yaml "$OUT/kustomize-default.yaml"
else
  echo "SKIP flags check: $BIN not built (cargo build)"
fi

# --- custom resources against our CRDs ------------------------------------------
if [ -n "$(ls crds/*.yaml 2>/dev/null)" ]; then
  check "config/samples validate against the CRDs' openAPIV3Schema (strict)" \
    offline "$PY" scripts/check_crd_objects.py crds config/samples
  check "Argo CD health test data validate against the CRDs' openAPIV3Schema" \
    offline "$PY" scripts/check_crd_objects.py crds argo/resource_customizations
fi

# --- the checkers themselves refuse known-bad input ---------------------------------
fixtures_refused() {
  local rc=0 f=tests/manifest-fixtures
  if offline "$PY" scripts/check_crd_objects.py crds "$f/bad-sample.yaml" >/dev/null 2>&1; then
    echo "check_crd_objects.py accepted $f/bad-sample.yaml"; rc=1
  fi
  if offline "$PY" scripts/manifest_checks.py pod-security "$f/insecure-deployment.yaml" >/dev/null 2>&1; then
    echo "pod-security accepted $f/insecure-deployment.yaml"; rc=1
  fi
  if offline "$PY" scripts/manifest_checks.py storage-netpol "$f/open-storage-netpol.yaml" >/dev/null 2>&1; then
    echo "storage-netpol accepted $f/open-storage-netpol.yaml"; rc=1
  fi
  if offline .venv/bin/kubernetes-validate --strict --quiet -k 1.36.0 "$f/insecure-deployment.yaml" >/dev/null 2>&1; then
    echo "kubernetes-validate --strict accepted $f/insecure-deployment.yaml"; rc=1
  fi
  return $rc
}
check "checkers refuse the known-bad fixtures (tests/manifest-fixtures)" fixtures_refused

# --- image -----------------------------------------------------------------------
# The storage engine's initdb (the image's PostgreSQL) and the computes'
# default image must be the same major version, or computes cannot start on
# the data directories.
pg_major_consistent() {
  local img chart kust
  img="$(sed -n 's/^ARG PG_MAJOR=//p' Dockerfile)"
  chart="$(sed -n 's/^  image: postgres:\([0-9]*\).*/\1/p' charts/pgbranch/values.yaml)"
  kust="$(sed -n 's/.*--compute-image=postgres:\([0-9]*\).*/\1/p' config/manager/manager.yaml)"
  echo "Dockerfile PG_MAJOR=$img, chart compute.image major=$chart, config/manager major=$kust"
  [ -n "$img" ] && [ "$img" = "$chart" ] && [ "$img" = "$kust" ]
}
check "PostgreSQL major of the image matches the default compute image" pg_major_consistent
image_runs_pgbranch() {
  grep -q -- '--bin pgbranch' Dockerfile && grep -q '^ENTRYPOINT \["pgbranch"\]' Dockerfile &&
    grep -q 'name = "pgbranch"' Cargo.toml
}
check "Dockerfile builds and runs the pgbranch binary" image_runs_pgbranch
# The e2e tier builds the image without Docker from the Dockerfile's own
# recipe (scripts/image_recipe.py): the Dockerfile must stay one it can
# reproduce, and it must refuse the ones it cannot.
check "Dockerfile is reproducible without Docker (scripts/image_recipe.py describe)" \
  offline python3 scripts/image_recipe.py describe
recipe_refuses_fixtures() {
  local f rc=0
  for f in tests/manifest-fixtures/Dockerfile.*; do
    if "${OFFLINE[@]}" python3 scripts/image_recipe.py --dockerfile "$f" describe >/dev/null 2>&1; then
      echo "image_recipe.py accepted $f"
      rc=1
    fi
  done
  return $rc
}
check "image_recipe.py refuses what it cannot reproduce (tests/manifest-fixtures/Dockerfile.*)" \
  recipe_refuses_fixtures

# --- Argo CD health checks ------------------------------------------------------
check "Argo CD health.lua generated from argo/health/ (scripts/argo_health.py)" \
  offline "$PY" scripts/argo_health.py --check

check "Argo CD health.lua pass their test data (lua5.1)" \
  offline "$PY" scripts/check_argo_health.py argo/resource_customizations

check "docs/argocd.md argocd-cm snippet matches the health.lua files" \
  offline "$PY" scripts/argocd_cm_snippet.py --check docs/argocd.md

echo "check-manifests: $passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
  printf '  failed: %s\n' "${failures[@]}"
  exit 1
fi
