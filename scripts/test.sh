#!/usr/bin/env bash
# The test command: sets up, checks formatting and lints, mounts real
# copy-on-write filesystems when root, and runs every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

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
