#!/usr/bin/env bash
# Tier 5: the end-to-end tests (tests/e2e_*.rs) on a real single-node
# Kubernetes cluster. Two ways to get one:
#
# * the k8s-node kit (`../shared/k8s-node`, next to this repository; as
#   root): a real Kubernetes v1.36 node (etcd, kube-apiserver,
#   controller-manager, scheduler, kubelet + containerd, kube-proxy,
#   kube-dns) started on this machine in ~30 s, images built without Docker.
#   Used when that directory exists and we are root; CI runs this
#   (scripts/test.sh).
# * kind (or k3d), on a machine with Docker, helm 3 and kubectl.
#
#   bash scripts/e2e.sh           # everything (see below), then the cluster
#                                 # goes (kit) / is kept for re-runs (kind)
#   bash scripts/e2e.sh ci        # the kit, the core set (what CI runs)
#   bash scripts/e2e.sh up        # cluster, images, operator; prints the export line
#   bash scripts/e2e.sh test      # only the tests, on a cluster made by `up`
#   bash scripts/e2e.sh install [helm|kustomize]   # (re)install the operator
#   bash scripts/e2e.sh uninstall # remove the operator; CRDs, branches and data stay
#   bash scripts/e2e.sh logs      # operator and storage logs into target/e2e/logs
#   bash scripts/e2e.sh down      # delete the cluster (kit: stop and purge it)
#
# `all` on the kit: up.sh; the compute image (PostgreSQL from Debian
# packages, `image.sh postgres`) and the pgbranch image (the release binary
# on it, laid out by the Dockerfile: scripts/image_recipe.py derives the
# build from it and checks the result); pass 1 installs the Helm chart
# (rendered by scripts/render_chart.py, the Helm SDK CI validates it with:
# no helm binary) and runs the tests; pass 2 uninstalls it, installs
# `kubectl apply -k config/default` and runs the tests again; the cluster is
# stopped and purged whatever happens (trap). On kind: create the cluster,
# `docker build` the Dockerfile, load it and postgres:<major>, `helm upgrade
# --install` the chart, run the tests.
#
# Test sets (PGBRANCH_E2E_SET): `full` (default) runs every tests/e2e_* test
# in both passes; `core` (CI) runs the named core set in pass 1 and a
# smaller one in pass 2 (E2E_CORE / E2E_KUSTOMIZE_CORE below).
#
# Storage: the chart uses a hostPath volume ($PGBRANCH_E2E_HOST_DIR, default
# target/e2e/volume on the kit, the node's /var/lib/pgbranch on kind);
# config/default uses a PersistentVolumeClaim, which on the kit is bound to a
# hostPath PersistentVolume made here (no provisioner on the kit), and
# computes in each test namespace get a claim of the same name on the same
# directory (the tests make it when PGBRANCH_E2E_CLAIM_HOST_PATH is set).
# A fresh kit cluster starts with empty volume directories.
#
# Settings (environment):
#   PGBRANCH_E2E_PROVIDER    k8s-node | kind | k3d (default: k8s-node when
#                            ../shared/k8s-node exists and we are root, else
#                            kind, else k3d)
#   PGBRANCH_E2E_SET         full | core
#   PGBRANCH_E2E_PASSES      helm,kustomize (default; `all` only)
#   PGBRANCH_E2E_CLUSTER     kind/k3d cluster name (default pgbranch-e2e)
#   PGBRANCH_E2E_HOST_DIR    host directory for the storage volume
#   PGBRANCH_E2E_PG_MAJOR    PostgreSQL major of image and computes (default 15)
#   PGBRANCH_E2E_DRIVER      force the storage driver: btrfs | reflink | copy
#   PGBRANCH_E2E_NODE_IMAGE  kind node image (Kubernetes >= 1.30 needed for
#                            the ValidatingAdmissionPolicy)
#   PGBRANCH_E2E_TIMEOUT_SECS  per-wait timeout inside the tests (default 300)
#   PGBRANCH_E2E_KEEP_NAMESPACES=1  keep a failed test's namespace to inspect
#   PGBRANCH_E2E_KEEP_CLUSTER=1     kit: do not stop the cluster after `all`
#   K8S_ROOT                 the kit's state directory (default /var/lib/pgbranch-k8s)
#   CARGO_TEST_ARGS          extra args for cargo test before `--`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

KIT=../shared/k8s-node
CLUSTER="${PGBRANCH_E2E_CLUSTER:-pgbranch-e2e}"
PG_MAJOR="${PGBRANCH_E2E_PG_MAJOR:-15}"
WORK="$ROOT/target/e2e"
KUBECONFIG_FILE="$WORK/kubeconfig"
NODE_DIR=/var/lib/pgbranch
RELEASE=pgbranch
RELEASE_NS=pgbranch-system
IMAGE_REPO=pgbranch/pgbranch
COMPUTE_IMAGE="postgres:${PG_MAJOR}"
SET="${PGBRANCH_E2E_SET:-full}"
# The kit's image: the release binary as the Dockerfile builds it, or
# (PGBRANCH_E2E_PROFILE=debug) the same binary without --release.
PROFILE="${PGBRANCH_E2E_PROFILE:-release}"
export K8S_ROOT="${K8S_ROOT:-/var/lib/pgbranch-k8s}"

# The core set (CI): one test per scenario of issue 14 — install; root,
# child and point-in-time child with their rows and the deletion rules;
# the finalize outage through kube-proxy; a read replica; suspend and
# resume; the operator and the storage pod deleted mid-work; uninstall and
# reinstall with branches live — with the Helm chart, then the samples
# with config/default. The full set adds the promotion cycle, the
# multi-step restore, the schedule (4-5 minutes: its controller's minimum
# interval is 1 minute), the protected-branch policy and the CEL refusals,
# and runs everything in both passes.
E2E_CORE=(
  --test e2e_workflows --test e2e_operations --
  --exact
  branch_at_head_and_at_timestamp
  read_replica_serves_reads
  finalize_outage_through_kube_proxy
  suspend_and_resume_keep_data_and_secret
  operator_pod_deleted_mid_restore
  storage_pod_deleted_mid_branch_creation
  reinstall_keeps_branches_and_data
)
E2E_KUSTOMIZE_CORE=(
  --test e2e_operations --
  --exact
  samples_reach_their_expected_state
)

log() { printf 'e2e: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not installed ($2)"
}

provider() {
  if [ -n "${PGBRANCH_E2E_PROVIDER:-}" ]; then
    echo "$PGBRANCH_E2E_PROVIDER"
  elif [ -d "$KIT" ] && [ "$(id -u)" -eq 0 ]; then
    echo k8s-node
  elif command -v kind >/dev/null 2>&1; then
    echo kind
  elif command -v k3d >/dev/null 2>&1; then
    echo k3d
  else
    die "no cluster: neither $KIT (as root) nor kind nor k3d (https://kind.sigs.k8s.io)"
  fi
}
PROVIDER="$(provider)"
case "$PROVIDER" in
  k8s-node | kind | k3d) ;;
  *) die "PGBRANCH_E2E_PROVIDER must be k8s-node, kind or k3d" ;;
esac

if [ "$PROVIDER" = k8s-node ]; then
  HOST_DIR="${PGBRANCH_E2E_HOST_DIR:-$WORK/volume}"
  KUBECTL="$K8S_ROOT/bin/kubectl"
else
  HOST_DIR="${PGBRANCH_E2E_HOST_DIR:-$WORK/volume}"
  KUBECTL=kubectl
fi
# The kit's pass 2: the directory behind the hostPath PersistentVolumes.
CLAIM_DIR="$WORK/volume-claim"

kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# --- kind / k3d ----------------------------------------------------------------

# The node container the storage volume lives in.
node_container() {
  case "$PROVIDER" in
    kind) echo "${CLUSTER}-control-plane" ;;
    k3d) echo "k3d-${CLUSTER}-server-0" ;;
  esac
}

# Prints the copy-on-write kind of the host directory: btrfs, reflink or none.
host_dir_cow() {
  mkdir -p "$HOST_DIR" 2>/dev/null || true
  local fs
  fs="$(stat -f -c %T "$HOST_DIR" 2>/dev/null || echo unknown)"
  if [ "$fs" = btrfs ]; then
    echo btrfs
    return
  fi
  # After a first run the directory belongs to uid 999: probe beside it.
  local dir="$HOST_DIR" probe
  [ -w "$dir" ] || dir="$(dirname "$HOST_DIR")"
  if ! probe="$(mktemp "$dir/.reflink-probe.XXXXXX" 2>/dev/null)"; then
    echo none
    return
  fi
  head -c 65536 /dev/zero >"$probe"
  if cp --reflink=always "$probe" "$probe.clone" 2>/dev/null; then
    echo reflink
  else
    echo none
  fi
  rm -f "$probe" "$probe.clone"
}

cluster_exists() {
  case "$PROVIDER" in
    kind) kind get clusters 2>/dev/null | grep -qx "$CLUSTER" ;;
    k3d) k3d cluster list "$CLUSTER" >/dev/null 2>&1 ;;
  esac
}

create_docker_cluster() {
  mkdir -p "$WORK"
  local cow mount_host=""
  cow="$(host_dir_cow)"
  if [ "$cow" != none ]; then
    mount_host="$(cd "$HOST_DIR" && pwd)"
    log "storage volume: $mount_host ($cow, copy-on-write) mounted at $NODE_DIR in the node"
    if [ "$cow" = btrfs ] && ! findmnt -no OPTIONS -T "$mount_host" 2>/dev/null | grep -q user_subvol_rm_allowed; then
      log "note: $mount_host is btrfs without user_subvol_rm_allowed: the engine (uid 999) cannot delete subvolumes; set PGBRANCH_E2E_DRIVER=reflink or remount with that option"
    fi
  else
    log "storage volume: the node's own $NODE_DIR (no btrfs/reflink host directory: plain copies)"
  fi

  if cluster_exists; then
    log "cluster $CLUSTER exists; reusing it"
  else
    case "$PROVIDER" in
      kind)
        local cfg="$WORK/kind.yaml"
        {
          echo "kind: Cluster"
          echo "apiVersion: kind.x-k8s.io/v1alpha4"
          echo "nodes:"
          echo "  - role: control-plane"
          if [ -n "$mount_host" ]; then
            echo "    extraMounts:"
            echo "      - hostPath: $mount_host"
            echo "        containerPath: $NODE_DIR"
          fi
        } >"$cfg"
        local args=(create cluster --name "$CLUSTER" --config "$cfg" --kubeconfig "$KUBECONFIG_FILE" --wait 120s)
        if [ -n "${PGBRANCH_E2E_NODE_IMAGE:-}" ]; then
          args+=(--image "$PGBRANCH_E2E_NODE_IMAGE")
        fi
        kind "${args[@]}"
        ;;
      k3d)
        local args=(cluster create "$CLUSTER" --servers 1 --agents 0 --wait
          --kubeconfig-update-default=false --kubeconfig-switch-context=false)
        if [ -n "$mount_host" ]; then
          args+=(--volume "$mount_host:$NODE_DIR@server:0")
        fi
        k3d "${args[@]}"
        ;;
    esac
  fi
  case "$PROVIDER" in
    kind) kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE" ;;
    # k3d writes https://0.0.0.0:<port>; 127.0.0.1 is in the serving
    # certificate and is what a TLS client should dial.
    k3d) k3d kubeconfig get "$CLUSTER" | sed 's#https://0\.0\.0\.0:#https://127.0.0.1:#' >"$KUBECONFIG_FILE" ;;
  esac
  chmod 600 "$KUBECONFIG_FILE"
  check_version

  # The hostPath volume: exists, owned by the postgres uid of the images
  # (the storage engine and the computes run as 999).
  docker exec "$(node_container)" sh -c \
    "mkdir -p $NODE_DIR && chown 999:999 $NODE_DIR && chmod 0755 $NODE_DIR"
}

# The ValidatingAdmissionPolicy needs admissionregistration.k8s.io/v1 (1.30+).
check_version() {
  local minor
  minor="$(kc version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -n1)"
  if [ -n "$minor" ] && [ "$minor" -lt 30 ]; then
    die "the cluster runs Kubernetes 1.$minor; pgbranch needs 1.30+ (set PGBRANCH_E2E_NODE_IMAGE)"
  fi
}

image_tag() {
  local tag="e2e"
  if git rev-parse --short HEAD >/dev/null 2>&1; then
    tag="e2e-$(git rev-parse --short HEAD)"
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
      tag="$tag-dirty-$(date +%s)"
    fi
  fi
  echo "$tag"
}

load_docker_images() {
  local image="$1"
  log "building $image (PostgreSQL $PG_MAJOR)"
  DOCKER_BUILDKIT=1 docker build --build-arg "PG_MAJOR=$PG_MAJOR" -t "$image" .
  docker image inspect "$COMPUTE_IMAGE" >/dev/null 2>&1 || docker pull "$COMPUTE_IMAGE"
  case "$PROVIDER" in
    kind) kind load docker-image --name "$CLUSTER" "$image" "$COMPUTE_IMAGE" ;;
    k3d) k3d image import --cluster "$CLUSTER" "$image" "$COMPUTE_IMAGE" ;;
  esac
}

# --- the k8s-node kit ----------------------------------------------------------

kit() { bash "$KIT/$1" "${@:2}"; }

kit_up() {
  [ "$(id -u)" -eq 0 ] || die "the k8s-node kit runs as root"
  [ -d "$KIT" ] || die "no $KIT next to this repository"
  mkdir -p "$WORK"
  log "starting the k8s-node cluster ($KIT/up.sh, K8S_ROOT=$K8S_ROOT)"
  kit up.sh
  install -m 0600 "$K8S_ROOT/kubeconfig" "$KUBECONFIG_FILE"
  check_version
  kc get nodes -o wide >&2
}

# The pgbranch image the way the Dockerfile builds it, without Docker: the
# release binary (the Dockerfile's cargo command) on the kit's PostgreSQL
# image, at the Dockerfile's path and mode, with its USER, ENTRYPOINT, CMD.
kit_images() {
  local tag="$1" recipe base cargo_args
  log "compute image $COMPUTE_IMAGE (Debian's PostgreSQL $PG_MAJOR; rootfs cached in $K8S_ROOT/images)"
  kit image.sh postgres "$PG_MAJOR"

  recipe="$(python3 scripts/image_recipe.py --build-arg "PG_MAJOR=$PG_MAJOR" describe)"
  base="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["base"])' <<<"$recipe")"
  [ "$base" = "postgres:$PG_MAJOR-bookworm" ] \
    || die "the Dockerfile's base image is $base; the kit builds postgres:$PG_MAJOR-bookworm"
  mapfile -t cargo_args < <(python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)["cargo"]))' <<<"$recipe")
  local binary
  binary="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["binary"])' <<<"$recipe")"
  if [ "$PROFILE" = debug ]; then
    # The same build without --release: the binary `cargo test` already
    # built (a release build from scratch takes 10+ minutes on 2 cores).
    local a kept=()
    for a in "${cargo_args[@]}"; do [ "$a" = --release ] || kept+=("$a"); done
    cargo_args=("${kept[@]}")
    binary="${binary/target\/release\//target/debug/}"
  fi
  log "cargo ${cargo_args[*]} (the Dockerfile's build; profile $PROFILE)"
  cargo "${cargo_args[@]}"

  local out="$K8S_ROOT/images/pgbranch-e2e.tar" args
  mapfile -t args < <(python3 scripts/image_recipe.py --build-arg "PG_MAJOR=$PG_MAJOR" kit-args "$binary")
  log "pgbranch image docker.io/$IMAGE_REPO:$tag (+ :0.1.0 for config/default)"
  kit image.sh build "$out" --tag "docker.io/$IMAGE_REPO:$tag" --tag "docker.io/$IMAGE_REPO:0.1.0" \
    --base "$K8S_ROOT/images/postgres-$PG_MAJOR.tar" "${args[@]}"
  python3 scripts/image_recipe.py --build-arg "PG_MAJOR=$PG_MAJOR" verify "$out"
}

# The volume directories exist, owned by the postgres uid the storage
# engine and the computes run as. On a fresh cluster (no release namespace
# yet: nothing can be running on them) they start empty.
volume_dirs() {
  local fresh=0 dir
  kc get namespace "$RELEASE_NS" >/dev/null 2>&1 || fresh=1
  for dir in "$HOST_DIR" "$CLAIM_DIR"; do
    if [ "$fresh" -eq 1 ] && [ -d "$dir" ]; then
      log "fresh cluster: emptying $dir"
      rm -rf "$dir"
    fi
    mkdir -p "$dir"
    chown 999:999 "$dir"
    chmod 0755 "$dir"
  done
}

# --- install / uninstall -------------------------------------------------------

chart_values() {
  local tag="$1" values="$WORK/values.yaml" pull=IfNotPresent path="$NODE_DIR"
  if [ "$PROVIDER" = k8s-node ]; then
    pull=Never
    path="$HOST_DIR"
  fi
  cat >"$values" <<EOF
# Generated by scripts/e2e.sh: one node, hostPath storage, local image.
image:
  repository: $IMAGE_REPO
  tag: "$tag"
  pullPolicy: $pull
compute:
  image: "$COMPUTE_IMAGE"
storage:
  driver: "${PGBRANCH_E2E_DRIVER:-}"
  persistence:
    type: hostPath
    hostPath:
      path: $path
operator:
  logLevel: "info,pgbranch=debug"
EOF
  echo "$values"
}

# The objects of a rendered manifest an uninstall removes: all but the
# CRDs (Helm keeps them: helm.sh/resource-policy), the namespace and claims.
uninstall_manifest() {
  "$ROOT/.venv/bin/python" - "$1" "$2" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = lambda d: (d.get("kind") in ("CustomResourceDefinition", "Namespace", "PersistentVolumeClaim")
                  or (d.get("metadata", {}).get("annotations") or {}).get("helm.sh/resource-policy") == "keep")
yaml.safe_dump_all([d for d in docs if not keep(d)], open(sys.argv[2], "w"), sort_keys=False)
PY
}

wait_installed() {
  kc wait --for=condition=Established --timeout=60s \
    crd/branches.pgbranch.dev crd/snapshots.pgbranch.dev \
    crd/snapshotrestores.pgbranch.dev crd/snapshotschedules.pgbranch.dev
  kc -n "$RELEASE_NS" rollout status "statefulset/$RELEASE-storage" --timeout=5m
  kc -n "$RELEASE_NS" rollout status "deployment/$RELEASE-operator" --timeout=5m
  kc -n "$RELEASE_NS" wait --for=condition=Available --timeout=5m "deployment/$RELEASE-operator"
  kc get validatingadmissionpolicy pgbranch-protected-branch >/dev/null \
    || die "the protected-branch ValidatingAdmissionPolicy is not installed"
  log "operator Ready on $(kc get nodes -o jsonpath='{.items[*].metadata.name}'):"
  kc -n "$RELEASE_NS" get pods -o wide >&2
}

install_helm() {
  local tag="$1" values
  # hostPath volumes are not allowed under the baseline/restricted Pod
  # Security levels: the release namespace (storage pod) must be privileged.
  kc create namespace "$RELEASE_NS" --dry-run=client -o yaml | kc apply -f -
  kc label namespace "$RELEASE_NS" --overwrite pod-security.kubernetes.io/enforce=privileged \
    pod-security.kubernetes.io/warn=privileged
  values="$(chart_values "$tag")"
  if [ "$PROVIDER" = k8s-node ]; then
    # No helm binary: the chart rendered by Helm's own Go SDK, the way CI
    # lints and renders it (scripts/render_chart.py), then applied.
    [ -x .venv/bin/python ] || die ".venv missing: run scripts/setup.sh"
    log "installing charts/pgbranch ($IMAGE_REPO:$tag), rendered by scripts/render_chart.py"
    .venv/bin/python scripts/render_chart.py charts/pgbranch "$values" "$WORK/chart.yaml"
    kc apply --server-side --force-conflicts -f "$WORK/chart.yaml"
    uninstall_manifest "$WORK/chart.yaml" "$WORK/uninstall.yaml"
  else
    need helm "https://helm.sh"
    log "installing charts/pgbranch ($IMAGE_REPO:$tag)"
    helm --kubeconfig "$KUBECONFIG_FILE" upgrade --install "$RELEASE" charts/pgbranch \
      --namespace "$RELEASE_NS" -f "$values" --wait --timeout 5m
  fi
  echo helm >"$WORK/installed-with"
  wait_installed
}

# config/default as it is, with a hostPath PersistentVolume for its claim
# (the kit has no provisioner) and the image tag it names (0.1.0).
install_kustomize() {
  [ "$PROVIDER" = k8s-node ] || die "the kustomize pass runs on the kit (kind: use helm)"
  volume_dirs
  kc apply -f - <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pgbranch-e2e-storage
  labels: {pgbranch.dev/e2e: "true"}
spec:
  capacity: {storage: 50Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: $RELEASE_NS, name: pgbranch-storage-data}
  hostPath: {path: $CLAIM_DIR, type: Directory}
EOF
  log "installing with kubectl apply --server-side -k config/default"
  kc apply --server-side --force-conflicts -k config/default
  kc kustomize config/default >"$WORK/kustomize.yaml"
  uninstall_manifest "$WORK/kustomize.yaml" "$WORK/uninstall.yaml"
  echo kustomize >"$WORK/installed-with"
  wait_installed
}

cmd_install() {
  local how="${1:-$(cat "$WORK/installed-with" 2>/dev/null || echo helm)}"
  case "$how" in
    helm) install_helm "$(cat "$WORK/image-tag" 2>/dev/null || image_tag)" ;;
    kustomize) install_kustomize ;;
    *) die "install helm|kustomize" ;;
  esac
}

# What `helm uninstall` does (or deleting what config/default made): the
# operator, storage, RBAC and policy go; CRDs, namespace, claims, branches
# and their data stay.
cmd_uninstall() {
  if [ "$PROVIDER" != k8s-node ] && [ "$(cat "$WORK/installed-with" 2>/dev/null)" = helm ]; then
    helm --kubeconfig "$KUBECONFIG_FILE" uninstall "$RELEASE" --namespace "$RELEASE_NS" --wait
    return
  fi
  [ -s "$WORK/uninstall.yaml" ] || die "nothing installed by this script ($WORK/uninstall.yaml)"
  log "uninstalling the operator ($(cat "$WORK/installed-with"))"
  kc delete --ignore-not-found --wait=true -f "$WORK/uninstall.yaml"
  kc -n "$RELEASE_NS" wait --for=delete pod -l app.kubernetes.io/part-of=pgbranch --timeout=3m || true
}

# --- tests ---------------------------------------------------------------------

collect_logs() {
  local dir="$WORK/logs"
  mkdir -p "$dir"
  kc -n "$RELEASE_NS" logs "deployment/$RELEASE-operator" --all-containers --tail=-1 \
    >"$dir/operator.log" 2>&1 || true
  kc -n "$RELEASE_NS" logs "deployment/$RELEASE-operator" --all-containers --tail=-1 --previous \
    >"$dir/operator-previous.log" 2>&1 || true
  kc -n "$RELEASE_NS" logs "statefulset/$RELEASE-storage" --all-containers --tail=-1 \
    >"$dir/storage.log" 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp >"$dir/events.txt" 2>&1 || true
  kc get pods -A -o wide >"$dir/pods.txt" 2>&1 || true
  kc get branches,snapshots,snapshotrestores,snapshotschedules -A -o yaml \
    >"$dir/objects.yaml" 2>&1 || true
  if [ "$PROVIDER" = k8s-node ] && [ -d "$K8S_ROOT/logs" ]; then
    cp "$K8S_ROOT"/logs/*.log "$dir/" 2>/dev/null || true
  fi
  log "logs in $dir"
}

# run_tests [CARGO-TEST-ARGS...]: the given selection, else every e2e test.
run_tests() {
  need cargo "https://rustup.rs"
  [ -f "$KUBECONFIG_FILE" ] || die "no $KUBECONFIG_FILE: run 'bash scripts/e2e.sh up' first"
  export PGBRANCH_E2E_KUBECONFIG="$KUBECONFIG_FILE"
  export PGBRANCH_E2E_PSQL_IMAGE="${PGBRANCH_E2E_PSQL_IMAGE:-$COMPUTE_IMAGE}"
  export PGBRANCH_E2E_OPERATOR_NAMESPACE="$RELEASE_NS"
  # The reinstall test uninstalls and installs through this script.
  export PGBRANCH_E2E_INSTALLER="$ROOT/scripts/e2e.sh"
  # On the kit this host reaches Service ClusterIPs: the tests check that
  # storage keeps no timeline or snapshot of a deleted namespace.
  if [ "$PROVIDER" = k8s-node ]; then
    export PGBRANCH_E2E_CHECK_STORAGE=1
  fi
  if [ "$(cat "$WORK/installed-with" 2>/dev/null)" = kustomize ]; then
    export PGBRANCH_E2E_CLAIM_HOST_PATH="$CLAIM_DIR"
  else
    unset PGBRANCH_E2E_CLAIM_HOST_PATH
  fi
  local sel=("$@")
  if [ ${#sel[@]} -eq 0 ]; then
    sel=(--test 'e2e_*' --)
  fi
  local extra=()
  if [ -n "${CARGO_TEST_ARGS:-}" ]; then
    read -r -a extra <<<"$CARGO_TEST_ARGS"
  fi
  # cargo's own arguments come before the `--` in the selection.
  local i cargo_args=() test_args=() seen=0
  for i in "${sel[@]}"; do
    if [ "$seen" -eq 0 ] && [ "$i" = -- ]; then seen=1; continue; fi
    if [ "$seen" -eq 0 ]; then cargo_args+=("$i"); else test_args+=("$i"); fi
  done
  local start=$SECONDS
  if cargo test --locked "${cargo_args[@]}" ${extra[@]+"${extra[@]}"} -- \
    --test-threads=1 --nocapture ${test_args[@]+"${test_args[@]}"}; then
    log "e2e tests passed ($(cat "$WORK/installed-with" 2>/dev/null || echo '?') install, $((SECONDS - start)) s)"
  else
    collect_logs
    die "e2e tests failed"
  fi
}

cmd_test() {
  case "$SET" in
    full) run_tests ;;
    core)
      if [ "$(cat "$WORK/installed-with" 2>/dev/null)" = kustomize ]; then
        run_tests "${E2E_KUSTOMIZE_CORE[@]}"
      else
        run_tests "${E2E_CORE[@]}"
      fi
      ;;
    *) die "PGBRANCH_E2E_SET must be full or core" ;;
  esac
}

cmd_up() {
  local tag
  tag="$(image_tag)"
  case "$PROVIDER" in
    k8s-node)
      kit_up
      kit_images "$tag"
      echo "$tag" >"$WORK/image-tag"
      volume_dirs
      install_helm "$tag"
      ;;
    *)
      need docker "a running Docker engine"
      need helm "https://helm.sh"
      need kubectl "https://kubernetes.io/docs/tasks/tools/"
      docker info >/dev/null 2>&1 || die "the Docker engine is not running"
      need "$PROVIDER" "https://kind.sigs.k8s.io or https://k3d.io"
      create_docker_cluster
      load_docker_images "$IMAGE_REPO:$tag"
      echo "$tag" >"$WORK/image-tag"
      install_helm "$tag"
      ;;
  esac
  log "ready: export PGBRANCH_E2E_KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_down() {
  case "$PROVIDER" in
    k8s-node)
      log "stopping and purging the k8s-node cluster"
      kit down.sh --purge
      ;;
    kind) kind delete cluster --name "$CLUSTER" ;;
    k3d) k3d cluster delete "$CLUSTER" ;;
  esac
  rm -f "$KUBECONFIG_FILE" "$WORK/installed-with" "$WORK/uninstall.yaml"
}

# Everything on the kit: pass 1 with the chart, pass 2 with config/default;
# the cluster goes whatever happens.
kit_all() {
  local start=$SECONDS passes="${PGBRANCH_E2E_PASSES:-helm,kustomize}"
  if [ "${PGBRANCH_E2E_KEEP_CLUSTER:-0}" != 1 ]; then
    trap 'rc=$?; [ $rc -eq 0 ] || collect_logs; cmd_down || true; exit $rc' EXIT
  fi
  cmd_up
  local first=1 pass
  for pass in ${passes//,/ }; do
    if [ "$first" -eq 0 ] || [ "$pass" != helm ]; then
      [ -s "$WORK/uninstall.yaml" ] && cmd_uninstall
      cmd_install "$pass"
    fi
    first=0
    log "pass: $pass, test set: $SET"
    cmd_test
  done
  log "e2e on the k8s-node cluster: done in $((SECONDS - start)) s"
}

case "${1:-all}" in
  up) cmd_up ;;
  test) cmd_test ;;
  install) cmd_install "${2:-}" ;;
  uninstall) cmd_uninstall ;;
  logs) collect_logs ;;
  down) cmd_down ;;
  ci)
    [ "$PROVIDER" = k8s-node ] || die "ci runs on the k8s-node kit"
    SET="${PGBRANCH_E2E_SET:-core}"
    # The binary `cargo test` built: a release build adds 5-10 minutes on
    # 2 cores (PGBRANCH_E2E_PROFILE=release for the Dockerfile's own).
    PROFILE="${PGBRANCH_E2E_PROFILE:-debug}"
    kit_all
    ;;
  all)
    if [ "$PROVIDER" = k8s-node ]; then
      kit_all
    else
      cmd_up && cmd_test
    fi
    ;;
  *) die "usage: $0 [all|ci|up|test|install [helm|kustomize]|uninstall|logs|down]" ;;
esac
