#!/usr/bin/env bash
# Fills the krew manifest template (plugins/krew/pgbranch.yaml) for a
# release: the version, the release URL and the sha256 of each archive,
# computed from the archives themselves (never typed in). Prints the
# manifest; fails if an archive is missing or a placeholder is left.
#
#   bash scripts/krew-manifest.sh VERSION BASE_URL DIST_DIR [HOMEPAGE]
#
# VERSION is v-prefixed semver (v0.1.0); BASE_URL is where the archives
# are published (https://...); DIST_DIR holds
# pgbranch-VERSION-linux-{amd64,arm64}.tar.gz.
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 VERSION BASE_URL DIST_DIR [HOMEPAGE]" >&2
  exit 2
fi
version=$1 base=${2%/} dist=$3 homepage=${4:-$base}
here=$(cd "$(dirname "$0")/.." && pwd)

[[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] ||
  { echo "version $version is not v-prefixed semver" >&2; exit 2; }
[[ $base == https://* ]] || { echo "BASE_URL must be https://" >&2; exit 2; }

sum() {
  local f="$dist/pgbranch-$version-linux-$1.tar.gz"
  [ -f "$f" ] || { echo "missing $f" >&2; exit 1; }
  sha256sum "$f" | cut -d' ' -f1
}
amd64=$(sum amd64)
arm64=$(sum arm64)

out=$(sed -e "s|@VERSION@|$version|g" \
  -e "s|@RELEASE_BASE_URL@|$base|g" \
  -e "s|@HOMEPAGE@|$homepage|g" \
  -e "s|@SHA256_LINUX_AMD64@|$amd64|g" \
  -e "s|@SHA256_LINUX_ARM64@|$arm64|g" \
  "$here/plugins/krew/pgbranch.yaml" | grep -v '^#')
if grep -q '@[A-Z0-9_]*@' <<<"$out"; then
  echo "placeholders left:" >&2
  grep -o '@[A-Z0-9_]*@' <<<"$out" | sort -u >&2
  exit 1
fi
printf '%s\n' "$out"
