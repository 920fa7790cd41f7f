#!/usr/bin/env bash
# Tier 5: the end-to-end tests (tests/e2e_*.rs) on a real single-node
# cluster, on a developer machine. NOT run by CI (no Docker engine there).
#
# Needs: docker (a running engine), kind (or k3d), helm 3, kubectl, cargo.
#
#   bash scripts/e2e.sh           # up + test (the cluster is kept for re-runs)
#   bash scripts/e2e.sh up        # cluster, image, chart; prints the export line
#   bash scripts/e2e.sh test      # only the tests, on a cluster made by `up`
#   bash scripts/e2e.sh logs      # operator and storage logs into target/e2e/logs
#   bash scripts/e2e.sh down      # delete the cluster
#
# What `up` does:
#   1. creates the cluster `$PGBRANCH_E2E_CLUSTER` (kind, or k3d when kind is
#      missing or PGBRANCH_E2E_PROVIDER=k3d) with its kubeconfig in
#      target/e2e/kubeconfig (your ~/.kube/config is not touched). When the
#      host directory $PGBRANCH_E2E_HOST_DIR (default target/e2e/volume) is on
#      btrfs or on a filesystem with reflinks (XFS reflink=1), it is mounted
#      into the node as the storage volume, so the engine gets a
#      copy-on-write driver; else the node's own directory is used (plain
#      copies: slower, same behaviour).
#   2. `docker build`s the pgbranch image (Dockerfile, PostgreSQL
#      $PGBRANCH_E2E_PG_MAJOR), pulls postgres:<major> (the compute image),
#      and loads both into the node (no registry involved).
#   3. `helm upgrade --install`s charts/pgbranch into pgbranch-system with
#      single-node hostPath storage (/var/lib/pgbranch on the node, owned by
#      uid 999), the image just built, and the compute image; waits until the
#      CRDs are Established and the operator and storage pods are Ready.
# `test` then runs:
#   PGBRANCH_E2E_KUBECONFIG=target/e2e/kubeconfig \
#     cargo test --test 'e2e_*' -- --test-threads=1
# Each test makes its own namespace (pgbranch-e2e-*) and deletes it at the end.
#
# Settings (environment):
#   PGBRANCH_E2E_CLUSTER     cluster name (default pgbranch-e2e)
#   PGBRANCH_E2E_PROVIDER    kind | k3d (default: kind when installed)
#   PGBRANCH_E2E_HOST_DIR    host directory for the storage volume
#   PGBRANCH_E2E_PG_MAJOR    PostgreSQL major of image and computes (default 15)
#   PGBRANCH_E2E_DRIVER      force the storage driver: btrfs | reflink | copy
#   PGBRANCH_E2E_NODE_IMAGE  kind node image (Kubernetes >= 1.30 needed for
#                            the ValidatingAdmissionPolicy)
#   PGBRANCH_E2E_TIMEOUT_SECS  per-wait timeout inside the tests (default 300)
#   PGBRANCH_E2E_KEEP_NAMESPACES=1  keep a failed test's namespace to inspect
#   CARGO_TEST_ARGS          extra args for cargo test before `--`, e.g. a
#                            test name filter
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

CLUSTER="${PGBRANCH_E2E_CLUSTER:-pgbranch-e2e}"
PG_MAJOR="${PGBRANCH_E2E_PG_MAJOR:-15}"
WORK="$ROOT/target/e2e"
KUBECONFIG_FILE="$WORK/kubeconfig"
HOST_DIR="${PGBRANCH_E2E_HOST_DIR:-$WORK/volume}"
NODE_DIR=/var/lib/pgbranch
RELEASE=pgbranch
RELEASE_NS=pgbranch-system
IMAGE_REPO=pgbranch/pgbranch
COMPUTE_IMAGE="postgres:${PG_MAJOR}"

log() { printf 'e2e: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not installed ($2)"
}

provider() {
  if [ -n "${PGBRANCH_E2E_PROVIDER:-}" ]; then
    echo "$PGBRANCH_E2E_PROVIDER"
  elif command -v kind >/dev/null 2>&1; then
    echo kind
  elif command -v k3d >/dev/null 2>&1; then
    echo k3d
  else
    die "neither kind nor k3d is installed (https://kind.sigs.k8s.io)"
  fi
}

kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# The node container the storage volume lives in.
node_container() {
  case "$(provider)" in
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
  case "$(provider)" in
    kind) kind get clusters 2>/dev/null | grep -qx "$CLUSTER" ;;
    k3d) k3d cluster list "$CLUSTER" >/dev/null 2>&1 ;;
  esac
}

create_cluster() {
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
    case "$(provider)" in
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
  case "$(provider)" in
    kind) kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE" ;;
    # k3d writes https://0.0.0.0:<port>; 127.0.0.1 is in the serving
    # certificate and is what a TLS client should dial.
    k3d) k3d kubeconfig get "$CLUSTER" | sed 's#https://0\.0\.0\.0:#https://127.0.0.1:#' >"$KUBECONFIG_FILE" ;;
  esac
  chmod 600 "$KUBECONFIG_FILE"

  # The ValidatingAdmissionPolicy needs admissionregistration.k8s.io/v1 (1.30+).
  local minor
  minor="$(kc version -o json | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | tail -n1)"
  if [ -n "$minor" ] && [ "$minor" -lt 30 ]; then
    die "the cluster runs Kubernetes 1.$minor; pgbranch needs 1.30+ (set PGBRANCH_E2E_NODE_IMAGE)"
  fi

  # The hostPath volume: exists, owned by the postgres uid of the images
  # (the storage engine and the computes run as 999).
  docker exec "$(node_container)" sh -c \
    "mkdir -p $NODE_DIR && chown 999:999 $NODE_DIR && chmod 0755 $NODE_DIR"
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

load_images() {
  local image="$1"
  log "building $image (PostgreSQL $PG_MAJOR)"
  DOCKER_BUILDKIT=1 docker build --build-arg "PG_MAJOR=$PG_MAJOR" -t "$image" .
  docker image inspect "$COMPUTE_IMAGE" >/dev/null 2>&1 || docker pull "$COMPUTE_IMAGE"
  case "$(provider)" in
    kind) kind load docker-image --name "$CLUSTER" "$image" "$COMPUTE_IMAGE" ;;
    k3d) k3d image import --cluster "$CLUSTER" "$image" "$COMPUTE_IMAGE" ;;
  esac
}

install_chart() {
  local tag="$1"
  # hostPath volumes are not allowed under the baseline/restricted Pod
  # Security levels: the release namespace (storage pod) must be privileged.
  kc create namespace "$RELEASE_NS" --dry-run=client -o yaml | kc apply -f -
  kc label namespace "$RELEASE_NS" --overwrite pod-security.kubernetes.io/enforce=privileged

  local values="$WORK/values.yaml"
  cat >"$values" <<EOF
# Generated by scripts/e2e.sh: one node, hostPath storage, local image.
image:
  repository: $IMAGE_REPO
  tag: "$tag"
  pullPolicy: IfNotPresent
compute:
  image: "$COMPUTE_IMAGE"
storage:
  driver: "${PGBRANCH_E2E_DRIVER:-}"
  persistence:
    type: hostPath
    hostPath:
      path: $NODE_DIR
operator:
  logLevel: "info,pgbranch=debug"
EOF
  log "installing charts/pgbranch ($IMAGE_REPO:$tag)"
  helm --kubeconfig "$KUBECONFIG_FILE" upgrade --install "$RELEASE" charts/pgbranch \
    --namespace "$RELEASE_NS" -f "$values" --wait --timeout 5m

  kc wait --for=condition=Established --timeout=60s \
    crd/branches.pgbranch.dev crd/snapshots.pgbranch.dev \
    crd/snapshotrestores.pgbranch.dev crd/snapshotschedules.pgbranch.dev
  kc -n "$RELEASE_NS" rollout status "statefulset/$RELEASE-storage" --timeout=5m
  kc -n "$RELEASE_NS" rollout status "deployment/$RELEASE-operator" --timeout=5m
  kc -n "$RELEASE_NS" wait --for=condition=Available --timeout=5m "deployment/$RELEASE-operator"
  kc get validatingadmissionpolicy pgbranch-protected-branch >/dev/null \
    || die "the protected-branch ValidatingAdmissionPolicy is not installed"
  log "operator Ready"
}

collect_logs() {
  local dir="$WORK/logs"
  mkdir -p "$dir"
  kc -n "$RELEASE_NS" logs "deployment/$RELEASE-operator" --all-containers --tail=-1 \
    >"$dir/operator.log" 2>&1 || true
  kc -n "$RELEASE_NS" logs "statefulset/$RELEASE-storage" --all-containers --tail=-1 \
    >"$dir/storage.log" 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp >"$dir/events.txt" 2>&1 || true
  kc get branches,snapshots,snapshotrestores,snapshotschedules -A -o yaml \
    >"$dir/objects.yaml" 2>&1 || true
  log "logs in $dir"
}

cmd_up() {
  need docker "a running Docker engine"
  need helm "https://helm.sh"
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  docker info >/dev/null 2>&1 || die "the Docker engine is not running"
  case "$(provider)" in
    kind) need kind "https://kind.sigs.k8s.io" ;;
    k3d) need k3d "https://k3d.io" ;;
    *) die "PGBRANCH_E2E_PROVIDER must be kind or k3d" ;;
  esac
  create_cluster
  local tag
  tag="$(image_tag)"
  load_images "$IMAGE_REPO:$tag"
  install_chart "$tag"
  log "ready: export PGBRANCH_E2E_KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_test() {
  need cargo "https://rustup.rs"
  [ -f "$KUBECONFIG_FILE" ] || die "no $KUBECONFIG_FILE: run 'bash scripts/e2e.sh up' first"
  export PGBRANCH_E2E_KUBECONFIG="$KUBECONFIG_FILE"
  export PGBRANCH_E2E_PSQL_IMAGE="${PGBRANCH_E2E_PSQL_IMAGE:-$COMPUTE_IMAGE}"
  export PGBRANCH_E2E_OPERATOR_NAMESPACE="$RELEASE_NS"
  local extra=()
  if [ -n "${CARGO_TEST_ARGS:-}" ]; then
    read -r -a extra <<<"$CARGO_TEST_ARGS"
  fi
  if cargo test --locked --test 'e2e_*' ${extra[@]+"${extra[@]}"} -- --test-threads=1 --nocapture; then
    log "all e2e tests passed"
  else
    collect_logs
    die "e2e tests failed"
  fi
}

cmd_down() {
  case "$(provider)" in
    kind) kind delete cluster --name "$CLUSTER" ;;
    k3d) k3d cluster delete "$CLUSTER" ;;
  esac
  rm -f "$KUBECONFIG_FILE"
}

case "${1:-all}" in
  up) cmd_up ;;
  test) cmd_test ;;
  logs) collect_logs ;;
  down) cmd_down ;;
  all) cmd_up && cmd_test ;;
  *) die "usage: $0 [up|test|logs|down|all]" ;;
esac
