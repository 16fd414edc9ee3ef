#!/usr/bin/env bash
# Builds the container images without a daemon (buildah) and without pulling anything: each
# image is FROM scratch, its context staged here from the built binary, exactly the shared
# libraries it loads (ldd) and an /etc/passwd with the non-root user 1000.
#
#   scripts/images.sh [--gpu] [--profile dev|release] [--bin-dir DIR]
#
# Images (tags = the chart's appVersion, charts/dinoflow/Chart.yaml):
#   ghcr.io/dinoflow/dinoflow-operator:<v>      operator/Containerfile
#   ghcr.io/dinoflow/dinoflow-trainer:<v>-cpu   trainer/Containerfile       (tests, the demo)
#   ghcr.io/dinoflow/dinoflow-trainer:<v>       trainer/Containerfile.cuda  (--gpu only: GBs)
# Each is exported as an oci-archive (`ctr images import`, `podman load`) to
# $DINOFLOW_CACHE/images/<name>-<tag>.oci.tar and rebuilt only when its inputs change (the
# sha256 of the staged context, binary and libraries included, and of the Containerfile).
# Stdout: one line per image, "<reference> <archive>"; progress goes to stderr.
#
# --profile: the cargo profile of the binaries. dev (default): the binaries the test suite
# builds anyway, stripped of debug info, so CI pays no extra compile; release: optimised
# binaries for a production image (a second cold build of every crate). Also
# DINOFLOW_IMAGE_PROFILE. --bin-dir: take dinoflow-operator and dinoflow-trainer from DIR
# instead of building them (the tests pass the binaries they built).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

GPU=0
BIN_DIR=""
PROFILE="${DINOFLOW_IMAGE_PROFILE:-dev}"
while (($#)); do
  case "$1" in
    --gpu) GPU=1 ;;
    --profile) PROFILE="${2:?--profile needs dev or release}"; shift ;;
    --bin-dir) BIN_DIR="${2:?--bin-dir needs a directory}"; shift ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
case "$PROFILE" in
  dev) PROFILE_DIR=debug ;;
  release) PROFILE_DIR=release ;;
  *) die "--profile must be dev or release, not $PROFILE" ;;
esac

# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
for tool in buildah cargo ldd strip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs it)"
done

VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/charts/dinoflow/Chart.yaml")"
[[ -n "$VERSION" ]] || die "no appVersion in charts/dinoflow/Chart.yaml"
REGISTRY=ghcr.io/dinoflow
# DINOFLOW_IMAGES_DIR: where the archives go (default $DINOFLOW_CACHE/images); worktrees building
# different binaries at once each set their own.
OUT="${DINOFLOW_IMAGES_DIR:-$DINOFLOW_CACHE/images}"
mkdir -p "$OUT"
# One run at a time per output directory: every run stages into the same context directories
# and replaces the same archives, so two at once (the tests of one binary, a demo beside the
# suite) hashed each other's half-staged files and deleted a context under a running build.
exec 9>"$OUT/.lock"
if ! flock --nonblock 9; then
  log "waiting for another scripts/images.sh writing to $OUT"
  flock 9
fi

SITE="$(find "$DINOFLOW_VENV"/lib -maxdepth 2 -name site-packages -path '*/python3*' 2>/dev/null | head -1)"
[[ -d "$SITE/torch/lib" ]] || die "no torch wheel in $DINOFLOW_VENV (run scripts/setup.sh)"
SITE="$(realpath "$SITE")"
# Where the wheel's site-packages tree lands in the trainer images (its $ORIGIN rpaths, e.g.
# torch/lib -> ../../nvidia/cu13/lib, keep working).
LIBTORCH_DIR=/opt/libtorch

if [[ -z "$BIN_DIR" ]]; then
  log "building the binaries ($PROFILE profile)"
  start=$SECONDS
  profile_flag=()
  [[ "$PROFILE" == release ]] && profile_flag=(--release)
  cargo build "${profile_flag[@]}" -p dinoflow-operator --bin dinoflow-operator \
    -p dinoflow-trainer --bin dinoflow-trainer >&2
  log "binaries ready in $((SECONDS - start)) s"
  BIN_DIR="$CARGO_TARGET_DIR/$PROFILE_DIR"
fi
for bin in dinoflow-operator dinoflow-trainer; do
  [[ -x "$BIN_DIR/$bin" ]] || die "no $bin in $BIN_DIR"
done

# Put FILE (its real content, symlinks followed) at PATH inside the rootfs ROOTFS. Hard links
# when possible: the context is staged in seconds whatever the libraries weigh.
put() {
  local rootfs="$1" file="$2" path="$3" real
  real="$(readlink -f "$file")"
  mkdir -p "$rootfs$(dirname "$path")"
  ln -f "$real" "$rootfs$path" 2>/dev/null || cp -f "$real" "$rootfs$path"
}

# Where a loaded library goes in the image: wheel libraries under $LIBTORCH_DIR in the
# wheel's layout, system libraries at the path the loader found them.
image_path() {
  local lib="$1" real
  real="$(realpath -s "$lib")"
  case "$real" in
    "$SITE"/*) printf '%s/%s\n' "$LIBTORCH_DIR" "${real#"$SITE"/}" ;;
    *) printf '%s\n' "$real" ;;
  esac
}

# Every shared library FILE loads, as ldd resolves it (wheel libraries through their rpaths).
loaded_libs() {
  local out
  out="$(LD_LIBRARY_PATH="$SITE/torch/lib" ldd "$1")" || die "ldd $1 failed"
  if grep -q 'not found' <<<"$out"; then
    die "$1 needs libraries ldd cannot find: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out"
}

# The common part of every rootfs: the binary (stripped of debug info: the dev binaries are
# 200-350 MB of DWARF), the libraries it loads, the user and a world-writable /tmp.
stage_base() {
  local rootfs="$1" binary="$2" lib libs
  libs="$(loaded_libs "$binary")"
  rm -rf "$rootfs"
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  strip --strip-debug -o "$rootfs/usr/local/bin/$(basename "$binary")" "$binary"
  while read -r lib; do
    put "$rootfs" "$lib" "$(image_path "$lib")"
  done <<<"$libs"
  # uid/gid 1000: the operator's default runAsUser for trainer pods and the chart's for the
  # operator. HOME=/tmp: the one writable place under a read-only root.
  printf 'root:x:0:0:root:/root:/sbin/nologin\ndinoflow:x:1000:1000:dinoflow:/tmp:/sbin/nologin\n' \
    >"$rootfs/etc/passwd"
  printf 'root:x:0:\ndinoflow:x:1000:\n' >"$rootfs/etc/group"
  # /etc/hosts first (the kubelet writes a pod's hostAliases there): without this file glibc
  # asks DNS first, which for kubernetes.default.svc answers a ClusterIP that nothing routes on
  # a cluster without kube-proxy (the local node; charts/dinoflow apiServer.* values).
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
}

stage_operator() {
  local rootfs="$1"
  stage_base "$rootfs" "$BIN_DIR/dinoflow-operator"
  # Public CAs, for an API server whose certificate is not the in-cluster CA's.
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    put "$rootfs" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
  fi
}

stage_trainer_cpu() {
  stage_base "$1" "$BIN_DIR/dinoflow-trainer"
}

# The GPU variant: all of libtorch (but its Python bindings) and the nvidia-* wheels' shared
# libraries (CUDA runtime, cuBLAS, cuDNN, NCCL, ...; libtorch_cuda and cuDNN open some at run
# time, so ldd of the binary cannot name them), plus the system libraries all of those load.
# shellcheck disable=SC2016 # the ldd wrapper's $0 and $1 are its own shell's.
stage_trainer_gpu() {
  local rootfs="$1" lib
  stage_base "$rootfs" "$BIN_DIR/dinoflow-trainer"
  while read -r lib; do
    if [[ -L "$lib" ]]; then
      mkdir -p "$rootfs$(dirname "$(image_path "$lib")")"
      ln -sfn "$(readlink "$lib")" "$rootfs$(image_path "$lib")"
    else
      put "$rootfs" "$lib" "$(image_path "$lib")"
    fi
  done < <(find "$SITE/torch/lib" "$SITE"/nvidia/*/lib -maxdepth 1 \( -type f -o -type l \) \
    -name '*.so*' ! -name 'libtorch_python.so' ! -name 'libshm*')
  while read -r lib; do
    [[ -e "$rootfs$(image_path "$lib")" ]] || put "$rootfs" "$lib" "$(image_path "$lib")"
  done < <(find "$rootfs$LIBTORCH_DIR" -type f -name '*.so*' -print0 |
    xargs -0 -n1 sh -c 'LD_LIBRARY_PATH="$0/torch/lib:$0/nvidia/nccl/lib" ldd "$1" 2>/dev/null' "$SITE" |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    grep -v "^$rootfs" | grep -v "^$SITE" | sort -u)
}

# The inputs of an image: every staged file's path, mode and sha256, and the Containerfile.
inputs_hash() {
  local ctx="$1" containerfile="$2"
  {
    (cd "$ctx" && find . -printf '%P %y %m %l\n' | LC_ALL=C sort)
    (cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    sha256sum <"$containerfile"
  } | sha256sum | cut -d' ' -f1
}

# build NAME TAG CONTAINERFILE STAGE_FN: stage, then build and export unless cached.
build() {
  local name="$1" tag="$2" containerfile="$3" stage="$4"
  local ref="$REGISTRY/$name:$tag" archive="$OUT/$name-$tag.oci.tar"
  local ctx="$OUT/context/$name-$tag" hash store
  start=$SECONDS
  "$stage" "$ctx/rootfs"
  hash="$(inputs_hash "$ctx" "$containerfile")"
  if [[ -f "$archive" && "$(cat "$archive.inputs" 2>/dev/null)" == "$hash" ]]; then
    log "$ref: cached ($archive, $(du -h "$archive" | cut -f1))"
  else
    log "$ref: building from ${containerfile#"$ROOT"/} (rootfs $(du -sh "$ctx/rootfs" | cut -f1))"
    # A private store, deleted afterwards: nothing left in (or taken from) the host's
    # containers storage, which other users of this machine share.
    store="$(mktemp -d "$OUT/store.XXXXXX")"
    local b=(buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
    if ! "${b[@]}" build --quiet --pull=never --layers=false --timestamp 0 \
        -f "$containerfile" -t "$ref" "$ctx" >&2 ||
      ! "${b[@]}" push --quiet --disable-compression "$ref" "oci-archive:$archive.part:$ref" >&2; then
      "${b[@]}" rmi --all --force >/dev/null 2>&1 || true
      rm -rf "$store" "$archive.part"
      die "building $ref failed"
    fi
    "${b[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$store"
    mv -f "$archive.part" "$archive"
    printf '%s\n' "$hash" >"$archive.inputs"
    log "$ref: built in $((SECONDS - start)) s ($archive, $(du -h "$archive" | cut -f1))"
  fi
  rm -rf "$ctx"
  printf '%s %s\n' "$ref" "$archive"
}

build dinoflow-operator "$VERSION" "$ROOT/operator/Containerfile" stage_operator
build dinoflow-trainer "$VERSION-cpu" "$ROOT/trainer/Containerfile" stage_trainer_cpu
if ((GPU)); then
  build dinoflow-trainer "$VERSION" "$ROOT/trainer/Containerfile.cuda" stage_trainer_gpu
fi
