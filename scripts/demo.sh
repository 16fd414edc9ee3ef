#!/usr/bin/env bash
# The main job on a local default (README's first command): set up, bring up the local
# control plane in out/cluster, install the CRDs, apply the tiny CPU example job and show it,
# then train that same file with the Rust trainer on CPU (the operator does this in pods once
# it runs in the cluster; locally the trainer runs as a process).
# The cluster stays up afterwards for kubectl; `scripts/cluster.sh down` stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[demo] %s\n' "$*"; }

bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

CLUSTER_DIR="${DINOFLOW_CLUSTER_DIR:-$ROOT/out/cluster}"
EXAMPLE="$ROOT/manifests/examples/tiny-cpu-fashion-mnist.yaml"
[[ -f "$EXAMPLE" ]] || { echo "[demo] error: $EXAMPLE is missing" >&2; exit 1; }
shopt -s nullglob
crds=("$ROOT"/crds/*.yaml)
[[ ${#crds[@]} -gt 0 ]] || { echo "[demo] error: no crds/*.yaml (cargo run -p dinoflow-api --bin crdgen)" >&2; exit 1; }

log "local control plane in $CLUSTER_DIR"
eval "$(bash scripts/cluster.sh up --dir "$CLUSTER_DIR")"
export KUBECONFIG

log "installing CRDs: ${crds[*]#"$ROOT"/}"
bash scripts/cluster.sh install-crds --dir "$CLUSTER_DIR" "${crds[@]}"

log "applying ${EXAMPLE#"$ROOT"/}"
kubectl apply -f "$EXAMPLE"
echo
kubectl get pretrainjobs -o wide
echo
kubectl describe pretrainjobs
echo
OUT="$ROOT/out/tiny-cpu"
log "building the trainer"
cargo build -q -p dinoflow-trainer --bin dinoflow-trainer
TRAINER="$CARGO_TARGET_DIR/debug/dinoflow-trainer"
log "validating ${EXAMPLE#"$ROOT"/} with the trainer"
"$TRAINER" validate --config "$EXAMPLE" >/dev/null
log "training ${EXAMPLE#"$ROOT"/} on CPU into ${OUT#"$ROOT"/} (resumes from its last checkpoint)"
"$TRAINER" train --config "$EXAMPLE" --output-dir "$OUT" --max-iterations 20
log "checkpoints: $(find "$OUT/checkpoints" -mindepth 1 -maxdepth 1 -name 'ckpt-*' -printf '%f ' 2>/dev/null)"
echo
log "cluster still up. To use it: export KUBECONFIG=$KUBECONFIG"
log "to stop it: scripts/cluster.sh down --dir ${CLUSTER_DIR#"$ROOT"/}"
