#!/usr/bin/env bash
# The test command: sets up, checks formatting and lints, mounts real
# copy-on-write filesystems when root, and runs every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Operator tests run on a real control plane (tests/support/cluster.rs):
# the one setup.sh unpacked, unless KUBEBUILDER_ASSETS names another. With
# binaries at hand a missing control plane is a failure, not a skip.
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -x .envtest/kube-apiserver ]; then
  export KUBEBUILDER_ASSETS="$PWD/.envtest"
fi
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  export PGBRANCH_REQUIRE_CONTROL_PLANE=1
  echo "test: operator tests on the real control plane in $KUBEBUILDER_ASSETS"
else
  echo "test: KUBEBUILDER_ASSETS not set: the operator tests skip (see README)"
fi

# The backup tests' object store and tool (setup.sh installs both): with
# them at hand, a test that cannot start them fails instead of skipping.
if [ -x .tools/bin/garage ] && [ -x /usr/bin/barman-cloud-wal-archive ]; then
  export PGBRANCH_REQUIRE_OBJECT_STORE=1
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

# Real btrfs and XFS(reflink) volumes on loop files, when root.
# shellcheck source=scripts/test-volumes.sh
source scripts/test-volumes.sh
mount_test_volumes
trap unmount_test_volumes EXIT

cargo test --locked --all-targets -- --test-threads="${PGBRANCH_TEST_THREADS:-2}"

if [ -x scripts/check-manifests.sh ]; then
  bash scripts/check-manifests.sh
fi

# Tier 5: end to end on a real single-node Kubernetes cluster, the k8s-node
# kit next to this repository (root only): the core set with the Helm chart,
# then config/default (scripts/e2e.sh ci; `bash scripts/e2e.sh` runs the
# full set). Elsewhere it needs kind: see docs/e2e.md.
if [ "$(id -u)" -eq 0 ] && [ -d ../shared/k8s-node ]; then
  bash scripts/e2e.sh ci
else
  echo "SKIP e2e tier (tier 5): needs root and ../shared/k8s-node; with kind: bash scripts/e2e.sh (docs/e2e.md)"
fi
