#!/usr/bin/env bash
# Copies the generated CRDs (crds/*.yaml, from crdgen) into the Helm chart, which can only read
# files inside itself. tests/tests/chart.rs fails when the copy is stale.
#   scripts/chart-crds.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$ROOT/charts/dinoflow/files/crds"
mkdir -p "$dest"
rm -f "$dest"/*.yaml
shopt -s nullglob
for crd in "$ROOT"/crds/*.yaml; do
  cp "$crd" "$dest/"
  echo "[chart-crds] ${crd#"$ROOT"/} -> ${dest#"$ROOT"/}/"
done
