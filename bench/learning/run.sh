#!/usr/bin/env bash
# Learning check of issue 4: trains manifests/examples/tiny-cpu-fashion-mnist.yaml from scratch
# on this machine's CPU and prints, from the run's metrics.jsonl, k-NN top-1 (k=20) on the 10k
# Fashion-MNIST test images at initialisation and at the end, and the wall time.
#
#   bench/learning/run.sh [OUT_DIR=out/learning]
#
# Exits 1 when k-NN top-1 rose by less than 5 points or the run took over 15 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/out/learning}"
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
cargo build -q -p dinoflow-trainer --bin dinoflow-trainer --manifest-path "$ROOT/Cargo.toml"
rm -rf "$OUT"
start=$(date +%s)
"$CARGO_TARGET_DIR/debug/dinoflow-trainer" train \
  --config "$ROOT/manifests/examples/tiny-cpu-fashion-mnist.yaml" --output-dir "$OUT" --resume never
seconds=$(($(date +%s) - start))
python3 - "$OUT/metrics.jsonl" "$seconds" <<'PY'
import json, sys
evals = [e for e in map(json.loads, open(sys.argv[1])) if e.get("type") == "eval"]
top1 = lambda e: next(a["top1"] for a in e["report"]["knn"] if a["k"] == 20)
for e in evals:
    linear = e["report"].get("linear") or {}
    print(f"iteration {e['iteration']:>4}: k-NN top-1 (k=20) {top1(e):6.2f}  linear top-1 {linear.get('test_top1', float('nan')):6.2f}")
gain, minutes = top1(evals[-1]) - top1(evals[0]), int(sys.argv[2]) / 60
print(f"k-NN gain {gain:+.2f} points in {minutes:.1f} min (target: >= +5 within 15 min)")
sys.exit(0 if gain >= 5 and minutes <= 15 else 1)
PY
