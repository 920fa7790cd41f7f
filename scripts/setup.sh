#!/usr/bin/env bash
# Installs what pgbranch's build and tests need on a fresh Debian machine
# (idempotent; a second run installs nothing). Run as root, or with sudo
# available. Rust comes with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in postgresql btrfs-progs xfsprogs lua5.1 python3-venv etcd-server openssl xz-utils barman-cli-cloud; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts a cluster (and an etcd) on install; pgbranch's tests run
  # their own servers on ports of their own.
  $SUDO systemctl disable --now postgresql etcd >/dev/null 2>&1 || true
fi

# The real control plane of the operator tests (kube-apiserver and
# kube-controller-manager v1.36.2, etcd from Debian) in .envtest, when the
# shared kit is next to the checkout. Elsewhere see the README ("A real
# control plane for the operator tests").
if [ -x ../shared/envtest/install.sh ]; then
  bash ../shared/envtest/install.sh .envtest >/dev/null
fi

# The backup tests' object store: Garage (crates.io, an S3-compatible
# object store), pinned, built once per machine into a cache outside the
# checkout (a fresh clone reuses it) and linked as .tools/bin/garage. Only
# what a single test node needs (SQLite metadata, no LMDB, metrics or K2V)
# at opt-level 1: ~10 min of CPU on 2 cores; nothing on later runs.
# barman-cli-cloud (above) is the backup tool itself.
GARAGE_VERSION=2.5.0
garage_dir="${PGBRANCH_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgbranch-tools}/garage-$GARAGE_VERSION"
if [ ! -x "$garage_dir/bin/garage" ]; then
  echo "setup: building garage $GARAGE_VERSION into $garage_dir (once per machine)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo install garage --version "$GARAGE_VERSION" --locked --quiet \
      --no-default-features --features bundled-libs,sqlite \
      --root "$garage_dir" --target-dir "$garage_dir/target"
  rm -rf "$garage_dir/target"
fi
mkdir -p .tools/bin
ln -sfn "$garage_dir/bin/garage" .tools/bin/garage

# Python tools for offline manifest validation, pinned, in a project-local venv.
if [ -f scripts/requirements-ci.txt ]; then
  if [ ! -x .venv/bin/python ] || ! cmp -s scripts/requirements-ci.txt .venv/.requirements; then
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-ci.txt
    cp scripts/requirements-ci.txt .venv/.requirements
  fi
  # kubectl (kustomize built in) for the manifest checks, pinned, into .venv/bin.
  bash scripts/install-kubectl.sh
fi
echo "setup: ok"
