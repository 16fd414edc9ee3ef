#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the Go
# module proxy, and helm, into $DINOFLOW_CACHE/bin. None of them is packaged for Debian and no
# download site is reachable, so source builds are the only way; results are cached by version.
set -euo pipefail
KUBE_VERSION="${KUBE_VERSION:-1.37.2}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}"
BIN="$CACHE/bin"
STAMP="$BIN/.control-plane-$KUBE_VERSION"
mkdir -p "$BIN"
# Two setups at once (e.g. a demo started while tests run) wait for one build, not two.
exec 8>"$CACHE/.build-control-plane.lock"
flock 8
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
log() { echo "[build-control-plane] $*"; }

if [[ -f "$STAMP" && -x "$BIN/etcd" && -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" && -x "$BIN/kube-scheduler" && -x "$BIN/kubectl" ]]; then
  log "control plane $KUBE_VERSION cached in $BIN"
else
  work="$CACHE/src/kubernetes-$KUBE_VERSION"
  mkdir -p "$work"
  log "resolving k8s.io/kubernetes v$KUBE_VERSION from the Go module proxy"
  modfile=$(cd "$work" && go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  minor="${KUBE_VERSION#1.}"; staging_version="v0.$minor"
  etcd_version=$(sed -n 's#.*go.etcd.io/etcd/server/v3 \(v[0-9.]*\).*#\1#p' "$modfile" | head -1)
  # k8s.io/kubernetes points its staging modules at ./staging/...; a module outside the repo has
  # to pin each of them to the published k8s.io/X v0.MINOR.PATCH instead.
  {
    echo "module dinoflow.dev/controlplane"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$modfile" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$work/go.mod"
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$work" && { go mod tidy -e >/dev/null 2>&1 || true; })
  (cd "$work" && go mod download)
  log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (several minutes on 2 cores)"
  (cd "$work" && go build -tags tools -o "$BIN/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)

  ework="$CACHE/src/etcd-$etcd_version"
  mkdir -p "$ework"
  cat > "$ework/main.go" <<'GO'
// Tiny etcd entry point: etcd's own main package is not importable, etcdmain is.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  printf 'module dinoflow.dev/etcd\ngo 1.26.0\nrequire go.etcd.io/etcd/server/v3 %s\n' "$etcd_version" > "$ework/go.mod"
  log "building etcd $etcd_version"
  (cd "$ework" && go mod tidy && go build -o "$BIN/etcd" .)
  touch "$STAMP"
  log "control plane $KUBE_VERSION built into $BIN"
fi

if [[ -x "$BIN/helm" && -f "$BIN/.helm-$HELM_VERSION" ]]; then
  log "helm $HELM_VERSION cached"
else
  log "building helm $HELM_VERSION"
  GOBIN="$BIN" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  touch "$BIN/.helm-$HELM_VERSION"
fi
