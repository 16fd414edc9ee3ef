#!/usr/bin/env bash
# Builds Kubeflow's training-operator v1.8.1 (the comparison in bench/operator_scale.sh,
# issue 15) from the Go module proxy and copies its CRDs from the same module:
#
#   bench/kubeflow/build.sh        # prints the directory holding training-operator.v1 and crds/
#
# Not part of scripts/setup.sh or CI: only the benchmark needs it, and it downloads the module
# and its dependencies (~100 MiB) and compiles for minutes. Cached: a second call finds the
# binary and the CRDs in $DINOFLOW_CACHE/kubeflow-v1.8.1 and does nothing.
set -euo pipefail
VERSION=v1.8.1
MODULE=github.com/kubeflow/training-operator
DEST="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}/kubeflow-$VERSION"
log() { printf '[kubeflow-build] %s\n' "$*" >&2; }

have_manifests() { [[ -s "$DEST/crds/kubeflow.org_pytorchjobs.yaml" && -s "$DEST/webhook/manifests.yaml" ]]; }
if [[ -x "$DEST/training-operator.v1" ]] && have_manifests; then
  log "cached in $DEST"
  echo "$DEST"
  exit 0
fi
command -v go >/dev/null || {
  log "needs Go (1.21 or newer) on PATH"
  exit 1
}
mkdir -p "$DEST"
if [[ ! -x "$DEST/training-operator.v1" ]]; then
  log "go install $MODULE/cmd/training-operator.v1@$VERSION (minutes)"
  # GOFLAGS=-mod=mod: the module's own go.mod decides the dependency versions, as upstream builds.
  GOBIN="$DEST" GOFLAGS=-mod=mod go install "$MODULE/cmd/training-operator.v1@$VERSION"
fi
# The CRDs and the webhook configuration come from the same module version (in the module
# cache after go install; downloaded when the binary was cached but the module was not).
MOD_DIR="$(go env GOMODCACHE)/$MODULE@$VERSION"
[[ -d "$MOD_DIR/manifests/base/webhook" ]] || GOFLAGS=-mod=mod go mod download "$MODULE@$VERSION"
mkdir -p "$DEST/crds" "$DEST/webhook"
cp "$MOD_DIR"/manifests/base/crds/kubeflow.org_*.yaml "$DEST/crds/"
cp "$MOD_DIR"/manifests/base/webhook/*.yaml "$DEST/webhook/"
chmod -R u+w "$DEST/crds" "$DEST/webhook"
log "built into $DEST"
echo "$DEST"
