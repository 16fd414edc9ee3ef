#!/usr/bin/env bash
# Sets up everything Dinoflow needs on this machine, from nothing or from a previous run:
#   Debian packages, the Python venv with torch (libtorch for tch), the Rust toolchain pieces,
#   and the control-plane binaries (etcd, kube-apiserver, ...) plus helm built from source, and
#   the real node's (kubelet, containerd, CNI plugins, CoreDNS: scripts/build-node.sh).
# Idempotent: each step checks a stamp or the installed state first, so a second run takes
# seconds. Prints what it does; exits non-zero with the failing step named.
#   scripts/setup.sh
set -Eeuo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
# Steps run with errexit in force (no `|| die`, which would switch it off inside them); the ERR
# trap names the step that failed.
current_step=""
trap 'printf "[setup] error: step \"%s\" failed (exit %s)\n" "$current_step" "$?" >&2' ERR
step() {
  local start=$SECONDS
  current_step=$1
  shift
  "$@"
  log "$current_step: ok ($((SECONDS - start)) s)"
}

# Debian packages the project uses: protoc for the gRPC progress protocol (tonic-prost-build),
# Fashion-MNIST for real-data training runs, openssl/curl for the local cluster's certificates
# and health checks, shellcheck for the script lint in scripts/test.sh, prometheus for
# promtool (the alert rules' checks and tests in tests/tests/observability.rs).
APT_PACKAGES=(protobuf-compiler dataset-fashion-mnist openssl curl shellcheck prometheus)
# Containers: buildah builds images daemonless (scripts/images.sh; the node's pause and test
# images), runc runs them (the real node of scripts/node.sh, and podman in tests/tests/images.rs:
# crun refuses this machine's hybrid cgroup layout), busybox-static is the test image's shell,
# iproute2 makes the node's CNI bridge.
APT_PACKAGES+=(buildah podman runc busybox-static iproute2)
# Node.js and npm install and run the dashboard schema check (npm_packages below); a Node.js
# already on the PATH (e.g. from NodeSource) is used as it is.
if ! command -v npm >/dev/null; then
  APT_PACKAGES+=(nodejs npm)
fi

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

apt_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "Debian packages present: ${APT_PACKAGES[*]}"
    return 0
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Other apt users (unattended upgrades, a parallel setup) hold the lock briefly: wait for it.
  as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  as_root apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
}

python_venv() {
  local req="$ROOT/scripts/requirements.txt" stamp="$DINOFLOW_VENV/.dinoflow-requirements.sha256" want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [[ -x "$DINOFLOW_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "venv $DINOFLOW_VENV up to date with scripts/requirements.txt"
  else
    if [[ ! -x "$DINOFLOW_VENV/bin/python" ]]; then
      local py="${PYTHON:-python3}"
      command -v "$py" >/dev/null || die "no $py found: install Python >= 3.10 or set PYTHON"
      log "creating venv $DINOFLOW_VENV with $("$py" --version 2>&1)"
      "$py" -m venv "$DINOFLOW_VENV"
    fi
    log "pip install -r scripts/requirements.txt (first time: torch with its CUDA libraries, a few GB)"
    "$DINOFLOW_VENV/bin/pip" install --disable-pip-version-check --no-input --progress-bar off -q -r "$req"
    "$DINOFLOW_VENV/bin/python" -c 'import torch, torchvision' || die "torch does not import after pip install"
    printf '%s\n' "$want" >"$stamp"
  fi
  # cudarc opens NCCL by its unversioned name; the wheel ships only libnccl.so.2.
  local nccl
  for nccl in "$DINOFLOW_VENV"/lib/python3*/site-packages/nvidia/nccl/lib; do
    if [[ -e "$nccl/libnccl.so.2" && ! -e "$nccl/libnccl.so" ]]; then
      ln -s libnccl.so.2 "$nccl/libnccl.so"
      log "linked $nccl/libnccl.so -> libnccl.so.2"
    fi
  done
  # Package metadata, not `import torch`: the import alone takes seconds to tens of seconds.
  "$DINOFLOW_VENV/bin/python" -c 'from importlib.metadata import version as v; print("[setup] torch", v("torch"), "torchvision", v("torchvision"))'
  compgen -G "$DINOFLOW_VENV/lib/python3*/site-packages/torch/lib/libtorch.so" >/dev/null ||
    die "libtorch.so missing from the torch wheel in $DINOFLOW_VENV (tch needs it); delete the venv and re-run"
}

rust_toolchain() {
  command -v cargo >/dev/null || die "cargo not found: install Rust >= 1.95 with rustup (https://rustup.rs)"
  if command -v rustup >/dev/null; then
    local have
    have=$(rustup component list --installed 2>/dev/null || true)
    local comp
    for comp in rustfmt clippy; do
      if ! grep -q "^$comp" <<<"$have"; then
        log "adding rustup component $comp"
        rustup component add "$comp"
      fi
    done
  fi
  log "$(rustc --version), $(cargo --version)"
}

# Grafana's dashboard schema and TypeScript, pinned in scripts/npm/package.json, into
# $DINOFLOW_CACHE/npm (the dashboards are type-checked against it by the test suite).
npm_packages() {
  local dir="$DINOFLOW_CACHE/npm" src="$ROOT/scripts/npm/package.json" want
  want=$(sha256sum "$src" | cut -d' ' -f1)
  if [[ -f "$dir/.dinoflow-package.sha256" && "$(cat "$dir/.dinoflow-package.sha256")" == "$want" &&
        -d "$dir/node_modules/@grafana/schema" && -f "$dir/node_modules/typescript/bin/tsc" ]]; then
    log "npm packages in $dir up to date with scripts/npm/package.json"
    return 0
  fi
  mkdir -p "$dir"
  cp "$src" "$dir/package.json"
  log "npm install @grafana/schema and typescript into $dir"
  (cd "$dir" && npm install --no-audit --no-fund --no-progress --loglevel=error)
  printf '%s\n' "$want" >"$dir/.dinoflow-package.sha256"
}

control_plane() {
  command -v go >/dev/null || die "go not found: the control plane is built from the Go module proxy and needs Go >= 1.26"
  bash "$ROOT/scripts/build-control-plane.sh"
}

start=$SECONDS
log "cache: $DINOFLOW_CACHE"
step "Debian packages" apt_packages
step "Python venv" python_venv
step "Rust toolchain" rust_toolchain
step "npm packages" npm_packages
step "control plane" control_plane
step "real node" bash "$ROOT/scripts/build-node.sh"
log "done in $((SECONDS - start)) s; now: source scripts/env.sh"
