#!/usr/bin/env bash
# Renders the plain install without Helm, manifests/install/, from charts/dinoflow (the one
# source): release `dinoflow` in namespace dinoflow-system, the progress key and the progress
# endpoint's TLS from Secrets the user creates (`dinoflow-progress-key`, `dinoflow-progress-tls`,
# see README), CRDs without Helm's keep annotation.
# tests/tests/chart.rs fails when manifests/install/ differs from a fresh render.
#   scripts/install-manifests.sh [OUT_DIR]     default: manifests/install
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/manifests/install}"
HELM="${HELM:-$(command -v helm || echo "${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}/bin/helm")}"
[[ -x "$HELM" ]] || { echo "[install-manifests] error: no helm (run scripts/setup.sh)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf -- "$tmp"' EXIT
"$HELM" template dinoflow "$ROOT/charts/dinoflow" --namespace dinoflow-system \
  --set progressKey.existingSecret=dinoflow-progress-key \
  --set progressTls.existingSecret=dinoflow-progress-tls --set crds.keep=false \
  --output-dir "$tmp" >/dev/null
mkdir -p "$OUT"
rm -f "$OUT"/*.yaml
cat >"$OUT/00-namespace.yaml" <<'YAML'
# Rendered by scripts/install-manifests.sh from charts/dinoflow; do not edit.
apiVersion: v1
kind: Namespace
metadata:
  name: dinoflow-system
YAML
for file in "$tmp"/dinoflow/templates/*.yaml; do
  name="$(basename "$file")"
  # Not installed by Helm: say so in the labels.
  { echo "# Rendered by scripts/install-manifests.sh from charts/dinoflow; do not edit."
    sed -e 's/^\(\s*app.kubernetes.io\/managed-by:\) Helm$/\1 kubectl/' "$file"; } >"$OUT/$name"
  echo "[install-manifests] ${OUT#"$ROOT"/}/$name"
done
