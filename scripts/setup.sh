#!/usr/bin/env bash
# Installs what pgbranch's build and tests need on a fresh Debian machine
# (idempotent; a second run installs nothing). Run as root, or with sudo
# available. Rust comes with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in postgresql btrfs-progs xfsprogs lua5.1 python3-venv etcd-server openssl xz-utils; do
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
