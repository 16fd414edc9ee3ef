#!/usr/bin/env bash
# Builds what a real local node needs (scripts/node.sh) into $DINOFLOW_CACHE/bin, from the Go
# module proxy, cached by version (a stamp file per component; a second run takes a second):
#   kubelet          k8s.io/kubernetes v$KUBE_VERSION (the control plane's version), version-stamped
#   containerd       containerd, containerd-shim-runc-v2, ctr ($CONTAINERD_VERSION)
#   cni/             CNI plugins bridge, host-local, loopback, portmap ($CNI_VERSION)
#   coredns          CoreDNS ($COREDNS_VERSION) with only the plugins node.sh's Corefile uses
#   dinoflow-pause   the pod sandbox's PID 1 (scripts/pause/), made into the pause image by node.sh
# Each build logs its wall time. Cold times measured on the shared 2-core VM: scripts/NODE.md.
#   scripts/build-node.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUBE_VERSION="${KUBE_VERSION:-1.37.2}"
CONTAINERD_VERSION="${CONTAINERD_VERSION:-v2.4.2}"
CNI_VERSION="${CNI_VERSION:-v1.10.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
CACHE="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}"
BIN="$CACHE/bin"
mkdir -p "$BIN/cni"
exec 8>"$CACHE/.build-node.lock"
flock 8
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
log() { echo "[build-node] $*"; }
timed() {
  local what=$1 start=$SECONDS
  shift
  "$@"
  log "$what built in $((SECONDS - start)) s"
}

kubelet() {
  local stamp="$BIN/.kubelet-$KUBE_VERSION"
  if [[ -f "$stamp" && -x "$BIN/kubelet" ]]; then log "kubelet $KUBE_VERSION cached"; return 0; fi
  local work="$CACHE/src/kubelet-$KUBE_VERSION" modfile
  mkdir -p "$work"
  modfile=$(cd "$work" && go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  # Same module layout as build-control-plane.sh: the staging modules pinned to k8s.io/X v0.MINOR.
  {
    echo "module dinoflow.dev/kubelet"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$modfile" | awk -v v="v0.${KUBE_VERSION#1.}" '{print "replace " $1 " => " $1 " " v}'
  } >"$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kubelet"\n' >"$work/tools.go"
  # Without tidy -e the build stops at "missing go.sum entry ... k8s.io/cri-streaming".
  (cd "$work" && { go mod tidy -e >/dev/null 2>&1 || true; })
  local v=component-base/version
  # Unstamped, the node reports kubeletVersion v0.0.0-master.
  (cd "$work" && go build -tags tools -o "$BIN/kubelet" \
    -ldflags "-X k8s.io/$v.gitVersion=v$KUBE_VERSION -X k8s.io/$v.gitMajor=1 -X k8s.io/$v.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION") -X k8s.io/$v.gitTreeState=clean" \
    k8s.io/kubernetes/cmd/kubelet)
  touch "$stamp"
}

containerd() {
  local stamp="$BIN/.containerd-$CONTAINERD_VERSION" c
  if [[ -f "$stamp" && -x "$BIN/containerd" && -x "$BIN/containerd-shim-runc-v2" && -x "$BIN/ctr" ]]; then
    log "containerd $CONTAINERD_VERSION cached"; return 0
  fi
  for c in containerd containerd-shim-runc-v2 ctr; do
    GOBIN="$BIN" go install -ldflags "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
      "github.com/containerd/containerd/v2/cmd/$c@$CONTAINERD_VERSION"
  done
  touch "$stamp"
}

cni_plugins() {
  local stamp="$BIN/cni/.plugins-$CNI_VERSION" p
  if [[ -f "$stamp" && -x "$BIN/cni/bridge" && -x "$BIN/cni/host-local" && -x "$BIN/cni/loopback" && -x "$BIN/cni/portmap" ]]; then
    log "CNI plugins $CNI_VERSION cached"; return 0
  fi
  for p in main/bridge ipam/host-local main/loopback meta/portmap; do
    GOBIN="$BIN/cni" go install "github.com/containernetworking/plugins/plugins/$p@$CNI_VERSION"
  done
  touch "$stamp"
}

coredns() {
  local stamp="$BIN/.coredns-$COREDNS_VERSION"
  if [[ -f "$stamp" && -x "$BIN/coredns" ]]; then log "CoreDNS $COREDNS_VERSION cached"; return 0; fi
  local work="$CACHE/src/coredns-$COREDNS_VERSION"
  mkdir -p "$work"
  # CoreDNS's own main links ~60 plugins (cloud DNS providers among them); the node needs a
  # handful, so a small main registers those in the order of CoreDNS's plugin.cfg.
  cat >"$work/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	"github.com/coredns/coredns/coremain"
)

func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
  printf 'module dinoflow.dev/coredns\ngo 1.26.0\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" >"$work/go.mod"
  (cd "$work" && go mod tidy && go build -o "$BIN/coredns" \
    -ldflags "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" .)
  touch "$stamp"
}

pause() {
  local want stamp
  want=$(cat "$ROOT/scripts/pause/go.mod" "$ROOT/scripts/pause/main.go" | sha256sum | cut -c1-16)
  stamp="$BIN/.dinoflow-pause-$want"
  if [[ -f "$stamp" && -x "$BIN/dinoflow-pause" ]]; then log "dinoflow-pause cached"; return 0; fi
  rm -f "$BIN"/.dinoflow-pause-*
  (cd "$ROOT/scripts/pause" && go build -trimpath -ldflags '-s -w' -o "$BIN/dinoflow-pause" .)
  touch "$stamp"
}

command -v go >/dev/null || { echo "[build-node] error: go not found (Go >= 1.26 builds the node from the module proxy)" >&2; exit 1; }
timed "dinoflow-pause" pause
timed "CNI plugins $CNI_VERSION" cni_plugins
timed "containerd $CONTAINERD_VERSION" containerd
timed "CoreDNS $COREDNS_VERSION" coredns
timed "kubelet v$KUBE_VERSION" kubelet
