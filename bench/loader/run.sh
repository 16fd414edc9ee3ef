#!/usr/bin/env bash
# Loader benchmark: Dinoflow's loader vs the official torchvision + PIL augmentation, on the
# same generated JPEGs, one core each, in one run. Prints both and the per-core ratio.
#   bench/loader/run.sh                 # defaults: 160 images, 10 timed batches of 16
#   N=400 BATCHES=20 bench/loader/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
N="${N:-160}"; BATCH="${BATCH:-16}"; BATCHES="${BATCHES:-10}"; LOCAL="${LOCAL:-8}"
PY="${DINOFLOW_VENV}/bin/python"
"$PY" -c "import torchvision, PIL" 2>/dev/null || {
  echo "installing torchvision 0.26.0 + pillow 13.0.0 into $DINOFLOW_VENV (they match torch 2.11)" >&2
  "$PY" -m pip install -q torchvision==0.26.0 pillow==13.0.0
}
cargo build --release -q -p dinoflow-loader-bench
BIN="${CARGO_TARGET_DIR:-target}/release/loader-bench"
# Pin both sides to the same single core where taskset exists, so "per core" means one core.
PIN=(); command -v taskset >/dev/null && PIN=(taskset -c 0)
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
"$PY" bench/loader/official.py gen "$work/img" "$N" 0
echo "# JPEG decoders, one thread, $N images" >&2
"${PIN[@]}" "$BIN" decoders "$work/img"
"${PIN[@]}" "$PY" bench/loader/official.py decode "$work/img"
echo "# full pipeline: decode + 2x224 + ${LOCAL}x96 crops + collate, one core each" >&2
rust="$("${PIN[@]}" "$BIN" loader "$work/img" --workers 1 --batch-size "$BATCH" --batches "$BATCHES" --local-crops "$LOCAL")"
py="$("${PIN[@]}" "$PY" bench/loader/official.py loader "$work/img" --batch-size "$BATCH" --batches "$BATCHES" --local-crops "$LOCAL")"
echo "$rust"; echo "$py"
"$PY" - "$rust" "$py" <<'PYEOF'
import json, sys
r, p = (json.loads(a) for a in sys.argv[1:3])
ratio = r["images_per_cpu_second"] / p["images_per_cpu_second"]
print(json.dumps({"ratio_per_core": round(ratio, 3), "rust_images_per_cpu_second": round(r["images_per_cpu_second"], 2),
                  "official_images_per_cpu_second": round(p["images_per_cpu_second"], 2), "target": 2.0}))
PYEOF
